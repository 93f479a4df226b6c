"""Where and how the computation runs: device, precision and autocast, torch threads, seeding.

Below both training and evaluation (neither imports the other for these).
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

PRECISIONS = ("auto", "fp32", "bf16")


DEVICES_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:N"


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: must be {DEVICES_HELP}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: must be {DEVICES_HELP}")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for ``auto``, None (fp32) on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def available_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads when not given: one per usable core (deterministic, so a resumed run
    computes with the same kernels). On a machine already busy with other processes,
    oversubscribed OpenMP threads spin and run several times slower: pass ``threads``."""
    return available_cores()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and numpy's legacy global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on the device, or nothing (fp32) when ``dtype`` is None/float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The floating dtypes weights are stored in (exports) or computed in (benchmarks), by name."""


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype of ``DTYPES`` given by name or as itself; ValueError naming the choices otherwise."""
    resolved = DTYPES.get(dtype) if isinstance(dtype, str) else dtype if dtype in DTYPES.values() else None
    if resolved is None:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    return resolved


def dtype_name(dtype: str | torch.dtype) -> str:
    """The ``DTYPES`` name of a dtype (``resolve_dtype``'s rule)."""
    resolved = resolve_dtype(dtype)
    return next(name for name, d in DTYPES.items() if d == resolved)
