"""Running reference JavaScript (mustache.js, Unleash's formatter, V8's own JSON and
String()) for differential tests: one Node process per batch, JSON in, JSON out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

NODE_MODULES = Path(__file__).resolve().parents[1] / "unleash" / "8.2.0" / "node_modules"
ENABLE_HINT = "install Node.js and run `npm ci` in tests/unleash/8.2.0 to enable"


def require_node(*needed: Path) -> str:
    """The node executable; skip the test when it or a needed file is missing, except under
    CI=true, where a differential test that cannot run is a failure."""
    node = shutil.which("node")
    if node is None or not all(path.exists() for path in needed):
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {ENABLE_HINT}", pytrace=False)
        pytest.skip(ENABLE_HINT)
    return node


def run_json(
    node: str,
    argv: Sequence[str],
    payload: object,
    default: Callable[[object], object] | None = None,
) -> object:
    """Send `payload` as JSON on stdin, return the JSON the script prints. Dates' string
    forms depend on the time zone; the poller prints them as UTC does."""
    completed = subprocess.run(
        [node, *argv],
        input=json.dumps(payload, default=default).encode("utf-8", "surrogatepass"),
        capture_output=True,
        timeout=120,
        check=False,
        env={**os.environ, "TZ": "UTC"},
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    return json.loads(completed.stdout.decode("utf-8", "surrogatepass"))
