"""Security and failure guarantees, through the real CLI: paths stay inside the dataset and the
output folder, temporary files never follow symlinks, checkpoints are checked before anything is
decompressed, runs are locked, and every error is one line on stderr (docs/reliability.md)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg import checkpoint
from medseg.cli import app
from tests.conftest import ROOT

runner = CliRunner()
TINY = [
    "model.base_width=4", "model.max_width=8", "train.epochs=1", "train.iterations_per_epoch=2",
    "train.batch_size=1", "train.patch_size=[16,16,16]", "train.workers=0", "validate.every=1",
    "validate.sw_batch_size=4", "data.folds=2",
]


# ---------------------------------------------------------------------------------------------
# helpers


def _nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def _dataset(root: Path, cases: int = 4, ending: str = ".nii.gz") -> Path:
    """A tiny MSD-style dataset: 16³ images with a cube of label 1, and dataset.json."""
    rng = np.random.default_rng(0)
    for k in range(cases):
        label = np.zeros((16, 16, 16), np.uint8)
        label[4 + k % 3:11, 5:12, 4:10] = 1
        image = (rng.normal(0, 1, label.shape) + 3 * label).astype(np.float32)
        _nifti(root / "imagesTr" / f"case{k}.nii.gz", image)
        _nifti(root / "labelsTr" / f"case{k}.nii.gz", label)
    _describe(root, file_ending=ending)
    return root


def _describe(root: Path, **fields) -> None:
    description = {"labels": {"0": "background", "1": "cube"}, "modality": {"0": "MRI"}, **fields}
    (root / "dataset.json").write_text(json.dumps(description), encoding="utf-8")


def _train(dataset: Path, output: Path, *extra: str, name: str | None = "run", debug: bool = False):
    args = (["--debug"] if debug else []) + ["train", str(ROOT / "configs" / "sample.yaml")]
    sets = [*TINY, f"data.dataset={dataset}", f"output_dir={output}", *extra]
    if name is not None:
        sets.append(f"run_name={name}")
    for item in sets:
        args += ["--set", item]
    return runner.invoke(app, args)


def _tree(root: Path) -> dict[str, bytes | str]:
    """Every file and link under `root` with its content (or link target): a snapshot."""
    shot: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            shot[key] = "-> " + os.readlink(path)
        elif path.is_file():
            shot[key] = path.read_bytes()
    return shot


def _one_line_error(result, *words: str, code: int = 2) -> str:
    """The result failed with `code`, exactly one line on stderr naming each of `words`, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _no_temporaries(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp." in p.name]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny trained run (1 epoch of 2 steps), copied by the tests that change it."""
    base = tmp_path_factory.mktemp("trained")
    dataset = _dataset(base / "data")
    result = _train(dataset, base / "runs")
    assert result.exit_code == 0, result.output
    return base / "runs" / "run"


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "run"
    shutil.copytree(trained, run, symlinks=True)
    return run


# ---------------------------------------------------------------------------------------------
# 1. paths never leave the dataset folder


@pytest.mark.parametrize("ending", ["/../../../../x/secret.nii.gz", "/../../secret.nii.gz", ".nii.gz/../..", ".png"])
def test_file_ending_cannot_name_a_file_outside_the_dataset(tmp_path, ending):
    dataset = _dataset(tmp_path / "data", cases=2, ending=ending)
    secret = _nifti(tmp_path / "x" / "secret.nii.gz", np.ones((16, 16, 16), np.float32))
    before = _tree(tmp_path)
    result = runner.invoke(app, ["plan", str(dataset)])
    _one_line_error(result, "dataset.json", "file_ending")
    assert _tree(tmp_path) == before and secret.is_file()


@pytest.mark.parametrize("entry", [
    {"image": "../outside.nii.gz", "label": "./labelsTr/case0.nii.gz"},
    {"image": "./imagesTr/case0.nii.gz", "label": "/etc/outside.nii.gz"},
    {"image": "imagesTr/../../outside.nii.gz", "label": "labelsTr/case0.nii.gz"},
    {"image": ".", "label": "labelsTr/case0.nii.gz"},
])
def test_dataset_json_paths_outside_are_refused(tmp_path, entry):
    dataset = _dataset(tmp_path / "data", cases=2)
    _nifti(tmp_path / "outside.nii.gz", np.ones((16, 16, 16), np.float32))
    _describe(dataset, training=[entry])
    before = _tree(tmp_path)
    result = runner.invoke(app, ["plan", str(dataset)])
    _one_line_error(result, "dataset.json")
    assert "outside the dataset folder" in result.stderr
    assert _tree(tmp_path) == before


def test_symlinks_placed_inside_the_dataset_are_followed(tmp_path):
    # The documented exception: a link inside the dataset to a file elsewhere is the user's choice.
    source = _dataset(tmp_path / "elsewhere", cases=4)
    dataset = tmp_path / "data"
    for sub in ("imagesTr", "labelsTr"):
        (dataset / sub).mkdir(parents=True)
        for case in (source / sub).iterdir():
            (dataset / sub / case.name).symlink_to(case)
    _describe(dataset)
    from medseg.data.cases import find_dataset

    assert [c.name for c in find_dataset(dataset).cases] == [f"case{k}" for k in range(4)]


def _metaimage_case(dataset: Path, element_data_file: str) -> None:
    """case0's image as a MetaImage header whose ElementDataFile is the given text."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ones((16, 16, 16), np.float32))
    sitk.WriteImage(image, str(dataset / "imagesTr" / "case0.mhd"))
    header = (dataset / "imagesTr" / "case0.mhd").read_text(encoding="utf-8")
    (dataset / "imagesTr" / "case0.mhd").write_text(
        header.replace("ElementDataFile = case0.raw", f"ElementDataFile = {element_data_file}"))
    (dataset / "imagesTr" / "case0.nii.gz").unlink()


@pytest.mark.parametrize("element_data_file", [
    "../../secret.raw", "{secret}", "LIST\ncase0.raw\n../../secret.raw", "../../secre%01d.raw 1 1 1",
])
def test_metaimage_data_file_outside_its_folder_is_refused_before_reading(tmp_path, element_data_file):
    dataset = _dataset(tmp_path / "data", cases=2)
    secret = tmp_path / "secret.raw"
    secret.write_bytes(np.ones(16 ** 3, np.float32).tobytes())
    _metaimage_case(dataset, element_data_file.format(secret=secret))
    description = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    description["training"] = [{"image": "imagesTr/case0.mhd", "label": "labelsTr/case0.nii.gz"},
                               {"image": "imagesTr/case1.nii.gz", "label": "labelsTr/case1.nii.gz"}]
    (dataset / "dataset.json").write_text(json.dumps(description))
    before = _tree(tmp_path)
    result = runner.invoke(app, ["plan", str(dataset)])
    _one_line_error(result, "case0.mhd", "ElementDataFile", "outside")
    assert _tree(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# 2. a run is written inside output_dir


@pytest.mark.parametrize("name", ["../escaped_run", "{abs}", "a/b", "..", ".", "a\\b", "x\0y"])
def test_run_name_is_one_path_component(tmp_path, name):
    dataset = _dataset(tmp_path / "data", cases=2)
    before = _tree(tmp_path)
    result = _train(dataset, tmp_path / "out", name=name.format(abs=tmp_path / "abs"))
    _one_line_error(result, "run_name")
    assert _tree(tmp_path) == before  # nothing written, not even output_dir


# ---------------------------------------------------------------------------------------------
# 3. temporary files: exclusive, unique, never through a symlink


def test_symlinks_planted_at_temporary_names_are_never_written_through(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious", encoding="utf-8")
    planted = ["metrics.csv.tmp", ".metrics.csv.tmp", "last.pt.tmp", ".last.pt.tmp", "best.pt.tmp",
               "config.yaml.tmp", ".lock.tmp", "progress.png.tmp"]
    for name in planted:
        (run / name).symlink_to(victim)
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"]["train"]["epochs"] = 2  # one more epoch: every file is written again
    checkpoint.save(state, run / "last.pt")
    # The log is appended to, not replaced: a link in its place is refused, not written through.
    (run / "train.log").unlink(missing_ok=True)
    (run / "train.log").symlink_to(victim)
    _one_line_error(runner.invoke(app, ["train", "--resume", str(run)]), str(run / "train.log"), "symbolic link")
    assert victim.read_text(encoding="utf-8") == "precious"
    (run / "train.log").unlink()
    result = runner.invoke(app, ["train", "--resume", str(run)])
    assert result.exit_code == 0, result.output
    assert victim.read_text(encoding="utf-8") == "precious"
    assert all((run / name).is_symlink() for name in planted)
    assert checkpoint.load(run / "last.pt")["epoch"] == 1
    left = [p.name for p in run.iterdir() if p.name not in planted and (".tmp" in p.name)]
    assert not left, left


def test_atomic_path_renames_on_success_and_removes_on_failure(tmp_path):
    import SimpleITK as sitk

    from medseg.files import atomic_path

    target = tmp_path / "image.nrrd"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as path:
            assert path.parent == tmp_path and path.name.endswith(".nrrd") and path.exists()
            raise RuntimeError("writer failed")
    assert target.read_text(encoding="utf-8") == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["image.nrrd"]
    with atomic_path(target) as path:
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(path))
    assert sitk.ReadImage(str(target)).GetSize() == (4, 4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.nrrd"]


# ---------------------------------------------------------------------------------------------
# 4. checkpoints, stale temporaries, runs without a checkpoint, the lock, the cache, a full disk


def _data_offset(path: Path, record: str) -> tuple[int, int]:
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(record)
    with open(path, "rb") as stream:
        stream.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(stream.read(4), "<u2")
    return info.header_offset + 30 + int(name_length) + int(extra_length), info.file_size


def test_corrupted_weight_record_is_refused(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    with zipfile.ZipFile(run / "last.pt") as archive:
        weights = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    offset, size = _data_offset(run / "last.pt", weights.filename)
    data = bytearray((run / "last.pt").read_bytes())
    data[offset:offset + min(4096, size)] = b"\xff" * min(4096, size)
    (run / "last.pt").write_bytes(bytes(data))
    before = _tree(tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _one_line_error(result, str(run / "last.pt"), "CRC")
    assert _tree(tmp_path) == before


def _tiny_checkpoint() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.zeros(1)}, "config": {}}, buffer)
    return buffer.getvalue()


def _rewrite(source: bytes, path: Path, change) -> Path:
    import io

    with zipfile.ZipFile(io.BytesIO(source)) as archive, zipfile.ZipFile(path, "w") as out:
        for info in archive.infolist():
            change(out, info, archive.read(info))
    return path


def _deflate_bomb(path: Path, floats: int) -> Path:
    """A 1 MiB checkpoint whose weight record inflates to 4*floats bytes, its pickle saying so."""

    def change(out, info, data):
        if info.filename.endswith("data.pkl"):
            big = b"J" + floats.to_bytes(4, "little")
            out.writestr(info.filename, data.replace(b"K\x01t", big + b"t").replace(b"K\x01\x85", big + b"\x85"))
        elif info.filename.endswith("data/0"):
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with out.open(record, "w", force_zip64=True) as stream:
                for _ in range(floats * 4 >> 24):
                    stream.write(bytes(1 << 24))
        else:
            out.writestr(info.filename, data)

    return _rewrite(_tiny_checkpoint(), path, change)


def _storage_claims(path: Path, numel: int) -> Path:
    """A stored (uncompressed) checkpoint whose pickle declares a storage far larger than its record."""

    def change(out, info, data):
        if info.filename.endswith("data.pkl"):
            data = data.replace(b"K\x01t", b"J" + numel.to_bytes(4, "little") + b"t")
        out.writestr(info.filename, data)

    return _rewrite(_tiny_checkpoint(), path, change)


def _record_beyond_file(path: Path) -> Path:
    data = bytearray(_tiny_checkpoint())
    # The central directory's size field of the first record claims 1 GiB (offset 20 in a central
    # directory entry: compressed size; 24: uncompressed size).
    first = data.find(b"PK\x01\x02")
    assert first > 0
    data[first + 20:first + 28] = (1 << 30).to_bytes(4, "little") * 2
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("make", ["claims", "beyond", "not_zip", "truncated"])
def test_hostile_checkpoints_are_refused(tmp_path, make):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    last = run / "last.pt"
    if make == "claims":
        _storage_claims(last, 1 << 30)
    elif make == "beyond":
        _record_beyond_file(last)
    elif make == "not_zip":
        last.write_bytes(b"PK\x03\x04" + os.urandom(1000))
    else:
        last.write_bytes(_tiny_checkpoint()[:-200])
    before = _tree(tmp_path)
    result = runner.invoke(app, ["train", "--resume", str(run)])
    _one_line_error(result, str(last))
    assert _tree(tmp_path) == before


def test_deflate_bomb_checkpoint_is_refused_before_inflating(tmp_path):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    last = _deflate_bomb(run / "last.pt", 1 << 26)  # 256 MiB once inflated
    assert last.stat().st_size < 1 << 20
    before = _tree(tmp_path)
    # A fresh process, so that its peak memory is this load's alone.
    script = ("import resource, sys\nfrom medseg.cli import main\nfrom medseg.monai_import import skip_monai_extras\n"
              "skip_monai_extras()\nimport medseg.train\n"
              "start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "sys.argv = ['medseg', 'train', '--resume', sys.argv[1]]\n"
              "try:\n    main()\nexcept SystemExit as stop:\n    code = stop.code\n"
              "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start\n"
              "print(code, grown)\n")
    done = subprocess.run([sys.executable, "-c", script, str(run)], capture_output=True, encoding="utf-8", errors="replace",
                          cwd=tmp_path, timeout=120)
    code, grown_kib = done.stdout.split()
    assert code == "2", done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(last) in lines[0] and "Traceback" not in done.stderr, done.stderr
    assert "compressed" in lines[0]
    assert int(grown_kib) < 64 * 1024  # KiB: well under the 256 MiB the bomb inflates to
    assert _tree(tmp_path) == before


def test_resume_removes_only_its_own_stale_temporaries(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    stale = [".last.pt.k2j4x9_q.tmp", ".metrics.csv.a1b2c3d4.tmp", ".best.pt.zzzzzzzz.tmp"]
    kept = ["notes.tmp", ".last.pt.tmp", "last.pt.k2j4x9_q.tmp", ".x.toolongname.tmp"]
    for name in stale + kept:
        (run / name).write_bytes(b"x" * 1000)
    (tmp_path / "target").write_text("kept", encoding="utf-8")
    (run / ".link.abcdefgh.tmp").symlink_to(tmp_path / "target")  # removed, its target untouched
    # Extended by an epoch: a finished run resumed as it is only says so.
    result = runner.invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=2"])
    assert result.exit_code == 0, result.output
    assert not [n for n in stale + [".link.abcdefgh.tmp"] if (run / n).exists() or (run / n).is_symlink()]
    assert all((run / n).is_file() for n in kept)
    assert (tmp_path / "target").read_text(encoding="utf-8") == "kept"


@pytest.mark.parametrize("how", ["resume", "same_command"])
def test_run_folder_without_checkpoint_says_what_to_do(trained, tmp_path, how):
    run = _copy_run(trained, tmp_path)
    for name in ("last.pt", "best.pt", "metrics.csv"):
        (run / name).unlink()
    dataset = trained.parent.parent / "data"
    before = _tree(tmp_path)
    if how == "resume":
        result = runner.invoke(app, ["train", "--resume", str(run)])
    else:
        result = _train(dataset, tmp_path / "runs")
    line = _one_line_error(result, str(run), "no checkpoint")
    assert "remove the folder" in line and "config.yaml" in line
    assert _tree(tmp_path) == before


def test_second_process_on_a_locked_run_refuses(trained, tmp_path):
    run = _copy_run(trained, tmp_path)
    with open(run / ".lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `medseg train` holds it
        before = _tree(tmp_path)
        result = runner.invoke(app, ["train", "--resume", str(run), "--set", "train.epochs=2"])
        _one_line_error(result, str(run), "another medseg process")
        assert _tree(tmp_path) == before


def test_shared_cache_dir_is_keyed_by_preprocessing(tmp_path):
    dataset = _dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    for name, spacing in (("a", "[1,1,1]"), ("b", "[2,2,2]")):
        result = _train(dataset, tmp_path / "runs", "data.cache=disk", f"data.cache_dir={cache}",
                        f"data.spacing={spacing}", "data.fold=-1", "train.iterations_per_epoch=1", name=name)
        assert result.exit_code == 0, result.output
    folders = [p for p in cache.iterdir() if p.name.startswith("prep-")]
    assert len(folders) == 2 and all(any(p.rglob("*.pt")) for p in folders)


def test_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    dataset = _dataset(tmp_path / "data")
    real_fsync, saves = os.fsync, []

    def fsync(fd):
        if ".last.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            saves.append(fd)
            if len(saves) == 2:  # the second epoch's checkpoint finds the disk full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    result = _train(dataset, tmp_path / "runs", "train.epochs=2", "data.fold=-1", "train.iterations_per_epoch=1")
    _one_line_error(result, "last.pt", "no space left on device")
    run = tmp_path / "runs" / "run"
    assert checkpoint.load(run / "last.pt")["epoch"] == 0  # the first epoch's, complete
    _no_temporaries(tmp_path)


# ---------------------------------------------------------------------------------------------
# 5. any exception is one line; the traceback only under --debug and in train.log


@pytest.mark.parametrize("error, code", [
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2),
    (MemoryError(), 2),
    (RecursionError("maximum recursion depth exceeded"), 2),
    (OSError(errno.EIO, "Input/output error"), 2),
    (KeyError("spacing"), 2),
    (TypeError("unsupported operand"), 1),
])
def test_unexpected_errors_are_one_line_naming_the_case(tmp_path, monkeypatch, error, code):
    import medseg.data.checks as checks

    def broken(case, *args, **kwargs):
        raise error

    monkeypatch.setattr(checks, "check_case", broken)
    dataset = _dataset(tmp_path / "data", cases=2)
    result = runner.invoke(app, ["plan", str(dataset)])
    line = _one_line_error(result, "medseg plan:", "while checking case case", str(dataset / "imagesTr"),
                           type(error).__name__, code=code)
    assert ("internal error" in line) == (code == 1)
    debug = runner.invoke(app, ["--debug", "plan", str(dataset)])
    assert debug.exit_code == code and "Traceback" in debug.stderr


def test_unexpected_error_during_training_appends_its_traceback_to_train_log(tmp_path, monkeypatch):
    import medseg.train as training

    def broken(*args, **kwargs):
        raise ValueError("validation exploded")

    monkeypatch.setattr(training, "validate", broken)
    result = _train(_dataset(tmp_path / "data"), tmp_path / "runs")
    log = tmp_path / "runs" / "run" / "train.log"
    _one_line_error(result, "ValueError: validation exploded", str(log))
    assert "Traceback" in log.read_text(encoding="utf-8") and "validation exploded" in log.read_text(encoding="utf-8")
