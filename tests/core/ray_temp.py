"""A private temp folder for everything a local Ray cluster writes.

Ray writes some files under its default temp folder (`$RAY_TMPDIR/ray`, else `$TMPDIR/ray`, else
`/tmp/ray`) whatever `temp_dir` a node is given: `ray.cluster_utils.Cluster` and `ray start` both
record the cluster's address in `<default>/ray_current_cluster`, and fail when that folder does
not exist. Pointing `RAY_TMPDIR` at a fresh folder for the cluster's lifetime keeps every file
inside it, so a test passes the same on a machine where no earlier Ray run left `/tmp/ray`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Ray's unix sockets live under the temp folder, and their paths are limited to 107 bytes.
MAX_ROOT_CHARS = 40

THROWAWAY_CLUSTER = {
    # No token file in the home folder, no usage report.
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


@contextmanager
def private_ray_temp() -> Iterator[Path]:
    """Yields the `temp_dir` to give the cluster's nodes; the environment (`RAY_TMPDIR` and a
    throwaway cluster's settings) is set for this process and the processes it starts, and put
    back afterwards, with the folder removed."""
    root = Path(tempfile.mkdtemp(prefix="ray-"))  # under $TMPDIR when set, else /tmp
    if len(str(root)) > MAX_ROOT_CHARS:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(
            f"temp folder {root} is too long for Ray's socket paths; set TMPDIR to a short one"
        )
    environment = {**THROWAWAY_CLUSTER, "RAY_TMPDIR": str(root)}
    saved = {key: os.environ.get(key) for key in (*environment, "OMP_NUM_THREADS")}
    os.environ.update(environment)
    # Ray sets each actor's OMP_NUM_THREADS from the CPUs it takes, unless the environment
    # already names one (tests/conftest.py does, for the processes a parallel run starts).
    os.environ.pop("OMP_NUM_THREADS", None)
    temp_dir = root / "ray"
    temp_dir.mkdir()
    try:
        yield temp_dir
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)
