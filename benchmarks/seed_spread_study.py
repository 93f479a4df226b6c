"""What makes a paired comparison resolvable (issue 19, item 3): for several ``mhmoe reproduce``
folders that differ in one training setting (budget, learning rate, batch size), the seed-to-seed
spread of the paired difference ppl(variant) / ppl(baseline) - 1 at the end of training, the
seeds that spread needs to resolve a given difference, and what those seeds cost in CPU time.

    python benchmarks/seed_spread_study.py --set books --variant mhmoe_h3 --baseline smoe \\
        --setting "384k tokens, lr 2e-3, batch 8=runs/study/base" \\
        --setting "384k tokens, lr 4e-3, batch 8=runs/study/lr4e-3" [--json FILE]

Each folder must have a ``results.json`` (``mhmoe reproduce ... --summarize-only --seeds N``
writes it); its ``comparisons`` give the per-seed paired differences, their standard deviation
and the evaluation's own standard error, and its runs give the optimiser-step time. Prints a
markdown table; ``--json`` also writes the numbers (atomically).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from mhmoe.analytics.paired import seeds_needed
from mhmoe.runs.atomic import atomic_write_json

FINAL_POINT = "100%"


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise SystemExit(f"{path}: cannot be read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a JSON object")
    return data


def read_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (write it with mhmoe reproduce --out {folder} --summarize-only --seeds N)")
    return read_json(path)


def run_cpu_seconds(results: dict[str, Any], variant: str) -> dict[int, float]:
    """Core-seconds of optimiser steps of each finished run of ``variant``: its last evaluation
    point's ``train_s`` (optimiser-step wall time; runs that predate it are left out) times the
    torch threads the run used (its config.json)."""
    seconds = {}
    for entry in results.get("variants", []):
        if entry.get("name") != variant:
            continue
        for run in entry.get("runs", []):
            train_s = (run.get("curve") or [{}])[-1].get("train_s")
            if train_s is None or "seed" not in run or "run_dir" not in run:
                continue
            threads = read_json(Path(run["run_dir"]) / "config.json")["train"].get("threads") or 1
            seconds[int(run["seed"])] = float(train_s) * int(threads)
    return seconds


def setting_row(label: str, folder: Path, eval_set: str, variant: str, baseline: str,
                effect: float) -> dict[str, Any]:
    results = read_results(folder)
    matches = [c for c in results.get("comparisons", [])
               if c["set"] == eval_set and c["point"] == FINAL_POINT
               and c["variant"] == variant and c["baseline"] == baseline]
    if not matches:
        raise SystemExit(f"{folder}/results.json: no comparison of {variant} vs {baseline} on {eval_set!r} "
                         f"at {FINAL_POINT} (both variants finished for at least one seed?)")
    comparison = matches[0]
    budget = results.get("budget") or {}
    if not all(isinstance(budget.get(key), int) for key in ("tokens", "steps", "batch_size")):
        raise SystemExit(f"{folder}/results.json: no budget (tokens, steps, batch_size); rewrite it with "
                         "mhmoe reproduce --summarize-only")
    seconds_variant = run_cpu_seconds(results, variant)
    seconds_baseline = run_cpu_seconds(results, baseline)
    lrs = {read_json(Path(run["run_dir"]) / "config.json")["train"]["lr"]
           for entry in results.get("variants", []) if entry.get("name") in (variant, baseline)
           for run in entry.get("runs", []) if "run_dir" in run}
    seeds = [entry["seed"] for entry in comparison["per_seed"]]
    pair_seconds = [seconds_variant[s] + seconds_baseline[s] for s in seeds
                    if s in seconds_variant and s in seconds_baseline]
    sd = comparison["sd"]
    needed = seeds_needed(sd, effect) if sd is not None else None
    mean_pair_seconds = sum(pair_seconds) / len(pair_seconds) if pair_seconds else None
    return {
        "setting": label,
        "folder": str(folder),
        "tokens": budget["tokens"],
        "steps": budget["steps"],
        "batch_size": budget["batch_size"],
        "lr": lrs.pop() if len(lrs) == 1 else None,
        "seeds": seeds,
        "per_seed": [entry["rel_diff"] for entry in comparison["per_seed"]],
        "mean_rel_diff": comparison["mean_rel_diff"],
        "ci95": comparison["ci95"],
        "sd": sd,
        "eval_se": comparison["eval_se"],
        "verdict": comparison["verdict"],
        "seeds_needed": needed,
        "pair_cpu_s": mean_pair_seconds,
        # Core-hours of the seeds that would resolve `effect`: one run of each variant per seed.
        "resolve_cpu_hours": (needed * mean_pair_seconds / 3600.0
                              if needed is not None and mean_pair_seconds is not None else None),
    }


def fmt_pct(value: float | None, digits: int = 1) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{100 * value:+.{digits}f}%"


def markdown(rows: list[dict[str, Any]], variant: str, baseline: str, eval_set: str, effect: float) -> str:
    lines = [
        f"| setting | tokens | steps x batch | peak lr | {variant} vs {baseline} per seed | mean [95% CI] | "
        f"sd over seeds | eval SE | seeds for {effect:.1%} | core-h to resolve {effect:.1%} |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        low, high = row["ci95"]
        interval = f"[{fmt_pct(low)}, {fmt_pct(high)}]" if low is not None else "(one seed)"
        sd = "–" if row["sd"] is None else f"{100 * row['sd']:.2f}%"
        se = "–" if row["eval_se"] is None else f"±{100 * row['eval_se']:.2f}%"
        needed = ("– (one seed)" if row["sd"] is None else "> 10,000" if row["seeds_needed"] is None
                  else str(row["seeds_needed"]))
        cost = "–" if row["resolve_cpu_hours"] is None else f"{row['resolve_cpu_hours']:.1f}"
        lines.append(
            f"| {row['setting']} | {row['tokens']:,} | {row['steps']} x {row['batch_size']} | "
            f"{'mixed' if row['lr'] is None else format(row['lr'], 'g')} | "
            f"{' / '.join(fmt_pct(d) for d in row['per_seed'])} | {fmt_pct(row['mean_rel_diff'])} {interval}, "
            f"{row['verdict']} | {sd} | {se} | {needed} | {cost} |")
    lines.append(f"\nSet: {eval_set}, final point. Seeds for {effect:.1%}: the fewest N with "
                 "(t_0.975,N-1 + t_0.8,N-1) * sd / sqrt(N) <= the difference (95% interval, 80% power); "
                 "core-h: N x the optimiser-step seconds of one run of each variant x its torch threads.")
    return "\n".join(lines)


def parse_setting(text: str) -> tuple[str, Path]:
    label, sep, folder = text.rpartition("=")
    if not sep or not label or not folder:
        raise SystemExit(f"--setting {text!r}: expected LABEL=FOLDER")
    return label, Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", action="append", required=True, metavar="LABEL=FOLDER",
                        help="a reproduce folder and its label (repeatable, in table order)")
    parser.add_argument("--variant", default="mhmoe_h3")
    parser.add_argument("--baseline", default="smoe")
    parser.add_argument("--set", default="books", help="evaluation set (default books)")
    parser.add_argument("--effect", type=float, default=0.02, help="difference to resolve (default 0.02 = 2%%)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    if not 0 < args.effect < 1:
        raise SystemExit(f"--effect {args.effect}: must lie in (0, 1)")
    rows = [setting_row(label, folder, args.set, args.variant, args.baseline, args.effect)
            for label, folder in map(parse_setting, args.setting)]
    print(markdown(rows, args.variant, args.baseline, args.set, args.effect))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {"set": args.set, "variant": args.variant, "baseline": args.baseline,
                                          "effect": args.effect, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
