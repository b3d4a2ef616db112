"""The `[generation]` table: the models, the samplers' and the pipeline's settings, and the add-ons
(LoRAs, IP-Adapters, ControlNets) with their names, trigger words and weights' paths."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from bot.config.reader import Reader
from bot.config.sections import ConfigError
from generation.contract import MAX_LORA_WEIGHT, Sampler
from generation.settings import (
    DTYPES,
    FAMILIES,
    SINGLE_FILE_SUFFIXES,
    TINY_SOURCES,
    CompileMode,
    ControlFit,
    ControlNetSpec,
    EngineSettings,
    IPAdapterSpec,
    LoraSpec,
    ModelSpec,
    Preprocessor,
)


def engine_settings(section: Reader, data_dir: Path, base_dir: Path) -> EngineSettings:
    defaults = EngineSettings()
    models = []
    for index, raw_model in enumerate(section.get("models", list, [])):
        model = Reader(raw_model, f"{section.prefix}models[{index}].")
        spec = ModelSpec(
            name=model.get("name", str),
            source=_weights_path(model.get("source", str), base_dir),
            base_resolution=model.get("base_resolution", int, 512),
            family=model.get("family", str, "sd"),
            vae=model.get("vae", str, ""),
            dtype=model.choice("dtype", ("", *DTYPES), ""),
            inpaint_source=_weights_path(model.get("inpaint_source", str, ""), base_dir),
            preview_decoder=_weights_path(model.get("preview_decoder", str, ""), base_dir),
            config=_weights_path(model.get("config", str, ""), base_dir),
            allow_pickle=model.get("allow_pickle", bool, False),
            description=_description(model),
        )
        if spec.base_resolution % 64 or not 64 <= spec.base_resolution <= 2048:
            raise ConfigError(f"{model.prefix}base_resolution: a multiple of 64 in 64..2048")
        if spec.family not in {"sd", "sdxl"}:
            raise ConfigError(f"{model.prefix}family: must be 'sd' or 'sdxl'")
        model.reject_unknown()
        models.append(spec)
    if not models:
        models = list(defaults.models)
    if len({m.name for m in models}) != len(models):
        raise ConfigError(f"{section.prefix}models: model names must be unique")
    default_model = section.get("default_model", str, models[0].name)
    if default_model not in {m.name for m in models}:
        raise ConfigError(f"{section.prefix}default_model: {default_model!r} is not configured")
    try:
        sampler = Sampler.parse(section.get("default_sampler", str, defaults.default_sampler.value))
    except ValueError as exc:
        raise ConfigError(f"{section.prefix}default_{exc}") from None
    try:
        draft_sampler = Sampler.parse(
            section.get("draft_sampler", str, defaults.draft_sampler.value)
        )
    except ValueError as exc:
        raise ConfigError(f"{section.prefix}draft_{exc}") from None
    settings = EngineSettings(
        models=tuple(models),
        default_model=default_model,
        clip_model=section.get("clip_model", str, defaults.clip_model),
        caption_model=section.get("caption_model", str, defaults.caption_model),
        cache_dir=data_dir / section.get("cache_dir", str, "models"),
        device=section.choice("device", ("auto", "cuda", "cpu", "mps"), defaults.device),
        dtype=section.choice("dtype", ("auto", "float16", "bfloat16", "float32"), defaults.dtype),
        default_steps=section.get("default_steps", int, defaults.default_steps),
        default_guidance=section.get("default_guidance", float, defaults.default_guidance),
        default_sampler=sampler,
        num_candidates=section.get("candidates", int, defaults.num_candidates),
        num_kept=section.get("kept", int, defaults.num_kept),
        max_pixels=section.get("max_pixels", int, defaults.max_pixels),
        max_steps=section.get("max_steps", int, defaults.max_steps),
        variation_strength_subtle=section.get(
            "variation_strength_subtle", float, defaults.variation_strength_subtle
        ),
        variation_strength_strong=section.get(
            "variation_strength_strong", float, defaults.variation_strength_strong
        ),
        upscale_strength=section.get("upscale_strength", float, defaults.upscale_strength),
        upscale_strength_creative=section.get(
            "upscale_strength_creative", float, defaults.upscale_strength_creative
        ),
        edit_strength=section.get("edit_strength", float, defaults.edit_strength),
        preview_interval_s=section.get("preview_interval_s", float, defaults.preview_interval_s),
        draft_steps=section.get("draft_steps", int, defaults.draft_steps),
        draft_sampler=draft_sampler,
        upscaler=section.choice("upscaler", ("auto", "hires", "realesrgan"), defaults.upscaler),
        local_files_only=section.get("local_files_only", bool, defaults.local_files_only),
        cpu_offload=section.get("cpu_offload", bool, defaults.cpu_offload),
        vae_tiling=section.get("vae_tiling", bool, defaults.vae_tiling),
        compile_unet=section.get("compile_unet", bool, defaults.compile_unet),
        compile_vae=section.get("compile_vae", bool, defaults.compile_vae),
        compile_mode=CompileMode(
            section.choice(
                "compile_mode", tuple(m.value for m in CompileMode), defaults.compile_mode
            )
        ),
        fuse_qkv_projections=section.get(
            "fuse_qkv_projections", bool, defaults.fuse_qkv_projections
        ),
        vae_batched_decode=section.get("vae_batched_decode", bool, defaults.vae_batched_decode),
        max_loaded_models=section.positive("max_loaded_models", int, defaults.max_loaded_models),
        max_loaded_loras=section.positive("max_loaded_loras", int, defaults.max_loaded_loras),
        controlnet_fit=ControlFit(
            section.choice(
                "controlnet_fit", tuple(f.value for f in ControlFit), defaults.controlnet_fit
            )
        ),
        loras=_loras(section, base_dir),
        controlnets=_controlnets(section, base_dir),
        ip_adapters=_ip_adapters(section, base_dir, defaults.ip_adapters),
    )
    try:
        settings.validate()
    except ValueError as exc:
        raise ConfigError(f"{section.prefix}{exc}") from None
    if not 1 <= settings.num_kept <= settings.num_candidates <= 16:
        raise ConfigError(f"{section.prefix}kept/candidates: need 1 <= kept <= candidates <= 16")
    if not 1 <= settings.default_steps <= settings.max_steps <= 150:
        raise ConfigError(
            f"{section.prefix}default_steps/max_steps: need 1 <= default <= max <= 150"
        )
    if not 64 * 64 <= settings.max_pixels <= 2048 * 2048:
        raise ConfigError(f"{section.prefix}max_pixels: must be between 4096 and 4194304")
    strengths = (
        "variation_strength_subtle",
        "variation_strength_strong",
        "upscale_strength",
        "upscale_strength_creative",
        "edit_strength",
    )
    for name in strengths:
        if not 0.0 < getattr(settings, name) <= 1.0:
            raise ConfigError(f"{section.prefix}{name}: must be in (0, 1]")
    section.reject_unknown()
    return settings


# A LoRA or ControlNet name is typed after --lora/--cn, where commas and spaces separate several
# and a colon starts the weight; Discord shows at most 100 characters of a choice.
_ADD_ON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")


_ADD_ON_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,39}")
_MAX_DESCRIPTION_CHARS = 200


def _loras(section: Reader, base_dir: Path) -> tuple[LoraSpec, ...]:
    specs: list[LoraSpec] = []
    for index, raw in enumerate(section.get("loras", list, [])):
        table = Reader(raw, f"{section.prefix}loras[{index}].")
        spec = LoraSpec(
            name=_add_on_name(table, specs),
            source=_weights_path(table.get("source", str), base_dir),
            family=table.choice("family", FAMILIES, "sd"),
            default_weight=table.get("default_weight", float, 1.0),
            trigger_words=_trigger_words(table),
            description=_description(table),
        )
        if not 0.0 <= spec.default_weight <= MAX_LORA_WEIGHT:
            raise ConfigError(
                f"{table.prefix}default_weight: must be between 0 and {MAX_LORA_WEIGHT:g}, "
                f"got {spec.default_weight:g}"
            )
        table.reject_unknown()
        specs.append(spec)
    return tuple(specs)


def _ip_adapters(
    section: Reader, base_dir: Path, defaults: tuple[IPAdapterSpec, ...]
) -> tuple[IPAdapterSpec, ...]:
    """[[generation.ip_adapters]]: one image adapter per family; the tiny ones stay for the
    tiny models unless a table replaces them."""
    specs: list[IPAdapterSpec] = []
    for index, raw in enumerate(section.get("ip_adapters", list, [])):
        table = Reader(raw, f"{section.prefix}ip_adapters[{index}].")
        base = IPAdapterSpec()
        layers = table.get("style_layers", dict, {})
        style: list[tuple[str, tuple[float, ...]]] = []
        for layer, scales in layers.items():
            values = scales if isinstance(scales, list) else [scales]
            if not values or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values
            ):
                raise ConfigError(
                    f"{table.prefix}style_layers: {layer!r} needs a number or a list of numbers"
                )
            style.append((str(layer), tuple(float(v) for v in values)))
        specs.append(
            IPAdapterSpec(
                family=table.choice("family", FAMILIES, "sd"),
                source=_weights_path(table.get("source", str), base_dir),
                subfolder=table.get("subfolder", str, base.subfolder),
                weight_name=table.get("weight_name", str, base.weight_name),
                image_encoder_folder=table.get(
                    "image_encoder_folder", str, base.image_encoder_folder
                ),
                style_layers=tuple(style),
            )
        )
        table.reject_unknown()
    given = {(spec.family, spec.tiny) for spec in specs}
    specs += [spec for spec in defaults if (spec.family, spec.tiny) not in given]
    return tuple(specs)


def _controlnets(section: Reader, base_dir: Path) -> tuple[ControlNetSpec, ...]:
    specs: list[ControlNetSpec] = []
    for index, raw in enumerate(section.get("controlnets", list, [])):
        table = Reader(raw, f"{section.prefix}controlnets[{index}].")
        name = _add_on_name(table, specs)
        source = _weights_path(table.get("source", str), base_dir)
        family = table.choice("family", FAMILIES, "sd")
        # Required: a ControlNet fed the wrong kind of map draws nonsense without any error.
        kinds = tuple(p.value for p in Preprocessor)
        wanted = table.get("preprocessor", str)
        if wanted not in kinds:
            raise ConfigError(f"{table.prefix}preprocessor: must be one of {', '.join(kinds)}")
        preprocessor = Preprocessor(wanted)
        depth_model = table.get("preprocessor_model", str, "")
        if depth_model and preprocessor is not Preprocessor.DEPTH:
            raise ConfigError(
                f"{table.prefix}preprocessor_model: only a depth preprocessor uses a model"
            )
        specs.append(
            ControlNetSpec(
                name=name,
                source=source,
                family=family,
                preprocessor=preprocessor,
                description=_description(table),
                preprocessor_model=_weights_path(depth_model, base_dir),
            )
        )
        table.reject_unknown()
    return tuple(specs)


def _add_on_name(table: Reader, earlier: Sequence[LoraSpec | ControlNetSpec]) -> str:
    name: str = table.get("name", str)
    if not _ADD_ON_NAME.fullmatch(name):
        raise ConfigError(
            f"{table.prefix}name: letters, digits and _ . + - only (no spaces, commas or "
            f"colons: they separate names and weights after --lora), at most 40; got {name!r}"
        )
    if any(spec.name.casefold() == name.casefold() for spec in earlier):
        # Members type names in any case, so two that differ only by case would be ambiguous.
        raise ConfigError(f"{table.prefix}name: {name!r} is given twice")
    return name


def _trigger_words(table: Reader) -> tuple[str, ...]:
    words = table.get("trigger_words", list, [])
    if not all(isinstance(word, str) and word.strip() for word in words):
        raise ConfigError(f"{table.prefix}trigger_words: must be a list of non-empty strings")
    return tuple(word.strip() for word in words)


def _description(table: Reader) -> str:
    text: str = " ".join(table.get("description", str, "").split())
    if len(text) > _MAX_DESCRIPTION_CHARS:
        raise ConfigError(
            f"{table.prefix}description: at most {_MAX_DESCRIPTION_CHARS} characters, "
            f"got {len(text)}"
        )
    return text


def _weights_path(value: str, base_dir: Path) -> str:
    """A weights file, or a folder written as ./x or ../x, relative to the config file (as
    data_dir is); anything else is a hub id or a folder name left as written."""
    if not value or value in TINY_SOURCES:
        return value
    path = Path(value).expanduser()
    relative = value.startswith(("./", "../")) or value.lower().endswith(SINGLE_FILE_SUFFIXES)
    if path.is_absolute() or not relative:
        return str(path) if value.startswith("~") else value
    return str(base_dir / path)
