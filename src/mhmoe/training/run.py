"""A whole training run, everything ``mhmoe train`` does: ``run_training(RunOptions)`` checks
the run folder, prepares the data (``mhmoe.data.prepare``), builds the model of a preset and
variant, writes config.json (the run's config tree: preset, variant, model with its BitNet
options, training, data) and runs ``mhmoe.training.loop.train_loop``, under torchrun too.
The loop's contract (loss, resumption, the non-finite guard): ``mhmoe.training.loop``; the
hyper-parameters and their defaults: ``mhmoe.training.config``.

Order (issue 16: nothing is half-written when a run is refused): every option, the variant's
model config, the thread count and the batch's memory are checked before the run folder is
touched; the folder is then locked (``mhmoe.runs.lock``: one trainer per folder, a second one
is refused naming the holder's pid); a run that fails before its first checkpoint removes the
folder again when this call created it (or found it empty).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mhmoe import checks, distributed
from mhmoe.config import LOAD_BALANCING, ModelConfig, bitnet_config_keeping
from mhmoe.data import TrainBatchSampler
from mhmoe.data.prepare import prepare_run_data
from mhmoe.evaluate import token_byte_lengths
from mhmoe.model import TransformerLM
from mhmoe.planning.variants import parse_variant, variant_label
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs import lock as run_lock
from mhmoe.runs.metrics import tensorboard_available
from mhmoe.runs.validation import (
    check_free_space,
    check_output_dir,
    checkpoint_bytes_estimate,
)
from mhmoe.runtime import (
    available_cores,
    check_threads,
    default_threads,
    load_average,
    max_threads,
    resolve_device,
    seed_everything,
)
from mhmoe.training.config import RESUMABLE_CHANGES, TrainConfig, default_save_every
from mhmoe.training.loop import LoopResult, check_compile_works, train_loop
from mhmoe.training.presets import get_preset, model_config, variant_summary
from mhmoe.version import __version__

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Schedule, optimiser, device
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# A whole run: run directory, data, model, config.json, loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Everything ``mhmoe train`` accepts. None means "the preset's default".

    ``variant`` is a variant name (``mhmoe.planning.variants``), flags already applied. ``data_dir``
    holds the tokenizer and token caches (default RUN_DIR/data; ``mhmoe reproduce`` shares one
    across its runs). ``tokenizer`` loads a tokenizer.json instead of training one.
    """

    out: Path
    preset: str = "tiny"
    variant: str = "smoe"
    data: list[str] = field(default_factory=lambda: ["stdlib"])
    eval: dict[str, str] = field(default_factory=dict)
    tokenizer: Path | None = None
    data_dir: Path | None = None
    vocab_size: int | None = None
    heldout_fraction: float = 0.05
    max_train_bytes: int | None = None
    max_eval_bytes: int | None = None
    tokens: int | None = None
    max_steps: int | None = None
    seed: int = 0
    batch_size: int | None = None
    micro_batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    schedule: str = "polynomial"
    weight_decay: float = 0.01
    clip_grad_norm: float | None = 2.0
    bitnet: bool = False
    bitnet_full_precision: tuple[str, ...] = ()  # mhmoe.config.BITNET_FULL_PRECISION keys
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0
    load_balancing: str = "micro-batch"  # mhmoe.config.LOAD_BALANCING
    seq_aux_loss_weight: float = 0.0
    eval_tokens: int | None = None
    final_eval_tokens: int | None = None
    eval_every: int | None = None
    eval_fractions: tuple[float, ...] = (0.5, 1.0)
    save_every: int | None = None
    save_minutes: float | None = None  # None: the default (DEFAULT_SAVE_MINUTES); 0: off
    keep_checkpoints: int = 2
    resume: bool = False
    stop_at_step: int | None = None
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_skipped_steps: int = 5
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    compile: bool = False  # the training forward under torch.compile
    compile_backend: str = "inductor"  # mhmoe.training.config.COMPILE_BACKENDS
    allow_unchecked_state: bool = False  # accept checkpoints whose state.json lacks its checksum
    progress_every: float | None = None  # seconds between progress log lines off a terminal (0: off)
    quiet: bool = False
    tensorboard: bool = False
    command: list[str] | None = None
    dp: str | None = None  # under torchrun: "ddp" (default) or "fsdp" (mhmoe.distributed)
    ep: int = 1  # expert-parallel size under torchrun


@dataclass
class RunResult:
    """A finished (or stopped) run: its folder, config.json content, loop result and the
    trained model (in memory, on the training device)."""

    run_dir: Path
    config: dict[str, Any]
    loop: LoopResult
    model: TransformerLM | None = None


def train_config_for(options: RunOptions, preset: Any) -> TrainConfig:
    """The TrainConfig of a run: the preset's defaults, overridden by ``options``."""
    batch_size = options.batch_size or preset.batch_size
    seq_len = options.seq_len or preset.seq_len
    micro = options.micro_batch_size or min(preset.micro_batch_size, batch_size)
    if batch_size % micro != 0:
        micro = math.gcd(batch_size, micro)
    tokens_per_step = batch_size * seq_len
    if options.tokens is not None and options.max_steps is not None:
        raise ValueError("--tokens and --max-steps: give one of them (both set the run's length)")
    if options.max_steps is not None:
        checks.positive_int("--max-steps", options.max_steps)
        total_steps = options.max_steps
    else:
        tokens = preset.tokens if options.tokens is None else options.tokens
        checks.positive_int("--tokens", tokens)
        total_steps = tokens // tokens_per_step
        if total_steps < 1:
            # Name what was given: --seq-len 99999999999999999999 used to blame "--tokens 1536",
            # the preset's budget, which the user never passed (issue 16).
            budget = f"--tokens {tokens}" if options.tokens is not None else f"the preset's budget of {tokens} tokens"
            given = [f"--{name.replace('_', '-')} {getattr(options, name)}"
                     for name in ("batch_size", "seq_len") if getattr(options, name) is not None]
            raise ValueError(
                f"{' and '.join(given) + ': ' if given else ''}one optimiser step of {tokens_per_step} tokens "
                f"(batch {batch_size} x sequence {seq_len}) exceeds {budget}; "
                f"{'lower them or ' if given else ''}raise --tokens or pass --max-steps"
            )
    if options.warmup_steps is not None:
        warmup = options.warmup_steps
    else:
        # The preset's warmup, scaled down when the run is shorter than the preset's budget
        # (never more than 10% of the steps): the paper keeps 375 of 100k.
        warmup = min(preset.warmup_steps, max(0, int(0.1 * total_steps)))
    return TrainConfig(
        total_steps=total_steps,
        batch_size=batch_size,
        micro_batch_size=micro,
        seq_len=seq_len,
        lr=options.lr if options.lr is not None else preset.lr,
        warmup_steps=warmup,
        schedule=options.schedule,
        weight_decay=options.weight_decay,
        clip_grad_norm=options.clip_grad_norm,
        seed=options.seed,
        eval_every=options.eval_every,
        eval_fractions=tuple(options.eval_fractions),
        eval_tokens=options.eval_tokens if options.eval_tokens is not None else preset.eval_tokens,
        final_eval_tokens=_final_eval_tokens(options, preset),
        eval_batch_size=preset.eval_batch_size,
        save_every=options.save_every if options.save_every is not None else default_save_every(total_steps),
        **_optional_seconds(options),
        keep_checkpoints=options.keep_checkpoints,
        device=options.device,
        precision=options.precision,
        threads=options.threads,
        max_skipped_steps=options.max_skipped_steps,
        activation_checkpointing=options.activation_checkpointing,
        compile=options.compile,
        compile_backend=options.compile_backend,
    )


def _optional_seconds(options: RunOptions) -> dict[str, Any]:
    """``save_minutes`` / ``progress_seconds`` of TrainConfig: the default when not given, 0 = off."""
    fields: dict[str, Any] = {}
    if options.save_minutes is not None:
        fields["save_minutes"] = options.save_minutes or None
    if options.progress_every is not None:
        fields["progress_seconds"] = options.progress_every or None
    return fields


def _final_eval_tokens(options: RunOptions, preset: Any) -> int | None:
    """--final-eval-tokens, else the preset's (never fewer than an explicit --eval-tokens)."""
    if options.final_eval_tokens is not None:
        return options.final_eval_tokens
    if preset.final_eval_tokens is None:
        return None
    if options.eval_tokens is not None:
        return max(options.eval_tokens, preset.final_eval_tokens)
    return preset.final_eval_tokens


def _versions() -> dict[str, str]:
    return {"mhmoe": __version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def _compare_for_resume(old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    """Raise if a resumed run's settings differ from those it was started with."""
    differences = []
    for section in ("preset", "variant", "data"):
        if old.get(section) != new.get(section):
            differences.append(section)
    if ckpt.run_model_config(old) != ckpt.run_model_config(new):
        differences.append("model")
    old_train, new_train = old.get("train", {}), new.get("train", {})
    # A field added after the run started is missing from its config.json: it had the default.
    defaults = TrainConfig.field_defaults()
    old_train = {**{k: v for k, v in defaults.items() if k not in old_train}, **old_train}
    for key in sorted(set(old_train) | set(new_train)):
        if key in RESUMABLE_CHANGES:
            continue
        if old_train.get(key) != new_train.get(key):
            differences.append(f"{key} ({old_train.get(key)!r} -> {new_train.get(key)!r})")
    if differences:
        raise ValueError(
            f"--resume: {run_dir / ckpt.CONFIG_FILE} was written with other settings "
            f"({', '.join(differences)}); rerun with the original options or use another --out"
        )


def _per_rank_batch(config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(sequences per step, micro-batch) on each of ``world_size`` processes: ``batch_size`` is
    the global batch. A micro-batch that does not fit the per-rank rows shrinks to a divisor of
    them (the micro-batch is a memory knob; the aux losses then average over the smaller
    micro-batches, as a single process with that micro-batch would). ValueError unless the
    batch divides over the processes."""
    if config.batch_size % world_size != 0:
        raise ValueError(
            f"--batch-size {config.batch_size}: the global batch does not divide over "
            f"{world_size} processes"
        )
    per_rank = config.batch_size // world_size
    micro = math.gcd(per_rank, config.micro_batch)
    if micro != config.micro_batch:
        logger.info("micro-batch %d -> %d: each of the %d processes gets %d sequences per step",
                    config.micro_batch, micro, world_size, per_rank)
    return per_rank, micro


def data_settings(options: RunOptions, preset: Any) -> dict[str, Any]:
    """The data section of config.json (how to rebuild the token caches)."""
    return {
        "sources": list(options.data),
        "eval": dict(options.eval),
        "heldout_fraction": options.heldout_fraction,
        "max_train_bytes": options.max_train_bytes if options.max_train_bytes is not None else preset.train_text_bytes,
        "max_eval_bytes": options.max_eval_bytes if options.max_eval_bytes is not None else preset.eval_text_bytes,
        "vocab_size": options.vocab_size or preset.vocab_size,
        "tokenizer_sample_bytes": preset.tokenizer_text_bytes,
        "tokenizer": None if options.tokenizer is None else str(Path(options.tokenizer).resolve()),
    }


BATCH_MEMORY_SHARE = 0.5
"""A step's token batch (inputs and targets, int64) may use at most this share of the
machine's memory: ``--batch-size 1000000000`` ended in a MemoryError traceback (issue 16)."""


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def check_batch_memory(config: TrainConfig) -> None:
    """ValueError naming --batch-size and --seq-len when one step's token batch cannot fit."""
    needed = 2 * 8 * config.batch_size * config.seq_len
    memory = _physical_memory()
    if memory is not None and needed > BATCH_MEMORY_SHARE * memory:
        raise ValueError(
            f"--batch-size {config.batch_size} x --seq-len {config.seq_len}: one step's token batch "
            f"needs {needed / 2**30:,.1f} GiB, more than half of this machine's {memory / 2**30:,.1f} GiB "
            "of memory; lower --batch-size or --seq-len"
        )


def _threads(options: RunOptions, previous: dict[str, Any] | None, processes: int) -> int:
    """The torch threads of this run: --threads; else the count the run recorded when it started
    (a resume computes with the same kernels: bit-identical results); else
    ``default_threads`` from the load average (logged, and recorded in config.json)."""
    if options.threads is not None:
        return options.threads
    recorded = (previous or {}).get("train", {}).get("threads") if options.resume else None
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
        if recorded > max_threads():
            logger.warning("the run recorded %d torch threads; this machine allows %d", recorded, max_threads())
            return max_threads()
        return recorded
    threads = default_threads(processes)
    load = load_average()
    logger.info("%d torch thread(s) per process: %d usable cores, load average %s (pass --threads to choose)",
                threads, available_cores(), "unknown" if load is None else f"{load:.1f}")
    return threads


def _folder_is_fresh(path: Path) -> bool:
    """Whether ``path`` does not exist yet or is an empty folder (a refused run removes it)."""
    try:
        return not path.exists() or (path.is_dir() and not any(path.iterdir()))
    except OSError:
        return False


def run_model_config(options: RunOptions, preset: Any, spec: Any, vocab_size: int, seq_len: int) -> ModelConfig:
    """The ModelConfig of a run: the variant at the preset's scale with the run's loss weights
    and load balancing (``--load-balancing`` goes to the MoE layers' config; a dense model has
    nothing to balance and ignores it)."""
    config = model_config(
        preset, spec, vocab_size=vocab_size, max_seq_len=seq_len,
        load_balancing_weight=options.load_balancing_weight, z_loss_weight=options.z_loss_weight,
        seq_aux_loss_weight=options.seq_aux_loss_weight, 
        bitnet=bitnet_config_keeping(options.bitnet_full_precision) if options.bitnet else None,
    )
    if config.moe_ffn is not None and config.moe_ffn.load_balancing != options.load_balancing:
        config = config.replace(moe_ffn=config.moe_ffn.replace(load_balancing=options.load_balancing))
    return config


def run_training(options: RunOptions) -> RunResult:
    """Do what ``mhmoe train`` does (module docstring); returns the run dir, config and loop result."""

    preset = get_preset(options.preset)
    spec = parse_variant(options.variant)
    if options.threads is not None:
        check_threads("--threads", options.threads)
    if options.stop_at_step is not None:
        checks.positive_int("--stop-at-step", options.stop_at_step)
    checks.number("--load-balancing-weight", options.load_balancing_weight, low=0)
    checks.number("--z-loss-weight", options.z_loss_weight, low=0)
    checks.number("--seq-aux-loss-weight", options.seq_aux_loss_weight, low=0)
    if options.load_balancing not in LOAD_BALANCING:
        raise ValueError(f"--load-balancing {options.load_balancing!r}: must be one of {', '.join(LOAD_BALANCING)}")
    if options.bitnet_full_precision and not options.bitnet:
        raise ValueError(f"--bitnet-full-precision {' '.join(options.bitnet_full_precision)}: needs --bitnet")
    train_config = train_config_for(options, preset)
    check_batch_memory(train_config)
    if train_config.compile:
        if os.environ.get("WORLD_SIZE", "1").strip() != "1" or (dist.is_available() and dist.is_initialized()):
            # Not tested with DDP, FSDP2 or expert parallelism (their hooks and collectives).
            raise ValueError("--compile: single-process training only (not under torchrun); run without --compile")
    device = resolve_device(options.device)  # a bad --device fails before the data is prepared
    if train_config.compile:
        check_compile_works(train_config.compile_backend, device)  # no compiler: one line, now
    # The variant's model at this scale (e.g. d_model divisible by the heads) is checked before
    # any data work; the vocabulary is the tokenizer's later, which no shape rule depends on.
    run_model_config(options, preset, spec, options.vocab_size or preset.vocab_size, train_config.seq_len)

    fresh = _folder_is_fresh(Path(options.out))
    run_dir = check_output_dir(options.out)
    main_process = int(os.environ.get("RANK") or 0) == 0  # torchrun: rank 0 writes and locks
    if main_process:
        try:
            run_lock.acquire(run_dir, "mhmoe train")
        except BaseException:
            # Refused: remove the folder only if it is still empty. Another trainer may have
            # created it a moment ago and be holding it (its lock file makes rmdir fail), so
            # never delete anything without the lock.
            if fresh:
                with contextlib.suppress(OSError):
                    run_dir.rmdir()
            raise
    try:
        return _run_training(options, preset, spec, run_dir, train_config)
    except BaseException:
        # Nothing half-written stays behind: a run refused or failed before its first
        # checkpoint leaves no folder it created (data caches under it included).
        if main_process and fresh and not ckpt.has_checkpoints(run_dir):
            logger.debug("removing %s: the run failed before its first checkpoint", run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    finally:
        if main_process:
            run_lock.release(run_dir)


def _run_training(options: RunOptions, preset: Any, spec: Any, run_dir: Path, train_config: TrainConfig) -> RunResult:
    """``run_training`` once the folder is locked."""

    # Under torchrun (WORLD_SIZE > 1): join the job; otherwise a single-process context.
    context = distributed.init_distributed(
        distributed.ParallelConfig(options.dp or "ddp", options.ep), device=options.device
    )
    per_rank_batch, per_rank_micro = _per_rank_batch(train_config, context.world_size)
    has_checkpoint = ckpt.has_checkpoints(run_dir)  # intact or not (--resume falls back)
    previous = ckpt.read_run_config(run_dir) if (run_dir / ckpt.CONFIG_FILE).is_file() else None
    train_config = train_config.replace(threads=_threads(options, previous, context.local_world_size))
    if has_checkpoint and not options.resume:
        raise ValueError(
            f"--out {run_dir}: already holds a trained run; pass --resume to continue it "
            "or choose another folder"
        )
    if options.tensorboard and not tensorboard_available():
        raise ValueError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")

    settings = data_settings(options, preset)
    resuming = options.resume and previous is not None
    data_dir = Path(options.data_dir) if options.data_dir is not None else run_dir / "data"
    run_tokenizer = run_dir / ckpt.TOKENIZER_FILE
    tokenizer_path = run_tokenizer if resuming and run_tokenizer.is_file() else None
    with distributed.main_rank_first(context):  # rank 0 builds the caches, the others reuse them
        data = prepare_run_data(settings, data_dir, tokenizer_path)
    tokenizer = data.tokenizer
    epochs = train_config.total_tokens / max(1, data.train.n_tokens)
    if epochs > 1:
        logger.warning("the budget of %s tokens is %.1f passes over the %s training tokens; "
                       "pass more text with --data for a single pass",
                       f"{train_config.total_tokens:,}", epochs, f"{data.train.n_tokens:,}")
    if tokenizer_path is None and context.is_main:
        tokenizer.save(run_tokenizer)  # the run folder is self-contained

    model_cfg = run_model_config(options, preset, spec, tokenizer.vocab_size, train_config.seq_len)
    run_config = {
        "format": ckpt.RUN_FORMAT,
        "preset": preset.name,
        "variant": spec.name,
        "label": variant_label(spec.name),
        "model": model_cfg.to_dict(),
        "train": train_config.to_dict(),
        "data": settings,
        "data_dir": str(data_dir.resolve()),
        "tokenizer_sha256": tokenizer.sha256,
        "counts": variant_summary(model_cfg, train_config.seq_len),
        "versions": _versions(),
        "command": options.command,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if previous is not None and (has_checkpoint or options.resume):
        comparable = {**run_config, "data": {**settings, "tokenizer": previous["data"].get("tokenizer")}}
        if resuming:
            _compare_for_resume(previous, comparable, run_dir)
        run_config["created"] = previous.get("created", run_config["created"])
    if context.is_main:
        # Fail now, not after hours of training, when the disk cannot hold one checkpoint.
        check_free_space(run_dir, checkpoint_bytes_estimate(run_config["counts"]["params"]))
        ckpt.atomic_write_json(run_dir / ckpt.CONFIG_FILE, run_config)

    if not data.evals:
        logger.warning("no evaluation set (heldout fraction 0 and no --eval): perplexity will not be measured")
    seed_everything(train_config.seed)
    model = TransformerLM(model_cfg)
    # Every rank draws the same global batch and keeps its own rows of it.
    sampler = TrainBatchSampler(data.train.tokens, per_rank_batch, train_config.seq_len,
                                seed=train_config.seed, rank=context.rank, world_size=context.world_size)
    logger.info(
        "%s / %s: %s parameters (%s active), %d steps of %d tokens",
        preset.name, spec.name, f"{run_config['counts']['params']:,}",
        f"{run_config['counts']['active_params']:,}", train_config.total_steps, train_config.tokens_per_step,
    )
    try:
        loop = train_loop(
            model, sampler, data.evals, train_config.replace(micro_batch_size=per_rank_micro), run_dir,
            resume=options.resume, stop_at_step=options.stop_at_step, quiet=options.quiet,
            tensorboard=options.tensorboard, byte_lengths=token_byte_lengths(tokenizer),
            progress_label=spec.name, context=context, allow_unchecked_state=options.allow_unchecked_state,
        )
    finally:
        distributed.shutdown_distributed(context)
    return RunResult(run_dir, run_config, loop, model)
