"""``medsearch train``: contrastive training of the built-in ``lite`` model, fine-tuning of open_clip models.

    config.py    TrainConfig (the recipe), TrainResult
    pairs.py     (image, text) pairs from the catalog; positive and label masks
    losses.py    multi-positive InfoNCE, within-modality InfoNCE
    dev.py       dev split, held-out scores (model selection), seeding, LR schedule
    select.py    --select cv: case-grouped folds of the training split, the grid, cross_validate
    fit.py       fit_heads: one training run of the lite heads on cached features (folds and the final fit)
    tail.py      the trainable EfficientNet tail of --unfreeze
    lite.py      train_lite: cached tower features -> selection -> projection heads -> saved model
    openclip.py  finetune_open_clip: whole-model fine-tuning with checkpoints and resume

Inference (search, rag, encoders, api) never imports this package: the cached tower features both
sides need live in ``medsearch.encoders.features``. Everything reports through ``log(str)`` and
``progress(stage, done, total)`` callbacks; nothing prints.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.errors import InvalidInput, ModelNotAvailable
from medsearch.train.config import Log, Progress, TrainConfig, TrainResult
from medsearch.train.lite import train_lite
from medsearch.train.openclip import finetune_open_clip, set_trainable
from medsearch.train.pairs import PairData, collect_pairs, label_mask, positive_mask
from medsearch.train.select import case_folds, cross_validate, parse_grid

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.encoders.towers import TowersEncoder

__all__ = [
    "PairData", "TrainConfig", "TrainResult", "case_folds", "collect_pairs", "cross_validate", "demo_config",
    "ensure_trained_for_demo", "finetune_open_clip", "label_mask", "parse_grid", "positive_mask", "set_trainable",
    "train", "train_lite",
]  # fmt: skip


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
    from medsearch.encoders.base import pick_device

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
    """The demo's recipe: the default one (centre views only, so features are one tower pass per image)."""
    return replace(TrainConfig(), crops=0)


def ensure_trained_for_demo(catalog: Catalog, paths: Paths, device: str = "auto", echo: Log | None = None) -> str:
    """Train ``lite`` when no usable lite model is in ``paths.models``; return the model id to index with."""
    from medsearch.encoders.lite import model_dir, read_config
    from medsearch.encoders.registry import load_encoder

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
    chosen = (res.config.get("selection") or {}).get("chosen") or {}
    if chosen:
        echo(f"  lite trained in {res.seconds:.0f}s: {chosen['step']} steps chosen on train folds "
             f"(held-out score {chosen['cv_score']:.3f})")  # fmt: skip
    elif best:
        echo(
            f"  lite trained in {res.seconds:.0f}s: dev caption->image R@10 {best.get('caption_image_r10', 0):.3f}, "
            f"same-case R@10 {best.get('caption_case_r10', 0):.3f}"
        )
    return res.model_id
