"""What the libraries medseg imports (MONAI, and through it matplotlib and MLflow) would print or
record on their own: an error stays one line whatever the home folder, and no telemetry is kept."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.trained_run import SAMPLE, trained_run


def _medseg(args: list[str], home) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items()
           if key not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    return subprocess.run([sys.executable, "-m", "medseg", *args], capture_output=True, encoding="utf-8",
                          errors="replace", env={**env, "HOME": str(home), "PYTHONIOENCODING": "utf-8"}, timeout=300)


def test_an_error_is_one_line_when_the_home_folder_cannot_be_written(tmp_path, tmp_path_factory):
    run = trained_run(tmp_path_factory)
    home = tmp_path / "home"
    home.write_text("a file, so no folder can be made below it\n", encoding="utf-8")
    # An input that exists but is no image: it is read (MONAI, matplotlib imported) before it fails.
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    done = _medseg(["infer", str(run), str(tmp_path / "junk.nii.gz"), "-o", str(tmp_path / "out")], home)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "junk.nii.gz" in lines[0], done.stderr


def test_no_telemetry_is_recorded_in_the_home_folder(tmp_path):
    # train.logger=mlflow imports MLflow for real: its telemetry would write an installation id.
    home = tmp_path / "home"
    home.mkdir()
    done = _medseg(["train", str(SAMPLE.parent / "configs" / "sample.yaml"), "--set", f"data.dataset={SAMPLE}",
                    "--set", f"output_dir={tmp_path}", "--set", "run_name=run", "--set", "train.logger=mlflow",
                    "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=2", "--set", "train.device=cpu"], home)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "mlruns").is_dir()  # the run was logged
    assert not (home / ".config" / "mlflow").exists(), sorted(str(p) for p in home.rglob("*"))


# `medseg`'s own entry point, run in this interpreter; then which of MONAI's extras it had imported,
# and whether they import now, MONAI imported.
IMPORTS_OF_A_COMMAND = """
import importlib, runpy, sys
from medseg.monai_import import MONAI_EXTRAS
sys.argv = ["medseg", *sys.argv[1:]]
try:
    runpy.run_module("medseg", run_name="__main__")
except SystemExit as ended:
    print("exit", ended.code)
finally:
    print("imported", "monai" in sys.modules, sorted(name for name in MONAI_EXTRAS if name in sys.modules))
    for name in sorted(MONAI_EXTRAS):
        importlib.import_module(name)
    print("import afterwards", sorted(name for name in MONAI_EXTRAS if name in sys.modules))
"""


def test_a_command_imports_monai_without_its_extras(tmp_path, tmp_path_factory):
    # MONAI would import MLflow (where installed), scipy.signal and matplotlib's pyplot for features
    # medseg does not use: more than a second of start-up. They still import afterwards.
    from medseg.monai_import import MONAI_EXTRAS

    run = trained_run(tmp_path_factory)
    image = sorted((SAMPLE / "imagesTr").glob("*.nii.gz"))[0]
    done = subprocess.run([sys.executable, "-c", IMPORTS_OF_A_COMMAND, "infer", str(run), str(image), "-o",
                           str(tmp_path / "out"), "--device", "cpu"], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-3:] == ["exit 0", "imported True []", f"import afterwards {sorted(MONAI_EXTRAS)}"], \
        done.stdout
    assert (tmp_path / "out" / image.name).is_file()
