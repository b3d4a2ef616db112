"""LoRA and ControlNet settings: start-up validation, family matching, per-job checks and the
cheap listings the bot shows (no torch needed for any of it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from generation.contract import InputImage, InputRole, LoraWeight
from generation.settings import ControlNetSpec, EngineSettings, LoraSpec, ModelSpec, Preprocessor
from tests.generation.helpers import imagine

MODELS = (
    ModelSpec("sd15", "tiny", 512, family="sd", description="the classic"),
    ModelSpec("xl", "tiny-sdxl", 1024, family="sdxl"),
)


def _lora_file(path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({"unet.down.lora_A.weight": torch.zeros(2, 2)}, str(path))
    return path


def _settings(**changes: object) -> EngineSettings:
    values: dict[str, object] = {"models": MODELS, "default_model": "sd15"}
    values.update(changes)
    return EngineSettings(**values)  # type: ignore[arg-type]


def test_listings_follow_the_models_family(tmp_path: Path) -> None:
    ink = LoraSpec("ink", str(_lora_file(tmp_path / "ink.safetensors")), description="ink wash")
    xl = LoraSpec("xl-detail", str(_lora_file(tmp_path / "xl.safetensors")), family="sdxl")
    canny = ControlNetSpec("canny", "lllyasviel/sd-controlnet-canny", description="edges")
    settings = _settings(loras=(ink, xl), controlnets=(canny,))
    settings.validate()
    assert settings.loras_for("sd15") == (ink,)
    assert settings.loras_for("xl") == (xl,)
    assert settings.controlnets_for() == (canny,)
    assert settings.controlnets_for("xl") == ()
    assert settings.model("sd15").description == "the classic"


def test_a_lora_or_controlnet_no_model_can_use_is_refused(tmp_path: Path) -> None:
    sd_only = (MODELS[0],)
    lora = LoraSpec("xl-detail", str(_lora_file(tmp_path / "xl.safetensors")), family="sdxl")
    with pytest.raises(ValueError, match=r"^loras.family: 'xl-detail' is for sdxl models, but no"):
        _settings(models=sd_only, loras=(lora,)).validate()
    depth = ControlNetSpec("depth", "x/y", family="sdxl", preprocessor=Preprocessor.DEPTH)
    with pytest.raises(ValueError, match=r"^controlnets.family: 'depth' is for sdxl models"):
        _settings(models=sd_only, controlnets=(depth,)).validate()
    with pytest.raises(ValueError, match=r"^loras.family: 'odd' has 'sd3'"):
        _settings(loras=(LoraSpec("odd", "a/b", family="sd3"),)).validate()


def test_bad_lora_files_are_named_with_the_reason(tmp_path: Path) -> None:
    missing = LoraSpec("gone", str(tmp_path / "gone.safetensors"))
    with pytest.raises(ValueError, match=r"^loras.source: 'gone': .*gone.safetensors does not"):
        _settings(loras=(missing,)).validate()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(_lora_file(tmp_path / "whole.safetensors").read_bytes()[:20])
    with pytest.raises(ValueError, match=r"^loras.source: 'cut': cut.safetensors is not a usable"):
        _settings(loras=(LoraSpec("cut", str(truncated)),)).validate()
    pickled = tmp_path / "old.pt"
    pickled.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match=r"^loras.source: 'old' is a pickled file .*old.pt"):
        _settings(loras=(LoraSpec("old", str(pickled)),)).validate()
    import torch
    from safetensors.torch import save_file

    model = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, str(model))
    with pytest.raises(ValueError, match=r"holds no LoRA weights"):
        _settings(loras=(LoraSpec("full", str(model)),)).validate()


def test_names_weights_and_preprocessors_are_checked(tmp_path: Path) -> None:
    file = str(_lora_file(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"^loras.name: 'a' is empty or given twice"):
        _settings(loras=(LoraSpec("a", file), LoraSpec("a", file))).validate()
    with pytest.raises(ValueError, match=r"^loras.default_weight: 'a' has 3"):
        _settings(loras=(LoraSpec("a", file, default_weight=3.0),)).validate()
    odd = ControlNetSpec("pose", "x/y", preprocessor="openpose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^controlnets.preprocessor: 'pose' has 'openpose'"):
        _settings(controlnets=(odd,)).validate()


def test_a_job_asking_for_the_wrong_family_is_refused(tmp_path: Path) -> None:
    lora = LoraSpec("xl-detail", str(_lora_file(tmp_path / "xl.safetensors")), family="sdxl")
    canny = ControlNetSpec("canny", "x/y")
    settings = _settings(loras=(lora,), controlnets=(canny,))
    settings.check_add_ons(imagine(model="xl", loras=(LoraWeight("xl-detail", 0.5),)))
    with pytest.raises(ValueError, match=r"^lora: 'xl-detail' is made for sdxl models, but"):
        settings.check_add_ons(imagine(model="sd15", loras=(LoraWeight("xl-detail", 1.0),)))
    control = (InputImage(InputRole.CONTROL, Image.new("RGB", (8, 8))),)
    with pytest.raises(ValueError, match=r"^controlnet: 'canny' is made for sd models"):
        settings.check_add_ons(imagine(model="xl", controlnet="canny", inputs=control))
    with pytest.raises(ValueError, match=r"^lora: unknown LoRA 'nope'; offered: xl-detail"):
        settings.check_add_ons(imagine(model="xl", loras=(LoraWeight("nope", 1.0),)))


def test_request_with_loras_survives_json() -> None:
    request = imagine(loras=(LoraWeight("ink", 0.8), LoraWeight("paper", 1.5)))
    assert type(request).from_json(request.to_json()).loras == request.loras


def test_settings_and_lora_helpers_import_without_torch() -> None:
    code = (
        "import sys; import generation.settings, generation.lora, generation.addons;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
