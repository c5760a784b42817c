"""`medsearch demo`: ingest the shared datasets, index them and show example queries."""

from __future__ import annotations

import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from cli import output
from cli.options import Device, Home, handle_errors, home_dir

DEMO_DATASETS = ("medpix-2.0", "covid-chestxray")
TEXT_QUERIES = (
    ("left lower lobe consolidation", {}),
    ("ring enhancing lesion in the brain", {"modality": "MR"}),
    ("vertebral compression fracture", {}),
)


def find_datasets(explicit: Path | None = None) -> Path:
    """The folder holding the shared datasets: --data, else ../shared/datasets beside the repo."""
    candidates = [explicit] if explicit else []
    repo = Path(__file__).resolve().parents[1]
    candidates += [repo.parent / "shared" / "datasets", Path.cwd().parent / "shared" / "datasets"]
    for c in candidates:
        if c and all((c / d).is_dir() for d in DEMO_DATASETS):
            return c
    from medsearch.errors import InvalidInput

    raise InvalidInput(
        f"cannot find {' and '.join(DEMO_DATASETS)} (looked in {', '.join(str(c) for c in candidates if c)})",
        hint="pass --data FOLDER holding both dataset folders",
    )


def _first_image(dataset: Path, split: str, modality: str) -> Path:
    with open(dataset / "images.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r.get("split") == split and r.get("modality_type") == modality:
                return dataset / r["file"]
    from medsearch.errors import InvalidInput

    raise InvalidInput(f"no {split} {modality} image in {dataset}")


@handle_errors
def demo(
    home: Home = None,  # type: ignore[assignment]
    data: Annotated[Path | None, typer.Option(help="Folder with medpix-2.0 and covid-chestxray (default: ../shared/datasets).")] = None,
    device: Device = "auto",
) -> None:
    """Ingest the shared datasets, index them and run example searches."""
    run_demo(home_dir(home), data, device=device, echo=output.line)


def run_demo(home: Path, data: Path | None, *, device: str = "auto", echo: Callable[[str], None] = output.line) -> None:
    """Ingest both demo datasets into ``home``, train the lite model if it can, index, and query."""
    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import Paths
    from medsearch.encoders.registry import load_encoder
    from medsearch.search import Filters, Searcher

    datasets = find_datasets(data)
    echo(f"medsearch demo: home {home}, data {datasets}")
    cat = Catalog.open(home / "catalog.db")
    t0 = time.perf_counter()
    for name in DEMO_DATASETS:
        with output.Progress(unit="item") as progress:
            s = ingest_path(cat, datasets / name, progress=progress.ticker(f"ingest {name}"))
        c = s.counts
        echo(
            f"  {name}: {c['cases_added']} cases, {c['images_added']} images added; "
            f"{c['unchanged']} unchanged; {c['skipped']} skipped"
        )
    model = "towers"
    if importlib.util.find_spec("medsearch.train") is not None:
        from medsearch.train import ensure_trained_for_demo

        model = ensure_trained_for_demo(cat, Paths(home), device=device, echo=echo)
    enc = load_encoder(model, device=device, models_dir=home / "models")
    summary = run_index(cat, enc, Paths(home))
    echo(
        f"  indexed with {enc.model_id} on {enc.device}: {summary.images_embedded} images "
        f"({summary.images_per_s:.1f}/s), {summary.texts_embedded} texts; total {time.perf_counter() - t0:.0f}s"
    )
    cat.close()

    searcher = Searcher(home, model=enc.model_id, encoder=enc)
    echo("")
    for query, filt in TEXT_QUERIES:
        hits = searcher.search_text(query, k=5, filters=Filters(**filt))
        label = f'search "{query}"' + (f" --modality {filt['modality']}" if filt else "")
        output.print_hits(hits, label)
        echo("")
    for dataset, modality in (("medpix-2.0", "CT"), ("covid-chestxray", "X-ray")):
        img = _first_image(datasets / dataset, "dev", modality)
        hits = searcher.similar(img, k=5, exclude_same_case=True)
        output.print_hits(hits, f"similar {img.name} (own case excluded)")
        echo("")
    echo(f"Try: medsearch search \"pleural effusion\" --home {home}    medsearch similar IMAGE --home {home}")
