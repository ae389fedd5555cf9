"""Typer commands whose flags come from dataclass fields, optionally filled from a YAML/JSON config file.

Each field becomes `--field-name` with the field's help text and type (a `Literal` type becomes a choice
that typer checks and lists). Precedence: flag on the command line > value in `--config FILE` > the
dataclass default. The dataclasses check themselves when built (`__post_init__`) and `check` checks them
together; a `ConfigError` from either becomes a usage error (exit code 2) before the command runs.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from training.errors import ConfigError

CONFIG_HELP = "YAML or JSON file with the same options (flat, or grouped by section); flags override it."


def read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    if not path.is_file():
        raise typer.BadParameter(f"{path}: no such config file", param_hint="--config")
    text = path.read_text()
    loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(loaded, dict):
        raise typer.BadParameter(f"{path}: expected a mapping of option names to values", param_hint="--config")
    flat: dict[str, Any] = {}
    for key, value in loaded.items():
        flat.update(
            value
            if isinstance(value, dict) and key in ("data", "model", "training", "distill", "evaluation", "pretrain")
            else {key: value}
        )
    return {k.replace("-", "_"): v for k, v in flat.items()}


def dataclass_command(*classes: type, check: Callable[..., None] | None = None) -> Callable[[Callable], Callable]:
    """Decorate `fn(*instances)`: the wrapped command takes every field of `classes` as a flag, plus --config.

    `check(*instances)`, if given, checks the instances together before `fn` runs."""

    def decorate(fn: Callable) -> Callable:
        params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
        owner: dict[str, type] = {}
        required: list[str] = []
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in fields(cls):
                kind = hints[f.name]
                if f.default is not MISSING:
                    default = f.default
                elif f.default_factory is not MISSING:
                    default = f.default_factory()
                else:  # required, but may come from --config: checked after merging
                    default, kind = None, kind | None
                    required.append(f.name)
                option = typer.Option(help=f.metadata.get("help", "") + (" [required]" if f.name in required else ""))
                params.append(
                    inspect.Parameter(
                        f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, option]
                    )
                )
                owner[f.name] = cls
        params.append(
            inspect.Parameter(
                "config",
                inspect.Parameter.KEYWORD_ONLY,
                default=None,
                annotation=Annotated[Path | None, typer.Option(help=CONFIG_HELP)],
            )
        )

        def command(ctx: typer.Context, **values: Any) -> Any:
            from_file = read_config_file(values.pop("config"))
            unknown = sorted(set(from_file) - set(owner))
            if unknown:
                raise typer.BadParameter(f"unknown option(s) in config file: {unknown}", param_hint="--config")
            for name, value in from_file.items():
                source = ctx.get_parameter_source(name)
                if source is None or source.name not in ("COMMANDLINE", "ENVIRONMENT"):
                    values[name] = value
            missing = [f"--{name.replace('_', '-')}" for name in required if values[name] is None]
            if missing:
                raise typer.BadParameter(f"missing option(s) {', '.join(missing)} (on the command line or in --config)")
            try:
                instances = [cls(**{f.name: values[f.name] for f in fields(cls)}) for cls in classes]
                if check is not None:
                    check(*instances)
            except ConfigError as error:
                raise typer.BadParameter(str(error)) from None
            return fn(*instances)

        wrapped: Any = functools.wraps(fn)(command)
        wrapped.__signature__ = inspect.Signature(params)  # what typer reads the options from
        return wrapped

    return decorate
