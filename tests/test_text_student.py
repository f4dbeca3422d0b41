"""The query tower's distilled text encoder (engine/model/text_student.py, engine/training/distill.py):
text-only queries run it, every other path keeps the full backbone; graphs, model folders, the
distillation, the training job's step and the evaluation's T view. Tiny random Hugging Face
backbones (a 4-layer BERT here), real photos, real ONNX Runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.model.model_folder import load_model, save_model
from engine.model.text_student import TextStudent, TextStudentError
from engine.training.distill import (DistillConfig, attach_text_student, distill_text_student, distillation_texts,
                                     resolve_layers, teacher_vectors)
from tests.test_private_block import TEXTS, set_random_projection
from tests.test_towers import photos  # noqa: F401  (fixture: four real catalogue photos)
from tests.tiny_models import make_tiny_bert, make_tiny_model

pytestmark = pytest.mark.isa  # graphs, int8 / bf16 paths and the distillation's precision depend on the CPU's ISA

MORE_TEXTS = TEXTS + ["puma sports shoes", "formal shirts for men", "titan analog watch", "green kurta",
                      "Nike Men Running Shoes", "adidas black track pants for women"]


@pytest.fixture(scope="module")
def deep_backbone_dir(tiny_backbone_dir, tmp_path_factory):
    """The tiny backbones, with a 4-layer BERT as the text backbone."""
    folder = tmp_path_factory.mktemp("deep-bert")
    make_tiny_bert(folder / "tiny-bert", seed=1, layers=4)
    (folder / "tiny-clip").symlink_to(tiny_backbone_dir / "tiny-clip")
    return folder


def _student_model(backbone_dir, layers=(0, 2), seed=5, **config):
    plain = make_tiny_model(backbone_dir, seed=seed, **config)
    if config.get("text_private_dim"):
        set_random_projection(plain, "text_private", seed)
    return plain, attach_text_student(plain, layers)


def _ids(model, texts):
    batch = model.backbones.text.tokenize(texts)
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def test_student_over_all_layers_is_the_teacher_and_leaves_the_teacher_alone(deep_backbone_dir):
    model = make_tiny_model(deep_backbone_dir)
    teacher = model.backbones.text.model
    inputs = _ids(model, MORE_TEXTS)
    with torch.no_grad():
        before = teacher(**inputs).last_hidden_state
        same = TextStudent(teacher, range(4)).over(teacher)(**inputs).last_hidden_state
        fewer = TextStudent(teacher, [0, 2]).over(teacher)(**inputs).last_hidden_state
        after = teacher(**inputs).last_hidden_state
    assert torch.equal(same, before) and torch.equal(after, before)
    assert len(teacher.encoder.layer) == 4
    assert fewer.shape == before.shape and not torch.allclose(fewer, before, atol=1e-3)


@pytest.mark.parametrize("layers, message", [([], "at least one layer"), ([2, 1], "distinct and ascending"),
                                             ([0, 0], "distinct and ascending"), ([0, 4], r"lie in 0\.\.3"),
                                             ([-1], r"indices >= 0, got \[-1\]")])
def test_bad_layers_are_refused(deep_backbone_dir, layers, message):
    model = make_tiny_model(deep_backbone_dir)
    with pytest.raises(TextStudentError, match=message):
        attach_text_student(model, layers)


def test_a_backbone_without_a_layer_stack_is_refused_and_auto_says_why():
    with pytest.raises(TextStudentError, match="no encoder.layer"):
        TextStudent(torch.nn.Linear(2, 2), [0])
    assert resolve_layers("auto", torch.nn.Linear(2, 2))[0] is None
    assert resolve_layers("none", None) == (None, None)


def test_auto_takes_the_first_and_last_layer_of_four_or_more(tiny_backbone_dir, deep_backbone_dir):
    assert resolve_layers("auto", make_tiny_model(deep_backbone_dir).backbones.text.model) == ([0, 3], None)
    layers, reason = resolve_layers("auto", make_tiny_model(tiny_backbone_dir).backbones.text.model)
    assert layers is None and "has 1 layers" in reason


def test_only_text_only_queries_run_the_student(deep_backbone_dir, photos):
    plain, model = _student_model(deep_backbone_dir)
    q, p = model.query_tower, plain.query_tower
    texts = MORE_TEXTS[:4]
    solo = q.encode(texts, None, use_graphs=False)
    assert solo.shape == (4, 32) and np.allclose(np.linalg.norm(solo, axis=1), 1, atol=1e-5)
    assert not np.allclose(solo, p.encode(texts, None, use_graphs=False), atol=1e-3)
    # photos, text + photo and every item vector: exactly the model without the student
    np.testing.assert_array_equal(q.encode(None, photos, use_graphs=False), p.encode(None, photos, use_graphs=False))
    np.testing.assert_array_equal(q.encode(texts, photos, use_graphs=False), p.encode(texts, photos, use_graphs=False))
    np.testing.assert_array_equal(model.item_tower.encode(texts, None, use_graphs=False),
                                  plain.item_tower.encode(texts, None, use_graphs=False))
    # a mixed call gives each row what it gives alone
    mixed_texts = [texts[0], texts[1], None, "a much longer title of a product with many words", texts[3]]
    mixed_images = [None, photos[0], photos[1], None, photos[2]]
    mixed = q.encode(mixed_texts, mixed_images, use_graphs=False)
    for i, (t, im) in enumerate(zip(mixed_texts, mixed_images)):
        alone = q.encode([t] if t else None, [im] if im is not None else None, use_graphs=False)[0]
        np.testing.assert_allclose(mixed[i], alone, atol=1e-5, err_msg=str(i))
    np.testing.assert_allclose(teacher_vectors(q, texts), p.encode(texts, None, use_graphs=False), atol=1e-6)


def test_graphs_and_model_folders_run_the_student(deep_backbone_dir, photos, tmp_path):
    from server.tower_backend import plan_tower, prepare_query_tower

    batches = {"text": (MORE_TEXTS, None), "image": (None, photos[:3]), "text+image": (MORE_TEXTS[:3], photos[:3])}
    _, model = _student_model(deep_backbone_dir)
    expected = {k: model.query_tower.encode(*v, use_graphs=False) for k, v in batches.items()}
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.config.query_text_layers == [0, 2] and len(loaded.query_tower.text_student.layers) == 2
    for kind, args in batches.items():
        np.testing.assert_allclose(loaded.query_tower.encode(*args, use_graphs=False), expected[kind], atol=1e-6)
    for backend in ("torchscript", "onnxruntime"):
        if backend == "onnxruntime":
            pytest.importorskip("onnxruntime")
        fresh = load_model(tmp_path / "m")
        line = prepare_query_tower(fresh, plan_tower("fp32", backend), threads=1)
        assert line.endswith("; text-only queries: distilled text encoder, backbone layers [0, 2]"), line
        assert set(fresh.query_tower.graphs) == {"text", "image", "text+image"}, backend
        for kind, args in batches.items():
            np.testing.assert_allclose(fresh.query_tower.encode(*args), expected[kind], atol=2e-5,
                                       err_msg=f"{backend} {kind}")


def test_bf16_weights_run_the_student_in_bf16(deep_backbone_dir):
    from engine.cpu_features import bf16_runs

    if not bf16_runs("cpu"):
        pytest.skip("bf16 kernels need AVX-512 (BW/VL/DQ) or better on this CPU")
    _, model = _student_model(deep_backbone_dir)
    expected = model.query_tower.encode(MORE_TEXTS, None, use_graphs=False)
    model.cast_for_inference("bf16")
    assert model.query_tower.text_student.layers[0].attention.self.query.weight.dtype == torch.bfloat16
    got = model.query_tower.encode(MORE_TEXTS, None, precision="bf16", use_graphs=False)
    assert (got * expected).sum(axis=1).min() > 0.99


def test_distillation_brings_the_student_to_the_teacher(deep_backbone_dir, fashion_dir):
    from engine.catalog import read_catalog

    products = read_catalog(fashion_dir, limit=200).products
    texts = distillation_texts(products, [])
    assert len(texts) > 200 and all(t.strip() for t in texts) and texts == sorted(set(texts))
    assert any(p.title in texts for p in products)
    config = DistillConfig(epochs=30, max_steps=40, batch_size=32, lr=3e-3, holdout=0.1, seed=0)
    runs = []
    for _ in range(2):
        # text-only vectors that follow the text backbone's tokens closely: the text-private block, gain 4
        _, model = _student_model(deep_backbone_dir, layers=(1, 3), text_private_dim=6,
                                  text_private_query_gains=[4.0, 0.0, 1.0])
        tower = model.query_tower
        g = torch.Generator().manual_seed(0)  # a student far from its teacher, as a 3-of-6 start is
        with torch.no_grad():
            for p in tower.text_student.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
        teacher = teacher_vectors(tower, texts)
        start = float((tower.encode(texts, None, use_graphs=False) * teacher).sum(axis=1).mean())
        item = model.item_tower.encode(texts[:5], None, use_graphs=False)
        runs.append(distill_text_student(model, texts, config, progress=False))
        got = tower.encode(texts, None, use_graphs=False)
        np.testing.assert_array_equal(model.item_tower.encode(texts[:5], None, use_graphs=False), item)
    info = runs[0]
    assert info["steps"] == 40 and info["layers"] == [1, 3] and info["holdout"]["texts"] == round(0.1 * len(texts))
    end = float((got * teacher).sum(axis=1).mean())
    assert start < 0.9 and end > start + 0.05 and info["holdout"]["cosine_mean"] > start + 0.05
    assert runs[0]["final_loss"] == runs[1]["final_loss"]  # seeded
    # the student is frozen afterwards and the fusion encoder's flags are as they were
    assert not any(p.requires_grad for p in tower.text_student.parameters())
    assert all(p.requires_grad for p in tower.fusion.parameters())
    with pytest.raises(ValueError, match="at least 2 distinct texts"):
        distill_text_student(model, ["one", "one"], config, progress=False)
    with pytest.raises(ValueError, match="no text student"):
        distill_text_student(make_tiny_model(deep_backbone_dir), texts, config, progress=False)


def test_the_evaluation_scores_text_queries_through_the_student(deep_backbone_dir, fashion_dir, tmp_path):
    from engine.catalog import read_catalog
    from engine.evaluation.evaluate import build_pool, tower_views

    products = read_catalog(fashion_dir, limit=12).products
    plain, model = _student_model(deep_backbone_dir)
    pool = build_pool(products, model.backbones, str(tmp_path / "cache"), progress=False)
    views = tower_views(model.query_tower, pool.texts, pool.images, pool.text_rows, pool.image_rows)
    base = tower_views(plain.query_tower, pool.texts, pool.images, pool.text_rows, pool.image_rows)
    rows = np.flatnonzero(pool.text_rows >= 0)
    titles = [pool.texts.keys[r] for r in pool.text_rows[rows]]
    np.testing.assert_allclose(views["T"][rows], model.query_tower.encode(titles, None, view="text"), atol=1e-6)
    np.testing.assert_array_equal(views["V"], base["V"])
    both = rows[pool.image_rows[rows] >= 0]
    np.testing.assert_allclose(views["F"][both], base["F"][both], atol=1e-6)  # text + photo: the full backbone


def test_the_training_job_distils_after_the_last_step_and_fails_fast_on_bad_layers(deep_backbone_dir, fashion_dir,
                                                                                   tmp_path, capsys):
    from engine.cli import main as cli_main
    from engine.training.job import TrainJob, train_model
    from engine.training.trainer import TrainConfig
    from tests.test_train import _mini_fashion
    from tests.tiny_models import tiny_config

    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=60)

    def job(name, layers, min_cosine=0.0):
        return TrainJob(catalog=str(catalog), out=str(tmp_path / name), cache_dir=str(tmp_path / "cache"),
                        progress=False, model=tiny_config(deep_backbone_dir), linear_baseline=False,
                        brand_query_rate=1.0, query_text_layers=layers,
                        distill=DistillConfig(epochs=1, max_steps=3, batch_size=16, min_holdout_cosine=min_cosine),
                        train=TrainConfig(steps=2, stage1_steps=1, batch_size=16, checkpoint_every=100, seed=0))

    summary = train_model(job("auto", "auto"))
    info = summary["query_text_student"]
    assert info["layers"] == [0, 3] and info["steps"] == 3 and info["texts"] > 60 and info["holdout"]["texts"] >= 1
    model = load_model(tmp_path / "auto")
    assert model.config.query_text_layers == [0, 3]
    assert load_model(tmp_path / "auto").extra["training"]["query_text_student"]["layers"] == [0, 3]
    # auto drops a student that stays far from the full backbone (3 steps cannot reach cosine 1)
    declined = train_model(job("short", "auto", min_cosine=1.0))["query_text_student"]
    assert declined["layers"] is None and "keep the full text backbone" in declined["reason"]
    assert declined["declined"]["holdout"]["cosine_mean"] < 1.0 and declined["declined"]["layers"] == [0, 3]
    assert load_model(tmp_path / "short").query_tower.text_student is None
    assert train_model(job("asked", [0, 3], min_cosine=1.0))["query_text_student"]["layers"] == [0, 3]  # explicit
    with pytest.raises(ValueError, match="min_holdout_cosine"):
        DistillConfig(min_holdout_cosine=1.5)
    assert train_model(job("none", "none"))["query_text_student"] is None
    assert load_model(tmp_path / "none").query_tower.text_student is None
    with pytest.raises(TextStudentError, match="lie in 0..3"):
        train_model(job("bad", [0, 7]))
    assert not (tmp_path / "bad" / "train_log.jsonl").exists()  # refused before the first step
    rc = cli_main(["train", "--catalog", str(catalog), "--out", str(tmp_path / "cli"), "--query-text-layers", "two"])
    assert rc == 2 and "--query-text-layers: expected auto, none or comma-separated layer indices" in capsys.readouterr().err


def test_clip_family_text_models_take_a_student_too(tiny_backbone_dir):
    clip = {"type": "hf_clip", "path": str(tiny_backbone_dir / "tiny-clip")}
    model = make_tiny_model(tiny_backbone_dir, text_backbone=clip)
    assert resolve_layers([0], model.backbones.text.model) == ([0], None)
    student = attach_text_student(model, [0])  # every layer: the same vectors
    np.testing.assert_allclose(student.query_tower.encode(MORE_TEXTS, use_graphs=False),
                               model.query_tower.encode(MORE_TEXTS, use_graphs=False), atol=1e-6)


def test_distill_command_writes_a_new_folder_and_refuses_bad_input(deep_backbone_dir, fashion_dir, tmp_path, capsys):
    from engine.cli import main as cli_main
    from tests.test_train import _mini_fashion

    catalog = _mini_fashion(fashion_dir, tmp_path / "fashion", n=40)
    save_model(make_tiny_model(deep_backbone_dir, seed=2), tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    args = ["distill", "--model", str(tmp_path / "m"), "--catalog", str(catalog), "--distill-max-steps", "2", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "s")]) == 0
    printed = capsys.readouterr().out
    assert '"layers": [\n    0,\n    3\n  ]' in printed and '"steps": 2' in printed
    student = load_model(tmp_path / "s")
    assert student.config.query_text_layers == [0, 3]
    assert student.extra["training"]["query_text_student"]["distilled"].startswith("by ecsearch distill")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before  # the source is left alone
    for extra, message in ((["--out", str(tmp_path / "m")], "must be a new folder"),
                           (["--out", str(tmp_path / "t"), "--query-text-layers", "0,9"], "lie in 0..3"),
                           (["--out", str(tmp_path / "t"), "--query-text-layers", "none"], "nothing to distil")):
        assert cli_main(args + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_a_served_index_answers_text_queries_through_the_student(deep_backbone_dir, fashion_dir, tmp_path):
    from engine.catalog import read_catalog
    from indexer.encode import EncodeOptions
    from indexer.pipeline import IndexJobConfig, run_index_job
    from indexer.version import VersionOptions
    from server.client import SearchClient
    from tests.test_server_support import start_server

    plain, model = _student_model(deep_backbone_dir, text_private_dim=6, text_private_query_gains=[4.0, 0.0, 1.0])
    g = torch.Generator().manual_seed(1)  # a student whose vectors differ visibly from the full backbone's
    with torch.no_grad():
        for p in model.query_tower.text_student.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    save_model(model, tmp_path / "model")
    products = read_catalog(fashion_dir, limit=60).products
    run_index_job(IndexJobConfig(catalog=fashion_dir, model_dir=tmp_path / "model", index_root=tmp_path / "index",
                                 limit=60, device="cpu", encode=EncodeOptions(view="text", batch_size=32, workers=0),
                                 version=VersionOptions(factory="IVF1,Flat", recall_queries=20)), log=lambda _line: None)
    items = {p.product_id: v for p, v in zip(products, model.item_tower.encode([p.title for p in products], None,
                                                                                view="text"))}
    query = "puma sports shoes"
    student_q = model.query_tower.encode([query], None)[0]
    teacher_q = plain.query_tower.encode([query], None)[0]
    server = start_server(tmp_path / "index", precision="fp32")  # bf16 would round the scores compared below
    try:
        server.wait_serving()
        with SearchClient(server.target, timeout_s=30) as client:
            hits = client.search(text=query, top_k=5).hits
    finally:
        server.stop()
    assert len(hits) == 5
    served = np.array([h.score for h in hits])
    np.testing.assert_allclose(served, [student_q @ items[h.product_id] for h in hits], atol=5e-4)  # fp16 refine
    assert np.abs(served - [teacher_q @ items[h.product_id] for h in hits]).max() > 5e-3


def test_auto_epochs_follow_the_cpu(deep_backbone_dir, fashion_dir, monkeypatch):
    import math

    from engine.catalog import read_catalog
    from engine.cpu_features import bf16_is_fast

    texts = distillation_texts(read_catalog(fashion_dir, limit=30).products, [])
    config = DistillConfig(batch_size=64, holdout=0.0)
    batches = math.ceil(len(texts) / 64)
    if bf16_is_fast():  # this run's CPU (or its ISA override) has native bf16: 8 bf16 passes
        info = distill_text_student(_student_model(deep_backbone_dir)[1], texts, config, progress=False)
        assert (info["epochs"], info["steps"], info["precision"]) == (8.0, 8 * batches, "bf16")
    monkeypatch.setenv("ECSEARCH_CPU_ISA", "avx2")  # no native bf16: 3 fp32 passes
    info = distill_text_student(_student_model(deep_backbone_dir)[1], texts, config, progress=False)
    assert (info["epochs"], info["steps"], info["precision"], info["holdout"]) == (3.0, 3 * batches, "fp32", None)
    with pytest.raises(ValueError, match="must be > 0"):
        DistillConfig(epochs=0)
