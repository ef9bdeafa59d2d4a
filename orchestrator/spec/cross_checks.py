"""Checks that span sections of a spec, which pydantic's per-section validation cannot make: utility against
the grid's rounds, pack against the scheduler and the search, each attack against each victim of the grid
(`check_attack_victims` by name, `build_attack_victims` on the built models), and each searched parameter
against the grid (`check_search`, names and conflicts) and against the plugins it applies to (`build_search`,
both ends of its range built, as load_spec does for the grid's own params).
"""

from __future__ import annotations

import itertools

from grnn_engine.errors import ConfigError
from grnn_engine.registry import did_you_mean, is_import_path
from grnn_engine.trial_spec import TrialSpec
from orchestrator.spec.messages import SpecError, show, spec_error
from orchestrator.spec.models import FLSpec
from orchestrator.spec.plugins import plugin_builders
from orchestrator.spec.registries import VICTIM_SET_BY_SWEEP, plugin_registries
from orchestrator.spec.search import SEARCH_TARGETS, OptunaSearch, search_applies, split_target
from orchestrator.spec.sweep_spec import SweepSpec

__all__ = ["build_attack_victims", "build_search", "check_attack_victims", "check_pack", "check_search",
           "check_utility"]


def check_utility(spec: SweepSpec, source: str) -> None:
    """utility needs a trained round to measure; utility_round means nothing without utility."""
    if spec.utility and spec.utility_at == 0:
        raise spec_error(
            source, "utility", "utility needs a trained model, but every fl_round is 0", spec.utility,
            "utility_round >= 1, or an fl_round > 0 in the grid",
        )  # fmt: skip
    if spec.utility_round is not None and not spec.utility:
        raise spec_error(source, "utility_round", "is set but utility is false", spec.utility_round, "utility: true")


def check_attack_victims(spec: SweepSpec, source: str) -> None:
    """The grid runs every attack on every victim, so each attack must be able to run on each victim's name
    (the attack's `requires_victims`, as the trial checks it). A user's victim by import path passes here for
    an attack that checks the built model (`user_models`): its trials check it."""
    from grnn_engine.attacks.base import allowed_victims, runs_on_victim  # the engine, on first use

    for i, attack in enumerate(spec.grid.attack):
        for j, victim in enumerate(spec.grid.victim):
            if not runs_on_victim(attack.name, victim.name):
                raise _pair_error(source, i, attack.name, j, victim.name, "", allowed_victims(attack.name))


def build_attack_victims(spec: SweepSpec, source: str) -> None:
    """For an attack that needs BatchNorm (`requires_batchnorm`), every param set of each registered victim of
    the grid built and checked for it (e.g. resnet20 with norm: none has none), with each value a search may give
    its victim params (every categorical value, both ends of a range); users' victims: their trials."""
    from grnn_engine.attacks.base import ATTACKS, allowed_victims, check_batchnorm
    from grnn_engine.victims import VICTIMS, create_victim

    needing = [
        (i, a.name) for i, a in enumerate(spec.grid.attack) if getattr(ATTACKS.get(a.name), "requires_batchnorm", False)
    ]  # fmt: skip
    if not needing:
        return
    searched = spec.search.params if isinstance(spec.search, OptunaSearch) else {}
    for j, victim in enumerate(spec.grid.victim):
        if is_import_path(victim.name):
            continue
        ends = {
            pname: param.ends() for name, param in searched.items()
            if (target := split_target(name))[0] == "victim" and (pname := target[1]) in VICTIMS.parameters(victim.name)
        }  # fmt: skip
        for grid_params in victim.variants():
            for values in itertools.product(*ends.values()):
                params = {**grid_params, **dict(zip(ends, values, strict=True))}
                model = create_victim(victim.name, num_classes=10, image_size=spec.data.image_size, seed=0,
                                      **params)  # fmt: skip
                for i, attack in needing:
                    try:
                        check_batchnorm(model, attack, victim.name)
                    except ConfigError:
                        with_params = f" with params {show(params)}" if params else ""
                        searching = f" (searched: {', '.join(ends)})" if ends else ""
                        raise _pair_error(
                            source, i, attack, j, victim.name, f"{with_params}{searching}, which has no BatchNorm "
                            "layers that keep running statistics", allowed_victims(attack),
                        ) from None  # fmt: skip


def _pair_error(
    source: str, i: int, attack: str, j: int, victim: str, why: str, allowed: str | None
) -> SpecError:
    return spec_error(
        source, f"grid.attack[{i}]", f"attack '{attack}' cannot run on victim '{victim}' of grid.victim[{j}]{why}, "
        "and the grid runs every attack on every victim", victim, allowed or "any victim",
    )  # fmt: skip


def check_search(spec: SweepSpec, source: str) -> None:
    """Names, conflicts with the grid, and objectives of `search`. Values: build_search."""
    search = spec.search
    if not isinstance(search, OptunaSearch):
        return
    registries = plugin_registries()
    for name, param in search.params.items():
        path = f"search.params.{name}"
        family, pname = split_target(name)
        if not family:
            raise spec_error(source, path, "unknown parameter", name, ", ".join(SEARCH_TARGETS))
        if family in ("fl_round", "batch_size"):
            if param.type not in ("int", "categorical"):
                raise spec_error(source, f"{path}.type", f"{name} takes integers", param.type, "int, categorical")
            if name in spec.grid.model_fields_set:
                raise spec_error(
                    source, path, f"is both searched and set in grid.{name}", name,
                    f"search it or list it in grid.{name}, not both",
                )  # fmt: skip
        elif family == "fl":
            allowed = list(FLSpec.model_fields)
            if pname not in allowed:
                raise spec_error(
                    source, path, f"unknown FL setting{did_you_mean(pname, allowed)}", name,
                    ", ".join(f"fl.{a}" for a in allowed),
                )  # fmt: skip
            if pname in spec.fl.model_fields_set:
                raise spec_error(source, path, f"is both searched and set in fl.{pname}", name, "one of the two")
        else:
            registry = registries[family]
            entries = getattr(spec.grid, family)
            takers = [
                (i, e) for i, e in enumerate(entries)
                if pname in registry.parameters(e.name) or registry.takes_any(e.name)
            ]  # fmt: skip
            if family == "victim" and pname in VICTIM_SET_BY_SWEEP:
                takers = []
            if not takers:
                known = sorted(
                    {f"{family}.params.{p}" for e in entries for p in registry.parameters(e.name)}
                    - {f"victim.params.{p}" for p in VICTIM_SET_BY_SWEEP}
                )
                names = ", ".join(e.name for e in entries)
                raise spec_error(
                    source, path,
                    f"unknown parameter: no {family} of the grid ({names}) takes {pname!r}"
                    f"{did_you_mean(name, known)}",
                    name, ", ".join(known) or "none",
                )  # fmt: skip
            for i, entry in takers:
                if pname in entry.params:
                    raise spec_error(
                        source, path, f"is both searched and set in grid.{family}[{i}].params.{pname}", name,
                        "search it or give it in the grid, not both",
                    )  # fmt: skip
            if family == "defense":
                from grnn_engine.defenses import param_specs

                for _, entry in takers:
                    kind = param_specs(entry.name).get(pname)
                    if kind is not None and kind.kind is int and param.type not in ("int", "categorical"):
                        raise spec_error(
                            source, f"{path}.type", f"defense '{entry.name}' {pname} is an integer",
                            param.type, "int, categorical",
                        )  # fmt: skip
    for i, objective in enumerate(search.objectives or []):
        _check_objective_measured(spec, search, objective.metric, source, f"search.objectives[{i}].metric")
    bp = search.breaking_point
    if bp is not None and bp.metric != "psnr" and bp.threshold is None:
        raise spec_error(
            source, "search.breaking_point.threshold", f"a {bp.metric} breaking point needs a threshold", None,
            "a number (psnr defaults to success_psnr)",
        )  # fmt: skip


def _check_objective_measured(spec: SweepSpec, search: OptunaSearch, metric: str, source: str, path: str) -> None:
    """An objective every study's trials measure: the utility metrics need utility: true, the DP-SGD epsilons a
    grid whose every defense is dp_sgd, and model_dp_epsilon (spent by the attacked round) fl_round >= 1."""
    if metric in ("utility_acc", "utility_dp_epsilon", "model_dp_epsilon") and not spec.utility:
        raise spec_error(source, path, f"{metric} is only measured with utility: true", metric,
                         "utility: true in the spec, or another metric")
    others = sorted({d.name for d in spec.grid.defense} - {"dp_sgd"})
    if metric in ("utility_dp_epsilon", "model_dp_epsilon") and others:
        raise spec_error(source, path, f"{metric} is only measured for dp_sgd, but the grid also has defense "
                         f"{', '.join(others)}", metric, "a grid whose every defense is dp_sgd, or another metric")
    if metric == "model_dp_epsilon":
        searched = search.params.get("fl_round")
        lowest = min(searched.ends()) if searched is not None else min(spec.grid.fl_round)
        if lowest < 1:
            raise spec_error(source, path, f"model_dp_epsilon is only measured for a trained model, but fl_round "
                             f"{lowest} is the untrained one", metric, "fl_round >= 1 everywhere, or another metric")


def check_pack(spec: SweepSpec, source: str) -> None:
    """pack > 1 runs cells together as one trial: nothing may stop or sample them one at a time."""
    if spec.pack == 1:
        return
    if spec.scheduler is not None:
        used, other = "scheduler: asha", "no scheduler"
    elif isinstance(spec.search, OptunaSearch):
        used, other = "search: {method: optuna}", "search: {method: grid}"
    else:
        return
    raise spec_error(
        source, "pack", f"packed trials cannot be stopped or sampled one by one, so pack > 1 does not go with {used}",
        spec.pack, f"pack: 1, or {other}",
    )  # fmt: skip


def build_search(spec: SweepSpec, source: str) -> None:
    """Build each plugin (or FL settings) a searched parameter applies to at both ends of its range."""
    from grnn_engine.fl_settings import FLSettings

    search = spec.search
    if not isinstance(search, OptunaSearch):
        return
    builders = plugin_builders(spec.data.image_size)
    for name, param in search.params.items():
        path = f"search.params.{name}"
        family, pname = split_target(name)
        for value in param.ends():
            try:
                if family == "fl":
                    FLSettings.from_dict({**spec.fl.model_dump(), pname: value})
                elif family in ("victim", "defense", "attack"):
                    for entry in getattr(spec.grid, family):
                        if search_applies(name, TrialSpec(**{family: entry.name})):
                            for params in entry.variants():
                                builders[family](entry.name, {**params, pname: value})
                elif family in ("fl_round", "batch_size") and (not isinstance(value, int) or value < (family == "batch_size")):
                    raise ConfigError(f"{name} must be an integer >= {int(family == 'batch_size')}")
            except (ConfigError, TypeError, ValueError) as exc:
                message = str(exc).rstrip(".")
                raise SpecError(
                    f"{source}: {path}: {message} (got {show(value)} at an end of the searched range)",
                    source=source, path=path,
                ) from None
