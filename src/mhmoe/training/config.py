"""The hyper-parameters of one training run (``TrainConfig``), validated.

Defaults follow the authors' public training scripts (the paper itself gives only the
load-balancing weight): AdamW with betas (0.9, 0.98), weight decay 0.01, gradient clipping at
2.0, 375 warmup steps then polynomial (linear, power 1) decay to 0 (fairseq's
``polynomial_decay``); cosine decay is an option. Small presets scale the warmup down.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mhmoe import checks
from mhmoe.runtime import DEVICES_HELP, PRECISIONS

# TrainConfig fields that may differ when a run is resumed (they do not change the results;
# activation checkpointing recomputes the same blocks in the backward pass; torch.compile
# computes the same model with other kernels, a float rounding apart as another thread count).
RESUMABLE_CHANGES = frozenset({
    "save_every", "keep_checkpoints", "log_every", "threads", "device", "eval_batch_size",
    "max_skipped_steps", "save_minutes", "progress_seconds", "activation_checkpointing",
    "compile", "compile_backend",
})

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""torch.compile backends of ``--compile-backend``: inductor generates fused kernels (C++ on
CPU, so it needs a compiler); aot_eager and eager only trace (no speed-up, no compiler: for
checking that a model compiles)."""

DEFAULT_SAVE_MINUTES = 10.0
"""Wall-clock minutes between checkpoints when none are given: a preempted job (SLURM and
Kubernetes send SIGTERM, then SIGKILL after a grace period that may be too short to save)
loses minutes, not the half of its budget before the 50% evaluation checkpoint (issue 16)."""

DEFAULT_SAVE_FRACTION = 10
"""Without ``--save-every``, a checkpoint every ``total_steps // DEFAULT_SAVE_FRACTION`` steps
(every 10% of the run; none for runs shorter than that many steps, whose evaluation
checkpoints at 50% and 100% are as close)."""


def default_save_every(total_steps: int) -> int | None:
    """The step interval of periodic checkpoints when ``--save-every`` is not given."""
    interval = total_steps // DEFAULT_SAVE_FRACTION
    return interval if interval >= 1 else None






SCHEDULES = ("polynomial", "cosine", "constant", "two-stage")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run (validated; JSON round-trip via to_dict/from_dict).

    ``total_steps`` sets the schedule's length; evaluations happen at ``eval_fractions`` of it
    (the paper's 50k and 100k of 100k steps: 0.5 and 1.0) and every ``eval_every`` steps.
    Checkpoints are written every ``save_every`` steps, at every evaluation and at the end; the
    ``keep_checkpoints`` newest periodic ones are kept, evaluation and final ones always.
    Also every ``save_minutes`` of wall-clock time (None: never), so that preemption costs
    minutes. ``max_skipped_steps`` consecutive non-finite steps stop the run (module docstring).
    Off a terminal, a progress line is logged every ``progress_seconds`` (None: never).
    Evaluations use ``eval_tokens`` per set (windows spread over the set), the final one
    ``final_eval_tokens`` (more, so that the number compared between variants is precise).
    With ``compile`` the training forward runs under ``torch.compile`` (``compile_backend``);
    evaluation, checkpoints and the non-finite diagnosis use the eager module.
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
    final_eval_tokens: int | None = None  # the last step's evaluation; None: eval_tokens
    eval_batch_size: int = 8
    save_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    max_skipped_steps: int = 5
    save_minutes: float | None = DEFAULT_SAVE_MINUTES
    progress_seconds: float | None = 60.0
    activation_checkpointing: bool = False  # TransformerLM.activation_checkpointing while training
    compile: bool = False  # the training forward under torch.compile (evaluation stays eager)
    compile_backend: str = "inductor"  # one of COMPILE_BACKENDS

    def __post_init__(self) -> None:
        if isinstance(self.eval_fractions, list):
            object.__setattr__(self, "eval_fractions", tuple(self.eval_fractions))
        for name in ("total_steps", "batch_size", "seq_len", "eval_batch_size", "keep_checkpoints", "log_every",
                     "max_skipped_steps"):
            checks.positive_int(name, getattr(self, name))
        for name in ("micro_batch_size", "eval_every", "eval_tokens", "final_eval_tokens", "save_every", "threads"):
            checks.positive_int(name, getattr(self, name), allow_none=True)
        checks.non_negative_int("warmup_steps", self.warmup_steps)
        if self.warmup_steps >= self.total_steps and self.total_steps > 1:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}: must be less than the {self.total_steps} training steps"
            )
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size != 0:
            raise ValueError(
                f"batch_size={self.batch_size}: must be a multiple of micro_batch_size={self.micro_batch_size}"
            )
        checks.number("lr", self.lr, low=0, low_inclusive=False)
        checks.number("end_lr", self.end_lr, low=0)
        if self.end_lr > self.lr:
            raise ValueError(f"end_lr={self.end_lr}: must not exceed lr={self.lr}")
        checks.number("power", self.power, low=0, low_inclusive=False)
        checks.number("beta1", self.beta1, low=0, high=1, high_inclusive=False)
        checks.number("beta2", self.beta2, low=0, high=1, high_inclusive=False)
        checks.number("adam_eps", self.adam_eps, low=0, low_inclusive=False)
        checks.number("weight_decay", self.weight_decay, low=0)
        if self.clip_grad_norm is not None:
            checks.number("clip_grad_norm", self.clip_grad_norm, low=0, low_inclusive=False)
        checks.non_negative_int("seed", self.seed)
        for name in ("save_minutes", "progress_seconds"):
            if getattr(self, name) is not None:
                checks.number(name, getattr(self, name), low=0, low_inclusive=False)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"compile_backend={self.compile_backend!r}: must be one of {', '.join(COMPILE_BACKENDS)}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {', '.join(PRECISIONS)}")
        if not isinstance(self.eval_fractions, tuple):
            raise ValueError(f"eval_fractions={self.eval_fractions!r}: must be a list of numbers in (0, 1]")
        for fraction in self.eval_fractions:
            checks.number("eval_fractions", fraction, low=0, high=1, low_inclusive=False)
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

    def eval_tokens_at(self, step: int) -> int | None:
        """Tokens per evaluation set at ``step``: ``final_eval_tokens`` at the last step."""
        if step == self.total_steps and self.final_eval_tokens is not None:
            return self.final_eval_tokens
        return self.eval_tokens

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["eval_fractions"] = list(self.eval_fractions)
        return data

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        """{field: default} as ``to_dict`` writes it, for the fields that have one: the value of
        a field that a config.json written before the field existed lacks."""
        defaults = {}
        for item in dataclasses.fields(cls):
            if item.default is not dataclasses.MISSING:
                value = item.default
            elif item.default_factory is not dataclasses.MISSING:
                value = item.default_factory()
            else:
                continue
            defaults[item.name] = list(value) if isinstance(value, tuple) else value
        return defaults

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        if not isinstance(data, dict):
            raise ValueError(f"training config {data!r}: must be a JSON object")
        checks.known_fields("training config", cls, data)
        return cls(**data)
