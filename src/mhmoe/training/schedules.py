"""Learning-rate and weight-decay schedules, pure functions of the optimiser step.

polynomial (fairseq ``polynomial_decay``), cosine, constant, and the BitNet FAQ's two-stage
schedule [FAQ: Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"].
"""

from __future__ import annotations

import math
from typing import Any

from mhmoe import checks
from mhmoe.training.config import TrainConfig


def two_stage_schedule(
    step: int,
    total_steps: int,
    peak_lr: float,
    *,
    second_peak_lr: float | None = None,
    warmup_steps: int = 0,
    switch_fraction: float = 0.5,
    final_lr: float = 0.0,
    weight_decay: float = 0.1,
    second_weight_decay: float = 0.0,
) -> tuple[float, float]:
    """(learning rate, weight decay) at 0-based ``step`` of the FAQ's two-stage BitNet schedule.

    FAQ: "1.5e-3 to 8e-4, then 5e-4 to 0" for the LR and "0.1, then 0" for the weight decay,
    switching halfway. Ours, with s = round(switch_fraction * total_steps):

    * warmup (step < warmup_steps): lr = peak_lr * (step + 1) / warmup_steps;
    * stage 1 (step < s): the straight line from peak_lr (at the end of warmup) to final_lr at
      total_steps, i.e. about peak_lr / 2 at the switch (1.5e-3 -> 7.5e-4 with the FAQ numbers);
    * stage 2 (step >= s): a drop to second_peak_lr (default peak_lr / 3, the FAQ's
      1.5e-3 -> 5e-4), then linear to final_lr at total_steps;
    * weight decay: ``weight_decay`` (0.1) in stage 1, ``second_weight_decay`` (0) in stage 2.

    Steps past total_steps stay at final_lr. With AdamW, set each param group's
    ``weight_decay`` to the returned value every step (PyTorch multiplies it by the LR).
    """
    checks.non_negative_int("step", step)
    checks.positive_int("total_steps", total_steps)
    checks.non_negative_int("warmup_steps", warmup_steps)
    checks.number("peak_lr", peak_lr, low=0, low_inclusive=False)
    second_peak_lr = peak_lr / 3 if second_peak_lr is None else second_peak_lr
    checks.number("second_peak_lr", second_peak_lr, low=0)
    checks.number("final_lr", final_lr, low=0)
    checks.number("weight_decay", weight_decay, low=0)
    checks.number("second_weight_decay", second_weight_decay, low=0)
    if isinstance(switch_fraction, bool) or not isinstance(switch_fraction, (int, float)) \
            or not 0 < switch_fraction <= 1:
        raise ValueError(f"switch_fraction={switch_fraction!r}: must be in (0, 1]")
    switch = round(switch_fraction * total_steps)
    if warmup_steps > switch:
        raise ValueError(
            f"warmup_steps={warmup_steps} exceeds the stage switch at step {switch} "
            f"(switch_fraction={switch_fraction} of total_steps={total_steps})"
        )
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps, float(weight_decay)
    if step < switch:
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return peak_lr + (final_lr - peak_lr) * progress, float(weight_decay)
    progress = min((step - switch) / max(total_steps - switch, 1), 1.0)
    return second_peak_lr + (final_lr - second_peak_lr) * progress, float(second_weight_decay)


def two_stage_lambdas(total_steps: int, peak_lr: float, **kwargs: Any):
    """(lr_lambda, wd_fn) for ``torch.optim.lr_scheduler.LambdaLR`` (optimizer lr = peak_lr).

    ``lr_lambda(step)`` is the multiplier lr / peak_lr; ``wd_fn(step)`` the weight decay to set.
    """
    two_stage_schedule(0, total_steps, peak_lr, **kwargs)  # validate once, eagerly

    def lr_lambda(step: int) -> float:
        return two_stage_schedule(step, total_steps, peak_lr, **kwargs)[0] / peak_lr

    def wd_fn(step: int) -> float:
        return two_stage_schedule(step, total_steps, peak_lr, **kwargs)[1]

    return lr_lambda, wd_fn




def learning_rate(step: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step ``step`` (1-based).

    Linear warmup lr * step / warmup for step <= warmup; then, with progress
    p = (step - warmup) / (total - warmup):
    polynomial (fairseq ``polynomial_decay``): end + (lr - end) * (1 - p)^power;
    cosine: end + (lr - end) * (1 + cos(pi p)) / 2; constant: lr;
    two-stage: the BitNet FAQ's schedule (``mhmoe.training.schedules.two_stage_schedule``).
    """
    peak, end, warmup, total = config.lr, config.end_lr, config.warmup_steps, config.total_steps
    if config.schedule == "two-stage":

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

    return two_stage_schedule(step - 1, config.total_steps, config.lr, warmup_steps=config.warmup_steps,
                              final_lr=config.end_lr, weight_decay=config.weight_decay)[1]
