"""A peer side by side: breaching's DLG and Inverting Gradients against this project's, on the same case.

breaching (Geiping et al., `pip install breaching`) is the most used gradient-inversion library. For each
seed, this script prepares one trial exactly as a sweep would (grnn_engine.trial.prepare_trial: real test
images drawn by the seed, the untrained victim built from the seed, the client's FedSGD gradient), saves
the victim's weights, the batch and the gradient, and runs
- ours: grnn_engine.run_trial on that TrialSpec (it rebuilds the same case);
- breaching's: benchmarks/peers_breaching.py in the environment where breaching is installed (a separate
  one: `--peer-python`, default $GRNN_PEERS_PYTHON, else /work/peers-venv/bin/python), on the saved case.
Both reconstructions are scored here with the same metric (mean matched PSNR, grnn_engine.metrics), and both
are timed the same way (attack seconds / attack iterations; an L-BFGS iteration is one step of up to 20
evaluations in both). Each library keeps its own attack settings except the iteration counts, which are set
equal (DLG 300 L-BFGS steps, IG 4800 Adam steps: this project's defaults).

Prints one row per attack and seed, then one JSON line:
{"breaching_ig_psnr", "ours_ig_psnr", "breaching_ig_ms", "ours_ig_ms", "breaching_dlg_psnr", ...} (means over
seeds; ms per iteration), with per-seed lists under "per_seed". `--figure PATH` also saves a bar chart.

    python benchmarks/peers.py --seeds 0 1 2 --figure docs/images/peers.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import tempfile
from typing import Any

import torch

from grnn_engine import TrialSpec, run_trial
from grnn_engine.cli_values import OneLineParser, run_command, user_error
from grnn_engine.errors import ConfigError, DataError
from grnn_engine.metrics import matched_psnr
from grnn_engine.trial import prepare_trial

HERE = pathlib.Path(__file__).resolve().parent
DEFAULT_PEER_PYTHON = "/work/peers-venv/bin/python"
ITERATIONS = {"dlg": 300, "ig": 4800}


def trial_spec(attack: str, seed: int, args: argparse.Namespace) -> TrialSpec:
    return TrialSpec(
        attack=attack, attack_params={"iterations": args.iterations[attack]}, victim=args.victim,
        dataset=args.dataset, data_root=args.data_root, split="test", image_size=32,
        batch_size=args.batch_size, seed=seed, eval_every=args.iterations[attack], device="cpu",
    )  # fmt: skip


def save_case(spec: TrialSpec, path: pathlib.Path) -> torch.Tensor:
    """The case breaching attacks: the victim's weights, the private batch and the client's gradient."""
    prepared = prepare_trial(spec)
    torch.save(
        {
            "victim": spec.victim, "num_classes": prepared.num_classes, "image_size": spec.image_size,
            "state_dict": {k: v.detach().cpu() for k, v in prepared.model.state_dict().items()},
            "images": prepared.images.cpu(), "labels": prepared.labels.cpu(),
            "gradients": [g.cpu() for g in prepared.shared.tensors],
        },
        path,
    )  # fmt: skip
    return prepared.images.cpu()


def run_breaching(case: pathlib.Path, attack: str, iterations: int, peer_python: str) -> dict[str, Any]:
    out = case.with_suffix(f".{attack}.out.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [peer_python, str(HERE / "peers_breaching.py"), str(case), str(out), attack, str(iterations)],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"breaching's {attack} failed (exit {done.returncode}): {tail[0]}")
    return torch.load(out, weights_only=True)


def compare(args: argparse.Namespace) -> dict[str, Any]:
    per_seed: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="grnn-peers-") as tmp:
        for attack in args.attacks:
            for seed in args.seeds:
                spec = trial_spec(attack, seed, args)
                case = pathlib.Path(tmp) / f"case-{attack}-{seed}.pt"
                truth = save_case(spec, case)
                peer = run_breaching(case, attack, args.iterations[attack], args.peer_python)
                ours = run_trial(spec)
                if ours.status != "COMPLETE":
                    raise RuntimeError(f"our {attack} trial {ours.status}: {ours.error}")
                figures = {
                    f"breaching_{attack}_psnr": matched_psnr(peer["images"].float().clamp(0, 1), truth),
                    f"ours_{attack}_psnr": float(ours.metrics["psnr"]),
                    f"breaching_{attack}_ms": 1000 * float(peer["seconds"]) / int(peer["iterations"]),
                    f"ours_{attack}_ms": 1000 * float(ours.s_per_iter or 0.0),
                }
                for key, value in figures.items():
                    per_seed.setdefault(key, []).append(round(value, 3))
                print(f"{attack} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    means = {key: round(statistics.fmean(values), 3) for key, values in per_seed.items()}
    return {
        **means, "per_seed": per_seed, "seeds": args.seeds, "batch_size": args.batch_size, "victim": args.victim,
        "dataset": args.dataset, "iterations": args.iterations, "torch_threads": 1,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "date": datetime.date.today().isoformat(),
    }  # fmt: skip


def save_figure(summary: dict[str, Any], path: pathlib.Path, attacks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_psnr, ax_ms) = plt.subplots(1, 2, figsize=(9, 3.4))
    width = 0.38
    for i, who in enumerate(("ours", "breaching")):
        xs = [a + (i - 0.5) * width for a in range(len(attacks))]
        ax_psnr.bar(xs, [summary[f"{who}_{a}_psnr"] for a in attacks], width, label=who)
        for x, a in zip(xs, attacks, strict=True):
            ax_psnr.plot([x] * len(summary["per_seed"][f"{who}_{a}_psnr"]), summary["per_seed"][f"{who}_{a}_psnr"],
                         "k.", markersize=4)  # fmt: skip
        ax_ms.bar(xs, [summary[f"{who}_{a}_ms"] for a in attacks], width, label=who)
    for ax, label in ((ax_psnr, "mean matched PSNR (dB)"), (ax_ms, "ms per iteration")):
        ax.set_xticks(range(len(attacks)), [a.upper() for a in attacks])
        ax.set_ylabel(label)
    ax_psnr.legend()
    fig.suptitle(f"{summary['victim']} on {summary['dataset']} test images, batch {summary['batch_size']}, "
                 f"seeds {summary['seeds']} (1 thread, {summary['date']})", fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--attacks", nargs="+", choices=sorted(ITERATIONS), default=["dlg", "ig"])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--victim", default="lenet")
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=None, help="default: $GRNN_DATA_ROOT")
    p.add_argument("--dlg-iterations", type=int, default=ITERATIONS["dlg"])
    p.add_argument("--ig-iterations", type=int, default=ITERATIONS["ig"])
    p.add_argument("--peer-python", default=os.environ.get("GRNN_PEERS_PYTHON", DEFAULT_PEER_PYTHON),
                   help="python of the environment where breaching is installed")  # fmt: skip
    p.add_argument("--figure", type=pathlib.Path, default=None, help="also save a bar chart here")
    args = p.parse_args(argv)
    args.iterations = {"dlg": args.dlg_iterations, "ig": args.ig_iterations}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not pathlib.Path(args.peer_python).exists():
        return user_error(ConfigError(
            f"--peer-python {args.peer_python!r} does not exist; install breaching into a separate environment "
            "and point --peer-python (or $GRNN_PEERS_PYTHON) at its python"
        ))
    torch.set_num_threads(1)
    try:
        summary = compare(args)
    except (ConfigError, DataError, RuntimeError) as exc:
        return user_error(exc)
    if args.figure is not None:
        save_figure(summary, args.figure, args.attacks)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    run_command(main)
