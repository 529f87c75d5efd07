"""SimMIM random masking and the paper's AvgDist statistic.

A mask is a bool tensor (B, h, w) at mask-cell resolution, True = masked. Every consumer (the
model, the kernels, the figures) expands it by index arithmetic; nothing here builds a
pixel-resolution mask except `avg_dist`, which is an analysis tool.
"""
from __future__ import annotations

import math

import torch


def num_masked(cells: int, mask_ratio: float) -> int:
    """ceil(mask_ratio * cells), immune to float noise such as 0.7 * 10 = 7.000000000000001."""
    return math.ceil(round(mask_ratio * cells, 9))


class MaskGenerator:
    """Draws SimMIM masks: exactly ceil(ratio * cells) cells per image, uniformly without replacement.

    input_size: image side in pixels (an int, or (H, W)); mask_patch_size: the cell side in pixels.
    """

    def __init__(self, input_size: int | tuple[int, int] = 192, mask_patch_size: int = 32,
                 mask_ratio: float = 0.6):
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if mask_patch_size <= 0 or height <= 0 or width <= 0:
            raise ValueError(f"input size {input_size} and mask patch size {mask_patch_size} must be positive")
        if height % mask_patch_size or width % mask_patch_size:
            raise ValueError(f"input size {input_size} is not divisible by mask patch size {mask_patch_size}")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask ratio must lie in (0, 1), got {mask_ratio}")
        self.grid = (height // mask_patch_size, width // mask_patch_size)
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.cells = self.grid[0] * self.grid[1]
        self.count = num_masked(self.cells, mask_ratio)

    def sample(self, batch_size: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Returns (B, h, w) bool, True = masked. Reproducible from `generator` (on `device`)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        noise = torch.rand(batch_size, self.cells, generator=generator, device=device)  # (B, N)
        # The `count` cells with the smallest noise are masked: a uniform draw without replacement.
        chosen = noise.argsort(dim=1)[:, :self.count]
        masks = torch.zeros(batch_size, self.cells, dtype=torch.bool, device=device)
        masks.scatter_(1, chosen, True)
        return masks.view(batch_size, *self.grid)

    def __repr__(self) -> str:
        return (f"MaskGenerator(grid={self.grid}, mask_patch_size={self.mask_patch_size}, "
                f"mask_ratio={self.mask_ratio}, masked_cells={self.count}/{self.cells})")


def avg_dist(masks: torch.Tensor, cell_size: int) -> float:
    """The paper's AvgDist: mean Euclidean distance (pixels) from each masked pixel to the nearest
    visible pixel, averaged over all masked pixels of the batch.

    masks: (B, h, w) bool at cell resolution; each cell is cell_size x cell_size pixels, and a
    pixel is its integer centre. Exact: the distance from a pixel to a visible cell is its
    distance to the nearest pixel of that rectangle, and the minimum over cells is taken in two
    separable passes (columns, then rows), so no (pixels x cells) table is built. Images with no
    visible pixel have no defined distance and are left out; if none is left, returns nan.
    """
    if masks.dim() != 3:
        raise ValueError(f"masks must be (B, h, w), got shape {tuple(masks.shape)}")
    masks = masks.bool()
    keep = ~masks.flatten(1).all(dim=1)
    masks = masks[keep]
    if masks.numel() == 0 or not masks.any():
        return float("nan")
    B, h, w = masks.shape
    device = masks.device

    def axis_dist2(cells: int) -> torch.Tensor:
        # (cells * cell_size, cells): squared 1-D distance from pixel p to cell j's pixel span.
        p = torch.arange(cells * cell_size, device=device, dtype=torch.float32)[:, None]
        lo = torch.arange(cells, device=device, dtype=torch.float32)[None, :] * cell_size
        d = torch.clamp(torch.maximum(lo - p, p - (lo + cell_size - 1)), min=0)
        return d * d

    dx2 = axis_dist2(w)  # (W, w)
    dy2 = axis_dist2(h)  # (H, h)
    inf = torch.tensor(float("inf"), device=device)
    visible = ~masks  # (B, h, w)
    # Pass 1: per cell row i and pixel column x, the nearest visible cell in that row.
    row_best = torch.where(visible[:, :, None, :], dx2[None, None, :, :], inf).amin(dim=-1)  # (B, h, W)
    # Pass 2: over cell rows. (B, H, h, W) -> (B, H, W)
    d2 = (dy2[None, :, :, None] + row_best[:, None, :, :]).amin(dim=2)
    pixel_masked = masks.repeat_interleave(cell_size, 1).repeat_interleave(cell_size, 2)  # (B, H, W)
    return d2.sqrt()[pixel_masked].mean().item()
