"""The sweep spec: a YAML file -> a typed, validated `SweepSpec` -> the `TrialSpec` cells it expands to.

A spec names a results folder, the data, a grid of axes and how trials run (see sweeps/quickstart.yaml):

    name: quickstart
    data: {dataset: digits, image_size: 32, split: test}
    grid:
      victim: [lenet]                                  # names or {name, params} entries
      fl_round: [0]                                    # one value or a list
      batch_size: [1, 4]
      defense: [{name: none}, {name: gaussian, params: {sigma: [0.01, 0.1]}}]
      attack: [{name: grnn, params: {iterations: 300}, eval_every: 60}]   # eval_every: optional override
      seed: 3                                          # an int N means seeds 0..N-1; or a list
    eval_every: 50
    resources: {cpu: 1, gpu: 0}

Expansion is the cartesian product victim x fl_round x batch_size x defense x attack x seed, where each
plugin entry first expands into its params' own product: a param given as a list is an axis, and to give
one list-valued param write a list of lists (`steps: [[a, b]]`). Cells with equal `TrialSpec.key()` are
kept once. `load_spec` also builds every distinct victim, defense and attack once, so that a bad param
value is caught before Ray starts; `parse_spec` checks names and param names only, and that every attack
can run on every victim the grid pairs it with (a user's victim by import path, whose model only its
trials build, passes for an attack that checks the built model, such as gradinversion). Everything a user can
get wrong is reported as a `SpecError`: one sentence naming the file, the dotted field path, the bad value
and what is allowed; pydantic's ValidationError never escapes.

Federated training (`fl`, typed as FLSpec): the FedAvg settings of the stages that trials at fl_round > 0
attack. A sweep whose rounds are all 0 (and without utility) trains nothing, and its cells carry `fl: {}`.
`utility: true` also applies each cell's defense to every client update during that training (TrialSpec
.fl["defense"]), so each defense setting gets its own chain, and each row carries `utility_acc`, the test
accuracy of the defended model at `utility_round` (default: the grid's largest fl_round).

Search (`search: {method: optuna, ...}`, see OptunaSearch): `params` maps dotted names (SEARCH_TARGETS, e.g.
`defense.params.sigma`) to ranges; the other axes stay a grid, with one study per grid cell (`studies()`).
A searched parameter applies to the cells whose plugin takes it, so one search can hold gaussian's sigma
and prune's ratio; a cell that none applies to runs once, as in a grid. The objective is either
`objectives` (metrics with directions; two or more = a Pareto front, NSGA-II by default) or
`breaking_point` (minimize |metric - threshold|, so samples gather where the attack starts to fail).
`scheduler: asha` stops trials whose intermediate psnr (or grad_loss) is hopeless (see Asha).

The package, one purpose per module (each imports only those above it):
  messages.py         SpecError and the shape of its one sentence (spec_error, show, closest)
  models.py           the sections as strict pydantic models: data, grid entries and axes, update, fl, resources, asha
  registries.py       the engine's plugin registries by family, imported on first use
  search.py           the search section; Study, search_applies, apply_sample (what a search does to a cell)
  sweep_spec.py       SweepSpec: the top level, its cells, studies and spec_hash
  plugins.py          plugin entries against the registries: names and params checked, every param set built
  cross_checks.py     checks across sections: utility, pack, each attack against each victim, searched
                      parameters against the grid
  pydantic_errors.py  a pydantic ValidationError as one sentence (a misspelt key beside a missing one first)
  loading.py          load_spec (YAML file) and parse_spec (plain data): the entry points
"""

from __future__ import annotations

from orchestrator.spec.loading import load_spec, parse_spec
from orchestrator.spec.messages import SpecError
from orchestrator.spec.models import (
    Asha,
    AttackEntry,
    DataSpec,
    FedAvg,
    FedSgd,
    FLSpec,
    GridSpec,
    PluginEntry,
    Resources,
    UpdateSpec,
)
from orchestrator.spec.search import (
    SEARCH_TARGETS,
    BreakingPoint,
    GridSearch,
    Objective,
    OptunaSearch,
    SearchParam,
    SearchSpec,
    Study,
    apply_sample,
    search_applies,
)
from orchestrator.spec.sweep_spec import SweepSpec

__all__ = [
    "SEARCH_TARGETS",
    "Asha",
    "AttackEntry",
    "BreakingPoint",
    "DataSpec",
    "FLSpec",
    "FedAvg",
    "FedSgd",
    "GridSearch",
    "GridSpec",
    "Objective",
    "OptunaSearch",
    "PluginEntry",
    "Resources",
    "SearchParam",
    "SearchSpec",
    "SpecError",
    "Study",
    "SweepSpec",
    "UpdateSpec",
    "apply_sample",
    "load_spec",
    "parse_spec",
    "search_applies",
]
