"""Reconstruction figure: original / masked input / reconstruction, un-normalised with the run's
per-channel mean / std, as PNG. Grey (1-channel) images are drawn with a grey colormap; images of
more channels show their first three as RGB."""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry

from simmim.core.io import atomic_write
from simmim.pipeline.augment import denormalize


def pixel_mask(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, 1, H, W) float; for figures only, never in the training path."""
    return torch.nn.functional.interpolate(masks[:, None].float(), size=size, mode="nearest")


def displayable(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) float in [0, 1] -> what a figure shows: (B, H, W) for one channel (drawn with a
    grey colormap), else the first three channels as RGB, (B, H, W, 3) (two channels: red and green)."""
    if images.shape[1] == 1:
        return images[:, 0]
    rgb = images[:, :3]
    if rgb.shape[1] < 3:
        rgb = torch.cat([rgb, rgb.new_zeros(rgb.shape[0], 3 - rgb.shape[1], *rgb.shape[2:])], 1)
    return rgb.permute(0, 2, 3, 1)


def show(ax, image: torch.Tensor) -> None:
    """One panel of `displayable`'s: (H, W) grey (0 black, 1 white) or (H, W, 3) RGB, no ticks."""
    if image.dim() == 2:
        ax.imshow(image.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(image.numpy())
    ax.set_xticks([]), ax.set_yticks([])


@torch.no_grad()
def reconstruction_panels(images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor,
                          mean, std) -> list[torch.Tensor]:
    """Three panels (`displayable`: (B, H, W) for grey, (B, H, W, 3) for the first three channels),
    float in [0, 1]: original, masked input (grey), reconstruction (the prediction inside masked
    cells, the input elsewhere). images and pred (B, C, H, W) normalised with `mean` / `std` (C values)."""
    m = pixel_mask(masks, images.shape[-2:]).to(images.device)
    original = denormalize(images, mean, std)
    masked = original * (1 - m) + 0.5 * m
    recon = original * (1 - m) + denormalize(pred.float(), mean, std) * m
    return [displayable(t).cpu() for t in (original, masked, recon)]


def save_reconstruction(images, masks, pred, mean, std, path: str | Path, title: str = "") -> Path:
    panels = reconstruction_panels(images, masks, pred, mean, std)
    n = images.shape[0]
    fig = Figure(figsize=(1.6 * n, 5.2))
    axes = fig.subplots(3, n, squeeze=False)
    for row, (name, panel) in enumerate(zip(("original", "masked input", "reconstruction"), panels)):
        for col in range(n):
            show(axes[row][col], panel[col])
            if col == 0:
                axes[row][col].set_ylabel(name)
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
