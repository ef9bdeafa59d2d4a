"""Every defense does what it says, on real gradients of a real victim, and rejects bad parameters."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import SharedUpdate, soft_cross_entropy, trainable_parameters
from grnn_engine.defenses import (
    DEFENSES,
    ClientBatch,
    clip_per_example,
    create_defense,
    param_specs,
    per_example_gradients,
    soteria_scores,
)
from grnn_engine.errors import ConfigError
from grnn_engine.trial import client_update
from grnn_engine.victims import create_victim

# Parameters that make each defense act visibly; a newly registered defense runs with its defaults.
STRONG: dict[str, dict[str, Any]] = {
    "gaussian": {"sigma": 0.1},
    "laplace": {"scale": 0.1},
    "dp_sgd": {"clip": 0.5, "sigma": 1.0},
    "clip": {"max_norm": 1e-4},
    "prune": {"ratio": 0.9},
    "quantize": {"bits": 2},
    "soteria": {"ratio": 0.5},
    "compose": {
        "steps": [{"name": "soteria", "params": {"ratio": 0.5}}, {"name": "quantize", "params": {"bits": 4}}]
    },
}
B = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def client() -> ClientBatch:
    model = create_victim("lenet", num_classes=10, image_size=32, seed=0)
    generator = torch.Generator().manual_seed(1)
    images = torch.rand((B, 3, 32, 32), generator=generator)
    return ClientBatch(model, images, torch.tensor([3, 1, 4, 1]))


def _gradient(client: ClientBatch) -> SharedUpdate:
    grads = torch.autograd.grad(
        soft_cross_entropy(client.model(client.images), client.labels), trainable_parameters(client.model)
    )
    return SharedUpdate(tensors=tuple(g.detach() for g in grads), kind="fedsgd")


def _apply(
    name: str, params: dict[str, Any], update: SharedUpdate, client: ClientBatch, seed: int = 0
) -> SharedUpdate:
    return create_defense(name, params).apply(
        update, client=client, generator=torch.Generator().manual_seed(seed)
    )


def _loop_clipped_mean(client: ClientBatch, clip: float) -> list[Tensor]:
    """DP-SGD's noiseless gradient the slow way: one backward per example, clip, average."""
    params = trainable_parameters(client.model)
    total = [torch.zeros_like(p) for p in params]
    for i in range(B):
        g = torch.autograd.grad(
            soft_cross_entropy(client.model(client.images[i : i + 1]), client.labels[i : i + 1]), params
        )
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
        for acc, t in zip(total, g, strict=True):
            acc.add_(t / max(1.0, norm / clip))
    return [t / B for t in total]


# ---------------------------------------------------------------------------------------------- contract


def test_registry_holds_every_defense() -> None:
    assert set(STRONG) | {"none", "sign"} <= set(DEFENSES.names())


def test_a_parameter_name_has_one_type_across_defenses() -> None:
    """Results hold one `defense.<name>` column per parameter name; two types under one name would make it
    text, and `df["defense.scale"] == 0.01` would then match nothing."""
    kinds: dict[str, set[type]] = {}
    for name in DEFENSES.names():
        for param, spec in getattr(DEFENSES.get(name), "PARAMS", {}).items():
            kinds.setdefault(param, set()).add(spec.kind)
    assert kinds["scale"] == {float}
    assert {param: k for param, k in kinds.items() if len(k) > 1} == {}


@pytest.mark.parametrize("name", DEFENSES.names())
@pytest.mark.parametrize("kind", ["fedsgd", "fedavg"])
def test_contract_shapes_finite_deterministic(name: str, kind: str, client: ClientBatch) -> None:
    params = STRONG.get(name, {})
    if kind == "fedsgd":
        update = _gradient(client)
    else:
        update = client_update(
            client.model, client.images, client.labels, "fedavg", {"local_steps": 2, "local_lr": 0.1}
        )
    first = _apply(name, params, update, client)
    second = _apply(name, params, update, client)
    assert (first.kind, first.local_steps, first.local_lr) == (
        update.kind,
        update.local_steps,
        update.local_lr,
    )
    assert len(first.tensors) == len(update.tensors)
    for a, b, u in zip(first.tensors, second.tensors, update.tensors, strict=True):
        assert a.shape == u.shape and a.dtype == u.dtype
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)  # same generator seed, same shared update
    changed = any(not torch.equal(a, u) for a, u in zip(first.tensors, update.tensors, strict=True))
    assert changed == (name != "none")


# ---------------------------------------------------------------------------------------------- noise


def test_gaussian_has_the_right_variance(client: ClientBatch) -> None:
    update = SharedUpdate(tensors=(torch.zeros(1_000_000), torch.zeros(10)))
    noise = _apply("gaussian", {"sigma": 0.05}, update, client).tensors[0]
    assert float(noise.std()) == pytest.approx(0.05, rel=0.01)
    assert abs(float(noise.mean())) < 0.05 * 0.01


def test_laplace_has_the_right_variance(client: ClientBatch) -> None:
    update = SharedUpdate(tensors=(torch.zeros(1_000_000),))
    noise = _apply("laplace", {"scale": 0.05}, update, client).tensors[0]
    assert float(noise.std()) == pytest.approx(0.05 * math.sqrt(2), rel=0.02)
    assert float(noise.abs().mean()) == pytest.approx(0.05, rel=0.02)  # E|X| = scale for Laplace
    assert abs(float(noise.mean())) < 0.05 * 0.01


# ---------------------------------------------------------------------------------------------- update-level


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_prune_zeroes_exactly_the_smallest_fraction(ratio: float, client: ClientBatch) -> None:
    update = _gradient(client)
    out = _apply("prune", {"ratio": ratio}, update, client).tensors
    n = sum(t.numel() for t in out)
    kept = torch.cat([t.flatten() != 0 for t in out])
    assert int((~kept).sum()) == round(ratio * n)  # the gradient has no exact zeros of its own
    magnitudes = torch.cat([t.abs().flatten() for t in update.tensors])
    if 0 < ratio:
        assert float(magnitudes[kept].min()) >= float(magnitudes[~kept].max())
    for a, u in zip(out, update.tensors, strict=True):
        assert torch.equal(a[a != 0], u[a != 0])  # kept entries are untouched


def test_prune_per_layer_scope(client: ClientBatch) -> None:
    update = _gradient(client)
    out = _apply("prune", {"ratio": 0.75, "scope": "layer"}, update, client).tensors
    for t in out:
        assert int((t == 0).sum()) == round(0.75 * t.numel())


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_quantize_has_at_most_two_to_the_bits_levels_per_layer(bits: int, client: ClientBatch) -> None:
    update = _gradient(client)
    out = _apply("quantize", {"bits": bits}, update, client).tensors
    for q, u in zip(out, update.tensors, strict=True):
        levels = torch.unique(q)
        assert levels.numel() <= 2**bits
        assert float(q.min()) >= float(u.min()) - 1e-7 and float(q.max()) <= float(u.max()) + 1e-7
    big = next(q for q in out if q.numel() > 1000)
    assert torch.unique(big).numel() == 2**bits  # a large layer uses every level


def test_quantize_is_unbiased(client: ClientBatch) -> None:
    x = torch.linspace(-1, 1, 101)
    draws = torch.stack(
        [
            _apply("quantize", {"bits": 2}, SharedUpdate(tensors=(x,)), client, seed=s).tensors[0]
            for s in range(400)
        ]
    )
    assert torch.allclose(draws.mean(dim=0), x, atol=0.05)  # per-entry std of the mean <= 0.67/sqrt(400)/2


def test_sign_is_minus_one_zero_or_one(client: ClientBatch) -> None:
    update = SharedUpdate(tensors=(torch.tensor([-2.0, 0.0, 1e-9, 3.0]), *_gradient(client).tensors))
    out = _apply("sign", {}, update, client).tensors
    assert out[0].tolist() == [-1.0, 0.0, 1.0, 1.0]
    assert all(set(t.unique().tolist()) <= {-1.0, 0.0, 1.0} for t in out)


def test_scaled_sign_keeps_each_tensors_mean_magnitude(client: ClientBatch) -> None:
    update = SharedUpdate(tensors=(torch.tensor([-2.0, 0.0, 1.0, 3.0]), *_gradient(client).tensors))
    out = _apply("sign", {"magnitude": "mean"}, update, client).tensors
    assert out[0].tolist() == [-1.5, 0.0, 1.5, 1.5]
    for shared, plain in zip(out, update.tensors, strict=True):
        assert torch.equal(shared, torch.sign(plain) * plain.abs().mean())
    with pytest.raises(ConfigError, match=r"sign magnitude must be one of none, mean \(got 'max'\)"):
        create_defense("sign", {"magnitude": "max"})


def test_clip_bounds_the_norm_of_the_whole_update(client: ClientBatch) -> None:
    update = _gradient(client)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in update.tensors))
    clipped = _apply("clip", {"max_norm": norm / 10}, update, client).tensors
    assert math.sqrt(sum(float(t.pow(2).sum()) for t in clipped)) == pytest.approx(norm / 10, rel=1e-5)
    for c, u in zip(clipped, update.tensors, strict=True):
        assert torch.allclose(c, u / 10, rtol=1e-5, atol=1e-12)  # direction kept
    loose = _apply("clip", {"max_norm": norm * 2}, update, client).tensors
    assert all(torch.equal(a, u) for a, u in zip(loose, update.tensors, strict=True))


# ---------------------------------------------------------------------------------------------- dp_sgd


def test_per_example_gradients_match_a_loop(client: ClientBatch) -> None:
    per_example = per_example_gradients(client.model, client.images, client.labels)
    params = trainable_parameters(client.model)
    for i in range(B):
        g = torch.autograd.grad(
            soft_cross_entropy(client.model(client.images[i : i + 1]), client.labels[i : i + 1]), params
        )
        for pe, t in zip(per_example, g, strict=True):
            assert torch.allclose(pe[i], t, atol=1e-6, rtol=1e-4)


def test_dp_sgd_clips_each_example(client: ClientBatch) -> None:
    per_example = per_example_gradients(client.model, client.images, client.labels)
    norms = torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(dim=1) for g in per_example))
    clip = float(norms.min()) / 2  # every example is above the bound
    clipped = clip_per_example(per_example, clip)
    clipped_norms = torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(dim=1) for g in clipped))
    assert torch.all(clipped_norms <= clip * (1 + 1e-5))
    assert torch.allclose(clipped_norms, torch.full((B,), clip), rtol=1e-5)
    # With sigma 0 the shared gradient is exactly the mean of the clipped per-example gradients.
    shared = _apply("dp_sgd", {"clip": clip, "sigma": 0.0}, _gradient(client), client).tensors
    for s, e in zip(shared, _loop_clipped_mean(client, clip), strict=True):
        assert torch.allclose(s, e, atol=1e-7, rtol=1e-4)


def test_dp_sgd_noise_has_std_sigma_clip_over_b(client: ClientBatch) -> None:
    clip, sigma = 0.5, 2.0
    noiseless = _apply("dp_sgd", {"clip": clip, "sigma": 0.0}, _gradient(client), client).tensors
    noisy = _apply("dp_sgd", {"clip": clip, "sigma": sigma}, _gradient(client), client).tensors
    noise = torch.cat([(a - b).flatten() for a, b in zip(noisy, noiseless, strict=True)])  # 62,006 entries
    assert float(noise.std()) == pytest.approx(sigma * clip / B, rel=0.02)


def test_dp_sgd_fedavg_replays_the_local_steps(client: ClientBatch) -> None:
    update = client_update(
        client.model, client.images, client.labels, "fedavg", {"local_steps": 3, "local_lr": 0.1}
    )
    # A bound no example reaches and no noise: the replayed delta is the plain one.
    same = _apply("dp_sgd", {"clip": 1e9, "sigma": 0.0}, update, client).tensors
    for a, u in zip(same, update.tensors, strict=True):
        assert torch.allclose(a, u, atol=1e-6, rtol=1e-4)
    # One step with a bound every example exceeds: the delta is -lr times the clipped mean gradient.
    per_example = per_example_gradients(client.model, client.images, client.labels)
    clip = float(torch.sqrt(sum(g.reshape(B, -1).pow(2).sum(dim=1) for g in per_example)).min()) / 2
    one = client_update(
        client.model, client.images, client.labels, "fedavg", {"local_steps": 1, "local_lr": 1.0}
    )
    clipped = _apply("dp_sgd", {"clip": clip, "sigma": 0.0}, one, client).tensors
    for a, e in zip(clipped, _loop_clipped_mean(client, clip), strict=True):
        # new - old in float32 loses ~1e-7 absolute on weights of size ~0.5.
        assert torch.allclose(a, -e, atol=1e-6, rtol=1e-3)


def test_dp_sgd_rejects_batchnorm_in_training() -> None:
    model = create_victim("resnet20", num_classes=10, image_size=8, seed=0).train()
    with pytest.raises(ConfigError, match="norm: none"):
        per_example_gradients(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------- soteria


def _last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.9])
def test_soteria_prunes_the_stated_fraction_of_the_representation_layer(
    ratio: float, client: ClientBatch
) -> None:
    update = _gradient(client)
    out = _apply("soteria", {"ratio": ratio}, update, client).tensors
    weight = _last_linear(client.model).weight
    at = next(i for i, p in enumerate(trainable_parameters(client.model)) if p is weight)
    d = weight.shape[1]  # 84 representation features in lenet
    zero_columns = (out[at] == 0).all(dim=0)
    assert int(zero_columns.sum()) == round(ratio * d)
    assert torch.equal(out[at][:, ~zero_columns], update.tensors[at][:, ~zero_columns])
    for i, (a, u) in enumerate(zip(out, update.tensors, strict=True)):
        if i != at:
            assert torch.equal(a, u)  # every other layer, the classifier bias included, is unchanged
    # The pruned features are those with the smallest Soteria scores.
    scores = soteria_scores(client.model, client.images)
    if 0 < ratio:
        assert float(scores[zero_columns].max()) <= float(scores[~zero_columns].min())


def test_soteria_scores_match_one_backward_per_feature(client: ClientBatch) -> None:
    captured: list[Tensor] = []
    handle = _last_linear(client.model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    x = client.images.clone().requires_grad_(True)
    client.model(x)
    handle.remove()
    r = captured[0]
    expected = []
    for f in range(r.shape[1]):
        (dx,) = torch.autograd.grad(r[:, f].sum(), x, retain_graph=True)
        expected.append(float((dx.flatten(1).norm(dim=1) / r[:, f].detach().abs()).sum()))
    assert soteria_scores(client.model, client.images).tolist() == pytest.approx(expected, rel=1e-4)


# ---------------------------------------------------------------------------------------------- compose


def test_compose_applies_in_order(client: ClientBatch) -> None:
    update = _gradient(client)
    gaussian, clip = (
        {"name": "gaussian", "params": {"sigma": 0.01}},
        {"name": "clip", "params": {"max_norm": 0.05}},
    )
    composed = _apply("compose", {"steps": [gaussian, clip]}, update, client, seed=7).tensors
    generator = torch.Generator().manual_seed(7)
    by_hand = create_defense("gaussian", {"sigma": 0.01}).apply(update, client=client, generator=generator)
    by_hand = create_defense("clip", {"max_norm": 0.05}).apply(by_hand, client=client, generator=generator)
    assert all(torch.equal(a, b) for a, b in zip(composed, by_hand.tensors, strict=True))
    reversed_order = _apply("compose", {"steps": [clip, gaussian]}, update, client, seed=7).tensors
    assert not all(torch.equal(a, b) for a, b in zip(composed, reversed_order, strict=True))
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in composed))
    assert norm == pytest.approx(0.05, rel=1e-5)  # clipping came last


def test_compose_of_soteria_then_prune(client: ClientBatch) -> None:
    update = _gradient(client)
    steps = [{"name": "soteria", "params": {"ratio": 0.5}}, {"name": "prune", "params": {"ratio": 0.5}}]
    composed = _apply("compose", {"steps": steps}, update, client).tensors
    by_hand = _apply(
        "prune", {"ratio": 0.5}, _apply("soteria", {"ratio": 0.5}, update, client), client
    ).tensors
    assert all(torch.equal(a, b) for a, b in zip(composed, by_hand, strict=True))


# ---------------------------------------------------------------------------------------------- bad parameters


@pytest.mark.parametrize(
    ("name", "params", "fragment"),
    [
        ("gaussian", {"sigma": -1.0}, "gaussian sigma must be a finite number in [0, inf) (got -1.0)"),
        ("gaussian", {"sigma": float("nan")}, "(got nan)"),
        ("gaussian", {"sigma": float("inf")}, "(got inf)"),
        ("gaussian", {"sigma": "0.1"}, "(got '0.1')"),
        ("gaussian", {"sigma": True}, "(got True)"),
        ("gaussian", {"sigma": [0.1, 0.2]}, "(got [0.1, 0.2])"),
        ("laplace", {"scale": -0.5}, "laplace scale must be a finite number in [0, inf) (got -0.5)"),
        ("dp_sgd", {"clip": 0.0}, "dp_sgd clip must be a finite number in (0, inf) (got 0.0)"),
        ("dp_sgd", {"sigma": -1}, "dp_sgd sigma"),
        ("clip", {"max_norm": -2}, "clip max_norm must be a finite number in (0, inf) (got -2)"),
        ("prune", {"ratio": 1.0}, "prune ratio must be a finite number in [0, 1) (got 1.0)"),
        ("prune", {"ratio": -0.1}, "(got -0.1)"),
        ("prune", {"scope": "row"}, "prune scope must be one of global, layer (got 'row')"),
        ("quantize", {"bits": 0}, "quantize bits must be an integer in 1..32 (got 0)"),
        ("quantize", {"bits": 33}, "(got 33)"),
        ("quantize", {"bits": 2.5}, "(got 2.5)"),
        ("soteria", {"ratio": 1.5}, "soteria ratio must be a finite number in [0, 1) (got 1.5)"),
        ("gaussian", {"sigmaa": 0.1}, "unknown parameter 'sigmaa' for defense 'gaussian'"),
        ("compose", {"steps": "prune"}, "compose steps must be a list"),
        (
            "compose",
            {"steps": [{"params": {}}]},
            "each compose step must be a dict with keys name and params",
        ),
        ("compose", {"steps": [{"name": "prunе"}]}, "unknown defense"),
        (
            "compose",
            {"steps": [{"name": "prune"}, {"name": "soteria"}]},
            "must come before update-level steps",
        ),
        ("compose", {"steps": [{"name": "soteria"}, {"name": "dp_sgd"}]}, "must be first"),
        ("compose", {"steps": [{"name": "prune", "params": {"ratio": 2}}]}, "prune ratio"),
    ],
)
def test_bad_parameters_raise_config_error(name: str, params: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        create_defense(name, params)
    assert fragment in str(info.value)


def test_param_specs_expose_types_and_ranges() -> None:
    assert param_specs("prune")["ratio"].allowed() == "a finite number in [0, 1)"
    assert param_specs("quantize")["bits"].kind is int
    assert set(param_specs("dp_sgd")) == {"clip", "sigma"}
    assert param_specs("none") == {} and param_specs("compose") == {}
    assert param_specs("quantize")["bits"].check("quantize", "bits", 8.0) == 8
