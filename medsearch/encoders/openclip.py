"""Any open_clip model, from local files only: a checkpoint, a cached tag, or a cached hf-hub repo.

Spec forms (``model_id`` keeps the spec, with checkpoint paths made absolute):

    open_clip:ARCH:/path/to/checkpoint.pt   # local weights for a built-in/registered ARCH
    open_clip:ARCH:TAG                      # a pretrained tag whose weights are already cached
    hf-hub:ORG/NAME                         # a Hugging Face repo already in the local HF cache
    open_clip:local-dir:/path/to/folder     # open_clip_config.json + weights (+ tokenizer) in a folder

Nothing is downloaded: every Hub/transformers call runs inside ``hub_offline()`` and URL
tags are looked up in the cache folder before open_clip is asked. Missing weights raise
``ModelNotAvailable`` whose hint is the command that fetches them on a machine with internet.
A model is never created with random weights: a spec without weights is an error, and the
hf-hub path fails if open_clip logs that it could not load the checkpoint. A model whose config
names a Hugging Face text tower (BiomedCLIP: ``text_cfg.hf_model_name`` / ``hf_tokenizer_name``, a
second hub repo) is checked for that repo in the cache first, and the error names it.

Long text is chunked on sentence boundaries to the tokenizer's context (77 for CLIP); the
chunk vectors are averaged, weighted by their token counts, and re-normalised.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.encoders.base import l2_normalize, pick_device
from medsearch.encoders.towers import package_dir, pil_to_rgb, weights_digest
from medsearch.errors import InvalidInput, ModelNotAvailable
from medsearch.text import chunk_by_tokens

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
TEXT_BATCH = 64
_offline_lock = threading.RLock()


@contextmanager
def hub_offline() -> Iterator[None]:
    """Make huggingface_hub and transformers cache-only for the duration of the block.

    Both read ``huggingface_hub.constants.HF_HUB_OFFLINE`` at call time; the flag is flipped
    under a lock and restored afterwards (the environment is not touched).
    """
    from huggingface_hub import constants

    with _offline_lock:
        before = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            yield
        finally:
            constants.HF_HUB_OFFLINE = before


class _RandomInitGuard(logging.Handler):
    """Collects open_clip's warnings that mean 'weights were not loaded'."""

    MARKERS = ("initialized randomly", "could not find/download default weights", "no clip weights found")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if any(m in msg.lower() for m in self.MARKERS):
            self.hits.append(msg)


def _hub_fetch_hint(repo: str) -> str:
    return (
        f"on a machine with internet run `hf download {repo}` (older huggingface_hub: "
        f'`huggingface-cli download {repo}`), or `python -c "import open_clip; '
        f"open_clip.create_model_and_transforms('hf-hub:{repo}'); open_clip.get_tokenizer('hf-hub:{repo}')\"`, "
        "then copy ~/.cache/huggingface/hub to this machine"
    )


def _text_repo_hint(repo: str, model_id: str) -> str:
    return (
        f"{model_id} takes its text tower's config and tokenizer from the hub repo {repo}: on a machine with "
        f"internet run `hf download {repo}` (older huggingface_hub: `huggingface-cli download {repo}`), "
        "then copy ~/.cache/huggingface/hub to this machine"
    )


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def _check_text_repos(model_cfg: dict[str, Any], model_id: str, cache_dir: str | None, local_tokenizer: bool) -> None:
    """ModelNotAvailable naming the repo when the HF text tower's config or tokenizer repo is not cached.

    The tower's ``AutoConfig`` is read from the default cache (open_clip passes no cache_dir to it), the
    tokenizer from ``cache_dir``; ``local_tokenizer``: the tokenizer comes from a local-dir folder instead.
    """
    from huggingface_hub import try_to_load_from_cache

    text = model_cfg.get("text_cfg") or {}
    wanted = [(text.get("hf_model_name"), ("config.json",), None)]
    if not local_tokenizer:
        wanted.append((text.get("hf_tokenizer_name"), TOKENIZER_FILES, cache_dir))
    for repo, files, cdir in wanted:
        if not repo or Path(repo).expanduser().is_dir():  # unset, or a local folder transformers reads itself
            continue
        if not any(isinstance(try_to_load_from_cache(repo, f, cache_dir=cdir), str) for f in files):
            raise ModelNotAvailable(
                f"{model_id} needs the Hugging Face repo {repo} (its text tower's "
                f"{'config' if files == ('config.json',) else 'tokenizer'}), which is not in the local cache",
                hint=_text_repo_hint(repo, model_id),
            )


def _tag_fetch_hint(arch: str, tag: str) -> str:
    return (
        f'on a machine with internet run `python -c "import open_clip; '
        f"open_clip.create_model_and_transforms('{arch}', pretrained='{tag}')\"` and copy "
        "~/.cache/huggingface/hub (and ~/.cache/clip) here, or pass a checkpoint: open_clip:ARCH:/path/to/ckpt.pt"
    )


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """Spec -> (kind, arch, source): ("hub", None, "ORG/NAME"), ("dir", None, FOLDER), ("file", ARCH, PATH),
    ("tag", ARCH, TAG)."""
    if spec.startswith("open_clip:hf-hub:"):
        spec = spec[len("open_clip:") :]
    if spec.startswith("hf-hub:"):
        repo = spec[len("hf-hub:") :].strip()
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelNotAvailable(f"bad hf-hub id {spec!r}", hint="use hf-hub:ORG/NAME")
        return "hub", None, repo
    if spec.startswith("open_clip:local-dir:"):
        folder = spec[len("open_clip:local-dir:") :].strip()
        if not folder:
            raise ModelNotAvailable(f"open_clip spec {spec!r} names no folder", hint="use open_clip:local-dir:/path")
        return "dir", None, folder
    if not spec.startswith("open_clip:"):
        raise ModelNotAvailable(f"not an open_clip spec: {spec!r}", hint="use open_clip:ARCH:/path/ckpt.pt")
    arch, _, source = spec[len("open_clip:") :].partition(":")
    if not arch or not source:
        raise ModelNotAvailable(
            f"open_clip spec {spec!r} names no weights; medsearch never uses randomly initialised models",
            hint="use open_clip:ARCH:/path/to/checkpoint.pt or open_clip:ARCH:PRETRAINED_TAG",
        )
    looks_like_path = (
        "/" in source or "\\" in source or source.startswith((".", "~")) or source.lower().endswith(CHECKPOINT_SUFFIXES)
    )
    return ("file" if looks_like_path else "tag"), arch, source


def _check_arch(arch: str) -> None:
    import open_clip

    models = open_clip.list_models()
    if arch not in models:
        shown = ", ".join(models[:12])
        raise ModelNotAvailable(
            f"unknown open_clip architecture {arch!r}",
            hint=f"choose one of {len(models)} (e.g. {shown}, ...; full list: "
            '`python -c "import open_clip; print(open_clip.list_models())"`) '
            "or register a JSON config with open_clip.add_model_config(path)",
        )


def _resolve_tag(arch: str, tag: str, cache_dir: str | None) -> Path:
    """The cached weight file of a pretrained tag, or ModelNotAvailable. Never downloads."""
    import open_clip
    from open_clip.pretrained import download_pretrained_from_hf, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ModelNotAvailable(
            f"open_clip has no pretrained tag {tag!r} for {arch!r} (and it is not a checkpoint path)",
            hint=f"valid tags: {', '.join(tags) or 'none'}; or give a file: open_clip:{arch}:/path/ckpt.pt",
        )
    if cfg.get("file"):
        return Path(cfg["file"])
    if cfg.get("hf_hub"):
        model_id, filename = os.path.split(cfg["hf_hub"])
        try:
            with hub_offline():
                found = download_pretrained_from_hf(model_id, filename=filename or None, cache_dir=cache_dir)
            return Path(found)
        except Exception as e:  # not cached (LocalEntryNotFoundError wrapped in FileNotFoundError)
            raise ModelNotAvailable(
                f"weights for open_clip:{arch}:{tag} ({cfg['hf_hub']}) are not in the local cache",
                hint=_tag_fetch_hint(arch, tag),
            ) from e
    url = cfg.get("url", "")
    target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
    if url and target.is_file():
        return target
    raise ModelNotAvailable(
        f"weights for open_clip:{arch}:{tag} are not in the local cache ({target})",
        hint=_tag_fetch_hint(arch, tag),
    )


def _resolve_hub(repo: str, cache_dir: str | None) -> tuple[dict[str, Any], Path]:
    """(open_clip_config.json contents, cached checkpoint path) of an hf-hub repo, cache only."""
    import json

    from huggingface_hub import hf_hub_download
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        with hub_offline():
            cfg_path = hf_hub_download(repo, "open_clip_config.json", cache_dir=cache_dir, local_files_only=True)
            ckpt = download_pretrained_from_hf(repo, cache_dir=cache_dir)
    except Exception as e:
        raise ModelNotAvailable(
            f"hf-hub:{repo} (open_clip_config.json + weights) is not in the local Hugging Face cache",
            hint=_hub_fetch_hint(repo),
        ) from e
    with open(cfg_path, encoding="utf-8") as f:
        return json.load(f), Path(ckpt)


CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth",
                    "model.pth")  # fmt: skip  # open_clip's local-dir preference order


def _resolve_dir(folder: Path) -> tuple[dict[str, Any], Path]:
    """(open_clip_config.json contents, the checkpoint open_clip will load) of a local-dir folder."""
    import json

    hint = ("a local-dir folder holds open_clip_config.json, open_clip_model.safetensors and the tokenizer files "
            "(what `medsearch train --base hf-hub:ORG/NAME` writes)")
    cfg_path = folder / "open_clip_config.json"
    if not cfg_path.is_file():
        raise ModelNotAvailable(f"no open_clip_config.json in {folder}", hint=hint)
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise InvalidInput(f"{cfg_path} has no model_cfg", hint=hint)
    found = [p for ext in ("*.safetensors", "*.bin", "*.pth") for p in sorted(folder.glob(ext))]
    if not found:
        raise ModelNotAvailable(f"no weights in {folder} (open_clip looks for *.safetensors, *.bin, *.pth)", hint=hint)
    rank = {n: i for i, n in enumerate(CHECKPOINT_NAMES)}
    return cfg, min(found, key=lambda p: rank.get(p.name, len(rank)))  # stable: safetensors first, then by name


class OpenClipEncoder:
    """An open_clip model in one shared image/text space. Vectors are float32, unit norm."""

    shared_space = True

    def __init__(self, spec: str, device: str = "auto", amp: bool = True, cache_dir: str | None = None) -> None:
        package_dir("open_clip", "open_clip_torch")
        kind, arch, source = parse_spec(spec)
        self.device = pick_device(device)
        self.amp = amp
        self.open_clip_config: dict[str, Any] | None = None  # open_clip_config.json of hub/local-dir models
        if kind == "hub":
            self.open_clip_config, ckpt = _resolve_hub(source, cache_dir)
            name, pretrained, hint = f"hf-hub:{source}", None, _hub_fetch_hint(source)
            self.model_id = f"hf-hub:{source}"
            _check_text_repos(self.open_clip_config.get("model_cfg") or {}, self.model_id, cache_dir, False)
        elif kind == "dir":
            folder = Path(source).expanduser().resolve()
            self.open_clip_config, ckpt = _resolve_dir(folder)
            name, pretrained = f"local-dir:{folder}", None
            hint = f"check that {folder} holds an open_clip model (config, weights and tokenizer files)"
            self.model_id = f"open_clip:local-dir:{folder}"
            model_cfg = self.open_clip_config["model_cfg"]
            local_tok = bool((model_cfg.get("text_cfg") or {}).get("hf_tokenizer_name"))
            if local_tok and not any((folder / f).is_file() for f in TOKENIZER_FILES):
                raise ModelNotAvailable(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)})",
                                        hint="save the tokenizer beside the weights: "
                                        "open_clip.get_tokenizer(BASE).save_pretrained(FOLDER)")  # fmt: skip
            _check_text_repos(model_cfg, self.model_id, cache_dir, local_tok)
        elif kind == "file":
            assert arch is not None
            _check_arch(arch)
            ckpt = Path(source).expanduser().resolve()
            if not ckpt.is_file():
                raise ModelNotAvailable(
                    f"open_clip checkpoint {ckpt} does not exist",
                    hint=f"copy the checkpoint there, or use a cached tag: open_clip:{arch}:TAG "
                    f'(fetch one with: python -c "import open_clip; '
                    f"open_clip.create_model_and_transforms('{arch}', pretrained='TAG')\")",
                )
            name, pretrained, hint = arch, str(ckpt), "check that the file is an open_clip state dict for this ARCH"
            self.model_id = f"open_clip:{arch}:{ckpt}"
        else:
            assert arch is not None
            _check_arch(arch)
            ckpt = _resolve_tag(arch, source, cache_dir)
            name, pretrained, hint = arch, source, _tag_fetch_hint(arch, source)
            self.model_id = f"open_clip:{arch}:{source}"
        self._ckpt = ckpt
        self.weights_hash = weights_digest([ckpt])  # checkpoint bytes, hashed before loading them
        self._build(name, pretrained, cache_dir, hint)

    def _build(self, name: str, pretrained: str | None, cache_dir: str | None, hint: str) -> None:
        import open_clip
        import torch

        guard = _RandomInitGuard()
        root = logging.getLogger()
        root.addHandler(guard)
        try:
            with hub_offline():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name,
                    pretrained=pretrained,
                    device="cpu",
                    pretrained_image=False,  # never fetch tower weights: the checkpoint has them
                    pretrained_text=False,
                    cache_dir=cache_dir,
                )
                tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met objects that are not tensors
            raise InvalidInput(
                f"checkpoint {self._ckpt} holds pickled objects, not only tensors; it was refused, not executed "
                f"({str(e).splitlines()[0][:120]})",
                hint="load only trusted checkpoints: convert it to .safetensors, or re-save just the state dict",
            ) from None
        except (RuntimeError, KeyError, ValueError) as e:
            if "size mismatch" in str(e) or "Missing key" in str(e) or "Unexpected key" in str(e):
                raise InvalidInput(
                    f"checkpoint {self._ckpt} does not fit {name}: {str(e).splitlines()[0][:300]}",
                    hint=hint,
                ) from e
            raise ModelNotAvailable(f"could not load {self.model_id} offline: {e}", hint=hint) from e
        except OSError as e:  # transformers/hub: a text-tower config or tokenizer not cached
            raise ModelNotAvailable(f"could not load {self.model_id} offline: {e}", hint=hint) from e
        finally:
            root.removeHandler(guard)
        if guard.hits:
            raise ModelNotAvailable(f"open_clip built {self.model_id} without its weights ({guard.hits[0]})", hint=hint)
        model.eval().requires_grad_(False)
        self._model = model.to(self.device)
        self.transform = preprocess
        self._tokenizer = tokenizer
        self.text_max_tokens = int(getattr(tokenizer, "context_length", None) or 77)
        self._specials = self._special_token_count()
        dim = getattr(model.visual, "output_dim", None)
        if not isinstance(dim, int):
            size = getattr(model.visual, "image_size", (224, 224))
            size = size if isinstance(size, (tuple, list)) else (size, size)
            with torch.inference_mode():
                dim = int(model.encode_image(torch.zeros(1, 3, *size, device=self.device)).shape[-1])
        self.image_dim = self.text_dim = int(dim)

    # ---- identity

    def _autocast(self) -> Any:
        import torch

        if self.amp and self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ---- images

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> (3, H, W) float32 tensor (open_clip's val transform)."""
        return self.transform(pil_to_rgb(image))

    def _split_transform(self) -> tuple[list[Any], tuple[float, ...], tuple[float, ...]] | None:
        """(PIL-stage steps, mean, std) when the val transform ends in [ToTensor, Normalize]."""
        steps = list(getattr(self.transform, "transforms", []))
        if len(steps) < 2 or type(steps[-1]).__name__ != "Normalize" or "ToTensor" not in type(steps[-2]).__name__:
            return None
        return steps[:-2], tuple(float(v) for v in steps[-1].mean), tuple(float(v) for v in steps[-1].std)

    @property
    def uint8_input(self) -> bool:
        """True when ``preprocess_u8`` is available (the embedding pipeline then ships uint8 pixels)."""
        return self._split_transform() is not None

    def preprocess_u8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, H, W) uint8 tensor (resize + crop only); ``encode_image_batch`` does
        ToTensor's /255 and the normalisation on the device, with the same result."""
        import torch

        split = self._split_transform()
        if split is None:
            raise InvalidInput(f"{self.model_id}: its image transform cannot be split for uint8 input",
                               hint="use preprocess()")  # fmt: skip
        image = pil_to_rgb(image)
        for step in split[0]:
            image = step(image)
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())  # (H, W, 3)
        return x.permute(2, 0, 1).contiguous()  # (3, H, W) uint8

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        split = self._split_transform()
        assert split is not None
        mean = torch.tensor(split[1], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(split[2], device=x.device).view(1, 3, 1, 1)
        return (x.float().div_(255.0) - mean) / std

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) -> (n, d) float32, unit norm."""
        import torch

        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InvalidInput(
                f"image batch must have shape (n, 3, H, W), got {tuple(batch.shape)}",
                hint="stack tensors from encoder.preprocess(image)",
            )
        if batch.shape[0] == 0:
            return np.zeros((0, self.image_dim), dtype=np.float32)
        with torch.inference_mode(), self._autocast():
            x = batch.to(self.device, non_blocking=True)
            if x.dtype == torch.uint8:  # from preprocess_u8: normalise on the device
                x = self._normalize(x)
            v = self._model.encode_image(x)  # (n, d)
        return l2_normalize(v.float().cpu().numpy())

    # ---- texts

    def _special_token_count(self) -> int:
        hf = getattr(self._tokenizer, "tokenizer", None)
        if hf is not None and hasattr(hf, "num_special_tokens_to_add"):
            return int(hf.num_special_tokens_to_add(pair=False))
        return 2  # CLIP's SimpleTokenizer: <start_of_text> ... <end_of_text>

    def count_tokens(self, text: str) -> int:
        """Tokens in ``text`` without special tokens."""
        tok = self._tokenizer
        hf = getattr(tok, "tokenizer", None)
        if hf is not None:
            clean = getattr(tok, "clean_fn", None)
            return len(hf(clean(text) if clean else text, add_special_tokens=False)["input_ids"])
        return len(tok.encode(text))

    def split_for_context(self, text: str) -> list[str]:
        """Sentence-aligned chunks of ``text`` that each fit the text tower's context."""
        return chunk_by_tokens(text, max(1, self.text_max_tokens - self._specials), self.count_tokens)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """n strings -> (n, d) float32, unit norm; long texts chunked, token-weighted mean."""
        import torch

        if isinstance(texts, str):
            raise InvalidInput("encode_texts takes a list of strings, got one str", hint="wrap it: [text]")
        owner: list[int] = []
        weights: list[float] = []
        chunks: list[str] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidInput(
                    f"text #{i} is empty or not a string: {t!r}", hint="drop empty texts before encoding"
                )
            parts = self.split_for_context(t) or [t.strip()]
            chunks.extend(parts)
            owner.extend([i] * len(parts))
            weights.extend(float(max(1, self.count_tokens(p))) for p in parts)
        out = np.zeros((len(texts), self.text_dim), dtype=np.float32)  # (n, d)
        if not chunks:
            return out
        vecs = np.zeros((len(chunks), self.text_dim), dtype=np.float32)  # (m, d)
        for start in range(0, len(chunks), TEXT_BATCH):
            ids = self._tokenizer(chunks[start : start + TEXT_BATCH]).to(self.device)  # (b, ctx) int64
            with torch.inference_mode(), self._autocast():
                v = self._model.encode_text(ids)  # (b, d)
            vecs[start : start + len(ids)] = v.float().cpu().numpy()
        vecs = l2_normalize(vecs) * np.asarray(weights, dtype=np.float32)[:, None]
        np.add.at(out, owner, vecs)
        return l2_normalize(out)
