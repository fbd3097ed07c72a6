// Starts one pinned Unleash server for unleash-poller's end-to-end tests, demo and benchmarks.
// Run it with the version's folder as the working directory (tests/unleash/<version>/, where
// `npm ci` put that version's node_modules). Everything else comes from TEST_UNLEASH_*
// environment variables, set by tests/support/unleash.py.
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { pathToFileURL } from 'node:url';

const env = (name, fallback) => {
    const value = process.env[name] ?? fallback;
    if (value === undefined) {
        console.error(`server.mjs: environment variable ${name} is required`);
        process.exit(2);
    }
    return value;
};

// Unleash phones home (version check, telemetry) unless told not to; tests reach 127.0.0.1
// only. SEND_TELEMETRY is read when start() builds its config; the version check is turned
// off by `versionCheck` below.
process.env.SEND_TELEMETRY = 'false';

// Resolve the package from the version's folder, not from this file's: 5.x and 6.x are
// CommonJS (their start() is on the default export), 7.x and later are ES modules.
const require = createRequire(`${process.cwd()}/package.json`);
// Not require('unleash-server/package.json'): newer versions' "exports" do not allow it.
const { version } = JSON.parse(
    readFileSync(`${process.cwd()}/node_modules/unleash-server/package.json`, 'utf8'),
);
const loaded = await import(pathToFileURL(require.resolve('unleash-server')).href);
const start = loaded.start ?? loaded.default?.start;

const port = Number(env('TEST_UNLEASH_PORT', '4242'));
const url = `http://127.0.0.1:${port}`;
// UNLEASH_URL as an operator would set it; TEST_UNLEASH_URL='' leaves it unset, as on a
// plain default install (Unleash then reports http://localhost:4242 in its ui-config).
const unleashUrl = env('TEST_UNLEASH_URL', url);

const instance = await start({
    db: {
        database: env('TEST_UNLEASH_DB_NAME'),
        user: env('TEST_UNLEASH_DB_USER'),
        password: env('TEST_UNLEASH_DB_PASSWORD'),
        host: env('TEST_UNLEASH_DB_HOST', '127.0.0.1'),
        port: Number(env('TEST_UNLEASH_DB_PORT', '5432')),
        ssl: false,
    },
    server: { port, host: '127.0.0.1', ...(unleashUrl ? { unleashUrl } : {}) },
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
