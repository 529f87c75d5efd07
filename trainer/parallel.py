"""Data parallelism: DDP (every rank holds the whole model) or FSDP2 (parameters, gradients and
optimizer state sharded over the ranks), chosen by `train.parallel`.

FSDP2 is PyTorch's own `torch.distributed.fsdp.fully_shard`, applied as torchtitan does: once per
transformer block (each block's parameters are all-gathered just before it runs and freed after),
then on the root for what remains (patch embedding, merges, norms, head, mask token). Parameters
become DTensors sharded on dim 0; the optimizer is built on them afterwards and so holds only its
shard. Mixed precision is FSDP's policy (bf16 parameters in compute, fp32 gradient reduction)
rather than autocast's per-op weight casts; `cpu_offload` keeps the shards, their gradients and
the optimizer state in host memory.

Gradient accumulation: `set_requires_gradient_sync(False)` on non-final micro-steps (FSDP2's
counterpart of DDP's `no_sync`); `sync_context` gives either.
"""
from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.distributed as dist
from timm.models.beit import Block as BeitBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.swin_transformer_v2 import SwinTransformerV2Block
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from .distributed import all_reduce_max

log = logging.getLogger("simmim")
PARALLEL = ("ddp", "fsdp")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a SimMIM or fine-tuning model (timm Swin, SwinV2, BEiT / ViT), in order:
    the units FSDP2 shards and activation checkpointing recomputes."""
    kinds = (SwinTransformerBlock, SwinTransformerV2Block, BeitBlock, Block)
    return [m for m in model.modules() if isinstance(m, kinds)]


def apply_fsdp(model: nn.Module, *, param_dtype: torch.dtype | None, cpu_offload: bool = False,
               compile_blocks: bool = False) -> nn.Module:
    """Shards `model` in place over the default process group: fully_shard per block, then the
    root. param_dtype (e.g. torch.bfloat16): parameters are cast to it for compute and gradients
    reduced in float32; None keeps float32 throughout. compile_blocks: each block is compiled
    before sharding (torchtitan's per-block compile). Returns the model (now an FSDPModule)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    kwargs = {"mp_policy": mp, **({"offload_policy": CPUOffloadPolicy()} if cpu_offload else {})}
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no transformer blocks to shard")
    ignore_swinv2_view_warning(blocks)
    for i, block in enumerate(blocks):
        if compile_blocks:
            block.compile()
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
    net = getattr(model, "net", None)  # fine-tuning's Classifier: evaluation calls its network alone
    if isinstance(net, nn.Module):
        fully_shard(net, **kwargs)
    fully_shard(model, **kwargs)
    return model


def ignore_swinv2_view_warning(blocks: list[nn.Module]) -> None:
    """FSDP2 warns, at every forward, that a sharded module returned a view tensor (an in-place op
    on it would skip the pre-backward hook's all-gather). timm's SwinTransformerV2Block ends with
    `x.reshape(B, H, W, C)` of a contiguous tensor, a view, and nothing downstream (the next block,
    timm's stage, our encoder) changes it in place: FSDP2's gradients equal DDP's step for step
    (tests/test_fsdp.py). So that one warning, for that one block type, is ignored process-wide
    (the step runs outside any context that could scope it); any other module returning a view
    still warns."""
    if any(isinstance(b, SwinTransformerV2Block) for b in blocks):
        warnings.filterwarnings("ignore", category=UserWarning,
                                message=r"FSDP2-wrapped module \(FSDPSwinTransformerV2Block\) returned a view tensor")


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gathered(module: nn.Module):
    """FSDP2: `module`'s own parameters (not those of its separately sharded blocks) all-gathered
    for code that calls its children directly, bypassing the forward whose hook would gather them
    (the linear probe reads an intermediate stage); nothing for an unsharded module."""
    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def sync_context(model: nn.Module, sync: bool):
    """A context for one micro-step's backward: gradients are reduced across ranks only if `sync`
    (the last micro-step of an accumulated step)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if is_fsdp(inner):
        inner.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(inner, "no_sync"):
        return contextlib.nullcontext()
    return inner.no_sync()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total gradient norm over every rank's gradients (a plain tensor, also when the
    gradients are FSDP's sharded DTensors), after clipping them to `max_norm` (inf: no clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, foreach=True)
    if hasattr(total, "full_tensor"):  # a DTensor: the shards' norms combined across ranks
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total, foreach=True)
    return total


def wrap_for_training(model: nn.Module, parallel: str, world_size: int, device: torch.device,
                      param_dtype: torch.dtype | None, cpu_offload: bool, compile: bool) -> nn.Module:
    """The model the step runs: DDP- or FSDP2-wrapped when there are several ranks, compiled if
    asked. FSDP2 wraps in place (the optimizer must be built afterwards, on the sharded
    parameters); with one rank there is nothing to shard and the model trains as it is."""
    assert parallel in PARALLEL, parallel  # train.parallel is checked at load (validate.py)
    if parallel == "fsdp" and world_size > 1:
        return apply_fsdp(model, param_dtype=param_dtype, cpu_offload=cpu_offload, compile_blocks=compile)
    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(train_model) if compile else train_model


def lockstep(loader, model: nn.Module, device: torch.device):
    """Yields (batch, real) over an evaluation loader whose ranks may hold different numbers of
    batches: under FSDP2, whose forward is collective, ranks with fewer batches repeat their last
    one (real=False: run the forward, count nothing) until every rank has run as many forwards."""
    mine = len(loader)
    most = int(all_reduce_max(float(mine), device)) if is_fsdp(model) else mine
    last = None
    for batch in loader:
        last = batch
        yield batch, True
    for _ in range(most - mine):
        yield last, False
