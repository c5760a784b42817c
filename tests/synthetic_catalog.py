"""A real catalog of synthetic cases/images with clustered stored vectors, for the store tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsearch.catalog import Catalog
from medsearch.records import CaseRecord, ImageRecord

MODS = ("CT", "MR", "XR", "US")
REGIONS = ("Head", "Thorax", "Abdomen")


def clustered(n: int, d: int, seed: int = 0, n_clusters: int = 40, sample: int = 0) -> np.ndarray:
    """(n, d) unit vectors around ``n_clusters`` centres in a 16-d latent space, like real embeddings.

    ``seed`` fixes the distribution (centres, projection), ``sample`` the points drawn from it:
    another ``sample`` gives fresh queries from the same distribution."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, 16)).astype(np.float32)
    proj = rng.standard_normal((16, d)).astype(np.float32) / 4
    rng = np.random.default_rng([seed, sample])
    z = centres[rng.integers(0, n_clusters, n)] + 0.6 * rng.standard_normal((n, 16)).astype(np.float32)
    x = z @ proj + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float16).astype(np.float32)  # as the catalog stores them


def make_catalog(path: Path | None, n_cases: int, *, per_case: int = 3, d: int = 32, seed: int = 0,
                 model: str = "m", texts: bool = False) -> tuple[Catalog, np.ndarray, np.ndarray]:  # fmt: skip
    """Catalog with ``n_cases`` cases of ``per_case`` images (modality, region, split, plane vary;
    patient p<i//2>), image vectors stored for ``model``. Returns (catalog, image ids, vectors)."""
    cat = Catalog.open(path)
    ids = []
    for c in range(n_cases):
        sections = {"findings": f"finding number {c} in case {c}."} if texts else {}
        cid, _ = cat.upsert_case(CaseRecord(source="syn" if c % 5 else "other", key=f"case{c:05d}", split="dev" if c % 4 == 0 else "train",
                                            patient_key=f"patient{c // 2:05d}", sections=sections),
                                 sentences=[("findings", 0, sections["findings"])] if texts else ())  # fmt: skip
        for j in range(per_case):
            iid, _ = cat.upsert_image(
                ImageRecord(source="syn" if c % 5 else "other", key=f"case{c:05d}_{j}", case_key=f"case{c:05d}",
                            path=f"/data/{c}_{j}.png", modality_type=MODS[(c + j) % len(MODS)],
                            body_region=REGIONS[c % len(REGIONS)], plane="Axial" if j % 2 else "Coronal",
                            split="dev" if c % 4 == 0 else "train"),
                cid, sha256=f"{c}-{j}", nbytes=1, width=8, height=8,
            )  # fmt: skip
            ids.append(iid)
    ids_a = np.array(ids, dtype=np.int64)
    x = clustered(len(ids_a), d, seed=seed)
    for s in range(0, len(ids_a), 4096):
        cat.put_vectors(model, "image", ids_a[s : s + 4096].tolist(), x[s : s + 4096])
    if texts:
        tids = [i for i, _ in cat.texts_to_embed(model)]
        cat.put_vectors(model, "text", tids, clustered(len(tids), d, seed=seed + 1))
    return cat, ids_a, x
