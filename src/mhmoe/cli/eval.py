"""``mhmoe eval RUN_DIR``: perplexity and bits per byte of a trained run, per evaluation set.

    mhmoe eval runs/h2                          # the run's own evaluation sets, latest checkpoint
    mhmoe eval runs/h2 --eval wiki=wiki.txt     # other text, tokenized with the run's tokenizer
    mhmoe eval runs/h2 --step 500 --json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mhmoe.cli.options import eval_spec, positive_int
from mhmoe.data.splits import parse_eval_specs
from mhmoe.evaluate import evaluate_run


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="perplexity of a trained run on evaluation sets",
        description=(
            "Load RUN_DIR's checkpoint (safetensors weights) and tokenizer and print perplexity "
            "and bits per byte on each evaluation set: the run's own sets, or those named with --eval."
        ),
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a folder written by mhmoe train")
    parser.add_argument("--eval", action="append", type=eval_spec, metavar="NAME=PATH",
                        help="evaluate on this text instead of the run's sets (repeatable)")
    parser.add_argument("--step", type=positive_int, metavar="N", help="checkpoint step (default: latest)")
    parser.add_argument("--eval-tokens", type=positive_int, metavar="N",
                        help="at most N tokens per set (default: the run's setting)")
    parser.add_argument("--batch-size", type=positive_int, metavar="N", help="evaluation batch size")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    specs = parse_eval_specs(args.eval)
    step, results = evaluate_run(
        args.run_dir, specs or None, step=args.step, max_tokens=args.eval_tokens,
        batch_size=args.batch_size, device=args.device,
    )
    if args.json:
        payload = {"run_dir": str(args.run_dir), "step": step,
                   "results": {name: r.as_dict() for name, r in results.items()}}
        print(json.dumps(payload, indent=2))
        return 0
    width = max([len("set")] + [len(name) for name in results])
    print(f"{args.run_dir} at step {step}")
    print(f"{'set':<{width}}  {'tokens':>9}  {'loss':>7}  {'ppl':>9}  {'bpb':>6}")
    for name, r in results.items():
        bpb = f"{r.bpb:.4f}" if r.bpb is not None else "n/a"
        print(f"{name:<{width}}  {r.tokens:>9,}  {r.loss:>7.4f}  {r.ppl:>9.3f}  {bpb:>6}")
    return 0
