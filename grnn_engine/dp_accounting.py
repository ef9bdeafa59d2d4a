"""The privacy accountant of DP-SGD training: (epsilon, delta) of the Poisson-subsampled Gaussian mechanism
composed over steps, computed by Opacus's accountants (`opacus.accountants`), the library made for it:
Renyi DP (`rdp`: Mironov, Talwar, Zhang 2019, converted with Canonne, Kamath, Steinke 2020), the default and
what FL stages report, or the tighter numerical Privacy Random Variable accountant (`prv`: Gopi, Lee,
Wutschitz 2021).

The rest of the engine calls `epsilon` only.
"""

from __future__ import annotations

import math

from grnn_engine.errors import ConfigError

__all__ = ["ACCOUNTANTS", "epsilon"]

ACCOUNTANTS = ("rdp", "prv")


def epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon at `delta` after `steps` steps of the Gaussian mechanism with `noise_multiplier` on Poisson
    samples of rate `sample_rate` (inf without noise, 0 without steps)."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"unknown privacy accountant '{accountant}'; allowed: {', '.join(ACCOUNTANTS)}")
    if steps == 0 or sample_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import PRVAccountant, RDPAccountant  # imported here: only DP-SGD stages need it

    history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = history
        return float(rdp.get_epsilon(delta))
    prv = PRVAccountant()
    prv.history = history
    return float(prv.get_epsilon(delta))
