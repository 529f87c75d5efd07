"""Mask-token fill: every token that lies in a masked cell is replaced by one learned token,
x = x * (1 - w) + token * w, with w the cell mask expanded to token resolution.

x is (B, L, D) with tokens in row-major order of an (h*s) x (w*s) grid, masks is (B, h, w), so a
cell covers s x s tokens. The reference views x as (B, h, s, w, s, D) and broadcasts the cell
mask over it: no token-resolution mask is built.
"""
from __future__ import annotations

import math

import torch


def cell_span(num_tokens: int, masks: torch.Tensor) -> int:
    """Tokens per cell side, s, from L = h*s * w*s."""
    h, w = masks.shape[1:]
    s = math.isqrt(num_tokens // (h * w)) if num_tokens % (h * w) == 0 else 0
    if s == 0 or s * s * h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid of {h}x{w} cells of s x s tokens")
    return s


def mask_token_fill_ref(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D); masks: (B, h, w) bool; token: (D,). Returns (B, L, D) in x's dtype."""
    B, L, D = x.shape
    if masks.dim() != 3 or masks.shape[0] != B or token.shape != (D,):
        raise ValueError(f"expected masks (B={B}, h, w) and token ({D},), got {tuple(masks.shape)} "
                         f"and {tuple(token.shape)}")
    s = cell_span(L, masks)
    h, w = masks.shape[1:]
    m = masks.view(B, h, 1, w, 1, 1)
    out = torch.where(m, token.to(x.dtype), x.view(B, h, s, w, s, D))  # (B, h, s, w, s, D)
    return out.reshape(B, L, D)


def mask_token_fill(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """The op the model calls. The fused Triton kernel plugs in here (see the kernels issue);
    until then every device uses the reference."""
    return mask_token_fill_ref(x, masks, token)
