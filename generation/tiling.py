"""Seamless tiling (Midjourney's `--tile`): wrap-around padding in the UNet and the VAE."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


@contextlib.contextmanager
def seamless_tiling(*modules: Any) -> Iterator[None]:
    """Circular padding on every padded Conv2d of `modules`, restored on exit.

    With wrap-around padding the UNet and the VAE decoder treat the image as a torus, so its
    left/right and top/bottom edges continue each other (Midjourney's `--tile`). Pipelines are
    shared between jobs, so the original padding is always put back.
    """
    import torch

    changed: list[tuple[torch.nn.Conv2d, PaddingMode]] = []
    try:
        for module in modules:
            if module is None:
                continue
            for layer in module.modules():
                if isinstance(layer, torch.nn.Conv2d) and any(p > 0 for p in _pads(layer)):
                    changed.append((layer, layer.padding_mode))
                    layer.padding_mode = "circular"
        yield
    finally:
        for layer, mode in changed:
            layer.padding_mode = mode


def _pads(layer: Any) -> tuple[int, ...]:
    padding = layer.padding
    if isinstance(padding, str):
        return (1,) if padding == "same" else (0,)
    return tuple(padding)
