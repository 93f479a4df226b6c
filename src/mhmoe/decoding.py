"""KV-cached forward pass and token sampling over the modules of ``mhmoe.model.TransformerLM``.

Shape legend: B batch, T new tokens, P tokens already in the cache, S = P + T keys, D d_model,
A attention heads, C head size, V vocabulary.

``decoder_forward`` runs the blocks of a TransformerLM (its very modules: the same weights,
BitNet conversions included) with three additions the training forward does not need:

* a key/value cache: any object with ``update(k_BACT, v_BACT, layer_idx) -> (k_BASC, v_BASC)``
  and ``get_seq_length()``: ``KVCache`` below, or transformers' ``DynamicCache``;
* explicit positions (``position_ids``, for left-padded batches) for the rotary embeddings;
* a padding mask (``attention_mask``, 1 for real tokens, over the S keys).

Without cache, padding and positions it computes exactly what ``TransformerLM.forward`` does
(the same operations in the same order, ``is_causal`` SDPA), so logits match bit for bit. The
block structure (pre-norm attention, then pre-norm FFN/MoE) is written out again here, since
``mhmoe.model.Attention`` takes no cache; the tests compare both paths.

Nothing here imports ``transformers``: ``mhmoe generate`` uses it on a run directory.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.layers.moe import MoEAux
from mhmoe.model import Attention, RotaryEmbedding, TransformerLM, apply_rotary


class CacheLike(Protocol):
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVCache:
    """A minimal growing key/value cache: one (B, A, S, C) key and value tensor per layer.

    Implements the part of transformers' ``Cache`` API that ``decoder_forward`` uses.
    """

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key_BATC: torch.Tensor, value_BATC: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(key_BATC)
            self.values.append(value_BATC)
        elif layer_idx < len(self.keys):
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key_BATC], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value_BATC], dim=-2)
        else:
            raise ValueError(f"layer_idx={layer_idx}: layers must be cached in order (have {len(self.keys)})")
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if layer_idx >= len(self.keys) else self.keys[layer_idx].shape[-2]


@dataclass
class DecoderOutput:
    """What ``decoder_forward`` returns."""

    hidden_BTD: torch.Tensor  # after the final norm
    moe_aux: list[MoEAux] = field(default_factory=list)  # one per MoE block, block order
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then every block's output


_ROTARY_TABLES: weakref.WeakKeyDictionary[RotaryEmbedding, dict[tuple, tuple[torch.Tensor, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def _normal_device(device: torch.device | str) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:<current>"), so that one device has one key."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        backend = getattr(torch, device.type, None)
        current = getattr(backend, "current_device", None)
        if current is not None:
            device = torch.device(device.type, current())
    return device


def _full_rotary_tables(rotary: RotaryEmbedding, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary(max_seq_len)``, computed once per module, device and settings.

    Row t of the tables depends on t alone (an outer product, then cos/sin element-wise), so
    rows of the full tables equal those of ``rotary(end)`` bit for bit: a decoding step slices
    them instead of recomputing every position up to ``end`` (what it did before, per step).

    Built outside inference mode (and without autograd): the tables outlive the call, and
    tensors made under ``torch.inference_mode()`` cannot be saved for backward, so a later
    training forward through this path would fail on them.
    """
    device = _normal_device(device)
    key = (device, rotary.head_size, rotary.max_seq_len, rotary.base)
    per_module = _ROTARY_TABLES.setdefault(rotary, {})
    tables = per_module.get(key)
    if tables is None:
        with torch.inference_mode(False), torch.no_grad():
            tables = rotary(rotary.max_seq_len, device)
        per_module.clear()
        per_module[key] = tables
    return tables


def _rotary_tables(
    rotary: RotaryEmbedding, past: int, seq_len: int, position_ids: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for the new tokens: (T, C) for consecutive positions, (B, 1, T, C) for explicit ones."""
    limit = rotary.max_seq_len
    if position_ids is None:
        end = past + seq_len
        if end > limit:
            raise ValueError(
                f"sequence of {end} tokens ({past} cached + {seq_len} new) exceeds the model's context "
                f"max_position_embeddings={limit} (rotary positions are trained up to {limit - 1})"
            )
        cos_TC, sin_TC = _full_rotary_tables(rotary, device)
        return cos_TC[past:end], sin_TC[past:end]
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != seq_len:
        raise ValueError(f"position_ids have shape {tuple(position_ids.shape)}, expected (batch, {seq_len})")
    low, high = int(position_ids.min()), int(position_ids.max())
    if low < 0 or high >= limit:
        raise ValueError(
            f"position ids span [{low}, {high}]: must lie in [0, {limit - 1}] "
            f"(max_position_embeddings={limit})"
        )
    cos_TC, sin_TC = _full_rotary_tables(rotary, device)  # rows 0..high are rotary(high + 1)
    # (B, T) ids -> (B, T, C) -> (B, 1, T, C), broadcast over the heads
    return cos_TC[position_ids].unsqueeze(1), sin_TC[position_ids].unsqueeze(1)


def _attention_mask(
    attention_mask: torch.Tensor | None, batch: int, past: int, seq_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """(boolean SDPA mask (B|1, 1, T, S) or None, is_causal) for the new tokens."""
    total = past + seq_len
    key_valid_BS = None
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] != total:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, cached + new "
                f"tokens) = ({batch}, {total})"
            )
        if not bool(attention_mask.all()):
            key_valid_BS = attention_mask.to(device=device, dtype=torch.bool)
    if key_valid_BS is None:
        if past == 0:
            return None, seq_len > 1  # the training path: plain causal SDPA
        if seq_len == 1:
            return None, False  # one new token sees every cached key
    query_pos_T1 = torch.arange(past, total, device=device).unsqueeze(1)
    key_pos_1S = torch.arange(total, device=device).unsqueeze(0)
    allowed_TS = key_pos_1S <= query_pos_T1
    if key_valid_BS is None:
        return allowed_TS[None, None], False
    allowed_BTS = allowed_TS.unsqueeze(0) & key_valid_BS.unsqueeze(1)
    # Padding queries see nothing else; letting every query see itself keeps SDPA from producing
    # NaN rows (which would leak through 0 * NaN into later layers).
    allowed_BTS = allowed_BTS | (key_pos_1S == query_pos_T1).unsqueeze(0)
    return allowed_BTS.unsqueeze(1), False


def attend(
    attention: Attention,
    x_BTD: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    cache: CacheLike | None,
    layer_idx: int,
    mask: torch.Tensor | None,
    is_causal: bool,
    cache_total: int | None = None,
) -> torch.Tensor:
    """``mhmoe.model.Attention.forward`` with a KV cache and an optional mask (its own weights).

    ``cache_total``: the number of keys the cache must hold after the update (cached + new).
    """
    batch, seq_len, d_model = x_BTD.shape
    qkv_BTD3 = attention.qkv(x_BTD)
    # (B, T, 3D) -> (B, T, 3, A, C) -> (3, B, A, T, C)
    qkv = qkv_BTD3.view(batch, seq_len, 3, attention.num_heads, attention.head_size).permute(2, 0, 3, 1, 4)
    q_BATC, k_BATC, v_BATC = qkv.unbind(0)
    q_BATC = apply_rotary(q_BATC, cos, sin)
    k_BATC = apply_rotary(k_BATC, cos, sin)
    if cache is not None:
        k_BASC, v_BASC = cache.update(k_BATC, v_BATC, layer_idx)
        expected = cache_total if cache_total is not None else k_BASC.shape[-2]
        if k_BASC.shape[-2] != expected:
            raise NotImplementedError(
                f"the cache returned {k_BASC.shape[-2]} keys for {expected} positions: only growing "
                "caches (KVCache, transformers' DynamicCache) are supported, not static/sliding ones"
            )
    else:
        k_BASC, v_BASC = k_BATC, v_BATC
    y_BATC = F.scaled_dot_product_attention(q_BATC, k_BASC, v_BASC, attn_mask=mask, is_causal=is_causal)
    y_BTD = y_BATC.transpose(1, 2).reshape(batch, seq_len, d_model)  # (B, A, T, C) -> (B, T, D)
    return attention.out(y_BTD)


def decoder_forward(
    x_BTD: torch.Tensor,
    blocks: Sequence[nn.Module],
    final_norm: nn.Module,
    rotary: RotaryEmbedding,
    *,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: CacheLike | None = None,
    output_hidden_states: bool = False,
) -> DecoderOutput:
    """Run ``blocks`` (``mhmoe.model.Block``s) on the embedded new tokens ``x_BTD``.

    ``cache`` (updated in place) holds the keys/values of the P earlier tokens; ``attention_mask``
    (B, P + T) marks real tokens with 1; ``position_ids`` (B, T) default to P, P+1, ...
    Raises ValueError for positions beyond the model's context.
    """
    if x_BTD.dim() != 3:
        raise ValueError(f"embeddings have shape {tuple(x_BTD.shape)}, expected (batch, seq, d_model)")
    batch, seq_len, _ = x_BTD.shape
    past = cache.get_seq_length() if cache is not None else 0
    device = x_BTD.device
    cos, sin = _rotary_tables(rotary, past, seq_len, position_ids, device)
    mask, is_causal = _attention_mask(attention_mask, batch, past, seq_len, device)
    hidden: list[torch.Tensor] | None = [x_BTD] if output_hidden_states else None
    moe_aux: list[MoEAux] = []
    for layer_idx, block in enumerate(blocks):
        # The same two residual steps as mhmoe.model.Block.forward.
        x_BTD = x_BTD + attend(block.attention, block.attention_norm(x_BTD), cos, sin, cache, layer_idx,
                               mask, is_causal, past + seq_len)
        if block.is_moe:
            ffn_out, aux = block.ffn(block.ffn_norm(x_BTD))
            moe_aux.append(aux)
        else:
            ffn_out = block.ffn(block.ffn_norm(x_BTD))
        x_BTD = x_BTD + ffn_out
        if hidden is not None:
            hidden.append(x_BTD)
    return DecoderOutput(final_norm(x_BTD), moe_aux, tuple(hidden) if hidden is not None else None)


def lm_logits(model: TransformerLM, hidden_BTD: torch.Tensor) -> torch.Tensor:
    """The output projection of ``model`` (tied or not), as in ``TransformerLM.forward``."""
    head_weight = model.embed.weight if model.lm_head is None else model.lm_head.weight
    return F.linear(hidden_BTD, head_weight)


# ---------------------------------------------------------------------------------------------
# Sampling (mhmoe generate)
# ---------------------------------------------------------------------------------------------


def sample_next(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,): argmax when ``temperature == 0``, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely tokens."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r}: must be a number >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: must be a positive integer or None")
    logits_BV = logits_BV.float()
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    scaled_BV = logits_BV / temperature
    if bool((torch.isinf(scaled_BV) & torch.isfinite(logits_BV)).any()):
        # A tiny temperature (1e-320 in issue 16) overflows logits / T to inf, and softmax of
        # inf - inf is NaN (multinomial then raised RuntimeError). Shifting by the row maximum
        # first is the same distribution (softmax is shift-invariant) without the overflow: the
        # maximum maps to 0, the rest to large negative numbers or -inf. Only taken when the
        # division itself overflows (masked -inf logits do not count), so ordinary temperatures
        # sample exactly as before.
        shifted_BV = logits_BV - logits_BV.max(dim=-1, keepdim=True).values
        scaled_BV = torch.where(shifted_BV == 0, torch.zeros_like(shifted_BV), shifted_BV / temperature)
    logits_BV = scaled_BV
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[..., -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_tokens(
    model: TransformerLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` continuation ids of ``prompt_ids``, one at a time.

    Stops after ``eos_id`` (yielded) or when the sequence fills the model's context
    (``max_seq_len``). ``use_cache=False`` recomputes the whole sequence with
    ``TransformerLM.forward`` at every step (the reference the cached path is tested against).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be a non-negative integer")
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids is empty: generation needs at least one token (e.g. <|endoftext|>)")
    context = model.config.max_seq_len
    if len(ids) > context:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's context max_seq_len={context}")
    device = model.embed.weight.device
    cache = KVCache() if use_cache else None
    pending = ids
    for _ in range(max_new_tokens):
        if len(ids) >= context:
            return
        if cache is not None:
            x_BTD = model.embed(torch.tensor([pending], device=device))
            out = decoder_forward(x_BTD, model.blocks, model.final_norm, model.rotary, cache=cache)
            logits_BV = lm_logits(model, out.hidden_BTD[:, -1])
        else:
            logits_BV = model(torch.tensor([ids], device=device)).logits[:, -1]
        token = int(sample_next(logits_BV, temperature, top_k, generator)[0])
        ids.append(token)
        pending = [token]
        yield token
        if eos_id is not None and token == eos_id:
            return
