"""Config loading: every mistake is named by its place; a good file gives frozen settings."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.config import (
    Config,
    ConfigError,
    Secret,
    apply_server_profile,
    load_config,
    parse_config,
    split_secret_lines,
)
from poller.render import ServerProfile

ROOT = Path(__file__).resolve().parents[1]

GOOD = """
[unleash]
url = "http://127.0.0.1:4242/"
token = "*:*.secret-token"
[state]
path = "state.sqlite3"
[[webhooks]]
name = "audit"
url = "https://example.com/hook"
"""


def _parse(text: str, tmp_path: Path) -> object:
    return parse_config(tomllib.loads(text), tmp_path)


def _problems(text: str, tmp_path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    return info.value.problems


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    """A minimal file yields the defaults the README documents."""
    config = parse_config(tomllib.loads(GOOD), tmp_path)
    assert config.unleash.url == "http://127.0.0.1:4242"
    # No public_url: links follow the server's unleashUrl once it is asked; until then
    # (check, an offline render) they use the URL the poller was given.
    assert config.unleash.public_url is None
    assert config.server is not None
    assert config.server.unleash_url == "http://127.0.0.1:4242"
    assert config.unleash.poll_interval_s == 0.4
    assert config.unleash.start_from == "latest"
    assert config.state.path == tmp_path / "state.sqlite3"
    hook = config.webhooks[0]
    assert (hook.retries, hook.timeout_s, hook.max_in_flight) == (1, 10.0, 1)
    assert hook.content_type == "application/json"
    assert hook.authorization is None
    assert (hook.events, hook.projects, hook.environments) == (None, None, None)
    assert hook.retry_delays == (1.0,)
    assert (hook.escape, hook.tags) == (None, None)  # escape follows the server's version


BAD_CASES = [
    (
        '[unleash]\nurl="ftp://x"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"',
        "unleash.url: must be an http(s) URL",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="nope"',
        "webhooks[0].url: must be an http(s) URL",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\ncolour="red"\n[[webhooks]]\nname="a"\nurl="http://h"',
        "unleash.colour: unknown key",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\nretries="2"',
        "webhooks[0].retries: must be an integer, not a string",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\nretries=true',
        "webhooks[0].retries: must be an integer, not a boolean",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\npoll_interval_s=0\n[[webhooks]]\nname="a"\nurl="http://h"',
        "unleash.poll_interval_s: must be greater than 0",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\nstart_from="yesterday"\n[[webhooks]]\nname="a"\n'
        'url="http://h"',
        'unleash.start_from: must be "latest", "earliest" or an event id (>= 0)',
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        '[[webhooks]]\nname="a"\nurl="http://h2"',
        "webhooks[1].name: duplicate name 'a' (also webhooks[0])",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        'body_template="{{#x}}"',
        "webhooks[0].body_template: invalid Mustache",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        'template_engine="jinja2"\nbody_template="{% if %}"',
        "webhooks[0].body_template: invalid Jinja2 at line 1",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        'template_engine="jinja2"\nbody_template="{{ secrets }}"',
        "webhooks[0].body_template: unknown name(s) secrets",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        'template_engine="handlebars"',
        'webhooks[0].template_engine: must be "mustache" or "jinja2"',
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        'headers={"Bad Header"="x"}',
        "webhooks[0].headers.Bad Header: is not a valid HTTP header",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\nevents=[]',
        "webhooks[0].events: must not be empty",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        "retry_schedule_s=[5, -1]",
        "webhooks[0].retry_schedule_s: must be a non-empty list",
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        'escape="xml"',
        'webhooks[0].escape: must be "unleash", "none" or "json"',
    ),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'
        "max_in_flight=0",
        "webhooks[0].max_in_flight: must be between 1 and 256",
    ),
    ('[unleash]\nurl="http://u"\ntoken="t"', "webhooks: must list at least one [[webhooks]] table"),
    ('[[webhooks]]\nname="a"\nurl="http://h"', "unleash: section is required"),
    (
        '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nurl="http://h"',
        "webhooks[0].name: is required",
    ),
    (
        'log_level="loud"\n[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\n'
        'url="http://h"',
        "log_level: must be one of debug, info, warning, error",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_each_mistake_is_reported_at_its_place(
    text: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config mistake yields a problem line that starts with its place."""
    monkeypatch.delenv("UNLEASH_POLLER_TOKEN", raising=False)
    problems = _problems(text, tmp_path)
    assert any(p.startswith(expected) for p in problems), problems


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes come back together, not one per run."""
    problems = _problems(
        '[unleash]\nurl="x"\ntoken="t"\nfoo=1\n[[webhooks]]\nname="a"\nurl="y"\nretries=-1',
        tmp_path,
    )
    assert len(problems) == 4, problems


def test_missing_token_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No token from any source is a config error naming all the ways to give one."""
    monkeypatch.delenv("UNLEASH_POLLER_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    problems = _problems(
        '[unleash]\nurl="http://u"\n[[webhooks]]\nname="a"\nurl="http://h"', tmp_path
    )
    assert problems[0].startswith("unleash.token: is required (token, token_file")


def test_token_from_file_env_and_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token can come from token_file, the environment, or a systemd credential."""
    base = '[unleash]\nurl="http://u"\n{}\n[[webhooks]]\nname="a"\nurl="http://h"'
    (tmp_path / "tok").write_text("from-file\n")
    config = parse_config(tomllib.loads(base.format('token_file="tok"')), tmp_path)
    assert config.unleash.token.reveal() == "from-file"
    monkeypatch.setenv("UNLEASH_POLLER_TOKEN", "from-env")
    assert (
        parse_config(tomllib.loads(base.format("")), tmp_path).unleash.token.reveal() == "from-env"
    )
    monkeypatch.delenv("UNLEASH_POLLER_TOKEN")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "unleash-token").write_text("from-credential")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert (
        parse_config(tomllib.loads(base.format("")), tmp_path).unleash.token.reveal()
        == "from-credential"
    )


def test_secrets_do_not_show_in_repr(tmp_path: Path) -> None:
    """Neither the token nor an authorization value appears in a config's repr."""
    text = GOOD + 'authorization = "Bearer hunter2-canary"\n'
    config = parse_config(tomllib.loads(text), tmp_path)
    shown = repr(config) + str(config.webhooks[0].authorization)
    assert "secret-token" not in shown
    assert "hunter2-canary" not in shown
    assert repr(Secret("x")) == "Secret('***')"


def test_star_means_all_and_globs_are_kept(tmp_path: Path) -> None:
    """`["*"]` for projects means no filter; event globs are kept as written."""
    text = GOOD + 'projects=["*"]\nevents=["feature-*"]\nenvironments=["production"]\n'
    hook = parse_config(tomllib.loads(text), tmp_path).webhooks[0]
    assert hook.projects is None
    assert hook.events == ("feature-*",)
    assert hook.environments == ("production",)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A TOML syntax error names the file and the line."""
    path = tmp_path / "bad.toml"
    path.write_text("[unleash\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems[0].startswith(f"{path}: invalid TOML")
    assert "line 1" in info.value.problems[0]


def test_example_config_passes_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped config.example.toml is valid."""
    monkeypatch.setenv("UNLEASH_POLLER_TOKEN", "example-token")
    config = load_config(ROOT / "config.example.toml")
    assert len(config.webhooks) >= 2


def test_check_command_exits_78_with_one_line_per_problem(tmp_path: Path) -> None:
    """`unleash-poller check` prints each problem on its own line and exits 78, no traceback."""
    path = tmp_path / "c.toml"
    path.write_text('[unleash]\nurl="x"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="y"\n')
    result = subprocess.run(
        [sys.executable, "-m", "poller", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "unleash.url: must be an http(s) URL",
        "webhooks[0].url: must be an http(s) URL",
    ]
    assert "Traceback" not in result.stderr


def test_tls_and_signing_mistakes_are_named(tmp_path: Path) -> None:
    """A missing CA file, a bad signing secret and a signature header set by hand are
    reported at their places."""
    text = GOOD + (
        'ca_file = "missing.pem"\nsigning_secret = "whsec_%%%"\n'
        'headers = { "webhook-signature" = "x" }\n'
    )
    problems = _problems(text, tmp_path)
    problems += _problems(
        GOOD + 'signing_secret = "raw"\nheaders = { "webhook-signature" = "x" }\n', tmp_path
    )
    assert any(p.startswith("webhooks[0].ca_file: ") and "missing.pem" in p for p in problems), (
        problems
    )
    assert any(p.startswith("webhooks[0].signing_secret: ") for p in problems), problems
    assert "webhooks[0].headers.webhook-signature: is set by signing_secret; remove it" in problems
    assert all("%%%" not in p for p in problems)


def test_proxy_from_environment_only_with_trust_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY is ignored unless trust_env = true; an explicit proxy always applies."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert parse_config(tomllib.loads(GOOD), tmp_path).webhooks[0].proxy is None
    trusted = parse_config(tomllib.loads("trust_env = true\n" + GOOD), tmp_path)
    assert trusted.webhooks[0].proxy == "http://proxy.internal:3128"
    explicit = parse_config(tomllib.loads(GOOD + 'proxy = "http://p:8080"\n'), tmp_path)
    assert explicit.webhooks[0].proxy == "http://p:8080"


def test_run_refuses_world_readable_file_with_inline_secret(tmp_path: Path) -> None:
    """`run` refuses a config that holds an inline secret and that others can read (78),
    and names the secrets' places but not their values."""
    path = tmp_path / "c.toml"
    path.write_text(GOOD.replace('path = "state.sqlite3"', f'path = "{tmp_path}/s.sqlite3"'))
    path.chmod(0o644)
    result = subprocess.run(
        [sys.executable, "-m", "poller", "run", "--once", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 78
    assert (
        "holds secrets (unleash.token) but is readable by other users (mode 0644)" in result.stderr
    )
    assert "secret-token" not in result.stderr
    assert not (tmp_path / "s.sqlite3").exists()


def test_signed_webhook_with_headers_keeps_its_name(tmp_path: Path) -> None:
    """Extra headers on a signed webhook do not disturb its other settings."""
    hook = parse_config(
        tomllib.loads(GOOD + 'signing_secret = "s"\nheaders = { "X-A" = "1" }\n'), tmp_path
    ).webhooks[0]
    assert (hook.name, hook.headers) == ("audit", (("X-A", "1"),))


def test_secrets_from_env_keys_and_conflicts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`*_env` names an environment variable holding the secret; an unset one, or two
    sources for one secret, are errors at their place."""
    monkeypatch.setenv("HOOK_AUTH", "Bearer from-env")
    text = GOOD + 'authorization_env = "HOOK_AUTH"\n'
    assert parse_config(tomllib.loads(text), tmp_path).webhooks[0].authorization == Secret(
        "Bearer from-env"
    )
    problems = _problems(GOOD + 'signing_secret_env = "NOT_SET_ANYWHERE"\n', tmp_path)
    assert problems == [
        "webhooks[0].signing_secret_env: environment variable NOT_SET_ANYWHERE is not set or empty"
    ]
    problems = _problems(GOOD + 'authorization = "a"\nauthorization_file = "f"\n', tmp_path)
    assert problems == [
        "webhooks[0].authorization: give only one of authorization, authorization_file"
    ]


PROFILE_CONFIG = """
[unleash]
url = "http://127.0.0.1:4242/"
token = "t"
{public_url}
[[webhooks]]
name = "follows"
url = "https://example.com/a"
body_template = '{{{{eventMarkdown}}}}|{{{{event.data.description}}}}'
[[webhooks]]
name = "explicit"
url = "https://example.com/b"
escape = "unleash"
body_template = '{{{{eventMarkdown}}}}|{{{{event.data.description}}}}'
"""
PROFILE_EVENT = {
    "id": 1,
    "type": "feature-created",
    "createdBy": "ann",
    "data": {"name": "f", "description": "<b>"},
    "featureName": "f",
    "project": "default",
}


def _load_text(text: str, tmp_path: Path) -> Config:
    return parse_config(tomllib.loads(text), tmp_path)


def _bodies(config: Config) -> dict[str, str]:
    return {h.name: h.renderer.render(PROFILE_EVENT).decode() for h in config.webhooks}


def test_renderers_follow_the_server_profile(tmp_path: Path) -> None:
    """Without public_url, links use the server's unleashUrl and escaping its version's;
    an explicit escape keeps its value."""
    config = _load_text(PROFILE_CONFIG.format(public_url=""), tmp_path)
    offline = _bodies(config)
    assert "http://127.0.0.1:4242/projects/default/features/f" in offline["follows"]
    assert offline["follows"].endswith("|&lt;b&gt;")
    on_765 = _bodies(apply_server_profile(config, ServerProfile("7.6.5", "http://localhost:4242")))
    assert "(http://localhost:4242/projects/default/features/f)" in on_765["follows"]
    assert on_765["follows"].endswith("|<b>")  # 7.x does not escape
    assert on_765["explicit"].endswith("|&lt;b&gt;")  # an explicit value wins
    on_5 = _bodies(apply_server_profile(config, ServerProfile("5.12.8", "http://x")))
    assert on_5["follows"] == "|&lt;b&gt;"  # no eventMarkdown on 5.x


DATADOG_CONFIG = """
[unleash]
url = "http://127.0.0.1:4242"
token = "t"
[state]
path = "s.db"
[[webhooks]]
name = "dd"
provider = "datadog"
api_key = "k"
url = "http://127.0.0.1:9/dd"
body_template = "{{event.data.description}}"
"""


def _datadog_text(config: Config) -> str:
    [hook] = config.webhooks
    assert hook.provider is not None
    [request] = hook.provider.requests(PROFILE_EVENT)
    text = json.loads(request.body)["text"]
    assert isinstance(text, str)
    return text


def test_provider_templates_follow_the_server_profile(tmp_path: Path) -> None:
    """A Datadog body_template escapes as the polled server's version does: HTML-escaped
    offline and on 8.x and 5.x, not on 7.6.5 (as a webhook's default escape)."""
    config = _load_text(DATADOG_CONFIG, tmp_path)
    assert _datadog_text(config) == "&lt;b&gt;"
    on_765 = apply_server_profile(config, ServerProfile("7.6.5", "http://localhost:4242"))
    assert _datadog_text(on_765) == "<b>"
    on_8 = apply_server_profile(on_765, ServerProfile("8.2.0", "http://localhost:4242"))
    assert _datadog_text(on_8) == "&lt;b&gt;"
    assert _datadog_text(apply_server_profile(config, ServerProfile("5.12.8", "http://x"))) == (
        "&lt;b&gt;"
    )


def test_public_url_wins_over_the_server_unleash_url(tmp_path: Path) -> None:
    """An explicit public_url is the link base whatever the server reports."""
    config = _load_text(
        PROFILE_CONFIG.format(public_url='public_url = "https://flags.example.com/"'), tmp_path
    )
    applied = apply_server_profile(config, ServerProfile("8.2.0", "http://localhost:4242"))
    body = _bodies(applied)["follows"]
    assert "(https://flags.example.com/projects/default/features/f)" in body
    assert "localhost" not in body


@pytest.mark.parametrize(
    ("tags", "problem"),
    [
        ('["team"]', "webhooks[0].tags[0]: 'team' must be type:value"),
        ('["a:b", ":x"]', "webhooks[0].tags[1]: ':x' must be type:value"),
        ("[]", "webhooks[0].tags: must be a non-empty list"),
        ('"team:x"', "webhooks[0].tags: must be a non-empty list"),
    ],
)
def test_bad_tag_filters_are_named(tmp_path: Path, tags: str, problem: str) -> None:
    """A tag filter that is not a list of type:value patterns is named at its place."""
    problems = _problems(GOOD + f"tags = {tags}\n", tmp_path)
    assert any(p.startswith(problem) for p in problems), problems


def test_tag_filter_is_kept(tmp_path: Path) -> None:
    """A good tag filter reaches the webhook's settings as written."""
    config = _load_text(GOOD + 'tags = ["team:payments", "slack:*"]\n', tmp_path)
    assert config.webhooks[0].tags == ("team:payments", "slack:*")


def test_webhook_url_from_a_file_and_the_provider_key(tmp_path: Path) -> None:
    """url_file reads the URL (a credential for Slack-style hooks); a provider this build
    does not have is named."""
    (tmp_path / "hook-url").write_text("https://hooks.example.com/T/x\n")
    text = GOOD.replace('url = "https://example.com/hook"', 'url_file = "hook-url"')
    assert _load_text(text + 'provider = "webhook"\n', tmp_path).webhooks[0].url == (
        "https://hooks.example.com/T/x"
    )
    (tmp_path / "bad-url").write_text("ftp://x\n")
    problems = _problems(text.replace("hook-url", "bad-url") + 'provider = "jira"\n', tmp_path)
    assert problems == [
        "webhooks[0].url: (from url_file) must be an http(s) URL",
        "webhooks[0].provider: unknown provider 'jira'; one of: webhook, slack-app, slack,"
        " teams, teamsworkflow, datadog, new-relic",
    ]
    assert _problems(GOOD.replace('url = "https://example.com/hook"', ""), tmp_path) == [
        "webhooks[0].url: is required"
    ]


_HOOK = '[unleash]\nurl="http://u"\ntoken="t"\n[[webhooks]]\nname="a"\nurl="http://h"\n'

_RATE = "webhooks[0].max_per_second: must be a number of deliveries per second greater than 0"

CONTROL_BAD_CASES = [
    ("max_per_second = 0", _RATE),
    ("max_per_second = -2.5", _RATE),
    ("max_per_second = nan", _RATE),
    ('max_per_second = "5"', "webhooks[0].max_per_second: must be a number, not a string"),
    ("max_rate_limit_wait_s = 0", "webhooks[0].max_rate_limit_wait_s: must be greater than 0"),
    (
        "max_rate_limit_wait_s = 7200",
        "webhooks[0].max_rate_limit_wait_s: must be greater than 0 and at most 3600",
    ),
    (
        "pause_after_failures = -1",
        "webhooks[0].pause_after_failures: must be between 0 and 1000000",
    ),
    ("probe_interval_s = 0", "webhooks[0].probe_interval_s: must be greater than 0"),
    ("attempt_log_size = -5", "webhooks[0].attempt_log_size: must be between 0 and 1000000"),
    ("signing_secrets = []", "webhooks[0].signing_secrets: must be a non-empty list"),
    ('signing_secrets = ["a", ""]', "webhooks[0].signing_secrets: must be a non-empty list"),
    ('signing_secrets = ["whsec_!!"]', "webhooks[0].signing_secrets: a secret starting with"),
    (
        'signing_secrets = ["a"]\nsigning_secret = "b"',
        "webhooks[0].signing_secrets: give signing_secrets or signing_secret, not both",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("line", "expected"), CONTROL_BAD_CASES)
def test_delivery_control_mistakes_are_one_line_each(
    line: str, expected: str, tmp_path: Path
) -> None:
    """A bad rate, wait, pause setting or key list is one problem line at its place."""
    problems = _problems(_HOOK + line, tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_delivery_controls_defaults_and_values(tmp_path: Path) -> None:
    """Defaults: no rate limit, 1 h bound on 429 waits, pause after 5, probe every 60 s,
    1000 attempts logged; fractional rates are kept."""
    hook = parse_config(tomllib.loads(_HOOK), tmp_path).webhooks[0]  # type: ignore[attr-defined]
    assert (
        hook.max_per_second,
        hook.max_rate_limit_wait_s,
        hook.pause_after_failures,
        hook.probe_interval_s,
        hook.attempt_log_size,
    ) == (None, 3600.0, 5, 60.0, 1000)
    hook = parse_config(tomllib.loads(_HOOK + "max_per_second = 0.5"), tmp_path).webhooks[0]
    assert hook.max_per_second == 0.5


def test_signing_secret_file_holds_one_key_per_line(tmp_path: Path) -> None:
    """A secret file with two lines (and a blank one) signs with both keys, in order."""
    (tmp_path / "keys").write_text("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n\n  second key \n")
    hook = parse_config(tomllib.loads(_HOOK + 'signing_secret_file = "keys"'), tmp_path).webhooks[0]
    inline = parse_config(
        tomllib.loads(
            _HOOK + 'signing_secrets = ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "second key"]'
        ),
        tmp_path,
    ).webhooks[0]
    assert hook.signer is not None
    assert hook.signer == inline.signer
    assert len(hook.signer.sign("e-1", 1, b"{}")["webhook-signature"].split(" ")) == 2


@settings(max_examples=50)
@given(
    st.lists(
        st.text(
            alphabet=st.characters(blacklist_categories=("Cc", "Zs", "Zl", "Zp", "Cs")),
            min_size=1,
            max_size=20,
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from(["\n", "\r\n"]),
)
def test_secret_file_lines_round_trip(keys: list[str], newline: str) -> None:
    """Keys written one per line (any line ending, blank lines and edge spaces around
    them) are read back exactly, in order."""
    text = newline.join(f"  {k} {newline}" for k in keys) + newline
    assert split_secret_lines(text) == keys
