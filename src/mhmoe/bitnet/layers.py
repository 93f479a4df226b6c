"""BitNet b1.58 for every variant: BitLinear, stacked BitExperts, a module converter, a schedule.

Shape legend: M expert rows sorted by expert, E experts, S expert input size, F expert hidden
size, I/O in/out features of a linear layer.

Sources
-------
* [b1.58] Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits",
  arXiv 2402.17764 (ternary absmean weights, 8-bit absmax activations, LLaMA-alike blocks).
* [BitNet] Wang et al., "BitNet: Scaling 1-bit Transformers for Large Language Models",
  arXiv 2310.11453 (BitLinear, per-token absmax activation quantisation, SubLN, STE,
  latent full-precision weights, embeddings and output head kept in high precision).
* [FAQ] Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
  (github.com/microsoft/unilm, bitnet/The-Era-of-1-bit-LLMs__Training_Tips_Code_FAQ.pdf):
  the reference PyTorch BitLinear (RMSNorm inside, then activation_quant / weight_quant with the
  ``x + (q(x) - x).detach()`` straight-through estimator) and the two-stage LR/WD schedule.
* MH-MoE paper (arXiv 2411.16205), Table 3: every variant trained with BitNet b1.58.

Recipe (what this module implements)
------------------------------------
Weights, per tensor (one scale per expert per matrix for stacked expert weights) [b1.58 Eq. 1-3]:

    gamma = mean |W|,    W_q = clip(round(W / (gamma + eps)), -1, 1) in {-1, 0, +1},
    W_used = gamma * W_q                                  (eps = 1e-5, the FAQ's clamp value)

Activations, per token (per row: a token, a sub-token, or one expert's hidden row) to 8 bits
[BitNet Sec. 2.2, FAQ ``activation_quant``]:

    s = 127 / max(max_j |x_j|, eps),   x_codes = clip(round(s * x), -128, 127),   x_used = x_codes / s

computed in float32 (float64 for float64 inputs) and returned in the input's dtype. Both quantisers pass gradients straight
through (STE) [BitNet Sec. 2.3]: the forward value is q(x), the gradient is the identity. We write
it ``x - x.detach() + q(x).detach()``: the same as the FAQ's ``x + (q(x) - x).detach()`` but
exactly q(x) in floating point (``x - x.detach()`` is exactly 0), which is what lets the packed
ternary model (``mhmoe.bitnet.ternary``) reproduce the training-time logits bit for bit.
No scale receives a gradient; BitLinear has no bias (a bias found on a converted nn.Linear is
kept in full precision and added after the matmul).

Where the RMSNorm sits (our choice; tested): INSIDE every quantised layer, as in the FAQ's
BitLinear: ``y = W_used @ actq(RMSNorm(x))`` with its own learnable gain (init 1). The model's
own pre-norms stay where they are (model code is never edited), so the attention/FFN inputs are
normalised twice; the inner norm is what matters for quantisation, since it fixes the variance of
every quantised input, including those no pre-norm reaches (attention output, expert hidden
rows, the MH-MoE merge input) -- the role SubLN plays in [BitNet]. ``norm=False`` leaves it out.
For stacked experts the norm is shared by the experts of a layer: ``input_norm`` (size S) before
w1/w3 and ``hidden_norm`` (size F) before w2. The router, when quantised, gets no norm (its input
is the same sub-token the experts see; normalising it would change the routing function).

What is quantised (``to_bitnet``): every ``nn.Linear`` (attention projections, dense FFNs,
shared experts, MH-MoE head and merge layers) and every ``Experts`` module. Full precision by
default: embeddings (never an nn.Linear), the LM head (excluded by name, ``*lm_head``) and the
router (``quantize_router=True`` quantises it). Attention's fused qkv projection gets one
scale for the fused (3D, D) matrix.

Dispatch: quantised experts run their own forward through the "grouped" dispatch backend of
``mhmoe.layers.moe`` (or the "reference" loop through ``forward_one``); the dispatch's one guard,
``mhmoe.layers.experts.select_backend``, keeps every experts module that overrides ``forward``
off the backends that read the raw stacked weights (the fused CPU "blocked" path, where no
quantiser could act).

state_dict keys stay those of the full-precision model; the only additions are the inner norm
gains: ``<linear>.norm.weight`` (I,), ``<experts>.input_norm.weight`` (S,) and
``<experts>.hidden_norm.weight`` (F,). A full-precision checkpoint therefore loads into a BitNet
model with ``strict=False`` (missing: exactly those gains, which start at 1).

Inference (eval mode, no autograd needed): every quantised matmul runs on integer kernels
(``mhmoe.bitnet.integer``): the int8 activation codes times the ternary codes, summed exactly in
int32, then times gamma / s ([BitNet] Eq. 11) -- the same value as the float expression above up
to float rounding. The integer weights are built once per module (and rebuilt after an
optimiser step, and dropped when the module is put in train mode or loads a state_dict; edits
through ``.data`` are not seen: call ``mhmoe.bitnet.integer.clear_cache`` after them); ``integer_inference(False)``
restores the float math (the tests' reference).

Two-stage schedule [FAQ]: ``two_stage_schedule`` (module end).
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.bitnet.integer import (
    Int8Weight,
    IntegerExpertWeights,
    IntegerLinearWeight,
    cached,
    clear_cache,
    integer_inference_state,
    integer_linear,
    use_integer_path,
)
from mhmoe.layers.experts import Experts, grouped_mm
from mhmoe.layers.routing import RouterOutput, TopKRouter, route_logits

logger = logging.getLogger(__name__)


WEIGHT_EPS = 1e-5
"""eps of the absmean weight quantiser (the FAQ's clamp value)."""
ACTIVATION_EPS = 1e-5
"""Lower bound of max|x| in the absmax activation quantiser (the FAQ's clamp value)."""
ACTIVATION_BITS = 8
Q_MAX = 2 ** (ACTIVATION_BITS - 1) - 1  # 127
Q_MIN = -(2 ** (ACTIVATION_BITS - 1))  # -128
NORM_EPS = 1e-6
INTEGER_CHUNK_ROWS = 1024
"""Rows per chunk of the stacked experts' integer path (``_BitExpertsMath.integer_forward``)."""


# --------------------------------------------------------------------------------------------
# Quantisers
# --------------------------------------------------------------------------------------------


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``q``, gradient the identity w.r.t. ``x`` (STE, [BitNet] Sec. 2.3).

    Equivalent to the FAQ's ``x + (q - x).detach()``, written so that the forward value is q
    bit for bit: ``x - x.detach()`` is exactly zero for finite x.
    """
    return (x - x.detach()) + q.detach()


def weight_quant_codes(
    w: torch.Tensor, per_expert: bool = False, eps: float = WEIGHT_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary codes and absmean scale of ``w`` ([b1.58] Eq. 1-3).

    gamma = mean|W| (per tensor; per leading index when ``per_expert``, i.e. one scale per
    expert of a stacked (E, ., .) tensor), W_q = clip(round(W / (gamma + eps)), -1, 1).
    Returns (codes in w's dtype with values {-1, 0, 1}, gamma): gamma has shape () or (E,).
    """
    w_detached = w.detach()
    if per_expert:
        if w.dim() < 2:
            raise ValueError(
                f"per-expert weight quantisation needs a stacked (E, ...) tensor, got shape {tuple(w.shape)}"
            )
        gamma = w_detached.abs().mean(dim=tuple(range(1, w.dim())))  # (E,)
        gamma_b = gamma.view(-1, *([1] * (w.dim() - 1)))  # (E,) -> (E, 1, 1)
    else:
        gamma = w_detached.abs().mean()
        gamma_b = gamma
    codes = torch.clamp(torch.round(w_detached / (gamma_b + eps)), -1, 1)
    return codes, gamma


def dequantize_weight(codes: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """W_used = gamma * W_q, with gamma () or (E,) broadcast over a stacked (E, ., .) tensor.

    The one expression shared by the fake-quant layers and the packed ternary layers, so both
    produce the same floating-point weights.
    """
    if gamma.dim() == 1 and codes.dim() > 1:
        gamma = gamma.view(-1, *([1] * (codes.dim() - 1)))  # (E,) -> (E, 1, 1)
    return codes * gamma


def weight_quant(w: torch.Tensor, per_expert: bool = False, eps: float = WEIGHT_EPS) -> torch.Tensor:
    """Fake-quantised weight gamma * W_q with the straight-through gradient."""
    codes, gamma = weight_quant_codes(w, per_expert, eps)
    return straight_through(w, dequantize_weight(codes, gamma))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, the input's dtype otherwise (float64 stays float64)."""
    return torch.promote_types(x.dtype, torch.float32)


def _scale_for_integer(gamma: torch.Tensor) -> torch.Tensor:
    """A weight scale as the integer path keeps it: detached, at least float32 (float64 weights
    keep float64 scales, so float64 inference is not rounded to float32)."""
    return gamma.detach().to(_compute_dtype(gamma))


class _IntegerCacheOwner:
    """Drops the module's cached integer weights when it is put in train mode: training changes
    the weights (fused optimisers without a version-counter bump among others), and evaluation
    during training (``model.eval()`` ... ``model.train(was_training)``) must see the new ones;
    and after ``load_state_dict``, whose copies into tensors made under ``inference_mode`` leave
    no trace in a version counter.

    ``prepared_backend``: the kernel ``mhmoe.bitnet.ternary.prepare_integer_inference`` built the
    integer weights for (None: each matrix its ``memory_aware_backend``), used outside an
    ``integer_inference`` block that names one."""

    prepared_backend: str | None = None

    def train(self, mode: bool = True):
        result = super().train(mode)
        if mode:
            clear_cache(self)
        return result

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        clear_cache(self)

    def integer_backend(self, device: torch.device) -> str | None:
        """The kernel to build for: the one ``integer_inference`` chose, else ``prepared_backend``
        (unless it is fbgemm and the weights left the CPU), else None (per matrix)."""
        chosen = integer_inference_state()[1]
        if chosen is not None:
            return chosen
        if self.prepared_backend == "fbgemm" and device.type != "cpu":
            return None
        return self.prepared_backend


def activation_quant_codes(
    x: torch.Tensor, eps: float = ACTIVATION_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 8-bit absmax codes of ``x`` ([BitNet] Eq. 4, FAQ ``activation_quant``).

    s = 127 / max(max_j |x_j|, eps) over the last dimension,
    x_codes = clip(round(s * x), -128, 127). Returns (codes, s) in float32 (float64 for float64
    inputs); s has x's shape with a last dimension of 1.
    """
    x32 = x.detach().to(_compute_dtype(x))
    scale = Q_MAX / x32.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    codes = torch.clamp(torch.round(x32 * scale), Q_MIN, Q_MAX)
    return codes, scale


def activation_codes_for_inference(
    x: torch.Tensor, eps: float = ACTIVATION_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """``activation_quant_codes`` with fewer passes over x, for the integer inference path.

    The same values: max|x_j| by one infinity-norm reduction (no |x| temporary), and no clip,
    which is a no-op here: |x_j| <= max|x| makes |s x_j| <= 127 up to one rounding of s, which
    ``round`` takes back to 127 (and below eps, |s x_j| < 127).
    """
    x32 = x.detach().to(_compute_dtype(x))
    scale = Q_MAX / torch.linalg.vector_norm(x32, ord=float("inf"), dim=-1, keepdim=True).clamp_(min=eps)
    return torch.mul(x32, scale).round_(), scale


def activation_quant(x: torch.Tensor, eps: float = ACTIVATION_EPS) -> torch.Tensor:
    """Fake-quantised activations x_codes / s in x's dtype, with the straight-through gradient."""
    codes, scale = activation_quant_codes(x, eps)
    return straight_through(x, (codes / scale).to(x.dtype))


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g over the last dimension (at least float32 inside).

    The norm inside every quantised layer (FAQ BitLinear); same formula as ``mhmoe.model.RMSNorm``.
    """

    def __init__(self, dim: int, eps: float = NORM_EPS, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(_compute_dtype(x))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(x32.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _quantize_input(x: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
    """actq(RMSNorm(x)) with STE: the input side of every quantised matmul."""
    if norm is not None:
        x = norm(x)
    return activation_quant(x)


# --------------------------------------------------------------------------------------------
# Quantised layers. Each has a ``quantized_weight(s)`` method; the packed ternary layers of
# ``mhmoe.bitnet.ternary`` reuse the same forward math and only return unpacked weights there.
# --------------------------------------------------------------------------------------------


class _TernaryMatrixMath(_IntegerCacheOwner):
    """One ternary matrix (a linear layer's or a router's) and its cached integer form."""

    def quantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        """(W_q (O, I) in {-1, 0, 1}, gamma ()) of the quantised weight."""
        raise NotImplementedError

    def integer_sources(self) -> tuple[torch.Tensor, ...]:  # pragma: no cover - abstract
        """The tensors W_q derives from (the integer weights are rebuilt when they change)."""
        raise NotImplementedError

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Tensors whose gradient, when required, keeps the layer on the float (autograd) path."""
        return ()

    def integer_weight(self) -> IntegerLinearWeight:
        """W_q as int8 for the integer kernel chosen with ``integer_inference`` (none chosen: the
        ``prepared_backend``, else its ``memory_aware_backend``), built once
        (``mhmoe.bitnet.integer``)."""
        sources = self.integer_sources()
        backend = self.integer_backend(sources[0].device)
        return cached(self, "weight", sources, backend, lambda: self.build_integer_weight(backend))

    def build_integer_weight(self, backend: str | None) -> IntegerLinearWeight:
        """A new integer form of W_q for ``backend`` (None: its ``memory_aware_backend``; uncached)."""
        codes_OI, gamma = self.ternary_codes()
        return IntegerLinearWeight(Int8Weight(codes_OI, backend), _scale_for_integer(gamma).reshape(()))


class _BitLinearMath(_TernaryMatrixMath):
    """y = (gamma W_q) actq(RMSNorm(x)) (+ bias): the forward shared by BitLinear/TernaryLinear.

    In inference (``mhmoe.bitnet.integer.use_integer_path``) the same value comes from the
    integer kernels: y = (x_codes @ W_q^T) * gamma / s ([BitNet] Eq. 11), W_q built once as int8.
    """

    norm: nn.Module | None
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_integer_path(self, x, *self.gradient_tensors()):
            return self.integer_forward(x)
        x_q = _quantize_input(x, self.norm)
        w_q = self.quantized_weight()
        return F.linear(x_q, w_q.to(x_q.dtype), None if self.bias is None else self.bias.to(x_q.dtype))

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward through the integer kernels: float32 math (float64 for float64 inputs),
        returned in x's dtype."""
        x_in = self.norm(x) if self.norm is not None else x
        codes, scale = activation_codes_for_inference(x_in)
        in_features = codes.shape[-1]
        integer = self.integer_weight()
        # (..., I) -> (M, I): one row per token
        y_MO = integer_linear(codes.reshape(-1, in_features), scale.reshape(-1, 1), integer.weight, integer.gamma)
        if self.bias is not None:
            y_MO = y_MO + self.bias.to(y_MO.dtype)
        return y_MO.reshape(*codes.shape[:-1], y_MO.shape[-1]).to(x.dtype)


class BitLinear(_BitLinearMath, nn.Linear):
    """nn.Linear with BitNet b1.58 quantisation: ternary absmean weights, 8-bit activations.

    state_dict: ``weight`` (O, I) latent full-precision weights, ``bias`` when present,
    ``norm.weight`` (I,) when ``norm`` is on.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        norm: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.norm = RMSNorm(in_features, device=device, dtype=dtype) if norm else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, norm: bool = True) -> BitLinear:
        """A BitLinear sharing ``linear``'s weight (and bias) Parameters."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=False, norm=False)
        new.weight = linear.weight
        new.bias = linear.bias
        new.norm = (
            RMSNorm(linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
            if norm else None
        )
        return new

    def quantized_weight(self) -> torch.Tensor:
        # [b1.58] Eq. 1-3: gamma = mean|W|, W_q = clip(round(W / (gamma + eps)), -1, 1).
        return weight_quant(self.weight)

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return weight_quant_codes(self.weight)

    def integer_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.weight, self.bias, None if self.norm is None else self.norm.weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bits=1.58, act_bits=8"


class _BitExpertsMath(_IntegerCacheOwner):
    """Stacked experts on quantised weights and activations, through the same ``grouped_mm``.

    SwiGLU: y = W2_q actq(N_h( silu(W1_q actq(N_i x)) * (W3_q actq(N_i x)) ))
    ReLU:   y = W2_q actq(N_h( relu(W1_q actq(N_i x)) ))
    with one absmean scale per expert per matrix and activation scales per row.

    In inference (``mhmoe.bitnet.integer.use_integer_path``) every matmul is an integer one,
    expert by expert over the experts that have rows ([BitNet] Eq. 11 per expert: the int32 sums
    times gamma_e / s); the per-row element-wise steps (activation, hidden norm, hidden
    quantisation) run once over all rows.
    """

    activation: str
    use_grouped_mm: bool | None
    input_norm: nn.Module | None
    hidden_norm: nn.Module | None

    def quantized_weights(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def expert_codes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:  # pragma: no cover - abstract
        """Per weight name: (W_q (E, O, I) int8 in {-1, 0, 1}, gamma (E,))."""
        raise NotImplementedError

    def quantized_expert_weights(self, expert: int) -> dict[str, torch.Tensor]:
        """``quantized_weights()`` of one expert: (O, I) per weight name."""
        return {k: w[expert] for k, w in self.quantized_weights().items()}

    def integer_sources(self) -> tuple[torch.Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        norms = [n.weight for n in (self.input_norm, self.hidden_norm) if n is not None]
        return tuple(norms)

    def integer_weights(self) -> IntegerExpertWeights:
        """The experts' ternary matrices as int8, per expert, built once: for the kernel chosen
        with ``integer_inference``, else the ``prepared_backend``, else each matrix for its
        ``memory_aware_backend`` (the fused
        gate/up (2F, S) and the down (S, F) projections can get different ones)."""
        sources = self.integer_sources()
        backend = self.integer_backend(sources[0].device)
        return cached(self, "experts", sources, backend, lambda: self.build_integer_weights(backend))

    def build_integer_weights(self, backend: str | None) -> IntegerExpertWeights:
        """A new integer form of the experts' matrices for ``backend`` (None: per matrix, its
        ``memory_aware_backend``; uncached)."""
        # int8 codes (expert_codes returns int8; .to is a no-op then): the fused (E, 2F, S)
        # up matrix is one byte a weight, where concatenating float32 codes allocated four
        # more per weight, on top of the float codes themselves, at build.
        codes = self.expert_codes()
        w1_codes, gamma1_E = codes["w1"]
        num_experts, d_hidden = w1_codes.shape[:2]
        gamma1_EF = _scale_for_integer(gamma1_E).reshape(-1, 1).expand(num_experts, d_hidden)
        if self.activation == "swiglu":
            w3_codes, gamma3_E = codes["w3"]
            up_EGS = torch.cat([w1_codes.to(torch.int8), w3_codes.to(torch.int8)], dim=1)  # 2 x (E, F, S) -> (E, 2F, S)
            gamma3_EF = _scale_for_integer(gamma3_E).reshape(-1, 1).expand(num_experts, d_hidden)
            gamma_up_EG = torch.cat([gamma1_EF, gamma3_EF], dim=1)  # (E, 2F)
        else:
            up_EGS, gamma_up_EG = w1_codes, gamma1_EF
        w2_codes, gamma2_E = codes["w2"]
        return IntegerExpertWeights(
            [Int8Weight(up_EGS[e], backend) for e in range(num_experts)],
            gamma_up_EG.contiguous(),
            [Int8Weight(w2_codes[e], backend) for e in range(num_experts)],
            _scale_for_integer(gamma2_E).reshape(-1),
        )

    def _hidden(self, x_q: torch.Tensor, mm, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.activation == "swiglu":
            return F.silu(mm(x_q, weights["w1"])) * mm(x_q, weights["w3"])
        return F.relu(mm(x_q, weights["w1"]))

    def forward(
        self, x_MS: torch.Tensor, offsets_E: torch.Tensor, counts_E: list[int] | None = None
    ) -> torch.Tensor:
        if use_integer_path(self, x_MS, *self.gradient_tensors()):
            if counts_E is None:
                counts_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1)).tolist()
            blocks, start = [], 0
            for expert, count in enumerate(counts_E):
                if count:
                    blocks.append((expert, start, start + count))
                start += count
            return self.integer_forward(x_MS, blocks)
        weights = {k: w.to(x_MS.dtype) for k, w in self.quantized_weights().items()}
        mm = functools.partial(
            grouped_mm, offsets_E=offsets_E, counts_E=counts_E, use_grouped_mm=self.use_grouped_mm
        )
        x_q_MS = _quantize_input(x_MS, self.input_norm)
        hidden_MF = self._hidden(x_q_MS, mm, weights)
        return mm(_quantize_input(hidden_MF, self.hidden_norm), weights["w2"])

    def integer_forward(self, x_MS: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        """The experts through the integer kernels; ``blocks``: (expert, first row, end row) of
        every expert with rows (rows sorted by expert). float32 math (float64 for float64
        inputs), returned in x's dtype.

        Consecutive experts are taken together in chunks of about ``INTEGER_CHUNK_ROWS`` rows:
        the matmuls run expert by expert, the per-row element-wise steps once per chunk, while
        its (rows, 2F) activations are in cache (over the whole (M, 2F) tensor they cost 3x
        the matmuls at 2048 tokens for MH-MoE h=3).
        """
        if not blocks:
            return x_MS.new_zeros(0, x_MS.shape[1])
        integer = self.integer_weights()
        chunks, current, rows = [], [], 0
        for block in blocks:
            if current and rows + block[2] - block[1] > INTEGER_CHUNK_ROWS:
                chunks.append(current)
                current, rows = [], 0
            current.append(block)
            rows += block[2] - block[1]
        chunks.append(current)
        outputs = [self._integer_chunk(x_MS[chunk[0][1]:chunk[-1][2]], chunk, integer) for chunk in chunks]
        y_MS = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return y_MS.to(x_MS.dtype)

    def _integer_chunk(self, x_rS: torch.Tensor, blocks: list[tuple[int, int, int]],
                       integer: IntegerExpertWeights) -> torch.Tensor:
        """Consecutive expert blocks (row ranges absolute; x_rS starts at the first) -> (r, S)."""
        first = blocks[0][1]
        x_in = self.input_norm(x_rS) if self.input_norm is not None else x_rS
        codes_rS, scale_r1 = activation_codes_for_inference(x_in)
        pre = [integer_linear(codes_rS[a - first:b - first], scale_r1[a - first:b - first], integer.up[e],
                              integer.gamma_up_EG[e]) for e, a, b in blocks]
        pre_rG = pre[0] if len(pre) == 1 else torch.cat(pre)
        if self.activation == "swiglu":
            gate_rF, up_rF = pre_rG.chunk(2, dim=1)  # (r, 2F) -> 2 x (r, F)
            hidden_rF = F.silu(gate_rF).mul_(up_rF)
        else:
            hidden_rF = pre_rG.relu_()
        hidden_in = self.hidden_norm(hidden_rF) if self.hidden_norm is not None else hidden_rF
        hidden_codes_rF, hidden_scale_r1 = activation_codes_for_inference(hidden_in)
        out = [integer_linear(hidden_codes_rF[a - first:b - first], hidden_scale_r1[a - first:b - first],
                              integer.down[e], integer.gamma_down_E[e]) for e, a, b in blocks]
        return out[0] if len(out) == 1 else torch.cat(out)

    def forward_blocks(self, x_MS: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        """Rows sorted by expert, ``blocks`` = (expert, first row, end row): the integer path in
        one call in inference (per-row results equal ``forward_one``'s), ``forward_one`` per
        block otherwise. The small-batch dispatch of ``mhmoe.layers.moe`` calls this."""
        if not blocks:
            return x_MS.new_zeros(0, x_MS.shape[1])
        if use_integer_path(self, x_MS, *self.gradient_tensors()):
            return self.integer_forward(x_MS, blocks)
        return torch.cat([self.forward_one(e, x_MS[a:b]) for e, a, b in blocks])

    def forward_one(self, expert: int, x_RS: torch.Tensor) -> torch.Tensor:
        """Reference: expert ``expert`` alone on rows x_RS, with plain matmuls (integer ones in
        inference)."""
        if use_integer_path(self, x_RS, *self.gradient_tensors()):
            return self.integer_forward(x_RS, [(expert, 0, x_RS.shape[0])] if x_RS.shape[0] else [])
        weights = {k: w.to(x_RS.dtype) for k, w in self.quantized_expert_weights(expert).items()}

        def mm(x: torch.Tensor, w_FS: torch.Tensor) -> torch.Tensor:
            return x @ w_FS.t()

        hidden = self._hidden(_quantize_input(x_RS, self.input_norm), mm, weights)
        return mm(_quantize_input(hidden, self.hidden_norm), weights["w2"])


class BitExperts(_BitExpertsMath, Experts):
    """``Experts`` with BitNet b1.58 quantisation, one absmean scale per expert per matrix.

    Same stacked latent Parameters (w1, w3, w2) and grouped matmul as ``Experts``; adds
    ``input_norm.weight`` (S,) and ``hidden_norm.weight`` (F,) when ``norm`` is on.
    """

    def __init__(
        self,
        num_experts: int,
        d_in: int,
        d_expert: int,
        activation: str = "swiglu",
        norm: bool = True,
    ) -> None:
        super().__init__(num_experts, d_in, d_expert, activation)
        device, dtype = self.w1.device, self.w1.dtype
        self.input_norm = RMSNorm(d_in, device=device, dtype=dtype) if norm else None
        self.hidden_norm = RMSNorm(d_expert, device=device, dtype=dtype) if norm else None

    @classmethod
    def from_experts(cls, experts: Experts, norm: bool = True) -> BitExperts:
        """A BitExperts sharing ``experts``' stacked Parameters."""
        with torch.device("meta"):
            new = cls(experts.num_experts, experts.d_in, experts.d_expert, experts.activation, norm=False)
        for name, param in experts.named_parameters(recurse=False):
            setattr(new, name, param)
        new.use_grouped_mm = experts.use_grouped_mm
        device, dtype = experts.w1.device, experts.w1.dtype
        if norm:
            new.input_norm = RMSNorm(experts.d_in, device=device, dtype=dtype)
            new.hidden_norm = RMSNorm(experts.d_expert, device=device, dtype=dtype)
        return new

    def _weight_names(self) -> tuple[str, ...]:
        return ("w1", "w3", "w2") if self.activation == "swiglu" else ("w1", "w2")

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        # [b1.58] Eq. 1-3 per expert: gamma_e = mean|W_e|, W_q,e = clip(round(W_e/(gamma_e+eps)), -1, 1).
        return {name: weight_quant(getattr(self, name), per_expert=True) for name in self._weight_names()}

    def expert_codes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        # int8 right away, weight by weight: at most one float code tensor exists at a time.
        codes = {}
        for name in self._weight_names():
            codes_EOI, gamma_E = weight_quant_codes(getattr(self, name), per_expert=True)
            codes[name] = (codes_EOI.to(torch.int8), gamma_E)
        return codes

    def quantized_expert_weights(self, expert: int) -> dict[str, torch.Tensor]:
        # The expert's own slice (1, O, I), quantised per expert as in quantized_weights: the
        # same mean over the same contiguous block, without quantising the other E - 1.
        return {name: weight_quant(getattr(self, name)[expert:expert + 1], per_expert=True)[0]
                for name in self._weight_names()}

    def integer_sources(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self._weight_names())

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.integer_sources() + super().gradient_tensors()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bits=1.58, act_bits=8"


class _BitRouterMath(_TernaryMatrixMath):
    """Router logits from ternary weights and 8-bit activations (no inner norm), then top-k
    (with the aux-loss-free selection bias when the router has one, as ``TopKRouter``)."""

    top_k: int
    normalize_top_k: bool
    expert_bias: torch.Tensor | None

    def forward(self, x_NS: torch.Tensor) -> RouterOutput:
        # Same semantics and code as TopKRouter.forward (float32 logits, then route_logits:
        # softmax, top-k, renormalise, the loss statistics).
        with torch.autocast(device_type=x_NS.device.type, enabled=False):
            if use_integer_path(self, x_NS, *self.gradient_tensors()):
                codes_NS, scale_N1 = activation_codes_for_inference(x_NS)
                integer = self.integer_weight()
                # float32 logits for every input dtype, as the float path below computes them
                logits_NE = integer_linear(codes_NS, scale_N1, integer.weight, integer.gamma).float()
            else:
                logits_NE = F.linear(activation_quant(x_NS).float(), self.quantized_weight().float())
        return route_logits(logits_NE, self.top_k, self.normalize_top_k, getattr(self, "expert_bias", None))


class BitRouter(_BitRouterMath, TopKRouter):
    """``TopKRouter`` on ternary weights and 8-bit activations (opt-in: ``quantize_router``).

    Keeps the router's aux-loss-free selection bias buffer (``expert_bias``, DeepSeek-V3
    Eq. 16) when it has one: the same tensor, so the balancing update and checkpoints see it.
    """

    @classmethod
    def from_router(cls, router: TopKRouter) -> BitRouter:
        bias = getattr(router, "expert_bias", None)
        with torch.device("meta"):
            new = cls(router.weight.shape[1], router.num_experts, router.top_k, router.normalize_top_k,
                      selection_bias=bias is not None)
        new.weight = router.weight
        if bias is not None:
            new.expert_bias = bias  # the registered buffer, now the router's own tensor
        return new

    def quantized_weight(self) -> torch.Tensor:
        return weight_quant(self.weight)

    def ternary_codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        return weight_quant_codes(self.weight)

    def integer_sources(self) -> tuple[torch.Tensor, ...]:
        return (self.weight,)

    def gradient_tensors(self) -> tuple[torch.Tensor | None, ...]:
        return (self.weight,)
