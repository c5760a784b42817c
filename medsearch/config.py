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

    # Tuned by benchmarks/embed_throughput.py (see benchmarks/RESULTS.md).
    batch_size: int = 0  # images per DataLoader batch; 0 = auto: 16 on CPU, 256 on CUDA
    workers: int = -1  # DataLoader workers; 0 = all in the main process; -1 = auto: cores (<=16) on CPU, cores-1 (<=16) on CUDA
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    amp: bool = True  # bf16 autocast on CUDA
    commit_every: int = 512  # vectors per catalog transaction
    text_batch_size: int = 128
    torch_threads: int = 0  # intra-op threads of the encoding process while embedding; 0 = torch's default
    prefetch: int = 4  # batches each worker keeps ready
    uint8_transfer: bool = True  # workers hand over uint8 pixels, normalised on the device (encoders that support it)
    encode_in_workers: bool = True  # CPU only: workers decode and encode whole batches (1 thread each, data parallel)
    trim_memory: bool = True  # malloc_trim after each batch: RSS stays flat in N (indexer.embed.release_free_memory)


@dataclass(frozen=True)
class IndexConfig:
    """Which FAISS index to build. ``kind='auto'`` picks by size (see ``medsearch.stores.ann``)."""

    kind: str = "auto"  # auto, flat, hnsw, ivfpq
    flat_max: int = 100_000  # up to this many vectors, exact search (benchmarks/search_bench.py)
    large_kind: str = "ivfpq"  # what auto builds above flat_max: ivfpq (fast build) or hnsw
    target_recall: float = 0.95  # recall@10 the search knob is tuned to reach
    tune: bool = True  # tune efSearch / nprobe on sampled stored vectors after a build
    tune_queries: int = 300
    tune_margin: float = 0.01  # tune to target + margin, so fresh queries still meet the target
    seed: int = 0
    hnsw_m: int = 32
    hnsw_ef_construction: int = 64
    hnsw_ef_search: int = 128  # starting value; replaced by the tuned one
    ivf_nlist: int = 0  # 0: a power of two near 2*sqrt(n)
    ivf_nprobe: int = 16  # starting value; replaced by the tuned one
    ivf_niter: int = 10  # k-means iterations for the coarse lists
    ivf_train_per_list: int = 40  # training vectors per list
    pq_m: int = 0  # 0: largest divisor of dim up to dim/8
    refine_k_factor: float = 8.0  # ivfpq re-ranks k_factor*k candidates exactly
    use_gpu: bool = True  # faiss-gpu, when installed and a GPU is visible, trains IVF lists
    metric: str = "ip"  # inner product on L2-normalised vectors = cosine


@dataclass(frozen=True)
class SearchConfig:
    """Query-time behaviour."""

    k: int = 10
    per_case: bool = True  # one hit per case (best image)
    oversample: int = 8  # fetch k*oversample candidates before grouping by case
    rrf_k: int = 10  # RRF constant for hybrid text search (10 beat 60 on medpix dev findings->case for every model tried)
    understand_weight: float = 1.0  # query understanding: a full metadata match adds weight / (rrf_k + 1)
    understand_model: bool = True  # let the caption model fill modality/body region when the rules are silent
    understand_confidence: float = 0.7  # the model's least probability (5-fold CV on train captions, grouped by case: precision 0.88 modality, 0.89 region, like the rules)


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
        if safe in ("", ".", ".."):  # would name the indexes folder itself or the home: stay inside indexes/
            safe = f"_{safe}"
        return self.indexes / safe
