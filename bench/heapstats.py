"""Run the daemon with one addition: on SIGUSR1, CPython's allocator statistics.

    python bench/heapstats.py run -c CONFIG      # as `python -m poller run -c CONFIG`

On SIGUSR1 it collects garbage and appends `sys._debugmallocstats()` (pymalloc's arenas,
pools and blocks) to the file $BENCH_HEAPSTATS_OUT, after a line `==== stats`. bench/heap.py
starts the daemon this way. It runs the poller/ package of its working directory (bench/lib.py
starts it in BENCH_POLLER_DIR), and nothing else of the daemon changes.
"""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
from types import FrameType


def _write_stats(_signum: int, _frame: FrameType | None) -> None:
    gc.collect()
    with open(os.environ["BENCH_HEAPSTATS_OUT"], "ab") as out:
        out.write(b"==== stats\n")
        out.flush()
        saved = os.dup(2)  # the statistics go to C's stderr: point it at the file a moment
        try:
            os.dup2(out.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.write(b"==== end\n")


signal.signal(signal.SIGUSR1, _write_stats)
sys.path[0] = os.getcwd()  # the daemon's tree, not bench/ (whose profile.py is a stdlib name)
sys.argv = ["poller", *sys.argv[1:]]
runpy.run_module("poller", run_name="__main__", alter_sys=True)
