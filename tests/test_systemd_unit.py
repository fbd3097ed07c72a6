"""The shipped systemd unit: systemd accepts it, its sandbox scores well, and it agrees
with the daemon's own constants.

Needs `systemd-analyze` (package systemd), but no running systemd: `verify` and
`security --offline=yes` only read unit files, so this runs as root in a container too.
Without the tool the tests are skipped, except under CI=true, where they fail.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from poller.config import EX_CONFIG, Config
from tests.support.unleash import REPO_ROOT

UNIT = REPO_ROOT / "systemd" / "unleash-poller.service"
# Measured 1.1 with systemd 252. The margin absorbs the few tenths newer releases add or
# move between checks; the directive table below pins the settings that matter most.
MAX_EXPOSURE = 1.5


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        message = "systemd-analyze not found; install the 'systemd' package to check the unit"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}", pytrace=False)
        pytest.skip(message)
    return tool


def _runnable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at a program that exists here: verify checks
    that, and /usr/local/bin/unleash-poller is only there on an installed host."""
    script = Path(sys.executable).parent / "unleash-poller"
    program = script if os.access(script, os.X_OK) else Path("/bin/true")
    text = re.sub(
        r"(?m)^ExecStart=/usr/local/bin/unleash-poller ",
        f"ExecStart={program} ",
        UNIT.read_text(encoding="utf-8"),
    )
    assert str(program) in text, "ExecStart line not found in the unit"
    copy = tmp_path / UNIT.name
    copy.write_text(text, encoding="utf-8")
    return copy


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_systemd_analyze_verify_reports_nothing(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds no unknown key, bad value or missing program."""
    tool = _systemd_analyze()
    unit = _runnable_copy(tmp_path)
    result = subprocess.run(
        # --recursive-errors=no: judge our unit, not the host's network-online.target.
        [tool, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = result.stdout + result.stderr
    print(output)
    ours = [line for line in output.splitlines() if unit.name in line]
    assert ours == []
    assert result.returncode == 0, output


def test_systemd_analyze_verify_catches_a_bad_key(tmp_path: Path) -> None:
    """The verify check above can fail: a misspelt directive is reported for our unit."""
    tool = _systemd_analyze()
    unit = _runnable_copy(tmp_path)
    unit.write_text(unit.read_text(encoding="utf-8") + "ProtectSystm=strict\n", encoding="utf-8")
    result = subprocess.run(
        [tool, "verify", "--man=no", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert "Unknown key 'ProtectSystm'" in result.stdout + result.stderr


def test_security_exposure_is_low(tmp_path: Path) -> None:
    """`systemd-analyze security --offline=yes` rates the sandbox at most MAX_EXPOSURE."""
    tool = _systemd_analyze()
    unit = _runnable_copy(tmp_path)
    result = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )
    output = result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", output)
    assert match, output
    score = float(match.group(1))
    print(f"systemd-analyze security: {score} {match.group(2)} (max {MAX_EXPOSURE})")
    print("\n".join(line for line in output.splitlines() if line.startswith("✗")))
    assert result.returncode == 0, output
    assert score <= MAX_EXPOSURE, output


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("RestartPreventExitStatus", str(EX_CONFIG)),
        ("Restart", "on-failure"),
        ("LoadCredential", "unleash-token:/etc/unleash-poller/token"),
        ("StateDirectory", "unleash-poller"),
        ("StateDirectoryMode", "0700"),
        ("DynamicUser", "yes"),
        ("ProtectSystem", "strict"),
        ("MemoryDenyWriteExecute", "yes"),
        ("CapabilityBoundingSet", ""),
    ],
)
def test_unit_directive(key: str, expected: str) -> None:
    """A setting the daemon relies on (or the sandbox hinges on) has its intended value."""
    assert _directives(UNIT.read_text(encoding="utf-8"))[key] == [expected]


def test_stop_timeout_leaves_room_for_the_drain() -> None:
    """TimeoutStopSec is at least twice the default drain_timeout_s, so systemd never
    kills a drain the daemon would finish by itself, final state write included."""
    found = _directives(UNIT.read_text(encoding="utf-8"))
    drain_default = Config.__dataclass_fields__["drain_timeout_s"].default
    assert isinstance(drain_default, float)
    assert float(found["TimeoutStopSec"][0]) >= 2 * drain_default


def test_exec_start_runs_the_daemon_with_the_shipped_config_path() -> None:
    """ExecStart runs `unleash-poller run` on the config the unit's directories hold."""
    found = _directives(UNIT.read_text(encoding="utf-8"))
    assert found["ExecStart"] == [
        "/usr/local/bin/unleash-poller run -c /etc/unleash-poller/config.toml"
    ]
    assert found["ConfigurationDirectory"] == ["unleash-poller"]
