"""Latency of one long note, and the batcher's token budget with long notes in the queue.

    python -m benchmarks.long_notes --bundle models/default [--variant int8] [--threads 2] [--repeats 20]

Notes of about 50, 128, 256 and 500 tokens are made by joining real KTAS triage notes (shorthand rendering)
until the length is reached; each is classified alone (batch 1) through the service's path (`NoteClassifier`:
tokenize, cut to the model's limit, run, calibrate), `--repeats` times, and the median and 95th percentile
are printed. Then the batcher's plan (`plan_batches`, as `DynamicBatcher` uses it) over a queue mixing 500-token
and short notes is checked against `--max-batch-tokens`: the most padded tokens any batch holds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from app.batching import plan_batches
from app.bundle import load_bundle
from app.inference import NoteClassifier
from training.data.ktas import load_ktas

LENGTHS = (50, 128, 256, 500)


def note_of_length(classifier: NoteClassifier, notes: list[str], tokens: int) -> str:
    """Real notes joined, one per line, until the text is at least `tokens` tokens long (or longer than the
    model reads)."""
    text = ""
    for note in notes:
        text = f"{text}\n{note}" if text else note
        [encoded] = classifier.encode([text])
        if len(encoded.ids) >= tokens or encoded.truncated:
            return text
    raise ValueError(f"the notes together make fewer than {tokens} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--max-batch-tokens", type=int, default=8192, help="the service's max_batch_tokens")
    parser.add_argument("--max-batch-size", type=int, default=32, help="the service's max_batch_size")
    args = parser.parse_args()

    bundle = load_bundle(args.bundle, args.variant, intra_op_threads=args.threads)
    classifier = NoteClassifier.from_bundle(bundle)
    notes = load_ktas().texts
    print(
        f"bundle {bundle.manifest.name} {bundle.manifest.version}, variant {bundle.variant}, reads up to "
        f"{classifier.max_note_tokens} tokens; {args.threads} threads; {args.repeats} repeats; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n"
    )
    print("| note tokens | truncated | p50 ms | p95 ms |\n| ---: | --- | ---: | ---: |")
    for tokens in LENGTHS:
        text = note_of_length(classifier, notes, tokens)
        [encoded] = classifier.encode([text])
        classifier.predict_proba([text])  # warm-up at this shape
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            classifier.predict_proba([text], batch_size=1)
            seconds.append(time.perf_counter() - started)
        p95 = statistics.quantiles(seconds, n=20)[18]
        print(
            f"| {len(encoded.ids)} | {encoded.truncated} | {1000 * statistics.median(seconds):.1f} | {1000 * p95:.1f} |"
        )

    long_note = note_of_length(classifier, notes, 500)
    queue = [long_note] * 40 + notes[:200]
    lengths = [len(note.ids) for note in classifier.encode(queue)]
    batches = plan_batches(lengths, args.max_batch_size, args.max_batch_tokens)
    longest = [max(lengths[i] for i in batch) for batch in batches]
    padded = [len(batch) * most for batch, most in zip(batches, longest, strict=True)]
    long_batches = [len(batch) for batch, most in zip(batches, longest, strict=True) if most == max(lengths)]
    print(
        f"\nbatcher plan for {len(queue)} queued notes (40 of {max(lengths)} tokens, 200 real ones): {len(batches)} "
        f"batches, most padded tokens in one batch {max(padded)} (budget {args.max_batch_tokens}: "
        f"{'held' if max(padded) <= args.max_batch_tokens else 'EXCEEDED'}); batches holding the long notes have "
        f"{', '.join(map(str, long_batches))} notes"
    )


if __name__ == "__main__":
    main()
