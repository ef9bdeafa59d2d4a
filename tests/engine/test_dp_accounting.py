"""The RDP accountant (grnn_engine.dp_accounting) matches published values and numerical integration, and
`epsilon`, the one function the engine calls, is its (epsilon at delta) of the subsampled Gaussian."""

from __future__ import annotations

import math

import pytest

from grnn_engine.dp_accounting import DEFAULT_ORDERS, compute_rdp, epsilon, privacy_spent


def test_rdp_matches_published_values() -> None:
    # dp_accounting (google/differential-privacy) rdp_privacy_accountant_test: q=0.01, sigma=2.5, 50 steps.
    rdp = compute_rdp(0.01, 2.5, 50, [5, 50, 100])
    assert rdp == pytest.approx([2.18075656e-03, 2.38460375e-02, 1.67416308e02], rel=1e-6)
    # Fractional orders (TF-Privacy's rdp_accountant_test printed 0.00065 and 0.001085 for them).
    frac = compute_rdp(0.01, 2.5, 50, [1.5, 2.5])
    assert frac == pytest.approx([0.00065007, 0.00108542], rel=1e-4)
    # Pure-DP curve: the conversion of Canonne, Kamath and Steinke, by hand (same test file).
    eps, order = privacy_spent(range(2, 33), [1.1] * 31, 1e-5)
    assert eps == pytest.approx(1.32783806176, abs=1e-9) and order == 32
    # A Gaussian with noise multiplier 4.530877117 is exactly (1, 1e-6)-DP (same test file).
    orders = [0.001 * i for i in range(1000, 100000, 7)]
    assert privacy_spent(orders, compute_rdp(1.0, 4.530877117, 1, orders), 1e-6)[0] == pytest.approx(
        1.0, abs=1e-3
    )


def test_rdp_fractional_orders_match_numerical_integration() -> None:
    from scipy import integrate
    from scipy.stats import norm

    q, sigma = 0.02, 1.3
    for alpha in (1.5, 3.7, 12.25):

        def integrand(z: float, a: float = alpha) -> float:
            return float(
                norm.pdf(z, scale=sigma) * ((1 - q) + q * math.exp((2 * z - 1) / (2 * sigma**2))) ** a
            )

        expected = math.log(integrate.quad(integrand, -40, 40, limit=500, epsrel=1e-12)[0]) / (alpha - 1)
        assert compute_rdp(q, sigma, 1, [alpha])[0] == pytest.approx(expected, rel=1e-6)


def test_epsilon_is_the_best_order_of_the_rdp_curve() -> None:
    eps = epsilon(32 / 360, 1.0, 12, 1e-5)
    assert eps == privacy_spent(DEFAULT_ORDERS, compute_rdp(32 / 360, 1.0, 12), 1e-5)[0]
    assert 0 < eps < epsilon(32 / 360, 1.0, 24, 1e-5)  # more steps spend more
    assert epsilon(32 / 360, 2.0, 12, 1e-5) < eps  # more noise spends less
    assert epsilon(32 / 360, 0.0, 12, 1e-5) == math.inf  # no noise: no guarantee
