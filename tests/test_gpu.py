"""GPU checks (CUDA): the bf16 layers against float64 references, ``torch._grouped_mm`` and
its alignment fallback, no host sync in the MoE forward, training with bf16 autocast (loss
falls, stop + ``--resume`` bit-identical), HF export and cached generation, ``torch.compile``
without a graph break, one-process NCCL with ``--dp fsdp --ep 1``.

Every test is marked ``gpu``: collected always, deselected by default (pyproject's addopts),
run with ``pytest -m gpu`` and skipped there without a CUDA device. ``benchmarks/gpu_check.py``
runs them first and records each outcome in its report (docs/gpu.md).

Tolerances are relative Frobenius errors ||out - ref|| / ||ref|| against a float64 reference
computed from the *same* (bf16-rounded) weights and inputs, so only the arithmetic differs:

* bf16 compute: 8-bit significands, unit roundoff 2^-9 ~ 2e-3. A layer's forward rounds about
  four times in a chain (head, up projection, activation, down projection, merge; matmuls
  accumulate in float32), so a few 1e-3 are expected: the bound is ``BF16_FORWARD`` = 2e-2.
  Gradients chain about twice as many roundings: ``BF16_BACKWARD`` = 4e-2. A wrong expert,
  a missed row or a wrong weight gives errors of order 1, far above both.
* float32 compute: ``FP32`` = 1e-4; float32 matmuls land near 1e-6, TF32 (10-bit significands)
  near 3e-4, so the bound also catches TF32 being switched on behind our back.

Routing is a discontinuous function: bf16 rounding of a sub-token can flip a near-tied top-k
choice, which changes that row by O(1). The references therefore route with the expert ids
the layer under test chose (``forced_routing``) and the tests check separately that those ids
agree with the reference's own routing almost everywhere (``ROUTING_AGREEMENT``).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mhmoe.cli import main
from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.experts import (
    grouped_mm,
    grouped_mm_aligned,
    grouped_mm_supported,
    segment_mm,
    select_backend,
)
from mhmoe.layers.mh_moe import build_ffn
from mhmoe.layers.moe import reference_compute, routing_aux, sort_assignments
from mhmoe.layers.routing import RouterOutput
from mhmoe.planning.variants import paper_variants
from mhmoe.runs.checkpoint import load_run
from mhmoe.runs.metrics import read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = "cuda"
BF16_FORWARD = 2e-2
BF16_BACKWARD = 4e-2
FP32 = 1e-4
# Share of routed units whose top-k ids under bf16 equal the float64 layer's own choice: a
# flip needs a gap between two router probabilities below the bf16 rounding of the input
# (~2^-9 relative), which random inputs give for well under 1% of the units.
ROUTING_AGREEMENT = 0.97
D_MODEL = 192  # the mini preset's width: every expert shape is 16-byte aligned in bf16
TOKENS = 1024


def layer_configs() -> dict[str, DenseConfig | MoEConfig]:
    """Every variant of the issue: the paper's five, shared expert, capacity on (the others
    run with capacity off, dropless)."""
    base = paper_variants(D_MODEL)
    shared = paper_variants(D_MODEL, shared_expert=True)
    return {
        **base,
        "smoe_shared": shared["smoe"],
        "mhmoe_h3_shared": shared["mhmoe_h3"],
        "smoe_capacity": base["smoe"].replace(capacity_factor=1.25),
        "mhmoe_h3_capacity": base["mhmoe_h3"].replace(capacity_factor=1.25),
    }


CONFIGS = layer_configs()
DROPLESS = [name for name, cfg in CONFIGS.items() if isinstance(cfg, MoEConfig) and cfg.capacity_factor is None]


def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().double(), reference.detach().double()
    assert torch.isfinite(value).all(), "non-finite values"
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


def forced_routing(expert_ids_NK: torch.Tensor):
    """A dispatch for ``MHMoE.forward_with_dispatch``: the plain reference dispatch (softmax,
    the chosen probabilities, renormalised as the router does; the capacity rule; the
    per-expert loop ``reference_compute``; the plain loss formulas) with fixed expert ids."""

    def dispatch(x_NS, router, experts, capacity_factor):
        logits_NE = F.linear(x_NS, router.weight)
        probs_NE = torch.softmax(logits_NE, dim=-1)
        ids_NK = expert_ids_NK.to(x_NS.device)
        weights_NK = probs_NE.gather(1, ids_NK)
        if router.normalize_top_k:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        route = RouterOutput(logits_NE, probs_NE, weights_NK, ids_NK)
        kept_order_R, kept_counts_E, tokens_per_expert_E = sort_assignments(
            ids_NK, router.num_experts, capacity_factor)
        y_NS = reference_compute(x_NS, weights_NK, kept_order_R, kept_counts_E, experts)
        return y_NS, routing_aux(route, tokens_per_expert_E, kept_order_R.numel(), capacity_factor)

    return dispatch


def objective(out, upstream: torch.Tensor) -> torch.Tensor:
    """The training objective's shape: output against an upstream gradient, plus the routing
    losses (so their gradients are checked too)."""
    if isinstance(out, tuple):
        y, aux = out
        return (y.double() * upstream).sum() + 0.1 * aux.load_balancing_loss.double() + 0.01 * aux.z_loss.double()
    return (out.double() * upstream).sum()


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, forward=None):
    """(output, aux or None, {name: grad} including the input's as "x")."""
    x = x.detach().clone().requires_grad_(True)
    out = (forward if forward is not None else layer)(x)
    objective(out, upstream).backward()
    y, aux = out if isinstance(out, tuple) else (out, None)
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in layer.named_parameters()})
    return y.detach(), aux, grads


def check_against_float64(name: str, dtype: torch.dtype, forward_tol: float, backward_tol: float,
                          config=None, tokens: int = TOKENS) -> dict[str, float]:
    """The CUDA layer in ``dtype`` against the float64 layer with the same weights and inputs
    (routing forced to the tested layer's choice); returns the errors it checked."""
    torch.manual_seed(0)
    config = config or CONFIGS[name]
    layer = build_ffn(config).to(CUDA, dtype)
    x = torch.randn(tokens, config.d_model, device=CUDA).to(dtype)
    upstream = torch.randn(tokens, config.d_model, device=CUDA, dtype=torch.float64)
    reference_layer = copy.deepcopy(layer).double()
    y, aux, grads = forward_backward(layer, x, upstream)
    if aux is None:  # dense: nothing routed
        forward = None
    else:
        ids = aux.expert_ids
        own = reference_layer(x.double())[1].expert_ids
        agreement = float((own == ids).all(dim=1).double().mean())
        assert agreement >= ROUTING_AGREEMENT, f"{name}: routing agrees on only {agreement:.3f} of the units"
        forward = functools.partial(reference_layer.forward_with_dispatch, dispatch=forced_routing(ids))
    y_ref, aux_ref, grads_ref = forward_backward(reference_layer, x.double(), upstream, forward)
    errors = {"y": rel_error(y, y_ref)}
    assert errors["y"] <= forward_tol, f"{name} {dtype}: output error {errors['y']:.2e} > {forward_tol}"
    if aux is not None:  # the fused router statistics against the plain formulas
        errors["load_balancing_loss"] = rel_error(aux.load_balancing_loss, aux_ref.load_balancing_loss)
        assert errors["load_balancing_loss"] <= forward_tol
    for key, grad_ref in grads_ref.items():
        assert grads[key] is not None, f"{name}: no gradient for {key}"
        errors[key] = rel_error(grads[key], grad_ref)
        assert errors[key] <= backward_tol, f"{name} {dtype}: gradient {key} error {errors[key]:.2e} > {backward_tol}"
    return errors


# ---------------------------------------------------------------------------------------------
# Layers: bf16 (and float32) on CUDA against float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bf16_layer_forward_and_backward_match_float64(name):
    check_against_float64(name, torch.bfloat16, BF16_FORWARD, BF16_BACKWARD)


@pytest.mark.parametrize("name", ["dense", "smoe", "mhmoe_h3", "mhmoe_h3_capacity"])
def test_float32_layer_forward_and_backward_match_float64(name):
    check_against_float64(name, torch.float32, FP32, FP32)


def test_bf16_under_autocast_matches_float64():
    """The training configuration: float32 weights, bf16 autocast. The SMoE's rows come in
    float32 (no head layer) and must still take the bf16 grouped matmul."""
    torch.manual_seed(0)
    layer = build_ffn(CONFIGS["smoe"]).to(CUDA)
    x = torch.randn(TOKENS, D_MODEL, device=CUDA)
    upstream = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=torch.float64)
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        y, aux, grads = forward_backward(layer, x, upstream)
    assert y.dtype == torch.bfloat16
    reference_layer = copy.deepcopy(layer).double()
    forward = functools.partial(reference_layer.forward_with_dispatch, dispatch=forced_routing(aux.expert_ids))
    y_ref, _, grads_ref = forward_backward(reference_layer, x.double(), upstream, forward)
    assert rel_error(y, y_ref) <= BF16_FORWARD
    for key, grad_ref in grads_ref.items():
        assert rel_error(grads[key], grad_ref) <= BF16_BACKWARD, key


# ---------------------------------------------------------------------------------------------
# torch._grouped_mm and its fallbacks
# ---------------------------------------------------------------------------------------------


def test_grouped_mm_is_the_bf16_cuda_path_and_unaligned_shapes_fall_back(monkeypatch):
    assert select_backend(build_ffn(CONFIGS["smoe"]).experts, torch.empty(1, device=CUDA)) == "grouped"
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("torch._grouped_mm's bf16 kernel needs sm90+")
    assert grouped_mm_supported(CUDA, torch.bfloat16)
    calls = []
    real = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts = [3, 0, 5, 1, 0, 7]  # empty experts included
    offsets = torch.cumsum(torch.tensor(counts, device=CUDA), 0).to(torch.int32)
    torch.manual_seed(0)
    for d_in, d_out, aligned in ((16, 24, True), (10, 20, False), (24, 12, False)):
        x = torch.randn(sum(counts), d_in, device=CUDA).to(torch.bfloat16).requires_grad_(True)
        w = torch.randn(len(counts), d_out, d_in, device=CUDA).to(torch.bfloat16).requires_grad_(True)
        assert grouped_mm_aligned(x, w) is aligned
        calls.clear()
        y = grouped_mm(x, w, offsets)
        assert len(calls) == (1 if aligned else 0)
        x64 = x.detach().double().requires_grad_(True)
        w64 = w.detach().double().requires_grad_(True)
        y64 = segment_mm(x64, w64, counts)
        upstream = torch.randn_like(y64)
        (y.double() * upstream).sum().backward()
        (y64 * upstream).sum().backward()
        assert rel_error(y, y64) <= BF16_FORWARD  # one bf16 rounding of a float32 sum
        assert rel_error(x.grad, x64.grad) <= BF16_FORWARD
        assert rel_error(w.grad, w64.grad) <= BF16_FORWARD


def test_unaligned_layer_falls_back_and_matches_float64():
    # Sub-tokens of 10 and experts of 30 in bf16: 20- and 60-byte rows, not 16-byte aligned.
    config = MoEConfig(d_model=30, num_heads=3, num_experts=4, top_k=2, d_expert=30,
                       head_layer=True, merge_layer=True)
    check_against_float64("unaligned", torch.bfloat16, BF16_FORWARD, BF16_BACKWARD, config=config, tokens=256)


# ---------------------------------------------------------------------------------------------
# No host sync in the MoE forward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
@pytest.mark.parametrize("name", DROPLESS)
def test_moe_forward_makes_no_host_sync(name, precision):
    """No ``.item()``, ``.tolist()``, data-dependent shape or blocking copy in the forward:
    ``torch.cuda.set_sync_debug_mode("error")`` raises on any synchronising CUDA call.
    (Capacity dropping keeps a data-dependent number of rows, one sync per layer: not here.)"""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    layer = build_ffn(CONFIGS[name]).to(CUDA, dtype)
    x = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=dtype)
    autocast = torch.autocast(CUDA, dtype=torch.bfloat16, enabled=precision == "autocast")
    with autocast:
        layer(x)  # warm-up: the grouped-mm probe, cuBLAS handles, lazy module state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with autocast:
            out = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(y.float()).all()


@pytest.mark.parametrize("name", ["smoe", "fine_grained", "mhmoe_h3"])
def test_moe_backward_makes_no_host_sync(name):
    torch.manual_seed(0)
    layer = build_ffn(CONFIGS[name]).to(CUDA, torch.bfloat16)
    x = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    upstream = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=torch.float64)
    objective(layer(x), upstream).backward()  # warm-up
    loss = objective(layer(x), upstream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x.grad.float()).all()


# ---------------------------------------------------------------------------------------------
# Training on CUDA: bf16 autocast, resume, export, NCCL
# ---------------------------------------------------------------------------------------------

WORDS = (
    "the a model expert router token head merge layer sparse dense mixture of heads learns "
    "routes each sub token to experts and merges them back into one vector per position"
).split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gpu_corpus")
    rng = random.Random(0)
    for index in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(60)]
        (folder / f"doc{index:02d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_data")


def train_args(corpus: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--variant", "mhmoe_h2", "--data", str(corpus),
            "--data-dir", str(data_dir), "--device", "cuda", "--precision", "bf16", "--quiet",
            "--eval-tokens", "512", "--out", str(out), *extra]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def cuda_run(corpus, data_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu_runs") / "h2"
    assert main(train_args(corpus, data_dir, out, "--max-steps", "40")) == 0
    return out


def test_training_on_cuda_with_bf16_autocast_lowers_the_loss(cuda_run):
    config = json.loads((cuda_run / "config.json").read_text())
    assert config["train"]["precision"] == "bf16" and config["train"]["device"] == "cuda"
    values = losses(cuda_run)
    assert len(values) == 40 and all(math.isfinite(v) for v in values)  # logged every step
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.5
    evals = [r for r in read_metrics(cuda_run / "metrics.jsonl") if "eval/heldout/ppl" in r]
    assert evals and 1.0 < evals[-1]["eval/heldout/ppl"] < float(config["model"]["vocab_size"])


# One process, deterministic kernels (CUDA's atomics-based backward kernels, e.g. attention's,
# are not bit-reproducible run to run; resumption is only testable bit for bit without them).
RESUME_CHILD = r"""
import json, sys
import torch
torch.use_deterministic_algorithms(True, warn_only=True)
from mhmoe.cli import main
from mhmoe.runs.metrics import read_metrics
common, root = json.loads(sys.argv[1]), sys.argv[2]
def losses(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(f"{root}/{run}/metrics.jsonl") if "loss" in r]
codes = [main(common + ["--out", f"{root}/full", "--max-steps", "8"]),
         main(common + ["--out", f"{root}/split", "--max-steps", "8", "--stop-at-step", "5"]),
         main(common + ["--out", f"{root}/split", "--max-steps", "8", "--resume"])]
print(json.dumps({"codes": codes, "full": losses("full"), "split": losses("split")}))
"""


def run_child(code: str, args: list[str], env: dict[str, str] | None = None, timeout: int = 600) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_stop_and_resume_on_cuda_is_bit_identical(corpus, data_dir, cuda_run, tmp_path):
    common = train_args(corpus, data_dir, tmp_path / "unused")[:-2]  # data cache built by cuda_run
    result = run_child(RESUME_CHILD, [json.dumps(common), str(tmp_path)],
                       env={"CUBLAS_WORKSPACE_CONFIG": ":4096:8"})
    assert result["codes"] == [0, 0, 0]
    assert [s for s, _, _ in result["full"]] == list(range(1, 9))
    assert result["split"] == result["full"]  # bit-identical losses and gradient norms


def test_hf_export_and_generate_on_cuda(cuda_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    import mhmoe.hf

    mhmoe.hf.register()
    export = tmp_path / "export"
    assert main(["export", str(cuda_run), str(export)]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(export).to(CUDA)
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    inputs = tokenizer(["The expert", "Each sub token routes to"], return_tensors="pt", padding=True).to(CUDA)
    cached = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=16, do_sample=False, use_cache=False)
    assert cached.shape[1] == inputs["input_ids"].shape[1] + 16
    assert torch.equal(cached, uncached)
    # The exported model computes what the run's model computes, on the GPU too.
    run_model, run_tokenizer, _ = load_run(cuda_run)
    ids = torch.tensor([run_tokenizer.encode("The expert router")], device=CUDA)
    with torch.no_grad():
        assert rel_error(model(ids).logits, run_model.to(CUDA)(ids).logits) <= FP32


NCCL_CHILD = r"""
import json, sys
import torch
import torch.distributed as dist
from mhmoe.runs.metrics import read_metrics
from mhmoe.training.run import RunOptions, run_training
corpus, data_dir, root = sys.argv[1:4]
def options(out, **extra):
    return RunOptions(out=out, preset="tiny", variant="mhmoe_h2", data=[corpus], data_dir=data_dir,
                      max_steps=4, device="cuda", precision="bf16", quiet=True, eval_tokens=512, **extra)
run_training(options(f"{root}/single"))
dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
try:
    result = run_training(options(f"{root}/fsdp", dp="fsdp", ep=1))
    backend = dist.get_backend()
    dtensors = sum(type(p).__name__ == "DTensor" for p in result.model.parameters())
finally:
    dist.destroy_process_group()
def steps(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(f"{root}/{run}/metrics.jsonl") if "loss" in r]
print(json.dumps({"backend": backend, "dtensors": dtensors, "single": steps("single"), "fsdp": steps("fsdp")}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_nccl_fsdp_training_equals_single_process(corpus, data_dir, cuda_run, tmp_path):
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
           "LOCAL_RANK": "0"}
    result = run_child(NCCL_CHILD, [str(corpus), str(data_dir), str(tmp_path)], env=env, timeout=300)
    assert result["backend"] == "nccl"
    assert result["dtensors"] > 0  # FSDP2 sharded the parameters (over one rank)
    single, fsdp = result["single"], result["fsdp"]
    assert [s for s, _, _ in fsdp] == [1, 2, 3, 4]
    # Step 1 sees the same weights and batch: equal up to float32 summation order.
    assert fsdp[0][1] == pytest.approx(single[0][1], rel=1e-5)
    # Later steps: the same updates up to bf16 rounding of the (non-deterministic) backward.
    for (_, loss, norm), (_, loss_ref, norm_ref) in zip(fsdp, single, strict=True):
        assert loss == pytest.approx(loss_ref, rel=2e-2)
        assert norm == pytest.approx(norm_ref, rel=5e-2)


# ---------------------------------------------------------------------------------------------
# torch.compile (last: inductor's compilation is the slowest part of this file)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smoe", "mhmoe_h3"])
def test_bf16_layer_traces_as_one_graph(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = build_ffn(CONFIGS[name]).to(CUDA, torch.bfloat16)
    x = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=torch.bfloat16)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_compiled_bf16_layer_matches_eager():
    """Inductor (Triton kernels, ``fullgraph=True``: a graph break raises) on MH-MoE h=3,
    forward and backward, against eager."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = build_ffn(CONFIGS["mhmoe_h3"]).to(CUDA, torch.bfloat16)
    x = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=torch.bfloat16)
    compiled = torch.compile(copy.deepcopy(layer), fullgraph=True)
    upstream = torch.randn(TOKENS, D_MODEL, device=CUDA, dtype=torch.float64)
    y_eager, aux_eager, grads_eager = forward_backward(layer, x, upstream)
    y_comp, aux_comp, grads_comp = forward_backward(compiled._orig_mod, x, upstream, forward=compiled)
    same_rows = (aux_comp.expert_ids == aux_eager.expert_ids).reshape(TOKENS, -1).all(dim=1)
    assert float(same_rows.double().mean()) >= ROUTING_AGREEMENT
    # Both are bf16 computations with different fusions: compare on the rows routed alike.
    assert rel_error(y_comp[same_rows], y_eager[same_rows]) <= BF16_FORWARD
    if bool(same_rows.all()):  # weight gradients sum over all rows: only when all agree
        for key, grad in grads_comp.items():
            assert rel_error(grad, grads_eager[key]) <= BF16_BACKWARD, key
