"""Reading labelled notes, the KTAS adapter, and the train/valid/test split."""

from training.data.examples import DataError, Examples, build_examples, parse_label_map
from training.data.readers import read_table
from training.data.split import Split, load_split, make_split

__all__ = [
    "DataError",
    "Examples",
    "Split",
    "build_examples",
    "load_split",
    "make_split",
    "parse_label_map",
    "read_table",
]
