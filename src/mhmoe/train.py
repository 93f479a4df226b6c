"""Training: configuration, learning-rate schedules, the loop, checkpoints and resumption.

Defaults follow the authors' public training scripts (the paper itself gives only the
load-balancing weight): AdamW with betas (0.9, 0.98), weight decay 0.01, gradient clipping at
2.0, 375 warmup steps then polynomial (linear, power 1) decay to 0 (fairseq's
``polynomial_decay``); cosine decay is an option. Small presets scale the warmup down.

One optimiser step consumes ``batch_size`` sequences of ``seq_len`` tokens, processed
``micro_batch_size`` at a time with gradient accumulation. The loss that is minimised is

    L = L_lm + aux_loss,   aux_loss = w_lb * mean_l L_lb(l) + w_z * mean_l L_z(l)

(``mhmoe.model``); ``loss`` in metrics.jsonl is L_lm alone (nats per token), averaged over the
step's micro-batches.

Precision: bf16 autocast on CUDA, fp32 on CPU (``precision="auto"``). Threads: torch uses one
thread per usable core, fewer when the machine is already busy (``default_threads``;
``threads`` overrides).

Resumption continues the same run exactly: model, optimiser, data-sampler position, the
RNG states of torch (CPU and CUDA), ``random`` and numpy, and the step (the schedule is a pure
function of the step). On CPU, an interrupted and resumed run produces bit-identical losses to
an uninterrupted one (tested). Lines of metrics.jsonl written after the checkpoint that a
resumed run starts from are dropped, so the file reads as one uninterrupted run. ``--resume``
removes leftovers of a killed save and continues from the newest *intact* checkpoint (a
corrupted one is skipped with a warning; ``mhmoe.checkpoint.find_resume_checkpoint``).

Numerical guard: a step whose loss, aux loss or gradient norm is not finite is skipped (no
parameter or optimiser-state update; the step, data position and schedule still advance) and
counted (``skipped_steps`` in metrics.jsonl, saved in checkpoints); ``max_skipped_steps``
consecutive skips stop the run with ``mhmoe.validation.NonFiniteError`` naming the step, the
values, the first module whose output and the first parameter whose gradient went non-finite.
See docs/reliability.md.

Two layers:

* ``train_loop(...)``: the loop on a built model, sampler and evaluation sets;
* ``run_training(RunOptions)``: everything ``mhmoe train`` does: the run directory, data
  (``mhmoe.data.prepare_data``), model from a preset and variant, config.json, the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mhmoe import checkpoint as ckpt
from mhmoe.evaluate import EvalResult, autocast_context, evaluate_sets, metrics_line, token_byte_lengths
from mhmoe.analytics import RoutingStatsAccumulator
from mhmoe.model import TransformerLM, lm_loss
from mhmoe.validation import (
    NonFiniteError,
    check_free_space,
    checkpoint_bytes_estimate,
    describe_diagnosis,
    diagnose_non_finite,
    format_value,
    probe_writable,
)
from mhmoe.quant import BitNetConfig, apply_bitnet

logger = logging.getLogger(__name__)

__all__ = [
    "PRECISIONS",
    "SCHEDULES",
    "MetricsLog",
    "RunOptions",
    "RunResult",
    "TrainConfig",
    "build_optimizer",
    "learning_rate",
    "read_metrics",
    "resolve_device",
    "resolve_precision",
    "run_training",
    "train_loop",
]

SCHEDULES = ("polynomial", "cosine", "constant", "two-stage")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:N"

# TrainConfig fields that may differ when a run is resumed (they do not change the results).
RESUMABLE_CHANGES = frozenset({
    "save_every", "keep_checkpoints", "log_every", "threads", "device", "eval_batch_size",
    "max_skipped_steps",
})


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer" + (" or None" if allow_none else ""))


def _number(name: str, value: Any, *, low: float, high: float | None = None,
            low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: must be a finite number")
    ok = value >= low if low_inclusive else value > low
    if high is not None:
        ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        lo = "[" if low_inclusive else "("
        hi = "" if high is None else (f"{high}]" if high_inclusive else f"{high})")
        raise ValueError(f"{name}={value!r}: must be in {lo}{low}, {hi or 'inf)'}")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (validated; JSON round-trip via to_dict/from_dict).

    ``total_steps`` sets the schedule's length; evaluations happen at ``eval_fractions`` of it
    (the paper's 50k and 100k of 100k steps: 0.5 and 1.0) and every ``eval_every`` steps.
    Checkpoints are written every ``save_every`` steps, at every evaluation and at the end; the
    ``keep_checkpoints`` newest periodic ones are kept, evaluation and final ones always.
    ``max_skipped_steps`` consecutive non-finite steps stop the run (module docstring).
    """

    total_steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    micro_batch_size: int | None = None
    schedule: str = "polynomial"
    end_lr: float = 0.0
    power: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-8
    weight_decay: float = 0.01
    clip_grad_norm: float | None = 2.0
    seed: int = 0
    eval_fractions: tuple[float, ...] = (0.5, 1.0)
    eval_every: int | None = None
    eval_tokens: int | None = 65_536
    eval_batch_size: int = 8
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_skipped_steps: int = 5

    def __post_init__(self) -> None:
        if isinstance(self.eval_fractions, list):
            object.__setattr__(self, "eval_fractions", tuple(self.eval_fractions))
        for name in ("total_steps", "batch_size", "seq_len", "eval_batch_size", "keep_checkpoints", "log_every",
                     "max_skipped_steps"):
            _positive_int(name, getattr(self, name))
        for name in ("micro_batch_size", "eval_every", "eval_tokens", "save_every", "threads"):
            _positive_int(name, getattr(self, name), allow_none=True)
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r}: must be a non-negative integer")
        if self.warmup_steps >= self.total_steps and self.total_steps > 1:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}: must be less than the {self.total_steps} training steps"
            )
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size != 0:
            raise ValueError(
                f"batch_size={self.batch_size}: must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        _number("lr", self.lr, low=0, low_inclusive=False)
        _number("end_lr", self.end_lr, low=0)
        if self.end_lr > self.lr:
            raise ValueError(f"end_lr={self.end_lr}: must not exceed lr={self.lr}")
        _number("power", self.power, low=0, low_inclusive=False)
        _number("beta1", self.beta1, low=0, high=1, high_inclusive=False)
        _number("beta2", self.beta2, low=0, high=1, high_inclusive=False)
        _number("adam_eps", self.adam_eps, low=0, low_inclusive=False)
        _number("weight_decay", self.weight_decay, low=0)
        if self.clip_grad_norm is not None:
            _number("clip_grad_norm", self.clip_grad_norm, low=0, low_inclusive=False)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: must be a non-negative integer")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {', '.join(PRECISIONS)}")
        if not isinstance(self.eval_fractions, tuple):
            raise ValueError(f"eval_fractions={self.eval_fractions!r}: must be a list of numbers in (0, 1]")
        for fraction in self.eval_fractions:
            _number("eval_fractions", fraction, low=0, high=1, low_inclusive=False)
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device={self.device!r}: must be {DEVICES_HELP}")

    @property
    def micro_batch(self) -> int:
        return self.batch_size if self.micro_batch_size is None else self.micro_batch_size

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.tokens_per_step

    def eval_steps(self) -> list[int]:
        """Steps after which the model is evaluated (fractions of the run, every eval_every)."""
        steps = {max(1, round(f * self.total_steps)) for f in self.eval_fractions}
        if self.eval_every:
            steps |= set(range(self.eval_every, self.total_steps + 1, self.eval_every))
        return sorted(steps)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eval_fractions"] = list(self.eval_fractions)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        from mhmoe.model import _check_fields

        if not isinstance(data, dict):
            raise ValueError(f"training config {data!r}: must be a JSON object")
        _check_fields("training config", cls, data)
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# Schedule, optimiser, device
# ---------------------------------------------------------------------------------------------


def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step ``step`` (1-based).

    Linear warmup lr * step / warmup for step <= warmup; then, with progress
    p = (step - warmup) / (total - warmup):
    polynomial (fairseq ``polynomial_decay``): end + (lr - end) * (1 - p)^power;
    cosine: end + (lr - end) * (1 + cos(pi p)) / 2; constant: lr;
    two-stage: the BitNet FAQ's schedule (``mhmoe.quant.two_stage_schedule``).
    """
    peak, end, warmup, total = config.lr, config.end_lr, config.warmup_steps, config.total_steps
    if config.schedule == "two-stage":
        from mhmoe.quant import two_stage_schedule

        return two_stage_schedule(step - 1, total, peak, warmup_steps=warmup, final_lr=end)[0]
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if config.schedule == "constant" or total <= warmup:
        return peak
    progress = min(1.0, max(0.0, (step - warmup) / (total - warmup)))
    if config.schedule == "polynomial":
        return end + (peak - end) * (1.0 - progress) ** config.power
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(step: int, config: TrainConfig) -> float:
    """Weight decay of the decayed parameter group at optimiser step ``step`` (1-based):
    ``config.weight_decay``, except under the two-stage schedule, where it drops to 0 for the
    second half (BitNet FAQ)."""
    if config.schedule != "two-stage":
        return config.weight_decay
    from mhmoe.quant import two_stage_schedule

    return two_stage_schedule(step - 1, config.total_steps, config.lr, warmup_steps=config.warmup_steps,
                              final_lr=config.end_lr, weight_decay=config.weight_decay)[1]


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (fused kernel where available); weight decay on matrices and stacked expert
    weights (ndim >= 2), none on norm gains and biases (ndim 1). Build it after moving the
    model to its device."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    options = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps)
    # The fused kernel (CPU and CUDA) is several times faster than the per-tensor loop for the
    # many small tensors of an MoE model; fall back where this torch or device lacks it.
    try:
        return torch.optim.AdamW(groups, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **options)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; otherwise the named device (checked)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: must be {DEVICES_HELP}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine (use cpu or auto)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: must be {DEVICES_HELP}")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 on CUDA for ``auto``, None (fp32) on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" else None


def available_cores() -> int:
    """Cores this process may run on (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch threads when not given: one per usable core (deterministic, so a resumed run
    computes with the same kernels). On a machine already busy with other processes,
    oversubscribed OpenMP threads spin and run several times slower: pass ``threads``."""
    return available_cores()


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), ``random`` and numpy's legacy global generator."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class MetricsLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (flushed per line); optional TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=False) + "\n")
        self._handle.flush()
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop lines of a metrics file whose step is beyond ``step`` (resuming from ``step``)."""
        path = Path(path)
        if not path.is_file():
            return
        kept = [line for line in read_metrics(path, strict=False) if int(line.get("step", 0)) <= step]
        ckpt.atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in kept))


def read_metrics(path: Path, strict: bool = True) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; ``strict=False`` skips a torn last line."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise ValueError(f"{path}:{number}: not valid JSON") from None
    return records


def _tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopResult:
    step: int
    tokens: int
    last_loss: float | None
    evals: dict[int, dict[str, EvalResult]] = field(default_factory=dict)
    finished: bool = False
    seconds: float = 0.0


def train_loop(
    model: TransformerLM,
    sampler: Any,
    eval_sets: dict[str, Any],
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    stop_at_step: int | None = None,
    quiet: bool = False,
    tensorboard: bool = False,
    byte_lengths: np.ndarray | None = None,
    progress_label: str = "train",
    on_eval: Callable[[int, dict[str, EvalResult]], None] | None = None,
    context: Any = None,
) -> LoopResult:
    """Train ``model`` for ``config.total_steps`` steps, evaluating and checkpointing into ``run_dir``.

    ``sampler``: ``next_batch() -> (inputs_BT, targets_BT)`` of ``config.batch_size`` rows,
    with ``state_dict()``/``load_state_dict()`` (``mhmoe.data.TrainBatchSampler``).
    ``eval_sets``: name -> ``TokenSet``. ``resume`` continues from the latest checkpoint in
    ``run_dir`` when there is one. ``stop_at_step`` ends early after checkpointing that step
    (a later ``resume`` continues), e.g. to fit a job's time limit.
    """
    from mhmoe import distributed

    # ``context`` (mhmoe.distributed.init_distributed): under torchrun, ``sampler`` yields this
    # rank's rows of each global batch, the model is wrapped per context.parallel (DDP, FSDP2,
    # expert parallelism), and rank 0 alone writes metrics and checkpoints. None: one process.
    run_dir = Path(run_dir)
    if context is None or not context.is_distributed:
        context = distributed.DistContext.single_process(resolve_device(config.device))
    device = context.device
    autocast_dtype = resolve_precision(config.precision, device)
    if stop_at_step is not None:
        _positive_int("stop_at_step", stop_at_step)
    # The node's cores are shared by its processes.
    threads = config.threads or max(1, default_threads() // context.local_world_size)
    torch.set_num_threads(threads)
    logger.info("device %s, %s, %d torch threads (%d cores)", device,
                "fp32" if autocast_dtype is None else f"{autocast_dtype} autocast", threads, available_cores())
    parallel = distributed.parallelize(model, context)  # a single process: only model.to(device)
    model = parallel.model
    model.train()
    optimizer = build_optimizer(model, config)
    eval_steps = set(config.eval_steps())
    metrics_path = run_dir / ckpt.METRICS_FILE

    start_step = 0
    tokens_seen = 0
    last_loss: float | None = None
    skipped_total = consecutive_skips = 0  # non-finite steps (mhmoe.validation)
    if context.is_main:
        ckpt.clean_incomplete_saves(run_dir)  # temp files and folders of a killed save
    context.barrier()
    # The newest intact checkpoint: a corrupted one is skipped with a warning (checkpoint.py).
    found = ckpt.find_resume_checkpoint(run_dir) if resume else None
    if found is not None:
        folder, state = found
        skipped_total = int(state.get("skipped_steps", 0))
        consecutive_skips = int(state.get("consecutive_skipped_steps", 0))
        if context.is_distributed:  # full files, each rank keeps its shards
            distributed.load_checkpoint(parallel, optimizer, folder, state)
        else:
            ckpt.load_model_weights(folder, model, state)
            ckpt.load_optimizer_state(folder, optimizer, state)
        sampler.load_state_dict(state["sampler"])
        ckpt.load_rng_state(folder, state)
        start_step = int(state["step"])
        tokens_seen = int(state["tokens"])
        last_loss = state.get("loss")
        if context.is_main:
            MetricsLog.truncate_after(metrics_path, start_step)
        logger.info("resuming %s from step %d (%s)", run_dir, start_step, folder)
        if state.get("finished") or start_step >= config.total_steps:
            logger.info("%s: training already finished at step %d", run_dir, start_step)
            return LoopResult(start_step, tokens_seen, last_loss, finished=True)
    elif context.is_main:
        metrics_path.unlink(missing_ok=True)

    if tensorboard and not _tensorboard_available():
        raise ValueError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    log = (MetricsLog(metrics_path, run_dir / "tensorboard" if tensorboard else None)
           if context.is_main else _NullMetrics())
    progress = _progress_bar(config.total_steps, start_step, quiet or not context.is_main, progress_label)
    # Routing statistics (mhmoe.analytics) from the counts each MoE layer returns; per rank.
    routing = RoutingStatsAccumulator().attach(model)
    result = LoopResult(start_step, tokens_seen, last_loss)
    accumulation = config.accumulation_steps // context.world_size  # of this rank's rows
    micro = config.micro_batch
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, config)  # the decay group
            inputs_BT, targets_BT = sampler.next_batch()
            lm_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            for chunk in range(accumulation):
                rows = slice(chunk * micro, (chunk + 1) * micro)
                inputs = inputs_BT[rows].to(device, non_blocking=True)
                targets = targets_BT[rows].to(device, non_blocking=True)
                # DDP reduces gradients once, after the last micro-batch.
                last = chunk == accumulation - 1
                with contextlib.nullcontext() if last else parallel.no_sync():
                    with autocast_context(device, autocast_dtype):
                        output = parallel(inputs)
                        lm = lm_loss(output.logits, targets)
                        loss = (lm + output.aux_loss) / accumulation
                    loss.backward()
                routing.update(output.moe_aux)  # counts the layers already computed
                lm_sum += lm.detach()
                aux_sum += output.aux_loss.detach()
            # The norm of the whole gradient, summed over FSDP2 and expert shards.
            max_norm = config.clip_grad_norm if config.clip_grad_norm is not None else math.inf
            grad_norm = float(parallel.clip_grad_norm_(max_norm))
            step_loss = context.all_reduce_mean(lm_sum) / accumulation  # mean over ranks
            step_aux = context.all_reduce_mean(aux_sum) / accumulation
            # Numerical guard (mhmoe.validation): a non-finite loss or gradient skips the update
            # (parameters and optimiser state untouched); step, data and schedule advance.
            skipped = not (math.isfinite(step_loss) and math.isfinite(step_aux) and math.isfinite(grad_norm))
            if skipped:
                skipped_total += 1
                consecutive_skips += 1
                logger.warning("step %d: non-finite loss %s / aux loss %s / gradient norm %s: update skipped "
                               "(%d in a row, %d in all)", step, format_value(step_loss), format_value(step_aux),
                               format_value(grad_norm), consecutive_skips, skipped_total)
                if consecutive_skips >= config.max_skipped_steps:
                    optimizer.zero_grad(set_to_none=True)
                    _raise_non_finite(step, step_loss, step_aux, grad_norm, consecutive_skips, config, run_dir,
                                      None if context.is_distributed else model,
                                      lambda: _micro_batch_loss(parallel, inputs, targets, device, autocast_dtype))
            else:
                consecutive_skips = 0
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += config.tokens_per_step
            window_tokens += config.tokens_per_step
            result.step, result.tokens = step, tokens_seen
            if not skipped:
                result.last_loss = step_loss
            now = time.perf_counter()
            tokens_per_s = window_tokens / max(now - window_start, 1e-9)
            if step % config.log_every == 0 or step == config.total_steps:
                log.write({
                    "step": step,
                    "tokens": tokens_seen,
                    "loss": step_loss,
                    "aux_loss": step_aux,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "skipped_steps": skipped_total,
                    **({"skipped": True} if skipped else {}),
                    "tokens_per_s": round(tokens_per_s, 1),
                    "elapsed_s": round(now - started, 3),
                    **routing.summary(),
                })
                routing.reset()
                window_start, window_tokens = now, 0
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

            if step in eval_steps and eval_sets:
                results = evaluate_sets(
                    model, eval_sets, seq_len=config.seq_len, batch_size=config.eval_batch_size,
                    max_tokens=config.eval_tokens, byte_lengths=byte_lengths, device=device,
                    autocast_dtype=autocast_dtype,
                )
                log.write({"step": step, "tokens": tokens_seen,
                           "fraction": round(step / config.total_steps, 6), **metrics_line(results)})
                result.evals[step] = results
                if on_eval is not None:
                    on_eval(step, results)
                summary = ", ".join(f"{n} ppl {r.ppl:.2f}" for n, r in results.items())
                (progress.write if not progress.disable else logger.info)(
                    f"step {step}/{config.total_steps}: {summary}")
                window_start = time.perf_counter()  # evaluation time is not training throughput

            finished = step == config.total_steps
            stopping = stop_at_step is not None and step >= stop_at_step
            periodic = config.save_every is not None and step % config.save_every == 0
            if finished or stopping or periodic or step in eval_steps:
                _save(run_dir, step, parallel, optimizer, sampler, tokens_seen, step_loss, config,
                      finished=finished, milestone=finished or step in eval_steps,
                      extra={"skipped_steps": skipped_total, "consecutive_skipped_steps": consecutive_skips})
            if stopping and not finished:
                logger.info("stopped after step %d as asked; continue with --resume", step)
                break
        else:
            result.finished = True
        if config.total_steps == start_step:
            result.finished = True
    finally:
        routing.detach()
        progress.close()
        log.close()
    result.seconds = time.perf_counter() - started
    return result


def _is_milestone(folder: Path) -> bool:
    """Whether a checkpoint is kept for good (evaluation point, end); an unreadable state.json
    (a damaged checkpoint, skipped on resume) counts as periodic, so retention may remove it."""
    try:
        return bool(ckpt.read_checkpoint_state(folder).get("milestone"))
    except ckpt.CheckpointError:
        return False


def _micro_batch_loss(parallel, inputs: torch.Tensor, targets: torch.Tensor, device: torch.device,
                      autocast_dtype: torch.dtype | None) -> torch.Tensor:
    """The training loss of one micro-batch (re-run to diagnose a non-finite step)."""
    with autocast_context(device, autocast_dtype):
        output = parallel(inputs)
        return lm_loss(output.logits, targets) + output.aux_loss


def _raise_non_finite(step: int, loss: float, aux: float, grad_norm: float, count: int, config: TrainConfig,
                      run_dir: Path, model: torch.nn.Module | None, rerun: Callable[[], torch.Tensor]) -> None:
    """Stop the run after ``count`` consecutive non-finite steps: NonFiniteError naming the
    step, the values and (one process) the first module / gradient that went non-finite."""
    where = "not diagnosed under torch.distributed"
    if model is not None:
        try:
            where = describe_diagnosis(diagnose_non_finite(model, rerun))
        except Exception as err:  # the diagnosis must not hide the actual failure
            where = f"diagnosis failed ({type(err).__name__}: {err})"
    try:
        latest = ckpt.latest_checkpoint(run_dir)
    except ckpt.CheckpointError:
        latest = None
    raise NonFiniteError(
        f"step {step}: loss {format_value(loss)}, aux loss {format_value(aux)}, gradient norm "
        f"{format_value(grad_norm)}; {count} consecutive steps were non-finite "
        f"(--max-skipped-steps {config.max_skipped_steps}); {where}. The last checkpoint "
        f"({latest.name if latest else 'none'}) is intact; check the data and the learning rate"
    )


def _save(run_dir: Path, step: int, parallel, optimizer, sampler, tokens: int, loss: float,
          config: TrainConfig, *, finished: bool, milestone: bool, extra: dict[str, Any] | None = None) -> None:
    state = {
        **(extra or {}),
        "tokens": tokens,
        "total_steps": config.total_steps,
        "loss": loss,
        "sampler": sampler.state_dict(),
        "finished": finished,
        "milestone": milestone,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if parallel.context.is_distributed:
        # Gathers the full state on every rank (a collective); rank 0 writes.
        from mhmoe.distributed import save_checkpoint

        save_checkpoint(parallel, optimizer, run_dir, step, state)
        if not parallel.context.is_main:
            return
    else:
        ckpt.save_checkpoint(run_dir, step, parallel.model, optimizer, state)
    # Retention: milestones (evaluation points, the end) stay; the newest periodic ones rotate.
    periodic = [
        (s, folder) for s, folder in ckpt.list_checkpoints(run_dir)
        if not _is_milestone(folder) and s != step
    ]
    allowed = config.keep_checkpoints - (0 if milestone else 1)
    for _, folder in periodic[: max(0, len(periodic) - allowed)]:
        shutil.rmtree(folder, ignore_errors=True)


class _NullMetrics:
    """MetricsLog of the ranks other than 0: they compute the same numbers, rank 0 writes."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class _NullProgress:
    disable = True

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, quiet: bool, label: str):
    """tqdm on stderr with loss, tokens/s and ETA; off when quiet or stderr is not a terminal."""
    if quiet or not sys.stderr.isatty():
        return _NullProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# A whole run: run directory, data, model, config.json, loop
# ---------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    """Everything ``mhmoe train`` accepts. None means "the preset's default".

    ``variant`` is a variant name (``mhmoe.presets``), flags already applied. ``data_dir``
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
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0
    eval_tokens: int | None = None
    eval_every: int | None = None
    eval_fractions: tuple[float, ...] = (0.5, 1.0)
    save_every: int | None = None
    keep_checkpoints: int = 2
    resume: bool = False
    stop_at_step: int | None = None
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_skipped_steps: int = 5
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


def check_output_dir(path: Path, flag: str = "--out") -> Path:
    """Create ``path`` if needed and check that it is a writable folder (ValueError otherwise)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create the folder ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder is not writable")
    probe_writable(path, flag)  # read-only mounts, root without write access, a full disk
    return path


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
        _positive_int("--max-steps", options.max_steps)
        total_steps = options.max_steps
    else:
        tokens = preset.tokens if options.tokens is None else options.tokens
        _positive_int("--tokens", tokens)
        total_steps = tokens // tokens_per_step
        if total_steps < 1:
            raise ValueError(
                f"--tokens {tokens}: less than one optimiser step of {tokens_per_step} tokens "
                f"(batch {batch_size} x sequence {seq_len})"
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
        eval_batch_size=preset.eval_batch_size,
        save_every=options.save_every,
        keep_checkpoints=options.keep_checkpoints,
        device=options.device,
        precision=options.precision,
        threads=options.threads,
        max_skipped_steps=options.max_skipped_steps,
    )


def _versions() -> dict[str, str]:
    import mhmoe

    return {"mhmoe": mhmoe.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def _compare_for_resume(old: dict[str, Any], new: dict[str, Any], run_dir: Path) -> None:
    """Raise if a resumed run's settings differ from those it was started with."""
    differences = []
    for section in ("preset", "variant", "model", "bitnet", "data"):
        if old.get(section) != new.get(section):
            differences.append(section)
    old_train, new_train = old.get("train", {}), new.get("train", {})
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


def prepare_run_data(settings: dict[str, Any], data_dir: Path, tokenizer_path: Path | None = None,
                     verify_checksum: bool = True):
    """``mhmoe.data.prepare_data`` with a run's data settings (see ``data_settings``)."""
    from mhmoe.data import prepare_data
    from mhmoe.data.tokenizer import DEFAULT_SAMPLE_BYTES

    tokenizer = tokenizer_path if tokenizer_path is not None else settings.get("tokenizer")
    return prepare_data(
        settings["sources"],
        settings["eval"],
        data_dir,
        vocab_size=settings["vocab_size"],
        tokenizer_path=tokenizer,
        heldout_fraction=settings["heldout_fraction"],
        max_train_bytes=settings["max_train_bytes"],
        max_eval_bytes=settings["max_eval_bytes"],
        tokenizer_sample_bytes=settings.get("tokenizer_sample_bytes") or DEFAULT_SAMPLE_BYTES,
        verify_checksum=verify_checksum,
    )


def run_training(options: RunOptions) -> RunResult:
    """Do what ``mhmoe train`` does (module docstring); returns the run dir, config and loop result."""
    from mhmoe.data import TrainBatchSampler
    from mhmoe.presets import get_preset, model_config, parse_variant, variant_label, variant_summary

    preset = get_preset(options.preset)
    spec = parse_variant(options.variant)
    run_dir = check_output_dir(options.out)
    if options.stop_at_step is not None:
        _positive_int("--stop-at-step", options.stop_at_step)
    _number("--load-balancing-weight", options.load_balancing_weight, low=0)
    _number("--z-loss-weight", options.z_loss_weight, low=0)
    train_config = train_config_for(options, preset)
    resolve_device(options.device)  # a bad --device fails before the data is prepared
    from mhmoe import distributed

    # Under torchrun (WORLD_SIZE > 1): join the job; otherwise a single-process context.
    context = distributed.init_distributed(
        distributed.ParallelConfig(options.dp or "ddp", options.ep), device=options.device
    )
    per_rank_batch, per_rank_micro = _per_rank_batch(train_config, context.world_size)
    has_checkpoint = ckpt.has_checkpoints(run_dir)  # intact or not (--resume falls back)
    previous = ckpt.read_run_config(run_dir) if (run_dir / ckpt.CONFIG_FILE).is_file() else None
    if has_checkpoint and not options.resume:
        raise ValueError(
            f"--out {run_dir}: already holds a trained run; pass --resume to continue it "
            "or choose another folder"
        )
    if options.tensorboard and not _tensorboard_available():
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

    model_cfg = model_config(
        preset, spec, vocab_size=tokenizer.vocab_size, max_seq_len=train_config.seq_len,
        load_balancing_weight=options.load_balancing_weight, z_loss_weight=options.z_loss_weight,
    )
    run_config = {
        "format": ckpt.RUN_FORMAT,
        "preset": preset.name,
        "variant": spec.name,
        "label": variant_label(spec.name),
        "model": model_cfg.to_dict(),
        "bitnet": BitNetConfig().to_dict() if options.bitnet else None,
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
    model = apply_bitnet(TransformerLM(model_cfg), run_config["bitnet"])  # no-op when None
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
            progress_label=spec.name, context=context,
        )
    finally:
        distributed.shutdown_distributed(context)
    return RunResult(run_dir, run_config, loop, model)
