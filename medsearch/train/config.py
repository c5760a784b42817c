"""What a training run is told (``TrainConfig``) and what it reports back (``TrainResult``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Log = Callable[[str], None]
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class TrainConfig:
    """Training settings. The defaults are the measured lite recipe (see the README)."""

    base: str = "lite"  # lite | open_clip:ARCH:CKPT | open_clip:ARCH:TAG | hf-hub:ORG/NAME
    name: str | None = None  # lite:NAME / output folder name; None = the default model
    split: str = "train"
    # model selection: cv = K folds of the training split grouped by case choose the step and the grid
    # point, then a refit on all of it; dev = early stopping on ``dev_split``; none = ``steps`` steps
    select: str = "cv"
    dev_split: str | None = "auto"  # select=dev: "auto" = "dev" when the catalog has it; a split name
    folds: int = 3  # select=cv: K
    fold_seed: int = 0  # select=cv: the case shuffle of the folds (fixed across training seeds)
    cv_grid: tuple[tuple[tuple[str, Any], ...], ...] = ((),)  # select=cv: grid points ((field, value), ...)
    sources: tuple[str, ...] = ()  # only these catalog sources (empty = all)
    steps: int = 800  # optimiser steps of the LR schedule (upper bound: selection picks the step)
    stop_at: int | None = None  # select=none: stop after this many steps of the schedule (a refit at a known step)
    epochs: int | None = None  # when set, steps = epochs * batches per epoch
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.3
    hidden: int = 1024  # 1024 / dropout 0.8 / weight decay 0.3: best cv score of the variants tried (issue 13)
    dim: int = 256
    dropout: float = 0.8
    in_dropout: float = 0.0
    init_temperature: float = 0.07
    image_image: float = 1.0  # weight of an image-image term (two views; same case = positive)
    # image-image positives also by catalog metadata: images of the train split whose listed fields
    # are all known and equal count as positives of each other (images without them: same case only)
    label_positives: tuple[str, ...] = ("modality_type", "body_region")
    text_text: float = 0.5  # weight of a text-text term (same case or identical text = positive)
    case_positives: str = "findings"  # findings: case-level texts of the same case are positives; all: any text
    crops: int = 0  # random crops per training image, besides the centre view (0: dropout views)
    # deterministic views of the centre input (encoders.features.TTA_VIEWS: flip, zoom, s288, win, eq);
    # tta_mode pool: the image feature is the mean over centre + these views, in training and at index /
    # query time (the encoder computes them too); aug: extra training views only, the index embeds the centre
    tta: tuple[str, ...] = ()
    tta_mode: str = "pool"
    ensemble: int = 1  # lite: heads trained with seeds seed..seed+N-1, their unit vectors averaged (one model)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    seed: int = 0
    eval_every: int = 50
    patience: int = 4  # evaluations without a better held-out score before a fold (or dev run) stops
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
