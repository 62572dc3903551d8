"""The training step's run settings: compile mode, memory layout, optimiser, host syncs."""

from __future__ import annotations

import pytest
import torch

from medseg import config
from medseg.losses import DiceCELoss
from medseg.models import build_model
from medseg.train import _compile_setting, _memory_format, _optimizer, train_step

CUDA = torch.device("cuda")  # only named, never used, in the rule tests
CPU = torch.device("cpu")


def _cfg(*overrides: str) -> config.Config:
    return config.load(None, list(overrides))


def test_auto_compile_uses_cuda_graphs_for_small_steps_only():
    small = ["train.patch_size=[40,56,40]", "train.batch_size=7"]  # 0.63M voxels per step
    assert _compile_setting(_cfg(*small), CUDA) == "graphs"
    assert _compile_setting(_cfg("train.patch_size=[128,128,128]", "train.batch_size=2"), CUDA) == "on"
    # Graphs replay no collectives, their memory pool is outside the estimate, and need CUDA.
    assert _compile_setting(_cfg(*small), CUDA, distributed_run=True) == "on"
    assert _compile_setting(_cfg(*small, "train.memory_budget=8GiB"), CUDA) == "on"
    assert _compile_setting(_cfg(*small), CPU) == "off"
    assert _compile_setting(_cfg(*small, "train.compile=graphs"), CPU) == "on"
    assert _compile_setting(_cfg(*small, "model.checkpointing=stage"), CUDA) == "off"


def test_auto_channels_last_only_where_it_was_measured_faster():
    big = ["train.patch_size=[128,128,128]", "train.batch_size=2"]
    assert _memory_format(_cfg(*big), CUDA, "on") == torch.channels_last_3d
    assert _memory_format(_cfg(*big), CUDA, "graphs") == torch.contiguous_format
    assert _memory_format(_cfg(*big, "model.checkpointing=selective"), CUDA, "on") == torch.contiguous_format
    assert _memory_format(_cfg(*big), CPU, "off") == torch.contiguous_format
    assert _memory_format(_cfg(*big, "train.channels_last=on"), CPU, "off") == torch.channels_last_3d
    assert _memory_format(_cfg(*big, "train.channels_last=off"), CUDA, "on") == torch.contiguous_format


def _tiny_step(layout: torch.memory_format, device: torch.device, amp: torch.dtype | None = None):
    cfg = _cfg("model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=2")
    torch.manual_seed(0)
    model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0)).to(device, memory_format=layout)
    optimizer = _optimizer(cfg, model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    generator = torch.Generator().manual_seed(1)
    image = torch.randn(2, 1, 16, 16, 16, generator=generator).to(device).contiguous(memory_format=layout)
    label = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=generator, dtype=torch.uint8).to(device)
    loss, finite = train_step(model, image, label, DiceCELoss(), optimizer, scaler, amp, cfg.train.grad_clip)
    return model, optimizer, loss, finite


def test_channels_last_step_computes_the_same_update():
    plain, _, plain_loss, plain_finite = _tiny_step(torch.contiguous_format, CPU)
    last, _, last_loss, last_finite = _tiny_step(torch.channels_last_3d, CPU)
    assert last.encoder[0][0][0].weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert isinstance(plain_finite, torch.Tensor) and bool(plain_finite) and bool(last_finite)
    torch.testing.assert_close(last_loss, plain_loss, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), last.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_non_finite_loss_takes_no_step_without_loss_scaling():
    cfg = _cfg("model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]")
    model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = _optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    image = torch.full((1, 1, 16, 16, 16), float("nan"))
    label = torch.zeros((1, 1, 16, 16, 16), dtype=torch.uint8)
    _, finite = train_step(model, image, label, DiceCELoss(), optimizer, scaler, None, cfg.train.grad_clip)
    assert not bool(finite)
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_step_uses_the_fused_optimiser_and_skips_overflow_on_the_gpu():
    model, optimizer, _, finite = _tiny_step(torch.contiguous_format, CUDA, torch.float16)
    assert optimizer.defaults.get("fused") is True
    assert bool(finite)
    cfg = _cfg("model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]")
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cuda")
    image = torch.full((1, 1, 16, 16, 16), float("inf"), device=CUDA)
    label = torch.zeros((1, 1, 16, 16, 16), dtype=torch.uint8, device=CUDA)
    _, finite = train_step(model, image, label, DiceCELoss(), optimizer, scaler, torch.float16, cfg.train.grad_clip)
    assert not bool(finite)
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)
    assert scaler.get_scale() < 65536.0  # the overflow lowered the scale
