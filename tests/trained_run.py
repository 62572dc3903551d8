"""One tiny run on the bundled sample data, trained once per test session and shared by the export
and API tests (`trained_run(tmp_path_factory)`)."""

from __future__ import annotations

from pathlib import Path

import medseg

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"


def trained_run(tmp_path_factory) -> Path:
    """The run directory of configs/sample.yaml trained for 2 steps at a tiny width (fp32, CPU);
    trained by the first caller of the session, through the Python API's `medseg.train`."""
    root = tmp_path_factory.getbasetemp() / "export-run"
    run = root / "sample"
    if not (run / "best.pt").is_file():
        medseg.train(ROOT / "configs" / "sample.yaml",
                     data={"dataset": str(SAMPLE)},
                     model={"base_width": 4, "max_width": 16},
                     train={"epochs": 1, "iterations_per_epoch": 2, "patch_size": [16, 16, 16],
                            "workers": 0, "device": "cpu", "amp": "off"},
                     output_dir=str(root), run_name="sample")
    return run
