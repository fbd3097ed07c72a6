"""Benchmark 6 — idle cost: the daemon polling an idle Unleash at the default interval.

One real Unleash with nothing happening, one lean receiver, and bench/proxy.py between
the daemon and Unleash (it counts each request, its status and its upstream time). The
daemon runs at default settings (poll_interval_s = 0.4; `--poll-interval-s` sets
another). After a 5 s warm-up, for 60 s: its CPU time (/proc/PID/schedstat, also
/proc/PID/stat ticks), its RSS and peak RSS (/proc/PID/status VmRSS/VmHWM), every
request it made to Unleash, and Unleash's own CPU time in the same window beside a
window of the same length with no poller.
Then, alone, the idle floor (`bench.baseline_client --idle`: a bare aiohttp probe loop at the
same interval) over a window of the same length. Targets: RSS <= 40 MB, CPU <= 0.3 % of a core.

    .venv/bin/python -m bench.idle [--seconds 60] [--json out.json]
"""

from __future__ import annotations

import collections
import json
import subprocess
import time
import urllib.request

from bench.lib import (
    DEFAULT_POLL_INTERVAL_S,
    PYTHON,
    REPO_ROOT,
    Daemon,
    LeanReceiver,
    Report,
    add_poll_interval,
    arguments,
    idle_floor,
    poll_interval_setting,
    proc_stat,
    say,
    unleash,
    workdir,
)
from bench.lib import write_config as write_poller_config


def cpu_over(pid: int, seconds: float) -> float:
    """CPU seconds `pid` used in the next `seconds`."""
    before = proc_stat(pid).cpu_ns
    time.sleep(seconds)
    return (proc_stat(pid).cpu_ns - before) / 1e9


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    add_poll_interval(parser)
    args = parser.parse_args()
    extra = poll_interval_setting(args)
    report = Report("6 idle")
    window = args.seconds
    with workdir("idle", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        node_pid = server._process.pid  # type: ignore[union-attr]
        proxy = subprocess.Popen(
            [PYTHON, "-m", "bench.proxy", server.url],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proxy.stdout is not None
            proxy_url = f"http://127.0.0.1:{int(proxy.stdout.readline())}"
            time.sleep(5.0)
            say(f"Unleash alone for {window:.0f} s")
            unleash_alone_s = cpu_over(node_pid, window)
            config = write_poller_config(
                work / "poller.toml",
                server,
                [{"name": "idle", "url": receiver.url("/idle")}],
                start_from="latest",
                unleash_url=proxy_url,
                unleash_extra=extra,
            )
            daemon = Daemon(config)
            try:
                daemon.wait_log("cursor.initialised")
                time.sleep(5.0)
                reset = urllib.request.Request(f"{proxy_url}/_bench/reset", method="POST")  # noqa: S310
                urllib.request.urlopen(reset, timeout=10).close()  # noqa: S310
                say(f"daemon idle for {window:.0f} s")
                before = proc_stat(daemon.pid)
                unleash_with_s = cpu_over(node_pid, window)
                after = proc_stat(daemon.pid)
                requests_url = f"{proxy_url}/_bench/requests"
                with urllib.request.urlopen(requests_url, timeout=10) as resp:  # noqa: S310
                    requests = json.loads(resp.read())
            finally:
                stopped = daemon.stop()
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
        say(f"idle floor (a bare probe loop) alone for {window:.0f} s")
        interval_s = args.poll_interval_s or DEFAULT_POLL_INTERVAL_S
        floor = idle_floor(server, window, interval_s)
    cpu_s = (after.cpu_ns - before.cpu_ns) / 1e9
    cpu_pct = cpu_s / window * 100
    kinds = collections.Counter(
        (r["method"], r["path"], r["query"].split("&")[0], r["status"], r["conditional"])
        for r in requests
    )
    probes = sum(1 for r in requests if r["status"] == 304)
    interval = "the default" if args.poll_interval_s is None else f"a {args.poll_interval_s} s"
    print(f"\n6. idle cost over {window:.0f} s at {interval} poll interval")
    report.add("daemon CPU (schedstat)", cpu_pct, "% core", "<= 0.3 %", cpu_pct <= 0.3)
    report.add("daemon CPU (stat ticks)", (after.cpu_s - before.cpu_s) / window * 100, "% core")
    report.add("daemon CPU per poll", cpu_s / max(1, len(requests)) * 1000, "ms")
    report.add(
        "daemon RSS at the end", after.rss_kb / 1024, "MB", "<= 40 MB", after.rss_kb <= 40 * 1024
    )
    report.add(
        "  of which RssAnon / RssFile",
        f"{after.anon_kb / 1024:.1f} / {after.file_kb / 1024:.1f}",
        "MB",
    )
    report.add("daemon peak RSS (VmHWM)", after.hwm_kb / 1024, "MB")
    report.add("idle floor (bare probe loop, alone): CPU", floor["cpu_pct"], "% core")
    report.add(
        "  CPU per probe", floor["cpu_pct"] / 100 * window / max(1, floor["probes"]) * 1000, "ms"
    )
    report.add("  RSS (RssAnon)", f"{floor['rss_mb']:.1f} ({floor['anon_mb']:.1f})", "MB")
    if floor["cpu_pct"]:
        report.add("daemon CPU / floor", cpu_pct / floor["cpu_pct"], "x")
    report.add("daemon RSS - floor", after.rss_kb / 1024 - floor["rss_mb"], "MB")
    report.add("requests to Unleash", len(requests))
    report.add("requests per second", len(requests) / window, "/s")
    for (method, path, query, status, conditional), count in sorted(kinds.items()):
        label = f"{method} {path}?{query}{' If-None-Match' if conditional else ''} -> {status}"
        report.add(f"  {label}", count)
    if requests:
        mean_ms = sum(float(r["ms"]) for r in requests) / len(requests)
        report.add("Unleash answer time per poll (mean)", mean_ms, "ms")
        report.add(
            "bytes per answer (mean)", sum(int(r["bytes"]) for r in requests) / len(requests), "B"
        )
    report.add("Unleash CPU, no poller", unleash_alone_s / window * 100, "% core")
    report.add("Unleash CPU, polled", unleash_with_s / window * 100, "% core")
    if probes:
        report.add(
            "Unleash CPU per poll (difference)",
            (unleash_with_s - unleash_alone_s) / probes * 1000,
            "ms",
        )
    report.note(f"daemon exit code {stopped.code} after SIGTERM")
    if extra:
        report.note(f"poll_interval_s = {args.poll_interval_s} set in the config")
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()
