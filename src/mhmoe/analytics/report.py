"""The routing table of ``results.md`` (markdown), one row per variant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mhmoe.analytics.summary import layers_of


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "-" if value is None else f"{value * scale:{spec}}{suffix}"


def routing_table_markdown(summaries_by_variant: Mapping[str, Any]) -> str:
    """A Markdown table, one row per variant, of routing statistics averaged over MoE layers
    (definitions: module docstring). Accepts each variant's summary in any form ``layers_of``
    takes; a dense variant (no MoE layer) gets a row of "-"."""
    header = (
        "| variant | MoE layers | E x h x k | activation ratio | load max/mean | load CV "
        "| router entropy (nats) | distinct experts/token | head top-1 agreement | dropped |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for name, summary in summaries_by_variant.items():
        layers = layers_of(summary)
        if not layers:
            rows.append(f"| {name} | 0 | - | - | - | - | - | - | - | - |")
            continue
        shape = {(layer.num_experts, layer.num_heads, layer.top_k) for layer in layers}
        shape_text = ", ".join(f"{e} x {h} x {k}" for e, h, k in sorted(shape))
        col = lambda attr: _mean([getattr(layer, attr) for layer in layers])  # noqa: E731
        rows.append(
            f"| {name} | {len(layers)} | {shape_text} "
            f"| {_fmt(col('activation_ratio'), '.1f', 100, '%')} "
            f"| {_fmt(col('load_imbalance'), '.2f')} | {_fmt(col('load_cv'), '.2f')} "
            f"| {_fmt(col('router_entropy'), '.2f')} "
            f"| {_fmt(col('distinct_experts_per_token'), '.2f')} "
            f"| {_fmt(col('head_top1_agreement'), '.2f')} "
            f"| {_fmt(col('dropped_fraction'), '.1f', 100, '%')} |"
        )
    note = (
        "\nMeans over MoE layers. Activation ratio: share of experts receiving >= 1 routed "
        "unit per batch; distinct experts/token and head agreement: MH-MoE only.\n"
    )
    return header + "\n".join(rows) + "\n" + note
