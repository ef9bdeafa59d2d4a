"""`trained`: the face identifier the project trains itself, a small CNN on faces shrunk to 12x12."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from grnn_engine.errors import ConfigError
from grnn_engine.reid.gallery import Gallery
from grnn_engine.reid.identifier import IDENTIFIERS, Identifier

__all__ = ["TrainedIdentifier"]


def _standardise(images: Tensor, size: int) -> Tensor:
    """Resize to size x size and give each image zero mean and unit variance: brightness and contrast
    are not identity, and reconstructions often get them slightly wrong."""
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    flat = images.flatten(1)
    mean = flat.mean(dim=1).view(-1, 1, 1, 1)
    std = flat.std(dim=1).clamp(min=1e-3).view(-1, 1, 1, 1)
    return (images - mean) / std


class _EmbeddingNet(nn.Module):
    """Three conv blocks, global average pooling, a linear embedding; a linear head for training only."""

    def __init__(self, width: int, embed_dim: int, num_identities: int) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
            )

        self.features = nn.Sequential(
            block(3, width), nn.MaxPool2d(2),
            block(width, 2 * width), nn.MaxPool2d(2),
            block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.embedding = nn.Linear(4 * width, embed_dim)
        self.head = nn.Linear(embed_dim, num_identities)

    def forward(self, x: Tensor) -> Tensor:
        return self.embedding(self.features(x))


def _augment(images: Tensor, generator: torch.Generator, shift: int) -> Tensor:
    """Random shifts, horizontal flips, contrast/brightness jitter and pixel noise: a probe is an unseen
    photo (another pose, light) or a reconstruction (noisy), and the identifier must hold up to both."""
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
    brightness = 0.15 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(out.shape, generator=generator)
    return ((out - 0.5) * contrast + 0.5 + brightness + noise).clamp(0, 1)


@IDENTIFIERS.register("trained")
class TrainedIdentifier(Identifier):
    """A small CNN trained here on the gallery (cross-entropy over identities); embedding = its last
    hidden layer. Parameters: input_size (pixels the faces are resized to; the cost grows with its
    square), width (channels of the first conv), embed_dim, epochs, lr (Adam), batch_size, shift (max
    random shift in pixels while training).

    Why faces are shrunk to 12x12 (input_size): identity is in a face's coarse shape, while a gradient
    inversion's errors are strongest, relative to the face, at fine detail (GRNN at batch 1 on LeNet,
    32x32 att_faces: beyond about half the Nyquist frequency the error has as much power as the face
    itself). A CNN that sees that detail reads the errors as identity. Measured on 40 GRNN
    reconstructions of photo 9 of each person (mean 23.0 dB; 4 identifier seeds; 2-core CPU machine,
    2026-11-29): top-1 0.38-0.48 at input 24, 0.75-0.80 at 16, 0.78-0.88 at 12 and 0.83-0.90 at 8,
    while clean held-out photos stay at 91-98% at every size (chance 2.5%). Training takes 5-8 s on
    one CPU thread. (Whitened PCA, "eigenfaces", on the 32x32 pixels scored 0.88 on the same
    reconstructions: the low-pass is what matters, not the CNN.)
    """

    name = "trained"

    def __init__(
        self,
        *,
        input_size: int = 12,
        width: int = 24,
        embed_dim: int = 64,
        epochs: int = 30,
        lr: float = 3e-3,
        batch_size: int = 32,
        shift: int = 2,
    ) -> None:
        for key, value, low in (
            ("input_size", input_size, 8), ("width", width, 1), ("embed_dim", embed_dim, 2),
            ("epochs", epochs, 1), ("batch_size", batch_size, 1), ("shift", shift, 0),
        ):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"identifier 'trained' {key} must be an integer >= {low} (got {value!r})")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
            raise ConfigError(f"identifier 'trained' lr must be a finite number > 0 (got {lr!r})")
        super().__init__(
            input_size=input_size, width=width, embed_dim=embed_dim, epochs=epochs, lr=float(lr),
            batch_size=batch_size, shift=shift,
        )  # fmt: skip
        self.net: _EmbeddingNet | None = None

    def _build(self, num_identities: int, seed: int) -> _EmbeddingNet:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(seed)
            return _EmbeddingNet(self.params["width"], self.params["embed_dim"], num_identities)

    def _train(self, gallery: Gallery, generator: torch.Generator) -> None:
        p = self.params
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        net = self._build(gallery.num_identities, seed)
        images, labels = gallery.images.detach().cpu().float(), gallery.labels.long()
        optimizer = torch.optim.Adam(net.parameters(), lr=p["lr"], weight_decay=5e-4)
        steps_per_epoch = max(1, math.ceil(len(images) / p["batch_size"]))
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p["lr"], total_steps=p["epochs"] * steps_per_epoch
        )
        net.train()
        for _ in range(p["epochs"]):
            order = torch.randperm(len(images), generator=generator)
            for start in range(0, len(images), p["batch_size"]):
                idx = order[start : start + p["batch_size"]]
                if len(idx) < 2:  # BatchNorm needs two samples
                    continue
                x = _standardise(_augment(images[idx], generator, p["shift"]), p["input_size"])
                loss = F.cross_entropy(net.head(net(x)), labels[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        net.eval()
        self.net = net

    def embed(self, images: Tensor) -> Tensor:
        if self.net is None:
            raise RuntimeError("identifier used before fit() or load_state()")
        return F.normalize(self.net(_standardise(images, self.params["input_size"])), dim=1)

    def _model_state(self) -> dict[str, Tensor]:
        return {} if self.net is None else {k: v.detach().clone() for k, v in self.net.state_dict().items()}

    def _load_model_state(self, state: Mapping[str, Tensor]) -> None:
        num_identities = int(state["head.weight"].shape[0])
        net = self._build(num_identities, 0)
        net.load_state_dict(dict(state))
        self.net = net.eval()
