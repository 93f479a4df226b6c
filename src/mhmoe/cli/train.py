"""``mhmoe train``: train one language model (a preset's shape, one variant) into a run folder.

    mhmoe train --preset demo --variant mhmoe_h2 --out runs/h2
    mhmoe train --preset demo --variant mhmoe_h2 --out runs/h2 --resume   # continue

The run folder layout is documented in ``mhmoe.runs.checkpoint``. The argument helpers here are
shared with ``mhmoe eval`` and ``mhmoe reproduce``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from mhmoe.cli import CLIError
from mhmoe.data import parse_eval_spec
from mhmoe.planning.variants import apply_variant_flags
from mhmoe.planning.variants import parse_variant
from mhmoe.training.presets import preset_names
from mhmoe.training.run import RunOptions
from mhmoe.training.run import run_training

VARIANT_HELP = (
    "dense, smoe, fine_grained, mhmoe_h2, mhmoe_h3 (any mhmoe_h<N>), optionally with suffixes "
    ".shared, .head_merge (smoe/fine_grained), .no_head / .no_merge / .no_head_merge (MH-MoE)"
)


# ---------------------------------------------------------------------------------------------
# Argument types: each names the value and the rule it breaks
# ---------------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (must be a positive integer)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive integer (>= 1)")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer (must be >= 0)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a non-negative integer")
    return value


def token_count(text: str) -> int:
    """A positive integer, with optional k/M/B suffix (e.g. 200k, 1.5M)."""
    multipliers = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
    raw = text.strip().replace("_", "")
    factor = 1
    if raw and raw[-1].lower() in multipliers:
        factor = multipliers[raw[-1].lower()]
        raw = raw[:-1]
    try:
        value = float(raw) * factor
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count (a positive integer, optionally with k, M or B: 200k, 1.5M)"
        ) from None
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive whole number of tokens")
    return int(value)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (must be > 0)") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number > 0")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (must be >= 0)") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number >= 0")
    return value


def fraction_0_1(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (must be in [0, 1))") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be in [0, 1)")
    return value


def variant_name(text: str) -> str:

    try:
        return parse_variant(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def eval_spec(text: str) -> tuple[str, str]:

    try:
        return parse_eval_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def collect_eval_specs(pairs: list[tuple[str, str]] | None) -> dict[str, str]:
    specs: dict[str, str] = {}
    for name, path in pairs or []:
        if name in specs:
            raise CLIError(f"--eval {name}={path}: the name {name!r} is already used by --eval {name}={specs[name]}")
        specs[name] = path
    return specs


def flatten(groups: list[list[str]] | None) -> list[str]:
    return [item for group in groups or [] for item in group]


def preset_choices() -> list[str]:

    return list(preset_names())


# ---------------------------------------------------------------------------------------------
# Shared argument groups
# ---------------------------------------------------------------------------------------------


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", action="append", nargs="+", metavar="PATH",
        help="training text: 'stdlib' (default, the Python standard library source, no download), "
             "files/folders of .txt/.jsonl/.parquet, or hf:NAME[:CONFIG][:SPLIT]; repeatable",
    )
    group.add_argument(
        "--eval", action="append", type=eval_spec, metavar="NAME=PATH",
        help="an evaluation set (repeatable); default: a held-out split of the training documents",
    )
    group.add_argument("--tokenizer", type=Path, metavar="FILE",
                       help="use this tokenizer.json instead of training a byte-level BPE")
    group.add_argument("--vocab-size", type=positive_int, metavar="N",
                       help="vocabulary of the trained tokenizer (default: the preset's)")
    group.add_argument("--data-dir", type=Path, metavar="DIR",
                       help="folder for the tokenizer and token caches (default: OUT/data); reused when valid")
    group.add_argument("--heldout-fraction", type=fraction_0_1, default=0.05, metavar="F",
                       help="share of training documents held out for evaluation when no --eval is given (default 0.05)")
    group.add_argument("--max-train-bytes", type=positive_int, metavar="N",
                       help="cap on the training text read (default: the preset's)")


def add_training_arguments(parser: argparse.ArgumentParser, single_run: bool = True) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--tokens", type=token_count, metavar="N",
                       help="training-token budget (e.g. 200k, 1.5M; default: the preset's); evaluations at 50%% and 100%%")
    if single_run:
        group.add_argument("--max-steps", type=positive_int, metavar="N",
                           help="number of optimiser steps (instead of --tokens)")
        group.add_argument("--seed", type=non_negative_int, default=0, metavar="S", help="random seed (default 0)")
    group.add_argument("--batch-size", type=positive_int, metavar="N", help="sequences per optimiser step")
    group.add_argument("--micro-batch-size", type=positive_int, metavar="N",
                       help="sequences per forward pass (gradient accumulation up to --batch-size)")
    group.add_argument("--seq-len", type=positive_int, metavar="N", help="tokens per sequence")
    group.add_argument("--lr", type=positive_float, metavar="LR", help="peak learning rate")
    group.add_argument("--warmup-steps", type=non_negative_int, metavar="N",
                       help="linear warmup steps (default: the preset's, at most 10%% of the steps)")
    group.add_argument("--bitnet", action="store_true",
                       help="train as BitNet b1.58: ternary weights, 8-bit activations in attention, "
                            "dense FFNs, experts, head/merge; embeddings, LM head, router full precision "
                            "(paper Table 3; mhmoe.quant)")
    group.add_argument("--schedule", choices=("polynomial", "cosine", "constant", "two-stage"), default="polynomial",
                       help="decay after warmup (default polynomial, power 1, as the authors' scripts)")
    group.add_argument("--weight-decay", type=non_negative_float, default=0.01, metavar="W", help="AdamW weight decay (default 0.01)")
    group.add_argument("--clip-grad-norm", type=positive_float, default=2.0, metavar="C", help="gradient-norm clip (default 2.0)")
    group.add_argument("--load-balancing-weight", type=non_negative_float, default=0.01, metavar="W",
                       help="weight of the load-balancing loss (default 0.01, the authors' scripts)")
    group.add_argument("--z-loss-weight", type=non_negative_float, default=0.0, metavar="W",
                       help="weight of the router z-loss (default 0)")
    group.add_argument("--eval-tokens", type=positive_int, metavar="N",
                       help="evaluate at most N tokens of each set (default: the preset's)")
    group.add_argument("--eval-every", type=positive_int, metavar="N", help="also evaluate every N steps")
    group.add_argument("--save-every", type=positive_int, metavar="N",
                       help="also checkpoint every N steps (always at evaluations and the end)")
    group.add_argument("--keep-checkpoints", type=positive_int, default=2, metavar="N",
                       help="periodic checkpoints to keep (evaluation and final ones are always kept; default 2)")
    group.add_argument("--max-skipped-steps", type=positive_int, default=5, metavar="N",
                       help="stop after N consecutive steps with a non-finite loss or gradient (each is "
                            "skipped: no update; default 5; docs/reliability.md)")
    group.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="auto (default): bf16 autocast on GPU, fp32 on CPU")
    group.add_argument("--threads", type=positive_int, metavar="N", help="torch CPU threads (default: all usable cores)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")


def add_variant_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("variant options")
    group.add_argument("--shared-expert", action="store_true",
                       help="add a shared SwiGLU expert as wide as the SMoE expert (paper Table 2)")
    group.add_argument("--head-merge", action="store_true",
                       help="add head and merge layers to smoe / fine_grained (paper Table 4)")
    group.add_argument("--no-head-layer", action="store_true", help="MH-MoE without the head layer (paper Table 5)")
    group.add_argument("--no-merge-layer", action="store_true", help="MH-MoE without the merge layer (paper Table 5)")


def run_options_from_args(args: argparse.Namespace, **overrides):
    """RunOptions from parsed ``train``/``reproduce`` arguments."""

    fields = dict(
        out=args.out,
        preset=args.preset,
        data=flatten(args.data) or ["stdlib"],
        eval=collect_eval_specs(args.eval),
        tokenizer=args.tokenizer,
        data_dir=args.data_dir,
        vocab_size=args.vocab_size,
        heldout_fraction=args.heldout_fraction,
        max_train_bytes=args.max_train_bytes,
        tokens=args.tokens,
        max_steps=getattr(args, "max_steps", None),
        seed=getattr(args, "seed", 0),
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        clip_grad_norm=args.clip_grad_norm,
        bitnet=args.bitnet,
        load_balancing_weight=args.load_balancing_weight,
        z_loss_weight=args.z_loss_weight,
        eval_tokens=args.eval_tokens,
        eval_every=args.eval_every,
        save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        max_skipped_steps=getattr(args, "max_skipped_steps", 5),
        quiet=args.quiet,
        tensorboard=args.tensorboard,
        dp=getattr(args, "dp", None),
        ep=getattr(args, "ep", 1),
        command=["mhmoe", *sys.argv[1:]] if sys.argv and Path(sys.argv[0]).name == "mhmoe" else None,
    )
    fields.update(overrides)
    return RunOptions(**fields)


# ---------------------------------------------------------------------------------------------
# mhmoe train
# ---------------------------------------------------------------------------------------------


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


def add_distributed_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "distributed (under torchrun, docs/distributed.md)",
        "torchrun --nproc_per_node N -m mhmoe.cli train ...: --batch-size stays the global batch",
    )
    group.add_argument("--dp", choices=("ddp", "fsdp"),
                       help="data parallelism when WORLD_SIZE > 1: ddp (default) replicates the model, "
                            "fsdp shards parameters, gradients and optimiser state (FSDP2)")
    group.add_argument("--ep", type=positive_int, default=1, metavar="N",
                       help="expert-parallel size: each rank holds 1/N of every MoE layer's experts "
                            "(N divides the process count and the expert count; default 1)")


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
