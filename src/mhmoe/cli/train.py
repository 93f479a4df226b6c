"""``mhmoe train``: train one language model (a preset's shape, one variant) into a run folder.

    mhmoe train --preset demo --variant mhmoe_h2 --out runs/h2
    mhmoe train --preset demo --variant mhmoe_h2 --out runs/h2 --resume   # continue

The run folder layout is documented in ``mhmoe.runs.checkpoint``. Shared options: ``mhmoe.cli.options``.

On a cluster (docs/reliability.md): SIGTERM or SIGINT finish the current step, write a
checkpoint and exit with status 75 (``mhmoe.runs.preemption.EXIT_PREEMPTED``; continue with
--resume), a second signal aborts at once; checkpoints are also written every --save-minutes
(default 10) and every 10% of the run; one trainer per run folder (an flock on
OUT/.mhmoe.lock; a second one is refused naming the holder's pid). Without --threads the
thread count comes from the load average when the run starts and is recorded for --resume.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from mhmoe.cli.options import (
    VARIANT_HELP,
    add_data_arguments,
    add_distributed_arguments,
    add_training_arguments,
    add_variant_flags,
    positive_int,
    preset_choices,
    run_options_from_args,
    variant_name,
)
from mhmoe.planning.variants import apply_variant_flags
from mhmoe.training.run import run_training


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one model (a preset's shape, one variant) into a run folder",
        description=(
            "Train a decoder-only LM with a Dense, SMoE, fine-grained SMoE or MH-MoE FFN "
            "(MoE in every second block) and write OUT/config.json, OUT/tokenizer.json, "
            "OUT/metrics.jsonl and checkpoints under OUT/checkpoints. The same command with "
            "--resume continues from the latest checkpoint."
        ),
    )
    parser.add_argument("--preset", choices=preset_choices(), default="tiny",
                        help="model/training scale: paper, mini, demo, tiny (default tiny)")
    parser.add_argument("--variant", type=variant_name, default="smoe", metavar="V", help=VARIANT_HELP)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="run folder")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    parser.add_argument("--stop-at-step", type=positive_int, metavar="N",
                        help="checkpoint after step N and exit (continue later with --resume)")
    add_variant_flags(parser)
    add_data_arguments(parser)
    add_training_arguments(parser)
    add_distributed_arguments(parser)
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    spec = apply_variant_flags(
        args.variant,
        shared_expert=args.shared_expert,
        head_merge=args.head_merge,
        no_head_layer=args.no_head_layer,
        no_merge_layer=args.no_merge_layer,
    )
    options = run_options_from_args(args, variant=spec.name, resume=args.resume, stop_at_step=args.stop_at_step)
    main_rank = int(os.environ.get("RANK") or 0) == 0  # torchrun: rank 0 speaks for the job
    if not main_rank:
        logging.getLogger().setLevel(logging.WARNING)
    result = run_training(options)
    if not main_rank:
        return 0
    loop = result.loop
    final = loop.evals.get(loop.step, {})
    summary = ", ".join(f"{name} ppl {r.ppl:.2f}" for name, r in final.items())
    loss = f"{loop.last_loss:.4f}" if loop.last_loss is not None else "n/a"
    state = "finished" if loop.finished else "stopped"
    print(f"{result.config['variant']}: {state} at step {loop.step} ({loop.tokens:,} tokens), "
          f"loss {loss}{'; ' + summary if summary else ''} -> {result.run_dir}")
    return 0
