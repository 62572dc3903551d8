"""The medseg command line itself: version, usage, help."""

from __future__ import annotations

from importlib import metadata

from typer.testing import CliRunner

import medseg
from medseg.cli import app

runner = CliRunner()


def test_version_is_the_installed_distributions():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"medseg {medseg.__version__}"
    assert metadata.version("medseg") == medseg.__version__


def test_train_without_a_config_shows_its_usage_and_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2
    assert "Usage:" in result.stdout and "--resume" in result.stdout
    assert "medseg plan" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "infer", "memory", "plan", "evaluate"):
        assert command in result.stdout
