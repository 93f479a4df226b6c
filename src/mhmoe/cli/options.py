"""The argument types and option groups that several subcommands share (``train``,
``reproduce``, ``eval``, ``generate``, ``prepare-data``): one definition per option. Each type
names the value and the rule it breaks (argparse then exits 2 with that line)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

from mhmoe.config import BITNET_FULL_PRECISION, LOAD_BALANCING
from mhmoe.data.splits import DEFAULT_HELDOUT_FRACTION, parse_eval_spec, parse_eval_specs
from mhmoe.data.tokenizer import DEFAULT_SAMPLE_BYTES
from mhmoe.planning.variants import parse_variant
from mhmoe.runtime import THREADS_PER_CORE_LIMIT, check_threads
from mhmoe.training.config import COMPILE_BACKENDS
from mhmoe.training.presets import preset_names
from mhmoe.training.run import RunOptions

DEFAULT_VOCAB_SIZE = 8192
"""Vocabulary of ``prepare-data``'s tokenizer when no --vocab-size is given (runs use the preset's)."""


VARIANT_HELP = (
    "dense, smoe, fine_grained, mhmoe_h2, mhmoe_h3 (any mhmoe_h<N>), optionally with suffixes "
    ".shared, .head_merge (smoe/fine_grained), .no_head / .no_merge / .no_head_merge (MH-MoE)"
)


def _argument_type(name: str, cast, kind: str, short_rule: str, rule: str, ok):
    """An argparse type: ``cast`` the text, then check ``ok(value)``; both failures name the
    text and the rule."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind} (must be {short_rule})") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {rule}")
        return value

    parse.__name__ = name  # argparse names the type in its own messages
    return parse


positive_int = _argument_type("positive_int", int, "an integer", "a positive integer", "a positive integer (>= 1)",
                              lambda v: v >= 1)
non_negative_int = _argument_type("non_negative_int", int, "an integer", ">= 0", "a non-negative integer",
                                  lambda v: v >= 0)
positive_float = _argument_type("positive_float", float, "a number", "> 0", "a finite number > 0",
                                lambda v: 0 < v < math.inf)
non_negative_float = _argument_type("non_negative_float", float, "a number", ">= 0", "a finite number >= 0",
                                    lambda v: 0 <= v < math.inf)
fraction_0_1 = _argument_type("fraction_0_1", float, "a number", "in [0, 1)", "in [0, 1)", lambda v: 0 <= v < 1)


def thread_count(text: str) -> int:
    """``--threads``: a positive integer, at most ``THREADS_PER_CORE_LIMIT`` per usable core
    (``--threads 100000`` made OpenMP crash the process with SIGSEGV)."""
    value = positive_int(text)
    try:
        check_threads("--threads", value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: must be at most {THREADS_PER_CORE_LIMIT} per usable core of this machine"
        ) from None
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


def variant_name(text: str) -> str:
    try:
        return parse_variant(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def flatten(groups: list[list[str]] | None) -> list[str]:
    return [item for group in groups or [] for item in group]


def preset_choices() -> list[str]:
    return list(preset_names())


def eval_spec(text: str) -> str:
    """A NAME=PATH evaluation spec, checked when the command line is parsed (names must also
    be unique: ``parse_eval_specs`` when the options are read)."""
    try:
        parse_eval_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def add_data_arguments(parser: argparse.ArgumentParser, preparation: bool = False) -> None:
    """The data options, one definition for every subcommand that reads text (train,
    reproduce, prepare-data). ``preparation`` adds the options that only ``prepare-data``
    takes (runs take them from the preset); otherwise ``--data-dir``."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", "--train", dest="data", action="append", nargs="+", metavar="PATH",
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
                       help=f"vocabulary of the trained tokenizer (default: the preset's; prepare-data {DEFAULT_VOCAB_SIZE})")
    group.add_argument("--heldout-fraction", type=fraction_0_1, default=DEFAULT_HELDOUT_FRACTION, metavar="F",
                       help="share of training documents held out for evaluation when no --eval is given "
                            f"(default {DEFAULT_HELDOUT_FRACTION})")
    group.add_argument("--max-train-bytes", type=parse_byte_size, metavar="SIZE",
                       help="cap on the training text read, e.g. 200MB (default: the preset's)")
    if not preparation:
        group.add_argument("--data-dir", type=Path, metavar="DIR",
                           help="folder for the tokenizer and token caches (default: OUT/data); reused when valid")
        return
    group.add_argument("--max-eval-bytes", type=parse_byte_size, metavar="SIZE", help="cap on each evaluation set")
    group.add_argument("--text-field", default="text", help="JSONL field / Parquet column / dataset field with the text")
    group.add_argument("--tokenizer-sample-bytes", type=parse_byte_size, default=DEFAULT_SAMPLE_BYTES, metavar="SIZE",
                       help="train the tokenizer on this much text from the start of the corpus (default %(default)s)")
    group.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of reused token caches")

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
                            "(paper Table 3; mhmoe.bitnet)")
    group.add_argument("--bitnet-full-precision", nargs="+", choices=BITNET_FULL_PRECISION, default=(),
                       metavar="PART",
                       help="with --bitnet, also keep these parts in full precision: head-merge (the "
                            "MH-MoE head and merge layers), attention (docs/bitnet.md)")
    group.add_argument("--schedule", choices=("polynomial", "cosine", "constant", "two-stage"), default="polynomial",
                       help="decay after warmup (default polynomial, power 1, as the authors' scripts)")
    group.add_argument("--weight-decay", type=non_negative_float, default=0.01, metavar="W", help="AdamW weight decay (default 0.01)")
    group.add_argument("--clip-grad-norm", type=positive_float, default=2.0, metavar="C", help="gradient-norm clip (default 2.0)")
    group.add_argument("--load-balancing-weight", type=non_negative_float, default=0.01, metavar="W",
                       help="weight of the load-balancing loss (default 0.01, the authors' scripts)")
    group.add_argument("--z-loss-weight", type=non_negative_float, default=0.0, metavar="W",
                       help="weight of the router z-loss (default 0)")
    group.add_argument("--load-balancing", choices=LOAD_BALANCING, default="micro-batch",
                       help="MoE balancing: the load-balancing loss with expert loads counted per "
                            "micro-batch (default) or over the global batch (all micro-batches and "
                            "ranks of a step; costs one no-grad forward per micro-batch), aux-free "
                            "(DeepSeek-V3 selection bias, no balancing loss) or none "
                            "(docs/load_balancing.md)")
    group.add_argument("--seq-aux-loss-weight", type=non_negative_float, default=0.0, metavar="W",
                       help="weight of DeepSeek-V3's sequence-wise balance loss (default 0; about 1e-4 there)")
    group.add_argument("--eval-tokens", type=positive_int, metavar="N",
                       help="evaluate about N tokens of each set, in windows spread over the whole set "
                            "(default: the preset's)")
    group.add_argument("--final-eval-tokens", type=positive_int, metavar="N",
                       help="tokens per set at the final evaluation, the one the results compare "
                            "(default: the preset's; mini 262,144)")
    group.add_argument("--eval-every", type=positive_int, metavar="N", help="also evaluate every N steps")
    group.add_argument("--save-every", type=positive_int, metavar="N",
                       help="also checkpoint every N steps (always at evaluations and the end)")
    group.add_argument("--save-minutes", type=non_negative_float, metavar="M",
                       help="also checkpoint every M minutes of wall-clock time (default 10; 0: off), so a "
                            "preempted job loses minutes; SIGTERM/SIGINT also save (docs/reliability.md)")
    group.add_argument("--keep-checkpoints", type=positive_int, default=2, metavar="N",
                       help="periodic checkpoints to keep (evaluation and final ones are always kept; default 2)")
    group.add_argument("--max-skipped-steps", type=positive_int, default=5, metavar="N",
                       help="stop after N consecutive steps with a non-finite loss or gradient (each is "
                            "skipped: no update; default 5; docs/reliability.md)")
    group.add_argument("--activation-checkpointing", action="store_true",
                       help="recompute each block's activations in the backward pass (less memory, about "
                            "a third more compute; the same losses)")
    group.add_argument("--compile", action="store_true",
                       help="run the training forward under torch.compile (evaluation stays eager; "
                            "inductor needs a C++ compiler on CPU). Pays only when its compile time is "
                            "won back over the run: benchmarks/compile_speed.py measures it")
    group.add_argument("--compile-backend", choices=COMPILE_BACKENDS, default="inductor",
                       help="with --compile: inductor (default, fused kernels), or aot_eager / eager "
                            "(trace only: no compiler needed, no speed-up; to check that a model compiles)")
    group.add_argument("--device", default="auto", help="auto (default: cuda if available), cpu, cuda, cuda:N")
    group.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                       help="auto (default): bf16 autocast on GPU, fp32 on CPU")
    group.add_argument("--threads", type=thread_count, metavar="N",
                       help="torch CPU threads (default: the usable cores not busy by the load average, "
                            "chosen when the run starts and recorded for --resume)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    group.add_argument("--progress-every", type=non_negative_float, metavar="S",
                       help="off a terminal, log a progress line (step, loss, tokens/s, ETA) every S seconds "
                            "(default 60; 0: off)")
    group.add_argument("--allow-unchecked-state", action="store_true",
                       help="accept checkpoints whose state.json lacks its state_sha256 checksum (refused "
                            "by default: their step and other values cannot be verified)")
    group.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard (needs tensorboard)")


def add_variant_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("variant options")
    group.add_argument("--shared-expert", action="store_true",
                       help="add a shared SwiGLU expert as wide as the SMoE expert (paper Table 2)")
    group.add_argument("--head-merge", action="store_true",
                       help="add head and merge layers to smoe / fine_grained (paper Table 4)")
    group.add_argument("--no-head-layer", action="store_true", help="MH-MoE without the head layer (paper Table 5)")
    group.add_argument("--no-merge-layer", action="store_true", help="MH-MoE without the merge layer (paper Table 5)")


def _run_as_mhmoe() -> bool:
    """Whether this process is the mhmoe command: the console script, ``python -m mhmoe`` or
    ``python -m mhmoe.cli`` (the same program, so the run records ``mhmoe ...``)."""
    parts = Path(sys.argv[0]).parts if sys.argv and sys.argv[0] else ()
    return parts[-1:] == ("mhmoe",) or parts[-2:] == ("mhmoe", "__main__.py") or parts[-3:] == (
        "mhmoe", "cli", "__main__.py")


def run_options_from_args(args: argparse.Namespace, **overrides):
    """RunOptions from parsed ``train``/``reproduce`` arguments: every option whose argparse
    destination is a RunOptions field is passed by name (so a new option is one argparse line
    and one field); ``--data``/``--eval`` are collected, the rest are ``overrides``."""
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunOptions) if hasattr(args, f.name)}
    fields.update(
        data=flatten(args.data) or ["stdlib"],
        eval=parse_eval_specs(args.eval),
        command=["mhmoe", *sys.argv[1:]] if _run_as_mhmoe() else None,
    )
    fields.update(overrides)
    return RunOptions(**fields)


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


_BYTE_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """``'5000'``, ``'20MB'``, ``'1.5G'``, ``'64KiB'`` -> bytes (k/M/G/T decimal, Ki/Mi/Gi/Ti binary)."""
    match = _BYTE_SIZE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count such as 5000, 20MB, 1.5G or 64KiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    value = int(float(number) * base ** " kmgt".index(unit.lower() or " "))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return value
