"""Charts of measured results as PNG files (matplotlib, headless Agg backend).

- ``recall_latency_chart``: ANN recall@k against single-query latency over nprobe, one line per
  refine setting (``bench/bench_index.py --plot``);
- ``latency_percentile_chart``: gRPC latency p50 / p95 / p99 per query kind and concurrency
  (``bench/bench_grpc.py --plot``);
- ``scenario_chart``: one metric over the nine retrieval scenarios, the trained model against
  the baselines (``ecsearch eval --plot``).

Every chart plots only the numbers it is given; nothing is smoothed or interpolated.
Source: our choice (issue 17).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Mapping, Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, note: str | None) -> Path:
    if note:  # below the axes' labels; bbox_inches="tight" grows the canvas to hold it
        fig.text(0.01, -0.02, textwrap.fill(note, 150), fontsize=7, color="#555555", ha="left", va="top")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def recall_latency_chart(rows: Sequence[Mapping[str, Any]], k: int, path: str | Path, title: str,
                         note: str | None = None) -> Path:
    """Recall@k (y) against median single-query latency in ms (x, log scale; the median, as a
    shared host's stalls swing the mean), one line per refine setting, each point labelled
    with its nprobe.

    Args:
        rows: ``bench_index.measure`` rows: ``nprobe_used``, ``refine``, ``k_factor``,
            ``recall_at_{k}``, ``latency_ms_p50``.
        note: small print under the chart (machine, data).
    Raises:
        ValueError: no rows, or a row without ``recall_at_{k}``.
    """
    if not rows or any(f"recall_at_{k}" not in r for r in rows):
        raise ValueError(f"recall_latency_chart needs rows with recall_at_{k}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    settings = sorted({(bool(r["refine"]), r.get("k_factor")) for r in rows}, key=lambda s: (s[0], s[1] or 0))
    for refine, k_factor in settings:
        line = sorted((r for r in rows if (bool(r["refine"]), r.get("k_factor")) == (refine, k_factor)),
                      key=lambda r: r["nprobe_used"])
        x, y = [r["latency_ms_p50"] for r in line], [r[f"recall_at_{k}"] for r in line]
        ax.plot(x, y, marker="o", label=f"refine (k x {k_factor})" if refine else "no refine")
        for r, xi, yi in zip(line, x, y):
            ax.annotate(f"nprobe {r['nprobe_used']}", (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median single-query latency (ms, log scale)")
    ax.set_ylabel(f"recall@{k} against exact search")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path, note)


def latency_percentile_chart(results: Sequence[Mapping[str, Any]], path: str | Path, title: str,
                             note: str | None = None) -> Path:
    """One panel per query kind: p50 / p95 / p99 latency (ms) bars at each concurrency.

    Args:
        results: ``bench_grpc`` rows: ``kind``, ``concurrency``, ``p50_ms``, ``p95_ms``, ``p99_ms``.
    Raises:
        ValueError: no results.
    """
    if not results:
        raise ValueError("latency_percentile_chart needs at least one result")
    plt = _pyplot()
    kinds = list(dict.fromkeys(r["kind"] for r in results))
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.2 * len(kinds) + 0.8, 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = sorted((r for r in results if r["kind"] == kind), key=lambda r: r["concurrency"])
        for i, (pct, colour) in enumerate((("p50", "#4c72b0"), ("p95", "#dd8452"), ("p99", "#c44e52"))):
            xs = [j + (i - 1) * 0.27 for j in range(len(rows))]
            ax.bar(xs, [r[f"{pct}_ms"] for r in rows], width=0.27, color=colour, label=pct)
        ax.set_xticks(range(len(rows)), [str(r["concurrency"]) for r in rows])
        ax.set_xlabel("concurrency")
        ax.set_title(kind, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].set_ylabel("latency (ms, client side)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path, note)


def scenario_chart(rows: Mapping[str, Mapping[str, Mapping[str, float]]], metric: str, path: str | Path,
                   title: str, note: str | None = None) -> Path:
    """Grouped bars: ``metric`` (in %) per scenario, one bar per model row; a scenario a row
    does not cover has no bar.

    Args:
        rows: ``{label: {scenario: {metric: value in [0, 1]}}}`` (``ecsearch eval``'s rows).
    Raises:
        ValueError: no row has ``metric``.
    """
    scenarios = list(dict.fromkeys(s for r in rows.values() for s, m in r.items() if metric in m))
    if not scenarios:
        raise ValueError(f"no row has the metric {metric!r}")
    labels = [label for label, r in rows.items() if any(metric in m for m in r.values())]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(scenarios) + 2), 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        points = [(j, 100 * rows[label][s][metric]) for j, s in enumerate(scenarios) if metric in rows[label].get(s, {})]
        ax.bar([j - 0.4 + (i + 0.5) * width for j, _ in points], [v for _, v in points], width=width, label=label)
    ax.set_xticks(range(len(scenarios)), scenarios)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    return _save(fig, path, note)
