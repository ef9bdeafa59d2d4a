"""The sweep, status and report command lines print an error (a bad value or a bad option) as ONE line and
exit 2, even when the value the user gave holds a newline or another control character (shown escaped, as the
one-trial CLI does); and every command line, the one-trial one too, ends quietly when the reader of its output
has gone (`... | head -1`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from orchestrator import report, status, sweep

REPO = Path(__file__).resolve().parents[2]
MAINS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "sweep": sweep.main,
    "status": status.main,
    "report": report.main,
}


@pytest.mark.parametrize("command", list(MAINS))
@pytest.mark.parametrize("control", ["\n", "\r", "\x1b[2J"])
def test_an_error_about_a_value_with_a_control_character_is_one_line(
    command: str, control: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a spec (sweep) or results folder (status, report) that is not there
    value = str(tmp_path / f"no{control}such.yaml")
    assert MAINS[command]([value]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert control not in err[:-1]
    assert str(tmp_path / "no") in err and repr(control)[1:-1] + "such.yaml" in err  # the value, escaped


@pytest.mark.parametrize("command", list(MAINS))
def test_a_bad_option_is_one_line_without_the_usage_block(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        MAINS[command](["somewhere", "--no-such\noption"])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith("error: ") and "--no-such\\noption" in err


def test_a_misspelt_required_key_exits_2_naming_the_typo(tmp_path: Path) -> None:
    spec = tmp_path / "typo.yaml"
    text = (REPO / "sweeps" / "quickstart.yaml").read_text(encoding="utf-8")
    spec.write_text(text.replace("\nname: quickstart\n", "\nnamex: quickstart\n", 1), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.sweep", str(spec), "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {spec}: namex: unknown key 'namex' — did you mean 'name', "), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr


PIPED = {
    "sweep": ["orchestrator.sweep", "sweeps/quickstart.yaml", "--dry-run"],
    "status": ["orchestrator.status", "tests/data/report_defenses"],
    "report": ["orchestrator.report", "tests/data/report_defenses", "--out", "{out}"],
    "trial": ["grnn_engine", "--iterations", "1", "--image-size", "16", "--no-progress"],
}


@pytest.mark.parametrize("command", list(PIPED))
def test_a_reader_that_leaves_early_ends_the_command_quietly(command: str, tmp_path: Path) -> None:
    """The read end of a real pipe is closed before the command writes (as `head -1` that has its line): its
    print meets EPIPE, and it exits 1 with nothing on stderr, no BrokenPipeError traceback."""
    args = [a.replace("{out}", str(tmp_path / "report")) for a in PIPED[command]]
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 1 and done.stderr == "", done.stderr
