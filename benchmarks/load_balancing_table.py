"""The load-balancing evidence table (docs/load_balancing.md): one ``mhmoe reproduce`` folder per
balancing mode, same variants, seeds and data; per variant and mode, the final held-out
perplexity per seed and its paired difference to micro-batch balancing, the expert-load
coefficient of variation and activation ratio over training, training tokens/s, and the cost of
the aux-free bias update against a training step.

    python benchmarks/load_balancing_table.py --root runs/mlb --set books [--variants smoe mhmoe_h3]

``--root`` holds ``micro-batch/``, ``global-batch/`` and ``aux-free/`` (each an ``--out`` of
``mhmoe reproduce ... --load-balancing MODE``). Prints the markdown table; ``--json FILE``
also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mhmoe.analytics.paired import paired_interval, paired_window_se, verdict
from mhmoe.layers.balancing import BiasBalancer
from mhmoe.model import TransformerLM
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs.eval_windows import read_eval_windows
from mhmoe.runs.metrics import read_metrics

MODES = ("micro-batch", "global-batch", "aux-free")
BASELINE = "micro-batch"
TRAINING_POINTS = (0.25, 0.5, 1.0)


def run_summary(run_dir: Path, eval_set: str) -> dict:
    """Final perplexity, routing statistics over training and speed of one finished run."""
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if f"eval/{eval_set}/ppl" in r]
    if not train or not evals:
        raise SystemExit(f"{run_dir}: no training or no eval/{eval_set} records (unfinished run?)")
    final = evals[-1]
    last_step = train[-1]["step"]

    def routing_at(fraction: float, key: str) -> float:
        # The mean over the 5% of steps that end at this point: one step's value is one
        # micro-batch's, too noisy on its own.
        end = max(1, round(fraction * last_step))
        start = max(1, end - max(1, last_step // 20) + 1)
        values = [r[f"routing/mean/{key}"] for r in train if start <= r["step"] <= end and f"routing/mean/{key}" in r]
        return statistics.fmean(values) if values else float("nan")

    return {
        "ppl": final[f"eval/{eval_set}/ppl"],
        "step": final["step"],
        "load_cv": {f"{p:.0%}": routing_at(p, "load_cv") for p in TRAINING_POINTS},
        "activation_ratio": {f"{p:.0%}": routing_at(p, "activation_ratio") for p in TRAINING_POINTS},
        "dead_experts_final": routing_at(1.0, "dead_experts"),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in train),
        "train_s": train[-1]["train_s"],
    }


def step_seconds(run_dir: Path) -> float:
    """Median seconds of one optimiser step (tokens of a step / tokens per second)."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]
    per_step = records[0]["tokens"] / records[0]["step"]
    return statistics.median(per_step / r["tokens_per_s"] for r in records if r["tokens_per_s"] > 0)


def bias_update_seconds(run_dir: Path, micro_batches: int, repeats: int = 200) -> float:
    """Median seconds of the aux-free bookkeeping of one optimiser step on this run's model:
    ``BiasBalancer.add`` for each micro-batch's routing plus ``BiasBalancer.step``."""
    model, _, config = ckpt.load_run(run_dir)
    if not isinstance(model, TransformerLM):
        raise SystemExit(f"{run_dir}: not a TransformerLM run")
    seq_len = model.config.max_seq_len
    inputs = torch.randint(0, model.config.vocab_size, (2, seq_len))
    with torch.no_grad():
        moe_aux = model(inputs).moe_aux
    balancer = BiasBalancer(model)
    if not balancer.active:
        raise SystemExit(f"{run_dir}: has no aux-free selection bias")
    saved = [layer.router.expert_bias.clone() for layer in balancer.layers]
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(micro_batches):
            balancer.add(moe_aux)
        balancer.step()
        timings.append(time.perf_counter() - start)
    for layer, bias in zip(balancer.layers, saved):
        layer.router.expert_bias.copy_(bias)
    return statistics.median(timings)


def paired_eval_se(run_a: Path, run_b: Path, step: int, eval_set: str) -> float | None:
    windows_a, windows_b = read_eval_windows(run_a, step), read_eval_windows(run_b, step)
    if not windows_a or not windows_b or eval_set not in windows_a or eval_set not in windows_b:
        return None
    (nll_a, targets), (nll_b, targets_b) = windows_a[eval_set], windows_b[eval_set]
    if nll_a.shape != nll_b.shape or not np.array_equal(targets, targets_b):
        return None
    return paired_window_se(nll_a, nll_b, targets)


def seed_dirs(root: Path, mode: str, variant: str) -> dict[int, Path]:
    base = root / mode / "runs" / variant
    if not base.is_dir():
        raise SystemExit(f"{base}: missing (run mhmoe reproduce --load-balancing {mode} --out {root / mode})")
    return {int(p.name[4:]): p for p in sorted(base.glob("seed*")) if p.name[4:].isdigit()}


def build_table(root: Path, variants: list[str], eval_set: str) -> dict:
    table = {}
    for variant in variants:
        base_runs = seed_dirs(root, BASELINE, variant)
        for mode in MODES:
            runs = seed_dirs(root, mode, variant)
            seeds = sorted(runs)
            summaries = {seed: run_summary(runs[seed], eval_set) for seed in seeds}
            row = {"seeds": seeds, "runs": {str(s): summaries[s] for s in seeds}}
            if mode != BASELINE:
                paired = [s for s in seeds if s in base_runs]
                base = {s: run_summary(base_runs[s], eval_set) for s in paired}
                diffs = [summaries[s]["ppl"] / base[s]["ppl"] - 1.0 for s in paired]
                if diffs:
                    interval = paired_interval(diffs)
                    ses = [paired_eval_se(runs[s], base_runs[s], summaries[s]["step"], eval_set) for s in paired]
                    row["vs_micro_batch"] = {
                        "per_seed": diffs, "mean": interval.mean,
                        "ci95": [interval.low, interval.high],
                        # No mode is the paper's expectation: the interval says lower, higher or neither.
                        "verdict": {"holds": "lower", "reversed": "higher"}.get(
                            verdict(interval, expect_lower=True), "not resolved"),
                        "eval_se_loss": ses,
                    }
                row["step_time_ratio"] = statistics.fmean(
                    step_seconds(runs[s]) / step_seconds(base_runs[s]) for s in paired) if paired else None
            if mode == "aux-free" and seeds:
                train_config = json.loads((runs[seeds[0]] / "config.json").read_text())["train"]
                micro_batches = train_config["batch_size"] // train_config["micro_batch_size"]
                update_s = bias_update_seconds(runs[seeds[0]], micro_batches)
                row["bias_update_s"] = update_s
                row["bias_update_share_of_step"] = update_s / step_seconds(runs[seeds[0]])
            table[(variant, mode)] = row
    return table


def fmt_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def markdown(table: dict, eval_set: str) -> str:
    lines = [
        f"| variant | balancing | {eval_set} ppl per seed | vs micro-batch: per seed; mean [95% CI] ±eval SE, verdict "
        "| load CV at 25% / 50% / 100% | activation ratio at 100% | median tokens/s | step time vs micro-batch |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for (variant, mode), row in table.items():
        runs = [row["runs"][str(s)] for s in row["seeds"]]
        ppl = " / ".join(f"{r['ppl']:.2f}" for r in runs)
        cv = " / ".join(f"{statistics.fmean(r['load_cv'][k] for r in runs):.3f}" for k in ("25%", "50%", "100%"))
        act = statistics.fmean(r["activation_ratio"]["100%"] for r in runs)
        tps = statistics.fmean(r["tokens_per_s_median"] for r in runs)
        if "vs_micro_batch" in row:
            v = row["vs_micro_batch"]
            low, high = v["ci95"]
            per_seed = " / ".join(fmt_pct(d) for d in v["per_seed"])
            interval = f"[{fmt_pct(low)}, {fmt_pct(high)}]" if low is not None else "(one seed)"
            ses = [se for se in v["eval_se_loss"] if se is not None]
            noise = f" ±{100 * statistics.fmean(ses):.2f}%" if ses else ""
            versus = f"{per_seed}; {fmt_pct(v['mean'])} {interval}{noise}, {v['verdict']}"
            ratio = f"{row['step_time_ratio']:.2f}x" if row.get("step_time_ratio") else "–"
        else:
            versus, ratio = "–", "1.00x"
        lines.append(f"| {variant} | {mode} | {ppl} | {versus} | {cv} | {act:.3f} | {tps:.0f} | {ratio} |")
    for (variant, mode), row in table.items():
        if "bias_update_s" in row:
            lines.append(f"\naux-free bias update, {variant}: {1e6 * row['bias_update_s']:.0f} µs per optimiser "
                         f"step = {100 * row['bias_update_share_of_step']:.3f}% of a median step")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="folder with micro-batch/, global-batch/, aux-free/")
    parser.add_argument("--variants", nargs="+", default=["smoe", "mhmoe_h3"])
    parser.add_argument("--set", default="books", help="evaluation set (default books)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the update timing")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    table = build_table(args.root, args.variants, args.set)
    print(markdown(table, args.set))
    if args.json:
        payload = {f"{variant}/{mode}": row for (variant, mode), row in table.items()}
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
