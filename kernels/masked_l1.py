"""Masked L1 reconstruction loss.

    loss = sum(|pred - target| * m) / (sum(m) + 1e-5) / C

with `m` the (B, h, w) cell mask expanded to pixels and counted once per pixel (not per channel).
The reference never builds the pixel mask: it sums |pred - target| inside each cell, then weights
the (B, h, w) cell sums by the cell mask.
"""
from __future__ import annotations

import torch

EPS = 1e-5


def _check(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> tuple[int, int]:
    if pred.shape != target.shape or pred.dim() != 4:
        raise ValueError(f"pred and target must share one (B, C, H, W) shape, got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    B, _, H, W = pred.shape
    if masks.dim() != 3 or masks.shape[0] != B or H % masks.shape[1] or W % masks.shape[2]:
        raise ValueError(f"masks {tuple(masks.shape)} must be (B, h, w) with h dividing {H} and w dividing {W}")
    return H // masks.shape[1], W // masks.shape[2]


def masked_l1_loss_ref(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """pred, target: (B, C, H, W); masks: (B, h, w) bool. Returns a float32 scalar."""
    sy, sx = _check(pred, target, masks)
    B, C, H, W = pred.shape
    h, w = masks.shape[1:]
    diff = (pred.float() - target.float()).abs()  # (B, C, H, W)
    cell_sums = diff.view(B, C, h, sy, w, sx).sum(dim=(1, 3, 5))  # (B, h, w)
    m = masks.to(cell_sums.dtype)
    masked_pixels = m.sum() * (sy * sx)
    return (cell_sums * m).sum() / (masked_pixels + EPS) / C


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The loss the model calls. The fused Triton kernel plugs in here (see the kernels issue);
    until then every device uses the reference."""
    return masked_l1_loss_ref(pred, target, masks)
