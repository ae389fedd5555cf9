"""Turn a table into labelled examples: texts, binary labels, and the row ids they came from."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from training.errors import DataError

if TYPE_CHECKING:
    from training.data.render import Rendering

log = logging.getLogger(__name__)

LABEL_NAMES = ("non-emergency", "emergency")


@dataclass(frozen=True)
class Examples:
    texts: list[str]
    labels: np.ndarray  # int64, 1 = emergency
    row_ids: np.ndarray  # int64, 0-based data row in the source table
    source: str
    # KTAS: the records behind the texts and how they were rendered (training/data/render.py); None for a table.
    rendering: Rendering | None = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, index: np.ndarray) -> Examples:
        texts = [self.texts[i] for i in index]
        return Examples(texts, self.labels[index], self.row_ids[index], self.source, self.rendering)

    def for_epoch(self, epoch: int) -> Examples:
        """The examples to train on in `epoch` (from 1): these, unless the rendering re-draws each note every
        epoch (`--render mixed`); `texts` itself (epoch 0's draw) stays fixed for validation and test."""
        if self.rendering is None or not self.rendering.per_epoch:
            return self
        return replace(self, texts=self.rendering.texts(self.row_ids, epoch))

    def fingerprint(self) -> str:
        """sha256 over texts and labels: identifies the data a split was made from without storing any text."""
        digest = hashlib.sha256()
        for text, label in zip(self.texts, self.labels.tolist(), strict=True):
            digest.update(text.encode())
            digest.update(b"\x1f%d\x1e" % label)
        return digest.hexdigest()


def parse_label_map(spec: str | dict | None) -> dict[str, int] | None:
    """`"1=1,2=1,3=1,4=0,5=0"` (or a mapping) -> {"1": 1, ...}. Targets may be 0/1 or the label names."""
    if spec is None or spec == "":
        return None
    pairs = spec.items() if isinstance(spec, dict) else (item.split("=", 1) for item in spec.split(",") if item.strip())
    mapping = {}
    for key, target in pairs:
        target = str(target).strip()
        if target in LABEL_NAMES:
            mapping[str(key).strip()] = LABEL_NAMES.index(target)
        elif target in ("0", "1"):
            mapping[str(key).strip()] = int(target)
        else:
            raise DataError(f"label map: target {target!r} for {key!r} must be 0, 1, or one of {LABEL_NAMES}")
    return mapping


def build_examples(
    frame: pd.DataFrame,
    text_columns: list[str],
    label_column: str,
    label_map: dict[str, int] | None,
    source: str,
    drop_empty: bool = False,
) -> Examples:
    missing = [c for c in [*text_columns, label_column] if c not in frame.columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; the file has {list(frame.columns)}")

    texts = _join_text_columns(frame, text_columns)
    labels = _map_labels(frame[label_column], label_map, source, label_column)
    row_ids = np.arange(len(frame), dtype=np.int64)

    empty = np.array([not t for t in texts])
    if empty.any():
        rows = row_ids[empty][:10].tolist()
        if not drop_empty:
            raise DataError(
                f"{source}: {int(empty.sum())} empty text(s) in column(s) {text_columns}, e.g. data rows {rows} "
                "(0-based); fix them or pass --drop-empty"
            )
        log.warning("dropped %d rows with empty text from %s", int(empty.sum()), source)
        keep = ~empty
        texts, labels, row_ids = [t for t, k in zip(texts, keep, strict=True) if k], labels[keep], row_ids[keep]

    classes = np.unique(labels)
    if len(classes) < 2:
        raise DataError(f"{source}: only one class ({LABEL_NAMES[int(classes[0])]}) in {label_column}; need both")
    return Examples(texts, labels, row_ids, source)


def _join_text_columns(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    parts = frame[columns].fillna("").astype(str).apply(lambda col: col.str.strip())
    return ["\n".join(p for p in row if p) for row in parts.itertuples(index=False, name=None)]


def _map_labels(values: pd.Series, label_map: dict[str, int] | None, source: str, column: str) -> np.ndarray:
    keys = values.map(lambda v: "" if pd.isna(v) else str(v).strip())
    if label_map is None:
        label_map = {"0": 0, "1": 1, **{name: i for i, name in enumerate(LABEL_NAMES)}}
    mapped = keys.map(label_map)
    unknown = mapped.isna().to_numpy()
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        bad = sorted(set(keys[unknown]))[:10]
        raise DataError(
            f"{source}: column {column!r} has {int(unknown.sum())} value(s) outside the label map, "
            f"first at data row {row} (0-based): {bad}; known values: {sorted(label_map)}"
        )
    return mapped.to_numpy(dtype=np.int64)
