"""The seeded stratified split is stored as row ids and is the same for every method."""

import numpy as np
import pytest

from training.config import ConfigError, DataArguments
from training.data import DataError, load_split, make_split
from training.data.ktas import load_ktas
from training.data.loading import load_parts


@pytest.fixture(scope="module")
def ktas():
    return load_ktas()


def test_split_is_stratified_disjoint_and_complete(ktas):
    split = make_split(ktas, 0.15, 0.15, seed=7)
    parts = split.parts(ktas)
    rows = [set(split.train), set(split.valid), set(split.test)]
    assert sum(map(len, rows)) == len(ktas) and set.union(*rows) == set(range(len(ktas)))
    assert not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    assert abs(len(split.test) - 0.15 * len(ktas)) <= 1
    for part in parts.values():
        assert abs(part.labels.mean() - ktas.labels.mean()) < 0.02


def test_same_seed_same_split_other_seed_other_split(ktas):
    assert make_split(ktas, seed=1) == make_split(ktas, seed=1)
    assert make_split(ktas, seed=1).test != make_split(ktas, seed=2).test


def test_saved_split_holds_no_text_and_round_trips(ktas, tmp_path):
    split = make_split(ktas)
    split.save(tmp_path / "split.json")
    saved = (tmp_path / "split.json").read_text()
    assert "CC:" not in saved
    assert load_split(tmp_path / "split.json") == split


def test_split_refuses_changed_data(ktas):
    split = make_split(ktas)
    changed = ktas.subset(np.arange(len(ktas) - 1))
    with pytest.raises(DataError, match="changed since the split"):
        split.parts(changed)


def test_load_parts_reuses_a_saved_split(tmp_path):
    first = load_parts(DataArguments(data="ktas", split_seed=3), save_split=tmp_path / "split.json")
    again = load_parts(DataArguments(data="ktas", split_seed=99, split_file=str(tmp_path / "split.json")))
    assert first["test"].row_ids.tolist() == again["test"].row_ids.tolist()


def test_given_files_need_each_other():
    with pytest.raises(ConfigError, match="--valid-file and --test-file go together"):
        DataArguments(data="ktas", valid_file="v.csv")
