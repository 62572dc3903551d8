"""The training step's run settings: compile mode, memory layout, optimiser, host syncs."""

from __future__ import annotations

import json
import shutil
import textwrap

import pytest
import torch

from medseg import config
from medseg.losses import DiceCELoss
from medseg.models import build_model
from medseg.oom import MemoryFallback
from medseg.schedule import Schedule
from medseg.step import (GraphedStep, build_optimizer, compile_for_training,
                         compile_setting, forward_backward, memory_format, train_step)

CUDA = torch.device("cuda")  # only named, never used, in the rule tests
CPU = torch.device("cpu")


def _cfg(*overrides: str) -> config.Config:
    return config.load(None, list(overrides))


def test_auto_compile_uses_cuda_graphs_for_small_steps_only():
    small = ["train.patch_size=[40,56,40]", "train.batch_size=7"]  # 0.63M voxels per step
    assert compile_setting(_cfg(*small), CUDA) == "graphs"
    assert compile_setting(_cfg("train.patch_size=[128,128,128]", "train.batch_size=2"), CUDA) == "on"
    # Graphs replay no collectives, their memory pool is outside the estimate, and need CUDA.
    assert compile_setting(_cfg(*small), CUDA, distributed_run=True) == "on"
    assert compile_setting(_cfg(*small, "train.memory_budget=8GiB"), CUDA) == "on"
    assert compile_setting(_cfg(*small), CPU) == "off"
    assert compile_setting(_cfg(*small, "train.compile=graphs"), CPU) == "on"
    # Short runs of small steps record the eager step instead of compiling (no compile start-up).
    assert compile_setting(_cfg(*small, "train.max_minutes=2"), CUDA) == "eager-graphs"
    assert compile_setting(_cfg(*small, "train.max_minutes=10"), CUDA) == "graphs"
    assert compile_setting(_cfg("train.patch_size=[128,128,128]", "train.max_minutes=2"), CUDA) == "on"
    # The eager step recorded as a CUDA graph: eager wherever graphs cannot run.
    assert compile_setting(_cfg(*small, "train.compile=eager-graphs"), CUDA) == "eager-graphs"
    assert compile_setting(_cfg(*small, "train.compile=eager-graphs"), CPU) == "off"
    assert compile_setting(_cfg(*small, "train.compile=eager-graphs"), CUDA, distributed_run=True) == "off"


def test_stage_checkpointing_compiles_without_cuda_graphs():
    # Its recomputation runs eagerly between the compiled stages: compiled, never recorded as a graph.
    small = ["train.patch_size=[40,56,40]", "train.batch_size=7", "model.checkpointing=stage"]
    # compile_setting looks only at the device's type: it decides for a GPU without one, and never
    # touches CUDA (which would fail on a machine without it).
    if not torch.cuda.is_available():
        assert not torch.cuda.is_initialized()
    assert compile_setting(_cfg(*small, "train.compile=graphs"), CUDA) == "on"
    assert compile_setting(_cfg(*small), CUDA) == "on"  # auto: graphs for a step this small otherwise
    assert compile_setting(_cfg(*small, "train.compile=on"), CUDA) == "on"
    assert compile_setting(_cfg("train.patch_size=[128,128,128]", "model.checkpointing=stage"), CUDA) == "on"
    assert compile_setting(_cfg(*small, "train.compile=eager-graphs"), CUDA) == "off"
    assert compile_setting(_cfg(*small, "train.max_minutes=2"), CUDA) == "off"  # auto: eager-graphs otherwise
    assert compile_setting(_cfg(*small, "train.compile=off"), CUDA) == "off"
    assert compile_setting(_cfg(*small), CPU) == "off"
    assert compile_setting(_cfg(*small, "train.compile=graphs"), CPU) == "on"
    # Without stage checkpointing the same settings keep their graphs.
    assert compile_setting(_cfg(*small[:2], "train.compile=graphs"), CUDA) == "graphs"
    assert compile_setting(_cfg(*small[:2], "model.checkpointing=selective"), CUDA) == "graphs"


def test_auto_channels_last_only_where_it_was_measured_faster():
    big = ["train.patch_size=[128,128,128]", "train.batch_size=2"]
    assert memory_format(_cfg(*big), CUDA, "on") == torch.channels_last_3d
    assert memory_format(_cfg(*big), CUDA, "graphs") == torch.contiguous_format
    assert memory_format(_cfg(*big, "model.checkpointing=selective"), CUDA, "on") == torch.contiguous_format
    assert memory_format(_cfg(*big), CPU, "off") == torch.contiguous_format
    assert memory_format(_cfg(*big, "train.channels_last=on"), CPU, "off") == torch.channels_last_3d
    assert memory_format(_cfg(*big, "train.channels_last=off"), CUDA, "on") == torch.contiguous_format


def _tiny_step(layout: torch.memory_format, device: torch.device, amp: torch.dtype | None = None):
    cfg = _cfg("model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=2")
    torch.manual_seed(0)
    model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0)).to(device, memory_format=layout)
    optimizer = build_optimizer(cfg, model)
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
    optimizer = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    image = torch.full((1, 1, 16, 16, 16), float("nan"))
    label = torch.zeros((1, 1, 16, 16, 16), dtype=torch.uint8)
    _, finite = train_step(model, image, label, DiceCELoss(), optimizer, scaler, None, cfg.train.grad_clip)
    assert not bool(finite)
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)


def test_non_finite_loss_takes_no_step_with_a_fused_optimiser_and_no_host_decision():
    # bf16/fp32 with a fused optimiser: the skip is decided by the optimiser from a device flag.
    cfg = _cfg("model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]")
    model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.99, nesterov=True, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    label = torch.zeros((1, 1, 16, 16, 16), dtype=torch.uint8)
    before = [p.detach().clone() for p in model.parameters()]
    _, finite = train_step(model, torch.full((1, 1, 16, 16, 16), float("nan")), label, DiceCELoss(),
                           optimizer, scaler, None, cfg.train.grad_clip)
    assert not bool(finite) and not hasattr(optimizer, "found_inf")
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(b.detach(), a, rtol=0, atol=0)
    _, finite = train_step(model, torch.randn(1, 1, 16, 16, 16), label, DiceCELoss(), optimizer, scaler, None,
                           cfg.train.grad_clip)
    assert bool(finite)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


# Run in a fresh interpreter in UTF-8 mode (torch.compile's imports read source files in the
# locale's encoding), which also keeps torch.compile's caches and the process group out of the
# other tests: conftest's `compiled_checks`, with test_unet's compiled checks.
_STAGE_COMPILED_STEP = textwrap.dedent("""
    import json
    import sys

    import torch
    import torch.distributed as dist
    from torch._dynamo.eval_frame import OptimizedModule

    from medseg import config
    from medseg.losses import DiceCELoss
    from medseg.models import build_model
    from medseg.step import build_optimizer, compile_for_training, train_step

    torch.set_num_threads(1)
    # The network, patch and dtype of tests/models/test_unet.py::_stage_step_against_off: the stages
    # compile to the graphs that test compiled (torch.compile's caches hold them once per machine).
    cfg = config.load(None, ["model.base_width=4", "model.max_width=16", "train.patch_size=[32,32,16]",
                             "train.batch_size=2", "model.checkpointing=stage"])
    generator = torch.Generator().manual_seed(1)
    # float64: see tests/models/test_unet.py::_stage_step_against_off (float32 rounding can flip a
    # LeakyReLU's slope between the two runs)
    image = torch.randn(2, 1, 32, 32, 16, generator=generator, dtype=torch.float64)
    label = torch.randint(0, 3, (2, 1, 32, 32, 16), generator=generator, dtype=torch.uint8)
    dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}/store", rank=0, world_size=1)

    def step(mode, wrap):
        torch.manual_seed(0)
        model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0)).double()
        nodes = {}
        for name, stage in [*(("encoder.%d" % i, s) for i, s in enumerate(model.encoder)),
                            *(("decoder.%d" % i, s) for i, s in enumerate(model.decoder))]:
            nodes[name] = []
            stage.register_forward_hook(lambda m, a, out, name=name: nodes[name].append(type(out.grad_fn).__name__))
        before = [p.detach().clone() for p in model.parameters()]
        wrapped = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
        trained, loss_fn = compile_for_training(wrapped, DiceCELoss(), mode)
        loss, finite = train_step(trained, image, label, loss_fn, build_optimizer(cfg, model),
                                  torch.amp.GradScaler("cpu", enabled=False), None, cfg.train.grad_clip)
        assert bool(finite)
        update = [p.detach() - b for p, b in zip(model.parameters(), before)]
        shape = {"network": "same" if trained is wrapped else type(trained).__name__,
                 "loss": "compiled" if isinstance(loss_fn, OptimizedModule) else type(loss_fn).__name__}
        return loss, update, nodes, shape

    eager_loss, eager_update, eager_nodes, _ = step("off", wrap=False)
    assert {n for nodes in eager_nodes.values() for n in nodes} == {"LeakyReluBackward0"}
    report = {}
    for name, wrap in (("plain", False), ("ddp", True)):
        loss, update, nodes, shape = step("on", wrap)
        # DiceCELoss computes in float32, and compiled it rounds differently from eager: the
        # gradients it hands the network differ by float32's rounding (about 1e-7 of the largest
        # update here).
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        scale = max(u.abs().max().item() for u in eager_update)
        for a, b in zip(eager_update, update, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale)
        report[name] = {"nodes": nodes, **shape}
    dist.destroy_process_group()
    print(json.dumps(report))
""")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_step_with_stage_checkpointing_compiles_each_stage(compiled_checks):
    # With stage checkpointing compile_for_training leaves the network (and DistributedDataParallel
    # around it) uncompiled, the checkpoints eager, and compiles each stage on its own and the loss:
    # every stage's outputs come from a compiled graph, and the step makes the eager step's update.
    # (_STAGE_COMPILED_STEP runs in conftest's `compiled_checks` interpreter, with test_unet's.)
    report = json.loads(compiled_checks["step"])
    assert set(report) == {"plain", "ddp"}
    for case in report.values():
        assert case["network"] == "same" and case["loss"] == "compiled"
        # 32×32×16: four levels; the two finest (encoder.0-1, decoder.1-2) run one sample at a time.
        assert case["nodes"] == {
            "encoder.0": ["CompiledFunctionBackward"] * 2, "encoder.1": ["CompiledFunctionBackward"] * 2,
            "encoder.2": ["CompiledFunctionBackward"], "encoder.3": ["CompiledFunctionBackward"],
            "decoder.0": ["CompiledFunctionBackward"],
            "decoder.1": ["CompiledFunctionBackward"] * 2, "decoder.2": ["CompiledFunctionBackward"] * 2,
        }


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["eager-graphs", "graphs"])
@pytest.mark.parametrize("amp", [torch.float16, torch.bfloat16])
def test_cuda_graph_step_trains_as_the_unrecorded_step(amp, mode):
    # The same steps, run directly and as a recorded-and-replayed CUDA graph (of the eager or the
    # compiled step): same losses, same weights, the learning rate of the schedule followed at
    # every replay.
    cfg = _cfg("model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=2",
               "train.epochs=1", "train.iterations_per_epoch=8")
    generator = torch.Generator().manual_seed(3)
    # Fresh tensors every step (as the sampler gives), two batches alternating, so the loss falls.
    pairs = [(torch.randn(2, 1, 16, 16, 16, generator=generator),
              torch.randint(0, 3, (2, 1, 16, 16, 16), generator=generator, dtype=torch.uint8)) for _ in range(2)]
    batches = [(image.to(CUDA), label.to(CUDA)) for _ in range(4) for image, label in pairs]
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, 1, 3, (1.0, 1.0, 1.0)).to(CUDA)
        optimizer = build_optimizer(cfg, model)
        schedule = Schedule(optimizer, cfg)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        trained, loss_fn = compile_for_training(model, DiceCELoss(), mode)
        graph = GraphedStep(trained, loss_fn, optimizer, scaler, amp, cfg.train.grad_clip, warmup=2) if graphed else None
        losses = []
        for image, label in batches:
            if graph is not None:
                loss, finite = graph(image, label)
            else:
                loss, finite = train_step(trained, image, label, loss_fn, optimizer, scaler, amp, cfg.train.grad_clip)
            losses.append(float(loss))
            assert bool(finite)
            schedule.step(0.0)
        assert graph is None or (graph.failure is None and graph._graph is not None)
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_weights), (graph_losses, graph_weights) = results
    torch.testing.assert_close(graph_losses, eager_losses, rtol=2e-3, atol=2e-3)
    for a, b in zip(eager_weights, graph_weights):
        torch.testing.assert_close(b, a, rtol=2e-3, atol=2e-3)
    assert all(late < early for late, early in zip(eager_losses[-2:], eager_losses[:2]))  # it trained


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


def test_memory_fallback_of_compiled_stage_checkpointing_splits_the_batch():
    # A network with stage checkpointing is compiled stage by stage and has no cheaper mode left: an
    # out-of-memory error splits the batch. A network compiled whole stops at selective.
    cfg = config.load(None, ["model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]",
                             "model.checkpointing=stage"])
    net = build_model(cfg, 1, 3, (1.0, 1.0, 1.0))
    shape = torch.Size([2, 1, 16, 16, 16])
    assert MemoryFallback(compiled=True).cheaper(net, shape) == "batch split into 2 micro-batches of 1"
    assert net.checkpointing == "stage"
    whole = MemoryFallback(compiled=True)
    net.set_checkpointing("off")
    assert whole.cheaper(net, shape) == "activation checkpointing switched to selective"
    assert whole.cheaper(net, shape) == "batch split into 2 micro-batches of 1"


def test_a_network_that_cannot_compile_runs_eagerly_in_the_step_only():
    # torch._dynamo's suppress_errors holds inside the training step, never for the process: the
    # same compiled network fails outside the step and trains inside it.
    calls = []

    def broken_backend(graph, example_inputs):
        calls.append(len(example_inputs))
        raise RuntimeError("this machine has no compiler (injected)")

    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 3, 3, padding=1)
    compiled = torch.compile(network, backend=broken_backend)
    image = torch.randn(2, 1, 8, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8), dtype=torch.uint8)
    before = network.weight.detach().clone()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, finite = train_step(compiled, image, label, DiceCELoss(), optimizer, scaler, None, 12.0)
    assert calls and bool(finite) and torch.isfinite(loss)
    assert not torch.equal(network.weight.detach(), before)  # the eager fallback took the step
    assert torch._dynamo.config.suppress_errors is False
    torch._dynamo.reset()  # forget the eager fallback cached for this frame: compile again
    with pytest.raises(Exception, match="no compiler"):  # outside the step nothing is suppressed
        torch.compile(network, backend=broken_backend)(image)
    torch._dynamo.reset()
    # forward_backward (what the memory estimator and the DDP trial run) falls back the same way.
    forward_backward(torch.compile(network, backend=broken_backend), image, label, DiceCELoss(), scaler, None)
    assert network.weight.grad is not None and torch._dynamo.config.suppress_errors is False
    torch._dynamo.reset()
