"""Mapping class probabilities back onto the input's grid: in chunks of classes, where one rule says.

The chunked restore must give exactly the labels (and probabilities) of mapping every class back at
once, on an anisotropic, reoriented and cropped case; `medseg.device.restore_device` must choose the
host for a budget too small and the GPU, in chunks sized to the budget, when it fits; and
scripts/bench_ct_inference.py must run end to end on the CPU at a tiny size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.device import (RESTORE_CLASS_BYTES, RESTORE_FIXED_BYTES, RESTORE_GPU_CHUNK_BYTES,
                           RESTORE_HOST_CHUNK_BYTES, restore_device)

REPO = Path(__file__).resolve().parents[1]
SHAPE = (30, 26, 12)
AFFINE = np.array([[-0.7, 0.0, 0.0, 5.0], [0.0, 1.3, 0.0, -3.0], [0.0, 0.0, 2.5, 7.0], [0.0, 0.0, 0.0, 1.0]])
BOX = (slice(4, 25), slice(3, 20), slice(2, 10))  # the non-zero part: the foreground crop keeps it
CLASSES = 6


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A scan at 0.7 x 1.3 x 2.5 mm with its first axis reversed (reoriented to RAS), zero outside
    BOX, preprocessed for a network at 1 mm; the chain; smooth random class probabilities on the
    network's grid."""
    from medseg.data.transforms import Preprocessing, preprocessing

    rng = np.random.default_rng(3)
    volume = np.zeros(SHAPE, np.float32)
    volume[BOX] = rng.normal(100.0, 20.0, volume[BOX].shape)
    path = tmp_path_factory.mktemp("restore") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), path)
    prep = Preprocessing(spacing=(1.0, 1.0, 1.0), normalization="zscore", channels=1, num_classes=CLASSES)
    chain = preprocessing(prep, with_label=False)
    image = chain({"image": str(path)})["image"]
    generator = torch.Generator().manual_seed(0)
    logits = torch.nn.functional.avg_pool3d(torch.randn(CLASSES, *image.shape[1:], generator=generator), 3, 1, 1)
    return image, chain, (logits * 10).softmax(0), prep, path


def _one_class_bytes() -> int:
    return 4 * int(np.prod(SHAPE))


def test_the_case_is_reoriented_cropped_and_resampled(case: tuple) -> None:
    image = case[0]
    orientation, crop, resampling = image.applied_operations
    assert [orientation["class"], crop["class"], resampling["class"]] == ["Orientation", "CropForeground",
                                                                       "SpatialResample"]
    assert crop["extra_info"]["cropped"] == [5, 4, 3, 6, 2, 2]  # BOX, its first axis reversed
    kept = [s.stop - s.start for s in BOX]
    for axis, (count, size) in enumerate(zip(kept, image.shape[1:])):  # about the crop's extent at 1 mm
        assert abs(size - count * abs(AFFINE[axis, axis])) <= 2 and size != count


@pytest.mark.parametrize("classes_at_once", [1, 2, 4, CLASSES])
def test_chunked_restore_gives_the_labels_of_the_one_shot_restore(case: tuple, classes_at_once: int) -> None:
    from medseg.infer import _restore_grid, _restore_labels

    image, chain, probabilities = case[:3]
    one_shot = _restore_grid(probabilities, image, chain, nearest=False)
    expected = one_shot.as_tensor().argmax(0).numpy()  # ties go to the lowest class, as in the chunks
    labels, affine = _restore_labels(probabilities, image, chain, classes_at_once * _one_class_bytes(), "cpu")
    np.testing.assert_array_equal(labels, expected)
    assert labels.shape == SHAPE and labels.dtype == np.uint8
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)
    outside = np.ones(SHAPE, bool)
    outside[BOX] = False
    assert (labels[outside] == 0).all()  # cropped away before the network: background
    assert len(np.unique(labels[BOX])) == CLASSES


def test_chunked_probabilities_are_the_one_shot_ones(case: tuple) -> None:
    from medseg.infer import _restore_grid, _restore_probabilities

    image, chain, probabilities = case[:3]
    one_shot = _restore_grid(probabilities, image, chain, nearest=False).as_tensor()
    labels, affine, restored = _restore_probabilities(probabilities, image, chain, 4 * _one_class_bytes(), "cpu")
    torch.testing.assert_close(restored[1:], one_shot[1:], rtol=0, atol=0)
    torch.testing.assert_close(restored.sum(0), torch.ones(SHAPE), rtol=0, atol=1e-5)  # background takes the rest
    np.testing.assert_array_equal(labels, restored.argmax(0).numpy())
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)


def test_restore_device_picks_the_host_when_the_budget_is_too_small() -> None:
    voxels = 10**6
    needed = (RESTORE_FIXED_BYTES + RESTORE_CLASS_BYTES) * voxels  # the fixed part and one class
    assert restore_device(torch.device("cuda"), voxels, memory_bytes=needed - 1) == (torch.device("cpu"),
                                                                                   RESTORE_HOST_CHUNK_BYTES)
    assert restore_device(torch.device("cpu"), voxels, memory_bytes=10**12) == (torch.device("cpu"),
                                                                              RESTORE_HOST_CHUNK_BYTES)


def test_restore_device_picks_the_gpu_in_chunks_sized_to_the_budget() -> None:
    voxels, cuda = 10**6, torch.device("cuda:0")
    fixed, per_class = RESTORE_FIXED_BYTES * voxels, RESTORE_CLASS_BYTES * voxels
    assert restore_device(cuda, voxels, memory_bytes=fixed + per_class) == (cuda, 4 * voxels)
    assert restore_device(cuda, voxels, memory_bytes=fixed + 5 * per_class + 1) == (cuda, 5 * 4 * voxels)
    # Beyond a few GiB the chunk stops growing: a bigger one would only hold more memory.
    where, chunk_bytes = restore_device(cuda, voxels, memory_bytes=10**12)
    assert where == cuda and chunk_bytes == 4 * voxels * (RESTORE_GPU_CHUNK_BYTES // (4 * voxels))


def test_restore_device_keeps_the_target_ct_within_its_budget() -> None:
    # 512 x 512 x 400 voxels with 10 GiB for restoring: the fixed part and a few classes at once, within it.
    voxels = 512 * 512 * 400
    where, chunk_bytes = restore_device(torch.device("cuda"), voxels, memory_bytes=10 * 2**30)
    assert where.type == "cuda" and chunk_bytes % (4 * voxels) == 0 and chunk_bytes >= 4 * voxels
    assert RESTORE_FIXED_BYTES * voxels + 3 * chunk_bytes <= 10 * 2**30


@pytest.mark.gpu
def test_preprocessing_and_restore_on_the_gpu_match_the_host(case: tuple) -> None:
    from types import SimpleNamespace

    from medseg.data.cases import InferenceInput
    from medseg.infer import _load_case, _restore_labels

    image, chain, probabilities, prep, path = case
    predictor = SimpleNamespace(prep=prep, device=torch.device("cuda"))  # what _load_case reads of one
    on_gpu, gpu_chain = _load_case(InferenceInput("scan", (path,)), predictor)
    assert on_gpu.device.type == "cuda" and on_gpu.shape == image.shape
    torch.testing.assert_close(on_gpu.as_tensor().cpu(), image.as_tensor(), rtol=0, atol=1e-4)
    on_host, _ = _restore_labels(probabilities, image, chain, 2 * _one_class_bytes(), "cpu")
    labels, affine = _restore_labels(probabilities.cuda(), on_gpu, gpu_chain, 2 * _one_class_bytes(), "cuda")
    assert (labels != on_host).mean() <= 1e-3  # float32 rounding may tip a near-tie, nothing more
    np.testing.assert_allclose(affine, AFFINE, atol=1e-6)


def test_bench_script_smoke_run_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(REPO / "scripts" / "bench_ct_inference.py"), "--out", str(out), "--device", "cpu",
               "--shape", "24", "20", "16", "--classes", "3", "--set", "model.base_width=4",
               "--set", "model.max_width=8", "--set", "train.patch_size=[16,16,16]"]
    done = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", cwd=REPO, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "random" in done.stdout and "no measurement" in done.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["measurement"] is False and "untrained" in report["weights"]
    [run] = report["runs"]
    assert run["classes"] == 3 and run["output_on_input_grid"] is True
    assert set(run["stages"]) == {"reading", "preprocessing", "network", "restoring", "writing"}
    assert all(seconds >= 0 for seconds in run["stages"].values()) and run["total_s"] > 0
    assert run["host_peak_rss_gib"] > 0 and run["gpu_max_reserved_gib"] is None
