"""A SIGKILLed incremental build (``ecsearch index --base-version``, a real subprocess) leaves the
live version intact, at random points of each of its stages; a rerun then publishes."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.manifest import read_manifest, verify_files
from indexer.pipeline import IndexJobConfig, run_index_job
from indexer.publish import list_versions, read_current
from indexer.search import open_index
from tests.test_incremental import ENCODE, VERSION, Scenario

pytestmark = pytest.mark.isa

REPO = Path(__file__).resolve().parents[1]
# kill this long (random, up to the bound) after the line marking a stage (our choice: the
# tiny model's stages take tens to hundreds of ms)
KILL_POINTS = (("stage: encode", 0.3), ("stage: index", 0.3), ("stage: publish", 0.02))


def _cli(root: Path, changes: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "index", "--index-root", str(root), "--base-version", "CURRENT",
            "--changes", str(changes), "--device", "cpu", "--batch-size", "1", "--workers", "0",
            "--keep-versions", "20"]


def _start(cmd: list[str], env: dict) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def _kill_after(proc: subprocess.Popen, lines: list[str], marker: str, delay_s: float) -> bool:
    """SIGKILL ``proc`` ``delay_s`` after ``marker`` appears; False when it ended first."""
    deadline = time.monotonic() + 240
    while not any(marker in ln for ln in list(lines)):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)[-2000:]
        time.sleep(0.002)
    time.sleep(delay_s)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return True


def _check_live(root: Path, allowed: set[str]) -> str:
    """CURRENT names one of ``allowed``, opens, verifies and searches; every folder under
    versions/ is a complete version."""
    current = read_current(root)
    assert current in allowed
    for name in list_versions(root):
        verify_files(root / "versions" / name, read_manifest(root / "versions" / name))
    with open_index(root) as index:
        assert index.version == current
        scores, pids = index.search(index.vectors(np.arange(4)), k=3)
        assert scores.shape == (4, 3) and all(len(row) == 3 for row in pids)
    return current


def test_a_killed_incremental_build_leaves_the_live_version(fashion_dir, tiny_model_dir, tmp_path):
    scenario = Scenario(fashion_dir, tmp_path)
    root = tmp_path / "root"
    base = run_index_job(IndexJobConfig(catalog=scenario.base, model_dir=tiny_model_dir, index_root=root,
                                        keep_versions=20, device="cpu", encode=ENCODE, version=VERSION),
                         log=lambda _m: None)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    killed = []
    for marker, bound_s in KILL_POINTS:
        delay_s = rng.uniform(0.0, bound_s)
        live, before = read_current(root), set(list_versions(root))
        proc, lines = _start(_cli(root, scenario.changes), env)
        if _kill_after(proc, lines, marker, delay_s):
            killed.append(f"{marker} + {delay_s * 1000:.0f} ms")
        else:  # it finished first: its version is live now (published atomically)
            assert proc.returncode == 0, "".join(lines)[-2000:]
        # CURRENT names the old version or the complete one this build published (a kill after
        # the switch); a kill between the version's rename and the switch leaves it unused
        new = set(list_versions(root)) - before
        assert len(new) <= 1
        _check_live(root, {live} | new)
    assert killed, "every build ended before its kill"
    print("killed at", killed)
    rerun = subprocess.run(_cli(root, scenario.changes), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert _check_live(root, {summary["version"]}) == summary["version"]
    assert os.listdir(root / "tmp") == []
    assert summary["counts"]["indexed"] == base.manifest["counts"]["indexed"] - 1
