"""What both trainers share: the held-out set for selection, its scores, seeding, the LR schedule.

A held-out set is a cv fold of the training split (``select="cv"``, train.select) or a validation
split (``select="dev"``). Its ``score`` = mean of caption->image R@10 and same-case R@10 (pool: the
held-out images) and of the modality and body-region accuracy of a kNN vote (10 nearest held-out
images of other cases), the four numbers the retrieval targets name; selection keeps the step (and
grid point) with the best score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsearch.catalog import Catalog
from medsearch.metrics import knn_vote, ranked_relevance, recall_at_k
from medsearch.train.config import TrainConfig
from medsearch.train.pairs import PairData, catalog_splits


@dataclass
class DevSet:
    """Dev images (centre features) and their captions/findings, for early stopping."""

    pairs: PairData
    image_feats: np.ndarray  # (n_img, d_feat) centre view (or cached activations)
    text_feats: np.ndarray  # (n_txt, 384)

    def caption_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """(query text idx, query image idx) of caption pairs."""
        p = self.pairs
        m = np.array([k == "caption" for k in p.pair_kind])
        return p.pair_text[m], p.pair_image[m]


def dev_scores(dev: DevSet, img_emb: np.ndarray, txt_emb: np.ndarray) -> dict[str, float]:
    """Held-out caption->image R@10 (duplicates count), same-case R@10, image->caption R@10, kNN votes, score."""
    p = dev.pairs
    qt, qi = dev.caption_queries()
    out: dict[str, float] = {}
    if len(qt):
        s = txt_emb[qt] @ img_emb.T  # (nq, n_img)
        img_text = _image_caption_index(p)
        rel_img = img_text[None, :] == qt[:, None]
        rel_case = p.image_case[None, :] == p.image_case[qi][:, None]
        out["caption_image_r10"] = float(recall_at_k(ranked_relevance(s, rel_img)[0], 10).mean())
        out["caption_case_r10"] = float(recall_at_k(ranked_relevance(s, rel_case)[0], 10).mean())
        caps = np.unique(qt)
        s2 = img_emb[qi] @ txt_emb[caps].T  # (nq, n_caps)
        out["image_caption_r10"] = float(recall_at_k(ranked_relevance(s2, caps[None, :] == qt[:, None])[0], 10).mean())
    sims = img_emb @ img_emb.T  # (n_img, n_img): image->image neighbours from other cases
    other = p.image_case[None, :] == p.image_case[:, None]
    for fld, key in VOTES:
        vals = np.array(p.image_labels.get(fld) or [None] * len(p.image_ids), dtype=object)
        ok = np.array([v is not None for v in vals])
        if ok.sum() and len(set(vals[ok].tolist())) > 1:
            pred = knn_vote(sims[ok], vals, 10, other[ok])
            out[key] = float((pred == vals[ok]).mean())
    keys = [k for k in ("caption_image_r10", "caption_case_r10", *(k for _, k in VOTES)) if k in out]
    out["score"] = float(np.mean([out[k] for k in keys])) if keys else 0.0
    return out


VOTES = (("modality_type", "modality_vote"), ("body_region", "region_vote"))


def _image_caption_index(p: PairData) -> np.ndarray:
    """(n_img,) text index of each image's caption (-1 when it has none)."""
    out = np.full(len(p.image_ids), -1, dtype=np.int64)
    for i, t, k in zip(p.pair_image, p.pair_text, p.pair_kind, strict=True):
        if k == "caption":
            out[i] = t
    return out


def resolve_dev_split(catalog: Catalog, cfg: TrainConfig) -> str | None:
    """The split for early stopping: ``auto`` = "dev" when the catalog has one (and it is not the training split)."""
    if cfg.dev_split in (None, "", "none"):
        return None
    if cfg.dev_split == "auto":
        return "dev" if "dev" in catalog_splits(catalog) and cfg.split != "dev" else None
    return cfg.dev_split


def seed_all(seed: int) -> None:
    """Seed torch and numpy's global generators."""
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def cosine_lr(step: int, lr: float, warmup: int, total: int) -> float:
    """Learning rate at 0-based ``step``: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
