"""Image grids as PNG bytes: a trial's true batch above its reconstruction, an audit's reconstructions.

The layout of torchvision's make_grid (2-pixel white borders, one batch per row), drawn with torch alone:
importing torchvision costs a sweep worker seconds before its first trial (it imports torch._dynamo).
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

PADDING = 2  # pixels of white around and between the images


def grid_png(*rows: Tensor) -> bytes:
    """PNG of `rows` (each a (B, C, H, W) batch in [0, 1], all of one image shape), one batch per row.

    Grey (1-channel) images are drawn in grey on the RGB grid."""
    from PIL import Image  # imported here: only finished trials draw

    batches = [r.detach().cpu().to(torch.float32).clamp(0, 1) for r in rows]
    columns = max(b.shape[0] for b in batches)
    _, channels, height, width = batches[0].shape
    step_y, step_x = height + PADDING, width + PADDING
    grid = torch.ones(3, len(batches) * step_y + PADDING, columns * step_x + PADDING)
    for r, batch in enumerate(batches):
        for c, image in enumerate(batch.expand(-1, 3, -1, -1) if channels == 1 else batch):
            y, x = r * step_y + PADDING, c * step_x + PADDING
            grid[:, y : y + height, x : x + width] = image
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
