"""Command-line options the benchmark and experiment scripts share."""

from __future__ import annotations

import argparse
from pathlib import Path


def named_bundle(text: str) -> tuple[str, Path]:
    """`NAME=BUNDLE`, e.g. `l6=models/compression/l6-qat`: a bundle and the name it is reported under."""
    name, equals, bundle = text.partition("=")
    if not (name and equals and bundle):
        raise argparse.ArgumentTypeError(f"expected NAME=BUNDLE, e.g. l6=models/compression/l6-qat; got {text!r}")
    return name, Path(bundle)


def add_compare_option(parser: argparse.ArgumentParser, help: str) -> None:
    """--compare NAME=BUNDLE (repeatable): other bundles measured beside the main one."""
    parser.add_argument("--compare", type=named_bundle, action="append", default=[], metavar="NAME=BUNDLE", help=help)
