"""The trainable EfficientNet tail of ``--unfreeze N`` (lite): the last N blocks + the head conv.

The frozen prefix (stem + blocks[:start]) is deterministic per cached view, so its output
activations are cached (``prefix_fn``) and only ``tail_forward`` runs per step.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from medsearch.errors import InvalidInput

if TYPE_CHECKING:  # pragma: no cover
    import torch


def tail_modules(net: Any, n: int) -> tuple[int, list[Any]]:
    """(first trainable block index, trainable modules) of the last ``n`` EfficientNet blocks + head."""
    blocks = net._blocks
    if not 1 <= n <= len(blocks):
        raise InvalidInput(
            f"--unfreeze {n} is out of range", hint=f"EfficientNet-Lite0 has {len(blocks)} blocks: use 1..{len(blocks)}"
        )
    start = len(blocks) - n
    return start, [*blocks[start:], net._conv_head, net._bn1]


def prefix_fn(net: Any, start: int) -> Callable[[torch.Tensor], np.ndarray]:
    """Frozen stem + blocks[:start] -> activations (n, C, H, W) as float16 numpy (cache format)."""
    import torch

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            dev = next(net.parameters()).device
            h = net._swish(net._bn0(net._conv_stem(x.to(dev))))
            for idx, block in enumerate(net._blocks[:start]):
                rate = net._global_params.drop_connect_rate
                h = block(h, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
            return h.to(torch.float16).cpu().numpy()

    return run


def tail_forward(net: Any, start: int, h: torch.Tensor) -> torch.Tensor:
    """Trainable blocks[start:] + head conv + global pool: (n, C, H, W) -> (n, 1280)."""
    for idx in range(start, len(net._blocks)):
        rate = net._global_params.drop_connect_rate
        h = net._blocks[idx](h, drop_connect_rate=rate * idx / len(net._blocks) if rate else rate)
    h = net._swish(net._bn1(net._conv_head(h)))
    return h.mean(dim=(2, 3))


def in_tail(key: str, start: int) -> bool:
    """Is a state-dict key of EfficientNet part of blocks[start:] or the head conv/bn?"""
    m = re.match(r"_blocks\.(\d+)\.", key)
    if m:
        return int(m.group(1)) >= start
    return key.startswith(("_conv_head.", "_bn1."))
