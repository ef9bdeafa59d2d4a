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
    EvaluateFn,
    ProgressFn,
    Reconstruction,
    SharedUpdate,
    attack_inputs,
    labels_from_gradient,
    random_start,
)
from grnn_engine.attacks.dlg import LbfgsAttack, lbfgs_gradient_matching


@ATTACKS.register("idlg")
class IDLG(LbfgsAttack):
    """iDLG with DLG's L-BFGS defaults (see LbfgsAttack)."""

    name = "idlg"

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
        params, target = attack_inputs("idlg", model, shared_update, batch_size=batch_size, eval_every=eval_every)
        labels = labels_from_gradient(
            model, target, batch_size=batch_size, image_shape=image_shape, generator=generator
        )
        dummy = random_start((batch_size, *image_shape), generator, like=params[0])
        (images,), history = lbfgs_gradient_matching(
            model, params, target, dummy, logits=None, labels=labels, iterations=self.iterations,
            max_iter=self.max_iter, lr=self.lr, eval_every=eval_every, evaluate=evaluate, progress=progress,
        )
        return Reconstruction(images=images.clamp(0, 1), labels=labels.long(), history=history)
