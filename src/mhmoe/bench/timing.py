"""Wall-clock benchmarks of the layer family against peers, and of end-to-end training.

    mhmoe bench layers                        # d_model 192, 16384 tokens, all variants and peers
    mhmoe bench layers --d-model 192 768 --tokens 4096 16384 --json out.json
    mhmoe bench e2e --preset mini             # training tokens/s of the five variants

Layer benchmark. For every (d_model, tokens) shape, the paper's five variants
(``mhmoe.planning.variants.paper_variants``: dense, SMoE 8 x (8/3)d top-1, fine-grained 16 x (4/3)d top-2,
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
``mhmoe.planning.counts.count_flops``) against a large matmul measured in the same run, and the peak
tensor memory of one step (CUDA allocator stats on GPU, the profiler's allocation trace on
CPU).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mhmoe.bench.peers import (
    HF_IMPLEMENTATIONS,
    PEER_MEMORY_LIMIT_BYTES,
    PEERS,
    build_peer,
    hf_available,
    peer_memory_estimate,
)
from mhmoe.config import DenseConfig, MoEConfig
from mhmoe.layers.mh_moe import build_ffn
from mhmoe.model import TransformerLM, lm_loss
from mhmoe.planning.counts import count_flops, count_model_flops
from mhmoe.planning.variants import paper_variants
from mhmoe.runs.atomic import atomic_write_text
from mhmoe.runtime import autocast_context
from mhmoe.training.presets import Preset, get_preset, model_config

log = logging.getLogger(__name__)

VARIANTS = ("dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3")


def variant_configs(d_model: int) -> dict[str, DenseConfig | MoEConfig]:
    """The paper's five FFN variants at ``d_model`` (expert sizes scale with d_model)."""

    return dict(paper_variants(d_model))


# ---------------------------------------------------------------------------------------------
# Peers: each takes our layer (weights are copied, never shared) and returns y = f(x_TD)
# ---------------------------------------------------------------------------------------------


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
    matmul_size: int = 4096,
) -> dict[str, Any]:
    """Time every (shape, variant, peer) case round-robin; returns a JSON-able report.

    ``matmul_size``: the side of the square matmul whose rate is the report's peak (GPUs
    need a larger one than 4096 to reach theirs; tiny runs a smaller one).
    """
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
            say(f"d_model {d_model}, {tokens} tokens: preparing {len(variants)} variants (warmup {warmup})")
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
                        say(f"  {variant}/{peer}: warmup")  # progress per case: silent for minutes otherwise
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
            for round_index in range(rounds):
                say(f"  round {round_index + 1}/{rounds}")
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
        "matmul_peak_gflops": matmul_peak_gflops(dev, dtype, size=matmul_size),
        "matmul_size": matmul_size,
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
    preset: str | Preset = "mini",
    variants: list[str] = list(VARIANTS),
    rounds: int = 5,
    warmup: int = 2,
    batch_size: int | None = None,
    device: str = "cpu",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    fused_optimizer: bool | None = None,
) -> dict[str, Any]:
    """Training steps (forward, LM + auxiliary loss, backward, AdamW step) of each variant of
    a preset (a name or a ``Preset``), on random token ids, round-robin; tokens/s from the
    median step time.

    ``autocast_dtype``: forward and loss under autocast in that dtype (None: float32), as
    ``--precision bf16`` trains. ``fused_optimizer``: AdamW's fused kernel (None: on CUDA
    only, as training uses it there). Each variant's ``train_flops_per_token`` is 3x the
    analytic forward count (``mhmoe.planning.counts.count_model_flops``), for MFU.
    """

    say = progress or (lambda message: None)
    dev = torch.device(device)
    spec = get_preset(preset) if isinstance(preset, str) else preset
    batch = batch_size or spec.micro_batch_size
    fused = dev.type == "cuda" if fused_optimizer is None else fused_optimizer
    steps: dict[str, Callable[[], None]] = {}
    flops_per_token: dict[str, int] = {}
    for variant in variants:
        say(f"preset {spec.name}: building {variant} (warmup {warmup})")
        torch.manual_seed(seed)
        config = model_config(spec, variant)
        flops_per_token[variant] = 3 * count_model_flops(config, spec.seq_len)["total"]
        model = TransformerLM(config).to(dev)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
        ids = torch.randint(0, spec.vocab_size, (batch, spec.seq_len + 1), device=dev)

        def step(model=model, optimizer=optimizer, ids=ids) -> None:
            with autocast_context(dev, autocast_dtype):
                out = model(ids[:, :-1])
                loss = lm_loss(out.logits, ids[:, 1:]) + out.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        for _ in range(warmup):
            step()
        steps[variant] = step
    say(f"preset {spec.name}: {len(steps)} variants x {rounds} rounds, {batch} x {spec.seq_len} tokens per step")
    times: dict[str, list[float]] = {v: [] for v in steps}
    for round_index in range(rounds):
        say(f"  round {round_index + 1}/{rounds}")
        for variant, step in steps.items():
            _synchronize(dev)
            start = time.perf_counter()
            step()
            _synchronize(dev)
            times[variant].append(time.perf_counter() - start)
    tokens = batch * spec.seq_len
    return {
        "machine": machine_description(dev),
        "preset": spec.name,
        "precision": "fp32" if autocast_dtype in (None, torch.float32) else str(autocast_dtype).replace("torch.", ""),
        "tokens_per_step": tokens,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "variants": {
            v: {"median_s": statistics.median(t), "min_s": min(t),
                "tokens_per_s": tokens / statistics.median(t), "times_s": t,
                "train_flops_per_token": flops_per_token[v]}
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


def write_json(report: dict[str, Any], path: str | Path) -> None:
    """The report as JSON, written atomically (no half-written file when the write fails)."""
    atomic_write_text(Path(path), json.dumps(report, indent=1))
