"""Peer (b): the bundle's ONNX model behind a minimal FastAPI endpoint, one model run per request.

What one would write without a batcher: a plain `def` endpoint (FastAPI runs it in its threadpool, so
concurrent requests call `session.run` from several threads at once), no queue, no batching. Uses the
service's own bundle loader and `NoteClassifier`, so model file, tokenizer, ONNX Runtime options and the
path from text to P(emergency) are the service's.

    python -m benchmarks.peers.onnx_threadpool --bundle models/NAME --variant int8 --threads 2 --port 8101
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from app.bundle import load_bundle
from app.inference import NoteClassifier

HOST = "127.0.0.1"


class Note(BaseModel):
    id: str | None = None
    text: str


def create_app(bundle_dir: str, variant: str, threads: int) -> FastAPI:
    classifier = NoteClassifier.from_bundle(load_bundle(bundle_dir, variant, intra_op_threads=threads))
    app = FastAPI()

    @app.post("/classify")
    def classify(note: Note) -> dict:
        return {"id": note.id, "probability": float(classifier.predict_proba([note.text])[0])}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="Model bundle directory.")
    parser.add_argument("--variant", default="int8", choices=["fp32", "int8", "fp16"], help="ONNX variant.")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.bundle, args.variant, args.threads),
        host=HOST,
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
