"""scripts/ablate_recipe.py: variants of one config trained side by side, their Dice tabulated."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from medseg import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--set", "model.base_width=4", "--set", "model.max_width=16", "--set", "train.batch_size=1",
        "--set", "train.patch_size=[16,16,16]"]
# nnU-Net's PlainConvUNet (model.arch=nnunet-plain) needs dynamic-network-architectures (the bench extra).
NNUNET = importlib.util.find_spec("dynamic_network_architectures") is not None


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    """One run of the script for both tests: the variants plain and other, and (where
    dynamic-network-architectures is installed) nn, trained side by side as the script does. The
    folder, the table's rows by variant and the script's output."""
    tmp_path = tmp_path_factory.mktemp("ablate")
    out = tmp_path / "ablation"
    variants = ["plain", "other:train.seed=1,train.lr=0.02", *(["nn:model.arch=nnunet-plain"] if NNUNET else [])]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ablate_recipe.py"), str(ROOT / "configs" / "sample.yaml"), str(out),
         *variants, "--set", "train.epochs=1", "--set", "train.iterations_per_epoch=2",
         "--set", f"data.dataset={ROOT / 'sample_data'}", "--set", "train.workers=0", *TINY],
        capture_output=True, encoding="utf-8", errors="replace", timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    return out, rows, result.stdout


def test_variants_are_trained_and_tabulated(ablation):
    out, rows, _ = ablation
    assert set(rows) == {"plain", "other", *(["nn"] if NNUNET else [])}
    for name, row in rows.items():
        assert row[1] == "0" and 0.0 <= float(row[4]) <= 1.0, row
        assert (out / name / "metrics.csv").is_file()
    config = (out / "other" / "config.yaml").read_text(encoding="utf-8")
    assert "seed: 1" in config and "lr: 0.02" in config


def test_nnunet_network_variant_trains_in_medseg_loop(ablation):
    pytest.importorskip("dynamic_network_architectures")
    out, rows, output = ablation
    row = rows["nn"]
    assert row[0] == "nn" and row[1] == "0" and 0.0 <= float(row[4]) <= 1.0, output
    state = checkpoint.load(out / "nn" / "last.pt")
    assert state["config"]["model"]["arch"] == "nnunet-plain"
    assert any(name.startswith("network.decoder.seg_layers.") for name in state["model"])
