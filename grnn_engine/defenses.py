"""Defenses: transforms a client applies to its update before sharing it (the attacker sees the result).

Each defense is registered in `DEFENSES` and built with typed, range-checked keyword parameters (declared
in the class's `PARAMS`; `param_specs(name)` exposes them to sweeps and searches). A defense runs on the
client, so it may use the client's own batch (DP-SGD clips per-example gradients; Soteria perturbs the
representation layer's gradient); the attacker sees only what `apply` returns.

Two stages, so that one defense object serves both an attacked client and FedAvg training (grnn_engine.fl):
- `defend_gradient(model, images, labels, grads, generator)`: acts on the gradient of one local step and
  needs the batch (`needs_batch = True`: dp_sgd, soteria). For a `fedsgd` update it acts on the shared
  gradient. For a `fedavg` update it acts on the gradient of every local step: `apply` replays the
  update's `local_steps` full-batch SGD steps at `local_lr` from the global model (`client.model`, exactly
  as grnn_engine.trial.client_update takes them) with the defended gradients, and shares that delta; so
  these defenses defend the gradients the delta is made of, as DP-SGD does in local training.
- `defend_update(tensors, generator)`: acts on the shared tensors themselves (the gradient for fedsgd,
  the model delta for fedavg): gaussian, laplace, clip, prune, quantize, sign.
`compose` runs its steps in order; steps that need the batch must come before the others.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from grnn_engine.attacks.base import (
    SharedUpdate,
    last_linear_positions,
    soft_cross_entropy,
    trainable_parameters,
)
from grnn_engine.errors import ConfigError
from grnn_engine.registry import Registry

__all__ = [
    "DEFENSES",
    "ClientBatch",
    "Defense",
    "ParamSpec",
    "clip_per_example",
    "create_defense",
    "param_specs",
    "per_example_gradients",
]

Grads = tuple[Tensor, ...]


@dataclass(frozen=True)
class ClientBatch:
    """The client's own model and private batch: visible to defenses, never to attacks."""

    model: nn.Module
    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class ParamSpec:
    """One typed parameter of a defense with its allowed range (numbers) or choices (strings)."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # True: the value must be > low (else >= low)
    high_open: bool = False  # True: the value must be < high (else <= high)
    choices: tuple[str, ...] = ()
    doc: str = ""

    def allowed(self) -> str:
        """The allowed values in words, for error messages: '[0, 1)', 'an integer in 1..32', 'global, layer'."""
        if self.kind is str:
            return ", ".join(self.choices)
        if self.kind is int:
            return f"an integer in {self.low:g}..{self.high:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open or self.high == math.inf else "]"
        high = "inf" if self.high == math.inf else f"{self.high:g}"
        return f"a finite number in {left}{self.low:g}, {high}{right}"

    def check(self, defense: str, name: str, value: Any) -> Any:
        """The value, converted to the declared type; ConfigError naming the value and the range if not allowed."""
        problem = f"{defense} {name} must be {self.allowed()} (got {value!r})"
        if self.kind is str:
            if value not in self.choices:
                raise ConfigError(f"{defense} {name} must be one of {self.allowed()} (got {value!r})")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(problem)
        number = float(value)
        below = number <= self.low if self.low_open else number < self.low
        above = number >= self.high if self.high_open else number > self.high
        if below or above or (self.kind is int and number != int(number)):
            raise ConfigError(problem)
        return int(number) if self.kind is int else number


class Defense:
    """Base of every defense. Subclasses override `defend_update` and/or `defend_gradient` (see module doc)."""

    #: The registered name (set on registration), used in error messages.
    NAME: ClassVar[str] = ""
    #: Typed parameters of the constructor, by name.
    PARAMS: ClassVar[dict[str, ParamSpec]] = {}
    #: True when the defense acts on each local gradient and so needs the client's batch.
    needs_batch: bool = False

    def defend_gradient(
        self, model: nn.Module, images: Tensor, labels: Tensor, grads: Grads, generator: torch.Generator
    ) -> Grads:
        """The defended gradient of one local step; `grads` is the plain mean-loss gradient at `model`."""
        return grads

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        """The defended shared tensors."""
        return tensors

    def apply(self, update: SharedUpdate, *, client: ClientBatch, generator: torch.Generator) -> SharedUpdate:
        """Return the update as shared after the defense."""
        tensors = update.tensors
        if self.needs_batch:
            if update.kind == "fedsgd":
                tensors = self.defend_gradient(client.model, client.images, client.labels, tensors, generator)
            else:
                tensors = self._replay_local_steps(update, client, generator)
        return replace(update, tensors=self.defend_update(tensors, generator))

    def _replay_local_steps(
        self, update: SharedUpdate, client: ClientBatch, generator: torch.Generator
    ) -> Grads:
        # The same full-batch SGD steps as trial.client_update, each on the defended gradient.
        local = copy.deepcopy(client.model)
        params = trainable_parameters(local)
        for _ in range(update.local_steps):
            plain = torch.autograd.grad(soft_cross_entropy(local(client.images), client.labels), params)
            defended = self.defend_gradient(local, client.images, client.labels, plain, generator)
            with torch.no_grad():
                for p, g in zip(params, defended, strict=True):
                    p.sub_(update.local_lr * g)
        return tuple(
            (new - old).detach() for new, old in zip(params, trainable_parameters(client.model), strict=True)
        )


DEFENSES: Registry[Defense] = Registry("defense")


def create_defense(name: str, params: dict[str, Any] | None = None) -> Defense:
    """DEFENSES.create(name, **params), for callers that hold the parameters as a dict."""
    return DEFENSES.create(name, **(params or {}))


def param_specs(name: str) -> dict[str, ParamSpec]:
    """The typed parameters (with ranges) of defense `name`; compose's `steps` is not a number and is absent."""
    factory = DEFENSES.get(name)
    return dict(getattr(factory, "PARAMS", {}))


def _checked(defense: type[Defense], name: str, value: Any) -> Any:
    return defense.PARAMS[name].check(defense.NAME, name, value)


def _register(name: str) -> Any:
    """DEFENSES.register, also recording the name on the class for its error messages."""

    def decorate(cls: type[Defense]) -> type[Defense]:
        cls.NAME = name
        DEFENSES.register(name)(cls)
        return cls

    return decorate


def _noise_like(t: Tensor, generator: torch.Generator) -> Tensor:
    # Drawn on the CPU from the trial's generator, so a GPU run shares exactly the CPU run's noise.
    return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)


def _global_norm(tensors: Sequence[Tensor]) -> Tensor:
    return torch.sqrt(
        sum((t.detach().double().pow(2).sum() for t in tensors), torch.zeros((), dtype=torch.double))
    )


# ---------------------------------------------------------------------------------------------- update-level


@_register("none")
class NoDefense(Defense):
    """The update is shared as computed."""

    def apply(self, update: SharedUpdate, *, client: ClientBatch, generator: torch.Generator) -> SharedUpdate:
        return update


@_register("gaussian")
class GaussianNoise(Defense):
    """Adds N(0, sigma^2) to every entry of the update."""

    PARAMS = {"sigma": ParamSpec(float, low=0.0, doc="standard deviation of the noise added to every entry")}

    def __init__(self, *, sigma: float = 1e-3) -> None:
        self.sigma = _checked(GaussianNoise, "sigma", sigma)

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        return tuple(t + self.sigma * _noise_like(t, generator) for t in tensors)


@_register("laplace")
class LaplaceNoise(Defense):
    """Adds Laplace(0, scale) noise (variance 2 * scale^2) to every entry of the update."""

    PARAMS = {"scale": ParamSpec(float, low=0.0, doc="scale b of the Laplace noise; its std is b * sqrt(2)")}

    def __init__(self, *, scale: float = 1e-3) -> None:
        self.scale = _checked(LaplaceNoise, "scale", scale)

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        out = []
        for t in tensors:
            # Difference of two Exp(1) draws is Laplace(0, 1); 1 - U lies in (0, 1], so the log is finite.
            e1 = -torch.log1p(-torch.rand(t.shape, generator=generator, dtype=torch.float64))
            e2 = -torch.log1p(-torch.rand(t.shape, generator=generator, dtype=torch.float64))
            out.append(t + (self.scale * (e1 - e2)).to(dtype=t.dtype, device=t.device))
        return tuple(out)


@_register("clip")
class ClipNorm(Defense):
    """Scales the whole update (all tensors together) down to L2 norm max_norm when it is larger."""

    PARAMS = {"max_norm": ParamSpec(float, low=0.0, low_open=True, doc="largest L2 norm of the whole update")}

    def __init__(self, *, max_norm: float = 1.0) -> None:
        self.max_norm = _checked(ClipNorm, "max_norm", max_norm)

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        norm = float(_global_norm(tensors))
        if norm <= self.max_norm:
            return tensors
        scale = self.max_norm / norm
        return tuple(t * scale for t in tensors)


@_register("prune")
class Prune(Defense):
    """Zeroes the fraction `ratio` of the update's entries with the smallest magnitudes (0.99 keeps 1%).

    `scope="global"` (default) ranks all entries of the update together, as gradient sparsification
    does; `scope="layer"` zeroes `ratio` of each tensor separately. Exactly round(ratio * n) entries are
    zeroed (ties broken by position), so the kept fraction is exact.
    """

    PARAMS = {
        "ratio": ParamSpec(float, low=0.0, high=1.0, high_open=True, doc="fraction of entries zeroed"),
        "scope": ParamSpec(
            str, choices=("global", "layer"), doc="rank entries over the whole update or per tensor"
        ),
    }

    def __init__(self, *, ratio: float = 0.9, scope: str = "global") -> None:
        self.ratio = _checked(Prune, "ratio", ratio)
        self.scope = _checked(Prune, "scope", scope)

    @staticmethod
    def _keep_mask(magnitudes: Tensor, ratio: float) -> Tensor:
        n = magnitudes.numel()
        keep = n - round(ratio * n)
        mask = torch.zeros(n, dtype=torch.bool, device=magnitudes.device)
        if keep > 0:
            mask[torch.topk(magnitudes.flatten(), keep, sorted=False).indices] = True
        return mask

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        if self.scope == "layer":
            return tuple(t * self._keep_mask(t.abs(), self.ratio).view_as(t) for t in tensors)
        flat = torch.cat([t.detach().abs().flatten() for t in tensors])
        mask = self._keep_mask(flat, self.ratio)
        out, start = [], 0
        for t in tensors:
            out.append(t * mask[start : start + t.numel()].view_as(t))
            start += t.numel()
        return tuple(out)


@_register("quantize")
class Quantize(Defense):
    """Stochastic uniform quantization of each tensor to 2^bits levels evenly spaced between its min and max.

    Each entry rounds to one of its two neighbouring levels with probabilities that make it unbiased
    (E[q(x)] = x), as in QSGD-style compression; a constant tensor is left as it is.
    """

    PARAMS = {"bits": ParamSpec(int, low=1, high=32, doc="bits per entry: 2^bits levels per tensor")}

    def __init__(self, *, bits: int = 8) -> None:
        self.bits = _checked(Quantize, "bits", bits)

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        steps = float(2**self.bits - 1)
        out = []
        for t in tensors:
            x = t.detach().double()
            lo, hi = x.min(), x.max()
            if not hi > lo:
                out.append(t)
                continue
            scaled = (x - lo) / (hi - lo) * steps
            low_level = scaled.floor()
            up = torch.rand(t.shape, generator=generator, dtype=torch.float64).to(t.device) < (
                scaled - low_level
            )
            level = (low_level + up.double()).clamp(0, steps)
            out.append((lo + level * ((hi - lo) / steps)).to(t.dtype))
        return tuple(out)


@_register("sign")
class Sign(Defense):
    """signSGD: shares only the sign of every entry (-1, 0 or +1).

    `magnitude: mean` shares each tensor's signs times its mean absolute entry, the scaled sign of EF-signSGD
    (Karimireddy et al. 2019): one number more per tensor, but the update keeps its size, so FedAvg, which adds
    the shared deltas to the model, still trains (plain signs move every weight by 1 a round and break it).
    """

    # Not called `scale`: laplace's `scale` is a number, and one parameter name with two types across
    # plugins would make its results column text (README, results schema).
    PARAMS = {"magnitude": ParamSpec(str, choices=("none", "mean"),
                                     doc="none: signs only; mean: each tensor's signs times its mean absolute entry")}

    def __init__(self, *, magnitude: str = "none") -> None:
        self.magnitude = _checked(Sign, "magnitude", magnitude)

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        if self.magnitude == "mean":
            return tuple(torch.sign(t) * t.abs().mean() for t in tensors)
        return tuple(torch.sign(t) for t in tensors)


# ---------------------------------------------------------------------------------------------- batch-level


def _has_batch_statistics(model: nn.Module) -> bool:
    return model.training and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def per_example_gradients(model: nn.Module, images: Tensor, labels: Tensor) -> Grads:
    """Gradient of each example's cross-entropy w.r.t. the trainable parameters: tensors (B, *param.shape).

    Computed with torch.func (functional_call + vmap + grad), in `model.parameters()` order. Needs a model
    whose output for one example does not depend on the others (no BatchNorm in train mode).
    """
    if _has_batch_statistics(model):
        raise ConfigError(
            "per-example gradients (dp_sgd) need a model without BatchNorm in training mode; use a victim "
            "with norm: none"
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def loss_of_one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return soft_cross_entropy(logits, y.unsqueeze(0))

    per_example = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, images.detach(), labels)
    return tuple(per_example[n] for n in names)


def clip_per_example(per_example: Grads, clip: float) -> Grads:
    """Each example's gradient (all tensors together) scaled to L2 norm <= clip: g / max(1, ||g|| / clip)."""
    batch = per_example[0].shape[0]
    sq = torch.stack([g.reshape(batch, -1).pow(2).sum(dim=1) for g in per_example]).sum(dim=0)
    factor = (torch.sqrt(sq) / clip).clamp(min=1.0).reciprocal()
    return tuple(g * factor.view(-1, *([1] * (g.dim() - 1))) for g in per_example)


# Examples per vmap call in dp_sgd: bounds the memory of per-example gradients (B x parameters).
_DP_CHUNK = 32


@_register("dp_sgd")
class DPSGD(Defense):
    """DP-SGD (Abadi et al. 2016): per-example clipping to L2 norm `clip`, mean, then Gaussian noise.

    The shared gradient is (sum_i clip(g_i) + N(0, (sigma * clip)^2 I)) / B, i.e. the mean of the
    clipped per-example gradients plus N(0, (sigma * clip / B)^2) per entry; `sigma` is the noise
    multiplier that an RDP accountant takes (grnn_engine.fl reports (epsilon, delta) for stages trained
    with it). For fedavg updates every replayed local step is a DP-SGD step (see the module doc).
    """

    PARAMS = {
        "clip": ParamSpec(float, low=0.0, low_open=True, doc="L2 norm bound of each example's gradient"),
        "sigma": ParamSpec(float, low=0.0, doc="noise multiplier: noise std is sigma * clip on the sum"),
    }
    needs_batch = True

    def __init__(self, *, clip: float = 1.0, sigma: float = 1.0) -> None:
        self.clip = _checked(DPSGD, "clip", clip)
        self.sigma = _checked(DPSGD, "sigma", sigma)

    def defend_gradient(
        self, model: nn.Module, images: Tensor, labels: Tensor, grads: Grads, generator: torch.Generator
    ) -> Grads:
        batch = images.shape[0]
        total = [torch.zeros_like(g) for g in grads]
        for start in range(0, batch, _DP_CHUNK):
            chunk = slice(start, start + _DP_CHUNK)
            clipped = clip_per_example(per_example_gradients(model, images[chunk], labels[chunk]), self.clip)
            for acc, g in zip(total, clipped, strict=True):
                acc.add_(g.sum(dim=0))
        return tuple((acc + self.sigma * self.clip * _noise_like(acc, generator)) / batch for acc in total)


def _last_linear(model: nn.Module) -> nn.Linear:
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ConfigError(
            f"soteria needs a model with an nn.Linear classifier; {type(model).__name__} has none"
        )
    return last


def soteria_scores(model: nn.Module, images: Tensor) -> Tensor:
    """Soteria's per-feature score (d,) of the representation r = the input of the last nn.Linear.

    score_f = sum_i ||d r_if / d x_i|| / |r_if|: small scores mark the features whose removal changes the
    reconstructed input most (Sun et al. 2021 prune the features with the largest |r| / ||dr/dx||).
    """
    captured: list[Tensor] = []
    handle = _last_linear(model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    x = images.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            model(x)
    finally:
        handle.remove()
    r = captured[0].reshape(x.shape[0], -1)
    d = r.shape[1]
    # One batched backward per feature block: row f of grad_outputs selects feature f of every example.
    eye = torch.eye(d, dtype=r.dtype, device=r.device)
    scores = torch.empty(d, dtype=torch.float64, device=r.device)
    block = 64
    for start in range(0, d, block):
        rows = eye[start : start + block]
        outputs = rows[:, None, :].expand(-1, x.shape[0], -1)
        (dx,) = torch.autograd.grad(r, x, grad_outputs=outputs, is_grads_batched=True, retain_graph=True)
        norms = dx.reshape(rows.shape[0], x.shape[0], -1).double().norm(dim=2)  # (block, B)
        values = r[:, start : start + block].detach().double().abs().clamp_min(1e-30).T  # (block, B)
        scores[start : start + rows.shape[0]] = (norms / values).sum(dim=1)
    return scores


@_register("soteria")
class Soteria(Defense):
    """Soteria (Sun et al., CVPR 2021): prunes the representation layer's gradient.

    The representation layer is the input of the model's last nn.Linear. The round(ratio * d) features
    with the smallest `soteria_scores` have their columns of that layer's weight gradient zeroed; every
    other tensor (the bias included) is shared unchanged.
    """

    PARAMS = {
        "ratio": ParamSpec(
            float, low=0.0, high=1.0, high_open=True, doc="fraction of representation features pruned"
        )
    }
    needs_batch = True

    def __init__(self, *, ratio: float = 0.8) -> None:
        self.ratio = _checked(Soteria, "ratio", ratio)

    def defend_gradient(
        self, model: nn.Module, images: Tensor, labels: Tensor, grads: Grads, generator: torch.Generator
    ) -> Grads:
        weight_at, _ = last_linear_positions(model, trainable_parameters(model))
        scores = soteria_scores(model, images)
        pruned = round(self.ratio * scores.numel())
        mask = torch.ones(scores.numel(), dtype=grads[weight_at].dtype, device=grads[weight_at].device)
        mask[torch.argsort(scores, stable=True)[:pruned]] = 0
        out = list(grads)
        out[weight_at] = grads[weight_at] * mask[None, :]
        return tuple(out)


# ---------------------------------------------------------------------------------------------- compose


@_register("compose")
class Compose(Defense):
    """Several defenses in order: `steps=[{"name": "clip", "params": {"max_norm": 1}}, {"name": "prune", ...}]`.

    Steps that need the client's batch (dp_sgd, soteria) act on the gradient, so they must come before the
    update-level steps; dp_sgd recomputes the gradient from the batch, so it must be the first step.
    No steps shares the update as computed.
    """

    def __init__(self, *, steps: Sequence[dict[str, Any]] = ()) -> None:
        if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
            raise ConfigError(
                f"compose steps must be a list of {{name, params}} dicts (got {steps!r}); in a sweep spec, "
                "where a list is an axis, write steps: [[step, step]]"
            )
        self.steps: list[Defense] = []
        names: list[str] = []
        for step in steps:
            if not isinstance(step, dict) or "name" not in step or set(step) - {"name", "params"}:
                raise ConfigError(
                    f"each compose step must be a dict with keys name and params (got {step!r})"
                )
            params = step.get("params") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"compose step '{step['name']}' params must be a dict (got {params!r})")
            self.steps.append(DEFENSES.create(step["name"], **params))
            names.append(step["name"])
        for i, defense in enumerate(self.steps):
            if defense.needs_batch and any(not d.needs_batch for d in self.steps[:i]):
                raise ConfigError(
                    f"compose step '{names[i]}' needs the client's batch and must come before update-level "
                    f"steps (got order {names})"
                )
            if isinstance(defense, DPSGD) and i > 0:
                raise ConfigError(
                    f"compose step 'dp_sgd' recomputes the gradient and must be first (got order {names})"
                )
        self.needs_batch = any(d.needs_batch for d in self.steps)

    def defend_gradient(
        self, model: nn.Module, images: Tensor, labels: Tensor, grads: Grads, generator: torch.Generator
    ) -> Grads:
        for defense in self.steps:
            grads = defense.defend_gradient(model, images, labels, grads, generator)
        return grads

    def defend_update(self, tensors: Grads, generator: torch.Generator) -> Grads:
        for defense in self.steps:
            tensors = defense.defend_update(tensors, generator)
        return tensors
