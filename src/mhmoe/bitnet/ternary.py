"""Packed ternary inference: 2-bit weights in safetensors, loaded into layers that reproduce the
BitNet training-time forward (``mhmoe.bitnet``) exactly.

Format (``FORMAT`` = "mhmoe-ternary", version 1), one directory:

* ``model.safetensors``: for every quantised module ``m`` (a ``BitLinear``, ``BitExperts`` or
  ``BitRouter`` of the trained model) and each of its weight matrices ``W`` (``weight``; or
  ``w1``, ``w3``, ``w2`` for stacked experts):
    - ``m.W_packed``: uint8, the ternary codes W_q in {-1, 0, +1} stored as W_q + 1 in {0, 1, 2},
      2 bits each, 4 per byte, row-major over the whole tensor; element 4j + i sits in bits
      2i..2i+1 of byte j (first element in the low bits); the last byte is zero-padded;
    - ``m.W_scale``: float32 absmean scales gamma, shape (1,) per tensor or (E,) per expert.
  Every other state_dict entry (embeddings, LM head, RMSNorm gains, router when not quantised,
  biases) is stored under its own key, floating tensors in the export dtype (float32 default).
  The safetensors metadata holds the manifest below as JSON under "mhmoe_ternary".
* ``config.json``: the manifest: format/version, ``model_type`` and ``model_config`` (to rebuild
  a ``TransformerLM``), ``bitnet`` (the ``to_bitnet`` options) and ``quantized``: per module,
  its kind and shapes. Written last, so a directory without it is an incomplete export.

Loading (``load_ternary``) builds the full-precision model skeleton (on the meta device for
the LM), replaces the quantised modules by ``TernaryLinear`` / ``TernaryExperts`` /
``TernaryRouter`` and loads the file into their packed uint8 buffers; then
``prepare_integer_inference`` unpacks every matrix once into the int8 form of the integer
kernels (``mhmoe.bitnet.integer``; no float copy of a quantised matrix is made), which the
module keeps as its only copy, releasing the 2-bit buffers (``_PackedTernary``: ``state_dict``,
re-export, ``.to`` and the float path get the 2-bit form back from the int8 codes; buffers
replaced afterwards, e.g. by ``torch.func.functional_call``, are used as they are). Inference runs
y = (x_codes @ W_q^T) * gamma / s with int32 sums; activations are quantised exactly as in
training. The fake-quant model's eval runs the same kernels on the same codes, so the packed
model's logits equal the fake-quant model's bit for bit in float32 (``tests/test_quant.py``,
``tests/test_int_inference.py``); with ``integer_inference(False)`` both run the float math of
training (the packed model then unpacks per forward, gamma * W_q, the same expression).

Sizes: a quantised weight takes 2 bits + one float32 per tensor (per expert) on disk, against 32
(fp32) or 16 (bf16) bits; resident, the integer kernels' form alone: 8 bits for ``int_mm`` /
``float`` (a quarter of fp32, plus 4-8 bytes per output row of scales); for fbgemm its blocked
copy, whose input dimension is padded to fbgemm's blocks (``fbgemm_packed_bytes``, per
instruction set; on AVX2 to a multiple of 512: 8 bits a weight at 512 inputs, 21 bits at 192,
64 bits at 64). The default backend is chosen per matrix
(``mhmoe.bitnet.integer.memory_aware_backend``): fbgemm only where its copy is within
``FBGEMM_MAX_SIZE_RATIO`` (1.05) of the int8 codes, the int8 codes elsewhere, so the quantised
matrices stay at about a quarter of fp32 whatever the widths; ``backend="fbgemm"`` forces the
blocked copy everywhere (on AVX2 up to 2.7x the codes at 192 inputs, 8x at 64). Embeddings and
the LM head stay full precision and dominate small models.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from mhmoe.bitnet.integer import (
    IntegerExpertWeights,
    IntegerLinearWeight,
    check_backend,
    clear_cache,
    clear_generation,
    integer_inference,
    integer_inference_state,
    version_counter,
)
from mhmoe.bitnet.layers import (
    BitExperts,
    BitLinear,
    BitRouter,
    RMSNorm,
    _BitExpertsMath,
    _BitLinearMath,
    _BitRouterMath,
    _TernaryMatrixMath,
    dequantize_weight,
    weight_quant_codes,
)
from mhmoe.config import BitNetConfig, ModelConfig
from mhmoe.data import load_tokenizer
from mhmoe.layers.experts import Experts
from mhmoe.layers.routing import TopKRouter
from mhmoe.model import TransformerLM
from mhmoe.runs.atomic import atomic_write_bytes, atomic_write_text
from mhmoe.runtime import dtype_name, resolve_dtype

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_FILE",
    "TernaryExperts",
    "TernaryLinear",
    "TernaryRouter",
    "export_ternary",
    "is_ternary_export",
    "load_export",
    "load_ternary",
    "pack_ternary",
    "prepare_integer_inference",
    "read_manifest",
    "tensor_bytes",
    "unpack_ternary",
]

FORMAT = "mhmoe-ternary"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_SHIFTS = (0, 2, 4, 6)


# --------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, +1} (any shape, integer or integral float) -> flat uint8, 4 per byte.

    Stored value c = w + 1 in {0, 1, 2}; byte j = c[4j] | c[4j+1] << 2 | c[4j+2] << 4 | c[4j+3] << 6;
    length ceil(n / 4), the tail of the last byte zero.
    """
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes of type {type(codes).__name__}: must be a torch.Tensor")
    flat = codes.detach().reshape(-1)
    if flat.is_floating_point():
        if not torch.all(flat == torch.round(flat)):
            raise ValueError("codes must be integral: ternary values are -1, 0 or +1")
    bad = (flat < -1) | (flat > 1)
    if bool(bad.any()):
        value = flat[bad][0].item()
        raise ValueError(f"code {value!r}: ternary codes must be -1, 0 or +1")
    stored = (flat.to(torch.int16) + 1).to(torch.uint8)  # w + 1 in {0, 1, 2}
    pad = (-stored.numel()) % 4
    if pad:
        stored = torch.cat([stored, stored.new_zeros(pad)])
    quads_P4 = stored.view(-1, 4)  # (4P,) -> (P, 4)
    packed = quads_P4[:, 0] | (quads_P4[:, 1] << 2) | (quads_P4[:, 2] << 4) | (quads_P4[:, 3] << 6)
    return packed.contiguous()


def _unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Unchecked unpacking (the per-forward path): int8 codes in {-1, 0, 1} of ``shape``."""
    n = math.prod(shape)
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    stored_P4 = (packed.unsqueeze(-1) >> shifts) & 3  # (P,) -> (P, 4)
    return (stored_P4.reshape(-1)[:n].to(torch.int8) - 1).reshape(shape)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...] | list[int] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_ternary``: int8 codes in {-1, 0, +1} of ``shape``.

    Raises ValueError when ``packed`` is not a 1-D uint8 tensor of ceil(prod(shape) / 4) bytes,
    or holds the unused code 3.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape={shape}: dimensions must be non-negative")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed={getattr(packed, 'dtype', type(packed).__name__)} "
            f"{tuple(getattr(packed, 'shape', ()))}: must be a 1-D uint8 tensor"
        )
    expected = -(-math.prod(shape) // 4)
    if packed.numel() != expected:
        raise ValueError(
            f"packed has {packed.numel()} bytes, shape {shape} needs ceil({math.prod(shape)} / 4) = {expected}"
        )
    shifts = torch.tensor(_SHIFTS, dtype=torch.uint8, device=packed.device)
    stored = ((packed.unsqueeze(-1) >> shifts) & 3).reshape(-1)[: math.prod(shape)]
    if bool((stored == 3).any()):
        raise ValueError("packed ternary weights hold the code 3 (2 bits 11), which no ternary value uses")
    return _unpack(packed, shape)


# --------------------------------------------------------------------------------------------
# Packed modules: same forward as the BitNet modules, weights unpacked from uint8 buffers.
# --------------------------------------------------------------------------------------------


def _unpacked_weight(module: _PackedTernary, name: str) -> torch.Tensor:
    codes, scale = _codes_and_scale(module, name, module.ternary_code_tensors()[name])
    return dequantize_weight(codes.to(scale.dtype), scale)


def _codes_and_scale(module: _PackedTernary, name: str, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes of ``name`` in their shape, gamma: () per tensor, (E,) per expert)."""
    scale = getattr(module, f"{name}_scale")
    if scale.numel() == 1 and codes.dim() == 2:
        scale = scale.reshape(())  # per tensor: (1,) -> ()
    return codes, scale


def _register_packed(module: nn.Module, name: str, shape: tuple[int, ...], num_scales: int, device=None) -> None:
    module.register_buffer(f"{name}_packed", torch.zeros(-(-math.prod(shape) // 4), dtype=torch.uint8, device=device))
    module.register_buffer(f"{name}_scale", torch.ones(num_scales, dtype=torch.float32, device=device))
    module.weight_shapes[name] = shape


class _PackedTernary(nn.Module):
    """The packed 2-bit weights of a ternary module, or, once released, its integer weights alone.

    After ``release_packed`` (``prepare_integer_inference`` calls it), the module owns the
    integer weights the kernels read (``mhmoe.bitnet.integer``, per matrix: fbgemm's prepacked
    int8, or int8 codes) and its ``<W>_packed`` buffers are empty placeholders: one copy of each
    quantised matrix stays resident instead of two. The integer weights hold the codes exactly,
    so everything that needs the 2-bit form gets it back from them on demand:

    * ``state_dict`` (hence a re-export, ``torch.save``): ``<W>_packed`` re-packed from the codes,
      the same bytes as the file loaded;
    * ``load_state_dict``: the buffers are restored, loaded, and released again;
    * ``.to(device)`` and every other ``_apply``: restored, moved, released again (for the same
      backend on the same device type, else for the new device's default one);
    * the float path (``integer_inference(False)``, train mode): codes unpacked per forward, as
      from the buffers.

    A ``<W>_packed`` that is no longer the placeholder the release left (``torch.func.
    functional_call`` with another state_dict, an assignment, ``.data`` given bytes) holds the
    codes that count: every use reads that matrix from it, and the integer forward builds a form
    from the buffers there now per call (not kept: a ``functional_call`` swaps them back after).
    The owned form is rebuilt from its own codes when a ``<W>_scale`` is another tensor or holds
    other values (compared with a copy kept at build: edits through ``.data`` or under
    ``inference_mode`` bump no version counter), and after ``mhmoe.bitnet.integer.clear_cache``.

    Not in the ``mhmoe.bitnet.integer`` cache (an optimiser step anywhere in the process
    invalidates every cache entry, and nothing would be left to rebuild from).
    """

    weight_shapes: dict[str, tuple[int, ...]]
    _owned_integer: Any = None  # the integer weights once released (class default: not released)
    # Class defaults are never mutated in place (instances assign new dicts).
    _owned_placeholders: dict[str, torch.Tensor] = {}  # the empty <W>_packed the release left
    _owned_scales: dict[str, tuple[torch.Tensor, int | None, torch.Tensor]] = {}  # (scale, version, values) built from
    _owned_generation: int = -1  # clear_generation() at build

    # -- what subclasses provide ---------------------------------------------------------
    def build_integer_form(self, backend: str | None) -> Any:  # pragma: no cover - abstract
        """The integer weights for ``backend`` (None: each matrix its ``memory_aware_backend``)."""
        raise NotImplementedError

    def codes_from_integer_form(self, integer: Any) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    # -- state -----------------------------------------------------------------------------
    def packed_released(self) -> bool:
        return self._owned_integer is not None

    def owned_integer_weights(self) -> list[Any]:
        """The integer weights this module owns (for ``integer_weight_bytes``)."""
        return [] if self._owned_integer is None else [self._owned_integer]

    def replaced_packed_names(self) -> list[str]:
        """Once released: the weights whose ``<W>_packed`` is no longer the empty placeholder the
        release left (those buffers hold the codes that count); [] when not released."""
        if self._owned_integer is None:
            return []
        # self._buffers, not getattr: this runs every integer forward (nn.Module.__getattr__ is slow)
        buffers, placeholders = self._buffers, self._owned_placeholders
        return [name for name in self.weight_shapes
                if (buffer := buffers[f"{name}_packed"]) is not placeholders.get(name) or buffer.numel() != 0]

    def ternary_code_tensors(self) -> dict[str, torch.Tensor]:
        """Every weight's int8 codes in its shape: from the 2-bit buffers, or, once released, from
        the integer weights (exactly the same values), except for buffers replaced since
        (``replaced_packed_names``), read from the buffers."""
        if self._owned_integer is None:
            return {name: _unpack(getattr(self, f"{name}_packed"), shape) for name, shape in self.weight_shapes.items()}
        replaced = set(self.replaced_packed_names())
        # checked: a replaced buffer is someone else's bytes (one clear error if they do not fit)
        owned = self.codes_from_integer_form(self._owned_integer) if len(replaced) < len(self.weight_shapes) else {}
        return {name: unpack_ternary(getattr(self, f"{name}_packed"), shape) if name in replaced else owned[name]
                for name, shape in self.weight_shapes.items()}

    def _scales_snapshot(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (scale, version_counter(scale), scale.detach().clone())
                for name in self.weight_shapes for scale in (getattr(self, f"{name}_scale"),)}

    def _owned_form_current(self) -> bool:
        """Whether the owned integer weights were built from the scales there now (the same
        tensors, unmodified) since the last ``clear_cache``.

        "Unmodified": the same version counter as at the build. Only inference tensors, which
        have none, have their values compared, and only on CPU, where reading them costs no
        device sync (a CUDA ``torch.equal`` would sync once per module per decode step); a
        ``.data`` edit on CUDA needs ``clear_cache(module)``."""
        if self._owned_generation != clear_generation() or len(self._owned_scales) != len(self.weight_shapes):
            return False
        buffers = self._buffers
        for name, (built_from, version, values) in self._owned_scales.items():
            scale = buffers[f"{name}_scale"]
            if scale is not built_from or scale.dtype != values.dtype or scale.device != values.device:
                return False
            if version_counter(scale) != version:
                return False
            if (version is None or scale.device.type == "cpu") and not torch.equal(scale, values):
                return False
        return True

    def invalidate_owned_integer(self) -> None:
        """Have the owned integer weights rebuilt from their codes and the current scales at the
        next integer forward (``mhmoe.bitnet.integer.clear_cache`` calls it)."""
        self._owned_scales = {}

    def release_packed(self) -> None:
        """Build the integer weights for the backend chosen with ``integer_inference`` (none
        chosen: the ``prepared_backend``, else each matrix its ``memory_aware_backend``), keep
        them, and empty the 2-bit buffers (no-op when released already, or on the meta device)."""
        if self._owned_integer is not None:
            return
        device = getattr(self, f"{next(iter(self.weight_shapes))}_packed").device
        if device.type == "meta":
            return
        integer = self.build_integer_form(self.integer_backend(device))
        clear_cache(self)  # a cached copy built from the buffers before would be a second one
        placeholders = {name: torch.empty(0, dtype=torch.uint8, device=device) for name in self.weight_shapes}
        # Owned state first, buffers emptied after: until a buffer is its placeholder it counts
        # as replaced and is read as is, so every step in between sees the same codes.
        self._owned_placeholders = placeholders
        self._owned_scales = self._scales_snapshot()
        self._owned_generation = clear_generation()
        self._owned_integer = integer
        for name in self.weight_shapes:
            setattr(self, f"{name}_packed", placeholders[name])

    def restore_packed(self) -> None:
        """Undo ``release_packed``: the 2-bit buffers re-packed from the codes (replaced buffers
        kept as they are), integer weights dropped (rebuilt through the cache on the next integer
        forward)."""
        if self._owned_integer is None:
            return
        codes = self.ternary_code_tensors()
        replaced = set(self.replaced_packed_names())
        for name in self.weight_shapes:
            if name not in replaced:
                device = getattr(self, f"{name}_packed").device
                setattr(self, f"{name}_packed", pack_ternary(codes[name]).to(device))
        self._owned_integer = None
        self._owned_placeholders = {}
        self._owned_scales = {}

    def owned_integer_form(self) -> Any:
        """The integer weights of the buffers and scales there now: the owned ones, rebuilt first
        from their codes if a scale changed or ``clear_cache`` was called (for the same backend,
        or the same per-matrix default); built per call (not kept) when a ``<W>_packed`` was
        replaced (class docstring), or for a backend chosen with ``integer_inference(True,
        backend)`` other than the one all of them use (a reference path)."""
        integer = self._owned_integer
        chosen = integer_inference_state()[1]
        if self.replaced_packed_names():
            return self.build_integer_form(_integer_form_backend(integer) if chosen is None else chosen)
        if not self._owned_form_current():
            self._owned_integer = integer = self.build_integer_form(_integer_form_backend(integer))
            self._owned_scales = self._scales_snapshot()
            self._owned_generation = clear_generation()
        if chosen is not None and chosen != _integer_form_backend(integer):
            return self.build_integer_form(chosen)
        return integer

    # -- torch.nn.Module hooks -------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._owned_integer is not None:
            for name, codes in self.ternary_code_tensors().items():
                buffer_device = getattr(self, f"{name}_packed").device
                destination[f"{prefix}{name}_packed"] = pack_ternary(codes).to(buffer_device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        restore = self._restore_for_change()
        errors_before = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) == errors_before:
            restore()

    def _apply(self, fn, recurse=True):
        restore = self._restore_for_change()  # move the 2-bit form (the integer weights are not tensors)
        result = super()._apply(fn, recurse)
        restore()
        return result

    def _restore_for_change(self) -> Callable[[], None]:
        """Restore the 2-bit buffers for a change to them (load, move); returns what releases
        them again afterwards, for the same backend while the device type is unchanged."""
        if self._owned_integer is None:
            return lambda: None
        backend = _integer_form_backend(self._owned_integer)
        device_type = getattr(self, f"{next(iter(self.weight_shapes))}_packed").device.type
        self.restore_packed()

        def release_again() -> None:
            now = getattr(self, f"{next(iter(self.weight_shapes))}_packed").device.type
            if now != device_type:
                self.prepared_backend = None  # chosen for the old device: the new one's default
            with integer_inference(True, backend if now == device_type else None):
                self.release_packed()

        return release_again


def _integer_form_backend(integer: Any) -> str | None:
    """The backend every matrix of an ``IntegerLinearWeight`` or ``IntegerExpertWeights`` uses;
    None when they differ (the per-matrix default gave them different ones: rebuilding for None
    gives the same)."""
    weights = [integer.weight] if isinstance(integer, IntegerLinearWeight) else integer.up + integer.down
    backends = {weight.backend for weight in weights}
    return backends.pop() if len(backends) == 1 else None


class TernaryLinear(_BitLinearMath, _PackedTernary):
    """Inference twin of ``BitLinear``: buffers ``weight_packed`` (uint8), ``weight_scale`` (1,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, norm: bool = True, device=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        _register_packed(self, "weight", (out_features, in_features), 1, device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.norm = RMSNorm(in_features, device=device) if norm else None

    def quantized_weight(self) -> torch.Tensor:
        return _unpacked_weight(self, "weight")

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _codes_and_scale(self, "weight", self.ternary_code_tensors()["weight"])

    def integer_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight_packed, self.weight_scale)

    def integer_weight(self) -> IntegerLinearWeight:
        return self.owned_integer_form() if self.packed_released() else super().integer_weight()

    def build_integer_form(self, backend: str | None) -> IntegerLinearWeight:
        return self.build_integer_weight(backend)

    def codes_from_integer_form(self, integer: IntegerLinearWeight) -> dict[str, torch.Tensor]:
        return {"weight": integer.weight.codes()}

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.bias, None if self.norm is None else self.norm.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed=2bit"


class TernaryExperts(_BitExpertsMath, _PackedTernary):
    """Inference twin of ``BitExperts``: ``w*_packed`` (uint8) and ``w*_scale`` (E,) buffers."""

    def __init__(self, num_experts: int, d_in: int, d_expert: int, activation: str = "swiglu", norm: bool = True, device=None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.d_in = d_in
        self.d_expert = d_expert
        self.activation = activation
        self.use_grouped_mm: bool | None = None
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        _register_packed(self, "w1", (num_experts, d_expert, d_in), num_experts, device)
        if activation == "swiglu":
            _register_packed(self, "w3", (num_experts, d_expert, d_in), num_experts, device)
        _register_packed(self, "w2", (num_experts, d_in, d_expert), num_experts, device)
        self.input_norm = RMSNorm(d_in, device=device) if norm else None
        self.hidden_norm = RMSNorm(d_expert, device=device) if norm else None

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        return {name: dequantize_weight(codes.to(scale.dtype), scale)
                for name, (codes, scale) in self.expert_codes().items()}

    def expert_codes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        codes = self.ternary_code_tensors()
        return {name: _codes_and_scale(self, name, codes[name]) for name in self.weight_shapes}

    def integer_sources(self) -> tuple[torch.Tensor, ...]:
        # the scales too: gamma is part of the integer weights (a changed scale must rebuild)
        return tuple(getattr(self, f"{name}_{part}") for name in self.weight_shapes for part in ("packed", "scale"))

    def integer_weights(self) -> IntegerExpertWeights:
        return self.owned_integer_form() if self.packed_released() else super().integer_weights()

    def build_integer_form(self, backend: str | None) -> IntegerExpertWeights:
        return self.build_integer_weights(backend)

    def codes_from_integer_form(self, integer: IntegerExpertWeights) -> dict[str, torch.Tensor]:
        # up[e]: (2F, S) = [w1_e; w3_e] for SwiGLU, (F, S) = w1_e otherwise; down[e]: w2_e (S, F)
        up_EGS = torch.stack([w.codes() for w in integer.up])
        codes = {"w2": torch.stack([w.codes() for w in integer.down])}
        if self.activation == "swiglu":
            codes["w1"], codes["w3"] = up_EGS.split(self.d_expert, dim=1)  # (E, 2F, S) -> 2 x (E, F, S)
        else:
            codes["w1"] = up_EGS
        return codes

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_in={self.d_in}, d_expert={self.d_expert}, "
            f"activation={self.activation!r}, packed=2bit"
        )


class TernaryRouter(_BitRouterMath, _PackedTernary):
    """Inference twin of ``BitRouter``; ``expert_bias`` (E,) float32 when the router was trained
    with aux-loss-free balancing (``selection_bias``)."""

    def __init__(
        self, d_in: int, num_experts: int, top_k: int, normalize_top_k: bool, device=None,
        selection_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        _register_packed(self, "weight", (num_experts, d_in), 1, device)
        if selection_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        else:
            self.expert_bias = None

    def quantized_weight(self) -> torch.Tensor:
        return _unpacked_weight(self, "weight")

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return _codes_and_scale(self, "weight", self.ternary_code_tensors()["weight"])

    def integer_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight_packed, self.weight_scale)

    def integer_weight(self) -> IntegerLinearWeight:
        return self.owned_integer_form() if self.packed_released() else super().integer_weight()

    def build_integer_form(self, backend: str | None) -> IntegerLinearWeight:
        return self.build_integer_weight(backend)

    def codes_from_integer_form(self, integer: IntegerLinearWeight) -> dict[str, torch.Tensor]:
        return {"weight": integer.weight.codes()}

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return ()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _atomic_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _atomic_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def _model_description(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "config", None)
    bitnet = getattr(config, "bitnet", None)
    return {
        "model_type": type(model).__name__,
        "model_config": config.to_dict() if hasattr(config, "to_dict") else None,
        "bitnet": bitnet.to_dict() if bitnet is not None else None,
    }


def _plain_tensor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = t.detach()
    if t.is_floating_point():
        t = t.to(dtype)
    return t.to("cpu").contiguous().clone()


def _quantized_entries(name: str, module: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], set[str]]:
    """(manifest entry, packed tensors, state_dict keys they replace) of one quantised module."""
    prefix = f"{name}." if name else ""
    if isinstance(module, BitExperts):
        names = ("w1", "w3", "w2") if module.activation == "swiglu" else ("w1", "w2")
        entry = {
            "kind": "experts", "num_experts": module.num_experts, "d_in": module.d_in,
            "d_expert": module.d_expert, "activation": module.activation,
            "norm": module.input_norm is not None,
        }
        per_expert = True
    elif isinstance(module, BitRouter):
        names = ("weight",)
        entry = {
            "kind": "router", "d_in": module.weight.shape[1], "num_experts": module.num_experts,
            "top_k": module.top_k, "normalize_top_k": module.normalize_top_k,
            "selection_bias": getattr(module, "expert_bias", None) is not None,
        }
        per_expert = False
    elif isinstance(module, BitLinear):
        names = ("weight",)
        entry = {
            "kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "norm": module.norm is not None,
        }
        per_expert = False
    elif isinstance(module, _PackedTernary):
        return _packed_entries(prefix, module)
    else:  # pragma: no cover - callers filter
        raise TypeError(type(module).__name__)
    tensors: dict[str, torch.Tensor] = {}
    for weight_name in names:
        w = getattr(module, weight_name)
        codes, gamma = weight_quant_codes(w, per_expert=per_expert)
        tensors[f"{prefix}{weight_name}_packed"] = pack_ternary(codes).cpu()
        tensors[f"{prefix}{weight_name}_scale"] = gamma.float().reshape(-1).cpu().contiguous()
        entry.setdefault("shapes", {})[weight_name] = list(w.shape)
    return entry, tensors, {f"{prefix}{n}" for n in names}


def _packed_entries(prefix: str, module: _PackedTernary) -> tuple[dict[str, Any], dict[str, torch.Tensor], set[str]]:
    """``_quantized_entries`` of a loaded packed module (a re-export): its codes and scales as
    they are (the 2-bit bytes re-packed from the integer weights when released)."""
    if isinstance(module, TernaryExperts):
        entry = {
            "kind": "experts", "num_experts": module.num_experts, "d_in": module.d_in,
            "d_expert": module.d_expert, "activation": module.activation,
            "norm": module.input_norm is not None,
        }
    elif isinstance(module, TernaryRouter):
        entry = {
            "kind": "router", "d_in": module.weight_shapes["weight"][1], "num_experts": module.num_experts,
            "top_k": module.top_k, "normalize_top_k": module.normalize_top_k,
            "selection_bias": module.expert_bias is not None,
        }
    else:
        entry = {
            "kind": "linear", "in_features": module.in_features, "out_features": module.out_features,
            "bias": module.bias is not None, "norm": module.norm is not None,
        }
    tensors: dict[str, torch.Tensor] = {}
    for weight_name, codes in module.ternary_code_tensors().items():
        tensors[f"{prefix}{weight_name}_packed"] = pack_ternary(codes).cpu()
        tensors[f"{prefix}{weight_name}_scale"] = getattr(module, f"{weight_name}_scale").float().reshape(-1).cpu().contiguous()
        entry.setdefault("shapes", {})[weight_name] = list(module.weight_shapes[weight_name])
    return entry, tensors, set(tensors)


def export_ternary(
    model: nn.Module,
    out_dir: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (converted with ``mhmoe.bitnet.convert.to_bitnet``, or loaded with
    ``load_ternary``: a re-export of the same codes and scales) as packed ternary weights.

    ``dtype``: storage dtype of the full-precision tensors (embeddings, LM head, norms...);
    float32 keeps the packed model's logits bit-identical to the fake-quant model's.
    ``extra``: JSON-able data stored under "extra" in config.json (e.g. the run config).
    Returns the manifest (config.json's content). The model is not modified.
    """
    dtype = resolve_dtype(dtype)
    quantized = {
        name: m for name, m in model.named_modules()
        if isinstance(m, (BitLinear, BitExperts, BitRouter, _PackedTernary))
    }
    if not quantized:
        raise ValueError(
            "model has no BitNet module (BitLinear/BitExperts/BitRouter, or a loaded ternary model's "
            "packed modules): convert it with mhmoe.bitnet.convert.to_bitnet and train it before a ternary export"
        )
    manifest_modules: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for name, module in quantized.items():
        entry, packed, keys = _quantized_entries(name, module)
        manifest_modules[name] = entry
        tensors.update(packed)
        replaced |= keys
    for key, value in model.state_dict().items():
        if key not in replaced:
            tensors[key] = _plain_tensor(value, dtype)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **_model_description(model),
        "dtype": dtype_name(dtype),
        "packing": "ternary codes stored as w+1 in 2 bits, 4 per byte, element 4j+i in bits 2i..2i+1 "
                   "of byte j, row-major, zero-padded; <module>.<W>_scale float32 absmean scales",
        "quantized": manifest_modules,
    }
    if extra is not None:
        manifest["extra"] = extra
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_safetensors(out / WEIGHTS_FILE, tensors, {"mhmoe_ternary": json.dumps(manifest)})
    _atomic_json(out / CONFIG_FILE, manifest)
    logger.info("ternary export: %d quantised modules, %s", len(quantized), out / WEIGHTS_FILE)
    return manifest


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def is_ternary_export(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json has format "mhmoe-ternary"."""
    try:
        data = json.loads((Path(path) / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """config.json of an export directory, checked to be a ternary export of a known version."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: no {CONFIG_FILE} (not an export directory, or an incomplete one)")
    manifest = json.loads(config_path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format={manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: format_version={manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return manifest


def _ternary_module(name: str, entry: dict[str, Any], old: nn.Module) -> nn.Module:
    kind = entry.get("kind")

    def check(field: str, have: Any) -> None:
        if have != entry[field]:
            raise ValueError(f"module {name!r} has {field}={have}, the export has {field}={entry[field]}")

    if kind == "linear":
        if not isinstance(old, nn.Linear):
            raise ValueError(f"module {name!r} is {type(old).__name__}, the export has a linear layer there")
        check("in_features", old.in_features)
        check("out_features", old.out_features)
        return TernaryLinear(entry["in_features"], entry["out_features"], entry["bias"], entry["norm"], device="meta")
    if kind == "experts":
        if not isinstance(old, (Experts, TernaryExperts)):
            raise ValueError(f"module {name!r} is {type(old).__name__}, the export has experts there")
        for field in ("num_experts", "d_in", "d_expert", "activation"):
            check(field, getattr(old, field))
        new = TernaryExperts(entry["num_experts"], entry["d_in"], entry["d_expert"], entry["activation"], entry["norm"], device="meta")
        new.use_grouped_mm = getattr(old, "use_grouped_mm", None)
        return new
    if kind == "router":
        if not isinstance(old, TopKRouter):
            raise ValueError(f"module {name!r} is {type(old).__name__}, the export has a router there")
        check("num_experts", old.num_experts)
        check("top_k", old.top_k)
        # Exports written before "selection_bias" was recorded: the skeleton's router says.
        selection_bias = entry.get("selection_bias", getattr(old, "expert_bias", None) is not None)
        return TernaryRouter(entry["d_in"], entry["num_experts"], entry["top_k"], entry["normalize_top_k"],
                             device="meta", selection_bias=selection_bias)
    raise ValueError(f"module {name!r}: unknown quantised kind {kind!r} (linear, experts, router)")


def _build_model(manifest: dict[str, Any]) -> nn.Module:
    if manifest.get("model_type") != "TransformerLM" or manifest.get("model_config") is None:
        raise ValueError(
            f"export holds a {manifest.get('model_type')!r} without a rebuildable model config: "
            "pass model=<a module of the same architecture> to load_ternary"
        )

    with torch.device("meta"):
        return TransformerLM(ModelConfig.from_dict(manifest["model_config"]))


def load_ternary(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    backend: str | None = None,
) -> nn.Module:
    """Load a ternary export as an eval-mode model whose quantised matrices are held once, in the
    integer kernels' form (``prepare_integer_inference``: the 2-bit buffers are released).

    ``model``: a module of the exported architecture (full precision or BitNet-converted; its
    quantised submodules are replaced, everything else is overwritten from the file). When None,
    the ``TransformerLM`` is rebuilt from config.json on the meta device (no full-precision
    weights are ever allocated). ``backend``: the integer kernel every quantised matrix is
    prepared for (``mhmoe.bitnet.integer.INTEGER_BACKENDS``); None: chosen per matrix
    (``mhmoe.bitnet.integer.memory_aware_backend``: on CPU fbgemm where its padded copy is within
    ``FBGEMM_MAX_SIZE_RATIO`` of the int8 codes, the int8 codes with the ``"float"`` kernel
    elsewhere). Raises ValueError on a missing or unexpected key, an invalid packed tensor or an
    unknown backend.
    """
    if backend is not None:
        check_backend(backend)
    manifest = read_manifest(path)
    if model is None:
        model = _build_model(manifest)
    for name, entry in manifest["quantized"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"export quantises module {name!r}, which the model lacks") from None
        new = _ternary_module(name, entry, old)
        if name == "":
            model = new
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="pt", device="cpu") as fh:
        for key in fh.keys():
            state[key] = fh.get_tensor(key)
    for name, entry in manifest["quantized"].items():
        prefix = f"{name}." if name else ""
        for weight_name, shape in entry["shapes"].items():
            key = f"{prefix}{weight_name}_packed"
            if key not in state:
                raise ValueError(f"{WEIGHTS_FILE} lacks {key!r}")
            unpack_ternary(state[key], shape)  # validates length and codes once
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(f"{WEIGHTS_FILE} does not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}")
    current = model.state_dict()
    for key, tensor in state.items():
        if tuple(current[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"{WEIGHTS_FILE}: {key!r} has shape {tuple(tensor.shape)}, the model expects {tuple(current[key].shape)}"
            )
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"tensors not in the export stay uninitialised: {leftover[:10]}")
    for p in model.parameters():
        p.requires_grad_(False)
    if manifest.get("bitnet") is not None and isinstance(getattr(model, "config", None), ModelConfig):
        # Exports written before the options moved into the model config.
        model.config = model.config.replace(bitnet=BitNetConfig.from_dict(manifest["bitnet"]))
    model = model.to(device).eval()
    prepare_integer_inference(model, backend)
    return model


def prepare_integer_inference(model: nn.Module, backend: str | None = None, release_packed: bool = True) -> int:
    """Build the integer weights of every quantised module of ``model`` now (once), on the
    modules' devices, for ``backend`` (every matrix; None: each matrix the kernel
    ``mhmoe.bitnet.integer.memory_aware_backend`` picks for its shape and device), and record it
    as the modules' ``prepared_backend``: their forward keeps using those kernels unless an
    ``integer_inference`` block names another backend. The packed ternary modules then own them
    and release their 2-bit buffers (``_PackedTernary``); ``release_packed=False`` keeps both
    (modules released before get their buffers back), the integer weights in the cache.
    Returns how many modules were prepared."""
    if backend is not None:
        check_backend(backend)
    prepared = 0
    with integer_inference(True, backend):
        for module in model.modules():
            if not isinstance(module, (_TernaryMatrixMath, _BitExpertsMath)):
                continue
            module.prepared_backend = backend
            prepared += 1
            if isinstance(module, _PackedTernary):
                module.restore_packed()  # released for another backend before, or to keep both
                if release_packed:
                    module.release_packed()
                    continue
            if isinstance(module, _TernaryMatrixMath):
                module.integer_weight()
            else:
                module.integer_weights()
    return prepared


def load_export(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(eval-mode model, tokenizer or None, manifest) of an ``mhmoe export --ternary`` folder.

    The tokenizer is OUT/tokenizer.json (copied from the run by the CLI) loaded with
    ``mhmoe.data.load_tokenizer``; None when the folder has none. The same triple as
    ``mhmoe.runs.checkpoint.load_run``, with the manifest in place of the run config (the run config
    is ``manifest["extra"]["run_config"]`` for CLI exports).
    """
    model = load_ternary(path, device=device)
    manifest = read_manifest(path)
    tokenizer = None
    tokenizer_path = Path(path) / "tokenizer.json"
    if tokenizer_path.is_file():

        tokenizer = load_tokenizer(tokenizer_path)
    return model, tokenizer, manifest


def tensor_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (resident weights; shared counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if not t.is_meta else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
