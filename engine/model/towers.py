"""Query tower and item tower (METHOD.md §1.4–1.6).

Both towers map text, an image, or both to one L2-normalised ``float32 (d,)`` vector in one
shared space. They share the frozen backbones; whether they share the fusion encoder is a
config switch (default: separate fusion heads, METHOD.md §1.5).
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from engine.model.backbones import DEFAULT_IMAGE_BACKBONE, DEFAULT_TEXT_BACKBONE, Backbones, build_backbones
from engine.model.backbones.text_tokens import TextTokens
from engine.model.errors import BlankTextError, EmptySampleError, InputError
from engine.model.fusion import FusionEncoder
from engine.model.images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from engine.model.text_student import TextStudent, check_layers

VIEWS = ("fused", "text", "image")  # METHOD.md §1.4: F, T, V
PRECISIONS = ("fp32", "bf16")
GRAPH_BACKENDS = ("torchscript", "onnxruntime", "onnxruntime-int8")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a two-tower model (stored as ``config.json``).

    Attributes:
        dim: embedding width d (METHOD.md §1: 256).
        heads: attention heads in the fusion encoder (8).
        cross_layers / self_layers / fusion_layers: METHOD.md §1.2 (3 / 2 / 3).
        mlp_ratio: MLP width factor of the Transformer blocks (our choice, 4.0).
        dropout: dropout in the fusion encoder during training (our choice, 0.1).
        share_fusion: query and item towers share one trained fusion encoder (default False; METHOD.md
            §1.5's switch); the fixed private blocks stay per tower (their gains differ).
        pooled_residual: the fusion output adds a linear projection of the raw mean-pooled
            backbone tokens per present modality (``engine.model.fusion``; our choice, default False).
        deep_gain / solo_gains: None (default), or the initial deep-path gain / [text, image] gains of
            one-modality rows, learned (``engine.model.fusion``; our choice, issue 12).
        image_private_dim: 0 (default), or the width p of the image-private block appended to both
            towers' outputs (``engine.model.private_block``; our choice, issue 12): vectors are then
            ``dim + image_private_dim`` wide. Fitted by ``engine.training.whitening``, never trained.
        image_private_query_gains / image_private_item_gain: the block's fixed gains, query tower
            (text only, image only, text + image) and item tower (every row). Our choice: 0, 3, 0 and 1.
        image_private_gem_p: exponent p of the generalised-mean (GeM) pooling of the raw photo tokens
            that the image-private block whitens: 1 (default) the masked mean, 2 the root of the
            mean of squares (GeM, Radenović, Tolias and Chum, TPAMI 2019; tokens clamped at 0, as
            EfficientNet's ReLU6 features are). ValueError below 1.
        text_private_dim / text_private_query_gains / text_private_item_gain: the same for the
            text-private block (whitened raw text features; vectors ``dim + image_private_dim +
            text_private_dim`` wide). The query tower's image-only gain must be 0. Our choice: 0.8, 0, 0.4 and 0.5.
        cross_dim / cross_query_gains / cross_item_gain / cross_gem_p: 0 (default), or the width
            ``2k + 2`` of the cross-modal block appended last to both towers' outputs
            (``engine.model.cross_block``: canonical variates of the raw text and photo features for
            items that lack a modality; our choice, issue 12), its query tower's (text only, photo
            only, text + photo) gains, the item tower's gain and the GeM exponent of the photo
            features it projects. Fitted by ``engine.training.cross_fit``, never trained. Our choice:
            256 wide, gains 0.6, 0.3, 0.42 and 1, GeM p 2 (docs/results.md "The cross-modal block").
        item_photo_views / item_photo_views_seed: 0 (default), or K: where item vectors are built
            from a catalogue (the indexer, the evaluation), the item tower's image-private part also
            reads K seeded augmented views of the photo (``engine.model.item_views``; our choice,
            issue 12 item 1); the seed of their augmentations. ValueError below 0.
        query_text_layers: None (default), or the text backbone's layers (ascending indices) that the
            query tower's distilled text encoder for text-only queries starts from
            (``engine.model.text_student``; our choice, issue 11): text-only queries then run the
            backbone's embeddings and these layers' distilled copies, saved with the model.
        logit_scale_init / logit_scale_max: learnable logit scale, initial 10, kept
            ≤ e^3 ≈ 20 (METHOD.md §1.6) by clamping the parameter after each optimiser step
            (``TwoTowerModel.clamp_logit_scale_``); the only cap. ValueError unless
            ``0 < init <= max < inf``.
        text_backbone / image_backbone: backbone specs, see ``engine.model.backbones.registry``.
    """

    dim: int = 256
    heads: int = 8
    cross_layers: int = 3
    self_layers: int = 2
    fusion_layers: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    share_fusion: bool = False
    pooled_residual: bool = False
    deep_gain: float | None = None
    solo_gains: list | None = None
    image_private_dim: int = 0
    image_private_query_gains: list = field(default_factory=lambda: [0.0, 3.0, 0.0])
    image_private_item_gain: float = 1.0
    image_private_gem_p: float = 1.0
    text_private_dim: int = 0
    text_private_query_gains: list = field(default_factory=lambda: [0.8, 0.0, 0.4])
    text_private_item_gain: float = 0.5
    cross_dim: int = 0
    cross_query_gains: list = field(default_factory=lambda: [0.6, 0.3, 0.42])
    cross_item_gain: float = 1.0
    cross_gem_p: float = 2.0
    item_photo_views: int = 0
    item_photo_views_seed: int = 0
    query_text_layers: list | None = None
    logit_scale_init: float = 10.0
    logit_scale_max: float = math.exp(3.0)
    text_backbone: dict = field(default_factory=lambda: dict(DEFAULT_TEXT_BACKBONE))
    image_backbone: dict = field(default_factory=lambda: dict(DEFAULT_IMAGE_BACKBONE))

    def __post_init__(self) -> None:
        if not (0 < self.logit_scale_init <= self.logit_scale_max < math.inf):
            raise ValueError(f"need 0 < logit_scale_init <= logit_scale_max < inf, got "
                             f"{self.logit_scale_init} and {self.logit_scale_max}")
        if not self.image_private_gem_p >= 1.0:
            raise ValueError(f"image_private_gem_p must be >= 1 (1: mean pooling), got {self.image_private_gem_p}")
        if self.text_private_dim and self.text_private_query_gains[1] != 0:
            raise ValueError("the query tower's image-only text-private gain must be 0 (photo rankings stay "
                             f"unchanged), got {self.text_private_query_gains[1]}")
        if not (isinstance(self.item_photo_views, int) and self.item_photo_views >= 0):
            raise ValueError(f"item_photo_views must be an integer >= 0, got {self.item_photo_views!r}")
        if self.query_text_layers is not None:
            self.query_text_layers = check_layers(self.query_text_layers, available=None)
        if self.image_private_dim and self.image_private_query_gains[0] != 0:
            raise ValueError("the query tower's text-only image-private gain must be 0 (text rankings stay F's), "
                             f"got {self.image_private_query_gains[0]}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        return cls(**data)


class Tower(nn.Module):
    """One tower: backbones (shared, frozen) → fusion encoder → unit vector.

    ``encode`` is the inference API; ``encode_tokens`` the differentiable one used in
    training on cached backbone tokens.
    """

    def __init__(self, fusion: FusionEncoder, backbones: Backbones, name: str):
        super().__init__()
        self.fusion = fusion
        object.__setattr__(self, "backbones", backbones)  # shared, not a submodule of the tower
        self.name = name
        self.graphs: dict = {}  # kind -> engine.model.tower_graphs.TracedPath, set by use_graphs()
        self.text_student: TextStudent | None = None  # text-only batches' encoder (engine.model.text_student)

    def text_model(self, kind: str) -> nn.Module:
        """The Hugging Face text model that batches of ``kind`` ("text" | "text+image") run: the
        distilled ``text_student`` over the backbone's embeddings for "text" when the tower has
        one, else the text backbone's model."""
        teacher = self.backbones.text.model
        return self.text_student.over(teacher) if kind == "text" and self.text_student is not None else teacher

    def use_graphs(self, precision: str, kinds: Sequence[str] | None = None, backend: str = "torchscript",
                   threads: int | None = None, onnx_cache=None, int8_queries=None) -> dict[str, str]:
        """Encode batches of these kinds ("text": all text-only, "image": all image-only,
        "text+image": all with both; None: all three) at ``precision`` through compiled graphs
        instead of Python: ``backend="torchscript"`` traced TorchScript graphs
        (``engine.model.tower_graphs``), ``"onnxruntime"`` ONNX Runtime sessions of the fp32 paths,
        ``"onnxruntime-int8"`` the same with the text path's linear weights in int8
        (``engine.model.tower_onnx``). Same vectors (cosine ≥ 0.999; int8 ≥ 0.995), less overhead,
        GIL released. Call after ``TwoTowerModel.cast_for_inference(precision)``; weights must
        not change afterwards (the graphs hold frozen copies). ``threads``: ONNX Runtime
        intra-op threads (default: ``torch.get_num_threads()``). ``onnx_cache``: an
        ``engine.model.onnx_cache.OnnxCache`` the ONNX graphs are reused from / stored in.
        ``int8_queries``: real query strings that calibrate and gate the int8 text path
        (``engine.model.tower_int8.product_queries``; without them int8 is refused).

        Returns:
            ``{kind: reason}`` for the kinds that could not be built or whose graph disagreed
            with the Python path; those keep encoding in Python.

        Raises:
            ValueError: unknown backend, or an ONNX Runtime backend with precision other than fp32.
        """
        from engine.model.tower_graphs import KINDS, GraphError, trace_path

        if backend not in GRAPH_BACKENDS:
            raise ValueError(f"unknown graph backend {backend!r}; expected one of {GRAPH_BACKENDS}")
        if backend != "torchscript" and precision != "fp32":
            raise ValueError(f"the {backend} backend runs fp32 weights, not {precision}")
        self.graphs = {}
        refused = {}
        for kind in KINDS if kinds is None else kinds:
            try:
                if backend == "torchscript":
                    self.graphs[kind] = trace_path(self, kind, precision)
                else:
                    from engine.model.tower_onnx import onnx_path

                    self.graphs[kind] = onnx_path(self, kind, threads or torch.get_num_threads(),
                                                  int8=backend == "onnxruntime-int8" and kind == "text",
                                                  cache=onnx_cache, queries=int8_queries)
            except GraphError as exc:
                refused[kind] = str(exc)
        return refused

    def encode_tokens(self, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                      image_tokens: torch.Tensor, image_mask: torch.Tensor,
                      has_text: torch.Tensor, has_image: torch.Tensor) -> torch.Tensor:
        """Backbone tokens → ``float32 (B, d)`` unit vectors (differentiable).

        Pass ``has_image=False`` for the text-only view T, ``has_text=False`` for the image-only
        view V (METHOD.md §1.4). Shapes: text (B, Lt, Ht) + mask (B, Lt); image (B, Li, Hi) +
        mask (B, Li); has_* bool (B,).
        """
        return self.fusion(text_tokens, text_mask, image_tokens, image_mask, has_text, has_image)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str | None] | None, images: Sequence | None = None, *,
               view: str = "fused", batch_size: int = 64,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, precision: str = "fp32",
               use_graphs: bool = True) -> np.ndarray:
        """Encode B samples, each text-only, image-only or text+image. Text-only samples run
        ``text_model("text")``: the distilled text encoder when the tower has one
        (``engine.model.text_student``), else the text backbone like the others.

        Args:
            texts: B strings or None (no text); None for all-None. A string may be replaced by
                its ``TextTokens`` (``backbones.text.pretokenize``).
            images: B images or None; an image is encoded bytes, a path, a ``PIL.Image``,
                or a preprocessed ``torch.Tensor float32 (3, S, S)``.
            view: "fused" (what the sample has), "text" (text only), "image" (image only).
            batch_size: samples per backbone/fusion call; batches are length-sorted.
            max_pixels: decompression-bomb limit for encoded images.
            precision: "fp32", or "bf16" (autocast of backbones and fusion to bfloat16; about
                1.7x faster text encoding on an AVX512-BF16 CPU, cosine to fp32 ≥ 0.999,
                measured on all-MiniLM-L6-v2 queries; our choice, opt-in).
            use_graphs: encode a batch through ``self.graphs`` when one was built for its kind
                and serves this precision (``use_graphs()``; an fp32 ONNX Runtime graph also
                serves bf16 requests: same or better accuracy); False forces Python.

        Returns:
            ``np.ndarray float32 (B, d)``, rows L2-normalised. A row does not depend on the
            other samples of the call.

        Raises:
            EmptySampleError: a sample has neither text nor image (or lacks the view's modality).
            BlankTextError: a text is empty or whitespace only.
            ImageDecodeError, ImageTooLargeError: an image cannot be used.
            ValueError: ``texts`` and ``images`` differ in length, or an unknown view.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if precision == "fp32" and self.fusion.merge.weight.dtype != torch.float32:
            raise ValueError("this model's weights are stored in bfloat16 (cast_for_inference); "
                             "encode with precision='bf16'")
        texts, images = _check_inputs(texts, images, view)
        n = len(texts)
        out = np.zeros((n, self.fusion.output_dim), dtype=np.float32)
        if n == 0:
            return out
        text_lengths = np.zeros(n, dtype=np.int64)
        with_text = [i for i in range(n) if texts[i] is not None]
        if with_text and n > batch_size:  # one batch: no order to choose
            text_lengths[with_text] = self.backbones.text.token_lengths([texts[i] for i in with_text])
        # Length-sorted batching: group image presence, then text length (less padding).
        order = sorted(range(n), key=lambda i: (images[i] is not None, int(text_lengths[i])))
        graphs = {kind: g for kind, g in self.graphs.items() if precision in g.serves} if use_graphs else {}
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            graph = graphs.get(_batch_kind([texts[i] for i in idx], [images[i] for i in idx])) if graphs else None
            if graph is not None:
                pixels = None if graph.kind == "text" else self._pixels([images[i] for i in idx], idx, max_pixels)
                out[idx] = graph(None if graph.kind == "image" else [texts[i] for i in idx], pixels).numpy()
                continue
            device_type = self.fusion.merge.weight.device.type
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                vecs = self._encode_batch([texts[i] for i in idx], [images[i] for i in idx], idx, max_pixels)
            if precision != "fp32":
                vecs = torch.nn.functional.normalize(vecs.float(), dim=-1)  # unit norm in fp32
            out[idx] = vecs.float().cpu().numpy()
        return out

    def _encode_batch(self, texts: list, images: list, indices: list[int], max_pixels: int) -> torch.Tensor:
        device = self.fusion.merge.weight.device
        b = len(texts)
        has_text = torch.tensor([t is not None for t in texts], dtype=torch.bool, device=device)
        has_image = torch.tensor([im is not None for im in images], dtype=torch.bool, device=device)
        text_tokens, text_mask = self._run_text(texts, images, device)
        image_tokens, image_mask = self._run_image(images, indices, max_pixels, device)
        text_tokens, text_mask = _scatter(text_tokens, text_mask, has_text, b)
        image_tokens, image_mask = _scatter(image_tokens, image_mask, has_image, b)
        return self.fusion(text_tokens, text_mask, image_tokens, image_mask, has_text, has_image)

    def _run_text(self, texts: list, images: list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``(P, L, H)`` + mask of the P samples with a text, in order: text-only samples
        through ``text_model("text")``, the others through the full backbone."""
        present = [i for i, t in enumerate(texts) if t is not None]
        if not present:  # the text backbone is not run at all
            return torch.zeros(0, 1, self.backbones.text.hidden_size, device=device), torch.zeros(0, 1, dtype=torch.bool, device=device)
        if self.text_student is None:
            return self.backbones.text.encode([texts[i] for i in present])
        groups = [[i for i in present if images[i] is None], [i for i in present if images[i] is not None]]
        parts = [(rows, self.backbones.text.encode([texts[i] for i in rows], model=self.text_model(kind)))
                 for rows, kind in zip(groups, ("text", "text+image")) if rows]
        if len(parts) == 1:
            return parts[0][1]
        width = max(tokens.shape[1] for _, (tokens, _) in parts)
        out = parts[0][1][0].new_zeros(len(present), width, parts[0][1][0].shape[2])
        mask = torch.zeros(len(present), width, dtype=torch.bool, device=out.device)
        where = {i: n for n, i in enumerate(present)}
        for rows, (tokens, row_mask) in parts:
            at = torch.tensor([where[i] for i in rows], device=out.device)
            out[at, :tokens.shape[1]] = tokens
            mask[at, :tokens.shape[1]] = row_mask
        return out, mask

    def _pixels(self, images: list, indices: list[int], max_pixels: int) -> list[torch.Tensor]:
        """Preprocessed ``float32 (3, S, S)`` tensors of the images that are not None."""
        return [image if isinstance(image, torch.Tensor) else
                self.backbones.image.preprocess(load_image(image, index=index, max_pixels=max_pixels))
                for image, index in zip(images, indices) if image is not None]

    def _run_image(self, images: list, indices: list[int], max_pixels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self._pixels(images, indices, max_pixels)
        if not pixels:  # the image backbone is not run at all
            return torch.zeros(0, 1, self.backbones.image.hidden_size, device=device), torch.zeros(0, 1, dtype=torch.bool, device=device)
        return self.backbones.image.encode(torch.stack(pixels).to(device))


def _batch_kind(texts: list, images: list) -> str | None:
    """"text", "image" or "text+image" when every sample of the batch is of that kind, else None."""
    kinds = {("text" if image is None else "text+image") if text is not None else "image"
             for text, image in zip(texts, images)}
    return kinds.pop() if len(kinds) == 1 else None


def _scatter(tokens: torch.Tensor, mask: torch.Tensor, present: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Place tokens of the present samples ``(P, L, H)`` into a ``(B, L, H)`` batch; absent rows are
    zero with an all-False mask."""
    full = tokens.new_zeros((b, max(tokens.shape[1], 1), tokens.shape[2]))
    full_mask = torch.zeros((b, full.shape[1]), dtype=torch.bool, device=tokens.device)
    if tokens.shape[0]:
        full[present, : tokens.shape[1]] = tokens
        full_mask[present, : tokens.shape[1]] = mask
    return full, full_mask


def _check_inputs(texts, images, view: str) -> tuple[list, list]:
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
    if texts is None and images is None:
        return [], []
    if texts is None:
        texts = [None] * len(images)
    if images is None:
        images = [None] * len(texts)
    texts, images = list(texts), list(images)
    if len(texts) != len(images):
        raise ValueError(f"texts and images differ in length ({len(texts)} vs {len(images)})")
    for i, text in enumerate(texts):
        if text is not None:
            if isinstance(text, TextTokens):  # pre-tokenized by the caller
                continue
            if not isinstance(text, str):
                raise InputError(f"text must be a string, got {type(text).__name__}", i)
            if not text.strip():
                raise BlankTextError("text is empty or whitespace only", i)
    if view == "text":
        images = [None] * len(texts)
    elif view == "image":
        texts = [None] * len(images)
    for i, (text, image) in enumerate(zip(texts, images)):
        if text is None and image is None:
            need = {"fused": "text or an image", "text": "text (view 'text')", "image": "an image (view 'image')"}[view]
            raise EmptySampleError(f"sample has no {need}", i)
    return texts, images


SHARED_FUSION_EXCLUDES = ("private", "text_private", "cross_modal")


def _alias_trained_parts(item: FusionEncoder, query: FusionEncoder) -> FusionEncoder:
    """``share_fusion``: ``item`` made to use ``query``'s trained submodules and parameters (the
    same objects), keeping its own private blocks (fixed buffers whose gains differ per tower).
    A model without private blocks ends up with one fusion encoder, as before. Our choice
    (METHOD.md §1.5 makes sharing a config switch)."""
    if item.private is None and item.text_private is None and item.cross_modal is None:
        return query
    for name, module in query.named_children():
        if name not in SHARED_FUSION_EXCLUDES:
            setattr(item, name, module)
    for name, param in query.named_parameters(recurse=False):
        setattr(item, name, param)
    return item


class TwoTowerModel(nn.Module):
    """Shared frozen backbones + query tower + item tower + learnable logit scale.

    Attributes:
        config: the ``ModelConfig``.
        backbones: the shared ``Backbones`` (text and image).
        query_tower, item_tower: ``Tower``s.
        fingerprint: set by ``engine.model.model_folder`` (sha256 of config + weights), else None.
        folder: the model folder it was loaded from (``engine.model.model_folder``), else None.
    """

    def __init__(self, config: ModelConfig, backbones: Backbones):
        super().__init__()
        self.config = config
        self.text_backbone = backbones.text  # submodules so .to(device) moves them; not saved
        self.image_backbone = backbones.image
        object.__setattr__(self, "backbones", backbones)
        kwargs = dict(text_hidden=backbones.text.hidden_size, image_hidden=backbones.image.hidden_size,
                      dim=config.dim, heads=config.heads, cross_layers=config.cross_layers,
                      self_layers=config.self_layers, fusion_layers=config.fusion_layers,
                      mlp_ratio=config.mlp_ratio, dropout=config.dropout, pooled_residual=config.pooled_residual,
                      deep_gain=config.deep_gain, solo_gains=config.solo_gains, private_dim=config.image_private_dim,
                      private_gem_p=config.image_private_gem_p, text_private_dim=config.text_private_dim,
                      cross_dim=config.cross_dim, cross_gem_p=config.cross_gem_p)
        query_fusion = FusionEncoder(**kwargs, private_gains=tuple(config.image_private_query_gains),
                                     text_private_gains=tuple(config.text_private_query_gains),
                                     cross_gains=tuple(config.cross_query_gains), cross_role="query")
        item_fusion = FusionEncoder(**kwargs, private_gains=(config.image_private_item_gain,) * 3,
                                    text_private_gains=(config.text_private_item_gain,) * 3,
                                    cross_gains=(config.cross_item_gain,) * 3, cross_role="item")
        if config.share_fusion:
            item_fusion = _alias_trained_parts(item_fusion, query_fusion)
        self.query_tower = Tower(query_fusion, backbones, "query")
        if config.query_text_layers is not None:
            self.query_tower.text_student = TextStudent(backbones.text.model, config.query_text_layers)
        self.item_tower = Tower(item_fusion, backbones, "item")
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))
        self.fingerprint: str | None = None
        self.folder = None

    @property
    def dim(self) -> int:
        """Width of the towers' output vectors (and of an index built from them)."""
        return self.query_tower.fusion.output_dim

    @property
    def logit_scale(self) -> torch.Tensor:
        """Scalar tensor ``exp(log_logit_scale)`` (METHOD.md §1.6), differentiable everywhere.

        Not clamped when read (a read-time clamp has zero gradient above the cap, so the scale
        would stay stuck there): the cap is put on the parameter by ``clamp_logit_scale_``.
        """
        return self.log_logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Project the parameter to ``logit_scale <= config.logit_scale_max`` (METHOD.md §1.6:
        ≤ e^3 ≈ 20 by default), in place; the trainer calls it after every optimiser step.
        The one cap on the logit scale (CLIP does the same after each step)."""
        self.log_logit_scale.clamp_(max=math.log(self.config.logit_scale_max))

    def cast_for_inference(self, precision: str) -> "TwoTowerModel":
        """Store the weights the way a serving process runs them; in place, returns self.

        ``"bf16"``: the text backbone and the fusion heads keep their weights in bfloat16, so
        bf16 encoding no longer re-casts every weight on every call (autocast's cast cache
        lives only as long as one ``autocast`` block). Measured on this CPU (AVX512-BF16, one
        thread, trained model, 8 short queries): query tower text encode 16.1 → 11.7 ms, cosine
        to fp32 ≥ 0.9998 (bench/bench_grpc.py has the end-to-end figures). The image
        backbone stays float32 (its folded BatchNorm loses accuracy in bf16: cosine 0.997) and
        still runs under autocast. After this, ``encode(precision="fp32")`` raises ValueError.
        ``"fp32"``: nothing to do. Not for training. Source: our choice.

        Raises:
            ValueError: unknown precision.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if precision == "bf16":
            # A copy: the loaded Hugging Face module is cached per folder and may be shared
            # with other models of this process, which must keep their float32 weights.
            self.text_backbone.model = copy.deepcopy(self.text_backbone.model).to(torch.bfloat16)
            self.query_tower.fusion.to(torch.bfloat16)
            self.item_tower.fusion.to(torch.bfloat16)
            if self.query_tower.text_student is not None:
                self.query_tower.text_student.to(torch.bfloat16)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers that are ours (fusion heads, logit scale); backbones excluded."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(("text_backbone.", "image_backbone."))}

    def train(self, mode: bool = True) -> "TwoTowerModel":
        super().train(mode)
        self.text_backbone.eval()  # backbones stay frozen (BatchNorm / dropout off)
        self.image_backbone.eval()
        return self


def build_model(config: ModelConfig | None = None, seed: int | None = 0) -> TwoTowerModel:
    """Build a randomly initialised two-tower model over the configured backbones, eval mode.

    ``seed``: the initial weights come from a generator seeded with it, without touching
    torch's process-wide generator; None: drawn from that generator.

    Raises:
        ModelFolderError: a backbone path or package is missing.
    """
    config = config or ModelConfig()
    backbones = build_backbones(config.text_backbone, config.image_backbone)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):  # the global generator is left as it was
        if seed is not None:
            torch.default_generator.manual_seed(seed)
        model = TwoTowerModel(config, backbones)
    model.eval()
    return model
