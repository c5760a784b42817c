"""Honest model selection: K folds of the training split grouped by case (``--select cv``).

    case_folds(image_case, k, seed)             (n_img,) fold of each image; a case is in one fold only
    parse_grid("dropout=0.5,0.7;lr=5e-4")       the hyperparameter grid (cartesian product)
    cross_validate(pairs, feats, cfg)           every grid point x every fold: train on K-1 folds, score the
      -> CVResult                               held-out fold every eval_every steps; the mean curve over
                                                folds picks the grid point and the step

The held-out fold is scored like a dev split (``train.dev.dev_scores``: mean of caption->image
R@10, caption->same-case R@10 and the modality / body-region kNN vote accuracy, pool = the fold's
images). A fold that stopped early (patience)
keeps its last score for the later steps of the mean curve. The final model is then refit on all
of the training split for the chosen number of steps of the same LR schedule: the split that is
reported (dev, test) is never read during selection.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medsearch.errors import InvalidInput
from medsearch.train.config import Log, Progress, TrainConfig
from medsearch.train.dev import DevSet
from medsearch.train.fit import fit_heads, schedule_total
from medsearch.train.pairs import PairData

# what --cv-grid may name, and how to read each value
GRID_FIELDS: dict[str, type] = {
    "dropout": float, "in_dropout": float, "weight_decay": float, "lr": float, "hidden": int, "dim": int,
    "image_image": float, "text_text": float, "init_temperature": float, "batch_size": int,
}  # fmt: skip


def case_folds(image_case: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """(n_img,) int64 fold in 0..k-1 of each image; all images of a case share a fold.

    Cases are shuffled (``seed``) and each goes to the fold with the fewest images so far, so the
    folds hold about the same number of images.
    """
    cases, counts = np.unique(np.asarray(image_case, dtype=np.int64), return_counts=True)
    if k < 2:
        raise InvalidInput(f"--folds {k}: cross-validation needs at least 2 folds", hint="use --folds 2 or more")
    if len(cases) < k:
        raise InvalidInput(
            f"--folds {k} needs at least {k} cases; the training split has {len(cases)}",
            hint="use fewer --folds, --select none, or --select dev with --dev-split NAME",
        )
    perm = np.random.default_rng(seed).permutation(len(cases))
    load = np.zeros(k, dtype=np.int64)
    fold_of_case: dict[int, int] = {}
    for j in perm:
        f = int(np.argmin(load))  # ties: the lowest fold number
        fold_of_case[int(cases[j])] = f
        load[f] += counts[j]
    return np.array([fold_of_case[int(c)] for c in image_case], dtype=np.int64)


def parse_grid(spec: str | None) -> tuple[tuple[tuple[str, Any], ...], ...]:
    """``"dropout=0.5,0.7;image_image=0.5,1"`` -> the cartesian product as tuples of (field, value).

    An empty spec is one grid point: the recipe as configured.
    """
    if not spec or not spec.strip():
        return ((),)
    axes: list[list[tuple[str, Any]]] = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        name, _, values = part.partition("=")
        name = name.strip()
        if name not in GRID_FIELDS or not values.strip():
            raise InvalidInput(
                f"bad --cv-grid entry {part.strip()!r}",
                hint=f"write FIELD=V1,V2;FIELD=V1,... with FIELD one of {', '.join(GRID_FIELDS)}",
            )
        try:
            axes.append([(name, GRID_FIELDS[name](v.strip())) for v in values.split(",") if v.strip()])
        except ValueError as e:
            raise InvalidInput(f"bad value in --cv-grid {part.strip()!r}: {e}", hint="values are numbers") from e
    return tuple(tuple(p) for p in itertools.product(*axes))


@dataclass
class CVResult:
    """What cross-validation chose and every score it saw (recorded in the model's config)."""

    folds: int
    fold_seed: int
    fold_sizes: list[dict[str, int]]  # per fold: cases, images, pairs
    assignment_hash: str  # sha256 prefix over (case id, fold): the same folds give the same hash
    grid: list[dict[str, Any]]  # per grid point: params, mean curve, best step and score, per-fold best
    params: dict[str, Any]  # the chosen grid point
    step: int  # the chosen number of optimiser steps
    score: float  # mean held-out score at that step
    fold_scores: list[float]  # each fold's score at the chosen step (its spread)
    seconds: float = 0.0
    metric: str = (
        "mean of caption->image R@10, caption->same-case R@10 and the modality and body-region kNN vote "
        "accuracy (10 neighbours of other cases); pool = the held-out fold's images"
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": "cv", "folds": self.folds, "fold_seed": self.fold_seed, "fold_sizes": self.fold_sizes,
            "assignment_hash": self.assignment_hash, "metric": self.metric, "grid": self.grid,
            "chosen": {"params": self.params, "step": self.step, "cv_score": round(self.score, 4),
                       "fold_scores": [round(s, 4) for s in self.fold_scores],
                       "cv_std": round(float(np.std(self.fold_scores)), 4)},
            "seconds": round(self.seconds, 1),
        }  # fmt: skip


def _carry_curve(curve: list[tuple[int, float]], steps: list[int]) -> np.ndarray:
    """A fold's score at each of ``steps``: its evaluation there, or its last one before (stopped early)."""
    d = dict(curve)
    out = np.empty(len(steps))
    last = curve[0][1] if curve else 0.0
    for i, s in enumerate(steps):
        last = d.get(s, last)
        out[i] = last
    return out


def cross_validate(
    pairs: PairData,
    img_feats: np.ndarray,
    txt_feats: np.ndarray,
    cfg: TrainConfig,
    *,
    net: Any = None,
    device: str = "cpu",
    log: Log | None = None,
    progress: Progress | None = None,
) -> CVResult:
    """Train on K-1 folds and score the held-out one, for every grid point; pick the best mean curve."""
    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    folds = case_folds(pairs.image_case, cfg.folds, cfg.fold_seed)
    grid = cfg.cv_grid or ((),)
    parts = _fold_parts(pairs, img_feats, txt_feats, folds, cfg.folds)  # per fold: (train pairs, feats, held-out)
    sizes = [{"cases": int(len(np.unique(h.pairs.image_case))), "images": int(len(h.pairs.image_ids)),
              "pairs": h.pairs.n_pairs} for *_, h in parts]  # fmt: skip
    log(f"cv: {cfg.folds} folds of {cfg.split} grouped by case ({', '.join(str(s['cases']) for s in sizes)} cases), "
        f"{len(grid)} grid point(s)")  # fmt: skip
    results = []
    n_runs, run = len(grid) * cfg.folds, 0
    for point in grid:
        pcfg = replace(cfg, **dict(point))
        curves, fold_best = [], []
        for f, (tr, tr_img, tr_txt, held) in enumerate(parts):
            run += 1
            fit = fit_heads(
                tr, tr_img, tr_txt, pcfg, total=schedule_total(pcfg, tr.n_pairs), dev=held, net=net, device=device,
                progress=progress, stage=f"cv run {run}/{n_runs}",
            )  # fmt: skip
            curves.append(fit.curve)
            fold_best.append({"step": fit.best_step, "score": round(fit.best_score, 4)})
            log(f"cv {dict(point) or 'recipe'} fold {f + 1}/{cfg.folds}: best {fit.best_score:.3f} @ {fit.best_step}"
                f" (ran {fit.steps_run})")  # fmt: skip
        steps = sorted({s for c in curves for s, _ in c})
        per_fold = np.stack([_carry_curve(c, steps) for c in curves])  # (K, n_evals)
        mean = per_fold.mean(0)
        b = int(np.argmax(mean))  # ties: the earliest step
        results.append({
            "params": dict(point), "best_step": int(steps[b]), "cv_score": round(float(mean[b]), 4),
            "fold_scores": per_fold[:, b].round(4).tolist(), "fold_best": fold_best,
            "curve": [[int(s), round(float(m), 4)] for s, m in zip(steps, mean, strict=True)],
        })  # fmt: skip
        log(f"cv {dict(point) or 'recipe'}: mean held-out score {mean[b]:.3f} at step {steps[b]}")
    best = max(range(len(results)), key=lambda i: (results[i]["cv_score"], -i))
    chosen = results[best]
    h = hashlib.sha256()
    for c, f in sorted(set(zip(pairs.image_case.tolist(), folds.tolist(), strict=True))):
        h.update(f"{c}:{f}\n".encode())
    return CVResult(
        folds=cfg.folds, fold_seed=cfg.fold_seed, fold_sizes=sizes, assignment_hash=h.hexdigest()[:16], grid=results,
        params=chosen["params"], step=chosen["best_step"], score=chosen["cv_score"],
        fold_scores=chosen["fold_scores"], seconds=time.perf_counter() - t0,
    )  # fmt: skip


def _fold_parts(pairs: PairData, img_feats: np.ndarray, txt_feats: np.ndarray, folds: np.ndarray, k: int) -> list:
    out = []
    for f in range(k):
        tr_idx, ho_idx = np.where(folds != f)[0], np.where(folds == f)[0]
        tr, tr_txt = pairs.subset(tr_idx)
        ho, ho_txt = pairs.subset(ho_idx)
        out.append((tr, img_feats[tr_idx], txt_feats[tr_txt], DevSet(ho, img_feats[ho_idx, 0], txt_feats[ho_txt])))
    return out


def embed_heldout(fits: list[Any], dev: DevSet, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(image, text) embeddings of a held-out set under the heads of ``fits``: each member's unit
    vectors averaged and normalised again (what the lite encoder does with an ensemble)."""
    import torch
    import torch.nn.functional as F

    from medsearch.encoders.lite import make_heads

    zi = zt = 0
    x_img = torch.from_numpy(dev.image_feats.astype(np.float32)).to(device)
    x_txt = torch.from_numpy(dev.text_feats.astype(np.float32)).to(device)
    for fit in fits:
        heads = make_heads(fit.model_cfg).to(device)
        heads.load_state_dict({k[len("heads.") :]: v for k, v in fit.state.items() if k.startswith("heads.")})
        heads.eval()
        with torch.no_grad():
            zi = zi + F.normalize(heads.image(x_img), dim=-1)
            zt = zt + F.normalize(heads.text(x_txt), dim=-1)
    return F.normalize(zi, dim=-1).cpu().numpy(), F.normalize(zt, dim=-1).cpu().numpy()  # type: ignore[union-attr]


def cv_ensemble(
    pairs: PairData, img_feats: np.ndarray, txt_feats: np.ndarray, cfg: TrainConfig, *, step: int, seeds: list[int],
    device: str = "cpu", progress: Progress | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Held-out scores at ``step`` of each seed alone and of the seeds' averaged embeddings, per fold.

    -> {"single": [[score per seed] per fold], "ensemble": [score per fold], "single_mean", "ensemble_mean"}
    """
    from medsearch.train.dev import dev_scores

    folds = case_folds(pairs.image_case, cfg.folds, cfg.fold_seed)
    single, ens = [], []
    for tr, tr_img, tr_txt, held in _fold_parts(pairs, img_feats, txt_feats, folds, cfg.folds):
        fits = [
            fit_heads(tr, tr_img, tr_txt, replace(cfg, seed=s), total=schedule_total(cfg, tr.n_pairs), stop_at=step,
                      device=device, progress=progress, stage=f"cv ensemble seed {s}")
            for s in seeds
        ]  # fmt: skip
        single.append([round(dev_scores(held, *embed_heldout([f], held, device))["score"], 4) for f in fits])
        ens.append(round(dev_scores(held, *embed_heldout(fits, held, device))["score"], 4))
    return {"step": step, "seeds": seeds, "single": single, "ensemble": ens,
            "single_mean": round(float(np.mean(single)), 4), "ensemble_mean": round(float(np.mean(ens)), 4),
            "ensemble_std": round(float(np.std(ens)), 4)}  # fmt: skip
