"""Time the Frechet distance: evaluation.metrics (symmetric eigenvalues) vs scipy.linalg.sqrtm.

Statistics come from synthetic 2048-d features shaped like Inception pool
features: non-negative (ReLU), correlated through a low-dimensional latent,
plus independent noise so that the covariances are full rank. The second set
is a shifted, rescaled version of the first, as generated images are.

    python benchmarks/bench_fid.py [--dim=2048] [--num=10000] [--repeats=3]

Prints both times (best of the repeats), the speed-up and the relative
difference of the two FIDs; the last line is a one-line JSON summary.
"""

import json
import os
import sys
import time

import click
import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluation import metrics  # noqa: E402


def synthetic_stats(rng, dim, num, shift, scale):
    """(mu [dim], sigma [dim, dim]) of `num` ReLU features of a 64-d latent plus noise."""
    mixing = rng.standard_normal((64, dim)) / 8
    bias = rng.uniform(-0.5, 0.5, size=dim)
    stats = []
    for latent_shift, latent_scale in [(0.0, 1.0), (shift, scale)]:
        latent = rng.standard_normal((num, 64)) * latent_scale + latent_shift
        features = np.maximum(latent @ mixing + bias, 0) + 0.05 * rng.standard_normal((num, dim))
        stats.append((features.mean(axis=0), np.cov(features, rowvar=False)))
    return stats


def scipy_frechet_distance(mu1, sigma1, mu2, sigma2):
    """The FID as EDM computes it: scipy.linalg.sqrtm of the product."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root)))


def best_time(fn, repeats):
    """(value of the last call, fastest wall time in seconds) over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return value, min(times)


@click.command()
@click.option('--dim', help='Feature dimension', type=click.IntRange(min=2), default=2048, show_default=True)
@click.option('--num', help='Samples per feature set', type=click.IntRange(min=3), default=10000, show_default=True)
@click.option('--repeats', help='Timed calls of each method', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--seed', help='Random seed', type=int, default=0, show_default=True)
def main(dim, num, repeats, seed):
    """Benchmark the Frechet distance against scipy.linalg.sqrtm."""
    rng = np.random.default_rng(seed)
    (mu1, sigma1), (mu2, sigma2) = synthetic_stats(rng, dim, num, shift=0.1, scale=1.1)
    ours, ours_s = best_time(lambda: metrics.frechet_distance(mu1, sigma1, mu2, sigma2), repeats)
    reference, scipy_s = best_time(lambda: scipy_frechet_distance(mu1, sigma1, mu2, sigma2), repeats)
    rel_diff = abs(ours - reference) / abs(reference)
    print(f'dim {dim}, {num} samples per set, best of {repeats}')
    print(f'evaluation.metrics: FID {ours:.10g} in {ours_s:.3f} s')
    print(f'scipy sqrtm:      FID {reference:.10g} in {scipy_s:.3f} s')
    print(f'speed-up {scipy_s / ours_s:.1f}x, relative difference {rel_diff:.2e}')
    print(json.dumps(dict(dim=dim, num=num, repeats=repeats, fid=ours, fid_scipy=reference, ours_s=ours_s,
                          scipy_s=scipy_s, speedup=scipy_s / ours_s, rel_diff=rel_diff)))


if __name__ == '__main__':
    main()
