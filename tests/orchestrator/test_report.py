"""The analysis report on real results folders (tests/data/report_*, made by tests/data/make_fixture.py with
the engine and the ledger): every file is written and decodes, the HTML shows every figure, the heatmap's
numbers are a plain pandas groupby of trials.parquet, and holes (failed, missing cells) are marked."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pandas as pd
import pytest
from PIL import Image

from grnn_engine.errors import ConfigError
from orchestrator import report
from orchestrator.results import load

DATA = Path(__file__).resolve().parents[1] / "data"
DEFENSES = DATA / "report_defenses"
CONVERGENCE = DATA / "report_convergence"
SETTINGS = ["none", "gaussian sigma=0.01", "gaussian sigma=0.1"]
HOLE = ("gaussian sigma=0.1", 2)  # grnn: no trial ran; dlg: every seed failed (see make_fixture.py)


def _raw(folder: Path) -> pd.DataFrame:
    """trials.parquet read by pandas alone, with the defense label built by hand: the independent side."""
    df = pd.read_parquet(folder / "trials.parquet")
    sigma = df["defense.sigma"] if "defense.sigma" in df.columns else pd.Series(float("nan"), index=df.index)
    df["label"] = [
        "none" if d == "none" else f"gaussian sigma={s:g}" for d, s in zip(df["defense"], sigma, strict=True)
    ]
    return df


@pytest.fixture(scope="module")
def defenses_df() -> pd.DataFrame:
    return load(DEFENSES)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> report.Report:
    return report.write_report(DEFENSES, tmp_path_factory.mktemp("report"), "md")


# ---------------------------------------------------------------------------------------------- files


def test_every_expected_file_is_written_and_decodes(written: report.Report) -> None:
    names = {p.name for p in written.folder.iterdir()}
    expected = {
        f"heatmap_{metric}_{attack}_lenet.png"
        for metric in ("psnr", "ssim", "label_acc", "success")
        for attack in ("grnn", "dlg")
    }
    assert expected | {"gallery.png", "index.html", "report.md"} <= names
    assert {p.name for p in written.figures} == {n for n in names if n.endswith(".png")}
    for png in written.figures:
        with Image.open(png) as img:
            img.load()  # decodes the whole image, not only the header
            assert img.width > 200 and img.height > 150


def test_html_and_markdown_reference_every_png(written: report.Report) -> None:
    pngs = {p.name for p in written.figures}
    text = written.html.read_text(encoding="utf-8")
    assert set(re.findall(r'<img src="([^"]+)"', text)) == pngs
    assert "http://" not in text and "https://" not in text  # opens from disk, fetches nothing
    md = written.markdown.read_text(encoding="utf-8") if written.markdown else ""
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == pngs


def test_report_notes_the_figures_it_skips(written: report.Report) -> None:
    text = written.html.read_text(encoding="utf-8")
    assert "Skipped: the table has 1 fl_round value (0)" in text
    assert "Skipped: the table has no utility values" in text
    assert any(n.startswith("Convergence: Skipped") for n in written.notes)


def test_tables_are_inline(written: report.Report) -> None:
    text = written.html.read_text(encoding="utf-8")
    assert "942d385000fd42ab" in text  # the spec hash of run facts
    assert "✓<br>9.9" in text and "fail" in text  # success table, mark above the PSNR
    assert "OutOfMemory" in text and "Timeout" in text  # failures table


# ---------------------------------------------------------------------------------------------- heatmaps


@pytest.mark.parametrize("metric", ["psnr", "ssim", "label_acc", "success"])
@pytest.mark.parametrize("attack", ["grnn", "dlg"])
def test_heatmap_values_equal_a_pandas_groupby(defenses_df: pd.DataFrame, attack: str, metric: str) -> None:
    raw = _raw(DEFENSES)
    mine = raw[(raw["attack"] == attack) & (raw["status"] == "COMPLETE")]
    expected = mine.groupby(["label", "batch_size"])[metric].mean().unstack()
    got = report.heatmap_values(defenses_df, attack, metric=metric)
    assert list(got.index) == SETTINGS and list(got.columns) == [1, 2]
    for setting in SETTINGS:
        for batch in (1, 2):
            want = expected.loc[setting, batch] if setting in expected.index else float("nan")
            if (setting, batch) == HOLE:
                assert pd.isna(got.loc[setting, batch])
            else:
                assert got.loc[setting, batch] == pytest.approx(float(want), rel=1e-12)


def _cell_texts(fig: matplotlib.figure.Figure) -> dict[tuple[int, int], str]:
    return {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in fig.axes[0].texts}


def test_heatmap_marks_missing_failed_and_partial_cells(defenses_df: pd.DataFrame) -> None:
    row, col = SETTINGS.index(HOLE[0]), [1, 2].index(HOLE[1])
    grnn = _cell_texts(report.robustness_heatmap(defenses_df, "grnn"))
    dlg = _cell_texts(report.robustness_heatmap(defenses_df, "dlg"))
    assert grnn[(row, col)] == "—"  # no trial ran
    assert dlg[(row, col)] == "fail"  # every seed failed
    assert grnn[(0, 0)].endswith("1/2 ok")  # grnn, none, batch 1: one seed timed out
    values = report.heatmap_values(defenses_df, "dlg")
    assert dlg[(0, 1)] == f"{values.loc['none', 2]:.1f}"
    assert len(grnn) == len(dlg) == len(SETTINGS) * 2  # every cell carries a number or a mark


def test_heatmap_figure_is_readable(defenses_df: pd.DataFrame) -> None:
    fig = report.robustness_heatmap(defenses_df, "grnn", metric="psnr")
    ax = fig.axes[0]
    assert "GRNN" in ax.get_title() and "PSNR (dB)" in ax.get_title()
    assert "batch size" in ax.get_xlabel() and "defense" in ax.get_ylabel()
    assert len(fig.axes) == 2 and "dB" in fig.axes[1].get_ylabel()  # the colour bar, with its unit


def test_heatmap_refuses_to_pool_and_names_bad_values(defenses_df: pd.DataFrame) -> None:
    df = load(CONVERGENCE)
    with pytest.raises(ConfigError, match=r"fl_round \(0, 1, 3\)"):
        report.heatmap_values(df, "grnn")
    assert report.heatmap_values(df, "grnn", where={"fl_round": 3}).shape == (1, 1)
    with pytest.raises(ConfigError, match="attack 'idlg' is not in the table; allowed: dlg, grnn"):
        report.heatmap_values(defenses_df, "idlg")
    with pytest.raises(ConfigError, match="metric 'lpips'"):
        report.heatmap_values(defenses_df, "grnn", metric="lpips")


def test_defense_settings_run_weakest_to_strongest() -> None:
    rows = pd.DataFrame(
        {
            "defense": ["quantize", "none", "gaussian", "quantize", "gaussian", "prune"],
            "defense.bits": [8, None, None, 2, None, None],
            "defense.sigma": [None, None, 0.1, None, 1e-4, None],
            "defense.ratio": [None, None, None, None, None, 0.9],
        }
    )
    assert report.defense_settings(rows) == [
        "none",
        "gaussian sigma=0.0001",
        "gaussian sigma=0.1",
        "prune ratio=0.9",
        "quantize bits=8",
        "quantize bits=2",
    ]


# ---------------------------------------------------------------------------------------------- tables


def test_success_table_has_the_papers_shape(defenses_df: pd.DataFrame) -> None:
    table = report.success_table(defenses_df)
    assert list(table.index.names) == ["attack", "victim", "dataset", "defense"]
    assert list(table.columns) == [1, 2]
    raw = _raw(DEFENSES)
    means = raw[raw["status"] == "COMPLETE"].groupby(["attack", "label", "batch_size"])["psnr"].mean()
    for (attack, label, batch), mean in means.items():
        mark = "✓" if mean >= 9.0 else "✗"
        assert table.loc[(attack, "lenet", "digits", label), batch] == f"{mark} {mean:.1f}"
    assert table.loc[("dlg", "lenet", "digits", HOLE[0]), 2] == "fail"
    assert table.loc[("grnn", "lenet", "digits", HOLE[0]), 2] == "—"
    assert [key[3] for key in table.index[:3]] == SETTINGS


def test_failures_table_lists_failed_and_timed_out_trials(defenses_df: pd.DataFrame) -> None:
    table = report.failures_table(defenses_df)
    assert sorted(table["status"]) == ["FAILED", "FAILED", "TIMEOUT"]
    assert set(table["error_type"]) == {"OutOfMemory", "Timeout"}
    assert table["error"].str.len().min() > 10
    assert report.failures_table(load(CONVERGENCE)).empty


def test_run_facts(defenses_df: pd.DataFrame) -> None:
    facts = report.run_facts(DEFENSES, defenses_df)
    assert facts["spec hash"] == (DEFENSES / "spec.yaml").read_text().splitlines()[0].split()[-1]
    assert facts["cells in spec"] == "24"
    assert facts["trials"] == "22 (19 complete, 2 failed, 1 timeout, 2 not run)"
    assert "cpu x 22" in facts["hardware"] and "torch" in facts["versions"]
    assert facts["spec"].startswith("name: report_defenses")


# ---------------------------------------------------------------------------------------------- other figures


def test_convergence_figure_plots_the_seed_means() -> None:
    df = load(CONVERGENCE)
    fig = report.convergence_figure(df)
    ax, twin = fig.axes[0], fig.axes[1]
    raw = _raw(CONVERGENCE)
    for line in ax.get_lines():
        rows = raw[(raw["attack"] == line.get_label()) & (raw["status"] == "COMPLETE")]
        expected = rows.groupby("fl_round")["psnr"].mean()
        assert list(line.get_xdata()) == [0, 1, 3]
        assert list(line.get_ydata()) == pytest.approx(list(expected))
    assert {line.get_label() for line in ax.get_lines()} == {"grnn", "dlg"}
    acc = raw.groupby("fl_round")["model_acc"].mean().dropna()
    assert list(twin.get_lines()[0].get_ydata()) == pytest.approx(list(acc))
    assert "accuracy" in twin.get_ylabel() and "dB" in ax.get_ylabel()


def test_convergence_needs_two_rounds(defenses_df: pd.DataFrame) -> None:
    with pytest.raises(report.NotApplicable, match="1 fl_round value"):
        report.convergence_figure(defenses_df)


def test_pareto_front() -> None:
    # lower PSNR is more private, higher accuracy more useful
    assert report.pareto_front([10, 8, 9, 12], [0.9, 0.5, 0.4, 0.95]) == [True, True, False, True]


def test_privacy_utility_figure_only_with_utility(defenses_df: pd.DataFrame) -> None:
    with pytest.raises(report.NotApplicable, match="utility"):
        report.privacy_utility_figure(defenses_df)
    accuracy = {"none": 0.9, "gaussian sigma=0.01": 0.88, "gaussian sigma=0.1": 0.5}
    df = defenses_df.assign(
        utility_acc=[accuracy[s] for s in report.with_settings(defenses_df)["defense_setting"]]
    )
    values = report.privacy_utility_values(df)
    assert list(values.index) == SETTINGS
    assert values.loc["none", "utility"] == pytest.approx(0.9)
    assert values["pareto"].tolist() == report.pareto_front(values["psnr"], values["utility"])
    fig = report.privacy_utility_figure(df)
    assert "PSNR" in fig.axes[0].get_xlabel() and "accuracy" in fig.axes[0].get_ylabel()


def test_privacy_utility_of_a_real_utility_sweep_plots_every_defense_setting() -> None:
    """A real `utility: true` ledger (results/defenses_cpu_utility, 17 defense settings, a FedAvg chain per setting
    and seed): its rows carry the training defense in fl.defense / fl.defense_params, which repeat the defense
    setting and must not count as an axis the figure would pool; a setting's utility is the mean over its seeds."""
    df = load(Path(__file__).resolve().parents[2] / "results" / "defenses_cpu_utility")
    assert df["fl.defense"].nunique() == 8 and df["seed"].nunique() == 3
    values = report.privacy_utility_values(df)
    assert len(values) == 17 and values.index[0] == "none"
    by_setting = report.with_settings(df).groupby("defense_setting")["utility_acc"].mean()
    assert values["utility"].to_dict() == pytest.approx(by_setting.loc[values.index].to_dict())
    report.privacy_utility_figure(df)


def test_gallery_uses_the_trial_images(defenses_df: pd.DataFrame, tmp_path: Path) -> None:
    fig = report.gallery_figure(DEFENSES, defenses_df)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("best") and titles[1].startswith("worst")
    assert any(t.startswith("median grnn") for t in titles) and any(
        t.startswith("median dlg") for t in titles
    )
    best = defenses_df.loc[defenses_df["psnr"].idxmax()]
    assert f"{best['psnr']:.1f} dB" in titles[0]
    bare = tmp_path / "no_images"
    shutil.copytree(DEFENSES, bare, ignore=shutil.ignore_patterns("images"))
    with pytest.raises(report.NotApplicable, match="image"):
        report.gallery_figure(bare, defenses_df)


# ---------------------------------------------------------------------------------------------- command line


def test_cli_writes_into_the_results_folder_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "report_convergence"
    shutil.copytree(CONVERGENCE, folder)
    (folder / "report").mkdir()
    (folder / "report" / "heatmap_psnr_old.png").write_bytes(b"stale")
    (folder / "report" / "notes.txt").write_text("mine")
    assert report.main([str(folder)]) == 0
    out = folder / "report"
    assert {"index.html", "convergence.png", "gallery.png", "notes.txt"} <= {p.name for p in out.iterdir()}
    assert not (out / "heatmap_psnr_old.png").exists()  # a figure of an earlier report is not left behind
    assert not (out / "report.md").exists()
    assert "index.html" in capsys.readouterr().out


def test_cli_errors_exit_2_with_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a sweep results folder" in err and len(err.splitlines()) == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(DEFENSES / "spec.yaml", empty / "spec.yaml")  # a sweep that wrote its spec, no trial yet
    assert report.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds no trial results yet" in err and len(err.splitlines()) == 1
    with pytest.raises(ConfigError, match="allowed: html, md"):
        report.write_report(DEFENSES, tmp_path / "x", "pdf")


def test_python_dash_m_entry_point(tmp_path: Path, project_root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.report", str(tmp_path / "missing"), "--format", "md"],
        cwd=project_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and "Traceback" not in done.stderr
