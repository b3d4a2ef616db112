"""Model CPU offload for modules loaded beside a model whose pipeline is already offloaded.

`enable_model_cpu_offload` hooks the modules a pipeline has when it is called; anything loaded
into or next to it later (an `inpaint_source` UNet, an IP-Adapter's image encoder, a ControlNet)
would otherwise sit wherever it was put: on the CPU while its inputs go to the device, or on the
device for good, holding memory the offloading was meant to free. Each gets a hook of its own.
"""

from __future__ import annotations

from typing import Any

__all__ = ["offload_hook"]


def offload_hook(module: Any, device: Any, *, after: Any = None) -> Any:
    """Hook `module` to move to `device` when it runs, first sending `after` (a module that ran
    before it, e.g. a text encoder) back to the CPU. Returns the hook; its `offload()` puts the
    module back on the CPU, which no pipeline call does, so the caller does it after each job."""
    from accelerate import cpu_offload_with_hook  # type: ignore[import-untyped]
    from accelerate.hooks import CpuOffload, UserCpuOffloadHook  # type: ignore[import-untyped]

    before = None
    if after is not None:
        before = UserCpuOffloadHook(after, CpuOffload(execution_device=device))
    # The hook's init moves the module to the CPU, where it rests between runs.
    _, hook = cpu_offload_with_hook(module, execution_device=device, prev_module_hook=before)
    return hook
