"""`python -m app serve`: every `Settings` field is a flag, so that flags and settings never drift apart.

Precedence: flag > environment variable `TRIAGE_<NAME>` > default.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Annotated, Any, Optional, get_args

import typer
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticUndefined

from app.settings import Settings

EXIT_NO_BUNDLE = 3  # `serve` found no bundle at TRIAGE_BUNDLE

cli = typer.Typer(
    help="Serve a triage model bundle over HTTP.", no_args_is_help=True, pretty_exceptions_show_locals=False
)


@cli.callback()
def main() -> None:
    """Clinical triage inference service."""


def settings_flags(command: Callable[[Settings], Any]) -> Callable[..., Any]:
    """Turn `command(settings)` into a typer command taking one flag per `Settings` field.

    A flag left out is not passed on (its default is None), so the environment or the field's
    default applies. A field of pydantic models (jwt_issuers) is one flag of JSON text, as in the environment.
    """
    parameters = []
    for name, field in Settings.model_fields.items():
        env = f"env {Settings.model_config['env_prefix']}{name.upper()}"
        shown_default = field.default not in (PydanticUndefined, None) and field.default_factory is None
        help_text = f"{field.description} ({f'default {field.default}; ' if shown_default else ''}{env})"
        flag_type = str if _holds_models(field.annotation) else field.annotation
        parameters.append(
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Optional[flag_type], typer.Option(help=help_text)],  # noqa: UP045 (a runtime type)
            )
        )

    @functools.wraps(command)
    def with_settings(**flags: Any) -> Any:
        try:
            settings = Settings(**{name: value for name, value in flags.items() if value is not None})
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
            typer.secho(f"error: invalid settings: {problems}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=2) from None
        return command(settings)

    with_settings.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]  # read by typer
    return with_settings


def _holds_models(annotation: Any) -> bool:
    return any(isinstance(arg, type) and issubclass(arg, BaseModel) for arg in get_args(annotation))


@cli.command()
@settings_flags
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
