"""The best speed-up any quantised kernel could give at a preset's width (Amdahl bound, issue 17).

    python benchmarks/decode_bound.py                        # mini, threads 1 and 2, batch 1
    python benchmarks/decode_bound.py --batches 1 8 --rounds 7 --json bound.json

For each variant (SMoE and MH-MoE h=3, random init, fp32) two models run the same greedy loop
with a KV cache (a prefill of ``--prompt`` tokens per sequence, then ``--new-tokens`` - 1
single-token steps):

* ``fp32``: the model as it is;
* ``free``: the same model with every matrix that BitNet b1.58 quantises (the modules
  ``mhmoe.bitnet.convert.to_bitnet`` replaces: attention projections, dense FFN, MH-MoE head and
  merge layers, the stacked experts) replaced by a zero-cost stand-in that returns zeros of the
  right shape: ``FreeLinear`` (no matmul) and ``FreeMatmulExperts`` (no matmul, but the
  SwiGLU/ReLU between the expert matmuls still runs, on zeros). Everything else (embedding,
  norms, rotary, attention softmax and KV cache, router, dispatch, LM head) is untouched.
  The two models do not take the same dispatch path at small batches: the stand-in experts
  have ``forward_blocks``, as the BitNet experts do, so the small-batch dispatch of
  ``mhmoe.layers.moe`` hands them the sorted blocks (the path a BitNet model takes), while the
  fp32 experts take its gathered small-batch path (batched matmuls over the chosen experts'
  gathered weights, ``gathered_small_batch_compute``, while those fit
  ``SMALL_BATCH_GATHER_MAX_BYTES``): part of ``t_fp32 - t_free`` is the difference between
  these two dispatch paths, not matmul time.

``t_fp32 / t_free`` is an UPPER bound on what any kernel for the quantised matrices (integer,
ternary, fused) can gain over fp32: with the matmuls at zero cost the rest of the step still
takes ``t_free``, and a real BitNet model does more than the stand-ins: every quantised layer
also runs its inner RMSNorm and the 8-bit quantisation of its input activations (and the
experts their hidden norm and hidden quantisation), which the stand-ins skip, so its rest of
the step is longer than ``t_free`` and its speed-up smaller than the bound. Amdahl: with the
quantised matmuls a fraction p = 1 - t_free / t_fp32 of the fp32 time, a kernel k times faster
than the fp32 matmul gives at most 1 / ((1 - p) + p / k) (an upper bound too, for the same
reason); the table lists k = 1.3 (fbgemm int8 at ``mini`` widths, docs/benchmarks.md kernel
table), 3 and infinity.

Timing: ``time.perf_counter`` (wall) and ``time.process_time`` (CPU time of the process) both
recorded per call; every round runs every (threads, batch, variant, model) case once, the first
round is a warm-up, medians over the other rounds. The stand-ins allocate their zero outputs
(``new_zeros``: about a microsecond per call, one call per quantised module and step), which
``t_free`` counts; that is far less than the norms and quantisers they skip, so the bound stays
an upper bound. With two threads on a machine whose cores are busy with other jobs the times are
not meaningful (OpenMP threads wait for a core); run ``--threads 1`` there.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.bitnet.convert import bitnet_modules
from mhmoe.config import BitNetConfig
from mhmoe.decoding import KVCache, decoder_forward, lm_logits
from mhmoe.layers.experts import Experts
from mhmoe.model import TransformerLM
from mhmoe.runs.atomic import atomic_write_text
from mhmoe.training.presets import get_preset, model_config

VARIANTS = ("smoe", "mhmoe_h3")
KERNEL_SPEEDUPS = (1.3, 3.0)
"""Kernel speed-ups over the fp32 matmul for the Amdahl columns (besides infinity)."""


# --------------------------------------------------------------------------------------------
# Zero-cost stand-ins for the quantised matrices
# --------------------------------------------------------------------------------------------


class FreeLinear(nn.Module):
    """A quantised ``nn.Linear`` at zero matmul cost: zeros (..., O), plus the bias BitNet keeps
    in full precision (added after the matmul, as ``BitLinear`` does)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.new_zeros(*x.shape[:-1], self.out_features)  # (..., I) -> (..., O)
        return y if self.bias is None else y + self.bias


class FreeMatmulExperts(Experts):
    """Stacked experts at zero matmul cost: the hidden pre-activations (M, F) (gate and up for
    SwiGLU) are zeros, the activation between the matmuls runs on them, the output (M, S) is
    zeros. Has ``forward_blocks``, so the small-batch dispatch takes the BitNet experts' path."""

    @classmethod
    def from_experts(cls, experts: Experts) -> FreeMatmulExperts:
        with torch.device("meta"):
            new = cls(experts.num_experts, experts.d_in, experts.d_expert, experts.activation)
        for name, param in experts.named_parameters(recurse=False):  # shared, never read
            setattr(new, name, param)
        new.use_grouped_mm = experts.use_grouped_mm
        return new

    def _free(self, x_MS: torch.Tensor) -> torch.Tensor:
        num_rows = x_MS.shape[0]
        if self.activation == "swiglu":
            gate_up_M2F = x_MS.new_zeros(num_rows, 2 * self.d_expert)
            gate_MF, up_MF = gate_up_M2F.chunk(2, dim=1)  # (M, 2F) -> 2 x (M, F)
            F.silu(gate_MF).mul_(up_MF)
        else:
            F.relu(x_MS.new_zeros(num_rows, self.d_expert))
        return x_MS.new_zeros(num_rows, self.d_in)

    def forward(self, x_MS: torch.Tensor, offsets_E: torch.Tensor,
                counts_E: list[int] | None = None) -> torch.Tensor:
        return self._free(x_MS)

    def forward_blocks(self, x_MS: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        return self._free(x_MS)

    def forward_one(self, expert: int, x_RS: torch.Tensor) -> torch.Tensor:
        return self._free(x_RS)


def free_matmul_model(model: TransformerLM, quantised_names: list[str]) -> TransformerLM:
    """A copy of ``model`` with the modules ``quantised_names`` replaced by the stand-ins."""
    free = copy.deepcopy(model)
    for name in quantised_names:
        module = free.get_submodule(name)
        if isinstance(module, Experts):
            replacement: nn.Module = FreeMatmulExperts.from_experts(module)
        elif isinstance(module, nn.Linear):
            replacement = FreeLinear(module)
        else:  # the router, only with quantize_router (off by default)
            continue
        parent, _, child = name.rpartition(".")
        setattr(free.get_submodule(parent), child, replacement)
    return free.eval()


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def greedy(model: TransformerLM, ids_BP: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Wall and CPU seconds of the prefill and of the ``new_tokens - 1`` decode steps."""
    cache = KVCache()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    out = decoder_forward(model.embed(ids_BP), model.blocks, model.final_norm, model.rotary, cache=cache)
    token_B = lm_logits(model, out.hidden_BTD[:, -1]).argmax(-1)
    wall1, cpu1 = time.perf_counter(), time.process_time()
    for _ in range(new_tokens - 1):
        out = decoder_forward(model.embed(token_B[:, None]), model.blocks, model.final_norm, model.rotary,
                              cache=cache)
        token_B = lm_logits(model, out.hidden_BTD[:, -1]).argmax(-1)
    wall2, cpu2 = time.perf_counter(), time.process_time()
    return {"prefill_wall": wall1 - wall0, "prefill_cpu": cpu1 - cpu0,
            "decode_wall": wall2 - wall1, "decode_cpu": cpu2 - cpu1}


def build(preset: str, variants: list[str], seed: int) -> dict[str, dict[str, TransformerLM]]:
    models = {}
    for variant in variants:
        torch.manual_seed(seed)
        config = model_config(preset, variant)
        fp32 = TransformerLM(config).eval()
        with torch.device("meta"):  # only for the names of the modules BitNet quantises
            names = bitnet_modules(TransformerLM(config.replace(bitnet=BitNetConfig())))
        models[variant] = {"fp32": fp32, "free": free_matmul_model(fp32, names)}
    return models


def measure(models: dict[str, dict[str, TransformerLM]], threads_list: list[int], batches: list[int],
            prompt: int, new_tokens: int, rounds: int, vocab: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    prompts = {b: torch.randint(0, vocab, (b, prompt), generator=generator) for b in batches}
    samples: dict[tuple, list[dict[str, float]]] = {}
    for round_index in range(rounds + 1):  # round 0: warm-up, not recorded
        print(f"round {round_index}/{rounds}", file=sys.stderr, flush=True)
        for threads in threads_list:
            torch.set_num_threads(threads)
            for b in batches:
                for variant, pair in models.items():
                    for label, model in pair.items():
                        timing = greedy(model, prompts[b], new_tokens)
                        if round_index:
                            samples.setdefault((threads, b, variant, label), []).append(timing)
    rows = []
    for threads in threads_list:
        for b in batches:
            for variant in models:
                row: dict[str, Any] = {"threads": threads, "batch": b, "variant": variant}
                for label in ("fp32", "free"):
                    for key in ("prefill_wall", "prefill_cpu", "decode_wall", "decode_cpu"):
                        values = [s[key] for s in samples[(threads, b, variant, label)]]
                        row[f"{label}_{key}"] = statistics.median(values)
                        row[f"{label}_{key}_all"] = values
                for key in ("prefill_wall", "prefill_cpu", "decode_wall", "decode_cpu"):
                    row[f"max_speedup_{key}"] = row[f"fp32_{key}"] / row[f"free_{key}"]
                rows.append(row)
    return {"rows": rows}


def amdahl(max_speedup: float, kernel_speedup: float) -> float:
    """Whole-step speed-up with the quantised matmuls ``kernel_speedup`` times faster, given the
    speed-up with them free (p = 1 - 1 / max_speedup of the fp32 time)."""
    matmul_fraction = 1.0 - 1.0 / max_speedup
    return 1.0 / ((1.0 - matmul_fraction) + matmul_fraction / kernel_speedup)


def markdown(report: dict[str, Any]) -> str:
    new_steps = report["new_tokens"] - 1
    lines = ["| threads | batch | variant | phase | fp32 ms | free-matmul ms | max speed-up wall | "
             "max speed-up CPU time | matmul share p (wall) | "
             + " | ".join(f"Amdahl k={k:g}" for k in KERNEL_SPEEDUPS) + " |",
             "|---|---|---|---|---|---|---|---|---|" + "---|" * len(KERNEL_SPEEDUPS)]
    for row in report["measure"]["rows"]:
        for phase in ("prefill", "decode"):
            per = 1 if phase == "prefill" else new_steps  # decode: per step
            fp32_ms = row[f"fp32_{phase}_wall"] / per * 1e3
            free_ms = row[f"free_{phase}_wall"] / per * 1e3
            bound = row[f"max_speedup_{phase}_wall"]
            cells = " | ".join(f"{amdahl(bound, k):.2f}" for k in KERNEL_SPEEDUPS)
            lines.append(f"| {row['threads']} | {row['batch']} | {row['variant']} | "
                         f"{phase}{' (per step)' if phase == 'decode' else ''} | {fp32_ms:.2f} | {free_ms:.2f} | "
                         f"{bound:.2f} | {row[f'max_speedup_{phase}_cpu']:.2f} | {1 - 1 / bound:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the report (with every sample) here")
    args = parser.parse_args(argv)
    for name in ("prompt", "new_tokens", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be a positive integer")
    if args.new_tokens < 2:
        parser.error(f"--new-tokens={args.new_tokens}: needs at least 2 (one prefill token, one decode step)")
    if any(t < 1 for t in args.threads) or any(b < 1 for b in args.batches):
        parser.error("--threads and --batches take positive integers")
    spec = get_preset(args.preset)
    if args.prompt + args.new_tokens > spec.seq_len:
        parser.error(f"--prompt + --new-tokens = {args.prompt + args.new_tokens} exceeds the {args.preset} "
                     f"context of {spec.seq_len} tokens")
    report: dict[str, Any] = {
        "command": "python benchmarks/decode_bound.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "load_average_before": os.getloadavg(), "preset": args.preset,
        "prompt": args.prompt, "new_tokens": args.new_tokens, "rounds": args.rounds,
    }
    models = build(args.preset, args.variants, args.seed)
    report["measure"] = measure(models, args.threads, args.batches, args.prompt, args.new_tokens,
                                args.rounds, spec.vocab_size, args.seed)
    report["load_average_after"] = os.getloadavg()
    print(markdown(report))
    print(f"\nload average before/after: {report['load_average_before']} / {report['load_average_after']}")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
