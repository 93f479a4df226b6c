"""Where the time of one MoE layer step goes, by kind of work (the "what bounds it" table).

    python benchmarks/profile_breakdown.py                          # d 192, 16384 tokens, 1 thread
    python benchmarks/profile_breakdown.py --threads 2 --tokens 2048 --variants smoe mhmoe_h3

For each variant (the paper's FFN variants at ``--d-model``, ``mhmoe.parity.paper_variants``)
it profiles ``--steps`` forward + backward steps of the layer as users get it (the same step as
``mhmoe bench layers``'s ``ours``: output gradient, load-balancing and z losses) with
``torch.profiler`` and sums the ops' self CPU time into kinds of work:

* matmul: ``mm``/``addmm``/``bmm``/``_grouped_mm`` (experts, head, merge, router, combine);
* gather/scatter: moving routed rows (``index_select``, ``index_add_``/``scatter_add_``,
  ``index_copy_``, indexing);
* element-wise: activation and the other arithmetic over activations;
* routing: softmax, top-k selection, sort and counting;
* python/dispatch: self time of our autograd Functions (the per-expert Python loop) and of
  view ops (``slice``, ``select``, ...), i.e. per-op overhead;
* other: the rest.

Self times, so nothing is counted twice; the profiler adds a little per-op overhead, more for
variants with more ops. Plain profiler and Python, not a test.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from mhmoe.bench.timing import make_step, variant_configs
from mhmoe.layers.mh_moe import build_ffn

KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "aten::mv",
               "aten::addmv_", "aten::linear", "aten::matmul"),
    "gather/scatter": ("aten::index_select", "aten::index_add_", "aten::scatter_add_",
                       "aten::index_copy_", "aten::index_copy", "aten::index",
                       "aten::_index_put_impl_", "aten::gather", "aten::scatter_",
                       "aten::index_fill_"),
    "element-wise": ("aten::mul", "aten::mul_", "aten::silu", "aten::silu_backward",
                     "aten::relu", "aten::threshold_backward", "aten::add", "aten::add_",
                     "aten::sub", "aten::div", "aten::sum", "aten::linalg_vecdot",
                     "aten::fill_", "aten::zero_", "aten::copy_", "aten::cat", "aten::exp",
                     "aten::neg", "aten::where"),
    "routing": ("aten::_softmax", "aten::_softmax_backward_data", "aten::argmax",
                "aten::amax", "aten::topk", "aten::sort", "aten::argsort", "aten::bincount",
                "aten::bitwise_and", "aten::bitwise_or_", "aten::bitwise_xor", "aten::le",
                "aten::log", "aten::square", "aten::mean", "aten::cumsum"),
    "python/dispatch": ("_BlockedDispatch", "_BlockedDispatchBackward", "_RouteFunction",
                        "_RouteFunctionBackward", "_GatherUnits", "_GatherUnitsBackward",
                        "aten::slice", "aten::select", "aten::as_strided", "aten::t",
                        "aten::transpose", "aten::view", "aten::split",
                        "aten::split_with_sizes", "aten::item", "aten::_local_scalar_dense",
                        "aten::empty", "aten::empty_strided", "aten::unsqueeze",
                        "aten::squeeze", "aten::reshape", "aten::chunk", "aten::unbind"),
}
KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}


def breakdown(variant: str, d_model: int, tokens: int, steps: int) -> dict[str, float]:
    """Milliseconds per step by kind of work (self CPU time), plus the total."""
    torch.manual_seed(0)
    layer = build_ffn(variant_configs(d_model)[variant])
    x = torch.randn(tokens, d_model)
    grad = torch.randn(tokens, d_model)
    step = make_step(layer, x, grad)
    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_kind: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        kind = KIND_OF.get(event.key, "other")
        per_kind[kind] += event.self_cpu_time_total / 1000 / steps
    per_kind["total"] = sum(per_kind.values())
    return dict(per_kind)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["dense", "smoe", "mhmoe_h2", "mhmoe_h3"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {v: breakdown(v, args.d_model, args.tokens, args.steps) for v in args.variants}
    kinds = list(KINDS) + ["other", "total"]
    print(f"d_model {args.d_model}, {args.tokens} tokens, {args.threads} thread(s), "
          f"forward + backward, profiler self CPU ms per step (mean of {args.steps})\n")
    print("| kind | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(f"{results[v].get(kind, 0.0):.1f}" for v in results) + " |")


if __name__ == "__main__":
    main()
