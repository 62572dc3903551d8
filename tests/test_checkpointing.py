"""Selective activation checkpointing: per-convolution regions, the finest decoder stage one sample at
a time, under autocast and under torch.compile, and the memory it is for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from medseg import config, memory
from medseg.models import unet
from medseg.models.unet import UNet3D, plan_network

PATCH = (32, 32, 16)
CLASSES = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: one thread is faster and immune to a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _networks(*modes: str, deep_supervision: bool = True) -> dict[str, UNet3D]:
    plan = plan_network(PATCH, (1.0, 1.0, 1.0), base_width=4, max_width=16)
    torch.manual_seed(0)
    reference = UNet3D(1, CLASSES, plan, deep_supervision=deep_supervision)
    networks = {}
    for mode in modes:
        net = UNet3D(1, CLASSES, plan, deep_supervision=deep_supervision, checkpointing=mode)
        net.load_state_dict(reference.state_dict())  # same parameters, same state_dict keys
        networks[mode] = net.train()
    return networks


def _gradients(net: UNet3D, image: torch.Tensor, dtype: torch.dtype | None = None):
    generator = torch.Generator().manual_seed(2)
    with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        outputs = net(image)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = sum((o.float() * torch.randn(o.shape, generator=generator)).sum() for o in outputs)
    loss.backward()
    return outputs, {name: p.grad for name, p in net.named_parameters()}


def _image(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, *PATCH, generator=torch.Generator().manual_seed(1))


def test_selective_runs_the_finest_decoder_stage_per_sample():
    # The property the memory saving rests on; and a batch of 2 is what the tests below run.
    assert unet.SELECTIVE_PER_SAMPLE_LEVELS >= 1


def test_selective_under_autocast_with_a_batch_of_two_matches_off():
    # Per-sample regions under autocast: the weight-cast cache would make the second sample's
    # region run fewer operators than its recomputation (a RuntimeError from selective
    # checkpointing); `_without_autocast_cache` keeps them equal.
    nets = _networks("off", "selective")
    image = _image()
    out_off, grads_off = _gradients(nets["off"], image, torch.bfloat16)
    out_sel, grads_sel = _gradients(nets["selective"], image, torch.bfloat16)
    for a, b in zip(out_off, out_sel, strict=True):
        assert b.dtype == torch.bfloat16 and b.shape == a.shape
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2 * a.abs().max().item())
    scale = max(g.abs().max().item() for g in grads_off.values())
    for name, grad in grads_off.items():
        assert grads_sel[name] is not None and grads_sel[name].dtype == torch.float32, name
        # bf16 rounding: a convolution over one sample rounds differently from one over two.
        torch.testing.assert_close(grads_sel[name], grad, rtol=1e-5, atol=3e-2 * scale, msg=name)


def test_selective_without_deep_supervision_and_odd_batch():
    nets = _networks("off", "selective", deep_supervision=False)
    image = _image(3)
    (out_off,), grads_off = _gradients(nets["off"], image)
    (out_sel,), grads_sel = _gradients(nets["selective"], image)
    torch.testing.assert_close(out_sel, out_off, rtol=1e-5, atol=1e-5 * out_off.abs().max().item())
    scale = max(g.abs().max().item() for g in grads_off.values() if g is not None)
    for name, grad in grads_off.items():
        if grad is None:  # the unused deep-supervision heads
            assert grads_sel[name] is None, name
            continue
        torch.testing.assert_close(grads_sel[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_selective_in_eval_mode_with_grad_returns_the_full_resolution_logits():
    net = _networks("selective")["selective"].eval()
    output = net(_image())
    assert isinstance(output, torch.Tensor) and output.shape == (2, CLASSES, *PATCH)


# torch.compile's own imports read source files in the locale's encoding: a fresh UTF-8 interpreter.
_COMPILED_UNDER_AUTOCAST = textwrap.dedent("""
    import torch
    from medseg.models.unet import UNet3D, plan_network

    plan = plan_network((32, 32, 32), (1.0, 1.0, 1.0), base_width=8, max_width=32)
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(2, 1, 32, 32, 32, generator=generator)
    weights = [torch.randn(2, 3, *(32 // 2**i,) * 3, generator=generator) for i in range(4)]
    grads = {}
    for mode in ("off", "selective"):
        torch.manual_seed(0)
        net = UNet3D(1, 3, plan, checkpointing=mode)
        run = torch.compile(net)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = run(image)
            loss = sum((o.float() * w).sum() for o, w in zip(outputs, weights))
        loss.backward()
        grads[mode] = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert grads["off"].keys() == grads["selective"].keys()
    scale = max(g.abs().max().item() for g in grads["off"].values())
    print(max((grads["selective"][n] - g).abs().max().item() / scale for n, g in grads["off"].items()))
""")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_selective_compiles_under_autocast_with_the_same_gradients():
    # As training runs it on a GPU: compiled, under autocast, batch 2 (so the per-sample decoder
    # stage and its autocast context are traced), against the compiled network without
    # checkpointing. (Compiled and eager bf16 differ from each other by about 0.23 of the largest
    # gradient here, with or without checkpointing: inductor keeps the norms' arithmetic in
    # float32. Compiled fp32 against eager is test_unet's compiled test.)
    result = subprocess.run([sys.executable, "-c", _COMPILED_UNDER_AUTOCAST], capture_output=True, text=True,
                            encoding="utf-8", errors="replace", timeout=900,
                            env={**os.environ, "PYTHONUTF8": "1", "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.strip().splitlines()[-1])
    assert worst < 5e-2, f"compiled selective gradients differ from compiled off by {worst:.2e} of the largest gradient"


def test_selective_peak_is_at_most_55_percent_of_off_for_the_default_network():
    # The acceptance target (peak <= 55 % of no checkpointing), on the default network at 64³
    # batch 2 fp16, where the estimate takes seconds (at 128³: 2.05 of 4.66 GiB, 0.44).
    def peak(mode: str) -> int:
        cfg = config.load(None, ["train.patch_size=[64,64,64]", "train.batch_size=2", "train.amp=fp16",
                                 f"model.checkpointing={mode}"])
        return memory.estimate(cfg, 1, CLASSES).total

    off, selective = peak("off"), peak("selective")
    assert selective <= 0.55 * off, selective / off
