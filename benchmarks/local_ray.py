"""A real Ray cluster on this machine for tests and benchmarks: a head node and worker nodes, each a `ray start`
process of its own.

Each node is started with `ray start --block`: the node lives as long as that process, which stops the node's
processes (GCS, raylet, workers) when terminated, so the cluster is stopped by the ids of the processes started here.
(`ray stop` would stop every Ray node on the machine, other users' too.) The cluster uses Ray's token authentication
with a token made here and passed in the environment (`env`), so nothing is written to ~/.ray; a driver reaches
the cluster with `env`.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 120


@dataclass(frozen=True)
class LocalRayCluster:
    address: str  # host:port of the head node
    env: dict[str, str]  # the environment of its nodes, which drivers need too (the token)
    nodes: list[subprocess.Popen[bytes]]  # the `ray start --block` processes, head first


@contextmanager
def local_ray_cluster(
    workers: int = 1, cpus_per_node: int = 1, object_store_bytes: int = 100_000_000
) -> Iterator[LocalRayCluster]:
    """A head and `workers` worker nodes of `cpus_per_node` CPUs each; stopped on leaving."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # a local cluster stops at once
        "OMP_NUM_THREADS": "1",
    }
    options = [f"--num-cpus={cpus_per_node}", f"--object-store-memory={object_store_bytes}", "--block"]
    nodes = [_start(env, "--head", f"--port={port}", "--include-dashboard=false", *options)]
    try:
        _wait_for_port(nodes[0], port)
        nodes += [_start(env, f"--address={address}", *options) for _ in range(workers)]
        yield LocalRayCluster(address, env, nodes)
    finally:
        _stop(nodes)


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    ray = Path(sys.executable).with_name("ray")
    return subprocess.Popen(
        [str(ray), "start", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_port(head: subprocess.Popen[bytes], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if head.poll() is not None:
            raise RuntimeError(f"the Ray head node exited (code {head.returncode})")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Ray head node did not listen on port {port} within {START_TIMEOUT_S} s"
                ) from None
            time.sleep(0.5)


def _stop(nodes: list[subprocess.Popen[bytes]]) -> None:
    for node in nodes:
        node.send_signal(signal.SIGTERM)
    for node in nodes:
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)  # its own process group (start_new_session)
            node.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
