"""The one prepared GPU check: ``python benchmarks/gpu_check.py --out DIR --minutes 8``.

Run once when a GPU is there (docs/gpu.md has the exact command, with the tokenized data it
trains on). Within ``--minutes`` (it watches its own clock and rewrites its report after every
phase, so a report exists whatever happens) it runs, in order:

1. ``environment``: device, versions, the rate of a large bf16 matmul (the peak that every
   TFLOP/s and MFU figure below is divided by);
2. ``tests``: ``pytest -m gpu`` in a subprocess with its own time limit, every outcome recorded;
3. ``layers``: forward + backward of the five variants' layers at the paper's dims (d_model
   768, 16k and 64k tokens, bf16) against HF transformers v5's Qwen3-MoE block with the
   ``grouped_mm`` experts (if that transformers has it; the report says so otherwise) and the
   dense FFN of equal active FLOPs (``mhmoe.bench.run_layer_benchmark``);
4. ``e2e``: training tokens/s and model FLOPs utilisation of the ``mini`` and ``paper`` model
   shapes, bf16 autocast, a few dozen steps each (``mhmoe.bench.run_e2e_benchmark``);
5. ``training``: in the minutes left, the five ``mini`` variants trained on pre-tokenized data
   (``--data-dir``: a folder written by ``mhmoe prepare-data``) at a token budget the measured
   throughput allows, then evaluated on its held-out sets (``mhmoe.training.loop.train_loop``,
   ``mhmoe.evaluate``).

Writes DIR/report.json (every number), DIR/report.md (the tables), DIR/loss.png (training
curves) and DIR/gpu_check.log. Exit status 0 when every phase that ran succeeded and no test
failed, 1 otherwise, 2 for bad arguments (one line on stderr).

``--device cpu --dry``: tiny sizes through every phase in well under a minute
(tests/test_gpu_check.py runs it in the default test suite, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mhmoe import bench
from mhmoe.bench.timing import machine_description, matmul_peak_gflops
from mhmoe.config import MoEConfig
from mhmoe.data import TrainBatchSampler
from mhmoe.data.cache import (
    MANIFEST_SUFFIX,
    CorruptCacheError,
    TokenSet,
    cache_paths,
    file_sha256,
    open_token_file,
    read_manifest,
)
from mhmoe.data.prepare import EVAL_CACHE_PREFIX, TRAIN_CACHE
from mhmoe.data.tokenizer import TOKENIZER_FILENAME, TextTokenizer, load_tokenizer
from mhmoe.evaluate import token_byte_lengths
from mhmoe.layers.mh_moe import build_ffn
from mhmoe.model import TransformerLM
from mhmoe.runs.metrics import read_metrics
from mhmoe.runs.validation import check_output_dir
from mhmoe.runtime import resolve_device, seed_everything
from mhmoe.training.loop import train_loop
from mhmoe.training.presets import Preset, get_preset, model_config
from mhmoe.training.run import RunOptions, train_config_for
from mhmoe.version import __version__

REPO = Path(__file__).resolve().parents[1]
VARIANTS = list(bench.VARIANTS)  # dense, smoe, fine_grained, mhmoe_h2, mhmoe_h3
PHASES = ("environment", "tests", "layers", "e2e", "training")
REPORT_JSON, REPORT_MD, LOSS_PNG, LOG_FILE = "report.json", "report.md", "loss.png", "gpu_check.log"
H100_H200_BF16_DENSE_TFLOPS = 989.0  # the vendor's datasheet (SXM, dense): a lead, not a reading
log = logging.getLogger("gpu_check")


# ---------------------------------------------------------------------------------------------
# Sizes: the GPU plan and the dry (tiny) one
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What every phase runs; ``dry_plan`` is the same with tiny sizes."""

    dtype: torch.dtype = torch.bfloat16
    matmul_size: int = 8192  # KINDS.md: 8192^3 bf16 ran at 769-798 TFLOP/s on an H200 here
    test_paths: tuple[str, ...] = ("tests",)
    test_timeout_s: float = 300.0
    test_share: float = 0.45  # at most this share of the budget for pytest
    layer_d_model: int = 768
    layer_tokens: tuple[int, ...] = (16_384, 65_536)
    layer_peers: tuple[str, ...] = ("ours", "hf_grouped_mm")
    layer_rounds: int = 10
    layer_warmup: int = 2
    layer_min_s: float = 25.0  # a shape is skipped with less time left than this
    e2e_shapes: tuple[tuple[str, Preset, int], ...] = field(default_factory=lambda: (
        ("mini", get_preset("mini"), 64),  # 64 x 256 = 16k tokens per step: fills the GPU
        ("paper", get_preset("paper"), 8),  # the paper's micro-batch, 8 x 2048 = 16k tokens
    ))
    e2e_rounds: int = 12  # x 5 variants: 60 timed steps per shape
    e2e_warmup: int = 2
    e2e_min_s: float = 30.0
    train_preset: Preset = field(default_factory=lambda: get_preset("mini"))
    train_batch: int = 64
    train_max_tokens: int = 50_000_000  # per variant, whatever the throughput allows
    train_min_steps: int = 20
    train_eval_tokens: int = 262_144  # per evaluation set, at the end (the mini preset's)
    train_safety: float = 0.6  # share of the measured tokens/s planned for (logging, clipping, eval)
    train_fallback_steps: int = 200  # budget when no throughput was measured
    train_min_s: float = 60.0
    log_every: int = 10
    reserve_s: float = 30.0  # kept for writing the report


def dry_plan() -> Plan:
    tiny = get_preset("tiny")
    return Plan(
        matmul_size=256, test_paths=("tests/test_gpu.py",), test_timeout_s=60.0, test_share=0.5,
        layer_d_model=48, layer_tokens=(64, 256), layer_rounds=2, layer_warmup=1, layer_min_s=1.0,
        e2e_shapes=(("mini", tiny, 4), ("paper", tiny.replace(name="tiny-paper", seq_len=64, num_layers=2), 1)),
        e2e_rounds=2, e2e_warmup=1, e2e_min_s=1.0,
        train_preset=tiny, train_batch=4, train_max_tokens=4 * 32 * 6, train_min_steps=2,
        train_eval_tokens=256, train_fallback_steps=4, train_min_s=1.0, log_every=2, reserve_s=2.0,
    )


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad command line: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, no usage block
        raise UsageError(message)


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of minutes") from None
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive number of minutes")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be a non-negative integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="folder for report.json, report.md, loss.png, gpu_check.log")
    parser.add_argument("--minutes", type=_minutes, default=8.0, metavar="M",
                        help="the whole run's time limit; the report is always written (default 8)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda if available), cuda, cuda:N, cpu")
    parser.add_argument("--dry", action="store_true", help="tiny sizes through every phase (the CPU test)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="tokenized data from `mhmoe prepare-data` (tokenizer.json, train.tokens, "
                             "eval-*.tokens and their manifests) for the training phase; without it "
                             "the phase is skipped")
    parser.add_argument("--no-tests", action="store_true", help="skip `pytest -m gpu` (e.g. on a rerun)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of every model and batch (default 0)")
    return parser


@dataclass
class Data:
    """A tokenized data folder: tokenizer, training tokens, evaluation sets."""

    folder: Path
    tokenizer: TextTokenizer
    train: TokenSet
    evals: dict[str, TokenSet]


def load_data_dir(folder: Path) -> Data:
    """Read a ``mhmoe prepare-data`` folder as it is (its caches were built elsewhere: their
    source fingerprints do not match this machine, so ``prepare_data`` would rebuild them).
    Every token file is checked against its manifest (size and SHA-256)."""
    if not folder.is_dir():
        raise ValueError(f"--data-dir {folder}: no such folder")
    tokenizer_path = folder / TOKENIZER_FILENAME
    if not tokenizer_path.is_file():
        raise ValueError(f"--data-dir {folder}: has no {TOKENIZER_FILENAME} (write it with `mhmoe prepare-data --out {folder}`)")
    tokenizer = load_tokenizer(tokenizer_path)

    def token_set(name: str) -> TokenSet:
        tokens_path, manifest_path = cache_paths(folder, name)
        if not manifest_path.is_file() or not tokens_path.is_file():
            raise ValueError(f"--data-dir {folder}: has no {tokens_path.name} with {manifest_path.name}")
        manifest = read_manifest(manifest_path, tokens_path)
        if tokens_path.stat().st_size != manifest["file_bytes"] or file_sha256(tokens_path) != manifest["sha256"]:
            raise CorruptCacheError(f"{tokens_path}: does not match {manifest_path.name} (size or SHA-256): copy it again")
        key_tokenizer = (manifest.get("key") or {}).get("tokenizer_sha256")
        if key_tokenizer not in (None, tokenizer.sha256):
            raise ValueError(f"{tokens_path}: was tokenized with another tokenizer than {tokenizer_path}")
        return TokenSet(open_token_file(tokens_path, manifest["dtype"], manifest["n_tokens"]), int(manifest["n_bytes"]))

    train = token_set(TRAIN_CACHE)
    evals = {}
    for manifest_path in sorted(folder.glob(f"{EVAL_CACHE_PREFIX}*{MANIFEST_SUFFIX}")):
        name = manifest_path.name[len(EVAL_CACHE_PREFIX):-len(MANIFEST_SUFFIX)]
        evals[name] = token_set(EVAL_CACHE_PREFIX + name)
    return Data(folder, tokenizer, train, evals)


# ---------------------------------------------------------------------------------------------
# The clock and the report
# ---------------------------------------------------------------------------------------------


class OutOfTime(Exception):
    """Raised inside a phase when its share of the time is spent."""


class Clock:
    def __init__(self, seconds: float, reserve_s: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds
        self.reserve_s = min(reserve_s, 0.2 * seconds)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds left for work (the reserve for the report already taken off)."""
        return self.seconds - self.reserve_s - self.elapsed()


class DeadlineSampler:
    """A ``TrainBatchSampler`` that raises ``OutOfTime`` once ``deadline`` (monotonic) passed:
    the training loop then stops between steps, its files closed."""

    def __init__(self, sampler: TrainBatchSampler, deadline: float) -> None:
        self.sampler, self.deadline = sampler, deadline

    def next_batch(self):
        if time.monotonic() > self.deadline:
            raise OutOfTime("the training phase's time is spent")
        return self.sampler.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


class Report:
    """report.json, rewritten (atomically) after every phase."""

    def __init__(self, out: Path, args: argparse.Namespace, argv: list[str], clock: Clock) -> None:
        self.out, self.clock = out, clock
        self.data: dict[str, Any] = {
            "command": "python benchmarks/gpu_check.py " + " ".join(argv),
            "mhmoe": __version__,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budget_s": clock.seconds,
            "dry": bool(args.dry),
            "phases": {name: {"status": "pending"} for name in PHASES},
        }

    def phase(self, name: str, status: str, seconds: float | None = None, **details: Any) -> None:
        entry = {"status": status, **details}
        if seconds is not None:
            entry["seconds"] = round(seconds, 2)
        self.data["phases"][name] = entry

    def write(self) -> None:
        self.data["elapsed_s"] = round(self.clock.elapsed(), 2)
        _atomic_write(self.out / REPORT_JSON, json.dumps(_jsonable(self.data), indent=1) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    """Non-finite floats as strings (JSON has none), containers walked."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_phase(report: Report, name: str, clock: Clock, body: Callable[[], dict[str, Any] | None],
              min_seconds: float = 0.0) -> None:
    """Run one phase: skipped when less than ``min_seconds`` are left, errors recorded (never
    raised), the report rewritten afterwards."""
    if clock.left() < min_seconds:
        report.phase(name, "skipped", reason=f"out of time: {max(clock.left(), 0):.0f} s left, needs ~{min_seconds:.0f} s")
        log.warning("%s: skipped (out of time)", name)
        report.write()
        return
    started = time.monotonic()
    log.info("%s: starting (%.0f s left)", name, clock.left())
    try:
        details = body() or {}
        status = details.pop("status", "ok")
        report.phase(name, status, time.monotonic() - started, **details)
    except Exception as err:  # one phase's failure must not cost the others or the report
        report.phase(name, "error", time.monotonic() - started, error=f"{type(err).__name__}: {err}",
                     traceback=traceback.format_exc().splitlines()[-25:])
        log.error("%s: %s: %s", name, type(err).__name__, err)
    report.write()
    log.info("%s: %s in %.1f s", name, report.data["phases"][name]["status"], time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, plan: Plan) -> dict[str, Any]:
    info: dict[str, Any] = {
        "machine": machine_description(device),
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "threads": torch.get_num_threads(),
        "dtype": str(plan.dtype).replace("torch.", ""),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    reps = 10 if device.type == "cuda" else 3
    gflops = matmul_peak_gflops(device, plan.dtype, size=plan.matmul_size, reps=reps)
    info["matmul"] = {"size": plan.matmul_size, "reps": reps, "tflops": gflops / 1e3}
    return info


_TEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")
_SUMMARY_LINE = re.compile(r"^(FAILED|ERROR)\s+(\S+::\S+)(?:\s+-\s+(.*))?$")
_SKIP_LINE = re.compile(r"^SKIPPED \[(\d+)\] (\S+?):\d+: (.*)$")


def parse_pytest_output(text: str) -> dict[str, Any]:
    """Outcome per test from ``pytest -v -rfEs`` output (partial output too)."""
    outcomes: dict[str, str] = {}
    messages: dict[str, str] = {}
    skip_reasons: dict[str, int] = {}
    for line in text.splitlines():
        line = line.strip()
        if match := _TEST_LINE.match(line):
            outcomes[match.group(1)] = match.group(2).lower()
        elif match := _SUMMARY_LINE.match(line):
            outcomes.setdefault(match.group(2), match.group(1).lower())
            if match.group(3):
                messages[match.group(2)] = match.group(3)[:500]
        elif match := _SKIP_LINE.match(line):
            skip_reasons[match.group(3)] = skip_reasons.get(match.group(3), 0) + int(match.group(1))
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    return {
        "counts": counts,
        "tests": [{"id": test, "outcome": outcome, **({"message": messages[test]} if test in messages else {})}
                  for test, outcome in outcomes.items()],
        "skip_reasons": skip_reasons,
    }


def run_tests(plan: Plan, clock: Clock) -> dict[str, Any]:
    paths = [p for p in plan.test_paths if (REPO / p).exists()]
    if not paths:
        return {"status": "skipped", "reason": f"no {', '.join(plan.test_paths)} under {REPO}"}
    timeout = max(10.0, min(plan.test_timeout_s, plan.test_share * clock.seconds, clock.left()))
    # --continue-on-collection-errors: a module that fails to import costs its own tests only.
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", *paths]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, start_new_session=True)
    timed_out = False
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # pytest and the processes its tests started
        output, _ = process.communicate()
    parsed = parse_pytest_output(output)
    failed = parsed["counts"].get("failed", 0) + parsed["counts"].get("error", 0)
    status = "timed out" if timed_out else ("failed" if failed or process.returncode not in (0, 5) else "ok")
    return {"status": status, "command": " ".join(["python", *command[1:]]), "timeout_s": round(timeout),
            "returncode": process.returncode, **parsed, "output_tail": output[-6000:]}


def usable_peers(device: torch.device, plan: Plan) -> tuple[list[str], dict[str, str]]:
    """The peers that build and run forward + backward on a small layer here; the others with
    why (an incompatible transformers must cost one row, not the phase). Peers that are merely
    not installed stay: the benchmark reports them as such."""
    layer = build_ffn(MoEConfig(d_model=64, num_experts=4, top_k=2, d_expert=64, num_heads=2,
                                head_layer=True, merge_layer=True)).to(device, plan.dtype)
    x = torch.randn(32, 64, device=device, dtype=plan.dtype)
    peers, problems = [], {}
    for peer in plan.layer_peers:
        if peer in bench.HF_IMPLEMENTATIONS and not bench.hf_available(bench.HF_IMPLEMENTATIONS[peer]):
            peers.append(peer)
            continue
        try:
            out = bench.build_peer(peer, layer)(x)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        except Exception as err:  # any failure of a third-party block
            problems[peer] = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            log.warning("layers: peer %s dropped (%s)", peer, problems[peer])
            continue
        peers.append(peer)
    return peers, problems


def run_layers(device: torch.device, plan: Plan, clock: Clock, seed: int) -> dict[str, Any]:
    merged: dict[str, Any] | None = None
    skipped = []
    peers, problems = usable_peers(device, plan)
    for tokens in plan.layer_tokens:
        if clock.left() < plan.layer_min_s:
            skipped.append(tokens)
            continue
        report = bench.run_layer_benchmark(
            [plan.layer_d_model], [tokens], VARIANTS, peers, rounds=plan.layer_rounds,
            warmup=plan.layer_warmup, device=str(device), dtype=plan.dtype,
            memory=device.type == "cuda",  # allocator statistics; the CPU's profiler pass is slow
            seed=seed,
            progress=log.info, matmul_size=plan.matmul_size,
        )
        if merged is None:
            merged = report
        else:
            merged["cases"].extend(report["cases"])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if merged is None:
        return {"status": "skipped", "reason": "out of time before the first shape"}
    merged["skipped_tokens"] = skipped
    merged["peer_problems"] = problems
    merged["hf_grouped_mm"] = {"available": bench.hf_available("grouped_mm"), "transformers": _version("transformers")}
    merged["targets"] = layer_targets(merged)
    status = "ok" if not skipped else "partial"
    return {"status": status, "result": merged}


def _case(cases: list[dict], tokens: int, variant: str, peer: str) -> dict | None:
    for case in cases:
        if (case["tokens"], case["variant"], case["peer"]) == (tokens, variant, peer) and not case["error"]:
            return case
    return None


def layer_targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's layer targets, as ratios of medians from this run."""
    rows = []
    for tokens in sorted({c["tokens"] for c in report["cases"]}):
        cases = report["cases"]

        def ratio(a, b, tokens=tokens, cases=cases):
            x, y = _case(cases, tokens, *a), _case(cases, tokens, *b)
            return x["median_s"] / y["median_s"] if x and y else None

        rows.append({"tokens": tokens, "target": "MH-MoE h=3 time / SMoE (ours)", "goal": "<= 1.2",
                     "value": ratio(("mhmoe_h3", "ours"), ("smoe", "ours"))})
        rows.append({"tokens": tokens, "target": "MH-MoE h=2 time / SMoE (ours)", "goal": "-",
                     "value": ratio(("mhmoe_h2", "ours"), ("smoe", "ours"))})
        rows.append({"tokens": tokens, "target": "SMoE time / dense FFN of equal active FLOPs", "goal": "-",
                     "value": ratio(("smoe", "ours"), ("dense", "ours"))})
        for variant in VARIANTS[1:]:
            rows.append({"tokens": tokens, "target": f"HF v5 grouped_mm / ours, {variant} (time)", "goal": ">= 1",
                         "value": ratio((variant, "hf_grouped_mm"), (variant, "ours"))})
    for row in rows:
        row["met"] = None if row["value"] is None or row["goal"] == "-" else (
            row["value"] <= float(row["goal"][3:]) if row["goal"].startswith("<=") else row["value"] >= float(row["goal"][3:]))
    return rows


def run_e2e(device: torch.device, plan: Plan, clock: Clock, seed: int, peak_tflops: float | None) -> dict[str, Any]:
    results: dict[str, Any] = {}
    skipped = []
    autocast_dtype = plan.dtype if device.type == "cuda" or plan.dtype != torch.float32 else None
    for name, preset, batch in plan.e2e_shapes:
        if clock.left() < plan.e2e_min_s:
            skipped.append(name)
            continue
        try:
            report = bench.run_e2e_benchmark(
                preset, VARIANTS, rounds=plan.e2e_rounds, warmup=plan.e2e_warmup, batch_size=batch,
                device=str(device), seed=seed, progress=log.info, autocast_dtype=autocast_dtype,
            )
        except torch.cuda.OutOfMemoryError as err:
            results[name] = {"error": f"OutOfMemoryError: {str(err).splitlines()[0]}"}
            continue
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for variant in report["variants"].values():
            achieved = variant["tokens_per_s"] * variant["train_flops_per_token"] / 1e12
            variant["tflops"] = achieved
            variant["mfu_measured_peak"] = achieved / peak_tflops if peak_tflops else None
            variant["mfu_datasheet"] = achieved / H100_H200_BF16_DENSE_TFLOPS if device.type == "cuda" else None
        report["batch"] = batch
        report["seq_len"] = preset.seq_len
        results[name] = report
    if not results:
        return {"status": "skipped", "reason": "out of time before the first shape"}
    status = "ok" if not skipped and all("error" not in r for r in results.values()) else "partial"
    return {"status": status, "shapes": results, "skipped": skipped, "peak_tflops": peak_tflops}


def _planned_tokens(plan: Plan, seconds: float, tokens_per_s: float | None) -> int:
    """Tokens per variant: the measured rate x the seconds x the safety share, capped."""
    step_tokens = plan.train_batch * plan.train_preset.seq_len
    if tokens_per_s is None:
        steps = plan.train_fallback_steps
    else:
        steps = int(tokens_per_s * seconds * plan.train_safety) // step_tokens
    steps = max(plan.train_min_steps, min(steps, plan.train_max_tokens // step_tokens))
    return steps * step_tokens


def train_variants(device: torch.device, plan: Plan, clock: Clock, data: Data | None, seed: int,
                   work_dir: Path, tokens_per_s: float | None) -> dict[str, Any]:
    if data is None:
        return {"status": "skipped", "reason": "no --data-dir given (docs/gpu.md: prepare and carry the tokens)"}
    preset = plan.train_preset
    per_variant_s = clock.left() / len(VARIANTS)
    tokens = _planned_tokens(plan, per_variant_s, tokens_per_s)
    byte_lengths = token_byte_lengths(data.tokenizer)
    runs: dict[str, Any] = {}
    for index, variant in enumerate(VARIANTS):
        # Every variant gets the same budget; the deadline only guards against a bad estimate.
        deadline = time.monotonic() + max(clock.left() / (len(VARIANTS) - index), 1.0) * 1.5
        deadline = min(deadline, time.monotonic() + clock.left())
        run_dir = work_dir / variant
        run_dir.mkdir(parents=True, exist_ok=True)
        options = RunOptions(out=run_dir, preset=preset.name, variant=variant, tokens=tokens,
                             batch_size=plan.train_batch, micro_batch_size=plan.train_batch,
                             eval_fractions=(1.0,), eval_tokens=plan.train_eval_tokens,
                             final_eval_tokens=plan.train_eval_tokens, device=str(device), seed=seed,
                             threads=torch.get_num_threads(), quiet=True)
        config = train_config_for(options, preset).replace(log_every=plan.log_every)
        seed_everything(config.seed)
        model = TransformerLM(model_config(preset, variant, vocab_size=data.tokenizer.vocab_size,
                                           max_seq_len=config.seq_len))
        sampler = DeadlineSampler(TrainBatchSampler(data.train.tokens, config.batch_size, config.seq_len,
                                                    seed=config.seed), deadline)
        entry: dict[str, Any] = {"planned_steps": config.total_steps, "planned_tokens": config.total_tokens,
                                 "params": model.num_parameters()}
        started = time.monotonic()
        try:
            result = train_loop(model, sampler, data.evals, config, run_dir, quiet=True,
                                byte_lengths=byte_lengths, progress_label=variant)
            entry.update(finished=result.finished, steps=result.step, tokens=result.tokens)
            final = result.evals.get(result.step, {})
            entry["eval"] = {name: {"loss": r.loss, "ppl": r.ppl, "bpb": r.bpb, "tokens": r.tokens, "loss_se": r.loss_se}
                             for name, r in final.items()}
        except OutOfTime:
            entry.update(finished=False, stopped="out of time")
        entry["seconds"] = round(time.monotonic() - started, 2)
        entry.update(_training_curve(run_dir))
        runs[variant] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    finished = all(r.get("finished") for r in runs.values())
    return {"status": "ok" if finished else "partial", "preset": preset.name, "batch": plan.train_batch,
            "seq_len": preset.seq_len, "tokens_per_variant": tokens, "train_tokens_available": data.train.n_tokens,
            "eval_sets": {n: s.n_tokens for n, s in data.evals.items()}, "planned_from_tokens_per_s": tokens_per_s,
            "runs": runs}


def _training_curve(run_dir: Path, points: int = 400) -> dict[str, Any]:
    """The logged training loss (at most ``points``) and the measured training rate."""
    path = run_dir / "metrics.jsonl"
    records = [r for r in read_metrics(path, strict=False) if "loss" in r] if path.is_file() else []
    if not records:
        return {"curve": []}
    stride = max(1, math.ceil(len(records) / points))
    curve = [[r["tokens"], r["loss"]] for r in records[::stride]]
    last = records[-1]
    rate = last["tokens"] / last["train_s"] if last.get("train_s") else None
    return {"curve": curve, "last_loss": last["loss"], "train_tokens_per_s": rate}


# ---------------------------------------------------------------------------------------------
# report.md and loss.png
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_markdown(data: dict[str, Any]) -> str:
    env = data.get("environment") or {}
    lines = [
        "# GPU check report", "",
        f"Command: `{data['command']}`  ",
        f"Started {data['started']}; budget {data['budget_s']:.0f} s, elapsed {data.get('elapsed_s', 0):.0f} s"
        + ("; **dry run (tiny sizes)**" if data["dry"] else ""), "",
        f"Device: {env.get('machine', '-')} ({env.get('device', '-')}); torch {env.get('torch', '-')} "
        f"(CUDA {env.get('cuda') or '-'}), transformers {env.get('transformers') or 'not installed'}, "
        f"triton {env.get('triton') or '-'}; mhmoe {data['mhmoe']}", "",
    ]
    matmul = env.get("matmul")
    if matmul:
        lines += [f"Large matmul ({matmul['size']}^3, {env.get('dtype')}): **{matmul['tflops']:.3g} TFLOP/s**, "
                  "the peak every TFLOP/s share and MFU below is divided by.", ""]
    lines += ["| phase | status | seconds | note |", "|---|---|---|---|"]
    for name in PHASES:
        phase = data["phases"][name]
        note = phase.get("reason") or phase.get("error") or ""
        lines.append(f"| {name} | {phase['status']} | {_fmt(phase.get('seconds'), 1)} | {note} |")
    lines += _tests_md(data.get("tests"))
    lines += _layers_md(data.get("layers"))
    lines += _e2e_md(data.get("e2e"))
    lines += _training_md(data.get("training"))
    return "\n".join(lines) + "\n"


def _tests_md(tests: dict | None) -> list[str]:
    if not tests:
        return []
    counts = ", ".join(f"{n} {k}" for k, n in sorted(tests.get("counts", {}).items())) or "no test ran"
    lines = ["", "## Tests: `pytest -m gpu`", "", f"{counts} (exit status {tests.get('returncode')}, "
             f"limit {tests.get('timeout_s')} s).", ""]
    if tests.get("skip_reasons"):
        lines += ["Skipped: " + "; ".join(f"{n} x {reason}" for reason, n in tests["skip_reasons"].items()), ""]
    if tests.get("tests"):
        lines += ["| test | outcome | message |", "|---|---|---|"]
        lines += [f"| `{t['id']}` | {t['outcome']} | {t.get('message', '')} |" for t in tests["tests"]]
    return lines


def _layers_md(layers: dict | None) -> list[str]:
    if not layers:
        return []
    hf = layers.get("hf_grouped_mm", {})
    lines = ["", f"## Layers: forward + backward, d_model {layers['cases'][0]['d_model']}, {layers['dtype']}", "",
             "The paper's dims are d_model 768 (the dry run's are tiny). Every MoE variant has the dense "
             "FFN's active FLOPs per token.", "",
             "HF transformers v5 Qwen3-MoE block with `grouped_mm` experts: "
             + ("available" if hf.get("available") else
                f"**not available** in this transformers ({hf.get('transformers') or 'not installed'}): no HF row"), ""]
    for peer, problem in (layers.get("peer_problems") or {}).items():
        lines += [f"Peer `{peer}` dropped: it failed on a small layer here ({problem}).", ""]
    if layers.get("skipped_tokens"):
        lines += [f"Shapes skipped for time: {layers['skipped_tokens']} tokens.", ""]
    peak = layers["matmul_peak_gflops"] / 1e3
    lines += [f"Peak: {layers['matmul_size']}^3 matmul at {peak:.3g} TFLOP/s in this benchmark's own run.", "",
              "| tokens | variant | peer | median ms | min ms | TFLOP/s | % of matmul peak | x dense | peak MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case in layers["cases"]:
        if case["error"]:
            lines.append(f"| {case['tokens']} | {case['variant']} | {case['peer']} | skipped: {case['error']} | | | | | |")
            continue
        dense = _case(layers["cases"], case["tokens"], "dense", "ours")
        mem = f"{case['peak_bytes'] / 2**20:.0f}" if case.get("peak_bytes") is not None else "-"
        lines.append(
            f"| {case['tokens']} | {case['variant']} | {case['peer']} | {case['median_s'] * 1e3:.2f} | "
            f"{case['min_s'] * 1e3:.2f} | {case['gflops'] / 1e3:.3g} | {100 * case['gflops'] / layers['matmul_peak_gflops']:.0f} | "
            f"{_fmt(case['median_s'] / dense['median_s'] if dense else None)} | {mem} |")
    lines += ["", "| tokens | target | goal | this run | met |", "|---|---|---|---|---|"]
    for row in layers.get("targets", []):
        met = "-" if row["met"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {row['tokens']} | {row['target']} | {row['goal']} | {_fmt(row['value'])} | {met} |")
    return lines


def _e2e_md(e2e: dict | None) -> list[str]:
    if not e2e:
        return []
    lines = ["", "## End to end: training steps (forward, backward, AdamW), bf16 autocast", "",
             "MFU = tokens/s x 3 x the analytic forward FLOPs per token (matmuls, attention scores not "
             "discounted for causality) / the large matmul's measured rate (datasheet 989 TFLOP/s in brackets).", ""]
    for name, shape in e2e.get("shapes", {}).items():
        if "error" in shape:
            lines += [f"{name}: {shape['error']}", ""]
            continue
        lines += [f"### {name} ({shape['preset']}: {shape['batch']} x {shape['seq_len']} = {shape['tokens_per_step']} tokens "
                  f"per step, {shape['rounds']} rounds)", "",
                  "| variant | median step ms | tokens/s | x SMoE tokens/s | TFLOP/s | MFU |", "|---|---|---|---|---|---|"]
        smoe = shape["variants"].get("smoe", {}).get("tokens_per_s")
        for variant, v in shape["variants"].items():
            mfu = "-" if v["mfu_measured_peak"] is None else f"{100 * v['mfu_measured_peak']:.1f}%"
            if v.get("mfu_datasheet") is not None:
                mfu += f" ({100 * v['mfu_datasheet']:.1f}%)"
            lines.append(f"| {variant} | {v['median_s'] * 1e3:.1f} | {v['tokens_per_s']:,.0f} | "
                         f"{_fmt(v['tokens_per_s'] / smoe if smoe else None)} | {v['tflops']:.3g} | {mfu} |")
        lines.append("")
    if e2e.get("skipped"):
        lines += [f"Shapes skipped for time: {', '.join(e2e['skipped'])}.", ""]
    return lines


def _training_md(training: dict | None) -> list[str]:
    if not training:
        return []
    runs = training.get("runs", {})
    sets = sorted({name for run in runs.values() for name in run.get("eval", {})})
    lines = ["", f"## Training: the five {training['preset']} variants", "",
             f"{training['tokens_per_variant']:,} tokens per variant ({training['batch']} x {training['seq_len']} per step; "
             f"{training['train_tokens_available']:,} training tokens available: "
             f"{training['tokens_per_variant'] / training['train_tokens_available']:.2g} passes; evaluation sets "
             f"{', '.join(f'{n} ({t:,} tokens)' for n, t in training['eval_sets'].items()) or 'none'}). "
             "Training curves: loss.png.", "",
             "| variant | steps | tokens | training tokens/s | last train loss | "
             + " | ".join(f"{s} ppl | {s} bits/byte" for s in sets) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(sets)]
    for variant, run in runs.items():
        cells = []
        for name in sets:
            result = run.get("eval", {}).get(name)
            cells += [_fmt(result["ppl"]) if result else "-", _fmt(result["bpb"], 3) if result and result["bpb"] else "-"]
        state = "" if run.get("finished") else f" ({run.get('stopped', 'unfinished')})"
        lines.append(f"| {variant}{state} | {run.get('steps', '-')} | {run.get('tokens', '-')} | "
                     f"{_fmt(run.get('train_tokens_per_s'), 0)} | {_fmt(run.get('last_loss'), 3)} | " + " | ".join(cells) + " |")
    return lines


def write_loss_plot(training: dict | None, path: Path) -> None:
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    runs = (training or {}).get("runs", {})
    plotted = False
    for variant, run in runs.items():
        curve = run.get("curve") or []
        if not curve:
            continue
        tokens, losses = [p[0] for p in curve], [p[1] for p in curve]
        window = max(1, len(losses) // 40)  # a running mean over 1/40 of the run
        smooth = [statistics.fmean(losses[max(0, i - window + 1):i + 1]) for i in range(len(losses))]
        first_eval = next(iter((run.get("eval") or {}).items()), None)
        label = variant if first_eval is None else f"{variant} ({first_eval[0]} ppl {first_eval[1]['ppl']:.2f})"
        ax.plot(tokens, smooth, label=label)
        plotted = True
    if plotted:
        ax.set_xlabel("training tokens")
        ax.set_ylabel("training loss (nats/token, running mean)")
        ax.set_title(f"{(training or {}).get('preset', '')} variants")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no training run in this report", ha="center", va="center")
        ax.set_axis_off()
    fig.savefig(path, dpi=100)


def finish(report: Report, out: Path) -> None:
    report.write()
    _atomic_write(out / REPORT_MD, render_markdown(report.data))
    write_loss_plot(report.data.get("training"), out / LOSS_PNG)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def _configure_logging(out: Path) -> None:
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(out / LOG_FILE, mode="w")):
        handler.setFormatter(formatter)
        log.addHandler(handler)


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, torch.device, Data | None]:
    """Parsed and checked arguments; ``UsageError`` (one line) for anything that cannot work."""
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        check_output_dir(args.out)
        data = load_data_dir(args.data_dir) if args.data_dir is not None else None
    except (ValueError, OSError) as err:
        raise UsageError(str(err)) from None
    return args, device, data


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, device, data = parse_arguments(argv)
    except UsageError as err:
        print(f"gpu_check.py: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    plan = dry_plan() if args.dry else Plan()
    out = args.out
    _configure_logging(out)
    clock = Clock(60.0 * args.minutes, plan.reserve_s)
    report = Report(out, args, argv, clock)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    log.info("gpu_check on %s, %.1f minutes%s", device, args.minutes, " (dry)" if args.dry else "")
    finish(report, out)  # a report exists from the first second on
    state: dict[str, Any] = {}

    def env_phase():
        state["env"] = environment(device, plan)
        report.data["environment"] = state["env"]

    def tests_phase():
        if args.no_tests:
            return {"status": "skipped", "reason": "--no-tests"}
        report.data["tests"] = run_tests(plan, clock)
        return {"status": report.data["tests"]["status"]}

    def layers_phase():
        result = run_layers(device, plan, clock, args.seed)
        report.data["layers"] = result.pop("result", None)
        return result

    def e2e_phase():
        peak = (state.get("env") or {}).get("matmul", {}).get("tflops")
        result = run_e2e(device, plan, clock, args.seed, peak)
        report.data["e2e"] = result
        return {"status": result["status"], **({"reason": result["reason"]} if "reason" in result else {})}

    def training_phase():
        mini = ((report.data.get("e2e") or {}).get("shapes") or {}).get("mini") or {}
        rates = [v["tokens_per_s"] for v in (mini.get("variants") or {}).values()]
        rate = min(rates) if rates and mini.get("batch") == plan.train_batch else None
        with tempfile.TemporaryDirectory(prefix="gpu_check_runs_") as work_dir:
            result = train_variants(device, plan, clock, data, args.seed, Path(work_dir), rate)
        report.data["training"] = result if "runs" in result else None
        return {"status": result["status"], **({"reason": result["reason"]} if "reason" in result else {})}

    try:
        run_phase(report, "environment", clock, env_phase)
        run_phase(report, "tests", clock, tests_phase, min_seconds=10.0)
        run_phase(report, "layers", clock, layers_phase, min_seconds=plan.layer_min_s)
        run_phase(report, "e2e", clock, e2e_phase, min_seconds=plan.e2e_min_s)
        run_phase(report, "training", clock, training_phase, min_seconds=plan.train_min_s)
    finally:
        finish(report, out)
    statuses = [p["status"] for p in report.data["phases"].values()]
    log.info("report: %s (%s)", out / REPORT_MD, ", ".join(f"{n} {p['status']}" for n, p in report.data["phases"].items()))
    return 1 if any(s in ("error", "failed", "timed out") for s in statuses) else 0


if __name__ == "__main__":
    sys.exit(main())
