"""Face re-identification of gradient-inversion reconstructions: the rate behind the faces sweep's headline.

Attacks one held-out photo of each person of att_faces (photo 9 or 10 of s1..s40: unseen photos of known
people, never in the identifier's gallery) at batch size 1, through `run_trial` with `reid` set, exactly
as a sweep cell does. Every reconstruction is then re-identified by identifiers trained with several
seeds (the trial's own reid columns use the trial seed's), so the rate's spread over identifier seeds is
measured on the same reconstructions. For each identifier seed: top-1 / top-5 of the reconstructions,
of the clean photos (the ceiling) and of uniform noise (the floor), over all attacked photos.

    python benchmarks/faces.py                       # 40 photos (photo 10), GRNN 1000 iterations, LeNet
    python benchmarks/faces.py --people 20 --photo 9 --identifier-seeds 0 1 2

The reconstructions are re-scored from the trial's PNG (8-bit), so the trial-seed identifier's rate is
also printed from the trial rows themselves, as a check. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

from grnn_engine import TrialSpec, run_trial
from grnn_engine.cli_values import run_command, user_error
from grnn_engine.data import load_dataset
from grnn_engine.errors import ConfigError, DataError
from grnn_engine.reid import fit_identifier, reid_metrics

# FedAvg settings of sweeps/faces.yaml, for --fl-round > 0.
FACES_FL = {"clients": 4, "local_epochs": 5, "local_batch_size": 8, "local_lr": 0.5}
PEOPLE = 40


def reconstruction_of(png: bytes, size: int) -> torch.Tensor:
    """The matched reconstruction (3, S, S) of a batch-1 trial: the bottom image of its truth/recon grid."""
    array = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype("float32") / 255.0
    return torch.from_numpy(array[4 + size : 4 + 2 * size, 2 : 2 + size].copy()).permute(2, 0, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--photo", type=int, choices=(9, 10), default=10, help="which photo of each person")
    parser.add_argument("--people", type=int, default=PEOPLE, help="attack s1..sN (at most 40)")
    parser.add_argument("--identifier-seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--attack", default="grnn")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--victim", default="lenet")
    parser.add_argument("--fl-round", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--seed", type=int, default=0, help="the trials' seed (attack start, trial identifier)"
    )
    parser.add_argument("--data-root", default=os.environ.get("GRNN_DATA_ROOT"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not 1 <= args.people <= PEOPLE:
        parser.error(f"--people must be in 1..{PEOPLE} (got {args.people})")
    torch.set_num_threads(args.threads)
    size = args.image_size
    print(f"# {datetime.date.today().isoformat()}  {platform.node()}  torch {torch.__version__}  "
          f"{args.threads} thread(s)  data root {args.data_root}")  # fmt: skip
    try:
        test = load_dataset("att_faces", root=args.data_root, split="test", image_size=size)
        indices = [2 * p + (args.photo - 9) for p in range(args.people)]  # test split: photos 9, 10 of each
        recons, psnrs, trial_top1, seconds = [], [], [], []
        print(f"{'person':7} {'psnr':>6} {'rank':>5} {'s':>6}")
        for index in indices:
            spec = TrialSpec(
                dataset="att_faces", data_root=args.data_root, split="test", image_size=size, batch_size=1,
                indices=[index], victim=args.victim, fl_round=args.fl_round,
                fl=FACES_FL if args.fl_round else {}, attack=args.attack,
                attack_params={"iterations": args.iterations}, eval_every=max(1, args.iterations // 10),
                seed=args.seed, device=args.device, reid="trained",
            )  # fmt: skip
            start = time.perf_counter()
            result = run_trial(spec)
            seconds.append(time.perf_counter() - start)
            if result.status != "COMPLETE" or result.image_png is None:
                print(f"error: trial on photo {index} ended {result.status}: {result.error}", file=sys.stderr)
                return 1
            recons.append(reconstruction_of(result.image_png, size))
            psnrs.append(float(result.metrics["psnr"]))
            trial_top1.append(float(result.metrics["reid_top1"]))
            rank = result.metrics["reid_rank_per_image"][0]
            print(
                f"{test.classes[int(test.labels[index])]:7} {psnrs[-1]:6.2f} {rank:5d} {seconds[-1]:6.1f}",
                flush=True,
            )

        truth, labels = test.load(indices), test.labels[indices]
        key = f"faces_{args.attack}_{args.victim}_b1_r{args.fl_round}"
        figures: dict[str, float] = {
            f"{key}_photos": len(indices),
            f"{key}_psnr": round(statistics.fmean(psnrs), 3),
            f"{key}_trial_reid_top1": round(statistics.fmean(trial_top1), 4),
        }
        print(f"\n{len(indices)} photos (photo {args.photo}), mean PSNR {statistics.fmean(psnrs):.2f} dB, "
              f"{statistics.fmean(seconds):.1f} s per trial; top-1 of the trials' own rows "
              f"(identifier seed {args.seed}): {statistics.fmean(trial_top1):.3f}")  # fmt: skip
        print(f"{'id seed':7} {'top1':>5} {'top5':>5} {'rank':>5} | clean {'top1':>5} {'top5':>5} | "
              f"noise {'top1':>5} {'top5':>5} | held-out top1")  # fmt: skip
        for id_seed in args.identifier_seeds:
            identifier = fit_identifier(
                "trained", {}, dataset="att_faces", image_size=size, split="test", indices=indices,
                seed=id_seed, root=args.data_root,
            )  # fmt: skip
            m = reid_metrics(identifier, torch.stack(recons), truth, labels, seed=args.seed)
            print(f"{id_seed:7d} {m['reid_top1']:5.3f} {m['reid_top5']:5.3f} {m['reid_rank']:5.2f} | "
                  f"clean {m['reid_clean_top1']:5.3f} {m['reid_clean_top5']:5.3f} | noise "
                  f"{m['reid_random_top1']:5.3f} {m['reid_random_top5']:5.3f} | {identifier.heldout_top1:.3f}")  # fmt: skip
            for column in ("reid_top1", "reid_top5", "reid_rank", "reid_clean_top1", "reid_random_top1"):
                figures[f"{key}_{column}_id{id_seed}"] = round(float(m[column]), 4)
    except (ConfigError, DataError) as error:
        return user_error(error)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    run_command(main)
