"""The k-fold split: a partition of the cases, independent of their order, and nnU-Net's folds."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from medseg.data.cases import Case, split
from medseg.errors import DataError

NAMES = [f"case_{i:03d}" for i in range(13)]
# Validation cases of each fold for these 13 names, as scikit-learn's
# KFold(n_splits=5, shuffle=True, random_state=12345).split(NAMES) gives them (nnU-Net's default split).
KFOLD_12345 = [
    ["case_000", "case_007", "case_009"],
    ["case_003", "case_006", "case_010"],
    ["case_008", "case_011", "case_012"],
    ["case_001", "case_004"],
    ["case_002", "case_005"],
]


def _cases(names):
    return [Case(name, (Path(f"{name}.nii.gz"),), Path(f"{name}_seg.nii.gz")) for name in names]


@pytest.mark.parametrize("fold", range(5))
def test_folds_are_those_of_kfold(fold):
    train, val = split(_cases(NAMES), 5, fold, 12345)
    assert [c.name for c in val] == KFOLD_12345[fold]
    assert sorted(c.name for c in train + val) == NAMES


def test_folds_partition_the_cases_whatever_their_order():
    shuffled = NAMES[:]
    random.Random(0).shuffle(shuffled)
    seen = []
    for fold in range(4):
        train, val = split(_cases(shuffled), 4, fold, 7)
        assert not {c.name for c in train} & {c.name for c in val}
        assert val == split(_cases(NAMES), 4, fold, 7)[1]
        seen += [c.name for c in val]
    assert sorted(seen) == NAMES


def test_fold_minus_one_trains_on_everything():
    train, val = split(_cases(NAMES), 5, -1, 12345)
    assert [c.name for c in train] == NAMES and val == []


def test_bad_fold_is_an_error():
    with pytest.raises(DataError, match="fold 5"):
        split(_cases(NAMES), 5, 5, 12345)
