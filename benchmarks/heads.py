"""The paper's head ablation: a linear prediction head against heavier ones, on Swin-B at 192.

SimMIM reports that its linear head trains 2.3x cheaper than an inverse Swin-B head (a decoder
mirroring the encoder) with no loss in fine-tuning accuracy. Compared here: the linear head
(1x1 conv + PixelShuffle), a 2-layer MLP head, and an inverse Swin-B head (stages of depth 2, 18,
2, 2 at 6, 12, 24, 48 tokens a side, patch-expanding between them, a linear map to 4x4 pixels).
Cost = training-step FLOPs (exact, on the meta device) and, optionally, measured step time.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerStage

from simmim.kernels import masked_loss
from simmim.pipeline.masking import MaskGenerator
from simmim.trainer.model import ARCHS, SwinEncoder
from simmim.trainer.precision import autocast

from .measure import count_flops, seconds_per_call

CLAIMED_INVERSE_SWIN = 2.3


class Expand(nn.Module):
    """Patch expanding: (B, r, r, C) -> (B, 2r, 2r, C_out) through a linear map and a 2x2 shuffle."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, out_dim * 4)

    def forward(self, x):
        return F.pixel_shuffle(self.proj(x).permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)


class InverseSwinHead(nn.Module):
    def __init__(self, dims=(1024, 512, 256, 128), depths=(2, 18, 2, 2), heads=(32, 16, 8, 4), grid=6, window=6):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (d, depth, h) in enumerate(zip(dims, depths, heads)):
            r = grid * 2 ** i
            layers.append(SwinTransformerStage(dim=d, out_dim=d, input_resolution=(r, r), depth=depth,
                                               downsample=False, num_heads=h, window_size=window))
            if i < len(dims) - 1:
                layers.append(Expand(d, dims[i + 1]))
        self.stages = nn.Sequential(*layers)
        self.pred = nn.Linear(dims[-1], 4 * 4 * 3)

    def forward(self, feats):  # (B, C, 6, 6) -> (B, 3, 192, 192)
        x = self.pred(self.stages(feats.permute(0, 2, 3, 1)))
        return F.pixel_shuffle(x.permute(0, 3, 1, 2), 4)


def head(kind: str, dim: int = 1024, stride: int = 32) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Conv2d(dim, stride * stride * 3, 1), nn.PixelShuffle(stride))
    if kind == "2-layer MLP":
        return nn.Sequential(nn.Conv2d(dim, dim, 1), nn.GELU(), nn.Conv2d(dim, stride * stride * 3, 1),
                             nn.PixelShuffle(stride))
    if kind == "inverse Swin-B":
        return InverseSwinHead()
    raise ValueError(kind)


HEADS = ("linear", "2-layer MLP", "inverse Swin-B")


class WithHead(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.encoder = SwinEncoder(ARCHS["swin_base"], 192, 6, 0.0)
        self.head = head(kind)
        self.masks = MaskGenerator(192, 32, 0.6)

    def forward(self, x):
        masks = self.masks.sample(x.shape[0], device=x.device)
        return masked_loss(self.head(self.encoder(x, masks)), x, masks)


def step(model: nn.Module, x: torch.Tensor, amp_dtype) -> None:
    with autocast(x.device.type, amp_dtype):
        loss = model(x)
    loss.backward()


def head_flops(kind: str, batch: int = 2) -> float:
    """Training-step FLOPs per image of Swin-B SimMIM with this head (meta device)."""
    with torch.device("meta"):
        model, x = WithHead(kind), torch.empty(batch, 3, 192, 192)
    return count_flops(lambda: step(model, x, None)) / batch


def head_step_seconds(kind: str, batch: int, steps: int, device: torch.device, amp_dtype) -> float:
    torch.manual_seed(0)
    model = WithHead(kind).to(device)
    x = torch.randn(batch, 3, 192, 192, device=device)

    def once():
        step(model, x, amp_dtype)
        model.zero_grad(set_to_none=True)

    return seconds_per_call(once, steps, device)


def head_table(timing: bool, batch: int, steps: int) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if device.type == "cuda" else None
    rows = [{"head": k, "gflops_per_image": head_flops(k) / 1e9} for k in HEADS]
    if timing:
        for r in rows:
            r["step_s"] = head_step_seconds(r["head"], batch, steps, device, amp)
    for r in rows:
        r["flops_vs_linear"] = r["gflops_per_image"] / rows[0]["gflops_per_image"]
        if timing:
            r["time_vs_linear"] = r["step_s"] / rows[0]["step_s"]
        r["claimed"] = CLAIMED_INVERSE_SWIN if r["head"] == "inverse Swin-B" else None
    return rows


def head_markdown(rows: list[dict]) -> str:
    lines = ["## Prediction head (Swin-B 192): cost relative to the linear head", "",
             "| head | GFLOP/img (train step) | x linear (FLOPs) | x linear (time) | paper |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        t = f"{r['time_vs_linear']:.2f}" if "time_vs_linear" in r else "n/a"
        lines.append(f"| {r['head']} | {r['gflops_per_image']:.1f} | {r['flops_vs_linear']:.2f} | {t} | "
                     f"{str(r['claimed']) + 'x' if r['claimed'] else ''} |")
    return "\n".join(lines) + "\n"
