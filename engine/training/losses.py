"""Training losses: CMAL, CLAL, IMCL (UniECS) and adaptive loss weighting.

Source: Liang et al., "UniECS", CIKM 2025, arXiv:2508.13843 (losses named in the paper;
their form restated in ``../shared/docs/METHOD.md`` §2). Every function takes embedding
tensors, never models, so the losses are tested on plain tensors.

Conventions (every function):

- query views ``Fq, Vq, Tq`` and item views ``Fi, Vi, Ti``: ``float32 (B, d)``, rows
  L2-normalised; row ``i`` of the query side and row ``i`` of the item side form a positive
  pair (in-batch negatives).
- ``scale``: the logit scale ``s`` (a 0-d tensor), taken as given. Its one cap is
  ``ModelConfig.logit_scale_max``, put on the parameter by ``TwoTowerModel.clamp_logit_scale_``
  after each optimiser step (``engine.training.trainer``), so its gradient never vanishes.
- ``false_neg``: optional ``bool (B, B)``; ``True`` at ``[i, j]`` (``i != j``) when item ``j``
  is also relevant to query ``i`` (same product, same attribute group); those entries are
  left out of the negatives. The diagonal is ignored.
- ``q_ok`` / ``i_ok``: optional ``bool (B,)``: which rows actually have that view (a
  title-only query has no image view). A term only uses rows valid on both of its sides;
  with fewer than two such rows the term is ``0`` (still a tensor, still finite).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_NAMES: tuple[str, ...] = ("cmal", "clal", "imcl")
STAGE1_LOSS_NAMES: tuple[str, ...] = ("align_text", "align_image")
# CMAL's cross-modal view pairs (METHOD.md §2), in the order of ``LossConfig.cmal_pair_weights``.
CMAL_PAIRS: tuple[tuple[str, str], ...] = (("Tq", "Vi"), ("Vq", "Ti"), ("Tq", "Fi"), ("Vq", "Fi"), ("Fq", "Fi"))


def _negatives_mask(b: int, false_neg: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``bool (B, B)``: True where ``[i, j]`` counts in the softmax (diagonal + true negatives)."""
    eye = torch.eye(b, dtype=torch.bool, device=device)
    if false_neg is None:
        return torch.ones(b, b, dtype=torch.bool, device=device)
    return eye | ~false_neg


def _rows(ok_a: torch.Tensor | None, ok_b: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    keep = torch.ones(b, dtype=torch.bool, device=device)
    if ok_a is not None:
        keep = keep & ok_a
    if ok_b is not None:
        keep = keep & ok_b
    return keep


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    false_neg: torch.Tensor | None = None,
    a_ok: torch.Tensor | None = None,
    b_ok: torch.Tensor | None = None,
    symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE: cross-entropy over ``scale * a bᵀ`` with the diagonal as targets.

    a, b: ``float32 (B, d)`` unit rows; returns a 0-d tensor (mean over kept rows; the mean
    of both directions when ``symmetric``). METHOD.md §2 (van den Oord et al. 2018; CLIP).
    """
    keep = _rows(a_ok, b_ok, a.shape[0], a.device)
    if int(keep.sum()) < 2:
        return a.sum() * 0.0
    a, b = a[keep], b[keep]
    n = a.shape[0]
    valid = _negatives_mask(n, None if false_neg is None else false_neg[keep][:, keep], a.device)
    logits = scale * (a @ b.T)  # [n, n]
    logits = logits.masked_fill(~valid, float("-inf"))
    target = torch.arange(n, device=a.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
    return loss


def hinge_hardest(
    a: torch.Tensor,
    b: torch.Tensor,
    margin: float,
    false_neg: torch.Tensor | None = None,
    a_ok: torch.Tensor | None = None,
    b_ok: torch.Tensor | None = None,
    fraction: float | None = None,
) -> torch.Tensor:
    """Hinge ranking on cosine: ``mean relu(margin - s_ii + s_ij)`` over hard negatives, both directions.

    fraction: ``None`` uses the single hardest negative per row (VSE++, Faghri et al. 2018);
    a value in ``(0, 1]`` averages over the hardest ``ceil(fraction * (n-1))`` negatives.
    The margin is on cosine similarity, not on scaled logits (METHOD.md §2). Returns a 0-d tensor.
    """
    keep = _rows(a_ok, b_ok, a.shape[0], a.device)
    n = int(keep.sum())
    if n < 2:
        return a.sum() * 0.0
    a, b = a[keep], b[keep]
    sim = a @ b.T  # [n, n] cosine
    valid = ~torch.eye(n, dtype=torch.bool, device=a.device)
    if false_neg is not None:
        valid = valid & ~false_neg[keep][:, keep]
    pos = sim.diagonal()
    total = a.sum() * 0.0
    # a -> b: row i of sim, negatives valid[i, :]; b -> a: row j of sim.T, negatives valid[:, j]
    for s, ok_neg in ((sim, valid), (sim.T, valid.T)):
        neg = s.masked_fill(~ok_neg, float("-inf"))
        k = 1 if fraction is None else max(1, math.ceil(fraction * (n - 1)))
        hard, _ = neg.topk(k, dim=1)  # [n, k]
        finite = torch.isfinite(hard)
        viol = F.relu(margin - pos[:, None] + hard.masked_fill(~finite, 0.0)) * finite
        total = total + viol.sum() / finite.sum().clamp(min=1)
    return 0.5 * total


@dataclass
class LossConfig:
    """Loss hyper-parameters (our choices where METHOD.md is silent).

    hinge_margin: cosine margin of the CMAL / IMCL hinge terms.
    clal_top_k: in-batch neighbours per row for CLAL (METHOD.md §2: 10).
    clal_tolerance: |Δ cosine| allowed before CLAL penalises.
    imcl_hard_fraction: IMCL's hinge runs over the hardest half of the negatives (METHOD.md §2).
    cmal_pair_weights: relative weight of CMAL's five InfoNCE terms, in the order of
        ``CMAL_PAIRS`` ((Tq, Vi), (Vq, Ti), (Tq, Fi), (Vq, Fi), (Fq, Fi)); CMAL uses their
        weighted mean. Default: equal weights (the plain mean); our choice.
    """

    hinge_margin: float = 0.2
    clal_top_k: int = 10
    clal_tolerance: float = 0.05
    imcl_hard_fraction: float = 0.5
    cmal_pair_weights: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        w = tuple(float(x) for x in self.cmal_pair_weights)
        if len(w) != len(CMAL_PAIRS) or any(x < 0 or not math.isfinite(x) for x in w) or sum(w) <= 0:
            raise ValueError(f"cmal_pair_weights: {len(CMAL_PAIRS)} finite weights >= 0 with a positive sum "
                             f"for {CMAL_PAIRS}, got {self.cmal_pair_weights!r}")
        self.cmal_pair_weights = w


def cmal_loss(views: dict[str, torch.Tensor], scale: torch.Tensor, cfg: LossConfig,
              false_neg: torch.Tensor | None = None, ok: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """CMAL, cross-modal alignment loss (UniECS; METHOD.md §2).

    Symmetric InfoNCE over the cross-modal view pairs (Tq, Vi), (Vq, Ti), (Tq, Fi), (Vq, Fi),
    (Fq, Fi), averaged (weighted by ``cfg.cmal_pair_weights``; equal by default), plus a hinge
    ranking term (hardest negative, cosine margin) on the fused similarity matrix Fq Fiᵀ. ``views`` holds ``Fq Vq Tq Fi Vi Ti``; ``ok`` the
    matching row-validity masks (missing key = all rows valid). Returns a 0-d tensor.
    """
    ok = ok or {}
    terms = torch.stack([info_nce(views[x], views[y], scale, false_neg, ok.get(x), ok.get(y)) for x, y in CMAL_PAIRS])
    w = terms.new_tensor(cfg.cmal_pair_weights)
    nce = (w * terms).sum() / w.sum()
    hinge = hinge_hardest(views["Fq"], views["Fi"], cfg.hinge_margin, false_neg, ok.get("Fq"), ok.get("Fi"))
    return nce + hinge


def clal_loss(views: dict[str, torch.Tensor], cfg: LossConfig,
              false_neg: torch.Tensor | None = None, ok: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """CLAL, cohesive local alignment loss (UniECS; METHOD.md §2).

    For each query row, its local neighbourhood: ``k = cfg.clal_top_k`` in-batch items,
    chosen among the items that have the view being checked. Priority (our choice): the
    positive first, then the items marked relevant in ``false_neg`` (they belong to the
    neighbourhood by definition), then the nearest others under the fused similarity
    ``Fq Fiᵀ``. For those pairs the image-only similarity ``Vq Viᵀ`` and the text-only
    similarity ``Tq Tiᵀ`` must agree with the fused one: ``mean relu(|s_view - s_fused| - tol)²``.
    The fused similarity is the target (detached, our choice: the neighbourhood is defined by
    F, the unimodal views move to keep it). Rows lacking a view are left out; items lacking
    it are skipped *before* the top-k, so every row gets ``min(k, items with the view)``
    neighbours. Returns a 0-d tensor (mean of the view terms that have any pair).
    """
    ok = ok or {}
    fq, fi = views["Fq"], views["Fi"]
    b = fq.shape[0]
    sim_f = (fq @ fi.T).detach()  # [B, B], cosine in [-1, 1]
    priority = sim_f + 8.0 * torch.eye(b, device=fq.device)  # positive first
    if false_neg is not None:
        priority = priority + 4.0 * (false_neg & ~torch.eye(b, dtype=torch.bool, device=fq.device))
    total, count = fq.sum() * 0.0, 0
    for q, i in (("Vq", "Vi"), ("Tq", "Ti")):
        rows = _rows(ok.get(q), ok.get("Fq"), b, fq.device)
        cols = _rows(ok.get(i), ok.get("Fi"), b, fq.device)
        k = min(cfg.clal_top_k, int(cols.sum()))
        if k == 0 or not bool(rows.any()):
            continue
        idx = priority.masked_fill(~cols[None, :], float("-inf")).topk(k, dim=1).indices  # [B, k]
        target = sim_f.gather(1, idx)
        s_view = (views[q] @ views[i].T).gather(1, idx)  # [B, k]
        err = F.relu((s_view - target).abs() - cfg.clal_tolerance) ** 2
        total = total + err[rows].mean()
        count += 1
    return total / max(count, 1)


def imcl_loss(views: dict[str, torch.Tensor], scale: torch.Tensor, cfg: LossConfig,
              false_neg: torch.Tensor | None = None, ok: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """IMCL, intra-modal contrastive loss (UniECS; METHOD.md §2).

    Symmetric InfoNCE within one modality, (Vq, Vi) and (Tq, Ti), each plus a hinge over the
    hardest half of the in-batch negatives (``cfg.imcl_hard_fraction``). Returns a 0-d tensor.
    """
    ok = ok or {}
    terms = []
    for q, i in (("Vq", "Vi"), ("Tq", "Ti")):
        nce = info_nce(views[q], views[i], scale, false_neg, ok.get(q), ok.get(i))
        hinge = hinge_hardest(views[q], views[i], cfg.hinge_margin, false_neg, ok.get(q), ok.get(i),
                              fraction=cfg.imcl_hard_fraction)
        terms.append(nce + hinge)
    return torch.stack(terms).mean()


def stage1_losses(views: dict[str, torch.Tensor], scale: torch.Tensor,
                  false_neg: torch.Tensor | None = None, ok: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Stage-1 alignment (Beyond Text, two-stage alignment; METHOD.md §2): unimodal views only.

    ``align_text``: the query (its text and its image view) against the product text view,
    InfoNCE (Tq, Ti) + (Vq, Ti); ``align_image``: against the product image view, (Tq, Vi) +
    (Vq, Vi). Needs ``Tq Vq Ti Vi``. Returns ``{name: 0-d tensor}``.
    """
    ok = ok or {}
    out = {}
    for name, item in (("align_text", "Ti"), ("align_image", "Vi")):
        out[name] = 0.5 * (info_nce(views["Tq"], views[item], scale, false_neg, ok.get("Tq"), ok.get(item))
                           + info_nce(views["Vq"], views[item], scale, false_neg, ok.get("Vq"), ok.get(item)))
    return out


def stage2_losses(views: dict[str, torch.Tensor], scale: torch.Tensor, cfg: LossConfig,
                  false_neg: torch.Tensor | None = None, ok: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Stage-2 full loss (METHOD.md §2): ``{"cmal", "clal", "imcl": 0-d tensor}``."""
    return {
        "cmal": cmal_loss(views, scale, cfg, false_neg, ok),
        "clal": clal_loss(views, cfg, false_neg, ok),
        "imcl": imcl_loss(views, scale, cfg, false_neg, ok),
    }


# Range of each uncertainty log-variance s_k (our choice): weights exp(-s_k) in [e^-4, e^2] ≈
# [0.018, 7.39]. Kendall et al. leave s_k free; a term that is exactly 0 (e.g. CLAL with every
# view inside its tolerance) then drives its s_k down without end and its weight up without end.
LOG_VAR_RANGE: tuple[float, float] = (-2.0, 4.0)


class LossWeighting(nn.Module):
    """Combine named loss terms into one scalar, adaptively or with static weights.

    mode ``"uncertainty"`` (our choice for UniECS's unpublished "adaptive loss weighting";
    Kendall, Gal & Cipolla, CVPR 2018, homoscedastic uncertainty):
    ``L = Σ_k exp(-s_k) L_k + s_k``, one learnable ``s_k`` (init 0, i.e. weight 1) per term,
    bounded to ``log_var_range`` (default ``LOG_VAR_RANGE`` = [-2, 4], weights in
    [0.018, 7.39]; our choice): the forward pass reads ``s_k`` clamped, and ``clamp_()``
    (called by the trainer after each optimiser step) puts the bound on the parameter itself,
    so ``s_k`` never drifts beyond it and comes back as soon as its gradient turns.
    mode ``"static"``: ``L = Σ_k w_k L_k`` with fixed ``static_weights`` (default 1 each).
    Raises ValueError on an unknown mode, static weights for unknown terms or an empty range.
    """

    def __init__(self, names: tuple[str, ...] | list[str], mode: str = "uncertainty",
                 static_weights: dict[str, float] | None = None,
                 log_var_range: tuple[float, float] = LOG_VAR_RANGE) -> None:
        super().__init__()
        if mode not in ("uncertainty", "static"):
            raise ValueError(f"loss weighting mode must be 'uncertainty' or 'static', got {mode!r}")
        lo, hi = (float(x) for x in log_var_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi):
            raise ValueError(f"log_var_range must be finite and contain 0, got {log_var_range!r}")
        self.log_var_range = (lo, hi)
        self.names = tuple(names)
        self.mode = mode
        self.log_vars = nn.Parameter(torch.zeros(len(self.names)), requires_grad=(mode == "uncertainty"))
        weights = static_weights or {}
        unknown = set(weights) - set(self.names)
        if unknown:
            raise ValueError(f"static weights for unknown loss terms {sorted(unknown)}; terms are {list(self.names)}")
        self.register_buffer("static", torch.tensor([float(weights.get(n, 1.0)) for n in self.names]))

    def _bounded(self) -> torch.Tensor:
        return self.log_vars.clamp(*self.log_var_range)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Put ``log_var_range`` on the parameters ``s_k`` in place (after each optimiser step)."""
        self.log_vars.clamp_(*self.log_var_range)

    def weights(self) -> dict[str, float]:
        """Current weight of each term (``exp(-s_k)`` or the static weight), for logging."""
        w = torch.exp(-self._bounded().detach()) if self.mode == "uncertainty" else self.static
        return {n: float(v) for n, v in zip(self.names, w)}

    def forward(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """terms: ``{name: 0-d tensor}`` with every name of this weighting; returns a 0-d tensor."""
        missing = [n for n in self.names if n not in terms]
        if missing:
            raise KeyError(f"loss terms missing: {missing}")
        losses = torch.stack([terms[n] for n in self.names])
        if self.mode == "uncertainty":
            s = self._bounded()
            return (torch.exp(-s) * losses + s).sum()
        return (self.static * losses).sum()
