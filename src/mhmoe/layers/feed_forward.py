"""Dense feed-forward networks: the Dense baseline and the shared expert.

SwiGLU: y = w2( silu(w1 x) * (w3 x) )      (Shazeer 2020; the paper's experiments)
ReLU:   y = w2( relu(w1 x) )                (the paper's complexity analysis, Section 2.2)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.config import DenseConfig


class FeedForward(nn.Module):
    """Position-wise FFN d_model -> d_ff -> d_model; Mixtral names w1 (gate), w3 (up), w2 (down)."""

    def __init__(
        self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False
    ) -> None:
        super().__init__()
        self.config = DenseConfig(d_model=d_model, d_ff=d_ff, activation=activation, bias=bias)
        self.activation = activation
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        if activation == "swiglu":
            self.w3 = nn.Linear(d_model, d_ff, bias=bias)
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)

    @classmethod
    def from_config(cls, config: DenseConfig) -> "FeedForward":
        return cls(config.d_model, config.d_ff, config.activation, config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            hidden = F.silu(self.w1(x)) * self.w3(x)
        else:
            hidden = F.relu(self.w1(x))
        return self.w2(hidden)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"
