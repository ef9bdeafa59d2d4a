"""Attack strength: mean matched PSNR, SSIM and label accuracy of each attack on fixed real test batches.

Every setting (dataset x victim x fl_round x batch size x attack) runs the same `--batches` batches, batch
k drawn from seed k (`select_batch`), so attacks are compared on identical images. fl_round 0 is the
untrained model; a later round is the FedAvg-trained global model (grnn_engine.fl trains and caches it on
first use). Attacks are given as `name` or `name:preset` (`grnn:paper`, `grnn:strong`, `grnn:prior`); others
run with their defaults, recorded under the preset name "default". `grnn:prior` fits its image prior on the
dataset's train split (the batches come from test) on first use and caches it ($GRNN_CACHE_DIR). A setting
that differs from a preset adds its attack parameters and a label to record it under:
`name:preset:key=value[,key=value...]@label`, e.g. `grnn:prior:prior=patch_gmm@gmm` (results `grnn_gmm_...`,
headline `gmm_b1_psnr`); a label is letters, digits and hyphens.

The full grid (CIFAR-10 and MNIST, lenet and resnet18, B = 1, 4, 8, 16, two stages, 16 batches) needs a
GPU; every axis is a flag so that a small subset runs on a CPU, e.g.
    python benchmarks/strength.py --datasets cifar10 --victims lenet --batch-sizes 1 --fl-rounds 0 --batches 4

Prints one row per setting, then one JSON line of
`<attack>_<label>_<victim>_b<B>[_<dataset>][_r<round>]_{psnr,ssim,label_acc}` (the dataset is left out
for cifar10 and the round for round 0, so `grnn_strong_lenet_b4_psnr` is CIFAR-10, untrained lenet).
The headline figures of every GRNN setting measured on CIFAR-10, untrained lenet, are repeated under short
names: `<label>_b<B>_{psnr,ssim,label_acc}` (e.g. `prior_b1_psnr`, `paper_b8_psnr`), with
`<label>_eval_ratio`, its victim-gradient evaluations per trial over the paper preset's. Every PSNR comes
with `..._psnr_se`, the standard error of its mean over the batches (their standard deviation over the square
root of their number): batches differ by several dB, so two means closer than about twice their standard errors
do not tell the settings apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import time
from typing import Any

import torch

from grnn_engine import ATTACKS, TrialSpec, run_trial
from grnn_engine.cli_values import parse_assignments, run_command, user_error
from grnn_engine.errors import ConfigError, DataError

METRICS = ("psnr", "psnr_se", "ssim", "label_acc")  # the figures of every setting in the JSON
DEFAULT_ATTACKS = ["grnn:paper", "grnn:strong", "grnn:prior", "dlg", "idlg", "ig"]
# A result label becomes one "_"-separated part of the result keys, so it holds no "_".
_LABEL = re.compile(r"[A-Za-z0-9-]+")


def parse_attack(text: str) -> tuple[str, str, dict[str, Any]]:
    """'grnn:strong' -> ('grnn', 'strong', {'preset': 'strong'}); 'dlg' -> ('dlg', 'default', {});
    'grnn:prior:prior=patch_gmm,prior_weight=0.03@gmm' -> ('grnn', 'gmm', {'preset': 'prior', 'prior':
    'patch_gmm', 'prior_weight': 0.03}). The middle value is the label results are recorded under."""
    setting, at, label = text.partition("@")
    name, _, rest = setting.partition(":")
    preset, _, assignments = rest.partition(":")
    params: dict[str, Any] = {"preset": preset} if preset else {}
    if assignments:
        params.update(parse_assignments(assignments.split(","), f"--attacks {text}"))
    if at and not _LABEL.fullmatch(label):
        raise ConfigError(f"the label of --attacks {text!r} must be letters, digits and hyphens (got {label!r})")
    if assignments and not at:
        raise ConfigError(f"--attacks {text!r} sets attack parameters, so it needs a label to record them "
                          f"under: add @label (letters, digits and hyphens)")
    return name, label if at else preset or "default", params


def attack_settings(texts: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """The parsed --attacks, each checked by building its attack (a bad name or parameter stops the run
    here, not in every trial), with no two recorded under one label."""
    settings = [parse_attack(text) for text in texts]
    for attack, _, params in settings:
        ATTACKS.create(attack, **params)
    labels = [(attack, label) for attack, label, _ in settings]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"--attacks records two settings under one label ({', '.join(texts)}); "
                          f"give each its own @label")
    return settings


def result_key(attack: str, label: str, victim: str, batch_size: int, dataset: str, fl_round: int) -> str:
    key = f"{attack}_{label}_{victim}_b{batch_size}"
    if dataset != "cifar10":
        key += f"_{dataset}"
    if fl_round:
        key += f"_r{fl_round}"
    return key


def evaluation_ratio(params: dict[str, Any]) -> float:
    """Victim-gradient evaluations of one GRNN trial with `params` over the paper preset's (iterations *
    restarts + refine_iterations: each iteration evaluates the victim's gradient once)."""
    return ATTACKS.create("grnn", **params).iterations / ATTACKS.create("grnn", preset="paper").iterations


def headline(figures: dict[str, float], grnn_params: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The GRNN settings' CIFAR-10 / untrained lenet figures under short names (`prior_b1_psnr`, ...);
    `grnn_params` maps each GRNN label to its attack parameters."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        parts = key.split("_")
        # grnn_<label>_lenet_b<B>_<metric...>: cifar10 and round 0 are the keys without those parts.
        if parts[0] != "grnn" or parts[2] != "lenet" or not parts[3].startswith("b") or not parts[3][1:].isdigit():
            continue
        metric = "_".join(parts[4:])
        if metric in METRICS:
            out[f"{parts[1]}_{parts[3]}_{metric}"] = value
            out[f"{parts[1]}_eval_ratio"] = round(evaluation_ratio(grnn_params[parts[1]]), 4)
    return out


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of `values` (sample standard deviation over root n); NaN below two."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def run_setting(attack: str, params: dict[str, Any], *, dataset: str, data_root: str | None, victim: str,
                fl_round: int, batch_size: int, batches: int, device: str) -> dict[str, float]:
    """Mean psnr (and its standard error) / ssim / label_acc and seconds per trial over batches
    0..batches-1 of one setting."""
    psnr, ssim, acc, seconds, failed = [], [], [], [], 0
    for seed in range(batches):
        spec = TrialSpec(attack=attack, attack_params=params, dataset=dataset, data_root=data_root, victim=victim,
                         fl_round=fl_round, batch_size=batch_size, seed=seed, eval_every=10**9, device=device)
        start = time.perf_counter()
        result = run_trial(spec)
        seconds.append(time.perf_counter() - start)
        if result.status != "COMPLETE":
            failed += 1
            continue
        psnr.append(float(result.metrics["psnr"]))
        ssim.append(float(result.metrics["ssim"]))
        acc.append(float(result.metrics["label_acc"]))
    nan = float("nan")
    return {
        "psnr": statistics.fmean(psnr) if psnr else nan,
        "psnr_se": standard_error(psnr),
        "ssim": statistics.fmean(ssim) if ssim else nan,
        "label_acc": statistics.fmean(acc) if acc else nan,
        "s_per_trial": statistics.fmean(seconds),
        "failed": failed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["cifar10", "mnist"])
    parser.add_argument("--victims", nargs="+", default=["lenet", "resnet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 8, 16])
    parser.add_argument("--fl-rounds", nargs="+", type=int, default=[0, 5])
    parser.add_argument("--batches", type=int, default=16, help="batches per setting (batch k from seed k)")
    parser.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS,
                        help="name, name:preset or name:preset:key=value,...@label")
    parser.add_argument("--data-root", default=os.environ.get("GRNN_DATA_ROOT"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be >= 1 (got {args.batches})")
    try:
        settings = attack_settings(args.attacks)
    except ConfigError as error:
        return user_error(error)
    grnn_params = {label: params for attack, label, params in settings if attack == "grnn"}
    torch.set_num_threads(args.threads)

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else None
    machine = gpu or f"{platform.processor() or platform.machine()} CPU, {args.threads} thread(s)"
    print(f"# {datetime.date.today().isoformat()}  {platform.node()}  {machine}  torch {torch.__version__}")
    print(f"# {args.batches} batches per setting (seeds 0..{args.batches - 1}), data root {args.data_root}")
    header = f"{'dataset':8} {'victim':9} {'round':>5} {'B':>3} {'attack':8} {'label':8} " \
             f"{'psnr':>6} {'+-se':>5} {'ssim':>6} {'labels':>6} {'s/trial':>8}"
    print(header)
    figures: dict[str, float] = {}
    try:
        for dataset in args.datasets:
            for victim in args.victims:
                for fl_round in args.fl_rounds:
                    for batch_size in args.batch_sizes:
                        for attack, label, params in settings:
                            s = run_setting(attack, params, dataset=dataset, data_root=args.data_root,
                                            victim=victim, fl_round=fl_round, batch_size=batch_size,
                                            batches=args.batches, device=args.device)
                            key = result_key(attack, label, victim, batch_size, dataset, fl_round)
                            for metric in METRICS:
                                figures[f"{key}_{metric}"] = round(s[metric], 4)
                            note = f"  ({s['failed']} failed)" if s["failed"] else ""
                            print(f"{dataset:8} {victim:9} {fl_round:5d} {batch_size:3d} {attack:8} {label:8} "
                                  f"{s['psnr']:6.2f} {s['psnr_se']:5.2f} {s['ssim']:6.3f} {s['label_acc']:6.2f} "
                                  f"{s['s_per_trial']:8.1f}{note}", flush=True)
    except (ConfigError, DataError) as error:
        return user_error(error)
    print(json.dumps({**headline(figures, grnn_params), **figures}))
    return 0


if __name__ == "__main__":
    run_command(main)
