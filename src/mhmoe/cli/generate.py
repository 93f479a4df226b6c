"""``mhmoe generate MODEL --prompt TEXT``: stream a continuation of TEXT to the terminal.

    mhmoe generate runs/h2 --prompt "The sea"                       # a training run (latest checkpoint)
    mhmoe generate exported/h2 --prompt "The sea" --temperature 0   # an export (mhmoe export), greedy
    mhmoe generate runs/h2 --prompt "The sea" --top-k 40 --seed 1 --max-new-tokens 100

MODEL is a run folder (``mhmoe train``) or an export folder (``mhmoe export``); both are read
without transformers. The prompt's tokens are fed as they are, with no ``<|endoftext|>`` before
them: the ids the exported tokenizer gives (``AutoTokenizer``, lm-eval's contexts), so the same
prompt gives the same greedy tokens here and in transformers. An empty prompt starts from
``<|endoftext|>`` (the document separator of the training data). Decoding uses a KV cache
(``--no-cache`` recomputes the whole sequence every step; same tokens, slower) and stops at
``<|endoftext|>``, after ``--max-new-tokens`` tokens, or when the sequence fills the model's
context (``max_seq_len``). The prompt and the continuation go to stdout as they are produced; a
one-line summary goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TextIO

from mhmoe.bitnet.ternary import is_ternary_export, load_export
from mhmoe.cli import CLIError
from mhmoe.cli.options import non_negative_float, non_negative_int, positive_int
from mhmoe.decoding import generate_tokens
from mhmoe.hf import export as hf_export
from mhmoe.runs.checkpoint import CONFIG_FILE, load_run, read_run_config
from mhmoe.runtime import resolve_device


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="sample text from a trained run or an exported model (streams to the terminal)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", type=Path, metavar="MODEL", help="a run folder or an export folder")
    parser.add_argument("--prompt", required=True, help="the text to continue ('' starts a fresh document)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                        help="tokens to generate at most (default 64)")
    parser.add_argument("--temperature", type=non_negative_float, default=1.0, metavar="T",
                        help="softmax temperature; 0 = greedy (default 1.0)")
    parser.add_argument("--top-k", type=positive_int, metavar="K", help="sample among the K most likely tokens")
    parser.add_argument("--seed", type=non_negative_int, metavar="S", help="random seed (default: unseeded)")
    parser.add_argument("--step", type=positive_int, metavar="N", help="checkpoint step of a run (default: latest)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--no-cache", action="store_true", help="recompute the sequence at every step (no KV cache)")
    parser.set_defaults(func=run_generate)


def load_model(path: Path, step: int | None = None, device: str = "cpu"):
    """(TransformerLM, TextTokenizer, description) of a run folder or an export folder."""

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run or export folder")
    if not (path / CONFIG_FILE).is_file():
        raise CLIError(f"{path}: has no {CONFIG_FILE}; expected a run folder (mhmoe train) or an export (mhmoe export)")

    if is_ternary_export(path):  # mhmoe export --ternary: packed 2-bit BitNet weights
        if step is not None:
            raise CLIError(f"--step {step}: only applies to run folders; {path} is an export")
        model, tokenizer, _ = load_export(path, device=device)
        return model, tokenizer, f"ternary export {path}"
    if hf_export.is_export_dir(path):
        if step is not None:
            raise CLIError(f"--step {step}: only applies to run folders; {path} is an export")
        model, tokenizer, _ = hf_export.load_hf_export(path, device=device)
        return model, tokenizer, f"export {path}"

    read_run_config(path)  # raises a clear error for a folder that is neither
    model, tokenizer, _ = load_run(path, step=step, device=device)
    return model, tokenizer, f"run {path}"


class TokenStreamer:
    """Writes decoded text as tokens arrive, holding back incomplete UTF-8 sequences.

    Byte-level BPE tokens can split a character; the text is re-decoded from all generated ids
    and only a stable suffix (not ending in U+FFFD) is written.
    """

    def __init__(self, tokenizer, stream: TextIO) -> None:
        self.tokenizer = tokenizer
        self.stream = stream
        self.ids: list[int] = []
        self.written = ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._write(final=False)

    def finish(self) -> None:
        self._write(final=True)

    def _write(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return
        if text.startswith(self.written):
            self.stream.write(text[len(self.written):])
            self.stream.flush()
            self.written = text


def _check_prompt(prompt: str) -> None:
    """--prompt must be text: bytes that are not UTF-8 in argv (``$'caf\\xe9'``, Latin-1) reach
    Python as lone surrogates, which the tokenizer refused with a TypeError (issue 16)."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = prompt.encode("utf-8", "surrogateescape")[: err.start + 1]
        raise CLIError(
            f"--prompt {prompt.encode('utf-8', 'surrogateescape')!r}: not valid UTF-8 text "
            f"(byte 0x{raw[-1]:02x} at byte offset {len(raw) - 1}); pass UTF-8 text"
        ) from None


def run_generate(args: argparse.Namespace) -> int:
    import torch

    _check_prompt(args.prompt)
    device = resolve_device(args.device)
    model, tokenizer, description = load_model(args.model, args.step, str(device))
    # As the exported tokenizer (no BOS); an empty prompt needs a token to start from.
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]
    context = model.config.max_seq_len
    if len(prompt_ids) >= context:
        raise CLIError(
            f"--prompt is {len(prompt_ids)} tokens: the model's context is "
            f"max_seq_len={context} tokens, leaving no room to generate; shorten the prompt"
        )
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    streamer = TokenStreamer(tokenizer, out)
    start = time.perf_counter()
    count = 0
    stop = "max-new-tokens"
    for token in generate_tokens(
        model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        generator=generator, eos_id=tokenizer.eot_id, use_cache=not args.no_cache,
    ):
        count += 1
        if token == tokenizer.eot_id:
            stop = "<|endoftext|>"
            break
        streamer.push(token)
    else:
        if count < args.max_new_tokens:
            stop = f"context of {context} tokens"
    streamer.finish()
    out.write("\n")
    out.flush()
    seconds = time.perf_counter() - start
    rate = count / seconds if seconds > 0 else float("inf")
    print(f"[{description}: {count} tokens in {seconds:.2f} s ({rate:.1f} tokens/s), stopped at {stop}]",
          file=sys.stderr)
    return 0
