"""The privacy accountant of DP-SGD training: (epsilon, delta) of the Poisson-subsampled Gaussian mechanism
composed over steps, by Renyi DP (Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled
Gaussian Mechanism", section 3.3), composed by adding RDP, converted to (epsilon, delta) with Canonne,
Kamath, Steinke 2020 (Prop. 12), as TF-Privacy and Opacus do.

The rest of the engine calls `epsilon` only: the accountant can be replaced (by opacus's, say) behind it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.special import log_ndtr

__all__ = ["DEFAULT_ORDERS", "compute_rdp", "epsilon", "privacy_spent"]

# Orders of the RDP curve: fine steps near 1 (where small epsilons are found), coarser above.
DEFAULT_ORDERS: tuple[float, ...] = (
    *(1 + x / 10 for x in range(1, 100)),
    *range(11, 64),
    80.0,
    128.0,
    256.0,
    512.0,
)


def _log_add(a: float, b: float) -> float:
    hi, lo = max(a, b), min(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(exp(a) - exp(b)) for a >= b."""
    if b == -math.inf:
        return a
    return a + math.log(-math.expm1(b - a)) if a > b else -math.inf


def _log_a(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha, where the RDP of order alpha is log(A_alpha) / (alpha - 1)."""
    if float(alpha).is_integer():
        # A = sum_k C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)): every term positive.
        a = int(alpha)
        terms = [
            math.lgamma(a + 1)
            - math.lgamma(k + 1)
            - math.lgamma(a - k + 1)
            + k * math.log(q)
            + (a - k) * math.log1p(-q)
            + (k * k - k) / (2 * sigma**2)
            for k in range(a + 1)
        ]
        top = max(terms)
        return top + math.log(sum(math.exp(t - top) for t in terms))
    # Fractional alpha: two series with erfc weights split at z0; binomial coefficients change sign.
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    positive, negative = -math.inf, -math.inf
    log_coef, sign, i = 0.0, 1.0, 0  # log |C(alpha, i)| and its sign, updated by C(a,i+1) = C(a,i)(a-i)/(i+1)
    while True:
        j = alpha - i
        log_erfc0 = math.log(2) + float(log_ndtr(-(i - z0) / sigma))  # log erfc((i - z0) / (sqrt2 sigma))
        log_erfc1 = math.log(2) + float(log_ndtr(-(z0 - j) / sigma))
        s0 = (
            log_coef
            + i * math.log(q)
            + j * math.log1p(-q)
            + (i * i - i) / (2 * sigma**2)
            + math.log(0.5)
            + log_erfc0
        )
        s1 = (
            log_coef
            + j * math.log(q)
            + i * math.log1p(-q)
            + (j * j - j) / (2 * sigma**2)
            + math.log(0.5)
            + log_erfc1
        )
        if sign > 0:
            positive = _log_add(positive, _log_add(s0, s1))
        else:
            negative = _log_add(negative, _log_add(s0, s1))
        if i > alpha and max(s0, s1) < -30:
            break
        ratio = (alpha - i) / (i + 1)
        sign *= 1.0 if ratio > 0 else -1.0
        log_coef += math.log(abs(ratio))
        i += 1
    return _log_sub(positive, negative)


def compute_rdp(q: float, sigma: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
    """RDP at each order of `steps` compositions of the Gaussian mechanism with noise multiplier `sigma`
    on a Poisson sample of rate `q`."""
    out = []
    for alpha in orders:
        if q == 0 or steps == 0:
            out.append(0.0)
        elif sigma == 0 or math.isinf(alpha):
            out.append(math.inf)
        elif q == 1.0:
            out.append(steps * alpha / (2 * sigma**2))
        else:
            out.append(steps * _log_a(q, sigma, alpha) / (alpha - 1))
    return out


def privacy_spent(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(epsilon, best order) for the given RDP curve at `delta` (Canonne-Kamath-Steinke conversion)."""
    best, best_order = math.inf, math.nan
    for alpha, r in zip(orders, rdp, strict=True):
        if alpha <= 1 or math.isinf(r):
            continue
        eps = r + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best:
            best, best_order = eps, alpha
    return max(best, 0.0), best_order


def epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float) -> float:
    """epsilon at `delta` after `steps` compositions of the Gaussian mechanism with `noise_multiplier` (noise
    std / clipping norm) on a Poisson sample of rate `sample_rate`: what one example's privacy has spent."""
    return privacy_spent(DEFAULT_ORDERS, compute_rdp(sample_rate, noise_multiplier, steps), delta)[0]
