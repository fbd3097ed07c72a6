// Starts the pinned Unleash server for unleash-poller's end-to-end tests and demo.
// Everything comes from TEST_UNLEASH_* environment variables (set by tests/support/unleash.py).
// Unleash 5.x and 6.x are CommonJS packages, hence require() and no top-level await.
'use strict';

const unleash = require('unleash-server');
const { version } = require('unleash-server/package.json');

const env = (name, fallback) => {
    const value = process.env[name] ?? fallback;
    if (value === undefined) {
        console.error(`server.cjs: environment variable ${name} is required`);
        process.exit(2);
    }
    return value;
};

// Unleash phones home (version check, telemetry) unless told not to; tests reach 127.0.0.1
// only. SEND_TELEMETRY is read when start() builds its config; the version check is turned
// off by `versionCheck` below (its env default was read at import).
process.env.SEND_TELEMETRY = 'false';

const port = Number(env('TEST_UNLEASH_PORT', '4242'));
const url = env('TEST_UNLEASH_URL', `http://127.0.0.1:${port}`);

async function main() {
    const instance = await unleash.start({
        db: {
            database: env('TEST_UNLEASH_DB_NAME'),
            user: env('TEST_UNLEASH_DB_USER'),
            password: env('TEST_UNLEASH_DB_PASSWORD'),
            host: env('TEST_UNLEASH_DB_HOST', '127.0.0.1'),
            port: Number(env('TEST_UNLEASH_DB_PORT', '5432')),
            ssl: false,
        },
        server: { port, host: '127.0.0.1', unleashUrl: url },
        authentication: {
            initApiTokens: [
                {
                    type: 'admin',
                    environment: '*',
                    project: '*',
                    secret: env('TEST_UNLEASH_ADMIN_TOKEN'),
                    tokenName: 'unleash-poller-tests',
                },
            ],
        },
        allowPrivateUrlInIntegration: true,
        versionCheck: { enable: false },
        logLevel: 'warn',
    });

    let stopping = false;
    const stop = async (signal) => {
        if (stopping) {
            process.exit(1);
        }
        stopping = true;
        console.log(`unleash ${version} stopping on ${signal}`);
        await instance.stop();
        process.exit(0);
    };
    process.on('SIGTERM', () => stop('SIGTERM'));
    process.on('SIGINT', () => stop('SIGINT'));

    console.log(`unleash ${version} listening on ${url}`);
}

main().catch((error) => {
    console.error('unleash failed to start:', error);
    process.exit(1);
});
