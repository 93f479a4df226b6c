"""LoRA through PEFT on mhmoe models (issue 14): attention, MH-MoE head/merge, router and the
stacked experts (``target_parameters``) train, save, reload and merge; merging into a BitNet
model is refused by ``mhmoe.hf.peft.merge_lora``."""

from __future__ import annotations

import pytest
import torch

from mhmoe.config import BitNetConfig, DenseConfig, ModelConfig, MoEConfig
from mhmoe.model import TransformerLM

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mhmoe.hf.modeling import MHMoEForCausalLM
from mhmoe.hf.peft import (
    DEFAULT_TARGET_MODULES,
    DEFAULT_TARGET_PARAMETERS,
    lora_config,
    merge_lora,
)


def _lm(bitnet: BitNetConfig | None = None) -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_attention_heads=2, max_seq_len=32,
                         dense_ffn=DenseConfig(32, 64), moe_every=1, bitnet=bitnet,
                         moe_ffn=MoEConfig(32, num_experts=4, top_k=2, d_expert=16, num_heads=2))
    return TransformerLM(config).eval()


def _adapted(lm: TransformerLM):
    torch.manual_seed(1)
    return peft.get_peft_model(MHMoEForCausalLM.from_mhmoe(lm), lora_config(r=4, init_lora_weights=False))


def test_lora_on_every_target_trains_saves_reloads_and_merges(tmp_path):
    lm = _lm()
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = MHMoEForCausalLM.from_mhmoe(lm)(ids).logits
    model = _adapted(lm)
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for target in (*DEFAULT_TARGET_MODULES, *(t.split(".")[-2] for t in DEFAULT_TARGET_PARAMETERS)):
        assert any(f".{target}." in n for n in lora), target  # every default target got an adapter
    assert all("lora_" in n for n in lora)
    with torch.no_grad():
        adapted = model(ids).logits
    assert float((adapted - base).abs().max()) > 1e-3  # the adapters change the outputs
    # Every adapter gets a gradient (the experts' and router's through the MoE dispatch) ...
    model.train()
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in lora.values())
    grads = {n: p.grad.clone() for n, p in lora.items()}
    # ... the same ones under gradient checkpointing ...
    model.zero_grad()
    model.base_model.model.activation_checkpointing_enable()
    model(ids, labels=ids, use_cache=False).loss.backward()
    for name, param in lora.items():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-6, atol=1e-7, msg=name)
    model.base_model.model.activation_checkpointing_disable()
    # ... and a few steps lower the loss.
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        trained = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(MHMoEForCausalLM.from_mhmoe(lm), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, trained)
    merged = merge_lora(model)
    assert type(merged) is MHMoEForCausalLM and not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained, rtol=0, atol=1e-5)


def test_merging_lora_into_bitnet_is_refused_by_default(caplog):
    lm = _lm(BitNetConfig())
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    model = _adapted(lm)
    with torch.no_grad(), caplog.at_level("WARNING", logger="mhmoe.hf.modeling"):
        adapted = model(ids).logits
        model(ids)
    # The first forward warns (once) that PEFT's own merge_and_unload would change the model.
    assert caplog.text.count("LoRA adapters on BitNet modules") == 1 and "merge_and_unload()" in caplog.text
    with pytest.raises(ValueError, match=r"merging LoRA into BitNet modules .* is not exact.*allow_inexact=True"):
        merge_lora(model)
    merged = merge_lora(model, allow_inexact=True)
    with torch.no_grad():
        difference = float((merged(ids).logits - adapted).abs().max())
    assert difference > 1e-3  # why it is refused: the merged model is another model
