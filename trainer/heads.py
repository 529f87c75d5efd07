"""SimMIM prediction heads (the paper's Table 3): encoder features -> pixels of the target.

Every head maps features (B, D, g, g) (g = image / encoder stride) to the pre-PixelShuffle layout
(B, K*p*p, r, r) of a target (B, K, T, T) (K = 3 values per pixel, or 3 * bins logits; p = T / r
pixels per output token), which the model either shuffles or hands to the fused loss as it is:

    linear          a 1x1 conv (the paper's head, r = g): D -> K*p*p
    mlp             1x1 conv D -> D, GELU, 1x1 conv D -> K*p*p (a 2-layer MLP per token)
    inverse_swin_t  Swin-T / Swin-B stages in reverse order (dims 8C, 4C, 2C, C; depths reversed),
    inverse_swin_b  each but the last followed by a patch expanding (2x the tokens a side, half the
                    channels), as many stages (up to 4) as keep the token grid a divisor of T, then
                    LayerNorm and a linear map to the p x p pixels of each token.

The inverse Swin decoders are built from timm's `SwinTransformerStage` (shifted windows, relative
position bias) and the patch expanding layer of Swin-Unet (Cao et al., 2022). Their first
stage takes the encoder's width through a linear map when it differs (Swin-T's 768 after Swin-B's
1024; a ViT's 768). On a ViT (stride 16) the decoder starts from its g = image / 16 token grid, so
at the full target its 3 expansions end at image / 2 tokens, each predicting 2 x 2 pixels (on Swin,
image / 4 tokens of 4 x 4 pixels). The window is the largest divisor of g not above the encoder's
window (7 for a ViT), so it tiles every stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from timm.models.swin_transformer import SwinTransformerStage

HEADS = ("linear", "mlp", "inverse_swin_t", "inverse_swin_b")
# inverse_swin_*: the mirrored encoder's (embed dim C, depths, heads) of stages 1..4 (Liu et al. 2021, Sec. 3.3)
INVERSE_SWIN = {"inverse_swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
                "inverse_swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32))}
VIT_DECODER_WINDOW = 7


class PatchExpand(nn.Module):
    """(B, r, r, C) -> (B, 2r, 2r, C_out): a linear map to 4 * C_out values per token, laid out as
    its 2 x 2 block of C_out channels, then LayerNorm (Swin-Unet's patch expanding, C_out = C / 2)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.out_dim = out_dim
        self.expand = nn.Linear(dim, 4 * out_dim, bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        x = self.expand(x).view(B, H, W, 2, 2, self.out_dim).permute(0, 1, 3, 2, 4, 5)  # (B, H, 2, W, 2, C_out)
        return self.norm(x.reshape(B, 2 * H, 2 * W, self.out_dim))


def decoder_stages(grid: int, target: int) -> int:
    """Inverse Swin stages: the most (up to 4) whose last token grid, grid * 2^(n-1), divides target."""
    n = 1
    while n < 4 and target % (grid * 2 ** n) == 0:
        n += 1
    return n


def decoder_window(grid: int, encoder_window: int) -> int:
    """The largest divisor of `grid` not above `encoder_window`: it tiles grid * 2^i for every stage."""
    return max(w for w in range(1, min(grid, encoder_window) + 1) if grid % w == 0)


class InverseSwin(nn.Module):
    """Features (B, D, g, g) -> (B, K*p*p, r, r), channels-last strides (a permuted view of the
    final linear map's output, which the fused loss reads in place). See the module docstring."""

    def __init__(self, kind: str, in_dim: int, grid: int, target: int, out_chans: int, window: int):
        super().__init__()
        embed, depths, heads = INVERSE_SWIN[kind]
        n = decoder_stages(grid, target)
        dims = [embed * 2 ** i for i in reversed(range(4))][:n]  # 8C, 4C, 2C, C
        depths, heads = depths[::-1][:n], heads[::-1][:n]
        self.proj = nn.Linear(in_dim, dims[0]) if in_dim != dims[0] else nn.Identity()
        layers: list[nn.Module] = []
        for i in range(n):
            r = grid * 2 ** i
            layers.append(SwinTransformerStage(dim=dims[i], out_dim=dims[i], input_resolution=(r, r), depth=depths[i],
                                               downsample=False, num_heads=heads[i], window_size=window))
            if i < n - 1:
                layers.append(PatchExpand(dims[i], dims[i + 1]))
        self.stages = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1])
        self.pixels = target // (grid * 2 ** (n - 1))  # p: output pixels a side per final token
        self.pred = nn.Linear(dims[-1], out_chans * self.pixels ** 2)
        self.apply(_init_weights)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            if isinstance(stage, SwinTransformerStage):
                stage.grad_checkpointing = enable

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.proj(feats.permute(0, 2, 3, 1))  # (B, g, g, 8C)
        x = self.pred(self.norm(self.stages(x)))  # (B, r, r, K*p*p)
        return x.permute(0, 3, 1, 2)


def _init_weights(m: nn.Module) -> None:
    """timm's Swin initialisation: linear weights truncated normal std 0.02, biases 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_head(kind: str, dim: int, grid: int, target: int, out_chans: int, encoder_window: int) -> tuple[list, int]:
    """(layers mapping features (B, dim, grid, grid) to the pre-shuffle layout, PixelShuffle factor p)
    of head `kind` for a (B, out_chans, target, target) prediction; target is a multiple of grid.
    ValueError for an unknown kind (the config's rule names the choices first)."""
    if kind not in HEADS:
        raise ValueError(f"unknown head '{kind}': choose one of {', '.join(HEADS)}")
    if kind in INVERSE_SWIN:
        head = InverseSwin(kind, dim, grid, target, out_chans, decoder_window(grid, encoder_window))
        return [head], head.pixels
    p = target // grid
    out = nn.Conv2d(dim, out_chans * p * p, kernel_size=1)
    return ([out] if kind == "linear" else [nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), out]), p
