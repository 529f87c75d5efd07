"""The one place the trainer relies on a private torch API: the fused optimizers' found-inf flag.

torch's fused Adam / AdamW / SGD / Adagrad read `optimizer.found_inf` (a float tensor on the
parameters' device) in `step()` and, when it is non-zero, leave parameters, moments and step
counts untouched, all on the device: a step with a non-finite gradient is skipped without the
host waiting for the device. This is how `torch.amp.GradScaler` drives them (it sets the
attribute, steps, deletes it); nothing public offers it without a scaler. The non-fused
implementations refuse the attribute (an AssertionError deep inside torch), so `skip_nonfinite_step`
decides once per call which path applies, and non-fused optimizers (or a future torch without
the flag, caught by tests/test_compat.py) fall back to reading the flag on the host: the same
result, one host sync per step.
"""
from __future__ import annotations

import torch

FUSED_FOUND_INF = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)


def reads_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """True when `optimizer.step()` honours a `found_inf` attribute on the device (fused
    implementations of the classes in FUSED_FOUND_INF, as GradScaler also checks through
    `_step_supports_amp_scaling`)."""
    return (type(optimizer) in FUSED_FOUND_INF and bool(optimizer.defaults.get("fused"))
            and getattr(optimizer, "_step_supports_amp_scaling", False))


def skip_nonfinite_step(optimizer: torch.optim.Optimizer, found_inf: torch.Tensor) -> None:
    """`optimizer.step()` unless `found_inf` (a 0-d float tensor, 1.0 = the gradient is not
    finite) is set, in which case nothing changes (parameters, moments, step counts).

    Fused optimizers: decided on the device, no host sync. Any other optimizer: `found_inf` is
    read on the host (one sync)."""
    if reads_found_inf(optimizer):
        optimizer.found_inf = found_inf
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not found_inf.item():
        optimizer.step()
