"""Property tests for the config loader (issue 11): whatever a config file holds, in any
key and of any TOML type, loading it gives a config or a ConfigError (exit 0 or 78),
never another exception; and whatever it accepts, `run` can send as headers."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import math
import tempfile
import tomllib
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.cli import main
from poller.config import EX_CONFIG, Config, ConfigError, load_config, parse_config
from poller.deliver import request_headers

GOOD: dict[str, object] = {
    "unleash": {"url": "http://127.0.0.1:4242", "token": "t"},
    "state": {"path": "state.sqlite3"},
    "webhooks": [{"name": "a", "url": "http://127.0.0.1:9/hook"}],
}
UNLEASH_KEYS = [
    "url", "token", "token_file", "token_env", "public_url", "poll_interval_s", "start_from",
    "timeout_s", "page_size", "gap_grace_s", "backoff_max_s", "max_page_bytes", "ca_file",
    "client_cert_file", "client_key_file", "nope",
]  # fmt: skip
WEBHOOK_KEYS = [
    "name", "url", "events", "projects", "environments", "content_type", "authorization",
    "authorization_file", "authorization_env", "headers", "body_template", "template_engine",
    "escape", "retries", "retry_schedule_s", "timeout_s", "max_in_flight", "signing_secret",
    "signing_secret_file", "signing_secret_env", "proxy", "max_body_bytes", "ca_file",
    "client_cert_file", "client_key_file", "nope",
]  # fmt: skip
TOP_KEYS = ["log_level", "drain_timeout_s", "trust_env", "metrics", "state", "nope"]

# Every TOML value type: strings (any unicode TOML can hold), 64-bit integers, floats with
# inf and nan, booleans, dates and times, arrays and tables of them.
toml_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
toml_scalars = (
    toml_text
    | st.sampled_from(["", "*", "jinja2", "mustache", "none", "json", "/dev/null", "."])
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.datetimes(timezones=st.none() | st.just(dt.UTC))
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(toml_text, inner, max_size=4),
    max_leaves=8,
)


def _with(section: str, key: str, value: object) -> dict[str, object]:
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    if section == "unleash":
        data["unleash"] = {**GOOD["unleash"], key: value}  # type: ignore[dict-item]
    elif section == "webhook":
        data["webhooks"] = [{"name": "a", "url": "http://127.0.0.1:9/hook", key: value}]
    else:
        data[key] = value
    return data


def _accepted_is_usable(config: Config) -> None:
    """What parse_config accepts, run can use: headers aiohttp will send."""
    for hook in config.webhooks:
        for name, value in request_headers(hook).items():
            for text in (name, value):
                assert not any(c in text for c in "\r\n\0"), (name, value)
        assert hook.name.isprintable()
        assert math.isfinite(hook.timeout_s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    where=st.one_of(
        st.tuples(st.just("unleash"), st.sampled_from(UNLEASH_KEYS)),
        st.tuples(st.just("webhook"), st.sampled_from(WEBHOOK_KEYS)),
        st.tuples(st.just("top"), st.sampled_from(TOP_KEYS)),
    ),
    value=toml_values,
)
def test_any_value_in_any_key_is_a_config_or_a_config_error(
    where: tuple[str, str], value: object
) -> None:
    """Any TOML value in any key: parse_config returns a usable config or raises
    ConfigError; nothing else escapes."""
    section, key = where
    with tempfile.TemporaryDirectory() as base:
        try:
            config = parse_config(_with(section, key, value), Path(base))
        except ConfigError as exc:
            problems = exc.problems
            assert problems, "a refused config names at least one problem"
            assert all(p.isprintable() for p in problems), problems
        else:
            _accepted_is_usable(config)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=300))
def test_any_file_text_gives_exit_0_or_78_from_check(text: str) -> None:
    """`unleash-poller check` on a file of any text (valid TOML or not) exits 0 or 78,
    and a valid config with one string changed anywhere still does."""
    with tempfile.TemporaryDirectory() as base:
        path = Path(base) / "config.toml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(["check", "-c", str(path)])
        assert code in (0, EX_CONFIG)
        with contextlib.suppress(ConfigError):  # anything else fails the property
            load_config(path)


@settings(max_examples=100, deadline=None)
@given(
    key=st.sampled_from(["url", "token", "name", "content_type", "body_template", "proxy"]),
    text=toml_text,
)
def test_any_string_in_a_good_file_gives_exit_0_or_78_from_check(key: str, text: str) -> None:
    """A good file with any string spliced into one of its values, written as TOML
    (basic string with escapes), gives exit 0 or 78 from `check`."""
    escaped = text.encode("unicode_escape").decode("ascii").replace('"', '\\"')
    escaped = escaped.replace("\\x", "\\u00")
    body = f"""
[unleash]
url = "{escaped if key == "url" else "http://127.0.0.1:4242"}"
token = "{escaped if key == "token" else "t"}"
[state]
path = "state.sqlite3"
[[webhooks]]
name = "{escaped if key == "name" else "a"}"
url = "http://127.0.0.1:9/hook"
content_type = "{escaped if key == "content_type" else "application/json"}"
body_template = "{escaped if key == "body_template" else ""}"
proxy = "{escaped if key == "proxy" else "http://127.0.0.1:3128"}"
"""
    with tempfile.TemporaryDirectory() as base:
        path = Path(base) / "config.toml"
        path.write_text(body)
        path.chmod(0o600)
        try:
            tomllib.loads(body)
        except tomllib.TOMLDecodeError:
            return  # not what this property is about: the escaping did not survive
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = main(["check", "-c", str(path)])
        assert code in (0, EX_CONFIG)
