"""Which CUDA devices this box shows, without importing torch in the bot process.

The bot process never needs torch (it starts in a second and stays small), so devices are
counted the way the driver itself lists them: `CUDA_VISIBLE_DEVICES` when it is set (it is the
owner's or the container runtime's choice, and `nvidia-smi` ignores it), else `nvidia-smi -L`,
which ships with every NVIDIA driver and answers in well under a second. No driver, no
`nvidia-smi`, or an error from it: a CPU box.

Each worker process is then pinned to one device by setting `CUDA_VISIBLE_DEVICES` in its
environment before anything in it imports torch (see `ProcessWorker`).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

NVIDIA_SMI_TIMEOUT_S = 10.0

# "GPU 0: NVIDIA H200 (UUID: GPU-6f1e…)"; MIG slices are listed indented under their GPU.
_GPU_LINE = re.compile(r"^GPU (\d+):")
# Values CUDA itself reads as "no device".
_NO_DEVICES = {"", "-1", "none", "void", "nodevfiles"}


def parse_nvidia_smi_list(output: str) -> list[str]:
    """The device indices in `nvidia-smi -L` output, in order."""
    return [match[1] for line in output.splitlines() if (match := _GPU_LINE.match(line))]


def parse_visible_devices(value: str | None) -> list[str] | None:
    """The devices a `CUDA_VISIBLE_DEVICES` value names (indices or UUIDs), or None when the
    variable is unset (every device is visible). CUDA stops at the first invalid entry and at
    "-1", so this does too."""
    if value is None:
        return None
    devices: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.lower() in _NO_DEVICES or entry.startswith("-"):
            break
        if not (entry.isdigit() or entry.startswith(("GPU-", "MIG-"))):
            break
        devices.append(entry)
    return devices


def _run_nvidia_smi() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "-L"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi not usable: %s", exc)
        return None
    if done.returncode != 0:
        log.info("nvidia-smi -L failed (%s): treating this box as CPU-only", done.returncode)
        return None
    return done.stdout


def visible_cuda_devices(
    environ: Mapping[str, str] | None = None,
    list_gpus: Callable[[], str | None] = _run_nvidia_smi,
) -> list[str]:
    """The CUDA devices worker processes may be pinned to: values for their
    `CUDA_VISIBLE_DEVICES`, one per worker. Empty on a CPU-only box."""
    environ = os.environ if environ is None else environ
    listed = parse_visible_devices(environ.get("CUDA_VISIBLE_DEVICES"))
    if listed is not None:
        return listed
    output = list_gpus()
    return parse_nvidia_smi_list(output) if output else []
