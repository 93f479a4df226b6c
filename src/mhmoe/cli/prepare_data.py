"""``mhmoe prepare-data``: train or load the tokenizer and tokenize the training and evaluation
text into memory-mapped caches in ``--out`` (the data options are those of ``mhmoe train``,
``mhmoe.cli.options.add_data_arguments``, plus the preparation-only ones)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mhmoe.cli.options import add_data_arguments, flatten
from mhmoe.data.prepare import PreparedData, prepare_data
from mhmoe.data.splits import parse_eval_specs

DEFAULT_VOCAB_SIZE = 8192



def prepare_from_args(args: argparse.Namespace, out_dir: Path) -> PreparedData:
    """``prepare_data`` with the options of ``add_data_arguments(parser, preparation=True)``."""
    return prepare_data(
        flatten(args.data) or ["stdlib"],
        parse_eval_specs(args.eval),
        out_dir,
        vocab_size=args.vocab_size or DEFAULT_VOCAB_SIZE,
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
    add_data_arguments(parser, preparation=True)
    parser.set_defaults(func=run_prepare_data)


def run_prepare_data(args: argparse.Namespace) -> int:
    data = prepare_from_args(args, args.out)
    print(f"tokenizer: {data.out_dir / 'tokenizer.json'} ({data.tokenizer.vocab_size} ids, eot id {data.tokenizer.eot_id})")
    print(f"train: {data.train.n_tokens} tokens, {data.train.n_bytes} bytes")
    for name, token_set in data.evals.items():
        print(f"eval {name}: {token_set.n_tokens} tokens, {token_set.n_bytes} bytes")
    print("rebuilt: " + (", ".join(data.built) if data.built else "nothing (all caches reused)"))
    return 0
