"""A sweep over a user's own victim by import path (a model defined in the test tree) runs on the real
embedded Ray: every cell COMPLETE, rows carry the import path, its params and its fingerprint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grnn_engine.victims import victim_fingerprint
from orchestrator import sweep
from orchestrator.results import load

VICTIM = "tests.engine.user_models:GreyNet"  # importable from the project root, where the tests run


def test_sweep_over_a_user_model(tmp_path: Path, ray_session: None, make_spec: Any) -> None:
    spec = make_spec(
        tmp_path / "mine.yaml", name="mine", data={"dataset": "digits", "image_size": 12},
        grid={"victim": [{"name": VICTIM, "params": {"width": [2, 3]}}], "seed": 1},
    )  # fmt: skip
    assert sweep.main([str(spec), "--results", str(tmp_path / "r")]) == 0
    rows = load(tmp_path / "r" / "mine").sort_values("victim.width")
    assert list(rows["status"]) == ["COMPLETE", "COMPLETE"], rows["error"].tolist()
    assert set(rows["victim"]) == {VICTIM} and list(rows["victim.width"]) == [2, 3]
    assert list(rows["victim_fingerprint"]) == [victim_fingerprint(VICTIM, {"width": w}, 12) for w in (2, 3)]
