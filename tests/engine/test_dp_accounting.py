"""The privacy accountant (grnn_engine.dp_accounting) is Opacus's: `epsilon`, the one function the engine
calls, equals what opacus.accountants report for the same noise multiplier, sample rate and steps."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from grnn_engine import ConfigError
from grnn_engine.dp_accounting import epsilon


@pytest.mark.parametrize(("q", "sigma", "steps"), [(32 / 360, 1.0, 12), (0.01, 2.5, 50), (0.5, 4.5, 3)])
def test_epsilon_equals_opacus(q: float, sigma: float, steps: int) -> None:
    rdp = RDPAccountant()
    rdp.history = [(sigma, q, steps)]
    assert epsilon(q, sigma, steps, 1e-5) == rdp.get_epsilon(1e-5)
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    assert epsilon(q, sigma, steps, 1e-5, accountant="prv") == pytest.approx(prv.get_epsilon(1e-5), rel=1e-9)


def test_epsilon_moves_the_right_way() -> None:
    eps = epsilon(32 / 360, 1.0, 12, 1e-5)
    assert 0 < eps < epsilon(32 / 360, 1.0, 24, 1e-5)  # more steps spend more
    assert epsilon(32 / 360, 2.0, 12, 1e-5) < eps  # more noise spends less
    assert epsilon(32 / 360, 1.0, 12, 1e-5, accountant="prv") <= eps  # PRV is the tighter bound
    assert epsilon(32 / 360, 0.0, 12, 1e-5) == math.inf  # no noise: no guarantee
    assert epsilon(32 / 360, 1.0, 0, 1e-5) == 0.0
    with pytest.raises(ConfigError, match="unknown privacy accountant 'gdp'; allowed: rdp, prv"):
        epsilon(0.1, 1.0, 1, 1e-5, accountant="gdp")
