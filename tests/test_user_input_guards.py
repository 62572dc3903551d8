"""Config files, dataset descriptions and run folders a user gets wrong: one line naming the file
and the problem, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from medseg.cli import app
from tests.trained_run import ROOT, SAMPLE


def _refused(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("text, key", [
    ("train:\n  lr: 0.1\ntrain:\n  lr: 0.2\n", "'train'"),  # a section written twice
    ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n", "'lr'"),  # a key written twice in one section
])
def test_a_config_key_given_twice_is_refused_naming_it(tmp_path, text, key):
    path = tmp_path / "twice.yaml"
    path.write_text(text, encoding="utf-8")
    _refused(["train", str(path), "--set", f"output_dir={tmp_path / 'runs'}"], str(path), key, "given twice")
    assert not (tmp_path / "runs").exists()


def test_a_merge_key_may_be_overridden(tmp_path):
    # `<<: *anchor` and then an explicit key is YAML's way of overriding, not a key given twice.
    path = tmp_path / "merged.yaml"
    path.write_text("train: &base\n  lr: 0.1\n  epochs: 3\nvalidate:\n  every: 2\n", encoding="utf-8")
    from medseg import config

    assert config.load(path).train.lr == 0.1
    path.write_text(f"data:\n  dataset: {SAMPLE}\ntrain:\n  <<: {{lr: 0.1, epochs: 3}}\n  lr: 0.2\n", encoding="utf-8")
    loaded = config.load(path)
    assert (loaded.train.lr, loaded.train.epochs) == (0.2, 3)


def test_a_config_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe train: 1\n")
    _refused(["train", str(path)], str(path), "not UTF-8")


def test_a_case_listed_twice_in_dataset_json_is_refused(tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(SAMPLE, dataset)
    description = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    description["training"][1] = dict(description["training"][0])
    (dataset / "dataset.json").write_text(json.dumps(description), encoding="utf-8")
    name = description["training"][0]["image"].rsplit("/", 1)[-1].removesuffix(".nii.gz")
    _refused(["plan", str(dataset), "-o", str(tmp_path / "plan.yaml")], "dataset.json", repr(name), "more than once")
    assert not (tmp_path / "plan.yaml").exists()
    _refused(["train", str(ROOT / "configs" / "sample.yaml"), "--set", f"data.dataset={dataset}",
              "--set", f"output_dir={tmp_path / 'runs'}"], "more than once")
    assert not any((tmp_path / "runs").glob("*"))  # no run folder (the output folder may have been made)


def test_resume_of_a_folder_that_is_no_run_never_advises_removing_it(tmp_path):
    dataset = tmp_path / "data"
    shutil.copytree(SAMPLE, dataset)
    before = sorted(p.relative_to(dataset) for p in dataset.rglob("*"))
    line = _refused(["train", "--resume", str(dataset)], str(dataset), "not a run folder")
    assert "remove" not in line
    assert sorted(p.relative_to(dataset) for p in dataset.rglob("*")) == before
    # A run folder that ended before its first save still gets the advice for that case.
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "train.log").write_text("started\n", encoding="utf-8")
    _refused(["train", "--resume", str(dead)], str(dead), "holds no checkpoint")
