"""Explanations (`explain: true` on /classify): how faithful on real notes, and what they cost.

    python -m benchmarks.explain [--bundle models/default] [--variant auto] [--threads 2] [--notes 20] [--repeats 30]

Both parts go through the service itself (the app in this process, its lifespan, batcher and routes; no network).

Deletion curve: for the first --notes KTAS test notes (the default split, shorthand rendering), each note's
explanation ranks all its words; deleting its k top words (k = 1..5) should lower P(emergency) more than
deleting k words drawn at random (--draws per note and k), and deleting its k bottom words should raise it.
The table gives mean P(emergency) after each deletion, and the area under each curve (mean over k).

Latency: one 60-word note (real KTAS notes joined), sent --repeats times with and without explain, the two
interleaved so that other work on the machine weighs on both alike; p50 and p95 of each, and the ratio of
medians (the goal is explain at most 10x plain). Note text is never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from app.bundle import load_bundle
from app.explain import Word, note_words, without
from app.inference import NoteClassifier
from app.main import create_app
from app.settings import Settings
from training.config import DataArguments
from training.data.loading import load_parts

LATENCY_WORDS = 60
DELETED = range(1, 6)


@asynccontextmanager
async def service(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://benchmark") as client,
        app.router.lifespan_context(app),
    ):
        yield client


async def classify(client: httpx.AsyncClient, text: str, explain: bool) -> dict[str, Any]:
    response = await client.post("/classify", json={"text": text, "explain": explain})
    response.raise_for_status()
    result: dict[str, Any] = response.json()["results"][0]
    return result


def deleted(text: str, words: list[Word]) -> str:
    """The note with all these words deleted (the last first, so that the earlier offsets still hold)."""
    for word in sorted(words, key=lambda word: word.start, reverse=True):
        text = without(text, word)
    return text


def note_of_words(notes: list[str], count: int) -> str:
    """Real notes joined, one per line, cut after their `count`-th word."""
    text = ""
    for note in notes:
        text = f"{text}\n{note}" if text else note
        words = note_words(text)
        if len(words) >= count:
            return text[: words[count - 1].end]
    raise ValueError(f"the notes together hold fewer than {count} words")


async def deletion_curves(
    client: httpx.AsyncClient, classifier: NoteClassifier, texts: list[str], draws: int
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    curves: dict[str, list[np.ndarray]] = {"top words first": [], f"random ({draws} draws)": [], "bottom first": []}
    for text in texts:
        explanation = (await classify(client, text, explain=True))["explanation"]
        ranked = sorted(explanation, key=lambda item: item["contribution"], reverse=True)
        words = [Word(item["word"], item["start"], item["end"]) for item in ranked]
        drawn = [
            deleted(text, [words[i] for i in rng.choice(len(words), k, replace=False)])
            for k in DELETED
            for _ in range(draws)
        ]
        curves["top words first"].append(classifier.predict_proba([deleted(text, words[:k]) for k in DELETED]))
        curves[f"random ({draws} draws)"].append(
            classifier.predict_proba(drawn).reshape(len(DELETED), draws).mean(axis=1)
        )
        curves["bottom first"].append(classifier.predict_proba([deleted(text, words[::-1][:k]) for k in DELETED]))
    return {order: np.mean(per_note, axis=0) for order, per_note in curves.items()}


async def latencies(client: httpx.AsyncClient, text: str, repeats: int) -> dict[bool, list[float]]:
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for explain in (False, True):  # warm-up at both shapes
        await classify(client, text, explain)
    for repeat in range(repeats):
        for explain in (repeat % 2 == 0, repeat % 2 == 1):
            started = time.perf_counter()
            await classify(client, text, explain)
            seconds[explain].append(time.perf_counter() - started)
    return seconds


async def run(args: argparse.Namespace) -> None:
    settings = Settings(bundle=args.bundle, variant=args.variant, intra_op_threads=args.threads, explain_top_k=10_000)
    bundle = load_bundle(args.bundle, args.variant, intra_op_threads=args.threads)
    classifier = NoteClassifier.from_bundle(bundle)
    notes = list(load_parts(DataArguments(data="ktas"))["test"].texts)
    print(
        f"bundle {args.bundle}: {bundle.manifest.name} {bundle.manifest.version}, variant {bundle.variant} on "
        f"{bundle.providers[0]}, {args.threads} threads; load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs\n"
    )
    async with service(settings) as client:
        curves = await deletion_curves(client, classifier, notes[: args.notes], args.draws)
        base = classifier.predict_proba(notes[: args.notes]).mean()
        print(f"Deletion curves over {args.notes} KTAS test notes: mean P(emergency), {base:.3f} before deleting")
        print(f"| deleted | {' | '.join(f'k={k}' for k in DELETED)} | area (mean) |\n| --- |{' ---: |' * 6}")
        for order, curve in curves.items():
            print(f"| {order} | {' | '.join(f'{p:.3f}' for p in curve)} | {curve.mean():.3f} |")

        text = note_of_words(notes, LATENCY_WORDS)
        [encoded] = classifier.encode([text])
        seconds = await latencies(client, text, args.repeats)
    print(
        f"\nLatency of one {LATENCY_WORDS}-word note ({len(encoded.ids)} tokens), {args.repeats} requests each, "
        f"interleaved; batches of at most {settings.max_batch_size} notes:"
    )
    print("| request | p50 ms | p95 ms |\n| --- | ---: | ---: |")
    for explain, label in ((False, "plain"), (True, f"explain ({LATENCY_WORDS} + 1 notes)")):
        p95 = statistics.quantiles(seconds[explain], n=20)[18]
        print(f"| {label} | {1000 * statistics.median(seconds[explain]):.1f} | {1000 * p95:.1f} |")
    ratio = statistics.median(seconds[True]) / statistics.median(seconds[False])
    print(f"\nexplain / plain (medians): {ratio:.1f}x (goal: at most 10x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("models/default"))
    parser.add_argument("--variant", default="auto")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--notes", type=int, default=20, help="KTAS test notes for the deletion curves")
    parser.add_argument("--draws", type=int, default=20, help="random deletions per note and k")
    parser.add_argument("--repeats", type=int, default=30, help="requests of each kind for the latency")
    args = parser.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(
            f"no model bundle at {args.bundle}: build one (`docker compose up` builds models/default; "
            "`python -m training export --run RUN --out DIR` exports a trained run) or pass --bundle PATH"
        )
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
