"""The MoE layer family against its plain references and degenerate cases."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhmoe import DenseConfig, FeedForward, MHMoE, MoE, MoEConfig, build_ffn
from mhmoe.layers.experts import grouped_mm, grouped_mm_supported, segment_mm
from mhmoe.layers.moe import sort_assignments
from mhmoe.layers.routing import TopKRouter, load_balancing_loss, route_logits, router_z_loss


def _grads(layer: torch.nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, list]:
    y, aux = forward(x)
    upstream = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    # The load-balancing loss is part of every training objective: check its gradient too.
    objective = (y * upstream).sum() + 0.1 * aux.load_balancing_loss + 0.01 * aux.z_loss
    inputs = [x] + [p for p in layer.parameters()]
    return y, torch.autograd.grad(objective, inputs)


@settings(max_examples=40, deadline=None)
@given(
    num_heads=st.integers(1, 4),
    top_k=st.integers(1, 4),
    num_experts=st.integers(1, 16),
    num_tokens=st.integers(1, 9),
    shared=st.booleans(),
    head=st.booleans(),
    merge=st.booleans(),
    activation=st.sampled_from(["swiglu", "relu"]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fast_path_equals_loop_reference_float64(
    num_heads, top_k, num_experts, num_tokens, shared, head, merge, activation, bias, seed
):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    layer = MHMoE(
        d_model=12 * num_heads,
        num_heads=num_heads,
        num_experts=num_experts,
        top_k=top_k,
        d_expert=7,
        head_layer=head,
        merge_layer=merge,
        shared_d_ff=5 if shared else None,
        activation=activation,
        bias=bias,
    ).double()
    x = torch.randn(num_tokens, 12 * num_heads, dtype=torch.float64, requires_grad=True)
    y_fast, grads_fast = _grads(layer, x, layer.forward)
    y_ref, grads_ref = _grads(layer, x, layer.forward_reference)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    num_heads=st.integers(1, 3),
    top_k=st.integers(1, 3),
    num_experts=st.integers(1, 8),
    capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 1.5]),
    seed=st.integers(0, 2**16),
)
def test_capacity_dropping_equals_loop_reference(num_heads, top_k, num_experts, capacity_factor, seed):
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    layer = MHMoE(
        d_model=8 * num_heads, num_heads=num_heads, num_experts=num_experts, top_k=top_k,
        d_expert=6, capacity_factor=capacity_factor,
    ).double()
    x = torch.randn(11, 8 * num_heads, dtype=torch.float64, requires_grad=True)
    (y_fast, aux_fast), (y_ref, aux_ref) = layer(x), layer.forward_reference(x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-12, atol=1e-12)
    assert float(aux_fast.dropped_fraction) == pytest.approx(float(aux_ref.dropped_fraction))
    y_fast_g, grads_fast = _grads(layer, x, layer.forward)
    _, grads_ref = _grads(layer, x, layer.forward_reference)
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


def test_capacity_keeps_first_choices_before_second_choices():
    # 4 units, top-2, 2 experts; every unit picks expert 0 first. Capacity = ceil(0.5*8/2) = 2.
    ids = torch.tensor([[0, 1], [0, 1], [0, 1], [1, 0]])
    kept_order, kept_counts, tokens_per_expert = sort_assignments(ids, 2, capacity_factor=0.5, priority="choice")
    assert tokens_per_expert.tolist() == [4, 4]
    assert kept_counts.tolist() == [2, 2]
    # expert 0 serves units 0 and 1 (first choices); expert 1 serves unit 3's first choice
    # (assignment 6) before any second choice (unit 0's, assignment 1).
    assert kept_order.tolist() == [0, 2, 6, 1]


def test_capacity_reports_dropped_fraction_and_zero_output_when_all_dropped():
    torch.manual_seed(0)
    layer = MoE(d_model=8, num_experts=2, top_k=1, d_expert=4, capacity_factor=0.1)
    with torch.no_grad():  # send every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 100.0
    x = torch.randn(40, 8)
    x[:, 0] = 1.0
    y, aux = layer(x)
    # capacity = ceil(0.1 * 40 / 2) = 2 of the 40 assignments kept
    assert float(aux.dropped_fraction) == pytest.approx(38 / 40)
    assert torch.count_nonzero(y.abs().sum(-1)) == 2


@pytest.mark.skipif(not grouped_mm_supported("cpu", torch.float32), reason="no _grouped_mm")
def test_grouped_mm_matches_segment_loop_forward_and_backward():
    torch.manual_seed(0)
    counts = [3, 0, 5, 1, 0, 7]  # experts with no rows included
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(len(counts), 24, 16, requires_grad=True)
    offsets = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y_grouped = grouped_mm(x, w, offsets, use_grouped_mm=True)
    y_loop = segment_mm(x, w, counts)
    torch.testing.assert_close(y_grouped, y_loop, rtol=1e-5, atol=1e-5)
    # .sum() hands _grouped_mm an expanded (stride 0) gradient: must still work.
    g_grouped = torch.autograd.grad(y_grouped.sum(), [x, w])
    g_loop = torch.autograd.grad(y_loop.sum(), [x, w])
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert g_grouped[1][1].abs().sum() == 0  # an expert with no rows gets a zero gradient


@pytest.mark.parametrize("num_heads,num_experts,top_k", [(1, 8, 1), (3, 12, 3)])
def test_float32_grouped_layer_matches_reference(num_heads, num_experts, top_k):
    torch.manual_seed(1)
    layer = MHMoE(d_model=48, num_heads=num_heads, num_experts=num_experts, top_k=top_k, d_expert=32)
    x = torch.randn(2, 33, 48, requires_grad=True)
    y_fast, grads_fast = _grads(layer, x, layer.forward)
    y_ref, grads_ref = _grads(layer, x, layer.forward_reference)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    layer.experts.use_grouped_mm = False  # the fallback path gives the same
    torch.testing.assert_close(layer(x)[0], y_fast, rtol=1e-5, atol=1e-6)


def test_one_expert_top1_equals_dense_ffn():
    torch.manual_seed(0)
    moe = MoE(d_model=16, num_experts=1, top_k=1, d_expert=24).double()
    ffn = FeedForward(d_model=16, d_ff=24).double()
    with torch.no_grad():
        ffn.w1.weight.copy_(moe.experts.w1[0])
        ffn.w3.weight.copy_(moe.experts.w3[0])
        ffn.w2.weight.copy_(moe.experts.w2[0])
    x = torch.randn(5, 16, dtype=torch.float64)
    y_moe, aux = moe(x)
    # one expert: softmax probability 1, top-1 keeps it raw -> exactly the dense FFN
    torch.testing.assert_close(y_moe, ffn(x))
    assert aux.tokens_per_expert.tolist() == [5]


def _per_unit_moe(layer: MHMoE, x_NS: torch.Tensor) -> torch.Tensor:
    """y_n = sum_k w_nk * Expert_{id_nk}(x_n), one routed unit at a time, written from the
    formulas with the layer's weights: float32 router logits, softmax, top-k (renormalised for
    k > 1), SwiGLU experts. Independent of the layer's dispatch code."""
    router, experts = layer.router, layer.experts
    outputs = []
    for x_S in x_NS:
        probs_E = torch.softmax(router.weight.float() @ x_S.float(), dim=-1)
        weights_K, ids_K = torch.topk(probs_E, router.top_k)
        if router.top_k > 1:
            weights_K = weights_K / weights_K.sum()
        y_S = torch.zeros_like(x_S)
        for weight, expert in zip(weights_K.tolist(), ids_K.tolist()):
            hidden_F = torch.nn.functional.silu(experts.w1[expert] @ x_S) * (experts.w3[expert] @ x_S)
            y_S = y_S + weight * (experts.w2[expert] @ hidden_F)
        outputs.append(y_S)
    return torch.stack(outputs)


def test_h1_without_head_and_merge_equals_per_token_moe():
    torch.manual_seed(0)
    mh = MHMoE(d_model=16, num_heads=1, num_experts=4, top_k=2, d_expert=8,
               head_layer=False, merge_layer=False)
    moe = MoE(d_model=16, num_experts=4, top_k=2, d_expert=8)
    assert set(mh.state_dict()) == set(moe.state_dict())
    moe.load_state_dict(mh.state_dict())
    x = torch.randn(3, 7, 16)
    expected = _per_unit_moe(mh, x.reshape(21, 16)).reshape(3, 7, 16)  # (B, T, D) -> (B*T, D)
    torch.testing.assert_close(mh(x)[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe(x)[0], expected, rtol=1e-5, atol=1e-6)


def test_identity_head_and_merge_equals_per_subtoken_moe():
    torch.manual_seed(0)
    mh = MHMoE(d_model=12, num_heads=3, num_experts=5, top_k=2, d_expert=8)
    with torch.no_grad():
        mh.head.weight.copy_(torch.eye(12))
        mh.merge.weight.copy_(torch.eye(12))
    x = torch.randn(6, 12)
    # Sub-token h of token t is row t*3 + h: (T, D) -> (T*H, S) -> back to (T, D).
    expected = _per_unit_moe(mh, x.reshape(18, 4)).reshape(6, 12)
    torch.testing.assert_close(mh(x)[0], expected, rtol=1e-5, atol=1e-6)
    # MoE on the sub-tokens with the same router and experts gives the same.
    sub = MoE(d_model=4, num_experts=5, top_k=2, d_expert=8)
    sub.load_state_dict({k: v for k, v in mh.state_dict().items() if k.startswith(("router", "experts"))})
    torch.testing.assert_close(sub(x.reshape(18, 4))[0].reshape(6, 12), expected, rtol=1e-5, atol=1e-6)


def test_config_and_keyword_forms_build_the_same_layer():
    config = MoEConfig(d_model=12, num_experts=4, top_k=2, d_expert=8, num_heads=3, shared_d_ff=6)
    torch.manual_seed(0)
    from_config = MHMoE(config)
    torch.manual_seed(0)
    from_keywords = MHMoE(12, 3, 4, 2, 8, shared_d_ff=6)
    assert from_config.config is config and from_keywords.config == config.replace(head_layer=True, merge_layer=True)
    assert {k: v.shape for k, v in from_config.state_dict().items()} == {
        k: v.shape for k, v in from_keywords.state_dict().items()}
    for a, b in zip(from_config.state_dict().values(), from_keywords.state_dict().values()):
        assert torch.equal(a, b)
    assert MHMoE.from_config(config).config is config and isinstance(build_ffn(config), MHMoE)
    # The keyword defaults: MH-MoE has head and merge layers (also at h = 1), MoE has neither.
    assert MHMoE(d_model=8, num_heads=1, num_experts=2, top_k=1, d_expert=4).head is not None
    smoe = MoE(8, 2, 1, 4)
    assert smoe.head is None and smoe.merge is None and smoe.num_heads == 1
    assert MoE(MoEConfig(8, 2, 1, 4, num_heads=2)).head is not None  # a config is taken as it is
    with pytest.raises(TypeError, match="at most 5 positional"):
        MoE(8, 2, 1, 4, 1, 1)
    with pytest.raises(TypeError, match=r"\['top_k'\] both by position and by keyword"):
        MHMoE(8, 2, 2, 1, top_k=1, d_expert=4)


def test_mhmoe_is_equivariant_to_token_permutation():
    torch.manual_seed(0)
    layer = MHMoE(d_model=24, num_heads=3, num_experts=9, top_k=3, d_expert=8, shared_d_ff=16).double()
    x = torch.randn(20, 24, dtype=torch.float64)
    perm = torch.randperm(20)
    torch.testing.assert_close(layer(x[perm])[0], layer(x)[0][perm])


def test_interface_shapes_and_state_dict_keys():
    layer = MHMoE(d_model=96, num_heads=3, num_experts=12, top_k=3, d_expert=64,
                  head_layer=True, merge_layer=True, shared_d_ff=None,
                  activation="swiglu", bias=False, capacity_factor=None)
    x = torch.randn(2, 5, 96)
    y, aux = layer(x)
    assert y.shape == x.shape
    assert aux.load_balancing_loss.ndim == 0
    assert aux.tokens_per_expert.shape == (12,)
    assert int(aux.tokens_per_expert.sum()) == 2 * 5 * 3 * 3  # tokens * heads * top_k
    shapes = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
    assert shapes == {
        "head.weight": (96, 96), "merge.weight": (96, 96), "router.weight": (12, 32),
        "experts.w1": (12, 64, 32), "experts.w3": (12, 64, 32), "experts.w2": (12, 32, 64),
    }
    moe = MoE(d_model=96, num_experts=8, top_k=1, d_expert=256, shared_d_ff=128, activation="relu")
    assert set(moe.state_dict()) == {
        "router.weight", "experts.w1", "experts.w2", "shared.w1.weight", "shared.w2.weight"}
    ffn = FeedForward(d_model=96, d_ff=256, activation="swiglu")
    assert ffn(x).shape == x.shape
    assert isinstance(build_ffn(DenseConfig(96, 256)), FeedForward)
    assert isinstance(build_ffn(MoEConfig(96, 8, 1, 256)), MHMoE)


def test_bias_option_adds_biases_to_head_merge_and_shared_only():
    layer = MHMoE(d_model=8, num_heads=2, num_experts=3, top_k=1, d_expert=4, shared_d_ff=6, bias=True)
    keys = set(layer.state_dict())
    assert {"head.bias", "merge.bias", "shared.w1.bias", "shared.w2.bias"} <= keys
    assert not any(k.startswith(("experts", "router")) and k.endswith("bias") for k in keys)


def test_router_semantics():
    router = TopKRouter(d_in=4, num_experts=6, top_k=1)
    x = torch.randn(10, 4, dtype=torch.bfloat16)
    out = router(x)
    assert out.logits_NE.dtype == torch.float32  # float32 logits whatever the input dtype
    torch.testing.assert_close(out.weights_NK[:, 0], out.probs_NE.max(-1).values)  # raw prob for k=1
    router2 = TopKRouter(d_in=4, num_experts=6, top_k=3)
    weights = router2(x.float()).weights_NK
    torch.testing.assert_close(weights.sum(-1), torch.ones(10))  # renormalised for k>1
    router3 = TopKRouter(d_in=4, num_experts=6, top_k=3, normalize_top_k=False)
    router3.load_state_dict(router2.state_dict())
    assert (router3(x.float()).weights_NK.sum(-1) < 1).all()


def test_load_balancing_loss_on_constructed_routings():
    num_experts = 4
    uniform_probs = torch.full((8, num_experts), 0.25)
    balanced_counts = torch.tensor([2, 2, 2, 2])
    assert float(load_balancing_loss(uniform_probs, balanced_counts)) == pytest.approx(1.0)
    # collapsed: all probability and all assignments on expert 0 -> E * 1 * 1 = E
    collapsed_probs = torch.zeros(8, num_experts)
    collapsed_probs[:, 0] = 1.0
    collapsed_counts = torch.tensor([8, 0, 0, 0])
    assert float(load_balancing_loss(collapsed_probs, collapsed_counts)) == pytest.approx(4.0)
    # balanced routing with any probabilities gives the minimum, 1
    random_probs = torch.softmax(torch.randn(8, num_experts), -1)
    assert float(load_balancing_loss(random_probs, balanced_counts)) == pytest.approx(1.0)
    # z-loss: zero logits -> logsumexp = ln E
    z = router_z_loss(torch.zeros(3, num_experts))
    assert float(z) == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)


def test_aux_counts_are_subtokens_for_mhmoe():
    torch.manual_seed(0)
    layer = MHMoE(d_model=16, num_heads=4, num_experts=6, top_k=2, d_expert=4)
    _, aux = layer(torch.randn(5, 16))
    assert aux.expert_ids.shape == (5 * 4, 2)
    assert aux.num_heads == 4
    assert torch.equal(aux.tokens_per_expert, torch.bincount(aux.expert_ids.flatten(), minlength=6))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=10, num_heads=3), "d_model=10 is not divisible by num_heads=3"),
        (dict(top_k=5, num_experts=4), "top_k=5 exceeds num_experts=4"),
        (dict(d_expert=0), "d_expert=0"),
        (dict(num_experts=-1), "num_experts=-1"),
        (dict(activation="gelu"), "activation='gelu'"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0"),
        (dict(shared_d_ff=0), "shared_d_ff=0"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, match):
    args = dict(d_model=12, num_heads=2, num_experts=4, top_k=2, d_expert=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match.replace("(", r"\(")):
        MHMoE(**args)


def test_wrong_input_width_is_a_clear_error():
    layer = MoE(d_model=8, num_experts=2, top_k=1, d_expert=4)
    with pytest.raises(ValueError, match="expected d_model=8"):
        layer(torch.randn(3, 9))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="no _grouped_mm")
def test_grouped_mm_probe_is_not_fooled_by_no_grad():
    grouped_mm_supported.cache_clear()
    with torch.no_grad():
        first = grouped_mm_supported("cpu", torch.float32)
    assert first == grouped_mm_supported("cpu", torch.float32) is True


def test_unaligned_sizes_fall_back_instead_of_crashing():
    # d_expert = 30 and sub-token size 10: rows are not 16-byte aligned for _grouped_mm.
    torch.manual_seed(0)
    layer = MHMoE(d_model=30, num_heads=3, num_experts=4, top_k=2, d_expert=30)
    x = torch.randn(7, 30, requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y, layer.forward_reference(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3, 4, 6])
def test_top_k_experts_matches_torch_topk_values_ids_and_gradient(top_k):
    from mhmoe.layers.routing import top_k_experts

    torch.manual_seed(top_k)
    logits = torch.randn(50, 12, dtype=torch.float64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    weights, ids = top_k_experts(probs, top_k)
    ref_weights, ref_ids = torch.topk(probs, top_k, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights)
    upstream = torch.randn(50, top_k, dtype=torch.float64)
    (grad,) = torch.autograd.grad((weights * upstream).sum(), logits, retain_graph=True)
    (ref_grad,) = torch.autograd.grad((ref_weights * upstream).sum(), logits)
    torch.testing.assert_close(grad, ref_grad)


# ---------------------------------------------------------------------------------------------
# The fused router (route_logits, one autograd node) against the plain-autograd formulation


def _plain_route(logits_NE: torch.Tensor, top_k: int, normalize_top_k: bool):
    """The router as plain autograd (how it was written before route_logits): softmax, top-k
    with exact ties to the lowest expert index (a stable descending sort), renormalise, and the
    two losses from their public formulas."""
    probs_NE = torch.softmax(logits_NE, dim=-1)
    ids_NK = torch.sort(probs_NE.detach(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    return _plain_route_with_ids(logits_NE, ids_NK, normalize_top_k)


def _plain_route_with_ids(logits_NE: torch.Tensor, ids_NK: torch.Tensor, normalize_top_k: bool):
    probs_NE = torch.softmax(logits_NE, dim=-1)
    weights_NK = probs_NE.gather(1, ids_NK)
    if normalize_top_k:
        weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
    counts_E = torch.bincount(ids_NK.reshape(-1), minlength=logits_NE.shape[1])
    return (weights_NK, ids_NK, load_balancing_loss(probs_NE, counts_E), router_z_loss(logits_NE))


def _fused_route(logits_NE: torch.Tensor, top_k: int, normalize_top_k: bool):
    route = route_logits(logits_NE, top_k, normalize_top_k)
    counts_E = torch.bincount(route.expert_ids_NK.reshape(-1), minlength=logits_NE.shape[1])
    return (route.weights_NK, route.expert_ids_NK, route.load_balancing_loss_value(counts_E),
            route.z_loss_value())


def _route_objective(outputs, upstream_NK: torch.Tensor) -> torch.Tensor:
    weights_NK, _, lb, z = outputs
    return (weights_NK * upstream_NK).sum() + 0.7 * lb + 0.3 * z


def _make_logits(num_units, num_experts, ties, seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    if ties == "integers":  # many exact ties, within and across rows
        logits = torch.randint(0, 3, (num_units, num_experts), generator=generator).to(dtype)
    elif ties == "constant":  # every expert tied
        logits = torch.full((num_units, num_experts), 0.25, dtype=dtype)
    else:
        logits = torch.randn(num_units, num_experts, generator=generator, dtype=dtype) * 2
    return logits


@settings(max_examples=60, deadline=None)
@given(
    num_units=st.sampled_from([0, 1, 2, 7, 33]),
    num_experts=st.integers(1, 12),
    top_k=st.integers(1, 12),
    normalize=st.booleans(),
    ties=st.sampled_from(["none", "integers", "constant"]),
    seed=st.integers(0, 2**16),
)
def test_fused_router_equals_plain_autograd_float64(num_units, num_experts, top_k, normalize, ties, seed):
    top_k = min(top_k, num_experts)
    logits = _make_logits(num_units, num_experts, ties, seed, torch.float64).requires_grad_()
    upstream = torch.randn(num_units, top_k, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed + 1))
    fused = _fused_route(logits, top_k, normalize)
    if top_k <= 4 or ties == "none":
        plain = _plain_route(logits, top_k, normalize)
        assert torch.equal(fused[1], plain[1])
    else:  # k > 4 selects with torch.topk, which orders exact ties its own way
        assert torch.equal(fused[1], torch.topk(torch.softmax(logits, -1), top_k, dim=-1).indices)
        plain = _plain_route_with_ids(logits, fused[1], normalize)
    for got, want in zip((fused[0], fused[2], fused[3]), (plain[0], plain[2], plain[3])):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(_route_objective(fused, upstream), logits)
    (grad_ref,) = torch.autograd.grad(_route_objective(plain, upstream), logits)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (5, 5), (8, 1), (96, 3), (40, 2), (10, 4), (10, 6)])
def test_fused_router_gradients_reach_router_weight_and_input_float64(num_experts, top_k, normalize):
    torch.manual_seed(num_experts + top_k)
    weight = torch.randn(num_experts, 6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(50, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(50, top_k, dtype=torch.float64)
    grads = []
    for route in (_fused_route, _plain_route):
        outputs = route(torch.nn.functional.linear(x, weight), top_k, normalize)
        grads.append(torch.autograd.grad(_route_objective(outputs, upstream), (weight, x)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("ties", ["none", "integers", "constant", "near"])
@pytest.mark.parametrize("num_experts,top_k", [(96, 3), (8, 1), (16, 2), (40, 2), (7, 4), (3, 3), (130, 4), (1, 1)])
def test_float32_router_ids_are_exactly_the_plain_ones(num_experts, top_k, ties):
    """The CPU float32 path selects through packed integer keys (``_top_k_ids_packed``): the ids
    must be exactly the argmax rounds' ones, exact ties (lowest index first) and near ties
    (probabilities a few ulps apart, which share a key bucket) included."""
    num_units = 3000
    if ties == "near":
        generator = torch.Generator().manual_seed(num_experts)
        base = torch.randn(num_units, 1, generator=generator)
        steps = torch.randint(-3, 4, (num_units, num_experts), generator=generator)
        logits = base + steps * 4e-7 * base.abs()  # a few ulps apart: probabilities near-tied
        logits[::2] = torch.randn(num_units // 2, num_experts, generator=generator)
    else:
        logits = _make_logits(num_units, num_experts, ties, num_experts, torch.float32)
    route = route_logits(logits, top_k, top_k > 1)
    want = _plain_route(logits, top_k, top_k > 1)
    assert torch.equal(route.expert_ids_NK, want[1])
    torch.testing.assert_close(route.weights_NK, want[0])
    torch.testing.assert_close(route.probs_NE, torch.softmax(logits, -1), rtol=0, atol=0)


def test_float32_router_layer_losses_and_gradients_match_plain_formulas():
    """TopKRouter (float32 logits) through route_logits vs the plain formulas on its logits,
    gradients w.r.t. the router weight and the input included, at float32 precision."""
    torch.manual_seed(0)
    router = TopKRouter(d_in=16, num_experts=24, top_k=3)
    x = torch.randn(300, 16, requires_grad=True)
    upstream = torch.randn(300, 3)
    route = router(x)
    counts_E = torch.bincount(route.expert_ids_NK.reshape(-1), minlength=24)
    fused = (route.weights_NK, route.expert_ids_NK, route.load_balancing_loss_value(counts_E),
             route.z_loss_value())
    plain = _plain_route(torch.nn.functional.linear(x, router.weight), 3, True)
    assert torch.equal(fused[1], plain[1])
    grads = [torch.autograd.grad(_route_objective(out, upstream), (router.weight, x)) for out in (fused, plain)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fused_router_empty_input_and_missing_output_gradients():
    logits = torch.zeros(0, 5, requires_grad=True)
    route = route_logits(logits, 2, True)
    assert route.weights_NK.shape == route.expert_ids_NK.shape == (0, 2)
    lb = route.load_balancing_loss_value(torch.zeros(5, dtype=torch.long))
    z = route.z_loss_value()
    assert lb.item() == z.item() == 0.0
    (grad,) = torch.autograd.grad(lb + z + route.weights_NK.sum(), logits)
    assert grad.shape == (0, 5)
    # Only some outputs used: the unused ones contribute nothing.
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    for pick in range(3):
        fused = _fused_route(logits, 2, False)
        plain = _plain_route(logits, 2, False)
        term = [lambda o: o[0].square().sum(), lambda o: o[2], lambda o: o[3]][pick]
        (grad,) = torch.autograd.grad(term(fused), logits)
        (grad_ref,) = torch.autograd.grad(term(plain), logits)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13)


def test_fused_router_backward_twice_through_a_retained_graph():
    """The node keeps what its backward needs: a second backward gives the same gradient and
    leaves the first one untouched."""
    torch.manual_seed(0)
    logits = torch.randn(40, 24, requires_grad=True)
    route = route_logits(logits, 3, True)
    counts_E = torch.bincount(route.expert_ids_NK.reshape(-1), minlength=24)
    objective = ((route.weights_NK * torch.randn(40, 3)).sum()
                 + route.load_balancing_loss_value(counts_E) + route.z_loss_value())
    (first,) = torch.autograd.grad(objective, logits, retain_graph=True)
    first_copy = first.clone()
    (second,) = torch.autograd.grad(objective, logits)
    assert torch.equal(first, first_copy)
    assert torch.equal(first, second)


def test_fused_router_accepts_non_contiguous_logits():
    torch.manual_seed(0)
    logits_EN = torch.randn(24, 300, requires_grad=True)
    upstream = torch.randn(300, 3)
    fused = _fused_route(logits_EN.t(), 3, True)
    plain = _plain_route(logits_EN.t(), 3, True)
    assert torch.equal(fused[1], plain[1])
    (grad,) = torch.autograd.grad(_route_objective(fused, upstream), logits_EN)
    (grad_ref,) = torch.autograd.grad(_route_objective(plain, upstream), logits_EN)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
