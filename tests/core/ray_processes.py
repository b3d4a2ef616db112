"""A Ray cluster as separate processes on one box, as an owner runs one on several: a head
(`ray start --head --block`) and a GPU node that is not the head (`ray start --address=...
--block`, its own process group) kept running by a supervisor loop that stands in for systemd's
`Restart=always` (deploy/ray/ray-gpu-node.service). Used by tests/core/test_ray_multinode.py and
the Ray phase of `python -m bench.fault_injection`.

Every address is a loopback one: the head listens on 127.0.0.2 and the GPU node on 127.0.0.3
(Ray replaces 127.0.0.1 itself with the box's network address). Run inside
`tests.core.ray_temp.private_ray_temp()`, whose folder each node gets a part of.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

FAKE_GPU = "fake_gpu"
HEAD_IP = "127.0.0.2"
NODE_IP = "127.0.0.3"
RAY = str(Path(sys.executable).parent / "ray")
# The head notices a node that is gone within a few seconds (Ray's default is about 30 s).
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}

# A GPU node's raylet gives up on a head that went away after this long (Ray's default: 60 s), and
# its supervisor starts it again to join the restarted head (deploy/ray-gpu-node.service). A head
# back within that time is a new cluster the raylet cannot join: it finds out at its next check of
# the head (Ray's default: every 60 s) and ends; here it checks every second.
NODE_ENVIRONMENT = {
    "RAY_gcs_rpc_server_reconnect_timeout_s": "10",
    "RAY_raylet_liveness_self_check_interval_ms": "1000",
}


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group and wait until none of it is left (a head started again on its
    port while its old GCS process is still there refuses to start)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


class Head:
    """`ray start --head --block` on a fixed port; `kill` ends it with everything it started."""

    def __init__(self, temp_dir: Path) -> None:
        with socket.socket() as probe:
            probe.bind((HEAD_IP, 0))
            self.port = probe.getsockname()[1]
        self.address = f"{HEAD_IP}:{self.port}"
        self._temp_dir = temp_dir
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # `ray start --head` refuses a port that a raylet on this machine names as its head
        # (it cannot tell the GPU node's raylet, still waiting for its old head, from one of its
        # own) when its temp folder records that address as the last cluster it started. On
        # its own box the GPU node's raylet is not seen; forgetting the record stands in for
        # that.
        (self._temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        command = [
            RAY,
            "start",
            "--head",
            "--block",
            f"--node-ip-address={HEAD_IP}",
            f"--port={self.port}",
            "--num-cpus=1",  # the bot's box runs no job: no GPU resource here
            "--include-dashboard=false",
            f"--temp-dir={self._temp_dir}",
        ]
        with (self._temp_dir.parent / "head.log").open("ab") as output:
            self._process = subprocess.Popen(
                command,
                env={**os.environ, **FAST_HEALTH_CHECKS},
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _kill_group(process)


class SupervisedNode:
    """A GPU node, `ray start --address=<head> --block`, restarted by this loop whenever it
    exits (as systemd's Restart=always does): after its head restarted, or it was killed."""

    RESTART_S = 1.0

    def __init__(self, head: Head, temp_dir: Path) -> None:
        self._head = head
        self._temp_dir = temp_dir
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self.starts = 0
        self._thread = threading.Thread(target=self._supervise, name="node-supervisor")

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        command = [
            RAY,
            "start",
            f"--address={self._head.address}",
            "--block",
            f"--node-ip-address={NODE_IP}",
            "--num-cpus=1",
            f"--resources={json.dumps({FAKE_GPU: 1})}",
            f"--temp-dir={self._temp_dir}",
        ]
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                with (self._temp_dir.parent / "node.log").open("ab") as output:
                    self._process = subprocess.Popen(
                        command,
                        env={**os.environ, **NODE_ENVIRONMENT},
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                self.starts += 1
            self._process.wait()
            self._stopping.wait(self.RESTART_S)

    def kill_node(self) -> None:
        """SIGKILL the node's whole process group (`ray start`, its raylet, its actors), as a
        crashed box would; the supervisor starts it again."""
        with self._lock:
            process = self._process
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self._process
        if process is not None:
            _kill_group(process)
        if self._thread.is_alive():
            self._thread.join(60)
