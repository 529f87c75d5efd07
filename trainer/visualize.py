"""Reconstruction figure: original / masked input / reconstruction, un-normalised, as PNG."""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

from simmim.pipeline.augment import denormalize
from simmim.pipeline.io import atomic_write


def pixel_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, 1, H, W) float; for figures only, never in the training path."""
    return torch.nn.functional.interpolate(masks[:, None].float(), size=size, mode="nearest")


@torch.no_grad()
def reconstruction_panels(images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor,
                          mean, std) -> list[torch.Tensor]:
    """Three (B, H, W, 3) float images in [0, 1]: original, masked input (grey), reconstruction
    (the prediction inside masked cells, the input elsewhere)."""
    m = pixel_mask(masks, images.shape[-2:]).to(images.device)
    original = denormalize(images, mean, std)
    masked = original * (1 - m) + 0.5 * m
    recon = original * (1 - m) + denormalize(pred.float(), mean, std) * m
    return [t.permute(0, 2, 3, 1).cpu() for t in (original, masked, recon)]


def save_reconstruction(images, masks, pred, mean, std, path: str | Path, title: str = "") -> Path:
    panels = reconstruction_panels(images, masks, pred, mean, std)
    n = images.shape[0]
    fig = Figure(figsize=(1.6 * n, 5.2))
    axes = fig.subplots(3, n, squeeze=False)
    for row, (name, panel) in enumerate(zip(("original", "masked input", "reconstruction"), panels)):
        for col in range(n):
            ax = axes[row][col]
            ax.imshow(panel[col].numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    return save_png(fig, path, title)


def save_png(fig: Figure, path: str | Path, title: str = "") -> Path:
    """`fig` (titled, laid out) written atomically as a PNG at 100 dpi; returns the path."""
    # constrained layout reserves room for the suptitle above the axes' titles; tight_layout put it
    # at a fixed fraction of the height, over the column headings of a tall (12-row) figure
    fig.set_layout_engine("constrained")
    if title:
        fig.suptitle(title)
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path
