"""The provider registry, its config checks (`check`), and `render` of provider requests."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from poller.config import ConfigError, parse_config
from poller.providers import PROVIDERS
from poller.providers.base import js_substring
from tests.support.node import NODE_MODULES, require_node

HEAD = '[unleash]\nurl = "http://127.0.0.1:1"\ntoken = "t"\n[[webhooks]]\nname = "n"\n'
DEFINITION_FILES = {
    "slack-app": "slack-app",
    "slack": "slack",
    "teams": "teams",
    "teamsworkflow": "teams-workflow",
    "datadog": "datadog",
    "new-relic": "new-relic",
}


def _problems(hook: str, tmp_path: Path) -> list[str]:
    try:
        parse_config(tomllib.loads(HEAD + hook), tmp_path)
    except ConfigError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(
    ("hook", "expected"),
    [
        ('provider = "slack-app"\naccess_token = "x"', []),
        ('provider = "slack-app"',
         ["webhooks[0].access_token: is required by provider 'slack-app'"]),
        ('provider = "slack-app"\naccess_token = "x"\ncontent_type = "a"',
         ["webhooks[0].content_type: does not belong to provider 'slack-app'"]),
        ('provider = "teams"\nurl = "https://x.example/"\nheaderz = {}',
         ["webhooks[0].headerz: unknown key (does not belong to provider 'teams')"]),
        ('provider = "teams"', ["webhooks[0].url: is required by provider 'teams'"]),
        # An unknown provider is checked as a webhook (which needs a url).
        ('provider = "slak"', ["webhooks[0].url: is required",
                               "webhooks[0].provider: unknown provider 'slak'; one of: webhook, "
                               "slack-app, slack, teams, teamsworkflow, datadog, new-relic"]),
        ('provider = "slack"\nurl = "https://hooks.slack.com/x"',
         ["webhooks[0].default_channel: is required by provider 'slack'"]),
        ('provider = "slack"\nurl = "ftp://x"\ndefault_channel = "c"',
         ["webhooks[0].url: must be an http(s) URL"]),
        ('provider = "datadog"\napi_key = "k"\nbody_template = "{{#a}}"',
         ['webhooks[0].body_template: invalid Mustache: Unclosed section "a" at 6']),
        ('provider = "datadog"\napi_key = "k"\napi_key_env = "X"',
         ["webhooks[0].api_key: give only one of api_key, api_key_env"]),
        ('provider = "new-relic"\nlicense_key_file = "missing"\nurl = "https://x.example/"',
         ["webhooks[0].license_key_file: cannot read {tmp}/missing: No such file or directory"]),
        ('provider = "slack-app"\naccess_token = "x"\ndefault_channels = "a,b"',
         ["webhooks[0].default_channels: must be a list of non-empty strings"]),
        ('provider = "webhook"\nurl = "https://x.example/"\naccess_token = "x"',
         ["webhooks[0].access_token: unknown key"]),
    ],
)  # fmt: skip
def test_provider_config_problems(hook: str, expected: list[str], tmp_path: Path) -> None:
    """A key that does not belong, a missing required key, an unknown provider: one line
    each, naming the key."""
    assert _problems(hook, tmp_path) == [p.replace("{tmp}", str(tmp_path)) for p in expected]


def test_provider_webhooks_take_the_delivery_controls(tmp_path: Path) -> None:
    """A provider webhook (Slack's ~1 message a second) takes the same rate limit, 429
    bound, pause and attempt-log settings as a plain webhook, checked the same way."""
    controls = (
        "max_per_second = 1\nmax_rate_limit_wait_s = 120\npause_after_failures = 2\n"
        "probe_interval_s = 30\nattempt_log_size = 50\n"
    )
    config = parse_config(
        tomllib.loads(HEAD + 'provider = "slack-app"\naccess_token = "x"\n' + controls),
        tmp_path,
    )
    [hook] = config.webhooks
    assert (
        hook.max_per_second,
        hook.max_rate_limit_wait_s,
        hook.pause_after_failures,
        hook.probe_interval_s,
        hook.attempt_log_size,
    ) == (1, 120, 2, 30, 50)
    problems = _problems(
        'provider = "teams"\nurl = "https://x.example/"\nmax_per_second = 0', tmp_path
    )
    assert len(problems) == 1
    assert problems[0].startswith("webhooks[0].max_per_second: ")


def test_secret_from_file_and_default_events(tmp_path: Path) -> None:
    """A secret read through *_file reaches the request; omitted events are the provider's."""
    (tmp_path / "key").write_text("nr-secret\n")
    config = parse_config(
        tomllib.loads(
            HEAD + 'provider = "new-relic"\nlicense_key_file = "key"\nurl = "https://x.example/"'
        ),
        tmp_path,
    )
    [hook] = config.webhooks
    assert hook.events == PROVIDERS["new-relic"].default_events
    assert hook.provider is not None
    assert "nr-secret" not in repr(hook)
    event = {"id": 1, "type": "feature-created", "createdAt": "2026-01-01T00:00:00.000Z"}
    [request] = hook.provider.requests(event)
    assert ("Api-Key", "nr-secret") in request.headers
    assert "nr-secret" not in repr(request)


def test_default_events_are_those_unleash_definitions_offer() -> None:
    """Each provider's pinned event list equals its 8.2.0 definition's `events`."""
    node = require_node(NODE_MODULES)
    script = (
        "const names = JSON.parse(require('fs').readFileSync(0, 'utf8'));"
        "Promise.all(names.map((n) => import(`./node_modules/unleash-server/dist/lib/addons/"
        "${n}-definition.js`))).then((ms) => console.log(JSON.stringify("
        "ms.map((m) => [m.default.name, m.default.events]))));"
    )
    done = subprocess.run(
        [node, "-e", script],
        input=json.dumps(list(DEFINITION_FILES.values())),
        cwd=NODE_MODULES.parent,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    pairs = json.loads(done.stdout)
    definitions = {name: tuple(events) for name, events in pairs}
    assert definitions == {name: p.default_events for name, p in PROVIDERS.items()}


def test_render_prints_every_request_with_secrets_masked(tmp_path: Path) -> None:
    """`render` shows each Slack request: URL, headers (token masked), body."""
    config = tmp_path / "c.toml"
    config.write_text(
        HEAD
        + 'provider = "slack-app"\naccess_token = "xoxb-very-secret"\n'
        + 'default_channels = ["a", "b"]\n'
    )
    event = tmp_path / "e.json"
    event.write_text(
        json.dumps({"id": 1, "type": "feature-created", "createdBy": "me",
                    "createdAt": "2026-01-01T00:00:00.000Z", "featureName": "f",
                    "project": "default"})
    )  # fmt: skip
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "poller",
            "render",
            "-c",
            config,
            "--webhook",
            "n",
            "--event",
            event,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "xoxb-very-secret" not in done.stdout
    blocks = done.stdout.split("--- request ")[1:]
    assert [b.splitlines()[0] for b in blocks] == ["1 of 2 (channel:a)", "2 of 2 (channel:b)"]
    lines = blocks[0].splitlines()
    assert lines[1] == "POST https://slack.com/api/chat.postMessage"
    assert "Authorization: ***" in lines
    assert json.loads(lines[lines.index("") + 1])["channel"] == "a"


def test_render_decompresses_new_relic_and_masks_a_webhook_url(tmp_path: Path) -> None:
    """New Relic's gzip body is shown as JSON; a Teams URL (a credential) is cut to its host."""
    config = tmp_path / "c.toml"
    config.write_text(
        HEAD + 'provider = "new-relic"\nlicense_key = "nr-k"\nurl = "https://nr.example/v1"\n'
        '[[webhooks]]\nname = "t"\nprovider = "teams"\nurl = "https://o.example/webhook/SECRET"\n'
    )
    event = tmp_path / "e.json"
    event.write_text(json.dumps({"id": 1, "type": "feature-created", "createdBy": "me",
                                 "createdAt": "2026-01-01T00:00:00.000Z"}))  # fmt: skip
    outputs = {}
    for name in ("n", "t"):
        done = subprocess.run(
            [sys.executable, "-m", "poller", "render", "-c", config, "--webhook", name,
             "--event", event],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        outputs[name] = done.stdout
    assert '"eventType":"UnleashServiceEvent"' in outputs["n"]
    assert "Api-Key: ***" in outputs["n"]
    assert "nr-k" not in outputs["n"]
    assert "POST https://o.example/***" in outputs["t"]
    assert "SECRET" not in outputs["t"]


def test_check_exits_78_with_one_line_for_a_bad_provider_key(tmp_path: Path) -> None:
    """`check` prints one line naming the key and exits 78."""
    config = tmp_path / "c.toml"
    config.write_text(HEAD + 'provider = "teams"\nurl = "https://x.example/"\napi_key = "k"\n')
    done = subprocess.run(
        [sys.executable, "-m", "poller", "check", "-c", config],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 78
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("webhooks[0].api_key: does not belong to provider 'teams'")
    )


def test_example_config_provider_blocks_pass_check(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Every commented provider example in config.example.toml is valid once uncommented."""
    text = (Path(__file__).resolve().parents[1] / "config.example.toml").read_text()
    section = text.split("# ---- Providers", 1)[1]
    lines = [line[2:] for line in section.splitlines() if line.startswith("# ")]
    for name in ("SLACK_BOT_TOKEN", "SLACK_WEBHOOK_URL", "TEAMS_WORKFLOW_URL",
                 "TEAMS_WEBHOOK_URL", "DD_API_KEY", "NEW_RELIC_LICENSE_KEY"):  # fmt: skip
        monkeypatch.setenv(name, "https://secret.example/x")
    config = parse_config(
        tomllib.loads('[unleash]\nurl = "http://127.0.0.1:1"\ntoken = "t"\n' + "\n".join(lines)),
        tmp_path,
    )
    providers = {h.provider.provider.name for h in config.webhooks if h.provider is not None}
    assert providers == set(PROVIDERS)


@hypothesis_settings(max_examples=80)
@given(st.text(), st.integers(0, 40))
def test_js_substring_counts_utf16_units(text: str, length: int) -> None:
    """substring(0, n): the first min(n, len) UTF-16 units of the text, nothing else."""
    units = text.encode("utf-16-le", "surrogatepass")
    cut = js_substring(text, length).encode("utf-16-le", "surrogatepass")
    assert cut == units[: 2 * length]


def test_each_name_looks_up_the_provider_of_that_name() -> None:
    """The registry maps each Unleash integration name to the provider that says it is
    that name, and knows its names without importing the modules."""
    assert {name: PROVIDERS[name].name for name in PROVIDERS} == {n: n for n in DEFINITION_FILES}
    assert "webhook" not in PROVIDERS
    assert "nope" not in PROVIDERS


def test_a_daemon_of_webhooks_only_does_not_load_the_providers(tmp_path: Path) -> None:
    """A config with only webhooks loads no provider module (nor the Markdown formatter
    they share): their code stays out of the daemon's memory until a config asks for one."""
    config = tmp_path / "c.toml"
    config.write_text(HEAD + 'url = "http://127.0.0.1:1/n"\n')
    config.chmod(0o600)  # it holds the token
    probe = (
        "import sys; from pathlib import Path; import poller.cli, poller.app;"
        "from poller.config import load_config;"
        f"load_config(Path({str(config)!r}));"
        "loaded = [m for m in sys.modules if m.startswith(('poller.providers.', 'poller.markd'))];"
        "print(sorted(loaded))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "['poller.providers.base']"
    slack = HEAD.replace(
        'name = "n"', 'name = "n"\nprovider = "slack"\nurl = "https://h/x"\ndefault_channel = "c"'
    )
    config.write_text(slack)
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert "'poller.providers.slack'" in out
    assert "'poller.providers.teams'" not in out
