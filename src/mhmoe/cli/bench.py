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

import torch

from mhmoe import bench
from mhmoe.cli import CLIError
from mhmoe.runtime import DTYPES


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
    layers.add_argument("--d-model", type=int, nargs="+", default=[192])
    layers.add_argument("--tokens", type=int, nargs="+", default=[16384])
    layers.add_argument("--variants", nargs="+", default=list(bench.VARIANTS), choices=bench.VARIANTS)
    layers.add_argument("--peers", nargs="+", default=list(bench.PEERS), choices=bench.PEERS)
    layers.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    layers.add_argument("--warmup", type=int, default=2)
    layers.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    layers.add_argument("--gshard-capacity-factor", type=float, default=1.25)
    layers.add_argument("--gshard-group-size", type=int, default=512)
    _common(layers)
    layers.set_defaults(func=_layers)

    e2e = sub.add_parser("e2e", help="training tokens/s of a preset's variants")
    e2e.add_argument("--preset", default="mini")
    e2e.add_argument("--variants", nargs="+", default=list(bench.VARIANTS))
    e2e.add_argument("--rounds", type=int, default=5)
    e2e.add_argument("--warmup", type=int, default=2)
    e2e.add_argument("--batch-size", type=int, default=None, help="sequences per step (default: the preset's micro batch)")
    _common(e2e)
    e2e.set_defaults(func=_e2e)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the full report (all times) here")


def _setup(args) -> torch.dtype:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device available")
    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads={args.threads}: must be a positive integer")
        torch.set_num_threads(args.threads)
    else:
        import os

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(cores or 1)
    if args.dtype is None:
        return torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    return DTYPES[args.dtype]


def _layers(args) -> int:
    dtype = _setup(args)
    for name in ("rounds", "warmup", "gshard_group_size"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            raise CLIError(f"--{name.replace('_', '-')}={getattr(args, name)}: must be positive")
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
