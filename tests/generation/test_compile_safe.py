"""A compiled UNet and VAE decoder keep one graph per kind of job: a sequence of different jobs
(plain, --tile, an image prompt through the IP-Adapter, a LoRA, plain again) compiles once per
kind, and the same kinds again, with other weights, pictures and LoRAs, compile nothing more.

torch.compile runs on the CPU with a backend that counts the graphs Dynamo hands it and runs
them as traced (no kernels generated): a recompilation is a new graph, whatever the backend.
The images of the compiled engine must be those of the eager one, LoRAs and adapter included.
To see why something compiled again: TORCH_LOGS=recompiles.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from generation.contract import GenerationRequest, InputImage, InputRole, LoraWeight
from generation.engine import DiffusersEngine, create_engine
from generation.settings import EngineSettings, LoraSpec
from generation.tiny import TINY_SD_DIR, build_tiny_lora
from tests.generation.helpers import assert_same_picture, imagine, max_diff, tiny_settings

COUNTING_BACKEND = "imagine_bot_counting"
# Graph ids (frame/attempt, as Dynamo numbers them) in the order the backend got them.
compiled: list[str] = []

RED = Image.new("RGB", (64, 64), (200, 30, 30))
BLUE = Image.new("RGB", (48, 64), (30, 40, 210))


def _counting_backend(graph: torch.fx.GraphModule, example_inputs: list[object]) -> object:
    compiled.append(str(torch._guards.CompileContext.current_compile_id()))
    return graph.forward


def _register() -> None:
    from torch._dynamo import list_backends, register_backend

    if COUNTING_BACKEND not in list_backends(exclude_tags=()):
        register_backend(_counting_backend, name=COUNTING_BACKEND)


@pytest.fixture(scope="module")
def lora_settings(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> EngineSettings:
    folder = tmp_path_factory.mktemp("loras")
    ink = build_tiny_lora(folder / "ink.safetensors", tiny_cache / TINY_SD_DIR, seed=1)
    paper = build_tiny_lora(folder / "paper.safetensors", tiny_cache / TINY_SD_DIR, seed=2)
    return tiny_settings(
        tiny_cache, loras=(LoraSpec("ink", str(ink)), LoraSpec("paper", str(paper)))
    )


@pytest.fixture(scope="module")
def engines(lora_settings: EngineSettings) -> Iterator[tuple[DiffusersEngine, DiffusersEngine]]:
    """(compiled, eager) engines over the same tiny model and LoRAs."""
    import dataclasses

    _register()
    compiled_settings = dataclasses.replace(
        lora_settings, compile_unet=True, compile_vae=True, compile_backend=COUNTING_BACKEND
    )
    fast = create_engine(compiled_settings)
    fast.warm_up()
    # The engine lets a graph that fails to compile run eagerly (a bot keeps serving); here a
    # failure must fail the test, not pass as a job that compiled nothing.
    suppress = torch._dynamo.config.suppress_errors
    torch._dynamo.config.suppress_errors = False
    yield fast, create_engine(lora_settings)
    torch._dynamo.config.suppress_errors = suppress
    # Dynamo's caches hold the compiled modules: let them go with the module's tests.
    torch._dynamo.reset()


def _picture(role: InputRole, image: Image.Image, weight: float) -> InputImage:
    return InputImage(role, image, weight=weight, source="attachment:p.png", sha256="ab" * 32)


def _job(kind: str, variant: int) -> GenerationRequest:
    """A job of `kind`; `variant` 1 and 2 differ in every per-job value (seed, prompt, weights,
    pictures, which LoRAs) but not in kind."""
    first = variant == 1
    # One candidate of two steps: graphs and pictures are what this is about, not the ranking.
    base = imagine(
        num_candidates=1,
        num_kept=1,
        steps=2,
        seed=3 if first else 8,
        prompt="a lighthouse at dusk" if first else "a red barn in the snow",
    )
    if kind == "plain":
        return base
    if kind == "tile":
        return base.with_changes(tile=True)
    if kind == "image prompt":
        picture = _picture(InputRole.IMAGE_PROMPT, RED if first else BLUE, 1.0 if first else 2.5)
        return base.with_changes(inputs=(picture,))
    if kind == "image prompt and style":
        return base.with_changes(
            inputs=(
                _picture(InputRole.IMAGE_PROMPT, BLUE, 0.5),
                _picture(InputRole.STYLE, RED, 300.0),
            )
        )
    if kind == "lora":
        loras = (LoraWeight("ink", 1.0),) if first else (LoraWeight("paper", 0.6),)
        return base.with_changes(loras=loras)
    if kind == "two loras":
        return base.with_changes(loras=(LoraWeight("ink", 0.4), LoraWeight("paper", 1.2)))
    raise ValueError(kind)


def test_job_kinds_compile_once_and_never_again(
    engines: tuple[DiffusersEngine, DiffusersEngine],
) -> None:
    fast, eager = engines
    # From a clean start whatever ran before: no graph compiled, no LoRA loaded.
    torch._dynamo.reset()
    for name in ("ink", "paper"):
        fast.unload_lora("tiny", name)
    compiled.clear()
    # (job, graphs it compiled), in order.
    new_graphs: list[tuple[str, int]] = []

    def run(kind: str, variant: int) -> Image.Image:
        before = len(compiled)
        request = _job(kind, variant)
        image = fast.generate(request).images[0]
        new_graphs.append((f"{kind} ({variant})", len(compiled) - before))
        # Compiled or not, LoRAs fused or not, adapter scales in tensors or not: one picture.
        assert_same_picture(image, eager.generate(request).images[0])
        return image

    # Warm-up: each kind once, as the sequence has them.
    plain = run("plain", 1)
    run("tile", 1)
    run("image prompt", 1)
    lora = run("lora", 1)
    run("plain", 1)
    warm = len(compiled)
    # The kinds that change the computation did get graphs of their own (so counting works):
    # the first job (UNet and VAE decoder), --tile (padding in both), the adapter (UNet).
    counts = [count for _, count in new_graphs]
    assert counts[0] >= 2 and counts[1] >= 2 and counts[2] >= 1, new_graphs
    # A LoRA runs in the plain graph (it is in the weights, not in the graph), and so does the
    # plain job after it.
    assert counts[3:] == [0, 0], new_graphs
    assert max_diff(plain, lora) > 20

    # The same kinds again with other values: other pictures and weights, a style reference
    # beside an image prompt, a LoRA loaded for the first time, two LoRAs at once.
    for kind in (
        "plain",
        "tile",
        "image prompt",
        "image prompt and style",
        "lora",
        "two loras",
        "plain",
        "lora",
        "tile",
    ):
        run(kind, 2)
    assert len(compiled) == warm, (
        f"compiled again after the warm-up: {compiled[warm:]}; new graphs per job: {new_graphs}"
    )
    # A bounded set of graphs, whatever the number of jobs: here one per kind and module.
    assert warm <= 8, compiled


def _state_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_fused_projections_give_the_same_pictures_loras_and_adapter_included(
    lora_settings: EngineSettings, engines: tuple[DiffusersEngine, DiffusersEngine]
) -> None:
    import dataclasses

    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    _, eager = engines
    fused = create_engine(dataclasses.replace(lora_settings, fuse_qkv_projections=True))
    unet = fused.pipelines()[0].unet
    assert all(isinstance(p, FusedAttnProcessor2_0) for p in unet.attn_processors.values())
    for kind in ("plain", "lora", "two loras", "image prompt", "tile", "plain"):
        request = _job(kind, 2)
        assert_same_picture(fused.generate(request).images[0], eager.generate(request).images[0])


def test_a_fused_lora_leaves_the_unet_exactly_as_it_was(
    engines: tuple[DiffusersEngine, DiffusersEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Added into the weights for the call and copied back after, bit for bit, with peft's
    layers in place again, also when the call fails half-way."""
    from peft.tuners.lora import LoraLayer

    fast, _ = engines
    fast.generate(_job("two loras", 2))  # loads both LoRAs: their weights are in the state
    unet = fast.pipelines()[0].unet
    layers = sum(isinstance(m, LoraLayer) for m in unet.modules())
    before = _state_digest(unet)
    fast.generate(_job("lora", 1))
    fast.generate(_job("two loras", 2))
    assert _state_digest(unet) == before
    assert sum(isinstance(m, LoraLayer) for m in unet.modules()) == layers > 0

    def out_of_memory(*args: object, **kwargs: object) -> object:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated, after the steps)")

    # Fails after the denoising, inside the call the LoRAs are fused for.
    monkeypatch.setattr(fast, "_decode", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        fast.generate(_job("two loras", 1))
    assert _state_digest(unet) == before
    assert sum(isinstance(m, LoraLayer) for m in unet.modules()) == layers


failed: list[str] = []


def _failing_backend(graph: torch.fx.GraphModule, example_inputs: list[object]) -> object:
    failed.append(str(torch._guards.CompileContext.current_compile_id()))
    raise RuntimeError("no C compiler (simulated)")


def test_a_graph_that_fails_to_compile_runs_eagerly(
    lora_settings: EngineSettings, engines: tuple[DiffusersEngine, DiffusersEngine]
) -> None:
    """A compiler that fails on the serving box (say, no C compiler for Triton) costs the
    speed-up, not the jobs: the graph runs eagerly and the reason is logged.

    The VAE decoder is the compiled module here: the UNet and the decoder share the setting
    that lets a failed graph run eagerly (generation/compiled.py), and after a failure Dynamo
    traces each nested function again on its own, 7 times for the tiny decoder against 23 for
    the tiny UNet."""
    import dataclasses

    from torch._dynamo import list_backends, register_backend

    _, eager = engines
    if "imagine_bot_failing" not in list_backends(exclude_tags=()):
        register_backend(_failing_backend, name="imagine_bot_failing")
    suppress = torch._dynamo.config.suppress_errors
    broken = create_engine(
        dataclasses.replace(lora_settings, compile_vae=True, compile_backend="imagine_bot_failing")
    )
    try:
        request = _job("plain", 1)
        failed.clear()
        assert_same_picture(broken.generate(request).images[0], eager.generate(request).images[0])
        assert failed, "the compiler was never asked for a graph"
    finally:
        torch._dynamo.config.suppress_errors = suppress
        # Forget the failed frames, so that the other tests compile them afresh.
        torch._dynamo.reset()
