"""Batch scoring at scale (`python -m app score`), locally and on a local Ray cluster.

    python -m benchmarks.batch_score [--bundle models/default] [--notes 100000] [--small 10000] [--sample 2000]
        [--rounds 3] [--threads 2] [--chunk-rows 1024]

Notes (SYNTHETIC re-renderings, not real free text): the 1,267 bundled KTAS records (real triage-time fields)
rendered by training/data/render.py in the `mixed` style (each record as a shorthand, English narrative or Korean
ED-style note) with render seeds 0, 1, 2, ... until the size is reached, written to a UTF-8 CSV with an id column.

Figures, all from one run:
1. The model's in-process batch-32 throughput (`NoteClassifier.predict_proba` of --sample notes held in memory:
   one tokenization, batches of 32 sorted by length over all of them) and local batch scoring of the same notes
   from the CSV (read in chunks, tokenized, `plan_batches`, run, written to Parquet), with the same ONNX Runtime
   threads, interleaved for --rounds rounds after a warm-up: the median notes/s of each and their ratio.
2. Local scoring of --small and --notes notes, each in a process of its own (what `python -m app score` runs):
   notes/s and the process's peak resident memory (VmHWM, model included).
3. The --notes notes on a local Ray cluster: a head and a worker node started here as separate processes, one CPU
   each, and two scoring actors of one CPU (one ONNX Runtime thread) each: notes/s, the driver's peak RSS and the
   largest peak RSS of the Ray worker processes (the actors, the read task), read from /proc while it runs.
4. Reading alone (`NotesFile.chunks` of the --notes CSV): the ceiling of the one read task a Ray run has.
A scoring run's notes/s counts from the first chunk read to the last score written: a Ray run's includes starting
its actors (each loads the bundle), a local run's excludes loading the bundle. The machine's load average is
printed before and after: other work on it slows every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv

from app.batch_scoring import ChunkScorer, ScoresWriter, score_file, write_scores
from app.bundle import MANIFEST_FILE, load_bundle
from app.inference import NoteClassifier
from app.note_files import NotesFile
from app.settings import Settings
from benchmarks.local_ray import LocalRayCluster, local_ray_cluster

TEXT, ID = "text", "note_id"
RAY_ACTORS = 2  # one per node of the local cluster


def synthetic_notes(size: int) -> list[str]:
    """`size` notes: the KTAS records rendered in the `mixed` style with render seeds 0, 1, 2, ..."""
    from training.data.ktas import load_ktas
    from training.data.render import render_examples

    records = load_ktas()
    seeds = math.ceil(size / len(records))
    return [text for seed in range(seeds) for text in render_examples(records, "mixed", seed).texts][:size]


def write_csv(texts: list[str], path: Path) -> Path:
    pacsv.write_csv(pa.table({ID: [f"n{i}" for i in range(len(texts))], TEXT: texts}), path)
    return path


def peak_rss_mb(pid: int | str = "self") -> float:
    """A process's peak resident memory (VmHWM) in MB, or 0 once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(kb) / 1024


def interleaved(args: argparse.Namespace, texts: list[str], path: Path, out: Path) -> tuple[list[float], list[float]]:
    """Notes/s of the in-process batch-32 path and of local batch scoring of the same notes, round by round."""
    settings = Settings(bundle=args.bundle, intra_op_threads=args.threads)
    classifier = NoteClassifier.from_bundle(load_bundle(args.bundle, intra_op_threads=args.threads))
    notes = NotesFile.open(path, TEXT, ID)
    scorer = ChunkScorer(settings, notes, include_text=False)
    classifier.predict_proba(texts[:256])
    scorer.score(next(notes.chunks(256)))
    in_process, local = [], []
    for _ in range(args.rounds):
        started = time.perf_counter()
        classifier.predict_proba(texts, batch_size=32)
        in_process.append(len(texts) / (time.perf_counter() - started))
        summary = write_scores(
            (scorer.score(c) for c in notes.chunks(args.chunk_rows)), ScoresWriter(out, scorer.schema)
        )
        local.append(summary.rows / summary.seconds)
    return in_process, local


def run_child(
    args: argparse.Namespace, path: Path, out: Path, ray_address: str | None = None, env: dict[str, str] | None = None
) -> dict:
    """One scoring run (local, or on the Ray cluster at `ray_address`) in a process of its own: its rows, seconds
    and peak RSS."""
    command = [sys.executable, "-m", "benchmarks.batch_score", "--child", "--input", str(path), "--output", str(out)]
    command += ["--bundle", str(args.bundle), "--threads", str(args.threads), "--chunk-rows", str(args.chunk_rows)]
    if ray_address is not None:
        command += ["--ray-address", ray_address]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"scoring run failed:\n{finished.stderr[-3000:]}")
    result: dict = json.loads(finished.stdout.strip().splitlines()[-1])
    return result


def child(args: argparse.Namespace) -> None:
    notes = NotesFile.open(args.input, TEXT, ID)
    if args.ray_address is None:
        settings = Settings(bundle=args.bundle, intra_op_threads=args.threads)
        summary = score_file(notes, args.output, settings, False, args.chunk_rows)
    else:
        from app.ray_scoring import score_file_on_ray

        settings = Settings(bundle=args.bundle)  # each actor: one ONNX Runtime thread, for its one CPU
        summary = score_file_on_ray(notes, args.output, settings, False, args.chunk_rows, args.ray_address, RAY_ACTORS)
    print(json.dumps({"rows": summary.rows, "seconds": summary.seconds, "peak_rss_mb": peak_rss_mb()}))


class RayWorkerMemory:
    """Polls the peak RSS of the Ray worker processes (descendants of the cluster's nodes) while a run goes on."""

    def __init__(self, cluster: LocalRayCluster) -> None:
        self.roots = {node.pid for node in cluster.nodes}
        self.peaks: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> RayWorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.5):
            for pid in self._workers():
                self.peaks[pid] = max(self.peaks.get(pid, 0.0), peak_rss_mb(pid))

    def _workers(self) -> list[int]:
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        workers = []
        for pid in parents:
            ancestor = parents.get(pid)
            while ancestor is not None and ancestor not in self.roots:
                ancestor = parents.get(ancestor)
            if ancestor is not None and _command(pid).startswith("ray::"):
                workers.append(pid)
        return workers


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def read_rate(path: Path, chunk_rows: int) -> float:
    started = time.perf_counter()
    rows = sum(chunk.num_rows for chunk in NotesFile.open(path, TEXT, ID).chunks(chunk_rows))
    return rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--notes", type=int, default=100_000, help="Notes of the large run, local and on Ray.")
    parser.add_argument("--small", type=int, default=10_000, help="Notes of the small local run (peak RSS).")
    parser.add_argument("--sample", type=int, default=2_000, help="Notes of the interleaved comparison.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of local scoring.")
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ray-address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if not (args.bundle / MANIFEST_FILE).is_file():
        sys.exit(f"no bundle at {args.bundle}: build the default one with `make model` (README) or pass --bundle")

    manifest = load_bundle(args.bundle).manifest
    print(f"bundle {args.bundle} ({manifest.encoders.student}, {manifest.version}); {os.cpu_count()} CPUs")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="batch-score-bench-") as scratch:
        work = Path(scratch)
        texts = synthetic_notes(max(args.notes, args.small, args.sample))
        large = write_csv(texts[: args.notes], work / "large.csv")
        small = write_csv(texts[: args.small], work / "small.csv")
        sample = write_csv(texts[: args.sample], work / "sample.csv")
        print(
            f"notes: {len(texts):,} synthetic re-renderings, {statistics.mean(map(len, texts)):.0f} characters a note"
        )

        in_process, local = interleaved(args, texts[: args.sample], sample, work / "sample.parquet")
        small_run = run_child(args, small, work / "small.parquet")
        large_run = run_child(args, large, work / "large.parquet")
        with local_ray_cluster(workers=1, cpus_per_node=1) as cluster, RayWorkerMemory(cluster) as workers:
            ray_run = run_child(args, large, work / "ray.parquet", cluster.address, cluster.env)
        reading = read_rate(large, args.chunk_rows)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    def rate(run: dict) -> float:
        return float(run["rows"] / run["seconds"])

    median_in_process, median_local = statistics.median(in_process), statistics.median(local)
    ray_peak = max(workers.peaks.values(), default=0.0)
    print()
    print("| run | notes | notes/s | peak RSS |")
    print("|---|---:|---:|---|")
    print(
        f"| in-process batch 32, {args.threads} threads (median of {args.rounds}) | {args.sample:,} | "
        f"{median_in_process:,.1f} | |"
    )
    print(
        f"| local `app score`, {args.threads} threads, interleaved (median of {args.rounds}) | {args.sample:,} | "
        f"{median_local:,.1f} | |"
    )
    print(
        f"| local `app score`, own process | {small_run['rows']:,} | {rate(small_run):,.1f} | "
        f"{small_run['peak_rss_mb']:,.0f} MB |"
    )
    print(
        f"| local `app score`, own process | {large_run['rows']:,} | {rate(large_run):,.1f} | "
        f"{large_run['peak_rss_mb']:,.0f} MB |"
    )
    print(
        f"| Ray: head + worker node, {RAY_ACTORS} actors x 1 CPU | {ray_run['rows']:,} | {rate(ray_run):,.1f} | "
        f"driver {ray_run['peak_rss_mb']:,.0f} MB; Ray workers max {ray_peak:,.0f} MB |"
    )
    print(f"| reading alone (one read task's ceiling) | {args.notes:,} | {reading:,.0f} | |")
    print()
    ratios = [lo / ip for lo, ip in zip(local, in_process, strict=True)]
    print(
        f"local / in-process batch 32: {median_local / median_in_process:.3f} (ratio of medians; per round "
        f"{', '.join(f'{r:.3f}' for r in ratios)}); goal >= 0.9"
    )
    growth = large_run["peak_rss_mb"] - small_run["peak_rss_mb"]
    print(f"peak RSS {args.small:,} -> {args.notes:,} notes: {growth:+,.0f} MB; goal: flat")
    per_actor = rate(ray_run) / RAY_ACTORS
    print(
        f"for N workers: on this {os.cpu_count()}-CPU machine Ray's {RAY_ACTORS} one-CPU actors scored "
        f"{rate(ray_run):,.1f} notes/s ({rate(ray_run) / rate(large_run):.2f}x local), {per_actor:,.1f} notes/s an "
        f"actor; N one-CPU actors on N free CPUs (any number of nodes) would score about N x {per_actor:,.1f} notes/s "
        f"(e.g. 32: {args.notes:,} notes in {args.notes / (32 * per_actor) / 60:,.1f} min) until the one read task "
        f"limits it at {reading:,.0f} notes/s, about {reading / per_actor:,.0f} actors; past that, split the input "
        "into several files, each its own job."
    )


if __name__ == "__main__":
    main()
