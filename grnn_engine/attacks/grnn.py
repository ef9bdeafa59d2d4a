"""GRNN: Generative Regression Neural Network (Ren, Deng and Xie, ACM TIST 2022; arXiv 2105.00529).

A generator maps one fixed noise vector per image to an image (and, through a second branch, to a soft
label); its weights, not the pixels, are fitted so that the victim's gradient on the generated batch
matches the shared gradient. Three presets:

- `paper` (the default, for reproduction): the authors' code (github Rand2AI/GRNN): RMSprop lr 1e-4,
  momentum 0.99, 1000 iterations, noise dimension 128, learned labels, the last iterate returned,
  loss = squared gradient difference + gradient distance + lambda_TV * TV. Two details of that code that
  we keep on purpose:
  - its "Wasserstein" term is just the L2 norm of the gradient difference (`distance: l2`); `distance:
    wasserstein` is the exact 1-D Wasserstein-2 distance between the sorted entries of each layer's
    gradient.
  - its generator `weight_init(0, 0.02)` visits only top-level containers and so changes nothing: the
    generator keeps PyTorch's default initialisation, as here.
- `strong` (for audits): settings found by measurement (benchmarks/strength_search.py; the log and the
  numbers are in the README), see `PRESETS`.
- `prior`: `strong` with a learned image prior (beside twice its TV on a LeNet-sized model): the Gaussian of
  public images of the victim's domain (attacks/image_prior.py; `prior: patch_gmm` is a Gaussian mixture over
  their small patches, attacks/patch_prior.py), fitted on the dataset split the private batch is not drawn
  from, and all 3000 evaluations spent on the generator; on a LeNet-like chain its answer is then refined from the
  shared gradient: at B=1 layer by layer (attacks/layer_refine.py), at B > 1 averaged with the images decoded from
  every image's features, which the classifier's gradient gives (attacks/feature_decode.py); neither evaluates
  the victim's gradient.

Every knob is a parameter; one given explicitly overrides the preset's value. Restarts and the choice of
iterate use only the gradient loss, which the attacker sees, never the truth.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    AttackInputs,
    BestIterate,
    Reconstruction,
    labels_from_gradient,
    log_answer,
    log_iteration,
    squared_gradient_distance,
    total_variation,
    victim_gradient,
)
from grnn_engine.attacks.feature_decode import FeatureDecoder, blend_by_features, solve_features
from grnn_engine.attacks.grnn_generator import GrnnGenerator
from grnn_engine.attacks.grnn_presets import (
    COMBINES,
    DEFAULT_PRESET,
    DISTANCES,
    FEATURE_DECODES,
    GENERATOR_NORMS,
    LABELS,
    OPTIMIZERS,
    PRESET_REVISIONS,
    PRESETS,
    PRIOR_BY_SIZE,
    PRIORS,
    SCHEDULES,
    SELECTS,
    SMALL_MODEL_PARAMS,
    TV_BY_SIZE,
)
from grnn_engine.attacks.ig import CosineDistance
from grnn_engine.attacks.image_prior import PriorSettings, PublicData, load_or_fit_prior, public_image_chunks
from grnn_engine.attacks.layer_refine import MAX_LOSS_INCREASE, chain_of, refine_image
from grnn_engine.attacks.patch_prior import load_or_fit_patch_prior
from grnn_engine.attacks.soft_pool import SoftenedVictim
from grnn_engine.errors import ConfigError
from grnn_engine.metrics import pairwise_mse


def wasserstein_layer_distance(fake: Sequence[Tensor], true_sorted: Sequence[Tensor]) -> Tensor:
    """Sum over layers of the exact 1-D Wasserstein-2 distance between the entries of the two gradients."""
    return torch.stack(
        [
            (torch.sort(f.flatten()).values - t).pow(2).mean().sqrt()
            for f, t in zip(fake, true_sorted, strict=True)
        ]
    ).sum()


def colour_total_variation(images: Tensor, chroma_weight: float) -> Tensor:
    """`total_variation` of the images in a luminance / chroma basis, chroma scaled by `chroma_weight`.

    Natural images vary far less in colour than in brightness; weighting chroma edges more removes the
    colour noise that the gradient of a LeNet does not see. Single-channel images have no chroma.
    """
    if images.shape[1] != 3:
        return total_variation(images)
    r, g, b = images.unbind(dim=1)
    basis = torch.stack([(r + g + b) / 3, chroma_weight * (r - g), chroma_weight * (b - g)], dim=1)
    return total_variation(basis)


def _align(images: Tensor, labels: Tensor, reference: Tensor, ref_labels: Tensor) -> Tensor:
    """`images` reordered to best match `reference` image by image (least squares, same labels first).

    Restarts may produce a batch's images in a different order; averaging needs them aligned. Uses only
    the attacker's own reconstructions.
    """
    if images.shape[0] == 1:
        return images
    cost = pairwise_mse(images, reference)  # (reference, images)
    cost = cost + 1e6 * (ref_labels.view(-1, 1).cpu() != labels.view(1, -1).cpu()).to(cost)
    from scipy.optimize import linear_sum_assignment  # here, as in metrics.match: its import is slow

    rows, cols = linear_sum_assignment(cost.detach().cpu().numpy())
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return images[order.to(images.device)]


def _choice(name: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"grnn {name} must be one of {', '.join(allowed)} (got {value!r})")


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"grnn {name} must be an integer >= {minimum} (got {value!r})")


def _number(name: str, value: object, *, positive: bool) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):  # type: ignore[operator]
        raise ConfigError(f"grnn {name} must be a finite number {'> 0' if positive else '>= 0'} (got {value!r})")


class _Loss:
    """The attacker's objective on a candidate gradient: (matching loss without TV, squared distance).

    matching = squared + distance term + cosine_weight * layer cosine; the squared distance alone is the
    `grad_loss` the history logs and the restarts compare.
    """

    def __init__(self, target: Sequence[Tensor], distance: str, cosine_weight: float) -> None:
        self.target = list(target)
        self.distance = distance
        self.target_sorted = [torch.sort(t.flatten()).values for t in self.target] if distance == "wasserstein" else []
        self.cosine = CosineDistance(self.target, "layer_cosine") if cosine_weight > 0 else None
        self.cosine_weight = cosine_weight

    def __call__(self, fake: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        squared = squared_gradient_distance(fake, self.target)
        if self.distance == "l2":
            distance = squared.clamp(min=1e-30).sqrt()
        else:
            distance = wasserstein_layer_distance(fake, self.target_sorted)
        matching = squared + distance
        if self.cosine is not None:
            matching = matching + self.cosine_weight * self.cosine(fake)
        return matching, squared


@dataclass
class _Fit:
    """What every phase of one GRNN run shares: its inputs, victim, objective, TV weight, labels, history."""

    inputs: AttackInputs
    victim: SoftenedVictim
    objective: _Loss
    tv_weight: float
    fixed_labels: Tensor | None
    prior_penalty: Callable[[Tensor], Tensor] | None = None
    prior_weight: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


@ATTACKS.register("grnn")
class GRNN(Attack):
    """GRNN; `preset` ("paper", "strong" or "prior") sets the defaults of every other knob.

    Parameters (None = the preset's value):
    - iterations: optimisation steps per restart; `self.iterations` is the total, iterations * restarts
      + refine_iterations (the victim gradient evaluations, the attack's compute).
    - restarts: independent runs (new generator, new noise); combine: "best" keeps the restart with the
      lowest gradient loss, "mean" averages all (aligned image by image to that one).
    - optimizer ("rmsprop", "adam"), lr, momentum (RMSprop only), schedule ("constant"; "cosine" anneals
      to lr/100; "step" cuts x0.1 at 3/8, 5/8, 7/8 of the iterations).
    - noise_dim, width (generator base channels), generator_norm ("batch" as the authors, or "none").
    - distance ("l2" as the authors' code, or "wasserstein"); cosine_weight (weight of a per-layer cosine
      distance added to the loss, as Inverting Gradients'); tv_weight (None = the preset's choice by model
      size: paper 1e-3 for LeNet-sized models and 1e-6 for ResNets, as the authors; strong 0.3 and 1e-6);
      chroma_weight (None = TV on RGB as the authors; a number = TV on luminance and chroma, chroma scaled).
    - labels: "learned" (the generator's label branch, as the paper) or "inferred" (iDLG-style, from the
      classifier's gradient, then fixed).
    - select: "last" (the last iterate, as the authors' code) or "best" (the iterate of lowest gradient loss).
    - refine_iterations, refine_lr, refine_tv_weight (None = tv_weight): after the generator, momentum
      SGD on the pixels themselves (boxed to [0, 1]) from the restarts' answer; 0 = none.
    - soft_pool (0 = off), soft_pool_end, soft_pool_fraction: the first fraction of every restart and of
      the refinement fit a copy of the victim whose max-pools are softened (attacks/soft_pool.py), with a
      temperature decaying from soft_pool to soft_pool_end; the rest fits the exact victim, and only its
      iterates may be selected.
    - prior ("none"; "gaussian": the Gaussian of attacks/image_prior.py; "patch_gmm": the patch mixture of
      attacks/patch_prior.py; each fitted on the public split that `bind_public_data` names, cached),
      prior_weight (None = the preset's by model size; the weight of its negative log-likelihood in the
      generator's loss), refine_prior_weight (None = prior_weight), prior_floor (gaussian: variance added to
      every eigenvalue), prior_images (0 = the whole public split, else that many drawn with prior_seed).
    - layer_refine (0 = off), layer_refine_lr: at B = 1 on a sigmoid CNN of the form attacks/layer_refine.py
      names (LeNets), the answer is refined layer by layer from the shared gradient in that many steps of
      Adam at that learning rate on the pixels (no victim gradient evaluations; two more check its result);
      other models, batches, gradients that a defense visibly altered and refined images that fit the gradient
      far worse than the answer keep the answer as it is.
    - feature_decode ("none", or "blend"): at B > 1 on such a chain, each image of the answer is averaged with its
      decoding from its features (solved from the classifier's gradient, decoded as the public split's images are
      from theirs; attacks/feature_decode.py), with the weight whose average best reproduces those features (no
      victim gradient evaluations; one more gives the result's gradient loss). Other models, B = 1 and gradients
      that do not give the features (a defense altered them) keep the answer as it is. Needs public data, as a
      prior does.
    """

    name = "grnn"

    def __init__(
        self,
        *,
        preset: str = DEFAULT_PRESET,
        iterations: int | None = None,
        restarts: int | None = None,
        optimizer: str | None = None,
        lr: float | None = None,
        momentum: float | None = None,
        schedule: str | None = None,
        noise_dim: int | None = None,
        distance: str | None = None,
        cosine_weight: float | None = None,
        tv_weight: float | None = None,
        width: int | None = None,
        labels: str | None = None,
        select: str | None = None,
        generator_norm: str | None = None,
        chroma_weight: float | None = None,
        combine: str | None = None,
        refine_iterations: int | None = None,
        refine_lr: float | None = None,
        refine_tv_weight: float | None = None,
        soft_pool: float | None = None,
        soft_pool_end: float | None = None,
        soft_pool_fraction: float | None = None,
        prior: str | None = None,
        prior_weight: float | None = None,
        refine_prior_weight: float | None = None,
        prior_floor: float | None = None,
        prior_images: int | None = None,
        prior_seed: int | None = None,
        layer_refine: int | None = None,
        layer_refine_lr: float | None = None,
        feature_decode: str | None = None,
    ) -> None:
        _choice("preset", preset, tuple(PRESETS))
        given = {
            "iterations": iterations, "restarts": restarts, "optimizer": optimizer, "lr": lr,
            "momentum": momentum, "schedule": schedule, "noise_dim": noise_dim, "distance": distance,
            "cosine_weight": cosine_weight, "tv_weight": tv_weight, "width": width, "labels": labels,
            "select": select, "generator_norm": generator_norm, "chroma_weight": chroma_weight,
            "combine": combine, "refine_iterations": refine_iterations, "refine_lr": refine_lr,
            "refine_tv_weight": refine_tv_weight, "soft_pool": soft_pool, "soft_pool_end": soft_pool_end,
            "soft_pool_fraction": soft_pool_fraction, "prior": prior, "prior_weight": prior_weight,
            "refine_prior_weight": refine_prior_weight, "prior_floor": prior_floor, "prior_images": prior_images,
            "prior_seed": prior_seed, "layer_refine": layer_refine, "layer_refine_lr": layer_refine_lr,
            "feature_decode": feature_decode,
        }
        knobs: dict[str, Any] = {k: (v if v is not None else PRESETS[preset][k]) for k, v in given.items()}
        _positive_int("iterations", knobs["iterations"])
        _positive_int("restarts", knobs["restarts"])
        _positive_int("noise_dim", knobs["noise_dim"])
        _positive_int("width", knobs["width"])
        _positive_int("refine_iterations", knobs["refine_iterations"], minimum=0)
        _positive_int("layer_refine", knobs["layer_refine"], minimum=0)
        _choice("optimizer", knobs["optimizer"], OPTIMIZERS)
        _choice("schedule", knobs["schedule"], SCHEDULES)
        _choice("distance", knobs["distance"], DISTANCES)
        _choice("labels", knobs["labels"], LABELS)
        _choice("select", knobs["select"], SELECTS)
        _choice("generator_norm", knobs["generator_norm"], GENERATOR_NORMS)
        _choice("combine", knobs["combine"], COMBINES)
        _choice("prior", knobs["prior"], PRIORS)
        _choice("feature_decode", knobs["feature_decode"], FEATURE_DECODES)
        _number("prior_floor", knobs["prior_floor"], positive=True)
        _positive_int("prior_images", knobs["prior_images"], minimum=0)
        _positive_int("prior_seed", knobs["prior_seed"], minimum=0)
        _number("lr", knobs["lr"], positive=True)
        _number("refine_lr", knobs["refine_lr"], positive=True)
        _number("layer_refine_lr", knobs["layer_refine_lr"], positive=True)
        _number("cosine_weight", knobs["cosine_weight"], positive=False)
        _number("soft_pool", knobs["soft_pool"], positive=False)
        _number("soft_pool_end", knobs["soft_pool_end"], positive=True)
        f = knobs["soft_pool_fraction"]
        if not (isinstance(f, int | float) and not isinstance(f, bool) and 0 < f < 1):
            raise ConfigError(f"grnn soft_pool_fraction must be a number in (0, 1) (got {f!r})")
        for optional in ("tv_weight", "chroma_weight", "refine_tv_weight", "prior_weight", "refine_prior_weight"):
            if knobs[optional] is not None:
                _number(optional, knobs[optional], positive=False)
        m = knobs["momentum"]
        if not (isinstance(m, int | float) and not isinstance(m, bool) and 0 <= m < 1):
            raise ConfigError(f"grnn momentum must be a number in [0, 1) (got {m!r})")

        self.preset: str = preset
        self.steps_per_restart: int = knobs["iterations"]
        self.restarts: int = knobs["restarts"]
        self.optimizer: str = knobs["optimizer"]
        self.lr: float = knobs["lr"]
        self.momentum: float = knobs["momentum"]
        self.schedule: str = knobs["schedule"]
        self.noise_dim: int = knobs["noise_dim"]
        self.distance: str = knobs["distance"]
        self.cosine_weight: float = knobs["cosine_weight"]
        self.tv_weight: float | None = knobs["tv_weight"]
        self.width: int = knobs["width"]
        self.labels: str = knobs["labels"]
        self.select: str = knobs["select"]
        self.generator_norm: str = knobs["generator_norm"]
        self.chroma_weight: float | None = knobs["chroma_weight"]
        self.combine: str = knobs["combine"]
        self.refine_iterations: int = knobs["refine_iterations"]
        self.refine_lr: float = knobs["refine_lr"]
        self.refine_tv_weight: float | None = knobs["refine_tv_weight"]
        self.soft_pool: float = knobs["soft_pool"]
        self.soft_pool_end: float = knobs["soft_pool_end"]
        self.soft_pool_fraction: float = knobs["soft_pool_fraction"]
        self.prior: str = knobs["prior"]
        self.prior_weight: float | None = knobs["prior_weight"]
        self.refine_prior_weight: float | None = knobs["refine_prior_weight"]
        self.prior_floor: float = knobs["prior_floor"]
        if self.prior != "none" and self.prior_weight == 0 and not self.refine_prior_weight:
            raise ConfigError(f"grnn prior '{self.prior}' needs prior_weight > 0 or refine_prior_weight > 0")
        self.prior_images: int = knobs["prior_images"]
        self.prior_seed: int = knobs["prior_seed"]
        self.prior_settings = PriorSettings(images=self.prior_images, seed=self.prior_seed)
        self.layer_refine: int = knobs["layer_refine"]
        self.layer_refine_lr: float = knobs["layer_refine_lr"]
        self.feature_decode: str = knobs["feature_decode"]
        self.public_data: PublicData | None = None
        self.iterations = self.steps_per_restart * self.restarts + self.refine_iterations

    def bind_public_data(self, public: PublicData | None) -> None:
        self.public_data = public

    @classmethod
    def revision(cls, params: Mapping[str, Any]) -> int:
        preset = params.get("preset", DEFAULT_PRESET)
        return PRESET_REVISIONS.get(preset, 0) if isinstance(preset, str) else 0

    def _tv_weight(self, params: Sequence[Tensor]) -> float:
        if self.tv_weight is not None:
            return self.tv_weight
        small, large = TV_BY_SIZE[self.preset]
        return small if sum(p.numel() for p in params) <= SMALL_MODEL_PARAMS else large

    def _prior_weight(self, params: Sequence[Tensor]) -> float:
        if self.prior_weight is not None:
            return self.prior_weight
        small, large = PRIOR_BY_SIZE[self.preset]
        return small if sum(p.numel() for p in params) <= SMALL_MODEL_PARAMS else large

    def _tv(self, images: Tensor) -> Tensor:
        if self.chroma_weight is None:
            return total_variation(images)
        return colour_total_variation(images, self.chroma_weight)

    def _prior_penalty(self, inputs: AttackInputs) -> Callable[[Tensor], Tensor] | None:
        """The learned prior's penalty (the prior fitted on the public split, or from the cache, on the victim's
        device and dtype)."""
        if self.prior == "none":
            return None
        public = self._public(inputs, f"prior '{self.prior}'")
        param = inputs.params[0]
        if self.prior == "patch_gmm":
            return load_or_fit_patch_prior(public, self.prior_settings).to(param.device, param.dtype).penalty
        gaussian = load_or_fit_prior(public, self.prior_settings).to(param.device, param.dtype)
        return functools.partial(gaussian.penalty, floor=self.prior_floor)

    def _public(self, inputs: AttackInputs, what: str) -> PublicData:
        """The bound public data, checked against the attacked images; `what` names the knob that needs it."""
        if self.public_data is None:
            raise ConfigError(f"grnn {what} needs public images of the victim's domain from a split disjoint from "
                              "the attacked batch's: attack a batch from split train or test (split 'all' leaves "
                              "none), through run_trial or after bind_public_data")
        if self.public_data.image_size != inputs.image_shape[1]:
            raise ConfigError(f"grnn {what}: public images of size {self.public_data.image_size} do not match the "
                              f"attacked images of size {inputs.image_shape[1]}")
        return self.public_data

    def _prior_term(self, fit: _Fit, images: Tensor, weight: float) -> Tensor | float:
        if fit.prior_penalty is None or weight == 0:
            return 0.0
        return weight * fit.prior_penalty(images)

    def _optimizer(self, weights: Sequence[Tensor], lr: float) -> tuple[torch.optim.Optimizer, Any]:
        steps = self.steps_per_restart
        optimizer: torch.optim.Optimizer
        if self.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(weights, lr=lr, momentum=self.momentum)
        else:
            optimizer = torch.optim.Adam(weights, lr=lr)
        scheduler: Any = None
        if self.schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=lr / 100)
        elif self.schedule == "step":
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=[steps * 3 // 8, steps * 5 // 8, steps * 7 // 8], gamma=0.1
            )
        return optimizer, scheduler

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        if self.feature_decode != "none" and inputs.batch_size > 1:
            self._public(inputs, "feature_decode")  # before the fit, not after it
        fixed_labels = None
        if self.labels == "inferred":
            fixed_labels = labels_from_gradient(
                model, inputs.target, batch_size=inputs.batch_size, image_shape=inputs.image_shape,
                generator=inputs.generator,
            ).long()
        victim = SoftenedVictim(model, inputs.params, start=self.soft_pool, end=self.soft_pool_end,
                                fraction=self.soft_pool_fraction)
        fit = _Fit(inputs, victim, _Loss(inputs.target, self.distance, self.cosine_weight),
                   self._tv_weight(inputs.params), fixed_labels, self._prior_penalty(inputs),
                   self._prior_weight(inputs.params))
        runs = [self._one_restart(fit, restart) for restart in range(self.restarts)]
        # NaN never compares lower, so a diverged restart only wins when every restart diverged.
        best = min(range(len(runs)), key=lambda r: runs[r][2] if math.isfinite(runs[r][2]) else math.inf)
        images, labels, loss = runs[best]
        if self.combine == "mean" and len(runs) > 1:
            finite = [r for r in runs if math.isfinite(r[2])]
            images = torch.stack([_align(im, lab, images, labels) for im, lab, _ in finite]).mean(dim=0)
            loss = float(self._gradient_loss(model, fit, images, labels))
        if self.refine_iterations:
            images, loss = self._refine(fit, images, labels, loss)
        if self.select == "best" or len(runs) > 1 or self.refine_iterations:
            log_answer(fit.history, iterations=self.iterations, grad_loss=loss, images=images,
                       evaluate=inputs.evaluate, progress=inputs.progress)
        if self.layer_refine and inputs.batch_size == 1:
            images = self._layer_refine(model, fit, images, labels)
        elif self.feature_decode != "none" and inputs.batch_size > 1:
            images = self._feature_decode(model, fit, images, labels)
        return Reconstruction(images=images.clamp(0, 1), labels=labels, history=fit.history)

    def _layer_refine(self, model: nn.Module, fit: _Fit, images: Tensor, labels: Tensor) -> Tensor:
        """`refine_image` of attacks/layer_refine.py on a model it applies to, kept unless its gradient fits more
        than MAX_LOSS_INCREASE times worse than the answer's; the images unchanged otherwise. A refined image ends
        the history, at the last iteration with `layer_refine` 1, so that a trial's convergence curve ends where its
        score does (the check costs two victim gradients)."""
        chain = chain_of(model, fit.inputs.image_shape)
        if chain is None:
            return images
        penalty = fit.prior_penalty
        # The prior was moved to the victim's dtype; the refinement works in float64.
        prior = None if penalty is None else (lambda im: penalty(im.to(images.dtype)))
        refined = refine_image(chain.stages, chain.first_linear, fit.inputs.params, fit.inputs.target, images,
                               steps=self.layer_refine, lr=self.layer_refine_lr, prior_penalty=prior)
        if refined is None:
            return images
        refined_loss = self._gradient_loss(model, fit, refined.to(images.dtype), labels)
        if not float(refined_loss) <= MAX_LOSS_INCREASE * float(self._gradient_loss(model, fit, images, labels)):
            return images
        self._log(fit, self.iterations, refined_loss, refined, None, {"layer_refine": 1.0})
        return refined

    def _feature_decode(self, model: nn.Module, fit: _Fit, images: Tensor, labels: Tensor) -> Tensor:
        """Each image of the answer averaged with its decoding from its features (attacks/feature_decode.py), on a
        model that module applies to and whose shared gradient gives the features; the images unchanged otherwise.
        The average ends the history, at the last iteration with `feature_decode` 1 (its gradient loss costs one
        victim gradient)."""
        chain = chain_of(model, fit.inputs.image_shape)
        if chain is None:
            return images
        with torch.no_grad():
            start = chain.features(images)
        features = solve_features(chain, fit.inputs.params, fit.inputs.target, start, labels)
        if features is None:
            return images
        assert self.public_data is not None  # checked before the fit
        _, public_images = public_image_chunks(self.public_data, self.prior_settings)
        decoded = FeatureDecoder(chain, public_images, images.device)(features, fit.inputs.image_shape)
        blended = blend_by_features(chain, images, decoded.to(images.dtype), features).detach()
        self._log(fit, self.iterations, self._gradient_loss(model, fit, blended, labels), blended, None,
                  {"feature_decode": 1.0})
        return blended

    @staticmethod
    def _gradient_loss(model: nn.Module, fit: _Fit, images: Tensor, labels: Tensor) -> Tensor:
        """The squared distance of (images, labels)'s gradient on the exact victim to the shared one (one
        victim gradient)."""
        fake = victim_gradient(model, fit.inputs.params, images, labels, create_graph=False)
        return squared_gradient_distance(fake, fit.inputs.target)

    def _log(self, fit: _Fit, iteration: int, squared: Tensor, images: Tensor, temperature: float | None,
             extra: dict[str, float]) -> bool:
        """Log one iteration (`log_iteration`); False when its gradient loss is not finite."""
        if temperature is not None:
            extra = {**extra, "pool_temperature": temperature}  # grad_loss is then the softened victim's
        value = log_iteration(fit.history, iteration=iteration, iterations=self.iterations, grad_loss=squared,
                              images=images, evaluate=fit.inputs.evaluate, progress=fit.inputs.progress,
                              extra=extra)
        return math.isfinite(value)

    def _one_restart(self, fit: _Fit, restart: int) -> tuple[Tensor, Tensor, float]:
        """One generator fitted from a fresh start: (its images, hard labels, their gradient loss)."""
        inputs, fixed_labels = fit.inputs, fit.fixed_labels
        batch_size, num_classes, image_shape = inputs.batch_size, inputs.num_classes, inputs.image_shape
        device = inputs.params[0].device
        init_seed = int(torch.randint(0, 2**62, (1,), generator=inputs.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            net = GrnnGenerator(
                noise_dim=self.noise_dim, num_classes=num_classes, image_shape=image_shape, width=self.width,
                norm=self.generator_norm,
            )
        net = net.to(device)
        net.train()
        z = torch.randn((batch_size, self.noise_dim), generator=inputs.generator).to(device)
        # With fixed labels the label branch gets no gradient; leaving it out keeps the optimiser exact.
        weights = [p for n, p in net.named_parameters() if fixed_labels is None or not n.startswith("label_branch")]
        optimizer, scheduler = self._optimizer(weights, self.lr)

        steps = self.steps_per_restart
        offset = restart * steps
        keep = BestIterate(torch.zeros((batch_size, *image_shape), device=device),
                           torch.zeros((batch_size, num_classes), device=device)) if self.select == "best" else None
        images = soft_labels = torch.empty(0)
        squared = torch.full((), math.nan)
        for it in range(1, steps + 1):
            model, params, temperature = fit.victim.at(it, steps)
            images, soft_labels = net(z)
            targets = fixed_labels if fixed_labels is not None else soft_labels
            fake = victim_gradient(model, params, images, targets, create_graph=True)
            matching, squared = fit.objective(fake)
            loss = matching + fit.tv_weight * self._tv(images) + self._prior_term(fit, images, fit.prior_weight)
            if keep is not None and temperature is None:
                keep.offer(squared, images, soft_labels)
            for w, g in zip(weights, torch.autograd.grad(loss, weights), strict=True):
                w.grad = g
            optimizer.step()
            if scheduler is not None:
                scheduler.step()

            if it % inputs.eval_every == 0 or it == steps:
                extra: dict[str, float] = {}
                if self.restarts > 1:
                    extra["restart"] = restart
                    best = float(keep.loss) if keep is not None else float(squared.detach())
                    # No restart's best yet while it fits the softened victim: its losses do not compare.
                    if temperature is None or math.isfinite(best):
                        extra["best_grad_loss"] = best
                if not self._log(fit, offset + it, squared, images, temperature, extra):
                    break

        if keep is not None and math.isfinite(float(keep.loss)):
            images, soft_labels = keep.values
            final_loss = float(keep.loss)
        else:
            # The images that produced the last loss are the answer, as in the authors' code.
            final_loss = float(squared.detach())
        labels = fixed_labels if fixed_labels is not None else soft_labels.detach().argmax(dim=1)
        return images.detach(), labels, final_loss

    def _refine(self, fit: _Fit, start: Tensor, labels: Tensor, start_loss: float) -> tuple[Tensor, float]:
        """Fit the pixels directly from the generator's answer (whose gradient loss is `start_loss`); returns the
        iterate of lowest gradient loss and that loss."""
        x = start.detach().clone().clamp(0, 1).requires_grad_(True)
        steps = self.refine_iterations
        # Plain momentum SGD, not Adam: Adam's per-pixel normalisation inflates the steps of pixels the
        # gradient barely constrains, which measured as noise (-1 to -2 dB) here.
        optimizer = torch.optim.SGD([x], lr=self.refine_lr, momentum=0.9)
        refine_tv = self.refine_tv_weight if self.refine_tv_weight is not None else fit.tv_weight
        refine_prior = self.refine_prior_weight if self.refine_prior_weight is not None else fit.prior_weight
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=self.refine_lr / 100)
        keep = BestIterate(x)
        offset = self.steps_per_restart * self.restarts
        for it in range(1, steps + 1):
            model, params, temperature = fit.victim.at(it, steps)
            fake = victim_gradient(model, params, x, labels, create_graph=True)
            matching, squared = fit.objective(fake)
            loss = matching + refine_tv * self._tv(x) + self._prior_term(fit, x, refine_prior)
            (x.grad,) = torch.autograd.grad(loss, [x])
            if temperature is None:
                keep.offer(squared, x)
            log_now = it % fit.inputs.eval_every == 0 or it == steps
            before = x.detach().clone() if log_now else x
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.clamp_(0, 1)
            if log_now and not self._log(fit, offset + it, squared, before, temperature, {}):
                break
        best_loss = float(keep.loss)
        return (keep.values[0], best_loss) if math.isfinite(best_loss) else (start, start_loss)
