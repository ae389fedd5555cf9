"""From DataArguments to the train/valid/test examples of a run, saving the split beside the run."""

from __future__ import annotations

import logging
from pathlib import Path

from training.config import DataArguments
from training.data.examples import Examples, build_examples, parse_label_map
from training.data.ktas import BUNDLED_KTAS, ktas_examples
from training.data.readers import read_table
from training.data.render import render_examples
from training.data.split import load_split, make_split

log = logging.getLogger(__name__)


def load_examples(args: DataArguments, path: str | None = None, rendered: bool = True) -> Examples:
    """The examples of `path` (default: --data). KTAS notes are rendered as --render says, unless not `rendered`
    (then `shorthand`, which is what a split is made on and checked against)."""
    path = path or args.data
    is_ktas = args.data_format == "ktas" or (args.data_format == "auto" and path == "ktas")
    if path == "ktas":
        path = str(BUNDLED_KTAS)
    if is_ktas:
        frame = read_table(path, delimiter=args.delimiter or ";", encoding=args.encoding)
        return ktas_examples(frame, path, args.render if rendered else "shorthand", args.render_seed)
    frame = read_table(path, delimiter=args.delimiter, encoding=args.encoding)
    return build_examples(
        frame, args.text_columns, args.label_column, parse_label_map(args.label_map), path, args.drop_empty
    )


def load_parts(args: DataArguments, save_split: Path | None = None) -> dict[str, Examples]:
    """train/valid/test: given files, a saved split, or a new seeded stratified split (saved to `save_split`).

    The split is made on records (row ids) of the shorthand notes, whatever --render says, so a run of any
    rendering can reuse another's split.json and no record's renderings cross it; each part is rendered after."""
    if args.valid_file and args.test_file:
        parts = {
            name: load_examples(args, p)
            for name, p in (("train", args.data), ("valid", args.valid_file), ("test", args.test_file))
        }
    else:
        examples = load_examples(args, rendered=False)
        split = (
            load_split(Path(args.split_file))
            if args.split_file
            else make_split(examples, args.valid_fraction, args.test_fraction, args.split_seed)
        )
        if save_split is not None:
            split.save(save_split)
        parts = split.parts(examples)
        if args.render != "shorthand":
            parts = {name: render_examples(part, args.render, args.render_seed) for name, part in parts.items()}
    log.info("data: %s", ", ".join(f"{k} {len(v)} ({v.labels.mean():.1%} emergency)" for k, v in parts.items()))
    return parts
