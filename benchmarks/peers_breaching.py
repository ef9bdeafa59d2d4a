"""The breaching side of benchmarks/peers.py: run one of breaching's attacks on a case saved by peers.py.

Runs in the environment where `breaching` (pip install breaching, Geiping et al.'s library) is installed,
never in the project's: peers.py starts it as a subprocess with that environment's python. It reads the
case (victim weights, private batch, the client's gradient), builds the same victim with
grnn_engine.victims.create_victim (the repository is on PYTHONPATH), runs breaching's `deepleakage` or
`invertinggradients` attack with breaching's own settings except the iteration count, and writes the
reconstruction and the attack's seconds. The reconstruction is scored by peers.py, with the project's metric.

    python benchmarks/peers_breaching.py CASE.pt OUT.pt {dlg,ig} ITERATIONS
"""

from __future__ import annotations

import logging
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=FutureWarning)  # breaching's torch.jit.script at import
logging.disable(logging.INFO)  # breaching logs every `callback` iterations

import breaching  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from grnn_engine.victims import create_victim  # noqa: E402

# breaching's attack configurations: DLG (joint L-BFGS on images and labels) and Inverting Gradients.
CONFIGS = {"dlg": "deepleakage", "ig": "invertinggradients"}


def main(argv: list[str]) -> int:
    case_path, out_path, attack, iterations = argv[0], argv[1], argv[2], int(argv[3])
    torch.set_num_threads(1)
    case = torch.load(case_path, weights_only=True)
    images: torch.Tensor = case["images"]
    batch, channels, height, width = images.shape
    model = create_victim(
        case["victim"], num_classes=int(case["num_classes"]), image_size=int(case["image_size"])
    )
    model.load_state_dict(case["state_dict"])
    model.eval()

    cfg = breaching.get_attack_config(CONFIGS[attack], overrides=[f"optim.max_iterations={iterations}"])
    setup = {"device": torch.device("cpu"), "dtype": torch.float}
    attacker = breaching.attacks.prepare_attack(model, torch.nn.CrossEntropyLoss(), cfg, setup)
    # The project's images are not normalised: mean 0 and std 1 make breaching's box [0, 1].
    metadata = OmegaConf.create({
        "modality": "vision", "task": "classification", "shape": [channels, height, width], "classes": int(case["num_classes"]),
        "mean": [0.0] * channels, "std": [1.0] * channels,
    })  # fmt: skip
    payload = [{"parameters": [p.detach().clone() for p in model.parameters()], "buffers": None,
                "metadata": metadata}]  # fmt: skip
    # Labels are not given: DLG optimises them jointly, IG infers them from the gradient (breaching's default).
    shared = [{"gradients": [g.clone() for g in case["gradients"]], "buffers": None,
               "metadata": {"num_data_points": batch, "labels": None, "local_hyperparams": None}}]  # fmt: skip
    start = time.perf_counter()
    reconstruction, _ = attacker.reconstruct(payload, shared, {}, dryrun=False)
    seconds = time.perf_counter() - start
    torch.save({"images": reconstruction["data"].detach().cpu(), "labels": reconstruction["labels"].cpu(),
                "seconds": seconds, "iterations": iterations}, out_path)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
