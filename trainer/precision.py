"""Mixed precision, decided once: `train.precision` -> an autocast dtype, and the one autocast
context the engine, evaluation and the benchmarks all use."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def amp_dtype_for(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` (auto: bf16 on CUDA, none on CPU); None = fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return PRECISIONS[precision]  # train.precision is checked at load (validate.py)


def autocast(device_type: str, amp_dtype: torch.dtype | None):
    """bf16 / fp16 autocast on `device_type`, or nothing for fp32 (a null context, so it also
    works where autocast does not exist, e.g. the meta device)."""
    return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
