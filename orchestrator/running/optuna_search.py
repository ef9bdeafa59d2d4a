"""Search (`search: {method: optuna}`): every study of a sweep in ONE Tune run, each sampled by its own Optuna.

`StudySearcher` hands Tune the next trial of the study whose turn it is, from that study's own
`ray.tune.search.optuna.OptunaSearch` (TPE, NSGA-II or random), at most `search.max_concurrent` at once per study.
Rows already in the ledger are fed back to their study first (`study_runs`, `add_evaluated_point`), so a search
resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from ray.tune.search import Searcher

from orchestrator.running.asha import asha_limits
from orchestrator.running.scoring import Scoring

if TYPE_CHECKING:
    from orchestrator.results import Ledger
    from orchestrator.running.options import RunOptions
    from orchestrator.spec import OptunaSearch, SearchParam, Study


def _distribution(param: SearchParam) -> Any:
    import optuna

    d = optuna.distributions
    if param.type == "categorical":
        return d.CategoricalDistribution(list(param.values or []))
    if param.type == "int":
        return d.IntDistribution(int(param.low or 0), int(param.high or 0), log=param.log)
    return d.FloatDistribution(float(param.low or 0.0), float(param.high or 0.0), log=param.type == "loguniform")


def _sampler(name: str, seed: int, num_samples: int) -> Any:
    import optuna

    s = optuna.samplers
    if name == "nsga2":
        # Generations as large as a quarter of the budget (at least 2), so that several of them evolve.
        return s.NSGAIISampler(seed=seed, population_size=max(2, min(50, num_samples // 4)))
    if name == "random":
        return s.RandomSampler(seed=seed)
    # TPE's default of 10 random start-up trials would spend a whole small study at random.
    startup = max(2, min(10, num_samples // 4))
    return s.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


def _study_seed(seed: int, study_id: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}:{study_id}".encode()).digest()[:4], "little")


def _optuna_search_class() -> type:
    import optuna
    from ray.tune.search.optuna import OptunaSearch as RayOptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one INFO line per study and trial otherwise

    class LedgerOptunaSearch(RayOptunaSearch):
        """Ray's OptunaSearch, whose add_evaluated_point also takes several objective values (a list)."""

        def add_evaluated_point(
            self, parameters: dict, value: Any, error: bool = False, pruned: bool = False,
            intermediate_values: list[float] | None = None,
        ) -> None:  # fmt: skip
            if not isinstance(value, list) or error or pruned:
                super().add_evaluated_point(parameters, value, error, pruned, intermediate_values)
                return
            import optuna

            trial = optuna.trial.create_trial(
                state=optuna.trial.TrialState.COMPLETE, values=value, params=parameters,
                distributions=cast(dict, self._space),
            )  # fmt: skip
            cast(optuna.Study, self._ot_study).add_trial(trial)

    return LedgerOptunaSearch


@dataclasses.dataclass
class StudyRun:
    """One study inside the search run: its Optuna searcher (None for a study without a space), the trials it
    may still start, the ones running, and what the scheduler needs in each config."""

    study: Study
    searcher: Any
    remaining: int
    running: set[str] = dataclasses.field(default_factory=set)
    config_extra: dict[str, Any] = dataclasses.field(default_factory=dict)


_MAX_REPEATS = 20  # samples drawn in a row that all repeat earlier trials: the study has nothing new left


class StudySearcher(Searcher):
    """Hands Tune the trials of many studies in one run: round robin over the studies that may start a trial
    (budget left, fewer than `max_concurrent` running), each sampled by its own OptunaSearch.

    A sample whose trial key exists already (a categorical or integer space repeats itself) is not run twice:
    its study is told the known value at once. Returns FINISHED when every study has spent its budget.
    """

    def __init__(self, runs: list[StudyRun], max_concurrent: int, scoring: Scoring,
                 known: dict[str, dict[str, float] | None] | None = None) -> None:  # fmt: skip
        super().__init__(metric=None, mode=None)  # no metric: Tune must not check reports for one
        self.runs = runs
        self.max_concurrent = max_concurrent
        self.scoring = scoring
        self.known: dict[str, dict[str, float] | None] = dict(known or {})
        self._live: dict[str, tuple[StudyRun, str, str]] = {}  # Tune trial id -> (run, optuna id, key)
        self._turn = 0

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def _left(self) -> bool:
        return any(run.remaining > 0 for run in self.runs)

    def suggest(self, trial_id: str) -> dict | str | None:  # type: ignore[override]  # str: Searcher.FINISHED
        n = len(self.runs)
        for step in range(n):
            run = self.runs[(self._turn + step) % n]
            if run.remaining <= 0 or len(run.running) >= self.max_concurrent:
                continue
            config = self._sample(run, trial_id)
            if config is not None:
                self._turn = (self._turn + step + 1) % n
                return config
        return None if self._left() else Searcher.FINISHED

    def _sample(self, run: StudyRun, trial_id: str) -> dict | None:
        live_keys = {key for _, _, key in self._live.values()}
        for attempt in range(_MAX_REPEATS):
            if run.remaining <= 0:
                return None
            optuna_id = f"{trial_id}.{attempt}"
            sampled = run.searcher.suggest(optuna_id) if run.searcher is not None else {}
            spec = run.study.trial(sampled)
            key = spec.key()
            run.remaining -= 1
            if key not in self.known and key not in live_keys:
                run.running.add(trial_id)
                self._live[trial_id] = (run, optuna_id, key)
                return {
                    "trial_key": key, "study": run.study.id,
                    "cell_json": json.dumps(dataclasses.asdict(spec)),
                    "sampled_json": json.dumps(sampled, sort_keys=True), **run.config_extra,
                }  # fmt: skip
            if run.searcher is not None:  # a repeat: Optuna learns the known value, nothing runs twice
                value = self.known.get(key)
                run.searcher.on_trial_complete(optuna_id, result=value, error=value is None)
        run.remaining = 0
        return None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass  # studies learn from final values only (no Optuna pruner; ASHA does the early stopping)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        entry = self._live.pop(trial_id, None)
        if entry is None:
            return
        run, optuna_id, key = entry
        run.running.discard(trial_id)
        values = None if error else self.scoring.values(result or {})
        self.known[key] = values
        if run.searcher is not None:
            run.searcher.on_trial_complete(optuna_id, result=values, error=values is None)

    def save(self, checkpoint_path: str) -> None:
        pass  # the ledger is what a search resumes from (see study_runs)

    def restore(self, checkpoint_path: str) -> None:
        pass



def stage_depends_on_sample(study: Study) -> bool:
    """Whether a study's trials attack different stages for different samples (then each loads its own)."""
    for name in study.space:
        if name == "fl_round" or name.startswith(("fl.", "victim.")):
            return True
        if name.startswith("defense.") and "defense" in study.cell.fl:  # utility: trained under the defense
            return True
    return False


def searched_rows(ledger: Ledger) -> list[dict[str, Any]]:
    """The ledger's rows of searched trials (those with a search_id), as dicts."""
    if not ledger.exists():
        return []
    df = ledger.load()
    if "search_id" not in df.columns:
        return []
    return [r for r in df.to_dict("records") if isinstance(r.get("search_id"), str)]


def study_runs(
    studies: Sequence[Study], search: OptunaSearch, scoring: Scoring, rows: list[dict[str, Any]],
    options: RunOptions,
) -> tuple[list[StudyRun], dict[str, dict[str, float] | None]]:  # fmt: skip
    """A StudyRun per study, with the ledger's trials fed back to its searcher and taken off its budget."""
    search_class = _optuna_search_class()
    by_study: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_study.setdefault(row["search_id"], []).append(row)
    known: dict[str, dict[str, float] | None] = {}
    runs = []
    single = len(scoring.metrics) == 1
    for study in studies:
        searcher = None
        if study.space:
            searcher = search_class(
                space={name: _distribution(p) for name, p in study.space.items()},
                metric=scoring.metrics[0] if single else list(scoring.metrics),
                mode=scoring.modes[0] if single else list(scoring.modes),
                sampler=_sampler(search.sampler_name(), _study_seed(search.seed, study.id), study.num_samples),
                study_name=study.id,
            )  # fmt: skip
        done = 0
        for row in by_study.get(study.id, []):
            complete = row.get("status") == "COMPLETE"
            values = scoring.values(row) if complete else None
            known[row["trial_key"]] = values
            if complete or not options.retry_failed:
                done += 1
            if searcher is None:
                continue
            params = json.loads(row.get("search_params") or "{}")
            if set(params) != set(study.space):
                continue  # a row of another space (cannot happen under the same spec hash)
            if values is not None:
                value = [values[m] for m in scoring.metrics]
                searcher.add_evaluated_point(params, value[0] if single else value)
            elif not options.retry_failed:
                searcher.add_evaluated_point(params, None, error=True)
        extra: dict[str, Any] = {}
        if options.scheduler is not None:
            max_t, grace = asha_limits(options.scheduler, study.cell, study.space)
            extra = {"group": study.id, "max_t": max_t, "grace": grace}
        runs.append(StudyRun(study=study, searcher=searcher, remaining=max(0, study.num_samples - done),
                             config_extra=extra))  # fmt: skip
    return runs, known

