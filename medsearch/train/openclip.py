"""Fine-tuning an open_clip model on the catalog's (image, text) pairs.

``base="open_clip:ARCH:CKPT"`` / ``"hf-hub:ORG/NAME"`` fine-tunes a whole open_clip model (or its
last N blocks per tower with ``unfreeze``) on images loaded per step: bf16 autocast on CUDA,
gradient accumulation, periodic checkpoints with resume, early stopping on a held-out set: with
``select="cv"`` (default) one case-grouped fold of the training split (the model trains on the
others; a K-fold refit would cost K whole fine-tunes), with ``select="dev"`` the ``dev_split``.
"""

from __future__ import annotations

import math
import re
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.catalog import Catalog
from medsearch.config import ImagingConfig, Paths
from medsearch.encoders.features import load_images
from medsearch.errors import InvalidInput, MedsearchError
from medsearch.fileio import write_atomic, write_json_atomic
from medsearch.train.config import Log, Progress, TrainConfig, TrainResult
from medsearch.train.dev import DevSet, cosine_lr, dev_scores, resolve_dev_split, seed_all
from medsearch.train.losses import multi_positive_nce
from medsearch.train.pairs import PairData, collect_pairs, positive_mask
from medsearch.train.select import case_folds

if TYPE_CHECKING:  # pragma: no cover
    import torch

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
        from medsearch.encoders.towers import pil_to_rgb
        from medsearch.imaging import load_image

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
    ``--model open_clip:ARCH:<that file>``; a hub or local-dir base gives an open_clip local-dir folder
    (config, ``open_clip_model.safetensors``, tokenizer): ``--model open_clip:local-dir:<that folder>``.
    """
    import open_clip
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from medsearch.encoders.openclip import OpenClipEncoder, parse_spec

    log = log or (lambda _m: None)
    t_start = time.perf_counter()
    cfg = config
    kind, arch, _src = parse_spec(cfg.base)
    pairs = collect_pairs(catalog, cfg.split, sources=cfg.sources)
    dev_split = resolve_dev_split(catalog, cfg) if cfg.select == "dev" else None
    dev_pairs = collect_pairs(catalog, dev_split, sources=cfg.sources) if dev_split else None
    selection: dict[str, Any] = {"method": cfg.select, "split": dev_split}
    if cfg.select == "cv":  # one case-grouped fold of train stops early; whole-model K-fold runs cost K fine-tunes
        folds = case_folds(pairs.image_case, cfg.folds, cfg.fold_seed)
        dev_pairs, _ = pairs.subset(np.where(folds == 0)[0])
        pairs, _ = pairs.subset(np.where(folds != 0)[0])
        selection = {"method": "cv", "folds": cfg.folds, "fold_seed": cfg.fold_seed, "held_out_fold": 0,
                     "held_out_images": len(dev_pairs.image_ids), "train_images": len(pairs.image_ids)}  # fmt: skip
        log(f"selection: fold 1 of {cfg.folds} of {cfg.split} (grouped by case, {len(dev_pairs.image_ids)} images) "
            "for early stopping; trained on the other folds")  # fmt: skip
    enc = OpenClipEncoder(cfg.base, device=device, amp=cfg.amp)  # offline; never random weights
    model = enc._model  # the encoder's torch module (we own this instance for training)
    n_train = set_trainable(model, cfg.unfreeze)
    on_cuda = device.startswith("cuda")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (on_cuda and cfg.amp) else nullcontext
    vis = model.visual
    size = vis.image_size if isinstance(vis.image_size, (tuple, list)) else (vis.image_size, vis.image_size)
    pcfg = getattr(vis, "preprocess_cfg", {}) or {}
    train_tf = open_clip.image_transform(size, is_train=True, mean=pcfg.get("mean"), std=pcfg.get("std"))
    micro = max(1, min(cfg.batch_size, pairs.n_pairs) // cfg.grad_accum)
    per_epoch = max(1, pairs.n_pairs // (micro * cfg.grad_accum))
    total = cfg.epochs * per_epoch if cfg.epochs else cfg.steps
    log(f"fine-tuning {enc.model_id}: {n_train:,} trainable parameters, {pairs.n_pairs} pairs, {total} steps of "
        f"{cfg.grad_accum} x {micro} on {device}" + (" (bf16 autocast)" if on_cuda and cfg.amp else ""))  # fmt: skip
    seed_all(cfg.seed)
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

    dev_imgs = None
    if dev_pairs is not None:
        dev_imgs = [enc.preprocess(im) for im in load_images(dev_pairs.image_path, dev_pairs.image_frame, imaging)]

    def evaluate() -> dict[str, float]:
        assert dev_pairs is not None and dev_imgs is not None
        model.eval()
        zi = np.concatenate(
            [enc.encode_image_batch(torch.stack(dev_imgs[s : s + 64])) for s in range(0, len(dev_imgs), 64)]
        )
        zt = enc.encode_texts(dev_pairs.texts)
        model.train()
        return dev_scores(DevSet(dev_pairs, zi, np.zeros((0, 1))), zi, zt)

    def cpu_state() -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    best = {"score": -1.0, "step": step0, "metrics": {}}
    best_state = cpu_state()
    history: list[dict[str, Any]] = []
    losses: list[float] = []
    bad = 0
    it = iter(loader)
    model.train()
    step = step0
    for step in range(step0 + 1, total + 1):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step - 1, cfg.lr, cfg.warmup, total)
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
                    best_state = cpu_state()
                else:
                    bad += 1
            else:
                best = {"score": float("nan"), "step": step, "metrics": {}}
                best_state = cpu_state()
            history.append(rec)
            log(f"step {step}/{total} loss {rec['loss']:.4f}" + (f" dev {rec['dev']}" if "dev" in rec else ""))
            if dev_pairs is not None and bad >= cfg.patience:
                log(f"early stop: no better dev score in {cfg.patience} evaluations")
                break
    out_dir = paths.models / "open_clip" / run
    if kind in ("hub", "dir"):  # an open_clip local-dir: the base's config, the weights, the tokenizer
        from safetensors.torch import save as safetensors_bytes

        weights = out_dir / "open_clip_model.safetensors"
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(weights, lambda f: f.write(safetensors_bytes({k: v.contiguous() for k, v in best_state.items()})))
        write_json_atomic(out_dir / "open_clip_config.json", enc.open_clip_config)
        if hasattr(enc._tokenizer, "save_pretrained"):  # HF tokenizer: open_clip reads it from the folder
            enc._tokenizer.save_pretrained(str(out_dir))
        model_id = f"open_clip:local-dir:{out_dir}"
    else:
        weights = out_dir / "open_clip_model.pt"
        _save_torch_atomic({"state_dict": best_state}, weights)
        model_id = f"open_clip:{arch}:{weights}"
    meta = {
        "model_id": model_id, "base": enc.model_id, "base_weights_hash": enc.weights_hash, "unfreeze": cfg.unfreeze,
        "training": {**run_key, "steps_run": step, "best_step": best["step"], "grad_accum": cfg.grad_accum,
                     "micro_batch": micro, "amp": bool(on_cuda and cfg.amp), "device": device,
                     "loss_first": round(losses[0], 4) if losses else None,
                     "loss_last": round(float(np.mean(losses[-10:])), 4) if losses else None,
                     "seconds": round(time.perf_counter() - t_start, 1), "split": cfg.split},
        "selection": {**selection, "best": best["metrics"]},
        "dev": {"split": dev_split, "best": best["metrics"]} if dev_split else None,
    }  # fmt: skip
    write_json_atomic(out_dir / "train_config.json", meta)
    log(f"saved {weights} (best step {best['step']})")
    return TrainResult(model_id, weights, meta, history, time.perf_counter() - t_start)
