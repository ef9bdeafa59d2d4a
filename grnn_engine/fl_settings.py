"""FLSettings: the FedAvg settings of a training stage (TrialSpec.fl), checked when built.

Its own module because the training (grnn_engine.fl) and the names of cached stages
(grnn_engine.stage_cache) both depend on it; `canonical()` is what makes two settings train alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from grnn_engine.defenses import Defense, create_defense
from grnn_engine.errors import ConfigError

__all__ = ["FLSettings"]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FLSettings:
    """FedAvg settings of a training stage (TrialSpec.fl). Invalid values raise ConfigError."""

    # The defaults train GRNN's sigmoid LeNet in few, cheap rounds: 2 of 10 IID clients a round (C = 0.2, as
    # McMahan et al. sample a fraction), 2 epochs each at lr 0.3. Test accuracy at rounds 5/10/20/35/50 on
    # CIFAR-10 (seed 0): 0.30/0.34/0.44/0.48/0.49, where all 10 clients for 1 epoch at lr 0.1 (the defaults
    # before) gave 0.20 at round 5 and 0.29 at round 10 for 2.5x the compute per round.
    clients: int = 10  # K: clients the train split is dealt to
    # C: clients sampled each round; an int >= 1 is a count, a float in (0, 1] a fraction of K (1.0 = all)
    clients_per_round: int | float = 0.2
    local_epochs: int = 2  # E: passes over its shard each sampled client makes per round
    local_batch_size: int = 32
    local_lr: float = 0.3  # plain SGD, no momentum or weight decay
    iid: bool = (
        True  # False: each class is dealt by a Dirichlet(dirichlet_alpha) draw (smaller = more skewed)
    )
    dirichlet_alpha: float = 0.5
    defense: str = "none"  # applied by every client during training (a sweep's `utility: true`)
    defense_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def bad(name: str, value: object, allowed: str) -> ConfigError:
            return ConfigError(f"fl {name} must be {allowed} (got {value!r})")

        for name in ("clients", "local_epochs", "local_batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise bad(name, value, "an integer >= 1")
        c = self.clients_per_round
        if _is_int(c):
            if not 1 <= c <= self.clients:
                raise bad(
                    "clients_per_round",
                    c,
                    f"an integer in 1..{self.clients} (clients) or a fraction in (0, 1]",
                )
        elif not (_is_number(c) and 0 < c <= 1):
            raise bad(
                "clients_per_round", c, f"an integer in 1..{self.clients} (clients) or a fraction in (0, 1]"
            )
        if not _is_number(self.local_lr) or self.local_lr <= 0:
            raise bad("local_lr", self.local_lr, "a finite number > 0")
        if not isinstance(self.iid, bool):
            raise bad("iid", self.iid, "true or false")
        if not _is_number(self.dirichlet_alpha) or self.dirichlet_alpha <= 0:
            raise bad("dirichlet_alpha", self.dirichlet_alpha, "a finite number > 0")
        if not isinstance(self.defense_params, dict):
            raise bad("defense_params", self.defense_params, "a mapping of parameter names to values")
        self.make_defense()  # validates the name and parameters now, not rounds into training

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> FLSettings:
        """Settings from a TrialSpec.fl dict; an unknown key is a ConfigError naming the allowed keys."""
        values = dict(values or {})
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(f"unknown fl setting '{unknown[0]}'; allowed: {', '.join(allowed)}")
        return cls(**values)

    @property
    def sampled_clients(self) -> int:
        """C as a count of clients."""
        c = self.clients_per_round
        return int(c) if _is_int(c) else max(1, round(float(c) * self.clients))

    def make_defense(self) -> Defense:
        return create_defense(self.defense, self.defense_params)

    def canonical(self) -> dict[str, Any]:
        """The settings that change training, normalised: the same training has the same dict."""
        out = asdict(self)
        out["clients_per_round"] = self.sampled_clients
        out["local_lr"] = float(self.local_lr)
        if self.iid:
            del out["dirichlet_alpha"]  # unused when IID, so it must not split the cache
        if self.defense == "none":
            del out["defense_params"]
        return out
