"""Mask-token fill: every token that lies in a masked cell is replaced by one learned token,
x = x * (1 - w) + token * w, with w the cell mask expanded to token resolution.

x is (B, L, D) with tokens in row-major order of an (h*s) x (w*s) grid, masks is (B, h, w), so a
cell covers s x s tokens. Neither path builds a token-resolution mask: the reference broadcasts
the cell mask over a (B, h, s, w, s, D) view, the kernel finds each token's cell by index
arithmetic.

Order: reference, Triton kernels, launchers, custom ops with autograd, public function.
"""
from __future__ import annotations

import math

import torch

from .dispatch import HAS_TRITON, use_triton


def cell_span(num_tokens: int, masks: torch.Tensor) -> int:
    """Tokens per cell side, s, from L = h*s * w*s. Rounded float square root, then checked exactly
    (exact for any L below 2**52): torch.compile traces math.sqrt on a size, whereas math.isqrt
    breaks the graph once sizes are symbolic."""
    h, w = masks.shape[1:]
    s = int(math.sqrt(num_tokens // (h * w)) + 0.5)
    if s == 0 or s * s * h * w != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a grid of {h}x{w} cells of s x s tokens")
    return s


def _check(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor) -> int:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    B, L, D = x.shape
    if masks.dim() != 3 or masks.shape[0] != B or token.shape != (D,):
        raise ValueError(f"expected masks (B={B}, h, w) and token ({D},), got {tuple(masks.shape)} "
                         f"and {tuple(token.shape)}")
    return cell_span(L, masks)


# ----------------------------------------------------------------------------- reference
def mask_token_fill_ref(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D); masks: (B, h, w) bool; token: (D,). Returns (B, L, D) in x's dtype."""
    s = _check(x, masks, token)
    B, L, D = x.shape
    h, w = masks.shape[1:]
    m = masks.view(B, h, 1, w, 1, 1)
    out = torch.where(m, token.to(x.dtype), x.view(B, h, s, w, s, D))  # (B, h, s, w, s, D)
    return out.reshape(B, L, D)


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _token_cells(pid_l, L, grid_w, s, w, BLOCK_L: tl.constexpr):
        """Token offsets of this block, their in-bounds mask and their cell index."""
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        row, col = offs_l // grid_w, offs_l % grid_w
        return offs_l, offs_l < L, (row // s) * w + col // s

    @triton.jit
    def _fill_fwd_kernel(x_ptr, m_ptr, tok_ptr, out_ptr, L, D, grid_w, s, cells, w,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_l, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_l, in_l, cell = _token_cells(pid_l, L, grid_w, s, w, BLOCK_L)
        masked = tl.load(m_ptr + b * cells + cell, mask=in_l, other=0) != 0  # (BLOCK_L,)
        base = b * L * D + offs_l.to(tl.int64)[:, None] * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            io = in_l[:, None] & in_d[None, :]
            # masked tokens are never read: their bytes are the token's
            x = tl.load(x_ptr + base + offs_d[None, :], mask=io & ~masked[:, None], other=0.0)
            tok = tl.load(tok_ptr + offs_d, mask=in_d, other=0.0).to(x.dtype)
            tl.store(out_ptr + base + offs_d[None, :], tl.where(masked[:, None], tok[None, :], x), mask=io)

    @triton.jit
    def _fill_bwd_kernel(g_ptr, m_ptr, gx_ptr, part_ptr, L, D, grid_w, s, cells, w, blocks_l,
                         BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
        """One read of grad_out: grad_x (zero on masked tokens) and this block's fp32 partial
        sum of grad_out over masked tokens, reduced afterwards in a fixed order."""
        pid_l, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_l, in_l, cell = _token_cells(pid_l, L, grid_w, s, w, BLOCK_L)
        masked = tl.load(m_ptr + b * cells + cell, mask=in_l, other=0) != 0
        base = b * L * D + offs_l.to(tl.int64)[:, None] * D
        part = part_ptr + (b * blocks_l + pid_l) * D
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            io = in_l[:, None] & in_d[None, :]
            g = tl.load(g_ptr + base + offs_d[None, :], mask=io, other=0.0)
            tl.store(gx_ptr + base + offs_d[None, :], tl.where(masked[:, None], tl.zeros_like(g), g), mask=io)
            tl.store(part + offs_d, tl.sum(tl.where(masked[:, None], g.to(tl.float32), 0.0), axis=0), mask=in_d)


# ----------------------------------------------------------------------------- launchers
BLOCK_L = 32


def _launch_meta(x: torch.Tensor, masks: torch.Tensor) -> tuple:
    B, L, D = x.shape
    h, w = masks.shape[1:]
    s = cell_span(L, masks)
    block_d = min(128, triton.next_power_of_2(D))
    return B, L, D, w * s, s, h * w, w, triton.cdiv(L, BLOCK_L), block_d


def _fill_fwd(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    x, m = x.contiguous(), masks.contiguous().view(torch.uint8)
    B, L, D, grid_w, s, cells, w, blocks_l, block_d = _launch_meta(x, masks)
    out = torch.empty_like(x)
    _fill_fwd_kernel[(blocks_l, B)](x, m, token.contiguous(), out, L, D, grid_w, s, cells, w,
                                    BLOCK_L=BLOCK_L, BLOCK_D=block_d)
    return out


def _fill_bwd(grad: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad, m = grad.contiguous(), masks.contiguous().view(torch.uint8)
    B, L, D, grid_w, s, cells, w, blocks_l, block_d = _launch_meta(grad, masks)
    grad_x = torch.empty_like(grad)
    part = torch.empty(B * blocks_l, D, device=grad.device, dtype=torch.float32)
    _fill_bwd_kernel[(blocks_l, B)](grad, m, grad_x, part, L, D, grid_w, s, cells, w, blocks_l,
                                    BLOCK_L=BLOCK_L, BLOCK_D=block_d)
    return grad_x, part.sum(0)


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("simmim::mask_token_fill", mutates_args=())
def _fill_op(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    return _fill_fwd(x, masks, token)


@_fill_op.register_fake
def _(x, masks, token):
    return torch.empty_like(x)


@torch.library.custom_op("simmim::mask_token_fill_backward", mutates_args=())
def _fill_bwd_op(grad: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _fill_bwd(grad, masks)


@_fill_bwd_op.register_fake
def _(grad, masks):
    return torch.empty_like(grad), grad.new_empty(grad.shape[-1], dtype=torch.float32)


def _fill_setup(ctx, inputs, output):
    _, masks, token = inputs
    ctx.save_for_backward(masks)
    ctx.token_dtype = token.dtype


def _fill_backward(ctx, grad):
    (masks,) = ctx.saved_tensors
    grad_x, grad_token = _fill_bwd_op(grad, masks)
    return grad_x, None, grad_token.to(ctx.token_dtype)


_fill_op.register_autograd(_fill_backward, setup_context=_fill_setup)


# ----------------------------------------------------------------------------- public function
def mask_token_fill(x: torch.Tensor, masks: torch.Tensor, token: torch.Tensor,
                    backend: str | None = None) -> torch.Tensor:
    """x: (B, L, D); masks: (B, h, w) bool; token: (D,). The fused kernel on CUDA when Triton is
    available, the reference otherwise (see kernels.dispatch)."""
    if not use_triton(x, backend=backend):
        return mask_token_fill_ref(x, masks, token)
    _check(x, masks, token)
    return _fill_op(x, masks.bool(), token)
