"""Routing plots (matplotlib, Agg canvas: no display needed): expert load, per-head load,
distinct experts per token, activation ratio across variants.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mhmoe.analytics.summary import layers_of


def _new_figure(width: float, height: float):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_expert_load(summary: Any, path: str | Path, title: str | None = None) -> Path:
    """Heatmap, one row per MoE layer, one column per expert: load c_e / mean_e c_e
    (1 = balanced share; 0 = dead expert). Returns the written PNG path."""
    layers = [layer for layer in layers_of(summary) if sum(layer.tokens_per_expert) > 0]
    if not layers:
        raise ValueError("plot_expert_load: no layer with expert counts to plot")
    width = max(layer.num_experts for layer in layers)
    grid = torch.full((len(layers), width), float("nan"), dtype=torch.float64)
    for row, layer in enumerate(layers):
        counts = torch.tensor(layer.tokens_per_expert, dtype=torch.float64)
        grid[row, : counts.numel()] = counts / counts.mean()
    # At most 12 x 3+ inches: a 96-expert layer stays legible without a 2200-pixel-wide strip.
    fig = _new_figure(min(4 + 0.09 * width, 12), max(3.0, 1.4 + 0.5 * len(layers)))
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                      vmin=0.0)
    ax.set_xlabel("expert")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)),
                  [f"{layer.layer} (max/mean {layer.load_imbalance or 0:.2f})" for layer in layers])
    fig.colorbar(image, ax=ax, label="load / mean load")
    ax.set_title(title or "Expert load per MoE layer")
    return _save(fig, path)


def plot_head_expert_load(summary: Any, path: str | Path) -> Path | None:
    """MH-MoE: one heatmap per MoE layer, heads x experts, each head's load share q_a(e).
    Returns None (writes nothing) when no layer has head statistics."""
    layers = [layer for layer in layers_of(summary) if layer.head_tokens_per_expert]
    if not layers:
        return None
    fig = _new_figure(min(3 + 0.18 * max(layer.num_experts for layer in layers), 20),
                      1.2 + 1.0 * len(layers))
    axes = fig.subplots(len(layers), 1, squeeze=False)[:, 0]
    for ax, layer in zip(axes, layers):
        counts_HE = torch.tensor(layer.head_tokens_per_expert, dtype=torch.float64)
        share_HE = counts_HE / counts_HE.sum(dim=1, keepdim=True).clamp(min=1)
        image = ax.imshow(share_HE.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        ax.set_ylabel(f"layer {layer.layer}\nhead")
        ax.set_yticks(range(layer.num_heads))
        js = layer.head_js_divergence
        ax.set_title(f"JS(heads) = {js:.3f}" if js is not None else "", fontsize=8, loc="right")
        fig.colorbar(image, ax=ax, label="share")
    axes[-1].set_xlabel("expert")
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle("MH-MoE: expert load share of each head")
    return _save(fig, path)


def plot_distinct_experts(summary: Any, path: str | Path) -> Path | None:
    """Histogram per MoE layer of d_t, the distinct experts a token's H sub-tokens reach
    (share of tokens per d). Returns None (writes nothing) for models without MH-MoE layers."""
    layers = [layer for layer in layers_of(summary) if layer.distinct_experts_histogram]
    if not layers:
        return None
    fig = _new_figure(6.5, 3.8)
    ax = fig.add_subplot()
    num_bins = max(len(layer.distinct_experts_histogram) for layer in layers)
    bar_width = 0.8 / len(layers)
    for offset, layer in enumerate(layers):
        hist = torch.tensor(layer.distinct_experts_histogram, dtype=torch.float64)
        share = hist / hist.sum().clamp(min=1)
        positions = torch.arange(1, hist.numel()) + (offset - (len(layers) - 1) / 2) * bar_width
        ax.bar(positions.numpy(), share[1:].numpy(), width=bar_width,
               label=f"layer {layer.layer} (mean {layer.distinct_experts_per_token:.2f})")
    ax.set_xticks(range(1, num_bins))
    ax.set_xlabel("distinct experts reached by one token's sub-tokens")
    ax.set_ylabel("share of tokens")
    ax.set_title("MH-MoE sub-token routing diversity")
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_activation_ratio(summaries_by_variant: Mapping[str, Any], path: str | Path) -> Path:
    """Bar chart of the activation ratio per variant: mean over MoE layers, with each layer's
    value as a dot. Variants without MoE layers (dense) are listed with no bar."""
    if not summaries_by_variant:
        raise ValueError("plot_activation_ratio: summaries_by_variant is empty")
    names = list(summaries_by_variant)
    fig = _new_figure(max(4.0, 1.1 * len(names) + 1.5), 3.8)
    ax = fig.add_subplot()
    for x, name in enumerate(names):
        values = [layer.activation_ratio for layer in layers_of(summaries_by_variant[name])
                  if layer.activation_ratio is not None]
        if not values:
            ax.annotate("no MoE", (x, 1), ha="center", va="bottom", fontsize=8)
            continue
        mean = sum(values) / len(values)
        ax.bar(x, 100 * mean, width=0.6, color="tab:blue")
        ax.scatter([x] * len(values), [100 * v for v in values], color="black", s=8, zorder=3)
        ax.annotate(f"{100 * mean:.1f}%", (x, 100 * mean), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("experts activated per batch (%)")
    ax.set_title("Activation ratio per variant")
    ax.set_xlabel("bar: mean over MoE layers; dots: single layers", fontsize=8)
    return _save(fig, path)


LOAD_THRESHOLD = 0.5  # "active" in the thresholded share: at least half of a uniform share


def sorted_load_shares(summary: Any) -> list[torch.Tensor]:
    """Per MoE layer with counts: c_e / mean_e c_e sorted in decreasing order (1 = uniform)."""
    shares = []
    for layer in layers_of(summary):
        counts = torch.tensor(layer.tokens_per_expert, dtype=torch.float64)
        if counts.numel() and counts.sum() > 0:
            shares.append(torch.sort(counts / counts.mean(), descending=True).values)
    return shares


def plot_load_distribution(summaries_by_variant: Mapping[str, Any], path: str | Path,
                           threshold: float = LOAD_THRESHOLD) -> Path:
    """Left: each variant's expert-load distribution, c_e / mean c_e sorted from the busiest
    expert down, against the expert's rank as a share of E (mean over MoE layers; a flat line at
    1 is perfect balance, a drop to 0 marks unused experts). Right: the thresholded activation
    share, the fraction of experts receiving at least ``threshold`` of a uniform share (bar: mean
    over layers; dots: layers). Counts come from ``analyze`` reports (whole evaluation windows),
    so they are corpus-level, unlike the per-batch activation ratio that saturates at 100%."""
    curves = {name: sorted_load_shares(summary) for name, summary in summaries_by_variant.items()}
    curves = {name: layers for name, layers in curves.items() if layers}
    if not curves:
        raise ValueError("plot_load_distribution: no variant with expert counts to plot")
    fig = _new_figure(11.0, 4.0)
    left, right = fig.subplots(1, 2, width_ratios=(1.6, 1))
    for index, (name, layers) in enumerate(curves.items()):
        experts = layers[0].numel()
        same_width = [layer for layer in layers if layer.numel() == experts]
        mean_curve = torch.stack(same_width).mean(dim=0)
        ranks = (torch.arange(experts, dtype=torch.float64) + 0.5) / experts
        left.plot(ranks.numpy(), mean_curve.numpy(), color=f"C{index}", label=f"{name} (E={experts})")
        active = [float((layer >= threshold).double().mean()) for layer in layers]
        mean_active = sum(active) / len(active)
        right.bar(index, 100 * mean_active, width=0.6, color=f"C{index}")
        right.scatter([index] * len(active), [100 * a for a in active], color="black", s=8, zorder=3)
        right.annotate(f"{100 * mean_active:.0f}%", (index, 100 * mean_active), ha="center", va="bottom", fontsize=8)
    left.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    left.axhline(threshold, color="grey", linewidth=0.6, linestyle=":")
    left.set_xlabel("expert rank / number of experts (busiest first)")
    left.set_ylabel("load / mean load")
    left.set_title("Expert-load distribution (mean over MoE layers)", fontsize=9)
    left.legend(fontsize=7)
    left.grid(alpha=0.3)
    right.set_xticks(range(len(curves)), list(curves), rotation=20, ha="right", fontsize=8)
    right.set_ylim(0, 105)
    right.set_ylabel(f"experts with load >= {threshold:g} x mean (%)", fontsize=8)
    right.set_title("Thresholded activation share", fontsize=9)
    return _save(fig, path)


def write_plots(summary: Any, out_dir: str | Path) -> list[Path]:
    """Writes expert_load.png, and for MH-MoE head_expert_load.png and
    distinct_experts.png, into ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    written = [plot_expert_load(summary, out_dir / "expert_load.png")]
    for maybe in (plot_head_expert_load(summary, out_dir / "head_expert_load.png"),
                  plot_distinct_experts(summary, out_dir / "distinct_experts.png")):
        if maybe is not None:
            written.append(maybe)
    return written
