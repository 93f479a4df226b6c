"""The variant catalogue: the one source of variant names, and the compared models derived
from one SMoE config by the planner (paper Section 3).

Variant names. A variant is a base name plus optional suffixes, separated by dots:

* bases: ``dense``, ``smoe``, ``fine_grained``, ``mhmoe_h<N>`` (N >= 2; the paper's are h=2
  and h=3; N must divide d_model);
* ``.shared``: a shared SwiGLU expert as wide as the SMoE expert (paper Table 2);
* head/merge ablations (paper Tables 4-5): on ``smoe``/``fine_grained`` ``.head_merge`` adds
  both layers (``.head``, ``.merge`` one of them); on ``mhmoe_h<N>`` ``.no_head``,
  ``.no_merge`` and ``.no_head_merge`` remove them. The experts stay those of the base
  variant, as in the paper.

``canonical_variant_name`` orders the suffixes, so ``mhmoe_h2.no_merge.shared`` and
``mhmoe_h2.shared.no_merge`` are one run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable

from mhmoe import checks
from mhmoe.config import DenseConfig, FFNConfig, MoEConfig
from mhmoe.planning.counts import FlopCount, ParamCount, count_flops, count_params
from mhmoe.planning.planner import ParityPlan, plan_mhmoe

PAPER_VARIANTS = ("dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3")
"""The five models of the paper's Table 1, in its order."""


BASE_VARIANTS = ("dense", "smoe", "fine_grained", "mhmoe_h<N>")


_BASE_PATTERN = re.compile(r"^(dense|smoe|fine_grained|mhmoe_h([0-9]+))$")


_H1_SUFFIXES = {"head_merge": (True, True), "head": (True, False), "merge": (False, True)}


_MH_SUFFIXES = {"no_head_merge": (False, False), "no_head": (False, True), "no_merge": (True, False)}


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant name: the base, a shared expert, and the head/merge layers.

    ``head_layer``/``merge_layer`` None means the base's default (MH-MoE both, SMoE neither).
    """

    base: str
    shared_expert: bool = False
    head_layer: bool | None = None
    merge_layer: bool | None = None

    @property
    def num_heads(self) -> int:
        match = _BASE_PATTERN.match(self.base)
        assert match is not None
        return int(match.group(2)) if match.group(2) else 1

    @property
    def is_dense(self) -> bool:
        return self.base == "dense"

    @property
    def has_head(self) -> bool:
        return self.num_heads > 1 if self.head_layer is None else self.head_layer

    @property
    def has_merge(self) -> bool:
        return self.num_heads > 1 if self.merge_layer is None else self.merge_layer

    @property
    def name(self) -> str:
        return canonical_variant_name(self)


def parse_variant(name: str) -> VariantSpec:
    """Parse a variant name (module docstring); ValueError naming the value and the rule."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"variant {name!r}: must be a non-empty name such as 'smoe' or 'mhmoe_h2'")
    base, *suffixes = name.split(".")
    match = _BASE_PATTERN.match(base)
    if match is None:
        raise ValueError(
            f"unknown variant {name!r}: the base must be one of dense, smoe, fine_grained, "
            "mhmoe_h<N> (e.g. mhmoe_h2, mhmoe_h3)"
        )
    num_heads = int(match.group(2)) if match.group(2) else 1
    if match.group(2) and num_heads < 2:
        raise ValueError(f"variant {name!r}: MH-MoE needs N >= 2 heads in mhmoe_h<N> (h=1 is smoe)")
    spec = VariantSpec(base)
    allowed = _MH_SUFFIXES if num_heads > 1 else _H1_SUFFIXES
    seen_layers = False
    for suffix in suffixes:
        if suffix == "shared":
            if spec.shared_expert:
                raise ValueError(f"variant {name!r}: suffix 'shared' given twice")
            if base == "dense":
                raise ValueError(f"variant {name!r}: a shared expert needs an MoE variant, not dense")
            spec = dataclasses.replace(spec, shared_expert=True)
        elif suffix in allowed and base != "dense":
            if seen_layers:
                raise ValueError(f"variant {name!r}: give at most one head/merge suffix")
            seen_layers = True
            head, merge = allowed[suffix]
            spec = dataclasses.replace(spec, head_layer=head, merge_layer=merge)
        else:
            valid = ["shared"] + ([] if base == "dense" else list(allowed))
            raise ValueError(
                f"variant {name!r}: unknown suffix {suffix!r} for {base}; valid suffixes: "
                + ", ".join(f".{s}" for s in valid)
            )
    return spec


def canonical_variant_name(spec: VariantSpec) -> str:
    """The name of a spec with its suffixes in canonical order (layers, then shared)."""
    parts = [spec.base]
    layers = (spec.has_head, spec.has_merge)
    if spec.num_heads > 1:
        for suffix, value in _MH_SUFFIXES.items():
            if layers == value:
                parts.append(suffix)
    elif not spec.is_dense:
        for suffix, value in _H1_SUFFIXES.items():
            if layers == value:
                parts.append(suffix)
    if spec.shared_expert:
        parts.append("shared")
    return ".".join(parts)


def apply_variant_flags(
    name: str,
    *,
    shared_expert: bool = False,
    head_merge: bool = False,
    no_head_layer: bool = False,
    no_merge_layer: bool = False,
) -> VariantSpec:
    """The spec of ``name`` with the CLI's ``--shared-expert``, ``--head-merge``,
    ``--no-head-layer`` and ``--no-merge-layer`` applied (ValueError where they do not fit)."""
    spec = parse_variant(name)
    if shared_expert:
        if spec.is_dense:
            raise ValueError("--shared-expert: needs an MoE variant (not dense)")
        spec = dataclasses.replace(spec, shared_expert=True)
    if head_merge:
        if spec.is_dense or spec.num_heads > 1:
            raise ValueError(
                f"--head-merge: adds head and merge layers to smoe or fine_grained, not {spec.base} "
                "(MH-MoE has them already)"
            )
        spec = dataclasses.replace(spec, head_layer=True, merge_layer=True)
    for flag, attr, present in (
        ("--no-head-layer", "head_layer", no_head_layer),
        ("--no-merge-layer", "merge_layer", no_merge_layer),
    ):
        if present:
            if spec.is_dense:
                raise ValueError(f"{flag}: needs an MoE variant (not dense)")
            current = spec.has_head if attr == "head_layer" else spec.has_merge
            if not current:
                raise ValueError(f"{flag}: variant {spec.name!r} has no such layer to remove")
            spec = dataclasses.replace(spec, **{attr: False})
    if spec.head_layer is not None and spec.head_layer == (spec.num_heads > 1) and \
            spec.merge_layer == (spec.num_heads > 1):
        spec = dataclasses.replace(spec, head_layer=None, merge_layer=None)
    return spec


def variant_label(name: str) -> str:
    """A human-readable label for tables: 'MH-MoE h=2 (head only, shared expert)'."""
    spec = parse_variant(name)
    base = {"dense": "Dense", "smoe": "SMoE", "fine_grained": "Fine-grained SMoE"}.get(
        spec.base, f"MH-MoE h={spec.num_heads}"
    )
    notes = []
    if not spec.is_dense:
        layers = (spec.has_head, spec.has_merge)
        if spec.num_heads > 1:
            notes.append({(True, True): "", (False, False): "no head/merge",
                          (True, False): "head only", (False, True): "merge only"}[layers])
        else:
            notes.append({(False, False): "", (True, True): "+ head & merge",
                          (True, False): "+ head", (False, True): "+ merge"}[layers])
    if spec.shared_expert:
        notes.append("shared expert")
    notes = [n for n in notes if n]
    return f"{base} ({', '.join(notes)})" if notes else base


def ablation_variants(shared_expert: bool = False) -> list[str]:
    """The paper's head & merge ablation (Tables 4 and 5), in their order."""
    names = [
        "smoe", "smoe.head_merge",
        "fine_grained", "fine_grained.head_merge",
        "mhmoe_h2.no_head_merge", "mhmoe_h2.no_merge", "mhmoe_h2.no_head", "mhmoe_h2",
    ]
    if shared_expert:
        names = [f"{n}.shared" for n in names]
    return names


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
    MoEConfig (capacity_factor, normalize_top_k, capacity_priority, load_balancing, ...).
    """
    checks.positive_int("d_model", d_model)
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


