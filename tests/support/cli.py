"""`python -m poller ARGS...` as a subprocess, the way an operator runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.unleash import REPO_ROOT


def run_poller(*args: str | Path, timeout_s: float = 180.0) -> subprocess.CompletedProcess[str]:
    """Run it from the repository root with no input; its exit code and output, unchecked."""
    return subprocess.run(
        [sys.executable, "-m", "poller", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )
