"""bench/grpc_floor.py: the bare gRPC server's prebuilt response, and a whole run on loopback."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from bench.grpc_floor import prebuilt_response

REPO = Path(__file__).resolve().parents[1]


def test_prebuilt_response_carries_real_catalogue_hits(fashion_dir):
    with open(fashion_dir / "styles.csv", newline="", encoding="utf-8") as fh:
        rows = [row for _, row in zip(range(10), csv.DictReader(fh))]
    response = prebuilt_response(fashion_dir, 10)
    assert [h.product_id for h in response.hits] == [r["id"] for r in rows]
    assert [h.rank for h in response.hits] == list(range(1, 11))
    first = response.hits[0].metadata
    assert first["title"] == rows[0]["productDisplayName"]  # as a served hit names it
    assert first["articleType"] == rows[0]["articleType"] and first["product_id"] == rows[0]["id"]
    assert response.timings.total_ms > 0


def test_prebuilt_response_refuses_more_hits_than_rows(fashion_dir, tmp_path):
    with open(fashion_dir / "styles.csv", newline="", encoding="utf-8") as fh:
        lines = [next(fh) for _ in range(3)]  # header + 2 products
    (tmp_path / "styles.csv").write_text("".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match="2 products, fewer than --hits 5"):
        prebuilt_response(tmp_path, 5)


def test_floor_bench_serves_and_measures_on_loopback(fashion_dir):
    out = subprocess.run([sys.executable, "bench/grpc_floor.py", "--data", str(fashion_dir), "--requests", "40",
                          "--concurrency", "2", "--warmup", "2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    row = next(line for line in lines if line.startswith("| floor | 2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert float(cells[2]) > 0 and float(cells[3]) <= float(cells[5]) and cells[6] == "0"  # QPS, p50 <= p99, no errors
    assert any(line.startswith("cpu floor@2: client ") and "server " in line for line in lines)
    assert lines[0].startswith("machine: isa=")


def test_floor_bench_rejects_nonsense_arguments():
    out = subprocess.run([sys.executable, "bench/grpc_floor.py", "--hits", "0"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--hits, --requests and --concurrency must be >= 1" in out.stderr
