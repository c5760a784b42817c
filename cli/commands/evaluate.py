"""Training and evaluation: ``medsearch train``, ``medsearch eval retrieval``, ``medsearch eval drafts``.

The bodies of ``train`` and ``eval retrieval`` were moved here verbatim from cli/main.py (another
change rewrites them); they keep the old local names through the aliases below.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.options import Device, Home, JsonOut, Model, draft_options, handle_errors, searcher
from cli.options import home_dir as _home
from cli.output import Progress
from cli.output import print_json as _print_json

if TYPE_CHECKING:
    from medsearch.rag.config import DraftConfig


@handle_errors
def train(
    home: Home = None,  # type: ignore[assignment]
    base: Annotated[str, typer.Option("--base", help="lite (frozen towers + trained heads), open_clip:ARCH:CKPT|TAG or hf-hub:ORG/NAME to fine-tune.")] = "lite",
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Passes over the pairs (default: the recipe's step budget with early stopping).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimiser steps of the schedule (upper bound: --select picks the step).")] = None,
    unfreeze: Annotated[int, typer.Option("--unfreeze", min=0, help="Also train the last N image blocks (lite) / N blocks per tower (open_clip; 0 = all).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (training is deterministic on CPU).")] = 0,
    split: Annotated[str, typer.Option("--split", help="Catalog split to train on.")] = "train",
    select: Annotated[str | None, typer.Option("--select", help="Model selection: cv (K folds of the training split grouped by case pick the step and --cv-grid, then a refit on all of it; default), dev (early stopping on --dev-split), none (all --steps). Default: cv, or dev when --dev-split is given.")] = None,
    dev_split: Annotated[str, typer.Option("--dev-split", help="--select dev: the validation split (auto = dev if present, none, or a name).")] = "auto",
    folds: Annotated[int | None, typer.Option("--folds", min=2, help="--select cv: number of case-grouped folds K.")] = None,
    cv_grid: Annotated[str | None, typer.Option("--cv-grid", help="--select cv: grid to tune, e.g. 'dropout=0.5,0.7;image_image=0.5,1' (default: the recipe's grid; '' = none).")] = None,
    source: Annotated[list[str] | None, typer.Option("--source", help="Only images of this catalog source (repeatable).")] = None,
    crops: Annotated[int | None, typer.Option("--crops", min=0, help="Random crops per image besides the centre view (lite).")] = None,
    tta: Annotated[str | None, typer.Option("--tta", help="Views pooled with the centre view at training, index and query time, comma-separated: flip, zoom, s288, win, eq (lite; default: none).")] = None,
    tta_mode: Annotated[str | None, typer.Option("--tta-mode", help="--tta: pool (the image feature is the mean over the views) or aug (training views only).")] = None,
    ensemble: Annotated[int | None, typer.Option("--ensemble", min=1, help="Heads trained with N seeds and averaged in one model (lite).")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=2, help="Pairs per step.")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="AdamW learning rate.")] = None,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Micro-batches per step (open_clip).")] = 1,
    image_image: Annotated[float | None, typer.Option("--image-image", min=0.0, help="Weight of the image-image term (two crops; same case = positive) (lite).")] = None,
    label_positives: Annotated[str | None, typer.Option("--label-positives", help="Comma-separated image fields (modality_type, body_region, plane): images agreeing on all are image-image positives (lite).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Save as lite:NAME (or a named fine-tune) instead of the default.")] = None,
    device: Device = "auto",
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.")] = False,
) -> None:
    """Contrastive training on the catalog: the built-in lite model, or fine-tune an open_clip model."""
    from dataclasses import replace

    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.train import TrainConfig, parse_grid, train

    h = _home(home)
    if select is None:
        select = "dev" if dev_split not in ("auto", "none", "") else "cv"
    cfg = TrainConfig(base=base, seed=seed, split=split, select=select, dev_split=dev_split, unfreeze=unfreeze,
                      epochs=epochs, grad_accum=grad_accum, name=name, sources=tuple(source or ()))  # fmt: skip
    overrides = {k: v for k, v in dict(steps=steps, crops=crops, batch_size=batch_size, lr=lr, image_image=image_image,
                                       folds=folds, tta_mode=tta_mode, ensemble=ensemble).items() if v is not None}  # fmt: skip
    if tta is not None:
        overrides["tta"] = tuple(v.strip() for v in tta.split(",") if v.strip())
    if cv_grid is not None:
        overrides["cv_grid"] = parse_grid(cv_grid)
    if label_positives is not None:
        overrides["label_positives"] = tuple(f.strip() for f in label_positives.split(",") if f.strip())
    cfg = replace(cfg, **overrides)
    cat = Catalog.open(h / "catalog.db", create=False)
    bars: dict[str, Any] = {}
    verbose = not (quiet or json_out)

    def progress(stage: str, done: int, total: int) -> None:
        if not verbose:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, dynamic_ncols=True, file=sys.stderr, leave=False)
        bar.total = total
        bar.update(done - bar.n)

    def log(msg: str) -> None:
        if verbose:
            typer.echo(msg, err=True)

    try:
        result = train(cat, Paths(h), cfg, device=device, log=log, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
        cat.close()
    if json_out:
        _print_json(result.to_dict())
        return
    dev = (result.config.get("dev") or {}).get("best") or {}
    sel = result.config.get("selection") or {}
    typer.echo(f"trained {result.model_id} in {result.seconds:.0f}s -> {result.path}")
    if sel.get("method") == "cv" and "chosen" in sel:
        c = sel["chosen"]
        typer.echo(f"cv ({sel['folds']} folds of {split} by case): chose {c['params'] or 'the recipe'}, {c['step']} steps; "
                   f"held-out score {c['cv_score']:.3f} +- {c['cv_std']:.3f}")  # fmt: skip
    if dev:
        typer.echo("dev: " + ", ".join(f"{k} {v:.3f}" for k, v in dev.items()))
    typer.echo(f"next: medsearch index --model {result.model_id} --home {h}")


@handle_errors
def eval_retrieval(
    dataset: Annotated[str, typer.Argument(help="A catalog source name, or a dataset folder (read into memory when not ingested).")],
    home: Home = None,  # type: ignore[assignment]
    split: Annotated[str, typer.Option("--split", help="Split whose images and cases are the queries.")] = "dev",
    pool: Annotated[str, typer.Option("--pool", help="split: the split's images; all: every image of the dataset.")] = "split",
    knn_k: Annotated[int, typer.Option("--knn-k", min=1, help="Neighbours in the kNN label vote.")] = 10,
    n_boot: Annotated[int, typer.Option("--n-boot", min=100, help="Bootstrap resamples for the 95% intervals.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write a PNG of Recall@K curves here.")] = None,
    hide_split_text: Annotated[bool, typer.Option("--hide-split-text/--show-split-text", help="Keep the evaluated split's own captions and reports out of the text/BM25 modes (default), as for new images that arrive without text.")] = True,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Image- and case-level Recall@K, P@K, mAP, MRR, median rank and kNN label votes with 95% CIs by case, against chance and the frozen towers."""
    from medsearch.config import Paths
    from medsearch.eval.report import markdown
    from medsearch.eval.retrieval import EvalConfig, evaluate_dataset

    def ingest(cat: Any, folder: Path, source: str) -> None:  # a dataset folder not in the home: read into memory
        from indexer.ingest import ingest_path

        ingest_path(cat, folder, source=source)

    cfg = EvalConfig(split=split, pool=pool, knn_k=knn_k, n_boot=n_boot, seed=seed, hide_split_text=hide_split_text)
    with Progress(not json_out, leave=False) as progress:
        report = evaluate_dataset(
            Paths(_home(home)), dataset, cfg, model=model, device=device, ingest=ingest, plot=plot, progress=progress,
            log=None if json_out else (lambda m: typer.echo(m, err=True)),
        )  # fmt: skip
    if json_out:
        _print_json(report)
        return
    typer.echo(markdown(report))
    if plot is not None:
        typer.echo(f"\nRecall@K curves: {report['plot']}")


@handle_errors
@draft_options
def eval_drafts(
    dataset: Annotated[str, typer.Argument(help="Dataset folder that was ingested (its name is the source) or a source name.")],
    home: Home = None,  # type: ignore[assignment]
    split: Annotated[str, typer.Option("--split", help="Split whose images are drafted and scored.")] = "dev",
    pool_split: Annotated[str, typer.Option("--pool-split", help="Split the evidence comes from (the query's own case is always excluded).")] = "train",
    generator: Annotated[list[str] | None, typer.Option("--generator", "-g", help="Generator to evaluate (repeatable). Default: extractive.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Score a random subset of this many images (seeded).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --limit, the random-case baseline and the bootstrap.")] = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", min=100, help="Bootstrap resamples (by case).")] = 1000,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
    *,
    draft: DraftConfig,
) -> None:
    """Draft every image of a split and score against its findings, with baselines and 95% CIs."""
    from dataclasses import replace

    from medsearch.eval.drafts import evaluate_drafts, format_table
    from medsearch.rag import Drafter

    source = Path(dataset).name if Path(dataset).exists() else dataset
    s = searcher(home, model, device)
    drafters = {g: Drafter(s, config=replace(draft, generator=g)) for g in generator or ["extractive"]}
    with Progress(not json_out, unit="image") as progress:
        result = evaluate_drafts(
            s, drafters, source=source, split=split, pool_split=pool_split, limit=limit, seed=seed,
            n_boot=n_boot, progress=progress.stage(f"draft {source} {split}"),
        )  # fmt: skip
    if json_out:
        _print_json(result)
    else:
        typer.echo(format_table(result))
