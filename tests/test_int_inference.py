"""Integer inference for BitNet (mhmoe.bitnet.integer), the small-batch MoE path
(mhmoe.layers.moe.small_batch_compute) and the quantised router's aux-free bias."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, jvp
from torch.nn.utils import parametrize
from torch.utils import cpp_extension

from mhmoe import MHMoE
from mhmoe import model as model_mod
from mhmoe.bitnet import fused, integer, ternary
from mhmoe.bitnet import layers as layers_mod
from mhmoe.bitnet.convert import to_bitnet
from mhmoe.bitnet.integer import (
    Int8Weight,
    fbgemm_available,
    int_mm_sums,
    integer_inference,
    integer_weight_bytes,
)
from mhmoe.bitnet.layers import (
    BitExperts,
    BitLinear,
    BitRouter,
    activation_codes_for_inference,
    activation_quant_codes,
    weight_quant_codes,
)
from mhmoe.bitnet.ternary import (
    TernaryExperts,
    TernaryRouter,
    export_ternary,
    load_ternary,
    pack_ternary,
)
from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.decoding import generate_tokens
from mhmoe.layers import moe as moe_mod
from mhmoe.layers.experts import Experts
from mhmoe.layers.routing import TopKRouter, update_selection_bias
from mhmoe.model import lm_loss
from mhmoe.training.config import TrainConfig
from mhmoe.training.loop import build_optimizer

BACKENDS = [b for b in integer.INTEGER_BACKENDS if b != "fbgemm" or fbgemm_available()]


def tiny_lm(num_heads=3, top_k=2, shared=8, load_balancing="micro-batch", num_experts=6, d_expert=16):
    config = model_mod.ModelConfig(
        vocab_size=61, d_model=24, num_layers=2, num_attention_heads=2, max_seq_len=40,
        dense_ffn=DenseConfig(24, 40),
        moe_ffn=MoEConfig(d_model=24, num_experts=num_experts, top_k=top_k, d_expert=d_expert,
                          num_heads=num_heads, shared_d_ff=shared, load_balancing=load_balancing,
                          head_layer=num_heads > 1, merge_layer=num_heads > 1),
    )
    return model_mod.TransformerLM(config)


VARIANTS = {  # name: (tiny_lm options, quantize_router)
    "smoe": ({"num_heads": 1, "top_k": 1, "shared": None}, True),
    "smoe_shared": ({"num_heads": 1, "top_k": 2, "shared": 8}, True),
    "mhmoe_h3_shared": ({"num_heads": 3, "top_k": 2, "shared": 8}, True),
    "mhmoe_h3_fp_router": ({"num_heads": 3, "top_k": 3, "shared": None}, False),
    # ModelConfig still refuses aux-free with bitnet.quantize_router (mhmoe.config, not ours):
    # the aux-free LM runs with its full-precision router here, the quantised aux-free router
    # is tested below on a model without a ModelConfig.
    "mhmoe_h3_aux_free": ({"num_heads": 3, "top_k": 3, "shared": None, "load_balancing": "aux-free"}, False),
}


# ---------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,in_features,out_features", [(0, 8, 4), (1, 24, 16), (17, 7, 5), (33, 192, 64)])
def test_integer_sums_equal_float64_reference(backend, rows, in_features, out_features):
    generator = torch.Generator().manual_seed(rows * 1000 + in_features)
    codes_x = torch.randint(-128, 128, (rows, in_features), generator=generator).float()
    codes_w = torch.randint(-1, 2, (out_features, in_features), generator=generator).to(torch.int8)
    if rows:  # the extreme sums: every product at its largest magnitude
        codes_x[0] = -128.0
        codes_w[0] = 1
    weight = Int8Weight(codes_w, backend)
    sums = weight.integer_sums(codes_x)
    reference = codes_x.double() @ codes_w.double().t()
    assert sums.dtype == torch.float32 and sums.shape == (rows, out_features)
    assert torch.equal(sums.double(), reference)
    if rows:
        assert sums[0, 0] == -128 * in_features
    assert weight.nbytes() >= out_features * in_features  # int8: one byte a weight, no float copy


def test_int_mm_row_padding_and_fallback():
    # CUDA's _int_mm needs > 16 rows, multiples of 8: padding (forced here on CPU) must not change sums.
    assert integer.int_mm_padded_rows(3, torch.device("cuda")) == 24
    assert integer.int_mm_padded_rows(25, torch.device("cuda")) == 32
    assert integer.int_mm_padded_rows(3, torch.device("cpu")) == 3
    assert not integer.int_mm_shape_ok(torch.device("cuda"), 12, 16)  # -> float fallback
    assert integer.int_mm_shape_ok(torch.device("cpu"), 12, 7)
    codes_x = torch.randint(-128, 128, (5, 16)).float()
    codes_w = torch.randint(-1, 2, (8, 16)).to(torch.int8)
    reference = codes_x.double() @ codes_w.double().t()
    for force_padding in (False, True):
        assert torch.equal(int_mm_sums(codes_x, codes_w, force_padding=force_padding).double(), reference)
    assert torch.equal(integer.float_sums(codes_x, codes_w).double(), reference)


def test_bad_backend_and_sizes_raise_one_clear_error():
    with pytest.raises(ValueError, match="integer backend 'cuda_magic': must be one of"), \
            integer_inference(True, "cuda_magic"):
        pass
    with pytest.raises(ValueError, match="must be 2-D"):
        Int8Weight(torch.zeros(2, 3, 4, dtype=torch.int8), "float")
    with pytest.raises(ValueError, match="input has 5 features, the weight takes 4"):
        Int8Weight(torch.zeros(3, 4, dtype=torch.int8), "float").integer_sums(torch.zeros(2, 5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_linear_equals_float64_bitnet_formula(backend):
    torch.manual_seed(0)
    layer = BitLinear(48, 20, bias=True).eval()
    with torch.no_grad():
        layer.bias.uniform_(-1, 1)
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 48)
    with torch.no_grad(), integer_inference(True, backend):
        y = layer(x)
    # [BitNet] Eq. 11 in float64: (x_codes @ W_q^T) * gamma / s + b
    codes_x, scale = activation_quant_codes(layer.norm(x).double())
    codes_w, gamma = weight_quant_codes(layer.weight.double())
    expected = (codes_x @ codes_w.t()) * gamma / scale + layer.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
    assert y.shape == (3, 5, 20) and y.dtype == x.dtype


def test_integer_path_only_without_autograd_and_cache_follows_the_weights():
    torch.manual_seed(0)
    layer = BitLinear(16, 8)
    x = torch.randn(4, 16)
    with integer_inference(False):
        float_out = layer(x)
    assert not integer.use_integer_path(layer.train(), x)  # training: the STE float path
    layer.eval()
    assert not integer.use_integer_path(layer, x, layer.weight)  # grad mode, weight needs grad
    torch.testing.assert_close(layer(x), float_out, rtol=0, atol=0)  # eval with grad: float path
    with torch.no_grad():
        first = layer(x)
        torch.testing.assert_close(first, float_out, rtol=1e-5, atol=1e-5)
        layer.weight.mul_(-1.0)  # an optimiser-like in-place update: the cache must follow
        flipped = layer(x)
    torch.testing.assert_close(flipped, -first, rtol=1e-6, atol=1e-6)
    # the default at 16 inputs: the int8 codes, one byte a weight (fbgemm would pad them to
    # 512); + gamma (4 bytes)
    assert integer_weight_bytes(layer) == 16 * 8 + 4
    with torch.no_grad(), integer_inference(True, "fbgemm" if fbgemm_available() else "int_mm"):
        layer(x)  # a chosen backend rebuilds the cached weights for it
    # fbgemm: its blocked copy (inputs padded to 512, outputs to 8, int32 column offsets)
    weight_bytes = integer.fbgemm_packed_bytes(8, 16) if fbgemm_available() else 16 * 8
    assert integer_weight_bytes(layer) == weight_bytes + 4


def test_inference_activation_codes_equal_the_training_quantiser():
    torch.manual_seed(0)
    x = torch.randn(6, 5, 33) * torch.logspace(-7, 4, 5).view(1, 5, 1)
    x[0, 0] = 0.0  # all-zero row: scale bounded by eps
    x[1, 1, 3] = -x[1, 1].abs().max() * 2  # the row maximum negative: code -127
    for tensor in (x, x.double()):
        codes, scale = layers_mod.activation_codes_for_inference(tensor)
        ref_codes, ref_scale = activation_quant_codes(tensor)
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale)
        assert codes.dtype == ref_codes.dtype


def test_one_expert_quantised_alone_equals_its_slice_of_all():
    # forward_one's float path quantises only its expert: the same values as quantising all.
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        experts = BitExperts(6, 24, 40).to(dtype)
        with torch.no_grad():
            experts.w2[3].mul_(100.0)  # experts of different magnitudes: per-expert scales
        every = experts.quantized_weights()
        for e in range(6):
            one = experts.quantized_expert_weights(e)
            assert all(torch.equal(one[name], every[name][e]) for name in every)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_integer_experts_chunking_and_forward_one_agree(monkeypatch, activation):
    torch.manual_seed(0)
    experts = BitExperts(5, 24, 16, activation).eval()
    counts = [3, 0, 7, 1, 4]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 24)
    with torch.no_grad():
        whole = experts(x, offsets)
        monkeypatch.setattr(layers_mod, "INTEGER_CHUNK_ROWS", 4)  # several chunks
        chunked = experts(x, offsets, counts)
        rows = torch.split(x, counts)
        one_by_one = torch.cat([experts.forward_one(e, r) for e, r in enumerate(rows)])
        with integer_inference(False):
            float_path = experts(x, offsets)
    assert torch.equal(whole, chunked) and torch.equal(whole, one_by_one)
    torch.testing.assert_close(whole, float_path, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------- models


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_integer_path_matches_fake_quant_greedy_tokens_and_perplexity(variant, tmp_path):
    torch.manual_seed(0)
    options, quantize_router = VARIANTS[variant]
    model = to_bitnet(tiny_lm(**options), quantize_router=quantize_router).eval()
    router = model.blocks[1].ffn.router
    assert isinstance(router, BitRouter) == quantize_router
    if options.get("load_balancing") == "aux-free":
        assert router.expert_bias is not None
        router.expert_bias.copy_(torch.linspace(-0.05, 0.05, router.num_experts))
    ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits_int = model(ids).logits
        with integer_inference(False):
            logits_float = model(ids).logits
        loss_int, loss_float = lm_loss(logits_int[:, :-1], ids[:, 1:]), lm_loss(logits_float[:, :-1], ids[:, 1:])
    # Up to float rounding (~3e-7 at most positions). A rounding difference can still flip a
    # discrete decision downstream, an activation code at a .5 boundary (a code step, ~1e-2,
    # which attention then carries to every later position) or a near-tied expert choice
    # (up to ~0.5 here); measured: 22-25% of positions above 1e-4, max 0.46.
    diff_position = (logits_int - logits_float).abs().amax(dim=-1)  # (B, T)
    assert diff_position.median() < 1e-5
    assert (diff_position > 1e-4).float().mean() <= 0.4
    assert diff_position.max() < 1.0
    assert abs(loss_int.item() - loss_float.item()) < 1e-2
    prompt = ids[0, :5].tolist()
    tokens_int = list(generate_tokens(model, prompt, 12, temperature=0))
    with integer_inference(False):
        tokens_float = list(generate_tokens(model, prompt, 12, temperature=0))
    assert tokens_int == tokens_float
    # The packed export runs the same integer kernels on the same codes: bit for bit.
    export_ternary(model, tmp_path / "t")
    loaded = load_ternary(tmp_path / "t")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits_int)
    assert list(generate_tokens(loaded, prompt, 12, temperature=0)) == tokens_int


def test_packed_load_keeps_no_float_copy_of_the_quantised_matrices(tmp_path):
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(), quantize_router=True).eval()
    export_ternary(model, tmp_path)
    loaded = load_ternary(tmp_path)
    experts = loaded.blocks[1].ffn.experts
    assert isinstance(experts, TernaryExperts)
    quantised_numel = 0
    for module in loaded.modules():
        weight_shapes = getattr(module, "weight_shapes", None)
        if not weight_shapes:
            continue
        big = max(torch.Size(s).numel() for s in weight_shapes.values())
        quantised_numel += sum(torch.Size(s).numel() for s in weight_shapes.values())
        for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            assert not (tensor.is_floating_point() and tensor.numel() >= big), f"float copy {name}"
        # built at load, owned by the module, the 2-bit buffers released (one copy resident)
        assert module.packed_released() and module.owned_integer_weights()
        assert not integer.cached_weights(module)
        assert all(getattr(module, f"{name}_packed").numel() == 0 for name in weight_shapes)
    # the default keeps the int8 codes at these tiny widths (8-48 inputs, which fbgemm would pad
    # to 512); exact accounting is tested in test_released_packed_model_holds_a_quarter_of_fp32
    assert integer_weight_bytes(loaded) >= quantised_numel


def _quantised_matrices(model):
    """(packed modules, number of quantised weights) of a loaded ternary model."""
    modules = [m for m in model.modules() if isinstance(m, ternary._PackedTernary)]
    return modules, sum(torch.Size(shape).numel() for m in modules for shape in m.weight_shapes.values())


def _matrix_weights(module):
    """Every ``Int8Weight`` (one per matrix, per expert) a released packed module owns."""
    return [weight for form in module.owned_integer_weights()
            for weight in ([form.weight] if isinstance(form, integer.IntegerLinearWeight) else form.up + form.down)]


SCALE_ALLOWANCE = 0.05
"""Of fp32's bytes, for the scales: gamma per output row for the experts' fused gate/up,
1/in_features of fp32 = 4.2% at the tiny experts' 24 inputs."""


def _quantised_bytes(model, modules):
    """Resident bytes of the quantised matrices: the modules' own tensors (the emptied 2-bit
    buffers, the scale buffers) plus the integer weights they own (and any cached ones)."""
    own = sum(t.numel() * t.element_size() for m in modules
              for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False))
              if t.dim() and t.numel() and not isinstance(t, nn.Parameter))
    return own + integer_weight_bytes(model)


def test_default_backend_keeps_a_quarter_of_fp32_where_fbgemm_would_pad(tmp_path):
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(), quantize_router=True).eval()
    export_ternary(model, tmp_path)
    loaded = load_ternary(tmp_path)  # no backend: chosen per matrix
    modules, numel = _quantised_matrices(loaded)
    weights = [w for m in modules for w in _matrix_weights(m)]
    # fbgemm everywhere would pad these 8-48 inputs to 512: more bytes than the fp32 matrices
    assert sum(integer.fbgemm_packed_bytes(w.out_features, w.in_features) for w in weights) > 4 * numel
    assert {w.backend for w in weights} == {integer.plain_codes_backend(torch.device("cpu"))}
    assert _quantised_bytes(loaded, modules) / (4 * numel) <= 0.25 + SCALE_ALLOWANCE
    # the fake-quant model makes the same choice: same kernels on the same codes, bit for bit
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    prompt = ids[0, :5].tolist()
    assert list(generate_tokens(loaded, prompt, 12, temperature=0)) == list(
        generate_tokens(model, prompt, 12, temperature=0))


@pytest.mark.skipif(not fbgemm_available(), reason="this PyTorch build has no fbgemm")
def test_default_backend_picks_fbgemm_where_it_pads_nothing(tmp_path, monkeypatch):
    # The choice under AVX2's blocking (512 inputs x 8 outputs, the measured table), whatever the
    # host: AVX512's 32 or VNNI's 48 output blocks would pad these 16 outputs (fbgemm's results
    # are the same under any blocking; only the byte counts differ).
    monkeypatch.setattr(integer, "fbgemm_instruction_set", lambda: "AVX2")
    cpu = torch.device("cpu")
    assert integer.fbgemm_packed_bytes(16, 512) / (16 * 512) < 1.01  # only the column offsets
    assert integer.memory_aware_backend(cpu, 16, 512) == "fbgemm"
    assert integer.memory_aware_backend(cpu, 16, 1024) == "fbgemm"
    assert integer.memory_aware_backend(cpu, 16, 192) == "float"  # padded to 512: 2.7x the codes
    assert integer.memory_aware_backend(cpu, 16, 768) == "float"  # padded to 1024: 1.33x
    assert integer.memory_aware_backend(cpu, 12, 512) == "float"  # outputs padded to 16: 1.33x
    with integer_inference(True, "float"):
        assert integer.default_backend(cpu, 16, 512) == "float"  # a chosen backend: every matrix
    layer = BitLinear(512, 16).eval()
    with torch.no_grad():
        layer(torch.randn(2, 512))
    assert integer.cached_weights(layer)[0].weight.backend == "fbgemm"
    assert integer_weight_bytes(layer) == integer.fbgemm_packed_bytes(16, 512) + 4

    # A model whose experts' down projections take 512 inputs: those on fbgemm, the rest (24-40
    # inputs, and the fused gate/up (1024, 24)) on the int8 codes. One head: MH-MoE's 8-wide
    # sub-tokens would make the gate/up's per-row scales 1/8 of fp32's bytes.
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(num_heads=1, d_expert=512), quantize_router=True).eval()
    export_ternary(model, tmp_path / "a")
    loaded = load_ternary(tmp_path / "a")
    experts = loaded.blocks[1].ffn.experts

    def check_mixed(form):
        assert {w.backend for w in form.down} == {"fbgemm"} and {w.backend for w in form.up} == {"float"}
        assert ternary._integer_form_backend(form) is None

    check_mixed(experts.owned_integer_weights()[0])
    modules, numel = _quantised_matrices(loaded)
    assert _quantised_bytes(loaded, modules) / (4 * numel) <= 0.25 + SCALE_ALLOWANCE
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = loaded(ids).logits
        assert torch.equal(logits, model(ids).logits)  # the fake-quant model: the same choice
        check_mixed(integer.cached_weights(model.blocks[1].ffn.experts)[0])
        with integer_inference(True, "float"):  # a chosen backend, built per call: exact too
            assert torch.equal(loaded(ids).logits, logits)
    prompt = ids[0, :5].tolist()
    assert list(generate_tokens(loaded, prompt, 12, temperature=0)) == list(
        generate_tokens(model, prompt, 12, temperature=0))
    # a move, a re-export and a scale edit keep the per-matrix choice (also when the edit is
    # seen inside a block that chose another backend: the owned form stays the default)
    loaded.to("cpu")
    check_mixed(experts.owned_integer_weights()[0])
    export_ternary(loaded, tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(load_ternary(tmp_path / "b")(ids).logits, logits)
        x_MS, offsets_E = torch.randn(5, experts.d_in), torch.tensor([1, 2, 3, 4, 5, 5], dtype=torch.int32)
        before = experts(x_MS, offsets_E)
        experts.w2_scale.mul_(2.0)
        with integer_inference(True, "fbgemm"):
            torch.testing.assert_close(experts(x_MS, offsets_E), 2 * before, rtol=1e-6, atol=1e-7)
    check_mixed(experts.owned_integer_weights()[0])
    # backend= forces one kernel on every matrix
    for backend in ("fbgemm", "float"):
        forced = load_ternary(tmp_path / "a", backend=backend)
        assert {w.backend for m in _quantised_matrices(forced)[0] for w in _matrix_weights(m)} == {backend}
        with torch.no_grad():
            assert torch.equal(forced(ids).logits, logits)


@pytest.mark.parametrize("backend", ["int_mm", "float"])
def test_released_packed_model_holds_a_quarter_of_fp32_and_same_logits(tmp_path, backend):
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(), quantize_router=True).eval()
    export_ternary(model, tmp_path)
    loaded = load_ternary(tmp_path, backend=backend)
    modules, numel = _quantised_matrices(loaded)
    assert modules and all(m.packed_released() for m in modules)
    ids = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        released_logits = loaded(ids).logits  # the load's backend, no integer_inference block
        with integer_inference(True, backend):
            fake_quant_logits = model(ids).logits
        with integer_inference(False):
            released_float = loaded(ids).logits
    # int8 codes: one byte a weight, exactly (the scales are the allowance of the ratio)
    assert sum(w.nbytes() for m in modules for w in _matrix_weights(m)) == numel
    assert _quantised_bytes(loaded, modules) / (4 * numel) <= 0.25 + SCALE_ALLOWANCE
    # Dropping the buffers changes nothing: the same logits as the fake-quant model (same codes,
    # same kernels) and as the buffers restored; the float path too.
    assert torch.equal(released_logits, fake_quant_logits)
    loaded.to("cpu")  # a move keeps the load's backend (and the memory)
    assert all(m.packed_released() and m.owned_integer_weights()[0].nbytes() < 4 * numel for m in modules)
    assert {ternary._integer_form_backend(m.owned_integer_weights()[0]) for m in modules} == {backend}
    for m in modules:
        m.restore_packed()
        assert not m.packed_released() and getattr(m, f"{next(iter(m.weight_shapes))}_packed").numel() > 0
    with torch.no_grad(), integer_inference(True, backend):
        assert torch.equal(loaded(ids).logits, released_logits)
    with torch.no_grad(), integer_inference(False):
        assert torch.equal(loaded(ids).logits, released_float)


def test_fbgemm_packed_bytes_follow_the_instruction_set(monkeypatch):
    # fbgemm's PackingTraits (int8, 32-bit accumulation): KCB x NCB blocks per instruction set
    assert integer.fbgemm_packed_bytes(64, 192, "AVX2") == 512 * 64 + 4 * 64
    assert integer.fbgemm_packed_bytes(64, 192, "AVX512") == 256 * 64 + 4 * 64
    assert integer.fbgemm_packed_bytes(64, 192, "AVX512_VNNI") == 512 * 96 + 4 * 64
    assert integer.fbgemm_packed_bytes(12, 512, "AVX2") == 512 * 16 + 4 * 12
    with pytest.raises(ValueError, match="instruction_set='SSE': must be one of AVX2, AVX512, AVX512_VNNI"):
        integer.fbgemm_packed_bytes(64, 192, "SSE")
    # the host's set: PyTorch's CPU capability, AVX512 split by the avx512_vnni flag
    for capability, flags, expected in [("AVX2", set(), "AVX2"), ("AVX512", set(), "AVX512"),
                                        ("AVX512", {"avx512_vnni"}, "AVX512_VNNI"), ("DEFAULT", set(), "AVX2")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(integer, "_cpu_flags", lambda f=frozenset(flags): f)
        assert integer.fbgemm_instruction_set() == expected
        assert integer.fbgemm_packed_bytes(64, 192) == integer.fbgemm_packed_bytes(64, 192, expected)
    # on AVX512 (K blocks of 256) a 256-wide matrix pads nothing: fbgemm is its default there
    if fbgemm_available():
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        monkeypatch.setattr(integer, "_cpu_flags", lambda: frozenset())
        assert integer.memory_aware_backend(torch.device("cpu"), 64, 256) == "fbgemm"
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
        assert integer.memory_aware_backend(torch.device("cpu"), 64, 256) == "float"


def test_fbgemm_packed_bytes_match_the_resident_memory_they_take():
    # fbgemm's prepacked weight is opaque: measure it. In a fresh process, the growth of the
    # resident set over many prepacked copies of one 64 x 192 matrix.
    if not fbgemm_available():  # then no matrix may get fbgemm by default
        assert integer.memory_aware_backend(torch.device("cpu"), 64, 512) == "float"
        return
    instruction_set = integer.fbgemm_instruction_set()
    k_block, n_block = integer.FBGEMM_BLOCKING[instruction_set]
    predicted = integer.fbgemm_packed_bytes(64, 192)
    assert predicted == -(-192 // k_block) * k_block * -(-64 // n_block) * n_block + 4 * 64
    if not Path("/proc/self/statm").exists():
        pytest.skip("no /proc/self/statm to read the resident set from (the formula is checked above)")
    code = (
        "import torch, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "torch.backends.quantized.engine = 'fbgemm'\n"
        "q = torch._make_per_tensor_quantized_tensor(torch.ones(64, 192, dtype=torch.int8), 1.0, 0)\n"
        "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "keep = [torch.ops.quantized.linear_prepack(q, None)]\n"
        "before = rss()\n"
        "keep += [torch.ops.quantized.linear_prepack(q, None) for _ in range(400)]\n"
        "print((rss() - before) / 400)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    measured = float(result.stdout.strip())
    assert measured >= 64 * 192  # at least one byte a weight, whatever the blocking
    if instruction_set == "AVX2":  # measured on this project's CPU: the formula to within allocator slack
        assert 0.85 * predicted <= measured <= 1.2 * predicted, (measured, predicted)
        assert measured > 2 * 64 * 192  # not one byte a weight: the padding is real
    else:  # read from fbgemm's tables, not measured here: a looser bound
        assert 0.5 * predicted <= measured <= 2 * predicted, (instruction_set, measured, predicted)


def test_released_packed_modules_keep_state_dict_reexport_moves_and_copies(tmp_path):
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(), quantize_router=True).eval()
    export_ternary(model, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / ternary.WEIGHTS_FILE), framework="pt") as fh:
        file_tensors = {key: fh.get_tensor(key) for key in fh.keys()}  # noqa: SIM118 - safe_open is no dict
    loaded = load_ternary(tmp_path / "a")
    modules, _ = _quantised_matrices(loaded)
    assert all(m.packed_released() for m in modules)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = loaded(ids).logits
    # state_dict: the 2-bit bytes re-packed from the integer weights, equal to the file's
    state = loaded.state_dict()
    for key, tensor in file_tensors.items():
        assert torch.equal(state[key], tensor), key
    # a re-export of the loaded model is the same export
    export_ternary(loaded, tmp_path / "b")
    again = load_ternary(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    # load_state_dict into a released model: restored, loaded, released again
    torch.manual_seed(1)
    other_model = to_bitnet(tiny_lm(), quantize_router=True).eval()
    export_ternary(other_model, tmp_path / "c")
    other = load_ternary(tmp_path / "c")
    with torch.no_grad():
        other_logits = other(ids).logits
        assert not torch.equal(other_logits, logits)
        again.load_state_dict(other.state_dict())
        assert all(m.packed_released() for m in _quantised_matrices(again)[0])
        assert torch.equal(again(ids).logits, other_logits)
    # deepcopy, .to (restored, moved, released again), a scale edited in place
    copied = copy.deepcopy(loaded)
    moved = loaded.to("cpu", torch.float64)  # float64: the scale buffers change: rebuilt
    assert all(m.packed_released() for m in _quantised_matrices(moved)[0])
    with torch.no_grad():
        assert torch.equal(copied(ids).logits, logits)
        torch.testing.assert_close(moved(ids).logits.float(), logits, rtol=1e-4, atol=1e-4)
        # gammas of the experts: the owned weights follow (seen in the experts' output: the
        # merge layer's inner RMSNorm hides a uniform scale from the logits). w1/w3 feed the
        # fused gate/up scales, a copy: only a rebuild sees them; w2's is aliased.
        experts = copied.blocks[1].ffn.experts
        x_MS, offsets_E = torch.randn(5, experts.d_in), torch.tensor([1, 2, 3, 4, 5, 5], dtype=torch.int32)
        before = experts(x_MS, offsets_E)
        experts.w2_scale.mul_(2.0)
        torch.testing.assert_close(experts(x_MS, offsets_E), 2 * before, rtol=1e-6, atol=1e-7)
        edits = {
            "w1 in place": lambda: experts.w1_scale.mul_(1.5),
            "w3 through .data (no version counter bump)": lambda: experts.w3_scale.data.mul_(0.5),
            "w2 another tensor": lambda: setattr(experts, "w2_scale", experts.w2_scale * 1.25),
        }
        for label, edit in edits.items():
            previous = experts(x_MS, offsets_E)
            edit()
            edited_experts = experts(x_MS, offsets_E)
            with integer_inference(False):
                float_experts = experts(x_MS, offsets_E)
            torch.testing.assert_close(edited_experts, float_experts, rtol=1e-5, atol=1e-6, msg=label)
            # the owned gammas are the scales now (a uniform w3 scale is hidden from the output
            # by the hidden RMSNorm: this is where it shows)
            form, hidden = experts.owned_integer_weights()[0], experts.d_expert
            assert torch.equal(form.gamma_up_EG[:, :hidden], experts.w1_scale[:, None].expand(-1, hidden)), label
            assert torch.equal(form.gamma_up_EG[:, hidden:], experts.w3_scale[:, None].expand(-1, hidden)), label
            assert torch.equal(form.gamma_down_E, experts.w2_scale), label
            assert "w3" in label or (edited_experts - previous).abs().max() > 1e-3, label
        copied.blocks[1].ffn.merge.weight_scale.mul_(1.5)  # the merge output goes to the residual
        edited = copied(ids).logits
        assert (edited - logits).abs().max() > 1e-3
        reference = copy.deepcopy(copied)
        for m in _quantised_matrices(reference)[0]:
            m.restore_packed()  # integer weights rebuilt from the buffers and the edited scale
        assert torch.equal(reference(ids).logits, edited)
    with pytest.raises(ValueError, match="integer backend 'fast': must be one of"):
        load_ternary(tmp_path / "a", backend="fast")
    # loaded and run under inference_mode (its tensors have no version counter)
    with torch.inference_mode():
        assert torch.equal(load_ternary(tmp_path / "a")(ids).logits, logits)


def test_fused_extension_falls_back_silently_when_it_cannot_be_built(monkeypatch, caplog, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # its build directory: not the user's
    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    fused.fused_extension.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger="mhmoe.bitnet.fused"):
            codes = torch.zeros(4, 8, dtype=torch.int8)
            assert fused.fused_small_rows_linear(torch.randn(1, 8), codes, torch.ones(1), 1e-5) is None
            assert fused.fused_small_rows_linear(torch.randn(2, 8), codes, torch.ones(1), 1e-5) is None
        messages = [r.getMessage() for r in caplog.records if r.name == "mhmoe.bitnet.fused"]
        assert len(messages) == 1 and "no C++ compiler" in messages[0]  # logged once
        assert all(r.levelno == logging.DEBUG for r in caplog.records if r.name == "mhmoe.bitnet.fused")
    finally:
        fused.fused_extension.cache_clear()  # the next caller builds (or loads the cached build)


@pytest.mark.slow
def test_fused_small_rows_equal_the_integer_path_and_exact_sums():
    # Builds the C++ extension (minutes the first time; cached in torch's extension dir after).
    if fused.fused_extension() is None:
        pytest.fail("the fused extension did not build here (a C++ compiler is needed)")
    generator = torch.Generator().manual_seed(0)
    # Exact integer sums: rows whose max |x| is 127 make s = (1 / 127) * 127 = 1 in float32, so
    # with gamma 1 the output is the int32 sum itself; all codes at +-127/128 extremes included.
    x = torch.randint(-127, 128, (5, 192), generator=generator).float()
    x[:, 0] = 127.0
    codes_w = torch.randint(-1, 2, (64, 192), generator=generator).to(torch.int8)
    codes_w[0] = 1
    assert (1.0 / torch.tensor(127.0)) * 127 == 1.0
    sums = fused.fused_small_rows_linear(x, codes_w, torch.ones(1), 1e-5)
    assert torch.equal(sums.double(), x.double() @ codes_w.double().t())
    # Against the fbgemm/PyTorch integer path of BitLinear (same codes, same scale operations)
    for rows in (1, 3, fused.FUSED_MAX_ROWS):
        layer = BitLinear(96, 40).eval()
        x = torch.randn(rows, 96, generator=generator) * 3
        with torch.no_grad():
            reference = layer(x)
            codes_OI, gamma = weight_quant_codes(layer.weight)
            y = fused.fused_small_rows_linear(layer.norm(x), codes_OI.to(torch.int8), gamma.reshape(1), 1e-5)
        assert torch.equal(y, reference)
        # The RMSNorm fused too: its sum of squares in another order can move an input code at a
        # .5 boundary by one step, which moves each output by at most gamma / s (|W_q| <= 1).
        y_norm = fused.fused_rmsnorm_small_rows_linear(x, layer.norm.weight, codes_OI.to(torch.int8),
                                                       gamma.reshape(1), layer.norm.eps, 1e-5)
        _, scale = activation_codes_for_inference(layer.norm(x))
        one_code_step = (gamma / scale).max().item()
        torch.testing.assert_close(y_norm, reference, rtol=1e-5, atol=one_code_step * 1.01)
        per_output = torch.rand(40, generator=generator) + 0.5  # a gamma per output row (experts' fused gate/up)
        with torch.no_grad():
            codes_x, scale = activation_codes_for_inference(layer.norm(x))
            expected = integer.integer_linear(codes_x, scale, integer.Int8Weight(codes_OI, "float"), per_output)
            y = fused.fused_small_rows_linear(layer.norm(x), codes_OI.to(torch.int8), per_output, 1e-5)
        torch.testing.assert_close(y, expected, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="at most 8"):
        fused.fused_small_rows_linear(torch.randn(9, 96), codes_OI.to(torch.int8), gamma.reshape(1), 1e-5)


# ---------------------------------------------------------------------------------- small batch


@pytest.mark.parametrize("kind", ["fp32_loop", "fp32_gathered", "bitnet"])
@pytest.mark.parametrize("heads,top_k,tokens", [(1, 1, 1), (1, 2, 8), (3, 3, 2), (3, 2, 5)])
def test_small_batch_path_equals_reference_dispatch(monkeypatch, kind, heads, top_k, tokens):
    torch.manual_seed(0)
    layer = MHMoE(24, heads, 7, top_k, 16, shared_d_ff=8).eval()
    if kind == "bitnet":
        to_bitnet(layer, quantize_router=True)
    if kind == "fp32_loop":  # experts too large to gather: one forward_one per chosen expert
        monkeypatch.setattr(moe_mod, "SMALL_BATCH_GATHER_MAX_BYTES", 0)
    assert moe_mod.gathers_weights(layer.experts, tokens * heads * top_k) == (kind == "fp32_gathered")
    x = torch.randn(tokens, 24)
    with torch.no_grad():
        ref, ref_aux = layer.forward_reference(x)

        def no_sort(*args, **kwargs):
            raise AssertionError("the small-batch path must not sort the assignments")

        monkeypatch.setattr(moe_mod, "sort_assignments", no_sort)
        out, aux = layer(x)
    assert tokens * heads * top_k <= moe_mod.SMALL_BATCH_MAX_ASSIGNMENTS
    if kind == "fp32_gathered":  # batched matmuls: the same sums in another order
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    else:  # the reference's operations in its order: bit for bit
        assert torch.equal(out, ref)
    assert torch.equal(aux.expert_ids, ref_aux.expert_ids)
    assert torch.equal(aux.tokens_per_expert, ref_aux.tokens_per_expert)
    torch.testing.assert_close(aux.load_balancing_loss, ref_aux.load_balancing_loss, rtol=0, atol=0)
    torch.testing.assert_close(aux.z_loss, ref_aux.z_loss, rtol=0, atol=0)


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
def test_gathered_small_batch_equals_reference_float64(activation):
    torch.manual_seed(0)
    layer = MHMoE(24, 3, 9, 3, 16, activation=activation).double().eval()
    x = torch.randn(3, 24, dtype=torch.float64)
    assert moe_mod.gathers_weights(layer.experts, 27)
    with torch.no_grad():
        out, _ = layer(x)
        ref, _ = layer.forward_reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_small_batch_path_is_differentiable_and_skipped_when_not_applicable():
    torch.manual_seed(0)
    layer = MHMoE(24, 3, 7, 2, 16)
    x = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    layer.double()
    out, _ = layer(x)
    ref, _ = layer.forward_reference(x)
    grad_out = torch.autograd.grad(out.sum(), [x, layer.experts.w1])
    grad_ref = torch.autograd.grad(ref.sum(), [x, layer.experts.w1])
    for a, b in zip(grad_out, grad_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    many = moe_mod.SMALL_BATCH_MAX_ASSIGNMENTS + 1
    assert not moe_mod.use_small_batch(x, many, layer.experts, None, None)
    assert not moe_mod.use_small_batch(x, 4, layer.experts, 1.25, None)  # capacity: the full rule
    layer.experts.implementation = "reference"
    assert not moe_mod.use_small_batch(x, 4, layer.experts, None, None)

    class OwnForward(Experts):  # a subclass's own forward must not be bypassed
        def forward(self, x_MS, offsets_E, counts_E=None):
            return 2 * super().forward(x_MS, offsets_E, counts_E)

    assert not moe_mod.use_small_batch(x, 4, OwnForward(7, 8, 16), None, None)
    assert moe_mod.use_small_batch(x, 4, BitExperts(7, 8, 16), None, None)


# ---------------------------------------------------------------------------------- aux-free router


class Toy(nn.Module):
    """Linear -> MH-MoE (aux-free) -> head: no ModelConfig, so any BitNet option is allowed."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 24, bias=False)
        self.moe = MHMoE(24, 3, 6, 2, 16, load_balancing="aux-free")
        self.lm_head = nn.Linear(24, 5, bias=False)

    def forward(self, x):
        y, aux = self.moe(self.inp(x))
        return self.lm_head(y), aux


def test_quantised_router_keeps_the_aux_free_bias(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    bias = model.moe.router.expert_bias
    assert bias is not None
    to_bitnet(model, quantize_router=True)
    router = model.moe.router
    assert isinstance(router, BitRouter) and router.expert_bias is bias  # the same buffer
    assert "moe.router.expert_bias" in model.state_dict()
    x = torch.randn(10, 8)
    before = router(x).expert_ids_NK
    router.expert_bias.zero_()[4] = 10.0  # a large bias forces expert 4 into every top-k
    for integer_on in (True, False):
        with torch.no_grad(), integer_inference(integer_on):
            ids = router.eval()(x).expert_ids_NK
        assert bool((ids == 4).any(dim=1).all()), ids
    assert not bool((before == 4).any(dim=1).all())
    update_selection_bias(router.expert_bias, torch.tensor([0, 0, 0, 0, 9, 0]), rate=0.5)
    assert router.expert_bias[4] == 9.5 and bias[4] == 9.5  # the balancing update reaches it
    with torch.no_grad():
        _, aux = model.eval()(torch.randn(4, 8))
    assert torch.equal(aux.expert_bias, router.expert_bias)
    export_ternary(model, tmp_path)
    loaded = load_ternary(tmp_path, model=Toy())
    loaded_router = loaded.moe.router
    assert isinstance(loaded_router, TernaryRouter)
    assert torch.equal(loaded_router.expert_bias, router.expert_bias)
    with torch.no_grad():
        assert torch.equal(loaded_router(x).expert_ids_NK, router(x).expert_ids_NK)
    plain = TopKRouter(8, 6, 2)
    assert BitRouter.from_router(plain).expert_bias is None


# ---------------------------------------------------------------------------------- cache validity


def test_eval_during_training_with_the_fused_trainer_optimiser_sees_every_step():
    # The trainer's fused AdamW writes the parameters without bumping their version counters;
    # the integer eval must still use the updated weights, whether the step is taken in train
    # mode or, without any train(True) in between, in eval mode.
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(), quantize_router=True)
    config = TrainConfig(total_steps=10, batch_size=3, seq_len=20, lr=1e-2, warmup_steps=1)
    optimizer = build_optimizer(model, config)
    assert optimizer.defaults.get("fused") is True  # the case that went stale
    ids = torch.randint(0, 61, (3, 20), generator=torch.Generator().manual_seed(1))

    def step():
        lm_loss(model(ids).logits[:, :-1], ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()

    def evaluate():
        with torch.no_grad():
            loss_int = lm_loss(model(ids).logits[:, :-1], ids[:, 1:]).item()
            with integer_inference(False):
                loss_float = lm_loss(model(ids).logits[:, :-1], ids[:, 1:]).item()
        return loss_int, loss_float

    model.eval()
    first_int, first_float = evaluate()
    assert abs(first_int - first_float) < 1e-2
    model.train()
    for _ in range(3):
        step()
    model.eval()
    trained_int, trained_float = evaluate()
    assert first_float - trained_float > 0.1  # the steps changed the model
    assert abs(trained_int - trained_float) < 1e-2
    for _ in range(3):  # eval mode throughout: only the optimiser-step counter sees these
        step()
    last_int, last_float = evaluate()
    assert trained_float - last_float > 0.1
    assert abs(last_int - last_float) < 1e-2


def test_entering_train_mode_drops_the_cached_integer_weights():
    torch.manual_seed(0)
    model = nn.ModuleDict({"linear": BitLinear(24, 24), "experts": BitExperts(4, 24, 16)}).eval()
    x = torch.randn(6, 24)
    offsets = torch.tensor([2, 2, 5, 6], dtype=torch.int32)

    def forward():
        return model["experts"](model["linear"](x), offsets)

    with torch.no_grad():
        stale = forward()
        assert integer.cached_weights(model["linear"]) and integer.cached_weights(model["experts"])
        for p in model.parameters():  # invisible to the version counter: only train() can tell
            if p.dim() >= 2:
                p.data.mul_(torch.linspace(-1.0, 2.0, p.shape[-1]))
        model.train()
        assert not integer.cached_weights(model["linear"]) and not integer.cached_weights(model["experts"])
        model.eval()
        out_int = forward()
        with integer_inference(False):
            out_float = forward()
    torch.testing.assert_close(out_int, out_float, rtol=1e-5, atol=1e-5)
    assert (out_int - stale).abs().max() > 0.1


class _Scaled(nn.Module):
    """A parametrisation w -> w * factor (a new tensor on every access, as PEFT's LoRA deltas)."""

    def __init__(self, out_features):
        super().__init__()
        self.factor = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, w):
        return w * self.factor


def test_parametrised_weights_are_never_served_stale():
    torch.manual_seed(0)
    layer = BitLinear(32, 16).eval()
    parametrize.register_parametrization(layer, "weight", _Scaled(16))
    x = torch.randn(4, 32)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(6):
            # recomputed weights are freed after each forward and their address reused, at
            # version 0: address + version alone took each for the previous one
            layer.parametrizations.weight[0].factor.copy_(torch.randn(16, 1, generator=generator))
            out_int = layer(x)
            with integer_inference(False):
                out_float = layer(x)
            torch.testing.assert_close(out_int, out_float, rtol=1e-5, atol=1e-5)
    assert not integer.cached_weights(layer)


def test_peft_target_parameters_never_served_stale():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = to_bitnet(Toy(), quantize_router=False)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                             target_parameters=["moe.experts.w1", "moe.experts.w2"])
    wrapped = peft.get_peft_model(model, config).eval()
    x = torch.randn(10, 8)
    lora_b = [p for n, p in wrapped.named_parameters() if "lora_B" in n]
    assert lora_b
    with torch.no_grad():
        for _ in range(5):
            for p in lora_b:
                p.add_(torch.randn_like(p))
            out_int = wrapped(x)[0]
            with integer_inference(False):
                out_float = wrapped(x)[0]
            torch.testing.assert_close(out_int, out_float, rtol=1e-4, atol=1e-4)


def test_packed_experts_follow_a_changed_scale():
    torch.manual_seed(0)
    experts = TernaryExperts(4, 8, 16).eval()
    generator = torch.Generator().manual_seed(0)
    for name, shape in experts.weight_shapes.items():
        getattr(experts, f"{name}_packed").copy_(pack_ternary(torch.randint(-1, 2, shape, generator=generator)))
        getattr(experts, f"{name}_scale").uniform_(0.5, 1.5, generator=generator)
    x = torch.randn(9, 8)
    offsets = torch.tensor([2, 5, 5, 9], dtype=torch.int32)
    with torch.no_grad():
        before = experts(x, offsets)
        # gamma of the gate projection (the cached fused gate/up scales are a copy of it)
        experts.w1_scale.mul_(3.0)
        after = experts(x, offsets)
        with integer_inference(False):
            reference = experts(x, offsets)
    torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-2


def test_expert_integer_build_concatenates_int8_codes_only(monkeypatch):
    torch.manual_seed(0)
    experts = BitExperts(5, 24, 16).eval()
    assert all(codes.dtype == torch.int8 for codes, _ in experts.expert_codes().values())
    seen = []
    real_cat = torch.cat

    def recording_cat(tensors, *args, **kwargs):
        seen.extend(t.dtype for t in tensors if t.dim() == 3)  # the stacked (E, F, S) codes
        return real_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "cat", recording_cat)
    weights = experts.integer_weights()
    monkeypatch.undo()
    assert seen and all(dtype == torch.int8 for dtype in seen)  # no float (E, 2F, S) copy
    codes_w1, _ = weight_quant_codes(experts.w1, per_expert=True)
    codes_w3, _ = weight_quant_codes(experts.w3, per_expert=True)
    fused = torch.cat([codes_w1, codes_w3], dim=1)
    for e in range(5):  # the int8 form still holds the right codes (int_mm/float keep them)
        built = integer.Int8Weight(fused[e], "float").codes_OI
        assert torch.equal(built, fused[e].to(torch.int8))
    x = torch.randn(7, 24)
    with torch.no_grad():
        out_int = experts(x, torch.tensor([1, 3, 3, 6, 7], dtype=torch.int32))
        with integer_inference(False):
            out_float = experts(x, torch.tensor([1, 3, 3, 6, 7], dtype=torch.int32))
    torch.testing.assert_close(out_int, out_float, rtol=1e-5, atol=1e-5)
    assert len(weights.up) == 5


# ---------------------------------------------------------------------------------- AD, dtypes, threads


def test_forward_mode_ad_keeps_the_tangent():
    torch.manual_seed(0)
    layer = BitLinear(64, 32).eval()
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x, tangent = torch.randn(4, 64), torch.randn(4, 64)

    def f(x):
        return functional_call(layer, params, (x,))

    out, out_tangent = jvp(f, (x,), (tangent,))
    with integer_inference(False):
        ref, ref_tangent = jvp(f, (x,), (tangent,))
    assert ref_tangent.abs().sum() > 0
    torch.testing.assert_close(out_tangent, ref_tangent, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # no_grad: the weights' requires_grad no longer keeps the float path, the tangent must
    with torch.no_grad(), forward_ad.dual_level():
        dual_out = forward_ad.unpack_dual(layer(forward_ad.make_dual(x, tangent)))
    assert dual_out.tangent is not None
    torch.testing.assert_close(dual_out.tangent, ref_tangent, rtol=0, atol=0)
    with torch.no_grad():  # no transform, no dual: the integer path as before
        assert integer.use_integer_path(layer, x, *layer.gradient_tensors())


def test_float64_integer_path_keeps_float64_precision():
    torch.manual_seed(0)
    linear = BitLinear(64, 24, bias=True).double().eval()
    experts = BitExperts(4, 24, 16).double().eval()
    router = BitRouter.from_router(TopKRouter(24, 4, 2)).double().eval()
    x = torch.randn(6, 64, dtype=torch.float64)
    offsets = torch.tensor([1, 3, 3, 6], dtype=torch.int32)
    with torch.no_grad():
        h = linear(x)
        y = experts(h, offsets)
        with integer_inference(False):
            h_ref = linear(x)
            y_ref = experts(h_ref, offsets)
        routed = router(h)
        with integer_inference(False):
            routed_ref = router(h)
    assert h.dtype == torch.float64 and y.dtype == torch.float64
    # float32 scaling left ~1e-7 relative error; float64 scaling leaves rounding only
    assert ((h - h_ref).abs() / h_ref.abs().clamp(min=1e-3)).max() < 1e-13
    assert ((y - y_ref).abs() / y_ref.abs().clamp(min=1e-3)).max() < 1e-12
    assert integer.cached_weights(linear)[0].gamma.dtype == torch.float64
    # the quantised router computes float32 logits on both paths, whatever the input dtype
    assert routed.logits_NE.dtype == routed_ref.logits_NE.dtype == torch.float32
    torch.testing.assert_close(routed.logits_NE, routed_ref.logits_NE, rtol=1e-5, atol=1e-6)


def test_integer_inference_switch_is_per_thread():
    entered, checked = threading.Barrier(2), threading.Barrier(2)
    seen = {}

    def off():
        with integer_inference(False):
            entered.wait()
            checked.wait()  # the other thread is inside its own block now
            seen["off"] = integer.integer_inference_state()
        seen["off_after"] = integer.integer_inference_state()

    def float_backend():
        entered.wait()
        with integer_inference(True, "float"):
            seen["float"] = integer.integer_inference_state()
            seen["float_backend"] = integer.default_backend(torch.device("cpu"), 16, 512)
            checked.wait()

    threads = [threading.Thread(target=off), threading.Thread(target=float_backend)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert seen == {
        "off": (False, None), "off_after": (True, None),
        "float": (True, "float"), "float_backend": "float",
    }
    assert integer.integer_inference_state() == (True, None)


# ------------------------------------------------------------------- released packed modules


def _two_loaded_models(tmp_path):
    """Two released ternary models of one architecture, different weights, and their exports."""
    loaded = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        export_ternary(to_bitnet(tiny_lm(), quantize_router=True).eval(), tmp_path / str(seed))
        loaded.append(load_ternary(tmp_path / str(seed)))
    return loaded


def test_released_modules_use_replaced_packed_buffers(tmp_path):
    a, b = _two_loaded_models(tmp_path)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_a, logits_b = a(ids).logits, b(ids).logits
        assert not torch.equal(logits_a, logits_b)
        # b's state_dict through a: every <W>_packed and scale swapped in for the call
        assert torch.equal(functional_call(a, b.state_dict(), (ids,)).logits, logits_b)
        with integer_inference(False):
            float_b = b(ids).logits
            assert torch.equal(functional_call(a, b.state_dict(), (ids,)).logits, float_b)
        assert torch.equal(a(ids).logits, logits_a)  # swapped back: a's own weights again
        assert all(m.packed_released() and not m.replaced_packed_names() for m in _quantised_matrices(a)[0])
    # a new packed buffer assigned (or given through .data) counts, with the module's own scale
    module_a, module_b = a.blocks[0].attention.out, b.blocks[0].attention.out
    b_packed = module_b.state_dict()["weight_packed"]
    x = torch.randn(3, module_a.in_features)
    for assign in ("attribute", "data"):
        edited = copy.deepcopy(module_a)
        if assign == "attribute":
            edited.weight_packed = b_packed.clone()
        else:
            edited.weight_packed.data = b_packed.clone()
        reference = copy.deepcopy(module_a)
        reference.restore_packed()
        reference.weight_packed.copy_(b_packed)  # a's scale, b's codes, from the buffers
        with torch.no_grad():
            assert torch.equal(edited(x), reference(x)), assign
            with integer_inference(False):
                assert torch.equal(edited(x), reference(x)), assign
        assert torch.equal(edited.state_dict()["weight_packed"], b_packed)
        assert edited.replaced_packed_names() == ["weight"]
    with pytest.raises(ValueError, match="packed has 3 bytes"):
        edited.weight_packed = torch.zeros(3, dtype=torch.uint8)
        edited(x)


def _packed_experts():
    experts = TernaryExperts(4, 8, 16, norm=False).eval()  # no hidden norm to hide a w3 scale
    generator = torch.Generator().manual_seed(0)
    for name, shape in experts.weight_shapes.items():
        getattr(experts, f"{name}_packed").copy_(pack_ternary(torch.randint(-1, 2, shape, generator=generator)))
        getattr(experts, f"{name}_scale").uniform_(0.5, 1.5, generator=generator)
    return experts


def test_owned_weights_follow_scale_edits_without_a_version_counter_and_clear_cache():
    x = torch.randn(9, 8)
    offsets = torch.tensor([2, 5, 5, 9], dtype=torch.int32)

    def check(experts, edit):
        with torch.no_grad():
            before = experts(x, offsets)
            edit()
            after = experts(x, offsets)
            with integer_inference(False):
                reference = experts(x, offsets)
        torch.testing.assert_close(after, reference, rtol=1e-5, atol=1e-5)
        assert (after - before).abs().max() > 1e-2

    experts = _packed_experts()
    ternary.prepare_integer_inference(experts)
    assert experts.packed_released()
    check(experts, lambda: experts.w1_scale.data.mul_(3.0))  # .data: no version bump
    check(experts, lambda: experts.w3_scale.data.mul_(0.5))
    # made, released and edited under inference_mode: inference tensors have no version counter
    with torch.inference_mode():
        experts = _packed_experts()
        ternary.prepare_integer_inference(experts)
        check(experts, lambda: experts.w1_scale.mul_(3.0))
        check(experts, lambda: experts.w3_scale.mul_(2.0))
    # clear_cache (of the module, of a parent, of everything) has the owned form rebuilt
    parent = nn.Sequential(experts)
    for clear in (lambda: integer.clear_cache(experts), lambda: integer.clear_cache(parent), integer.clear_cache):
        form = experts.owned_integer_weights()[0]
        with torch.no_grad():
            before = experts(x, offsets)
            assert experts.owned_integer_weights()[0] is form  # nothing changed: kept
            clear()
            assert torch.equal(experts(x, offsets), before)
        assert experts.owned_integer_weights()[0] is not form


@pytest.mark.parametrize("make", ["linear", "experts"])
def test_fake_quant_cache_sees_load_state_dict_under_inference_mode(make):
    def build(seed):
        torch.manual_seed(seed)
        return (BitLinear(16, 8) if make == "linear" else BitExperts(3, 16, 8)).eval()

    def run(module, x):
        return module(x) if make == "linear" else module(x, torch.tensor([2, 3, 5], dtype=torch.int32))

    x = torch.randn(5, 16)
    with torch.inference_mode():
        layer, other = build(0), build(1)
        before = run(layer, x)
        assert torch.equal(run(layer, x), before)
        layer.load_state_dict(other.state_dict())  # copies into the inference tensors in place
        assert not torch.equal(run(other, x), before)
        assert torch.equal(run(layer, x), run(other, x))
        assert integer.cached_weights(layer)  # kept (load_state_dict clears it; in-place edits need clear_cache)
        latent = layer.weight if make == "linear" else layer.w2
        latent.mul_(-1.0)  # an inference tensor: no version counter to see this edit
        integer.clear_cache(layer)  # the documented remedy
        assert not integer.cached_weights(layer)
        if make == "linear":  # ternary codes of -W are -codes, same absmean scale: output negated
            torch.testing.assert_close(run(layer, x), -run(other, x), rtol=1e-6, atol=1e-6)
        else:
            assert not torch.equal(run(layer, x), run(other, x))
    # a normal module whose load_state_dict runs inside inference_mode: entries dropped
    layer, other = build(0), build(1)
    with torch.no_grad():
        run(layer, x)
    assert integer.cached_weights(layer)
    with torch.inference_mode():
        layer.load_state_dict(other.state_dict())
        assert torch.equal(run(layer, x), run(other, x))


def test_prepare_without_release_keeps_the_chosen_backend(tmp_path):
    torch.manual_seed(0)
    model = to_bitnet(tiny_lm(), quantize_router=True).eval()
    export_ternary(model, tmp_path)
    loaded = load_ternary(tmp_path)  # released, per-matrix default
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = loaded(ids).logits
    # int_mm: never a CPU default, so a rebuild for the default would show
    for target in (loaded, model):
        ternary.prepare_integer_inference(target, "int_mm", release_packed=False)
        modules = [m for m in target.modules() if isinstance(m, (layers_mod._TernaryMatrixMath, layers_mod._BitExpertsMath))]
        assert modules and all(m.prepared_backend == "int_mm" for m in modules)
        assert not any(isinstance(m, ternary._PackedTernary) and m.packed_released() for m in modules)
        with torch.no_grad():  # outside any integer_inference block
            assert torch.equal(target(ids).logits, logits)
        for m in modules:
            (form,) = integer.cached_weights(m)
            weights = [form.weight] if isinstance(form, integer.IntegerLinearWeight) else form.up + form.down
            assert {w.backend for w in weights} == {"int_mm"}
    # a later release keeps the prepared kernel too
    ternary.prepare_integer_inference(loaded, "int_mm")
    assert {ternary._integer_form_backend(m.owned_integer_weights()[0]) for m in _quantised_matrices(loaded)[0]} == {"int_mm"}


def test_release_sets_the_owned_form_before_emptying_the_buffers():
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (8, 16))
    seen = []

    class Watched(ternary.TernaryLinear):
        def __setattr__(self, name, value):
            if name.endswith("_packed") and isinstance(value, torch.Tensor) and value.numel() == 0:
                # the state just before a buffer is emptied: owned, and the same codes
                seen.append((self.packed_released(), torch.equal(self.ternary_code_tensors()["weight"], codes.to(torch.int8))))
            super().__setattr__(name, value)

    layer = Watched(16, 8).eval()
    layer.weight_packed.copy_(pack_ternary(codes))
    x = torch.randn(3, 16)
    with torch.no_grad():
        reference = layer(x)
        layer.release_packed()
        assert torch.equal(layer(x), reference)
    assert seen == [(True, True)]


def test_fused_extension_builds_per_host_and_clears_a_stale_lock(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load_inline", lambda **kwargs: calls.append(kwargs) or "extension")
    fused.fused_extension.cache_clear()
    try:
        directory = fused.build_directory()
        assert directory.parent == tmp_path and fused.host_key() in directory.name
        assert torch.backends.cpu.get_cpu_capability().lower() in fused.host_key()
        # another CPU capability: another directory (a -march=native build is never shared)
        with monkeypatch.context() as patch:
            other_capability = "AVX2" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "AVX512"
            patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: other_capability)
            assert fused.build_directory() != directory
        lock = directory / "lock"
        lock.touch()
        assert not fused.remove_stale_lock(directory) and lock.exists()  # fresh: someone is building
        old = lock.stat().st_mtime - fused.STALE_LOCK_SECONDS - 1
        os.utime(lock, (old, old))
        with pytest.warns(RuntimeWarning, match="build lock .* old"):
            assert fused.fused_extension() == "extension"
        assert not lock.exists()
        assert calls[0]["build_directory"] == str(directory) and "-march=native" in calls[0]["extra_cflags"]
    finally:
        fused.fused_extension.cache_clear()
    # CPU tensors only, checked before anything is built
    codes = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="runs on CPU tensors, got {'x': 'meta'}"):
        fused.fused_small_rows_linear(torch.randn(1, 8, device="meta"), codes, torch.ones(1), 1e-5)
    with pytest.raises(ValueError, match="'norm_gain': 'meta'"):
        fused.fused_rmsnorm_small_rows_linear(torch.randn(1, 8), torch.ones(8, device="meta"), codes,
                                              torch.ones(1), 1e-6, 1e-5)
    assert calls == [calls[0]]  # nothing else built
    assert "TORCH_CHECK(x.device().is_cpu()" in fused._CPP_SOURCE
