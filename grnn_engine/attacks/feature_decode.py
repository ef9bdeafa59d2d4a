"""Feature decoding of a batch's reconstruction: every image's features, solved from the shared gradient of the
classifier head, decoded into an image by a map fitted on public images, and averaged with the answer.

At B > 1 the layer refinement (attacks/layer_refine.py) stops at its first step: the first Linear layer's weight
gradient is a sum of B outer products, sum_i g_i u_i^T, not one. It still pins every image's features u_i (the
first Linear layer's input) down: they lie in the span of its B leading right singular vectors, and the head's
gradient equations (every Linear layer's weight and bias gradient, the labels given) fix their B x B coefficients,
which `solve_features` finds by L-BFGS from the answer's features (float64). On CIFAR-10 LeNet at B=8 that gives
the true features on 14 of 16 batches and comes within 0.9% on the other two, where the answer's are about 4% off
(docs/prior_experiments.md, "Feature decoding at B > 1").

The features do not give the image (400 values for 3,072 at 32x32 on a LeNet), but their least-squares decoding,
fitted on public images sent through the victim's convolution stages (`FeatureDecoder`), is about as close to the
private images as GRNN's answer is (20.2 against 19.5 dB on those batches) and wrong in other places: the answer
fits the gradient but blends images that share a label; the decoding knows nothing of the convolutions' gradient
but decodes each image from its own features. So an average of the two can beat both; `blend_by_features` picks
each image's weight by how well the average reproduces its features.

Nothing here evaluates the victim's gradient: the solve runs the classifier head on B feature vectors, and the
decoder passes the public split through the convolution stages once (20,000 CIFAR-10 images: about 10 s to decode
the files, 3 s forward and fit on one CPU thread).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from grnn_engine.attacks.base import shared_layer_gradient, soft_cross_entropy
from grnn_engine.attacks.layer_refine import Chain

# The features are solved only when the first Linear layer's weight gradient is a sum of B outer products: the
# energy of its singular values past the B-th at most this share of the whole, the layer refinement's bound at B = 1
# (RANK_ONE_TOLERANCE). A coarse guard against a gradient a defense rewrote (CIFAR-10 LeNet at B=8: 5e-6 to 1e-5
# under Gaussian noise 1e-5, about 1e-3 under 1e-4); the solve's check below is the fine one.
RANK_TOLERANCE = 5e-3
# ... and the solved features are used only when the head's gradient on them matches the shared one to this sum of
# relative squared errors over its layers. Undefended (CIFAR-10 LeNet, B=8): 2e-13 to 4e-13 where the features come
# back exactly, 1.9e-9 and 7.2e-9 where they are 0.5% and 0.9% off (batches 8 and 10). Under Gaussian noise on the
# gradient (batches 0-3, the average with weight 0.7 forced): sigma 1e-5 9e-6 to 1.9e-5, features 0.6-1.5% off, the
# average +0.46 to +0.97 dB over the answer; sigma 3e-5 7.8e-5 to 1.7e-4, -2.3 to +0.3 dB; sigma 1e-4 about 1e-3,
# -1.0 to -6.1 dB. (The rank check above passes all three: 5e-6 to 1e-3.)
SOLVE_TOLERANCE = 4e-5
SOLVE_STEPS = 3000
# The decoder's ridge, relative to each term's variance: only keeps the normal equations well posed (decoding linear
# in the features, 5e-6 to 5e-3 gave the same images to 0.03 dB).
RIDGE = 1e-4


def solve_features(chain: Chain, params: Sequence[Tensor], target: Sequence[Tensor], start: Tensor,
                   labels: Tensor) -> Tensor | None:
    """Every image's features (B, D) that make the head's gradient the shared one, from `start` (B, D: the answer's
    features) and the labels (B,); None when the head's shared gradient lacks a layer, has more than B directions
    (RANK_TOLERANCE: a defense altered it, or B is not below the first layer's width), or the solve does not meet
    it (SOLVE_TOLERANCE)."""
    linears = [layer for layer in chain.head if isinstance(layer, nn.Linear)]
    shared = [shared_layer_gradient(layer, params, target) for layer in linears]
    if any(g is None for g in shared):
        return None
    targets = [t.detach().double() for pair in shared if pair is not None for t in pair]
    batch = start.shape[0]
    _, singular, right = torch.linalg.svd(targets[0], full_matrices=False)
    total = float(singular.pow(2).sum())
    if batch >= len(singular) or not (math.isfinite(total) and total > 0):
        return None
    if not float(singular[batch:].pow(2).sum()) / total <= RANK_TOLERANCE:
        return None
    basis = right[:batch]  # (B, D): the span of the B images' features
    head = chain.float64().head
    head_params = [p.requires_grad_(True) for layer in head for p in layer.parameters()]
    scales = [t.pow(2).sum().clamp_min(1e-30) for t in targets]

    def mismatch(features: Tensor) -> Tensor:
        logits = features
        for layer in head:
            logits = layer(logits)
        grads = torch.autograd.grad(soft_cross_entropy(logits, labels), head_params, create_graph=True)
        return sum(((g - t).pow(2).sum() / s for g, t, s in zip(grads, targets, scales, strict=True)),
                   torch.zeros((), dtype=torch.float64, device=start.device))

    coefficients = (start.detach().double() @ basis.T).requires_grad_(True)
    optimizer = torch.optim.LBFGS([coefficients], lr=1, max_iter=SOLVE_STEPS, tolerance_grad=1e-15,
                                  tolerance_change=1e-18, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = mismatch(coefficients @ basis)
        loss.backward()
        return loss

    optimizer.step(closure)
    features = (coefficients @ basis).detach()
    return features if float(mismatch(features).detach()) <= SOLVE_TOLERANCE else None


class FeatureDecoder:
    """The least-squares estimate of an image from its features u and their squares: mean_x + (v - mean_v) @
    coefficients with v = (u, u^2), fitted on public images (float64 sums accumulated chunk by chunk, so the public
    split is never held whole). The squares add 0.2-0.5 dB to the decoding over u alone (CIFAR-10 LeNet, B=8) for
    twice the terms; cubes add nothing more that holds (docs/prior_experiments.md)."""

    def __init__(self, chain: Chain, public_images: Iterable[Tensor], device: torch.device) -> None:
        chain = chain.float64()
        count, sums = 0, None
        with torch.no_grad():
            for chunk in public_images:
                x = chunk.to(device=device, dtype=torch.float64)
                u = _terms(chain.features(x))
                x = x.flatten(1)
                terms = [u.sum(0), x.sum(0), u.T @ u, u.T @ x]
                sums = terms if sums is None else [a + b for a, b in zip(sums, terms, strict=True)]
                count += len(x)
        assert sums is not None, "public_image_chunks gives at least two images"
        sum_u, sum_x, sum_uu, sum_ux = sums
        self.mean_u: Tensor = sum_u / count
        self.mean_x: Tensor = sum_x / count
        cov_uu = sum_uu / count - torch.outer(self.mean_u, self.mean_u)
        cov_ux = sum_ux / count - torch.outer(self.mean_u, self.mean_x)
        ridge = RIDGE * torch.diag(cov_uu.diagonal().clamp_min(1e-12))
        self.coefficients: Tensor = torch.linalg.solve(cov_uu + ridge, cov_ux)

    def __call__(self, features: Tensor, image_shape: Sequence[int]) -> Tensor:
        """Images (B, *image_shape) in [0, 1] for features (B, D)."""
        decoded = self.mean_x + (_terms(features.double()) - self.mean_u) @ self.coefficients
        return decoded.clamp(0, 1).reshape(len(features), *image_shape)


def _terms(features: Tensor) -> Tensor:
    """What the decoder is linear in: the features and their squares (N, 2D)."""
    return torch.cat([features, features.pow(2)], dim=1)


# The weights on the decoding that `blend_by_features` tries for each image.
BLEND_WEIGHTS = tuple(step / 10 for step in range(11))


def blend_by_features(chain: Chain, answer: Tensor, decoded: Tensor, features: Tensor) -> Tensor:
    """Each image (1 - w) x its answer + w x its decoding, w of BLEND_WEIGHTS the one whose image's features come
    closest (relative distance) to the solved `features`: only what the gradient gives chooses. Where the answer is
    good its features are closer than any average's (CIFAR-10 at B=4: the answer for 26 of 32 images); where it
    failed or blends two images, the decoding's weight rises (docs/prior_experiments.md)."""
    with torch.no_grad():
        chain = chain.float64()
        target = features.double()
        candidates = [(1 - w) * answer + w * decoded for w in BLEND_WEIGHTS]
        errors = torch.stack([(chain.features(c.double()) - target).norm(dim=1) / target.norm(dim=1).clamp_min(1e-30)
                              for c in candidates])  # (weights, B)
        best = errors.argmin(dim=0)
        return torch.stack([candidates[int(w)][i] for i, w in enumerate(best)])
