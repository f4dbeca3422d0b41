"""engine.training.job / engine.training.trainer on a tiny random model and a ~200-product real subset."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from engine.cli import main as cli_main
from engine.model.model_folder import load_model
from engine.training.job import TrainingDataError, TrainJob, load_products, train_model
from engine.training.trainer import TrainConfig
from tests.tiny_models import tiny_config

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU

HEADER = "id,gender,masterCategory,subCategory,articleType,baseColour,season,usage,productDisplayName\n"


def _mini_fashion(fashion_dir: Path, dest: Path, n: int = 200, drop_image: str | None = None,
                  corrupt_image: str | None = None) -> Path:
    """A real ``n``-product fashion folder (styles.csv, split.csv, images/) in ``dest``."""
    rows = (fashion_dir / "styles.csv").read_text(encoding="utf-8").splitlines()[1:n + 1]
    ids = [r.split(",", 1)[0] for r in rows]
    (dest / "images").mkdir(parents=True)
    (dest / "styles.csv").write_text(HEADER + "".join(r + "\n" for r in rows), encoding="utf-8")
    split = dict(line.split(",") for line in (fashion_dir / "split.csv").read_text().splitlines()[1:])
    (dest / "split.csv").write_text("id,split\n" + "".join(f"{i},{split[i]}\n" for i in ids))
    for i in ids:
        if i == drop_image:
            continue
        if i == corrupt_image:
            (dest / "images" / f"{i}.jpg").write_bytes(b"not a jpeg at all")
            continue
        shutil.copy(fashion_dir / "images" / f"{i}.jpg", dest / "images" / f"{i}.jpg")
    return dest


@pytest.fixture(scope="module")
def mini_catalog(fashion_dir, tmp_path_factory) -> Path:
    return _mini_fashion(fashion_dir, tmp_path_factory.mktemp("mini") / "fashion", n=200)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("token-cache")


def _job(catalog, out, cache_dir, backbone_dir, **train) -> TrainJob:
    settings = dict(steps=4, stage1_steps=1, batch_size=24, checkpoint_every=100, seed=0)
    settings.update(train)
    return TrainJob(catalog=str(catalog), out=str(out), cache_dir=str(cache_dir), progress=False,
                    model=tiny_config(backbone_dir), train=TrainConfig(**settings))


def test_training_writes_a_loadable_model_and_logs_every_term(mini_catalog, cache_dir, tiny_backbone_dir, tmp_path):
    summary = train_model(_job(mini_catalog, tmp_path / "model", cache_dir, tiny_backbone_dir, steps=5, stage1_steps=2))
    assert summary["steps"] == 5 and summary["products"] > 100  # split=train of 200 rows
    split = dict(line.split(",") for line in (mini_catalog / "split.csv").read_text().splitlines()[1:])
    assert summary["products"] == sum(1 for s in split.values() if s == "train")
    log = [json.loads(line) for line in (tmp_path / "model" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert [r["stage"] for r in log] == [1, 1, 2, 2, 2]
    for record in log:
        names = ("align_text", "align_image") if record["stage"] == 1 else ("cmal", "clal", "imcl")
        assert set(record["terms"]) == set(names) == set(record["weights"])
        assert all(torch.isfinite(torch.tensor(v)) for v in record["terms"].values())
    # adaptive (uncertainty) weights move away from their initial value 1
    assert any(abs(w - 1.0) > 1e-4 for w in log[-1]["weights"].values())
    model = load_model(tmp_path / "model")
    assert model.fingerprint == summary["fingerprint"]
    vec = model.query_tower.encode(["women black heels"], [None])
    assert vec.shape == (1, model.dim)
    # training moved the weights away from the fresh initialisation
    fresh = tiny_config(tiny_backbone_dir)
    from engine.model.towers import build_model
    start = build_model(fresh, seed=0).trainable_state_dict()
    trained = model.trainable_state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)


def test_training_leaves_the_global_generator_alone(mini_catalog, cache_dir, tiny_backbone_dir, tmp_path):
    before = torch.get_rng_state()
    train_model(_job(mini_catalog, tmp_path / "out", cache_dir, tiny_backbone_dir, steps=2, stage1_steps=1))
    assert torch.equal(torch.get_rng_state(), before)


def test_interrupted_run_resumes_to_the_same_state(mini_catalog, cache_dir, tiny_backbone_dir, tmp_path):
    full = tmp_path / "full"
    train_model(_job(mini_catalog, full, cache_dir, tiny_backbone_dir, steps=2, stage1_steps=1))
    part = tmp_path / "part"
    stopped = train_model(_job(mini_catalog, part, cache_dir, tiny_backbone_dir, steps=2, stage1_steps=1, stop_after=1))
    assert stopped["steps"] == 1 and not (part / "model.safetensors").exists()
    job = _job(mini_catalog, part, cache_dir, tiny_backbone_dir, steps=2, stage1_steps=1)
    job.resume = True
    resumed = train_model(job)
    assert resumed["steps"] == 2 and resumed["steps_this_run"] == 1
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in a["weighting"]:
        assert torch.equal(a["weighting"][key], b["weighting"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][pid][name]), (pid, name)
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    log_a = (full / "train_log.jsonl").read_text().splitlines()
    log_b = (part / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in log_a] == [json.loads(x)["loss"] for x in log_b]


def test_bad_input_goes_to_rejects_and_training_runs_on_the_rest(fashion_dir, cache_dir, tiny_backbone_dir, tmp_path):
    probe = _mini_fashion(fashion_dir, tmp_path / "probe", n=60)
    train_ids = [line.split(",")[0] for line in (probe / "split.csv").read_text().splitlines()[1:]
                 if line.endswith(",train")]
    missing_id, corrupt_id = train_ids[0], train_ids[1]
    catalog = _mini_fashion(fashion_dir, tmp_path / "bad", n=60, drop_image=missing_id, corrupt_image=corrupt_id)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join([
        json.dumps({"query_text": "black watch", "product_id": train_ids[2]}),
        json.dumps({"query_text": "red shoe", "product_id": "999999999"}),
        json.dumps({"query_text": "navy top", "query_image": "gone.jpg", "product_id": train_ids[3]}),
    ]) + "\n")
    job = _job(catalog, tmp_path / "model", cache_dir, tiny_backbone_dir, steps=2, stage1_steps=1)
    job.pairs_file = str(pairs)
    summary = train_model(job)
    assert summary["steps"] == 2 and (tmp_path / "model" / "model.safetensors").is_file()
    assert summary["pairs_by_kind"]["pairs_file"] == 2
    rejects = [json.loads(x) for x in (tmp_path / "model" / "rejects.jsonl").read_text().splitlines()]
    reasons = " | ".join(r["reason"] for r in rejects)
    assert "unknown product id '999999999'" in reasons
    assert "query image not found" in reasons
    assert f"images/{missing_id}.jpg" in reasons and "image file not found" in reasons
    assert any(r["source"] == "image" and r["image"].endswith(f"{corrupt_id}.jpg") for r in rejects)
    assert summary["products"] == len(train_ids)  # no product dropped: both trained text-only


def test_empty_catalogue_is_a_clear_error(tmp_path, tiny_backbone_dir, cache_dir):
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "styles.csv").write_text(HEADER)
    (empty / "split.csv").write_text("id,split\n")
    with pytest.raises(TrainingDataError, match="no usable product in split 'train' \\(0 rows read"):
        train_model(_job(empty, tmp_path / "m", cache_dir, tiny_backbone_dir))
    assert cli_main(["train", "--catalog", str(empty), "--out", str(tmp_path / "m2"), "--quiet"]) == 2


def test_train_cli_writes_a_model_folder(mini_catalog, cache_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "cli-model"
    rc = cli_main(["train", "--catalog", str(mini_catalog), "--out", str(out), "--cache-dir", str(cache_dir),
                   "--init-model", str(tiny_model_dir), "--steps", "2", "--stage1-steps", "1",
                   "--batch-size", "16", "--weighting", "static", "--static-weights", "cmal=1,clal=0.5", "--quiet"])
    assert rc == 0
    model = load_model(out)
    assert json.loads((out / "config.json").read_text())["extra"]["training"]["steps"] == 2
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["weights"] == {"cmal": 1.0, "clal": 0.5, "imcl": 1.0}
    assert model.dim == 32


def test_load_products_split_rules(mini_catalog):
    products, _ = load_products(str(mini_catalog), "test")
    assert products and all(p.product_id for p in products)
    everything, _ = load_products(str(mini_catalog), None)
    assert len(everything) == 200


def test_train_cli_pair_mix_cmal_weights_and_bf16(mini_catalog, cache_dir, tiny_model_dir, tmp_path):
    """The recipe options: photo-only / title-only pairs, CMAL view-pair weights, bf16 autocast.
    The model folder stays float32 and loads; a bad weight list is a clear error (exit 2)."""
    out = tmp_path / "recipe"
    base = ["train", "--catalog", str(mini_catalog), "--cache-dir", str(cache_dir), "--init-model",
            str(tiny_model_dir), "--steps", "3", "--stage1-steps", "1", "--batch-size", "16", "--quiet"]
    rc = cli_main(base + ["--out", str(out), "--photo-query-rate", "1", "--title-query-rate", "0.5",
                          "--cmal-pair-weights", "1,1,2,3,2", "--precision", "bf16"])
    assert rc == 0
    training = json.loads((out / "config.json").read_text())["extra"]["training"]
    kinds = training["pairs_by_kind"]
    assert kinds["photo_query"] == kinds["instance"] and 0 < kinds["title_query"] < kinds["instance"]
    assert training["train"]["precision"] == "bf16"
    assert training["train"]["loss"]["cmal_pair_weights"] == [1.0, 1.0, 2.0, 3.0, 2.0]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [1, 2, 2]
    assert all(torch.isfinite(torch.tensor(v)) for r in log for v in r["terms"].values())
    model = load_model(out)
    assert all(v.dtype == torch.float32 for v in model.trainable_state_dict().values() if v.is_floating_point())
    assert cli_main(base + ["--out", str(tmp_path / "bad"), "--cmal-pair-weights", "1,2"]) == 2
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")


def test_train_cli_gain_options(mini_catalog, cache_dir, tiny_model_dir, tmp_path, capsys):
    """--gain-lr-scale reaches the trainer's config; --precision auto (the default) trains in fp32 on
    every CPU, bf16-native ones too (bf16 autocast steps slower there); a --solo-gains that is not
    two numbers is a clear error."""
    base = ["train", "--catalog", str(mini_catalog), "--cache-dir", str(cache_dir), "--init-model",
            str(tiny_model_dir), "--steps", "2", "--stage1-steps", "1", "--batch-size", "16", "--quiet"]
    assert cli_main(base + ["--out", str(tmp_path / "m"), "--gain-lr-scale", "20"]) == 0
    training = json.loads((tmp_path / "m" / "config.json").read_text())["extra"]["training"]
    assert training["train"]["gain_lr_scale"] == 20.0
    assert training["train"]["precision"] == "fp32"
    assert cli_main(base + ["--out", str(tmp_path / "bad"), "--solo-gains", "2"]) == 2
    assert "--solo-gains: expected TEXT,IMAGE" in capsys.readouterr().err
