"""LoRA through PEFT on mhmoe models (issue 14): attention, MH-MoE head/merge, router and the
stacked experts (``target_parameters``) train, save, reload and merge; merging module adapters
into BitNet linear layers is refused by ``mhmoe.hf.peft.merge_lora`` (parameter adapters merge
exactly); the parameter adapters' swap survives errors and threads."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch

from mhmoe.config import BitNetConfig, DenseConfig, ModelConfig, MoEConfig
from mhmoe.model import TransformerLM

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from mhmoe.hf.modeling import (
    MHMoEForCausalLM,
    _is_parameter_adapter,
    inexact_bitnet_adapters,
)
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
    assert caplog.text.count("LoRA adapters on BitNet linear layers") == 1 and "merge_and_unload()" in caplog.text
    with pytest.raises(ValueError, match=r"merging LoRA into BitNet linear layers .* is not exact.*allow_inexact=True"):
        merge_lora(model)
    # Only the module adapters over BitLinear layers make the merge inexact, not the parameter
    # adapters of the experts and the router.
    inexact = inexact_bitnet_adapters(model)
    assert inexact and all(name.rsplit(".", 1)[-1] in DEFAULT_TARGET_MODULES for name in inexact), inexact
    merged = merge_lora(model, allow_inexact=True)
    with torch.no_grad():
        difference = float((merged(ids).logits - adapted).abs().max())
    assert difference > 1e-3  # why it is refused: the merged model is another model


def test_parameter_adapters_on_bitnet_experts_and_router_merge_exactly(caplog):
    """LoRA through target_parameters on BitExperts, a quantised router and BitLinear weights
    adapts the latent weight before the quantisation: merging is exact, so it is allowed
    without a warning."""
    lm = _lm(BitNetConfig(quantize_router=True))
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = MHMoEForCausalLM.from_mhmoe(lm)(ids).logits
    torch.manual_seed(1)
    model = peft.get_peft_model(MHMoEForCausalLM.from_mhmoe(lm), lora_config(
        r=4, init_lora_weights=False, target_modules=[],
        target_parameters=[*DEFAULT_TARGET_PARAMETERS, "qkv.weight", "head.weight"]))  # BitLinear weights too
    with torch.no_grad(), caplog.at_level("WARNING"):
        adapted = model(ids).logits
    assert float((adapted - base).abs().max()) > 1e-3  # the adapters change the outputs
    assert inexact_bitnet_adapters(model) == []
    merged = merge_lora(model)  # no allow_inexact needed
    assert "BitNet" not in caplog.text
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-5)


def _adapter_layout(model) -> tuple[int, list[str]]:
    """(number of PEFT parameter wrappers in the tree, the LoRA keys of the state dict)."""
    return (sum(_is_parameter_adapter(m) for m in model.modules()),
            sorted(k for k in model.state_dict() if "lora_" in k))


def test_a_failing_adapter_activation_leaves_the_model_intact(monkeypatch):
    """An exception while the parameter adapters are being put on (e.g. out of memory building
    a delta) puts every wrapper back: the model afterwards is the adapted model."""
    model = _adapted(_lm()).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
    layout = _adapter_layout(model)
    assert layout[0] == 8 and layout[1]  # 2 layers x (router + w1, w3, w2)
    wrapper_class = type(next(m for m in model.modules() if _is_parameter_adapter(m)))
    original = wrapper_class._activate_lora
    calls = {"n": 0}

    @contextlib.contextmanager
    def failing_fifth(self, adapters):  # the 5th activation: inside layer 1's chain of wrappers
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory (simulated)")
        with original(self, adapters):
            yield

    monkeypatch.setattr(wrapper_class, "_activate_lora", failing_fifth)
    with torch.no_grad(), pytest.raises(RuntimeError, match="simulated"):
        model(ids)
    monkeypatch.setattr(wrapper_class, "_activate_lora", original)
    assert _adapter_layout(model) == layout
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference)


def test_forwards_from_several_threads_equal_the_single_threaded_ones():
    """The parameter adapters' swap edits the module tree; concurrent forwards of one model
    (threads of a server) each get the adapted outputs and their own router logits, and the
    model is intact afterwards."""
    model = _adapted(_lm()).eval()
    inputs = [torch.randint(0, 64, (1, 8 + i), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        references = [model(ids, output_router_logits=True) for ids in inputs]
    layout = _adapter_layout(model)
    failures: list[str] = []
    start = threading.Barrier(3)

    def work(index: int) -> None:
        ids, reference = inputs[index], references[index]
        try:
            start.wait()
            for _ in range(10):
                with torch.no_grad():
                    out = model(ids, output_router_logits=True)
                if not torch.equal(out.logits, reference.logits):
                    failures.append(f"thread {index}: logits differ")
                if len(out.router_logits) != len(reference.router_logits) or not all(
                        torch.equal(a, b) for a, b in zip(out.router_logits, reference.router_logits)):
                    failures.append(f"thread {index}: router logits differ")
        except Exception as error:  # noqa: BLE001 (a thread reports every failure to the test)
            failures.append(f"thread {index}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert failures == []
    assert _adapter_layout(model) == layout
    with torch.no_grad():
        assert torch.equal(model(inputs[0]).logits, references[0].logits)


def test_checkpointed_backward_in_another_thread_does_not_deadlock():
    """A checkpointed block's recompute takes the model's lock in the backward pass; backward
    calls from a thread other than the forward's, and while another thread forwards, finish."""
    model = _adapted(_lm())
    model.base_model.model.activation_checkpointing_enable()
    model.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    model(ids, labels=ids, use_cache=False).loss.backward()
    reference = [p.grad.clone() for p in lora]
    model.zero_grad()
    loss = model(ids, labels=ids, use_cache=False).loss
    errors: list[Exception] = []

    def backward() -> None:
        try:
            loss.backward()
        except Exception as error:  # noqa: BLE001 (a thread reports every failure to the test)
            errors.append(error)

    def forwards() -> None:
        try:
            for _ in range(3):
                with torch.no_grad():
                    model(ids, use_cache=False)
        except Exception as error:  # noqa: BLE001 (a thread reports every failure to the test)
            errors.append(error)

    threads = [threading.Thread(target=backward), threading.Thread(target=forwards)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert errors == []
    for param, expected in zip(lora, reference):
        torch.testing.assert_close(param.grad, expected, rtol=1e-6, atol=1e-7)
