"""``mhmoe reproduce``: the paper's comparison (Tables 1, 2, 4, 5) in one command.

Trains the compared variants under the same token budget, seeds, schedule and data, evaluates
validation perplexity at 50% and 100% of the budget (the paper's 50k and 100k of 100k steps)
and at a few more points for the curves, and writes:

    OUT/results.md     the paper's table layout: one row per variant; parameters, active
                       parameters and forward FLOPs per token (analytic, from the parity
                       planner); perplexity on each evaluation set at 50% and 100% (mean ± std
                       over seeds when --seeds > 1); the paired comparisons over seeds (each
                       variant against SMoE and fine-grained SMoE: mean relative difference,
                       95% interval, wins, verdict; ``mhmoe.analytics.paired``), the spread of
                       those differences by budget point, a power estimate; the paper's numbers
    OUT/results.json   the same and more, machine-readable (structure: ``summarize_runs``)
    OUT/loss.png       validation loss against training tokens, training FLOPs and training
                       seconds, one row per evaluation set (mean and min-max band over seeds)
    OUT/train_loss.png the training loss curve
    OUT/load_distribution.png  expert-load distribution and thresholded activation share of each
                       MoE variant's final model (first seed) on the first evaluation set
    OUT/data/          tokenizer and token caches, built once and shared by every run
    OUT/runs/<variant>/seed<S>/   one ``mhmoe train`` run folder per variant and seed

Seeds pair the runs: seed s gives every variant the same data order (the sampler's order is a
function of the seed alone) and the same initial weights for the modules the variants share
(embedding, attention, norms, LM head): each block's feed-forward layer, the only module that
differs, draws its weights from a generator stream of its own (``mhmoe.model.Block``), so the
shared stream that initialises everything else is the same in every variant. The evaluation uses windows spread over each whole set
(``--eval-tokens``; more at the final point, ``--final-eval-tokens``), the same windows for every
run, so paired differences can also be taken window by window (``mhmoe.runs.eval_windows``).

Rerunning the same command continues: finished runs are read back, interrupted ones resume
from their latest checkpoint.

Experiments:

* default: ``dense, smoe, fine_grained, mhmoe_h2, mhmoe_h3`` (Table 1);
* ``shared_expert``: the four MoE variants with a shared expert (Table 2; Dense has none);
* ``ablation="head-merge"``: SMoE and fine-grained SMoE without / with head & merge layers,
  MH-MoE h=2 with neither / head only / merge only / both (Tables 4 and 5).
"""

from __future__ import annotations

import datetime
import io
import logging
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from mhmoe.analytics.loading import analyze_run
from mhmoe.analytics.paired import PointValue, compare, seeds_needed
from mhmoe.analytics.plots import plot_load_distribution
from mhmoe.analytics.report import routing_table_markdown
from mhmoe.data.prepare import prepare_run_data
from mhmoe.planning.variants import (
    PAPER_VARIANTS,
    ablation_variants,
    parse_variant,
    variant_label,
)
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs.eval_windows import FOLDER as EVAL_WINDOWS_FOLDER
from mhmoe.runs.eval_windows import read_eval_windows
from mhmoe.runs.metrics import read_metrics
from mhmoe.runs.validation import check_output_dir
from mhmoe.runtime import default_threads, resolve_device
from mhmoe.training.loop import check_compile_works
from mhmoe.training.presets import get_preset
from mhmoe.training.run import RunOptions, data_settings, run_training

logger = logging.getLogger(__name__)


ABLATIONS = ("head-merge",)
POINTS = (0.5, 1.0)
RESULTS_FORMAT = "mhmoe-reproduce/1"

# The paper's validation perplexities (RedPajama / Wiki / C4), Section 3, for reference.
PAPER_RESULTS: dict[str, dict[str, tuple[float, float, float]]] = {
    "dense": {"50%": (13.01, 12.95, 17.41), "100%": (12.13, 11.58, 16.21)},
    "smoe": {"50%": (11.87, 10.51, 15.63), "100%": (10.90, 9.68, 14.35)},
    "fine_grained": {"50%": (11.68, 10.18, 15.21), "100%": (10.74, 9.38, 13.97)},
    "mhmoe_h2": {"50%": (11.60, 10.11, 15.11), "100%": (10.70, 9.26, 13.80)},
    "mhmoe_h3": {"50%": (11.45, 10.00, 14.90), "100%": (10.51, 9.18, 13.63)},
    "smoe.shared": {"50%": (11.76, 10.33, 15.19), "100%": (10.66, 9.44, 14.30)},
    "fine_grained.shared": {"50%": (11.51, 10.06, 15.01), "100%": (10.41, 9.15, 13.78)},
    "mhmoe_h2.shared": {"50%": (11.48, 9.91, 14.87), "100%": (10.36, 8.79, 13.66)},
    "mhmoe_h3.shared": {"50%": (11.26, 9.74, 14.82), "100%": (10.28, 8.72, 13.49)},
    # Tables 4 and 5 (50k steps only).
    "smoe.head_merge": {"50%": (11.84, 10.48, 15.61)},
    "fine_grained.head_merge": {"50%": (11.67, 10.18, 15.19)},
    "mhmoe_h2.no_head_merge": {"50%": (11.97, 10.40, 15.52)},
    "mhmoe_h2.no_merge": {"50%": (11.74, 10.18, 15.17)},
    "mhmoe_h2.no_head": {"50%": (11.84, 10.27, 15.36)},
}

# Table 3: every variant trained as BitNet b1.58 (``--bitnet``).
PAPER_RESULTS_BITNET: dict[str, dict[str, tuple[float, float, float]]] = {
    "dense": {"50%": (32.17, 27.56, 35.85), "100%": (30.04, 24.75, 33.55)},
    "smoe": {"50%": (29.18, 24.70, 32.34), "100%": (26.78, 21.54, 29.73)},
    "fine_grained": {"50%": (29.04, 24.51, 32.03), "100%": (26.68, 21.42, 29.50)},
    "mhmoe_h2": {"50%": (28.84, 24.27, 31.86), "100%": (26.59, 21.11, 29.27)},
    "mhmoe_h3": {"50%": (28.77, 24.13, 31.81), "100%": (26.47, 21.06, 29.14)},
}


@dataclass
class ReproduceOptions:
    """What ``mhmoe reproduce`` accepts; ``run`` is the template of every run's options."""

    out: Path
    run: RunOptions
    variants: list[str] | None = None
    seeds: int = 1
    first_seed: int = 0
    shared_expert: bool = False
    ablation: str | None = None
    eval_points: int = 4
    summarize_only: bool = False  # no training: tables from the runs that have finished


def default_variants(shared_expert: bool = False, ablation: str | None = None) -> list[str]:
    """The experiment's variants: Table 1, Table 2 (shared expert) or Tables 4-5 (ablation)."""
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise ValueError(f"--ablation {ablation!r}: must be one of {', '.join(ABLATIONS)}")
        return ablation_variants(shared_expert)
    if shared_expert:
        return [f"{name}.shared" for name in PAPER_VARIANTS if name != "dense"]
    return list(PAPER_VARIANTS)


def _resolve_variants(options: ReproduceOptions) -> list[str]:
    if options.variants:
        if options.ablation is not None:
            raise ValueError("--variants and --ablation: give one of them")
        names = []
        for name in options.variants:
            spec = parse_variant(name)
            if options.shared_expert and not spec.is_dense and not spec.shared_expert:
                spec = replace(spec, shared_expert=True)
            names.append(spec.name)
    else:
        names = default_variants(options.shared_expert, options.ablation)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"--variants: {', '.join(duplicates)} given more than once")
    return names


def _eval_fractions(points: int) -> tuple[float, ...]:
    """``points`` evenly spaced evaluation fractions, always including 0.5 and 1.0."""
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"--eval-points {points!r}: must be an integer >= 2 (50% and 100% at least)")
    fractions = {round(k / points, 6) for k in range(1, points + 1)} | set(POINTS)
    return tuple(sorted(fractions))


def run_dir_for(out: Path, variant: str, seed: int) -> Path:
    return Path(out) / "runs" / variant / f"seed{seed}"


def reproduce(options: ReproduceOptions) -> dict[str, Any]:
    """Train every variant and seed, then write results.md, results.json and loss.png."""
    out = check_output_dir(options.out)
    preset = get_preset(options.run.preset)
    variants = _resolve_variants(options)
    if isinstance(options.seeds, bool) or not isinstance(options.seeds, int) or options.seeds < 1:
        raise ValueError(f"--seeds {options.seeds!r}: must be a positive integer")
    seeds = [options.first_seed + i for i in range(options.seeds)]
    fractions = _eval_fractions(options.eval_points)
    started = time.perf_counter()

    # One tokenizer and one set of token caches for every run: OUT/data unless --data-dir names
    # another folder (e.g. the caches of an earlier experiment on the same data).
    data_dir = Path(options.run.data_dir) if options.run.data_dir is not None else out / "data"
    if options.summarize_only:
        # No data work and no training: the runs that have finished, as they are.
        run_dirs = finished_runs(out, variants, seeds)
        settings = ckpt.read_run_config(next(iter(run_dirs.values()))[0][1]).get("data", {})
        eval_names = evaluated_sets(run_dirs)
    else:
        if options.run.compile:
            check_compile_works(options.run.compile_backend, resolve_device(options.run.device))  # before the data work
        # Tokenize once: one tokenizer and one set of token caches for every run.
        template = replace(options.run, eval_fractions=fractions, data_dir=data_dir, resume=True)
        if template.threads is None:
            # One thread count for every run, chosen once: each run choosing from the load average
            # would see the previous run's own load and compute (and time) differently.
            template = replace(template, threads=default_threads())
            logger.info("reproduce: %d torch thread(s) for every run (pass --threads to choose)", template.threads)
        settings = data_settings(template, preset)
        data = prepare_run_data(settings, data_dir, template.tokenizer)
        shared_tokenizer = data_dir / "tokenizer.json"
        logger.info("reproduce: %d variants x %d seeds at preset %s", len(variants), len(seeds), preset.name)
        run_dirs = {name: [] for name in variants}
        for seed in seeds:
            for index, name in enumerate(variants):
                run_dir = run_dir_for(out, name, seed)
                logger.info("[%d/%d] %s seed %d -> %s", index + 1, len(variants), name, seed, run_dir)
                run_training(replace(template, out=run_dir, variant=name, seed=seed, tokenizer=shared_tokenizer))
                run_dirs[name].append((seed, run_dir))
        eval_names = list(data.evals)
    seeds = sorted({seed for runs in run_dirs.values() for seed, _ in runs})
    for runs in run_dirs.values():
        for _, run_dir in runs:
            if not (Path(run_dir) / EVAL_WINDOWS_FOLDER).is_dir():
                logger.warning("%s has no %s/: it predates spread evaluation windows and paired "
                               "initialisation, so it does not pair with newer runs", run_dir, EVAL_WINDOWS_FOLDER)
    results = summarize_runs(run_dirs, eval_sets=eval_names, bitnet=options.run.bitnet)
    results["routing"] = {
        variant_label(name): last_routing_metrics(runs[0][1]) for name, runs in run_dirs.items()
    }
    results.update({
        "format": RESULTS_FORMAT,
        "preset": preset.name,
        "experiment": ("BitNet b1.58, " if options.run.bitnet else "") + (
                      "".join(f"{part} in full precision, " for part in options.run.bitnet_full_precision)) + (
                      "head-merge ablation (Tables 4-5)" if options.ablation else
                      ("shared expert (Table 2)" if options.shared_expert else
                       ("Table 3" if options.run.bitnet else "Table 1"))),
        "bitnet": options.run.bitnet,
        "bitnet_full_precision": list(options.run.bitnet_full_precision),
        "seeds": seeds,
        "data": settings,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "train_time_s": total_train_seconds(results),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    ckpt.atomic_write_json(out / "results.json", results)
    ckpt.atomic_write_text(out / "results.md", write_markdown(results))
    write_plot(results, out / "loss.png")
    write_train_plot(results, out / "train_loss.png")
    loads = expert_load_reports(run_dirs, data_dir, eval_names)
    if loads:
        plot_load_distribution(loads, out / "load_distribution.png")
    logger.info("wrote %s, %s, %s, train_loss.png and load_distribution.png",
                out / "results.md", out / "results.json", out / "loss.png")
    return results


LOAD_ANALYSIS_TOKENS = 65_536  # per variant, windows spread over the first evaluation set


def expert_load_reports(run_dirs: dict[str, list[tuple[int, Path]]], data_dir: Path,
                        eval_sets: list[str]) -> dict[str, dict[str, Any]]:
    """``mhmoe analyze`` reports (per-expert counts of every MoE layer) of each MoE variant's
    first-seed final model on ``LOAD_ANALYSIS_TOKENS`` tokens of the first evaluation set, keyed
    by label; {} without an evaluation set."""
    if not eval_sets:
        return {}
    cache = Path(data_dir) / f"eval-{eval_sets[0]}.tokens"
    if not cache.is_file():
        return {}
    reports = {}
    for name, runs in run_dirs.items():
        if parse_variant(name).is_dense or not runs:
            continue
        reports[variant_label(name)] = analyze_run(runs[0][1], data=cache, max_tokens=LOAD_ANALYSIS_TOKENS,
                                                   batch_size=16, device="cpu")
    return reports


def total_train_seconds(results: dict[str, Any]) -> float | None:
    """The runs' optimiser-step seconds (``train_s`` of their last training line), summed; None
    when a run predates ``train_s`` (its ``elapsed_s`` counts evaluations and restarts at resume)."""
    seconds = [run.get("train_seconds") for variant in results["variants"] for run in variant["runs"]]
    return None if not seconds or None in seconds else round(sum(seconds), 1)


def run_finished(run_dir: Path) -> bool:
    """Whether ``run_dir``'s latest checkpoint is intact and marks the run finished."""
    if not Path(run_dir).is_dir():
        return False
    try:
        folder = ckpt.latest_checkpoint(Path(run_dir))
        return folder is not None and bool(ckpt.read_checkpoint_state(folder).get("finished"))
    except (OSError, ValueError):  # CheckpointError is a ValueError
        return False


def finished_runs(out: Path, variants: list[str], seeds: list[int]) -> dict[str, list[tuple[int, Path]]]:
    """``--summarize-only``: the finished runs among ``variants`` x ``seeds`` under ``out``; the
    others are left out with a warning. Raises ValueError when none has finished."""
    run_dirs: dict[str, list[tuple[int, Path]]] = {}
    for seed in seeds:
        for name in variants:
            run_dir = run_dir_for(out, name, seed)
            if run_finished(run_dir):
                run_dirs.setdefault(name, []).append((seed, run_dir))
            else:
                logger.warning("--summarize-only: %s seed %d has not finished (%s); left out", name, seed, run_dir)
    if not run_dirs:
        raise ValueError(f"--summarize-only: no finished run under {Path(out) / 'runs'} for these variants and seeds")
    return {name: run_dirs[name] for name in variants if name in run_dirs}


def evaluated_sets(run_dirs: dict[str, list[tuple[int, Path]]]) -> list[str]:
    """The evaluation set names in the first run's metrics.jsonl, in the order logged."""
    _, first = next(iter(run_dirs.values()))[0]
    names: list[str] = []
    for record in read_metrics(Path(first) / ckpt.METRICS_FILE, strict=False):
        for key in record:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "loss" and parts[1] not in names:
                names.append(parts[1])
    return names


def last_routing_metrics(run_dir: Path) -> dict[str, Any]:
    """The routing statistics (``routing/...`` keys) of a run's last training metrics line:
    collected during training, so the routing table costs no extra forward pass."""
    path = Path(run_dir) / ckpt.METRICS_FILE
    if not path.exists():
        return {}
    for record in reversed(read_metrics(path, strict=False)):
        routing = {key: value for key, value in record.items() if key.startswith("routing/")}
        if "loss" in record:
            return routing
    return {}


def _mean_std(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def point_label(fraction: float) -> str:
    """``0.250667`` -> ``"25%"``: the budget point an evaluation stands for."""
    return f"{round(fraction * 100)}%"


def labelled_points(curve: list[dict[str, Any]], total_steps: int) -> dict[str, dict[str, Any]]:
    """One evaluation point per budget label: the table's points (50%, 100%) at exactly the step
    ``TrainConfig.eval_steps`` puts them (``max(1, round(p * total_steps))``), every other point
    under ``point_label(step / total_steps)``; of several evaluations with one label (e.g.
    ``--eval-every`` next to a fraction), the one nearest to it."""
    exact = {max(1, round(p * total_steps)): point_label(p) for p in POINTS}
    chosen: dict[str, tuple[float, dict[str, Any]]] = {}
    for point in curve:
        step = point.get("step")
        if not isinstance(step, int) or step < 1:
            continue
        fraction = step / total_steps
        label = exact.get(step) or point_label(fraction)
        if label in exact.values() and step not in exact:
            continue  # near 50% or 100% but not the table's step: that label is taken
        distance = abs(fraction - float(label.rstrip("%")) / 100)
        if label not in chosen or distance < chosen[label][0]:
            chosen[label] = (distance, point)
    return {label: point for label, (_, point) in chosen.items()}


def summarize_runs(run_dirs: dict[str, list[tuple[int, Path]]], eval_sets: list[str],
                   bitnet: bool = False) -> dict[str, Any]:
    """Read every run's config.json, metrics.jsonl and eval_windows/ into the results.json
    structure:

    * top level: ``eval_sets`` (names), ``points`` (["50%", "100%"], the table's columns),
      ``curve_points`` (every evaluated budget point), ``budget`` (steps, tokens, batch_size,
      seq_len), ``variants`` (list, in run order), ``comparisons`` (paired statistics over seeds,
      ``mhmoe.analytics.paired.compare``: one entry per set, point, variant and baseline);
      ``reproduce`` adds ``format``, ``preset``, ``experiment``, ``seeds``, ``data``,
      ``wall_time_s`` (this invocation), ``train_time_s`` (the runs' optimiser-step seconds,
      summed), ``created``;
    * ``variants[i]``: ``name``, ``label``, ``params``, ``active_params``, ``flops_per_token``,
      ``moe_layer_active_flops_per_token``, ``experts`` (shape, or None for dense),
      ``ppl[set]["50%"|"100%"]`` = {"mean", "std", "values"} (one value per seed) and ``runs``;
    * ``runs[j]``: ``seed``, ``run_dir``, ``curve`` (evaluation points {"step", "tokens",
      "fraction", "train_s", "<set>": loss, "<set>/ppl", "<set>/bpb", "<set>/loss_se",
      "<set>/tokens"}), ``train_curve`` ([tokens, loss, train_s] triples, at most ~200).
    """
    variants = []
    budget: dict[str, Any] = {}
    values: dict[str, dict[int, dict[tuple[str, str], PointValue]]] = {}
    labels_seen: dict[str, float] = {}
    table_points = {point_label(p) for p in POINTS}
    for name, runs in run_dirs.items():
        entry: dict[str, Any] = {"name": name, "label": variant_label(name), "runs": []}
        per_point: dict[str, dict[str, list[float]]] = {s: {} for s in eval_sets}
        for seed, run_dir in runs:
            config = ckpt.read_run_config(run_dir)
            entry.update({k: config["counts"][k] for k in (
                "params", "active_params", "flops_per_token", "moe_layer_active_flops_per_token", "experts")})
            train = config["train"]
            budget = {"steps": train["total_steps"], "tokens": train["total_steps"] * train["batch_size"] * train["seq_len"],
                      "batch_size": train["batch_size"], "seq_len": train["seq_len"]}
            curve, train_curve, train_seconds = _read_curves(run_dir, eval_sets)
            run_values = values.setdefault(name, {}).setdefault(seed, {})
            for label, point in labelled_points(curve, int(train["total_steps"])).items():
                labels_seen[label] = point["step"] / int(train["total_steps"])
                windows = read_eval_windows(run_dir, point["step"]) or {}
                for set_name in eval_sets:
                    if point[set_name] is None:
                        continue
                    if label in table_points:
                        per_point[set_name].setdefault(label, []).append(point[f"{set_name}/ppl"])
                    nll, targets = windows.get(set_name, (None, None))
                    run_values[(set_name, label)] = PointValue(point[set_name], nll, targets)
            entry["runs"].append({"seed": seed, "run_dir": str(run_dir), "curve": curve,
                                  "train_curve": _thin(train_curve, 200), "train_seconds": train_seconds})
        entry["ppl"] = {s: {label: _mean_std(vals) for label, vals in points.items()}
                        for s, points in per_point.items()}
        variants.append(entry)
    names = list(run_dirs)
    return {"eval_sets": eval_sets, "points": [point_label(p) for p in POINTS],
            "curve_points": sorted(labels_seen, key=labels_seen.get),
            "budget": budget, "variants": variants,
            "comparisons": compare(values, comparison_pairs(names), expected_directions(names, bitnet))}


def _read_curves(run_dir: Path, eval_sets: list[str]) -> tuple[list[dict[str, Any]], list[tuple], float | None]:
    """A run's evaluation points, its (tokens, loss, train_s) training points and its total
    optimiser-step seconds (None when the run predates ``train_s``), from metrics.jsonl."""
    curve: list[dict[str, Any]] = []
    train_curve: list[tuple] = []
    last_train_s = None
    last_record_has_train_s = False
    for record in read_metrics(run_dir / ckpt.METRICS_FILE):
        if any(key.startswith("eval/") for key in record):
            point = {"step": record["step"], "tokens": record["tokens"], "fraction": record.get("fraction"),
                     "train_s": record.get("train_s", last_train_s)}
            for set_name in eval_sets:
                for suffix in ("", "/ppl", "/bpb", "/loss_se", "/tokens"):
                    point[f"{set_name}{suffix}"] = record.get(f"eval/{set_name}{'/loss' if not suffix else suffix}")
            curve.append(point)
        elif "loss" in record:
            # train_s: optimiser-step seconds (older runs: elapsed_s, which includes evaluations)
            last_train_s = record.get("train_s", record.get("elapsed_s"))
            last_record_has_train_s = "train_s" in record
            train_curve.append((record["tokens"], record["loss"], last_train_s))
    has_train_s = bool(train_curve) and last_record_has_train_s
    return curve, train_curve, (float(train_curve[-1][2]) if has_train_s else None)


def baseline_names(names: list[str]) -> list[str]:
    """The comparison baselines among ``names``: SMoE and fine-grained SMoE without head/merge
    changes (with a shared expert in Table 2), in that order."""
    baselines = []
    for base in ("smoe", "fine_grained"):
        for name in names:
            spec = parse_variant(name)
            if spec.base == base and spec.head_layer is None and spec.merge_layer is None:
                baselines.append(name)
                break
    return baselines


def comparison_pairs(names: list[str]) -> list[tuple[str, str]]:
    """(variant, baseline) pairs: every variant against SMoE, and against fine-grained SMoE
    (the SMoE / fine-grained pair once, as fine-grained against SMoE)."""
    baselines = baseline_names(names)
    pairs = []
    for index, baseline in enumerate(baselines):
        for name in names:
            if name != baseline and name not in baselines[:index]:
                pairs.append((name, baseline))
    return pairs


def expected_directions(names: list[str], bitnet: bool = False) -> dict[tuple[str, str], bool]:
    """For each pair: True when the paper has the variant's perplexity below the baseline's (mean
    over its three sets, at 100% or else 50%); without paper numbers, True except for Dense."""
    reference = PAPER_RESULTS_BITNET if bitnet else PAPER_RESULTS
    directions = {}
    for variant, baseline in comparison_pairs(names):
        lower = not parse_variant(variant).is_dense
        for label in ("100%", "50%"):
            a, b = reference.get(variant, {}).get(label), reference.get(baseline, {}).get(label)
            if a and b:
                lower = statistics.fmean(a) < statistics.fmean(b)
                break
        directions[(variant, baseline)] = lower
    return directions


def _thin(points: list[tuple], limit: int) -> list[list[float]]:
    if len(points) <= limit:
        return [list(p) for p in points]
    stride = len(points) / limit
    return [list(points[int(i * stride)]) for i in range(limit)] + [list(points[-1])]


def _format_count(value: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return str(value)


def write_markdown(results: dict[str, Any]) -> str:
    """results.md: the paper's layout (rows = variants, perplexity at 50% and 100% per set)."""
    sets = results["eval_sets"]
    points = results["points"]
    budget = results.get("budget", {})
    seeds = results.get("seeds", [0])
    lines = [
        f"# MH-MoE reproduction: {results.get('experiment', '')}, preset `{results.get('preset')}`",
        "",
        f"Validation perplexity at 50% and 100% of a budget of {budget.get('tokens', 0):,} training tokens "
        f"({budget.get('steps')} steps of {budget.get('batch_size')} x {budget.get('seq_len')} tokens; "
        f"the paper: 50k and 100k steps of 0.5M tokens). "
        + (f"Mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))})." if len(seeds) > 1 else f"Seed {seeds[0]}.")
        + " Lower is better; the best of each column is in bold.",
        "",
        *_seed_count_lines(results),
        "Params / active params / FLOPs per token: analytic counts from the parity planner "
        "(whole model, forward, 2 FLOPs per multiply-add).",
        "",
    ]
    header = ["Model", "Params", "Active", "FLOPs/token"] + [f"{s} @{p}" for p in points for s in sets]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    best: dict[tuple[str, str], float] = {}
    for variant in results["variants"]:
        for s in sets:
            for p in points:
                stat = variant["ppl"].get(s, {}).get(p)
                if stat is not None:
                    best[(s, p)] = min(best.get((s, p), math.inf), stat["mean"])
    for variant in results["variants"]:
        row = [variant["label"], _format_count(variant["params"]), _format_count(variant["active_params"]),
               _format_count(variant["flops_per_token"])]
        for p in points:
            for s in sets:
                stat = variant["ppl"].get(s, {}).get(p)
                if stat is None:
                    row.append("–")
                    continue
                text = f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if len(stat["values"]) > 1 else "")
                row.append(f"**{text}**" if math.isclose(stat["mean"], best[(s, p)]) else text)
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Experts (per MoE layer):", ""]
    for variant in results["variants"]:
        experts = variant.get("experts")
        if experts:
            lines.append(
                f"- {variant['label']}: {experts['num_experts']} experts x d_ff {experts['d_expert']}, "
                f"top-{experts['top_k']}, expert input {experts['expert_input']}, "
                f"head {'yes' if experts['head_layer'] else 'no'}, merge {'yes' if experts['merge_layer'] else 'no'}"
                + (f", shared expert d_ff {experts['shared_d_ff']}" if experts["shared_d_ff"] else "")
                + f"; active FLOPs per MoE layer per token {variant['moe_layer_active_flops_per_token']:,}"
            )
        else:
            lines.append(f"- {variant['label']}: dense SwiGLU FFN in every block")
    lines += ["", *_ordering_lines(results), "", *_comparison_lines(results), "", *_paper_reference(results)]
    if results.get("routing"):
        lines += [
            "", "## Routing (first seed, training batches of the last logged step; "
            "definitions in `mhmoe.analytics.accumulator`)", "",
            routing_table_markdown(results["routing"]).rstrip("\n"),
        ]
    if "wall_time_s" in results:
        trained = results.get("train_time_s")
        lines += ["", f"Wall time of this invocation: {results['wall_time_s']:.0f} s"
                  + (f"; optimiser-step time of all runs, summed (kept across reruns and resumes): "
                     f"{trained:.0f} s." if trained else ".")]
    return "\n".join(lines) + "\n"


def _seed_count_lines(results: dict[str, Any]) -> list[str]:
    """A line naming each variant's seeds when not every variant has all of them."""
    seeds = results.get("seeds", [0])
    counts = [(v["label"], [run["seed"] for run in v["runs"]]) for v in results["variants"]]
    if all(len(runs) == len(seeds) for _, runs in counts):
        return []
    return ["Not every variant has every seed (the others were not run or have not finished): "
            + "; ".join(f"{label} {len(runs)} ({', '.join(map(str, runs))})" for label, runs in counts)
            + ". Paired comparisons use the seeds both variants have.", ""]


POWER_EFFECT = 0.02  # the difference the power estimate asks about (2% perplexity)


def _percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{100 * value:+.{digits}f}%"


def _comparison_lines(results: dict[str, Any]) -> list[str]:
    """The paired statistics (``mhmoe.analytics.paired``): per budget point, one row per pair
    and one cell per set; then the seed-to-seed spread by point, and the power estimate."""
    comparisons = results.get("comparisons") or []
    if not comparisons:
        return []
    labels = {v["name"]: v["label"] for v in results["variants"]}
    sets = results["eval_sets"]
    by_key = {(c["set"], c["point"], c["variant"], c["baseline"]): c for c in comparisons}
    pairs = list(dict.fromkeys((c["variant"], c["baseline"]) for c in comparisons))
    seeds = max(c["seeds"] for c in comparisons)
    lines = [
        "## Paired comparisons over seeds",
        "",
        "Seed s trains every variant on the same data order with the same initialisation of the "
        "modules they share, so each seed pairs the runs. Cell: mean over seeds of "
        "ppl(variant) / ppl(baseline) - 1 (negative: the variant is better), its 95% interval "
        f"(Student t over the {seeds} per-seed differences), the seeds in which the variant was "
        "better, and the verdict against the paper's ordering: **holds** (the interval is on the "
        "paper's side of 0), **reversed** (on the other side) or *not resolved* (it contains 0, or "
        "one seed). ± is the evaluation's own standard error of the difference (window by window, "
        "same text for both runs), averaged over seeds.",
    ]
    for point in [p for p in results["points"] if any(c["point"] == p for c in comparisons)]:
        lines += ["", f"### at {point} of the budget", "",
                  "| variant vs baseline | " + " | ".join(sets) + " |",
                  "|---|" + "---|" * len(sets)]
        for variant, baseline in pairs:
            cells = []
            for set_name in sets:
                c = by_key.get((set_name, point, variant, baseline))
                if c is None:
                    cells.append("–")
                    continue
                low, high = c["ci95"]
                interval = f" [{_percent(low)}, {_percent(high)}]" if low is not None else ""
                noise = f" ±{100 * c['eval_se']:.2f}%" if c.get("eval_se") is not None else ""
                word = {"holds": "**holds**", "reversed": "**reversed**"}.get(c["verdict"], "*not resolved*")
                cells.append(f"{_percent(c['mean_rel_diff'])}{interval}{noise}, {c['wins']}/{c['seeds']}, {word}")
            lines.append(f"| {labels.get(variant, variant)} vs {labels.get(baseline, baseline)} | " + " | ".join(cells) + " |")
    spread = [c for c in comparisons if c["sd"] is not None]
    if spread:
        points = [p for p in results.get("curve_points", results["points"]) if any(c["point"] == p for c in spread)]
        first_baseline = comparisons[0]["baseline"]
        lines += ["", "### Seed-to-seed spread of the paired differences, by budget point", "",
                  f"Standard deviation over seeds of ppl(variant) / ppl({labels.get(first_baseline, first_baseline)}) - 1. "
                  "Points before 100% are the same runs part-way through their schedule (the learning "
                  "rate has not decayed yet), a proxy for shorter runs.", "",
                  "| variant | set | " + " | ".join(points) + " |", "|---|---|" + "---:|" * len(points)]
        for variant, baseline in pairs:
            if baseline != first_baseline:
                continue
            for set_name in sets:
                cells = [by_key.get((set_name, p, variant, baseline)) for p in points]
                lines.append(f"| {labels.get(variant, variant)} | {set_name} | " + " | ".join(
                    "–" if c is None or c["sd"] is None else f"{100 * c['sd']:.2f}%" for c in cells) + " |")
        final = results["points"][-1]
        lines += ["", f"### Power: seeds needed to resolve a {100 * POWER_EFFECT:.0f}% difference", "",
                  f"From the spread at {final}: the fewest seeds N for which a true {100 * POWER_EFFECT:.0f}% "
                  "perplexity difference gives a 95% interval that excludes 0 with 80% power, "
                  "(t_0.975,N-1 + t_0.8,N-1) * sd / sqrt(N) <= 2%.", "",
                  "| variant vs baseline | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
        for variant, baseline in pairs:
            cells = []
            for set_name in sets:
                c = by_key.get((set_name, final, variant, baseline))
                if c is None or c["sd"] is None:
                    cells.append("–")
                    continue
                needed = seeds_needed(c["sd"], POWER_EFFECT)
                cells.append(f"{needed} (sd {100 * c['sd']:.2f}%)" if needed is not None else f"> 10,000 (sd {100 * c['sd']:.2f}%)")
            lines.append(f"| {labels.get(variant, variant)} vs {labels.get(baseline, baseline)} | " + " | ".join(cells) + " |")
    return lines


def _ordering_lines(results: dict[str, Any]) -> list[str]:
    """Whether the paper's ordering (Dense > SMoE > fine-grained > h=2 > h=3 in ppl) holds."""
    order = ["dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3"]
    by_base = {}
    for variant in results["variants"]:
        spec = parse_variant(variant["name"])
        if spec.head_layer is None and spec.merge_layer is None:
            by_base[spec.base] = variant
    present = [name for name in order if name in by_base]
    if len(present) < 2:
        return []
    lines = ["Paper's ordering of the means (" + " > ".join(present) + " in perplexity; the paired "
             "comparisons below say which differences the seeds resolve):"]
    for s in results["eval_sets"]:
        for p in results["points"]:
            values = [by_base[name]["ppl"].get(s, {}).get(p, {}).get("mean") for name in present]
            if None in values:
                continue
            holds = all(a > b for a, b in zip(values, values[1:]))
            lines.append(f"- {s} @{p}: {'holds' if holds else 'does not hold'} "
                         f"({' > '.join(f'{v:.2f}' for v in values)})")
    return lines


def _paper_reference(results: dict[str, Any]) -> list[str]:
    reference = PAPER_RESULTS_BITNET if results.get("bitnet") else PAPER_RESULTS
    rows = [(v["label"], reference.get(v["name"])) for v in results["variants"]]
    rows = [(label, ref) for label, ref in rows if ref]
    if not rows:
        return []
    lines = ["Paper (RedPajama / Wiki / C4 perplexity at 50k and 100k steps), for reference:", "",
             "| Model | 50k steps | 100k steps |", "|---|---|---|"]
    for label, ref in rows:
        cells = [" / ".join(f"{x:.2f}" for x in ref[p]) if p in ref else "–" for p in ("50%", "100%")]
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return lines


TRAINING_FLOPS_PER_FORWARD_FLOP = 3  # forward + backward (about twice the forward) per token


def _band(runs_xy: list[list[tuple[float, float]]]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean curve and min-max band over seeds, at the points every seed has (index-aligned)."""
    length = min(len(xy) for xy in runs_xy)
    xs = [statistics.fmean(xy[i][0] for xy in runs_xy) for i in range(length)]
    ys = [[xy[i][1] for xy in runs_xy] for i in range(length)]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def write_plot(results: dict[str, Any], path: Path) -> None:
    """loss.png: validation loss (one row per evaluation set) against training tokens, training
    FLOPs (3 x the analytic forward FLOPs per token x tokens) and training seconds on this
    machine (optimiser steps only), per variant: the mean over seeds, with the min-max band."""
    sets = results["eval_sets"] or [None]
    axes_x = (("training tokens", "tokens"), ("training FLOPs", "flops"), ("training seconds (this machine)", "train_s"))
    figure = Figure(figsize=(4.6 * len(axes_x), 3.4 * len(sets)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.subplots(len(sets), len(axes_x), squeeze=False)
    for row, set_name in enumerate(sets):
        for column, (xlabel, key) in enumerate(axes_x):
            axis = grid[row][column]
            for index, variant in enumerate(results["variants"]):
                runs_xy = []
                for run in variant["runs"]:
                    xy = []
                    for point in run["curve"]:
                        if set_name is None or point.get(set_name) is None:
                            continue
                        x = {"tokens": point["tokens"],
                             "flops": TRAINING_FLOPS_PER_FORWARD_FLOP * variant["flops_per_token"] * point["tokens"],
                             "train_s": point.get("train_s")}[key]
                        if x is not None:
                            xy.append((x, point[set_name]))
                    if xy:
                        runs_xy.append(xy)
                if not runs_xy:
                    continue
                xs, mean, low, high = _band(runs_xy)
                color = f"C{index}"
                axis.plot(xs, mean, marker="o", markersize=3, color=color, label=variant["label"])
                if len(runs_xy) > 1:
                    axis.fill_between(xs, low, high, color=color, alpha=0.15, linewidth=0)
            axis.set_title(f"{set_name}: validation loss" if set_name else "no evaluation set", fontsize=9)
            axis.set_xlabel(xlabel, fontsize=8)
            axis.xaxis.set_major_formatter(EngFormatter(sep=""))
            if column == 0:
                axis.set_ylabel("loss (nats/token)", fontsize=8)
            axis.tick_params(labelsize=7)
            axis.grid(alpha=0.3)
            if row == 0 and column == 0 and axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
    seeds = len(results.get("seeds", [0]))
    figure.suptitle(f"MH-MoE reproduction, preset {results.get('preset')}: mean over {seeds} seed(s)"
                    + (", band = min-max over seeds" if seeds > 1 else ""), fontsize=10)
    figure.tight_layout()
    ckpt.atomic_write_bytes(Path(path), _figure_png(figure))


def write_train_plot(results: dict[str, Any], path: Path, smoothing: int = 9) -> None:
    """train_loss.png: the training loss (LM loss of each logged step, running mean over
    ``smoothing`` points) against training tokens, mean over seeds with the min-max band."""
    figure = Figure(figsize=(7.5, 4.2), dpi=100)
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for index, variant in enumerate(results["variants"]):
        runs_xy = []
        for run in variant["runs"]:
            points = [(p[0], p[1]) for p in run.get("train_curve", [])]
            if len(points) < smoothing:
                continue
            smoothed = [(points[i][0], statistics.fmean(q[1] for q in points[i - smoothing + 1: i + 1]))
                        for i in range(smoothing - 1, len(points))]
            runs_xy.append(smoothed)
        if not runs_xy:
            continue
        xs, mean, low, high = _band(runs_xy)
        axis.plot(xs, mean, color=f"C{index}", linewidth=1.2, label=variant["label"])
        if len(runs_xy) > 1:
            axis.fill_between(xs, low, high, color=f"C{index}", alpha=0.15, linewidth=0)
    axis.set_xlabel("training tokens")
    axis.xaxis.set_major_formatter(EngFormatter(sep=""))
    axis.set_ylabel(f"training loss (nats/token, running mean of {smoothing} logged steps)", fontsize=8)
    axis.set_title(f"Training loss, preset {results.get('preset')}", fontsize=10)
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    # The first steps' loss (ln V and above) would flatten the interesting part of the curve.
    finals = [line.get_ydata() for line in axis.get_lines()]
    if finals:
        late = [float(y) for ys in finals for y in ys[len(ys) // 10:]]
        if late:
            axis.set_ylim(min(late) - 0.1, max(late) + 0.1)
    figure.tight_layout()
    ckpt.atomic_write_bytes(Path(path), _figure_png(figure))


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
