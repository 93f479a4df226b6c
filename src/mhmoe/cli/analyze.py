"""``mhmoe analyze``: how a trained model routes, per MoE layer, with plots.

    mhmoe analyze runs/mhmoe-h3                      # held-out set of the run, text summary
    mhmoe analyze runs/smoe --data ../shared/data/wikitext-2/test.txt --json
    mhmoe analyze runs/mhmoe-h3 --max-tokens 32768 --out /tmp/routing

Loads the run's latest checkpoint (``mhmoe.runs.checkpoint.load_run``), runs up to --max-tokens
tokens of its held-out set (or --data: a .txt/.jsonl/.parquet file or folder, encoded with the
run's tokenizer, or a .tokens cache) in batches of --batch-size windows of --seq-len tokens, and
reports per MoE layer: tokens per expert, load imbalance (max/mean, CV), activation ratio
(share of experts receiving >= 1 routed unit per batch), router entropy, dropped share, and for
MH-MoE the distinct experts a token's sub-tokens reach and the similarity of the heads'
routing. Definitions: ``mhmoe.analytics``.

Writes OUT/routing.json and the plots expert_load.png (+ head_expert_load.png and
distinct_experts.png for MH-MoE) into OUT (default RUN_DIR/routing). With --json, stdout is
the report: {"layers": [{"layer", "tokens_per_expert", "load_imbalance", "activation_ratio",
"router_entropy", "distinct_experts_per_token", ...}, ...], ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from mhmoe.analytics.loading import DEFAULT_MAX_TOKENS, analyze_run
from mhmoe.analytics.plots import write_plots
from mhmoe.analytics.summary import layers_of
from mhmoe.data.cache import check_cache_tokenizer, is_cache_path
from mhmoe.runs import lock as run_lock
from mhmoe.runs.atomic import atomic_write_text
from mhmoe.runs.checkpoint import read_run_config

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="routing analytics of a trained run: expert load, activation ratio, plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a run directory (mhmoe train --out)")
    p.add_argument("--data", type=Path, help="text file/folder or .tokens cache (default: held-out set)")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--out", type=Path, help="folder for routing.json and plots (default RUN_DIR/routing)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"tokens to run (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--batch-size", type=int, default=8,
                   help="windows per batch; the activation ratio is per batch (default 8)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--min-share", type=float, default=0.0,
                   help="activation threshold: an expert counts as activated in a batch when it "
                   "receives >= 1 unit and >= this share of the batch's assignments (default 0)")
    p.add_argument("--no-plots", action="store_true", help="write routing.json only")
    p.set_defaults(func=run)


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value * scale:{spec}}{suffix}"


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary printed without --json."""
    lines = [
        f"run {report['run_dir']} ({report.get('variant') or 'variant unknown'}): "
        f"{report['num_tokens']} tokens of {report['data']}, batches of "
        f"{report['batch_size']} x {report['seq_len']} tokens",
    ]
    layers = layers_of(report)
    if not layers:
        lines.append("no MoE layer: nothing routes (dense model)")
        return "\n".join(lines)
    for layer in layers:
        where = f" (block {layer.block})" if layer.block is not None else ""
        lines.append(
            f"MoE layer {layer.layer}{where}: E={layer.num_experts} h={layer.num_heads} "
            f"k={layer.top_k}  load max/mean {_fmt(layer.load_imbalance, '.2f')} "
            f"CV {_fmt(layer.load_cv, '.2f')}  activation {_fmt(layer.activation_ratio, '.1f', 100, '%')} "
            f"dead {layer.dead_experts}  router entropy {_fmt(layer.router_entropy, '.3f')} nats "
            f"(max {_fmt(math.log(layer.num_experts), '.3f')})  "
            f"dropped {_fmt(layer.dropped_fraction, '.1f', 100, '%')}"
        )
        if layer.distinct_experts_per_token is not None:
            lines.append(
                f"    sub-tokens of a token reach {layer.distinct_experts_per_token:.2f} distinct "
                f"experts on average (max {min(layer.num_heads * layer.top_k, layer.num_experts)}); "
                f"heads: JS {_fmt(layer.head_js_divergence, '.3f')}, "
                f"top-1 agreement {_fmt(layer.head_top1_agreement, '.3f')}"
            )
        lines.append(f"    tokens per expert: {layer.tokens_per_expert}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.data is not None and is_cache_path(args.data):
        # A token cache is only meaningful with the tokenizer it was built with (issue 16).
        check_cache_tokenizer(args.data, read_run_config(args.run_dir).get("tokenizer_sha256"))
    out_dir = args.out if args.out is not None else args.run_dir / "routing"
    # Writing into the run folder: not while a trainer holds it (mhmoe.runs.lock).
    writes_run = args.out is None and Path(args.run_dir).is_dir()
    with run_lock.locked(args.run_dir, "mhmoe analyze") if writes_run else contextlib.nullcontext():
        return _run(args, out_dir)


def _run(args: argparse.Namespace, out_dir: Path) -> int:
    report = analyze_run(
        args.run_dir,
        data=args.data,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        step=args.step,
        device=args.device,
        min_share=args.min_share,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "routing.json", json.dumps(report, indent=1) + "\n")
    written = [out_dir / "routing.json"]
    if report["layers"] and not args.no_plots:
        written += write_plots(report, out_dir)
    if args.json:
        print(json.dumps(report))
        for path in written:
            logger.info("wrote %s", path)
    else:
        print(format_report(report))
        for path in written:
            print(f"wrote {path}")
    return 0
