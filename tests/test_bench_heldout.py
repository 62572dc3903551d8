"""scripts/bench_heldout_folds.py: the held-out split, the datasets it writes, and a failed step named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.cases import find_dataset
from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "bench_heldout_folds.py"
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))
import bench_heldout_folds as bench  # noqa: E402


def _two_channel_dataset(root: Path, cases: int = 6) -> Path:
    """An MSD folder whose cases are nnU-Net channel files <case>_0000/_0001 and one label each."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for index in range(cases):
        name = f"case_{index:03d}"
        for channel in range(2):
            image = np.full((8, 8, 8), index * 10 + channel, dtype=np.float32)
            nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}_{channel:04d}.nii.gz")
        label = np.zeros((8, 8, 8), dtype=np.uint8)
        label[2:5, 2:5, 2:5] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    description = {"name": "Two", "channel_names": {"0": "T1", "1": "T2"}, "labels": {"0": "background", "1": "x"},
                   "file_ending": ".nii.gz", "training": training, "numTraining": cases}
    (root / "dataset.json").write_text(json.dumps(description))
    return root


def test_the_test_set_is_a_seeded_fifth_and_leaves_enough_cases_for_the_folds():
    names = [f"case_{i:03d}" for i in range(20)]
    test = bench.choose_test_cases(names, 0.2, seed=3, folds=5)
    assert len(test) == 4 and set(test) <= set(names)
    assert bench.choose_test_cases(list(reversed(names)), 0.2, seed=3, folds=5) == test  # order of the input
    assert bench.choose_test_cases(names, 0.2, seed=4, folds=5) != test
    with pytest.raises(bench.BenchError, match="fewer than the 5 folds"):
        bench.choose_test_cases(names[:5], 0.2, seed=0, folds=5)  # 1 held out, 4 left


def test_the_split_writes_a_working_dataset_medseg_reads_and_a_test_folder(tmp_path):
    source = _two_channel_dataset(tmp_path / "source")
    out = tmp_path / "out"
    bench.write_split(source, out, ["case_001", "case_004"])
    working = find_dataset(out / "dataset")
    assert [case.name for case in working.cases] == ["case_000", "case_002", "case_003", "case_005"]
    assert working.labels == {0: "background", 1: "x"} and working.modalities == ("T1", "T2")
    for case in working.cases:
        assert len(case.images) == 2 and all(p.parent == (out / "dataset" / "imagesTr").absolute() for p in case.images)
        assert case.images[1].resolve() == (source / "imagesTr" / f"{case.name}_0001.nii.gz").resolve()
    assert sorted(p.name for p in (out / "test" / "imagesTs").iterdir()) == [
        "case_001_0000.nii.gz", "case_001_0001.nii.gz", "case_004_0000.nii.gz", "case_004_0001.nii.gz"]
    assert sorted(p.name for p in (out / "test" / "labelsTs").iterdir()) == ["case_001.nii.gz", "case_004.nii.gz"]


def test_a_failed_step_ends_the_script_naming_it(tmp_path):
    # train.epochs=0 is outside its range: `medseg train` refuses it after `medseg plan` ran.
    done = subprocess.run([sys.executable, str(SCRIPT), str(ROOT / "sample_data"), "-o", str(tmp_path / "out"),
                           "--set", "train.epochs=0"], capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "step 'train' failed with exit code 2" in done.stderr
    assert (tmp_path / "out" / "plan.yaml").is_file() and "train.epochs" in (tmp_path / "out" / "logs" / "train.log").read_text(encoding="utf-8")
    assert not (tmp_path / "out" / "heldout.json").exists()


def test_keys_the_script_sets_are_refused_before_any_work(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), str(ROOT / "sample_data"), "-o", str(tmp_path / "out"),
                           "--set", "data.folds=3"], capture_output=True, encoding="utf-8", errors="replace", timeout=60)
    assert done.returncode == 2 and "--folds-count" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
