"""The training loop on a built model, sampler and evaluation sets.

One optimiser step consumes ``batch_size`` sequences of ``seq_len`` tokens, processed
``micro_batch_size`` at a time with gradient accumulation. The loss that is minimised is

    L = L_lm + aux_loss,   aux_loss = w_lb * mean_l L_lb(l) + w_z * mean_l L_z(l)

(``mhmoe.model``); ``loss`` in metrics.jsonl is L_lm alone (nats per token), averaged over the
step's micro-batches.

Load balancing (``MoEConfig.load_balancing``, ``mhmoe.layers.balancing``): with
``global-batch`` the step's routing counts are first gathered by a no-grad forward of its
micro-batches (summed over the ranks) and every micro-batch's loss takes f_i from them, so the
loss equals that of one forward over the whole global batch; with ``aux-free`` the selection
biases are updated from the step's counts (summed over micro-batches and ranks) once, after
the optimiser step (not after a skipped one). The biases are buffers: in the checkpoints, not
in the optimiser.

Resumption continues the same run exactly: model, optimiser, data-sampler position, the
RNG states of torch (CPU and CUDA), ``random`` and numpy, and the step (the schedule is a pure
function of the step). On CPU, an interrupted and resumed run produces bit-identical losses to
an uninterrupted one (tested). Lines of metrics.jsonl written after the checkpoint that a
resumed run starts from are dropped, so the file reads as one uninterrupted run. ``--resume``
removes leftovers of a killed save and continues from the newest *intact* checkpoint (a
corrupted one is skipped with a warning; ``mhmoe.runs.checkpoint.find_resume_checkpoint``).

Numerical guard: a step whose loss, aux loss or gradient norm is not finite is skipped (no
parameter or optimiser-state update; the step, data position and schedule still advance) and
counted (``skipped_steps`` in metrics.jsonl, saved in checkpoints); ``max_skipped_steps``
consecutive skips stop the run with ``mhmoe.runs.validation.NonFiniteError`` naming the step,
the values, the first module whose output and the first parameter whose gradient went
non-finite. See docs/reliability.md.

Preemption (``mhmoe.runs.preemption``): the first SIGTERM or SIGINT lets the step in progress
finish, then a checkpoint is written and ``Preempted`` raised (the CLI exits with
``EXIT_PREEMPTED``); a second one aborts at once. Checkpoints are also written every
``save_minutes`` of wall-clock time. Under torch.distributed both decisions are all-reduced
after every step, so every rank saves the same step (a distributed save is a collective).

One trainer per run folder: the loop holds ``mhmoe.runs.lock`` on ``run_dir`` (rank 0), so the
cleanup of interrupted writes never removes another live trainer's checkpoint in progress.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from mhmoe import checks, distributed
from mhmoe.analytics.accumulator import RoutingStatsAccumulator
from mhmoe.distributed import save_checkpoint
from mhmoe.evaluate import EvalResult, evaluate_sets, metrics_line
from mhmoe.layers import balancing
from mhmoe.model import TransformerLM, lm_loss
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs import lock as run_lock
from mhmoe.runs.eval_windows import write_eval_windows
from mhmoe.runs.metrics import MetricsLog, NullMetrics, tensorboard_available
from mhmoe.runs.preemption import Preempted, StopSignals
from mhmoe.runs.validation import (
    NonFiniteError,
    describe_diagnosis,
    diagnose_non_finite,
    format_value,
)
from mhmoe.runtime import (
    autocast_context,
    available_cores,
    default_threads,
    resolve_device,
    resolve_precision,
)
from mhmoe.training.config import COMPILE_BACKENDS, TrainConfig
from mhmoe.training.schedules import learning_rate, weight_decay_at

logger = logging.getLogger(__name__)


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


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2 + 1


def check_compile_works(backend: str, device: torch.device | str = "cpu") -> None:
    """ValueError (one line) unless ``torch.compile`` with ``backend`` builds and runs a small
    function here. Inductor on CPU generates C++ and needs a compiler; without one the failure
    would come as a long traceback at the first training step, after the data is prepared."""
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"--compile-backend {backend!r}: must be one of {', '.join(COMPILE_BACKENDS)}")
    try:
        torch.compile(_compile_probe, backend=backend, fullgraph=True)(torch.ones(4, device=device))
    except Exception as err:  # any failure of the toolchain (missing compiler, bad flags, ...)
        lines = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__
        raise ValueError(
            f"--compile: torch.compile with backend {backend!r} does not work on this machine ({detail}); "
            "inductor needs a C++ compiler (gcc or clang) on CPU; run without --compile"
        ) from None


def compile_for_training(module: torch.nn.Module, backend: str) -> Callable[..., Any]:
    """``module``'s forward under ``torch.compile``, for the training steps.

    A wrapper, never a replacement: ``module`` itself stays eager and is what is saved,
    evaluated and diagnosed, so checkpoints carry no ``_orig_mod.`` prefix and load without
    compile. Dynamo's caches are cleared first: in one process ``mhmoe reproduce`` trains
    several models of other shapes through the same forward code, whose entries would
    otherwise pile up to the recompile limit (and then fall back to eager).
    """
    torch._dynamo.reset()
    return torch.compile(module, backend=backend)


@contextlib.contextmanager
def moe_layers_run_eagerly(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, a compiled ``model`` runs its MoE layers eagerly (a graph break at
    each; the rest of the model, attention, norms, dense FFNs, LM head, is compiled).

    For float32: there the experts' grouped matmul cannot be traced (torch 2.13's fake-tensor
    rule for ``_grouped_mm`` is bfloat16 only) and takes the segment loop, whose split sizes are
    the data-dependent row counts: a graph break per grouped matmul and recompilations as the
    counts change (docs/benchmarks.md, "torch.compile"). Measured (benchmarks/compile_speed.py,
    smoe): at the tiny preset, dynamo's recompile limit was reached and steps took 58x the eager
    time; at mini, 22 graphs and about 29 s of compilation, against 6 graphs and a few seconds
    with the MoE layers eager, which also take their fast CPU ("blocked") path there.
    The wrapper is an instance attribute: the module tree and state_dict keys are unchanged,
    and it is removed on exit (a deep copy of the model must not call back into this one).
    """
    layers = balancing.moe_layers(model)
    previous = [layer.__dict__.get("forward") for layer in layers]  # an instance forward, if any
    for layer in layers:
        layer.forward = torch.compiler.disable(layer.forward)
    try:
        yield
    finally:
        for layer, forward in zip(layers, previous):
            if forward is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = forward


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
    context: Any = None,
    **options: Any,
) -> LoopResult:
    """Train ``model`` for ``config.total_steps`` steps, evaluating and checkpointing into ``run_dir``.

    ``sampler``: ``next_batch() -> (inputs_BT, targets_BT)`` of ``config.batch_size`` rows,
    with ``state_dict()``/``load_state_dict()`` (``mhmoe.data.TrainBatchSampler``).
    ``eval_sets``: name -> ``TokenSet``. ``resume`` continues from the latest checkpoint in
    ``run_dir`` when there is one. ``stop_at_step`` ends early after checkpointing that step
    (a later ``resume`` continues), e.g. to fit a job's time limit. Raises ``Preempted`` after
    checkpointing when a SIGTERM/SIGINT arrived (module docstring); ``RunLockedError`` when
    another process trains into ``run_dir``.
    """
    run_dir = Path(run_dir)
    writer = context is None or not context.is_distributed or context.is_main
    if writer:
        run_lock.acquire(run_dir, "mhmoe train")  # reentrant: run_training holds it already
    try:
        with StopSignals() as stop_signals:
            return _train_loop(model, sampler, eval_sets, config, run_dir, context=context,
                               stop_signals=stop_signals, **options)
    finally:
        if writer:
            run_lock.release(run_dir)


def _train_loop(
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
    stop_signals: StopSignals | None = None,
    allow_unchecked_state: bool = False,
) -> LoopResult:
    """``train_loop`` under its lock and signal handlers."""

    # ``context`` (mhmoe.distributed.init_distributed): under torchrun, ``sampler`` yields this
    # rank's rows of each global batch, the model is wrapped per context.parallel (DDP, FSDP2,
    # expert parallelism), and rank 0 alone writes metrics and checkpoints. None: one process.
    run_dir = Path(run_dir)
    if context is None or not context.is_distributed:
        context = distributed.DistContext.single_process(resolve_device(config.device))
    device = context.device
    autocast_dtype = resolve_precision(config.precision, device)
    if stop_at_step is not None:
        checks.positive_int("stop_at_step", stop_at_step)
    # The node's cores are shared by its processes.
    threads = config.threads or default_threads(context.local_world_size)  # run.py records its choice
    torch.set_num_threads(threads)
    logger.info("device %s, %s, %d torch threads (%d cores)", device,
                "fp32" if autocast_dtype is None else f"{autocast_dtype} autocast", threads, available_cores())
    # --activation-checkpointing: TransformerLM.forward recomputes each block in the backward.
    model.activation_checkpointing = config.activation_checkpointing
    parallel = distributed.parallelize(model, context)  # a single process: only model.to(device)
    model = parallel.model
    model.train()
    optimizer = build_optimizer(model, config)
    eval_steps = set(config.eval_steps())
    metrics_path = run_dir / ckpt.METRICS_FILE

    start_step = 0
    tokens_seen = 0
    last_loss: float | None = None
    skipped_total = consecutive_skips = 0  # non-finite steps (mhmoe.runs.validation)
    if context.is_main:
        ckpt.clean_incomplete_saves(run_dir)  # temp files and folders of a killed save
    context.barrier()
    # The newest intact checkpoint: a corrupted one is skipped with a warning (checkpoint.py).
    found = ckpt.find_resume_checkpoint(run_dir, allow_unchecked=allow_unchecked_state) if resume else None
    train_seconds = 0.0  # optimiser-step time only (no evaluation, no saving): train_s in metrics
    if found is not None:
        folder, state = found
        skipped_total = int(state.get("skipped_steps", 0))
        consecutive_skips = int(state.get("consecutive_skipped_steps", 0))
        train_seconds = float(state.get("train_seconds", 0.0))
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
        # Starting from step 1: the metrics of an earlier attempt (killed before its first
        # checkpoint, or a --resume that found none) are kept under another name, never rewritten.
        kept = _keep_aside(metrics_path)
        if resume:
            # A warning when an earlier attempt left metrics; plain information for a fresh
            # folder (mhmoe reproduce always resumes, also its runs' first start).
            (logger.warning if kept else logger.info)(
                "--resume: %s has no checkpoint yet; starting from step 1%s", run_dir,
                f" (the earlier metrics are kept as {kept.name})" if kept else "")
        elif kept is not None:
            logger.warning("%s: kept the metrics of an earlier attempt as %s", run_dir, kept.name)

    if tensorboard and not tensorboard_available():
        raise ValueError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    log = (MetricsLog(metrics_path, run_dir / "tensorboard" if tensorboard else None)
           if context.is_main else NullMetrics())
    progress = _progress_bar(config.total_steps, start_step, quiet or not context.is_main, progress_label)
    # Off a terminal (nohup, cluster logs) the bar is off: a plain line every progress_seconds.
    log_lines = (_ProgressLines(config, start_step, progress_label)
                 if progress.disable and not quiet and context.is_main and config.progress_seconds else None)
    stop_signals = stop_signals if stop_signals is not None else StopSignals()
    # Routing statistics (mhmoe.analytics) from the counts each MoE layer returns; per rank.
    routing = RoutingStatsAccumulator().attach(model)
    bias_balancer = balancing.BiasBalancer(model)
    result = LoopResult(start_step, tokens_seen, last_loss)
    accumulation = config.accumulation_steps // context.world_size  # of this rank's rows
    # Global-batch counts need a counting pass unless one micro-batch on one rank is the batch.
    # The counting pre-pass only serves the global-batch balancing loss: skip it when that loss
    # has no weight, or when one forward already sees the whole global batch.
    count_globally = (balancing.uses_global_batch(model) and model.config.load_balancing_weight > 0
                      and (accumulation > 1 or context.world_size > 1))
    micro = config.micro_batch
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    last_save = time.monotonic()  # the time-based checkpoints (save_minutes) count from here
    # --compile: the training forward only; evaluation and the global-batch counting pass
    # (no grad, other batch shapes) stay eager. Under float32 the MoE layers stay eager too
    # (moe_layers_run_eagerly); under bfloat16 autocast the whole model is one graph.
    train_forward = compile_for_training(parallel.module, config.compile_backend) if config.compile else parallel
    eager_moe = contextlib.ExitStack()
    if config.compile and autocast_dtype is None:
        eager_moe.enter_context(moe_layers_run_eagerly(model))
    if config.compile:
        logger.info("--compile: torch.compile (%s) of the training forward%s; the first steps compile",
                    config.compile_backend, ", MoE layers eager (float32)" if autocast_dtype is None else "")
    try:
        for step in range(start_step + 1, config.total_steps + 1):
            step_started = time.perf_counter()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.param_groups[0]["weight_decay"] = weight_decay_at(step, config)  # the decay group
            inputs_BT, targets_BT = sampler.next_batch()
            lm_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            step_counts = None
            if count_globally:  # mhmoe.layers.balancing: f_i of the whole global batch
                with autocast_context(device, autocast_dtype):
                    step_counts = balancing.global_batch_counts(
                        parallel, (inputs_BT[c * micro:(c + 1) * micro].to(device) for c in range(accumulation)),
                        context.all_reduce_sum_)
            with balancing.global_counts(model, step_counts):
                for chunk in range(accumulation):
                    rows = slice(chunk * micro, (chunk + 1) * micro)
                    inputs = inputs_BT[rows].to(device, non_blocking=True)
                    targets = targets_BT[rows].to(device, non_blocking=True)
                    # DDP reduces gradients once, after the last micro-batch.
                    last = chunk == accumulation - 1
                    with contextlib.nullcontext() if last else parallel.no_sync():
                        with autocast_context(device, autocast_dtype):
                            output = train_forward(inputs)
                            lm = lm_loss(output.logits, targets)
                            loss = (lm + output.aux_loss) / accumulation
                        loss.backward()
                    routing.update(output.moe_aux)  # counts the layers already computed
                    bias_balancer.add(output.moe_aux)
                    lm_sum += lm.detach()
                    aux_sum += output.aux_loss.detach()
            # The norm of the whole gradient, summed over FSDP2 and expert shards.
            max_norm = config.clip_grad_norm if config.clip_grad_norm is not None else math.inf
            grad_norm = float(parallel.clip_grad_norm_(max_norm))
            step_loss = context.all_reduce_mean(lm_sum) / accumulation  # mean over ranks
            step_aux = context.all_reduce_mean(aux_sum) / accumulation
            # Numerical guard (mhmoe.runs.validation): a non-finite loss or gradient skips the update
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
            # Aux-free: once per optimiser step, from the global-batch loads (a collective).
            bias_balancer.step(context.all_reduce_sum_, apply=not skipped)
            optimizer.zero_grad(set_to_none=True)
            tokens_seen += config.tokens_per_step
            window_tokens += config.tokens_per_step
            result.step, result.tokens = step, tokens_seen
            if not skipped:
                result.last_loss = step_loss
            now = time.perf_counter()
            train_seconds += now - step_started
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
                    "train_s": round(train_seconds, 3),
                    **routing.summary(),
                })
                routing.reset()
                window_start, window_tokens = now, 0
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            if log_lines is not None:
                log_lines.update(step, step_loss)

            if step in eval_steps and eval_sets:
                results = evaluate_sets(
                    model, eval_sets, seq_len=config.seq_len, batch_size=config.eval_batch_size,
                    max_tokens=config.eval_tokens_at(step), byte_lengths=byte_lengths, device=device,
                    autocast_dtype=autocast_dtype,
                )
                log.write({"step": step, "tokens": tokens_seen,
                           "fraction": round(step / config.total_steps, 6), "train_s": round(train_seconds, 3),
                           **metrics_line(results)})
                if context.is_main:
                    write_eval_windows(run_dir, step, {name: (r.window_nll, r.window_targets)
                                                       for name, r in results.items()})
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
            timed = config.save_minutes is not None and time.monotonic() - last_save >= 60 * config.save_minutes
            signalled = stop_signals.requested
            if context.is_distributed:
                # Every rank must take the same decision: a distributed save is a collective.
                timed = context.all_reduce_mean(float(timed)) > 0
                signalled = context.all_reduce_mean(float(signalled)) > 0
            if finished or stopping or periodic or timed or signalled or step in eval_steps:
                _save(run_dir, step, parallel, optimizer, sampler, tokens_seen, step_loss, config,
                      finished=finished, milestone=finished or step in eval_steps,
                      extra={"skipped_steps": skipped_total, "consecutive_skipped_steps": consecutive_skips,
                             "train_seconds": train_seconds})
                last_save = time.monotonic()
            if signalled and not finished:
                name = stop_signals.signal_name or "a stop signal (on another rank)"
                raise Preempted(
                    f"stopped by {name} after step {step}/{config.total_steps}; checkpoint "
                    f"{ckpt.checkpoint_dir(run_dir, step).name} saved in {run_dir}; continue with --resume"
                )
            if stopping and not finished:
                logger.info("stopped after step %d as asked; continue with --resume", step)
                break
        else:
            result.finished = True
        if config.total_steps == start_step:
            result.finished = True
    finally:
        eager_moe.close()
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


def _keep_aside(path: Path) -> Path | None:
    """Rename a non-empty ``path`` (metrics.jsonl) to a free ``NAME.before-N.jsonl``; the new
    name, or None when there was nothing to keep (an empty file is removed)."""
    if not path.is_file():
        return None
    if path.stat().st_size == 0:
        path.unlink()
        return None
    for index in range(1, 10_000):
        target = path.with_name(f"{path.stem}.before-{index}{path.suffix}")
        if not target.exists():
            path.rename(target)
            return target
    path.unlink()  # pragma: no cover - ten thousand earlier attempts
    return None


def _duration(seconds: float) -> str:
    """``1h02m``, ``3m20s`` or ``45s``."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class _ProgressLines:
    """Progress for logs: one line every ``config.progress_seconds`` (step, loss, tokens/s
    over the interval, ETA from this process's pace including evaluations and saves)."""

    def __init__(self, config: TrainConfig, start_step: int, label: str) -> None:
        self.config = config
        self.label = label
        self.start_step = start_step
        self.started = self.last = time.monotonic()
        self.last_step = start_step

    def update(self, step: int, loss: float) -> None:
        now = time.monotonic()
        if now - self.last < self.config.progress_seconds and step != self.config.total_steps:
            return
        rate = (step - self.last_step) * self.config.tokens_per_step / max(now - self.last, 1e-9)
        per_step = (now - self.started) / max(1, step - self.start_step)
        eta = _duration(per_step * (self.config.total_steps - step))
        logger.info("%s: step %d/%d (%.0f%%), loss %s, %s tokens/s, ETA %s", self.label, step,
                    self.config.total_steps, 100 * step / self.config.total_steps, format_value(loss),
                    f"{rate:,.0f}", eta)
        self.last, self.last_step = now, step


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

    return tqdm(total=total, initial=initial, desc=label, unit="step", file=sys.stderr)
