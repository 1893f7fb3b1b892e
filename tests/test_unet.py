"""UNet backbone and noisy classifier: shapes, conditioning, input checks, gradients, config presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fastsample.models.classifier import NoisyClassifier
from fastsample.models.unet import UNet
from fastsample.utils.errors import UserError

NET_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "net"
TINY = dict(
    model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), mid_attention=False
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _randomize(module: torch.nn.Module) -> torch.nn.Module:
    # Output and residual convs start at zero (identity branches); perturb them so that
    # conditioning effects are visible in a freshly built network.
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module


@pytest.mark.parametrize(
    ("size", "channels", "extra"),
    [
        (8, 1, {}),
        (16, 3, {"attention_resolutions": (8,), "mid_attention": True, "num_heads": 2}),
        (28, 1, {"embedding": "fourier"}),
    ],
)
def test_output_shape(size: int, channels: int, extra: dict) -> None:
    net = UNet(in_channels=channels, image_size=size, **{**TINY, **extra})
    x = torch.randn(3, channels, size, size)
    assert net(x, torch.rand(3)).shape == x.shape
    assert net(x, 500.0).shape == x.shape  # a DDPM timestep as a scalar broadcasts over the batch


def test_out_channels_and_three_levels() -> None:
    net = UNet(
        in_channels=1,
        out_channels=2,
        image_size=28,
        model_channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(14,),
    )
    assert net(torch.randn(2, 1, 28, 28), torch.zeros(2)).shape == (2, 2, 28, 28)


def test_class_conditioning_and_null_label() -> None:
    net = _randomize(UNet(in_channels=1, image_size=8, num_classes=10, **TINY)).eval()
    x, sigma = torch.randn(2, 1, 8, 8), torch.zeros(2)
    out_a = net(x, sigma, torch.tensor([1, 1]))
    out_b = net(x, sigma, torch.tensor([2, 2]))
    assert not torch.allclose(out_a, out_b)
    null = net(x, sigma, torch.tensor([10, 10]))
    assert torch.allclose(null, net(x, sigma, torch.tensor([-1, -1])))
    assert torch.allclose(null, net(x, sigma, None))
    with pytest.raises(UserError, match="class labels must be in"):
        net(x, sigma, torch.tensor([11, 0]))


def test_class_dropout_only_in_training() -> None:
    net = UNet(in_channels=1, image_size=8, num_classes=3, class_dropout=1.0, **TINY)
    labels = torch.tensor([0, 1, 2])
    assert net.embed.class_index(labels, 3, torch.device("cpu")).tolist() == [3, 3, 3]
    net.eval()
    assert net.embed.class_index(labels, 3, torch.device("cpu")).tolist() == [0, 1, 2]


def test_noise_label_changes_output() -> None:
    net = _randomize(UNet(in_channels=1, image_size=8, **TINY))
    x = torch.randn(2, 1, 8, 8)
    assert not torch.allclose(net(x, torch.full((2,), -1.0)), net(x, torch.full((2,), 1.0)))


def test_unsupported_image_size() -> None:
    with pytest.raises(UserError, match=r"model.image_size=28 .* channel_mult=\[1, 2, 2, 2\].*multiple of 8"):
        UNet(in_channels=1, image_size=28, channel_mult=(1, 2, 2, 2))


def test_bad_attention_resolution() -> None:
    with pytest.raises(UserError, match="model.attention_resolutions"):
        UNet(in_channels=1, image_size=28, channel_mult=(1, 2, 2), attention_resolutions=(16,))


def test_wrong_input_shape() -> None:
    net = UNet(in_channels=1, image_size=8, **TINY)
    with pytest.raises(UserError, match=r"model expects \(C,H,W\)=\(1, 8, 8\), got \(3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.zeros(2))
    with pytest.raises(UserError, match=r"got \(1, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))


def test_gradients_flow_to_input_and_all_parameters() -> None:
    net = _randomize(UNet(in_channels=1, image_size=8, num_classes=4, **TINY))
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    net(x, torch.rand(2), torch.tensor([0, 4])).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # Class rows for labels not in the batch get no gradient; everything else must.
    missing = [name for name, p in net.named_parameters() if p.grad is None and "classes" not in name]
    assert not missing


def test_classifier_logits_features_and_gradient() -> None:
    clf = NoisyClassifier(in_channels=1, num_classes=10, image_size=28, **TINY)
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    logits = clf(x, torch.rand(4))
    assert logits.shape == (4, 10)
    assert clf.features(x, torch.rand(4)).shape == (4, clf.feature_dim) == (4, 32)
    assert clf(x).shape == (4, 10)  # clean-domain use: constant noise label
    (grad,) = torch.autograd.grad(logits.log_softmax(-1)[:, 3].sum(), x)
    assert grad.abs().sum() > 0  # what classifier guidance needs
    with pytest.raises(UserError, match="model expects"):
        clf(torch.randn(1, 3, 28, 28), 0.0)


def test_classifier_reuses_unet_blocks() -> None:
    unet = UNet(in_channels=1, image_size=8, **TINY)
    clf = NoisyClassifier(in_channels=1, num_classes=3, image_size=8, **TINY)
    assert type(clf.encoder) is type(unet.encoder)
    assert clf.encoder.state_dict().keys() == unet.encoder.state_dict().keys()


@pytest.mark.parametrize("name", ["unet_tiny", "unet_small", "unet_cifar"])
def test_net_presets_instantiate(name: str) -> None:
    net = instantiate(OmegaConf.load(NET_CONFIGS / f"{name}.yaml"))
    assert isinstance(net, UNet)
    if name != "unet_cifar":  # the 38M-parameter preset is only constructed, to keep the test fast
        x = torch.randn(2, *net.input_shape)
        assert net(x, torch.zeros(2)).shape == x.shape
