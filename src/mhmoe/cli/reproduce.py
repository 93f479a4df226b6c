"""``mhmoe reproduce``: train the compared variants and write the paper-style table and plot.

    mhmoe reproduce --preset demo --out runs/demo                 # Table 1, a few minutes on a CPU
    mhmoe reproduce --preset demo --shared-expert --out runs/t2   # Table 2
    mhmoe reproduce --preset demo --ablation head-merge --out runs/t45   # Tables 4-5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mhmoe.cli.options import (
    add_data_arguments,
    add_training_arguments,
    non_negative_int,
    positive_int,
    preset_choices,
    run_options_from_args,
    variant_name,
)
from mhmoe.training.reproduce import ReproduceOptions, reproduce


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reproduce",
        help="train Dense, SMoE, fine-grained SMoE, MH-MoE h=2/h=3 and write the paper's table",
        description=(
            "Train the paper's compared variants under one token budget, seeds, schedule and "
            "data (tokenized once), evaluate perplexity at 50%% and 100%% of the budget and "
            "write OUT/results.md, OUT/results.json and OUT/loss.png. Rerunning continues "
            "unfinished runs."
        ),
    )
    parser.add_argument("--preset", choices=preset_choices(), default="demo",
                        help="scale: paper, mini (~1 h on 2 CPU cores), demo (minutes), tiny (default demo)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.add_argument("--variants", nargs="+", type=variant_name, metavar="V",
                        help="variants to compare (default: dense smoe fine_grained mhmoe_h2 mhmoe_h3)")
    parser.add_argument("--seeds", type=positive_int, default=1, metavar="N",
                        help="train every variant with N seeds; the table shows mean ± std (default 1)")
    parser.add_argument("--seed", type=non_negative_int, default=0, metavar="S",
                        help="first seed (seeds S .. S+N-1; default 0)")
    parser.add_argument("--shared-expert", action="store_true",
                        help="give every MoE variant a shared expert (paper Table 2)")
    parser.add_argument("--ablation", choices=("head-merge",),
                        help="head-merge: SMoE/fine-grained +- head&merge, MH-MoE h=2 none/head/merge/both (Tables 4-5)")
    parser.add_argument("--eval-points", type=positive_int, default=4, metavar="N",
                        help="evaluate at N evenly spaced points for the curves (always 50%% and 100%%; default 4)")
    parser.add_argument("--summarize-only", action="store_true",
                        help="train nothing: write the tables from the runs under --out that have finished "
                             "(the others are left out, with a warning)")
    add_data_arguments(parser)
    add_training_arguments(parser, single_run=False)
    parser.set_defaults(func=run_reproduce)


def run_reproduce(args: argparse.Namespace) -> int:
    template = run_options_from_args(args, out=args.out, variant="smoe", quiet=args.quiet)
    options = ReproduceOptions(
        out=args.out,
        run=template,
        variants=args.variants,
        seeds=args.seeds,
        first_seed=args.seed,
        shared_expert=args.shared_expert,
        ablation=args.ablation,
        eval_points=args.eval_points,
        summarize_only=args.summarize_only,
    )
    results = reproduce(options)
    print((Path(args.out) / "results.md").read_text(encoding="utf-8"), end="")
    print(f"\nwrote {args.out}/results.md, results.json, loss.png in {results['wall_time_s']:.0f} s")
    return 0
