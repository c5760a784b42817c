"""One training run of the lite heads on cached features: what the final fit and every cv fold run.

    fit_heads(pairs, img_feats, txt_feats, cfg, total=..., dev=...)  -> Fit
      img_feats (n_img, V, 1280) pooled views (or (n_img, V, C, H, W) prefix activations with a tail)
      txt_feats (n_txt, 384)
      dev       a DevSet scored every ``eval_every`` steps (early stopping, best weights kept), or None
      stop_at   stop after this many steps of a ``total``-step LR schedule (the refit after cv)

Loss per step: symmetric multi-positive InfoNCE image<->text, + ``image_image`` x InfoNCE between
two views of each image (same case / same metadata labels = positive; with ``crops=0`` the two
views are the centre view under two dropout masks, as in SimCSE), + ``text_text`` x InfoNCE
among the batch texts. AdamW (no decay on biases, norms, the temperature), cosine LR with warm-up.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.errors import InvalidInput, MedsearchError
from medsearch.train.config import Log, Progress, TrainConfig
from medsearch.train.dev import DevSet, cosine_lr, dev_scores, seed_all
from medsearch.train.losses import multi_positive_nce, within_modality_nce
from medsearch.train.pairs import PairData, label_mask, positive_mask
from medsearch.train.tail import in_tail, tail_forward, tail_modules

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass
class Fit:
    """What one run produced: the kept weights and how it went."""

    state: dict[str, Any]  # "heads.*" (+ "tower.*" with a tail) tensors of the kept step
    model_cfg: dict[str, Any]
    best_step: int
    best_score: float  # dev score of the kept step (nan without dev)
    best_metrics: dict[str, float]
    steps_run: int
    total: int
    losses: list[float]
    history: list[dict[str, Any]] = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, dev score) of every evaluation


def model_config(cfg: TrainConfig) -> dict[str, Any]:
    """The head architecture a ``TrainConfig`` asks for (what ``encoders.lite.make_heads`` builds)."""
    return {
        "dims": {"image_in": 1280, "text_in": 384, "hidden": cfg.hidden, "out": cfg.dim},
        "dropout": cfg.dropout, "in_dropout": cfg.in_dropout, "init_temperature": cfg.init_temperature,
    }  # fmt: skip


def schedule_total(cfg: TrainConfig, n_pairs: int) -> int:
    """Steps of the LR schedule: ``epochs`` x batches per epoch when set, else ``steps``."""
    bs = min(cfg.batch_size, n_pairs)
    return cfg.epochs * max(1, n_pairs // bs) if cfg.epochs else cfg.steps


def fit_heads(
    pairs: PairData,
    img_feats: np.ndarray,
    txt_feats: np.ndarray,
    cfg: TrainConfig,
    *,
    total: int,
    stop_at: int | None = None,
    dev: DevSet | None = None,
    net: Any = None,
    device: str = "cpu",
    log: Log | None = None,
    progress: Progress | None = None,
    stage: str = "train steps",
) -> Fit:
    """Train heads (and with ``cfg.unfreeze`` a copy of ``net``'s last blocks) on cached features."""
    import torch
    import torch.nn.functional as F

    from medsearch.encoders.lite import make_heads

    log = log or (lambda _m: None)
    if cfg.case_positives not in ("all", "findings"):
        raise InvalidInput(f"unknown case_positives {cfg.case_positives!r}", hint="use all or findings")
    n_views = img_feats.shape[1]
    seed_all(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    mcfg = model_config(cfg)
    heads = make_heads(mcfg).to(device)
    tail = None
    if cfg.unfreeze:
        tail_net = copy.deepcopy(net).to(device)
        start, mods = tail_modules(tail_net, cfg.unfreeze)
        tail_net.requires_grad_(False)
        for m in mods:
            m.requires_grad_(True)
        tail = (tail_net, start, mods)
        with torch.no_grad():  # z-score statistics of the pooled features the tail starts from
            pooled = [
                tail_forward(
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
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr,
    )  # fmt: skip
    bs = min(cfg.batch_size, pairs.n_pairs)
    last = min(total, stop_at) if stop_at else total

    def image_in(rows: np.ndarray, views: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(img_feats[rows, views].astype(np.float32)).to(device)
        return tail_forward(tail[0], tail[1], x) if tail else x

    def embed_dev() -> tuple[np.ndarray, np.ndarray]:
        assert dev is not None
        heads.eval()
        with torch.no_grad():
            x = torch.from_numpy(dev.image_feats.astype(np.float32)).to(device)
            if tail:
                x = tail_forward(tail[0].eval(), tail[1], x)
            zi = F.normalize(heads.image(x), dim=-1).cpu().numpy()
            zt = F.normalize(heads.text(torch.from_numpy(dev.text_feats).to(device)), dim=-1).cpu().numpy()
        return zi, zt

    def snapshot() -> dict[str, torch.Tensor]:
        state = {f"heads.{k}": v.detach().clone() for k, v in heads.state_dict().items()}
        if tail:
            for k, v in tail[0].state_dict().items():
                if in_tail(k, tail[1]):
                    state[f"tower.{k}"] = v.detach().clone()
        return state

    def scaled(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (b, d) x (b, d) -> (b, b) logits
        return heads.logit_scale.exp().clamp(max=100.0) * a @ b.T

    history: list[dict[str, Any]] = []
    curve: list[tuple[int, float]] = []
    best: dict[str, Any] = {"score": -1.0, "step": 0, "metrics": {}}
    best_state = snapshot()
    bad = 0
    order = rng.permutation(pairs.n_pairs)
    pos_in_epoch = 0
    losses: list[float] = []
    pc, ptx = pairs.pair_case, pairs.pair_text
    case_level = np.array([k == "findings" for k in pairs.pair_kind]) if cfg.case_positives == "findings" else None
    step = 0
    for step in range(1, last + 1):
        if pos_in_epoch + bs > pairs.n_pairs:
            order = rng.permutation(pairs.n_pairs)
            pos_in_epoch = 0
        idx = order[pos_in_epoch : pos_in_epoch + bs]
        pos_in_epoch += bs
        views = rng.integers(0, n_views, size=len(idx))
        heads.train()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step - 1, cfg.lr, cfg.warmup, total)
        if tail:
            tail[0].train()
            for m in tail[0].modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()  # frozen statistics
        zi = F.normalize(heads.image(image_in(pairs.pair_image[idx], views)), dim=-1)  # (b, out)
        zt = F.normalize(heads.text(torch.from_numpy(txt_feats[ptx[idx]]).to(device)), dim=-1)  # (b, out)
        pos = positive_mask(pc[idx], ptx[idx], case_level[idx] if case_level is not None else None)
        pos_t = torch.from_numpy(pos).to(device)
        loss = multi_positive_nce(scaled(zi, zt), pos_t)
        if cfg.image_image > 0:  # a second view of each image: another crop, or (one view) another dropout mask
            views2 = (views + rng.integers(1, n_views, size=len(idx))) % n_views if n_views > 1 else views
            zi2 = F.normalize(heads.image(image_in(pairs.pair_image[idx], views2)), dim=-1)  # (b, out)
            same = (pc[idx][:, None] == pc[idx][None, :]) | label_mask(
                pairs, pairs.pair_image[idx], cfg.label_positives
            )
            loss = loss + cfg.image_image * multi_positive_nce(scaled(zi, zi2), torch.from_numpy(same).to(device))
        if cfg.text_text > 0:
            loss = loss + cfg.text_text * within_modality_nce(scaled(zt, zt), pos_t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            heads.logit_scale.clamp_(0.0, math.log(100.0))
        losses.append(float(loss.item()))
        if progress:
            progress(stage, step, last)
        if step % cfg.eval_every == 0 or step == last:
            rec: dict[str, Any] = {"step": step, "loss": round(float(np.mean(losses[-cfg.eval_every :])), 4),
                                   "temperature": round(float(1 / heads.logit_scale.exp().item()), 4)}  # fmt: skip
            if dev is not None:
                m = dev_scores(dev, *embed_dev())
                rec["dev"] = {k: round(v, 4) for k, v in m.items()}
                curve.append((step, m["score"]))
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
                f"step {step}/{last} loss {rec['loss']:.4f} temp {rec['temperature']:.4f}"
                + (f" held-out R@10 caption->image {rec['dev'].get('caption_image_r10', 0):.3f} "
                   f"same-case {rec['dev'].get('caption_case_r10', 0):.3f} (best {best['score']:.3f} @ {best['step']})"
                   if dev is not None else "")
            )  # fmt: skip
            if dev is not None and bad >= cfg.patience:
                log(f"early stop: no better held-out score in {cfg.patience} evaluations")
                break
    if not losses or not all(math.isfinite(x) for x in losses[-5:]):
        raise MedsearchError("training diverged (loss is not finite); the previous model is kept", hint="lower --lr")
    return Fit(
        state=best_state, model_cfg=mcfg, best_step=int(best["step"]), best_score=float(best["score"]),
        best_metrics=best["metrics"], steps_run=step, total=total, losses=losses, history=history, curve=curve,
    )  # fmt: skip
