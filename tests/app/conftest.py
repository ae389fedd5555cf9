"""`tiny_bundle_dir`: one real model bundle per test session, exported from a tiny run on SYNTHETIC notes."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest
import uvicorn

from app.main import create_app
from app.server import server_options
from app.settings import Settings
from training.config import DataArguments, DistillArguments, EvalArguments, ModelArguments, TrainingArguments
from training.export import export_bundle
from training.fit import fit

TINY_MAX_TOKENS = 64


@pytest.fixture(scope="session")
def tiny_bundle_dir(tmp_path_factory, notes, tiny_bert_dir) -> Path:
    """A bundle of the tiny fixture BERT fine-tuned on the SYNTHETIC notes (trained at 64 tokens, read up to its
    128 positions; calibrated, threshold policy target-sensitivity) holding all three variants (fp32, int8,
    fp16): exported with an AUROC tolerance of 1 so that no variant is dropped. Read-only: tests that damage it
    work on a copy."""
    root = tmp_path_factory.mktemp("tiny-bundle")
    data = root / "synthetic_notes.csv"
    pd.DataFrame({"text": [t for t, _ in notes], "label": [y for _, y in notes]}).to_csv(data, index=False)
    run = fit(
        DataArguments(data=str(data)),
        ModelArguments(student=str(tiny_bert_dir), max_length=TINY_MAX_TOKENS),
        TrainingArguments(out=str(root / "run"), epochs=3, batch_size=16, encoder_lr=2e-3, head_lr=5e-3, seed=1),
        DistillArguments(),
        EvalArguments(bootstrap=20),
    )
    return export_bundle(run, root / "bundle", tolerance=1.0)


@pytest.fixture
def bundle_copy(tmp_path, tiny_bundle_dir) -> Path:
    """A copy of the tiny bundle that a test may edit."""
    return Path(shutil.copytree(tiny_bundle_dir, tmp_path / "bundle"))


@pytest.fixture
def anyio_backend():
    """The async tests run on asyncio (anyio's pytest plugin)."""
    return "asyncio"


@pytest.fixture
def settings(tiny_bundle_dir):
    """Settings for the tiny bundle, with overrides."""

    def make(**overrides) -> Settings:
        return Settings(bundle=tiny_bundle_dir, **overrides)

    return make


@asynccontextmanager
async def _serve(settings: Settings, lifespan: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        if lifespan:
            async with app.router.lifespan_context(app):
                yield client
        else:
            yield client


@pytest.fixture
def serve():
    """`async with serve(settings) as client`: the real app over HTTP, with its lifespan (bundle loaded, batcher
    running) unless `lifespan=False`."""
    return _serve


@contextmanager
def _running_server(settings: Settings) -> Iterator[tuple[str, int]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **server_options(settings)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield listener.getsockname()
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture
def running_server():
    """`with running_server(settings) as (host, port)`: the real server (uvicorn with `app.server`'s protocol) on a
    free loopback port, in a thread."""
    return _running_server
