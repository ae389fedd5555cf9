"""Peer (c): the PyTorch server one would write by hand around a training checkpoint.

`AutoModelForSequenceClassification` in eager mode, one forward per request under
`torch.inference_mode()`, in a plain `def` endpoint (FastAPI's threadpool); no ONNX, no batching.

    python -m benchmarks.peers.torch_eager --checkpoint runs/NAME/checkpoints/best-auroc --threads 2 --port 8102
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

HOST = "127.0.0.1"


class Note(BaseModel):
    id: str | None = None
    text: str


def create_app(checkpoint: str, max_tokens: int) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    app = FastAPI()

    @app.post("/classify")
    def classify(note: Note) -> dict:
        with torch.inference_mode():
            inputs = tokenizer(note.text, truncation=True, max_length=max_tokens, return_tensors="pt")
            probability = torch.softmax(model(**inputs).logits, dim=-1)[0, 1].item()
        return {"id": note.id, "probability": probability}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="A run's checkpoint directory (save_pretrained).")
    parser.add_argument("--max-tokens", type=int, default=384, help="Truncate notes to this many tokens.")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    uvicorn.run(
        create_app(args.checkpoint, args.max_tokens), host=HOST, port=args.port, log_level="warning", access_log=False
    )


if __name__ == "__main__":
    main()
