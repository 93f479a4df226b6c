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
scripts):  aux_loss = w_lb * mean_l L_lb(l) + w_z * mean_l L_z(l) + w_seq * mean_l L_seq(l),
the mean taken over the MoE layers (fairseq's ``gate_loss_combine_method="average"``), so the
weights do not scale with depth. A dense model has aux_loss = 0. L_lb is the load-balancing
loss of ``mhmoe.layers.routing`` (f_i over this micro-batch, or over the global batch with
``MoEConfig.load_balancing="global-batch"``); with ``"aux-free"`` or ``"none"`` it is not added
(aux-free balances through the selection bias, DeepSeek-V3). L_seq is DeepSeek-V3's
sequence-wise balance loss (``ModelConfig.seq_aux_loss_weight``, 0 by default).

Initialisation: every ``nn.Linear`` keeps PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
the scale the MoE experts use too (``mhmoe.layers.experts``), so dense and expert FFNs start
alike; the token embedding is N(0, 0.02) (GPT-2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mhmoe.bitnet.convert import apply_bitnet
from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
from mhmoe.layers.mh_moe import build_ffn
from mhmoe.layers.moe import MoEAux


@dataclass
class LMOutput:
    """What ``TransformerLM.forward`` returns; losses are returned, never stored."""

    logits: torch.Tensor  # (B, T, V)
    aux_loss: torch.Tensor  # scalar: w_lb * mean_l L_lb + w_z * mean_l L_z + w_seq * mean_l L_seq
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
        # Paired seeds (mhmoe reproduce): the feed-forward layer, the only module that differs
        # between variants, draws its initial weights from a stream of its own (seeded from the
        # shared stream, which it leaves where it was), so with one seed every other module
        # (embedding, attention, norms, LM head) starts from the same weights in every variant.
        ffn_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))  # also under a meta-device build
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(ffn_seed)  # the CPU generator only
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

    # The logits are F.linear(x, lm_head.weight): BitNet must not convert the LM head.
    weights_read_directly = ("lm_head",)

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
        # Recompute each block in the backward pass (torch.utils.checkpoint, non-reentrant) when
        # training with autograd: less activation memory, the same outputs and gradients.
        self.activation_checkpointing = False
        self.lm_head = (
            None if config.tie_embeddings
            else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        if config.bitnet is not None:  # BitNet b1.58 (paper Table 3): the converter swaps layers
            apply_bitnet(self, config.bitnet)
        if config.seq_aux_loss_weight:  # the MoE layers also return L_seq
            for block in self.blocks:
                if block.is_moe:
                    block.ffn.compute_seq_balance = True

    def forward(self, ids_BT: torch.Tensor) -> LMOutput:
        if ids_BT.dim() != 2:
            raise ValueError(f"input ids have shape {tuple(ids_BT.shape)}, expected (batch, seq)")
        cos_TC, sin_TC = self.rotary(ids_BT.shape[1], self.embed.weight.device)
        x_BTD = self.embed(ids_BT)
        moe_aux: list[MoEAux] = []
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x_BTD, aux = checkpoint(block, x_BTD, cos_TC, sin_TC, use_reentrant=False)
            else:
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
        moe_config = self.config.moe_ffn
        adds_balance_loss = moe_config is None or moe_config.load_balancing in ("micro-batch", "global-batch")
        if self.config.load_balancing_weight and adds_balance_loss:
            lb = sum(a.load_balancing_loss.float() for a in moe_aux) / num_layers
            total = total + self.config.load_balancing_weight * lb
        if self.config.z_loss_weight:
            z = sum(a.z_loss.float() for a in moe_aux) / num_layers
            total = total + self.config.z_loss_weight * z
        if self.config.seq_aux_loss_weight:
            seq = sum(a.seq_balance_loss.float() for a in moe_aux if a.seq_balance_loss is not None) / num_layers
            total = total + self.config.seq_aux_loss_weight * seq
        return total

    def num_parameters(self) -> int:
        """Stored parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())


def lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats, computed in float32."""
    vocab = logits_BTV.shape[-1]
    return F.cross_entropy(logits_BTV.reshape(-1, vocab).float(), targets_BT.reshape(-1))


# ---------------------------------------------------------------------------------------------
# Analytic counts of the whole model (the FFN slots come from mhmoe.planning.counts)
# ---------------------------------------------------------------------------------------------


