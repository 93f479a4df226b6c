"""BitNet b1.58 quantisation (mhmoe.bitnet.layers / mhmoe.bitnet.convert) and packed ternary inference (mhmoe.bitnet.ternary)."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mhmoe import MHMoE
from mhmoe import model as model_mod
from mhmoe.bitnet.convert import apply_bitnet, bitnet_modules, to_bitnet
from mhmoe.bitnet.layers import (
    BitExperts,
    BitLinear,
    BitRouter,
    activation_quant,
    activation_quant_codes,
    weight_quant,
    weight_quant_codes,
)
from mhmoe.bitnet.ternary import (
    WEIGHTS_FILE,
    TernaryExperts,
    TernaryLinear,
    export_ternary,
    is_ternary_export,
    load_ternary,
    pack_ternary,
    tensor_bytes,
    unpack_ternary,
)
from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.routing import TopKRouter
from mhmoe.training.schedules import two_stage_lambdas, two_stage_schedule


class Toy(nn.Module):
    """Linear -> MH-MoE -> "lm_head": the layers of the LM without attention."""

    def __init__(self, d_in=6, d_model=24, heads=3, experts=6, top_k=2, d_out=5, shared=8, activation="swiglu"):
        super().__init__()
        self.inp = nn.Linear(d_in, d_model, bias=False)
        self.moe = MHMoE(d_model, heads, experts, top_k, 16, shared_d_ff=shared, activation=activation)
        self.lm_head = nn.Linear(d_model, d_out, bias=False)

    def forward(self, x):
        y, aux = self.moe(self.inp(x))
        return self.lm_head(y), aux


def tiny_lm_config(**changes):
    cfg = model_mod.ModelConfig(
        vocab_size=61, d_model=24, num_layers=2, num_attention_heads=2, max_seq_len=16,
        dense_ffn=DenseConfig(24, 40),
        moe_ffn=MoEConfig(d_model=24, num_experts=6, top_k=2, d_expert=16, num_heads=3, shared_d_ff=8),
    )
    return cfg.replace(**changes)


# ---------------------------------------------------------------------------------- quantisers


def test_weight_codes_are_ternary_times_absmean_scale():
    torch.manual_seed(0)
    layer = BitLinear(32, 16)
    w_q = layer.quantized_weight().detach()
    gamma = layer.weight.detach().abs().mean()
    levels = torch.unique(w_q / gamma)
    assert set(levels.tolist()) <= {-1.0, 0.0, 1.0}
    assert len(levels) == 3
    codes, scale = weight_quant_codes(layer.weight)
    torch.testing.assert_close(scale, gamma)
    # W_q = clip(round(W / (gamma + eps)), -1, 1)
    assert torch.equal(codes, torch.clamp(torch.round(layer.weight.detach() / (gamma + 1e-5)), -1, 1))


def test_stacked_expert_weights_have_one_scale_per_expert():
    torch.manual_seed(0)
    experts = BitExperts(4, 8, 12)
    with torch.no_grad():  # experts of very different magnitudes
        experts.w1[1] = 10.0 * experts.w1[0]
        experts.w1[2] = 0.1 * experts.w1[0]
    weights = experts.quantized_weights()
    assert set(weights) == {"w1", "w3", "w2"}
    for name, w_q in weights.items():
        latent = getattr(experts, name).detach()
        for e in range(4):
            gamma_e = latent[e].abs().mean()
            assert set(torch.unique(w_q[e].detach() / gamma_e).tolist()) <= {-1.0, 0.0, 1.0}
    _, gammas = weight_quant_codes(experts.w1, per_expert=True)
    assert gammas.shape == (4,)
    assert gammas[1] / gammas[0] == pytest.approx(10.0, rel=1e-5)


def test_activation_codes_stay_in_int8_range():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 33) * torch.logspace(-6, 4, 7).view(1, 7, 1)
    x[0, 0, 0] = 0.0
    x[1, 1] = 0.0  # an all-zero token: scale bounded by eps, codes zero
    codes, scale = activation_quant_codes(x)
    assert codes.min() >= -128 and codes.max() <= 127
    assert torch.equal(codes, torch.round(codes))
    assert scale.shape == (5, 7, 1)
    # absmax scaling: the largest |x| of every token maps to +-127 (when above eps = 1e-5)
    above_eps = x.abs().amax(-1) >= 1e-5
    assert torch.all(codes.abs().amax(-1)[above_eps] == 127)
    assert torch.all(codes.abs().amax(-1)[~above_eps] < 127)
    assert torch.all(codes[1, 1] == 0)
    x_q = activation_quant(x)
    assert x_q.dtype == x.dtype
    assert torch.all((x_q - x).abs() <= 0.5 / scale + 1e-6 * x.abs())


def test_straight_through_gradient_is_identity():
    torch.manual_seed(0)
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    g_w, g_x = torch.randn(6, 5), torch.randn(3, 5)
    (grad_w,) = torch.autograd.grad((weight_quant(w) * g_w).sum(), w)
    (grad_x,) = torch.autograd.grad((activation_quant(x) * g_x).sum(), x)
    assert torch.equal(grad_w, g_w)
    assert torch.equal(grad_x, g_x)
    # forward value is exactly the quantised value (no rounding error from x + (q - x))
    codes, gamma = weight_quant_codes(w)
    assert torch.equal(weight_quant(w), codes * gamma)


def test_rmsnorm_sits_inside_bitlinear():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    assert "norm.weight" in layer.state_dict()
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 16)
    expected = F.linear(activation_quant(layer.norm(x)), layer.quantized_weight())
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    # normalised input: the output does not depend on the input's scale ...
    torch.testing.assert_close(layer(37.0 * x), layer(x), rtol=1e-5, atol=1e-5)
    # ... whereas without the inner norm it is linear in it
    bare = BitLinear(16, 8, norm=False)
    assert "norm.weight" not in bare.state_dict()
    torch.testing.assert_close(bare(4.0 * x), 4.0 * bare(x), rtol=1e-5, atol=1e-5)


def test_bit_experts_grouped_equals_loop_reference_float64():
    torch.manual_seed(0)
    layer = MHMoE(24, 3, 5, 2, 7, shared_d_ff=6).double()
    to_bitnet(layer)
    x = torch.randn(9, 24, dtype=torch.float64, requires_grad=True)
    outs = []
    for forward in (layer.forward, layer.forward_reference):
        y, aux = forward(x)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                    [x, *layer.parameters()])
        outs.append((y, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_quantised_experts_never_take_the_fused_blocked_path():
    # The CPU "blocked" dispatch reads the raw stacked weights; quantised experts must avoid it.
    experts = BitExperts(3, 4, 5)
    assert experts.resolve_implementation(torch.zeros(2, 4)) == "grouped"
    experts.implementation = "blocked"
    with pytest.raises(ValueError, match="implementation='blocked'"):
        experts.resolve_implementation(torch.zeros(2, 4))
    torch.manual_seed(0)
    layer = MHMoE(12, 2, 4, 2, 8)
    x = torch.randn(5, 12)
    fp_out, _ = layer(x)
    to_bitnet(layer)
    bit_out, _ = layer(x)
    ref_out, _ = layer.forward_reference(x)
    assert not torch.allclose(fp_out, bit_out)
    torch.testing.assert_close(bit_out, ref_out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------- converter


def test_converter_swaps_exactly_the_quantised_layers_of_the_lm():
    torch.manual_seed(0)
    model = model_mod.TransformerLM(tiny_lm_config())
    before = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    to_bitnet(model)
    assert type(model.lm_head) is nn.Linear
    assert type(model.embed) is nn.Embedding
    moe = model.blocks[1].ffn
    assert type(moe.router) is TopKRouter
    assert isinstance(moe.head, BitLinear) and isinstance(moe.merge, BitLinear)
    assert isinstance(moe.experts, BitExperts)
    for block in model.blocks:
        assert isinstance(block.attention.qkv, BitLinear) and isinstance(block.attention.out, BitLinear)
    assert all(isinstance(m, BitLinear) for m in (model.blocks[0].ffn.w1, model.blocks[0].ffn.w2, moe.shared.w3))
    assert len(bitnet_modules(model)) == 13
    after = model.state_dict(keep_vars=True)
    added = set(after) - set(before)
    assert set(before) <= set(after)
    assert all(re.search(r"\.(norm|input_norm|hidden_norm)\.weight$", k) for k in added)
    assert all(after[k] is before[k] for k in before)  # the same Parameters, weights untouched
    # a full-precision checkpoint loads with exactly the norm gains missing
    fp = model_mod.TransformerLM(tiny_lm_config())
    result = model.load_state_dict(fp.state_dict(), strict=False)
    assert set(result.missing_keys) == added and not result.unexpected_keys
    assert bitnet_modules(to_bitnet(model)) == bitnet_modules(model)  # idempotent


def test_converter_filters_and_router_option():
    torch.manual_seed(0)
    model = model_mod.TransformerLM(tiny_lm_config())
    to_bitnet(model, include="blocks.0.*")
    assert set(bitnet_modules(model)) == {
        "blocks.0.attention.qkv", "blocks.0.attention.out", "blocks.0.ffn.w1", "blocks.0.ffn.w3", "blocks.0.ffn.w2"}

    model = model_mod.TransformerLM(tiny_lm_config())
    to_bitnet(model, exclude=[re.compile(r".*attention\..*"), "lm_head"], quantize_router=True)
    names = bitnet_modules(model)
    assert not any("attention" in n for n in names)
    assert isinstance(model.blocks[1].ffn.router, BitRouter)
    assert type(model.lm_head) is nn.Linear
    assert model.config.bitnet.exclude == ("re:.*attention\\..*", "lm_head")

    model = model_mod.TransformerLM(tiny_lm_config())
    to_bitnet(model, include=["re:blocks\\.1\\.ffn\\.(head|merge)", "*.out"], exclude=())
    assert set(bitnet_modules(model)) == {
        "blocks.1.ffn.head", "blocks.1.ffn.merge", "blocks.0.attention.out", "blocks.1.attention.out"}
    assert model.config.bitnet.include == ("re:blocks\\.1\\.ffn\\.(head|merge)", "*.out")
    # TransformerLM reads lm_head.weight directly: a quantised LM head is refused, not ignored
    with pytest.raises(ValueError, match="lm_head selected"):
        to_bitnet(model_mod.TransformerLM(tiny_lm_config()), include="lm_head", exclude=())
    # on other models, exclude=() lets include reach the head
    toy = to_bitnet(Toy(), include="lm_head", exclude=())
    assert bitnet_modules(toy) == ["lm_head"]

    # replaying stored options (run config -> apply_bitnet) converts the same modules
    replay = apply_bitnet(model_mod.TransformerLM(tiny_lm_config()), json.loads(json.dumps(model.config.bitnet.to_dict())))
    assert bitnet_modules(replay) == bitnet_modules(model)
    assert apply_bitnet(model_mod.TransformerLM(tiny_lm_config()), None).lm_head.__class__ is nn.Linear

    with pytest.raises(ValueError, match="include pattern 'blocks.9.\\*' matches no"):
        to_bitnet(model_mod.TransformerLM(tiny_lm_config()), include="blocks.9.*")
    with pytest.raises(ValueError, match="invalid regular expression"):
        to_bitnet(model_mod.TransformerLM(tiny_lm_config()), include="re:(")


# ---------------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(data=st.lists(st.integers(-1, 1), min_size=0, max_size=67), rows=st.integers(1, 3))
def test_pack_unpack_round_trip_exact(data, rows):
    codes = torch.tensor(data * rows, dtype=torch.int8)
    shape = (rows, len(data))
    packed = pack_ternary(codes.view(shape))
    assert packed.dtype == torch.uint8 and packed.numel() == -(-codes.numel() // 4)
    assert torch.equal(unpack_ternary(packed, shape), codes.view(shape))
    # float codes pack the same
    assert torch.equal(pack_ternary(codes.float()), packed)


def test_pack_layout_and_errors():
    packed = pack_ternary(torch.tensor([-1, 0, 1, 1, 0]))
    # w + 1 = 0, 1, 2, 2 | 1  -> 0b10_10_01_00 = 164, 0b01 = 1 (zero padded)
    assert packed.tolist() == [164, 1]
    with pytest.raises(ValueError, match="code 2"):
        pack_ternary(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="integral"):
        pack_ternary(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="needs ceil"):
        unpack_ternary(packed, (3, 3))
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary(torch.tensor([255], dtype=torch.uint8), (4,))
    with pytest.raises(ValueError, match="1-D uint8"):
        unpack_ternary(packed.to(torch.int32), (5,))


# ---------------------------------------------------------------------------------- packed inference


def test_packed_toy_equals_fake_quant_eval(tmp_path):
    torch.manual_seed(0)
    model = to_bitnet(Toy(activation="relu"), quantize_router=True).eval()
    x = torch.randn(11, 6)
    with torch.no_grad():
        ref, ref_aux = model(x)
    export_ternary(model, tmp_path)
    loaded = load_ternary(tmp_path, model=Toy(activation="relu"))
    assert isinstance(loaded.moe.experts, TernaryExperts) and isinstance(loaded.inp, TernaryLinear)
    assert type(loaded.lm_head) is nn.Linear
    with torch.no_grad():
        out, aux = loaded(x)
    assert torch.equal(aux.expert_ids, ref_aux.expert_ids)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_packed_lm_equals_fake_quant_eval_and_is_smaller(tmp_path):
    torch.manual_seed(0)
    model = to_bitnet(model_mod.TransformerLM(tiny_lm_config(d_model=48, dense_ffn=DenseConfig(48, 128),
        moe_ffn=MoEConfig(d_model=48, num_experts=8, top_k=2, d_expert=64, num_heads=2)))).eval()
    ids = torch.randint(0, 61, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    manifest = export_ternary(model, tmp_path / "ternary")
    assert json.loads((tmp_path / "ternary" / "config.json").read_text())["quantized"] == manifest["quantized"]
    loaded = load_ternary(tmp_path / "ternary")  # rebuilt from config.json, no skeleton given
    with torch.no_grad():
        out = loaded(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    ternary_bytes = (tmp_path / "ternary" / WEIGHTS_FILE).stat().st_size
    fp32_bytes = len(safetensors.torch.save({k: v.contiguous() for k, v in model.state_dict().items()}))
    assert ternary_bytes < 0.5 * fp32_bytes
    assert tensor_bytes(loaded) < 0.5 * tensor_bytes(model)


def test_load_rejects_wrong_architecture(tmp_path):
    torch.manual_seed(0)
    export_ternary(to_bitnet(Toy()), tmp_path)
    with pytest.raises(ValueError, match="num_experts=4, the export has num_experts=6"):
        load_ternary(tmp_path, model=Toy(heads=2, d_model=24, experts=4))
    with pytest.raises(ValueError, match="'lm_head.weight' has shape"):
        load_ternary(tmp_path, model=Toy(d_out=7))
    with pytest.raises(ValueError, match="rebuildable"):
        load_ternary(tmp_path)
    with pytest.raises(ValueError, match="no BitNet module"):
        export_ternary(Toy(), tmp_path / "x")


# ---------------------------------------------------------------------------------- training


def test_tiny_bitnet_mhmoe_trains():
    torch.manual_seed(0)
    model = to_bitnet(Toy(d_in=8, d_out=4))
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(128, 8)
    with torch.no_grad():
        y = teacher(x)
    w1_start = model.moe.experts.w1.detach().clone()
    lr_lambda, wd_fn = two_stage_lambdas(40, 1e-2, warmup_steps=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    losses = []
    for step in range(40):
        for group in opt.param_groups:
            group["weight_decay"] = wd_fn(step)
        pred, aux = model(x)
        loss = F.mse_loss(pred, y)
        (loss + 0.01 * aux.load_balancing_loss).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.3 * sum(losses[:5]) / 5  # about 12x lower in practice
    assert not torch.equal(model.moe.experts.w1, w1_start)  # latent weights learn through the STE


def test_two_stage_schedule():
    total, peak = 100, 1.5e-3
    lr0, wd0 = two_stage_schedule(0, total, peak, warmup_steps=10)
    assert lr0 == pytest.approx(peak / 10) and wd0 == 0.1
    assert two_stage_schedule(9, total, peak, warmup_steps=10)[0] == pytest.approx(peak)
    lr_49, wd_49 = two_stage_schedule(49, total, peak)
    lr_50, wd_50 = two_stage_schedule(50, total, peak)
    assert lr_49 == pytest.approx(peak * (1 - 49 / 100)) and wd_49 == 0.1
    assert lr_50 == pytest.approx(peak / 3) and wd_50 == 0.0  # the FAQ's 1.5e-3 -> 5e-4 drop
    assert two_stage_schedule(100, total, peak)[0] == 0.0
    assert two_stage_schedule(75, total, peak, second_peak_lr=1e-3)[0] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="switch_fraction=1.5"):
        two_stage_schedule(0, total, peak, switch_fraction=1.5)
    with pytest.raises(ValueError, match="warmup_steps=60 exceeds"):
        two_stage_schedule(0, total, peak, warmup_steps=60)
    with pytest.raises(ValueError, match="peak_lr=0"):
        two_stage_schedule(0, total, 0)


# ---------------------------------------------------------------------------------- CLI


def test_cli_export_ternary_with_a_run_loader(tmp_path, monkeypatch, capsys):
    from mhmoe.cli import main

    torch.manual_seed(0)
    model = to_bitnet(model_mod.TransformerLM(tiny_lm_config())).eval()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tokenizer.json").write_text("{}")
    import mhmoe.cli.export as export_command

    monkeypatch.setattr(export_command, "load_run", lambda path: (model, None, {"bitnet": True, "preset": "tiny"}))
    assert main(["export", str(run_dir), str(tmp_path / "out"), "--ternary"]) == 0
    assert (tmp_path / "out" / "tokenizer.json").exists()
    assert is_ternary_export(tmp_path / "out") and not is_ternary_export(run_dir)
    manifest = json.loads((tmp_path / "out" / "config.json").read_text())
    assert manifest["extra"]["run_config"]["preset"] == "tiny"
    ids = torch.randint(0, 61, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_ternary(tmp_path / "out")(ids).logits, model(ids).logits)
    fp_model = model_mod.TransformerLM(tiny_lm_config())
    monkeypatch.setattr(export_command, "load_run", lambda path: (fp_model, None, {}))
    assert main(["export", str(run_dir), str(tmp_path / "out2"), "--ternary"]) == 2
    assert "no BitNet layers" in capsys.readouterr().err
