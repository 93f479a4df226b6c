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
ternary model (``mhmoe.export_ternary``) reproduce the training-time logits bit for bit.
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

Dispatch: quantised experts always take the "grouped" dispatch of ``mhmoe.layers.moe`` (their
``resolve_implementation`` says so): the fused CPU "blocked" path reads the raw stacked weights
inside one autograd Function, where no quantiser could act.

state_dict keys stay those of the full-precision model; the only additions are the inner norm
gains: ``<linear>.norm.weight`` (I,), ``<experts>.input_norm.weight`` (S,) and
``<experts>.hidden_norm.weight`` (F,). A full-precision checkpoint therefore loads into a BitNet
model with ``strict=False`` (missing: exactly those gains, which start at 1).

Two-stage schedule [FAQ]: ``two_stage_schedule`` (module end).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.layers.experts import Experts, grouped_mm
from mhmoe.layers.routing import RouterOutput, TopKRouter, route_logits

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHT_EPS",
    "ACTIVATION_EPS",
    "BitExperts",
    "BitLinear",
    "BitNetConfig",
    "BitRouter",
    "RMSNorm",
    "apply_bitnet",
    "activation_quant",
    "activation_quant_codes",
    "bitnet_modules",
    "straight_through",
    "to_bitnet",
    "two_stage_lambdas",
    "two_stage_schedule",
    "weight_quant",
    "weight_quant_codes",
]

WEIGHT_EPS = 1e-5
"""eps of the absmean weight quantiser (the FAQ's clamp value)."""
ACTIVATION_EPS = 1e-5
"""Lower bound of max|x| in the absmax activation quantiser (the FAQ's clamp value)."""
ACTIVATION_BITS = 8
Q_MAX = 2 ** (ACTIVATION_BITS - 1) - 1  # 127
Q_MIN = -(2 ** (ACTIVATION_BITS - 1))  # -128
NORM_EPS = 1e-6

DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*.lm_head")
"""Module names ``to_bitnet`` leaves in full precision unless ``exclude`` is given."""


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
# ``mhmoe.export_ternary`` reuse the same forward math and only return unpacked weights there.
# --------------------------------------------------------------------------------------------


class _BitLinearMath:
    """y = (gamma W_q) actq(RMSNorm(x)) (+ bias): the forward shared by BitLinear/TernaryLinear."""

    norm: nn.Module | None
    bias: torch.Tensor | None

    def quantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = _quantize_input(x, self.norm)
        w_q = self.quantized_weight()
        return F.linear(x_q, w_q.to(x_q.dtype), None if self.bias is None else self.bias.to(x_q.dtype))


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
    def from_linear(cls, linear: nn.Linear, norm: bool = True) -> "BitLinear":
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

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bits=1.58, act_bits=8"


class _BitExpertsMath:
    """Stacked experts on quantised weights and activations, through the same ``grouped_mm``.

    SwiGLU: y = W2_q actq(N_h( silu(W1_q actq(N_i x)) * (W3_q actq(N_i x)) ))
    ReLU:   y = W2_q actq(N_h( relu(W1_q actq(N_i x)) ))
    with one absmean scale per expert per matrix and activation scales per row.
    """

    activation: str
    use_grouped_mm: bool | None
    input_norm: nn.Module | None
    hidden_norm: nn.Module | None

    def quantized_weights(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def resolve_implementation(self, x: torch.Tensor, rows_per_expert: float | None = None) -> str:
        """Always "grouped": ``moe_dispatch`` then calls ``forward`` below.

        The fused CPU "blocked" path of ``mhmoe.layers.moe`` reads the raw stacked weights and
        keeps the hidden activations inside one autograd Function, where neither the weight nor
        the activation quantisers can act, so quantised experts never take it.
        """
        requested = getattr(self, "implementation", None)
        if requested not in (None, "grouped"):
            raise ValueError(
                f"implementation={requested!r}: quantised experts run only the 'grouped' "
                "implementation (the fused 'blocked' path bypasses the quantisers)"
            )
        return "grouped"

    def _hidden(self, x_q: torch.Tensor, mm, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.activation == "swiglu":
            return F.silu(mm(x_q, weights["w1"])) * mm(x_q, weights["w3"])
        return F.relu(mm(x_q, weights["w1"]))

    def forward(
        self, x_MS: torch.Tensor, offsets_E: torch.Tensor, counts_E: list[int] | None = None
    ) -> torch.Tensor:
        weights = {k: w.to(x_MS.dtype) for k, w in self.quantized_weights().items()}
        mm = functools.partial(
            grouped_mm, offsets_E=offsets_E, counts_E=counts_E, use_grouped_mm=self.use_grouped_mm
        )
        x_q_MS = _quantize_input(x_MS, self.input_norm)
        hidden_MF = self._hidden(x_q_MS, mm, weights)
        return mm(_quantize_input(hidden_MF, self.hidden_norm), weights["w2"])

    def forward_one(self, expert: int, x_RS: torch.Tensor) -> torch.Tensor:
        """Reference: expert ``expert`` alone on rows x_RS, with plain matmuls."""
        weights = {k: w[expert].to(x_RS.dtype) for k, w in self.quantized_weights().items()}

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
    def from_experts(cls, experts: Experts, norm: bool = True) -> "BitExperts":
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

    def quantized_weights(self) -> dict[str, torch.Tensor]:
        # [b1.58] Eq. 1-3 per expert: gamma_e = mean|W_e|, W_q,e = clip(round(W_e/(gamma_e+eps)), -1, 1).
        names = ("w1", "w3", "w2") if self.activation == "swiglu" else ("w1", "w2")
        return {name: weight_quant(getattr(self, name), per_expert=True) for name in names}

    def extra_repr(self) -> str:
        return super().extra_repr() + ", bits=1.58, act_bits=8"


class _BitRouterMath:
    """Router logits from ternary weights and 8-bit activations (no inner norm), then top-k."""

    top_k: int
    normalize_top_k: bool

    def quantized_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x_NS: torch.Tensor) -> RouterOutput:
        # Same semantics and code as TopKRouter.forward (float32 logits, then route_logits:
        # softmax, top-k, renormalise, the loss statistics).
        with torch.autocast(device_type=x_NS.device.type, enabled=False):
            logits_NE = F.linear(activation_quant(x_NS).float(), self.quantized_weight().float())
        return route_logits(logits_NE, self.top_k, self.normalize_top_k)


class BitRouter(_BitRouterMath, TopKRouter):
    """``TopKRouter`` on ternary weights and 8-bit activations (opt-in: ``quantize_router``)."""

    @classmethod
    def from_router(cls, router: TopKRouter) -> "BitRouter":
        with torch.device("meta"):
            new = cls(router.weight.shape[1], router.num_experts, router.top_k, router.normalize_top_k)
        new.weight = router.weight
        return new

    def quantized_weight(self) -> torch.Tensor:
        return weight_quant(self.weight)


# --------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BitNetConfig:
    """The options of ``to_bitnet``, JSON-able (stored with run configs and ternary exports)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    quantize_router: bool = False
    norm: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"] = None if self.include is None else list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BitNetConfig":
        if not isinstance(data, dict):
            raise ValueError(f"bitnet config {data!r}: must be a JSON object")
        unknown = sorted(set(data) - {"include", "exclude", "quantize_router", "norm"})
        if unknown:
            raise ValueError(f"bitnet config has unknown fields {unknown}")
        fields = dict(data)
        if fields.get("include") is not None:
            fields["include"] = tuple(fields["include"])
        if "exclude" in fields:
            fields["exclude"] = tuple(fields["exclude"] or ())
        return cls(**fields)


Pattern = str | re.Pattern


def _compile_patterns(name: str, patterns: Pattern | Iterable[Pattern] | None) -> list[tuple[str, Any]]:
    """Patterns: glob strings (fnmatch, case-sensitive, whole name), ``re:<regex>`` strings or
    compiled ``re.Pattern`` objects (both full-match the module name; a compiled pattern is
    recorded in ``BitNetConfig`` as its ``re:`` string, without its flags)."""
    if patterns is None:
        return []
    if isinstance(patterns, (str, re.Pattern)):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        if isinstance(pattern, re.Pattern):
            compiled.append((f"re:{pattern.pattern}", pattern))  # recorded as a "re:" string
        elif isinstance(pattern, str) and pattern.startswith("re:"):
            try:
                compiled.append((pattern, re.compile(pattern[3:])))
            except re.error as err:
                raise ValueError(f"{name} pattern {pattern!r}: invalid regular expression ({err})") from None
        elif isinstance(pattern, str) and pattern:
            compiled.append((pattern, pattern))
        else:
            raise ValueError(
                f"{name} pattern {pattern!r}: must be a non-empty glob string, 're:<regex>' or re.Pattern"
            )
    return compiled


def _matches(module_name: str, pattern: Any) -> bool:
    if isinstance(pattern, re.Pattern):
        return pattern.fullmatch(module_name) is not None
    return fnmatch.fnmatchcase(module_name, pattern)


_QUANTIZED_TYPES: tuple[type, ...] = (BitLinear, BitExperts, BitRouter)


def _eligible(module: nn.Module, quantize_router: bool) -> bool:
    """Exactly nn.Linear (subclasses such as MultiheadAttention's out_proj are read by weight
    elsewhere and are left alone), any Experts, the router when asked; never twice."""
    if isinstance(module, _QUANTIZED_TYPES):
        return False
    if type(module) is nn.Linear or isinstance(module, Experts):
        return True
    return quantize_router and isinstance(module, TopKRouter)


def _convert(module: nn.Module, norm: bool) -> nn.Module:
    if isinstance(module, Experts):
        return BitExperts.from_experts(module, norm=norm)
    if isinstance(module, TopKRouter):
        return BitRouter.from_router(module)
    if module.bias is not None:
        logger.warning("BitLinear from a biased nn.Linear: the bias stays in full precision")
    return BitLinear.from_linear(module, norm=norm)


def to_bitnet(
    model: nn.Module,
    include: Pattern | Sequence[Pattern] | None = None,
    exclude: Pattern | Sequence[Pattern] | None = DEFAULT_EXCLUDE,
    quantize_router: bool = False,
    norm: bool = True,
) -> nn.Module:
    """Swap modules for their BitNet b1.58 versions, in place; returns the model.

    Candidates: every ``nn.Linear`` (exact type) -> ``BitLinear``, every ``Experts`` ->
    ``BitExperts`` and, with ``quantize_router``, every ``TopKRouter`` -> ``BitRouter``; the new
    modules share the old Parameters (so weights, devices, dtypes and state_dict keys are kept;
    the inner-norm gains are the only new keys, see the module docstring).

    A candidate named ``name`` (as in ``model.named_modules()``) is converted when ``include`` is
    None or one include pattern matches it, and no ``exclude`` pattern matches it. Patterns are
    globs (``"blocks.*.attention.*"``), ``"re:<regex>"`` strings or compiled regexes, matched
    against the whole name. By default the LM head (``lm_head``) is excluded; embeddings are
    never candidates. Each explicit include pattern must match at least one candidate
    (ValueError otherwise: a typo would silently train a full-precision model).

    The options are recorded on the model as ``model.bitnet_config`` (a ``BitNetConfig``).
    """
    include_p = _compile_patterns("include", include) if include is not None else None
    exclude_p = _compile_patterns("exclude", exclude)
    candidates = [(name, m) for name, m in model.named_modules() if _eligible(m, quantize_router)]
    if include_p is not None:
        for raw, pattern in include_p:
            if not any(_matches(name, pattern) for name, _ in candidates):
                raise ValueError(
                    f"include pattern {raw!r} matches no convertible module "
                    f"(nn.Linear, Experts{', TopKRouter' if quantize_router else ''}); "
                    f"candidates: {[name for name, _ in candidates][:20]}"
                )
    selected = [
        (name, m) for name, m in candidates
        if (include_p is None or any(_matches(name, p) for _, p in include_p))
        and not any(_matches(name, p) for _, p in exclude_p)
    ]
    if type(model).__name__ == "TransformerLM" and any(
        getattr(model, "lm_head", None) is m for _, m in selected
    ):
        raise ValueError(
            "lm_head selected for quantisation: TransformerLM computes its logits from "
            "lm_head.weight directly, so a BitLinear LM head would run unquantised; keep it out "
            "of include (it is in the default exclude)"
        )
    for name, module in selected:
        new = _convert(module, norm)
        new.train(module.training)
        if name == "":
            model = new
            break
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    logger.info("to_bitnet: %d modules quantised (%d candidates)", len(selected), len(candidates))
    config = BitNetConfig(
        include=None if include is None else tuple(raw for raw, _ in include_p),
        exclude=tuple(raw for raw, _ in exclude_p),
        quantize_router=quantize_router,
        norm=norm,
    )
    model.bitnet_config = config
    return model


def apply_bitnet(model: nn.Module, config: BitNetConfig | dict[str, Any] | bool | None) -> nn.Module:
    """``to_bitnet`` with stored options: the one call for trainers and run loaders.

    ``config``: None/False leaves the model unchanged; True uses the defaults; a BitNetConfig
    or its ``to_dict()`` (as stored in a run's config.json under "bitnet") replays those options.
    """
    if config is None or config is False:
        return model
    if config is True:
        config = BitNetConfig()
    elif isinstance(config, dict):
        config = BitNetConfig.from_dict(config)
    elif not isinstance(config, BitNetConfig):
        raise ValueError(f"bitnet={config!r}: must be None, a bool, a BitNetConfig or its dict")
    return to_bitnet(
        model, include=config.include, exclude=config.exclude,
        quantize_router=config.quantize_router, norm=config.norm,
    )


def bitnet_modules(model: nn.Module) -> list[str]:
    """Names of the BitNet-quantised modules of ``model`` (in ``named_modules`` order)."""
    return [name for name, m in model.named_modules() if isinstance(m, _QUANTIZED_TYPES)]


# --------------------------------------------------------------------------------------------
# Two-stage schedule (FAQ)
# --------------------------------------------------------------------------------------------


def _check_number(name: str, value: Any, minimum: float = 0.0, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float))
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        rule = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name}={value!r}: must be a number {rule}")


def two_stage_schedule(
    step: int,
    total_steps: int,
    peak_lr: float,
    *,
    second_peak_lr: float | None = None,
    warmup_steps: int = 0,
    switch_fraction: float = 0.5,
    final_lr: float = 0.0,
    weight_decay: float = 0.1,
    second_weight_decay: float = 0.0,
) -> tuple[float, float]:
    """(learning rate, weight decay) at 0-based ``step`` of the FAQ's two-stage BitNet schedule.

    FAQ: "1.5e-3 to 8e-4, then 5e-4 to 0" for the LR and "0.1, then 0" for the weight decay,
    switching halfway. Ours, with s = round(switch_fraction * total_steps):

    * warmup (step < warmup_steps): lr = peak_lr * (step + 1) / warmup_steps;
    * stage 1 (step < s): the straight line from peak_lr (at the end of warmup) to final_lr at
      total_steps, i.e. about peak_lr / 2 at the switch (1.5e-3 -> 7.5e-4 with the FAQ numbers);
    * stage 2 (step >= s): a drop to second_peak_lr (default peak_lr / 3, the FAQ's
      1.5e-3 -> 5e-4), then linear to final_lr at total_steps;
    * weight decay: ``weight_decay`` (0.1) in stage 1, ``second_weight_decay`` (0) in stage 2.

    Steps past total_steps stay at final_lr. With AdamW, set each param group's
    ``weight_decay`` to the returned value every step (PyTorch multiplies it by the LR).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r}: must be a non-negative integer")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r}: must be a positive integer")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps!r}: must be a non-negative integer")
    _check_number("peak_lr", peak_lr, strict=True)
    second_peak_lr = peak_lr / 3 if second_peak_lr is None else second_peak_lr
    _check_number("second_peak_lr", second_peak_lr)
    _check_number("final_lr", final_lr)
    _check_number("weight_decay", weight_decay)
    _check_number("second_weight_decay", second_weight_decay)
    if isinstance(switch_fraction, bool) or not isinstance(switch_fraction, (int, float)) \
            or not 0 < switch_fraction <= 1:
        raise ValueError(f"switch_fraction={switch_fraction!r}: must be in (0, 1]")
    switch = round(switch_fraction * total_steps)
    if warmup_steps > switch:
        raise ValueError(
            f"warmup_steps={warmup_steps} exceeds the stage switch at step {switch} "
            f"(switch_fraction={switch_fraction} of total_steps={total_steps})"
        )
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps, float(weight_decay)
    if step < switch:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return peak_lr + (final_lr - peak_lr) * progress, float(weight_decay)
    progress = min((step - switch) / max(total_steps - switch, 1), 1.0)
    return second_peak_lr + (final_lr - second_peak_lr) * progress, float(second_weight_decay)


def two_stage_lambdas(total_steps: int, peak_lr: float, **kwargs: Any):
    """(lr_lambda, wd_fn) for ``torch.optim.lr_scheduler.LambdaLR`` (optimizer lr = peak_lr).

    ``lr_lambda(step)`` is the multiplier lr / peak_lr; ``wd_fn(step)`` the weight decay to set.
    """
    two_stage_schedule(0, total_steps, peak_lr, **kwargs)  # validate once, eagerly

    def lr_lambda(step: int) -> float:
        return two_stage_schedule(step, total_steps, peak_lr, **kwargs)[0] / peak_lr

    def wd_fn(step: int) -> float:
        return two_stage_schedule(step, total_steps, peak_lr, **kwargs)[1]

    return lr_lambda, wd_fn
