"""engine.training.losses on plain embedding tensors: finite values, gradient direction, weighting."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engine.training.losses import (
    CMAL_PAIRS, LossConfig, LossWeighting, clal_loss, cmal_loss,
    hinge_hardest, imcl_loss, info_nce, stage1_losses, stage2_losses,
)

B, D = 12, 16


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _views(seed: int = 0, noise: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, D, generator=g)
    return {name: _unit(base + noise * torch.randn(B, D, generator=g)).requires_grad_(True)
            for name in ("Fq", "Vq", "Tq", "Fi", "Vi", "Ti")}


SCALE = torch.tensor(10.0)


def test_info_nce_matches_hand_computed_value():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = 10 * I: each row's loss = -log(e^10 / (e^10 + e^0))
    expected = -math.log(math.exp(10) / (math.exp(10) + 1.0))
    assert info_nce(a, b, SCALE).item() == pytest.approx(expected, rel=1e-3)  # float32


def test_false_negatives_are_left_out_of_the_softmax():
    a = _unit(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    b = _unit(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    plain = info_nce(a, b, SCALE)
    masked = info_nce(a, b, SCALE, false_neg=torch.tensor([[False, True], [True, False]]))
    assert plain.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert masked.item() == pytest.approx(0.0, abs=1e-6)


def test_every_loss_is_finite_including_missing_views():
    views = _views()
    cfg = LossConfig()
    ok = {"Vq": torch.tensor([True, False] * (B // 2)), "Fq": torch.ones(B, dtype=torch.bool)}
    false_neg = torch.zeros(B, B, dtype=torch.bool)
    false_neg[0, 1] = True
    for terms in (stage2_losses(views, SCALE, cfg), stage2_losses(views, SCALE, cfg, false_neg, ok),
                  stage1_losses(views, SCALE), stage1_losses(views, SCALE, false_neg, ok)):
        for name, value in terms.items():
            assert value.dim() == 0 and torch.isfinite(value), name
    # a view present in fewer than two rows contributes 0, still finite
    lonely = {"Vq": torch.zeros(B, dtype=torch.bool)}
    assert torch.isfinite(cmal_loss(views, SCALE, cfg, ok=lonely))
    assert info_nce(views["Vq"], views["Vi"], SCALE, a_ok=lonely["Vq"]).item() == 0.0


@pytest.mark.parametrize("name", ["cmal", "imcl", "clal", "align_text", "align_image"])
def test_loss_falls_when_positives_move_closer(name):
    """One small gradient step on the embeddings lowers the loss, and moving every positive
    pair closer (item views toward their query rows) lowers it too."""
    views = _views(seed=1, noise=1.0)
    cfg = LossConfig(clal_tolerance=0.0)

    def loss_of(v):
        terms = {**stage2_losses(v, SCALE, cfg), **stage1_losses(v, SCALE)}
        return terms[name]

    before = loss_of(views)
    before.backward()
    stepped = {k: _unit(v.detach() - 0.05 * (v.grad if v.grad is not None else 0.0)) for k, v in views.items()}
    assert loss_of(stepped).item() < before.item()
    if name != "clal":  # CLAL asks views to agree with F, not positives to be close
        closer = {k: v.detach() for k, v in views.items()}
        for item_view in ("Fi", "Vi", "Ti"):
            closer[item_view] = _unit(0.5 * closer[item_view] + 0.5 * closer["Fq"])
        for query_view in ("Vq", "Tq"):
            closer[query_view] = _unit(0.5 * closer[query_view] + 0.5 * closer["Fq"])
        assert loss_of(closer).item() < before.item()


def test_clal_is_zero_when_views_agree_with_fused():
    views = _views(seed=2)
    same = {k: views["Fq" if k.endswith("q") else "Fi"].detach() for k in views}
    assert clal_loss(same, LossConfig()).item() == pytest.approx(0.0, abs=1e-7)
    assert clal_loss(views, LossConfig()).item() > 0.0


def test_hinge_uses_cosine_margin():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = _unit(torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    # rows: s00=1, s01=.707; s10=0, s11=.707. hardest negative per row/column, margin 0.2
    # a->b: row0 relu(.2-1+.707)=0, row1 relu(.2-.707+0)=0 ; b->a: col0 relu(.2-1+0)=0,
    # col1: relu(.2-.707+.707)=.2 -> mean over both directions: 0.5*(0 + 0.1) = 0.05
    assert hinge_hardest(a, b, 0.2).item() == pytest.approx(0.05, abs=1e-6)


def test_uncertainty_weights_move_and_static_weights_do_not():
    adaptive = LossWeighting(("cmal", "clal", "imcl"), mode="uncertainty")
    static = LossWeighting(("cmal", "clal", "imcl"), mode="static", static_weights={"clal": 2.0})
    assert static.weights() == {"cmal": 1.0, "clal": 2.0, "imcl": 1.0}
    opt = torch.optim.AdamW(adaptive.parameters(), lr=0.1)
    terms = {"cmal": torch.tensor(3.0), "clal": torch.tensor(0.01), "imcl": torch.tensor(1.0)}
    start = adaptive.weights()
    for _ in range(5):
        opt.zero_grad()
        adaptive(terms).backward()
        opt.step()
    end = adaptive.weights()
    assert end["cmal"] < start["cmal"]   # large loss -> larger s_k -> smaller weight
    assert end["clal"] > start["clal"]   # tiny loss -> weight grows
    total = static(terms)
    assert total.item() == pytest.approx(3.0 + 0.02 + 1.0)
    with pytest.raises(ValueError, match="unknown loss terms"):
        LossWeighting(("cmal",), mode="static", static_weights={"nope": 1.0})
    with pytest.raises(KeyError, match="missing"):
        adaptive({"cmal": torch.tensor(1.0)})


def test_cmal_pair_weights_weight_the_view_pairs():
    """Equal weights give the plain mean; weight on one pair only gives that pair's InfoNCE
    (plus the fused hinge); bad weights are refused."""
    views = _views(seed=4)
    cfg = LossConfig()
    hinge = hinge_hardest(views["Fq"], views["Fi"], cfg.hinge_margin)
    pairs = [info_nce(views[x], views[y], SCALE) for x, y in CMAL_PAIRS]
    assert cmal_loss(views, SCALE, cfg).item() == pytest.approx((sum(pairs) / 5 + hinge).item(), rel=1e-6)
    only_vq_fi = LossConfig(cmal_pair_weights=(0, 0, 0, 2.0, 0))
    assert CMAL_PAIRS[3] == ("Vq", "Fi")
    assert cmal_loss(views, SCALE, only_vq_fi).item() == pytest.approx((pairs[3] + hinge).item(), rel=1e-6)
    for bad in ((1.0, 1.0), (1, 1, 1, 1, -1), (0, 0, 0, 0, 0), (1, 1, 1, 1, float("nan"))):
        with pytest.raises(ValueError, match="cmal_pair_weights"):
            LossConfig(cmal_pair_weights=bad)


def _hinge_reference(a, b, margin, false_neg):
    """Brute-force VSE++ hinge, both directions: query i never takes an item it finds relevant
    (``false_neg[i, j]``) as a negative, and item j never takes a query that finds it relevant."""
    n = a.shape[0]
    sim = (a @ b.T).tolist()
    total = 0.0
    for direction in ("q->i", "i->q"):
        viols = []
        for r in range(n):
            if direction == "q->i":
                negs = [sim[r][c] for c in range(n) if c != r and not false_neg[r][c]]
            else:
                negs = [sim[c][r] for c in range(n) if c != r and not false_neg[c][r]]
            if negs:
                viols.append(max(0.0, margin - sim[r][r] + max(negs)))
        total += sum(viols) / max(len(viols), 1)
    return 0.5 * total


def test_hinge_masks_each_direction_with_its_own_false_negatives():
    """With an asymmetric false-negative matrix (item 1 relevant to query 0, not the reverse),
    the item -> query direction must not take query 0 as item 1's hardest negative."""
    g = torch.Generator().manual_seed(7)
    a = _unit(torch.randn(5, 8, generator=g))
    b = _unit(a + 0.8 * torch.randn(5, 8, generator=g))
    b[1] = _unit(a[0] + 0.05 * torch.randn(8, generator=g))  # item 1 looks just like query 0
    false_neg = torch.zeros(5, 5, dtype=torch.bool)
    false_neg[0, 1] = True
    false_neg[3, 2] = True
    got = hinge_hardest(a, b, 0.2, false_neg)
    assert got.item() == pytest.approx(_hinge_reference(a, b, 0.2, false_neg.tolist()), abs=1e-6)
    # swapping the sides swaps the directions: the same loss
    assert hinge_hardest(b, a, 0.2, false_neg.T).item() == pytest.approx(got.item(), abs=1e-6)
    for fraction in (0.5, 1.0):
        assert hinge_hardest(b, a, 0.2, false_neg.T, fraction=fraction).item() == pytest.approx(
            hinge_hardest(a, b, 0.2, false_neg, fraction=fraction).item(), abs=1e-6)


def _clal_reference(views, k, tol, false_neg, ok):
    """Brute-force CLAL: per row, among the items that have the view, the positive, then the
    relevant items, then the nearest by fused cosine; k of them; mean squared excess error."""
    n = views["Fq"].shape[0]
    sim_f = (views["Fq"] @ views["Fi"].T).tolist()
    terms = []
    for q, i in (("Vq", "Vi"), ("Tq", "Ti")):
        s_view = (views[q] @ views[i].T).tolist()
        cols = [c for c in range(n) if ok[i][c]]
        errs = []
        for r in (r for r in range(n) if ok[q][r]):
            ranked = sorted(cols, key=lambda c: (c != r, not false_neg[r][c], -sim_f[r][c]))
            for c in ranked[:k]:
                errs.append(max(0.0, abs(s_view[r][c] - sim_f[r][c]) - tol) ** 2)
        if errs:
            terms.append(sum(errs) / len(errs))
    return sum(terms) / max(len(terms), 1)


def test_clal_takes_k_neighbours_among_items_with_the_view_and_uses_false_negatives():
    views = {k: v.detach() for k, v in _views(seed=5, noise=0.6).items()}
    cfg = LossConfig(clal_top_k=3, clal_tolerance=0.02)
    ok = {name: torch.ones(B, dtype=torch.bool) for name in views}
    ok["Vi"][[1, 2, 4, 7]] = False  # items without a photo
    ok["Vq"][[3]] = False
    ok["Ti"][[0, 5]] = False
    false_neg = torch.zeros(B, B, dtype=torch.bool)
    false_neg[0, 9] = True
    false_neg[6, 11] = True
    fn = false_neg.tolist()
    want = _clal_reference(views, 3, 0.02, fn, {k: v.tolist() for k, v in ok.items()})
    assert clal_loss(views, cfg, false_neg, ok).item() == pytest.approx(want, rel=1e-5)
    # the relevant items change the neighbourhood, hence the loss
    none = [[False] * B for _ in range(B)]
    assert clal_loss(views, cfg, None, ok).item() == pytest.approx(
        _clal_reference(views, 3, 0.02, none, {k: v.tolist() for k, v in ok.items()}), rel=1e-5)
    assert clal_loss(views, cfg, false_neg, ok).item() != pytest.approx(clal_loss(views, cfg, None, ok).item(), rel=1e-4)


def test_uncertainty_weights_stay_bounded_when_a_term_is_exactly_zero():
    """A term that is exactly 0 pulls its s_k down at every step; the weight stops at the bound."""
    adaptive = LossWeighting(("cmal", "clal", "imcl"), mode="uncertainty")
    opt = torch.optim.AdamW(adaptive.parameters(), lr=0.1, weight_decay=0.0)
    terms = {"cmal": torch.tensor(1.0), "clal": torch.tensor(0.0), "imcl": torch.tensor(1e6)}
    for _ in range(300):
        opt.zero_grad()
        adaptive(terms).backward()
        opt.step()
    # unbounded, s_clal would reach about -30 here (weight e^30); the read clamp holds it
    assert adaptive.weights()["clal"] < 100.0
    adaptive.clamp_()
    lo, hi = adaptive.log_var_range
    assert lo <= adaptive.log_vars.min().item() and adaptive.log_vars.max().item() <= hi
    assert adaptive.weights()["clal"] == pytest.approx(math.exp(-lo), rel=1e-5)
    assert adaptive.weights()["imcl"] == pytest.approx(math.exp(-hi), rel=1e-5)
    assert adaptive.weights()["cmal"] == pytest.approx(1.0, abs=0.05)  # s = log L = 0 for L = 1
    # the bound at the forward pass holds even before clamp_ is called
    with torch.no_grad():
        adaptive.log_vars.fill_(-50.0)
    assert adaptive(terms).item() == pytest.approx(math.exp(-lo) * 1.0 + 3 * lo + math.exp(-lo) * 1e6, rel=1e-5)
    with pytest.raises(ValueError, match="log_var_range"):
        LossWeighting(("cmal",), log_var_range=(1.0, 2.0))
