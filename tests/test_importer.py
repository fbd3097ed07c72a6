"""`import` without a server: Unleash's integrations → our keys, masked secrets → files,
disabled ones → comments, bad input → one line. The round trip against a real Unleash is in
tests/test_e2e_import.py."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import aiohttp
import pytest
from aioresponses import aioresponses
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from poller import importer
from poller.config import ConfigError, Secret, UnleashConfig, parse_config
from poller.importer import (
    MASKED,
    ConfigPlan,
    ImporterError,
    ImportOptions,
    Integration,
    parse_addons,
    plan_webhook,
    render_config,
    run_import,
    toml_value,
)
from poller.state import SqliteState
from tests.support.raw_server import RawServer

SECRETS = Path("/etc/unleash-poller/secrets")


def _integration(provider: str, parameters: dict[str, object], **kw: object) -> Integration:
    fields: dict[str, object] = {
        "id": 7,
        "provider": provider,
        "description": "",
        "enabled": True,
        "parameters": parameters,
        "events": ("feature-created",),
        "projects": (),
        "environments": (),
    }
    fields.update(kw)
    return Integration(**fields)  # type: ignore[arg-type]


# provider, Unleash's parameters (as the API shows them), our keys (secrets as files)
MAPPING_CASES = [
    (
        "webhook",
        {
            "url": MASKED,
            "contentType": "text/plain",
            "authorization": MASKED,
            "bodyTemplate": "{{event.type}}",
        },
        {
            "url_file": f"{SECRETS}/webhook-7.url",
            "content_type": "text/plain",
            "authorization_file": f"{SECRETS}/webhook-7.authorization",
            "body_template": "{{event.type}}",
        },
    ),
    (
        "slack-app",
        {"accessToken": MASKED, "defaultChannels": "#general, ops ,"},
        {
            "access_token_file": f"{SECRETS}/slack-app-7.access_token",
            "default_channels": ["#general", "ops"],
        },
    ),
    (
        "slack",
        {"url": MASKED, "username": "bot", "emojiIcon": ":x:", "defaultChannel": "#c"},
        {
            "url_file": f"{SECRETS}/slack-7.url",
            "username": "bot",
            "emoji_icon": ":x:",
            "default_channel": "#c",
        },
    ),
    ("teams", {"url": MASKED}, {"url_file": f"{SECRETS}/teams-7.url"}),
    ("teamsworkflow", {"url": MASKED}, {"url_file": f"{SECRETS}/teamsworkflow-7.url"}),
    (
        "datadog",
        {
            "url": "https://api.datadoghq.eu/api/v1/events",
            "apiKey": MASKED,
            "sourceTypeName": "unleash",
            "bodyTemplate": "{{event.type}}",
        },
        {
            "url": "https://api.datadoghq.eu/api/v1/events",
            "api_key_file": f"{SECRETS}/datadog-7.api_key",
            "source_type_name": "unleash",
            "body_template": "{{event.type}}",
        },
    ),
    (
        "new-relic",
        {
            "url": "https://insights-collector.eu01.nr-data.net/v1/accounts/1/events",
            "licenseKey": MASKED,
        },
        {
            "url": "https://insights-collector.eu01.nr-data.net/v1/accounts/1/events",
            "license_key_file": f"{SECRETS}/new-relic-7.license_key",
        },
    ),
]


@pytest.mark.parametrize(("provider", "parameters", "expected"), MAPPING_CASES)
def test_parameters_map_to_our_keys(
    provider: str, parameters: dict[str, object], expected: dict[str, object]
) -> None:
    """Every provider's camelCase parameters become our snake_case keys; masked ones *_file."""
    plan = plan_webhook(_integration(provider, parameters), SECRETS)
    keys = dict(plan.keys)
    assert keys.pop("name") == f"{provider}-7"
    assert keys.pop("provider") == provider
    assert keys.pop("events") == ["feature-created"]
    assert keys == expected
    assert all(f.value is None for f in plan.secret_files)  # masked: the operator fills them
    assert {str(f.path) for f in plan.secret_files} == {
        v for k, v in expected.items() if k.endswith("_file")
    }


def test_database_values_go_to_files_never_inline(tmp_path: Path) -> None:
    """Real secret values (from the addons table) become files, not config text."""
    integration = _integration(
        "webhook", {"url": "https://hooks.example.com/T/secret-path", "authorization": "tok-123"}
    )
    plan = plan_webhook(integration, tmp_path)
    text = render_config(ConfigPlan("http://u", None, tmp_path / "s.db", None, (plan,), "db"))
    assert "secret-path" not in text
    assert "tok-123" not in text
    values = {f.path.name: f.value.reveal() for f in plan.secret_files if f.value}
    assert values == {
        "webhook-7.url": "https://hooks.example.com/T/secret-path",
        "webhook-7.authorization": "tok-123",
    }
    assert "tok-123" not in repr(plan)


def test_headers_filters_and_empty_values() -> None:
    """customHeaders (a JSON string) becomes a table; "*" filters are left out; empty
    parameters are not set; a masked headers value leaves a note for the operator."""
    plan = plan_webhook(
        _integration(
            "webhook",
            {
                "url": "https://h.example.com",
                "customHeaders": '{"X-Team": "a", "X-N": 1}',
                "contentType": "",
                "bodyTemplate": None,
            },
            projects=("*",),
            environments=("production", "staging"),
        ),
        SECRETS,
    )
    keys = dict(plan.keys)
    assert keys["headers"] == {"X-Team": "a", "X-N": "1"}
    assert "projects" not in keys
    assert keys["environments"] == ["production", "staging"]
    assert "content_type" not in keys
    assert "body_template" not in keys
    masked = plan_webhook(_integration("teams", {"url": MASKED, "customHeaders": MASKED}), SECRETS)
    assert "headers" not in dict(masked.keys)
    assert any("masks customHeaders" in note for note in masked.notes)


def test_disabled_and_eventless_integrations_are_comments() -> None:
    """A disabled integration (or one with no events) is written, but commented out."""
    live = plan_webhook(_integration("webhook", {"url": "https://a.example.com"}, id=1), SECRETS)
    off = plan_webhook(
        _integration(
            "webhook",
            {"url": "https://b.example.com"},
            id=2,
            enabled=False,
            description="old\nhook",
        ),
        SECRETS,
    )
    none = plan_webhook(
        _integration("webhook", {"url": "https://c.example.com"}, id=3, events=()), SECRETS
    )
    text = render_config(ConfigPlan("http://u", None, Path("/s.db"), 42, (live, off, none), "api"))
    data = tomllib.loads(text)
    assert [h["name"] for h in data["webhooks"]] == ["webhook-1"]
    assert data["unleash"]["start_from"] == 42
    assert "# Unleash integration 2 (webhook): old hook\n" in text
    assert '# name = "webhook-2"' in text
    assert "# disabled in Unleash; uncomment to use it" in text
    assert '# name = "webhook-3"' in text
    # Uncommenting a disabled one gives a valid table.
    uncommented = text.replace("# [[webhooks]]", "[[webhooks]]").replace("# name = ", "name = ")
    uncommented = "\n".join(
        line[2:] if line.startswith(("# url", "# provider", "# events")) else line
        for line in uncommented.splitlines()
    )
    assert [h["name"] for h in tomllib.loads(uncommented)["webhooks"]] == [
        "webhook-1",
        "webhook-2",
        "webhook-3",
    ]


def test_unknown_provider_is_one_clear_error() -> None:
    """An integration of a provider we do not know stops the import, naming it."""
    with pytest.raises(ImporterError) as info:
        plan_webhook(_integration("servicenow", {}), SECRETS)
    assert str(info.value).startswith("integration 7: unknown provider 'servicenow' (known: ")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>", "the answer is not JSON"),
        (b'{"providers": []}', "no 'addons' list"),
        (b'{"addons": [1]}', "addons[0] is not an object"),
        (b'{"addons": [{"provider": "webhook"}]}', "addons[0]: has no integer id"),
        (b'{"addons": [{"id": 3, "provider": "webhook", "events": "x"}]}', "integration 3.events"),
        (b'{"addons": [{"id": 3, "provider": "webhook", "parameters": []}]}', "parameters is not"),
    ],
)
def test_bad_addons_answers(body: bytes, message: str) -> None:
    """An answer that is not Unleash's addons list is one line naming what is wrong."""
    with pytest.raises(ImporterError) as info:
        parse_addons(body)
    assert message in str(info.value)


def test_parse_addons_reads_the_api_shape() -> None:
    """The API's addons, in id order, with missing lists as empty."""
    body = json.dumps(
        {
            "addons": [
                {
                    "id": 9,
                    "provider": "datadog",
                    "enabled": False,
                    "parameters": {"apiKey": MASKED},
                    "events": ["feature-created"],
                    "projects": None,
                    "environments": [],
                    "description": None,
                    "createdAt": "2026-01-01",
                },
                {
                    "id": 2,
                    "provider": "webhook",
                    "enabled": True,
                    "parameters": {"url": MASKED},
                    "events": [],
                },
            ],
            "providers": [],
        }
    ).encode()
    first, second = parse_addons(body)
    assert (first.id, first.provider, first.enabled, first.projects) == (2, "webhook", True, ())
    assert (second.id, second.enabled, second.description) == (9, False, "")


def test_generated_config_fails_check_only_on_files_to_fill(tmp_path: Path) -> None:
    """A config written from the API fails `check` only on the masked secrets' files, each
    named; once they are filled it passes."""
    plans = (
        plan_webhook(
            _integration("webhook", {"url": MASKED, "authorization": MASKED}, id=1),
            tmp_path / "secrets",
        ),
        plan_webhook(
            _integration("webhook", {"url": MASKED}, id=2, enabled=False), tmp_path / "secrets"
        ),
    )
    (tmp_path / "token").write_text("*:*.t")
    text = render_config(
        ConfigPlan(
            "http://127.0.0.1:4242", tmp_path / "token", tmp_path / "s.db", None, plans, "api"
        )
    )
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), tmp_path)
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("webhooks[0].url_file: cannot read ")
    assert "webhook-1.url" in problems[0]
    assert problems[1].startswith("webhooks[0].authorization_file: cannot read ")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "webhook-1.url").write_text("http://127.0.0.1:9/x\n")
    (tmp_path / "secrets" / "webhook-1.authorization").write_text("Bearer b\n")
    config = parse_config(tomllib.loads(text), tmp_path)
    assert config.webhooks[0].url == "http://127.0.0.1:9/x"
    assert config.webhooks[0].authorization.reveal() == "Bearer b"  # type: ignore[union-attr]


_VALUES = st.recursive(
    st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
) | st.dictionaries(st.text(max_size=10), st.text(max_size=20), max_size=3)


@settings(max_examples=80, deadline=None)
@given(_VALUES)
def test_toml_value_reads_back(value: object) -> None:
    """Any string, list or table of strings is written as TOML that reads back the same
    (a lone surrogate becomes U+FFFD, as Node would send it)."""
    expected = json.loads(json.dumps(value).encode().decode("utf-8"))

    def clean(v: object) -> object:
        if isinstance(v, str):
            return v.encode("utf-8", "replace").decode("utf-8")
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, dict):
            return {clean(k): clean(x) for k, x in v.items()}
        return v

    assert tomllib.loads(f"v = {toml_value(value)}")["v"] == clean(expected)


def test_import_command_unreadable_unleash_is_one_line(tmp_path: Path) -> None:
    """`import` against an Unleash that does not answer: one line, exit 69, no file."""
    (tmp_path / "token").write_text("*:*.t")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "poller",
            "import",
            "--unleash",
            "http://127.0.0.1:1",
            "--token-file",
            str(tmp_path / "token"),
            "-o",
            str(tmp_path / "c.toml"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 69, result.stderr
    assert result.stderr.startswith(
        "unleash-poller: import: cannot read Unleash at http://127.0.0.1:1"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "c.toml").exists()


def test_a_cut_over_that_fails_partway_says_what_is_done_and_how_to_finish(
    tmp_path: Path,
) -> None:
    """A PUT that fails on the second of three integrations: the error names the one
    already disabled, the two still enabled, that the cursor was not set, and the command
    that sets it; the third is not touched and the state file has no cursor."""
    base = "http://unleash.test"
    addons = [
        {
            "id": i,
            "provider": "webhook",
            "enabled": True,
            "parameters": {"url": MASKED},
            "events": ["feature-created"],
        }
        for i in (1, 2, 3)
    ]
    events = {
        "events": [{"id": 42, "type": "feature-created", "createdAt": "2026-11-28T10:00:00.000Z"}],
        "total": 1,
    }
    options = ImportOptions(
        unleash_url=base,
        token=Secret("*:*.tok"),
        token_file=None,
        output=tmp_path / "c.toml",
        state_path=tmp_path / "s.sqlite3",
        cut_over=True,
    )
    with aioresponses() as mocked:
        mocked.get(f"{base}/api/admin/ui-config", payload={"version": "8.2.0", "unleashUrl": base})
        mocked.get(f"{base}/api/admin/addons", payload={"addons": addons, "providers": []})
        mocked.get(
            re.compile(r"^http://unleash\.test/api/admin/search/events.*$"),
            payload=events,
            repeat=True,
        )
        mocked.put(f"{base}/api/admin/addons/1", status=200, payload={})
        mocked.put(f"{base}/api/admin/addons/2", status=500, body="oops")
        with pytest.raises(ImporterError) as info:
            asyncio.run(run_import(options))
        puts = [url for (method, url) in mocked.requests if method == "PUT"]
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "--cut-over stopped halfway: PUT http://unleash.test/api/admin/addons/2: "
        "unexpected status 500."
    )
    assert "Disabled in Unleash: webhook #1; still enabled: webhook #2, webhook #3;" in message
    assert "the state file's cursor was NOT set" in message
    assert f"`unleash-poller cursor set -c {tmp_path / 'c.toml'} 42`" in message
    assert [str(u) for u in puts] == [f"{base}/api/admin/addons/1", f"{base}/api/admin/addons/2"]
    assert info.value.exit_code == 69
    if options.state_path.exists():
        state = SqliteState.open(options.state_path)
        assert asyncio.run(state.high_water()) is None
        asyncio.run(state.close())


def test_an_api_failure_never_names_a_proxys_password() -> None:
    """A proxy's 407 (aiohttp names the proxy with its user info) is one line with the
    proxy's scheme and host only."""
    proxy = "http://ops:s3cret@proxy.test:3128"
    info = aiohttp.RequestInfo(URL(proxy), "CONNECT", CIMultiDictProxy(CIMultiDict()), URL(proxy))
    config = UnleashConfig(
        url="http://unleash.test", token=Secret("*:*.t"), public_url=None, timeout_s=2
    )

    async def main() -> ImporterError:
        with aioresponses() as mocked:
            mocked.get(
                "http://unleash.test/api/admin/addons",
                exception=aiohttp.ClientHttpProxyError(info, (), status=407, message="no"),
            )
            async with aiohttp.ClientSession() as session:
                with pytest.raises(ImporterError) as raised:
                    await importer._api(session, config, "GET", "/api/admin/addons", None)
        return raised.value

    error = asyncio.run(main())
    assert str(error).startswith("GET http://unleash.test/api/admin/addons: 407")
    assert "http://proxy.test:3128" in str(error)
    assert "s3cret" not in str(error)


def test_an_answer_over_the_page_limit_is_one_line_and_never_held_whole() -> None:
    """A server (not Unleash, or a broken one) that answers the addons call with 40 MiB,
    chunked so that no Content-Length warns of it: the read stops at the 32 MiB limit the
    daemon's own reads keep, with one line that says so."""
    chunk = b"x" * 2**20
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    # The client stops reading at the limit: the server then stops sending.
    server = RawServer(
        lambda _: [head, *[b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 40, b"0\r\n\r\n"]
    )
    port = server.port
    config = UnleashConfig(
        url=f"http://127.0.0.1:{port}", token=Secret("*:*.t"), public_url=None, timeout_s=20
    )

    async def main() -> ImporterError:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ImporterError) as raised:
                await importer._api(session, config, "GET", "/api/admin/addons", None)
        return raised.value

    try:
        error = asyncio.run(main())
    finally:
        server.close()
    assert str(error) == (
        f"GET http://127.0.0.1:{port}/api/admin/addons: answer is over the {32 * 2**20}-byte limit"
    )
    assert error.exit_code == 69
