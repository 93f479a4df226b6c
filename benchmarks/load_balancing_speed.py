"""CPU seconds per optimiser step of each load-balancing mode (docs/load_balancing.md).

Each case is a ``mhmoe train`` subprocess, run twice: a few steps, then more. The difference of
their CPU times (user + system, from the child's rusage) over the difference of steps is the
cost of a step, with start-up and data loading removed. CPU time rather than wall-clock
because the machine is shared: other jobs take the core away (wall time) far more than they
slow the work itself. The cases are interleaved over ``--rounds``; medians are reported.

    python benchmarks/load_balancing_speed.py --data split/train --data-dir runs/mlb/micro-batch/data \\
        [--variants smoe mhmoe_h3] [--rounds 3] [--steps 2 8] [--micro-batch-size 2]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

MODES = ("micro-batch", "global-batch", "aux-free")


def child_cpu_seconds(command: list[str]) -> float:
    """CPU seconds (user + system) the command spent, from the children's rusage."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(command, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)}: exit {completed.returncode}\n{completed.stderr[-2000:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def train_command(args: argparse.Namespace, variant: str, mode: str, steps: int, out: Path) -> list[str]:
    return [sys.executable, "-m", "mhmoe", "train", "--preset", args.preset, "--variant", variant,
            "--data", *args.data, "--data-dir", str(args.data_dir), "--micro-batch-size", str(args.micro_batch_size),
            "--load-balancing", mode, "--max-steps", str(steps), "--threads", "1", "--quiet",
            "--eval-tokens", "2048", "--final-eval-tokens", "2048",
            # Checkpoints only at the evaluations (50% and 100%: as many in the short run as in
            # the long one), so their I/O cancels in the difference.
            "--save-every", "1000000", "--save-minutes", "0", "--out", str(out)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="prepared tokenizer and caches (reused)")
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--variants", nargs="+", default=["smoe", "mhmoe_h3"])
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs=2, default=(2, 8), metavar=("SHORT", "LONG"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    short, long = args.steps
    if not 0 < short < long:
        raise SystemExit(f"--steps {short} {long}: must be 0 < SHORT < LONG")
    per_step: dict[tuple[str, str], list[float]] = {(v, m): [] for v in args.variants for m in MODES}
    with tempfile.TemporaryDirectory() as scratch:
        for round_ in range(args.rounds):
            for variant in args.variants:
                for mode in MODES:
                    seconds = []
                    for steps in (short, long):
                        out = Path(scratch) / f"{variant}-{mode}-{steps}-{round_}"
                        seconds.append(child_cpu_seconds(train_command(args, variant, mode, steps, out)))
                    per_step[(variant, mode)].append((seconds[1] - seconds[0]) / (long - short))
                    print(f"round {round_ + 1}: {variant} {mode}: {per_step[(variant, mode)][-1]:.3f} CPU s/step",
                          file=sys.stderr, flush=True)
    print("| variant | balancing | CPU s per step (median) | vs micro-batch |")
    print("|---|---|---:|---:|")
    for variant in args.variants:
        base = statistics.median(per_step[(variant, "micro-batch")])
        for mode in MODES:
            value = statistics.median(per_step[(variant, mode)])
            print(f"| {variant} | {mode} | {value:.3f} | {value / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
