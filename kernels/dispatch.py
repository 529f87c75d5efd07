"""Chooses, once per call, between the fused Triton kernels and the PyTorch references.

    SIMMIM_KERNELS=auto       Triton for CUDA tensors when Triton imports, the reference otherwise
    SIMMIM_KERNELS=triton     Triton always (CPU tensors need TRITON_INTERPRET=1, for tests)
    SIMMIM_KERNELS=reference  the reference always

`backend=` on the public functions overrides the environment for one call; `use_backend()` is a
context manager for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

MODES = ("auto", "triton", "reference")
_override: str | None = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def mode() -> str:
    m = _override or os.environ.get("SIMMIM_KERNELS", "auto")
    if m not in MODES:
        raise ValueError(f"SIMMIM_KERNELS must be one of {', '.join(MODES)}, got '{m}'")
    return m


def use_triton(*tensors: torch.Tensor, backend: str | None = None) -> bool:
    m = backend or mode()
    if m not in MODES:
        raise ValueError(f"kernel backend must be one of {', '.join(MODES)}, got '{m}'")
    if m == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if m == "triton":
        if not HAS_TRITON:
            raise RuntimeError("SIMMIM_KERNELS=triton but Triton is not installed (pip install triton)")
        if not on_cuda and not interpreting():
            raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before import")
        return True
    return HAS_TRITON and on_cuda


@contextlib.contextmanager
def use_backend(name: str):
    global _override
    if name not in MODES:
        raise ValueError(f"kernel backend must be one of {', '.join(MODES)}, got '{name}'")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous
