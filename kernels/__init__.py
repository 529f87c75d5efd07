"""Fused ops for SimMIM, each with its plain-PyTorch reference beside it."""
from .mask_fill import mask_token_fill, mask_token_fill_ref
from .loss import LossOptions, loss_target, masked_loss, masked_loss_ref

__all__ = ["LossOptions", "loss_target", "mask_token_fill", "mask_token_fill_ref", "masked_loss", "masked_loss_ref"]
