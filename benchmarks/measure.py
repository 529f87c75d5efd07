"""Measuring helpers shared by the benchmarks: exact FLOPs, seconds per call (autocast is the
trainer's, `simmim.trainer.precision.autocast`)."""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


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
