"""The environment a worker process starts with: only what Python, the engine's libraries
(torch, CUDA, Hugging Face) and their downloads need.

A worker runs third-party code (model repositories, preprocessors, tokenizers), so the bot's own
secrets, DISCORD_TOKEN first, and whatever else the owner's shell exports must not be there:
not in `os.environ` and not in `/proc/<pid>/environ`, which holds what the process was started
with. `multiprocessing` starts a child with the parent's environment and takes no other, so the
variables not kept are taken out of this process's environment for the moment of the start
(under a lock: workers start from threads) and put back right after. Kept variables keep their
values throughout, so nothing else in the bot sees a change to what it reads.

`HF_TOKEN` is kept: a worker downloads gated models with it, and it is the owner's to set.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

T = TypeVar("T")

KEPT_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TEMP",
        "TMP",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        "PYTHONWARNINGS",
        "PYTHONFAULTHANDLER",
        "VIRTUAL_ENV",
        "LD_LIBRARY_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "TOKENIZERS_PARALLELISM",
        "XDG_CACHE_HOME",
    }
)
KEPT_PREFIXES = (
    "LC_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "DIFFUSERS_",
    "TORCH",
    "PYTORCH_",
    "CUDA_",
    "CUDNN_",
    "CUBLAS_",
    "NCCL_",
    "NVIDIA_",
    "ROCM_",
    "HIP_",
    "HSA_",
    "OMP_",
    "MKL_",
    "KMP_",
    "OPENBLAS_",
    "COVERAGE_",
    "COV_CORE_",
)
# Never passed on, whatever the lists above say.
SECRETS = frozenset({"DISCORD_TOKEN"})

_starting = threading.Lock()


def kept(name: str) -> bool:
    return name not in SECRETS and (name in KEPT_NAMES or name.startswith(KEPT_PREFIXES))


def worker_environment(source: Mapping[str, str]) -> dict[str, str]:
    """The part of `source` a worker process is started with."""
    return {name: value for name, value in source.items() if kept(name)}


def start_with_minimal_environment(start: Callable[[], T]) -> T:
    """Run `start` (a process's start) while this process's environment holds only what
    `worker_environment` keeps, then put the rest back. Blocking: call it in a thread."""
    with _starting:
        dropped = {name: value for name, value in os.environ.items() if not kept(name)}
        try:
            for name in dropped:
                del os.environ[name]
            return start()
        finally:
            os.environ.update(dropped)


def forget_token(name: str = "DISCORD_TOKEN") -> str:
    """Read the bot's token and take it out of this process's environment, so nothing this
    process starts later (worker processes, a local Ray cluster) can inherit it."""
    return os.environ.pop(name, "").strip()
