"""A digits trial imports neither torchvision nor scikit-learn, and what stands in for them gives the same bytes.

Both imports cost a sweep worker seconds before its first trial (torchvision imports torch._dynamo); the engine
reads the digits scikit-learn ships, resizes with torch and draws its image grid itself, bit-identically.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from grnn_engine.data import _digits_arrays, _pil_to_tensor, _resize, load_dataset
from grnn_engine.image_grid import grid_png

_TRIAL = """
import sys
from grnn_engine import TrialSpec, run_trial
result = run_trial(TrialSpec(dataset="digits", attack="grnn", attack_params={"iterations": 2}, batch_size=2))
assert result.status == "COMPLETE" and result.image_png, result.error
print(sorted(m for m in ("torchvision", "sklearn", "scipy") if m in sys.modules))
"""


def test_a_digits_trial_imports_neither_torchvision_nor_sklearn() -> None:
    proc = subprocess.run([sys.executable, "-c", _TRIAL], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "['scipy']"  # scipy only for the matching, after the attack


def test_digits_are_scikit_learns_own() -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images, labels = _digits_arrays()
    assert torch.equal(images * 16, torch.as_tensor(bunch.images, dtype=torch.float32))
    assert torch.equal(labels, torch.as_tensor(bunch.target))


def test_resize_and_decoding_equal_torchvisions() -> None:
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    digits = load_dataset("digits", image_size=8).load_all()[:6]
    faces = torch.rand(2, 3, 112, 92, generator=torch.Generator().manual_seed(0))  # att_faces' shape
    for images, size in [(digits, 32), (digits, 31), (digits[0], 16), (faces, 32), (faces, 64)]:
        expected = TF.resize(images, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
        assert torch.equal(_resize(images, size), expected.clamp(0, 1)), (tuple(images.shape), size)
    grey = Image.fromarray((np.random.default_rng(0).random((20, 17)) * 255).astype(np.uint8))
    expected = TF.pil_to_tensor(grey.convert("RGB")).to(torch.float32) / 255
    assert torch.equal(_pil_to_tensor(grey), expected)


def test_image_grid_is_torchvisions_make_grid() -> None:
    import io

    from torchvision.utils import make_grid

    def reference(*rows: torch.Tensor) -> bytes:
        grid = make_grid(torch.cat(rows).clamp(0, 1), nrow=rows[0].shape[0], padding=2, pad_value=1.0)
        buffer = io.BytesIO()
        Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(buffer, format="PNG")
        return buffer.getvalue()

    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 32, 32), (4, 3, 32, 32), (3, 1, 28, 28)]:
        truth, recon = torch.rand(shape, generator=generator), torch.rand(shape, generator=generator) * 1.2 - 0.1
        assert grid_png(truth, recon) == reference(truth, recon), shape
