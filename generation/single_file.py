"""Community checkpoints: a model whose `source` is one .safetensors file.

diffusers' `from_single_file` converts the original layout (generation.checkpoint_layout) into
its own modules. What the file does not say (component configs, tokenizers, scheduler) it
would otherwise fetch from the hub; here it always comes from the model's `config`, a local
diffusers folder of the same family, and the load runs with `local_files_only`, so a server
with no hub access loads the checkpoint the same way. Pickled checkpoints (.ckpt) can run code
when opened and load only for a model that sets `allow_pickle`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from generation.settings import ModelSpec, check_single_file_safety

log = logging.getLogger(__name__)


def load_single_file(spec: ModelSpec, dtype: Any, **kwargs: Any) -> Any:
    """The text-to-image pipeline of a single-file model (`spec.single_file`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(spec.source).expanduser()
    check_loadable(spec)
    pipeline = StableDiffusionXLPipeline if spec.family == "sdxl" else StableDiffusionPipeline
    log.info(
        "loading single-file model %s (%s) with the configs of %s", spec.name, path, spec.config
    )
    return pipeline.from_single_file(
        str(path),
        config=str(Path(spec.config).expanduser()),
        local_files_only=True,
        torch_dtype=dtype,
        **kwargs,
    )


def check_loadable(spec: ModelSpec) -> None:
    """The refusals that must hold even if settings were never validated (ValueError)."""
    check_single_file_safety(spec)
