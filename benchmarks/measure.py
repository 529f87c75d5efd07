"""Measuring helpers shared by the benchmarks: autocast or not, exact FLOPs, seconds per call."""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def autocast(device_type: str, amp_dtype: torch.dtype | None):
    """bf16/fp16 autocast, or nothing (also where autocast does not exist, e.g. the meta device)."""
    return torch.autocast(device_type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (matmuls, convolutions, attention), counted by torch.utils.flop_counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def seconds_per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    """Mean wall time of `calls` calls after one warm-up call, device work included."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls
