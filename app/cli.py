"""`python -m app serve`: every `Settings` field is a flag, so that flags and settings never drift apart.
`python -m app score`: batch scoring of a notes file (app/batch_scoring.py), with the settings that decide how a note
is scored as flags.

Precedence: flag > environment variable `TRIAGE_<NAME>` > default.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, get_args

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from app.settings import Settings

EXIT_NO_BUNDLE = 3  # `serve` found no bundle at TRIAGE_BUNDLE

cli = typer.Typer(
    help="Serve a triage model bundle over HTTP, or score a file of notes with it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@cli.callback()
def main() -> None:
    """Clinical triage inference service."""


def settings_flags(*fields: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn `command(settings, **own_flags)` into a typer command taking its own flags and one flag per `Settings`
    field in `fields` (default: every field).

    A settings flag left out is not passed on (its default is None), so the environment or the field's
    default applies. A field of pydantic models (jwt_issuers) is one flag of JSON text, as in the environment.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
        parameters = [*own, *(_settings_flag(name) for name in fields or Settings.model_fields)]

        @functools.wraps(command)
        def with_settings(**flags: Any) -> Any:
            own_flags = {parameter.name: flags.pop(parameter.name) for parameter in own}
            try:
                settings = Settings(**{name: value for name, value in flags.items() if value is not None})
            except ValidationError as error:
                problems = "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors()
                )
                typer.secho(f"error: invalid settings: {problems}", fg=typer.colors.RED, err=True)
                raise typer.Exit(code=2) from None
            return command(settings, **own_flags)

        with_settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]  # read by typer
        return with_settings

    return decorate


def _settings_flag(name: str) -> inspect.Parameter:
    field = Settings.model_fields[name]
    env = f"env {Settings.model_config['env_prefix']}{name.upper()}"
    shown_default = field.default not in (PydanticUndefined, None) and field.default_factory is None
    help_text = f"{field.description} ({f'default {field.default}; ' if shown_default else ''}{env})"
    flag_type = str if _holds_models(field.annotation) else field.annotation
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[Optional[flag_type], typer.Option(help=help_text)],  # noqa: UP045 (a runtime type)
    )


def _holds_models(annotation: Any) -> bool:
    return any(isinstance(arg, type) and issubclass(arg, BaseModel) for arg in get_args(annotation))


@cli.command()
@settings_flags()
def serve(settings: Settings) -> None:
    """Load the bundle, warm it up and serve /classify (one process: the batcher lives in it)."""
    import uvicorn

    from app.logs import configure_logging

    # Before ONNX Runtime loads: its telemetry uploader (1.29 and later, Linux) would phone home from a hospital
    # network and warn on every start where it cannot keep a device id. An operator's own setting wins.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        from app.main import create_app
        from app.server import server_options
    except ModuleNotFoundError as error:
        if error.name != "onnxruntime":
            raise
        typer.secho(f"error: {error.msg}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    from app.bundle import MANIFEST_FILE

    if not (settings.bundle / MANIFEST_FILE).is_file():
        # One line and its own exit code, not a traceback per restart: the usual first-run mistake.
        typer.secho(
            f"error: no model bundle at {settings.bundle} (no {MANIFEST_FILE}): build it with `docker compose up` "
            "(runs the model service) or `make model`, or set TRIAGE_BUNDLE (--bundle) to a bundle directory",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(code=EXIT_NO_BUNDLE)

    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), **server_options(settings))


# The settings that decide how a note is scored: batch scoring takes them as the service does.
SCORING_SETTINGS = (
    "bundle",
    "variant",
    "intra_op_threads",
    "device_id",
    "max_batch_size",
    "max_batch_tokens",
    "max_note_tokens",
    "max_note_chars",
    "truncation",
)
CHUNK_ROWS = 1024
SCORES_SUFFIXES = (".parquet", ".pq")


@cli.command()
@settings_flags(*SCORING_SETTINGS)
def score(
    settings: Settings,
    *,
    input_path: Annotated[Path, typer.Option("--input", help="The notes: a .csv, .tsv, .jsonl or .parquet file.")],
    output: Annotated[Path, typer.Option(help="The Parquet file to write the scores to (replaced if it exists).")],
    text_column: Annotated[str, typer.Option(help="The column holding the notes.")] = "text",
    id_column: Annotated[
        Optional[str],  # noqa: UP045 (typer reads it at runtime)
        typer.Option(help="A column identifying each row, copied into the output (default: `row`, the row number)."),
    ] = None,
    include_text: Annotated[bool, typer.Option(help="Copy each note's text into the output (column `text`).")] = False,
    encoding: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Encoding of a text file (default: UTF-8, or Korean CP949/EUC-KR when detected)."),
    ] = None,
    delimiter: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Delimiter of a .csv file (default: detected; a .tsv's is a tab)."),
    ] = None,
    chunk_rows: Annotated[
        int,
        typer.Option(min=1, help="Notes read, tokenized and sorted by length together; memory grows with it."),
    ] = CHUNK_ROWS,
    ray_address: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--ray",
            help="Score on a Ray cluster: its address (host:port), `auto` (the cluster this machine belongs to) or "
            "`local` (start one here). Needs the `ray` extra.",
        ),
    ] = None,
    ray_actors: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="Scoring actors on Ray (default: the cluster's CPUs / --ray-cpus-per-actor)."),
    ] = None,
    ray_cpus_per_actor: Annotated[
        float, typer.Option(min=0.1, help="CPUs each Ray actor takes (its ONNX Runtime threads, rounded).")
    ] = 1.0,
) -> None:
    """Score a file of notes into a Parquet file: row id, p_emergency, label, truncated and status per row.

    Notes are read in chunks, so memory does not grow with the file. A row whose note cannot be scored (missing,
    blank, too long) is kept with a null p_emergency and a status saying why.
    """
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as for serve
    try:
        from app.batch_scoring import SCORED, STATUSES, output_schema, score_file
        from app.bundle import BundleError
        from app.note_files import NotesFile, NotesFileError
    except ModuleNotFoundError as error:
        if error.name == "onnxruntime":
            _fail(error.msg)
        _fail(f"{error.name} is not installed: install the `score` extra (pip install 'dsgkd-triage[cpu,score]')")

    output = output.resolve()
    if output.suffix.lower() not in SCORES_SUFFIXES:
        _fail(f"--output {output}: the scores are written as Parquet, to a {' or '.join(SCORES_SUFFIXES)} file")
    if output == input_path.resolve():
        _fail("--output is the input file")
    try:
        notes = NotesFile.open(input_path, text_column, id_column, encoding, delimiter)
        output_schema(notes.id_column, notes.id_type, include_text)
        if ray_address is None:
            summary = score_file(notes, output, settings, include_text, chunk_rows)
        else:
            try:
                from app.ray_scoring import score_file_on_ray
            except ModuleNotFoundError as error:
                _fail(error.msg)
            summary = score_file_on_ray(
                notes, output, settings, include_text, chunk_rows, ray_address, ray_actors, ray_cpus_per_actor
            )
    except (NotesFileError, BundleError, ValueError) as error:
        _fail(str(error))
    typer.echo(f"scored {summary.describe()}; written to {output}", err=True)
    for status, count in sorted(summary.statuses.items()):
        if status != SCORED:
            typer.echo(f"  {count:,} rows not scored, status {status}: {STATUSES[status]}", err=True)


def _fail(message: str) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)
