"""The batched executor: N trials in one vectorised loop give what run_trial gives one by one.

Equivalence is checked within float tolerance (vmap runs other kernels, e.g. grouped convolutions, so
the last bits differ) on few iterations: GRNN's RMSprop divides by a running RMS of the gradient and
amplifies those last bits over hundreds of steps, as any change of kernel or thread count would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch

from grnn_engine import ATTACKS, TrialResult, TrialSpec, run_trial
from grnn_engine.attacks.base import ProgressFn, Reconstruction
from grnn_engine.batched import _grnn_batched, _ig_batched, compatible_groups, run_trials_batched
from grnn_engine.errors import ConfigError
from grnn_engine.trial import prepare_trial
from grnn_engine.victims import create_victim

# Three trials that differ in all the ways a pack allows: seed (generator, private image, victim
# weights), defense, and, for IG at B = 2, the label-inference draws.
GRNN_SPECS = [
    TrialSpec(attack="grnn", attack_params={"iterations": 6}, seed=0, eval_every=3, device="cpu"),
    TrialSpec(attack="grnn", attack_params={"iterations": 6}, seed=1, eval_every=3, device="cpu"),
    TrialSpec(attack="grnn", attack_params={"iterations": 6}, seed=2, eval_every=3, device="cpu",
              defense="gaussian", defense_params={"sigma": 0.01}),
]
IG_SPECS = [
    TrialSpec(attack="ig", attack_params={"iterations": 4, "restarts": 2}, seed=s, batch_size=2, eval_every=2,
              device="cpu", defense=d, defense_params=p)
    for s, d, p in [(0, "none", {}), (1, "none", {}), (2, "gaussian", {"sigma": 0.01})]
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _assert_same_results(
    specs: list[TrialSpec], progress: ProgressFn | None = None, stage_states: list[dict[str, Any]] | None = None
) -> list[TrialResult]:
    states: list[dict[str, Any] | None] = list(stage_states) if stage_states else [None] * len(specs)
    one = [run_trial(spec, stage_state=state).to_row() for spec, state in zip(specs, states, strict=True)]
    results = run_trials_batched(specs, progress=progress, stage_states=stage_states)
    batched = [r.to_row() for r in results]
    assert len({row["psnr"] for row in one}) == len(specs)  # the trials really differ
    for a, b in zip(one, batched, strict=True):
        assert b["trial_key"] == a["trial_key"] and b["status"] == a["status"] == "COMPLETE"
        assert b["labels_recovered"] == a["labels_recovered"] and b["matching"] == a["matching"]
        assert b["psnr"] == pytest.approx(a["psnr"], abs=1e-3)
        assert b["mse_per_image"] == pytest.approx(a["mse_per_image"], rel=1e-3)
        assert b["iterations"] == a["iterations"] and b["model_acc"] == a["model_acc"]
        hist_a, hist_b = (json.loads(r["history_json"]) for r in (a, b))
        assert [h["iteration"] for h in hist_b] == [h["iteration"] for h in hist_a]
        for ha, hb in zip(hist_a, hist_b, strict=True):
            assert hb["grad_loss"] == pytest.approx(ha["grad_loss"], rel=1e-4, abs=1e-7)
            assert hb["psnr"] == pytest.approx(ha["psnr"], abs=1e-3)
    return results


def _assert_same_images(specs: list[TrialSpec], batched_loop: Callable[..., list[Reconstruction]]) -> None:
    """The reconstructions themselves, before scoring: one reconstruct per trial vs the batched loop."""
    attack = ATTACKS.create(specs[0].attack, **specs[0].attack_params)
    expected = []
    for spec in specs:
        t = prepare_trial(spec)
        expected.append(attack.reconstruct(
            t.model, t.shared, num_classes=t.num_classes, batch_size=spec.batch_size,
            image_shape=t.image_shape, generator=t.generator, eval_every=spec.eval_every,
        ))  # fmt: skip
    got = batched_loop(attack, [prepare_trial(spec) for spec in specs], None)
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(g.labels, e.labels)
        torch.testing.assert_close(g.images, e.images, atol=1e-4, rtol=0)


def test_batched_grnn_equals_one_by_one() -> None:
    seen: list[tuple[int, int]] = []
    results = _assert_same_results(GRNN_SPECS, progress=lambda m: seen.append((m["pack_index"], m["iteration"])))
    _assert_same_images(GRNN_SPECS, _grnn_batched)
    # Progress: every trial at every logging iteration.
    assert sorted(seen) == [(i, it) for i in range(3) for it in (3, 6)]
    # Per-trial times are shares of the batch, so they add up to the time the batch took.
    assert all(r.attack_s > 0 and r.wall_s >= r.attack_s for r in results)


def test_batched_ig_equals_one_by_one() -> None:
    seen: list[dict[str, Any]] = []
    _assert_same_results(IG_SPECS, progress=seen.append)
    _assert_same_images(IG_SPECS, _ig_batched)
    # Each trial's history ends with its answer (its best iterate), reported with its place in the pack.
    answers = [(m["pack_index"], m["trial_key"]) for m in seen if m.get("answer") == 1]
    assert answers == [(i, spec.key()) for i, spec in enumerate(IG_SPECS)]


def test_batched_attacks_each_trial_on_its_own_stage() -> None:
    """Stages handed over by the orchestrator: per-trial victim weights (here other seeds') and accuracy."""
    states = [
        {"state_dict": create_victim("lenet", num_classes=10, seed=100 + i).state_dict(), "model_acc": 0.1 * i}
        for i in range(len(IG_SPECS))
    ]
    results = _assert_same_results(IG_SPECS, stage_states=states)
    assert [r.model_acc for r in results] == [0.0, 0.1, 0.2]
    plain = run_trials_batched(IG_SPECS)
    assert all(r.metrics["psnr"] != p.metrics["psnr"] for r, p in zip(results, plain, strict=True))
    with pytest.raises(ConfigError, match="2 stage_states for 3 specs"):
        run_trials_batched(IG_SPECS, stage_states=states[:2])


def test_stacked_optimiser_step_equals_separate_steps() -> None:
    """Why one torch.optim optimiser over stacked weights is N optimisers: RMSprop and Adam are elementwise."""
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(3, 5, 4, generator=gen) for _ in range(2)]
    grads = [[torch.randn(3, 5, 4, generator=gen) for _ in range(2)] for _ in range(4)]
    for make in (lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.99), lambda p: torch.optim.Adam(p, lr=0.1)):
        stacked = [w.clone().requires_grad_() for w in weights]
        separate = [[w[i].clone().requires_grad_() for w in weights] for i in range(3)]
        opt_stacked, opt_separate = make(stacked), [make(ws) for ws in separate]
        for step in grads:
            for w, g in zip(stacked, step, strict=True):
                w.grad = g.clone()
            opt_stacked.step()
            for i, (ws, opt) in enumerate(zip(separate, opt_separate, strict=True)):
                for w, g in zip(ws, step, strict=True):
                    w.grad = g[i].clone()
                opt.step()
        for i, ws in enumerate(separate):
            for w, s in zip(ws, stacked, strict=True):
                torch.testing.assert_close(s[i], w, atol=1e-6, rtol=1e-6)


def test_batched_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ConfigError, match="at least one"):
        run_trials_batched([])
    with pytest.raises(ConfigError, match="'dlg' has no batched loop"):
        run_trials_batched([TrialSpec(attack="dlg")])
    with pytest.raises(ConfigError, match="optimizer='rmsprop'.*got 'adam'"):
        run_trials_batched([TrialSpec(attack="grnn", attack_params={"optimizer": "adam", "iterations": 2})])
    with pytest.raises(ConfigError, match="only the paper loop"):
        run_trials_batched([TrialSpec(attack="grnn", attack_params={"preset": "strong", "iterations": 2})])
    with pytest.raises(ConfigError, match="restarts=1"):
        run_trials_batched([TrialSpec(attack="grnn", attack_params={"restarts": 2, "iterations": 2})])
    with pytest.raises(ConfigError, match="differs .* in 'attack_params'"):
        run_trials_batched([GRNN_SPECS[0], TrialSpec(attack="grnn", attack_params={"iterations": 11}, seed=1,
                                                     eval_every=5, device="cpu")])
    with pytest.raises(ConfigError, match="in 'batch_size'"):
        run_trials_batched([IG_SPECS[0], TrialSpec(**{**IG_SPECS[1].__dict__, "batch_size": 1})])


def test_compatible_groups_packs_only_what_shares_one_loop() -> None:
    grnn = [TrialSpec(attack="grnn", seed=s) for s in range(5)]
    grnn_b2 = [TrialSpec(attack="grnn", seed=s, batch_size=2) for s in range(2)]
    dlg = TrialSpec(attack="dlg")
    adam = TrialSpec(attack="grnn", attack_params={"optimizer": "adam"})
    specs = [grnn[0], grnn_b2[0], dlg, *grnn[1:], adam, grnn_b2[1]]
    groups = compatible_groups(specs, pack=2)
    assert groups == [[grnn[0], grnn[1]], [grnn_b2[0], grnn_b2[1]], [dlg], [grnn[2], grnn[3]], [grnn[4]], [adam]]
    assert sorted(s.key() for g in groups for s in g) == sorted(s.key() for s in specs)
    assert compatible_groups(specs, pack=1) == [[s] for s in specs]
    assert [len(g) for g in compatible_groups(grnn, pack=16)] == [5]
    with pytest.raises(ConfigError, match="pack must be an integer >= 1"):
        compatible_groups(specs, pack=0)
