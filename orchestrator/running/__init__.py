"""Running a sweep on Ray Tune: start Ray, prepare FL stages, run the trials (grid or search), write the ledger.

One purpose per module, no re-exports here: a Ray worker imports only the trial side (trainable, execute,
stages, scoring, watchdog), not the driver's Tune set-up.
- ray_start: start (or connect to) Ray quietly, embedded workers preloading the trial code; stop it.
- options: RunOptions (how trials run) and the number of trials that fit at once.
- tune_run: run_cells / run_search, both through run_trials: one Tune run into the ledger.
- stages: FedAvg stages trained once per chain as Ray tasks (round 0 built in the trials), fetched per trial.
- trainable: the Tune function trainable of one trial.
- execute: one cell to a TrialResult whatever happens; per-process resets; device choice.
- watchdog: the per-trial time limit.
- scoring: the final report (row, image, scores) and what a search optimises.
- ledger_callback: writes each final row to the ledger as it arrives; rows for trials whose worker died.
- asha: grouped ASHA early stopping.
- optuna_search: the studies of a search, each sampled by its own Optuna, in one Tune run.
- packing: `pack: N` cells per Tune trial through grnn_engine.batched.
"""
