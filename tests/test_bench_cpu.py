"""bench/bench_grpc.py's CPU accounting (``cpu_seconds``, the "cpu" lines) on real processes."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.bench_grpc import report_cpu, cpu_seconds

BUSY = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\ntime.sleep(30)\n"


def test_cpu_seconds_counts_a_local_server_process_by_thread_group():
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        before = cpu_seconds(proc.pid)
        deadline = time.monotonic() + 60
        while cpu_seconds(proc.pid)["server"] - before["server"] < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = cpu_seconds(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert after["server"] - before["server"] >= 0.3
    groups = {k: v for k, v in after.items() if k.startswith("server:")}
    assert groups and abs(sum(groups.values()) - after["server"]) < 1e-9
    assert after["client"] >= before["client"] > 0


def test_no_server_figures_without_a_local_process():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert set(cpu_seconds(gone.pid)) == {"client"}
    assert set(cpu_seconds(None)) == {"client"}


def test_the_cpu_line_gives_the_little_law_floor(capsys):
    cores = os.cpu_count() or 1
    report_cpu([{"kind": "text", "concurrency": 8,
                  "cpu_ms_per_request": {"client": 0.5, "server": 3.5, "server:python": 3.0, "server:grpc": 0.5}},
                 {"kind": "image", "concurrency": 1, "cpu_ms_per_request": {"client": 0.4}}])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("cpu text@8: client 0.50 + server 3.50 ms/request")
    assert f"at most {cores * 1000 / 4.0:.0f} QPS" in out[0] and f">= {8 * 4.0 / cores:.1f} ms" in out[0]
