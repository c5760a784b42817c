"""Variants of the lite recipe chosen on train folds, then reported on dev once (issue 13).

    python benchmarks/select_variants.py --home HOME [--variants base,no_ii,...] [--seeds 0,1,2]
    python benchmarks/select_variants.py --home HOME --cv-only [--variants ...] [--ensemble-cv wide]

For every variant: ``medsearch train --select cv`` with seed 0 (K case-grouped folds of train pick
the step), then refits with the other seeds at the step that cv chose (``select=none, stop_at``),
then ``medsearch eval retrieval`` on dev for each seed. Dev is read only by the evaluation, after
every choice is made. Writes HOME/select_variants.json and prints a markdown table.

``--cv-only`` runs only the selection (cv with seed 0; no refit, no dev) for each variant and writes
HOME/cv_variants.json: what a variant must win before dev is read. ``--ensemble-cv V`` adds, for
variant V at its cv step, each fold's score of seeds 0,1,2 alone and of their averaged embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from common import load_avg

from medsearch.catalog import Catalog
from medsearch.config import Paths
from medsearch.eval.retrieval import EvalConfig, evaluate_dataset
from medsearch.train import TrainConfig, train

VARIANTS: dict[str, dict] = {
    "base": {"hidden": 512, "dropout": 0.7, "weight_decay": 0.1},  # the earlier recipe (crops 0: dropout views)
    "no_ii": {
        "hidden": 512,
        "dropout": 0.7,
        "weight_decay": 0.1,
        "image_image": 0.0,
    },  # base without the image-image term
    "wide": {},  # the default now: hidden 1024, dropout 0.8, weight decay 0.3 (best cv score)
    "ii2": {"image_image": 2.0},  # a stronger image-image (metadata) term
    # TTA views pooled with the centre view (train, index and query time)
    "flip": {"tta": ("flip",)},
    "ms": {"tta": ("flip", "s288")},
    "contrast": {"tta": ("win", "eq")},
    "tta5": {"tta": ("flip", "zoom", "s288", "win", "eq")},
    # the same views as training augmentations only (index: centre view)
    "aug5": {"tta": ("flip", "zoom", "s288", "win", "eq"), "tta_mode": "aug"},
    "crops4": {"crops": 4},  # 4 random-resized crops as training views (index: centre view)
    "ens3": {"ensemble": 3},  # 3 heads (seeds) averaged
}
METRICS = {  # report path -> column
    "caption->image R@10": ("cross-modal", "caption->image", "R@10"),
    "caption->same-case R@10": ("cross-modal", "caption->same-case", "R@10"),
    "caption->case R@10": ("cross-modal", "caption->case", "R@10"),
    "modality vote": ("classification", "model", "modality_type", "kNN vote"),
    "region vote": ("classification", "model", "body_region", "kNN vote"),
}


def _get(report: dict, path: tuple[str, ...]) -> dict:
    for p in path:
        report = report[p]
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--dataset", default="medpix-2.0")
    ap.add_argument("--cv-only", action="store_true", help="selection only: cv score of each variant")
    ap.add_argument("--probe", default="", help="linear probe of these frozen-feature variants (ceiling estimate)")
    ap.add_argument("--fixed-step", type=int, default=0,
                    help="--cv-only: score the folds at this step only (fits stop there; a cheaper cv on a loaded host)")
    ap.add_argument("--ensemble-cv", default="", help="variant(s) whose 3-seed ensemble is scored on the folds")
    ap.add_argument("--from-cv", action="store_true",
                    help="dev runs: every seed refit at the step HOME/cv_variants.json chose (no cv rerun)")
    ap.add_argument("--combine", action="store_true",
                    help="dev runs: also score the seeds' models averaged as one ensemble model (VARIANT-ens)")
    args = ap.parse_args()
    paths = Paths(args.home)
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.probe:
        probe(paths, args.probe.split(","))
        return
    if args.cv_only:
        cv_only(paths, args.variants.split(","), [v for v in args.ensemble_cv.split(",") if v], seeds, args.fixed_step)
        return
    out_file = args.home / "select_variants.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    print(f"load {load_avg()}", file=sys.stderr)
    for name in args.variants.split(","):
        if name in results and len(results[name]["dev"]) >= len(seeds):
            continue
        base = replace(TrainConfig(), **VARIANTS[name])
        cat = Catalog.open(paths.catalog, readonly=True)
        t0 = time.perf_counter()
        runs = {}
        if args.from_cv:  # the step (and record) of an earlier --cv-only run
            sel = json.loads((args.home / "cv_variants.json").read_text())[name]["selection"]
            refit = seeds
        else:
            res = train(cat, paths, replace(base, seed=seeds[0], name=f"{name}-s{seeds[0]}"), device="cpu",
                        log=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr, flush=True))  # fmt: skip
            sel = res.config["selection"]
            runs[seeds[0]] = res.model_id
            refit = seeds[1:]
        for s in refit:
            r = train(cat, paths, replace(base, seed=s, name=f"{name}-s{s}", select="none", stop_at=sel["chosen"]["step"]),
                      device="cpu")  # fmt: skip
            runs[s] = r.model_id
        cat.close()
        train_s = time.perf_counter() - t0
        if args.combine:
            runs["ens"] = combine(paths, [m.split(":", 1)[1] for m in runs.values()], f"{name}-ens")
        dev = {}
        for s, model in runs.items():
            rep = evaluate_dataset(paths, args.dataset, EvalConfig(split="dev"), model=model, device="cpu")
            dev[s] = {k: _get(rep, p) for k, p in METRICS.items()}
        results[name] = {"params": VARIANTS[name], "selection": {k: sel[k] for k in ("folds", "fold_sizes", "chosen",
                         "grid", "seconds", "fixed_step") if k in sel}, "models": runs, "dev": dev,
                         "train_seconds": round(train_s, 1), "load": load_avg()}  # fmt: skip
        out_file.write_text(json.dumps(results, indent=1))
        print(f"[{name}] cv {sel['chosen']['cv_score']:.3f} @ {sel['chosen']['step']}; dev "
              + ", ".join(f"{k} {np.mean([d[k]['value'] for d in dev.values()]):.3f}" for k in METRICS),
              file=sys.stderr, flush=True)  # fmt: skip
    print(table(results))


def cv_only(paths: Paths, variants: list[str], ensemble: list[str], seeds: list[int], fixed_step: int = 0) -> None:
    """cv (seed 0) of each variant, no refit; with ``ensemble``, the 3-seed ensemble on the folds.

    ``fixed_step``: instead of the full curve (every fold runs until its patience runs out), each fold's
    fit stops at that step of the same schedule and is scored there (``cv_ensemble`` with seed 0): the
    cv curve's value at that step, bit for bit, at a fraction of the cost."""
    from medsearch.encoders.registry import load_encoder
    from medsearch.train.lite import training_features
    from medsearch.train.select import cross_validate, cv_ensemble

    out_file = paths.home / "cv_variants.json"
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    towers = load_encoder("towers", device="cpu")
    cat = Catalog.open(paths.catalog, readonly=True)
    for name in dict.fromkeys(variants + ensemble):
        cfg = replace(TrainConfig(), **VARIANTS[name], seed=seeds[0])
        r = results.get(name)
        if r is None or (name in ensemble and "ensemble" not in r):
            t0 = time.perf_counter()
            pairs, img, txt = training_features(cat, paths, cfg, towers=towers)
            t_feat = time.perf_counter() - t0
            if r is None and fixed_step:
                e = cv_ensemble(pairs, img, txt, cfg, step=fixed_step, seeds=seeds[:1], device="cpu")
                fs = [f[0] for f in e["single"]]
                r = {"params": {k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[name].items()},
                     "selection": {"fixed_step": fixed_step, "chosen": {
                         "step": fixed_step, "cv_score": round(float(np.mean(fs)), 4), "fold_scores": fs,
                         "cv_std": round(float(np.std(fs)), 4)}},
                     "feature_seconds": round(t_feat, 1), "cv_seconds": round(time.perf_counter() - t0 - t_feat, 1),
                     "load": load_avg()}  # fmt: skip
            if r is None:
                cv = cross_validate(pairs, img, txt, cfg, device="cpu",
                                    log=lambda m, n=name: print(f"[{n}] {m}", file=sys.stderr, flush=True))  # fmt: skip
                r = {"params": {k: list(v) if isinstance(v, tuple) else v for k, v in VARIANTS[name].items()},
                     "selection": cv.to_dict(), "feature_seconds": round(t_feat, 1),
                     "cv_seconds": round(cv.seconds, 1), "load": load_avg()}  # fmt: skip
            if name in ensemble:
                r["ensemble"] = cv_ensemble(
                    pairs, img, txt, cfg, step=r["selection"]["chosen"]["step"], seeds=seeds, device="cpu"
                )
            results[name] = r
            out_file.write_text(json.dumps(results, indent=1))
        c = r["selection"]["chosen"]
        folds = ", ".join(f"{x:.3f}" for x in c["fold_scores"])
        print(f"[{name}] cv {c['cv_score']:.3f} +- {c['cv_std']:.3f} ({folds}) @ {c['step']}"
              + (f"; ensemble {r['ensemble']['ensemble_mean']:.3f} vs single {r['ensemble']['single_mean']:.3f}"
                 if "ensemble" in r else ""), file=sys.stderr, flush=True)  # fmt: skip
    cat.close()


def probe(paths: Paths, variants: list[str], fields: tuple[str, ...] = ("modality_type", "body_region")) -> None:
    """Case-grouped 3-fold accuracy of a softmax regression on the frozen tower features (view 0 of each
    variant: centre or TTA-pooled), beside the 10-NN vote of the same features: how much of each label the
    frozen image tower carries at all, i.e. a ceiling estimate for what trained heads can vote."""
    import torch

    from medsearch.encoders.registry import load_encoder
    from medsearch.metrics import knn_vote
    from medsearch.train.lite import training_features
    from medsearch.train.select import case_folds

    towers = load_encoder("towers", device="cpu")
    cat = Catalog.open(paths.catalog, readonly=True)
    out = {}
    for name in variants:
        cfg = replace(TrainConfig(), **VARIANTS[name])
        pairs, img, _ = training_features(cat, paths, cfg, towers=towers)
        x = img[:, 0].astype(np.float32)
        folds = case_folds(pairs.image_case, 3, 0)
        for fld in fields:
            vals = np.array(pairs.image_labels[fld], dtype=object)
            ok = np.array([v is not None for v in vals])
            classes = sorted(set(vals[ok].tolist()))
            y = np.array([classes.index(v) if v is not None else -1 for v in vals])
            acc_lin, acc_knn = [], []
            for f in range(3):
                tr, te = ok & (folds != f), ok & (folds == f)
                mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-6
                xt, xe = torch.from_numpy((x[tr] - mu) / sd), torch.from_numpy((x[te] - mu) / sd)
                best = 0.0
                for wd in (1e-3, 1e-2, 1e-1):  # the probe's own regularisation: best of three, so an upper estimate
                    torch.manual_seed(0)
                    lin = torch.nn.Linear(x.shape[1], len(classes))
                    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200)
                    yt = torch.from_numpy(y[tr])

                    def closure(lin=lin, opt=opt, xt=xt, yt=yt, wd=wd) -> torch.Tensor:
                        opt.zero_grad()
                        loss = torch.nn.functional.cross_entropy(lin(xt), yt) + wd * lin.weight.pow(2).sum()
                        loss.backward()
                        return loss

                    opt.step(closure)
                    with torch.no_grad():
                        best = max(best, float((lin(xe).argmax(1).numpy() == y[te]).mean()))
                acc_lin.append(best)
                xn = x[te] / np.linalg.norm(x[te], axis=1, keepdims=True)
                ce = pairs.image_case[te]
                pred = knn_vote(xn @ xn.T, vals[te], 10, ce[:, None] == ce[None, :])
                acc_knn.append(float((pred == vals[te]).mean()))
            out[f"{name} {fld}"] = {"linear": round(float(np.mean(acc_lin)), 3), "knn10": round(float(np.mean(acc_knn)), 3),
                                    "folds_linear": [round(a, 3) for a in acc_lin]}  # fmt: skip
            print(f"[probe {name}] {fld}: linear {np.mean(acc_lin):.3f} ({', '.join(f'{a:.3f}' for a in acc_lin)}), "
                  f"frozen 10-NN vote {np.mean(acc_knn):.3f}", file=sys.stderr, flush=True)  # fmt: skip
    cat.close()
    f = paths.home / "probe.json"
    f.write_text(json.dumps({**(json.loads(f.read_text()) if f.exists() else {}), **out}, indent=1))


def combine(paths: Paths, names: list[str], out_name: str) -> str:
    """One ensemble lite model from trained lite models of the same recipe (other seeds): member m's heads
    as ``member<m>.heads.*`` (what ``train --ensemble N`` writes), no retraining. -> its model id."""
    from safetensors.torch import load_file

    from medsearch.encoders.lite import WEIGHTS_FILE, model_dir, read_config, save_model

    cfgs = [read_config(model_dir(paths.models, n)) for n in names]
    keep = ("dims", "dropout", "in_dropout", "tta", "unfreeze")
    if any({k: c.get(k) for k in keep} != {k: cfgs[0].get(k) for k in keep} for c in cfgs) or cfgs[0].get("unfreeze"):
        raise SystemExit(f"{names}: not one recipe with frozen towers")
    state = {}
    for m, n in enumerate(names):
        for k, v in load_file(str(model_dir(paths.models, n) / WEIGHTS_FILE)).items():
            state[k if m == 0 else f"member{m}.{k}"] = v
    cfg = {**cfgs[0], "model_id": f"lite:{out_name}", "members": len(names), "ensemble_of": [c["model_id"] for c in cfgs]}
    save_model(model_dir(paths.models, out_name), state, cfg)
    return cfg["model_id"]


def table(results: dict) -> str:
    cols = list(METRICS)
    lines = ["| variant | cv score (+- sd over folds) | chosen step | " + " | ".join(f"dev {c}" for c in cols) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in cols) + " |"]  # fmt: skip
    for name, r in results.items():
        c = r["selection"]["chosen"]
        seeds = {s: d for s, d in r["dev"].items() if s != "ens"}
        cells = []
        for k in cols:
            vals = [d[k]["value"] for d in seeds.values()]
            lo = min(d[k]["ci95"][0] for d in seeds.values())
            hi = max(d[k]["ci95"][1] for d in seeds.values())
            cells.append(f"{np.mean(vals):.3f} ({' / '.join(f'{v:.3f}' for v in vals)}) [{lo:.2f}, {hi:.2f}]")
        lines.append(f"| {name} {r['params'] or ''} | {c['cv_score']:.3f} +- {c['cv_std']:.3f} | {c['step']} | "
                     + " | ".join(cells) + " |")  # fmt: skip
        if "ens" in r["dev"]:
            e = r["dev"]["ens"]
            lines.append(f"| {name}, its {len(seeds)} seeds averaged (one model) | - | {c['step']} | "
                         + " | ".join(f"{e[k]['value']:.3f} [{e[k]['ci95'][0]:.2f}, {e[k]['ci95'][1]:.2f}]"
                                      for k in cols) + " |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
