"""The index build job end to end: tiny random model, real images, real faiss + LMDB, the
``ecsearch index`` CLI, seeded bad rows, kill-safety and resume."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main as ecsearch
from indexer.encode import EncodeOptions
from indexer.pipeline import IndexJobConfig, run_index_job
from indexer.publish import list_versions, read_current
from indexer.query_sample import QUERY_KINDS
from indexer.search import open_index
from indexer.version import VersionOptions

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU

REPO = Path(__file__).resolve().parents[1]
HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,usage,productDisplayName\n"


def _seed_catalogue(fashion_dir: Path, dest: Path, n_good: int = 40) -> tuple[Path, dict]:
    """A fashion-layout catalogue of ``n_good`` real products plus seeded bad rows.

    Returns the folder and what each seeded row should become.
    """
    rows = (fashion_dir / "styles.csv").read_text(encoding="utf-8").splitlines()[1:n_good + 1]
    (dest / "images").mkdir(parents=True)
    for r in rows:
        pid = r.split(",", 1)[0]
        shutil.copy(fashion_dir / "images" / f"{pid}.jpg", dest / "images" / f"{pid}.jpg")
    ids = [r.split(",", 1)[0] for r in rows]
    missing, corrupt = ids[3], ids[4]
    (dest / "images" / f"{missing}.jpg").unlink()                        # missing image file
    jpeg = (dest / "images" / f"{corrupt}.jpg").read_bytes()
    (dest / "images" / f"{corrupt}.jpg").write_bytes(jpeg[: len(jpeg) // 2])   # truncated (corrupt) JPEG
    (dest / "images" / "900002.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = [
        rows[7],                                                          # duplicate id (first wins)
        "900001,Men,Apparel,Topwear,Tshirts,Blue,Fall,Casual,",           # empty title, no image
        "900002,Men,Apparel,Topwear,Tshirts,Blue,Fall,Casual,",           # empty title, corrupt image
        "900003,Men,Apparel,Topwear,Tshirts,Blue,Fall,Casual,Acme Men, Blue Tee",   # malformed: 10 fields
    ]
    (dest / "styles.csv").write_text(HEADER + "\n".join(rows + bad) + "\n", encoding="utf-8")
    first_bad_line = n_good + 2
    expect = {
        "read": n_good + len(bad),
        "indexed": n_good,
        "missing": missing, "corrupt": corrupt,
        "reject_rows": {first_bad_line: "duplicate product id", first_bad_line + 1: "neither a usable title",
                        first_bad_line + 2: "no usable title and the image cannot be used",
                        first_bad_line + 3: "10 fields, header has 9"},
    }
    return dest, expect


@pytest.fixture(scope="module")
def seeded(fashion_dir, tmp_path_factory):
    return _seed_catalogue(fashion_dir, tmp_path_factory.mktemp("seeded") / "fashion")


@pytest.fixture(scope="module")
def published(seeded, tiny_model_dir, tmp_path_factory):
    catalog, expect = seeded
    root = tmp_path_factory.mktemp("root")
    config = IndexJobConfig(catalog=catalog, model_dir=tiny_model_dir, index_root=root, device="cpu",
                            encode=EncodeOptions(batch_size=8, chunk_size=16, workers=1),
                            version=VersionOptions(n_shards=2))
    result = run_index_job(config, log=lambda _m: None)
    return root, result, expect


def test_every_row_is_indexed_or_rejected(published):
    root, result, expect = published
    counts = result.manifest["counts"]
    assert counts["read"] == expect["read"]
    assert counts["indexed"] == expect["indexed"] and counts["rejected"] == len(expect["reject_rows"])
    assert counts["indexed"] + counts["rejected"] == counts["read"]
    assert counts["text_only"] == 2 and counts["image_unreadable"] == 1
    rejects = [json.loads(line) for line in (result.path / "rejects.jsonl").read_text().splitlines()]
    assert {r["row"] for r in rejects} == set(expect["reject_rows"])
    for r in rejects:
        assert expect["reject_rows"][r["row"]] in r["reason"]


def test_flagged_products_are_indexed_text_only(published):
    root, result, expect = published
    with open_index(root) as index:
        missing, corrupt = index.get_products([expect["missing"], expect["corrupt"]])
        assert missing["flags"] == ["image_missing", "text_only"] and missing["image"] is None
        assert corrupt["flags"] == ["image_unreadable", "text_only"]
        assert "truncated" in corrupt["flag_detail"]["image_unreadable"]
        assert corrupt["image"].endswith(f"{expect['corrupt']}.jpg")
    flagged = {json.loads(line)["product_id"] for line in (result.path / "flags.jsonl").read_text().splitlines()}
    assert flagged == {expect["missing"], expect["corrupt"]}


def test_manifest_and_self_retrieval(published, tiny_model_dir):
    root, result, expect = published
    m = result.manifest
    assert m["model"]["fingerprint"] and m["model"]["view"] == "fused" and m["dim"] == 32
    assert m["catalog"]["fingerprint"].startswith("sha256:") and m["catalog"]["layout"] == "fashion"
    assert {"read", "encode", "train", "add", "metadata", "recall"} <= set(m["timings_s"])
    assert m["index"]["nlist"] >= 1 and 1 <= m["index"]["nprobe_default"] <= m["index"]["nlist"]
    assert m["recall"]["self_items"] == m["counts"]["indexed"]            # every item searched by its own vector
    assert m["recall"]["self_at_rank_1"] <= m["recall"]["self_at_rank_1_or_tie"] == 1.0
    # nprobe was also checked on query-tower vectors, each kind apart: 41 typed queries, augmented
    # views of the readable photos, title + photo pairs and photo + modifier queries
    assert 41 + 35 + 35 <= m["recall"]["query_tower_queries"] <= 4 * 41
    by_kind = m["recall"]["recall_at_10_query_tower_by_kind"]
    assert {"typed text", "augmented photo", "title + photo"} <= set(by_kind) <= set(QUERY_KINDS)
    by_nprobe = m["recall"]["recall_at_10_query_tower_by_nprobe"]
    assert str(m["index"]["nprobe_default"]) in by_nprobe and 0.0 <= m["recall"]["recall_at_10_query_tower"] <= 1.0
    with open_index(root) as index:
        ids = np.arange(index.n_items)
        scores, pids = index.search(index.vectors(ids), k=1)
        own = index.internal_ids([p[0] for p in pids])
        assert (own == ids).mean() >= 0.95     # random tiny model: near-duplicate titles may tie


def test_cli_rebuild_keeps_k_and_switches_current(published, seeded, tiny_model_dir, capsys):
    root, result, _ = published
    catalog, _ = seeded
    argv = ["index", "--catalog", str(catalog), "--model", str(tiny_model_dir), "--index-root", str(root),
            "--shards", "3", "--keep-versions", "1", "--workers", "0", "--device", "cpu", "--limit", "20",
            "--photo-target-recall", "0.97", "--target-recall", "0.9"]
    assert ecsearch(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["previous"] == result.version and read_current(root) == summary["version"]
    assert list_versions(root) == [summary["version"]] and summary["counts"]["read"] == 20
    assert os.listdir(root / "tmp") == []
    recall = json.loads((Path(summary["path"]) / "manifest.json").read_text())["recall"]
    assert recall["target_recall"] == 0.9  # --target-recall reaches the nprobe choice
    assert recall["photo_target_recall"] == 0.97  # and --photo-target-recall
    for bad in ("0", "1.5"):
        assert ecsearch(argv[:-1] + [bad]) == 2
        assert f"--target-recall must lie in (0, 1], got {float(bad)}" in capsys.readouterr().err
        assert ecsearch(argv[:-3] + [bad] + argv[-2:]) == 2
        assert f"--photo-target-recall must lie in (0, 1], got {float(bad)}" in capsys.readouterr().err


def test_cli_bad_input_exit_status(tmp_path, tiny_model_dir, capsys):
    argv = ["index", "--catalog", str(tmp_path / "nope.csv"), "--model", str(tiny_model_dir),
            "--index-root", str(tmp_path / "root")]
    assert ecsearch(argv) == 2
    assert "no such catalogue" in capsys.readouterr().err
    (tmp_path / "cat.csv").write_text("id,title\n1,a\n")
    assert ecsearch(["index", "--catalog", str(tmp_path / "cat.csv"), "--model", str(tmp_path),
                     "--index-root", str(tmp_path / "root")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    for bad in ("0", "-3"):  # 0 is a given depth, not "measure it"
        assert ecsearch(argv + ["--k-factor", bad]) == 2
        assert "--k-factor" in capsys.readouterr().err


def test_cli_refuses_a_second_concurrent_build(seeded, tiny_model_dir, tmp_path, capsys):
    from indexer.publish import build_lock

    catalog, _ = seeded
    root = tmp_path / "root"
    with build_lock(root):
        assert ecsearch(["index", "--catalog", str(catalog), "--model", str(tiny_model_dir),
                         "--index-root", str(root)]) == 3
    assert "another index build is running" in capsys.readouterr().err


def _cli(catalog: Path, model: Path, root: Path) -> list[str]:
    return [sys.executable, "-m", "engine.cli", "index", "--catalog", str(catalog), "--model", str(model),
            "--index-root", str(root), "--chunk-size", "6", "--batch-size", "3", "--workers", "1",
            "--device", "cpu", "--shards", "2"]


def _run_timed(cmd: list[str], env: dict) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    """Start ``cmd``; a thread collects its stderr lines with their arrival times."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    threading.Thread(target=lambda: lines.extend((time.monotonic(), ln) for ln in proc.stderr), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[tuple[float, str]], text: str, proc: subprocess.Popen, timeout_s: float = 240) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for t, line in list(lines):
            if text in line:
                return t
        if proc.poll() is not None:
            break
        time.sleep(0.002)
    raise AssertionError(f"{text!r} never appeared: {''.join(ln for _, ln in lines)[-1500:]}")


def test_sigkill_leaves_current_and_rerun_resumes(seeded, tiny_model_dir, tmp_path):
    catalog, expect = seeded
    root = tmp_path / "root"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # 1. a complete build: the live version, and the duration of its encode..publish window
    proc, lines = _run_timed(_cli(catalog, tiny_model_dir, root), env)
    t_encode = _wait_for(lines, "stage: encode", proc)
    assert proc.wait(timeout=300) == 0, "".join(ln for _, ln in lines)[-2000:]
    t_done = _wait_for(lines, "published", proc)
    old = read_current(root)

    # 2. the same build again, SIGKILLed at a random point of its encode..publish window
    #    (if this run was faster and finished first, its version is the live one: try again sooner)
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    delay_s = rng.uniform(0.0, 0.9 * (t_done - t_encode))
    for _attempt in range(4):
        proc, lines = _run_timed(_cli(catalog, tiny_model_dir, root), env)
        _wait_for(lines, "stage: encode", proc)
        time.sleep(delay_s)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.returncode == -signal.SIGKILL:
            break
        assert proc.returncode == 0, "".join(ln for _, ln in lines)[-2000:]
        old, delay_s = read_current(root), delay_s / 3
    stages = [ln.strip()[:60] for _, ln in lines if ln.startswith(("stage:", "published"))]
    what = (f"SIGKILL {delay_s * 1000:.0f} ms after 'stage: encode' "
            f"(window {(t_done - t_encode) * 1000:.0f} ms), after {stages}")
    print(what)
    assert proc.returncode == -signal.SIGKILL, f"every build ended before the kill: {what}"
    chunks_left = any(root.glob("tmp/build-*/chunks/chunk_*.npy"))

    # killed: CURRENT names a complete version (the old one unless the switch had happened)
    current = read_current(root)
    published_new = any(ln.startswith("published") for _, ln in lines)
    assert current == old or published_new, what
    with open_index(root) as index:
        assert index.version == current and index.search(index.vectors(np.arange(3)), k=2)[0].shape == (3, 2)

    # 3. a rerun completes, reuses encoded chunks, cleans the leftovers and switches CURRENT
    rerun = subprocess.run(_cli(catalog, tiny_model_dir, root), env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)
    assert read_current(root) == summary["version"] not in (old, current)
    assert summary["counts"]["read"] == expect["read"] and summary["counts"]["indexed"] == expect["indexed"]
    assert os.listdir(root / "tmp") == []
    if chunks_left:
        assert "encode: resuming" in rerun.stderr, what
    with open_index(root) as index:
        assert index.n_items == expect["indexed"]


def test_image_view_rejects_products_without_a_usable_image(seeded, tiny_model_dir, tmp_path):
    catalog, expect = seeded
    config = IndexJobConfig(catalog=catalog, model_dir=tiny_model_dir, index_root=tmp_path / "root", device="cpu",
                            encode=EncodeOptions(view="image", batch_size=8, chunk_size=64, workers=0))
    result = run_index_job(config, log=lambda _m: None)
    counts = result.manifest["counts"]
    assert counts["indexed"] == expect["indexed"] - 2                 # missing + corrupt image: rejected
    assert counts["indexed"] + counts["rejected"] == counts["read"] == expect["read"]
    reasons = [json.loads(line)["reason"] for line in (result.path / "rejects.jsonl").read_text().splitlines()]
    assert sum(r.startswith("no usable image (view image) (image file not found") for r in reasons) == 1
    assert sum(r.startswith("the image (view image) cannot be used (cannot decode image") for r in reasons) == 1
    assert result.manifest["model"]["view"] == "image"


def test_jsonl_catalogue_with_field_mapping_flags(fashion_dir, tiny_model_dir, tmp_path, capsys):
    lines = []
    for i, line in enumerate((fashion_dir / "styles.csv").read_text(encoding="utf-8").splitlines()[1:13]):
        f = line.split(",")
        lines.append(json.dumps({"sku": f"A{f[0]}", "name": f[-1], "colour": f[5],
                                 "photo": str(fashion_dir / "images" / f"{f[0]}.jpg"), "price": i}))
    lines.append("{broken json")
    (tmp_path / "cat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    root = tmp_path / "root"
    assert ecsearch(["index", "--catalog", str(tmp_path / "cat.jsonl"), "--model", str(tiny_model_dir),
                     "--index-root", str(root), "--id-field", "sku", "--title-field", "name",
                     "--image-field", "photo", "--attribute-fields", "colour", "--workers", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["read"] == 13 and summary["counts"]["indexed"] == 12
    assert summary["counts"]["rejected"] == 1 and summary["counts"]["text_only"] == 0
    with open_index(root) as index:
        first = json.loads(lines[0])
        rec = index.get_products([first["sku"]])[0]
        assert rec["title"] == first["name"]
        assert Path(rec["image"]).resolve() == Path(first["photo"]).resolve()  # ../shared may be a symlink
        assert rec["attributes"] == {"colour": first["colour"]} and rec["extra"] == {"price": 0}
        assert index.manifest["catalog"]["layout"] == "jsonl"
