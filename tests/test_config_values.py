"""Values `check` must refuse because `run` could not use them (issue 11, defects 7 and 8):
anything that becomes an HTTP header or a log field, and secret files that are not small
regular files. Each is one clear line and exit 78, never a traceback or a hang."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from poller.config import EX_CONFIG, ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


def _toml(unleash: str = 'token = "t"', hook: str = "") -> str:
    return f"""
[unleash]
url = "http://127.0.0.1:4242"
{unleash}
[state]
path = "state.sqlite3"
[[webhooks]]
name = "a"
url = "http://127.0.0.1:9/hook"
{hook}
"""


def _problems(text: str, base: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(tomllib.loads(text), base)
    return info.value.problems


def _check(config: Path, timeout_s: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "poller", "check", "-c", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


HEADER_AND_LOG_CASES = [
    # (what goes in the webhook table, the place of the problem)
    ('headers = { "X-Trailing\\n" = "v" }', "webhooks[0].headers.X-Trailing\\n"),
    ('headers = { "X-A" = "a\\u0000b" }', "webhooks[0].headers.X-A"),
    ('headers = { "X-A" = "a\\u0001b" }', "webhooks[0].headers.X-A"),
    ('content_type = "application/json\\r"', "webhooks[0].content_type"),
    ('content_type = "application/json\\n"', "webhooks[0].content_type"),
    ('authorization = "Bearer a\\u0000b"', "webhooks[0].authorization"),
]


@pytest.mark.parametrize(("hook", "place"), HEADER_AND_LOG_CASES)
def test_header_values_run_could_not_send_are_refused(
    tmp_path: Path, hook: str, place: str
) -> None:
    """A header name matched by a `$` regex before its final newline, or a value with a
    control character (aiohttp raises on CR, LF and NUL while sending), is a config error
    at its place."""
    problems = _problems(_toml(hook=hook), tmp_path)
    assert [p for p in problems if p.startswith(f"{place}: ")], problems
    assert all("\n" not in p and "\r" not in p for p in problems)


def test_a_webhook_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    """The webhook name goes into every log line: `a\\n` (which `^...$` accepted) is
    refused."""
    text = _toml().replace('name = "a"', 'name = "a\\n"')
    assert _problems(text, tmp_path) == [
        "webhooks[0].name: must be 1-64 letters, digits, '.', '_' or '-', starting with a "
        "letter or digit"
    ]


@pytest.mark.parametrize(
    ("key", "place"),
    [("token_file", "unleash.token"), ("authorization_file", "webhooks[0].authorization")],
)
def test_a_secret_file_holding_a_newline_inside_is_refused(
    tmp_path: Path, key: str, place: str
) -> None:
    """A token or authorization file with a line break inside (a trailing one is
    stripped) would be an invalid header: refused, without showing the secret."""
    (tmp_path / "secret").write_text("first-half\nsecond-half\n")
    entry = f'{key} = "secret"'
    text = _toml(unleash=entry) if key == "token_file" else _toml(hook=entry)
    problems = _problems(text, tmp_path)
    assert problems == [f"{place}: must be one line without control characters"]
    assert not any("half" in p for p in problems)


def test_an_authorization_from_the_environment_with_a_control_character_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule holds for a secret read from an environment variable."""
    monkeypatch.setenv("HOOK_AUTH", "Bearer a\x01b")
    problems = _problems(_toml(hook='authorization_env = "HOOK_AUTH"'), tmp_path)
    assert problems == ["webhooks[0].authorization: must be one line without control characters"]


def test_check_exits_78_where_run_would_crash(tmp_path: Path) -> None:
    """Through the CLI: every one of these values makes `check` exit 78 with one line per
    problem, and no traceback."""
    (tmp_path / "token").write_text("to\nken")
    config = tmp_path / "config.toml"
    config.write_text(
        _toml(
            unleash='token_file = "token"',
            hook='content_type = "a\\r"\nheaders = { "X-B\\n" = "v", "X-C" = "a\\u0000" }',
        )
    )
    result = _check(config)
    assert result.returncode == EX_CONFIG, result
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 4, lines
    assert any(line.startswith("unleash.token:") for line in lines), lines


# ---- secret files: only small regular files (defect 8) ----


def test_a_secret_file_that_is_a_device_is_refused(tmp_path: Path) -> None:
    """token_file = /dev/zero is refused at once instead of read until memory runs out."""
    problems = _problems(_toml(unleash='token_file = "/dev/zero"'), tmp_path)
    assert problems == ["unleash.token_file: cannot read /dev/zero: not a regular file"]


def test_a_secret_file_that_is_a_fifo_does_not_hang_check(tmp_path: Path) -> None:
    """A FIFO with no writer would block an open() for ever: `check` refuses it at once
    with exit 78 (the timeout fails the test instead of hanging it)."""
    os.mkfifo(tmp_path / "token")
    config = tmp_path / "config.toml"
    config.write_text(_toml(unleash='token_file = "token"'))
    result = _check(config, timeout_s=20)
    assert result.returncode == EX_CONFIG, result
    assert result.stderr.strip() == (
        f"unleash.token_file: cannot read {tmp_path / 'token'}: not a regular file"
    )


def test_a_tls_file_that_is_a_fifo_does_not_hang_check(tmp_path: Path) -> None:
    """The same for a TLS file (the client key is a secret too)."""
    os.mkfifo(tmp_path / "ca.pem")
    config = tmp_path / "config.toml"
    config.write_text(_toml(hook='ca_file = "ca.pem"'))
    result = _check(config, timeout_s=20)
    assert result.returncode == EX_CONFIG, result
    assert "not a regular file" in result.stderr


def test_a_config_file_that_is_a_fifo_does_not_hang_check(tmp_path: Path) -> None:
    """`check -c` on a FIFO is one line and exit 78."""
    os.mkfifo(tmp_path / "config.toml")
    result = _check(tmp_path / "config.toml", timeout_s=20)
    assert result.returncode == EX_CONFIG, result
    assert result.stderr.strip().endswith("cannot read: not a regular file")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"x" * (64 * 1024 + 1), "larger than 64 KiB"),
        (b"\xff\xfe token", "is not UTF-8 text"),
        (b"  \n", "is empty"),
    ],
)
def test_a_secret_file_too_big_not_text_or_empty_is_refused(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    """A secret file over 64 KiB, not UTF-8, or blank is one clear problem."""
    (tmp_path / "token").write_bytes(content)
    problems = _problems(_toml(unleash='token_file = "token"'), tmp_path)
    assert len(problems) == 1, problems
    assert problems[0].startswith("unleash.token_file: ")
    assert problem in problems[0]


def test_a_secret_file_path_with_a_nul_is_refused(tmp_path: Path) -> None:
    """A NUL in a *_file path (os.open raises ValueError) is a config error."""
    problems = _problems(_toml(unleash='token_file = "a\\u0000b"'), tmp_path)
    assert len(problems) == 1, problems
    assert "not a valid path" in problems[0]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('token = ""', "unleash.token: is empty"),
        ('token_env = ""', "unleash.token_env: must not be empty"),
        ('token_file = ""', "unleash.token_file: must not be empty"),
    ],
)
def test_an_empty_token_is_named_not_a_silent_exit_78(
    tmp_path: Path, entry: str, problem: str
) -> None:
    """Found by the config fuzzing: an empty token, token_env or token_file gave a
    ConfigError with no problem in it, so `check` exited 78 printing nothing."""
    assert _problems(_toml(unleash=entry), tmp_path) == [problem]
