"""The real default backbones (all-MiniLM-L6-v2, EfficientNet-Lite0 ImageNet) on real photos."""
from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from engine.model.images import load_image
from engine.model.towers import ModelConfig, build_model

pytestmark = pytest.mark.isa  # depends on the CPU's ISA: CI reruns it as on an AVX2-only CPU


@pytest.fixture(scope="module")
def default_model():
    return build_model(ModelConfig())


def test_default_backbones_shapes_on_real_photos(default_model, fashion_dir):
    rows = list(csv.DictReader(open(fashion_dir / "styles.csv")))[:4]
    photos = [str(fashion_dir / "images" / f"{r['id']}.jpg") for r in rows]
    titles = [r["productDisplayName"] for r in rows]
    pixels = torch.stack([default_model.backbones.image.preprocess(load_image(p)) for p in photos])
    with torch.inference_mode():
        tokens, mask = default_model.backbones.image.encode(pixels)
        assert tokens.shape == (4, 49, 1280) and mask.all()
        # The ImageNet head on the same features recognises a T-shirt photo as a jersey (class 610).
        logits = default_model.backbones.image.net(pixels)
    tshirts = [i for i, r in enumerate(rows) if r["articleType"] == "Tshirts"]
    assert tshirts and all(int(logits[i].argmax()) == 610 for i in tshirts)
    text_tokens, text_mask = default_model.backbones.text.encode(titles)
    assert text_tokens.shape[0] == 4 and text_tokens.shape[2] == 384 and text_tokens.shape[1] <= 64
    vecs = default_model.item_tower.encode(titles + [None], photos + [photos[0]])
    assert vecs.shape == (5, 256)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_folded_image_backbone_gives_the_unfolded_tokens_on_real_photos(default_model, fashion_dir):
    """fp32 runs the BatchNorm/padding-folded copy; bf16 autocast the original net."""
    image = default_model.backbones.image
    photos = [fashion_dir / "images" / f"{pid}.jpg" for pid in (1580, 1563, 2987, 15970)]
    pixels = torch.stack([image.preprocess(load_image(p)) for p in photos]).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        folded, _ = image.encode(pixels)
        unfolded = image.net.extract_features(pixels).flatten(2).transpose(1, 2)
    assert image.folded is not image.net
    assert float((folded - unfolded).abs().max()) < 1e-3
    cosine = torch.nn.functional.cosine_similarity(folded.flatten(1), unfolded.flatten(1))
    assert float(cosine.min()) > 0.99999


def test_flip_average_tokens_are_mirror_equivariant_on_real_photos(default_model, fashion_dir):
    """flip_average: a mirrored photo gets the mirrored tokens, so every pooled feature is the
    same for a photo and its mirror image (the plain backbone's differ); the tokens are the
    mean of the plain tokens and the mirrored-back tokens of the mirrored photo."""
    from engine.model.backbones.registry import DEFAULT_IMAGE_BACKBONE, build_image_backbone

    flip = build_image_backbone({**DEFAULT_IMAGE_BACKBONE, "flip_average": True}).eval()
    plain = default_model.backbones.image
    assert flip.flip_average and not plain.flip_average
    photos = [fashion_dir / "images" / f"{pid}.jpg" for pid in (1580, 1563, 2987, 15970)]
    pixels = torch.stack([flip.preprocess(load_image(p)) for p in photos])
    mirror = lambda t: t.reshape(len(photos), 7, 7, -1).flip(2).reshape(len(photos), 49, -1)  # noqa: E731
    with torch.inference_mode():
        tokens, mask = flip.encode(pixels)
        mirrored, _ = flip.encode(pixels.flip(3))
        a, _ = plain.encode(pixels)
        b, _ = plain.encode(pixels.flip(3))
    assert tokens.shape == (4, 49, 1280) and mask.all()
    assert float((mirror(tokens) - mirrored).abs().max()) < 1e-4
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(tokens.mean(1), mirrored.mean(1)).min()) > 0.99999
    assert float(cos(a.mean(1), b.mean(1)).max()) < 0.999  # the plain backbone is not mirror-invariant
    assert float(((a + mirror(b)) / 2 - tokens).abs().max()) < 1e-3


def test_flip_average_is_part_of_the_cache_key_and_efficientnet_only(default_model):
    from engine.model.backbones.registry import Backbones, build_image_backbone
    from engine.model.errors import ModelFolderError
    from engine.tokens.cache import image_cache_key

    backbones = default_model.backbones
    flipped = Backbones(text=backbones.text, image=backbones.image, text_spec=backbones.text_spec,
                        image_spec={**backbones.image_spec, "flip_average": True})
    files = [["a.jpg", 1, 2]]
    assert image_cache_key(backbones, files) != image_cache_key(flipped, files)
    with pytest.raises(ModelFolderError, match="flip_average is supported by 'efficientnet_lite0' only"):
        build_image_backbone({"type": "hf_clip", "path": "/nonexistent", "flip_average": True})


def test_flip_average_model_serves_its_python_vectors_and_ignores_mirroring(fashion_dir, tmp_path):
    """A model whose backbone has flip_average (train --flip-average): the query tower's served
    ONNX Runtime graph gives the Python vectors, and a mirrored photo gets its photo's vector."""
    from PIL import ImageOps

    from engine.model.backbones.registry import DEFAULT_IMAGE_BACKBONE
    from server.tower_backend import plan_tower, prepare_query_tower

    model = build_model(ModelConfig(image_backbone={**DEFAULT_IMAGE_BACKBONE, "flip_average": True}))
    photos, mirrored = [], []
    for pid in (1580, 1563, 2987):
        image = load_image(fashion_dir / "images" / f"{pid}.jpg")
        for folder, img in ((photos, image), (mirrored, ImageOps.mirror(image))):
            path = tmp_path / f"{pid}-{len(folder)}-{len(photos) + len(mirrored)}.png"
            img.save(path)
            folder.append(str(path))
    expected = model.query_tower.encode(None, photos, use_graphs=False)
    np.testing.assert_allclose(model.query_tower.encode(None, mirrored, use_graphs=False), expected, atol=1e-4)
    prepare_query_tower(model, plan_tower("fp32", "onnxruntime"), threads=1)
    assert model.query_tower.graphs
    np.testing.assert_allclose(model.query_tower.encode(None, photos), expected, atol=1e-4)


def test_long_text_is_truncated_to_64_tokens(default_model):
    tokens, mask = default_model.backbones.text.encode(["red " * 200])
    assert tokens.shape[1] == 64 and mask.all()


def test_rust_tokenizer_gives_the_hugging_face_ids_on_every_catalogue_title(default_model, fashion_dir):
    text = default_model.backbones.text
    assert text._rust is not None
    titles = [r["productDisplayName"] for r in csv.DictReader(open(fashion_dir / "styles.csv"))]
    titles += ["😀 ünïcödé 東京 sandals", "red " * 200, "  spaced   out  ", "x"]
    for start in range(0, len(titles), 97):  # batches with different longest texts
        chunk = titles[start:start + 97]
        fast = text.tokenize(chunk)
        reference = text.tokenizer(chunk, padding=True, truncation=True, max_length=text.max_length,
                                   return_tensors="pt")
        assert set(fast) == set(reference)
        for key in reference:
            assert torch.equal(fast[key], reference[key]), (start, key)
    assert text.token_lengths(titles[-4:]) == [len(ids) for ids in text.tokenizer(
        titles[-4:], truncation=True, max_length=text.max_length)["input_ids"]]
    # Pre-tokenized texts (the query server tokenizes per request) pad to the same batch,
    # alone or mixed with strings.
    chunk = titles[:50] + titles[-4:]
    reference = text.tokenize(chunk)
    tokens = [text.pretokenize(t) for t in chunk]
    for mixed in (tokens, [t if n % 2 else chunk[n] for n, t in enumerate(tokens)]):
        padded = text.tokenize(mixed)
        assert set(padded) == set(reference)
        for key in reference:
            assert torch.equal(padded[key], reference[key]), key
    assert text.token_lengths(tokens) == text.token_lengths(chunk)
