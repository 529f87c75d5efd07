"""Fused ops for SimMIM, each with its plain-PyTorch reference beside it."""
from .mask_fill import mask_token_fill, mask_token_fill_ref
from .masked_l1 import LossOptions, masked_l1_loss, masked_l1_loss_ref

__all__ = ["LossOptions", "mask_token_fill", "mask_token_fill_ref", "masked_l1_loss", "masked_l1_loss_ref"]
