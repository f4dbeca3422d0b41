"""Incremental index versions on a real fashion subset with a tiny random model: the changes
file and the catalogue diff, equivalence with a full build reusing the same quantizer (vectors
bit-identical, same hits), manifest counts and drift, bad changes, the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest

from engine.cli import main as ecsearch
from indexer.encode import EncodeOptions
from indexer.incremental import IncrementalJobConfig, run_incremental_job
from indexer.pipeline import IndexJobConfig, run_index_job
from indexer.publish import list_versions, read_current
from indexer.search import open_index
from indexer.version import VersionOptions

pytestmark = pytest.mark.isa

N_BASE = 120
HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,usage,productDisplayName"
# batch size 1 and fp32: an item's vector does not depend on which products share its batch
ENCODE = EncodeOptions(batch_size=1, chunk_size=32, workers=0, precision="fp32")
VERSION = VersionOptions(n_shards=2, factory="IVF,PQ8")  # full builds


def _fashion_folder(fashion_dir: Path, dest: Path, rows: list[str], photos: dict[str, Path],
                    without_photo: str) -> Path:
    """A fashion-layout catalogue of ``rows`` (styles.csv lines); photo of id = ``photos`` or the
    real one; ``without_photo`` has none (indexed text-only, flagged)."""
    (dest / "images").mkdir(parents=True)
    for row in rows:
        pid = row.split(",", 1)[0]
        if pid == without_photo:
            continue
        shutil.copy(photos.get(pid, fashion_dir / "images" / f"{pid}.jpg"), dest / "images" / f"{pid}.jpg")
    (dest / "styles.csv").write_text(HEADER + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return dest


class Scenario:
    """The base catalogue, the changes (a changed title, a new photo, two deletes, a new
    product, one bad line) and the final catalogue they make."""

    def __init__(self, fashion_dir: Path, tmp: Path):
        lines = (fashion_dir / "styles.csv").read_text(encoding="utf-8").splitlines()[1:]
        rows = [ln for ln in lines if ln.count(",") == 8][:N_BASE + 2]
        base_rows, (new_row, photo_row) = rows[:N_BASE], rows[N_BASE:]
        self.ids = [r.split(",", 1)[0] for r in base_rows]
        self.retitled, self.rephotographed = self.ids[5], self.ids[9]
        self.deleted = [self.ids[20], self.ids[30]]
        self.text_only = self.ids[40]
        self.new_id = new_row.split(",", 1)[0]
        self.photo = tmp / "changes" / "new-photo.jpg"
        self.photo.parent.mkdir(parents=True)
        shutil.copy(fashion_dir / "images" / f"{photo_row.split(',', 1)[0]}.jpg", self.photo)
        self.base = _fashion_folder(fashion_dir, tmp / "base", base_rows, {}, self.text_only)
        shutil.copy(fashion_dir / "images" / f"{self.new_id}.jpg", self.base / "images")  # the new arrival's photo
        fields = HEADER.split(",")
        retitled = base_rows[5].rsplit(",", 1)[0] + ",Renamed Product With A New Title"
        final_rows = [retitled if r == base_rows[5] else r for r in base_rows
                      if r.split(",", 1)[0] not in self.deleted] + [new_row]
        self.final = _fashion_folder(fashion_dir, tmp / "final", final_rows, {self.rephotographed: self.photo},
                                     self.text_only)
        as_row = lambda line: dict(zip(fields, line.split(",")))  # noqa: E731
        changes = [{"op": "upsert", "row": as_row(retitled)},
                   {"op": "delete", "product_id": self.deleted[0]},
                   {"op": "upsert", "row": as_row(base_rows[9]), "image": self.photo.name},
                   {"op": "delete", "product_id": "no-such-product"},
                   {"op": "delete", "product_id": self.deleted[1]},
                   {"op": "upsert", "row": as_row(new_row)}]
        self.changes = tmp / "changes" / "changes.jsonl"
        self.changes.write_text("".join(json.dumps(c) + "\n" for c in changes), encoding="utf-8")


@pytest.fixture(scope="module")
def scenario(fashion_dir, tmp_path_factory) -> Scenario:
    return Scenario(fashion_dir, tmp_path_factory.mktemp("incremental"))


@pytest.fixture(scope="module")
def built(scenario, tiny_model_dir, tmp_path_factory):
    """``(root, base, incremental, full)`` versions: the incremental one from the changes
    file, the full one of the final catalogue reusing the base's quantizer (its own root)."""
    root = tmp_path_factory.mktemp("root")
    quiet = lambda _m: None  # noqa: E731
    base = run_index_job(IndexJobConfig(catalog=scenario.base, model_dir=tiny_model_dir, index_root=root,
                                        keep_versions=20, device="cpu", encode=ENCODE, version=VERSION), log=quiet)
    incremental = run_incremental_job(IncrementalJobConfig(index_root=root, keep_versions=20, changes=scenario.changes,
                                                           device="cpu", encode=ENCODE), log=quiet)
    full = run_index_job(IndexJobConfig(catalog=scenario.final, model_dir=tiny_model_dir,
                                        index_root=tmp_path_factory.mktemp("full-root"), device="cpu", encode=ENCODE,
                                        version=VERSION, reuse_quantizer=base.path), log=quiet)
    return root, base, incremental, full


def _lists(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every inverted list of a shard file as (ids, codes)."""
    index = faiss.read_index(str(path))  # kept alive while its lists are read
    invlists = faiss.extract_index_ivf(index).invlists
    out = []
    for n in range(invlists.nlist):
        size = invlists.list_size(n)
        ids = faiss.rev_swig_ptr(invlists.get_ids(n), size).copy() if size else np.empty(0, np.int64)
        codes = faiss.rev_swig_ptr(invlists.get_codes(n), size * invlists.code_size).copy() if size else b""
        out.append((ids, np.asarray(codes)))
    return out


def test_incremental_version_equals_a_full_build_with_the_same_quantizer(built, scenario):
    root, base, incremental, full = built
    assert read_current(root) == incremental.version and incremental.previous == base.version
    with open_index(incremental.path) as inc, open_index(full.path) as ref, open_index(base.path) as old:
        rows = np.arange(inc.n_items)
        pids = inc._metadata.product_ids(rows[None, :])[0]
        assert pids == ref._metadata.product_ids(rows[None, :])[0]
        assert set(pids) == (set(scenario.ids) - set(scenario.deleted)) | {scenario.new_id}
        assert np.array_equal(np.load(incremental.path / "vectors.f16.npy"), np.load(full.path / "vectors.f16.npy"))
        for changed in (scenario.retitled, scenario.rephotographed):  # re-encoded: not the base's vector
            got, was = inc.vectors(inc.internal_ids([changed])), old.vectors(old.internal_ids([changed]))
            assert not np.array_equal(got, was)
        kept = [p for p in pids if p not in (scenario.retitled, scenario.rephotographed, scenario.new_id)]
        assert np.array_equal(inc.vectors(inc.internal_ids(kept)), old.vectors(old.internal_ids(kept)))
        for shard in incremental.manifest["shards"]:
            for (ids_a, codes_a), (ids_b, codes_b) in zip(_lists(incremental.path / shard["file"]),
                                                          _lists(full.path / shard["file"])):
                assert np.array_equal(ids_a, ids_b) and np.array_equal(codes_a, codes_b)
        rng = np.random.default_rng(0)
        queries = np.concatenate([inc.vectors(rows), rng.standard_normal((20, inc.dim)).astype(np.float32)])
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        for nprobe in (1, inc.nlist):
            for refine in (False, True):
                got = inc.search(queries, 10, nprobe=nprobe, refine=refine)
                want = ref.search(queries, 10, nprobe=nprobe, refine=refine)
                assert np.array_equal(got[0], want[0]) and got[1] == want[1]
        assert inc.get_products([scenario.retitled])[0]["title"] == "Renamed Product With A New Title"
        assert inc.get_products([scenario.rephotographed])[0]["image"] == str(scenario.photo.resolve())
        assert inc.get_products([scenario.text_only]) == old.get_products([scenario.text_only])  # copied as is
    flags = [[(f["product_id"], f["flags"]) for f in map(json.loads, (v.path / "flags.jsonl").read_text().splitlines())]
             for v in (incremental, full)]
    assert flags[0] == flags[1] == [(scenario.text_only, ["image_missing", "text_only"])]
    assert incremental.manifest["counts"]["text_only"] == full.manifest["counts"]["text_only"] == 1


def test_the_quantizer_is_reused_not_retrained(built):
    _, base, incremental, _ = built

    def trained(path: Path, shard: dict) -> tuple[np.ndarray, np.ndarray]:
        index = faiss.read_index(str(path / shard["file"]))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        return ivf.quantizer.reconstruct_n(0, ivf.nlist), faiss.vector_to_array(ivf.pq.centroids)

    for shard in incremental.manifest["shards"]:
        got, want = trained(incremental.path, shard), trained(base.path, shard)
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert incremental.manifest["timings_s"]["train"] == 0.0
    assert incremental.manifest["quantizer"] == {"trained_in": base.version, "trained_items": N_BASE}
    assert incremental.manifest["index"]["nlist"] == base.manifest["index"]["nlist"]
    # same quantizer: the base's nprobe per kind of query holds and is kept (the base was built
    # with the query-tower sample, so it has one)
    assert incremental.manifest["index"]["nprobe_by_query_kind"] == base.manifest["index"]["nprobe_by_query_kind"]


def test_manifest_counts_drift_and_rejects(built, scenario):
    _, base, incremental, full = built
    m = incremental.manifest
    counts = m["counts"]
    assert counts["kept"] == N_BASE - 2 - 2 and counts["upserted"] == 3 and counts["added"] == 1
    assert counts["replaced"] == 2 and counts["deleted"] == 2 and counts["rejected"] == 1
    assert counts["indexed"] == N_BASE - 2 + 1 == counts["kept"] + counts["upserted"]
    assert counts["indexed"] + counts["rejected"] == counts["read"] and counts["changes_read"] == 6
    inc = m["incremental"]
    assert inc["base_version"] == base.version and inc["mode"] == "changes"
    assert inc["changed_since_training"] == 5 and inc["drift"] == pytest.approx(5 / N_BASE, abs=1e-6)
    assert inc["retrain_advised"] is False
    recall = m["recall"]  # the base's (same quantizer and nprobe) + the upserts found by their own vectors
    assert recall["inherited_from"] == base.version
    assert recall["recall_at_10"] == base.manifest["recall"]["recall_at_10"]
    with open_index(full.path) as ref:  # the same check on the full build gives the same share
        ids = ref.internal_ids([scenario.retitled, scenario.rephotographed, scenario.new_id])
        q = ref.vectors(ids)
        top_s, top_i = ref.search_ids(q, 1, nprobe=m["index"]["nprobe_default"])
        found = (top_i[:, 0] == ids) | (top_s[:, 0] >= np.einsum("nd,nd->n", q, q) - 1e-4)
    assert recall["upserted_checked"] == 3 and recall["upserted_self_at_rank_1_or_tie"] == round(found.mean(), 4)
    rejects = [json.loads(ln) for ln in (incremental.path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["row"], r["product_id"]) for r in rejects] == [(4, "no-such-product")]
    assert "does not hold" in rejects[0]["reason"]


def test_catalogue_diff_finds_the_changes_and_builds_the_same_version(built, scenario):
    root, base, incremental, full = built
    lines = []
    result = run_incremental_job(IncrementalJobConfig(index_root=root, keep_versions=20, base_version=base.version,
                                                      catalog=scenario.final, device="cpu", encode=ENCODE,
                                                      drift_threshold=0.04), log=lines.append)
    inc = result.manifest["incremental"]
    assert inc["mode"] == "catalog_diff" and inc["base_version"] == base.version
    assert (inc["upserted"], inc["added"], inc["deleted"], inc["rejected"]) == (3, 1, 2, 0)
    assert inc["updated"] == N_BASE - 2 - 2 - 1  # every other photo moved to the new folder: records updated
    assert inc["retrain_advised"] is True and any(ln.startswith("warning: drift") for ln in lines)
    assert np.array_equal(np.load(result.path / "vectors.f16.npy"), np.load(full.path / "vectors.f16.npy"))
    with open_index(result.path) as got, open_index(full.path) as want:
        queries = got.vectors(np.arange(got.n_items))
        assert got.search(queries, 5)[1] == want.search(queries, 5)[1]
        pid = scenario.ids[0]
        assert got.get_products([pid])[0]["image"] == want.get_products([pid])[0]["image"]


def test_an_unchanged_catalogue_diffs_to_no_change(built, scenario, tmp_path):
    root, base, _, _ = built
    result = run_incremental_job(IncrementalJobConfig(index_root=root, keep_versions=20, base_version=base.version,
                                                      catalog=scenario.base, device="cpu", encode=ENCODE),
                                 log=lambda _m: None)
    counts = result.manifest["counts"]
    assert (counts["kept"], counts["upserted"], counts["updated"], counts["deleted"]) == (N_BASE, 0, 0, 0)
    assert np.array_equal(np.load(result.path / "vectors.f16.npy"), np.load(base.path / "vectors.f16.npy"))


def test_bad_changes_are_rejected_with_their_reason(built, scenario, tmp_path):
    root, base, _, _ = built
    changes = tmp_path / "bad.jsonl"
    good = json.loads(scenario.changes.read_text().splitlines()[0])
    changes.write_text("\n".join([
        "not json",
        json.dumps({"op": "rename", "product_id": "1"}),
        json.dumps({"op": "upsert"}),
        json.dumps({"op": "delete"}),
        json.dumps(good),
        json.dumps({"op": "delete", "product_id": good["row"]["id"]}),
        json.dumps({"op": "upsert", "row": {"id": "777001", "productDisplayName": ""}}),
    ]) + "\n", encoding="utf-8")
    result = run_incremental_job(IncrementalJobConfig(index_root=root, keep_versions=20, base_version=base.version,
                                                      changes=changes,
                                                      device="cpu", encode=ENCODE),
                                 log=lambda _m: None)
    rejects = [json.loads(ln) for ln in (result.path / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["row"]: r["reason"] for r in rejects}
    assert sorted(reasons) == [1, 2, 3, 4, 6, 7]
    assert "invalid JSON" in reasons[1] and "unknown op 'rename'" in reasons[2]
    assert "without a row" in reasons[3] and "without a product_id" in reasons[4]
    assert "second change" in reasons[6] and "neither a usable title nor a usable image" in reasons[7]
    counts = result.manifest["counts"]
    assert (counts["upserted"], counts["deleted"], counts["rejected"], counts["changes_read"]) == (1, 0, 6, 7)


def test_cli_incremental_build_and_bad_options(built, scenario, tiny_model_dir, tmp_path, capsys):
    root, base, _, _ = built
    code = ecsearch(["index", "--index-root", str(root), "--base-version", "CURRENT", "--keep-versions", "20",
                     "--changes", str(scenario.changes), "--device", "cpu", "--batch-size", "1", "--workers", "0"])
    out = capsys.readouterr()
    assert code == 0, out.err[-2000:]
    summary = json.loads(out.out)
    assert read_current(root) == summary["version"] and summary["incremental"]["mode"] == "changes"
    assert summary["version"] in list_versions(root)
    for argv, message in [
        (["--base-version", "CURRENT"], "exactly one of --changes or --catalog"),
        (["--changes", str(scenario.changes)], "--changes needs --base-version"),
        (["--base-version", "nope", "--changes", str(scenario.changes)], "base version 'nope' not found"),
        (["--base-version", "CURRENT", "--changes", str(tmp_path / "missing.jsonl")], "no such changes file"),
        (["--base-version", base.version, "--changes", str(scenario.changes), "--model", str(tmp_path)],
         "model"),
    ]:
        assert ecsearch(["index", "--index-root", str(root), "--device", "cpu", *argv]) == 2
        assert message in capsys.readouterr().err


def test_another_model_is_refused(built, scenario, tiny_backbone_dir, tmp_path, capsys):
    from engine.model.model_folder import save_model
    from tests.tiny_models import make_tiny_model

    root, base, _, _ = built
    other = tmp_path / "other-model"
    save_model(make_tiny_model(tiny_backbone_dir, seed=7), other)
    code = ecsearch(["index", "--index-root", str(root), "--base-version", base.version, "--changes",
                     str(scenario.changes), "--model", str(other), "--device", "cpu"])
    assert code == 2 and "is not the base version's" in capsys.readouterr().err
