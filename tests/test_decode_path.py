"""The decode path (mhmoe.decoding): rotary tables computed once, KV-cached steps equal to the
full forward for fp32 and BitNet models (whose eval runs the integer path and, at a few tokens
a step, the small-batch MoE path)."""

from __future__ import annotations

import pytest
import torch

from mhmoe import model as model_mod
from mhmoe.bitnet.convert import to_bitnet
from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.decoding import (
    KVCache,
    _full_rotary_tables,
    _normal_device,
    _rotary_tables,
    decoder_forward,
    generate_tokens,
    lm_logits,
)
from mhmoe.layers import moe as moe_mod
from mhmoe.model import RotaryEmbedding


@pytest.mark.parametrize("head_size,max_seq_len", [(64, 256), (12, 40)])
def test_sliced_rotary_tables_equal_the_per_step_tables(head_size, max_seq_len):
    rotary = RotaryEmbedding(head_size, max_seq_len)
    cpu = torch.device("cpu")
    for end in range(1, max_seq_len + 1, 7):
        cos, sin = rotary(end, cpu)
        for past in (0, end // 2, end - 1):
            cos_new, sin_new = _rotary_tables(rotary, past, end - past, None, cpu)
            assert torch.equal(cos_new, cos[past:]) and torch.equal(sin_new, sin[past:])
    positions = torch.tensor([[0, 3, 5], [1, 2, max_seq_len - 1]])
    cos_full, _ = rotary(max_seq_len, cpu)
    cos_ids, _ = _rotary_tables(rotary, 0, 3, positions, cpu)
    assert torch.equal(cos_ids, cos_full[positions].unsqueeze(1))
    with pytest.raises(ValueError, match="exceeds the model's context"):
        _rotary_tables(rotary, max_seq_len, 1, None, cpu)


def tiny_lm(num_heads):
    config = model_mod.ModelConfig(
        vocab_size=61, d_model=24, num_layers=2, num_attention_heads=2, max_seq_len=40,
        dense_ffn=DenseConfig(24, 40),
        moe_ffn=MoEConfig(d_model=24, num_experts=6, top_k=2, d_expert=16, num_heads=num_heads,
                          shared_d_ff=8, head_layer=num_heads > 1, merge_layer=num_heads > 1),
    )
    return model_mod.TransformerLM(config)


@pytest.mark.parametrize("bitnet", [False, True])
@pytest.mark.parametrize("num_heads", [1, 3])
def test_cached_decode_steps_equal_the_full_forward(monkeypatch, bitnet, num_heads):
    torch.manual_seed(0)
    model = tiny_lm(num_heads)
    if bitnet:
        to_bitnet(model, quantize_router=True)
    model.eval()
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    calls = {"small": 0}
    small = moe_mod.small_batch_compute

    def counting(*args, **kwargs):
        calls["small"] += 1
        return small(*args, **kwargs)

    monkeypatch.setattr(moe_mod, "small_batch_compute", counting)
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        out = decoder_forward(model.embed(ids[:, :8]), model.blocks, model.final_norm, model.rotary, cache=cache)
        steps = [lm_logits(model, out.hidden_BTD)]
        calls["small"] = 0
        for t in range(8, 12):
            out = decoder_forward(model.embed(ids[:, t:t + 1]), model.blocks, model.final_norm, model.rotary,
                                  cache=cache)
            steps.append(lm_logits(model, out.hidden_BTD))
    cached = torch.cat(steps, dim=1)
    assert calls["small"] == 4  # every single-token step of the one MoE block (2 x H x 2 assignments)
    # Cached attention sums over the same keys in another order: float rounding, which a
    # BitNet model can turn into an activation-code step at a few positions.
    diff_position = (cached - full).abs().amax(-1)
    assert diff_position.median() < 1e-5
    assert diff_position.max() < (1.0 if bitnet else 1e-4)
    tokens_cached = list(generate_tokens(model, ids[0, :5].tolist(), 10, temperature=0))
    tokens_full = list(generate_tokens(model, ids[0, :5].tolist(), 10, temperature=0, use_cache=False))
    assert tokens_cached == tokens_full


def test_rotary_tables_first_built_in_inference_mode_serve_a_training_forward():
    torch.manual_seed(0)
    model = tiny_lm(1)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(0))

    def forward():
        return decoder_forward(model.embed(ids), model.blocks, model.final_norm, model.rotary).hidden_BTD

    with torch.inference_mode():
        reference = forward()  # the first call builds (and caches) the tables
    cos, sin = _full_rotary_tables(model.rotary, torch.device("cpu"))
    assert not cos.is_inference() and not sin.is_inference()
    hidden = forward()
    hidden.sum().backward()  # failed: "Inference tensors cannot be saved for backward"
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
    assert torch.equal(hidden.detach(), reference)


def test_rotary_table_key_names_the_device_with_its_index(monkeypatch):
    rotary = RotaryEmbedding(8, 16)
    first = _full_rotary_tables(rotary, "cpu")
    assert _full_rotary_tables(rotary, torch.device("cpu")) is first  # one entry, not rebuilt
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    # "cuda" and "cuda:<current>" are the same device: one key, so they do not evict each other
    assert _normal_device("cuda") == _normal_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert _normal_device("cuda:0") == torch.device("cuda", 0)
    assert _normal_device("cpu") == torch.device("cpu")
