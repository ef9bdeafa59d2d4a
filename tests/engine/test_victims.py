"""Contract tests for every registered victim model, plus the per-model facts the papers fix."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from grnn_engine.errors import ConfigError
from grnn_engine.victims import VICTIMS, create_victim

NAMES = VICTIMS.names()
C = 10


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_registry_holds_the_four_models() -> None:
    assert {"lenet", "lenet_zhu", "resnet18", "resnet20"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 4])
def test_output_shape_and_finite(name: str, batch: int) -> None:
    model = create_victim(name, num_classes=C, image_size=32)
    x = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, C)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_and_float32(name: str) -> None:
    model = create_victim(name, num_classes=C)
    assert not any(m.training for m in model.modules())
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_double_backward(name: str) -> None:
    # What every gradient-matching attack does: differentiate a gradient norm w.r.t. the input.
    model = create_victim(name, num_classes=C)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
    loss = F.cross_entropy(model(x), torch.tensor([1, 7]))
    grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    total = sum((g**2).sum() for g in grads)
    (dx,) = torch.autograd.grad(total, x)
    assert torch.isfinite(dx).all()
    assert dx.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_seed_determines_weights(name: str) -> None:
    a = create_victim(name, num_classes=C, seed=3)
    b = create_victim(name, num_classes=C, seed=3)
    c = create_victim(name, num_classes=C, seed=4)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("init", ["uniform", "default"])
def test_seed_determines_weights_per_init(name: str, init: str) -> None:
    a = create_victim(name, num_classes=C, seed=5, init=init)
    b = create_victim(name, num_classes=C, seed=5, init=init)
    assert _same_weights(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_callers_rng_untouched(name: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    create_victim(name, num_classes=C, seed=9)
    assert torch.equal(torch.rand(5), expected)


@pytest.mark.parametrize("name", NAMES)
def test_uniform_init_range(name: str) -> None:
    model = create_victim(name, num_classes=C, init="uniform")
    # The imprint block's weights are the malicious server's construction, set rather than drawn.
    drawn = model.base if name == "imprint" else model
    for p in drawn.parameters():
        assert p.min() >= -0.5 and p.max() <= 0.5
    # PyTorch's default conv init is bounded by 1/sqrt(fan_in); U(-0.5, 0.5) must go beyond it.
    conv = _first_conv(model)
    fan_in = conv.weight[0].numel()
    assert conv.weight.abs().max() > 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("name", NAMES)
def test_default_init_is_pytorchs(name: str) -> None:
    model = create_victim(name, num_classes=C, init="default")
    conv = _first_conv(model)
    fan_in = conv.weight[0].numel()
    assert conv.weight.abs().max() <= 1 / math.sqrt(fan_in)
    assert not _same_weights(model, create_victim(name, num_classes=C, init="uniform"))


def test_lenet_parameter_count_matches_hand_count() -> None:
    model = create_victim("lenet", num_classes=10, image_size=32)
    hand = 456 + 2416 + 48120 + 10164 + 850
    assert sum(p.numel() for p in model.parameters()) == hand


def test_lenet_zhu_flatten_is_768_at_32() -> None:
    model = create_victim("lenet_zhu", num_classes=10, image_size=32)
    assert model.fc.in_features == 768


@pytest.mark.parametrize(
    ("name", "smallest"), [("lenet", 16), ("lenet_zhu", 4), ("resnet18", 8), ("resnet20", 4)]
)
def test_smallest_image_size_works_and_one_less_raises(name: str, smallest: int) -> None:
    model = create_victim(name, num_classes=C, image_size=smallest)
    with torch.no_grad():
        assert model(torch.rand(1, 3, smallest, smallest)).shape == (1, C)
    with pytest.raises(ConfigError, match=f">= {smallest}"):
        create_victim(name, num_classes=C, image_size=smallest - 1)


@pytest.mark.parametrize("name", NAMES)
def test_image_size_too_small_raises(name: str) -> None:
    with pytest.raises(ConfigError, match="image_size=2"):
        create_victim(name, num_classes=C, image_size=2)


@pytest.mark.parametrize("name", ["lenet", "lenet_zhu"])
def test_lenet_other_image_size(name: str) -> None:
    model = create_victim(name, num_classes=C, image_size=64)
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, C)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [1, 0])
def test_num_classes_below_two_raises(name: str, num_classes: int) -> None:
    with pytest.raises(ConfigError, match=f"num_classes={num_classes}"):
        create_victim(name, num_classes=num_classes)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_param_and_init_raise(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown parameter 'depth'"):
        create_victim(name, num_classes=C, depth=3)
    with pytest.raises(ConfigError, match="unknown init 'xavier'"):
        create_victim(name, num_classes=C, init="xavier")


def test_unknown_victim_name_raises() -> None:
    with pytest.raises(ConfigError, match="did you mean 'resnet18'"):
        create_victim("resnet19", num_classes=C)


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_resnet_bad_activation_and_norm_raise(name: str) -> None:
    with pytest.raises(ConfigError, match="unknown activation 'tanh'.*relu, sigmoid"):
        create_victim(name, num_classes=C, activation="tanh")
    with pytest.raises(ConfigError, match="unknown norm 'layer'.*batch, none"):
        create_victim(name, num_classes=C, norm="layer")


def test_resnet18_relu_differs_from_sigmoid() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    relu = create_victim("resnet18", num_classes=C, activation="relu")
    sigmoid = create_victim("resnet18", num_classes=C, activation="sigmoid")
    assert _same_weights(relu, sigmoid)  # same seed: only the activation differs
    with torch.no_grad():
        assert not torch.allclose(relu(x), sigmoid(x))
    assert any(isinstance(m, nn.ReLU) for m in relu.modules())
    assert not any(isinstance(m, nn.Sigmoid) for m in relu.modules())


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
def test_resnet_norm_none_has_no_batchnorm(name: str) -> None:
    model = create_victim(name, num_classes=C, norm="none")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in create_victim(name, num_classes=C).modules())
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, C)


def test_resnet20_is_he_et_al_size() -> None:
    # ~0.27M parameters in the paper; option-A shortcuts add none.
    model = create_victim("resnet20", num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert 0.26e6 < n < 0.28e6


@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_makes_examples_independent(name: str) -> None:
    # The BatchNorm decision: in eval() an example's output does not depend on its batch-mates.
    model = create_victim(name, num_classes=C)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
