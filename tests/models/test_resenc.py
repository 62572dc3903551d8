"""medseg.models.resenc: nnU-Net's residual encoder U-Net as `model.arch: resenc`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg import config
from medseg.models import CHECKPOINTING_MODES, ResEncUNet, SegmentationNetwork, build_model
from medseg.models.resenc import ResidualBlock, blocks_per_stage
from medseg.models.unet import plan_network

PATCH = (32, 32, 32)
IN_CHANNELS, NUM_CLASSES, BATCH = 1, 3, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plan():
    return plan_network(PATCH, (1.0, 1.0, 1.0), base_width=4, max_width=16)


@pytest.fixture(scope="module")
def weights(plan):
    torch.manual_seed(0)
    model = ResEncUNet(IN_CHANNELS, NUM_CLASSES, plan)
    # The residual blocks start as the identity (zero last norm); random norm weights make every
    # block's convolutions take part in the outputs and gradients compared below.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.uniform_(0.5, 1.5)
    return model.state_dict()


def _network(plan, weights, mode: str) -> ResEncUNet:
    model = ResEncUNet(IN_CHANNELS, NUM_CLASSES, plan, checkpointing=mode)
    model.load_state_dict(weights)
    return model.train()


def _loss_and_gradients(model: nn.Module, image: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    outputs = model(image)
    loss = sum(((output - 0.1 * i) ** 2).mean() for i, output in enumerate(outputs))
    loss.backward()
    return float(loss.detach()), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_blocks_per_stage_follow_nnunet_and_cap_at_the_plan():
    assert blocks_per_stage(6) == (1, 3, 4, 6, 6, 6)
    assert blocks_per_stage(4) == (1, 3, 4, 6)
    assert blocks_per_stage(7) == (1, 3, 4, 6, 6, 6, 6)


def test_structure_resnet_d_blocks_and_one_conv_per_decoder_stage(plan):
    model = ResEncUNet(IN_CHANNELS, NUM_CLASSES, plan)
    assert isinstance(model, SegmentationNetwork)
    assert [len(stage.blocks) for stage in model.encoder] == list(blocks_per_stage(len(plan.widths)))
    assert model.encoder[0].stem is not None and all(stage.stem is None for stage in model.encoder[1:])
    first = model.encoder[1].blocks[0]
    # Downsampling in the first conv of the stage's first block; the residual path pools, then projects.
    assert first.conv1[0].stride == plan.strides[1] and first.conv2[0].stride == (1, 1, 1)
    assert isinstance(first.skip[0], nn.AvgPool3d) and first.skip[1].kernel_size == (1, 1, 1)
    assert model.encoder[1].blocks[1].skip is None
    assert all(len(stage.convs) == 1 for stage in model.decoder)
    assert len(model.heads) == len(plan.widths) - 1


def test_forward_shapes_train_and_eval(plan, weights):
    model = _network(plan, weights, "off")
    image = torch.randn(BATCH, IN_CHANNELS, *PATCH)
    outputs = model(image)
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 32, 32), (16, 16, 16), (8, 8, 8)]
    model.eval()
    with torch.no_grad():
        assert model(image).shape == (BATCH, NUM_CLASSES, *PATCH)


@pytest.mark.parametrize("mode", [m for m in CHECKPOINTING_MODES if m != "off"])
def test_checkpointing_gives_the_gradients_of_none(plan, weights, mode):
    image = torch.randn(BATCH, IN_CHANNELS, *PATCH, generator=torch.Generator().manual_seed(3))
    loss, gradients = _loss_and_gradients(_network(plan, weights, "off"), image)
    checkpointed_loss, checkpointed = _loss_and_gradients(_network(plan, weights, mode), image)
    assert checkpointed_loss == pytest.approx(loss, rel=1e-6)
    assert gradients.keys() == checkpointed.keys() == set(weights)
    for name, gradient in gradients.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-4, atol=1e-6, msg=name)


def test_parameter_count_matches_nnunet_resenc_m():
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    plan = plan_network((128, 128, 128))
    assert plan.widths == (32, 64, 128, 256, 320, 320)
    ours = sum(p.numel() for p in ResEncUNet(1, 3, plan).parameters())
    theirs = dna.ResidualEncoderUNet(
        1, 6, list(plan.widths), nn.Conv3d, [list(k) for k in plan.kernels], [list(s) for s in plan.strides],
        [1, 3, 4, 6, 6, 6], 3, [1] * 5, conv_bias=True, norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, deep_supervision=True)
    expected = sum(p.numel() for p in theirs.parameters())
    # Equal but for the transposed convolutions' biases, which medseg's decoder leaves out.
    assert abs(ours - expected) <= 0.01 * expected


def test_build_model_builds_resenc_from_the_config():
    cfg = config.load(None, ["model.arch=resenc", "train.patch_size=[32,32,32]", "model.base_width=4",
                             "model.max_width=16", "model.checkpointing=stage"])
    model = build_model(cfg, 2, 4, (1.0, 1.0, 1.0))
    assert isinstance(model, ResEncUNet) and model.checkpointing == "stage"
    assert model.encoder[0].stem[0].in_channels == 2 and model.heads[-1].out_channels == 4
    assert all(isinstance(b, ResidualBlock) for stage in model.encoder for b in stage.blocks)
