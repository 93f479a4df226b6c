"""``mhmoe export RUN_DIR OUT``: write a trained run as a standalone model directory.

    mhmoe export runs/mhmoe-h3 out/mhmoe-h3                  # full precision, Hugging Face folder
    mhmoe export runs/bitnet-h3 out/bitnet-h3 --ternary      # packed 2-bit BitNet weights
    mhmoe export runs/mhmoe-h3 out/mhmoe-h3 --dtype bfloat16
    mhmoe export runs/bitnet-h3 out/bitnet-h3-50 --ternary --step 50

Without ``--ternary`` the run is written as a Hugging Face folder
(``mhmoe.hf.export.export_hf``; tensors in ``--dtype``, float32 by default). With ``--ternary`` the run must have been trained with ``--bitnet``; the
quantised weights are packed 4 per byte (``mhmoe.bitnet.ternary``) and the rest is stored in
``--dtype`` (float32 by default: the loaded model then reproduces the training-time logits
exactly). The tokenizer files of the run directory are copied along. Prints file sizes.

A ``--ternary`` folder is mhmoe's own packed format (``mhmoe.bitnet.ternary``: 2-bit codes and
scales under other names than the model's parameters, unpacked by mhmoe's Ternary* modules at
every forward), read by ``mhmoe generate`` / ``mhmoe.bitnet.ternary.load_export``; it is not
a transformers folder. Its config.json names a one-class ``configuration_mhmoe_ternary.py``
(``auto_map``) so that ``from_pretrained(OUT, trust_remote_code=True)`` stops with one line
saying so; the Hugging Face folder of a BitNet run (without ``--ternary``) carries the same
model with its latent weights, quantised on the fly: the same logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from mhmoe.bitnet import ternary
from mhmoe.bitnet.convert import bitnet_modules
from mhmoe.cli import CLIError
from mhmoe.hf.export import export_hf
from mhmoe.runs.atomic import atomic_write_text
from mhmoe.runs.checkpoint import load_run

TOKENIZER_GLOBS = ("tokenizer*.json", "tokenizer*.model", "vocab*", "merges*")
TERNARY_REFUSAL_FILE = "configuration_mhmoe_ternary.py"
TERNARY_REFUSAL = (
    "this folder is a packed ternary mhmoe export (format mhmoe-ternary, 2-bit weights): transformers "
    "cannot load it; read it with `mhmoe generate OUT` or mhmoe.bitnet.ternary.load_export, or export "
    "without --ternary for a Hugging Face folder (the same BitNet model, the same logits)"
)
TERNARY_REFUSAL_CODE = f'''\"\"\"Written by `mhmoe export --ternary`: transformers cannot read this folder (see the error).\"\"\"

from transformers import PreTrainedConfig


class MHMoETernaryExport(PreTrainedConfig):
    model_type = "mhmoe-ternary"

    def __init__(self, **kwargs):
        raise ValueError({TERNARY_REFUSAL!r})
'''


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained run (full precision, or packed ternary with --ternary)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run directory")
    p.add_argument("out", metavar="OUT", help="output directory (created)")
    p.add_argument("--ternary", action="store_true",
                   help="pack the BitNet weights to 2 bits (run trained with --bitnet)")
    p.add_argument("--step", type=int, metavar="N", help="checkpoint step (default: the latest)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the full-precision tensors (default float32)")
    p.set_defaults(func=run)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return _jsonable(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return repr(value)


def _load_run(run_dir: str, step: int | None = None):
    if not Path(run_dir).is_dir():
        raise NotADirectoryError(f"run directory {run_dir!r} does not exist")
    return load_run(run_dir) if step is None else load_run(run_dir, step=step)


def _copy_tokenizer(run_dir: Path, out: Path, tokenizer: Any) -> list[str]:
    copied = []
    for pattern in TOKENIZER_GLOBS:
        for src in sorted(run_dir.glob(pattern)):
            if src.is_file():
                tmp = out / f".{src.name}.tmp-{os.getpid()}"
                shutil.copyfile(src, tmp)
                os.replace(tmp, out / src.name)
                copied.append(src.name)
    if not copied and tokenizer is not None and hasattr(tokenizer, "save"):
        target = out / "tokenizer.json"
        tmp = out / f".tokenizer.json.tmp-{os.getpid()}"
        tokenizer.save(str(tmp))
        os.replace(tmp, target)
        copied.append(target.name)
    return copied


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.ternary:
        export_hf(args.run_dir, args.out, dtype=args.dtype, step=args.step)
        return 0

    if args.step is not None and args.step < 1:
        raise CLIError(f"--step {args.step}: must be a positive integer")
    model, tokenizer, run_config = _load_run(args.run_dir, args.step)
    extra = {"run_config": _jsonable(run_config)}
    if not bitnet_modules(model):
        raise CLIError(
            f"run {args.run_dir!r} has no BitNet layers: --ternary needs a run trained with --bitnet"
        )
    manifest = ternary.export_ternary(model, out, dtype=args.dtype, extra=extra)
    # transformers, asked for this folder with trust_remote_code, meets the refusal (docstring).
    atomic_write_text(out / TERNARY_REFUSAL_FILE, TERNARY_REFUSAL_CODE)
    manifest["auto_map"] = {"AutoConfig": f"{TERNARY_REFUSAL_FILE[:-3]}.MHMoETernaryExport"}
    atomic_write_text(out / ternary.CONFIG_FILE, json.dumps(manifest, indent=2) + "\n")
    copied = _copy_tokenizer(Path(args.run_dir), out, tokenizer)
    size = (out / ternary.WEIGHTS_FILE).stat().st_size
    state = model.state_dict()
    fp32 = sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size() for t in state.values())
    report = {
        "out": str(out),
        "format": "ternary",
        "weights_bytes": size,
        "fp32_equivalent_bytes": fp32,
        "bf16_equivalent_bytes": sum(
            t.numel() * 2 if t.is_floating_point() else t.numel() * t.element_size() for t in state.values()
        ),
        "tokenizer_files": copied,
    }
    print(json.dumps(report, indent=2))
    print(f"{ternary.WEIGHTS_FILE}: {_mib(size)} (fp32 weights would be {_mib(fp32)})")
    return 0
