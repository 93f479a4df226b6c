"""``mhmoe bench``: wall-clock benchmarks (see ``mhmoe.bench`` and docs/benchmarks.md).

    mhmoe bench layers                                   # d_model 192, 16384 tokens, CPU fp32
    mhmoe bench layers --d-model 192 768 --tokens 4096 16384 --rounds 7 --json layers.json
    mhmoe bench layers --peers ours grouped hf_grouped_mm --variants smoe mhmoe_h3
    mhmoe bench layers --device cuda --dtype bfloat16    # GPU, bf16
    mhmoe bench e2e --preset mini                        # training tokens/s per variant

Cases run round-robin in one process; the tables give medians, minima, ratios of medians,
GFLOP/s against a large matmul measured in the same run, and peak step memory.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from mhmoe import bench
from mhmoe.cli import CLIError
from mhmoe.cli.options import (
    non_negative_int,
    positive_float,
    positive_int,
    thread_count,
)
from mhmoe.runtime import DTYPES, available_cores, default_threads

BENCH_MEMORY_SHARE = 0.5
"""The input and gradient of a layer case may use at most this share of the machine's memory
(``--tokens 10**12`` would end in an allocator error after minutes of other cases)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="wall-clock benchmarks: layers against peers, end-to-end training tokens/s",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="bench_command", metavar="KIND")
    sub.required = True

    layers = sub.add_parser("layers", help="layer forward+backward time, memory, GFLOP/s vs peers")
    # Typed: --tokens -5 raised a traceback and --tokens 0 printed a 0-token "result" (issue 16).
    layers.add_argument("--d-model", type=positive_int, nargs="+", default=[192])
    layers.add_argument("--tokens", type=positive_int, nargs="+", default=[16384])
    layers.add_argument("--variants", nargs="+", default=list(bench.VARIANTS), choices=bench.VARIANTS)
    layers.add_argument("--peers", nargs="+", default=list(bench.PEERS), choices=bench.PEERS)
    layers.add_argument("--rounds", type=positive_int, default=7, help="timed rounds (median reported)")
    layers.add_argument("--warmup", type=non_negative_int, default=2)
    layers.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    layers.add_argument("--gshard-capacity-factor", type=positive_float, default=1.25)
    layers.add_argument("--gshard-group-size", type=positive_int, default=512)
    _common(layers)
    layers.set_defaults(func=_layers)

    e2e = sub.add_parser("e2e", help="training tokens/s of a preset's variants")
    e2e.add_argument("--preset", default="mini")
    e2e.add_argument("--variants", nargs="+", default=list(bench.VARIANTS))
    e2e.add_argument("--rounds", type=positive_int, default=5)
    e2e.add_argument("--warmup", type=non_negative_int, default=2)
    e2e.add_argument("--batch-size", type=positive_int, default=None,
                     help="sequences per step (default: the preset's micro batch)")
    _common(e2e)
    e2e.set_defaults(func=_e2e)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=thread_count, default=None,
                   help="torch CPU threads (default: the usable cores not busy by the load average)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the full report (all times) here")


def _check_json_path(path: Path | None) -> None:
    """--json is checked before the benchmark runs (it failed only after minutes of cases)."""
    if path is None:
        return
    if path.is_dir():
        raise CLIError(f"--json {path}: is a folder; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise CLIError(f"--json {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"--json {path}: the folder {parent} is not writable")


def _setup(args) -> torch.dtype:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device available")
    _check_json_path(args.json)
    # Default: the idle cores, as mhmoe train (oversubscribed OpenMP threads spin under load).
    threads = args.threads if args.threads is not None else default_threads()
    torch.set_num_threads(threads)
    logging.getLogger("mhmoe.bench").info("%d torch thread(s) (%d usable cores)", threads, available_cores())
    if args.dtype is None:
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return DTYPES[args.dtype]


def _check_layer_memory(args, dtype: torch.dtype) -> None:
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return
    size = torch.empty((), dtype=dtype).element_size()
    for d_model in args.d_model:
        for tokens in args.tokens:
            needed = 2 * tokens * d_model * size  # the input and its gradient
            if needed > BENCH_MEMORY_SHARE * memory:
                raise CLIError(
                    f"--tokens {tokens} x --d-model {d_model}: the input and its gradient alone need "
                    f"{needed / 2**30:,.1f} GiB, more than half of this machine's {memory / 2**30:,.1f} GiB"
                )


def _layers(args) -> int:
    dtype = _setup(args)
    _check_layer_memory(args, dtype)
    report = bench.run_layer_benchmark(
        args.d_model, args.tokens, args.variants, args.peers, rounds=args.rounds,
        warmup=args.warmup, device=args.device, dtype=dtype, memory=not args.no_memory,
        seed=args.seed, gshard_capacity_factor=args.gshard_capacity_factor,
        gshard_group_size=args.gshard_group_size, progress=logging.getLogger("mhmoe.bench").info,
    )
    print(bench.format_layer_report(report))
    if args.json:
        bench.write_json(report, args.json)
    return 0


def _e2e(args) -> int:
    _setup(args)
    report = bench.run_e2e_benchmark(
        args.preset, args.variants, rounds=args.rounds, warmup=args.warmup,
        batch_size=args.batch_size, device=args.device, seed=args.seed,
        progress=logging.getLogger("mhmoe.bench").info,
    )
    print(bench.format_e2e_report(report))
    if args.json:
        bench.write_json(report, args.json)
    return 0
