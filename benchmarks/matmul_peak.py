"""The fp32 matmul peak of this CPU: GFLOP/s of numpy's BLAS multiplying square float32 matrices, the ceiling
that model FLOP utilisation (MFU) is measured against (experiments/compression.py).

    python -m benchmarks.matmul_peak [--threads 2 --sizes 1024 2048 4096 --runs 5]

Per size: the median time of `--runs` products (after one warm-up), as 2 n^3 / time. The peak is the best size's
figure. BLAS threads are limited with threadpoolctl; without it, by OPENBLAS_NUM_THREADS / OMP_NUM_THREADS as set
before the start. OpenBLAS picks its kernels by CPU model, or by OPENBLAS_CORETYPE when that is set: printed, as
it changes the peak.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ModuleNotFoundError:  # an optional dependency of scikit-learn's
    threadpool_info = threadpool_limits = None

SIZES = (1024, 2048, 4096)
RUNS = 5


@dataclass(frozen=True)
class MatmulPeak:
    gflops_by_size: dict[int, float]
    threads: str  # how BLAS threads were set
    blas: str  # the BLAS library and its kernels
    coretype: str  # OPENBLAS_CORETYPE, or that it is not set

    @property
    def gflops(self) -> float:
        return max(self.gflops_by_size.values())

    def describe(self) -> str:
        sizes = ", ".join(f"{size}: {gflops:.1f}" for size, gflops in self.gflops_by_size.items())
        return (
            f"fp32 matmul peak {self.gflops:.1f} GFLOP/s (numpy, square float32 matrices, GFLOP/s by size: {sizes}); "
            f"{self.blas}; {self.threads}; {self.coretype}"
        )


def blas_threads(threads: int | None) -> tuple[AbstractContextManager[Any], str]:
    """A context limiting BLAS to `threads` threads (None: as it is), and how the count was set."""
    if threads is None:
        return nullcontext(), "BLAS threads as configured"
    if threadpool_limits is None:
        set_by = {name: os.environ.get(name) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
        return nullcontext(), f"threadpoolctl missing: BLAS threads from the environment {set_by}"
    return threadpool_limits(limits=threads, user_api="blas"), f"{threads} BLAS threads (threadpoolctl)"


def blas_library() -> str:
    if threadpool_info is None:
        return "BLAS library unknown (threadpoolctl missing)"
    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    # Other packages (scipy, torch) may load BLAS libraries of their own: name numpy's, the one measured here.
    blas = [pool for pool in blas if "numpy" in pool["filepath"]] or blas
    return "; ".join(f"{p['internal_api']} {p.get('version')} ({p.get('architecture')} kernels)" for p in blas)


def matmul_gflops(size: int, runs: int, rng: np.random.Generator) -> float:
    """2 n^3 over the median time of `runs` products of two n x n float32 matrices."""
    a, b = rng.standard_normal((2, size, size), dtype=np.float32)
    product = np.empty_like(a)
    np.matmul(a, b, out=product)  # warm-up: BLAS threads started, pages touched
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        np.matmul(a, b, out=product)
        seconds.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(seconds) / 1e9


def measure(threads: int | None, sizes: Sequence[int] = SIZES, runs: int = RUNS) -> MatmulPeak:
    limit, set_by = blas_threads(threads)
    rng = np.random.default_rng(0)
    with limit:
        gflops = {size: matmul_gflops(size, runs, rng) for size in sizes}
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    return MatmulPeak(
        gflops, set_by, blas_library(), f"OPENBLAS_CORETYPE={coretype}" if coretype else "OPENBLAS_CORETYPE not set"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="BLAS threads.")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="Matrix sizes n (n x n).")
    parser.add_argument("--runs", type=int, default=RUNS, help="Timed products per size (median).")
    args = parser.parse_args()
    print(measure(args.threads, args.sizes, args.runs).describe())


if __name__ == "__main__":
    main()
