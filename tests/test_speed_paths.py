"""The fast dispatch paths against the plain loop reference (correctness only, no timings)."""

from __future__ import annotations

import pytest
import torch

from mhmoe import MHMoE
from mhmoe.layers.experts import Experts, block_backward, block_forward, fused_up_weight

FAST_BACKENDS = ("blocked", "grouped")


def _grads(layer, x, forward):
    y, aux = forward(x)
    upstream = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    objective = (y * upstream).sum() + 0.1 * aux.load_balancing_loss + 0.01 * aux.z_loss
    return y, torch.autograd.grad(objective, [x] + list(layer.parameters()))


# Both regimes of the blocked path: hidden pre-activations kept, and recomputed (every backend
# against the reference, in float64, is tests/test_dispatch_backends.py).
HIDDEN_MODES = {"saved_hidden": Experts.save_hidden_max_bytes, "recomputed_hidden": 0}


@pytest.mark.parametrize("hidden_mode", list(HIDDEN_MODES))
@pytest.mark.parametrize("implementation", FAST_BACKENDS)
@pytest.mark.parametrize("num_heads,num_experts,top_k,d_expert", [(1, 8, 1, 64), (3, 24, 3, 32), (2, 10, 2, 48)])
def test_float32_paths_match_reference(hidden_mode, implementation, num_heads, num_experts, top_k, d_expert):
    torch.manual_seed(3)
    layer = MHMoE(d_model=48, num_heads=num_heads, num_experts=num_experts, top_k=top_k,
                  d_expert=d_expert, shared_d_ff=40)
    layer.experts.implementation = implementation
    layer.experts.save_hidden_max_bytes = HIDDEN_MODES[hidden_mode]
    x = torch.randn(3, 57, 48, requires_grad=True)
    y_fast, grads_fast = _grads(layer, x, layer.forward)
    y_ref, grads_ref = _grads(layer, x, layer.forward_reference)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_blocked_path_is_the_cpu_default_and_grouped_under_compile():
    layer = MHMoE(d_model=8, num_heads=2, num_experts=3, top_k=1, d_expert=4)
    x = torch.randn(2, 4)
    assert layer.experts.resolve_implementation(x) == "blocked"
    many = layer.experts.blocked_min_rows_per_expert
    assert layer.experts.resolve_implementation(x, rows_per_expert=many) == "blocked"
    assert layer.experts.resolve_implementation(x, rows_per_expert=many - 1) == "grouped"
    layer.experts.blocked_min_rows_per_expert = 0  # an attribute per layer, not a module constant
    assert layer.experts.resolve_implementation(x, rows_per_expert=1) == "blocked"
    layer.experts.implementation = "grouped"
    assert layer.experts.resolve_implementation(x) == "grouped"
    layer.experts.implementation = "fast"
    with pytest.raises(ValueError, match="implementation='fast'"):
        layer.experts.resolve_implementation(x)
    layer.experts.implementation = None
    layer.experts.use_grouped_mm = False  # an explicit grouped-path setting selects it
    assert layer.experts.resolve_implementation(x) == "grouped"


def test_subclass_with_own_forward_is_not_bypassed():
    """BitNet's BitExperts overrides forward: the blocked path (raw w1/w3/w2) must not run."""

    class ScaledExperts(Experts):
        def forward(self, x_MS, offsets_E, counts_E=None):
            return 2 * super().forward(x_MS, offsets_E, counts_E)

    torch.manual_seed(0)
    layer = MHMoE(d_model=8, num_heads=2, num_experts=3, top_k=2, d_expert=4).double()
    y, _ = layer(torch.ones(5, 8, dtype=torch.float64))
    scaled = ScaledExperts(3, 4, 4).double()
    scaled.load_state_dict(layer.experts.state_dict())
    layer.experts = scaled
    assert scaled.resolve_implementation(torch.ones(1)) == "grouped"
    y2, _ = layer(torch.ones(5, 8, dtype=torch.float64))
    torch.testing.assert_close(y2, 2 * y)
    scaled.implementation = "blocked"  # asked for explicitly: refused, not silently bypassed
    with pytest.raises(ValueError, match="implementation='blocked': reads the raw stacked weights"):
        layer(torch.ones(5, 8, dtype=torch.float64))


@pytest.mark.parametrize("implementation", FAST_BACKENDS)
def test_no_grad_inputs_and_inference(implementation):
    """Inputs without grad (no head layer, frozen weights) and no_grad inference both work."""
    torch.manual_seed(0)
    layer = MHMoE(d_model=12, num_heads=1, num_experts=4, top_k=2, d_expert=8,
                  head_layer=False, merge_layer=False).double()
    layer.experts.implementation = implementation
    x = torch.randn(9, 12, dtype=torch.float64)  # no grad on x
    y, aux = layer(x)
    y.sum().backward()
    ref_layer = MHMoE(d_model=12, num_heads=1, num_experts=4, top_k=2, d_expert=8,
                      head_layer=False, merge_layer=False).double()
    ref_layer.load_state_dict(layer.state_dict())
    y_ref, _ = ref_layer.forward_reference(x)
    y_ref.sum().backward()
    for p, q in zip(layer.parameters(), ref_layer.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], y_ref.detach(), rtol=1e-12, atol=1e-12)
    layer.router.weight.requires_grad_(False)  # combine weights without grad
    y, _ = layer(x)
    y.sum().backward()


@pytest.mark.parametrize("swiglu", [True, False])
def test_block_backward_equals_autograd(swiglu):
    torch.manual_seed(0)
    rows, d_in, d_hidden = 7, 5, 6
    x = torch.randn(rows, d_in, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(d_hidden, d_in, dtype=torch.float64, requires_grad=True)
    w3 = torch.randn(d_hidden, d_in, dtype=torch.float64, requires_grad=True) if swiglu else None
    w2 = torch.randn(d_in, d_hidden, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(rows, 1, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(rows, d_in, dtype=torch.float64)
    w_up = fused_up_weight(w1.unsqueeze(0), w3.unsqueeze(0) if swiglu else None)[0]  # (G, S)
    y, hidden = block_forward(x, w_up, w2, swiglu)
    expected = torch.autograd.grad((y * weight * grad).sum(), [x, w_up, w2, weight])
    for h in (None, hidden.detach()):
        g_up, g_w2, g_x = torch.empty_like(w_up), torch.empty_like(w2), torch.empty_like(x)
        with torch.no_grad():
            g_weight = block_backward(x, grad, weight, w_up, w2, swiglu, g_up, g_w2, g_x, h_rG=h)
        for got, want in zip([g_x, g_up, g_w2, g_weight.unsqueeze(1)], expected):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_bench_peers_compute_the_same_layer():
    """The benchmark's peers (loop, GShard with ample capacity, HF when installed) compute
    our layer's output on copied weights, inside the layer's own head/split/merge and shared
    expert."""
    from mhmoe import bench

    torch.manual_seed(0)
    layer = MHMoE(d_model=24, num_heads=3, num_experts=6, top_k=2, d_expert=16, shared_d_ff=8)
    x = torch.randn(40, 24)
    y_ours, _ = layer(x)
    peers = ["loop", "grouped"] + [p for p in ("hf_eager", "hf_grouped_mm") if bench.hf_available(bench.HF_IMPLEMENTATIONS[p])]
    for name in peers:
        out = bench.build_peer(name, layer)(x)
        y = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(y, y_ours, rtol=1e-4, atol=1e-5, msg=name)
    gshard = bench.build_peer("gshard", layer, capacity_factor=100.0, group_size=16)
    torch.testing.assert_close(gshard(x), y_ours, rtol=1e-4, atol=1e-5)


def test_layer_under_torch_compile_matches_eager():
    """torch.compile (aot_eager: no C++ toolchain needed) of the whole layer, forward and
    backward, equals eager; under compile the experts take the "grouped" path."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = MHMoE(d_model=24, num_heads=3, num_experts=6, top_k=2, d_expert=16)
    x = torch.randn(2, 10, 24, requires_grad=True)
    y_eager, grads_eager = _grads(layer, x, layer.forward)
    compiled = torch.compile(layer, backend="aot_eager")
    y_compiled, grads_compiled = _grads(layer, x, compiled)
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # float32: the segment-loop fallback breaks the graph at the row counts (documented).
    breaks = torch._dynamo.explain(layer)(x).break_reasons
    assert breaks and all("_local_scalar_dense" in b.reason for b in breaks)
    # bfloat16 takes torch._grouped_mm: the whole layer is one graph, no break.
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer.to(torch.bfloat16))(x.detach().to(torch.bfloat16))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
