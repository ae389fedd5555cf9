"""Peer (d): LitServe with its dynamic batching, serving the same ONNX bundle as the service.

LitServe runs the HTTP front end and the model in separate processes; requests that arrive within
`--batch-timeout` seconds of each other share one model run of up to `--max-batch-size` notes. The
model run is the service's own path (`NoteClassifier.predict_proba`: tokenize, pad to the longest note,
one `session.run`, softmax), so only the serving layer differs.

    python -m benchmarks.peers.litserve_onnx --bundle models/NAME --variant int8 --threads 2 --port 8103
"""

from __future__ import annotations

import argparse

import litserve

from app.bundle import load_bundle
from app.inference import NoteClassifier

HOST = "127.0.0.1"


class BundleAPI(litserve.LitAPI):
    def __init__(self, bundle_dir: str, variant: str, threads: int, **options: object) -> None:
        super().__init__(**options)
        self.bundle_dir, self.variant, self.threads = bundle_dir, variant, threads
        self.classifier: NoteClassifier | None = None

    def setup(self, device: str) -> None:
        bundle = load_bundle(self.bundle_dir, self.variant, intra_op_threads=self.threads)
        self.classifier = NoteClassifier.from_bundle(bundle)

    def decode_request(self, request: dict) -> str:
        return request["text"]

    def predict(self, texts: list[str]) -> list[float]:
        assert self.classifier is not None, "LitServe calls setup before predict"
        return self.classifier.predict_proba(texts, batch_size=len(texts)).tolist()

    def encode_response(self, probability: float) -> dict:
        return {"probability": probability}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="Model bundle directory.")
    parser.add_argument("--variant", default="int8", choices=["fp32", "int8", "fp16"], help="ONNX variant.")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads.")
    parser.add_argument("--max-batch-size", type=int, default=32, help="LitServe max_batch_size.")
    parser.add_argument("--batch-timeout", type=float, default=0.005, help="LitServe batch_timeout, seconds.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    api = BundleAPI(
        args.bundle,
        args.variant,
        args.threads,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        api_path="/classify",
    )
    server = litserve.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=30)
    server.run(host=HOST, port=args.port, num_api_servers=1, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
