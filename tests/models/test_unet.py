"""medseg.models: network planning, forward shapes, activation checkpointing, build_model errors."""

from __future__ import annotations

import json
import math
import shutil
import textwrap
from functools import partial

import pytest
import torch

from medseg import config
from medseg.config import Config
from medseg.errors import ConfigError
from medseg.models import SegmentationNetwork, build_model, network_plan
from medseg.models.unet import CHECKPOINTING_MODES, CheckpointedLevels, UNet3D, plan_network

# (x, y, z): stride plan ((1,1,1), (2,2,2), (2,2,2), (2,2,1)) -- z stops halving at 4 voxels, so the
# strides differ between axes and the shape checks below cannot pass by symmetry.
PATCH = (32, 32, 16)
EXPECTED_STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 1))
IN_CHANNELS, NUM_CLASSES, BATCH = 1, 3, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These tensors are tiny: one thread is faster than two and immune to a busy machine (OpenMP
    # threads spinning against other processes made a 16^3 conv ~25x slower in a test run).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plan():
    return plan_network(PATCH, (1.0, 1.0, 1.0), base_width=4, max_width=16)


@pytest.fixture(scope="module")
def model(plan):
    torch.manual_seed(0)
    return UNet3D(IN_CHANNELS, NUM_CLASSES, plan, norm="instance", deep_supervision=True)


@pytest.fixture(scope="module")
def image():
    return torch.randn(BATCH, IN_CHANNELS, *PATCH, generator=torch.Generator().manual_seed(1))


def _twin(model: UNet3D, mode: str, **options) -> UNet3D:
    """A second network with `model`'s weights, the given checkpointing mode and UNet3D `options`."""
    twin = UNet3D(IN_CHANNELS, NUM_CLASSES, model.plan, checkpointing=mode, **options)
    twin.load_state_dict(model.state_dict())
    return twin.train()


# --- plan_network -------------------------------------------------------------------------------


def test_plan_small_isotropic_patch():
    plan = plan_network((40, 56, 40), (1.0, 1.0, 1.0))
    # 40,56,40 -> 20,28,20 -> 10,14,10 -> 5,7,5 (odd: stop)
    assert plan.widths == (32, 64, 128, 256)
    assert plan.strides == ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
    assert plan.kernels == ((3, 3, 3),) * 4
    assert plan.divisor == (8, 8, 8)


def test_plan_128_cube_has_six_stages_capped_at_320():
    plan = plan_network((128, 128, 128), (1.0, 1.0, 1.0))
    # 128 -> 64 -> 32 -> 16 -> 8 -> 4; halving 4 would go below min_feature_size.
    assert plan.widths == (32, 64, 128, 256, 320, 320)
    assert len(plan.strides) == 6 and plan.strides[1:] == ((2, 2, 2),) * 5
    assert plan.divisor == (32, 32, 32)


def test_plan_anisotropic_spacing():
    plan = plan_network((160, 160, 48), (0.8, 0.8, 3.0))
    assert plan.kernels[0] == (3, 3, 1)  # z spacing 3.0 > 2 * 0.8: no convolution along z
    assert plan.strides[0] == (1, 1, 1)
    assert plan.strides[1] == (2, 2, 1)  # z not downsampled until in-plane spacing catches up
    assert plan.kernels[1] == (3, 3, 3)  # spacing now (1.6, 1.6, 3.0): 3.0 <= 3.2
    assert plan.strides[2] == (2, 2, 2)
    assert any(s[2] == 2 for s in plan.strides)


@pytest.mark.parametrize(
    ("patch", "spacing"),
    [
        ((40, 56, 40), (1.0, 1.0, 1.0)),
        ((160, 160, 48), (0.8, 0.8, 3.0)),
        ((96, 80, 20), (0.7, 0.7, 2.5)),
        ((52, 36, 28), (1.0, 1.0, 1.0)),
    ],
)
def test_plan_divisor_divides_patch_and_is_product_of_strides(patch, spacing):
    plan = plan_network(patch, spacing)
    for axis in range(3):
        assert plan.divisor[axis] == math.prod(s[axis] for s in plan.strides)
        assert patch[axis] % plan.divisor[axis] == 0
        # nothing is halved below min_feature_size (4)
        assert patch[axis] // plan.divisor[axis] >= 4
    assert len(plan.widths) == len(plan.strides) == len(plan.kernels)


def test_plan_explicit_depth():
    assert len(plan_network((128, 128, 128), depth=3).strides) == 3
    with pytest.raises(ValueError, match="model.depth=6"):
        plan_network((32, 32, 32), depth=6)


# --- forward ------------------------------------------------------------------------------------


def test_fixture_plan_is_the_one_the_shape_tests_assume(plan):
    assert plan.strides == EXPECTED_STRIDES
    assert plan.widths == (4, 8, 16, 16)


def test_train_forward_returns_deep_supervision_list_finest_first(model, plan, image):
    model.train()
    outputs = model(image)
    assert isinstance(outputs, list)
    # One output per decoder stage: every stage but the deepest, finest first.
    assert len(outputs) == len(plan.strides) - 1
    size = list(PATCH)
    expected = []
    for stride in plan.strides[:-1]:
        size = [s // st for s, st in zip(size, stride)]
        expected.append((BATCH, NUM_CLASSES, *size))
    assert [tuple(o.shape) for o in outputs] == expected
    assert expected == [(2, 3, 32, 32, 16), (2, 3, 16, 16, 8), (2, 3, 8, 8, 4)]
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outputs)


def test_eval_forward_returns_full_resolution_tensor(model, image):
    model.eval()
    try:
        with torch.no_grad():
            output = model(image)
    finally:
        model.train()
    assert isinstance(output, torch.Tensor)
    assert output.shape == (BATCH, NUM_CLASSES, *PATCH)


def test_eval_output_is_the_finest_deep_supervision_head(plan, image):
    # BatchNorm would differ between train and eval; instance norm does not, so the finest train
    # output and the eval output must agree.
    torch.manual_seed(0)
    net = UNet3D(IN_CHANNELS, NUM_CLASSES, plan)
    with torch.no_grad():
        finest = net.train()(image)[0]
        full = net.eval()(image)
    torch.testing.assert_close(full, finest)


def test_without_deep_supervision_train_mode_returns_one_tensor(plan, image):
    net = UNet3D(IN_CHANNELS, NUM_CLASSES, plan, deep_supervision=False).train()
    output = net(image)
    assert isinstance(output, torch.Tensor)
    assert output.shape == (BATCH, NUM_CLASSES, *PATCH)


# --- activation checkpointing ---------------------------------------------------------------------


def _loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    # Fixed random projections, so every output and every voxel gets a different gradient.
    generator = torch.Generator().manual_seed(2)
    return sum((o.float() * torch.randn(o.shape, generator=generator)).sum() for o in outputs)


@pytest.mark.parametrize("mode", ["stage", "selective"])
def test_checkpointing_gives_identical_outputs_and_gradients(model, image, mode):
    # float64: in float32 a one-sample convolution's rounding can flip the sign of a pre-activation
    # near zero, changing LeakyReLU's slope there and every gradient upstream of it.
    off, stage = _twin(model, "off").double(), _twin(model, mode).double()
    assert stage.checkpointing == mode and off.checkpointing == "off"
    results = {}
    for name, net in (("off", off), ("stage", stage)):
        x = image.double().requires_grad_(True)
        outputs = net(x)
        _loss(outputs).backward()
        results[name] = (outputs, x.grad, {n: p.grad for n, p in net.named_parameters()})
    (out_a, xg_a, g_a), (out_b, xg_b, g_b) = results["off"], results["stage"]
    # "stage" runs its finest stages one sample at a time, and a convolution of one sample rounds
    # differently from one of two; "selective" back-propagates a skip tensor's two uses through its
    # normalisation separately and adds the results. Both are float rounding: differences at the
    # level of the largest element times float32's precision.
    for a, b in zip(out_a, out_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7 + 1e-5 * a.abs().max().item())
    tolerance = 1e-5
    torch.testing.assert_close(xg_b, xg_a, rtol=1e-6, atol=1e-7 + tolerance * xg_a.abs().max().item())
    assert g_a.keys() == g_b.keys()
    # (A convolution's bias before instance norm has a true gradient of zero: its computed one is
    # rounding noise, so the tolerance is scaled by the largest gradient of any parameter.)
    scale = max(g.abs().max().item() for g in g_a.values())
    for name in g_a:
        assert g_a[name] is not None and g_b[name] is not None, name
        assert g_a[name].abs().sum() > 0, name
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-6 + tolerance * scale, msg=name)


class _SavedTensors:
    """Records what autograd saves for backward while active (pack hook of the outer context).

    Counting: each saved tensor is charged `untyped_storage().nbytes()` once per storage
    (deduplicated by the storage's data_ptr). Why storage and not numel*element_size: what a saved
    tensor keeps alive is its whole storage -- a saved view or slice pins the entire buffer -- and
    many saved tensors share one buffer (a conv output saved by the norm that follows, the output of
    an in-place LeakyReLU saved again by the next conv, a stage output saved both as the next
    stage's input and as a skip tensor). Summing per saved tensor would count those buffers several
    times and overstate "off" much more than "stage". Dedup by data_ptr is safe because we keep a
    reference to every packed tensor, so no recorded buffer can be freed and its address reused
    while recording. Parameters are excluded: they stay alive anyway and are not activation memory.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, torch.Tensor] = {}
        self.packed = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.packed += 1
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in self.parameters:
            self.storages[pointer] = tensor
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.storages.values())

    def __enter__(self) -> "_SavedTensors":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _record(net: UNet3D, x: torch.Tensor):
    """Saved tensors of one forward, plus the storages of the stage boundaries (inputs/outputs)."""
    boundaries = {x.untyped_storage().data_ptr()}
    hooks = [
        stage.register_forward_hook(
            lambda module, args, out: boundaries.add(out.untyped_storage().data_ptr())
        )
        for stage in [*net.encoder, *net.decoder]
    ]
    saved, outputs = _forward_with_hooks(net, x, hooks)
    return saved, boundaries, outputs


def _forward_with_hooks(net: UNet3D, x: torch.Tensor, hooks: list):
    """One forward recording what autograd saves; the forward hooks are removed afterwards."""
    try:
        with _SavedTensors(net) as saved:
            outputs = net(x)
    finally:
        for hook in hooks:
            hook.remove()
    return saved, outputs


def test_stage_checkpointing_saves_far_fewer_bytes(model, image):
    # Every stage checkpointed, whole batches (not the default): then what is kept is exactly the
    # stages' inputs and outputs. (One sample at a time, the stages' outputs would be the
    # per-sample tensors that torch.cat joins and that nothing saves.)
    every_level = CheckpointedLevels(encoder=len(model.plan.strides), decoder=len(model.plan.strides) - 1)
    off = _twin(model, "off")
    stage = _twin(model, "stage", checkpointed_levels=every_level, per_sample=False)
    saved_off, _, out_off = _record(off, image)
    saved_stage, boundaries, out_stage = _record(stage, image)
    print(f"\nsaved-for-backward bytes: off={saved_off.nbytes} stage={saved_stage.nbytes} "
          f"({saved_stage.nbytes / saved_off.nbytes:.1%})")

    # Non-reentrant checkpointing packs a stage's inner activations with its own (innermost)
    # saved_tensors_hooks, which keep nothing; our outer hook sees only what the checkpoint really
    # keeps -- each stage's inputs -- plus what the segmentation heads save (their input, a decoder
    # stage output). Verified here, so the byte count means "alive until backward".
    # All of them: the network input, every encoder stage output (the next stage's input or a skip)
    # and every decoder stage output (the next stage's input or a head's input).
    assert set(saved_stage.storages) == boundaries
    # Without checkpointing the inner activations (conv outputs, norm outputs) are saved too.
    assert not set(saved_off.storages) <= boundaries
    assert saved_stage.packed < saved_off.packed / 3

    assert saved_stage.nbytes < 0.6 * saved_off.nbytes
    # Exactly those tensors, in fp32: input + encoder outputs + decoder outputs.
    voxels = [math.prod(PATCH)]
    for stride in model.plan.strides[1:]:
        voxels.append(voxels[-1] // math.prod(stride))
    widths = model.plan.widths
    boundary_channels_x_voxels = (
        IN_CHANNELS * voxels[0]
        + sum(w * v for w, v in zip(widths, voxels))  # encoder stage outputs
        + sum(w * v for w, v in zip(widths[:-1], voxels[:-1]))  # decoder stage outputs
    )
    assert saved_stage.nbytes == 4 * BATCH * boundary_channels_x_voxels
    # The graph is the real one: backward still works after recording.
    _loss(out_stage).backward()
    _loss(out_off).backward()


# The fixture's network has 4 levels: encoder.0-3 (finest first), decoder.0-2 (deepest first, so
# decoder.2 works at full resolution). The default stage checkpointing covers the two finest levels.
FINE_STAGES = {"encoder.0", "encoder.1", "decoder.1", "decoder.2"}
COARSE_STAGES = {"encoder.2", "encoder.3", "decoder.0"}


def _stages(net: UNet3D) -> dict[str, torch.nn.Module]:
    return {**{f"encoder.{i}": s for i, s in enumerate(net.encoder)},
            **{f"decoder.{i}": s for i, s in enumerate(net.decoder)}}


def test_stage_checkpointing_covers_the_two_finest_levels_one_sample_at_a_time(model, image):
    net = _twin(model, "stage")
    assert net.checkpointed_levels == CheckpointedLevels(encoder=2, decoder=2) and net.per_sample is True
    _check_checkpointed_stages(net, image, FINE_STAGES, per_sample=True)


# Levels counted from the finest: encoder.0 is level 0 of the encoder, decoder.2 level 0 of the decoder.
@pytest.mark.parametrize(("levels", "checkpointed"), [
    (CheckpointedLevels(encoder=1, decoder=3), {"encoder.0", "decoder.0", "decoder.1", "decoder.2"}),
    (CheckpointedLevels(encoder=4, decoder=0), {"encoder.0", "encoder.1", "encoder.2", "encoder.3"}),
])
def test_stage_checkpointing_covers_the_levels_and_batching_it_is_given(model, image, levels, checkpointed):
    net = _twin(model, "stage", checkpointed_levels=levels, per_sample=False)
    _check_checkpointed_stages(net, image, checkpointed, per_sample=False)


def _check_checkpointed_stages(net: UNet3D, image: torch.Tensor, checkpointed: set[str], per_sample: bool) -> None:
    """One forward of `net`: exactly the `checkpointed` stages keep nothing they compute inside for
    backward, each called once per sample (`per_sample`) or once; the other stages keep their
    convolutions' outputs."""
    assert set(_stages(net)) == FINE_STAGES | COARSE_STAGES
    # What every stage's layers output in forward (kept referenced, so no storage is freed and its
    # address reused while recording), and the batch size of every call of the stage.
    inner: dict[str, list[tuple[torch.nn.Module, torch.Tensor]]] = {name: [] for name in _stages(net)}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in _stages(net)}
    batches: dict[str, list[int]] = {name: [] for name in _stages(net)}

    def record(module, args, out, name):
        outputs[name].append(out)
        batches[name].append(args[0].shape[0])

    hooks = []
    for name, stage in _stages(net).items():
        hooks.append(stage.register_forward_hook(partial(record, name=name)))
        for layer in stage.modules():
            if layer is not stage and not list(layer.children()):
                hooks.append(layer.register_forward_hook(
                    lambda module, args, out, name=name: inner[name].append((module, out))))
    saved, result = _forward_with_hooks(net, image, hooks)
    kept = set(saved.storages)

    def storages(tensors) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors}

    for name in checkpointed:
        # Checkpointed: nothing computed inside the stage is kept for backward.
        assert batches[name] == ([1] * BATCH if per_sample else [BATCH]), name
        inside = storages(out for _, out in inner[name]) - storages(outputs[name])
        assert inside and not inside & kept, name
    for name in set(_stages(net)) - checkpointed:
        # Not checkpointed: the whole batch at once, and every convolution's output is kept (the
        # normalisation after it saves it), as without checkpointing.
        assert batches[name] == [BATCH], name
        convolved = [out for layer, out in inner[name] if type(layer) is torch.nn.Conv3d]
        assert len(convolved) == 2 and storages(convolved) <= kept, name
    _loss(result).backward()  # the recorded graph is the real one


def _stage_step_against_off(compile_stages: bool) -> dict:
    """One DiceCE loss and its gradients from a tiny network with stage checkpointing at its default
    levels (eager, or each stage compiled on its own), compared with checkpointing off from the same
    weights and batch. Returns, for every stage, the autograd node of each output it produced in
    forward, torch.compile's counts of graphs and graph breaks, and its recompile limit before and
    after the step.

    In float64: a convolution of one sample rounds differently from one of two (and a compiled
    kernel from an eager one), and in float32 that moves a pre-activation close to zero across it
    now and then (one voxel of the 131072 of decoder.2's first LeakyReLU with this batch), which
    changes its slope from 1 to 0.01 and the gradients upstream by up to 5e-4 of the largest one.
    In float64 both ways agree to ~1e-15 of it, and the check can be tight.
    """
    from torch._dynamo.utils import counters

    from medseg.losses import DiceCELoss

    plan = plan_network(PATCH, (1.0, 1.0, 1.0), base_width=4, max_width=16)
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(BATCH, IN_CHANNELS, *PATCH, generator=generator, dtype=torch.float64)
    label = torch.randint(0, NUM_CLASSES, (BATCH, 1, *PATCH), generator=generator)
    torch.manual_seed(0)
    off = UNet3D(IN_CHANNELS, NUM_CLASSES, plan).train().double()
    stage = _twin(off, "stage").double()
    nodes: dict[str, list[str]] = {name: [] for name in _stages(stage)}
    for name, module in _stages(stage).items():
        module.register_forward_hook(lambda m, args, out, name=name: nodes[name].append(type(out.grad_fn).__name__))
    counters.clear()
    limits = [torch._dynamo.config.recompile_limit]
    if compile_stages:
        stage.compile_stages()
    losses, grads = {}, {}
    for name, net in (("off", off), ("stage", stage)):
        loss = DiceCELoss()(net(image), label)
        loss.backward()
        losses[name], grads[name] = loss.detach(), {n: p.grad for n, p in net.named_parameters()}
    # (DiceCELoss computes in float32 whatever the logits' dtype.)
    torch.testing.assert_close(losses["stage"], losses["off"], rtol=1e-6, atol=0)
    # The coarsest head has a deep-supervision weight of 0: no gradient, either way.
    assert {n for n, g in grads["off"].items() if g is None} == {n for n, g in grads["stage"].items() if g is None} \
        == {"heads.0.weight", "heads.0.bias"}
    # (A convolution's bias before instance norm has a true gradient of zero: its computed one is
    # rounding noise, so the tolerance is scaled by the largest gradient of any parameter.)
    scale = max(g.abs().max().item() for g in grads["off"].values() if g is not None)
    for name, expected in grads["off"].items():
        if expected is not None:
            assert expected.abs().sum() > 0, name
            torch.testing.assert_close(grads["stage"][name], expected, rtol=1e-9, atol=1e-10 * scale, msg=name)
    limits.append(torch._dynamo.config.recompile_limit)
    return {"nodes": nodes, "graphs": counters["stats"]["unique_graphs"], "graph_breaks": dict(counters["graph_break"]),
            "recompile_limits": limits}


def test_stage_checkpointing_at_its_default_levels_gives_the_loss_and_gradients_of_none():
    report = _stage_step_against_off(compile_stages=False)
    # Every stage ran (per sample at the fine levels), eagerly.
    assert {name: len(n) for name, n in report["nodes"].items()} == {
        name: BATCH if name in FINE_STAGES else 1 for name in FINE_STAGES | COARSE_STAGES}
    assert "CompiledFunctionBackward" not in {node for n in report["nodes"].values() for node in n}
    assert report["graphs"] == 0


_COMPILED_STAGES = textwrap.dedent("""
    import json
    import torch
    from tests.models.test_unet import _stage_step_against_off

    torch.set_num_threads(1)
    print(json.dumps(_stage_step_against_off(compile_stages=True)))
""")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_stage_checkpointing_with_compiled_stages_gives_the_loss_and_gradients_of_none(compiled_checks):
    # compile_stages: each stage is its own graph, run under the eager checkpoints (and rerun in
    # backward). A stage whose forward torch.compile does not trace (nn.Sequential's own forward,
    # in torch.nn, is not traced as the outermost frame) would run eagerly without any error: every
    # stage's outputs must come from a compiled graph, each stage one graph without breaks.
    report = json.loads(compiled_checks["stages"])
    assert set(report["nodes"]) == FINE_STAGES | COARSE_STAGES
    for name, nodes in report["nodes"].items():
        assert nodes == ["CompiledFunctionBackward"] * (BATCH if name in FINE_STAGES else 1), name
    assert report["graph_breaks"] == {}
    assert report["graphs"] == len(FINE_STAGES | COARSE_STAGES)
    # The stages' larger recompile limit holds while they run, not for the rest of the process.
    before, after = report["recompile_limits"]
    assert after == before


@pytest.mark.parametrize("checkpointing", ["stage", "selective"])
def test_checkpointing_under_bf16_autocast(model, image, checkpointing):
    grads = {}
    for mode in ("off", checkpointing):
        net = _twin(model, mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = net(image[:1])  # bf16 convolutions are slow on CPU: batch 1
            assert all(o.dtype == torch.bfloat16 for o in outputs)
            loss = _loss(outputs)
        loss.backward()
        grads[mode] = {n: p.grad for n, p in net.named_parameters()}
        for name, grad in grads[mode].items():
            assert grad is not None, name
            assert grad.dtype == torch.float32, name
            assert torch.isfinite(grad).all(), name
            assert grad.abs().sum() > 0, name
    # Recomputation runs under the autocast state of the forward, so "stage" gives the same numbers
    # (bitwise equal in practice; had the recomputation run in fp32, they would differ ~1e-2).
    # "selective" adds a skip tensor's two gradient paths in another order: bf16 rounding apart.
    scale = max(g.abs().max().item() for g in grads["off"].values())
    tolerance = 1e-6 if checkpointing == "stage" else 2e-2 * scale
    for name in grads["off"]:
        torch.testing.assert_close(grads[checkpointing][name], grads["off"][name], rtol=1e-5, atol=tolerance,
                                   msg=name)


def test_stage_checkpointing_refuses_batchnorm(plan):
    # Recomputing a stage in backward would update BatchNorm's running statistics twice per step.
    with pytest.raises(ValueError, match="batch norm"):
        UNet3D(IN_CHANNELS, NUM_CLASSES, plan, norm="batch", checkpointing="stage")
    net = UNet3D(IN_CHANNELS, NUM_CLASSES, plan, norm="batch")
    with pytest.raises(ValueError, match="batch norm"):
        net.set_checkpointing("stage")
    assert net.checkpointing == "off"


def test_checkpointing_is_skipped_without_grad(model, image):
    net = _twin(model, "stage")
    with torch.no_grad(), _SavedTensors(net) as saved:
        output = net(image)
    assert saved.packed == 0
    assert not output[0].requires_grad


def test_set_checkpointing_rejects_unknown_mode(model):
    net = _twin(model, "off")
    with pytest.raises(ValueError, match="bogus"):
        net.set_checkpointing("bogus")
    assert net.checkpointing == "off"
    with pytest.raises(ValueError):
        UNet3D(IN_CHANNELS, NUM_CLASSES, model.plan, checkpointing="full")
    for mode in CHECKPOINTING_MODES:
        net.set_checkpointing(mode)
        assert net.checkpointing == mode


# --- build_model --------------------------------------------------------------------------------


def _cfg(**train_and_model) -> Config:
    train = {k: v for k, v in train_and_model.items() if k in ("patch_size",)}
    model = {k: v for k, v in train_and_model.items() if k not in train}
    return config.defaults().replace(train=train, model={"base_width": 4, "max_width": 16, **model})


def test_build_model_follows_the_config():
    net = build_model(_cfg(patch_size=[32, 32, 16], checkpointing="stage", deep_supervision=False),
                      in_channels=2, num_classes=4, spacing=(1.0, 1.0, 1.0))
    assert isinstance(net, UNet3D) and isinstance(net, SegmentationNetwork)
    assert net.plan.strides == EXPECTED_STRIDES
    assert net.plan.widths == (4, 8, 16, 16)
    assert net.checkpointing == "stage"
    assert net.deep_supervision is False
    assert net.encoder[0][0][0].in_channels == 2
    assert net.heads[-1].out_channels == 4


@pytest.mark.parametrize("patch", [[32, 32], [32, 32, 32, 32], [0, 32, 32], []])
def test_build_model_rejects_patch_that_is_not_three_positive_ints(patch):
    with pytest.raises(ConfigError, match="train.patch_size"):
        build_model(_cfg(patch_size=patch), 1, 2, (1.0, 1.0, 1.0))


def test_build_model_rejects_depth_the_patch_cannot_support():
    # 16^3 halves twice (16 -> 8 -> 4): 3 stages at most.
    assert len(network_plan(_cfg(patch_size=[16, 16, 16], depth=3), (1.0, 1.0, 1.0)).strides) == 3
    with pytest.raises(ConfigError, match="model.depth"):
        build_model(_cfg(patch_size=[16, 16, 16], depth=4), 1, 2, (1.0, 1.0, 1.0))


# Run in a fresh interpreter in UTF-8 mode: torch.compile's own imports read source files in the
# locale's encoding and fail under an ASCII locale (conftest's `compiled_checks`, as _COMPILED_STAGES).
_COMPILED_GRADIENTS = textwrap.dedent("""
    import torch
    from medseg.losses import DiceCELoss
    from medseg.models.unet import UNet3D, plan_network

    plan = plan_network((32, 32, 32), (1.0, 1.0, 1.0), base_width=8, max_width=32)
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(2, 1, 32, 32, 32, generator=generator)
    label = torch.randint(0, 3, (2, 1, 32, 32, 32), generator=generator)
    grads = {}
    for name, mode, compiled in (("eager", "off", False), ("compiled", "selective", True)):
        torch.manual_seed(0)
        net = UNet3D(1, 3, plan, checkpointing=mode)
        # Inductor's own graph capture, decompositions and min-cut partition (which keeps or
        # recomputes what the selective policy says), run eagerly: its CPU code generation (a C++
        # compiler run per kernel, most of a minute for this network) is not what is checked here.
        run = torch.compile(net, backend="aot_eager_decomp_partition") if compiled else net
        DiceCELoss()(run(image), label).backward()
        grads[name] = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    scale = max(g.abs().max().item() for g in grads["eager"].values())
    assert grads["eager"].keys() <= grads["compiled"].keys()
    print(max((grads["compiled"][n] - g).abs().max().item() / scale for n, g in grads["eager"].items()))
""")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_selective_checkpointing_compiled_gives_the_same_gradients(compiled_checks):
    # torch.compile recomputes a checkpointed region in its own way; compiled and eager gradients
    # must agree to float rounding (about 5e-7 of the largest gradient here).
    worst = float(compiled_checks["selective"])
    assert worst < 5e-6, f"compiled gradients differ from eager by {worst:.2e} of the largest gradient"
