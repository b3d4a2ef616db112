"""LoRAs: loaded once per model through diffusers' `load_lora_weights` (peft), switched per job.

A model's pipelines share one UNet and text encoder(s) (img2img and ControlNet pipelines come
from `from_pipe`), so a LoRA loaded into the text-to-image pipeline is there for all of them.
The one exception is a model's dedicated 9-channel inpainting UNet (`inpaint_source`), which
zooms, pans and region edits paint with: it gets the LoRA's UNet weights loaded into it as well
(`add_unet`), under the same adapter name, so an edit of a LoRA job keeps the LoRA's look.
Loaded adapters stay in memory with their model, at most `max_loaded` of them (the engine's
`max_loaded_loras`): past that the least recently used one is unloaded, since every LoRA adds
its weights to the GPU's memory. A job turns on exactly its own with `set_adapters` and turns
them all off again when it ends, so the next job, with other LoRAs or none, never sees them.
Every candidate of a job runs in the same pipeline call with the same adapters, so batching is
unchanged.

Trigger words (the words a LoRA was trained to answer to) are appended to the prompt; the
A1111 `<lora:name:weight>` tags for PNG metadata come from `a1111_lora_tags`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from generation.contract import GenerationRequest, LoraWeight, PromptPart
from generation.settings import EngineSettings, LoraSpec

log = logging.getLogger(__name__)


class LoraSet:
    """The LoRAs loaded into one model's pipelines, by configured name."""

    def __init__(
        self, pipe: Any, cache_dir: Path, local_files_only: bool, max_loaded: int = 4
    ) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded_loras: must be at least 1, got {max_loaded}")
        self.pipe = pipe
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self.max_loaded = max_loaded
        # Configured name -> peft adapter name (peft wants identifier-like names), least
        # recently used first.
        self._adapters: OrderedDict[str, str] = OrderedDict()
        # Configured name -> where its weights came from, to load them into further UNets.
        self._specs: dict[str, LoraSpec] = {}
        # UNets of this model that are not the pipeline's own (the inpainting UNet).
        self._unets: list[Any] = []
        self._counter = 0

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._adapters)

    def ensure(self, spec: LoraSpec) -> str:
        """Load `spec` unless it is loaded; its adapter name. Loaded adapters start turned off."""
        adapter = self._adapters.get(spec.name)
        if adapter is not None:
            return adapter
        self._counter += 1
        adapter = f"lora{self._counter}_{re.sub(r'[^0-9A-Za-z_]', '_', spec.name)}"
        started = time.perf_counter()
        path = Path(spec.source).expanduser()
        try:
            if path.is_file():
                self.pipe.load_lora_weights(
                    str(path.parent), weight_name=path.name, adapter_name=adapter
                )
            else:
                self.pipe.load_lora_weights(
                    spec.source,
                    adapter_name=adapter,
                    cache_dir=str(self.cache_dir / "hub"),
                    local_files_only=self.local_files_only,
                )
            for unet in self._unets:
                self._load_into_unet(unet, spec, adapter)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            # A half-loaded adapter would be active in every later job.
            with contextlib.suppress(Exception):
                self.pipe.delete_adapters(adapter)
            for unet in self._unets:
                with contextlib.suppress(Exception):
                    unet.delete_adapters(adapter)
            raise ValueError(f"lora: cannot load {spec.name!r} from {spec.source} ({exc})") from exc
        self._adapters[spec.name] = adapter
        self._specs[spec.name] = spec
        # load_lora_weights leaves the new adapter active; jobs that do not ask for it must not
        # get it.
        self.pipe.disable_lora()
        for unet in self._unets:
            unet.disable_lora()
        log.info("loaded LoRA %s in %.2fs", spec.name, time.perf_counter() - started)
        return adapter

    def add_unet(self, unet: Any) -> None:
        """Give `unet` (another UNet of the same model, e.g. its 9-channel inpainting UNet)
        every LoRA loaded so far and every one loaded later; it is switched with the others."""
        if unet is self.pipe.unet or any(unet is known for known in self._unets):
            return
        present = getattr(unet, "peft_config", {})
        for name, adapter in self._adapters.items():
            if adapter in present:
                continue
            try:
                self._load_into_unet(unet, self._specs[name], adapter)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                with contextlib.suppress(Exception):
                    unet.unload_lora()
                raise ValueError(
                    f"lora: {name!r} does not fit the inpainting UNet of this model ({exc})"
                ) from exc
        if self._adapters:
            # Loaded adapters start turned off, as in `ensure`.
            unet.disable_lora()
        self._unets.append(unet)

    def _load_into_unet(self, unet: Any, spec: LoraSpec, adapter: str) -> None:
        """The UNet half of `spec` into `unet` (its text-encoder half is already in the shared
        text encoder)."""
        path = Path(spec.source).expanduser()
        kwargs: dict[str, Any]
        if path.is_file():
            source, kwargs = str(path.parent), {"weight_name": path.name}
        else:
            source = spec.source
            kwargs = {
                "cache_dir": str(self.cache_dir / "hub"),
                "local_files_only": self.local_files_only,
            }
        state_dict, alphas, metadata = self.pipe.lora_state_dict(
            source, return_lora_metadata=True, **kwargs
        )
        type(self.pipe).load_lora_into_unet(
            state_dict, alphas, unet=unet, adapter_name=adapter, metadata=metadata
        )

    def unload(self, name: str) -> None:
        """Drop one LoRA's weights from the model (the model's own weights are untouched)."""
        adapter = self._adapters.pop(name, None)
        self._specs.pop(name, None)
        if adapter is None:
            return
        if self._adapters:
            self.pipe.delete_adapters(adapter)
            for unet in self._unets:
                unet.delete_adapters(adapter)
        else:
            # The last one: peft's wrapper layers go too and the model is its plain self again.
            self.pipe.unload_lora_weights()
            for unet in self._unets:
                unet.unload_lora()

    def _evict(self, keep: set[str]) -> None:
        """Unload the least recently used LoRAs beyond `max_loaded`, never one in `keep` (the
        job's own: a job asking for more than max_loaded keeps them all until the next)."""
        for name in list(self._adapters):
            if len(self._adapters) <= self.max_loaded:
                return
            if name not in keep:
                log.info("unloading LoRA %s (more than %d loaded)", name, self.max_loaded)
                self.unload(name)

    @contextlib.contextmanager
    def active(self, loras: Sequence[tuple[LoraSpec, float]]) -> Iterator[None]:
        """Exactly `loras` at their weights for the duration; all of them off afterwards."""
        if not loras:
            yield
            return
        adapters = [self.ensure(spec) for spec, _ in loras]
        wanted = {spec.name for spec, _ in loras}
        for name in wanted:
            self._adapters.move_to_end(name)
        self._evict(keep=wanted)
        weights = [float(weight) for _, weight in loras]
        try:
            self.pipe.enable_lora()
            self.pipe.set_adapters(adapters, adapter_weights=weights)
            for unet in self._unets:
                unet.enable_lora()
                unet.set_adapters(adapters, weights=weights)
            yield
        finally:
            self.pipe.disable_lora()
            for unet in self._unets:
                unet.disable_lora()


def requested_loras(
    settings: EngineSettings, loras: Sequence[LoraWeight]
) -> list[tuple[LoraSpec, float]]:
    return [(settings.lora(wanted.name), wanted.weight) for wanted in loras]


def with_trigger_words(prompt: str, specs: Sequence[LoraSpec]) -> str:
    """`prompt` with each LoRA's trigger words appended, skipping those it already has (so this
    may be applied twice, by the bot and by the engine)."""
    lowered = prompt.lower()
    missing: list[str] = []
    for spec in specs:
        for word in spec.trigger_words:
            word = word.strip()
            if word and word.lower() not in lowered and word not in missing:
                missing.append(word)
    if not missing:
        return prompt
    base = prompt.rstrip().rstrip(",")
    return ", ".join([base, *missing]) if base else ", ".join(missing)


def apply_trigger_words(request: GenerationRequest, settings: EngineSettings) -> GenerationRequest:
    """The request with its LoRAs' trigger words in the prompt (cheap: no torch).

    The bot may call it when it builds a request, so that the stored prompt, the reply and the
    PNG metadata show the words; the engine calls it again, which then changes nothing. A
    weighted multi-prompt gets them in its first positive part, whose weight is the prompt's.
    """
    if not request.loras:
        return request
    specs = [settings.lora(wanted.name) for wanted in request.loras if wanted.weight > 0]
    changes: dict[str, Any] = {}
    if request.prompt.strip():
        changes["prompt"] = with_trigger_words(request.prompt, specs)
    parts = list(request.prompt_parts)
    for index, part in enumerate(parts):
        if part.weight > 0:
            text = with_trigger_words(part.text, specs)
            if text != part.text:
                parts[index] = PromptPart(text, part.weight)
                changes["prompt_parts"] = tuple(parts)
            break
    changed = {k: v for k, v in changes.items() if v != getattr(request, k)}
    return replace(request, **changed) if changed else request


def a1111_lora_tags(loras: Sequence[LoraWeight]) -> str:
    """AUTOMATIC1111's prompt syntax for the LoRAs of a job: `<lora:name:0.8>`, space-separated."""
    return " ".join(f"<lora:{lora.name}:{lora.weight:g}>" for lora in loras)
