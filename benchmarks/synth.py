"""Seeded synthetic embeddings with low intrinsic dimension, shared by the benchmarks.

Construction ("clustered low-rank"): ``n_clusters`` centres drawn in an ``intrinsic``-dim latent
space; each point = centre + N(0, spread^2) in that latent space, mapped to ``dim`` by a fixed
random Gaussian matrix, plus isotropic N(0, noise^2/dim) ambient noise, then L2-normalised.
Real image/text embeddings behave like this (clusters of near-duplicates on a low-dimensional
manifold); isotropic Gaussians in 384-d are a worst case no ANN index handles (HNSW recall
0.02 at 1M, see issue 7). Queries are fresh points from the same distribution.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class Synth:
    def __init__(self, dim: int, *, intrinsic: int = 32, n_clusters: int = 100, spread: float = 1.0,
                 noise: float = 0.3, seed: int = 0) -> None:  # fmt: skip
        rng = np.random.default_rng(seed)
        self.dim, self.intrinsic, self.noise, self.spread = dim, intrinsic, noise, spread
        self.centres = rng.standard_normal((n_clusters, intrinsic)).astype(np.float32)
        self.proj = (rng.standard_normal((intrinsic, dim)) / np.sqrt(intrinsic)).astype(np.float32)
        self.seed = seed

    def sample(self, n: int, seed: int) -> np.ndarray:
        """(n, dim) float32 unit rows, deterministic in (self.seed, seed)."""
        rng = np.random.default_rng([self.seed, seed])
        c = rng.integers(0, len(self.centres), n)
        z = self.centres[c] + self.spread * rng.standard_normal((n, self.intrinsic), dtype=np.float32)
        x = z @ self.proj + (self.noise / np.sqrt(self.dim)) * rng.standard_normal((n, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32, copy=False)

    def blocks(self, n: int, block: int = 65536, *, as_float16: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vecs) blocks of the database, ids 1..n; float16-rounded like catalog-stored vectors."""
        for b, start in enumerate(range(0, n, block)):
            m = min(block, n - start)
            x = self.sample(m, seed=10_000 + b)
            if as_float16:
                x = x.astype(np.float16).astype(np.float32)
            yield np.arange(start + 1, start + m + 1, dtype=np.int64), x

    def matrix(self, n: int, block: int = 65536) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        for ids, x in self.blocks(n, block):
            out[ids[0] - 1 : ids[-1]] = x
        return out

    def queries(self, n: int) -> np.ndarray:
        return self.sample(n, seed=999_999)
