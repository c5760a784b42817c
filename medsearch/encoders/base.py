"""The Encoder protocol: images and texts in, L2-normalised float32 vectors out.

An encoder exposes two embedding spaces, ``image`` and ``text``. When ``shared_space`` is
True they are one space (CLIP-style) and a text query can search the image index; when it
is False (the frozen towers) only image->image and text->text search make sense.

Preprocessing is split from encoding so the embedding pipeline can decode and preprocess
in DataLoader workers and batch tensors onto the device:

    x = enc.preprocess(pil_image)            # (3, H, W) float32 tensor, CPU
    v = enc.encode_image_batch(torch.stack)  # (n, image_dim) float32 numpy, unit norm
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from PIL import Image


@runtime_checkable
class Encoder(Protocol):
    model_id: str  # registry id, e.g. "lite", "towers", "open_clip:ViT-B-32:/path/ckpt.pt"
    weights_hash: str  # sha256 prefix of the weights; bound into every index manifest
    image_dim: int
    text_dim: int
    shared_space: bool
    text_max_tokens: int  # the text tower's context; longer text is split by the caller
    device: str

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """PIL image (any mode) -> (3, H, W) float32 tensor ready for ``encode_image_batch``."""

    def encode_image_batch(self, batch: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) tensor -> (n, image_dim) float32, rows L2-normalised."""

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """n strings -> (n, text_dim) float32, rows L2-normalised."""


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation in float32; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def image_preprocessor(encoder: Encoder, uint8: bool = True) -> Any:
    """The preprocessing the embedding pipelines feed ``encode_image_batch``: the encoder's uint8 one
    (``preprocess_u8``: 4x less to copy between processes and to the GPU, normalised on the device)
    when it has one and ``uint8`` allows it, else its float ``preprocess``."""
    if uint8 and getattr(encoder, "uint8_input", False):
        return encoder.preprocess_u8  # type: ignore[attr-defined]
    return encoder.preprocess


def encode_images(encoder: Encoder, images: list[Image.Image]) -> np.ndarray:
    """Convenience for a few query images: preprocess and encode in one batch."""
    import torch

    batch = torch.stack([encoder.preprocess(im) for im in images])
    return encoder.encode_image_batch(batch)


def pick_device(device: str = "auto") -> str:
    """Resolve ``auto`` to cuda when available, else cpu."""
    if device != "auto":
        return device
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "cpu"
