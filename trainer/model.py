"""SimMIM on timm encoders: mask tokens after patch embedding, a linear head, masked L1 loss.

    images (B, C, H, W), masks (B, H/32, W/32)     (C = in_chans = data.channels: 3, 1 (grey) or N)
      -> encoder: patch embed (+ Swin's patch norm) -> mask-token fill -> [cls token] -> blocks
      -> features (B, D, H/stride, W/stride)
      -> head: 1x1 conv to stride^2 * C channels + PixelShuffle(stride) -> pred (B, C, H, W)
      -> masked_loss(pred, images, masks)           (normalised by C: kernels/loss.py)
    (by default the loss takes the conv's output and does the shuffle's indexing itself)

The paper's ablations are options of the same path: `model.head` (trainer/heads.py: linear, mlp,
inverse Swin-T / Swin-B), `loss.target_size` (predict the image average-pooled to T x T: the head
predicts (T / (H/stride))^2 pixels per token) and `loss.kind=bins` (C * bins logits per pixel).

The encoders are the paper's (the released SimMIM code's):
- Swin: timm's SwinTransformer (patch norm, no absolute position embedding).
- ViT: the BEiT-style ViT, timm's `Beit`: one relative position bias table shared by all blocks
  (its cls rows / columns included), layer scale on both residual branches initialised at 0.1, no
  absolute position embedding, q and v biases without a k bias, LayerNorm eps 1e-6, the cls token
  kept through the blocks and dropped at the output. Initialised as the released code did:
  truncated normal std 0.02 cut at +-1 sigma (+-0.02, so an effective std of 0.0108) for every
  linear and conv weight, the cls token and the mask token, then each block's attn.proj and
  mlp.fc2 weights divided by sqrt(2 * layer) (layer = 1..depth). For fine-tuning the shared table
  becomes one table per block and the classifier pools the mean of the patch tokens + fc_norm.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm, trunc_normal_
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch.utils.checkpoint import checkpoint

from simmim.core.errors import ConfigError
from simmim.kernels import LossOptions, loss_target, mask_token_fill, masked_loss
from simmim.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

from .heads import HEADS, VIT_DECODER_WINDOW, build_head

log = logging.getLogger("simmim")


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


WEIGHT_DECAY_RULES = ("released", "intended")


def no_weight_decay(name: str, param: nn.Parameter, family: str, rule: str = "released",
                    pretrain: bool = True) -> bool:
    """True if the parameter `name` (a SimMIM model's or a classifier's) takes no weight decay.

    "intended": no decay on norms and biases (every 1-D parameter), position tables (SwinV2: its
    continuous-position-bias MLP and attention logit scales), the cls and mask tokens.
    "released": what the released SimMIM code's parameter groups did. It exempts 1-D parameters,
    biases and the names the encoder lists; in pre-training those names and keywords are prefixed
    with "encoder." while the keywords are matched as substrings of full names, so the keyword
    `relative_position_bias_table` never matches. Hence, in pre-training, every Swin relative
    position table decays (24 tables, 45,496 values in Swin-B), and for ViT, which lists only
    pos_embed and cls_token, the mask token (stored (1, 1, C) there, so not 1-D) and the shared bias
    table decay. In fine-tuning (no prefix) Swin's tables are exempt and ViT's per-block tables decay.
    """
    if rule not in WEIGHT_DECAY_RULES:
        raise ValueError(f"optim.weight_decay_rule must be 'released' or 'intended', got '{rule}'")
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "mask_token":  # ours is (C,); the released (1, 1, C) was exempt by name for Swin only
        return rule == "intended" or family.startswith("swin")
    if param.ndim <= 1 or leaf == "bias" or leaf in ("cls_token", "pos_embed", "absolute_pos_embed"):
        return True
    if leaf == "relative_position_bias_table":
        return rule == "intended" or (family.startswith("swin") and not pretrain)
    if leaf == "logit_scale" or ".cpb_mlp." in name:  # SwinV2's encoder lists these keywords, so the
        return rule == "intended" or not pretrain  # same prefix rule leaves them decaying in pre-training
    return False


def check_swin_window(arch: Arch, img_size: int, window_size: int) -> None:
    grid = img_size // arch.patch_size
    for stage in range(len(arch.depths)):
        res = grid // 2 ** stage
        if res % window_size and res > window_size:
            raise ConfigError(f"Swin window {window_size} does not tile stage {stage} ({res}x{res} tokens) "
                              f"at image size {img_size}: pick model.window_size dividing {res}")


def timm_model(arch: Arch, img_size: int, window_size: int = 0, drop_path: float = 0.0, num_classes: int = 0,
               pretrained_window_sizes: tuple[int, ...] = (0, 0, 0, 0), in_chans: int = 3):
    """The timm Swin / SwinV2 / BEiT-style ViT of `arch`: the SimMIM encoder (num_classes=0: ViT with
    one shared relative position bias table) or, with a head, the fine-tuning classifier (ViT: one
    table per block, mean of the patch tokens + fc_norm, as the released fine-tuning). `in_chans`:
    image channels the patch embedding takes (timm's argument; 1 for grey, N for multispectral).

    SwinV2 only: `pretrained_window_sizes` (per stage; 0: this model's own window) is the window the
    continuous position bias was trained at; its log-spaced coordinates are normalised by it, so a
    model fine-tuned at another window or resolution reads the same inputs for the offsets it saw.
    A stage whose grid is smaller than the window attends over the whole grid (timm clamps it)."""
    if arch.family in SWIN_FAMILIES:
        window_size = window_size or arch.window_size
        check_swin_window(arch, img_size, window_size)
        if arch.family == "swinv2":
            return SwinTransformerV2(
                img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depths=arch.depths,
                num_heads=arch.num_heads, window_size=window_size, drop_path_rate=drop_path,
                num_classes=num_classes, pretrained_window_sizes=tuple(pretrained_window_sizes), in_chans=in_chans)
        return SwinTransformer(
            img_size=img_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim, depths=arch.depths,
            num_heads=arch.num_heads, window_size=window_size, drop_path_rate=drop_path, num_classes=num_classes,
            in_chans=in_chans)
    shared = num_classes == 0
    return Beit(
        img_size=img_size, patch_size=arch.patch_size, in_chans=in_chans, embed_dim=arch.embed_dim, depth=arch.depths[0],
        num_heads=arch.num_heads[0], qkv_bias=True, drop_path_rate=drop_path, num_classes=num_classes,
        global_pool="" if shared else "avg", norm_layer=partial(LayerNorm, eps=1e-6), init_values=0.1,
        use_abs_pos_emb=False, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared)


@torch.no_grad()
def released_vit_init(vit: Beit, *tokens: nn.Parameter, std: float = 0.02) -> None:
    """The released SimMIM ViT initialisation: every linear and conv weight, the cls token and
    `tokens` drawn from a normal of std 0.02 truncated at +-1 sigma; biases 0; LayerNorm 1 / 0;
    then attn.proj and mlp.fc2 of block i (1-based) divided by sqrt(2 i) (timm's fix_init_weight).
    Relative position tables stay 0, layer-scale gammas at their init value (0.1)."""
    # timm's trunc_normal_ draws by the inverse CDF in one pass; torch 2.14's redraws until no
    # value falls outside, ~13 full passes at +-1 sigma: 30 s of CPU for ViT-B's weights
    trunc = partial(trunc_normal_, std=std, a=-std, b=std)
    for m in vit.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for t in (vit.cls_token, *tokens):
        trunc(t)
    vit.fix_init_weight()


class SwinEncoder(nn.Module):
    """Swin or SwinV2 (by `arch.family`): timm's model minus its head, the mask token after the
    patch embedding and its norm. Returns features (B, 8C, H/32, W/32)."""
    stride = 32

    def __init__(self, arch: Arch, img_size: int, window_size: int, drop_path: float, in_chans: int = 3):
        super().__init__()
        self.swin = timm_model(arch, img_size, window_size, drop_path, in_chans=in_chans)
        self.num_features = self.swin.num_features
        self.mask_token = nn.Parameter(torch.zeros(arch.embed_dim))
        trunc_normal_(self.mask_token, std=0.02)

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
    """The BEiT-style ViT (timm's Beit) with the mask token filled after patch embedding, before
    the cls token is prepended; the cls token goes through the blocks and is dropped at the end."""
    stride = 16

    def __init__(self, arch: Arch, img_size: int, drop_path: float, in_chans: int = 3):
        super().__init__()
        self.vit = timm_model(arch, img_size, drop_path=drop_path, in_chans=in_chans)
        self.num_features = self.vit.num_features
        self.grad_checkpointing = False
        self.mask_token = nn.Parameter(torch.zeros(arch.embed_dim))
        released_vit_init(self.vit, self.mask_token)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = mask_token_fill(v.patch_embed(images), masks, self.mask_token)  # (B, L, D)
        x = v.pos_drop(torch.cat((v.cls_token.expand(len(x), -1, -1), x), dim=1))  # (B, 1 + L, D)
        bias = v.rel_pos_bias()  # (heads, 1 + L, 1 + L), shared by all blocks
        for blk in v.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, shared_rel_pos_bias=bias, use_reentrant=False)
            else:
                x = blk(x, shared_rel_pos_bias=bias)
        x = v.norm(x)[:, v.num_prefix_tokens:]  # (B, L, D)
        B, L, D = x.shape
        gh, gw = images.shape[2] // self.stride, images.shape[3] // self.stride
        return x.transpose(1, 2).reshape(B, D, gh, gw)


class SimMIM(nn.Module):
    """encoder + prediction head (`head`, trainer/heads.py; default the paper's 1x1 conv +
    PixelShuffle) + the masked loss of `loss` (kernels.LossOptions: the `loss:` section of a
    pre-training config; default L1 on masked pixels). `img_size` and the encoder's stride fix the
    target grid; `in_chans` is the image's channel count C (the head predicts C values per pixel);
    `mean` / `std` (the loader's normalisation, C values each in [0, 1] units; default `default_stats`)
    turn images back into 0-255 values for loss.kind=bins and figures. `decoder` holds the head's
    layers and the PixelShuffle, last. ValueError when mean / std do not hold C values."""

    def __init__(self, encoder: nn.Module, img_size: int, in_chans: int = 3, loss: LossOptions | None = None,
                 fused_shuffle: bool = True, head: str = "linear", encoder_window: int = VIT_DECODER_WINDOW,
                 mean: tuple | None = None, std: tuple | None = None):
        super().__init__()
        self.encoder = encoder
        self.stride = encoder.stride
        self.in_chans = in_chans
        self.loss_options = loss or LossOptions()
        self.target_size = self.loss_options.target_size or img_size
        out_chans = in_chans * self.loss_options.channels_per_value
        layers, pixels = build_head(head, encoder.num_features, img_size // self.stride, self.target_size,
                                    out_chans, encoder_window)
        self.decoder = nn.Sequential(*layers, nn.PixelShuffle(pixels))
        # On by default: the fused loss reads the head's output before PixelShuffle, saving that
        # copy forward and backward (model.fused_shuffle=false shuffles first, for comparison).
        self.fused_shuffle = fused_shuffle
        default_mean, default_std = default_stats(in_chans)
        mean, std = tuple(mean or default_mean), tuple(std or default_std)
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean {mean} / std {std} must hold one value per channel ({in_chans})")
        self.register_buffer("mean", torch.tensor(mean), persistent=False)  # (C,), for bins targets and figures
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        for layer in self.decoder:
            if hasattr(layer, "set_grad_checkpointing"):
                layer.set_grad_checkpointing(enable)

    def forward(self, images: torch.Tensor, masks: torch.Tensor, return_pred: bool = False):
        """images (B, C, H, W) normalised; masks (B, h, w) bool. Returns the loss (a float32
        scalar), or (loss, pred (B, C, H, W)) when return_pred: the prediction as a normalised
        image (a smaller target upsampled, nearest; bins as their expected colour)."""
        out = self.head_output(images, masks)
        shuffle = self.decoder[-1]
        pred = out if self.fused_shuffle else shuffle(out)
        target = loss_target(images, self.loss_options, self.mean, self.std)  # (B, C, T, T)
        loss = masked_loss(pred, target, masks, self.loss_options)
        if not return_pred:
            return loss
        return loss, self.as_image(shuffle(out), images.shape[-2:])

    def head_output(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The head's output before PixelShuffle, (B, K*p*p, T/p, T/p) (K = C, or C * bins)."""
        out = self.encoder(images, masks)  # (B, C, H/s, W/s)
        for layer in self.decoder[:-1]:
            out = layer(out)
        return out

    @torch.no_grad()
    def prediction(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The reconstruction alone: (B, C, H, W) normalised, as `forward(..., return_pred=True)`'s."""
        return self.as_image(self.decoder[-1](self.head_output(images, masks)), images.shape[-2:])

    @torch.no_grad()
    def as_image(self, pred: torch.Tensor, size) -> torch.Tensor:
        """(B, K, T, T) head output -> (B, C, H, W) normalised image: bins as the softmax-weighted
        mean of the bin centres, a smaller target upsampled (nearest)."""
        o = self.loss_options
        if o.kind == "bins":
            B, _, T, _ = pred.shape
            C = self.in_chans
            prob = pred.float().view(B, C, o.bins, T, T).softmax(2)
            centres = (torch.arange(o.bins, device=pred.device) + 0.5) * (256 / o.bins) / 255  # [0, 1] units
            colour = (prob * centres.view(1, 1, -1, 1, 1)).sum(2)
            pred = (colour - self.mean.view(1, C, 1, 1)) / self.std.view(1, C, 1, 1)
        if tuple(pred.shape[-2:]) != tuple(size):
            pred = nn.functional.interpolate(pred, size=tuple(size), mode="nearest")
        return pred


def default_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) in [0, 1] units when none is given: ImageNet's for 3 channels, else 0.5 / 0.5 per
    channel (values in [0, 1] mapped to [-1, 1])."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (0.5,) * in_chans, (0.5,) * in_chans


def target_sizes(img_size: int, grid: int, mask_grid: int) -> list[int]:
    """The loss.target_size values that fit: divisors of img_size that are multiples of the
    feature grid and of the mask grid."""
    return [t for t in range(1, img_size + 1) if img_size % t == 0 and t % grid == 0 and t % mask_grid == 0]


def check_model_options(arch: str, img_size: int, mask_patch_size: int, window_size: int = 0, head: str = "linear",
                        loss: LossOptions | None = None) -> None:
    """ConfigError (naming the keys) unless `arch` exists, its output stride divides
    data.img_size, the mask cell is a whole number of patches tiling the image, (Swin) the
    window tiles every stage, `head` exists, and loss.target_size divides the image into whole
    tokens and mask cells."""
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch '{arch}': choose one of {', '.join(ARCHS)}")
    if head not in HEADS:
        raise ConfigError(f"unknown model.head '{head}': choose one of {', '.join(HEADS)}")
    a = ARCHS[arch]
    stride = SwinEncoder.stride if a.family in SWIN_FAMILIES else ViTEncoder.stride
    if img_size % stride:
        raise ConfigError(f"data.img_size {img_size} must be a multiple of the {arch} output stride {stride}")
    if img_size % mask_patch_size or mask_patch_size % a.patch_size:
        raise ConfigError(f"data.mask_patch_size {mask_patch_size} must divide data.img_size {img_size} and be a "
                          f"multiple of the {arch} patch size {a.patch_size}")
    if a.family in SWIN_FAMILIES:
        check_swin_window(a, img_size, window_size or a.window_size)
    t = loss.target_size if loss is not None else 0
    fits = target_sizes(img_size, img_size // stride, img_size // mask_patch_size)
    if t and t not in fits:
        raise ConfigError(f"loss.target_size {t} must divide data.img_size {img_size} into whole {arch} tokens "
                          f"({img_size // stride} a side) and mask cells ({img_size // mask_patch_size} a side): "
                          f"choose one of {', '.join(map(str, fits))}")
    if loss is not None:
        try:
            loss.check()
        except ValueError as e:
            raise ConfigError(str(e)) from None


def build_simmim(arch: str, img_size: int, mask_patch_size: int, window_size: int = 0,
                 drop_path: float = 0.0, loss: LossOptions | None = None, fused_shuffle: bool = True,
                 head: str = "linear", in_chans: int = 3, mean: tuple | None = None,
                 std: tuple | None = None) -> SimMIM:
    """The SimMIM model of `arch` with prediction head `head` for `in_chans`-channel images
    normalised by `mean` / `std` (see `SimMIM`); ConfigError for options that do not fit."""
    check_model_options(arch, img_size, mask_patch_size, window_size, head, loss or LossOptions())
    a = ARCHS[arch]
    if a.family in SWIN_FAMILIES:
        encoder = SwinEncoder(a, img_size, window_size, drop_path, in_chans)
        window = window_size or a.window_size
    else:
        encoder = ViTEncoder(a, img_size, drop_path, in_chans)
        window = VIT_DECODER_WINDOW
    return SimMIM(encoder, img_size, in_chans, loss=loss, fused_shuffle=fused_shuffle, head=head,
                  encoder_window=window, mean=mean, std=std)


def param_groups(model: nn.Module, weight_decay: float, family: str, rule: str = "released") -> list[dict]:
    """Two AdamW groups of a SimMIM model, weight decay or none (see `no_weight_decay`); logs which
    parameters decay."""
    groups = {True: [], False: []}  # no decay? -> [(name, param)]
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups[no_weight_decay(name, p, family, rule, pretrain=True)].append((name, p))
    log_decay(groups[False], groups[True], weight_decay, rule)
    return [{"params": [p for _, p in groups[False]], "weight_decay": weight_decay},
            {"params": [p for _, p in groups[True]], "weight_decay": 0.0}]


def log_decay(decay: list, no_decay: list, weight_decay: float, rule: str) -> None:
    """One line per side: tensor and value counts, then the names with block indices folded (`*`)."""
    def summary(items):
        folded = Counter(re.sub(r"\.\d+\.", ".*.", n) for n, _ in items)
        names = ", ".join(f"{k} x{c}" if c > 1 else k for k, c in folded.items())
        return f"{len(items)} tensors, {sum(p.numel() for _, p in items):,} values: {names}"

    log.info("weight decay %g (rule %s) on %s", weight_decay, rule, summary(decay))
    log.info("no weight decay on %s", summary(no_decay))
