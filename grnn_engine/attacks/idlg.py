"""iDLG: improved Deep Leakage from Gradients (Zhao, Mopuri and Bilen, 2020).

The labels are read off the shared gradient of the final linear layer (exact for one image; a
count-based estimate for larger batches, see `infer_labels`), then only the dummy images are fitted,
with DLG's L-BFGS loop and defaults, against the victim's gradient on those hard labels.
"""

from __future__ import annotations

import torch
from torch import nn

from grnn_engine.attacks.base import (
    ATTACKS,
    Attack,
    EvaluateFn,
    ProgressFn,
    Reconstruction,
    SharedUpdate,
    check_reconstruct_args,
    labels_from_gradient,
    trainable_parameters,
)
from grnn_engine.attacks.dlg import check_lbfgs_settings, lbfgs_gradient_matching


@ATTACKS.register("idlg")
class IDLG(Attack):
    """iDLG with DLG's L-BFGS defaults: iterations (steps), max_iter (evaluations per step), lr."""

    def __init__(self, *, iterations: int = 300, max_iter: int = 20, lr: float = 1.0) -> None:
        check_lbfgs_settings("idlg", iterations, max_iter, lr)
        self.iterations = iterations
        self.max_iter = max_iter
        self.lr = lr

    def reconstruct(
        self,
        model: nn.Module,
        shared_update: SharedUpdate,
        *,
        num_classes: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        generator: torch.Generator,
        progress: ProgressFn | None = None,
        evaluate: EvaluateFn | None = None,
        eval_every: int = 50,
    ) -> Reconstruction:
        params = trainable_parameters(model)
        shared = shared_update.as_gradient()
        check_reconstruct_args("idlg", shared, params, batch_size=batch_size, eval_every=eval_every)
        device, dtype = params[0].device, params[0].dtype
        target = [t.detach().to(device=device, dtype=dtype) for t in shared]
        labels = labels_from_gradient(
            model, target, batch_size=batch_size, image_shape=image_shape, generator=generator
        )
        dummy = torch.randn((batch_size, *image_shape), generator=generator).to(device, dtype).requires_grad_()
        (images,), history = lbfgs_gradient_matching(
            model, params, target, dummy, logits=None, labels=labels, iterations=self.iterations,
            max_iter=self.max_iter, lr=self.lr, eval_every=eval_every, evaluate=evaluate, progress=progress,
        )
        return Reconstruction(images=images.clamp(0, 1), labels=labels.long(), history=history)
