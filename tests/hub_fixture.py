"""A Hugging Face cache holding a BiomedCLIP-shaped pair of repos: small, random, built offline.

BiomedCLIP (``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) is two hub repos:

    microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
        open_clip_config.json           model_cfg: timm ViT image tower + HF text tower; preprocess_cfg
        open_clip_pytorch_model.bin     the whole CLIP state dict (both towers, projections, logit scale)
    microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract
        config.json                     the BERT config open_clip builds the text tower from
        vocab.txt, tokenizer_config.json    the uncased WordPiece tokenizer (context 256)

open_clip reads the first repo; the text tower's ``AutoConfig`` and ``AutoTokenizer`` read the second one
(``text_cfg.hf_model_name`` / ``hf_tokenizer_name``). The text repo's own weights are not needed: with a full
checkpoint open_clip builds the text tower from its config and loads everything from the checkpoint.

``build_hub_cache(cache_root, texts)`` writes both repos under their real ids and file names, in the layout
huggingface_hub itself writes (``models--ORG--NAME/{refs/main, blobs/<etag>, snapshots/<commit>/<file> ->
../../blobs/<etag>}``), with the same kind of config at small dimensions (timm ``test_vit``: 160 px,
width 64; a 2-layer BERT of width 32 over a WordPiece vocabulary built from ``texts``) and seeded random
weights. Nothing touches the network. Point a process at it with ``hub_env(cache_root)`` (a subprocess) or
``point_hub_at(monkeypatch, cache_root)`` (in-process: huggingface_hub reads its env vars at import).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
TEXT_REPO = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
MODEL_SPEC = f"hf-hub:{MODEL_REPO}"
CONTEXT_LENGTH = 256  # BiomedCLIP's text context (PubMedBERT_256)
EMBED_DIM = 32  # BiomedCLIP: 512
IMAGE_SIZE = 160  # timm test_vit's fixed input size (BiomedCLIP: 224, vit_base_patch16_224)
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")  # BERT's basic split, lower-cased: words, numbers, punctuation


def open_clip_config(image_tower: str = "test_vit") -> dict[str, Any]:
    """BiomedCLIP's open_clip_config.json, same keys and kinds, small dimensions."""
    return {
        "model_cfg": {
            "embed_dim": EMBED_DIM,
            "vision_cfg": {"timm_model_name": image_tower, "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": IMAGE_SIZE},
            "text_cfg": {"hf_model_name": TEXT_REPO, "hf_tokenizer_name": TEXT_REPO, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CONTEXT_LENGTH},
        },
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
    }  # fmt: skip


def bert_config(vocab_size: int) -> dict[str, Any]:
    """A BERT config.json of PubMedBERT's kind (uncased, absolute positions up to 512) at width 32."""
    return {
        "architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab_size, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
        "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }  # fmt: skip


def wordpiece_vocab(texts: Iterable[str], max_words: int = 3000) -> list[str]:
    """A tiny uncased WordPiece vocabulary: specials, every character alone and as ``##c`` (so no word is
    ever [UNK]), then the most frequent whole words of ``texts`` (ties alphabetical)."""
    counts: Counter[str] = Counter()
    chars: set[str] = set("abcdefghijklmnopqrstuvwxyz0123456789.,;:()-/%'\"")
    for t in texts:
        pieces = _WORD.findall(t.lower())
        counts.update(p for p in pieces if len(p) > 1)
        chars.update(c for p in pieces for c in p if c.isascii() and c.isprintable())
    singles = sorted(chars)
    vocab = SPECIALS + singles + [f"##{c}" for c in singles if c.isalnum()]
    known = set(vocab)
    words = sorted((w for w in counts if w not in known and w.isascii()), key=lambda w: (-counts[w], w))
    return vocab + words[:max_words]


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_repo(cache: Path, repo: str, files: dict[str, bytes], lfs: Iterable[str] = ()) -> Path:
    """Write ``files`` as huggingface_hub caches a download of ``repo``; returns the snapshot folder.

    Blobs are named by their etag (sha256 for LFS files, the git blob sha1 otherwise), snapshot entries
    are relative symlinks to them, and ``refs/main`` holds the commit (derived from the contents).
    """
    lfs = set(lfs)
    root = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(b"".join(n.encode() + hashlib.sha256(d).digest() for n, d in sorted(files.items())))
    rev = commit.hexdigest()
    snap = root / "snapshots" / rev
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(rev)  # no newline, like huggingface_hub
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name in lfs else _git_blob_sha1(data)
        (root / "blobs" / etag).write_bytes(data)
        link = snap / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("..") / ".." / "blobs" / etag)
    return snap


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models--" + repo.replace("/", "--"))


def remove_repo(cache: Path, repo: str) -> None:
    """Delete one repo from the cache (what `hf cache delete` does), leaving the other."""
    shutil.rmtree(repo_dir(cache, repo))


@dataclass(frozen=True)
class HubCache:
    """Where the fixture lives: ``root`` is HF_HOME, ``hub`` is HF_HUB_CACHE (``root / "hub"``)."""

    root: Path
    hub: Path
    vocab: tuple[str, ...]
    weights_sha256: str

    def snapshot(self, repo: str) -> Path:
        rev = (repo_dir(self.hub, repo) / "refs" / "main").read_text().strip()
        return repo_dir(self.hub, repo) / "snapshots" / rev


def text_repo_files(vocab: list[str]) -> dict[str, bytes]:
    return {
        "config.json": json.dumps(bert_config(len(vocab)), indent=2).encode(),
        "vocab.txt": ("\n".join(vocab) + "\n").encode(),
        "tokenizer_config.json": json.dumps({"do_lower_case": True, "model_max_length": 512}).encode(),
    }


def build_model(text_snapshot: Path, config: dict[str, Any], seed: int = 0):
    """The open_clip model of ``config`` with seeded random weights (text tower built from the local
    snapshot's config.json, so building needs no cache lookup)."""
    import open_clip
    import torch

    model_cfg = json.loads(json.dumps(config["model_cfg"]))
    model_cfg["text_cfg"] = {**model_cfg["text_cfg"], "hf_model_name": str(text_snapshot), "hf_model_pretrained": False}
    torch.manual_seed(seed)
    return open_clip.CustomTextCLIP(**model_cfg).eval()


def build_hub_cache(root: Path, texts: Iterable[str], seed: int = 0) -> HubCache:
    """Both BiomedCLIP repos under ``root/hub`` (``root`` is an HF_HOME), random weights seeded by ``seed``."""
    import torch

    hub = root / "hub"
    vocab = wordpiece_vocab(texts)
    text_snap = write_repo(hub, TEXT_REPO, text_repo_files(vocab))
    config = open_clip_config()
    model = build_model(text_snap, config, seed)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # the real repo ships a torch pickle of the state dict (.bin)
    weights = buf.getvalue()
    write_repo(hub, MODEL_REPO, {"open_clip_config.json": json.dumps(config, indent=2).encode(),
                                 "open_clip_pytorch_model.bin": weights}, lfs=["open_clip_pytorch_model.bin"])  # fmt: skip
    return HubCache(root, hub, tuple(vocab), hashlib.sha256(weights).hexdigest())


def hub_env(root: Path) -> dict[str, str]:
    """Environment variables that point a fresh process at the fixture's cache, offline."""
    return {"HF_HOME": str(root), "HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip


def point_hub_at(monkeypatch: Any, root: Path) -> None:
    """The same for this process: huggingface_hub and transformers resolve the cache from
    ``huggingface_hub.constants`` at call time, and those were read from the environment at import."""
    from huggingface_hub import constants

    for k, v in hub_env(root).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "HF_HOME", str(root))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
