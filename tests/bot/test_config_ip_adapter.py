"""An IP-Adapter's `weight_name` is refused unless it is a .safetensors file: diffusers loads any
other file with torch.load, and a pickle runs whatever code it carries when opened."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from bot.config import ConfigError, parse_config
from generation.ip_adapter import resolve_adapter_source
from generation.settings import IPAdapterSpec

TINY = {"name": "tiny", "source": "tiny", "base_resolution": 128}


class _Payload:
    """Unpickling this writes a file: the proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (Path.write_text, (str(self.marker), "ran"))  # type: ignore[return-value]


def _adapter_folder(tmp_path: Path, weight_name: str) -> tuple[Path, Path]:
    """A folder laid out like h94/IP-Adapter whose weights file is a pickle that writes a file."""
    folder = tmp_path / "ip-adapter"
    (folder / "models").mkdir(parents=True)
    marker = tmp_path / "pickle-ran"
    (folder / "models" / weight_name).write_bytes(pickle.dumps(_Payload(marker)))
    return folder, marker


@pytest.mark.parametrize("weight_name", ["ip-adapter_sd15.bin", "x.pt", "x.ckpt", "x.PTH", "x"])
def test_pickled_adapter_weights_are_refused_at_start_up(tmp_path: Path, weight_name: str):
    folder, marker = _adapter_folder(tmp_path, weight_name)
    table = {"family": "sd", "source": str(folder), "weight_name": weight_name}
    with pytest.raises(ConfigError) as caught:
        parse_config({"generation": {"models": [TINY], "ip_adapters": [table]}})
    message = str(caught.value)
    assert message.startswith("generation.ip_adapters.weight_name:"), message
    assert repr(weight_name) in message and "convert it to .safetensors" in message
    assert not marker.exists()


def test_the_engine_refuses_them_too_before_loading_anything(tmp_path: Path):
    # Settings made in code skip the config's checks; the adapter's loader checks again.
    folder, marker = _adapter_folder(tmp_path, "ip-adapter_sd15.bin")
    spec = IPAdapterSpec(source=str(folder), weight_name="ip-adapter_sd15.bin")
    with pytest.raises(ValueError, match=r"'ip-adapter_sd15\.bin' is not a \.safetensors file"):
        resolve_adapter_source(spec, tmp_path / "cache")
    assert not marker.exists()
    # The shipped default is a safetensors file and passes.
    fine = IPAdapterSpec(source="h94/IP-Adapter")
    assert resolve_adapter_source(fine, tmp_path / "cache").weight_name.endswith(".safetensors")
