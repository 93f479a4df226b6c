"""Wall-clock benchmarks of the layer family against peers, and of end-to-end training.

    mhmoe bench layers                        # d_model 192, 16384 tokens, all variants and peers
    mhmoe bench layers --d-model 192 768 --tokens 4096 16384 --json out.json
    mhmoe bench e2e --preset mini             # training tokens/s of the five variants

Layer benchmark. For every (d_model, tokens) shape, the paper's five variants
(``mhmoe.parity.paper_variants``: dense, SMoE 8 x (8/3)d top-1, fine-grained 16 x (4/3)d top-2,
MH-MoE h=2 40 x d top-2, h=3 96 x (2/3)d top-3; SwiGLU) are built once, and every
implementation ("peer") runs forward + backward on the same input, the same upstream gradient
and the same weights (copied into the peer's layout):

* ``ours``: the layer as users get it (``MHMoE.forward``; on CPU the blocked dispatch, or the
  grouped one when experts get few rows: ``Experts.resolve_implementation``), with its
  load-balancing and z losses computed (the peers compute none: a handicap for ``ours``);
* ``grouped``: our ``"grouped"`` implementation: sort + ``torch._grouped_mm`` + index_copy +
  bmm under plain autograd (the straightforward implementation, the "before");
* ``loop``: the per-expert Python loop of HF transformers v4 MoE blocks (one-hot mask,
  ``torch.where`` per expert, gather, expert, ``index_add_``);
* ``hf_eager`` / ``hf_batched_mm`` / ``hf_grouped_mm``: HF transformers v5
  ``Qwen3MoeSparseMoeBlock`` with each ``experts_implementation`` (skipped when transformers
  is not installed or an implementation is missing); for MH-MoE the HF block is the MoE core
  between our head/split and merge;
* ``gshard``: GShard einsum dispatch with capacity (one-hot dispatch and combine tensors of
  shape (groups, group_size, E, C), top-k choices served in order), what the authors' code
  builds on; it drops assignments beyond capacity, so it does less expert work than the others.

The dense row (SwiGLU with the same active FLOPs per token as every MoE variant) is the
practical limit. Cases run round-robin (every round runs every case once, in a fixed order)
so that machine noise hits all of them alike; the report gives the median and the minimum
over rounds, ratios of medians, achieved GFLOP/s (active FLOPs x 3 for forward + backward,
``mhmoe.parity.count_flops``) against a large matmul measured in the same run, and the peak
tensor memory of one step (CUDA allocator stats on GPU, the profiler's allocation trace on
CPU).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.mh_moe import MHMoE, build_ffn

log = logging.getLogger(__name__)

VARIANTS = ("dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3")
PEERS = ("ours", "grouped", "loop", "hf_eager", "hf_batched_mm", "hf_grouped_mm", "gshard")
HF_IMPLEMENTATIONS = {"hf_eager": "eager", "hf_batched_mm": "batched_mm", "hf_grouped_mm": "grouped_mm"}


def variant_configs(d_model: int) -> dict[str, DenseConfig | MoEConfig]:
    """The paper's five FFN variants at ``d_model`` (expert sizes scale with d_model)."""
    from mhmoe.parity import paper_variants

    return dict(paper_variants(d_model))


# ---------------------------------------------------------------------------------------------
# Peers: each takes our layer (weights are copied, never shared) and returns y = f(x_TD)
# ---------------------------------------------------------------------------------------------


def _split_merge(layer: MHMoE, core: Callable[[torch.Tensor], torch.Tensor]):
    """head -> split -> core on (T*H, S) units -> unsplit -> merge, with our head/merge."""

    def forward(x_TD: torch.Tensor) -> torch.Tensor:
        num_tokens = x_TD.shape[0]
        x_hat_TD = layer.head(x_TD) if layer.head is not None else x_TD
        y_NS = core(x_hat_TD.reshape(num_tokens * layer.num_heads, layer.d_sub))
        y_TD = y_NS.reshape(num_tokens, layer.d_model)
        return layer.merge(y_TD) if layer.merge is not None else y_TD

    return forward


class LoopPeer(nn.Module):
    """The per-expert loop of HF transformers v4 MoE blocks (Mixtral/Qwen2-MoE pattern)."""

    def __init__(self, layer: MHMoE) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)

    def _core(self, x_NS: torch.Tensor) -> torch.Tensor:
        router, experts = self.layer.router, self.layer.experts
        route = router(x_NS)
        weights_NK = route.weights_NK.to(x_NS.dtype)
        y_NS = torch.zeros_like(x_NS)
        expert_mask_EKN = F.one_hot(route.expert_ids_NK, router.num_experts).permute(2, 1, 0)
        hit = torch.nonzero(expert_mask_EKN.sum(dim=(1, 2)) > 0).flatten().tolist()
        for expert in hit:
            rank_idx, unit_idx = torch.where(expert_mask_EKN[expert])
            out_rS = experts.forward_one(expert, x_NS[unit_idx])
            out_rS = out_rS * weights_NK[unit_idx, rank_idx, None]
            y_NS.index_add_(0, unit_idx, out_rS)
        return y_NS

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return _split_merge(self.layer, self._core)(x_TD)


def hf_available(implementation: str = "eager") -> bool:
    """Whether transformers v5's Qwen3-MoE block with this experts implementation is importable."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: F401
            Qwen3MoeSparseMoeBlock,
        )
    except Exception:  # ImportError, or an incompatible version
        return False
    return implementation == "eager" or implementation in ALL_EXPERTS_FUNCTIONS


class HFPeer(nn.Module):
    """HF transformers v5 ``Qwen3MoeSparseMoeBlock`` as the MoE core, our weights copied in.

    Same router semantics as ours: softmax over all experts, top-k, renormalised when k > 1.
    """

    def __init__(self, layer: MHMoE, implementation: str) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        if layer.experts.activation != "swiglu":
            raise ValueError("the HF Qwen3-MoE block has SwiGLU experts only")
        cfg = Qwen3MoeConfig(
            hidden_size=layer.d_sub,
            num_experts=layer.router.num_experts,
            num_experts_per_tok=layer.router.top_k,
            moe_intermediate_size=layer.experts.d_expert,
            norm_topk_prob=layer.router.normalize_top_k,
            hidden_act="silu",
        )
        cfg._experts_implementation = implementation
        self.layer = copy.deepcopy(layer)
        self.block = Qwen3MoeSparseMoeBlock(cfg)
        with torch.no_grad():
            self.block.gate.weight.copy_(layer.router.weight)
            self.block.experts.gate_up_proj.copy_(
                torch.cat([layer.experts.w1, layer.experts.w3], dim=1)  # (E, 2F, S)
            )
            self.block.experts.down_proj.copy_(layer.experts.w2)  # (E, S, F)
        self.block.to(dtype=layer.experts.w1.dtype, device=layer.experts.w1.device)

    def _core(self, x_NS: torch.Tensor) -> torch.Tensor:
        return self.block(x_NS.unsqueeze(0)).squeeze(0)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return _split_merge(self.layer, self._core)(x_TD)


class GShardPeer(nn.Module):
    """GShard-style einsum dispatch with capacity (Lepikhin et al. 2020; fairseq/torchscale MoE).

    Units are cut into groups of ``group_size``; per group each expert takes at most
    C = ceil(capacity_factor * group_size * K / E) assignments, first choices of all units
    before second choices. dispatch_GSEC (0/1) and combine_GSEC (gate weights) are dense
    one-hot tensors; expert inputs are einsum("gsec,gsm->egcm"), outputs are combined by
    einsum("gsec,egcm->gsm").
    """

    def __init__(self, layer: MHMoE, capacity_factor: float = 1.25, group_size: int = 512) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)
        self.capacity_factor = capacity_factor
        self.group_size = group_size

    def _core(self, x_NS: torch.Tensor) -> torch.Tensor:
        router, experts = self.layer.router, self.layer.experts
        num_units, d_unit = x_NS.shape
        num_experts, top_k = router.num_experts, router.top_k
        group = min(self.group_size, num_units)
        pad = (-num_units) % group
        route = router(x_NS)
        ids_NK, weights_NK = route.expert_ids_NK, route.weights_NK.to(x_NS.dtype)
        x_pad = F.pad(x_NS, (0, 0, 0, pad))
        num_groups = x_pad.shape[0] // group
        capacity = max(1, math.ceil(self.capacity_factor * group * top_k / num_experts))
        ids_GSK = F.pad(ids_NK, (0, 0, 0, pad), value=0).view(num_groups, group, top_k)
        w_GSK = F.pad(weights_NK, (0, 0, 0, pad)).view(num_groups, group, top_k)
        valid_GS1 = F.pad(x_NS.new_ones(num_units, 1), (0, 0, 0, pad)).view(num_groups, group, 1)
        dispatch = x_NS.new_zeros(num_groups, group, num_experts, capacity)
        combine = x_NS.new_zeros(num_groups, group, num_experts, capacity)
        filled_GE = torch.zeros(num_groups, 1, num_experts, dtype=torch.long, device=x_NS.device)
        for k in range(top_k):  # k-th choices after all (k-1)-th choices
            mask_GSE = F.one_hot(ids_GSK[..., k], num_experts) * valid_GS1.long()
            position_GSE = torch.cumsum(mask_GSE, dim=1) - 1 + filled_GE
            filled_GE = filled_GE + mask_GSE.sum(dim=1, keepdim=True)
            keep_GSE = mask_GSE * (position_GSE < capacity)
            slot_GSEC = F.one_hot(position_GSE.clamp(0, capacity - 1), capacity) * keep_GSE[..., None]
            dispatch = dispatch + slot_GSEC.to(x_NS.dtype)
            combine = combine + slot_GSEC.to(x_NS.dtype) * w_GSK[..., k, None, None]
        x_EGCS = torch.einsum("gsec,gsm->egcm", dispatch, x_pad.view(num_groups, group, d_unit))
        x_EMS = x_EGCS.reshape(num_experts, num_groups * capacity, d_unit)
        hidden = F.silu(torch.bmm(x_EMS, experts.w1.transpose(1, 2)))
        if experts.activation == "swiglu":
            hidden = hidden * torch.bmm(x_EMS, experts.w3.transpose(1, 2))
        else:
            hidden = F.relu(torch.bmm(x_EMS, experts.w1.transpose(1, 2)))
        y_EMS = torch.bmm(hidden, experts.w2.transpose(1, 2))
        y_EGCS = y_EMS.view(num_experts, num_groups, capacity, d_unit)
        y_GSS = torch.einsum("gsec,egcm->gsm", combine, y_EGCS)
        return y_GSS.reshape(-1, d_unit)[:num_units]

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return _split_merge(self.layer, self._core)(x_TD)


PEER_MEMORY_LIMIT_BYTES = 3 * 2**30
"""Peers whose big intermediate tensors would exceed this are skipped (reported as such)."""


def peer_memory_estimate(name: str, layer: nn.Module, tokens: int, element_size: int = 4,
                         gshard_capacity_factor: float = 1.25, gshard_group_size: int = 512) -> int:
    """Bytes of the largest intermediates a peer materialises (0 when nothing out of scale)."""
    if not isinstance(layer, MHMoE):
        return 0
    units = tokens * layer.num_heads
    experts = layer.experts
    if name == "hf_batched_mm":  # one gathered copy of the expert weights per assignment
        per_row = 3 * experts.d_expert * experts.d_in
        return units * layer.router.top_k * per_row * element_size
    if name == "gshard":  # dispatch and combine (G, S, E, C) and their one-hot temporaries
        group = min(gshard_group_size, units)
        capacity = math.ceil(gshard_capacity_factor * group * layer.router.top_k / experts.num_experts)
        return 4 * units * experts.num_experts * capacity * element_size
    return 0


def build_peer(name: str, layer: nn.Module, **options) -> Callable[[torch.Tensor], Any]:
    """The module of peer ``name`` for our ``layer`` (weights copied)."""
    if name == "ours":
        return layer
    if not isinstance(layer, MHMoE):
        raise ValueError(f"peer {name!r} applies to MoE variants only")
    if name == "grouped":
        peer = copy.deepcopy(layer)
        peer.experts.implementation = "grouped"
        return peer
    if name == "loop":
        return LoopPeer(layer)
    if name in HF_IMPLEMENTATIONS:
        return HFPeer(layer, HF_IMPLEMENTATIONS[name])
    if name == "gshard":
        return GShardPeer(layer, **options)
    raise ValueError(f"peer={name!r}: must be one of {', '.join(PEERS)}")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(module: Callable, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``module`` on ``x`` with upstream gradient ``grad``.

    Our layers return (y, aux): their load-balancing and z losses join the objective, as in
    training. Parameter gradients are dropped before each step (set_to_none), as an optimiser
    step with ``zero_grad()`` would.
    """
    params = [p for p in module.parameters()] if isinstance(module, nn.Module) else []

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        out = module(x)
        if isinstance(out, tuple):
            y, aux = out
            loss = (y * grad).sum() + 0.01 * aux.load_balancing_loss + 0.001 * aux.z_loss
        else:
            loss = (out * grad).sum()
        loss.backward()

    return step


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int | None:
    """Peak bytes allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        _synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if device.type != "cpu":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # Every allocation/free is attributed (self memory) to the op that made it; walk them in
    # time order.
    events = sorted(
        ((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()),
        key=lambda item: item[0],
    )
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, size: int = 4096, reps: int = 5) -> float:
    """GFLOP/s of a large square matmul (the machine's practical matmul peak), median of reps."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


@dataclass
class CaseResult:
    d_model: int
    tokens: int
    variant: str
    peer: str
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    flops_per_step: int = 0  # active FLOPs forward x 3 (forward + backward)
    error: str | None = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s) if self.times_s else float("nan")

    @property
    def min_s(self) -> float:
        return min(self.times_s) if self.times_s else float("nan")

    @property
    def gflops(self) -> float:
        return self.flops_per_step / self.median_s / 1e9 if self.times_s else float("nan")


def step_flops(config: DenseConfig | MoEConfig, tokens: int) -> int:
    """Active matmul FLOPs of forward + backward (3 x forward; router excluded)."""
    from mhmoe.parity import count_flops

    return 3 * int(count_flops(config, tokens).layer)


def run_layer_benchmark(
    d_models: list[int],
    token_counts: list[int],
    variants: list[str] = list(VARIANTS),
    peers: list[str] = list(PEERS),
    rounds: int = 7,
    warmup: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory: bool = True,
    seed: int = 0,
    gshard_capacity_factor: float = 1.25,
    gshard_group_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time every (shape, variant, peer) case round-robin; returns a JSON-able report."""
    dev = torch.device(device)
    say = progress or (lambda message: None)
    results: list[CaseResult] = []
    for d_model in d_models:
        configs = variant_configs(d_model)
        for tokens in token_counts:
            torch.manual_seed(seed)
            x = torch.randn(tokens, d_model, device=dev, dtype=dtype, requires_grad=True)
            grad = torch.randn(tokens, d_model, device=dev, dtype=dtype)
            cases: list[tuple[CaseResult, Callable[[], None]]] = []
            for variant in variants:
                config = configs[variant]
                torch.manual_seed(seed)
                layer = build_ffn(config).to(device=dev, dtype=dtype)
                for peer in peers if isinstance(config, MoEConfig) else ["ours"]:
                    case = CaseResult(d_model, tokens, variant, peer,
                                      flops_per_step=step_flops(config, tokens))
                    if peer.startswith("hf_") and not hf_available(HF_IMPLEMENTATIONS[peer]):
                        case.error = "transformers v5 (Qwen3-MoE block) not installed"
                        results.append(case)
                        continue
                    estimate = peer_memory_estimate(
                        peer, layer, tokens, x.element_size(), gshard_capacity_factor,
                        gshard_group_size)
                    if estimate > PEER_MEMORY_LIMIT_BYTES:
                        case.error = f"needs ~{estimate / 2**30:.0f} GiB of intermediates"
                        results.append(case)
                        continue
                    try:
                        options = {}
                        if peer == "gshard":
                            options = dict(capacity_factor=gshard_capacity_factor,
                                           group_size=gshard_group_size)
                        module = build_peer(peer, layer, **options)
                        step = make_step(module, x, grad)
                        for _ in range(warmup):
                            step()
                        if memory:
                            case.peak_bytes = peak_step_memory(step, dev)
                    except (RuntimeError, MemoryError, ValueError, KeyError, TypeError) as err:
                        case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                        log.warning("d_model %d tokens %d %s/%s: %s", d_model, tokens, variant, peer, case.error)
                        results.append(case)
                        continue
                    cases.append((case, step))
                    results.append(case)
            say(f"d_model {d_model}, {tokens} tokens: {len(cases)} cases x {rounds} rounds")
            for _ in range(rounds):
                for case, step in cases:
                    _synchronize(dev)
                    start = time.perf_counter()
                    step()
                    _synchronize(dev)
                    case.times_s.append(time.perf_counter() - start)
    report = {
        "machine": machine_description(dev),
        "device": str(dev),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": rounds,
        "matmul_peak_gflops": matmul_peak_gflops(dev, dtype),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cases": [
            dict(dataclasses.asdict(r), median_s=r.median_s, min_s=r.min_s, gflops=r.gflops)
            for r in results
        ],
    }
    return report


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def format_layer_report(report: dict[str, Any]) -> str:
    """A markdown table per shape: time, ratios, GFLOP/s, peak memory."""
    lines = [
        f"machine: {report['machine']}; torch {report['torch']}; {report['device']} "
        f"{report['dtype']}; {report['rounds']} rounds; large-matmul peak "
        f"{report['matmul_peak_gflops']:.0f} GFLOP/s; {report['date']}",
    ]
    by_shape: dict[tuple[int, int], list[dict]] = {}
    for case in report["cases"]:
        by_shape.setdefault((case["d_model"], case["tokens"]), []).append(case)
    for (d_model, tokens), cases in by_shape.items():
        lookup = {(c["variant"], c["peer"]): c for c in cases}
        dense = lookup.get(("dense", "ours"), {}).get("median_s")
        lines += [
            "",
            f"d_model {d_model}, {tokens} tokens, forward+backward:",
            "",
            "| variant | peer | median ms | min ms | x dense | x SMoE (same peer) | x ours | GFLOP/s | % of matmul peak | peak MiB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for c in cases:
            if c["error"]:
                lines.append(f"| {c['variant']} | {c['peer']} | skipped: {c['error']} | | | | | | | |")
                continue
            med = c["median_s"]
            smoe = lookup.get(("smoe", c["peer"]), {}).get("median_s")
            ours = lookup.get((c["variant"], "ours"), {}).get("median_s")
            ratio = lambda ref: f"{med / ref:.2f}" if ref and not math.isnan(ref) else "-"
            mem = f"{c['peak_bytes'] / 2**20:.0f}" if c["peak_bytes"] is not None else "-"
            lines.append(
                f"| {c['variant']} | {c['peer']} | {med * 1e3:.1f} | {c['min_s'] * 1e3:.1f} | "
                f"{ratio(dense)} | {ratio(smoe) if c['variant'] != 'dense' else '-'} | "
                f"{ratio(ours)} | {c['gflops']:.0f} | "
                f"{100 * c['gflops'] / report['matmul_peak_gflops']:.0f} | {mem} |"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# End to end: training tokens/s of a preset's variants
# ---------------------------------------------------------------------------------------------


def run_e2e_benchmark(
    preset: str = "mini",
    variants: list[str] = list(VARIANTS),
    rounds: int = 5,
    warmup: int = 2,
    batch_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Training steps (forward, LM + auxiliary loss, backward, AdamW step) of each variant of
    a preset, on random token ids, round-robin; tokens/s from the median step time."""
    from mhmoe.model import TransformerLM, lm_loss
    from mhmoe.presets import get_preset, model_config

    say = progress or (lambda message: None)
    dev = torch.device(device)
    spec = get_preset(preset)
    batch = batch_size or spec.micro_batch_size
    steps: dict[str, Callable[[], None]] = {}
    for variant in variants:
        torch.manual_seed(seed)
        model = TransformerLM(model_config(spec, variant)).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        ids = torch.randint(0, spec.vocab_size, (batch, spec.seq_len + 1), device=dev)

        def step(model=model, optimizer=optimizer, ids=ids) -> None:
            out = model(ids[:, :-1])
            loss = lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(warmup):
            step()
        steps[variant] = step
    say(f"preset {preset}: {len(steps)} variants x {rounds} rounds, {batch} x {spec.seq_len} tokens per step")
    times: dict[str, list[float]] = {v: [] for v in steps}
    for _ in range(rounds):
        for variant, step in steps.items():
            _synchronize(dev)
            start = time.perf_counter()
            step()
            _synchronize(dev)
            times[variant].append(time.perf_counter() - start)
    tokens = batch * spec.seq_len
    return {
        "machine": machine_description(dev),
        "preset": preset,
        "tokens_per_step": tokens,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "variants": {
            v: {"median_s": statistics.median(t), "min_s": min(t),
                "tokens_per_s": tokens / statistics.median(t), "times_s": t}
            for v, t in times.items()
        },
    }


def format_e2e_report(report: dict[str, Any]) -> str:
    variants = report["variants"]
    smoe = variants.get("smoe", {}).get("tokens_per_s")
    lines = [
        f"machine: {report['machine']}; torch {report['torch']}; preset {report['preset']}, "
        f"{report['tokens_per_step']} tokens per step; {report['rounds']} rounds; {report['date']}",
        "",
        "| variant | median step ms | tokens/s | x SMoE tokens/s |",
        "|---|---|---|---|",
    ]
    for name, v in variants.items():
        rel = f"{v['tokens_per_s'] / smoe:.2f}" if smoe else "-"
        lines.append(f"| {name} | {v['median_s'] * 1e3:.0f} | {v['tokens_per_s']:.0f} | {rel} |")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
