"""Reliability helpers shared by the trainer and the CLI: numerical guards, output-folder and
disk-space checks (docs/reliability.md).

Numerical guards. ``train_loop`` skips an optimiser step whose loss, auxiliary loss or gradient
norm is not finite (no parameter or optimiser-state update; the step number, the data position
and the learning-rate schedule still advance, so a resumed run replays the same skips) and
counts it (``skipped_steps`` in metrics.jsonl). After ``max_skipped_steps`` consecutive skips it
raises :class:`NonFiniteError`, whose message names the step, the value, the first module
whose output went non-finite and the first parameter whose gradient did
(:func:`diagnose_non_finite` re-runs the offending micro-batch once to find them).

Disk. :func:`probe_writable` writes and removes a small file (catches read-only mounts and
permission problems that ``os.access`` misses, e.g. when running as root);
:func:`check_free_space` refuses to start a run whose folder cannot hold one checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient. The
    message names the step, the value and, where found, the module and parameter."""


def format_value(value: Any) -> str:
    """``nan``, ``inf``, ``-inf`` or a short float."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return repr(value)
    return f"{number:.6g}" if math.isfinite(number) else str(number)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors in a module output (tensor, tuple/list, dict, dataclass)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from _tensors(getattr(value, item.name))


def _first_bad_value(tensor: torch.Tensor) -> float | None:
    """The first non-finite element of ``tensor`` (None when all are finite)."""
    tensor = tensor.detach()
    bad = ~torch.isfinite(tensor)
    if not bool(bad.any()):
        return None
    return float(tensor[bad].flatten()[0].float())


def first_non_finite_gradient(model: nn.Module) -> tuple[str, float] | None:
    """(name, value) of the first parameter, in ``named_parameters`` order, whose gradient holds
    a non-finite value; None when every gradient is finite (or absent)."""
    for name, param in model.named_parameters():
        if param.grad is not None:
            value = _first_bad_value(param.grad)
            if value is not None:
                return name, value
    return None


def first_non_finite_parameter(model: nn.Module) -> tuple[str, float] | None:
    """(name, value) of the first parameter holding a non-finite value; None if all are finite."""
    for name, param in model.named_parameters():
        value = _first_bad_value(param)
        if value is not None:
            return name, value
    return None


def diagnose_non_finite(model: nn.Module, run: Callable[[], torch.Tensor]) -> dict[str, Any]:
    """Run ``run()`` (forward and loss of one micro-batch, returning the loss) once more with
    forward hooks on every module, then backward, and report where values stopped being finite:
    ``{"loss", "module", "module_value", "gradient", "gradient_value", "parameter",
    "parameter_value"}`` (names None where everything was finite). ``module`` is the first
    module, in the order their forward passes finished (innermost first), whose output held a
    non-finite value. Gradients are left zeroed."""
    found: dict[str, Any] = {"module": None, "module_value": None}
    names = {module: name or "<model>" for name, module in model.named_modules()}

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if found["module"] is not None:
            return
        for tensor in _tensors(output):
            value = _first_bad_value(tensor)
            if value is not None:
                found["module"], found["module_value"] = names.get(module, type(module).__name__), value
                return

    handles = [module.register_forward_hook(hook) for module in model.modules()]
    model.zero_grad(set_to_none=True)
    try:
        loss = run()
        found["loss"] = float(loss.detach())
        if loss.requires_grad:
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    gradient = first_non_finite_gradient(model)
    parameter = first_non_finite_parameter(model)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    found["gradients_non_finite"] = sum(int(not bool(torch.isfinite(g).all())) for g in grads)
    found["gradients"] = len(grads)
    model.zero_grad(set_to_none=True)
    found["gradient"], found["gradient_value"] = gradient if gradient else (None, None)
    found["parameter"], found["parameter_value"] = parameter if parameter else (None, None)
    return found


def describe_diagnosis(found: dict[str, Any]) -> str:
    """One clause per finding of :func:`diagnose_non_finite`."""
    parts = []
    if found.get("parameter"):
        parts.append(f"parameter {found['parameter']} holds {format_value(found['parameter_value'])}")
    if found.get("module"):
        parts.append(f"first non-finite output: module {found['module']} ({format_value(found['module_value'])})")
    if found.get("gradient"):
        parts.append(f"non-finite gradients in {found.get('gradients_non_finite', '?')} of "
                     f"{found.get('gradients', '?')} parameters, first {found['gradient']} "
                     f"({format_value(found['gradient_value'])})")
    if not parts:
        parts.append("no module output or gradient is non-finite when the micro-batch is re-run "
                     "(the overflow came from another micro-batch or rank)")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Output folder and disk space
# ---------------------------------------------------------------------------------------------


def probe_writable(folder: Path, flag: str = "--out") -> None:
    """Create, fsync and remove a small hidden file in ``folder``; ValueError naming ``flag``
    and the OS reason when that fails (read-only file system, permissions, full disk)."""
    folder = Path(folder)
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
    except OSError as err:
        raise ValueError(f"{flag} {folder}: the folder is not writable ({err.strerror or err})") from None
    try:
        os.write(fd, b"mhmoe")
        os.fsync(fd)
    except OSError as err:
        raise ValueError(f"{flag} {folder}: cannot write to the folder ({err.strerror or err})") from None
    finally:
        os.close(fd)
        Path(name).unlink(missing_ok=True)


def checkpoint_bytes_estimate(params: int, optimizer: bool = True) -> int:
    """About the size of one checkpoint: float32 weights, plus AdamW's two float32 moments."""
    return int(params) * 4 * (3 if optimizer else 1) + (1 << 16)


def check_free_space(folder: Path, needed: int, flag: str = "--out") -> int:
    """Free bytes in ``folder``'s file system; ValueError when fewer than ``needed``."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover - an unusual file system: do not block the run
        return needed
    if free < needed:
        raise ValueError(
            f"{flag} {folder}: only {free / 2**20:.1f} MiB free, but one checkpoint needs about "
            f"{needed / 2**20:.1f} MiB; free some space or choose another folder"
        )
    return free


def check_output_dir(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` if needed and check that it is a writable folder (ValueError otherwise)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create the folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder is not writable")
    probe_writable(path, flag)  # read-only mounts, root without write access, a full disk
    return path
