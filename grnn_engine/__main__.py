"""`python -m grnn_engine`: run one attack trial and print ONE JSON line with its result.

Example:
  python -m grnn_engine --attack grnn --victim lenet --dataset cifar10 --data-root ../shared/data \\
      --batch-size 4 --iterations 1000 --seed 0 --out out/trial

Face re-identification (datasets of people: att_faces, identities) adds the reid columns of a sweep row:
  python -m grnn_engine --dataset att_faces --data-root ../shared/data --reid trained
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from grnn_engine.cli_values import OneLineParser, run_command, user_error
from grnn_engine.errors import ConfigError, GrnnError
from grnn_engine.trial_spec import SEED_MAX  # noqa: E402  (the bound the sweep spec uses too)


def build_parser() -> argparse.ArgumentParser:
    from grnn_engine import ATTACKS, DATASETS, DEFENSES, VICTIMS
    from grnn_engine.reid import IDENTIFIERS, IDENTITY_DATASETS

    p = OneLineParser(prog="python -m grnn_engine", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attack", default="grnn", help=f"attack: {', '.join(ATTACKS.names())} (default grnn)")
    p.add_argument("--victim", default="lenet",
                   help=f"victim model: {', '.join(VICTIMS.names())}, or your own as an import path "
                   "'package.module:callable' returning a torch.nn.Module (default lenet)")
    p.add_argument("--dataset", default="digits", help=f"dataset: {', '.join(DATASETS.names())} (default digits)")
    p.add_argument("--data-root", default=None, help="data folder (default: $GRNN_DATA_ROOT, else ~/.cache/grnn/data)")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs network)")
    p.add_argument("--split", default="test", choices=["train", "test", "all"], help="split the private batch comes from")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--batch-size", type=int, default=1, help="images in the client's private batch (default 1)")
    p.add_argument("--index", type=int, action="append", dest="indices",
                   help="dataset index of a batch image (repeatable; replaces the seeded choice)")
    p.add_argument("--distinct-labels", action="store_true", help="choose a batch with distinct labels")
    p.add_argument("--iterations", type=int, default=None, help="attack iterations (default: the attack's own)")
    p.add_argument("--attack-param", action="append", metavar="KEY=VALUE", help="attack setting (repeatable)")
    p.add_argument("--victim-param", action="append", metavar="KEY=VALUE", help="victim setting (repeatable)")
    p.add_argument("--fl-round", type=int, default=0, help="FedAvg round of the attacked global model (0 = untrained)")
    p.add_argument("--fl-param", action="append", metavar="KEY=VALUE", help="FedAvg training setting (repeatable)")
    p.add_argument("--update", default="fedsgd", choices=["fedsgd", "fedavg"], help="what the client shares")
    p.add_argument("--local-steps", type=int, default=None, help="fedavg: local SGD steps")
    p.add_argument("--local-lr", type=float, default=None, help="fedavg: local learning rate")
    p.add_argument("--defense", default="none", help=f"defense: {', '.join(DEFENSES.names())} (default none)")
    p.add_argument("--defense-param", action="append", metavar="KEY=VALUE", help="defense setting (repeatable)")
    p.add_argument("--reid", default=None, metavar="IDENTIFIER",
                   help=f"re-identify the reconstructed faces with identifier {' or '.join(IDENTIFIERS.names())} "
                        f"(datasets {', '.join(IDENTITY_DATASETS)}): adds reid_top1, reid_top5, reid_rank and the "
                        f"clean-photo ceiling (reid_clean_*) and random floor (reid_random_*)")
    p.add_argument("--reid-param", action="append", metavar="KEY=VALUE",
                   help="identifier setting, e.g. epochs=30 (repeatable; needs --reid)")
    p.add_argument("--seed", type=int, default=0, help="seed of the batch choice and the attack (default 0)")
    p.add_argument("--success-psnr", type=float, default=20.0, help="PSNR (dB) counted as success (default 20)")
    p.add_argument("--eval-every", type=int, default=50, help="log gradient loss and PSNR every N iterations")
    p.add_argument("--device", default="auto", help="auto (GPU if visible), cpu, cuda, cuda:N")
    p.add_argument("--out", type=Path, default=None, help="folder for result.json and reconstruction.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def spec_from_args(args: argparse.Namespace) -> Any:
    from grnn_engine.cli_values import parse_assignments
    from grnn_engine.trial_spec import TrialSpec
    from grnn_engine.victims import victim_fingerprint

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.image_size < 8:
        raise ConfigError(f"--image-size must be >= 8 (got {args.image_size})")
    if args.eval_every < 1:
        raise ConfigError(f"--eval-every must be >= 1 (got {args.eval_every})")
    if args.fl_round < 0:
        raise ConfigError(f"--fl-round must be >= 0 (got {args.fl_round})")
    if not 0 <= args.seed <= SEED_MAX:
        raise ConfigError(f"--seed must be in 0..{SEED_MAX} (got {args.seed})")
    if not math.isfinite(args.success_psnr):
        raise ConfigError(f"--success-psnr must be a finite number of dB (got {args.success_psnr})")
    if args.local_lr is not None and not (math.isfinite(args.local_lr) and args.local_lr > 0):
        raise ConfigError(f"--local-lr must be a finite number > 0 (got {args.local_lr})")
    attack_params = parse_assignments(args.attack_param, "--attack-param")
    if args.iterations is not None:
        if args.iterations < 1:
            raise ConfigError(f"--iterations must be >= 1 (got {args.iterations})")
        attack_params["iterations"] = args.iterations
    update_params: dict[str, Any] = {}
    if args.local_steps is not None:
        update_params["local_steps"] = args.local_steps
    if args.local_lr is not None:
        update_params["local_lr"] = args.local_lr
    if update_params and args.update != "fedavg":
        raise ConfigError("--local-steps and --local-lr apply only with --update fedavg")
    reid_params = parse_assignments(args.reid_param, "--reid-param")
    if reid_params and args.reid is None:
        raise ConfigError("--reid-param applies only with --reid (e.g. --reid trained)")
    victim_params = parse_assignments(args.victim_param, "--victim-param")
    return TrialSpec(
        attack=args.attack, attack_params=attack_params, victim=args.victim,
        victim_params=victim_params, dataset=args.dataset,
        data_root=args.data_root, download=args.download, split=args.split, image_size=args.image_size,
        batch_size=args.batch_size, indices=args.indices, distinct_labels=args.distinct_labels,
        fl_round=args.fl_round, fl=parse_assignments(args.fl_param, "--fl-param"), update=args.update,
        update_params=update_params, defense=args.defense,
        defense_params=parse_assignments(args.defense_param, "--defense-param"), seed=args.seed,
        success_psnr=args.success_psnr, eval_every=args.eval_every, device=args.device,
        reid=args.reid, reid_params=reid_params,
        victim_fingerprint=victim_fingerprint(args.victim, victim_params, args.image_size),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except GrnnError as exc:
        return user_error(exc)


def _run(args: argparse.Namespace) -> int:
    from grnn_engine import ATTACKS, run_trial

    spec = spec_from_args(args)
    ATTACKS.create(spec.attack, **spec.attack_params)  # fail on bad settings before loading anything
    check_reid(spec)
    if args.out is not None:
        _prepare_out(args.out)  # an unusable --out must fail now, not after the attack ran
    bar = None
    if sys.stderr.isatty() and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=None, unit="it", desc=spec.attack, file=sys.stderr)

    def progress(info: dict[str, Any]) -> None:
        if bar is not None:
            bar.total = info["iterations"]
            bar.n = info["iteration"]
            shown = {k: f"{info[k]:.3g}" for k in ("grad_loss", "psnr") if k in info}
            bar.set_postfix(shown, refresh=True)

    try:
        result = run_trial(spec, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    row = result.to_row()
    line = {
        **row,
        "labels_true": row["labels_true"],
        "labels_recovered": row["labels_recovered"],
        "versions": {k: row[k] for k in ("torch_version", "project_version", "git_sha")},
    }
    line.pop("history_json")
    line["history"] = result.history
    if args.out is not None:
        try:
            (args.out / "result.json").write_text(json.dumps(line, indent=2) + "\n")
            if result.image_png is not None:
                (args.out / "reconstruction.png").write_bytes(result.image_png)
        except OSError as err:  # e.g. the disk filled up during the trial
            raise ConfigError(f"--out {args.out}: cannot write the result files ({err.strerror or err})") from None
    line.pop("history")
    print(json.dumps(line))
    return 0 if result.status == "COMPLETE" else 1


def check_reid(spec: Any) -> None:
    """ConfigError for a --reid the trial cannot run: an unknown identifier, a bad --reid-param, the dlib
    identifier without its extra, or a dataset whose labels are not people. Nothing is loaded or trained."""
    if spec.reid is None:
        return
    from grnn_engine.reid import IDENTIFIERS, check_identity_dataset

    IDENTIFIERS.create(spec.reid, **spec.reid_params)
    check_identity_dataset(spec.dataset)


def _prepare_out(out: Path) -> None:
    """Create the --out folder, or raise ConfigError with one sentence when it cannot be used."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for result.json and reconstruction.png")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--out {out} cannot be created ({err.strerror or err}); give a writable folder") from None


if __name__ == "__main__":
    run_command(main)
