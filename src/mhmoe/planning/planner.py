"""The FLOPs/parameter parity planner (paper Section 2.2, Eq. 8-10).

``plan_mhmoe`` turns an SMoE config into an MH-MoE (or fine-grained SMoE) config with the same
active FLOPs per token (Eq. 8, generalised to SwiGLU and to any top-k) and the closest
parameter count (Eq. 9), and reports every remaining deviation. Notation: ``mhmoe.planning.counts``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from mhmoe import checks
from mhmoe.config import MoEConfig
from mhmoe.planning.counts import count_flops, count_params, num_matrices


def deviation_pct(value: float, reference: float) -> float:
    """Relative deviation of ``value`` from ``reference`` in percent (0 when both are 0)."""
    if reference == 0:
        return 0.0 if value == 0 else math.inf
    return 100.0 * (value - reference) / reference




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
    checks.positive_int("num_heads", num_heads)
    checks.positive_int("top_k", top_k)
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
    checks.positive_int("num_heads", num_heads)
    checks.positive_int("d_expert", d_expert)
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
    checks.positive_int("num_heads", num_heads)
    k_new = num_heads * smoe.top_k if top_k is None else top_k
    checks.positive_int("top_k", k_new)
    checks.positive_int("round_experts", round_experts)
    checks.positive_int("round_d_expert", round_d_expert)
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
