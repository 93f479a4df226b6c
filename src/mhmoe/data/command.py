"""Command-line glue for the data pipeline: shared options and the ``prepare-data`` subcommand.

``add_data_arguments(parser)`` adds the data options (``--train``, ``--eval NAME=PATH``,
``--vocab-size``, ...) to any parser, and ``prepare_from_args(args, out_dir)`` turns them into a
:func:`~mhmoe.data.prepare.prepare_data` call, so a training subcommand accepts exactly the same
options. ``register(subparsers)`` adds ``mhmoe prepare-data``; the CLI discovers subcommands in
``mhmoe.cli``, so wiring it takes a module there containing
``from mhmoe.data.command import register``.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from mhmoe.data.prepare import PreparedData, prepare_data
from mhmoe.data.splits import DEFAULT_HELDOUT_FRACTION, parse_eval_specs
from mhmoe.data.tokenizer import DEFAULT_SAMPLE_BYTES

DEFAULT_VOCAB_SIZE = 8192
_BYTE_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", re.IGNORECASE)


def parse_byte_size(text: str) -> int:
    """``'5000'``, ``'20MB'``, ``'1.5G'``, ``'64KiB'`` -> bytes (k/M/G/T decimal, Ki/Mi/Gi/Ti binary)."""
    match = _BYTE_SIZE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a byte count such as 5000, 20MB, 1.5G or 64KiB")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    value = int(float(number) * base ** " kmgt".index(unit.lower() or " "))
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return value


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the data options shared by every subcommand that needs tokenized data."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--train", action="append", metavar="SPEC", default=None,
        help="training source: a .txt/.jsonl/.parquet file or folder, 'stdlib' (default) or hf:NAME[:CONFIG][:SPLIT]; repeatable",
    )
    group.add_argument(
        "--eval", action="append", metavar="NAME=PATH", default=None,
        help="evaluation set (same source kinds); repeatable; without it a held-out split of --train is used",
    )
    group.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="BPE vocabulary size to train (default %(default)s)")
    group.add_argument("--tokenizer", type=Path, default=None, metavar="PATH", help="load this tokenizer.json instead of training one")
    group.add_argument(
        "--heldout-fraction", type=float, default=DEFAULT_HELDOUT_FRACTION,
        help="fraction of training documents held out for evaluation when no --eval is given (default %(default)s)",
    )
    group.add_argument("--max-train-bytes", type=parse_byte_size, default=None, metavar="SIZE", help="cap on training text, e.g. 200MB")
    group.add_argument("--max-eval-bytes", type=parse_byte_size, default=None, metavar="SIZE", help="cap on each evaluation set")
    group.add_argument("--text-field", default="text", help="JSONL field / Parquet column / dataset field with the text")
    group.add_argument(
        "--tokenizer-sample-bytes", type=parse_byte_size, default=DEFAULT_SAMPLE_BYTES, metavar="SIZE",
        help="train the tokenizer on this much text from the start of the corpus (default %(default)s)",
    )
    group.add_argument("--no-verify", action="store_true", help="skip the SHA-256 check of reused token caches")


def prepare_from_args(args: argparse.Namespace, out_dir: Path) -> PreparedData:
    """Run :func:`prepare_data` with the options added by :func:`add_data_arguments`."""
    return prepare_data(
        args.train or ["stdlib"],
        parse_eval_specs(args.eval),
        out_dir,
        vocab_size=args.vocab_size,
        tokenizer_path=args.tokenizer,
        heldout_fraction=args.heldout_fraction,
        max_train_bytes=args.max_train_bytes,
        max_eval_bytes=args.max_eval_bytes,
        text_field=args.text_field,
        tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        verify_checksum=not args.no_verify,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``prepare-data``: tokenize the sources into caches in ``--out`` and print a summary."""
    parser = subparsers.add_parser(
        "prepare-data",
        help="train/load the tokenizer and tokenize training and evaluation text into memory-mapped caches",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for tokenizer.json and the token caches")
    add_data_arguments(parser)
    parser.set_defaults(func=run_prepare_data)


def run_prepare_data(args: argparse.Namespace) -> int:
    data = prepare_from_args(args, args.out)
    print(f"tokenizer: {data.out_dir / 'tokenizer.json'} ({data.tokenizer.vocab_size} ids, eot id {data.tokenizer.eot_id})")
    print(f"train: {data.train.n_tokens} tokens, {data.train.n_bytes} bytes")
    for name, token_set in data.evals.items():
        print(f"eval {name}: {token_set.n_tokens} tokens, {token_set.n_bytes} bytes")
    print("rebuilt: " + (", ".join(data.built) if data.built else "nothing (all caches reused)"))
    return 0
