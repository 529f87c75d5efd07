"""SimMIM on timm encoders: mask tokens after patch embedding, a linear head, masked L1 loss.

    images (B, 3, H, W), masks (B, H/32, W/32)
      -> encoder: patch embed (+ Swin's patch norm) -> mask-token fill -> [pos embed, cls] -> blocks
      -> features (B, C, H/stride, W/stride)
      -> head: 1x1 conv to stride^2 * 3 channels + PixelShuffle(stride) -> pred (B, 3, H, W)
      -> masked_l1_loss(pred, images, masks)
    (by default the loss takes the conv's output and does the shuffle's indexing itself)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.models import checkpoint_seq
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer

from simmim.kernels import mask_token_fill, masked_l1_loss
from simmim.kernels.masked_l1 import check_options


@dataclass(frozen=True)
class Arch:
    family: str  # "swin" | "swinv2" | "vit"
    embed_dim: int
    depths: tuple[int, ...]  # per stage for Swin; (depth,) for ViT
    num_heads: tuple[int, ...]
    window_size: int = 0  # Swin only
    patch_size: int = 4


ARCHS = {
    # The paper's encoders (SimMIM Table 1 / released configs).
    "swin_base": Arch("swin", 128, (2, 2, 18, 2), (4, 8, 16, 32), window_size=6),
    "swin_large": Arch("swin", 192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=12),
    "vit_base": Arch("vit", 768, (12,), (12,), patch_size=16),
    # Same classes, small enough to train on a laptop CPU in minutes.
    "swin_tiny": Arch("swin", 96, (2, 2, 6, 2), (3, 6, 12, 24), window_size=6),
    "swin_mini": Arch("swin", 64, (2, 2, 2, 2), (2, 4, 8, 16), window_size=4),
    "swin_micro": Arch("swin", 32, (1, 1, 2, 1), (1, 2, 4, 8), window_size=4),
    "vit_micro": Arch("vit", 96, (4,), (3,), patch_size=16),
    # SwinV2 (scaled cosine attention, log-spaced continuous position bias, res-post-norm): the
    # paper's scaling study (SwinV2-H 658M, SwinV2-G 3.0B parameters) and a CPU-sized variant.
    "swinv2_base": Arch("swinv2", 128, (2, 2, 18, 2), (4, 8, 16, 32), window_size=12),
    "swinv2_large": Arch("swinv2", 192, (2, 2, 18, 2), (6, 12, 24, 48), window_size=12),
    "swinv2_huge": Arch("swinv2", 352, (2, 2, 18, 2), (11, 22, 44, 88), window_size=12),
    "swinv2_giant": Arch("swinv2", 512, (2, 2, 42, 4), (16, 32, 64, 128), window_size=12),
    "swinv2_mini": Arch("swinv2", 64, (2, 2, 2, 2), (2, 4, 8, 16), window_size=4),
    "swinv2_micro": Arch("swinv2", 32, (1, 1, 2, 1), (1, 2, 4, 8), window_size=4),  # multi-process tests
}
SWIN_FAMILIES = ("swin", "swinv2")  # hierarchical, stride 32, mask token after patch embed + norm


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases (all 1-D), position tables, SwinV2's continuous-position-bias MLP and
    attention logit scales (as the released SwinV2 code) and the mask token take no weight decay."""
    keys = ("mask_token", "pos_embed", "cls_token", "relative_position_bias_table", "absolute_pos_embed",
            "cpb_mlp", "logit_scale")
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keys)


def timm_model(arch: Arch, img_size: int, window_size: int = 0, drop_path: float = 0.0, num_classes: int = 0,
               pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0)):
    """The timm Swin / SwinV2 / ViT of `arch`: the SimMIM encoder (num_classes=0) or, with a head,
    the fine-tuning classifier (ViT classifies from the mean of its patch tokens, as BEiT and SimMIM do).

    SwinV2 only: `pretrained_window_sizes` (per stage; 0: this model's own window) is the window the
    continuous position bias was trained at; its log-spaced coordinates are normalised by it, so a
    model fine-tuned at another window or resolution reads the same inputs for the offsets it saw.
    A stage whose grid is smaller than the window attends over the whole grid (timm clamps it)."""
    if arch.family in SWIN_FAMILIES:
        window_size = window_size or arch.window_size
        grid = img_size // arch.patch_size
        for stage in range(len(arch.depths)):
            res = grid // 2 ** stage
            if res % window_size and res > window_size:
                raise ValueError(f"Swin window {window_size} does not tile stage {stage} ({res}x{res} tokens) "
                                 f"at image size {img_size}: pick model.window_size dividing {res}")
        if arch.family == "swinv2":
            return SwinTransformerV2(
                img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depths=arch.depths,
                num_heads=arch.num_heads, window_size=window_size, drop_path_rate=drop_path,
                num_classes=num_classes, pretrained_window_sizes=tuple(pretrained_window_sizes))
        return SwinTransformer(
            img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depths=arch.depths,
            num_heads=arch.num_heads, window_size=window_size, drop_path_rate=drop_path, num_classes=num_classes)
    pool = {"global_pool": "avg", "fc_norm": True} if num_classes else {}
    return VisionTransformer(
        img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depth=arch.depths[0],
        num_heads=arch.num_heads[0], drop_path_rate=drop_path, num_classes=num_classes, **pool)


class SwinEncoder(nn.Module):
    """Swin or SwinV2 (by `arch.family`): timm's model minus its head, the mask token after the
    patch embedding and its norm. Returns features (B, 8C, H/32, W/32)."""
    stride = 32

    def __init__(self, arch: Arch, img_size: int, window_size: int, drop_path: float):
        super().__init__()
        self.swin = timm_model(arch, img_size, window_size, drop_path)
        self.num_features = self.swin.num_features
        self.mask_token = nn.Parameter(torch.zeros(arch.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.swin.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        x = self.swin.patch_embed(images)  # (B, H/4, W/4, C), patch norm included
        B, h, w, C = x.shape
        x = mask_token_fill(x.reshape(B, h * w, C), masks, self.mask_token).view(B, h, w, C)
        ape = getattr(self.swin, "absolute_pos_embed", None)
        if ape is not None:
            x = x + ape
        x = self.swin.norm(self.swin.layers(x))  # (B, H/32, W/32, 8C)
        return x.permute(0, 3, 1, 2)


class ViTEncoder(nn.Module):
    stride = 16

    def __init__(self, arch: Arch, img_size: int, drop_path: float):
        super().__init__()
        self.vit = timm_model(arch, img_size, drop_path=drop_path)
        self.num_features = self.vit.num_features
        self.grad_checkpointing = False
        self.mask_token = nn.Parameter(torch.zeros(arch.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = mask_token_fill(v.patch_embed(images), masks, self.mask_token)  # (B, L, D)
        x = v.norm_pre(v.patch_drop(v._pos_embed(x)))  # cls token and position table after the fill
        x = checkpoint_seq(v.blocks, x) if self.grad_checkpointing and self.training else v.blocks(x)
        x = v.norm(x)[:, v.num_prefix_tokens:]  # (B, L, D)
        B, L, D = x.shape
        gh, gw = images.shape[2] // self.stride, images.shape[3] // self.stride
        return x.transpose(1, 2).reshape(B, D, gh, gw)


@dataclass(frozen=True)
class LossOptions:
    loss: str = "l1"  # l1 (the paper) | l2 | smooth_l1
    beta: float = 1.0  # smooth_l1 only
    all_pixels: bool = False  # the paper's ablation: predict every pixel, not only masked ones
    norm_target: int = 0  # k > 0: targets normalised over k x k windows (SwinV2's variant)


class SimMIM(nn.Module):
    def __init__(self, encoder: nn.Module, in_chans: int = 3, loss: LossOptions = LossOptions(),
                 fused_shuffle: bool = True):
        super().__init__()
        self.encoder = encoder
        self.stride = encoder.stride
        self.decoder = nn.Sequential(
            nn.Conv2d(encoder.num_features, self.stride ** 2 * in_chans, kernel_size=1),
            nn.PixelShuffle(self.stride))
        self.loss_options = loss
        # The fused loss can read the head's output before PixelShuffle, saving that copy forward
        # and backward; off until measured faster on the GPU (see benchmarks).
        self.fused_shuffle = fused_shuffle

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, return_pred: bool = False):
        """images (B, 3, H, W) normalised; masks (B, h, w) bool. Returns the loss (a float32
        scalar), or (loss, pred (B, 3, H, W)) when return_pred."""
        conv, shuffle = self.decoder
        out = conv(self.encoder(images, masks))  # (B, 3*s*s, H/s, W/s)
        pred = out if self.fused_shuffle else shuffle(out)
        o = self.loss_options
        loss = masked_l1_loss(pred, images, masks, loss=o.loss, beta=o.beta, all_pixels=o.all_pixels,
                              norm_target=o.norm_target)
        if not return_pred:
            return loss
        return loss, shuffle(out) if self.fused_shuffle else pred


def build_simmim(arch: str, img_size: int, mask_patch_size: int, window_size: int = 0,
                 drop_path: float = 0.0, loss: LossOptions = LossOptions(), fused_shuffle: bool = True) -> SimMIM:
    if arch not in ARCHS:
        raise ValueError(f"unknown model.arch '{arch}': choose one of {', '.join(ARCHS)}")
    a = ARCHS[arch]
    if a.family in SWIN_FAMILIES:
        encoder = SwinEncoder(a, img_size, window_size, drop_path)
    else:
        encoder = ViTEncoder(a, img_size, drop_path)
    check_options(loss.loss, loss.norm_target)
    if img_size % encoder.stride:
        raise ValueError(f"image size {img_size} must be a multiple of the {arch} output stride {encoder.stride}")
    if img_size % mask_patch_size or mask_patch_size % a.patch_size:
        raise ValueError(f"mask patch size {mask_patch_size} must divide image size {img_size} and be a "
                         f"multiple of the {arch} patch size {a.patch_size}")
    return SimMIM(encoder, loss=loss, fused_shuffle=fused_shuffle)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]
