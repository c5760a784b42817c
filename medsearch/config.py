"""Frozen configuration dataclasses. The shells build these from options and environment."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ImagingConfig:
    """Limits and conversion settings for decoding images."""

    max_pixels: int = 120_000_000  # refuse images that declare more pixels than this
    max_file_bytes: int = 512 * 1024 * 1024
    default_window: tuple[float, float] | None = None  # (center, width) when a DICOM has none


@dataclass(frozen=True)
class EmbedConfig:
    """How the embedding pipeline runs."""

    batch_size: int = 32
    workers: int = 2  # DataLoader decode workers; 0 decodes in the main process
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    amp: bool = True  # bf16 autocast on CUDA
    commit_every: int = 512  # vectors per catalog transaction
    text_batch_size: int = 128


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build. ``kind='auto'`` picks by size."""

    kind: str = "auto"  # auto, flat, hnsw, ivfpq
    flat_max: int = 200_000  # below this many vectors, exact search
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    metric: str = "ip"  # inner product on L2-normalised vectors = cosine


@dataclass(frozen=True)
class SearchConfig:
    """Query-time behaviour."""

    k: int = 10
    per_case: bool = True  # one hit per case (best image)
    oversample: int = 8  # fetch k*oversample candidates before grouping by case


@dataclass(frozen=True)
class Paths:
    """Where a medsearch home keeps its files."""

    home: Path

    @property
    def catalog(self) -> Path:
        return self.home / "catalog.db"

    @property
    def indexes(self) -> Path:
        return self.home / "indexes"

    @property
    def models(self) -> Path:
        return self.home / "models"

    def index_dir(self, model_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_id)
        return self.indexes / safe
