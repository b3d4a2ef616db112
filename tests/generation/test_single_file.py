"""Community checkpoints: the tiny models written as one original-layout .safetensors file and
loaded through the engine's single-file path (from_single_file with a local config folder)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import torch

from generation.checkpoint_layout import original_state_dict, save_single_file
from generation.engine import DiffusersEngine, create_engine
from generation.settings import EngineSettings, ModelSpec
from generation.single_file import check_loadable
from generation.tiny import TINY_SD_DIR, build_tiny_sdxl
from tests.generation.helpers import imagine, max_diff


def _config_only(folder: Path, target: Path) -> Path:
    """The folder without its weights: what an owner downloads with `--include '*.json' '*.txt'`."""
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(target.rglob("*.safetensors"))
    return target


@pytest.fixture(scope="module")
def checkpoints(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("single-file")
    # SDXL's two text encoders differ in width, as the real ones (768, 1280) do.
    build_tiny_sdxl(root / "xl", text_encoder_2_width=48)
    paths = {"sd": tiny_cache / TINY_SD_DIR, "xl": root / "xl"}
    for name in ("sd", "xl"):
        pipe = DiffusionPipeline.from_pretrained(paths[name])
        paths[f"{name}-file"] = save_single_file(pipe, root / f"{name}.safetensors")
        paths[f"{name}-config"] = _config_only(paths[name], root / f"{name}-config")
    return paths


def _engine(tiny_cache: Path, *models: ModelSpec) -> DiffusersEngine:
    return create_engine(
        EngineSettings(
            models=models,
            default_model=models[0].name,
            clip_model=str(tiny_cache / "tiny-clip"),
            cache_dir=tiny_cache,
            device="cpu",
            local_files_only=True,
        )
    )


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert set(left) == set(right)
    for key, value in left.items():
        assert torch.equal(value, right[key]), key


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_single_file_loads_the_same_model_as_its_folder(
    tiny_cache: Path,
    checkpoints: dict[str, Path],
    family: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = "xl" if family == "sdxl" else "sd"
    file_spec = ModelSpec(
        "file",
        str(checkpoints[f"{key}-file"]),
        base_resolution=128,
        family=family,
        config=str(checkpoints[f"{key}-config"]),
    )
    folder_spec = ModelSpec("folder", str(checkpoints[key]), base_resolution=128, family=family)
    engine = _engine(tiny_cache, file_spec, folder_spec)

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("single-file loading tried the network")

    # The hub is the edge faked here: any connection attempt fails the test.
    with monkeypatch.context() as patched:
        patched.setattr(socket.socket, "connect", no_network)
        from_file = engine.pipelines("file")[0]
    from_folder = engine.pipelines("folder")[0]
    assert type(from_file) is type(from_folder)
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        _same_weights(getattr(from_file, name), getattr(from_folder, name))
    request = imagine(num_candidates=1, num_kept=1, steps=3)
    image = engine.generate(request.with_changes(model="file")).images[0]
    reference = engine.generate(request.with_changes(model="folder")).images[0]
    assert max_diff(image, reference) <= 1


def test_checkpoint_has_the_original_key_layout(checkpoints: dict[str, Path]) -> None:
    from safetensors import safe_open

    with safe_open(str(checkpoints["sd-file"]), "pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
    with safe_open(str(checkpoints["xl-file"]), "pt") as handle:
        keys = set(handle.keys())
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys


def test_pickled_checkpoint_loads_only_when_allowed(
    tiny_cache: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import DiffusionPipeline

    ckpt = tmp_path / "dreambooth.ckpt"
    pipe = DiffusionPipeline.from_pretrained(checkpoints["sd"])
    torch.save({"state_dict": original_state_dict(pipe)}, ckpt)
    spec = ModelSpec("pickled", str(ckpt), 128, config=str(checkpoints["sd-config"]))
    with pytest.raises(ValueError, match=r"^models.source: .*'pickled'.*dreambooth.ckpt.*run any"):
        _engine(tiny_cache, spec)
    allowed = _engine(tiny_cache, ModelSpec(**{**spec.__dict__, "allow_pickle": True}))
    _same_weights(allowed.pipelines("pickled")[0].unet, pipe.unet)


def test_bad_single_files_are_named_with_the_reason(
    tiny_cache: Path, checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    config = str(checkpoints["sd-config"])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(
        ValueError, match=r"^models.source: 'b': broken.safetensors is not a usable"
    ):
        _engine(tiny_cache, ModelSpec("b", str(broken), config=config))
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ValueError, match=r"^models.source: 'm': .*missing.safetensors does not"):
        _engine(tiny_cache, ModelSpec("m", str(missing), config=config))
    file = str(checkpoints["sd-file"])
    with pytest.raises(ValueError, match=r"^models.config: model 'n' is a single file") as caught:
        _engine(tiny_cache, ModelSpec("n", file))
    # The message says what to provide and how to get it on a connected machine.
    assert "tokenizers and scheduler; no weights" in str(caught.value)
    assert (
        "hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --include '*.json' "
        "--include '*.txt'"
    ) in str(caught.value)
    # The loader itself refuses the same, should settings reach it unvalidated.
    with pytest.raises(ValueError, match=r"^models.config: model 'n' is a single file"):
        check_loadable(ModelSpec("n", file))
    with pytest.raises(ValueError, match=r"^models.source: model 'p' is a pickled checkpoint"):
        check_loadable(ModelSpec("p", str(tmp_path / "p.ckpt"), config=config))
    with pytest.raises(ValueError, match=r"^models.config: model 'x' is family 'sdxl' but"):
        _engine(tiny_cache, ModelSpec("x", file, family="sdxl", config=config))
    with pytest.raises(ValueError, match=r"^models.config: model 'w': .* is not a diffusers"):
        _engine(tiny_cache, ModelSpec("w", file, config=str(tmp_path)))
