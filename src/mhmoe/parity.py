"""Analytic parameter and FLOP counts, and the FLOPs/parameter parity planner (paper Section 2).

Everything here is computed from a config alone (``DenseConfig`` / ``MoEConfig``); nothing
inspects module parameter names. The tests prove the counts against the built modules
(``sum(p.numel())``) and against ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward pass.

Notation (the paper's, Section 2.2):

    d      d_model                          B   tokens
    h      num_heads (sub-tokens per token) s   = d / h, the experts' input size (d_sub)
    E      num_experts                      k   top_k (per sub-token)
    d_e    d_expert, the experts' hidden size (the paper's d_moe for SMoE, d_mhmoe for MH-MoE)
    n      weight matrices per FFN: 2 for ReLU (w1, w2), 3 for SwiGLU (w1, w3, w2)

Two FLOP conventions (``count_flops(..., convention=...)``):

* ``"flops"`` (default): 2 FLOPs per multiply-add of every matmul, forward pass. A
  (B x n) @ (n x m) matmul costs 2*B*n*m. This is what ``FlopCounterMode`` reports.
* ``"paper"``: the paper's "scalar multiplications" of a bias-free matmul: each of the B*m
  outputs needs n multiplications and n - 1 additions, so (B x n) @ (n x m) costs
  B*m*(2n - 1); a d x d projection over B tokens costs 2Bd^2 - Bd.

In both, only matmuls count: bias additions, the activation, SwiGLU's gating product, softmax
and top-k are not counted. The router's matmul (the gate G) and the weighted combination of the
k expert outputs are reported apart from the layer's "active" FLOPs, as in the paper's Eq. 6,
which counts head, experts and merge only.

The planner (``plan_mhmoe``) turns an SMoE config into an MH-MoE config with the same active
FLOPs per token (Eq. 8, generalised to SwiGLU and to any top-k) and the closest parameter count
(Eq. 9), and reports every remaining deviation. ``variants_from_smoe`` / ``paper_variants``
derive the paper's five compared models (Section 3) from one SMoE config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Iterable

from mhmoe.config import DenseConfig, FFNConfig, MoEConfig

FLOP_CONVENTIONS = ("flops", "paper")

VARIANT_NAMES = ("dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3")
"""The five models of the paper's Table 1, in its order."""

PRESET_D_MODEL = {"paper": 768, "mini": 192}
"""d_model of each named preset. The SMoE baseline is 8 experts x (8/3)d_model, top-1."""


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def num_matrices(activation: str) -> int:
    """Weight matrices per FFN: 3 for SwiGLU (w1, w3, w2), 2 for ReLU (w1, w2)."""
    if activation == "swiglu":
        return 3
    if activation == "relu":
        return 2
    raise ValueError(f"activation={activation!r}: must be one of swiglu, relu")


def matmul_cost(rows: int, n: int, m: int, convention: str = "flops") -> int:
    """Cost of a (rows x n) @ (n x m) matmul.

    ``"flops"``: 2*rows*n*m (2 per multiply-add). ``"paper"``: rows*m*(2n - 1), the paper's
    scalar multiplications of a bias-free matmul (Section 2.2).
    """
    if convention == "flops":
        return 2 * rows * n * m
    if convention == "paper":
        return rows * m * (2 * n - 1)
    raise ValueError(f"convention={convention!r}: must be one of {', '.join(FLOP_CONVENTIONS)}")


def ffn_params(d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False) -> int:
    """Parameters of a FeedForward d_model -> d_ff -> d_model (nn.Linear w1, [w3,] w2)."""
    n = num_matrices(activation)
    weights = n * d_model * d_ff
    biases = (n - 1) * d_ff + d_model if bias else 0
    return weights + biases


def ffn_cost(tokens: int, d_model: int, d_ff: int, activation: str, convention: str) -> int:
    """Matmul cost of a FeedForward over ``tokens`` rows: (n - 1) up projections, one down."""
    up = (num_matrices(activation) - 1) * matmul_cost(tokens, d_model, d_ff, convention)
    down = matmul_cost(tokens, d_ff, d_model, convention)
    return up + down


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one feed-forward slot, by component (all zero where absent)."""

    head: int = 0
    merge: int = 0
    router: int = 0
    experts: int = 0
    shared: int = 0
    dense: int = 0

    @property
    def total(self) -> int:
        return self.head + self.merge + self.router + self.experts + self.shared + self.dense

    @property
    def head_merge(self) -> int:
        return self.head + self.merge

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def count_params(cfg: FFNConfig) -> ParamCount:
    """Parameters of the module ``build_ffn(cfg)`` builds; ``.total`` == sum of its numel().

    MoE layer: head (d x d [+ d]) and merge (d x d [+ d]) when present, router (E x s, no
    bias), experts n * E * d_e * s (no biases), shared FeedForward(d, shared_d_ff) when set.
    Biases (``bias=True``) exist only on the head/merge and FeedForward nn.Linear layers.
    """
    if isinstance(cfg, DenseConfig):
        return ParamCount(dense=ffn_params(cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias))
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"expected DenseConfig or MoEConfig, got {type(cfg).__name__}")
    d = cfg.d_model
    projection = d * d + (d if cfg.bias else 0)
    return ParamCount(
        head=projection if cfg.has_head else 0,
        merge=projection if cfg.has_merge else 0,
        router=cfg.num_experts * cfg.d_sub,
        experts=num_matrices(cfg.activation) * cfg.num_experts * cfg.d_expert * cfg.d_sub,
        shared=(
            ffn_params(d, cfg.shared_d_ff, cfg.activation, cfg.bias)
            if cfg.shared_d_ff is not None
            else 0
        ),
    )


# ---------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """Forward matmul cost of one feed-forward slot over some tokens, by component.

    ``layer`` is the paper's "active" cost (Eq. 6: head + experts + merge, plus the shared
    expert or the dense FFN); ``router`` (the gate's matmul) and ``combine`` (the weighted sum
    of the k expert outputs of every sub-token) are kept apart; ``total`` adds all.
    """

    head: int = 0
    merge: int = 0
    experts: int = 0
    shared: int = 0
    dense: int = 0
    router: int = 0
    combine: int = 0

    @property
    def layer(self) -> int:
        return self.head + self.merge + self.experts + self.shared + self.dense

    @property
    def total(self) -> int:
        return self.layer + self.router + self.combine

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "layer": self.layer, "total": self.total}


def count_flops(cfg: FFNConfig, tokens: int = 1, *, convention: str = "flops") -> FlopCount:
    """Forward matmul cost of ``build_ffn(cfg)`` over ``tokens`` tokens (see module docstring).

    With dropless routing every sub-token goes to exactly k experts, so the count is exact,
    whatever the routing decisions.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r}: must be a non-negative integer")
    matmul_cost(0, 1, 1, convention)  # validates the convention
    B = tokens
    if isinstance(cfg, DenseConfig):
        return FlopCount(dense=ffn_cost(B, cfg.d_model, cfg.d_ff, cfg.activation, convention))
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"expected DenseConfig or MoEConfig, got {type(cfg).__name__}")
    d, h, s, k = cfg.d_model, cfg.num_heads, cfg.d_sub, cfg.top_k
    units = B * h  # routed sub-tokens
    assignments = units * k  # expert rows: every sub-token visits k experts (dropless)
    # Eq. 6, first and last terms: a d x d projection over B tokens, 2Bd^2 - Bd ("paper").
    projection = matmul_cost(B, d, d, convention)
    # Eq. 6, middle term: ReLU experts cost (4 B d d_e - B d - B d_e h) k in the paper's
    # convention; in general (n - 1) up projections s -> d_e and one down projection d_e -> s
    # for each of the B*h*k (sub-token, expert) pairs.
    experts = ffn_cost(assignments, s, cfg.d_expert, cfg.activation, convention)
    return FlopCount(
        head=projection if cfg.has_head else 0,
        merge=projection if cfg.has_merge else 0,
        experts=experts,
        shared=(
            ffn_cost(B, d, cfg.shared_d_ff, cfg.activation, convention)
            if cfg.shared_d_ff is not None
            else 0
        ),
        # Gate G: R^s -> R^E on every sub-token.
        router=matmul_cost(units, s, cfg.num_experts, convention),
        # y = sum_k G(x)_k Expert_k(x): a (1 x k) @ (k x s) product per sub-token.
        combine=matmul_cost(units, k, s, convention),
    )


def active_multiply_adds(cfg: FFNConfig) -> int:
    """Multiply-adds per token of the layer without router and combine (head/merge included).

    The paper's 4,718,592 for every MoE model of Section 3 (d_model 768).
    """
    return count_flops(cfg, 1).layer // 2


# ---------------------------------------------------------------------------------------------
# torch.utils.flop_counter support for torch._grouped_mm
# ---------------------------------------------------------------------------------------------


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of ``torch._grouped_mm(a, b, offs=...)`` from its shapes.

    * 2D x 3D (rows sorted by group, ``offs`` marks their ends): a (M, K), b (G, K, N):
      every row meets one group's matrix, 2*M*K*N.
    * 3D x 3D (batched): a (G, M, K), b (G, K, N): 2*G*M*K*N.
    * 2D x 2D (groups along K, e.g. weight gradients): a (M, K), b (K, N): 2*M*K*N.
    * 3D x 2D (groups along N): a (G, M, K), b (K, N): 2*M*K*N.
    """
    if len(a_shape) == 3 and len(b_shape) == 3:
        groups, m, k = a_shape
        return 2 * groups * m * k * b_shape[2]
    m, k = a_shape[-2], a_shape[-1]
    return 2 * m * k * b_shape[-1]


def register_grouped_mm_flop_formula() -> bool:
    """Teach ``FlopCounterMode`` to count ``torch.ops.aten._grouped_mm`` (idempotent).

    Without a formula the expert matmuls count as 0 FLOPs. Call before creating the
    ``FlopCounterMode`` (it copies the registry when constructed). Returns whether the op is
    registered now (False when this torch has no ``_grouped_mm``).
    """
    import torch
    from torch.utils import flop_counter

    packet = getattr(torch.ops.aten, "_grouped_mm", None)
    if packet is None:  # pragma: no cover - older torch
        return False
    if packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(packet)(grouped_mm_flops)
    return True


# ---------------------------------------------------------------------------------------------
# The parity planner (paper Section 2.3)
# ---------------------------------------------------------------------------------------------


def deviation_pct(value: float, reference: float) -> float:
    """Relative deviation of ``value`` from ``reference`` in percent (0 when both are 0)."""
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return 100.0 * (value - reference) / reference


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _num_projections(head_layer: bool, merge_layer: bool) -> int:
    return int(bool(head_layer)) + int(bool(merge_layer))


def flops_parity_d_expert(
    smoe: MoEConfig,
    num_heads: int,
    top_k: int,
    *,
    head_layer: bool | None = None,
    merge_layer: bool | None = None,
) -> Fraction:
    """Exact expert hidden size that gives the baseline's active FLOPs per token (Eq. 8).

    Active multiply-adds per token of an MoE layer are p d^2 + n k d d_e (p = number of d x d
    head/merge projections; h sub-tokens x k experts x n s d_e = n k d d_e, independent of h).
    Equating MH-MoE (p', k', d_e') with the baseline (p, k, d_e):

        d_e' = (k d_e - (p' - p) d / n) / k'

    ReLU (n = 2), head + merge (p' = 2), SMoE baseline (p = 0), k' = k: Eq. 8,
    d_mhmoe = d_moe - d / k. SwiGLU (n = 3): d_mhmoe = (k d_moe - 2d/3) / k'.
    Fine-grained SMoE (h = 1, no head/merge): d_e' = k d_e / k'.
    ``head_layer``/``merge_layer`` default to ``num_heads > 1``.
    """
    _check_positive_int("num_heads", num_heads)
    _check_positive_int("top_k", top_k)
    head = num_heads > 1 if head_layer is None else head_layer
    merge = num_heads > 1 if merge_layer is None else merge_layer
    n = num_matrices(smoe.activation)
    d = smoe.d_model
    extra = _num_projections(head, merge) - _num_projections(smoe.has_head, smoe.has_merge)
    # Eq. 8 (generalised): n k' d d_e' + p' d^2 = n k d d_e + p d^2.
    return (Fraction(smoe.top_k * smoe.d_expert) - Fraction(extra * d, n)) / top_k


def params_parity_num_experts(
    smoe: MoEConfig,
    num_heads: int,
    d_expert: int,
    *,
    head_layer: bool | None = None,
    merge_layer: bool | None = None,
    include_router: bool = True,
) -> Fraction:
    """Real-valued expert count that gives the baseline's parameter count (Eq. 9).

    Eq. 9 (ReLU, no router): 2 d d_moe E_moe = 2 d^2 + 2 (d/h) d_mhmoe E_mhmoe; in general
    E' (n s' d_e' [+ s']) + p' (d^2 [+ d]) = E (n s d_e [+ s]) + p (d^2 [+ d]), where the
    bracketed router terms count when ``include_router`` (default: the whole layer's
    parameters are matched). The shared expert is the same on both sides and cancels.
    With ``include_router=False``, d_moe = 4d, k = 1, h = 3 (d_mhmoe = 3d), this gives the
    paper's E_mhmoe = 4 E_moe - 1.
    """
    _check_positive_int("num_heads", num_heads)
    _check_positive_int("d_expert", d_expert)
    d = smoe.d_model
    if d % num_heads != 0:
        raise ValueError(
            f"d_model={d} is not divisible by num_heads={num_heads}: "
            "each token must split into num_heads equal sub-tokens"
        )
    head = num_heads > 1 if head_layer is None else head_layer
    merge = num_heads > 1 if merge_layer is None else merge_layer
    n = num_matrices(smoe.activation)
    s = d // num_heads
    projection = d * d + (d if smoe.bias else 0)
    router = 1 if include_router else 0
    baseline = smoe.num_experts * (n * smoe.d_sub * smoe.d_expert + router * smoe.d_sub)
    baseline += _num_projections(smoe.has_head, smoe.has_merge) * projection
    per_expert = n * s * d_expert + router * s
    # Eq. 9 (generalised), solved for E'.
    return Fraction(baseline - _num_projections(head, merge) * projection, per_expert)


@dataclass(frozen=True)
class ParityPlan:
    """A planned config and how far it is from its baseline.

    ``d_expert_exact`` is the FLOPs-parity hidden size (Eq. 8), ``num_experts_exact`` the
    parameter-parity expert count (Eq. 9); ``config`` holds their integer choices. Deviations
    are in percent of the baseline: ``flops_deviation_pct`` compares the active FLOPs per
    token (head, experts, merge, shared; no router), ``params_deviation_pct`` the whole
    layer's parameters (router included).
    """

    baseline: MoEConfig
    config: MoEConfig
    d_expert_exact: Fraction
    num_experts_exact: Fraction
    round_experts: int
    notes: tuple[str, ...] = field(default=())

    @property
    def d_expert_is_exact(self) -> bool:
        return self.d_expert_exact.denominator == 1

    @property
    def flops_deviation_pct(self) -> float:
        return deviation_pct(count_flops(self.config).layer, count_flops(self.baseline).layer)

    @property
    def router_flops_deviation_pct(self) -> float:
        return deviation_pct(count_flops(self.config).router, count_flops(self.baseline).router)

    @property
    def total_flops_deviation_pct(self) -> float:
        return deviation_pct(count_flops(self.config).total, count_flops(self.baseline).total)

    @property
    def params_deviation_pct(self) -> float:
        return deviation_pct(count_params(self.config).total, count_params(self.baseline).total)

    @property
    def deviations_pct(self) -> dict[str, float]:
        """Every deviation from the baseline, in percent."""
        return {
            "flops": self.flops_deviation_pct,
            "router_flops": self.router_flops_deviation_pct,
            "total_flops": self.total_flops_deviation_pct,
            "params": self.params_deviation_pct,
        }

    def report(self) -> str:
        """A few human-readable lines: the choices made and every deviation."""
        c = self.config
        lines = [
            f"h={c.num_heads} top-{c.top_k}: {c.num_experts} experts x d_expert {c.d_expert} "
            f"(expert input {c.d_sub}), head={c.has_head}, merge={c.has_merge}"
        ]
        lines += list(self.notes)
        lines.append(
            "deviation from baseline: "
            + ", ".join(f"{key} {value:+.2f}%" for key, value in self.deviations_pct.items())
        )
        return "\n".join(lines)


def _format_fraction(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{float(value):.4f}"


def plan_mhmoe(
    smoe: MoEConfig,
    num_heads: int,
    top_k: int | None = None,
    *,
    round_experts: int = 1,
    round_d_expert: int = 1,
    head_layer: bool | None = None,
    merge_layer: bool | None = None,
) -> ParityPlan:
    """Plan an MH-MoE config with the SMoE's active FLOPs and (nearly) its parameters.

    * ``top_k`` (k') defaults to ``num_heads * smoe.top_k``: every token still meets h*k
      experts' worth of sub-token work, as in the paper (h=2 top-2, h=3 top-3 for a top-1 SMoE).
    * ``head_layer``/``merge_layer`` default to ``num_heads > 1``: MH-MoE has both; h = 1 with
      a larger top-k is a fine-grained SMoE (no head/merge, d_expert = k d_moe / k').
    * d_expert from FLOPs parity (``flops_parity_d_expert``, Eq. 8); exact where integral,
      else the nearest integer (ties: the smaller), noted in ``notes``. ``round_d_expert``
      > 1 asks for the nearest multiple instead (e.g. 8 keeps grouped-matmul rows aligned).
    * num_experts: the multiple of ``round_experts`` whose whole-layer parameter count is
      closest to the SMoE's (Eq. 9; ties: the smaller), at least ``top_k``.
    * Everything else (activation, bias, shared expert, router options) is copied.

    Raises ValueError, naming the value and the rule, for impossible requests.
    """
    if not isinstance(smoe, MoEConfig):
        raise TypeError(f"expected an MoEConfig baseline, got {type(smoe).__name__}")
    _check_positive_int("num_heads", num_heads)
    k_new = num_heads * smoe.top_k if top_k is None else top_k
    _check_positive_int("top_k", k_new)
    _check_positive_int("round_experts", round_experts)
    _check_positive_int("round_d_expert", round_d_expert)
    d = smoe.d_model
    if d % num_heads != 0:
        raise ValueError(
            f"d_model={d} is not divisible by num_heads={num_heads}: "
            "each token must split into num_heads equal sub-tokens"
        )
    head = num_heads > 1 if head_layer is None else bool(head_layer)
    merge = num_heads > 1 if merge_layer is None else bool(merge_layer)
    notes: list[str] = []

    # d_expert: FLOPs parity (Eq. 8, generalised).
    d_exact = flops_parity_d_expert(
        smoe, num_heads, k_new, head_layer=head, merge_layer=merge
    )
    if d_exact < 1:
        raise ValueError(
            f"d_expert={_format_fraction(d_exact)} (from FLOPs parity with num_heads={num_heads}, "
            f"top_k={k_new}): must be at least 1; the head/merge layers alone use about as many "
            f"FLOPs as the baseline's experts (lower top_k or switch head/merge off)"
        )
    r = round_d_expert
    low = r * math.floor(d_exact / r)
    d_expert = max(r, low if d_exact - low <= Fraction(r, 2) else low + r)
    if d_expert != d_exact:
        rule = f"nearest multiple of {r}" if r > 1 else "nearest integer"
        notes.append(
            f"d_expert {_format_fraction(d_exact)} for exact FLOPs parity; "
            f"using {d_expert} ({rule})"
        )

    # num_experts: parameter parity (Eq. 9, generalised), rounded to multiples.
    e_exact = params_parity_num_experts(
        smoe, num_heads, d_expert, head_layer=head, merge_layer=merge
    )
    if e_exact <= 0:
        raise ValueError(
            f"num_experts={_format_fraction(e_exact)} (from parameter parity): must be positive; "
            f"the head/merge layers alone hold more parameters than the baseline"
        )
    minimum = round_experts * math.ceil(k_new / round_experts)  # smallest multiple >= top_k
    candidates = {
        max(minimum, round_experts * math.floor(e_exact / round_experts)),
        max(minimum, round_experts * math.ceil(e_exact / round_experts)),
    }
    config = smoe.replace(
        num_heads=num_heads,
        top_k=k_new,
        d_expert=d_expert,
        head_layer=head,
        merge_layer=merge,
        num_experts=minimum,
    )
    target = count_params(smoe).total
    num_experts = min(
        sorted(candidates),
        key=lambda e: abs(count_params(config.replace(num_experts=e)).total - target),
    )
    config = config.replace(num_experts=num_experts)
    if e_exact != num_experts:
        rule = f"nearest multiple of {round_experts}" if round_experts > 1 else "nearest integer"
        if num_experts == minimum and e_exact < minimum:
            rule = f"raised to at least top_k={k_new}"
        notes.append(
            f"num_experts {_format_fraction(e_exact)} for exact parameter parity; "
            f"using {num_experts} ({rule})"
        )
    return ParityPlan(
        baseline=smoe,
        config=config,
        d_expert_exact=d_exact,
        num_experts_exact=e_exact,
        round_experts=round_experts,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------------
# The paper's five models (Section 3), derived from one SMoE config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compared model: its name, its config, and its parity plan (None for dense/smoe)."""

    name: str
    config: FFNConfig
    plan: ParityPlan | None = None

    @property
    def params(self) -> ParamCount:
        return count_params(self.config)

    @property
    def flops(self) -> FlopCount:
        """FLOPs per token (2 per multiply-add, forward)."""
        return count_flops(self.config)


def _check_smoe(smoe: MoEConfig) -> None:
    if not isinstance(smoe, MoEConfig):
        raise TypeError(f"expected an MoEConfig, got {type(smoe).__name__}")
    if smoe.num_heads != 1 or smoe.has_head or smoe.has_merge:
        raise ValueError(
            f"num_heads={smoe.num_heads}, head_layer={smoe.has_head}, "
            f"merge_layer={smoe.has_merge}: the baseline must be a plain SMoE "
            "(num_heads=1, no head/merge layers)"
        )


def plan_variants(
    smoe: MoEConfig,
    round_experts: int = 8,
    *,
    heads: Iterable[int] = (2, 3),
    fine_grained_top_k: int | None = None,
    dense_d_ff: int | None = None,
    round_d_expert: int = 1,
) -> list[Variant]:
    """The compared models derived from one SMoE config, with their parity plans.

    * ``dense``: a DenseConfig with d_ff = ``dense_d_ff`` or k * d_moe, the SMoE's active
      expert FLOPs (2048 for the paper's top-1 SMoE with 2048-wide experts), same activation
      and bias, no shared expert.
    * ``smoe``: the baseline itself.
    * ``fine_grained``: h = 1 without head/merge, top-k ``fine_grained_top_k`` (default 2k).
    * ``mhmoe_h{h}`` for every h in ``heads``: head + merge, top-k h*k.
    Expert counts of planned variants are multiples of ``round_experts`` (8 reproduces the
    paper's 40 and 96); ``round_d_expert`` rounds planned expert hidden sizes likewise.
    """
    _check_smoe(smoe)
    fine_k = 2 * smoe.top_k if fine_grained_top_k is None else fine_grained_top_k
    dense = DenseConfig(
        d_model=smoe.d_model,
        d_ff=smoe.top_k * smoe.d_expert if dense_d_ff is None else dense_d_ff,
        activation=smoe.activation,
        bias=smoe.bias,
    )
    variants = [
        Variant("dense", dense),
        Variant("smoe", smoe),
    ]
    fine = plan_mhmoe(
        smoe, 1, fine_k, round_experts=round_experts, round_d_expert=round_d_expert
    )
    variants.append(Variant("fine_grained", fine.config, fine))
    for h in heads:
        plan = plan_mhmoe(
            smoe, h, round_experts=round_experts, round_d_expert=round_d_expert
        )
        variants.append(Variant(f"mhmoe_h{h}", plan.config, plan))
    return variants


def variants_from_smoe(
    smoe: MoEConfig, round_experts: int = 8, **kwargs
) -> dict[str, FFNConfig]:
    """Configs of the compared models by name (``dense``, ``smoe``, ``fine_grained``,
    ``mhmoe_h2``, ``mhmoe_h3``), derived from ``smoe`` (see ``plan_variants`` for options)."""
    return {v.name: v.config for v in plan_variants(smoe, round_experts, **kwargs)}


def paper_smoe(
    d_model: int = 768,
    *,
    num_experts: int = 8,
    top_k: int = 1,
    d_expert: int | None = None,
    shared_expert: bool = False,
    activation: str = "swiglu",
    bias: bool = False,
    **options,
) -> MoEConfig:
    """The paper's SMoE baseline (Section 3): 8 SwiGLU experts of d_ff (8/3) d_model, top-1.

    d_model 768 gives 8 x 2048 (the paper), 192 gives 8 x 512 (``mini``). ``shared_expert``
    adds one shared expert as wide as a routed expert (the paper's Table 2). ``options`` go to
    MoEConfig (capacity_factor, normalize_top_k, z_loss).
    """
    _check_positive_int("d_model", d_model)
    if d_expert is None:
        if (8 * d_model) % 3 != 0:
            raise ValueError(
                f"d_model={d_model}: the paper's expert d_ff is 8/3 * d_model, which must be an "
                "integer (d_model divisible by 3); pass d_expert explicitly"
            )
        d_expert = 8 * d_model // 3
    return MoEConfig(
        d_model=d_model,
        num_experts=num_experts,
        top_k=top_k,
        d_expert=d_expert,
        shared_d_ff=d_expert if shared_expert else None,
        activation=activation,
        bias=bias,
        **options,
    )


def paper_variants(
    d_model: int = 768, *, round_experts: int = 8, shared_expert: bool = False, **smoe_options
) -> dict[str, FFNConfig]:
    """The paper's five models at ``d_model`` (768: Table 1; 192: the ``mini`` scale).

    With the default ``round_experts=8``: dense d_ff (8/3)d; SMoE 8 x (8/3)d top-1;
    fine-grained 16 x (4/3)d top-2; MH-MoE h=2 40 x d top-2; h=3 96 x (2/3)d top-3.
    """
    smoe = paper_smoe(d_model, shared_expert=shared_expert, **smoe_options)
    return variants_from_smoe(smoe, round_experts)


def preset_smoe(name: str, *, shared_expert: bool = False, **smoe_options) -> MoEConfig:
    """The SMoE baseline of a named preset (``paper``: d_model 768, ``mini``: 192)."""
    if name not in PRESET_D_MODEL:
        raise ValueError(f"preset={name!r}: must be one of {', '.join(PRESET_D_MODEL)}")
    return paper_smoe(PRESET_D_MODEL[name], shared_expert=shared_expert, **smoe_options)


def preset_variants(
    name: str, *, round_experts: int = 8, shared_expert: bool = False, **smoe_options
) -> dict[str, FFNConfig]:
    """The five models of a named preset (``paper`` or ``mini``), by name."""
    smoe = preset_smoe(name, shared_expert=shared_expert, **smoe_options)
    return variants_from_smoe(smoe, round_experts)


__all__ = [
    "FLOP_CONVENTIONS",
    "FlopCount",
    "ParamCount",
    "ParityPlan",
    "PRESET_D_MODEL",
    "VARIANT_NAMES",
    "Variant",
    "active_multiply_adds",
    "count_flops",
    "count_params",
    "deviation_pct",
    "ffn_params",
    "flops_parity_d_expert",
    "grouped_mm_flops",
    "matmul_cost",
    "num_matrices",
    "paper_smoe",
    "paper_variants",
    "params_parity_num_experts",
    "plan_mhmoe",
    "plan_variants",
    "preset_smoe",
    "preset_variants",
    "register_grouped_mm_flop_formula",
    "variants_from_smoe",
]
