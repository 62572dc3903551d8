"""scripts/peak_memory_cpu.py: the CPU peak-memory comparison of checkpointing modes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "peak_memory_cpu.py"


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _can_reset_peak(), reason="needs Linux's /proc/self/clear_refs")
def test_stage_checkpointing_measures_less_peak_memory_than_none(tmp_path: Path) -> None:
    out = tmp_path / "peak.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--patch", "32", "--modes", "off", "stage",
                           "--kinds", "eager", "--json", str(out)], capture_output=True, encoding="utf-8", errors="replace", cwd=REPO,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    figures = {row["mode"]: row for row in json.loads(out.read_text(encoding="utf-8"))}
    assert set(figures) == {"off", "stage"}
    # Without checkpointing a 32³ batch-2 step holds tens of MiB of activations; keeping only the
    # stages' inputs must show up as a clearly lower peak (about half at 48³).
    assert figures["off"]["peak_mib"] > 20
    assert figures["stage"]["peak_mib"] < 0.8 * figures["off"]["peak_mib"]
    assert "stage" in done.stdout and "x of off" in done.stdout
