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


THREADS_PER_CORE_LIMIT = 4
"""``--threads`` may oversubscribe the cores at most this many times: far more OpenMP threads
than cores only spin, and ``--threads 100000`` made OpenMP crash the process (SIGSEGV)."""


def max_threads() -> int:
    """The largest accepted torch thread count on this machine (``THREADS_PER_CORE_LIMIT``
    per usable core)."""
    return THREADS_PER_CORE_LIMIT * available_cores()


def check_threads(name: str, threads: int) -> None:
    """ValueError naming ``threads`` unless it is a positive integer <= ``max_threads()``."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"{name}={threads!r}: must be a positive integer")
    if threads > max_threads():
        raise ValueError(
            f"{name}={threads}: must be at most {max_threads()} ({THREADS_PER_CORE_LIMIT} per usable core; "
            f"this machine has {available_cores()})"
        )


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not report one)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # pragma: no cover - not Unix
        return None


def default_threads(processes: int = 1) -> int:
    """Torch threads per process when none are given: the usable cores not already busy
    (cores minus the 1-minute load average, rounded), shared by this node's ``processes``,
    at least 1.

    Why: OpenMP threads that find their cores taken spin; measured on a 2-core machine with
    two other single-threaded trainings running (load average ~5), ``mhmoe train --preset demo
    --variant mhmoe_h3 --max-steps 20`` took 31-198 s of step time with 2 threads and 2.6 s
    with 1 (docs/distributed.md, "Threads"). The value depends on the machine's load at the
    moment, so a run records the count it chose (config.json ``train.threads``) and a resume
    reuses it: the same kernels, bit-identical results."""
    cores = available_cores()
    share = max(1, cores // max(1, processes))
    load = load_average()
    if load is None:
        return share
    # The load average counts the whole host; with an affinity set smaller than the host (a
    # SLURM cpuset, docker --cpuset-cpus) our share of that load is proportional to our cores.
    host_cores = os.cpu_count() or cores
    load = load * min(1.0, cores / host_cores)
    idle = max(1, round(cores - load))
    return max(1, min(share, idle // max(1, processes)))


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
