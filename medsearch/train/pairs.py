"""(image, text) pairs from the catalog, and the masks that say which pairs are positives.

    catalog split -> ok images (by id) -> (image, caption) pairs + (image, case findings) pairs

Texts are whitespace-normalised and deduplicated: identical captions share one text index, so
a duplicate caption is a positive of every image that carries it, never a negative.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medsearch.catalog import Catalog
from medsearch.catalog.train_queries import LABEL_FIELDS, case_sections, split_counts, split_images
from medsearch.encoders.features import text_key
from medsearch.errors import InvalidInput, NotFound

TEXT_KINDS = ("caption", "findings")


@dataclass
class PairData:
    """Images of one split and their (image, text) pairs. Text indices are deduplicated."""

    split: str
    image_ids: np.ndarray  # (n_img,) int64 catalog ids
    image_sha: list[str]
    image_path: list[str]
    image_frame: list[int | None]
    image_case: np.ndarray  # (n_img,) int64
    texts: list[str]  # unique texts (whitespace-normalised)
    pair_image: np.ndarray  # (n_pairs,) index into images
    pair_text: np.ndarray  # (n_pairs,) index into texts
    pair_kind: list[str]  # "caption" | "findings"
    image_labels: dict[str, list[str | None]] = field(default_factory=dict)  # field -> value per image
    label_codes: dict[str, np.ndarray] = field(default_factory=dict)  # field -> (n_img,) int64, -1 = unknown

    @property
    def pair_case(self) -> np.ndarray:
        return self.image_case[self.pair_image]

    @property
    def n_pairs(self) -> int:
        return len(self.pair_image)

    def image_keys(self) -> list[str]:
        """Content keys ``<sha256>:<frame>`` of the images (the feature cache's keys)."""
        return [f"{s}:{f if f is not None else ''}" for s, f in zip(self.image_sha, self.image_frame, strict=True)]

    def subset(self, keep: np.ndarray) -> tuple[PairData, np.ndarray]:
        """(the images ``keep`` (sorted indices) with their pairs, indices of the texts kept).

        Texts are re-indexed (``texts[t]`` of the subset is ``self.texts[kept[t]]``), so cached text
        features are ``txt_feats[kept]`` and image features ``img_feats[keep]``.
        """
        keep = np.asarray(keep, dtype=np.int64)
        new_img = np.full(len(self.image_ids), -1, dtype=np.int64)
        new_img[keep] = np.arange(len(keep))
        pm = new_img[self.pair_image] >= 0
        kept = np.unique(self.pair_text[pm])
        new_txt = np.full(len(self.texts), -1, dtype=np.int64)
        new_txt[kept] = np.arange(len(kept))
        ks = keep.tolist()
        return PairData(
            split=self.split, image_ids=self.image_ids[keep], image_sha=[self.image_sha[i] for i in ks],
            image_path=[self.image_path[i] for i in ks], image_frame=[self.image_frame[i] for i in ks],
            image_case=self.image_case[keep], texts=[self.texts[t] for t in kept.tolist()],
            pair_image=new_img[self.pair_image[pm]], pair_text=new_txt[self.pair_text[pm]],
            pair_kind=[k for k, m in zip(self.pair_kind, pm, strict=True) if m],
            image_labels={f: [v[i] for i in ks] for f, v in self.image_labels.items()},
            label_codes={f: c[keep] for f, c in self.label_codes.items()},
        ), kept  # fmt: skip

    def data_hash(self) -> str:
        """sha256 prefix over the image contents and the pair texts (what the model learned from)."""
        h = hashlib.sha256()
        for k in self.image_keys():
            h.update(k.encode() + b"\n")
        for i, t, kind in zip(self.pair_image, self.pair_text, self.pair_kind, strict=True):
            h.update(f"{i}\t{kind}\t{text_key(self.texts[t])}\n".encode())
        return h.hexdigest()[:16]


def norm_text(t: str) -> str:
    """Whitespace-normalised text (runs of whitespace -> one space, no ends)."""
    return " ".join(t.split())


def catalog_splits(catalog: Catalog) -> dict[str, int]:
    """Image count of each split (ok images), ``""`` for images with no split."""
    return split_counts(catalog)


def collect_pairs(
    catalog: Catalog, split: str, *, sources: Sequence[str] = (), kinds: Sequence[str] = TEXT_KINDS
) -> PairData:
    """(image, caption) and (image, case findings) pairs of the ok images of ``split``.

    Raises NotFound when the split has no images (naming the splits that exist) and
    InvalidInput when its images have no caption and no findings at all.
    """
    splits = split_counts(catalog)
    if split not in splits:
        have = ", ".join(f"{s or '(none)'} ({n})" for s, n in sorted(splits.items())) or "none: the catalog is empty"
        raise NotFound(
            f"split {split!r} has no images in the catalog {catalog.path or '(memory)'}",
            hint=f"splits present: {have}; pass --split NAME, or ingest a dataset with that split",
        )
    images = split_images(catalog, split, sources)
    if not images:
        raise NotFound(f"split {split!r} has no images from sources {list(sources)}", hint="check --source")
    findings: dict[int, str] = {}
    if "findings" in kinds:
        for cid, sections in case_sections(catalog, sorted({im.case_id for im in images})).items():
            f = (sections.get("findings") or "").strip()
            if f:
                findings[cid] = norm_text(f)
    text_index: dict[str, int] = {}
    texts: list[str] = []
    pi: list[int] = []
    pt: list[int] = []
    pk: list[str] = []

    def add(img: int, text: str, kind: str) -> None:
        t = text_index.get(text)
        if t is None:
            t = text_index[text] = len(texts)
            texts.append(text)
        pi.append(img)
        pt.append(t)
        pk.append(kind)

    for n, im in enumerate(images):
        cap = norm_text(im.caption or "")
        if cap and "caption" in kinds:
            add(n, cap, "caption")
        if im.case_id in findings:
            add(n, findings[im.case_id], "findings")
    if not pi:
        raise InvalidInput(
            f"no (image, text) pairs in split {split!r}: its {len(images)} images have no caption and their cases "
            "no findings",
            hint="ingest a dataset whose images have captions or whose cases have a findings section",
        )
    labels = {f: [im.label(f) for im in images] for f in LABEL_FIELDS}
    return PairData(
        split=split,
        image_ids=np.array([im.id for im in images], dtype=np.int64),
        image_sha=[im.sha256 for im in images],
        image_path=[im.path for im in images],
        image_frame=[im.frame for im in images],
        image_case=np.array([im.case_id for im in images], dtype=np.int64),
        texts=texts,
        pair_image=np.array(pi, dtype=np.int64),
        pair_text=np.array(pt, dtype=np.int64),
        pair_kind=pk,
        image_labels=labels,
        label_codes={f: _codes(v) for f, v in labels.items()},
    )


def _codes(values: list[str | None]) -> np.ndarray:
    """Values -> (n,) int64 codes, equal values equal codes, -1 for missing ones."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(v, len(index)) if v else -1 for v in values], dtype=np.int64)


# =========================================================================== positives


def positive_mask(cases: np.ndarray, texts: np.ndarray, case_level: np.ndarray | None = None) -> np.ndarray:
    """(b, b) bool for (image a, text b): identical text, or the same case.

    With ``case_level`` (b,) bool, the same case counts only when text b is a case-level text
    (findings), so an image is not pulled towards the captions of the case's other images.
    """
    same_case = cases[:, None] == cases[None, :]
    if case_level is not None:
        same_case &= case_level[None, :]
    return same_case | (texts[:, None] == texts[None, :])


def label_mask(pairs: PairData, image_idx: np.ndarray, fields: Sequence[str]) -> np.ndarray:
    """(b, b) bool: the images share every listed label (all known). Empty ``fields``: all False."""
    b = len(image_idx)
    out = np.ones((b, b), dtype=bool) if fields else np.zeros((b, b), dtype=bool)
    for f in fields:
        if f not in pairs.image_labels:
            raise InvalidInput(f"unknown label field {f!r} for label positives", hint=f"use {', '.join(LABEL_FIELDS)}")
        c = pairs.label_codes[f][image_idx]  # (b,) int64, computed once per training run
        known = c >= 0
        out &= (c[:, None] == c[None, :]) & known[:, None] & known[None, :]
    return out
