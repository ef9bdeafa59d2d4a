"""iDLG: improved Deep Leakage from Gradients (Zhao, Mopuri and Bilen, 2020).

The labels are read off the shared gradient of the final linear layer (exact for one image; a
count-based estimate for larger batches, see `infer_labels`), then only the dummy images are fitted,
with DLG's L-BFGS loop and defaults, against the victim's gradient on those hard labels.
"""

from __future__ import annotations

from torch import nn

from grnn_engine.attacks.base import (
    ATTACKS,
    AttackInputs,
    Reconstruction,
    labels_from_gradient,
    random_start,
)
from grnn_engine.attacks.dlg import LbfgsAttack, lbfgs_gradient_matching


@ATTACKS.register("idlg")
class IDLG(LbfgsAttack):
    """iDLG with DLG's L-BFGS defaults (see LbfgsAttack)."""

    name = "idlg"

    def _run(self, model: nn.Module, inputs: AttackInputs) -> Reconstruction:
        labels = labels_from_gradient(model, inputs.target, batch_size=inputs.batch_size,
                                      image_shape=inputs.image_shape, generator=inputs.generator)  # fmt: skip
        dummy = random_start((inputs.batch_size, *inputs.image_shape), inputs.generator, like=inputs.params[0])
        (images,), history = lbfgs_gradient_matching(
            model, inputs, dummy, logits=None, labels=labels, iterations=self.iterations, max_iter=self.max_iter,
            lr=self.lr,
        )
        return Reconstruction(images=images.clamp(0, 1), labels=labels.long(), history=history)
