"""From DataArguments to the train/valid/test examples of a run, saving the split beside the run."""

from __future__ import annotations

import logging
from pathlib import Path

from training.config import DataArguments
from training.data.examples import Examples, build_examples, parse_label_map
from training.data.ktas import BUNDLED_KTAS, ktas_examples
from training.data.readers import read_table
from training.data.split import load_split, make_split

log = logging.getLogger(__name__)


def load_examples(args: DataArguments, path: str | None = None) -> Examples:
    path = path or args.data
    is_ktas = args.data_format == "ktas" or (args.data_format == "auto" and path == "ktas")
    if path == "ktas":
        path = str(BUNDLED_KTAS)
    if is_ktas:
        return ktas_examples(read_table(path, delimiter=args.delimiter or ";"), path)
    frame = read_table(path, delimiter=args.delimiter)
    return build_examples(
        frame, args.text_columns, args.label_column, parse_label_map(args.label_map), path, args.drop_empty
    )


def load_parts(args: DataArguments, save_split: Path | None = None) -> dict[str, Examples]:
    """train/valid/test: given files, a saved split, or a new seeded stratified split (saved to `save_split`)."""
    if args.valid_file and args.test_file:
        parts = {
            name: load_examples(args, p)
            for name, p in (("train", args.data), ("valid", args.valid_file), ("test", args.test_file))
        }
    else:
        examples = load_examples(args)
        split = (
            load_split(Path(args.split_file))
            if args.split_file
            else make_split(examples, args.valid_fraction, args.test_fraction, args.split_seed)
        )
        if save_split is not None:
            split.save(save_split)
        parts = split.parts(examples)
    log.info("data: %s", ", ".join(f"{k} {len(v)} ({v.labels.mean():.1%} emergency)" for k, v in parts.items()))
    return parts
