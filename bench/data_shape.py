"""How hard a vector set is for approximate search: the scale benchmark's synthetic data against real item vectors.

Usage: python bench/data_shape.py [--index ROOT_OR_VERSION] [--n 20000] [--clusters 20 2] [--sigma 1.0]

Per vector set (unit vectors, d = 256): ``pca90`` / ``pca99`` (principal components holding 90 /
99 % of the variance), the local intrinsic dimension (LID, maximum-likelihood estimate over the
k = 20 nearest neighbours, Levina & Bickel, NIPS 2004; averaged over 500 points) and the relative
contrast at 10 (mean distance / distance to the 10th neighbour, He, Kumar & Chang, ICML 2012:
near 1 means every point is about as far as the 10th neighbour, hard for quantised search).
Sets: the synthetic generator of ``bench/bench_scale.py`` (``--clusters`` centres, Gaussian
noise ``--sigma``; ``--n`` points, n / clusters per cluster: the default 20,000 points in 20 / 2
clusters have the per-cluster density of the 1M / 10M sets with 1,000 clusters), and the item vectors of an
index version (``--index``, the fashion catalogue encoded by the trained model). Source: our choice.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_scale import draw_chunk  # noqa: E402


def shape(x: np.ndarray, probes: int = 500, k: int = 20, seed: int = 0) -> dict[str, float]:
    """pca90, pca99, lid (MLE over k neighbours) and relative contrast at 10 of unit vectors x (n, d)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    var = np.linalg.svd(x - x.mean(axis=0), compute_uv=False) ** 2
    cum = np.cumsum(var) / var.sum()
    rng = np.random.default_rng(seed)
    probe = rng.choice(x.shape[0], size=min(probes, x.shape[0]), replace=False)
    dist = np.sqrt(np.maximum(2.0 - 2.0 * (x[probe] @ x.T), 0.0))
    dist[np.arange(probe.size), probe] = np.inf  # not its own neighbour
    dist[dist < 1e-6] = np.inf  # nor an exact duplicate (a catalogue's repeated products)
    near = np.sort(np.partition(dist, k, axis=1)[:, :k], axis=1)
    lid = -1.0 / np.mean(np.log(near[:, :-1] / near[:, -1:]), axis=1)
    finite = np.where(np.isinf(dist), np.nan, dist)
    contrast = np.nanmean(finite, axis=1) / near[:, 9]
    return {"pca90": int(np.searchsorted(cum, 0.90) + 1), "pca99": int(np.searchsorted(cum, 0.99) + 1),
            "lid": round(float(np.mean(lid)), 1), "relative_contrast_10": round(float(np.mean(contrast)), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="index root or version folder (its vectors.f16.npy)")
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, nargs="+", default=[20, 2])
    parser.add_argument("--sigma", type=float, default=1.0)
    args = parser.parse_args()
    for clusters in args.clusters:
        centres = np.random.default_rng(0).standard_normal((clusters, args.dim)).astype(np.float32)
        print(f"synthetic clusters={clusters} sigma={args.sigma} n={args.n}: "
              f"{shape(draw_chunk(centres, args.sigma, args.n, 1))}", flush=True)
    if args.index:
        folder = args.index
        if (folder / "CURRENT").is_file():
            folder = folder / "versions" / (folder / "CURRENT").read_text().strip()
        vectors = np.load(folder / "vectors.f16.npy").astype(np.float32)
        print(f"{folder} (n={vectors.shape[0]}): {shape(vectors)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
