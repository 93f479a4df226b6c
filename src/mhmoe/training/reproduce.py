"""``mhmoe reproduce``: the paper's comparison (Tables 1, 2, 4, 5) in one command.

Trains the compared variants under the same token budget, seeds, schedule and data, evaluates
validation perplexity at 50% and 100% of the budget (the paper's 50k and 100k of 100k steps)
and at a few more points for the curves, and writes:

    OUT/results.md     the paper's table layout: one row per variant; parameters, active
                       parameters and forward FLOPs per token (analytic, from the parity
                       planner); perplexity on each evaluation set at 50% and 100% (mean ± std
                       over seeds when --seeds > 1); the paper's numbers for reference
    OUT/results.json   the same and more, machine-readable (structure: ``summarize_runs``)
    OUT/loss.png       validation loss against training tokens, one line per variant
    OUT/data/          tokenizer and token caches, built once and shared by every run
    OUT/runs/<variant>/seed<S>/   one ``mhmoe train`` run folder per variant and seed

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

from mhmoe.analytics.plots import plot_activation_ratio
from mhmoe.analytics.report import routing_table_markdown
from mhmoe.data.prepare import prepare_run_data
from mhmoe.planning.variants import PAPER_VARIANTS, ablation_variants, parse_variant, variant_label
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs.metrics import read_metrics
from mhmoe.runs.validation import check_output_dir
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

    # Tokenize once: one tokenizer and one set of token caches for every run.
    data_dir = out / "data"
    template = replace(options.run, eval_fractions=fractions, data_dir=data_dir, resume=True)
    settings = data_settings(template, preset)
    data = prepare_run_data(settings, data_dir, template.tokenizer)
    shared_tokenizer = data_dir / "tokenizer.json"
    logger.info("reproduce: %d variants x %d seeds at preset %s", len(variants), len(seeds), preset.name)

    run_dirs: dict[str, list[tuple[int, Path]]] = {name: [] for name in variants}
    for seed in seeds:
        for index, name in enumerate(variants):
            run_dir = run_dir_for(out, name, seed)
            logger.info("[%d/%d] %s seed %d -> %s", index + 1, len(variants), name, seed, run_dir)
            run_training(replace(template, out=run_dir, variant=name, seed=seed, tokenizer=shared_tokenizer))
            run_dirs[name].append((seed, run_dir))

    results = summarize_runs(run_dirs, eval_sets=list(data.evals))
    results["routing"] = {
        variant_label(name): last_routing_metrics(runs[0][1]) for name, runs in run_dirs.items()
    }
    results.update({
        "format": RESULTS_FORMAT,
        "preset": preset.name,
        "experiment": ("BitNet b1.58, " if options.run.bitnet else "") + (
                      "head-merge ablation (Tables 4-5)" if options.ablation else
                      ("shared expert (Table 2)" if options.shared_expert else
                       ("Table 3" if options.run.bitnet else "Table 1"))),
        "bitnet": options.run.bitnet,
        "seeds": seeds,
        "data": settings,
        "wall_time_s": round(time.perf_counter() - started, 1),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    ckpt.atomic_write_json(out / "results.json", results)
    ckpt.atomic_write_text(out / "results.md", write_markdown(results))
    write_plot(results, out / "loss.png")
    if any(routing for routing in results["routing"].values()):
        plot_activation_ratio(results["routing"], out / "activation_ratio.png")
    logger.info("wrote %s, %s and %s", out / "results.md", out / "results.json", out / "loss.png")
    return results


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


def summarize_runs(run_dirs: dict[str, list[tuple[int, Path]]], eval_sets: list[str]) -> dict[str, Any]:
    """Read every run's config.json and metrics.jsonl into the results.json structure:

    * top level: ``eval_sets`` (names), ``points`` (["50%", "100%"]), ``budget`` (steps,
      tokens, batch_size, seq_len), ``variants`` (list, in run order); ``reproduce`` adds
      ``format``, ``preset``, ``experiment``, ``seeds``, ``data``, ``wall_time_s``, ``created``;
    * ``variants[i]``: ``name``, ``label``, ``params``, ``active_params``, ``flops_per_token``,
      ``moe_layer_active_flops_per_token``, ``experts`` (shape, or None for dense),
      ``ppl[set]["50%"|"100%"]`` = {"mean", "std", "values"} (one value per seed) and ``runs``;
    * ``runs[j]``: ``seed``, ``run_dir``, ``curve`` (evaluation points {"step", "tokens",
      "fraction", "<set>": loss, "<set>/ppl", "<set>/bpb"}), ``train_curve`` ([tokens, loss]
      pairs, at most ~200).
    """
    variants = []
    budget: dict[str, Any] = {}
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
            records = read_metrics(run_dir / ckpt.METRICS_FILE)
            curve = []
            train_curve = []
            for record in records:
                if any(key.startswith("eval/") for key in record):
                    point = {"step": record["step"], "tokens": record["tokens"], "fraction": record.get("fraction")}
                    for set_name in eval_sets:
                        point[set_name] = record.get(f"eval/{set_name}/loss")
                        point[f"{set_name}/ppl"] = record.get(f"eval/{set_name}/ppl")
                        point[f"{set_name}/bpb"] = record.get(f"eval/{set_name}/bpb")
                    curve.append(point)
                elif "loss" in record:
                    train_curve.append((record["tokens"], record["loss"]))
            for point in curve:
                for target in POINTS:
                    if point["fraction"] is not None and math.isclose(point["fraction"], target, abs_tol=0.5 / max(1, train["total_steps"])):
                        label = f"{round(target * 100)}%"
                        for set_name in eval_sets:
                            if point[f"{set_name}/ppl"] is not None:
                                per_point[set_name].setdefault(label, []).append(point[f"{set_name}/ppl"])
            entry["runs"].append({"seed": seed, "run_dir": str(run_dir), "curve": curve,
                                  "train_curve": _thin(train_curve, 200)})
        entry["ppl"] = {s: {label: _mean_std(values) for label, values in points.items()}
                        for s, points in per_point.items()}
        variants.append(entry)
    return {"eval_sets": eval_sets, "points": [f"{round(p * 100)}%" for p in POINTS],
            "budget": budget, "variants": variants}


def _thin(points: list[tuple[int, float]], limit: int) -> list[list[float]]:
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
    lines += ["", *_ordering_lines(results), "", *_paper_reference(results)]
    if results.get("routing"):
        lines += [
            "", "## Routing (first seed, training batches of the last logged step; "
            "definitions in `mhmoe.analytics.accumulator`)", "",
            routing_table_markdown(results["routing"]).rstrip("\n"),
        ]
    if "wall_time_s" in results:
        lines += ["", f"Wall time: {results['wall_time_s']:.0f} s."]
    return "\n".join(lines) + "\n"


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
    lines = ["Paper's ordering (" + " > ".join(present) + " in perplexity):"]
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


def write_plot(results: dict[str, Any], path: Path) -> None:
    """loss.png: validation loss against training tokens, one line per variant, one panel per
    evaluation set (matplotlib's Agg canvas; no pyplot global state)."""

    sets = results["eval_sets"] or []
    panels = max(1, len(sets))
    figure = Figure(figsize=(5.5 * panels, 4.2), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)[0]
    for axis, set_name in zip(axes, sets or [None]):
        for variant in results["variants"]:
            curves = [run["curve"] for run in variant["runs"]]
            if set_name is None or not curves or not curves[0]:
                continue
            tokens = [point["tokens"] for point in curves[0]]
            losses = [statistics.fmean(c[i][set_name] for c in curves if i < len(c) and c[i][set_name] is not None)
                      for i in range(len(tokens))]
            axis.plot(tokens, losses, marker="o", markersize=3, label=variant["label"])
        axis.set_title(f"validation loss: {set_name}" if set_name else "no evaluation set")
        axis.set_xlabel("training tokens")
        axis.xaxis.set_major_formatter(EngFormatter(sep=""))
        axis.set_ylabel("loss (nats/token)")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.suptitle(f"MH-MoE reproduction, preset {results.get('preset')}")
    figure.tight_layout()
    data = _figure_png(figure)
    ckpt.atomic_write_bytes(Path(path), data)


def _figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
