"""The decoder-only language model of the paper's experiments (Section 3).

Shape legend: B batch, T sequence length, D d_model, A attention heads, C = D / A head size,
V vocabulary size.

    x = embed(ids)
    for every block:  x = x + attention(rmsnorm(x));  x = x + ffn(rmsnorm(x))
    logits = lm_head(rmsnorm(x))

* pre-norm RMSNorm (Zhang & Sennrich 2019), no biases anywhere;
* rotary position embeddings (Su et al. 2021) in the "rotate half" layout of GPT-NeoX/Llama
  (the first and second halves of each head form the rotated pairs);
* causal self-attention through ``torch.nn.functional.scaled_dot_product_attention``;
* the FFN slot holds a SwiGLU ``FeedForward`` or any MoE layer of ``mhmoe.layers``.
  Paper Section 3: "MoE layer every second Transformer layer": block i (0-based) holds the MoE
  layer when ``(i + 1) % moe_every == 0`` (the torchscale/fairseq ``moe_freq`` rule), so with
  ``moe_every = 2`` blocks 1, 3, 5, ... are MoE and the others dense;
* optional tied input/output embeddings (the output projection then reuses ``embed.weight``;
  no separate ``lm_head.weight`` exists, so state dicts have no shared tensors).

``forward`` returns an ``LMOutput``: the logits, the weighted auxiliary loss and the per-layer
``MoEAux`` list. Nothing is stored on the modules between calls.

Auxiliary loss (our documented choice; the paper gives only the weight 0.01 of the authors'
scripts):  aux_loss = w_lb * mean_l L_lb(l) + w_z * mean_l L_z(l), the mean taken over the MoE
layers (fairseq's ``gate_loss_combine_method="average"``), so the weights do not scale with
depth. A dense model has aux_loss = 0.

Initialisation: every ``nn.Linear`` keeps PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
the scale the MoE experts use too (``mhmoe.layers.experts``), so dense and expert FFNs start
alike; the token embedding is N(0, 0.02) (GPT-2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.mh_moe import build_ffn
from mhmoe.layers.moe import MoEAux

__all__ = [
    "Attention",
    "Block",
    "LMOutput",
    "ModelConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerLM",
    "apply_rotary",
    "count_model_flops",
    "count_model_params",
    "ffn_config_from_dict",
    "ffn_config_to_dict",
    "lm_loss",
]


def _require_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _require_non_negative_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name}={value!r}: must be a finite non-negative number")


def ffn_config_to_dict(config: DenseConfig | MoEConfig) -> dict[str, Any]:
    """A JSON-able dict of an FFN config, with its ``kind`` ("dense" or "moe")."""
    return {"kind": config.kind, **dataclasses.asdict(config)}


def ffn_config_from_dict(data: dict[str, Any]) -> DenseConfig | MoEConfig:
    """Inverse of ``ffn_config_to_dict``; validates through the dataclass."""
    if not isinstance(data, dict):
        raise ValueError(f"FFN config {data!r}: must be a JSON object")
    fields = dict(data)
    kind = fields.pop("kind", None)
    cls = {"dense": DenseConfig, "moe": MoEConfig}.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"FFN config kind={kind!r}: must be 'dense' or 'moe'")
    _check_fields(f"FFN config ({kind})", cls, fields)
    return cls(**fields)


def _check_fields(what: str, cls: type, fields: dict[Any, Any]) -> None:
    """ValueError naming unknown or missing (required) fields of a dataclass to build."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((k for k in fields if k not in known), key=repr)
    if unknown:
        raise ValueError(f"{what} has unknown fields {unknown}")
    missing = [name for name, f in known.items() if name not in fields
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{what} lacks the required fields {missing}")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a ``TransformerLM``.

    ``dense_ffn`` fills the FFN slot of the blocks without MoE (and of every block when
    ``moe_ffn`` is None, the Dense baseline); ``moe_ffn`` fills every ``moe_every``-th block.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_attention_heads: int
    max_seq_len: int
    dense_ffn: DenseConfig
    moe_ffn: MoEConfig | None = None
    moe_every: int = 2
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_attention_heads",
                     "max_seq_len", "moe_every"):
            _require_positive_int(name, getattr(self, name))
        if self.d_model % self.num_attention_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if (self.d_model // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"attention head size d_model/num_attention_heads="
                f"{self.d_model // self.num_attention_heads}: must be even for rotary embeddings"
            )
        if not isinstance(self.dense_ffn, DenseConfig):
            raise ValueError(f"dense_ffn={self.dense_ffn!r}: must be a DenseConfig")
        if self.moe_ffn is not None and not isinstance(self.moe_ffn, MoEConfig):
            raise ValueError(f"moe_ffn={self.moe_ffn!r}: must be a MoEConfig or None")
        for name, ffn in (("dense_ffn", self.dense_ffn), ("moe_ffn", self.moe_ffn)):
            if ffn is not None and ffn.d_model != self.d_model:
                raise ValueError(
                    f"{name}.d_model={ffn.d_model} differs from the model's d_model={self.d_model}"
                )
        if self.moe_ffn is not None and self.moe_every > self.num_layers:
            raise ValueError(
                f"moe_every={self.moe_every} exceeds num_layers={self.num_layers}: "
                "the model would have no MoE layer"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r}: must be true or false")
        if isinstance(self.rope_theta, bool) or not isinstance(self.rope_theta, (int, float)) \
                or not 0 < self.rope_theta < float("inf"):
            raise ValueError(f"rope_theta={self.rope_theta!r}: must be a finite positive number")
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) \
                or not 0 < self.norm_eps < float("inf"):
            raise ValueError(f"norm_eps={self.norm_eps!r}: must be a finite positive number")
        _require_non_negative_number("load_balancing_weight", self.load_balancing_weight)
        _require_non_negative_number("z_loss_weight", self.z_loss_weight)

    @property
    def head_size(self) -> int:
        return self.d_model // self.num_attention_heads

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) holds the MoE layer: (index + 1) % moe_every == 0."""
        return self.moe_ffn is not None and (index + 1) % self.moe_every == 0

    def ffn_for_block(self, index: int) -> DenseConfig | MoEConfig:
        return self.moe_ffn if self.is_moe_block(index) else self.dense_ffn  # type: ignore[return-value]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.num_layers))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["dense_ffn"] = ffn_config_to_dict(self.dense_ffn)
        data["moe_ffn"] = None if self.moe_ffn is None else ffn_config_to_dict(self.moe_ffn)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"model config {data!r}: must be a JSON object")
        fields = dict(data)
        if "dense_ffn" not in fields:
            raise ValueError("model config lacks 'dense_ffn'")
        _check_fields("model config", cls, fields)
        fields["dense_ffn"] = ffn_config_from_dict(fields["dense_ffn"])
        if fields.get("moe_ffn") is not None:
            fields["moe_ffn"] = ffn_config_from_dict(fields["moe_ffn"])
        return cls(**fields)


@dataclass
class LMOutput:
    """What ``TransformerLM.forward`` returns; losses are returned, never stored."""

    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar: w_lb * mean_l L_lb + w_z * mean_l L_z (0 for dense)
    moe_aux: list[MoEAux] = field(default_factory=list)  # one per MoE layer, block order


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * g, computed in float32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings, theta_i = base^(-2i/C), i < C/2.

    The tables are computed on each call (a (T, C) outer product, negligible next to the
    attention itself) on the device of the model: no buffers, so nothing to checkpoint and
    nothing left uninitialised when a model built on the meta device is materialised.
    """

    def __init__(self, head_size: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        self.head_size = head_size
        self.max_seq_len = max_seq_len
        self.base = base

    def forward(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len={self.max_seq_len}")
        half = self.head_size // 2
        inv_freq = self.base ** (-torch.arange(half, dtype=torch.float64, device=device) / half)
        positions = torch.arange(seq_len, dtype=torch.float64, device=device)
        angles_TH = torch.outer(positions, inv_freq)  # (T, C/2)
        angles_TC = torch.cat([angles_TH, angles_TH], dim=-1)  # (T, C/2) -> (T, C)
        return angles_TC.cos().float(), angles_TC.sin().float()

    def extra_repr(self) -> str:
        return f"head_size={self.head_size}, max_seq_len={self.max_seq_len}, base={self.base}"


def apply_rotary(x_BATC: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+C/2}) by angle t * theta_i: x * cos + rotate_half(x) * sin."""
    half = x_BATC.shape[-1] // 2
    x1, x2 = x_BATC[..., :half], x_BATC[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    cos = cos_TC.to(x_BATC.dtype)
    sin = sin_TC.to(x_BATC.dtype)
    return x_BATC * cos + rotated * sin


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary embeddings (no biases)."""

    def __init__(self, d_model: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = d_model // num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor) -> torch.Tensor:
        batch, seq_len, d_model = x_BTD.shape
        qkv_BTD3 = self.qkv(x_BTD)
        # (B, T, 3D) -> (B, T, 3, A, C) -> (3, B, A, T, C)
        qkv = qkv_BTD3.view(batch, seq_len, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        q_BATC, k_BATC, v_BATC = qkv.unbind(0)
        q_BATC = apply_rotary(q_BATC, cos_TC, sin_TC)
        k_BATC = apply_rotary(k_BATC, cos_TC, sin_TC)
        y_BATC = F.scaled_dot_product_attention(q_BATC, k_BATC, v_BATC, is_causal=True)
        y_BTD = y_BATC.transpose(1, 2).reshape(batch, seq_len, d_model)  # (B, A, T, C) -> (B, T, D)
        return self.out(y_BTD)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, config: ModelConfig, ffn_config: DenseConfig | MoEConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config.d_model, config.num_attention_heads)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = build_ffn(ffn_config)
        self.is_moe = isinstance(ffn_config, MoEConfig)

    def forward(
        self, x_BTD: torch.Tensor, cos_TC: torch.Tensor, sin_TC: torch.Tensor
    ) -> tuple[torch.Tensor, MoEAux | None]:
        x_BTD = x_BTD + self.attention(self.attention_norm(x_BTD), cos_TC, sin_TC)
        if self.is_moe:
            ffn_out, aux = self.ffn(self.ffn_norm(x_BTD))
        else:
            ffn_out, aux = self.ffn(self.ffn_norm(x_BTD)), None
        return x_BTD + ffn_out, aux


class TransformerLM(nn.Module):
    """Decoder-only LM; ``forward(ids_BT) -> LMOutput`` (module docstring)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed.weight, mean=0.0, std=0.02)
        self.rotary = RotaryEmbedding(config.head_size, config.max_seq_len, config.rope_theta)
        self.blocks = nn.ModuleList(
            Block(config, config.ffn_for_block(i)) for i in range(config.num_layers)
        )
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = (
            None if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )

    def forward(self, ids_BT: torch.Tensor) -> LMOutput:
        if ids_BT.dim() != 2:
            raise ValueError(f"input ids have shape {tuple(ids_BT.shape)}, expected (batch, seq)")
        cos_TC, sin_TC = self.rotary(ids_BT.shape[1], self.embed.weight.device)
        x_BTD = self.embed(ids_BT)
        moe_aux: list[MoEAux] = []
        for block in self.blocks:
            x_BTD, aux = block(x_BTD, cos_TC, sin_TC)
            if aux is not None:
                moe_aux.append(aux)
        x_BTD = self.final_norm(x_BTD)
        head_weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits_BTV = F.linear(x_BTD, head_weight)
        return LMOutput(logits_BTV, self.aux_loss(moe_aux, x_BTD), moe_aux)

    def aux_loss(self, moe_aux: list[MoEAux], like: torch.Tensor) -> torch.Tensor:
        """w_lb * mean_l L_lb + w_z * mean_l L_z over the MoE layers (0 without MoE layers)."""
        total = like.new_zeros((), dtype=torch.float32)
        if not moe_aux:
            return total
        num_layers = len(moe_aux)
        if self.config.load_balancing_weight:
            lb = sum(a.load_balancing_loss.float() for a in moe_aux) / num_layers
            total = total + self.config.load_balancing_weight * lb
        if self.config.z_loss_weight:
            z = sum(a.z_loss.float() for a in moe_aux) / num_layers
            total = total + self.config.z_loss_weight * z
        return total

    def num_parameters(self) -> int:
        """Stored parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in float32."""
    vocab = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV.reshape(-1, vocab).float(), targets_BT.reshape(-1))



# ---------------------------------------------------------------------------------------------
# Analytic counts of the whole model (the FFN slots come from mhmoe.parity)
# ---------------------------------------------------------------------------------------------


def count_model_params(config: ModelConfig) -> dict[str, int]:
    """Parameters of ``TransformerLM(config)`` by component, analytically.

    ``total`` equals ``sum(p.numel() for p in model.parameters())``. ``active`` counts what one
    token uses: everything except the experts it is not routed to. A token's h sub-tokens make
    h * k expert visits, so an MoE layer contributes ``experts * min(h k, E) / E`` expert
    parameters (the paper's "activated parameters"; exact when the visits hit distinct experts).
    """
    from mhmoe.parity import count_params

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
    slot's ``mhmoe.parity.count_flops(...).total`` (experts, head/merge, shared expert, router
    and combine); ``output``: 2 d V. Training costs about 3x ``total``.
    """
    from mhmoe.parity import count_flops

    seq_len = config.max_seq_len if seq_len is None else seq_len
    _require_positive_int("seq_len", seq_len)
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
