"""Training steps per second at the ``mini`` shape, eager against ``torch.compile`` (``--compile``).

For each variant and precision two copies of the same model (same seed, same batches) are
trained in this process: one eagerly, one through ``mhmoe.training.loop.compile_for_training``,
the function ``mhmoe train --compile`` uses. The compiled copy's first ``--first-steps`` steps
are timed one by one (compilation, and the recompilations that the first changes of the routing
counts cause under float32); then eager and compiled blocks of ``--block-steps`` steps alternate
over ``--rounds`` rounds, so that both see the same load of a shared machine, and the medians
of the per-step times are compared. ``compile_overhead_s`` is the first steps' time less as
many steady compiled steps; ``break_even_steps`` the steps after which the compiled run has
caught up (overhead / time saved per step), to compare with the run's length (``mini``: 750
steps). Timers: ``time.perf_counter`` (wall) and ``time.process_time`` (this process's CPU;
inductor's C++ compiler runs in child processes and is not in it).

    python benchmarks/compile_speed.py --out compile_speed.json --threads 1 \\
        [--variants dense smoe mhmoe_h3] [--precisions fp32 bf16] [--rounds 3] [--block-steps 4]

The batches are random token ids of the preset's vocabulary (the routing, hence the experts'
row counts, still changes from batch to batch, as in training).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch._dynamo.utils import counters

from mhmoe.model import TransformerLM, lm_loss
from mhmoe.planning.variants import parse_variant
from mhmoe.runs.atomic import atomic_write_json
from mhmoe.runtime import autocast_context, resolve_precision
from mhmoe.training.config import COMPILE_BACKENDS, TrainConfig
from mhmoe.training.loop import (
    build_optimizer,
    check_compile_works,
    compile_for_training,
    moe_layers_run_eagerly,
)
from mhmoe.training.presets import get_preset, model_config

CPU = torch.device("cpu")


def train_step(forward: Callable[..., Any], model: TransformerLM, optimizer: torch.optim.Optimizer,
               batch: tuple[torch.Tensor, torch.Tensor], autocast_dtype: torch.dtype | None) -> float:
    """One optimiser step as ``mhmoe.training.loop`` takes it (one micro-batch); the loss."""
    inputs, targets = batch
    with autocast_context(CPU, autocast_dtype):
        output = forward(inputs)
        loss = lm_loss(output.logits, targets) + output.aux_loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # waits for the step to finish


def timed_steps(count: int, step: Callable[[], float]) -> tuple[list[float], list[float], list[float]]:
    """(wall seconds, CPU seconds, losses) of ``count`` steps, one entry per step."""
    walls, cpus, losses = [], [], []
    for _ in range(count):
        wall, cpu = time.perf_counter(), time.process_time()
        losses.append(step())
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return walls, cpus, losses


def measure(variant: str, precision: str, args: argparse.Namespace) -> dict[str, Any]:
    preset = get_preset(args.preset)
    train_config = TrainConfig(total_steps=1000, batch_size=preset.batch_size, seq_len=preset.seq_len,
                               lr=preset.lr, warmup_steps=0)
    autocast_dtype = resolve_precision(precision, CPU)
    config = model_config(preset, parse_variant(variant), vocab_size=preset.vocab_size, max_seq_len=preset.seq_len)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (ids[:, :-1].contiguous(), ids[:, 1:].contiguous())
        for ids in (torch.randint(0, preset.vocab_size, (preset.batch_size, preset.seq_len + 1), generator=generator)
                    for _ in range(args.batches))
    ]
    models, optimizers, forwards, cursors = {}, {}, {}, {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        model = TransformerLM(config).train()
        models[mode], optimizers[mode] = model, build_optimizer(model, train_config)
        forwards[mode] = compile_for_training(model, args.backend) if mode == "compiled" else model
        cursors[mode] = 0
    # As mhmoe.training.loop does under --compile: float32 MoE layers run eagerly.
    moe_layers_eager = autocast_dtype is None and not args.whole_model
    with contextlib.ExitStack() as stack:
        if moe_layers_eager:
            stack.enter_context(moe_layers_run_eagerly(models["compiled"]))
        result = timed_comparison(models, optimizers, forwards, cursors, batches, autocast_dtype, args)
    tokens_per_step = preset.batch_size * preset.seq_len
    eager_s, compiled_s = result["eager_step_s"], result["compiled_step_s"]
    overhead_s = sum(result["first_steps_wall_s"]) - args.first_steps * compiled_s
    saved_per_step = eager_s - compiled_s
    result = {
        "variant": variant,
        "precision": precision,
        "moe_layers_eager": moe_layers_eager,
        "eager_tokens_per_s": tokens_per_step / eager_s,
        "compiled_tokens_per_s": tokens_per_step / compiled_s,
        "speedup": eager_s / compiled_s,
        "compile_overhead_s": overhead_s,
        "break_even_steps": overhead_s / saved_per_step if saved_per_step > 0 else None,
        "preset_run_steps": preset.tokens // tokens_per_step,
        **result,
    }
    result["pays_within_preset_run"] = (result["break_even_steps"] is not None
                                        and result["break_even_steps"] < result["preset_run_steps"])
    print(f"{variant} {precision}: eager {eager_s:.3f} s/step, compiled {compiled_s:.3f} s/step "
          f"({result['speedup']:.2f}x), first {args.first_steps} compiled steps "
          f"{sum(result['first_steps_wall_s']):.1f} s, break-even {result['break_even_steps']}",
          file=sys.stderr, flush=True)
    return result


def timed_comparison(models, optimizers, forwards, cursors, batches, autocast_dtype,
                     args: argparse.Namespace) -> dict[str, Any]:
    """The compiled model's first steps, then interleaved eager and compiled blocks."""

    def step(mode: str) -> float:
        batch = batches[cursors[mode] % len(batches)]
        cursors[mode] += 1
        return train_step(forwards[mode], models[mode], optimizers[mode], batch, autocast_dtype)

    counters.clear()
    first_walls, first_cpus, first_losses = timed_steps(args.first_steps, lambda: step("compiled"))
    eager_first_walls, _, eager_first_losses = timed_steps(args.first_steps, lambda: step("eager"))
    graphs_after_first = int(counters["stats"]["unique_graphs"])
    print(f"  first steps: compiled {[round(t, 2) for t in first_walls]} s, eager "
          f"{[round(t, 2) for t in eager_first_walls]} s", file=sys.stderr, flush=True)
    per_step: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in ("eager", "compiled")}
    for round_index in range(args.rounds):
        order = ("eager", "compiled") if round_index % 2 == 0 else ("compiled", "eager")
        for mode in order:
            walls, cpus, _ = timed_steps(args.block_steps, lambda m=mode: step(m))
            per_step[mode]["wall"].append(sum(walls) / len(walls))
            per_step[mode]["cpu"].append(sum(cpus) / len(cpus))
            print(f"  round {round_index + 1} {mode}: {per_step[mode]['wall'][-1]:.3f} s/step", file=sys.stderr,
                  flush=True)
    graphs_total = int(counters["stats"]["unique_graphs"])
    return {
        "eager_step_s": statistics.median(per_step["eager"]["wall"]),
        "compiled_step_s": statistics.median(per_step["compiled"]["wall"]),
        "eager_step_cpu_s": statistics.median(per_step["eager"]["cpu"]),
        "compiled_step_cpu_s": statistics.median(per_step["compiled"]["cpu"]),
        "first_steps_wall_s": first_walls,
        "first_steps_cpu_s": first_cpus,
        "eager_first_steps_wall_s": eager_first_walls,
        "dynamo_graphs_first_steps": graphs_after_first,
        "dynamo_graphs_total": graphs_total,
        "recompiled_after_first_steps": graphs_total > graphs_after_first,
        "per_block_step_s": per_step,
        # Same initial weights and batches: the first losses agree up to the kernels' rounding.
        "first_losses": {"eager": eager_first_losses, "compiled": first_losses},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results (written atomically)")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--variants", nargs="+", default=["dense", "smoe", "mhmoe_h3"])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--backend", choices=COMPILE_BACKENDS, default="inductor")
    parser.add_argument("--whole-model", action="store_true",
                        help="under float32 also compile the MoE layers (not what --compile does: they recompile)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument("--first-steps", type=int, default=3, help="compiled steps timed as compilation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-steps", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4, help="distinct batches, cycled")
    args = parser.parse_args(argv)
    for name in ("threads", "first_steps", "rounds", "block_steps", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be a positive integer")
    torch.set_num_threads(args.threads)
    try:
        check_compile_works(args.backend)
    except ValueError as err:
        parser.exit(2, f"{err}\n")
    started = time.perf_counter()
    results = []
    for precision in args.precisions:
        for variant in args.variants:
            results.append(measure(variant, precision, args))
            # Written after every case, so an interrupted measurement keeps what it measured.
            atomic_write_json(args.out, {
                "preset": args.preset, "backend": args.backend, "threads": args.threads,
                "torch": torch.__version__, "first_steps": args.first_steps, "rounds": args.rounds,
                "block_steps": args.block_steps, "whole_model": args.whole_model, "wall_s": time.perf_counter() - started,
                "results": results,
            })
    return 0


if __name__ == "__main__":
    sys.exit(main())
