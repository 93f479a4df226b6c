"""MH-MoE (paper Section 2.1) and SMoE as its h = 1 special case.

Shape legend: T tokens, D d_model, H = num_heads, S = D / H sub-token size,
N = T * H routed units.

    y = merge( unsplit( MoE( split( head(x), H ) ) ) )   (+ shared(x) when present)

SMoE and fine-grained SMoE are ``MoE``: H = 1 without head and merge layers. Head and merge
can be switched off one by one (paper Tables 4-5) or added to an H = 1 MoE.

Both layers are built from a ``MoEConfig``: ``MHMoE(config)``. For users, the keyword form
``MHMoE(d_model, num_heads, num_experts, top_k, d_expert, **fields)`` (``MoE(d_model,
num_experts, top_k, d_expert, **fields)``) builds that config, with the head and merge layers
present for ``MHMoE`` and absent for ``MoE`` unless asked otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.experts import DispatchCompute, Experts
from mhmoe.layers.feed_forward import FeedForward
from mhmoe.layers.moe import MoEAux, moe_dispatch, moe_dispatch_reference
from mhmoe.layers.routing import TopKRouter

Dispatch = Callable[[torch.Tensor, TopKRouter, nn.Module, float | None], tuple[torch.Tensor, MoEAux | None]]
"""Step 3 as a whole: (units_NS, router, experts, capacity_factor) -> (y_NS, aux or None)."""


class MHMoE(nn.Module):
    """Multi-Head Mixture-of-Experts layer; ``forward(x) -> (y, MoEAux)``, y shaped like x.

    state_dict keys: ``head.weight`` and ``merge.weight`` (D x D, when present),
    ``router.weight`` (E x S), ``experts.w1``/``experts.w3`` (E x F x S), ``experts.w2``
    (E x S x F), ``shared.*`` (a FeedForward on the whole token, when ``shared_d_ff`` is set).
    """

    # The keyword form (module docstring): its positional order, its defaults over MoEConfig's.
    positional_fields: tuple[str, ...] = ("d_model", "num_heads", "num_experts", "top_k", "d_expert")
    keyword_defaults: dict[str, Any] = {"head_layer": True, "merge_layer": True}

    def __init__(self, *args: Any, **fields: Any) -> None:
        super().__init__()
        given_config = len(args) == 1 and not fields and isinstance(args[0], MoEConfig)
        config = args[0] if given_config else self.config_from_fields(*args, **fields)
        self.config = config
        self.d_model, self.num_heads, self.d_sub = config.d_model, config.num_heads, config.d_sub
        self.capacity_factor = config.capacity_factor
        # Global-batch balancing (``MoEConfig.load_balancing``): the (E,) assignment counts of
        # the whole optimiser step, summed over micro-batches and ranks, that the training loop
        # sets before the step's forwards (``mhmoe.layers.balancing``) and clears after; f_i
        # of the loss is computed from them. None: this forward's own counts.
        self.global_counts_E: torch.Tensor | None = None
        # Whether forward also returns the sequence-wise balance loss (TransformerLM sets it
        # when ModelConfig.seq_aux_loss_weight > 0).
        self.compute_seq_balance = False
        # Step 3's compute step when one is installed (``mhmoe.distributed`` installs expert
        # parallelism here); None: a registered backend, chosen per call (``select_backend``).
        self.dispatch_backend: DispatchCompute | None = None
        # Step 1, head layer W_head in R^{D x D}; xavier-uniform with gain 1/sqrt(2), after
        # the authors' code.
        self.head = _projection(config, config.has_head, gain=2**-0.5)
        self.router = TopKRouter(self.d_sub, config.num_experts, config.top_k, config.normalize_top_k,
                                 selection_bias=config.load_balancing == "aux-free")
        self.experts = Experts(config.num_experts, self.d_sub, config.d_expert, config.activation)
        # Step 5, merge layer W_merge in R^{D x D}.
        self.merge = _projection(config, config.has_merge, gain=1.0)
        self.shared = (
            FeedForward(config.d_model, config.shared_d_ff, config.activation, config.bias)
            if config.shared_d_ff is not None
            else None
        )

    @classmethod
    def config_from_fields(cls, *args: Any, **fields: Any) -> MoEConfig:
        """The ``MoEConfig`` of the keyword form (module docstring)."""
        if len(args) > len(cls.positional_fields):
            raise TypeError(
                f"{cls.__name__} takes at most {len(cls.positional_fields)} positional arguments "
                f"({', '.join(cls.positional_fields)}), got {len(args)}"
            )
        positional = dict(zip(cls.positional_fields, args))
        repeated = sorted(positional.keys() & fields.keys())
        if repeated:
            raise TypeError(f"{cls.__name__} got {repeated} both by position and by keyword")
        return MoEConfig(**{**cls.keyword_defaults, **positional, **fields})

    @classmethod
    def from_config(cls, config: MoEConfig) -> "MHMoE":
        return cls(config)

    def forward_with_dispatch(self, x: torch.Tensor, dispatch: Dispatch) -> tuple[torch.Tensor, MoEAux | None]:
        """The layer around ``dispatch`` as step 3. ``forward`` and ``forward_reference`` pass
        theirs; the benchmark's peers pass their own MoE cores, which report no aux (None)."""
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
        y_NS, aux = dispatch(units_NS, self.router, self.experts, self.active_capacity_factor)
        if aux is not None:
            aux.num_heads = self.num_heads
            # Routers swapped in by converters (BitNet's) may have no bias: getattr.
            bias = getattr(self.router, "expert_bias", None)
            if bias is not None:
                aux.expert_bias = bias.detach().clone()
        # Step 4: back to token order and concatenate: (T * H, S) -> (T, D).
        y_TD = y_NS.reshape(num_tokens, self.d_model)
        # Step 5: y = y_hat W_merge.
        if self.merge is not None:
            y_TD = self.merge(y_TD)
        # Shared expert (residual MoE, DeepSeekMoE): a dense branch on the whole token.
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(x.shape), aux

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor this forward applies: the configured one in training (or with
        ``capacity_at_eval``), None (dropless) otherwise, so evaluation, ``generate`` and the
        HF model do not depend on the other sequences of their batch (issue 15)."""
        if self.training or self.config.capacity_at_eval:
            return self.capacity_factor
        return None

    def _dispatch_options(self, x: torch.Tensor) -> dict[str, Any]:
        """The keyword options of ``moe_dispatch`` for input x: the capacity priority, the
        sequence layout ((..., T, D): T positions; (T, D): one sequence), the global-batch
        counts and the sequence-wise loss."""
        seq_len = x.shape[-2] if x.dim() >= 3 else None
        num_tokens = x.numel() // max(self.d_model, 1)
        num_sequences = num_tokens // seq_len if seq_len else 1
        global_counts = self.global_counts_E if self.config.load_balancing == "global-batch" else None
        return dict(priority=self.config.capacity_priority, seq_len=seq_len, num_heads=self.num_heads,
                    balance_counts_E=global_counts,
                    num_sequences=num_sequences if self.compute_seq_balance and num_tokens else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        return self.forward_with_dispatch(x, functools.partial(
            moe_dispatch, backend=self.dispatch_backend, **self._dispatch_options(x)))

    def forward_reference(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        """The same layer with the plain dispatch, ``moe_dispatch_reference`` (tests)."""
        return self.forward_with_dispatch(x, functools.partial(moe_dispatch_reference, **self._dispatch_options(x)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.num_heads}, capacity_factor={self.capacity_factor}"


class MoE(MHMoE):
    """Sparse MoE on whole tokens (SMoE, fine-grained SMoE): MH-MoE with H = 1, no head/merge.

    Same forward contract and state_dict keys as ``MHMoE``, without ``head``/``merge``; its
    keyword form takes ``MoEConfig``'s order and leaves head and merge out unless asked.
    """

    positional_fields = ("d_model", "num_experts", "top_k", "d_expert", "num_heads")
    keyword_defaults = {"head_layer": False, "merge_layer": False}


def _projection(config: MoEConfig, present: bool, gain: float) -> nn.Linear | None:
    """The head or merge layer (D x D): xavier-uniform weight with ``gain``, zero bias."""
    if not present:
        return None
    linear = nn.Linear(config.d_model, config.d_model, bias=config.bias)
    nn.init.xavier_uniform_(linear.weight, gain=gain)
    if config.bias:
        nn.init.zeros_(linear.bias)
    return linear


def build_ffn(config: DenseConfig | MoEConfig) -> nn.Module:
    """The feed-forward module for a config: FeedForward for dense, MHMoE for any MoE."""
    if isinstance(config, DenseConfig):
        return FeedForward.from_config(config)
    if isinstance(config, MoEConfig):
        return MHMoE(config)
    raise TypeError(f"expected DenseConfig or MoEConfig, got {type(config).__name__}")
