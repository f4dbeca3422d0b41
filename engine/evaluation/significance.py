"""Paired comparisons of two rows of the evaluation: is a gap between them larger than chance?

Two rows scored on the same queries (``engine.evaluation.evaluate.score_per_query``) give one
value per query each (recall@1 of that query's target, its nDCG@10, ...). What we report per
(scenario, metric):

- the two means and their difference ``a - b`` (in the metric's own unit, a share in [0, 1]);
- a 95 % paired bootstrap confidence interval of the difference (resampling queries, percentile
  method; Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13; ``scipy.stats.bootstrap``);
- the **sign test** on the queries where the rows differ (``wins``: ``a`` better, ``losses``: ``b``
  better), two-sided exact binomial p-value at 0.5 (``scipy.stats.binomtest``); for a 0 / 1 metric
  such as recall@1 without ties this is McNemar's exact test.

Why (our choice, issue 12's "fused ≥ average on every m scenario" and "above the linear
two-tower"): on 2,000 instance queries one query is 0.05 points of recall@1, and a gap of that
size says nothing about which fusion is better; the interval and the counts say how many queries
a gap rests on. Source for the practice: Smucker, Allan & Carterette, "A comparison of statistical
significance tests for information retrieval evaluation", CIKM 2007 (paired tests over topics).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# (label of row a, label of row b, scenarios): the comparisons ``ecsearch eval`` prints
FUSED, AVERAGE = "trained (fused)", "trained, m = average of T and V"
# the fused row with photo-only queries ranked in two stages, as the server ranks them
# (engine.retrieval.instance_first); it differs from FUSED on i2t, i2i and i2m only
SERVED = "trained (fused), photo queries in two stages (served)"
M_SCENARIOS = ("t2m", "i2m", "m2t", "m2i", "m2m")
CROSS_MODAL_SCENARIOS = ("t2i", "t2m", "i2t", "i2m", "m2t", "m2i")
PHOTO_QUERY_SCENARIOS = ("i2t", "i2i", "i2m")
COMPARED_METRICS = ("recall@1", "ndcg@10")


@dataclass(frozen=True)
class PairedComparison:
    """One paired comparison of rows ``a`` and ``b`` on one metric (values are shares in [0, 1]).

    Attributes:
        queries: queries both rows were scored on. mean_a, mean_b: the rows' means.
        diff: ``mean_a - mean_b``. ci_low, ci_high: 95 % paired bootstrap interval of ``diff``.
        wins, losses: queries where ``a`` scored higher / lower than ``b``.
        p_sign: two-sided exact sign-test p-value over ``wins + losses`` (1.0 when no query differs).
    """

    queries: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int
    p_sign: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_comparison(a: np.ndarray, b: np.ndarray, *, confidence: float = 0.95, n_resamples: int = 10_000,
                      seed: int = 0) -> PairedComparison:
    """Compare per-query values ``a`` and ``b`` (``float (n,)`` each, the same queries in the same order).

    Deterministic for a given ``seed``. Raises ValueError when the shapes differ, a value is not
    finite, there is no query, or ``confidence`` is not in (0, 1).
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired values need two 1-d arrays of one length, got shapes {a.shape} and {b.shape}")
    if a.size == 0:
        raise ValueError("paired comparison needs at least one query")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired values must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = a - b
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    p_sign = float(stats.binomtest(wins, wins + losses, 0.5).pvalue) if wins + losses else 1.0
    if np.all(d == d[0]):  # no spread to resample: the interval is the point
        low = high = float(d[0])
    else:
        res = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                              method="percentile", rng=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return PairedComparison(queries=int(a.size), mean_a=float(a.mean()), mean_b=float(b.mean()),
                            diff=float(d.mean()), ci_low=low, ci_high=high, wins=wins, losses=losses,
                            p_sign=p_sign)


def compare_rows(per_query: dict[str, dict[str, dict[str, np.ndarray]]], a: str, b: str,
                 scenarios: tuple[str, ...], metrics: tuple[str, ...] = COMPARED_METRICS,
                 seed: int = 0) -> dict[str, dict[str, dict]]:
    """``{scenario: {metric: PairedComparison.to_dict()}}`` of row ``a`` against row ``b``.

    per_query: ``{row label: {scenario: {metric: float64 (n,)}}}`` (``score_per_query`` per row).
    A scenario or metric missing from either row is left out. Raises KeyError for an unknown row.
    """
    out: dict[str, dict[str, dict]] = {}
    for s in scenarios:
        for m in metrics:
            if m in per_query[a].get(s, {}) and m in per_query[b].get(s, {}):
                out.setdefault(s, {})[m] = paired_comparison(per_query[a][s][m], per_query[b][s][m],
                                                             seed=seed).to_dict()
    return out


def comparisons_markdown(comparisons: dict[str, dict[str, dict[str, dict]]]) -> str:
    """Markdown table per comparison (``{title: compare_rows(...)}``); differences in points (%)."""
    parts = []
    for title, table in comparisons.items():
        parts.append(f"**Paired comparison: {title}** (difference in points, 95 % bootstrap interval; "
                     "queries where the first row wins / loses; sign-test p)\n")
        parts.append("| scenario | metric | first | second | difference | 95 % interval | wins / losses | p |")
        parts.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for s, metrics in table.items():
            for m, c in metrics.items():
                parts.append(f"| {s} | {m} | {100 * c['mean_a']:.2f} | {100 * c['mean_b']:.2f} | "
                             f"{100 * c['diff']:+.2f} | [{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] | "
                             f"{c['wins']} / {c['losses']} | {c['p_sign']:.3g} |")
        parts.append("")
    return "\n".join(parts)


__all__ = ["PairedComparison", "paired_comparison", "compare_rows", "comparisons_markdown", "FUSED", "AVERAGE",
           "SERVED", "PHOTO_QUERY_SCENARIOS", "M_SCENARIOS", "CROSS_MODAL_SCENARIOS", "COMPARED_METRICS"]
