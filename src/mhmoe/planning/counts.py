"""Analytic parameter and FLOP counts, and the FLOPs/parameter parity planner (paper Section 2).

Everything here is computed from a config alone (``DenseConfig`` / ``MoEConfig``); nothing
inspects module parameter names. The tests prove the counts against the built modules
(``sum(p.numel())``) and against ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward pass.

Notation (the paper's, Section 2.2):

    d      d_model                          B   tokens
    h      num_heads (sub-tokens per token) s   = d / h, the experts' input size (d_sub)
    E      num_experts                      k   top_k (per sub-token)
    d_e    d_expert, the experts' hidden size (the paper's d_moe for SMoE, d_mhmoe for MH-MoE)
    n      weight matrices per FFN: 2 for ReLU (w1, w2), 3 for SwiGLU (w1, w3, w2)

Two FLOP conventions (``count_flops(..., convention=...)``):

* ``"flops"`` (default): 2 FLOPs per multiply-add of every matmul, forward pass. A
  (B x n) @ (n x m) matmul costs 2*B*n*m. This is what ``FlopCounterMode`` reports.
* ``"paper"``: the paper's "scalar multiplications" of a bias-free matmul: each of the B*m
  outputs needs n multiplications and n - 1 additions, so (B x n) @ (n x m) costs
  B*m*(2n - 1); a d x d projection over B tokens costs 2Bd^2 - Bd.

In both, only matmuls count: bias additions, the activation, SwiGLU's gating product, softmax
and top-k are not counted. The router's matmul (the gate G) and the weighted combination of the
k expert outputs are reported apart from the layer's "active" FLOPs, as in the paper's Eq. 6,
which counts head, experts and merge only.

The planner (``plan_mhmoe``) turns an SMoE config into an MH-MoE config with the same active
FLOPs per token (Eq. 8, generalised to SwiGLU and to any top-k) and the closest parameter count
(Eq. 9), and reports every remaining deviation. ``variants_from_smoe`` / ``paper_variants``
derive the paper's five compared models (Section 3) from one SMoE config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mhmoe import checks
from mhmoe.config import DenseConfig, FFNConfig, ModelConfig, MoEConfig

FLOP_CONVENTIONS = ("flops", "paper")


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def num_matrices(activation: str) -> int:
    """Weight matrices per FFN: 3 for SwiGLU (w1, w3, w2), 2 for ReLU (w1, w2)."""
    if activation == "swiglu":
        return 3
    if activation == "relu":
        return 2
    raise ValueError(f"activation={activation!r}: must be one of swiglu, relu")


def matmul_cost(rows: int, n: int, m: int, convention: str = "flops") -> int:
    """Cost of a (rows x n) @ (n x m) matmul.

    ``"flops"``: 2*rows*n*m (2 per multiply-add). ``"paper"``: rows*m*(2n - 1), the paper's
    scalar multiplications of a bias-free matmul (Section 2.2).
    """
    if convention == "flops":
        return 2 * rows * n * m
    if convention == "paper":
        return rows * m * (2 * n - 1)
    raise ValueError(f"convention={convention!r}: must be one of {', '.join(FLOP_CONVENTIONS)}")


def ffn_params(d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False) -> int:
    """Parameters of a FeedForward d_model -> d_ff -> d_model (nn.Linear w1, [w3,] w2)."""
    n = num_matrices(activation)
    weights = n * d_model * d_ff
    biases = (n - 1) * d_ff + d_model if bias else 0
    return weights + biases


def ffn_cost(tokens: int, d_model: int, d_ff: int, activation: str, convention: str) -> int:
    """Matmul cost of a FeedForward over ``tokens`` rows: (n - 1) up projections, one down."""
    up = (num_matrices(activation) - 1) * matmul_cost(tokens, d_model, d_ff, convention)
    down = matmul_cost(tokens, d_ff, d_model, convention)
    return up + down


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one feed-forward slot, by component (all zero where absent)."""

    head: int = 0
    merge: int = 0
    router: int = 0
    experts: int = 0
    shared: int = 0
    dense: int = 0

    @property
    def total(self) -> int:
        return self.head + self.merge + self.router + self.experts + self.shared + self.dense

    @property
    def head_merge(self) -> int:
        return self.head + self.merge

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def count_params(cfg: FFNConfig) -> ParamCount:
    """Parameters of the module ``build_ffn(cfg)`` builds; ``.total`` == sum of its numel().

    MoE layer: head (d x d [+ d]) and merge (d x d [+ d]) when present, router (E x s, no
    bias), experts n * E * d_e * s (no biases), shared FeedForward(d, shared_d_ff) when set.
    Biases (``bias=True``) exist only on the head/merge and FeedForward nn.Linear layers.
    """
    if isinstance(cfg, DenseConfig):
        return ParamCount(dense=ffn_params(cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias))
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"expected DenseConfig or MoEConfig, got {type(cfg).__name__}")
    d = cfg.d_model
    projection = d * d + (d if cfg.bias else 0)
    return ParamCount(
        head=projection if cfg.has_head else 0,
        merge=projection if cfg.has_merge else 0,
        router=cfg.num_experts * cfg.d_sub,
        experts=num_matrices(cfg.activation) * cfg.num_experts * cfg.d_expert * cfg.d_sub,
        shared=(
            ffn_params(d, cfg.shared_d_ff, cfg.activation, cfg.bias)
            if cfg.shared_d_ff is not None
            else 0
        ),
    )


# ---------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopCount:
    """Forward matmul cost of one feed-forward slot over some tokens, by component.

    ``layer`` is the paper's "active" cost (Eq. 6: head + experts + merge, plus the shared
    expert or the dense FFN); ``router`` (the gate's matmul) and ``combine`` (the weighted sum
    of the k expert outputs of every sub-token) are kept apart; ``total`` adds all.
    """

    head: int = 0
    merge: int = 0
    experts: int = 0
    shared: int = 0
    dense: int = 0
    router: int = 0
    combine: int = 0

    @property
    def layer(self) -> int:
        return self.head + self.merge + self.experts + self.shared + self.dense

    @property
    def total(self) -> int:
        return self.layer + self.router + self.combine

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "layer": self.layer, "total": self.total}


def count_flops(cfg: FFNConfig, tokens: int = 1, *, convention: str = "flops") -> FlopCount:
    """Forward matmul cost of ``build_ffn(cfg)`` over ``tokens`` tokens (see module docstring).

    With dropless routing every sub-token goes to exactly k experts, so the count is exact,
    whatever the routing decisions.
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens={tokens!r}: must be a non-negative integer")
    matmul_cost(0, 1, 1, convention)  # validates the convention
    B = tokens
    if isinstance(cfg, DenseConfig):
        return FlopCount(dense=ffn_cost(B, cfg.d_model, cfg.d_ff, cfg.activation, convention))
    if not isinstance(cfg, MoEConfig):
        raise TypeError(f"expected DenseConfig or MoEConfig, got {type(cfg).__name__}")
    d, h, s, k = cfg.d_model, cfg.num_heads, cfg.d_sub, cfg.top_k
    units = B * h  # routed sub-tokens
    assignments = units * k  # expert rows: every sub-token visits k experts (dropless)
    # Eq. 6, first and last terms: a d x d projection over B tokens, 2Bd^2 - Bd ("paper").
    projection = matmul_cost(B, d, d, convention)
    # Eq. 6, middle term: ReLU experts cost (4 B d d_e - B d - B d_e h) k in the paper's
    # convention; in general (n - 1) up projections s -> d_e and one down projection d_e -> s
    # for each of the B*h*k (sub-token, expert) pairs.
    experts = ffn_cost(assignments, s, cfg.d_expert, cfg.activation, convention)
    return FlopCount(
        head=projection if cfg.has_head else 0,
        merge=projection if cfg.has_merge else 0,
        experts=experts,
        shared=(
            ffn_cost(B, d, cfg.shared_d_ff, cfg.activation, convention)
            if cfg.shared_d_ff is not None
            else 0
        ),
        # Gate G: R^s -> R^E on every sub-token.
        router=matmul_cost(units, s, cfg.num_experts, convention),
        # y = sum_k G(x)_k Expert_k(x): a (1 x k) @ (k x s) product per sub-token.
        combine=matmul_cost(units, k, s, convention),
    )


def active_multiply_adds(cfg: FFNConfig) -> int:
    """Multiply-adds per token of the layer without router and combine (head/merge included).

    The paper's 4,718,592 for every MoE model of Section 3 (d_model 768).
    """
    return count_flops(cfg, 1).layer // 2


# ---------------------------------------------------------------------------------------------
# torch.utils.flop_counter support for torch._grouped_mm
# ---------------------------------------------------------------------------------------------


def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of ``torch._grouped_mm(a, b, offs=...)`` from its shapes.

    * 2D x 3D (rows sorted by group, ``offs`` marks their ends): a (M, K), b (G, K, N):
      every row meets one group's matrix, 2*M*K*N.
    * 3D x 3D (batched): a (G, M, K), b (G, K, N): 2*G*M*K*N.
    * 2D x 2D (groups along K, e.g. weight gradients): a (M, K), b (K, N): 2*M*K*N.
    * 3D x 2D (groups along N): a (G, M, K), b (K, N): 2*M*K*N.
    """
    if len(a_shape) == 3 and len(b_shape) == 3:
        groups, m, k = a_shape
        return 2 * groups * m * k * b_shape[2]
    m, k = a_shape[-2], a_shape[-1]
    return 2 * m * k * b_shape[-1]


def register_grouped_mm_flop_formula() -> bool:
    """Teach ``FlopCounterMode`` to count ``torch.ops.aten._grouped_mm`` (idempotent).

    Without a formula the expert matmuls count as 0 FLOPs. Call before creating the
    ``FlopCounterMode`` (it copies the registry when constructed). Returns whether the op is
    registered now (False when this torch has no ``_grouped_mm``).
    """
    import torch
    from torch.utils import flop_counter

    packet = getattr(torch.ops.aten, "_grouped_mm", None)
    if packet is None:  # pragma: no cover - older torch
        return False
    if packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(packet)(grouped_mm_flops)
    return True


# ---------------------------------------------------------------------------------------------
# The parity planner (paper Section 2.3)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The paper's five models (Section 3), derived from one SMoE config
# ---------------------------------------------------------------------------------------------


def count_model_params(config: ModelConfig) -> dict[str, int]:
    """Parameters of ``TransformerLM(config)`` by component, analytically.

    ``total`` equals ``sum(p.numel() for p in model.parameters())``. ``active`` counts what one
    token uses: everything except the experts it is not routed to. A token's h sub-tokens make
    h * k expert visits, so an MoE layer contributes ``experts * min(h k, E) / E`` expert
    parameters (the paper's "activated parameters"; exact when the visits hit distinct experts).
    """

    d, vocab = config.d_model, config.vocab_size
    embedding = vocab * d
    output = 0 if config.tie_embeddings else vocab * d
    attention = config.num_layers * 4 * d * d
    norms = (2 * config.num_layers + 1) * d
    ffn_total = 0
    ffn_active = 0
    for index in range(config.num_layers):
        ffn = config.ffn_for_block(index)
        counts = count_params(ffn)
        ffn_total += counts.total
        if isinstance(ffn, MoEConfig):
            visits = min(ffn.num_heads * ffn.top_k, ffn.num_experts)
            ffn_active += counts.total - counts.experts + counts.experts * visits // ffn.num_experts
        else:
            ffn_active += counts.total
    shared = embedding + output + attention + norms
    return {
        "embedding": embedding,
        "output": output,
        "attention": attention,
        "norms": norms,
        "ffn": ffn_total,
        "total": shared + ffn_total,
        "active": shared + ffn_active,
    }


def count_model_flops(config: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Forward FLOPs per token (2 per multiply-add, matmuls only), analytically.

    ``attention_proj``: q, k, v and output projections, 8 d^2 per layer; ``attention_scores``:
    QK^T and AV over a context of ``seq_len`` (default max_seq_len) keys, 4 T d per layer
    (the Kaplan et al. 2020 convention, causal masking not discounted); ``ffn``: every FFN
    slot's ``mhmoe.planning.counts.count_flops(...).total`` (experts, head/merge, shared expert, router
    and combine); ``output``: 2 d V. Training costs about 3x ``total``.
    """

    seq_len = config.max_seq_len if seq_len is None else seq_len
    checks.positive_int("seq_len", seq_len)
    d = config.d_model
    attention_proj = config.num_layers * 8 * d * d
    attention_scores = config.num_layers * 4 * seq_len * d
    ffn = sum(count_flops(config.ffn_for_block(i)).total for i in range(config.num_layers))
    moe_layer = sum(
        count_flops(config.ffn_for_block(i)).layer
        for i in range(config.num_layers)
        if config.is_moe_block(i)
    )
    output = 2 * d * config.vocab_size
    return {
        "attention_proj": attention_proj,
        "attention_scores": attention_scores,
        "ffn": ffn,
        "moe_layers_active": moe_layer,
        "output": output,
        "total": attention_proj + attention_scores + ffn + output,
    }
