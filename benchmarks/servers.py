"""Benchmark servers as subprocesses on 127.0.0.1: start one, wait until it classifies a note, pause and
resume it, stop it.

Every server takes `--port PORT` last on its command line and answers `POST /classify` with a JSON
body `{"id": ..., "text": ...}`. Each runs in its own process group, so that stopping it also stops
the worker processes some frameworks start.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

HOST = "127.0.0.1"
CLASSIFY_PATH = "/classify"
SERVICE_METRICS_PATH = "/metrics"
READY_TIMEOUT_S = 600.0  # loading and warming up a model on a busy 2-core machine can take minutes
STOP_TIMEOUT_S = 30.0
PYTHON = sys.executable


@dataclass(frozen=True)
class ServerSpec:
    name: str
    argv: list[str]  # the command line, without `--port PORT`
    threads: int  # intra-op threads of the model runtime, also given to OpenMP/MKL through the environment
    metrics_url_path: str | None = None  # Prometheus metrics, for this service only


@dataclass(frozen=True)
class RunningServer:
    name: str
    pid: int
    url: str  # the classify endpoint
    metrics_url: str | None
    log_path: Path


def service_argv(bundle: Path, variant: str, threads: int) -> list[str]:
    """This service's command line (`python -m app serve`), default settings otherwise."""
    return [
        PYTHON,
        "-m",
        "app",
        "serve",
        "--bundle",
        str(bundle),
        "--host",
        HOST,
        "--variant",
        variant,
        "--intra-op-threads",
        str(threads),
    ]


def json_body(note_id: str, text: str) -> bytes:
    return json.dumps({"id": note_id, "text": text}).encode()


@contextmanager
def running_server(spec: ServerSpec, log_dir: Path, probe_text: str) -> Iterator[RunningServer]:
    """Start `spec`, wait until it answers 200 to `probe_text`, yield it, then stop its process group."""
    port = _free_port()
    log_path = log_dir / f"{spec.name}.log"
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec.threads),
        "MKL_NUM_THREADS": str(spec.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*spec.argv, "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )
    base_url = f"http://{HOST}:{port}"
    metrics_url = base_url + spec.metrics_url_path if spec.metrics_url_path else None
    server = RunningServer(spec.name, process.pid, base_url + CLASSIFY_PATH, metrics_url, log_path)
    try:
        _wait_until_ready(process, server, json_body("probe", probe_text))
        yield server
    finally:
        _stop(process)


def group_cpu_seconds(group: int) -> float:
    """User + system CPU seconds of the live processes in process group `group` (a server and its workers)."""
    ticks = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_path.read_text().rpartition(")")[2].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == group:  # pgrp, the 5th field of /proc/PID/stat
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@contextmanager
def resumed(server: RunningServer) -> Iterator[None]:
    """Let a paused server run for the duration of the block, then pause it again (SIGSTOP to its group):
    a paused server takes no CPU from the one being measured, even if its framework polls when idle."""
    os.killpg(server.pid, signal.SIGCONT)
    try:
        yield
    finally:
        os.killpg(server.pid, signal.SIGSTOP)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _wait_until_ready(process: subprocess.Popen, server: RunningServer, body: bytes) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with status {process.returncode}; see {server.log_path}")
        try:
            response = httpx.post(server.url, content=body, headers={"content-type": "application/json"}, timeout=30)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.5)
    raise TimeoutError(f"{server.name} did not answer within {READY_TIMEOUT_S:.0f} s; see {server.log_path}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (graceful shutdown), SIGKILL if it has not exited in time."""
    group = process.pid  # start_new_session made the server the leader of its own group
    try:
        os.killpg(group, signal.SIGCONT)  # a paused group would not act on SIGTERM
        os.killpg(group, signal.SIGTERM)
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(group, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        return
    # Children of a framework (workers) may outlive the leader briefly; make sure none is left.
    with suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
