"""Engine speed: each attack's time per iteration against the floor no gradient-matching attack avoids.

The floor is one forward of the victim on the batch, its gradient with create_graph, and the backward of
a gradient distance to the input: the least a gradient-matching iteration does. GRNN also runs its
generator, so it gets a second ratio against the floor plus the generator's own forward, backward and
optimizer step (`own_ratio`). L-BFGS attacks (dlg, idlg) are timed with max_iter=1 so that one iteration is
one gradient evaluation. Times are medians over repeats; per-iteration time is taken from two runs of
different length, so one-off set-up (label inference, initialisation) cancels out.

Usage: python benchmarks/engine.py [--victims lenet resnet18] [--batch-sizes 1 8] [--device cpu]
Ends with one JSON line: {"<attack>_<victim>_b<B>_ratio": ..., "grnn_<victim>_b<B>_own_ratio": ...}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from grnn_engine import ATTACKS
from grnn_engine.attacks.base import (
    SharedUpdate,
    squared_gradient_distance,
    trainable_parameters,
    victim_gradient,
)
from grnn_engine.attacks.grnn import GrnnGenerator
from grnn_engine.cli_values import run_command
from grnn_engine.data import load_dataset, select_batch
from grnn_engine.victims import create_victim

LBFGS_ATTACKS = {"dlg", "idlg"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def floor_seconds(model: torch.nn.Module, images: torch.Tensor, target: list[torch.Tensor], labels: torch.Tensor,
                  device: torch.device, iters: int, repeats: int) -> float:
    params = trainable_parameters(model)
    dummy = images.clone().requires_grad_(True)

    def run() -> None:
        for _ in range(iters):
            fake = victim_gradient(model, params, dummy, labels, create_graph=True)
            torch.autograd.grad(squared_gradient_distance(fake, target), [dummy])

    run()
    return _time(run, device, repeats) / iters


def generator_seconds(batch: int, num_classes: int, device: torch.device, iters: int, repeats: int) -> float:
    net = GrnnGenerator(noise_dim=128, num_classes=num_classes, image_shape=(3, 32, 32)).to(device)
    weights = list(net.parameters())
    optimizer = torch.optim.RMSprop(weights, lr=1e-4, momentum=0.99)
    z = torch.randn(batch, 128, device=device)

    def run() -> None:
        for _ in range(iters):
            images, labels = net(z)
            for w, g in zip(weights, torch.autograd.grad(images.sum() + labels.sum(), weights), strict=True):
                w.grad = g
            optimizer.step()

    run()
    return _time(run, device, repeats) / iters


def attack_seconds(name: str, model: torch.nn.Module, update: SharedUpdate, batch: int, device: torch.device,
                   iters: int, repeats: int) -> float:
    extra = {"max_iter": 1} if name in LBFGS_ATTACKS else {}

    def run_for(n: int) -> Callable[[], None]:
        attack = ATTACKS.create(name, iterations=n, **extra)
        return lambda: attack.reconstruct(model, update, num_classes=10, batch_size=batch, image_shape=(3, 32, 32),
                                          generator=torch.Generator().manual_seed(0), eval_every=10**9)

    short, long = run_for(2), run_for(2 + iters)
    long()
    return (_time(long, device, repeats) - _time(short, device, repeats)) / iters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--victims", nargs="+", default=["lenet", "resnet18"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--attacks", nargs="+", default=ATTACKS.names())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (a trial gets its granted CPUs)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device {device} ({name}), torch {torch.__version__}, {args.threads} thread(s)")
    data = load_dataset("digits", split="test", image_size=32)
    figures: dict[str, float] = {}
    print(f"{'attack':6} {'victim':9} {'B':>3} {'ms/iter':>9} {'floor ms':>9} {'ratio':>6} {'own ratio':>9}")
    for victim in args.victims:
        # ResNet-18 on a CPU is slow: fewer iterations per timing keep the whole run in minutes.
        iters = 3 if victim.startswith("resnet") and device.type == "cpu" else 20
        for batch in args.batch_sizes:
            images, labels, _ = select_batch(data, batch, 0)
            images, labels = images.to(device), labels.to(device)
            model = create_victim(victim, num_classes=10, seed=0).to(device)
            grads = victim_gradient(model, trainable_parameters(model), images, labels, create_graph=False)
            update = SharedUpdate(tensors=tuple(g.detach() for g in grads))
            floor = floor_seconds(model, images, list(update.tensors), labels, device, iters, args.repeats)
            gen = generator_seconds(batch, 10, device, iters, args.repeats)
            for attack in args.attacks:
                per_iter = attack_seconds(attack, model, update, batch, device, iters, args.repeats)
                key = f"{attack}_{victim}_b{batch}"
                figures[f"{key}_ratio"] = round(per_iter / floor, 3)
                own = ""
                if attack == "grnn":
                    figures[f"{key}_own_ratio"] = round(per_iter / (floor + gen), 3)
                    own = f"{figures[f'{key}_own_ratio']:9.2f}"
                print(f"{attack:6} {victim:9} {batch:3d} {per_iter * 1e3:9.2f} {floor * 1e3:9.2f} "
                      f"{figures[f'{key}_ratio']:6.2f} {own:>9}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    run_command(main)
