"""Every dispatch backend against the plain reference (``forward_reference``), in float64,
forward and backward: one property test over the registry (full-precision and BitNet experts),
and the expert-parallel backend on 2 gloo processes."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from mhmoe import MHMoE, MoEConfig
from mhmoe.bitnet.convert import to_bitnet
from mhmoe.distributed.expert_parallel import ExpertParallelDispatch, install_dispatch, shard_experts
from mhmoe.layers.experts import DISPATCH_BACKENDS, DispatchBackend, Experts, select_backend

AUX_VALUES = ("load_balancing_loss", "z_loss", "dropped_fraction")
AUX_COUNTS = ("tokens_per_expert", "expert_ids")


def run_layer(layer: MHMoE, x: torch.Tensor, forward, materialize: bool = False) -> dict:
    """Output, aux and the gradients of x and of every parameter (by name) of one objective
    that uses the output and both losses."""
    y, aux = forward(x)
    upstream = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    objective = (y * upstream).sum() + 0.1 * aux.load_balancing_loss + 0.01 * aux.z_loss
    names, params = zip(*layer.named_parameters())
    # materialize: a rank without tokens leaves the experts out of its reference graph.
    grads = torch.autograd.grad(objective, [x, *params], allow_unused=materialize,
                                materialize_grads=materialize)
    return {"y": y.detach(), **{k: getattr(aux, k).detach() for k in AUX_VALUES + AUX_COUNTS},
            "grads": dict(zip(("x", *names), grads))}


def assert_same_run(got: dict, want: dict, what: str, grads: dict | None = None) -> None:
    torch.testing.assert_close(got["y"], want["y"], rtol=1e-12, atol=1e-12, msg=lambda m: f"{what} y: {m}")
    for key in AUX_VALUES:
        torch.testing.assert_close(got[key], want[key].to(got[key].dtype), rtol=1e-12, atol=1e-14,
                                   msg=lambda m: f"{what} {key}: {m}")
    for key in AUX_COUNTS:
        assert torch.equal(got[key], want[key]), f"{what} {key}"
    grads = want["grads"] if grads is None else grads
    assert got["grads"].keys() == grads.keys(), what
    for name, grad in grads.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{what} grad {name}: {m}")


@settings(max_examples=40, deadline=None)
@given(
    num_heads=st.integers(1, 3),
    top_k=st.integers(1, 4),
    num_experts=st.integers(1, 12),
    num_tokens=st.integers(1, 17),
    shared=st.booleans(),
    head=st.booleans(),
    merge=st.booleans(),
    activation=st.sampled_from(["swiglu", "relu"]),
    bias=st.booleans(),
    capacity_factor=st.sampled_from([None, None, 0.25, 0.5, 1.0, 1.5]),
    save_hidden=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_every_registered_backend_equals_forward_reference_float64(
    num_heads, top_k, num_experts, num_tokens, shared, head, merge, activation, bias,
    capacity_factor, save_hidden, seed,
):
    """Each backend in ``DISPATCH_BACKENDS`` (whatever is registered, and the automatic choice)
    on full-precision experts and on BitNet's quantised experts, against the same layer's
    ``forward_reference``: output, aux losses and counts, the input gradient and every
    parameter gradient. Backends that read the raw weights must refuse quantised experts."""
    assert {"grouped", "blocked", "reference"} <= DISPATCH_BACKENDS.keys()
    top_k = min(top_k, num_experts)
    torch.manual_seed(seed)
    config = MoEConfig(
        d_model=8 * num_heads, num_experts=num_experts, top_k=top_k, d_expert=6,
        num_heads=num_heads, head_layer=head, merge_layer=merge,
        shared_d_ff=5 if shared else None, activation=activation, bias=bias,
        capacity_factor=capacity_factor,
    )
    layer = MHMoE(config).double()
    # Both regimes of the blocked backend: hidden pre-activations kept or recomputed.
    layer.experts.save_hidden_max_bytes = Experts.save_hidden_max_bytes if save_hidden else 0
    quantised = to_bitnet(copy.deepcopy(layer))
    # The quantised-experts path: their own forward, through the grouped backend.
    assert select_backend(quantised.experts, torch.zeros(1)) == "grouped"
    x = torch.randn(num_tokens, 8 * num_heads, dtype=torch.float64, requires_grad=True)
    for kind, tested in (("full precision", layer), ("bitnet", quantised)):
        want = run_layer(tested, x, tested.forward_reference)
        for name in (None, *DISPATCH_BACKENDS):  # None: the per-call automatic choice
            tested.experts.implementation = name
            if kind == "bitnet" and name is not None and DISPATCH_BACKENDS[name].reads_raw_weights:
                with pytest.raises(ValueError, match=f"implementation='{name}': reads the raw"):
                    tested(x)
                continue
            assert_same_run(run_layer(tested, x, tested.forward), want, f"{kind} / {name}")


def test_a_backend_registered_later_is_run_by_name():
    """The registry is the seam: a new entry is selectable by name and gets the one signature."""
    calls = []

    def counting_reference(x_NS, weights_NK, kept_order_R, kept_counts_E, experts):
        calls.append((x_NS.shape, weights_NK.shape, int(kept_counts_E.sum()), kept_order_R.numel()))
        return DISPATCH_BACKENDS["reference"].compute(x_NS, weights_NK, kept_order_R, kept_counts_E, experts)

    torch.manual_seed(0)
    layer = MHMoE(d_model=12, num_heads=3, num_experts=5, top_k=2, d_expert=4).double()
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    DISPATCH_BACKENDS["counting_reference"] = DispatchBackend(counting_reference)
    try:
        layer.experts.implementation = "counting_reference"
        assert_same_run(run_layer(layer, x, layer.forward),
                        run_layer(layer, x, layer.forward_reference), "counting_reference")
    finally:
        del DISPATCH_BACKENDS["counting_reference"]
    assert calls == [((12, 4), (12, 2), 24, 24)]  # N = 4 tokens * 3 heads, M = N * 2 kept
    with pytest.raises(ValueError, match="implementation='counting_reference': must be one of"):
        layer(x)


# ---------------------------------------------------------------------------------------------
# Expert parallelism: 2 gloo ranks, each holding half the experts
# ---------------------------------------------------------------------------------------------

WORLD = 2
# (MoEConfig fields, tokens on rank 0, tokens on rank 1); 4 experts, 2 per rank.
EP_CASES = [
    (dict(num_heads=1, top_k=1, head_layer=False, merge_layer=False), 3, 2),
    (dict(num_heads=2, top_k=2, shared_d_ff=6, bias=True), 4, 1),
    (dict(num_heads=3, top_k=3, capacity_factor=0.5), 2, 3),
    (dict(num_heads=2, top_k=1, capacity_factor=1.25, head_layer=False), 3, 0),  # rank 1 empty
    (dict(num_heads=3, top_k=2, activation="relu", merge_layer=False), 1, 1),
    (dict(num_heads=1, top_k=1), 1, 0),  # one unit in all: one rank's experts get no row
]


def ep_layer(case: int) -> MHMoE:
    fields = EP_CASES[case][0]
    torch.manual_seed(case)
    config = MoEConfig(d_model=8 * fields["num_heads"], num_experts=4, d_expert=6, **fields)
    return MHMoE(config).double()


def ep_input(case: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(100 * case + rank)
    tokens = EP_CASES[case][1 + rank]
    d_model = 8 * EP_CASES[case][0]["num_heads"]
    return torch.randn(tokens, d_model, generator=generator, dtype=torch.float64, requires_grad=True)


def _ep_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: every EP case through the expert-parallel backend, saved to rank{rank}.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = []
        for case in range(len(EP_CASES)):
            layer = ep_layer(case)
            shard_experts(layer.experts, WORLD, rank)
            install_dispatch(layer, ExpertParallelDispatch(dist.group.WORLD, WORLD, rank))
            results.append(run_layer(layer, ep_input(case, rank), layer.forward))
    finally:
        dist.destroy_process_group()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_expert_parallel_backend_equals_forward_reference_float64(tmp_path):
    """Per rank: output, aux, input and router/head/merge/shared gradients equal that rank's
    ``forward_reference`` with all experts; the local experts' gradients equal their slice of
    the reference gradient summed over both ranks' objectives (the rows of both ranks pass
    through them)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(_ep_worker, args=(port, str(tmp_path)), nprocs=WORLD, start_method="spawn",
                       join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD)]
    for case in range(len(EP_CASES)):
        layer = ep_layer(case)
        wants = [run_layer(layer, ep_input(case, rank), layer.forward_reference, materialize=True)
                 for rank in range(WORLD)]
        for rank, want in enumerate(wants):
            grads = {
                name: sum(w["grads"][name] for w in wants).chunk(WORLD)[rank]
                if name.startswith("experts.") else grad
                for name, grad in want["grads"].items()
            }
            assert_same_run(results[rank][case], want, f"EP case {case} rank {rank}", grads)


def test_every_backend_runs_under_cpu_bfloat16_autocast():
    """CPU bf16 autocast (``--precision bf16``): every backend computes in bfloat16 like the
    grouped one, gives float32 gradients to the float32 weights, and agrees with the grouped
    backend to bfloat16 rounding. The blocked backend used to fail here (float32 weights beside
    bfloat16 activations inside its Function)."""
    torch.manual_seed(0)
    layer = MHMoE(d_model=24, num_heads=3, num_experts=5, top_k=2, d_expert=16)
    x = torch.randn(64, 24)
    results = {}
    for name in DISPATCH_BACKENDS:
        layer.experts.implementation = name
        layer.zero_grad()
        x_leaf = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, aux = layer(x_leaf)
        y.float().square().mean().backward()
        assert y.dtype == torch.bfloat16, name
        assert layer.experts.w1.grad.dtype == torch.float32, name
        results[name] = (y.float(), x_leaf.grad, layer.experts.w1.grad.clone(), layer.experts.w2.grad.clone())
    for name, (y, grad_x, grad_w1, grad_w2) in results.items():
        want_y, want_x, want_w1, want_w2 = results["grouped"]
        torch.testing.assert_close(y, want_y, rtol=2e-2, atol=2e-2, msg=name)
        for got, want in ((grad_x, want_x), (grad_w1, want_w1), (grad_w2, want_w2)):
            assert (got - want).abs().max() <= 0.05 * want.abs().max(), name
