"""Shared fixtures: real data from ../shared/datasets, temporary homes, one small indexed home."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATASETS = SHARED / "datasets"
MEDPIX = DATASETS / "medpix-2.0"
COVID = DATASETS / "covid-chestxray"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"shared data missing at {path}: tests need ../shared beside the repository")
    return path


def make_slice(dst: Path, src: Path, case_ids: set[str] | None = None, n_cases: int | None = None,
               splits: tuple[str, ...] | None = None) -> Path:  # fmt: skip
    """A JSONL-layout dataset folder holding some cases of ``src``; images are symlinked, not copied."""
    dst.mkdir(parents=True, exist_ok=True)
    chosen: list[str] = []
    with open(src / "reports.jsonl") as f, open(dst / "reports.jsonl", "w") as out:
        for line in f:
            r = json.loads(line)
            if splits and r["split"] not in splits:
                continue
            if case_ids is not None and r["id"] not in case_ids:
                continue
            if n_cases is not None and len(chosen) >= n_cases:
                continue
            chosen.append(r["id"])
            out.write(line)
    keep = set(chosen)
    (dst / "images").mkdir(exist_ok=True)
    with open(src / "images.jsonl") as f, open(dst / "images.jsonl", "w") as out:
        for line in f:
            r = json.loads(line)
            if r["case_id"] in keep:
                out.write(line)
                link = dst / r["file"]
                if not link.exists():
                    link.symlink_to(src / r["file"])
    return dst


def balanced_medpix_cases(n_per_group: int = 6, split: str = "dev") -> set[str]:
    """Case ids of ``split`` with a mix of CT/MR and body regions (first cases of each group)."""
    groups: dict[tuple[str, str], list[str]] = {}
    with open(_need(MEDPIX) / "reports.jsonl") as f:
        for line in f:
            r = json.loads(line)
            if r["split"] != split or not r["images"]:
                continue
            im = r["images"][0]
            g = (im["modality_type"], im["location_category"])
            groups.setdefault(g, []).append(r["id"])
    out: set[str] = set()
    for ids in groups.values():
        out.update(ids[:n_per_group])
    return out


@pytest.fixture(scope="session")
def medpix_slice(tmp_path_factory) -> Path:
    """~40 medpix dev cases (CT and MR, all body regions) as a JSONL dataset folder."""
    return make_slice(tmp_path_factory.mktemp("data") / "medpix-slice", _need(MEDPIX), balanced_medpix_cases(4))


@pytest.fixture(scope="session")
def covid_dir() -> Path:
    return _need(COVID)


@pytest.fixture(scope="session")
def towers():
    from medsearch.encoders.registry import load_encoder

    return load_encoder("towers", device="cpu")


@pytest.fixture(scope="session")
def indexed_home(tmp_path_factory, medpix_slice, covid_dir, towers) -> Path:
    """A home with the medpix slice and covid-chestxray ingested and indexed with the towers."""
    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    home = tmp_path_factory.mktemp("home")
    cat = Catalog.open(home / "catalog.db")
    ingest_path(cat, medpix_slice, source="medpix-2.0")
    ingest_path(cat, covid_dir)
    run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=8, workers=0), progress=False)
    cat.close()
    return home


@pytest.fixture(scope="session")
def small_home(tmp_path_factory, towers) -> Path:
    """A tiny indexed home (3 medpix dev cases + 5 covid cases) for tests that damage a copy of it."""
    from indexer.embed import run_index
    from indexer.ingest import ingest_path
    from medsearch.catalog import Catalog
    from medsearch.config import EmbedConfig, Paths

    data = tmp_path_factory.mktemp("small-data")
    medpix = make_slice(data / "medpix-2.0", _need(MEDPIX), n_cases=3, splits=("dev",))
    covid = make_slice(data / "covid-chestxray", _need(COVID), n_cases=5)
    home = tmp_path_factory.mktemp("small-home")
    cat = Catalog.open(home / "catalog.db")
    ingest_path(cat, medpix)
    ingest_path(cat, covid)
    run_index(cat, towers, Paths(home), config=EmbedConfig(batch_size=8, workers=0), progress=False)
    cat.close()
    return home
