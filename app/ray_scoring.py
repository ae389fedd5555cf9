"""Batch scoring on a Ray cluster (`python -m app score --ray ADDRESS`), with Ray Data.

The notes file is read by one Ray read task with the local reader (`NotesFile.chunks`: the same parsing, errors
and chunks), scored by a pool of actors that each hold the bundle's ONNX session (`ChunkScorer`), and the scores
come back to this process, in file order, to be written by the same `ScoresWriter` as a local run's. The output
file is therefore the same as a local run's, row for row.

Ray re-cuts blocks of rows as it sees fit, but a chunk's notes share model runs (and an int8 model's activation
scales), so a chunk must be scored whole: each chunk travels as ONE row of list columns (`pack`), and each actor call
scores one chunk.

The input file and the bundle must be readable at the same paths on every node (a shared file system), and every
node needs this package installed (`pip install 'dsgkd-triage[cpu,ray]'`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from app.batch_scoring import ChunkScorer, ScoresWriter, ScoringSummary, output_schema, write_scores
from app.bundle import BundleError
from app.note_files import NotesFile, NotesFileError
from app.settings import Settings

try:
    import ray
    import ray.data
    from ray.data import DataContext
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "Ray is not installed: install the `ray` extra (pip install 'dsgkd-triage[ray]')", name="ray"
    ) from error


def pack(chunk: pa.RecordBatch) -> pa.Table:
    """A chunk as one row: each column a list holding the chunk's values."""
    offsets = pa.array([0, chunk.num_rows], pa.int32())
    return pa.table(
        {
            name: pa.ListArray.from_arrays(offsets, column)
            for name, column in zip(chunk.schema.names, chunk.columns, strict=True)
        }
    )


def unpack(packed: pa.Table, index: int) -> pa.RecordBatch:
    """The chunk in row `index` of packed chunks."""
    return pa.record_batch([packed.column(name)[index].values for name in packed.column_names], packed.column_names)


class NotesDatasource(Datasource):
    """A notes file as one read task yielding its packed chunks, in file order."""

    def __init__(self, notes: NotesFile, chunk_rows: int) -> None:
        self.notes = notes
        self.chunk_rows = chunk_rows

    def estimate_inmemory_data_size(self) -> int:
        return self.notes.path.stat().st_size

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: DataContext | None = None
    ) -> list[ReadTask]:
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=(str(self.notes.path),), exec_stats=None)
        return [ReadTask(self._read, metadata, per_task_row_limit=per_task_row_limit)]

    def _read(self) -> Iterator[pa.Table]:
        for chunk in self.notes.chunks(self.chunk_rows):
            yield pack(chunk)


class ChunkScoringActor:
    """A Ray actor holding a `ChunkScorer` (the bundle loaded once); called with packed chunks."""

    def __init__(self, settings: Settings, notes: NotesFile, include_text: bool) -> None:
        self.scorer = ChunkScorer(settings, notes, include_text)

    def __call__(self, packed: pa.Table) -> pa.Table:
        return pa.Table.from_batches(
            [self.scorer.score(unpack(packed, index)) for index in range(packed.num_rows)], self.scorer.schema
        )


def score_file_on_ray(
    notes: NotesFile,
    output: Path,
    settings: Settings,
    include_text: bool,
    chunk_rows: int,
    address: str,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
) -> ScoringSummary:
    """Score every note of `notes` on the Ray cluster at `address` (anything `ray.init` takes: host:port, auto,
    local) with `actors` actors of `cpus_per_actor` CPUs each (default: as many as the cluster's CPUs allow), and
    write the scores to `output`."""
    schema = output_schema(notes.id_column, notes.id_type, include_text)
    # Each actor's ONNX Runtime uses the CPUs Ray gave it, unless told otherwise.
    threads = settings.intra_op_threads or max(1, round(cpus_per_actor))
    settings = settings.model_copy(update={"intra_op_threads": threads, "bundle": settings.bundle.resolve()})
    ray.init(address=address, logging_level=logging.WARNING, configure_logging=False)
    try:
        context = DataContext.get_current()
        context.execution_options.preserve_order = True  # scores come back in file order
        context.enable_progress_bars = False  # the writer's progress bar counts notes
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        pool = actors or max(1, int(cpus // cpus_per_actor))
        scores = (
            # The read takes no CPU of its own: it must not wait for CPUs the actors hold.
            ray.data.read_datasource(NotesDatasource(notes, chunk_rows), num_cpus=0).map_batches(
                ChunkScoringActor,
                fn_constructor_args=(settings, notes, include_text),
                batch_size=1,
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=pool),
                num_cpus=cpus_per_actor,
            )
        )
        batches = (
            batch
            for table in scores.iter_batches(batch_size=None, batch_format="pyarrow")
            for batch in table.to_batches()
        )
        return write_scores(batches, ScoresWriter(output, schema, notes.rows))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, NotesFileError | BundleError):
            raise error.cause from None  # its own message, not Ray's traceback of the task
        raise
    finally:
        ray.shutdown()
