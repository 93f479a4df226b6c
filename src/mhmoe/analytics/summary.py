"""Per-layer routing summaries (``LayerRoutingSummary``) and their flat metrics-line form:
what the accumulator produces and what plots, tables and reproduction read back.
Definitions of every metric: ``mhmoe.analytics.accumulator``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Scalars that ``RoutingStatsAccumulator.summary`` logs per layer (and averaged over layers).
SCALAR_METRICS = (
    "load_imbalance",
    "load_cv",
    "load_entropy",
    "activation_ratio",
    "dead_experts",
    "dropped_fraction",
    "router_entropy",
    "distinct_experts_per_token",
    "head_js_divergence",
    "head_top1_agreement",
    "expert_bias_min",
    "expert_bias_max",
)


# Per-layer facts ``summary`` also logs (not averaged), so a flat summary alone can be read
# back by ``layers_of`` (tables, plots).
LAYER_FACTS = ("num_experts", "num_heads", "top_k", "num_tokens")


@dataclass
class LayerRoutingSummary:
    """Routing statistics of one MoE layer over a window (definitions: module docstring).

    ``layer`` counts MoE layers only (0 = the first MoE layer of the model, in block order);
    ``block`` is the Transformer block index when known. Metrics that do not apply or have no
    data are None.
    """

    layer: int
    num_experts: int
    num_heads: int
    top_k: int
    num_tokens: int
    num_batches: int
    tokens_per_expert: list[int]
    load_imbalance: float | None
    load_cv: float | None
    load_entropy: float | None
    activation_ratio: float | None
    dead_experts: int
    dropped_fraction: float | None
    router_entropy: float | None = None
    distinct_experts_per_token: float | None = None
    distinct_experts_histogram: list[int] | None = None
    head_js_divergence: float | None = None
    head_top1_agreement: float | None = None
    head_tokens_per_expert: list[list[int]] | None = None
    block: int | None = None
    # Aux-loss-free balancing (MoEConfig.load_balancing="aux-free"): the range of the
    # selection bias at the last batch of the window; None without it.
    expert_bias_min: float | None = None
    expert_bias_max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerRoutingSummary":
        known = {f for f in cls.__dataclass_fields__}
        missing = sorted({"layer", "tokens_per_expert"} - set(data))
        if missing:
            raise ValueError(f"layer summary {dict(data)!r} lacks {missing}")
        fields = {k: v for k, v in data.items() if k in known}
        counts = list(fields["tokens_per_expert"])
        fields.setdefault("num_experts", len(counts))
        fields.setdefault("num_heads", 1)
        fields.setdefault("top_k", 1)
        fields.setdefault("num_tokens", 0)
        fields.setdefault("num_batches", 0)
        fields.setdefault("load_imbalance", None)
        fields.setdefault("load_cv", None)
        fields.setdefault("load_entropy", None)
        fields.setdefault("activation_ratio", None)
        fields.setdefault("dead_experts", sum(1 for c in counts if c == 0))
        fields.setdefault("dropped_fraction", None)
        return cls(**fields)


def flat_metrics(
    layers: Sequence[LayerRoutingSummary], prefix: str = "routing", log_counts: bool = False
) -> dict[str, Any]:
    """The flat ``{prefix}/layer{i}/{metric}`` dict of ``RoutingStatsAccumulator.summary``."""
    out: dict[str, Any] = {}
    per_metric: dict[str, list[float]] = {}
    for layer in layers:
        for name in LAYER_FACTS:
            out[f"{prefix}/layer{layer.layer}/{name}"] = getattr(layer, name)
        for name in SCALAR_METRICS:
            value = getattr(layer, name)
            if value is None:
                continue
            out[f"{prefix}/layer{layer.layer}/{name}"] = value
            per_metric.setdefault(name, []).append(float(value))
        if log_counts:
            out[f"{prefix}/layer{layer.layer}/tokens_per_expert"] = list(layer.tokens_per_expert)
    for name, values in per_metric.items():
        out[f"{prefix}/mean/{name}"] = sum(values) / len(values)
    return out


def layers_of(summary: Any, prefix: str = "routing") -> list[LayerRoutingSummary]:
    """Per-layer summaries from any of the forms this module produces:

    a list of ``LayerRoutingSummary`` or of their dicts; an ``analyze`` report
    ``{"layers": [...]}``; a flat ``RoutingStatsAccumulator.summary()`` dict, or a whole
    metrics line holding one, read from its ``{prefix}/layer{i}/{metric}`` keys (metrics absent
    from it become None; ``tokens_per_expert`` is [] unless it was logged). A flat dict without
    such keys (a dense model's metrics) gives [].
    """
    if isinstance(summary, Mapping):
        if "layers" in summary:
            return layers_of(summary["layers"], prefix)
        flat_key = re.compile(rf"^{re.escape(prefix)}/layer(?P<index>\d+)/(?P<name>\w+)$")
        by_index: dict[int, dict[str, Any]] = {}
        for key, value in summary.items():
            match = flat_key.match(str(key))
            if match is None:
                continue
            entry = by_index.setdefault(int(match["index"]), {"layer": int(match["index"])})
            entry[match["name"]] = value
        for entry in by_index.values():
            entry.setdefault("tokens_per_expert", [])
        return [LayerRoutingSummary.from_dict(by_index[i]) for i in sorted(by_index)]
    if isinstance(summary, Iterable) and not isinstance(summary, (str, bytes)):
        layers = []
        for item in summary:
            if isinstance(item, LayerRoutingSummary):
                layers.append(item)
            elif isinstance(item, Mapping):
                layers.append(LayerRoutingSummary.from_dict(item))
            else:
                raise ValueError(f"layer summary {item!r}: must be a LayerRoutingSummary or dict")
        return layers
    raise ValueError(
        f"summary of type {type(summary).__name__}: must be a list of layer summaries, a report "
        "dict with 'layers', or a flat metrics dict"
    )
