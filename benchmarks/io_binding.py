"""The model run through an IOBinding against a plain `session.run`, and batch 1 against batch 32, on the provider
the bundle loads on (CUDA with onnxruntime-gpu on a GPU host, else the CPU).

    python -m benchmarks.io_binding --bundle models/default [--variant auto] [--threads 2] [--repeats 30]

On real KTAS triage notes (their text is never printed), the first notes in the data's order, tokenized by the
service's path (`NoteClassifier`): per batch size, the logits of both ways are compared (they must be identical),
then each way is timed `--repeats` times, interleaved (the order flips every repeat), and the medians per model
run and their ratio are printed, with the notes per second of each batch size. The service uses the IOBinding on
CUDA only; on the CPU it keeps `session.run` (`app.inference.NoteClassifier.margins`).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np

from app.bundle import CUDA, load_bundle
from app.inference import LOGITS, NoteClassifier, cuda_device, run_bound
from training.data.ktas import load_ktas

BATCH_SIZES = (1, 32)


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each run over `repeats`, taking turns, the order flipped every repeat."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            started = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - started)
    return {name: statistics.median(times) for name, times in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="Model bundle directory.")
    parser.add_argument("--variant", default="auto", choices=["auto", "fp32", "int8", "fp16"])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--repeats", type=int, default=30, help="Timed runs of each way per batch size.")
    parser.add_argument("--device-id", type=int, default=0, help="The GPU, on CUDA.")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle, args.variant, intra_op_threads=args.threads, device_id=args.device_id)
    classifier = NoteClassifier.from_bundle(bundle)
    session = bundle.session
    device_id = cuda_device(session)
    device = "cpu" if device_id is None else "cuda"
    notes = load_ktas().texts
    print(
        f"bundle {args.bundle}, variant {bundle.variant} on {', '.join(bundle.providers)}"
        f"{'' if device_id is None else f' (GPU {device_id})'}; {args.threads} threads; "
        f"median of {args.repeats} interleaved runs per way"
    )
    print("| batch | tokens (longest) | session.run ms | IOBinding ms | IOBinding / run | identical | notes/s (run) |")
    print("| ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    rates = {}
    for size in BATCH_SIZES:
        feed = classifier.model_inputs([note.ids for note in classifier.encode(notes[:size])])
        plain, bound = session.run([LOGITS], feed)[0], run_bound(session, feed, device, device_id or 0)
        identical = bool(np.array_equal(plain, bound))
        medians = interleaved_medians(
            {
                "run": lambda feed=feed: session.run([LOGITS], feed),
                "bound": lambda feed=feed: run_bound(session, feed, device, device_id or 0),
            },
            args.repeats,
        )
        rates[size] = size / medians["run"]
        print(
            f"| {size} | {feed['input_ids'].shape[1]} | {medians['run'] * 1000:.2f} | {medians['bound'] * 1000:.2f} | "
            f"{medians['bound'] / medians['run']:.3f} | {'yes' if identical else 'NO'} | {rates[size]:.1f} |"
        )
    print(
        f"\nbatch {BATCH_SIZES[-1]} / batch {BATCH_SIZES[0]} notes per second (session.run): "
        f"{rates[BATCH_SIZES[-1]] / rates[BATCH_SIZES[0]]:.2f}x"
        + ("" if CUDA in bundle.providers else "  (on the CPU: the service does not use the IOBinding there)")
    )


if __name__ == "__main__":
    main()
