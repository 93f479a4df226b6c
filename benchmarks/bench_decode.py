"""Prefill and decode throughput of fp32, BitNet fake-quant and packed ternary models (issue 17).

    python benchmarks/bench_decode.py --threads 1                      # the docs/benchmarks.md table
    python benchmarks/bench_decode.py --threads 2 --rounds 5 --json decode.json
    python benchmarks/bench_decode.py --sections fused --kernel-rows 1 8   # the C++ small-row kernel
    python benchmarks/bench_decode.py --sections decode --ternary-backends default fbgemm --no-hf

For each variant (SMoE and MH-MoE h=3 at a preset's shape, random init): the fp32 model, the
BitNet b1.58 fake-quant model (eval: the integer inference path of ``mhmoe.bitnet.integer``),
the same with that path switched off (``integer_inference(False)``: the float math of training,
what eval ran before), and its packed ternary export loaded back (``load_ternary``); beside
them a stock transformers ``Qwen3MoeForCausalLM`` of the same shape (hidden size, depth,
attention heads, experts, top-k, MoE every second block), random init, built from a config
offline. Each case runs the same greedy loop with a KV cache: a prefill of ``--prompt`` tokens
per sequence, then ``--new-tokens`` single-token steps, at each batch size. Cases run
interleaved (every round runs every case once) and the medians over rounds are reported, so
machine noise hits all cases alike; ratios are ratios of those medians.

Also: resident weight memory (parameters + buffers + the integer weights built at load) and
that of the quantised matrices alone, and the layer-level ratio: one MH-MoE h=3 layer forward
(eval, no grad) on ``--layer-tokens`` tokens, fp32 vs BitNet. The packed export holds each
quantised matrix once, in the integer kernel's form (its 2-bit buffers released at load); the
bytes of fbgemm's prepacked weights are those of its blocked copy, inputs padded to its
instruction set's block (512 on AVX2; ``mhmoe.bitnet.integer.fbgemm_packed_bytes``, checked
against the resident set by
``tests/test_int_inference.py``). The packed export is timed as loaded by default (the kernel
chosen per matrix, ``mhmoe.bitnet.integer.memory_aware_backend``) and, with
``--ternary-backends``, also forced to one backend for every matrix (case ``<variant>/ternary_<backend>``);
it is also loaded for each integer backend for its memory alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mhmoe.bitnet.convert import bitnet_modules, to_bitnet
from mhmoe.bitnet.fused import (
    FUSED_MAX_ROWS,
    fused_extension,
    fused_rmsnorm_small_rows_linear,
    fused_small_rows_linear,
)
from mhmoe.bitnet.integer import (
    INTEGER_BACKENDS,
    Int8Weight,
    fbgemm_available,
    int_mm_sums,
    integer_inference,
    integer_weight_bytes,
)
from mhmoe.bitnet.layers import (
    ACTIVATION_EPS,
    BitLinear,
    activation_codes_for_inference,
    weight_quant_codes,
)
from mhmoe.bitnet.ternary import export_ternary, load_ternary, tensor_bytes
from mhmoe.config import BitNetConfig
from mhmoe.decoding import KVCache, decoder_forward, lm_logits
from mhmoe.layers.mh_moe import MHMoE
from mhmoe.model import TransformerLM
from mhmoe.runs.atomic import atomic_write_text
from mhmoe.training.presets import get_preset, model_config

VARIANTS = ("smoe", "mhmoe_h3")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def quantised_matrix_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes held by the weights of the modules ``names`` (the ones BitNet quantises), including
    the integer weights built for them."""
    total = 0
    for name in names:
        module = model.get_submodule(name)
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            total += tensor.numel() * tensor.element_size()
        total += integer_weight_bytes(module)
    return total


DEFAULT_BACKEND = "default"
"""``--ternary-backends`` name of the load's own choice (per matrix, no backend forced)."""


def ternary_case(backend: str) -> str:
    """The case label of the packed export loaded for ``backend`` ("default": no suffix)."""
    return "ternary" if backend == DEFAULT_BACKEND else f"ternary_{backend}"


def build_models(preset: str, variants: list[str], seed: int, workdir: Path,
                 ternary_backends: list[str]) -> dict[str, dict[str, Any]]:
    """name -> {"model", "kind" ("ours"/"hf"), "integer" (bool), "variant", memory fields}."""
    cases: dict[str, dict[str, Any]] = {}
    for variant in variants:
        torch.manual_seed(seed)
        config = model_config(preset, variant)
        fp32 = TransformerLM(config).eval()
        torch.manual_seed(seed)
        bitnet = TransformerLM(config.replace(bitnet=BitNetConfig())).eval()
        names = bitnet_modules(bitnet)
        export_ternary(bitnet, workdir / variant)
        ternary = {backend: load_ternary(workdir / variant, backend=None if backend == DEFAULT_BACKEND else backend)
                   for backend in ternary_backends}
        fp32_quantised = quantised_matrix_bytes(fp32, names)
        memory_by_backend = {}  # the export loaded for each integer backend: memory only
        for backend in INTEGER_BACKENDS:
            if backend != "fbgemm" or fbgemm_available():
                loaded = load_ternary(workdir / variant, backend=backend)
                memory_by_backend[backend] = quantised_matrix_bytes(loaded, names) / fp32_quantised
                del loaded
        with torch.no_grad():  # builds the fake-quant model's integer weights once, as a load would
            bitnet(torch.zeros(1, 1, dtype=torch.long))
        for label, model, integer_on in (
            ("fp32", fp32, True), ("bitnet", bitnet, True), ("bitnet_float", bitnet, False),
            *((ternary_case(backend), loaded, True) for backend, loaded in ternary.items()),
        ):
            cases[f"{variant}/{label}"] = {
                "model": model, "kind": "ours", "integer": integer_on, "variant": variant,
                "resident_bytes": tensor_bytes(model) + integer_weight_bytes(model),
                "quantised_bytes": quantised_matrix_bytes(model, names),
            }
        cases[f"{variant}/{ternary_case(ternary_backends[0])}"]["quantised_ratio_by_backend"] = memory_by_backend
    return cases


def build_hf_qwen3_moe(preset: str, seed: int) -> nn.Module | None:
    """Stock transformers Qwen3-MoE of the SMoE variant's shape, or None without transformers."""
    try:
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    except ImportError:
        return None
    spec = get_preset(preset)
    smoe = model_config(preset, "smoe")
    moe = smoe.moe_ffn
    config = Qwen3MoeConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
        head_dim=spec.d_model // spec.num_attention_heads,
        intermediate_size=smoe.dense_ffn.d_ff, moe_intermediate_size=moe.d_expert,
        num_experts=moe.num_experts, num_experts_per_tok=moe.top_k, norm_topk_prob=moe.top_k > 1,
        decoder_sparse_step=spec.moe_every, max_position_embeddings=spec.seq_len,
        tie_word_embeddings=spec.tie_embeddings, use_cache=True,
    )
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(config).eval()


# --------------------------------------------------------------------------------------------
# Timed greedy loops
# --------------------------------------------------------------------------------------------


CLOCK: Callable[[], float] = time.perf_counter
"""The timer of every measurement: ``time.perf_counter`` (wall) or ``time.process_time``
(CPU time of this process: with one thread, robust to the machine's other jobs taking the
core away; ``--clock``)."""


@torch.no_grad()
def greedy_ours(model: TransformerLM, ids_BP: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, generated ids (B, new_tokens)) with ``KVCache``."""
    cache = KVCache()
    start = CLOCK()
    out = decoder_forward(model.embed(ids_BP), model.blocks, model.final_norm, model.rotary, cache=cache)
    token_B = lm_logits(model, out.hidden_BTD[:, -1]).argmax(-1)
    prefilled = CLOCK()
    tokens = [token_B]
    for _ in range(new_tokens - 1):
        out = decoder_forward(model.embed(token_B[:, None]), model.blocks, model.final_norm, model.rotary,
                              cache=cache)
        token_B = lm_logits(model, out.hidden_BTD[:, -1]).argmax(-1)
        tokens.append(token_B)
    done = CLOCK()
    return prefilled - start, done - prefilled, torch.stack(tokens, 1)


@torch.no_grad()
def greedy_hf(model: nn.Module, ids_BP: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    from transformers import DynamicCache

    cache = DynamicCache()
    start = CLOCK()
    out = model(input_ids=ids_BP, past_key_values=cache, use_cache=True)
    token_B = out.logits[:, -1].argmax(-1)
    prefilled = CLOCK()
    tokens = [token_B]
    for _ in range(new_tokens - 1):
        out = model(input_ids=token_B[:, None], past_key_values=cache, use_cache=True)
        token_B = out.logits[:, -1].argmax(-1)
        tokens.append(token_B)
    done = CLOCK()
    return prefilled - start, done - prefilled, torch.stack(tokens, 1)


def run_decode(cases: dict[str, dict[str, Any]], batches: list[int], prompt: int, new_tokens: int,
               rounds: int, vocab: int, seed: int, say: Callable[[str], None],
               ternary_backends: list[str]) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    prompts = {b: torch.randint(0, vocab, (b, prompt), generator=generator) for b in batches}
    times: dict[tuple[str, int], dict[str, list[float]]] = {
        (name, b): {"prefill": [], "decode": []} for name in cases for b in batches
    }
    tokens: dict[tuple[str, int], torch.Tensor] = {}
    for round_index in range(rounds + 1):  # round 0: warm-up, not recorded
        say(f"round {round_index}/{rounds}")
        for b in batches:
            for name, case in cases.items():
                loop = greedy_hf if case["kind"] == "hf" else greedy_ours
                with integer_inference(case["integer"]):
                    prefill_s, decode_s, generated = loop(case["model"], prompts[b], new_tokens)
                if round_index:
                    times[(name, b)]["prefill"].append(prefill_s)
                    times[(name, b)]["decode"].append(decode_s)
                tokens[(name, b)] = generated
    results: dict[str, Any] = {}
    for (name, b), t in times.items():
        prefill_s, decode_s = statistics.median(t["prefill"]), statistics.median(t["decode"])
        results[f"{name}@{b}"] = {
            "case": name, "batch": b,
            "prefill_tokens_per_s": b * prompt / prefill_s,
            "decode_tokens_per_s": b * (new_tokens - 1) / decode_s,
            "prefill_s": t["prefill"], "decode_s": t["decode"],
        }
    # The packed export and the fake-quant model compute the same exact integer sums and the same
    # scales, whichever the backend: same tokens.
    agreement = {}
    for variant in {c["variant"] for c in cases.values() if c["kind"] == "ours"}:
        for b in batches:
            a, f = tokens.get((f"{variant}/bitnet", b)), tokens.get((f"{variant}/bitnet_float", b))
            for backend in ternary_backends:
                c = tokens.get((f"{variant}/{ternary_case(backend)}", b))
                if a is not None and c is not None:
                    agreement[f"{variant}/{ternary_case(backend)}@{b}"] = {
                        "ternary_equals_bitnet": bool(torch.equal(a, c)),
                        "integer_equals_float_path": None if f is None else float((a == f).float().mean()),
                    }
    return {"results": results, "greedy_agreement": agreement}


# --------------------------------------------------------------------------------------------
# Layer level
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def run_layer(preset: str, tokens: int, rounds: int, seed: int) -> dict[str, Any]:
    """One MH-MoE h=3 layer forward (eval, no grad) at ``tokens`` tokens: fp32 vs BitNet."""
    config = model_config(preset, "mhmoe_h3").moe_ffn
    torch.manual_seed(seed)
    fp32 = MHMoE(config).eval()
    torch.manual_seed(seed)
    bitnet = to_bitnet(MHMoE(config)).eval()
    x = torch.randn(tokens, config.d_model, generator=torch.Generator().manual_seed(seed))
    cases = {"fp32": (fp32, True), "bitnet_integer": (bitnet, True), "bitnet_float": (bitnet, False)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_index in range(rounds + 1):
        for name, (layer, integer_on) in cases.items():
            with integer_inference(integer_on):
                start = CLOCK()
                layer(x)
                elapsed = CLOCK() - start
            if round_index:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"tokens": tokens, "median_s": medians, "times_s": times,
            "speedup_bitnet_integer_vs_fp32": medians["fp32"] / medians["bitnet_integer"],
            "speedup_bitnet_float_vs_fp32": medians["fp32"] / medians["bitnet_float"]}


# --------------------------------------------------------------------------------------------
# Kernel level: what bounds the ratios
# --------------------------------------------------------------------------------------------

KERNEL_SHAPES = {  # name: (in, out)
    "attention qkv (mini)": (192, 576),
    "SMoE expert gate+up (mini)": (192, 1024),
    "SMoE expert down (mini)": (512, 192),
    "h=3 expert gate+up (mini)": (64, 256),
    "h=3 expert down (mini)": (128, 64),
    "paper FFN up (d 768)": (768, 3072),
}


@torch.no_grad()
def run_kernels(rows_list: list[int], rounds: int, seed: int) -> list[dict[str, Any]]:
    """Per shape and row count, interleaved medians (seconds) of: the fp32 matmul; the integer
    product alone (fbgemm; ``torch._int_mm`` up to 64 rows, it is a scalar kernel here); a whole
    ``BitLinear`` integer forward (inner norm, activation codes, kernel, scales) vs ``nn.Linear``."""

    out = []
    generator = torch.Generator().manual_seed(seed)
    for name, (d_in, d_out) in KERNEL_SHAPES.items():
        linear = nn.Linear(d_in, d_out, bias=False).eval()
        bit = BitLinear.from_linear(linear).eval()
        weight_codes, _ = weight_quant_codes(linear.weight)
        codes_w = weight_codes.to(torch.int8)
        fb = Int8Weight(codes_w, "fbgemm") if fbgemm_available() else None
        for rows in rows_list:
            x = torch.randn(rows, d_in, generator=generator)
            codes_x, _ = activation_codes_for_inference(x)
            cases: dict[str, Callable[[], Any]] = {
                "fp32_matmul": lambda linear=linear, x=x: linear(x),
                "bitlinear_integer_forward": lambda bit=bit, x=x: bit(x),
            }
            if fb is not None:
                cases["fbgemm_sums"] = lambda fb=fb, c=codes_x: fb.integer_sums(c)
            if rows <= 64:
                cases["int_mm_sums"] = lambda c=codes_x, w=codes_w: int_mm_sums(c, w)
            times: dict[str, list[float]] = {k: [] for k in cases}
            repeats = max(1, 2048 // max(rows, 1))  # several calls per sample at few rows
            for round_index in range(rounds + 1):
                for key, fn in cases.items():
                    start = CLOCK()
                    for _ in range(repeats):
                        fn()
                    if round_index:
                        times[key].append((CLOCK() - start) / repeats)
            out.append({"shape": name, "in": d_in, "out": d_out, "rows": rows,
                        **{k: statistics.median(v) for k, v in times.items()}})
    return out


@torch.no_grad()
def run_fused(rows_list: list[int], rounds: int, seed: int) -> list[dict[str, Any]] | None:
    """Per shape and row count (<= ``FUSED_MAX_ROWS``), interleaved medians (seconds) of: the fp32
    ``nn.Linear``; ``BitLinear``'s integer forward (fbgemm); the fused C++ quantise + int8 GEMV +
    scale after the inner RMSNorm in PyTorch (``fused_small_rows_linear``, bit-equal to the
    integer forward); the same with the RMSNorm fused too (``fused_rmsnorm_small_rows_linear``).
    None when the extension does not build here."""
    if fused_extension() is None:
        return None
    out = []
    generator = torch.Generator().manual_seed(seed)
    for name, (d_in, d_out) in KERNEL_SHAPES.items():
        linear = nn.Linear(d_in, d_out, bias=False).eval()
        bit = BitLinear.from_linear(linear).eval()
        weight_codes, gamma = weight_quant_codes(linear.weight)
        codes_w, gamma_1 = weight_codes.to(torch.int8), gamma.reshape(1)
        for rows in [r for r in rows_list if r <= FUSED_MAX_ROWS]:
            x = torch.randn(rows, d_in, generator=generator)
            cases: dict[str, Callable[[], Any]] = {
                "fp32_matmul": lambda linear=linear, x=x: linear(x),
                "bitlinear_integer_forward": lambda bit=bit, x=x: bit(x),
                "fused_after_torch_norm": lambda bit=bit, x=x, c=codes_w, g=gamma_1:
                    fused_small_rows_linear(bit.norm(x), c, g, ACTIVATION_EPS),
                "fused_with_norm": lambda bit=bit, x=x, c=codes_w, g=gamma_1:
                    fused_rmsnorm_small_rows_linear(x, bit.norm.weight, c, g, bit.norm.eps, ACTIVATION_EPS),
            }
            reference = bit(x)
            times: dict[str, list[float]] = {k: [] for k in cases}
            repeats = 200
            for round_index in range(rounds + 1):
                for key, fn in cases.items():
                    start = CLOCK()
                    for _ in range(repeats):
                        fn()
                    if round_index:
                        times[key].append((CLOCK() - start) / repeats)
            out.append({"shape": name, "in": d_in, "out": d_out, "rows": rows,
                        "fused_equals_integer_forward": bool(torch.equal(cases["fused_after_torch_norm"](), reference)),
                        "fused_with_norm_max_abs_diff": float((cases["fused_with_norm"]() - reference).abs().max()),
                        **{k: statistics.median(v) for k, v in times.items()}})
    return out


def fused_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [("| matrix (in x out) | rows | fp32 matmul us | BitLinear integer forward us | fused (norm in torch) us | "
              "fused with norm us | fp32 / fused | integer forward / fused | fp32 / fused with norm | "
              "fused == integer forward | fused with norm max abs diff |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in rows:
        fp32, bit = k["fp32_matmul"], k["bitlinear_integer_forward"]
        fused, with_norm = k["fused_after_torch_norm"], k["fused_with_norm"]
        lines.append(f"| {k['shape']} ({k['in']} x {k['out']}) | {k['rows']} | {fp32 * 1e6:.1f} | {bit * 1e6:.1f} | "
                     f"{fused * 1e6:.1f} | {with_norm * 1e6:.1f} | {fp32 / fused:.2f} | {bit / fused:.2f} | "
                     f"{fp32 / with_norm:.2f} | {k['fused_equals_integer_forward']} | "
                     f"{k['fused_with_norm_max_abs_diff']:.1e} |")
    return "\n".join(lines)


def kernel_markdown(kernels: list[dict[str, Any]]) -> str:
    lines = [("| matrix (in x out) | rows | fp32 matmul us | fbgemm int8 us | torch._int_mm us | "
              "BitLinear integer forward us | fp32 / fbgemm | fp32 / BitLinear |"),
             "|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        fb, im = k.get("fbgemm_sums"), k.get("int_mm_sums")
        lines.append(
            f"| {k['shape']} ({k['in']} x {k['out']}) | {k['rows']} | {k['fp32_matmul'] * 1e6:.1f} | "
            + (f"{fb * 1e6:.1f}" if fb else "-") + " | " + (f"{im * 1e6:.1f}" if im else "-") + " | "
            + f"{k['bitlinear_integer_forward'] * 1e6:.1f} | "
            + (f"{k['fp32_matmul'] / fb:.2f}" if fb else "-")
            + f" | {k['fp32_matmul'] / k['bitlinear_integer_forward']:.2f} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def markdown(report: dict[str, Any], cases: dict[str, dict[str, Any]]) -> str:
    if "decode" not in report:
        return ""
    results = report["decode"]["results"]
    batches = report["batches"]
    lines = [
        "| case | " + " | ".join(f"prefill tok/s b{b} | decode tok/s b{b}" for b in batches)
        + " | resident MiB | quantised matrices MiB |",
        "|---|" + "---|---|" * len(batches) + "---|---|",
    ]
    for name, case in cases.items():
        cells = []
        for b in batches:
            r = results[f"{name}@{b}"]
            cells.append(f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.0f}")
        quantised = case.get("quantised_bytes")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {case['resident_bytes'] / 2**20:.1f} | "
                     + (f"{quantised / 2**20:.2f}" if quantised is not None else "-") + " |")
    lines += ["", "Ratios (medians of the same run):", "", "| ratio | " + " | ".join(
        f"prefill b{b} | decode b{b}" for b in batches) + " |", "|---|" + "---|---|" * len(batches)]

    def ratio(num: str, den: str) -> str | None:
        if any(f"{n}@{batches[0]}" not in results for n in (num, den)):
            return None
        cells = []
        for b in batches:
            a, c = results[f"{num}@{b}"], results[f"{den}@{b}"]
            cells.append(f"{a['prefill_tokens_per_s'] / c['prefill_tokens_per_s']:.2f} | "
                         f"{a['decode_tokens_per_s'] / c['decode_tokens_per_s']:.2f}")
        return f"| {num} / {den} | " + " | ".join(cells) + " |"

    pairs = []
    for variant in report["variants"]:
        pairs += [(f"{variant}/{ternary_case(backend)}", f"{variant}/fp32") for backend in report["ternary_backends"]]
        pairs += [(f"{variant}/bitnet", f"{variant}/fp32"), (f"{variant}/bitnet", f"{variant}/bitnet_float")]
    pairs += [("smoe/fp32", "hf_qwen3_moe"), ("mhmoe_h3/fp32", "smoe/fp32")]
    lines += [row for row in (ratio(a, b) for a, b in pairs) if row]
    lines += ["", "Quantised matrices, resident bytes / fp32: " + ", ".join(
        f"{name} {case['quantised_bytes'] / cases[name.split('/')[0] + '/fp32']['quantised_bytes']:.3f}"
        for name, case in cases.items() if case["kind"] == "ours" and not name.endswith("/fp32")
        and not name.endswith("/bitnet_float"))]
    lines += ["", "Packed export loaded per integer backend, quantised matrices resident / fp32: " + "; ".join(
        f"{name} " + ", ".join(f"{backend} {ratio:.3f}" for backend, ratio in case["quantised_ratio_by_backend"].items())
        for name, case in cases.items() if "quantised_ratio_by_backend" in case)]
    layer = report.get("layer")
    if layer:
        med = layer["median_s"]
        lines += ["", (f"Layer level (MH-MoE h=3, {layer['tokens']} tokens, forward, eval): fp32 "
                       f"{med['fp32'] * 1e3:.1f} ms, BitNet integer {med['bitnet_integer'] * 1e3:.1f} ms "
                       f"({layer['speedup_bitnet_integer_vs_fp32']:.2f}x fp32's speed), BitNet float path "
                       f"{med['bitnet_float'] * 1e3:.1f} ms ({layer['speedup_bitnet_float_vs_fp32']:.2f}x).")]
    lines += ["", "Greedy tokens, packed ternary vs fake-quant (both integer path) equal: " + ", ".join(
        f"{k} {v['ternary_equals_bitnet']}" for k, v in report["decode"]["greedy_agreement"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per sequence")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layer-tokens", type=int, default=2048)
    parser.add_argument("--layer-rounds", type=int, default=7)
    parser.add_argument("--no-hf", action="store_true", help="leave out the transformers Qwen3-MoE")
    parser.add_argument("--ternary-backends", nargs="+", default=[DEFAULT_BACKEND],
                        choices=(DEFAULT_BACKEND, *INTEGER_BACKENDS),
                        help="packed export cases to time: 'default' (the kernel chosen per matrix) and/or "
                             "one backend forced on every matrix (default: default)")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: process CPU time; wall: wall clock; auto: cpu at 1 thread, else wall")
    parser.add_argument("--sections", nargs="+", choices=("decode", "layer", "kernels", "fused"),
                        default=["decode", "layer", "kernels"],
                        help="fused: the optional C++ small-row kernel (built at first use, minutes)")
    parser.add_argument("--kernel-rows", type=int, nargs="+", default=[1, 8, 64, 2048])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("threads", "prompt", "new_tokens", "rounds", "layer_tokens", "layer_rounds"):
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')}={value}: must be a positive integer")
    if len(set(args.ternary_backends)) != len(args.ternary_backends):
        parser.error(f"--ternary-backends {args.ternary_backends}: each backend once")
    if "fbgemm" in args.ternary_backends and not fbgemm_available():
        parser.error("--ternary-backends fbgemm: this PyTorch build has no fbgemm quantised engine")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches {args.batches}: every batch size must be a positive integer")
    spec = get_preset(args.preset)
    if args.prompt + args.new_tokens > spec.seq_len:
        parser.error(f"--prompt + --new-tokens = {args.prompt + args.new_tokens} exceeds the {args.preset} "
                     f"context of {spec.seq_len} tokens")
    torch.set_num_threads(args.threads)
    global CLOCK
    clock = args.clock if args.clock != "auto" else ("cpu" if args.threads == 1 else "wall")
    CLOCK = time.process_time if clock == "cpu" else time.perf_counter

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    load = os.getloadavg()
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": args.threads, "clock": clock, "load_average_before": load,
        "preset": args.preset, "variants": args.variants, "batches": args.batches, "prompt": args.prompt,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "ternary_backends": args.ternary_backends,
    }
    cases: dict[str, dict[str, Any]] = {}
    if "decode" in args.sections:
        with tempfile.TemporaryDirectory() as tmp:
            cases = build_models(args.preset, args.variants, args.seed, Path(tmp), args.ternary_backends)
        if not args.no_hf:
            hf = build_hf_qwen3_moe(args.preset, args.seed)
            if hf is not None:
                cases["hf_qwen3_moe"] = {"model": hf, "kind": "hf", "integer": True, "variant": "smoe",
                                         "resident_bytes": tensor_bytes(hf), "quantised_bytes": None}
        report["decode"] = run_decode(cases, args.batches, args.prompt, args.new_tokens, args.rounds,
                                      spec.vocab_size, args.seed, say, args.ternary_backends)
    if "layer" in args.sections:
        say("layer level")
        report["layer"] = run_layer(args.preset, args.layer_tokens, args.layer_rounds, args.seed)
    if "kernels" in args.sections:
        say("kernel level")
        report["kernels"] = run_kernels(args.kernel_rows, args.layer_rounds, args.seed)
    if "fused" in args.sections:
        say("fused small-row kernel (builds the C++ extension at first use)")
        report["fused"] = run_fused(args.kernel_rows, args.layer_rounds, args.seed)
    report["load_average_after"] = os.getloadavg()
    print(markdown(report, cases))
    if "layer" in report and "decode" not in report:
        layer = report["layer"]
        print(f"Layer level (MH-MoE h=3, {layer['tokens']} tokens): fp32 / BitNet integer = "
              f"{layer['speedup_bitnet_integer_vs_fp32']:.2f}, fp32 / BitNet float = "
              f"{layer['speedup_bitnet_float_vs_fp32']:.2f}")
    if "kernels" in report:
        print("\n" + kernel_markdown(report["kernels"]))
    if "fused" in report:
        print("\n" + (fused_markdown(report["fused"]) if report["fused"] is not None
                      else "fused small-row kernel: the C++ extension did not build here"))
    print(f"\nclock: {clock}; load average before/after: {load} / {report['load_average_after']}")
    if args.json:
        # atomic: an interrupted run never leaves a truncated report for later comparisons
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
