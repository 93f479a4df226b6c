"""Integer inference for BitNet b1.58: int8 activations x ternary int8 weights, int32 sums, scales.

Shape legend: M rows (tokens, sub-tokens or one expert's rows), I/O in/out features, E experts.

The quantised matmul of training (``mhmoe.bitnet.layers``) is, in floating point,

    y = (x_codes / s) @ (gamma * W_q)^T,   x_codes in [-128, 127] per row, W_q in {-1, 0, +1}.

Both factors are integers times one scale each, so [BitNet, arXiv 2310.11453, Eq. 11; b1.58,
arXiv 2402.17764, Sec. 2] the same value is

    y = (x_codes @ W_q^T) * gamma / s          (the integer product is exact: |sum| <= 128 * I)

This module computes the integer product ``x_codes @ W_q^T`` with integer kernels and applies the
two scales once, in float32:

* ``"fbgemm"`` (CPU, where PyTorch ships fbgemm): the x86 int8 GEMM behind PyTorch's quantised
  linear layers, uint8 activations (codes + 128, zero point 128) x int8 weights, int32
  accumulation; the weight is prepacked once. Read back as float32, which holds every sum
  exactly while |sum| < 2^24 (true for I < 131072 inputs). On AVX2 the kernel multiplies u8 x s8
  pairs into int16 before widening; ternary weights keep each pair sum within 2 * 255, far from
  the int16 limit, so nothing saturates.
* ``"int_mm"``: ``torch._int_mm`` (int8 x int8 -> int32). On CUDA it needs more than 16 rows and
  in/out sizes that are multiples of 8: rows are zero-padded to that, and shapes it cannot take
  use ``"float"``. On this project's AVX2 CPU (AMD EPYC, no VNNI, torch 2.13) it is a scalar
  kernel, 3-40x slower than an fp32 matmul of the same shape (docs/benchmarks.md), so it is
  never the CPU default.
* ``"float"``: the integer codes as float32 operands of a plain matmul (the weight converted per
  call, never kept): exact for the same reason; one byte a weight resident.

The default (no backend chosen: ``memory_aware_backend``) is per matrix, so that a ternary model
stays at about a quarter of fp32's bytes: fbgemm where its blocked copy is at most
``FBGEMM_MAX_SIZE_RATIO`` times the int8 codes (input widths at or just below a multiple of 512
on AVX2), else the plain codes' fastest kernel for the device (``plain_codes_backend``:
``"float"`` on CPU, ``"int_mm"`` elsewhere). fbgemm pads the input dimension to a multiple of
512 on AVX2 and AVX512-VNNI, 256 on AVX512 (``fbgemm_packed_bytes``, ``FBGEMM_BLOCKING``): on
AVX2 at 192 inputs its copy is 2.7 bytes a weight, at 64 it is 8 (twice the fp32 matrix).
A ``backend`` chosen with ``integer_inference`` (or ``load_ternary`` /
``prepare_integer_inference``) applies to every matrix.

The ``integer_inference`` switch is a ``contextvars.ContextVar``: a ``with`` block in one thread
(or asyncio task) does not change what another one runs.

Caches: the integer weights of a module are built once (``integer_weights``) and kept, keyed by
the module, in a ``WeakKeyDictionary`` (never in the module: they are not state, do not travel
with ``deepcopy``/``state_dict``). An entry is used only while all of these hold:

* each source tensor is the very object it was built from (a weak reference, so a new tensor
  that happens to get a freed tensor's address is not mistaken for it), at the same address
  and version counter (in-place updates through autograd-visible ops bump the counter);
* no optimiser step was taken since, anywhere in the process (``optimizer_generation``: a
  global ``torch.optim`` step post-hook; fused/foreach AdamW kernels update parameters without
  bumping their version counters, so the counter alone misses every training step);
* the module was not put in train mode since (``train(True)`` drops its entries: evaluation
  during training rebuilds them);
* the sources are the module's own registered Parameters/buffers: a parametrised weight
  (``torch.nn.utils.parametrize``, PEFT ``target_parameters``) is recomputed on every access,
  so nothing identifies it across calls; such modules build their integer weights per call.

Not detected: edits through ``.data`` (``p.data.mul_(...)``, ``p.data = t``), which bypass the
version counter, outside an optimiser step: call ``clear_cache(module)`` (or ``clear_cache()``)
after them. Sources made under ``torch.inference_mode`` have no version counter at all, so
nothing would see their in-place edits (``load_state_dict`` inside ``inference_mode`` copies into
them): modules whose sources are inference tensors build their integer weights per call, never
cached. ``load_state_dict`` drops a module's entries in any case (``_IntegerCacheOwner`` in
``mhmoe.bitnet.layers``).

The packed ternary modules of ``mhmoe.bitnet.ternary`` own their integer weights instead (not
in this cache); ``clear_cache`` marks those stale too, and they are rebuilt from their own codes
and current scales at the next integer forward.

When the integer path runs (``use_integer_path``): no autograd is needed (the module is not
training and no input or weight requires a gradient with grad mode on, nor carries a
forward-mode tangent or a ``torch.func`` wrapper: the integer kernels would drop tangents), not
under ``torch.compile``, and not switched off by ``integer_inference(False)`` (the float
reference the tests compare against).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_post_hook

INTEGER_BACKENDS = ("fbgemm", "int_mm", "float")
ACTIVATION_ZERO_POINT = 128
"""fbgemm's activations are uint8: the int8 codes shifted by 128, with zero point 128."""
EXACT_FLOAT_SUM_LIMIT = 2**24
"""float32 holds every integer up to 2^24: the integer sums stay exact below it."""

_STATE: contextvars.ContextVar[tuple[bool, str | None]] = contextvars.ContextVar(
    "mhmoe_integer_inference", default=(True, None)
)
"""(enabled, backend) of the innermost ``integer_inference`` block of this thread/task."""


@contextlib.contextmanager
def integer_inference(enabled: bool = True, backend: str | None = None) -> Iterator[None]:
    """Switch the integer inference path on/off (and pick its kernel) inside a ``with`` block.

    ``integer_inference(False)``: quantised layers run the training-time float math in eval too
    (the reference the tests compare the integer path against). ``backend``: one of
    ``INTEGER_BACKENDS`` for every matrix (None: each matrix its ``memory_aware_backend``).
    """
    if backend is not None:
        check_backend(backend)
    token = _STATE.set((bool(enabled), backend))
    try:
        yield
    finally:
        _STATE.reset(token)


def integer_inference_state() -> tuple[bool, str | None]:
    """(enabled, backend or None) that ``integer_inference`` set in this thread/task."""
    return _STATE.get()


def check_backend(backend: str) -> str:
    if backend not in INTEGER_BACKENDS:
        raise ValueError(f"integer backend {backend!r}: must be one of {', '.join(INTEGER_BACKENDS)}")
    if backend == "fbgemm" and not fbgemm_available():
        raise ValueError("integer backend 'fbgemm': this PyTorch build has no fbgemm quantised engine")
    return backend


@functools.cache
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


FBGEMM_MAX_SIZE_RATIO = 1.05
"""fbgemm is the default for a matrix only where its packed copy takes at most this many times
the bytes of the int8 codes, so that the quantised matrices of every model stay within 5% of a
quarter of fp32's bytes, plus their float32 scales (1-3% more at the mini shapes). On AVX2,
widths that are multiples of 512 pass (the only overhead left is fbgemm's int32 column offsets,
4 bytes an output row: 1.008 at 512 inputs, 1.004 at 1024); 192 inputs (2.7), 384 or 768
(1.33), or outputs padded to 8 (12 outputs: 1.33) do not. A larger factor would buy little speed: on this project's CPU (medians of
interleaved rounds, 1 thread, the mini model's shapes) fbgemm runs 1.1-1.5x the speed of
``"float"`` on the (in x out) 192 x 576, 192 x 1024 and 512 x 192 matrices at 8-64 rows,
0.65-1.2x at 1 row, and 0.25-0.7x on the MH-MoE experts' 64 x 256 and 128 x 64 (it costs a
fixed ~60 us a call)."""


def plain_codes_backend(device: torch.device) -> str:
    """The fastest kernel on plain int8 codes (one byte a weight) for ``device``: ``"float"`` on
    CPU (medians of interleaved rounds, 1 thread, the mini model's shapes at 1-64 rows: 3-29x the
    speed of ``torch._int_mm``, a scalar kernel there), ``"int_mm"`` elsewhere."""
    return "float" if device.type == "cpu" else "int_mm"


def memory_aware_backend(device: torch.device, out_features: int, in_features: int) -> str:
    """The default kernel of one (O, I) matrix on ``device``: fbgemm (CPU, where present) when its
    packed copy is at most ``FBGEMM_MAX_SIZE_RATIO`` times the int8 codes, else
    ``plain_codes_backend``."""
    if (
        device.type == "cpu"
        and fbgemm_available()
        and fbgemm_packed_bytes(out_features, in_features) <= FBGEMM_MAX_SIZE_RATIO * out_features * in_features
    ):
        return "fbgemm"
    return plain_codes_backend(device)


def default_backend(device: torch.device, out_features: int, in_features: int) -> str:
    """The kernel an (O, I) matrix on ``device`` gets now: the one chosen inside
    ``integer_inference``, else its ``memory_aware_backend``."""
    backend = _STATE.get()[1]
    if backend is not None:
        return backend
    return memory_aware_backend(device, out_features, in_features)


def use_integer_path(module: nn.Module, *tensors: torch.Tensor | None) -> bool:
    """Whether ``module`` computes with the integer kernels for these inputs/weights (docstring)."""
    if not _STATE.get()[0] or module.training or torch.compiler.is_compiling():
        return False
    present = [t for t in tensors if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    # torch.func transforms (jvp, grad, vmap) wrap tensors and forward-mode AD attaches
    # tangents; the integer kernels see neither, so the output would lose the tangent.
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in present):
        return False
    # only inside a dual_level can a tensor carry a tangent: skip unpack_dual's cost otherwise
    dual_level_open = getattr(forward_ad, "_current_level", 0) >= 0
    return not (dual_level_open and any(forward_ad.unpack_dual(t).tangent is not None for t in present))


# --------------------------------------------------------------------------------------------
# Integer weights
# --------------------------------------------------------------------------------------------


def _quiet_quantized(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a quantised-tensor API, hiding its deprecation warning (the kernel is what we use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args)


class Int8Weight:
    """One ternary matrix W_q (O, I) in the form a backend multiplies with.

    ``fbgemm``: the prepacked int8 weight (``fbgemm_packed_bytes``: O * I bytes once both
    dimensions are padded to fbgemm's blocks, 512 inputs x 8 outputs on AVX2);
    ``int_mm``/``float``: the int8 codes (O, I), one byte a weight.
    Never a float copy. ``backend`` None: the matrix's ``memory_aware_backend`` (whatever
    ``integer_inference`` chose: a form rebuilt for the default stays the default).
    """

    def __init__(self, codes_OI: torch.Tensor, backend: str | None = None) -> None:
        if codes_OI.dim() != 2:
            raise ValueError(f"ternary weight of shape {tuple(codes_OI.shape)}: must be 2-D (out, in)")
        self.out_features, self.in_features = codes_OI.shape
        if backend is None:
            backend = memory_aware_backend(codes_OI.device, self.out_features, self.in_features)
        self.backend = check_backend(backend)
        check_exact(self.in_features)
        codes_OI = codes_OI.detach().to(torch.int8).contiguous()
        if backend == "fbgemm":
            if codes_OI.device.type != "cpu":
                raise ValueError(f"integer backend 'fbgemm' runs on CPU, the weight is on {codes_OI.device}")
            qweight = _quiet_quantized(torch._make_per_tensor_quantized_tensor, codes_OI, 1.0, 0)
            with _fbgemm_engine():
                self.packed = torch.ops.quantized.linear_prepack(qweight, None)
            self.codes_OI = None
        else:
            self.packed = None
            self.codes_OI = codes_OI
        self.device = codes_OI.device

    def nbytes(self) -> int:
        """Resident bytes: ``fbgemm_packed_bytes`` for fbgemm (its blocked copy pads the input
        dimension), else one byte per weight."""
        if self.backend == "fbgemm":
            return fbgemm_packed_bytes(self.out_features, self.in_features)
        return self.codes_OI.numel()

    def codes(self) -> torch.Tensor:
        """W_q (O, I) as int8 codes: the kept tensor (``int_mm``/``float``, do not modify it), or
        a new tensor unpacked from fbgemm's blocked copy (exact: the codes were packed as is)."""
        if self.backend == "fbgemm":
            qweight, _ = _quiet_quantized(torch.ops.quantized.linear_unpack, self.packed)
            return qweight.int_repr()
        return self.codes_OI

    def integer_sums(self, codes_MI: torch.Tensor) -> torch.Tensor:
        """x_codes @ W_q^T as float32 (M, O), exact; ``codes_MI`` integral floats in [-128, 127]."""
        if codes_MI.shape[-1] != self.in_features:
            raise ValueError(f"input has {codes_MI.shape[-1]} features, the weight takes {self.in_features}")
        if self.backend == "fbgemm":
            # Input quantised with scale 1 and zero point 128: exactly codes + 128 in [0, 255].
            return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
                codes_MI.float().contiguous(), 1.0, ACTIVATION_ZERO_POINT, self.packed
            )
        if self.backend == "int_mm":
            return int_mm_sums(codes_MI, self.codes_OI)
        return float_sums(codes_MI, self.codes_OI)


FBGEMM_BLOCKING = {"AVX2": (512, 8), "AVX512": (256, 32), "AVX512_VNNI": (512, 48)}
"""(inputs, outputs) of the blocks fbgemm's int8 weight packing (``PackBMatrix``, 32-bit
accumulation) stores the (I, O) matrix in, zero-padded, per instruction set: its
``PackingTraits`` KCB x NCB (fbgemm ``include/fbgemm/PackingTraits-inl.h``). On AVX2 a 192-wide
matrix takes 512 / 192 = 2.7 bytes a weight, a 64-wide one 8. The AVX2 entry is measured on this
project's CPU (AMD EPYC, torch 2.13) by the resident-memory growth of many prepacked weights
(``tests/test_int_inference.py``); the AVX512 and AVX512_VNNI entries are read from fbgemm's
tables, not measured here."""


def fbgemm_instruction_set() -> str:
    """The ``FBGEMM_BLOCKING`` key of this host: ``torch.backends.cpu.get_cpu_capability()``
    ("AVX512" split into "AVX512_VNNI" where /proc/cpuinfo lists avx512_vnni, as fbgemm's own
    dispatch does); "AVX2" for anything else (fbgemm runs on AVX2 hosts and up only)."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        return "AVX512_VNNI" if "avx512_vnni" in _cpu_flags() else "AVX512"
    return "AVX2"


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU flags /proc/cpuinfo lists (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def fbgemm_packed_bytes(out_features: int, in_features: int, instruction_set: str | None = None) -> int:
    """Resident bytes of fbgemm's prepacked int8 weight (O, I): the padded blocks of
    ``FBGEMM_BLOCKING`` for ``instruction_set`` (None: this host's, ``fbgemm_instruction_set``),
    plus its int32 column offsets (one per output)."""
    instruction_set = fbgemm_instruction_set() if instruction_set is None else instruction_set
    if instruction_set not in FBGEMM_BLOCKING:
        raise ValueError(f"instruction_set={instruction_set!r}: must be one of {', '.join(FBGEMM_BLOCKING)}")
    k_block, n_block = FBGEMM_BLOCKING[instruction_set]
    padded_in = -(-in_features // k_block) * k_block
    padded_out = -(-out_features // n_block) * n_block
    return padded_in * padded_out + 4 * out_features


@contextlib.contextmanager
def _fbgemm_engine() -> Iterator[None]:
    previous = torch.backends.quantized.engine
    if previous != "fbgemm":
        torch.backends.quantized.engine = "fbgemm"
    try:
        yield
    finally:
        if previous != "fbgemm":
            torch.backends.quantized.engine = previous


def float_sums(codes_MI: torch.Tensor, codes_OI: torch.Tensor) -> torch.Tensor:
    """The integer product as a float32 matmul (exact below 2^24; the weight converted per call)."""
    return F.linear(codes_MI.float(), codes_OI.float())


def int_mm_shape_ok(device: torch.device, in_features: int, out_features: int) -> bool:
    """Whether ``torch._int_mm`` takes these sizes here (CUDA: multiples of 8; CPU: any)."""
    return device.type == "cpu" or (in_features % 8 == 0 and out_features % 8 == 0)


def int_mm_padded_rows(num_rows: int, device: torch.device, force_padding: bool = False) -> int:
    """Rows ``torch._int_mm`` gets: on CUDA (or when forced) > 16 and a multiple of 8."""
    if device.type == "cpu" and not force_padding:
        return num_rows
    return max(24, -(-num_rows // 8) * 8)


def int_mm_sums(codes_MI: torch.Tensor, codes_OI: torch.Tensor, force_padding: bool = False) -> torch.Tensor:
    """x_codes @ W_q^T through ``torch._int_mm``: int8 x int8 -> int32, returned as float32.

    Rows are zero-padded to what the device's kernel accepts (``int_mm_padded_rows``, padding
    forced for tests with ``force_padding``); sizes it cannot take fall back to ``float_sums``.
    """
    num_rows, in_features = codes_MI.shape
    out_features = codes_OI.shape[0]
    if num_rows == 0 or not int_mm_shape_ok(codes_MI.device, in_features, out_features):
        return float_sums(codes_MI, codes_OI)
    x_int8 = codes_MI.to(torch.int8)
    padded = int_mm_padded_rows(num_rows, codes_MI.device, force_padding)
    if padded != num_rows:
        x_int8 = torch.cat([x_int8, x_int8.new_zeros(padded - num_rows, in_features)])
    sums_MO = torch._int_mm(x_int8, codes_OI.t())  # (M, I) x (I, O) -> (M, O) int32
    return sums_MO[:num_rows].float()


# --------------------------------------------------------------------------------------------
# The cache: integer weights per module, built once
# --------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    key: tuple
    refs: tuple[weakref.ref, ...]
    value: Any


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[str, _Entry]] = weakref.WeakKeyDictionary()
_optimizer_generation = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_generation
    _optimizer_generation += 1


# Process-wide: any optimiser step may have changed any cached module's weights in place (the
# fused/foreach kernels do so without bumping version counters), so every entry built before it
# is stale. Registered once, at import.
register_optimizer_step_post_hook(_count_optimizer_step)


def optimizer_generation() -> int:
    """How many ``torch.optim`` optimiser steps this process has taken (part of every cache key)."""
    return _optimizer_generation


def version_counter(t: torch.Tensor) -> int | None:
    """``t._version``; None for a tensor made under ``torch.inference_mode``, which has no
    version counter (its in-place edits cannot be seen: ``cached`` does not keep what derives
    from such tensors)."""
    return None if t.is_inference() else t._version


def _source_key(sources: tuple[torch.Tensor, ...], backend: str) -> tuple:
    return (backend, _optimizer_generation, *((t.data_ptr(), version_counter(t), t.device) for t in sources))


def _own_tensors(module: nn.Module, sources: tuple[torch.Tensor, ...]) -> bool:
    """Whether every source is a Parameter/buffer registered on ``module`` itself (not one
    recomputed per access, as parametrised weights are)."""
    if parametrize.is_parametrized(module):
        return False
    own = list(module._parameters.values()) + list(module._buffers.values())
    return all(any(t is o for o in own) for t in sources)


def cached(
    module: nn.Module, name: str, sources: tuple[torch.Tensor, ...], backend: str, build: Callable[[], Any]
) -> Any:
    """``build()`` once per (module, name), rebuilt when one of ``sources`` (the tensors the
    integer weights derive from) is replaced or modified in place, after an optimiser step, or
    when the backend changes; built per call (not kept) for parametrised sources.

    Inference tensors (weights made under ``torch.inference_mode``) have no version counter, so
    an in-place edit of one is invisible here, as a ``.data`` edit is for any tensor: call
    ``clear_cache(module)`` after such edits. ``load_state_dict`` does so itself. They are still
    cached: building per call made every decode step ~30x slower for such modules."""
    sources = tuple(sources)
    if not _own_tensors(module, sources):
        entries = _CACHE.get(module)
        if entries is not None:
            entries.pop(name, None)
        return build()
    entries = _CACHE.setdefault(module, {})
    key = _source_key(sources, backend)
    entry = entries.get(name)
    if (
        entry is None
        or entry.key != key
        or len(entry.refs) != len(sources)
        or any(ref() is not t for ref, t in zip(entry.refs, sources))
    ):
        entry = _Entry(key, tuple(weakref.ref(t) for t in sources), build())
        entries[name] = entry
    return entry.value


def cached_weights(module: nn.Module) -> list[Any]:
    """The integer weights currently cached for ``module`` (for memory accounting)."""
    return [entry.value for entry in _CACHE.get(module, {}).values()]


_clear_generation = 0


def clear_generation() -> int:
    """How many times ``clear_cache()`` (every module) was called: the owned integer weights of
    the packed ternary modules record it and are rebuilt when it moved."""
    return _clear_generation


def clear_cache(module: nn.Module | None = None) -> None:
    """Drop the integer weights of ``module`` and its submodules (of every module when None):
    needed after edits the cache cannot see, i.e. through ``.data`` (module doc). Modules that
    own their integer weights (``invalidate_owned_integer``: the released packed ternary modules)
    rebuild them from their own codes and current scales at their next integer forward."""
    global _clear_generation
    if module is None:
        _CACHE.clear()
        _clear_generation += 1
        return
    for submodule in module.modules():
        _CACHE.pop(submodule, None)
        invalidate = getattr(submodule, "invalidate_owned_integer", None)
        if invalidate is not None:
            invalidate()


def integer_weight_bytes(model: nn.Module) -> int:
    """Bytes of the integer weights of the modules of ``model``: those in the cache, and those a
    module owns instead (``owned_integer_weights()``: the packed ternary modules of
    ``mhmoe.bitnet.ternary`` once their 2-bit buffers are released)."""
    total = 0
    for module in model.modules():
        owned = getattr(module, "owned_integer_weights", None)
        values = cached_weights(module) + (owned() if owned is not None else [])
        total += sum(value.nbytes() for value in values)
    return total


# --------------------------------------------------------------------------------------------
# The integer matmuls of the quantised layers
# --------------------------------------------------------------------------------------------


@dataclass
class IntegerLinearWeight:
    """A quantised linear layer's integer form: W_q (O, I) and its absmean scale gamma ()."""

    weight: Int8Weight
    gamma: torch.Tensor  # () in the weight's dtype, at least float32 (float64 stays float64)

    def nbytes(self) -> int:
        return self.weight.nbytes() + self.gamma.element_size()


@dataclass
class IntegerExpertWeights:
    """Stacked experts' integer form, per expert e: the up projection (gate and up fused for
    SwiGLU: (2F, S), else w1 (F, S)) with one gamma per output row, and w2 (S, F) with one."""

    up: list[Int8Weight]
    gamma_up_EG: torch.Tensor  # (E, G), G = 2F (SwiGLU) or F; float32 (float64 for float64 weights)
    down: list[Int8Weight]
    gamma_down_E: torch.Tensor  # (E,), same dtype

    def nbytes(self) -> int:
        gammas = (self.gamma_up_EG, self.gamma_down_E)
        return sum(w.nbytes() for w in self.up + self.down) + sum(g.numel() * g.element_size() for g in gammas)



def integer_linear(
    codes_MI: torch.Tensor, scale_M1: torch.Tensor, weight: Int8Weight, gamma: torch.Tensor
) -> torch.Tensor:
    """y = (x_codes @ W_q^T) * gamma / s  ([BitNet] Eq. 11): (M, O) in s's dtype (float32, or
    float64 for float64 inputs).

    ``codes_MI``/``scale_M1``: ``activation_quant_codes`` of the rows (s = 127 / max|x|);
    ``gamma``: the absmean weight scale, one (0-d or 1 element) or one per output column (O,)
    (the fused gate/up weight of an expert carries two). The integer sums are exact in float32;
    the scales are applied in the activations' compute dtype, so float64 models keep float64
    precision (float32 scaling would cost them ~1e-7 relative error).
    """
    sums_MO = weight.integer_sums(codes_MI)
    dtype = torch.promote_types(scale_M1.dtype, torch.float32)
    sums_MO = sums_MO.to(dtype)
    gamma = gamma.to(dtype)
    scale_M1 = scale_M1.to(dtype)
    if gamma.numel() == 1:
        return sums_MO.mul_(gamma.reshape(()) / scale_M1)
    return sums_MO.div_(scale_M1).mul_(gamma)


def check_exact(in_features: int) -> None:
    """The integer sums over ``in_features`` products must stay exact in float32 (|sum| <= 128 I)."""
    if 128 * in_features >= EXACT_FLOAT_SUM_LIMIT:
        raise ValueError(
            f"in_features={in_features}: integer sums up to 128 * {in_features} exceed 2^24, "
            "where float32 stops being exact; the integer path takes in_features < 131072"
        )


__all__ = [
    "FBGEMM_MAX_SIZE_RATIO",
    "INTEGER_BACKENDS",
    "Int8Weight",
    "IntegerExpertWeights",
    "IntegerLinearWeight",
    "cached",
    "FBGEMM_BLOCKING",
    "clear_cache",
    "clear_generation",
    "default_backend",
    "fbgemm_available",
    "fbgemm_instruction_set",
    "fbgemm_packed_bytes",
    "float_sums",
    "int_mm_sums",
    "integer_inference",
    "integer_inference_state",
    "integer_linear",
    "integer_weight_bytes",
    "memory_aware_backend",
    "optimizer_generation",
    "plain_codes_backend",
    "use_integer_path",
    "version_counter",
]

