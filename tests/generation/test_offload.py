"""cpu_offload's hooks, run on the CPU with the CPU standing in for the GPU (`offload_stand_in`):
which module is moved to the device when, for a job, a variation (whose picture the engine
encodes itself) and an edit on a separately loaded inpainting UNet; the images are those of
the engine without offloading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from generation import requests
from generation.engine import create_engine
from generation.settings import EngineSettings, ModelSpec
from tests.generation.helpers import assert_same_picture, imagine, tiny_settings

DEDICATED = "tiny-inpainting"


@pytest.fixture(scope="module")
def settings(tiny_cache: Path) -> EngineSettings:
    return tiny_settings(
        tiny_cache,
        ModelSpec("tiny", "tiny", base_resolution=128),
        ModelSpec(DEDICATED, "tiny", base_resolution=128, inpaint_source="tiny-inpaint"),
        cpu_offload=True,
    )


class Moves:
    """Records every module an offload hook brings to the device, and every one sent back."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from accelerate.hooks import CpuOffload, UserCpuOffloadHook  # type: ignore[import-untyped]

        self.to_device: list[Any] = []
        self.sent_back: list[Any] = []
        pre_forward = CpuOffload.pre_forward
        offload = UserCpuOffloadHook.offload

        def on_pre_forward(hook: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
            self.to_device.append(module)
            return pre_forward(hook, module, *args, **kwargs)

        def on_offload(hook: Any) -> None:
            self.sent_back.append(hook.model)
            offload(hook)

        monkeypatch.setattr(CpuOffload, "pre_forward", on_pre_forward)
        monkeypatch.setattr(UserCpuOffloadHook, "offload", on_offload)

    def order(self) -> list[Any]:
        """Modules in the order they first came to the device."""
        seen: list[Any] = []
        for module in self.to_device:
            if not any(module is m for m in seen):
                seen.append(module)
        return seen


def picture() -> Image.Image:
    cells = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((64, 64), Image.Resampling.BILINEAR)


def test_cpu_offload_runs_its_hooks_with_a_stand_in_device(
    settings: EngineSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = create_engine(settings, offload_stand_in=True)
    assert engine.cpu_offload
    # Without the stand-in the setting is ignored on a CPU (the same config serves both).
    assert not create_engine(settings).cpu_offload
    plain_engine = create_engine(settings)
    moves = Moves(monkeypatch)

    job = imagine(steps=2, num_candidates=2, num_kept=1)
    offloaded = engine.generate(job)
    pipe = engine._loaded["tiny"].text2img
    for name in ("text_encoder", "unet", "vae"):
        hook = getattr(pipe, name)._hf_hook
        assert str(hook.execution_device).startswith("cpu"), name
    # Each module of the model comes to the device when it runs, in the pipeline's order.
    assert moves.order() == [pipe.text_encoder, pipe.unet, pipe.vae]
    monkeypatch.undo()
    assert_same_picture(offloaded.images[0], plain_engine.generate(job).images[0])

    # A variation: the engine's own VAE encode goes through the VAE's hook too, first.
    moves = Moves(monkeypatch)
    varied = requests.variation_request(job, picture(), strength=0.6, seed=4)
    offloaded = engine.generate(varied)
    assert moves.order() == [pipe.vae, pipe.text_encoder, pipe.unet]
    monkeypatch.undo()
    assert_same_picture(offloaded.images[0], plain_engine.generate(varied).images[0])

    # An edit painted by the inpainting UNet loaded beside the model: hooked after the text
    # encoder and sent back to the CPU once the edit is over.
    moves = Moves(monkeypatch)
    zoom = requests.zoom_request(imagine(model=DEDICATED, steps=2), picture(), factor=2.0, seed=1)
    offloaded = engine.generate(zoom)
    loaded = engine._loaded[DEDICATED]
    inpaint_unet = loaded.inpaint.unet
    assert inpaint_unet is not loaded.text2img.unet
    order = moves.order()
    assert order.index(loaded.text2img.text_encoder) < order.index(inpaint_unet)
    assert not any(m is loaded.text2img.unet for m in order)
    assert [m for m in moves.sent_back if m is inpaint_unet] == [inpaint_unet]
    monkeypatch.undo()
    assert_same_picture(offloaded.images[0], plain_engine.generate(zoom).images[0])
