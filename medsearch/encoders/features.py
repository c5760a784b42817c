"""Cached tower features: what training, evaluation and the lite encoder share.

The frozen towers (EfficientNet-Lite0, MiniLM) give the same output for the same input, so their
features are computed once and kept on disk, content-addressed:

    HOME/models/cache/towers-<weights hash>-<numerics>/
        img-<view spec digest>/<hash>.npz   keys "<sha256>:<frame>#<view>"  feats (m, 1280) pooled features
        act<N>-<view spec digest>/...       the same keys, frozen-prefix activations (m, C, H, W) float16
        text/<hash>.npz                     keys sha256(text)                  feats (m, 384)
        by-tensor/<hash>.npz                keys sha256(preprocessed tensor)   feats (m, 1280) centre views

View 0 of an image is exactly what indexing embeds (``towers.preprocess(image)``); views 1.. are
random-resized crops drawn from an RNG seeded by (spec seed, content key, view), the same in every
run and order. ``by-tensor`` lets the lite encoder skip the tower for an input tensor training saw.

Nothing here trains; ``medsearch.train`` and ``medsearch.eval`` import this module, never the reverse.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.config import ImagingConfig
from medsearch.errors import MedsearchError
from medsearch.fileio import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

    from medsearch.encoders.towers import TowersEncoder

Progress = Callable[[str, int, int], None]

TENSOR_KIND = "by-tensor"  # pooled centre-view features keyed by the preprocessed input tensor
TEXT_KIND = "text"


def text_key(text: str) -> str:
    """Cache key of a text: the sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_key(x: torch.Tensor) -> str:
    """sha256 of a preprocessed (3, H, W) tensor (float32, or uint8 from ``preprocess_u8``) and its dtype:
    the same input gives the same tower output."""
    a = x.detach().cpu().contiguous().numpy()
    return hashlib.sha256(str(a.dtype).encode() + a.tobytes()).hexdigest()


# =========================================================================== views


@dataclass(frozen=True)
class ViewSpec:
    """How views are cut: view 0 is the encoder's centre view, views 1.. random crops."""

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

    from medsearch.encoders.towers import pil_to_rgb

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


def load_images(
    paths: Sequence[str], frames: Sequence[int | None], imaging: ImagingConfig = ImagingConfig()
) -> Iterator[Image.Image]:
    """Decode catalog images one at a time, in order."""
    from medsearch.imaging import load_image

    for p, fr in zip(paths, frames, strict=True):
        yield load_image(p, frame=fr, config=imaging)


# =========================================================================== the store


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
    as one new file (temp file, fsync, ``os.replace``).
    """

    def __init__(self, root: Path, weights_hash: str, mode: str = "cpu-fp32") -> None:
        self.dir = Path(root) / f"towers-{weights_hash}-{mode}"

    @classmethod
    def for_towers(cls, root: Path, towers: TowersEncoder) -> FeatureStore:
        return cls(root, towers.weights_hash, feature_mode(towers))

    def index(self, kind: str) -> dict[str, tuple[Path, int]]:
        """key -> (file, row) of everything cached under ``kind`` (unreadable files are skipped)."""
        index: dict[str, tuple[Path, int]] = {}
        for f in self._files(kind):
            try:
                with np.load(f, allow_pickle=False) as z:
                    keys = z["keys"]
            except (OSError, ValueError, KeyError):
                continue  # a broken file is recomputed
            for j, k in enumerate(keys.tolist()):
                index[k] = (f, j)
        return index

    def read_all(self, kind: str) -> dict[str, np.ndarray]:
        """key -> feature of everything cached under ``kind`` (loaded into memory)."""
        out: dict[str, np.ndarray] = {}
        for f in self._files(kind):
            try:
                with np.load(f, allow_pickle=False) as z:
                    out.update(zip(z["keys"].tolist(), z["feats"], strict=True))
            except (OSError, ValueError, KeyError):
                continue
        return out

    def get(
        self, kind: str, keys: Sequence[str], compute: Callable[[list[int]], np.ndarray], chunk: int = 1000
    ) -> np.ndarray:
        """Features for ``keys`` in order; ``compute(missing positions)`` fills the misses.

        Misses are computed and written ``chunk`` at a time, so an interrupted run keeps its work.
        """
        index = self.index(kind)
        missing = [i for i, k in enumerate(keys) if k not in index]
        for s in range(0, len(missing), chunk):
            part = missing[s : s + chunk]
            self.put(kind, [keys[i] for i in part], compute(part))
        if missing:
            index = self.index(kind)
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

    def put(self, kind: str, keys: list[str], feats: np.ndarray) -> None:
        """Write one file of ``keys`` (m,) and ``feats`` (m, ...) under ``kind``."""
        folder = self.dir / kind
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]
        write_atomic(folder / f"{name}.npz", lambda f: np.savez(f, keys=np.array(keys), feats=np.ascontiguousarray(feats)))

    def _files(self, kind: str) -> list[Path]:
        folder = self.dir / kind
        return sorted(folder.glob("*.npz")) if folder.is_dir() else []


# =========================================================================== cached features


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
    index = store.index(kind)
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

        loaded = load_images([paths[i] for i in images], [frames[i] for i in images], imaging)
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
            store.put(TENSOR_KIND, list(by_tensor), np.stack(list(by_tensor.values())))
        return np.stack([results[m] for m in missing])

    feats = store.get(kind, flat_keys, compute, chunk=200 * n_views)
    return feats.reshape(len(keys), n_views, *feats.shape[1:])


def text_features(
    store: FeatureStore, towers: TowersEncoder, texts: Sequence[str], progress: Progress | None = None, batch: int = 256
) -> np.ndarray:
    """(n, 384) cached mean-pooled MiniLM features of ``texts``."""
    keys = [text_key(t) for t in texts]
    index = store.index(TEXT_KIND)
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

    return store.get(TEXT_KIND, keys, compute, chunk=1024)


# =========================================================================== test-time views (TTA)

# Deterministic views of the centre input (the (3, 224, 224) tensor indexing embeds), so a model
# that pools them computes the same thing at training, index and query time:
#   flip  horizontal flip            zoom  centre 80% crop, resized back to 224
#   s288  the input upscaled to 288 (multi-scale: the pooled 9x9 map sees finer structure)
#   win   percentile window: grey levels p1..p99 stretched to 0..255 (a contrast view)
#   eq    histogram equalisation (a global stand-in for CLAHE on grayscale scans)
TTA_VIEWS = ("flip", "zoom", "s288", "win", "eq")
TTA_TENSOR_KIND = "by-tensor-tta"  # per-view features keyed "<centre input tensor key>#<view>"


def check_tta(names: Sequence[str]) -> tuple[str, ...]:
    """Validate view names (typed error listing the valid ones)."""
    from medsearch.errors import InvalidInput

    bad = [n for n in names if n not in TTA_VIEWS]
    if bad or len(set(names)) != len(names):
        raise InvalidInput(f"unknown or repeated --tta view(s) {bad or list(names)}", hint=f"use some of {', '.join(TTA_VIEWS)}")
    return tuple(names)


def to_255(batch: torch.Tensor, towers: TowersEncoder) -> torch.Tensor:
    """(n, 3, H, W) uint8 or normalised float input -> float32 pixel values 0..255."""
    import torch

    if batch.dtype == torch.uint8:
        return batch.float()
    t = towers.transform
    mean = torch.tensor(t.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(t.std, device=batch.device).view(1, 3, 1, 1)
    return ((batch.float() * std + mean) * 255.0).clamp_(0.0, 255.0)


def tta_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """(n, 3, H, W) float 0..255 -> view ``name`` (n, 3, h, w) float 0..255 (see TTA_VIEWS)."""
    import torch
    import torch.nn.functional as F

    n, _, H, W = x.shape
    if name == "flip":
        return x.flip(-1)
    if name == "zoom":
        h, w = round(H * 0.8), round(W * 0.8)
        top, left = (H - h) // 2, (W - w) // 2
        crop = x[:, :, top : top + h, left : left + w]
        return F.interpolate(crop, size=(H, W), mode="bicubic", align_corners=False).clamp_(0.0, 255.0)
    if name == "s288":
        return F.interpolate(x, size=(288, 288), mode="bicubic", align_corners=False).clamp_(0.0, 255.0)
    if name == "win":
        flat = x.mean(1).reshape(n, -1)  # (n, H*W) grey levels
        lo = torch.quantile(flat, 0.01, dim=1).view(n, 1, 1, 1)
        hi = torch.quantile(flat, 0.99, dim=1).view(n, 1, 1, 1)
        return ((x - lo) / (hi - lo).clamp(min=1.0) * 255.0).clamp_(0.0, 255.0)
    if name == "eq":
        from torchvision.transforms.functional import equalize

        return equalize(x.round().clamp(0, 255).to(torch.uint8)).float()
    raise ValueError(name)


def tta_features(towers: TowersEncoder, batch: torch.Tensor, names: Sequence[str]) -> np.ndarray:
    """(n, 3, 224, 224) centre inputs -> (n, len(names), 1280) pooled tower features of each view."""
    import torch

    x = to_255(batch, towers)
    t = towers.transform
    mean = torch.tensor(t.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(t.std, device=x.device).view(1, 3, 1, 1)
    out = [towers.image_features((tta_view(x, v) / 255.0 - mean) / std) for v in names]
    return np.stack(out, axis=1).astype(np.float32)


def image_tta_features(
    store: FeatureStore,
    towers: TowersEncoder,
    *,
    keys: Sequence[str],
    paths: Sequence[str],
    frames: Sequence[int | None],
    names: Sequence[str],
    batch: int = 16,
    imaging: ImagingConfig = ImagingConfig(),
    progress: Progress | None = None,
) -> np.ndarray:
    """(n, len(names), 1280) cached features of the TTA views of each image (kind ``tta-<view>``).

    Each computed view is also remembered under its centre input tensor (float and uint8 keys), so
    the lite encoder looks it up instead of recomputing it for an image training saw.
    """
    import torch

    names = check_tta(names)
    flat = [f"{k}@{v}" for k in keys for v in names]  # one folder for all views: one index read
    kind = "tta"
    index = store.index(kind)
    todo = len({i // len(names) for i, k in enumerate(flat) if k not in index})
    done = 0

    def compute(missing: list[int]) -> np.ndarray:
        nonlocal done
        need: dict[int, list[int]] = {}
        for m in missing:
            need.setdefault(m // len(names), []).append(m % len(names))
        images = sorted(need)
        results: dict[int, np.ndarray] = {}
        by_tensor: dict[str, np.ndarray] = {}
        for s in range(0, len(images), batch):
            part = images[s : s + batch]
            pil = list(load_images([paths[i] for i in part], [frames[i] for i in part], imaging))
            xs = torch.stack([towers.preprocess(p) for p in pil])  # (b, 3, 224, 224) float
            u8 = [tensor_key(towers.preprocess_u8(p)) for p in pil] if hasattr(towers, "preprocess_u8") else []
            feats = tta_features(towers, xs, names)  # (b, V, 1280)
            for j, i in enumerate(part):
                kf = tensor_key(xs[j])
                for v in range(len(names)):
                    results[i * len(names) + v] = feats[j, v]
                    by_tensor[f"{kf}#{names[v]}"] = feats[j, v]
                    if u8:
                        by_tensor[f"{u8[j]}#{names[v]}"] = feats[j, v]
            done += len(part)
            if progress:
                progress("tta features", min(done, todo), todo)
        store.put(TTA_TENSOR_KIND, list(by_tensor), np.stack(list(by_tensor.values())))
        return np.stack([results[m] for m in missing])

    feats = store.get(kind, flat, compute, chunk=200 * len(names))
    return feats.reshape(len(keys), len(names), feats.shape[-1])
