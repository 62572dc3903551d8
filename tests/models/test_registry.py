"""medseg.models' registry: `model.arch` picks the architecture, the network contract, plugging one in."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from medseg import checkpoint, config
from medseg.cli import app
from medseg.errors import ConfigError
from medseg.losses import DiceCELoss
from medseg.models import ARCHITECTURES, SegmentationNetwork, UNet3D, build_model, register
from medseg.step import build_optimizer, train_step
from tests.conftest import ROOT

TINY = ["model.base_width=4", "model.max_width=16", "train.patch_size=[16,16,16]", "train.batch_size=1"]


class TinyNetwork(nn.Module):
    """The smallest network that keeps the contract: one convolution and one head, no deep
    supervision, no checkpointing."""

    checkpointing_modes = ("off",)

    def __init__(self, in_channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.LeakyReLU(0.01))
        self.heads = nn.ModuleList([nn.Conv3d(width, num_classes, 1)])
        self.deep_supervision = False
        self.checkpointing = "off"

    def set_checkpointing(self, mode: str) -> None:
        if mode not in self.checkpointing_modes:
            raise ValueError(f"no checkpointing, got {mode!r}")

    def compile_stages(self) -> None:
        self.compile()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.heads[-1](self.body(image))


@pytest.fixture
def tiny_arch():
    """Architecture `tiny-test` registered for one test (its width is model.base_width)."""

    @register("tiny-test")
    def build_tiny(cfg, in_channels, num_classes, spacing, width_factor=1):
        return TinyNetwork(in_channels, num_classes, cfg.model.base_width * width_factor)

    yield "tiny-test"
    ARCHITECTURES.pop("tiny-test")


def test_the_default_architecture_is_the_unet_and_keeps_the_contract():
    cfg = config.load(None, TINY)
    assert cfg.model.arch == "unet" and next(iter(ARCHITECTURES)) == "unet"
    network = build_model(cfg, 1, 3, (1.0, 1.0, 1.0))
    assert type(network) is UNet3D
    assert isinstance(network, SegmentationNetwork)
    assert network.checkpointing_modes[0] == "off" and network.checkpointing in network.checkpointing_modes


def test_a_module_without_the_contract_does_not_pass_for_a_network():
    assert not isinstance(nn.Conv3d(1, 3, 1), SegmentationNetwork)
    assert isinstance(TinyNetwork(1, 3, 4), SegmentationNetwork)


def test_unknown_architecture_names_the_known_ones(tiny_arch):
    cfg = config.load(None, [*TINY, "model.arch=resnet"])
    with pytest.raises(ConfigError, match=r"'model.arch': 'resnet' is not one of: unet, ") as raised:
        build_model(cfg, 1, 3, (1.0, 1.0, 1.0))
    # Every registered name (others, such as the benchmarks' nnunet-plain, may be registered too).
    assert str(raised.value).split(": ")[-1].split(", ") == list(ARCHITECTURES)
    assert "tiny-test" in ARCHITECTURES


def test_a_name_is_registered_once(tiny_arch):
    with pytest.raises(ValueError, match="already registered"):
        register("unet")(lambda *arguments: None)
    assert ARCHITECTURES["unet"].__name__ == "build_unet"


def test_build_model_builds_the_registered_architecture_with_its_options(tiny_arch):
    cfg = config.load(None, [*TINY, f"model.arch={tiny_arch}"])
    network = build_model(cfg, 2, 5, (1.0, 1.0, 1.0), width_factor=2)
    assert type(network) is TinyNetwork
    assert network.body[0].in_channels == 2 and network.body[0].out_channels == 8
    assert network.heads[-1].out_channels == 5


def test_a_registered_architecture_trains_a_step_without_patching(tiny_arch):
    cfg = config.load(None, [*TINY, f"model.arch={tiny_arch}"])
    network = build_model(cfg, 1, 3, (1.0, 1.0, 1.0)).train()
    before = [p.detach().clone() for p in network.parameters()]
    optimizer = build_optimizer(cfg, network)
    image, label = torch.randn(1, 1, 16, 16, 16), torch.randint(0, 3, (1, 1, 16, 16, 16)).float()
    loss, _ = train_step(network, image, label, DiceCELoss(), optimizer, torch.amp.GradScaler("cpu", enabled=False),
                         None, cfg.train.grad_clip)
    assert torch.isfinite(loss)
    assert all(not torch.equal(a, b) for a, b in zip(before, network.parameters()))


def test_medseg_train_trains_a_registered_architecture(tiny_arch, tmp_path):
    overrides = [*TINY, f"model.arch={tiny_arch}", "train.epochs=1", "train.iterations_per_epoch=1",
                 "train.workers=0", "validate.every=1", f"data.dataset={ROOT / 'sample_data'}",
                 f"output_dir={tmp_path}", "run_name=tiny"]
    arguments = ["train", str(ROOT / "configs" / "sample.yaml")]
    for item in overrides:
        arguments += ["--set", item]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    state = checkpoint.load(tmp_path / "tiny" / "last.pt")
    assert set(state["model"]) == {"body.0.weight", "body.0.bias", "heads.0.weight", "heads.0.bias"}
    assert state["config"]["model"]["arch"] == tiny_arch
