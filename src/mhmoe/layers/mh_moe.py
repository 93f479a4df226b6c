"""MH-MoE (paper Section 2.1) and SMoE as its h = 1 special case.

Shape legend: T tokens, D d_model, H = num_heads, S = D / H sub-token size,
N = T * H routed units.

    y = merge( unsplit( MoE( split( head(x), H ) ) ) )   (+ shared(x) when present)

SMoE and fine-grained SMoE are ``MoE``: H = 1 without head and merge layers. Head and merge
can be switched off one by one (paper Tables 4-5) or added to an H = 1 MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.experts import Experts
from mhmoe.layers.feed_forward import FeedForward
from mhmoe.layers.moe import MoEAux, moe_dispatch, moe_dispatch_reference
from mhmoe.layers.routing import TopKRouter


class MHMoE(nn.Module):
    """Multi-Head Mixture-of-Experts layer; ``forward(x) -> (y, MoEAux)``, y shaped like x.

    state_dict keys: ``head.weight`` and ``merge.weight`` (D x D, when present),
    ``router.weight`` (E x S), ``experts.w1``/``experts.w3`` (E x F x S), ``experts.w2``
    (E x S x F), ``shared.*`` (a FeedForward on the whole token, when ``shared_d_ff`` is set).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_experts: int,
        top_k: int,
        d_expert: int,
        head_layer: bool = True,
        merge_layer: bool = True,
        shared_d_ff: int | None = None,
        activation: str = "swiglu",
        bias: bool = False,
        capacity_factor: float | None = None,
        normalize_top_k: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = MoEConfig(
            d_model=d_model,
            num_experts=num_experts,
            top_k=top_k,
            d_expert=d_expert,
            num_heads=num_heads,
            head_layer=head_layer,
            merge_layer=merge_layer,
            shared_d_ff=shared_d_ff,
            activation=activation,
            bias=bias,
            capacity_factor=capacity_factor,
            normalize_top_k=normalize_top_k,
        )
        self.d_model = d_model
        self.num_heads = num_heads
        self.d_sub = d_model // num_heads
        self.capacity_factor = capacity_factor
        # The dispatch (x_NS, router, experts, capacity_factor) -> (y_NS, aux): the hook where
        # mhmoe.distributed installs expert parallelism without touching this module.
        self.dispatch_fn = moe_dispatch
        # Step 1, head layer W_head in R^{D x D}. Initialisation after the authors' code:
        # xavier-uniform, gain 1/sqrt(2) on the head layer.
        self.head = nn.Linear(d_model, d_model, bias=bias) if head_layer else None
        if self.head is not None:
            nn.init.xavier_uniform_(self.head.weight, gain=2**-0.5)
        self.router = TopKRouter(self.d_sub, num_experts, top_k, normalize_top_k)
        self.experts = Experts(num_experts, self.d_sub, d_expert, activation)
        # Step 5, merge layer W_merge in R^{D x D}.
        self.merge = nn.Linear(d_model, d_model, bias=bias) if merge_layer else None
        if self.merge is not None:
            nn.init.xavier_uniform_(self.merge.weight)
        if self.head is not None and bias:
            nn.init.zeros_(self.head.bias)
        if self.merge is not None and bias:
            nn.init.zeros_(self.merge.bias)
        self.shared = (
            FeedForward(d_model, shared_d_ff, activation, bias) if shared_d_ff is not None else None
        )

    @classmethod
    def from_config(cls, config: MoEConfig) -> "MHMoE":
        return cls(
            d_model=config.d_model,
            num_heads=config.num_heads,
            num_experts=config.num_experts,
            top_k=config.top_k,
            d_expert=config.d_expert,
            head_layer=config.has_head,
            merge_layer=config.has_merge,
            shared_d_ff=config.shared_d_ff,
            activation=config.activation,
            bias=config.bias,
            capacity_factor=config.capacity_factor,
            normalize_top_k=config.normalize_top_k,
        )

    def _forward(self, x: torch.Tensor, dispatch) -> tuple[torch.Tensor, MoEAux]:
        if x.shape[-1] != self.d_model:
            raise ValueError(
                f"input has last dimension {x.shape[-1]}, expected d_model={self.d_model}"
            )
        x_TD = x.reshape(-1, self.d_model)  # (..., D) -> (T, D)
        num_tokens = x_TD.shape[0]
        # Step 1: x_hat = x W_head.
        x_hat_TD = self.head(x_TD) if self.head is not None else x_TD
        # Step 2: split each token into H sub-tokens of size S, token order kept:
        # (T, D) -> (T * H, S); sub-token h of token t is unit t * H + h.
        units_NS = x_hat_TD.reshape(num_tokens * self.num_heads, self.d_sub)
        # Step 3: every sub-token through the same top-k MoE.
        y_NS, aux = dispatch(units_NS, self.router, self.experts, self.capacity_factor)
        aux.num_heads = self.num_heads
        # Step 4: back to token order and concatenate: (T * H, S) -> (T, D).
        y_TD = y_NS.reshape(num_tokens, self.d_model)
        # Step 5: y = y_hat W_merge.
        if self.merge is not None:
            y_TD = self.merge(y_TD)
        # Shared expert (residual MoE, DeepSeekMoE): a dense branch on the whole token.
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(x.shape), aux

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        return self._forward(x, self.dispatch_fn)

    def forward_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """The same layer with the plain per-expert loop dispatch (tests, peer benchmarks)."""
        return self._forward(x, moe_dispatch_reference)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, capacity_factor={self.capacity_factor}"


class MoE(MHMoE):
    """Sparse MoE on whole tokens (SMoE, fine-grained SMoE): MH-MoE with H = 1, no head/merge.

    Same forward contract and state_dict keys as ``MHMoE``, without ``head``/``merge``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        d_expert: int,
        num_heads: int = 1,
        head_layer: bool = False,
        merge_layer: bool = False,
        shared_d_ff: int | None = None,
        activation: str = "swiglu",
        bias: bool = False,
        capacity_factor: float | None = None,
        normalize_top_k: bool | None = None,
    ) -> None:
        super().__init__(
            d_model=d_model,
            num_heads=num_heads,
            num_experts=num_experts,
            top_k=top_k,
            d_expert=d_expert,
            head_layer=head_layer,
            merge_layer=merge_layer,
            shared_d_ff=shared_d_ff,
            activation=activation,
            bias=bias,
            capacity_factor=capacity_factor,
            normalize_top_k=normalize_top_k,
        )


def build_ffn(config: DenseConfig | MoEConfig) -> nn.Module:
    """The feed-forward module for a config: FeedForward for dense, MHMoE for any MoE."""
    if isinstance(config, DenseConfig):
        return FeedForward.from_config(config)
    if isinstance(config, MoEConfig):
        return MHMoE.from_config(config)
    raise TypeError(f"expected DenseConfig or MoEConfig, got {type(config).__name__}")
