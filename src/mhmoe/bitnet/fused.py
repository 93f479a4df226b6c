"""A fused small-row integer linear for CPU (an optional extra, built at first use).

Shape legend: M rows (M <= ``FUSED_MAX_ROWS``), I inputs, O outputs.

One C++ loop per row (``fused_small_rows_linear``) does what ``mhmoe.bitnet.integer.integer_linear`` after
``mhmoe.bitnet.layers.activation_codes_for_inference`` does in about eight PyTorch kernels:

    s = 127 / max(max_i |x_i|, eps)       (as PyTorch computes it: (1 / m) * 127, in float32)
    c_i = round_half_even(s * x_i)        (int8; |s x_i| <= 127 up to rounding, as there)
    sum_o = sum_i c_i * W_q[o, i]         (int32, exact)
    y_o = sum_o * (gamma / s)             (one gamma; or (sum_o / s) * gamma_o per output)

with the same float32 operations in the same order, so the codes and the integer sums are those
of the reference path and y equals it up to nothing (one gamma) or the order of two roundings.
W_q is read as plain int8 codes (O, I), one byte a weight (fbgemm's copy pads I to 512).
``fused_rmsnorm_small_rows_linear`` also fuses the layer's inner RMSNorm before it (then equal
up to a rounding of the normed input: see there).

The extension is compiled with ``torch.utils.cpp_extension.load_inline`` with ``-march=native``,
into a build directory of its own per host (``build_directory``: under torch's extension root,
``TORCH_EXTENSIONS_DIR``, named by the machine, PyTorch's CPU capability and a digest of the CPU
model and flags and of the Python and PyTorch versions), so a build for one CPU is never loaded
on another that shares the directory.
A build lock older than ``STALE_LOCK_SECONDS`` (left by a build that was killed: torch would wait
for it forever) is removed with a warning. Without a compiler, or when the build fails,
``fused_extension()`` returns None (logged once at debug level) and callers keep the PyTorch path.
CPU tensors only (one clear error otherwise).
Measured against an fp32 ``nn.Linear`` and ``BitLinear``'s integer forward by
``benchmarks/bench_decode.py --sections fused``; not wired into the layers.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

FUSED_MAX_ROWS = 8
EXTENSION_NAME = "mhmoe_fused_small_rows_v3"
STALE_LOCK_SECONDS = 600
"""A build lock this old is taken to be left by a killed build (a build takes a few minutes)."""

_CPP_SOURCE = r"""
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

// x (M, I) float32, codes (O, I) int8, gamma (G,) float32 with G = 1 or O -> (M, O) float32.
torch::Tensor fused_small_rows_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor gamma, double eps) {
  TORCH_CHECK(x.device().is_cpu() && codes.device().is_cpu() && gamma.device().is_cpu(), "x, codes, gamma: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (M, I) float32 contiguous");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == torch::kInt8 && codes.is_contiguous(), "codes: (O, I) int8 contiguous");
  TORCH_CHECK(gamma.scalar_type() == torch::kFloat32 && gamma.is_contiguous(), "gamma: float32 contiguous");
  const int64_t rows = x.size(0), in = x.size(1), out = codes.size(0);
  TORCH_CHECK(codes.size(1) == in, "codes take ", codes.size(1), " inputs, x has ", in);
  TORCH_CHECK(gamma.numel() == 1 || gamma.numel() == out, "gamma: 1 or O values");
  auto y = torch::empty({rows, out}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = codes.data_ptr<int8_t>();
  const float* gp = gamma.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  std::vector<int8_t> row_codes(in);
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = xp + m * in;
    float amax = 0.0f;
    for (int64_t i = 0; i < in; ++i) amax = std::max(amax, std::fabs(xr[i]));
    const float clamped = std::max(amax, static_cast<float>(eps));
    const float scale = (1.0f / clamped) * 127.0f;  // PyTorch's 127 / t: reciprocal, then times 127
    for (int64_t i = 0; i < in; ++i) row_codes[i] = static_cast<int8_t>(std::nearbyint(xr[i] * scale));
    const int8_t* c = row_codes.data();
    float* yr = yp + m * out;
    const float one_gamma_over_scale = gp[0] / scale;
    for (int64_t o = 0; o < out; ++o) {
      const int8_t* w = wp + o * in;
      int32_t acc = 0;
      for (int64_t i = 0; i < in; ++i) acc += static_cast<int32_t>(c[i]) * static_cast<int32_t>(w[i]);
      const float sum = static_cast<float>(acc);
      yr[o] = gamma.numel() == 1 ? sum * one_gamma_over_scale : (sum / scale) * gp[o];
    }
  }
  return y;
}

// The same after the layer's inner RMSNorm, fused too: t = x / sqrt(mean(x^2) + norm_eps) * g.
// Its sum of squares runs in another order than PyTorch's reduction: t can differ by a rounding,
// and a code sitting at a .5 boundary can then round the other way (a code step, not a rounding).
torch::Tensor fused_rmsnorm_small_rows_linear(torch::Tensor x, torch::Tensor norm_gain, torch::Tensor codes,
                                              torch::Tensor gamma, double norm_eps, double eps) {
  TORCH_CHECK(x.device().is_cpu() && norm_gain.device().is_cpu(), "x, norm_gain: CPU tensors");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x: (M, I) float32 contiguous");
  TORCH_CHECK(norm_gain.scalar_type() == torch::kFloat32 && norm_gain.numel() == x.size(1) && norm_gain.is_contiguous(),
              "norm_gain: (I,) float32 contiguous");
  const int64_t rows = x.size(0), in = x.size(1);
  auto normed = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* gp = norm_gain.data_ptr<float>();
  float* np = normed.data_ptr<float>();
  for (int64_t m = 0; m < rows; ++m) {
    const float* xr = xp + m * in;
    float squares = 0.0f;
    for (int64_t i = 0; i < in; ++i) squares += xr[i] * xr[i];
    const float inv_rms = 1.0f / std::sqrt(squares / static_cast<float>(in) + static_cast<float>(norm_eps));
    for (int64_t i = 0; i < in; ++i) np[m * in + i] = xr[i] * inv_rms * gp[i];
  }
  return fused_small_rows_linear(normed, codes, gamma, eps);
}
"""


def host_key() -> str:
    """What a ``-march=native`` build depends on: machine, PyTorch's CPU capability and a short
    digest of the CPU model name and flags (/proc/cpuinfo, where readable), of the Python and
    PyTorch versions (the compiled module's ABI)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            lines = [line for line in fh if line.startswith(("model name", "flags", "Features", "CPU part"))]
        cpu = "".join(sorted(set(lines)))
    except OSError:
        cpu = platform.processor()
    described = f"{cpu}|{sys.version_info[:2]}|{torch.__version__}"
    digest = hashlib.sha1(described.encode()).hexdigest()[:12]
    return f"{platform.machine()}_{torch.backends.cpu.get_cpu_capability()}_{digest}".lower()


def build_directory() -> Path:
    """This host's build directory of the extension (created), under torch's extension root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    path = Path(root) / f"{EXTENSION_NAME}_{host_key()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_stale_lock(directory: Path, max_age_s: float = STALE_LOCK_SECONDS) -> bool:
    """Remove ``directory``/lock (torch's build lock) when older than ``max_age_s``, with a
    warning: a killed build leaves it, and every later build would wait on it forever. Returns
    whether one was removed."""
    lock = directory / "lock"
    try:
        age_s = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if age_s < max_age_s:
        return False  # another process may be building now: torch waits for it
    warnings.warn(f"{lock}: a build lock {age_s:.0f} s old (a killed build?): removing it", RuntimeWarning,
                  stacklevel=2)
    lock.unlink(missing_ok=True)
    return True


@functools.cache
def fused_extension() -> Any | None:
    """The compiled extension, or None when it cannot be built here (logged once, debug)."""
    try:
        directory = build_directory()
        remove_stale_lock(directory)
        return cpp_extension.load_inline(
            name=EXTENSION_NAME, cpp_sources=[_CPP_SOURCE],
            functions=["fused_small_rows_linear", "fused_rmsnorm_small_rows_linear"],
            extra_cflags=["-O3", "-march=native"], verbose=False, build_directory=str(directory),
        )
    except Exception as error:  # noqa: BLE001 - any build failure (no compiler, no headers, ...): PyTorch path
        logger.debug("fused small-row integer linear unavailable (%s): using the PyTorch path", error)
        return None


def _check_cpu(**tensors: torch.Tensor) -> None:
    off_cpu = {name: str(t.device) for name, t in tensors.items() if t.device.type != "cpu"}
    if off_cpu:
        raise ValueError(f"the fused small-row linear runs on CPU tensors, got {off_cpu}")


def fused_small_rows_linear(x_MI: torch.Tensor, codes_OI: torch.Tensor, gamma: torch.Tensor,
                            eps: float) -> torch.Tensor | None:
    """y (M, O) of the module docstring for float32 CPU rows x_MI (M <= ``FUSED_MAX_ROWS``),
    int8 codes W_q (O, I) and gamma (1 or O values); None when the extension is unavailable."""
    _check_cpu(x=x_MI, codes=codes_OI, gamma=gamma)
    extension = fused_extension()
    if extension is None:
        return None
    if x_MI.shape[0] > FUSED_MAX_ROWS:
        raise ValueError(f"{x_MI.shape[0]} rows: the fused path takes at most {FUSED_MAX_ROWS}")
    return extension.fused_small_rows_linear(x_MI.contiguous(), codes_OI.contiguous(),
                                             gamma.float().reshape(-1).contiguous(), eps)


def fused_rmsnorm_small_rows_linear(x_MI: torch.Tensor, norm_gain_I: torch.Tensor, codes_OI: torch.Tensor,
                                    gamma: torch.Tensor, norm_eps: float, eps: float) -> torch.Tensor | None:
    """``fused_small_rows_linear`` of RMSNorm(x) (gain ``norm_gain_I``), the norm in the same
    kernel: equal to the reference up to a rounding of the normed input, which can move a code
    at a .5 boundary by one step (module docstring); None when the extension is unavailable."""
    _check_cpu(x=x_MI, norm_gain=norm_gain_I, codes=codes_OI, gamma=gamma)
    extension = fused_extension()
    if extension is None:
        return None
    if x_MI.shape[0] > FUSED_MAX_ROWS:
        raise ValueError(f"{x_MI.shape[0]} rows: the fused path takes at most {FUSED_MAX_ROWS}")
    return extension.fused_rmsnorm_small_rows_linear(
        x_MI.contiguous(), norm_gain_I.detach().float().contiguous(), codes_OI.contiguous(),
        gamma.float().reshape(-1).contiguous(), norm_eps, eps)


__all__ = [
    "FUSED_MAX_ROWS",
    "build_directory",
    "fused_extension",
    "fused_rmsnorm_small_rows_linear",
    "fused_small_rows_linear",
    "host_key",
    "remove_stale_lock",
]
