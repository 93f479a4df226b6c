"""``mhmoe parity``: the compared models side by side, with their parameter and FLOP parity.

    mhmoe parity --preset paper                 # the paper's five models (d_model 768)
    mhmoe parity --preset mini --json           # the same at d_model 192, as JSON
    mhmoe parity --d-model 512 --d-ff 1408 --experts 16 --top-k 2 --heads 2 4

Rows: dense, the SMoE baseline, fine-grained SMoE and MH-MoE for every requested head count,
each planned from the SMoE by ``mhmoe.plan_mhmoe``. Counts are per MoE layer; FLOPs are
2 per multiply-add, forward, per token; "active" FLOPs are head + experts + merge (+ shared
expert), the router's matmul is reported apart. Deviations are relative to the SMoE.
"""

from __future__ import annotations

import argparse
import json

from mhmoe.cli import CLIError
from mhmoe.config import ACTIVATIONS, MoEConfig
from mhmoe.planning.planner import deviation_pct, plan_mhmoe
from mhmoe.planning.variants import Variant, paper_smoe, plan_variants
from mhmoe.training.presets import get_preset, preset_names

DEFAULT_ROUND_EXPERTS = 8
"""Expert counts rounded to multiples of 8, as the paper (40, 96); --round-experts 1 for the
closest integer."""

_FREE_FORM = ("d_model", "d_ff", "experts", "top_k")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "parity",
        help="parameter/FLOP parity of dense, SMoE, fine-grained SMoE and MH-MoE layers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=preset_names(),
        help="the SMoE baseline of a preset: paper (d_model 768, 8 x 2048 top-1), mini (192, 8 x 512), ...; "
        "the default when no --d-model/--d-ff/--experts/--top-k is given is paper",
    )
    p.add_argument("--d-model", type=int, help="free-form baseline: model width d")
    p.add_argument("--d-ff", type=int, help="free-form baseline: SMoE expert hidden size d_moe")
    p.add_argument("--experts", type=int, help="free-form baseline: SMoE number of experts")
    p.add_argument("--top-k", type=int, help="free-form baseline: SMoE top-k")
    p.add_argument(
        "--heads",
        type=int,
        nargs="+",
        default=[2, 3],
        help="MH-MoE head counts to plan (default: 2 3); impossible ones are reported and skipped",
    )
    p.add_argument(
        "--fine-grained-top-k",
        type=int,
        help="top-k of the fine-grained SMoE (default: 2 x the SMoE's top-k)",
    )
    p.add_argument("--activation", choices=ACTIVATIONS, default="swiglu")
    p.add_argument("--bias", action="store_true", help="biases on head/merge and shared FFN")
    shared = p.add_mutually_exclusive_group()
    shared.add_argument("--shared-d-ff", type=int, help="add a shared expert of this d_ff")
    shared.add_argument(
        "--shared-expert",
        action="store_true",
        help="add a shared expert as wide as an SMoE expert (the paper's Table 2)",
    )
    p.add_argument(
        "--round-experts",
        type=int,
        default=DEFAULT_ROUND_EXPERTS,
        help=f"planned expert counts are multiples of this (default {DEFAULT_ROUND_EXPERTS}, "
        "as the paper's 40 and 96)",
    )
    p.add_argument(
        "--round-d-expert",
        type=int,
        default=1,
        help="planned expert hidden sizes are the nearest multiple of this when FLOPs parity "
        "is not integral (default 1)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _baseline(args: argparse.Namespace) -> tuple[str, MoEConfig]:
    given = [name for name in _FREE_FORM if getattr(args, name) is not None]
    if args.preset is not None and given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise CLIError(f"--preset {args.preset} cannot be combined with {flags}")
    if given and len(given) < len(_FREE_FORM):
        missing = ", ".join(
            "--" + name.replace("_", "-") for name in _FREE_FORM if name not in given
        )
        raise CLIError(f"a free-form baseline needs {missing} as well")
    if args.shared_d_ff is not None and args.shared_d_ff < 1:
        raise CLIError(f"--shared-d-ff={args.shared_d_ff}: must be a positive integer")
    if given:
        smoe = MoEConfig(
            d_model=args.d_model,
            num_experts=args.experts,
            top_k=args.top_k,
            d_expert=args.d_ff,
            activation=args.activation,
            bias=args.bias,
        )
        if args.shared_expert:
            smoe = smoe.replace(shared_d_ff=smoe.d_expert)
        label = "free-form"
    else:
        preset = args.preset or "paper"
        smoe = paper_smoe(
            get_preset(preset).d_model, shared_expert=args.shared_expert, activation=args.activation,
            bias=args.bias,
        )
        label = f"preset {preset}"
    if args.shared_d_ff is not None:
        smoe = smoe.replace(shared_d_ff=args.shared_d_ff)
    return label, smoe


def _plan(
    args: argparse.Namespace, smoe: MoEConfig
) -> tuple[list[Variant], list[dict]]:
    if args.round_experts < 1:
        raise CLIError(f"--round-experts={args.round_experts}: must be a positive integer")
    if args.round_d_expert < 1:
        raise CLIError(f"--round-d-expert={args.round_d_expert}: must be a positive integer")
    if args.fine_grained_top_k is not None and args.fine_grained_top_k < 1:
        raise CLIError(
            f"--fine-grained-top-k={args.fine_grained_top_k}: must be a positive integer"
        )
    variants = plan_variants(
        smoe,
        args.round_experts,
        heads=(),
        fine_grained_top_k=args.fine_grained_top_k,
        round_d_expert=args.round_d_expert,
    )
    skipped = []
    for h in dict.fromkeys(args.heads):  # keep order, drop repeats
        if h < 1:
            raise CLIError(f"--heads {h}: must be a positive integer")
        try:
            plan = plan_mhmoe(
                smoe, h, round_experts=args.round_experts, round_d_expert=args.round_d_expert
            )
        except ValueError as err:
            skipped.append({"name": f"mhmoe_h{h}", "num_heads": h, "reason": str(err)})
            continue
        variants.append(Variant(f"mhmoe_h{h}", plan.config, plan))
    return variants, skipped


def _row(variant: Variant, reference: Variant) -> dict:
    cfg = variant.config
    params, flops = variant.params, variant.flops
    ref_params, ref_flops = reference.params, reference.flops
    moe = isinstance(cfg, MoEConfig)
    row = {
        "name": variant.name,
        "kind": cfg.kind,
        "num_heads": cfg.num_heads if moe else 1,
        "num_experts": cfg.num_experts if moe else None,
        "top_k": cfg.top_k if moe else None,
        "d_expert": cfg.d_expert if moe else cfg.d_ff,
        "d_expert_input": cfg.d_sub if moe else cfg.d_model,
        "head_layer": cfg.has_head if moe else False,
        "merge_layer": cfg.has_merge if moe else False,
        "shared_d_ff": cfg.shared_d_ff if moe else None,
        "activation": cfg.activation,
        "moe_layer_params": params.total,
        "expert_params": params.experts,
        "head_merge_params": params.head_merge,
        "router_params": params.router,
        "moe_layer_flops_per_token": flops.layer,
        "router_flops_per_token": flops.router,
        "combine_flops_per_token": flops.combine,
        "active_multiply_adds_per_token": flops.layer // 2,
        "flops_deviation_pct": deviation_pct(flops.layer, ref_flops.layer),
        "params_deviation_pct": deviation_pct(params.total, ref_params.total),
    }
    if variant.plan is not None:
        row["d_expert_exact"] = float(variant.plan.d_expert_exact)
        row["num_experts_exact"] = float(variant.plan.num_experts_exact)
        row["notes"] = list(variant.plan.notes)
    return row


def _table(rows: list[dict]) -> str:
    def dash(value) -> str:
        return "-" if value is None else str(value)

    columns = [
        ("variant", lambda r: r["name"], "<"),
        ("heads", lambda r: dash(r["num_heads"] if r["kind"] == "moe" else None), ">"),
        ("experts", lambda r: dash(r["num_experts"]), ">"),
        ("top-k", lambda r: dash(r["top_k"]), ">"),
        ("expert d_ff", lambda r: str(r["d_expert"]), ">"),
        ("expert input", lambda r: str(r["d_expert_input"]), ">"),
        ("head/merge", lambda r: f"{'yes' if r['head_layer'] else 'no'}/"
         f"{'yes' if r['merge_layer'] else 'no'}", ">"),
        ("params/layer", lambda r: f"{r['moe_layer_params']:,}", ">"),
        ("active FLOPs/token", lambda r: f"{r['moe_layer_flops_per_token']:,}", ">"),
        ("router FLOPs/token", lambda r: f"{r['router_flops_per_token']:,}", ">"),
        ("FLOPs vs smoe", lambda r: f"{r['flops_deviation_pct']:+.2f}%", ">"),
        ("params vs smoe", lambda r: f"{r['params_deviation_pct']:+.2f}%", ">"),
    ]
    cells = [[title for title, _, _ in columns]]
    cells += [[fmt(row) for _, fmt, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = []
    for line in cells:
        lines.append(
            "  ".join(
                f"{text:{align}{width}}"
                for text, width, (_, _, align) in zip(line, widths, columns)
            ).rstrip()
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    label, smoe = _baseline(args)
    variants, skipped = _plan(args, smoe)
    reference = next(v for v in variants if v.name == "smoe")
    rows = [_row(v, reference) for v in variants]
    if args.json:
        print(
            json.dumps(
                {
                    "baseline": label,
                    "d_model": smoe.d_model,
                    "activation": smoe.activation,
                    "round_experts": args.round_experts,
                    "round_d_expert": args.round_d_expert,
                    "flops_convention": "2 FLOPs per multiply-add, forward, per token; "
                    "router and combine counted separately",
                    "variants": rows,
                    "skipped": skipped,
                },
                indent=2,
            )
        )
        return 0
    shared = f", shared expert d_ff {smoe.shared_d_ff}" if smoe.shared_d_ff else ""
    print(
        f"MoE-layer parity ({label}): d_model {smoe.d_model}, {smoe.activation} experts{shared}, "
        f"planned expert counts rounded to multiples of {args.round_experts}"
    )
    print(
        "per MoE layer; FLOPs = 2 per multiply-add, forward, per token; active = head + experts "
        "+ merge (+ shared); router apart"
    )
    print()
    print(_table(rows))
    notes = [f"{row['name']}: {note}" for row in rows for note in row.get("notes", ())]
    notes += [f"{item['name']}: skipped: {item['reason']}" for item in skipped]
    if notes:
        print()
        print("notes:")
        for note in notes:
            print(f"  {note}")
    return 0
