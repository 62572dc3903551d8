"""scripts/nnunet_plain.py: nnU-Net's PlainConvUNet registered as `model.arch=nnunet-plain`."""

from __future__ import annotations

import sys

import pytest
import torch

from medseg import config
from medseg.errors import ConfigError
from medseg.models import SegmentationNetwork, build_model
from tests.conftest import ROOT

pytest.importorskip("dynamic_network_architectures")
if str(ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(ROOT / "scripts"))
import nnunet_plain  # noqa: E402 - registers nnunet-plain

TINY = ["model.arch=nnunet-plain", "model.base_width=4", "model.max_width=16", "train.patch_size=[32,32,16]"]


def _network(*overrides: str):
    torch.manual_seed(0)
    return build_model(config.load(None, [*TINY, *overrides]), 1, 3, (1.0, 1.0, 1.0))


def test_nnunet_plain_keeps_the_network_contract():
    network = _network()
    assert isinstance(network, nnunet_plain.PlainConvUNetNetwork) and isinstance(network, SegmentationNetwork)
    image = torch.randn(2, 1, 32, 32, 16)
    outputs = network.train()(image)
    # Deep supervision in training: finest first, one output per decoder stage, and heads coarsest first.
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32, 16), (2, 3, 16, 16, 8), (2, 3, 8, 8, 4)]
    assert [head.weight.shape[1] for head in network.heads] == [16, 8, 4]
    with torch.no_grad():
        full = network.eval()(image)
        finest = network.train()(image)[0]
    assert isinstance(full, torch.Tensor)
    torch.testing.assert_close(full, finest)  # instance norm: train and eval agree


def test_nnunet_plain_without_deep_supervision_returns_one_tensor_in_training():
    network = _network("model.deep_supervision=false").train()
    assert network.deep_supervision is False
    assert tuple(network(torch.randn(1, 1, 32, 32, 16)).shape) == (1, 3, 32, 32, 16)


def test_nnunet_plain_has_the_geometry_of_medseg_s_unet():
    # The same convolutions (kernels, widths); nnU-Net's transposed convolutions also have a bias.
    def kernels(network):
        return sorted(tuple(p.shape) for p in network.parameters() if p.dim() == 5)

    assert kernels(_network()) == kernels(_network("model.arch=unet"))


def test_nnunet_plain_refuses_checkpointing():
    network = _network()
    assert network.checkpointing_modes == ("off",)
    with pytest.raises(ValueError, match="checkpointing"):
        network.set_checkpointing("selective")
    assert network.checkpointing == "off"
    with pytest.raises(ConfigError, match="model.checkpointing"):
        _network("model.checkpointing=stage")
    with pytest.raises(ConfigError, match="model.norm"):
        _network("model.norm=group")
