"""Closed-loop HTTP load on the service and on peer servers of the same model, on 127.0.0.1.

Run from the repository root:

    python -m benchmarks.serve_load --bundle models/NAME [--seconds 25] [--concurrency 1 8 32 64]
        [--variant int8] [--servers service-int8 service-fp32 ...] [--checkpoint runs/NAME/checkpoints/best-auroc]
        [--compare l6=models/l6 --compare qat=models/qat]

Servers (subprocesses started here, warmed up, measured, then stopped; all pinned to --threads), with
V the ONNX variant given by --variant (int8 by default; fp32 for a bundle without int8; fp16 on a GPU host, where
every ONNX server runs on CUDA — benchmarks/gpu_check.sh):
  service-V, service-fp32   this service (`python -m app serve`), default settings (dynamic batching)
  service-V-batch1          this service with --max-batch-size 1: same code path, no batching
  onnx-threadpool-V         minimal FastAPI endpoint, one session.run per request (benchmarks/peers)
  torch-eager               hand-written FastAPI + PyTorch eager server of the run's checkpoint
  litserve-V                LitServe with dynamic batching serving the same ONNX bundle
  service-V@NAME            this service serving variant V of another bundle, default settings: one per
                            `--compare NAME=BUNDLE`, always measured together with service-V, and its notes/s
                            compared with service-V's at each concurrency (issue #19: a smaller or
                            quantization-aware student against today's default)

Each cell runs `concurrency` clients, each sending one KTAS note per request and the next as soon as
the answer arrives, for --seconds (at most --max-requests requests per slice). Every server runs for
the whole benchmark but is paused (SIGSTOP) while another is measured, and each cell is split into
--rounds interleaved slices, so that other work on a shared machine weighs on all servers alike. Notes are
the real KTAS triage notes, cycled; their text is never printed. Any answer other than 200, and any transport error, is
counted as an error. Throughput counts answered (200) requests only. For this service, the mean
batch size per cell comes from its /metrics. Server CPU per note is the CPU time of the server's
processes over the cell (ONNX Runtime's spin-waiting threads count too) per answered note: less
sensitive than throughput to other work on the machine. The client shares the machine's cores with
the server; its CPU share is printed per cell.

First, the model alone (variant V, in this process, no HTTP) is timed at batch 1 and 32: its ratio is the
most that batching can gain on this machine. The ONNX servers load the bundle as this process does, so the
provider it runs on (CUDA or CPU) is theirs; the GPU goals (batching and peer gains at concurrency 32) are
judged only when that is CUDA. On a shared machine figures are indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from app.bundle import CUDA, load_bundle, read_manifest
from app.inference import NoteClassifier
from benchmarks.http_client import TRANSPORT_ERRORS, HttpClient
from benchmarks.options import add_compare_option
from benchmarks.servers import (
    PYTHON,
    SERVICE_METRICS_PATH,
    RunningServer,
    ServerSpec,
    group_cpu_seconds,
    json_body,
    resumed,
    running_server,
    service_argv,
)
from training.data.ktas import load_ktas

CONCURRENCIES = (1, 8, 32, 64)
RATIO_CONCURRENCY = 32
GPU_GOAL_BATCHING_GAIN, GPU_GOAL_PEER_GAIN = 4.0, 1.2  # issue #17, for a GPU host
WARM_UP_CONCURRENCY = 8
CEILING_BATCH_SIZES = (1, 32)
CEILING_SECONDS = 5.0
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Cell:
    """One server at one concurrency: totals over all its time slices."""

    server: str
    concurrency: int
    seconds: float
    latencies_ms: np.ndarray  # of answered (200) requests
    errors: Counter[str]  # status code or exception type -> count
    client_cpu_s: float  # CPU seconds of this (client) process
    server_cpu_s: float = math.nan  # CPU seconds of the server's processes
    batch_notes: float = math.nan  # notes and model runs, where the server reports them (this service)
    batch_runs: float = math.nan

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_ms) / self.seconds

    @property
    def notes_per_s(self) -> float:
        return self.requests_per_s  # one note per request

    @property
    def server_cpu_ms_per_note(self) -> float:
        return self.server_cpu_s * 1000 / len(self.latencies_ms) if len(self.latencies_ms) else math.nan

    @property
    def mean_batch(self) -> float:
        return self.batch_notes / self.batch_runs if self.batch_runs else math.nan

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_ms, percentile)) if len(self.latencies_ms) else math.nan


def merge(slices: list[Cell]) -> Cell:
    first = slices[0]
    return Cell(
        first.server,
        first.concurrency,
        sum(c.seconds for c in slices),
        np.concatenate([c.latencies_ms for c in slices]),
        sum((c.errors for c in slices), Counter()),
        sum(c.client_cpu_s for c in slices),
        sum(c.server_cpu_s for c in slices),
        sum(c.batch_notes for c in slices),
        sum(c.batch_runs for c in slices),
    )


@dataclass(frozen=True)
class Roles:
    """Which servers the ratios compare, for ONNX variant `variant`."""

    variant: str
    compared: tuple[str, ...] = ()  # NAME of each --compare NAME=BUNDLE

    @property
    def service(self) -> str:
        return f"service-{self.variant}"

    @property
    def compared_services(self) -> tuple[str, ...]:
        return tuple(f"{self.service}@{name}" for name in self.compared)

    @property
    def no_batching(self) -> tuple[str, ...]:
        return f"service-{self.variant}-batch1", f"onnx-threadpool-{self.variant}"

    @property
    def peers(self) -> tuple[str, ...]:
        """What a user would otherwise run: a server written by hand, or a serving framework."""
        return "torch-eager", f"litserve-{self.variant}"


def server_specs(
    bundle: Path, variant: str, checkpoint: Path, threads: int, compared: list[tuple[str, Path]]
) -> dict[str, ServerSpec]:
    onnx_peer = ["--bundle", str(bundle), "--variant", variant, "--threads", str(threads)]
    max_tokens = read_manifest(bundle).max_input_tokens
    specs = [
        ServerSpec(f"service-{variant}", service_argv(bundle, variant, threads), threads, SERVICE_METRICS_PATH),
        ServerSpec("service-fp32", service_argv(bundle, "fp32", threads), threads, SERVICE_METRICS_PATH),
        ServerSpec(
            f"service-{variant}-batch1",
            [*service_argv(bundle, variant, threads), "--max-batch-size", "1"],
            threads,
            SERVICE_METRICS_PATH,
        ),
        ServerSpec(
            f"onnx-threadpool-{variant}", [PYTHON, "-m", "benchmarks.peers.onnx_threadpool", *onnx_peer], threads
        ),
        ServerSpec(
            "torch-eager",
            [
                PYTHON,
                "-m",
                "benchmarks.peers.torch_eager",
                "--checkpoint",
                str(checkpoint),
                "--max-tokens",
                str(max_tokens),
                "--threads",
                str(threads),
            ],
            threads,
        ),
        ServerSpec(f"litserve-{variant}", [PYTHON, "-m", "benchmarks.peers.litserve_onnx", *onnx_peer], threads),
        *(
            ServerSpec(
                f"service-{variant}@{name}", service_argv(other, variant, threads), threads, SERVICE_METRICS_PATH
            )
            for name, other in compared
        ),
    ]
    return {spec.name: spec for spec in specs}  # with variant fp32, service-fp32 appears once


def model_ceiling(
    bundle: Path, variant: str, threads: int, notes: list[str], seconds: float
) -> tuple[str, dict[int, float]]:
    """The execution provider the service's model runs on, and its notes/s alone (in this process, no HTTP) per
    batch size: the most that batching can gain on this machine."""
    loaded = load_bundle(bundle, variant, threads)
    classifier = NoteClassifier.from_bundle(loaded)
    token_ids = [note.ids for note in classifier.encode(notes)]
    rates = {}
    for size in CEILING_BATCH_SIZES:
        batches = itertools.cycle(token_ids[start : start + size] for start in range(0, len(token_ids) - size, size))
        classifier.predict(next(batches))
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            done += len(classifier.predict(next(batches)))
        rates[size] = done / (time.perf_counter() - started)
    return loaded.providers[0], rates


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(notes, model runs) the service has done so far, from its Prometheus batch-size histogram."""
    families = text_string_to_metric_families(httpx.get(metrics_url, timeout=30).text)
    samples = {sample.name: sample.value for family in families for sample in family.samples}
    return samples["triage_batch_size_sum"], samples["triage_batch_size_count"]


async def closed_loop(
    server: str, url: str, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int
) -> Cell:
    """`concurrency` clients sending back to back until `seconds` have passed or `max_requests` were sent."""
    latencies_ms: list[float] = []
    errors: Counter[str] = Counter()
    request_numbers = itertools.count()
    async with HttpClient(url, concurrency, REQUEST_TIMEOUT_S) as client:
        started, cpu_started = time.perf_counter(), time.process_time()
        deadline = started + seconds

        async def one_client() -> None:
            while time.perf_counter() < deadline and (number := next(request_numbers)) < max_requests:
                sent = time.perf_counter()
                try:
                    status, _ = await client.post_json(bodies[number % len(bodies)])
                except TRANSPORT_ERRORS as error:
                    errors[type(error).__name__] += 1
                    continue
                if status == 200:
                    latencies_ms.append((time.perf_counter() - sent) * 1000)
                else:
                    errors[str(status)] += 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        elapsed, client_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return Cell(server, concurrency, elapsed, np.array(latencies_ms), errors, client_cpu_s)


def measure_slice(
    server: RunningServer, bodies: list[bytes], concurrency: int, seconds: float, max_requests: int
) -> Cell:
    batches_before = batch_totals(server.metrics_url) if server.metrics_url else (math.nan, math.nan)
    cpu_before = group_cpu_seconds(server.pid)
    cell = asyncio.run(closed_loop(server.name, server.url, bodies, concurrency, seconds, max_requests))
    batch_notes, batch_runs = (
        np.subtract(batch_totals(server.metrics_url), batches_before) if server.metrics_url else batches_before
    )
    return replace(
        cell, server_cpu_s=group_cpu_seconds(server.pid) - cpu_before, batch_notes=batch_notes, batch_runs=batch_runs
    )


def measure_all(
    specs: list[ServerSpec], bodies: list[bytes], probe_text: str, args: argparse.Namespace, log_dir: Path
) -> list[Cell]:
    """Start every server (each paused while it is not measured), warm each up, then measure in
    --rounds rounds, each giving every server a 1/rounds slice of every cell; the server order flips
    from round to round. Other work on the machine then weighs on all servers alike."""
    slices: dict[tuple[str, int], list[Cell]] = {(spec.name, c): [] for spec in specs for c in args.concurrency}
    with ExitStack() as stack:
        servers = []
        for spec in specs:
            servers.append(server := stack.enter_context(running_server(spec, log_dir, probe_text)))
            with resumed(server):
                asyncio.run(
                    closed_loop(
                        server.name, server.url, bodies, WARM_UP_CONCURRENCY, args.warmup_seconds, args.max_requests
                    )
                )
            _progress(f"{spec.name}: ready and warmed up (pid {server.pid}); load average {os.getloadavg()[0]:.2f}")
        for round_number in range(args.rounds):
            for concurrency in args.concurrency:
                for server in servers if round_number % 2 == 0 else reversed(servers):
                    with resumed(server):
                        cell = measure_slice(server, bodies, concurrency, args.seconds / args.rounds, args.max_requests)
                    slices[server.name, concurrency].append(cell)
                    _progress(
                        f"round {round_number + 1}/{args.rounds} {server.name} c={concurrency}: "
                        f"{cell.notes_per_s:.1f} notes/s, p99 {cell.latency_ms(99):.1f} ms, "
                        f"errors {sum(cell.errors.values())}; load average {os.getloadavg()[0]:.2f}"
                    )
    return [merge(cells) for cells in slices.values()]


def markdown_table(cells: list[Cell]) -> str:
    header = (
        "| server | concurrency | req/s | notes/s | p50 ms | p95 ms | p99 ms | errors | mean batch "
        "| server CPU ms/note | client CPU |"
    )
    lines = [header, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for cell in cells:
        errors = sum(cell.errors.values())
        error_text = f"{errors} ({', '.join(f'{kind}: {n}' for kind, n in cell.errors.items())})" if errors else "0"
        lines.append(
            f"| {cell.server} | {cell.concurrency} | {cell.requests_per_s:.1f} | {cell.notes_per_s:.1f} | "
            f"{cell.latency_ms(50):.1f} | {cell.latency_ms(95):.1f} | {cell.latency_ms(99):.1f} | "
            f"{error_text} | {'-' if math.isnan(cell.mean_batch) else f'{cell.mean_batch:.1f}'} | "
            f"{cell.server_cpu_ms_per_note:.1f} | {cell.client_cpu_s / cell.seconds:.0%} |"
        )
    return "\n".join(lines)


def ratio_lines(cells: list[Cell], roles: Roles, on_gpu: bool) -> list[str]:
    """This service against no batching and against the best peer, at RATIO_CONCURRENCY; the goals of these
    ratios are a GPU host's, judged only `on_gpu`."""
    at = {cell.server: cell for cell in cells if cell.concurrency == RATIO_CONCURRENCY}
    service = at.get(roles.service)
    if service is None:
        return [f"(no ratios: {roles.service} was not measured at concurrency {RATIO_CONCURRENCY})"]
    lines = []
    for name in roles.no_batching:
        if name in at:
            gain = service.notes_per_s / at[name].notes_per_s
            met = gain >= GPU_GOAL_BATCHING_GAIN
            goal = f" (GPU goal >= {GPU_GOAL_BATCHING_GAIN:g}x: {'met' if met else 'NOT met'})"
            lines.append(
                f"- {roles.service} / {name} at c={RATIO_CONCURRENCY}: {gain:.2f}x notes/s{goal if on_gpu else ''}"
            )
    peers = [at[name] for name in roles.peers if name in at]
    if peers:
        best = max(peers, key=lambda cell: cell.notes_per_s)
        gain = service.notes_per_s / best.notes_per_s
        met = gain >= GPU_GOAL_PEER_GAIN and service.latency_ms(99) <= best.latency_ms(99)
        goal = f" (GPU goal >= {GPU_GOAL_PEER_GAIN:g}x at equal or better p99: {'met' if met else 'NOT met'})"
        lines.append(
            f"- {roles.service} / best peer ({best.server}) at c={RATIO_CONCURRENCY}: {gain:.2f}x notes/s, "
            f"p99 {service.latency_ms(99):.1f} ms vs {best.latency_ms(99):.1f} ms{goal if on_gpu else ''}"
        )
    if lines and not on_gpu:
        lines.append("(the goals of these ratios are a GPU host's; they do not apply to this CPU run)")
    return lines


def comparison_lines(cells: list[Cell], roles: Roles) -> list[str]:
    """Each compared bundle's service against this bundle's, at every concurrency measured."""
    by_server = {(cell.server, cell.concurrency): cell for cell in cells}
    lines = []
    for name in roles.compared_services:
        ratios = [
            f"c={cell.concurrency} {cell.notes_per_s / by_server[roles.service, cell.concurrency].notes_per_s:.2f}x"
            for cell in cells
            if cell.server == name
        ]
        lines.append(f"- {name} / {roles.service}: notes/s {', '.join(ratios)}")
    return lines


def _progress(message: str) -> None:
    print(message, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="Model bundle directory (models/NAME).")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="PyTorch checkpoint for torch-eager (default: the bundle's source run, best-auroc).",
    )
    parser.add_argument(
        "--variant",
        default="int8",
        choices=["int8", "fp32", "fp16"],
        help="ONNX variant of the service and the ONNX peers (fp32 for a bundle without int8; fp16 on a GPU host).",
    )
    parser.add_argument("--servers", nargs="+", help="Servers to measure (default: all, see above).")
    add_compare_option(parser, "Another bundle, served as service-V@NAME and compared with service-V (repeatable).")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES))
    parser.add_argument("--seconds", type=float, default=24.0, help="Duration of each cell (all rounds together).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds each cell is split into.")
    parser.add_argument("--max-requests", type=int, default=100_000, help="Most requests per cell.")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="Unmeasured load before a server's cells.")
    parser.add_argument("--threads", type=int, default=2, help="Intra-op threads of every server's model runtime.")
    parser.add_argument("--log-dir", type=Path, help="Where server logs go (default: a temporary directory).")
    args = parser.parse_args()
    names = [name for name, _ in args.compare]
    if len(set(names)) < len(names):
        parser.error(f"--compare names {names}: give each bundle its own NAME")
    for name, bundle in args.compare:
        variant = read_manifest(bundle).variants.get(args.variant)
        if variant is None or not variant.kept:
            parser.error(f"--compare {name}={bundle}: that bundle has no kept {args.variant} variant")
    if args.checkpoint is None:
        args.checkpoint = Path(read_manifest(args.bundle).source_run) / "checkpoints" / "best-auroc"
    return args


def main() -> None:
    args = parse_args()
    roles = Roles(args.variant, tuple(name for name, _ in args.compare))
    specs = server_specs(args.bundle, args.variant, args.checkpoint, args.threads, args.compare)
    args.servers = args.servers or list(specs)
    unknown = sorted(set(args.servers) - set(specs))
    if unknown:
        raise SystemExit(f"unknown server(s) {unknown}; choose from {sorted(specs)}")
    if args.compare:
        args.servers += [name for name in (roles.service, *roles.compared_services) if name not in args.servers]
    notes = load_ktas().texts
    bodies = [json_body(str(position), text) for position, text in enumerate(notes)]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="serve_load-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    _progress(
        f"{len(notes)} KTAS notes; bundle {args.bundle}; {os.cpu_count()} CPUs; {args.seconds:g} s per cell; "
        f"threads {args.threads}; server logs in {log_dir}"
    )
    provider, ceiling = model_ceiling(args.bundle, args.variant, args.threads, notes, CEILING_SECONDS)
    _progress(
        f"model alone ({args.variant} on {provider}, in-process, no HTTP): "
        + ", ".join(f"batch {size}: {rate:.1f} notes/s" for size, rate in ceiling.items())
        + f"; batching gain ceiling {ceiling[max(ceiling)] / ceiling[min(ceiling)]:.2f}x"
    )
    cells = measure_all([specs[name] for name in args.servers], bodies, notes[0], args, log_dir)
    print()
    print(markdown_table(cells))
    print()
    print("\n".join([*ratio_lines(cells, roles, on_gpu=provider == CUDA), *comparison_lines(cells, roles)]))


if __name__ == "__main__":
    main()
