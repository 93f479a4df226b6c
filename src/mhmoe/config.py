"""Typed configuration of the feed-forward slot of a Transformer block.

One dataclass describes every layer the paper compares:

* ``DenseConfig``: a dense FFN (SwiGLU by default, ReLU for the paper's complexity analysis).
* ``MoEConfig``: the one MoE core, with optional head/merge layers, ``num_heads`` sub-tokens per
  token and an optional shared expert. SMoE is ``num_heads=1`` without head/merge; fine-grained
  SMoE is the same with more, smaller experts; MH-MoE is ``num_heads=h`` with head and merge.

Validation raises ``ValueError`` naming the offending value and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("swiglu", "relu")


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _require_bool(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: must be true or false" + (" or None" if allow_none else ""))


def _require_activation(activation: Any) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: must be one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class DenseConfig:
    """A dense feed-forward network: d_model -> d_ff -> d_model."""

    d_model: int
    d_ff: int
    activation: str = "swiglu"
    bias: bool = False

    def __post_init__(self) -> None:
        _require_positive_int("d_model", self.d_model)
        _require_positive_int("d_ff", self.d_ff)
        _require_activation(self.activation)
        _require_bool("bias", self.bias)

    @property
    def kind(self) -> str:
        return "dense"

    def replace(self, **changes: Any) -> "DenseConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MoEConfig:
    """The MoE core (router + experts), optionally wrapped by MH-MoE's head and merge layers.

    ``head_layer``/``merge_layer`` default to ``num_heads > 1`` (MH-MoE has both, SMoE neither);
    set them explicitly for the paper's Table 4/5 ablations.
    """

    d_model: int
    num_experts: int
    top_k: int
    d_expert: int
    num_heads: int = 1
    head_layer: bool | None = None
    merge_layer: bool | None = None
    shared_d_ff: int | None = None
    activation: str = "swiglu"
    bias: bool = False
    capacity_factor: float | None = None
    normalize_top_k: bool | None = None
    z_loss: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "num_experts", "top_k", "d_expert", "num_heads"):
            _require_positive_int(name, getattr(self, name))
        _require_activation(self.activation)
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                "each token must split into num_heads equal sub-tokens"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "a (sub-)token cannot be routed to more experts than exist"
            )
        if self.shared_d_ff is not None:
            _require_positive_int("shared_d_ff", self.shared_d_ff)
        if self.capacity_factor is not None:
            if isinstance(self.capacity_factor, bool) or not isinstance(
                self.capacity_factor, (int, float)
            ) or not 0 < self.capacity_factor < float("inf"):
                raise ValueError(
                    f"capacity_factor={self.capacity_factor!r}: must be a finite positive number or None"
                )
        for name in ("head_layer", "merge_layer", "normalize_top_k"):
            _require_bool(name, getattr(self, name), allow_none=True)
        _require_bool("bias", self.bias)
        _require_bool("z_loss", self.z_loss)

    @property
    def kind(self) -> str:
        return "moe"

    @property
    def has_head(self) -> bool:
        """Whether the head layer is present (default: MH-MoE, num_heads > 1)."""
        return self.num_heads > 1 if self.head_layer is None else bool(self.head_layer)

    @property
    def has_merge(self) -> bool:
        """Whether the merge layer is present (default: MH-MoE, num_heads > 1)."""
        return self.num_heads > 1 if self.merge_layer is None else bool(self.merge_layer)

    @property
    def renormalizes(self) -> bool:
        """Whether the top-k weights are renormalised to sum to 1 (default: top_k > 1)."""
        return self.top_k > 1 if self.normalize_top_k is None else bool(self.normalize_top_k)

    @property
    def d_sub(self) -> int:
        """Size of one sub-token (the experts' input size): d_model / num_heads."""
        return self.d_model // self.num_heads

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


FFNConfig = DenseConfig | MoEConfig
