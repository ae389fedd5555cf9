"""A seeded, stratified train/valid/test split, stored as row ids (never text) so every method shares it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from training.data.examples import DataError, Examples


@dataclass(frozen=True)
class Split:
    fingerprint: str
    seed: int
    fractions: tuple[float, float, float]
    train: list[int]
    valid: list[int]
    test: list[int]

    def parts(self, examples: Examples) -> dict[str, Examples]:
        """The three subsets of `examples`, checked to be the data this split was made from."""
        if examples.fingerprint() != self.fingerprint:
            raise DataError(f"{examples.source}: the data changed since the split was made (fingerprint mismatch)")
        position = {int(r): i for i, r in enumerate(examples.row_ids)}
        return {
            name: examples.subset(np.array([position[r] for r in rows], dtype=np.int64))
            for name, rows in (("train", self.train), ("valid", self.valid), ("test", self.test))
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)))


def load_split(path: Path) -> Split:
    data = json.loads(Path(path).read_text())
    data["fractions"] = tuple(data["fractions"])
    return Split(**data)


def make_split(examples: Examples, valid_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 42) -> Split:
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise DataError(f"split fractions valid={valid_fraction}, test={test_fraction} must be in (0, 1) and sum < 1")
    positions, labels = np.arange(len(examples)), examples.labels
    rest, test = train_test_split(positions, test_size=test_fraction, stratify=labels, random_state=seed)
    train, valid = train_test_split(
        rest, test_size=valid_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    fractions = (1 - valid_fraction - test_fraction, valid_fraction, test_fraction)
    row_ids = (sorted(examples.row_ids[part].tolist()) for part in (train, valid, test))
    return Split(examples.fingerprint(), seed, fractions, *row_ids)
