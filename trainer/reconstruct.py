"""`simmim reconstruct`: the paper's reconstruction figures (SimMIM Figs. 4-6) for any image under any mask.

    simmim reconstruct CKPT IMAGE_OR_FOLDER... --out FIG.png [--mask random|square|block|MASK.png]
                       [--mask-ratio R] [--mask-patch-size P[,P...]] [--seed S]

Per image (and per mask patch size, Fig. 6) one row of four columns: the original (the evaluation
view: resize + centre crop, `augment.eval_geometry`), the masked input (masked cells grey), the
prediction of the masked cells pasted into the visible image, and the full reconstruction (the head's
output everywhere, visible cells included). The run's normalisation (the per-channel mean / std its
checkpoint records) is undone for display; a grey run is drawn with a grey colormap, an N-channel one
by its first three channels.

The checkpoint is read by `checkpoint.read_checkpoint` (this project's file or DCP folder, the released
microsoft/SimMIM layout); it must hold a pre-training model (encoder, mask token and prediction head).
`--mask MASK.png` is the user's own mask: white = masked, any size, area-resampled to the cell grid and
thresholded at half a cell (Fig. 5's "mask most of / the whole object").
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from simmim.core.errors import CheckpointError, UserError
from simmim.kernels import LossOptions
from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, Augmentation, denormalize, normalize
from simmim.pipeline.channels import array_view, extensions, read_pixels
from simmim.pipeline.decode import DecodeError, decode_rgb
from simmim.pipeline.folder import IMAGE_EXTENSIONS
from simmim.pipeline.views import center_crop, to_tensor
from simmim.pipeline.masking import MASK_STRATEGIES, MaskGenerator

from .checkpoint_reader import read_checkpoint
from .finetune import BUFFERS, encoder_family, to_timm_layout
from .layouts import Kind, is_ours, is_released
from .model import ARCHS, SimMIM, build_simmim, default_stats
from .visualize import displayable, save_png, show

CROP_RATIO = 0.875  # the evaluation view's (torchvision Resize(size / 0.875) + CenterCrop(size))
COLUMNS = ("original", "masked input", "prediction pasted", "full reconstruction")
HINT = "reconstruct reads a pre-training checkpoint (simmim pretrain's, or microsoft/SimMIM's)"


@dataclass
class Pretrained:
    """A pre-training model rebuilt from a checkpoint: the SimMIM model (eval mode) and its settings:
    the image channels and the per-channel mean / std the run normalised with."""
    model: SimMIM
    arch: str
    img_size: int
    mask_patch_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


def infer_arch(encoder: dict[str, torch.Tensor]) -> str | None:
    """The `ARCHS` entry whose family, width and depths the encoder's weights have (None: no match).
    Width: patch_embed.proj (embed_dim, 3, p, p); depths: blocks.i (ViT) / layers.s.blocks.i (Swin)."""
    family = encoder_family(encoder)
    proj = encoder.get("patch_embed.proj.weight")
    if family is None or proj is None:
        return None
    if family == "vit":
        depths = (len({k.split(".")[1] for k in encoder if k.startswith("blocks.")}),)
    else:
        stages = sorted({int(k.split(".")[1]) for k in encoder if k.startswith("layers.")})
        depths = tuple(len({k.split(".")[3] for k in encoder if k.startswith(f"layers.{s}.blocks.")}) for s in stages)
    for name, a in ARCHS.items():
        if (a.family, a.embed_dim, a.depths, a.patch_size) == (family, proj.shape[0], depths, proj.shape[-1]):
            return name
    return None


def _mask_patch_size(config: dict | None) -> int:
    if is_ours(config):
        return int(config.get("data", {}).get("mask_patch_size", 32))
    if is_released(config):
        return int((config.get("DATA") or {}).get("MASK_PATCH_SIZE", 32))
    return 32  # the paper's default (SimMIM Table 1)


def load_pretrained_model(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Rebuilds the SimMIM model of a pre-training checkpoint (any `read_checkpoint` reads) on `device`.

    Raises CheckpointError (one line naming the path) for an unreadable checkpoint, a fine-tuned or
    encoder-only one (no mask token / prediction head), or an encoder no `ARCHS` entry matches."""
    ckpt = read_checkpoint(path, what="reconstruct:", hint=HINT)
    label = f"reconstruct: '{path}'"
    if ckpt.kind is not Kind.PRETRAINING:
        raise CheckpointError(f"{label} holds {'an' if ckpt.kind.value[0] in 'aeiou' else 'a'} {ckpt.kind.value} model ({ckpt.layout} layout), not a pre-training "
                              f"one with a mask token and prediction head: {HINT}")
    encoder = ckpt.encoder()
    arch = ckpt.config["model"].get("arch") if is_ours(ckpt.config) else infer_arch(encoder)
    if arch not in ARCHS:
        raise CheckpointError(f"{label}: its encoder matches no known architecture ({', '.join(ARCHS)})")
    head = {k.rsplit(".", 2)[-1]: v for k, v in ckpt.model.items() if k.endswith(("decoder.0.weight", "decoder.0.bias"))}
    token = next((v for k, v in ckpt.model.items() if k.endswith("mask_token")), None)
    if len(head) != 2 and ckpt.layout != "simmim":  # ours: whatever model.head it trained, built below
        raise CheckpointError(f"{label} has no SimMIM prediction head (decoder.0.weight / bias): {HINT}")
    img_size, chans = ckpt.settings.get("img_size", 192), ckpt.settings.get("in_chans", 3)
    mask_patch_size = _mask_patch_size(ckpt.config)
    mean, std = ckpt.normalization() or default_stats(chans)
    ours = ckpt.config if ckpt.layout == "simmim" and is_ours(ckpt.config) else {}
    model = build_simmim(arch, img_size, mask_patch_size, ckpt.settings.get("window_size", 0),
                         loss=LossOptions(**ours.get("loss", {})), head=ours.get("model", {}).get("head", "linear"),
                         in_chans=chans, mean=mean, std=std)
    net = model.encoder.swin if hasattr(model.encoder, "swin") else model.encoder.vit
    found = Pretrained(model, arch, img_size, mask_patch_size, chans, mean, std)
    try:
        if ckpt.layout == "simmim":  # our own keys: the model's state dict as saved
            model.load_state_dict(ckpt.model)
            return dataclasses.replace(found, model=model.eval().to(device))
        weights, _ = to_timm_layout(encoder, net, ARCHS[arch].family)
        missing = [k for k in net.load_state_dict(weights, strict=False).missing_keys if not k.endswith(BUFFERS)]
        if missing:
            raise ValueError(f"{len(missing)} weights missing, e.g. {missing[:2]}")
        model.encoder.mask_token.data.copy_(token.reshape(-1))
        model.decoder[0].load_state_dict(head)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{label} does not fit {arch}: {str(e).splitlines()[0]}") from None
    return dataclasses.replace(found, model=model.eval().to(device))


def evaluation_view(path: str | Path, size: int) -> torch.Tensor:
    """The image at `path` as the evaluation view: (3, size, size) uint8. UserError for an unreadable image."""
    try:
        img = decode_rgb(path)
    except (DecodeError, OSError) as e:
        raise UserError(f"reconstruct: image '{path}' cannot be read ({str(e).splitlines()[0]}): pass a "
                        f"JPEG / PNG image") from None
    return to_tensor(center_crop(img, size, CROP_RATIO))  # the loaders' own evaluation view


def evaluation_input(path: str | Path, size: int, channels: int, mean: tuple, std: tuple) -> torch.Tensor:
    """The model's input for the file at `path`: its evaluation view normalised by `mean` / `std`,
    (C, size, size) float32. C = 3: `evaluation_view`'s RGB; C = 1: a grey image (`decode_grey`) or a
    .npy array; C = N: a .npy / .tif array (pipeline/channels.py, the loaders' own rules and view).
    UserError (one line) for a file that does not read as a C-channel image."""
    if channels == 3:
        return normalize(evaluation_view(path, size)[None], mean, std)[0]
    try:
        got = read_pixels(path, channels)
    except (DecodeError, OSError) as e:
        raise UserError(f"reconstruct: '{path}' cannot be read as a {channels}-channel image of this checkpoint "
                        f"({str(e).splitlines()[0]})") from None
    if isinstance(got, tuple):  # an array (H, W, C) and what its values are divided by
        return array_view(*got, Augmentation(size=size), False, CROP_RATIO, None, mean, std)
    grey = torch.from_numpy(np.asarray(center_crop(got, size, CROP_RATIO)).copy())  # (S, S) uint8
    return normalize(grey[None, None], mean, std)[0]


def mask_from_image(path: str | Path, grid: tuple[int, int]) -> torch.Tensor:
    """A user's mask image (white = masked, any size) on the (h, w) cell grid: (h, w) bool, a cell
    masked when over half its area is white (area resampling of the grey levels). UserError if
    `path` is not an image or masks no cell."""
    try:
        with Image.open(path) as im:
            grey = im.convert("L")
    except (OSError, ValueError) as e:
        raise UserError(f"reconstruct: --mask '{path}' is not an image ({str(e).splitlines()[0]}): pass a PNG "
                        f"with the masked area white, or one of {', '.join(MASK_STRATEGIES)}") from None
    cells = np.asarray(grey.resize((grid[1], grid[0]), Image.BOX), dtype=np.float32) / 255.0
    if not (cells > 0.5).any():  # a coloured or inverted mask would give a figure with nothing predicted
        raise UserError(f"reconstruct: --mask '{path}' masks no cell of the {grid[0]}x{grid[1]} cell grid "
                        f"(white = masked; a cell counts when over half of it is white): paint the masked area white")
    return torch.from_numpy(cells > 0.5)


def input_images(inputs: list[str], channels: int = 3) -> list[Path]:
    """The image files named, a folder standing for the images (of a `channels`-channel run:
    `channels.extensions`) directly inside it (sorted)."""
    found = []
    suffixes = extensions(channels, IMAGE_EXTENSIONS)
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.iterdir() if p.suffix.lower() in suffixes)
        elif item.exists():
            found.append(item)
        else:
            raise UserError(f"reconstruct: image '{item}' does not exist")
    if not found:
        raise UserError(f"reconstruct: no images in {', '.join(inputs)} ({', '.join(sorted(suffixes))})")
    return found


def make_masks(mask: str, n: int, img_size: int, cell: int, ratio: float, seed: int) -> torch.Tensor:
    """(n, h, w) bool masks at cell size `cell`: drawn by a pipeline/masking.py strategy (seeded), or
    the user's mask image for every image. UserError for a cell size that does not tile the image."""
    if img_size % cell:
        raise UserError(f"reconstruct: --mask-patch-size {cell} does not divide the checkpoint's image size {img_size}")
    grid = (img_size // cell, img_size // cell)
    if mask in MASK_STRATEGIES:
        if not 0.0 < ratio < 1.0:
            raise UserError(f"reconstruct: --mask-ratio {ratio} must lie in (0, 1)")
        return MaskGenerator(img_size, cell, ratio, mask).sample(n, torch.Generator().manual_seed(seed))
    if not os.path.exists(mask):
        raise UserError(f"reconstruct: --mask '{mask}' is neither a strategy ({', '.join(MASK_STRATEGIES)}) "
                        f"nor an existing image")
    return mask_from_image(mask, grid).expand(n, *grid).clone()


@torch.no_grad()
def predict(model: SimMIM, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) normalised, masks (B, h, w) bool -> the head's prediction (B, C, H, W) float32."""
    return model.prediction(images, masks).float()


def panels(images: torch.Tensor, masks: torch.Tensor, pred: torch.Tensor, mean: tuple = IMAGENET_MEAN,
           std: tuple = IMAGENET_STD) -> list[torch.Tensor]:
    """The four figure columns (see the module docstring), each (B, C, H, W) float in [0, 1],
    un-normalised with the run's per-channel `mean` / `std`; images and pred (B, C, H, W) normalised.
    The figure shows grey images with a grey colormap, others by their first three channels."""
    m = torch.nn.functional.interpolate(masks[:, None].float(), size=images.shape[-2:], mode="nearest")
    original = denormalize(images, mean, std)
    full = denormalize(pred, mean, std)
    return [original, original * (1 - m) + 0.5 * m, original * (1 - m) + full * m, full]


def parse_patch_sizes(text: str) -> list[int] | None:
    """"16,32" -> [16, 32]; "" -> None (the checkpoint's own). UserError for anything else."""
    if not text.strip():
        return None
    try:
        sizes = [int(t) for t in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) <= 0:
        raise UserError(f"reconstruct: --mask-patch-size '{text}' is not a list of positive integers, e.g. 16,32")
    return sizes


def reconstruct(checkpoint: str, inputs: list[str], out: str, mask: str = "random", mask_ratio: float = 0.6,
                patch_sizes: list[int] | None = None, seed: int = 0, device: str | None = None) -> Path:
    """Writes the figure (rows: image x mask patch size; columns: `COLUMNS`) to `out`; returns its path."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pre = load_pretrained_model(checkpoint, device)
    files = input_images(inputs, pre.in_chans)
    images = torch.stack([evaluation_input(f, pre.img_size, pre.in_chans, pre.mean, pre.std) for f in files])
    images = images.to(device)
    patch = ARCHS[pre.arch].patch_size  # mask_token_fill masks whole patches
    rows = []
    for cell in patch_sizes or [pre.mask_patch_size]:
        if cell % patch:
            raise UserError(f"reconstruct: --mask-patch-size {cell} is not a multiple of {pre.arch}'s patch size {patch}")
        masks = make_masks(mask, len(files), pre.img_size, cell, mask_ratio, seed).to(device)
        cols = panels(images, masks, predict(pre.model, images, masks), pre.mean, pre.std)
        rows += [(f"{f.name}\nmask {cell}px", [c[i] for c in cols]) for i, f in enumerate(files)]
    return _figure(rows, out, f"{Path(checkpoint).name} ({pre.arch}), mask {Path(mask).name}")


def _figure(rows: list[tuple[str, list[torch.Tensor]]], out: str, title: str) -> Path:
    from matplotlib.figure import Figure


    fig = Figure(figsize=(2.2 * len(COLUMNS), 2.2 * len(rows) + 0.4))
    axes = fig.subplots(len(rows), len(COLUMNS), squeeze=False)
    for r, (name, cols) in enumerate(rows):
        for c, img in enumerate(cols):
            ax = axes[r][c]
            show(ax, displayable(img[None].cpu())[0])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    return save_png(fig, out, title)
