"""Masked reconstruction loss (L1 by default, as in the paper).

    loss = sum(f(pred - target) * m) / (sum(m) + 1e-5) / C

with `m` the (B, h, w) cell mask expanded to pixels and counted once per pixel (not per
channel), f = |.| (L1), (.)^2 (L2) or smooth-L1. The options are one `LossOptions` (the `loss:`
section of a pre-training config): `kind`, `beta` (smooth-L1), and what the paper ablates or users
ask for: `all_pixels=True` (m = 1 everywhere), `norm_target=k` (each target pixel normalised by the
mean and variance of its k x k neighbourhood, the SwinV2 variant), `target_size=T` (the paper's
Table 4: the target is the normalised image average-pooled to T x T, see `loss_target`; the mask
then covers (T/h) x (T/w) target pixels per cell) and `kind="bins"` (the paper's Table 5: each
channel's 0-255 value in one of `bins` equal bins, pred holds `bins` logits per channel and pixel,
f = cross-entropy). `pred` may also be the head's output before PixelShuffle, (B, C*s*s, H/s, W/s):
both paths accept it, the kernel reads it in place.

The pixel mask is never built: the reference sums f inside each cell and weights the (B, h, w)
cell sums; the kernel runs one program per cell and skips every read of an unmasked cell. It reads
pred and target through their strides, so the channels-last outputs of the model's 1x1-conv head
(before or after PixelShuffle) are never copied, and writes the gradient in pred's own layout.
The kernel's forward also writes d loss / d pred (for an upstream gradient of 1), so the backward
pass reads nothing unless the upstream gradient differs from 1 (gradient accumulation, loss
scaling), when it rescales in place. Per-cell partial sums are reduced in a fixed order, so the
result is deterministic. Forward: three launches (mask count, the kernel, the sum of the cells).
Any target size runs through the same kernel: a cell of the mask is (T/h) x (T/w) pixels there.

`kind="bins"` always takes the plain PyTorch path (on every backend): its cost is the head's
`bins`-times-wider output and the log-sum-exp over each pixel's `bins` logits, which PyTorch's
cross_entropy already computes in fused kernels; what this module's kernel saves (the pixel mask,
the PixelShuffle copy) is small beside that, so a fused masked cross-entropy is left for when a
profile asks for it.

Order: options, reference, Triton kernels, launchers, custom ops with autograd, public function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .dispatch import HAS_TRITON, use_triton

EPS = 1e-5
LOSSES = {"l1": 0, "l2": 1, "smooth_l1": 2}  # the regression losses, as the kernel's KIND
KINDS = (*LOSSES, "bins")


@dataclass
class LossOptions:
    """The masked loss's options: the `loss:` section of a pre-training config (filled by OmegaConf
    in trainer/config.py), the model's `loss` argument and the kernels' `options`."""
    kind: str = "l1"  # l1 (the paper) | l2 | smooth_l1 | bins (classify colour bins, Table 5)
    beta: float = 1.0  # smooth_l1 only: where |d| turns from quadratic to linear
    all_pixels: bool = False  # the paper's ablation: predict every pixel, not only masked ones
    norm_target: int = 0  # k > 0: targets normalised over k x k windows (SwinV2's variant), k odd
    target_size: int = 0  # T > 0: predict the image average-pooled to T x T (Table 4); 0: full size
    bins: int = 256  # kind=bins: equal bins per channel over 0-255 (the paper: 8 or 256)

    @staticmethod
    def rules() -> dict[str, tuple[Callable[[Any], bool], str]]:
        """field -> (test, what the value must be); trainer/validate.py checks a config with them."""
        return {"kind": (lambda v: v in KINDS, "one of " + ", ".join(KINDS)),
                "beta": (lambda v: v > 0, "> 0"),
                "norm_target": (lambda v: v == 0 or (v >= 3 and v % 2 == 1), "0 or an odd window >= 3"),
                "target_size": (lambda v: v >= 0, "0 (the full image) or a size in pixels"),
                "bins": (lambda v: 2 <= v <= 256, "between 2 and 256 (the paper: 8 or 256)")}

    def check(self) -> None:
        """ValueError naming the first option out of range, or norm_target with bins (normalised
        targets are no longer 0-255 colours to bin)."""
        for name, (test, what) in self.rules().items():
            value = getattr(self, name)
            if not test(value):
                raise ValueError(f"loss option {name} must be {what}, got {value!r}")
        if self.kind == "bins" and self.norm_target:
            raise ValueError("loss.kind=bins classifies 0-255 colours: it cannot take loss.norm_target; set "
                             "loss.norm_target=0")

    @property
    def channels_per_value(self) -> int:
        """Values the head predicts per target channel and pixel: `bins` logits, or 1."""
        return self.bins if self.kind == "bins" else 1


def _check(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, k: int = 1) -> tuple[int, int, int]:
    """Returns (cell height, cell width, PixelShuffle factor of pred or 0); pred holds k values per
    target channel (k = bins logits for kind=bins)."""
    if target.dim() != 4:
        raise ValueError(f"target must be (B, C, H, W), got shape {tuple(target.shape)}")
    B, C, H, W = target.shape
    shuffle = 0
    if pred.shape != (B, C * k, H, W):
        s = H // pred.shape[2] if pred.dim() == 4 and pred.shape[2] else 0
        if s < 2 or pred.shape != (B, C * k * s * s, H // s, W // s) or H % s or W % s:
            raise ValueError(f"pred {tuple(pred.shape)} must be (B, {C * k}, H, W) for target {tuple(target.shape)}"
                             f", or its pre-PixelShuffle layout (B, {C * k}*s*s, H/s, W/s)")
        shuffle = s
    if masks.dim() != 3 or masks.shape[0] != B or H % masks.shape[1] or W % masks.shape[2]:
        raise ValueError(f"masks {tuple(masks.shape)} must be (B, h, w) with h dividing {H} and w dividing {W}")
    return H // masks.shape[1], W // masks.shape[2], shuffle


def norm_targets(target: torch.Tensor, k: int) -> torch.Tensor:
    """Each pixel minus the mean of its k x k neighbourhood, over the neighbourhood's std
    (unbiased; windows clipped at the border)."""
    LossOptions(norm_target=k).check()
    t = target.float()
    pool = lambda v: F.avg_pool2d(v, k, stride=1, padding=k // 2, count_include_pad=False)  # noqa: E731
    mean, mean_sq = pool(t), pool(t * t)
    count = F.avg_pool2d(torch.ones_like(t[:1, :1]), k, stride=1, padding=k // 2, count_include_pad=True) * k * k
    var = (mean_sq - mean * mean).clamp(min=0) * (count / (count - 1))
    return (t - mean) / (var + 1e-6).sqrt()


def loss_target(images: torch.Tensor, options: LossOptions, mean: torch.Tensor | None = None,
                std: torch.Tensor | None = None) -> torch.Tensor:
    """What the head predicts, from the normalised images (B, C, H, W), float.

    target_size T > 0 (T dividing H and W): the normalised image average-pooled to T x T
    (non-overlapping (H/T) x (W/T) windows; the paper's Table 4 targets of 6^2 ... 192^2 at 192);
    0 or T = H: the image itself. kind=bins: each channel's 0-255 value (un-normalised with `mean`
    and `std`, (C,) tensors in [0, 1] units, clamped to [0, 1] and rounded to 1/255) as its bin,
    floor(value * bins / 256), an int64 (B, C, T, T) tensor (the paper's Table 5 discretisation)."""
    B, C, H, W = images.shape
    t = images
    if options.target_size and options.target_size != H:
        T = options.target_size
        if H % T or W % T:
            raise ValueError(f"loss.target_size {T} must divide the image size {H}x{W}")
        t = F.avg_pool2d(t, (H // T, W // T))
    if options.kind != "bins":
        return t
    if mean is None or std is None:
        raise ValueError("loss.kind=bins needs the normalisation's mean and std to recover 0-255 colours")
    value = (t.float() * std.view(1, C, 1, 1) + mean.view(1, C, 1, 1)).clamp(0, 1).mul(255).round()
    return torch.div(value * options.bins, 256, rounding_mode="floor").long()


def _denominator(masks: torch.Tensor, cell_pixels: int, all_pixels: bool, H: int, W: int) -> torch.Tensor:
    if all_pixels:
        return torch.full((), masks.shape[0] * H * W + EPS, device=masks.device, dtype=torch.float32)
    return masks.sum(dtype=torch.float32) * cell_pixels + EPS


# ----------------------------------------------------------------------------- reference
def masked_loss_ref(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                    options: LossOptions | None = None) -> torch.Tensor:
    """pred: (B, C, H, W) or (B, C*s*s, H/s, W/s); target: (B, C, H, W) (`loss_target`'s: pooled
    for target_size; bin indices, with pred (B, C*bins, H, W) or its pre-shuffle layout, for
    kind=bins); masks: (B, h, w) bool, h dividing H and w dividing W; options: `LossOptions`
    (default: L1 on masked pixels). Returns a float32 scalar; ValueError for mismatched shapes or
    an option out of range."""
    o = options or LossOptions()
    o.check()
    sy, sx, shuffle = _check(pred, target, masks, o.channels_per_value)
    if shuffle:
        pred = F.pixel_shuffle(pred, shuffle)
    if o.norm_target:
        target = norm_targets(target, o.norm_target)
    B, C, H, W = target.shape
    h, w = masks.shape[1:]
    if o.kind == "bins":  # logits (B, C*bins, H, W) as (B, bins, C, H, W): class dim 1
        logits = pred.float().view(B, C, o.bins, H, W).transpose(1, 2)
        v = F.cross_entropy(logits, target.long(), reduction="none")  # (B, C, H, W)
    elif o.kind == "smooth_l1":  # torch's own smooth-L1, an independent check on the kernel's
        v = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=o.beta)
    else:
        d = pred.float() - target.float()  # (B, C, H, W)
        v = d.abs() if o.kind == "l1" else d * d
    cell_sums = v.view(B, C, h, sy, w, sx).sum(dim=(1, 3, 5))  # (B, h, w)
    if o.all_pixels:
        return cell_sums.sum() / _denominator(masks, sy * sx, True, H, W) / C
    return (cell_sums * masks.to(cell_sums.dtype)).sum() / _denominator(masks, sy * sx, False, H, W) / C


# ----------------------------------------------------------------------------- Triton kernels
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _loss_fwd_kernel(pred_ptr, tgt_ptr, m_ptr, count_ptr, part_ptr, grad_ptr, cells, w, all_count,
                         p_sb, p_sc, p_sh, p_sw, t_sb, t_sc, t_sh, t_sw, beta,
                         C: tl.constexpr, CELL_H: tl.constexpr, CELL_W: tl.constexpr, S: tl.constexpr,
                         KIND: tl.constexpr, ALL_PIXELS: tl.constexpr, WRITE_GRAD: tl.constexpr,
                         BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
        """One program per mask cell: the cell's sum of f(pred - target), already divided by
        C * denominator, and, if WRITE_GRAD, d loss / d pred for the cell (zeros for an unmasked
        cell, which is never read). Tiles of BLOCK_H rows (channel, y) x BLOCK_W columns; channels,
        cell sizes and the PixelShuffle factor S are compile-time constants, so pixel -> address
        is shifts and multiply-adds; any strides (channels-last head outputs are read in place)."""
        pid = tl.program_id(0).to(tl.int64)
        b, rem = pid // cells, pid % cells
        y0, x0 = (rem // w) * CELL_H, (rem % w) * CELL_W
        if ALL_PIXELS:
            active = True
            denom = all_count + 1e-5
        else:
            active = tl.load(m_ptr + pid) != 0
            denom = tl.load(count_ptr) * (CELL_H * CELL_W) + 1e-5
        scale = 1.0 / (denom * C)
        xs = tl.arange(0, BLOCK_W)
        x = x0 + xs
        acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
        for r0 in range(0, C * CELL_H, BLOCK_H):  # rows r of the cell's C x CELL_H x CELL_W pixels
            rs = r0 + tl.arange(0, BLOCK_H)
            c, y = (rs // CELL_H)[:, None], (y0 + rs % CELL_H)[:, None]
            io = (rs < C * CELL_H)[:, None] & (xs < CELL_W)[None, :]
            t_off = b * t_sb + c * t_sc + y * t_sh + x[None, :] * t_sw
            if S > 0:  # pred is (B, C*S*S, H/S, W/S): channel c*S*S + (y%S)*S + x%S at (y//S, x//S)
                ch = c * S * S + (y % S) * S + (x % S)[None, :]
                p_off = b * p_sb + ch * p_sc + (y // S) * p_sh + (x // S)[None, :] * p_sw
            else:
                p_off = b * p_sb + c * p_sc + y * p_sh + x[None, :] * p_sw
            ld = io & active
            d = (tl.load(pred_ptr + p_off, mask=ld, other=0.0).to(tl.float32)
                 - tl.load(tgt_ptr + t_off, mask=ld, other=0.0).to(tl.float32))
            ad = tl.abs(d)
            sgn = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            if KIND == 0:
                v, g = ad, sgn
            elif KIND == 1:
                v, g = d * d, 2.0 * d
            else:
                small = ad < beta
                v = tl.where(small, 0.5 * d * d / beta, ad - 0.5 * beta)
                g = tl.where(small, d / beta, sgn)
            acc += v
            if WRITE_GRAD:
                tl.store(grad_ptr + p_off, (g * scale).to(grad_ptr.dtype.element_ty), mask=io)
        tl.store(part_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0) * scale)

    @triton.jit
    def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
        """x *= g, touching memory only when g != 1 (the common loss.backward() case reads nothing)."""
        g = tl.load(g_ptr).to(tl.float32)
        if g != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            ok = offs < n
            v = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, (v * g).to(x_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------- launchers
def _dense(t: torch.Tensor) -> bool:
    """Strides the kernel can write a gradient of the same layout into (torch.empty_like keeps them)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _loss_fwd(pred, target, masks, kind: int, beta: float, all_pixels: bool, norm_target: int,
              need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    sy, sx, shuffle = _check(pred, target, masks)
    if norm_target:
        target = norm_targets(target, norm_target)
    if not _dense(pred):
        pred = pred.contiguous()
    B, C, H, W = target.shape
    h, w = masks.shape[1:]
    m = masks.contiguous().view(torch.uint8)
    part = torch.empty(B * h * w, device=pred.device, dtype=torch.float32)
    count = part if all_pixels else m.sum(dtype=torch.float32)  # part: a placeholder never read
    grad = torch.empty_like(pred) if need_grad else part  # part: a placeholder never written
    block_w = triton.next_power_of_2(sx)
    block_h = min(triton.next_power_of_2(C * sy), max(1, 1024 // block_w))
    _loss_fwd_kernel[(B * h * w,)](
        pred, target, m, count, part, grad, h * w, w, float(B * H * W), *pred.stride(), *target.stride(),
        float(beta), C=C, CELL_H=sy, CELL_W=sx, S=shuffle, KIND=kind, ALL_PIXELS=all_pixels,
        WRITE_GRAD=need_grad, BLOCK_H=block_h, BLOCK_W=block_w)
    return part.sum(), (grad if need_grad else pred.new_empty(0))


def _scale_(x: torch.Tensor, g: torch.Tensor) -> None:
    n = x.numel()
    _scale_kernel[(triton.cdiv(n, 4096),)](x, g.to(torch.float32).reshape(1), n, BLOCK=4096)


# ----------------------------------------------------------------------------- custom ops + autograd
@torch.library.custom_op("simmim::masked_loss", mutates_args=())
def _loss_op(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, kind: int, beta: float,
             all_pixels: bool, norm_target: int, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return _loss_fwd(pred, target, masks, kind, beta, all_pixels, norm_target, need_grad)


@_loss_op.register_fake
def _(pred, target, masks, kind, beta, all_pixels, norm_target, need_grad):
    loss = pred.new_empty((), dtype=torch.float32)
    return loss, (torch.empty_like(pred) if need_grad else pred.new_empty(0))


@torch.library.custom_op("simmim::scale_", mutates_args=("x",))
def _scale_op(x: torch.Tensor, g: torch.Tensor) -> None:
    _scale_(x, g)


@_scale_op.register_fake
def _(x, g):
    return None


def _loss_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.need_grad = inputs[-1]
    ctx.used = False


def _loss_backward(ctx, grad_loss, _grad_saved):
    if not ctx.need_grad:
        raise RuntimeError("masked_loss: forward ran without gradients; call it with grad enabled")
    if ctx.used:
        raise RuntimeError("the fused masked_loss supports one backward per forward; use "
                           "backend='reference' for retain_graph / repeated backward")
    ctx.used = True
    (grad,) = ctx.saved_tensors
    _scale_op(grad, grad_loss)  # in place: a no-op read-free launch when grad_loss == 1
    return grad, None, None, None, None, None, None, None


_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


# ----------------------------------------------------------------------------- public function
def masked_loss(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                options: LossOptions | None = None, *, backend: str | None = None) -> torch.Tensor:
    """The loss the model calls: the fused kernel on CUDA when Triton is available, the
    reference otherwise (see kernels.dispatch). Shapes and `options` as `masked_loss_ref`.
    Returns a float32 scalar; gradients flow to pred."""
    o = options or LossOptions()
    if o.kind == "bins" or not use_triton(pred, target, backend=backend):  # bins: see the module docstring
        return masked_loss_ref(pred, target, masks, o)
    o.check()
    _check(pred, target, masks)
    need_grad = pred.requires_grad and torch.is_grad_enabled()
    out, _ = _loss_op(pred, target.detach(), masks.bool(), LOSSES[o.kind], float(o.beta), o.all_pixels,
                      o.norm_target, need_grad)
    return out
