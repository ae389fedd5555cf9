"""Soak test: this service under a steady open-loop request rate; every request answered once, memory flat.

Run from the repository root (pick --rate at about 80% of the service's notes/s at concurrency 32
in `benchmarks.serve_load`):

    python -m benchmarks.soak --bundle models/NAME --rate 40 [--duration 600] [--variant int8]

Requests leave on a fixed schedule (`--rate` per second) whether or not earlier ones were answered;
latency is measured from the scheduled send time, so a server falling behind shows up in it. Each
request carries a unique note id, which the service echoes: the summary counts ids sent, answered,
answered twice, never answered and answered without having been sent. The server's resident memory
(VmRSS from /proc/PID/status) is sampled every --sample-seconds; the summary gives first, last, max
and the least-squares slope over the whole run and over its second half. Note text is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.http_client import TRANSPORT_ERRORS, HttpClient
from benchmarks.servers import ServerSpec, json_body, running_server, service_argv
from training.data.ktas import load_ktas

MAX_CONNECTIONS = 256  # requests beyond this many in flight wait in the client for a connection
REQUEST_TIMEOUT_S = 60.0
FLAT_SLOPE_MB_PER_MIN = 0.5  # second-half RSS slope below which memory counts as flat


@dataclass
class Tally:
    sent: int = 0
    answered: Counter[str] = field(default_factory=Counter)  # echoed note id -> times answered
    errors: Counter[str] = field(default_factory=Counter)  # status code or exception type -> count
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0  # from the first scheduled send to the last answer


async def open_loop(url: str, notes: list[str], rate: float, seconds: float, id_prefix: str) -> Tally:
    """Send `rate` requests per second for `seconds`, the i-th with note id f"{id_prefix}{i}"."""
    tally = Tally()
    in_flight: set[asyncio.Task] = set()
    async with HttpClient(url, MAX_CONNECTIONS, REQUEST_TIMEOUT_S) as client:

        async def send(number: int, scheduled: float) -> None:
            body = json_body(f"{id_prefix}{number}", notes[number % len(notes)])
            try:
                status, content = await client.post_json(body)
            except TRANSPORT_ERRORS as error:
                tally.errors[type(error).__name__] += 1
                return
            if status != 200:
                tally.errors[str(status)] += 1
                return
            tally.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
            try:
                tally.answered.update(result["id"] for result in json.loads(content)["results"])
            except (ValueError, KeyError, TypeError):
                tally.errors["malformed answer"] += 1

        started = time.perf_counter()
        for number in range(math.ceil(rate * seconds)):
            scheduled = started + number / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(number, scheduled))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            tally.sent += 1
        await asyncio.gather(*in_flight)
        tally.seconds = time.perf_counter() - started
    return tally


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


async def sample_rss(pid: int, every_s: float, started: float, samples: list[tuple[float, float]]) -> None:
    """Append (seconds since `started`, RSS MB) every `every_s` until cancelled."""
    while True:
        samples.append((time.perf_counter() - started, rss_mb(pid)))
        await asyncio.sleep(every_s)


async def soak(url: str, pid: int, notes: list[str], args: argparse.Namespace) -> tuple[Tally, np.ndarray]:
    """Warm up (unsampled, uncounted), then the measured run; returns its tally and [seconds, RSS MB] rows."""
    await open_loop(url, notes, args.rate, args.warmup_seconds, "warm-")
    samples: list[tuple[float, float]] = []
    started = time.perf_counter()
    sampler = asyncio.create_task(sample_rss(pid, args.sample_seconds, started, samples))
    tally = await open_loop(url, notes, args.rate, args.duration, "soak-")
    sampler.cancel()
    samples.append((time.perf_counter() - started, rss_mb(pid)))
    return tally, np.array(samples)


def slope_mb_per_min(samples: np.ndarray) -> float:
    if len(samples) < 2:
        return math.nan
    return float(np.polyfit(samples[:, 0] / 60, samples[:, 1], 1)[0])


def summary_lines(tally: Tally, samples: np.ndarray, args: argparse.Namespace) -> list[str]:
    expected = {f"soak-{number}" for number in range(tally.sent)}
    answered = set(tally.answered)
    duplicates = sum(1 for count in tally.answered.values() if count > 1)
    missing, unexpected = expected - answered, answered - expected
    errors = sum(tally.errors.values())
    exactly_once = not (duplicates or missing or unexpected or errors)
    latencies = np.array(tally.latencies_ms)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (math.nan,) * 3
    rss = samples[:, 1]
    second_half = samples[samples[:, 0] >= samples[-1, 0] / 2]
    late_slope = slope_mb_per_min(second_half)
    error_kinds = f" ({', '.join(f'{kind}: {n}' for kind, n in tally.errors.items())})" if errors else ""
    slowest = latencies.max() if len(latencies) else math.nan
    return [
        (
            f"requests: sent {tally.sent} at {args.rate:g}/s for {args.duration:g} s "
            f"(answered at {len(latencies) / tally.seconds:.1f}/s over {tally.seconds:.1f} s)"
        ),
        (
            f"answers: {sum(tally.answered.values())}; ids answered {len(answered)}, twice or more {duplicates}, "
            f"never {len(missing)}, not sent {len(unexpected)}; errors {errors}{error_kinds}"
        ),
        f"every request answered exactly once: {'yes' if exactly_once else 'NO'}",
        (f"latency from scheduled send: p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, max {slowest:.1f} ms"),
        (
            f"server RSS ({len(samples)} samples every {args.sample_seconds:g} s): first {rss[0]:.1f} MB, "
            f"last {rss[-1]:.1f} MB, max {rss.max():.1f} MB; slope {slope_mb_per_min(samples):+.3f} MB/min overall, "
            f"{late_slope:+.3f} MB/min over the second half"
        ),
        (
            f"memory flat (second-half slope below {FLAT_SLOPE_MB_PER_MIN} MB/min): "
            f"{'yes' if abs(late_slope) < FLAT_SLOPE_MB_PER_MIN else 'NO'}"
        ),
        "RSS samples (s: MB): " + ", ".join(f"{seconds:.0f}: {mb:.1f}" for seconds, mb in samples),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True, help="Model bundle directory (models/NAME).")
    parser.add_argument("--rate", type=float, required=True, help="Requests per second (one note each).")
    parser.add_argument("--duration", type=float, default=600.0, help="Measured seconds.")
    parser.add_argument("--warmup-seconds", type=float, default=10.0, help="Unmeasured seconds at --rate first.")
    parser.add_argument("--sample-seconds", type=float, default=10.0, help="RSS sampling interval.")
    parser.add_argument("--variant", default="int8", choices=["fp32", "int8"], help="ONNX variant served.")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the service.")
    parser.add_argument("--log-dir", type=Path, help="Where the server log goes (default: a temporary directory).")
    args = parser.parse_args()
    if args.rate <= 0 or args.duration <= 0 or args.sample_seconds <= 0:
        parser.error("--rate, --duration and --sample-seconds must be positive")
    return args


def main() -> None:
    args = parse_args()
    notes = load_ktas().texts
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = ServerSpec(f"service-{args.variant}", service_argv(args.bundle, args.variant, args.threads), args.threads)
    with running_server(spec, log_dir, notes[0]) as server:
        print(
            f"{spec.name} ready (pid {server.pid}); {len(notes)} KTAS notes; load average "
            f"{os.getloadavg()[0]:.2f}; server log {server.log_path}",
            flush=True,
        )
        tally, samples = asyncio.run(soak(server.url, server.pid, notes, args))
    print("\n".join(summary_lines(tally, samples, args)))


if __name__ == "__main__":
    main()
