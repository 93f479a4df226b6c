"""Routing analytics: expert load, sub-token routing diversity, activation ratio, plots.

Shape legend: T tokens, H = num_heads (sub-tokens per token), N = T * H routed units
(token-major: sub-token h of token t is unit t * H + h, ``mhmoe.layers.moe.MoEAux``),
K top-k, M = N * K assignments, E experts.

Everything here is read from what an MoE layer already returns (``MoEAux``: ``tokens_per_expert``
(E,), ``expert_ids`` (N, K), ``dropped_fraction``, ``num_heads``), plus, for the router entropy,
the router probabilities (``probs_NE``) taken by a forward hook on ``TopKRouter`` or an
``MoEAux.router_entropy`` field when the layer provides one. No extra forward pass is made.

Definitions, per MoE layer, over a window of batches (one batch = one ``update`` call = the
units of one forward pass; with gradient accumulation, one micro-batch). c_e is the number of
assignments the router gave expert e in the window (before capacity dropping), M = sum_e c_e:

* ``tokens_per_expert``: c_e. For MH-MoE the unit is a sub-token, so sum_e c_e = T * H * K.
* ``load_imbalance``: max_e c_e / mean_e c_e, mean = M / E. 1 is perfectly balanced; E means
  every assignment went to one expert (collapse).
* ``load_cv``: coefficient of variation std_e(c_e) / mean_e(c_e), population std. 0 when
  balanced, sqrt(E - 1) under collapse.
* ``load_entropy``: entropy of the load distribution c_e / M divided by ln E, in [0, 1]
  (1 = uniform, 0 = collapsed; defined as 1 when E = 1).
* ``dropped_fraction``: dropped assignments / M over the window (0 when dropless).
* ``router_entropy``: mean over routed units n of -sum_e p_ne ln p_ne, in nats, where p_n is
  the router's softmax over all E experts (``TopKRouter``); ln E is the maximum (uniform router),
  0 a one-hot router. Measures the router's confidence, not the load.
* ``activation_ratio``: the fraction of the E experts that receive at least one routed unit in a
  batch (count >= 1, and count >= ``min_share`` * M_batch when ``min_share`` > 0), averaged over
  the window's batches. It depends on the batch size and on E: a batch of M assignments can
  activate at most min(M, E) experts, and an SMoE with 8 experts reaches 100% in almost any
  batch, so compare variants at equal tokens per batch and read it beside ``load_entropy``.
  Our choice versus the original MH-MoE paper (Wu et al. 2024, arXiv 2404.15045, Fig. 1a:
  "8.33% for SMoE, 90.71% for MH-MoE", 6 layers x 32 experts, XNLI): as we read it (the paper
  gives no formula), each expert's activation there is the share of a whole corpus's
  (sub-)tokens routed to it, drawn as a layer x expert heatmap, and the percentages count the
  experts whose share passes an unstated threshold: a corpus-level, thresholded count, not a
  per-token quantity. We count per batch, a training-time signal that needs no extra pass;
  ``min_share`` > 0 gives a thresholded reading, and ``dead_experts`` below is the corpus-level
  count of never-chosen experts.
* ``dead_experts``: experts with c_e = 0 over the whole window.
* ``distinct_experts_per_token`` (H > 1 only): for a token t, d_t = |union over its H sub-tokens
  of their K chosen experts|, 1 <= d_t <= min(H * K, E); reported as the mean over tokens and as
  ``distinct_experts_histogram[d]`` = number of tokens with d_t = d (index 0 unused). For H = 1,
  d_t = K always, so it is reported as None.
* ``head_js_divergence`` (H > 1): mean over head pairs a < b of the Jensen-Shannon divergence
  (base 2, in [0, 1]) between the heads' load distributions q_a(e) = c_{a,e} / sum_e c_{a,e},
  c_{a,e} = assignments of head a's sub-tokens to expert e. 0 = heads load experts alike.
* ``head_top1_agreement`` (H > 1): mean over head pairs a < b of the fraction of tokens whose
  sub-tokens a and b have the same top-1 expert. 1 = identical heads; about 1/E for
  independent uniform heads.

Statistics accumulate on the device of the counts without host synchronisation (counts are
built with ``index_add_``, not ``bincount``, whose CUDA kernel reads the maximum back to the
host); ``summary`` synchronises once per call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.layers.routing import count_values

__all__ = [
    "LayerRoutingSummary",
    "RoutingStatsAccumulator",
    "activation_ratio",
    "analyze_model",
    "analyze_run",
    "load_analysis_tokens",
    "token_windows",
    "distinct_experts_per_token",
    "head_expert_counts",
    "head_js_divergence",
    "head_top1_agreement",
    "layers_of",
    "load_cv",
    "load_entropy",
    "load_imbalance",
    "plot_activation_ratio",
    "plot_distinct_experts",
    "plot_expert_load",
    "plot_head_expert_load",
    "router_entropy",
    "routing_table_markdown",
    "write_plots",
]

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
)
# Per-layer facts ``summary`` also logs (not averaged), so a flat summary alone can be read
# back by ``layers_of`` (tables, plots).
LAYER_FACTS = ("num_experts", "num_heads", "top_k", "num_tokens")


# --------------------------------------------------------------------------------------------
# Pure statistics on one routing (tensors in, Python numbers out)
# --------------------------------------------------------------------------------------------


def _counts_vector(counts_E: torch.Tensor | Sequence[int]) -> torch.Tensor:
    counts = torch.as_tensor(counts_E).detach()
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(
            f"tokens_per_expert has shape {tuple(counts.shape)}: must be a non-empty vector (E,)"
        )
    if bool((counts < 0).any()):
        raise ValueError(f"tokens_per_expert={counts.tolist()}: counts must be non-negative")
    return counts.double().cpu()


def load_imbalance(counts_E: torch.Tensor | Sequence[int]) -> float | None:
    """max_e c_e / mean_e c_e (module docstring); None when no assignment was made."""
    counts = _counts_vector(counts_E)
    mean = counts.mean().item()
    return None if mean == 0 else counts.max().item() / mean


def load_cv(counts_E: torch.Tensor | Sequence[int]) -> float | None:
    """Coefficient of variation std_e c_e / mean_e c_e (population std); None when empty."""
    counts = _counts_vector(counts_E)
    mean = counts.mean().item()
    return None if mean == 0 else counts.std(unbiased=False).item() / mean


def load_entropy(counts_E: torch.Tensor | Sequence[int]) -> float | None:
    """Entropy of c_e / M normalised by ln E, in [0, 1]; 1 when E = 1; None when empty."""
    counts = _counts_vector(counts_E)
    total = counts.sum().item()
    if total == 0:
        return None
    if counts.numel() == 1:
        return 1.0
    share = counts / total
    return torch.special.entr(share).sum().item() / math.log(counts.numel())


def activation_ratio(counts_E: torch.Tensor | Sequence[int], min_share: float = 0.0) -> float:
    """Fraction of experts with c_e >= 1 and c_e >= min_share * M, for one batch's counts."""
    _check_min_share(min_share)
    counts = _counts_vector(counts_E)
    threshold = max(1.0, min_share * counts.sum().item())
    return (counts >= threshold).double().mean().item()


def router_entropy(probs_NE: torch.Tensor) -> float | None:
    """Mean over units of -sum_e p_ne ln p_ne (nats) of router probabilities; None if N = 0."""
    if probs_NE.dim() != 2:
        raise ValueError(f"probs_NE has shape {tuple(probs_NE.shape)}: must be (N, E)")
    if probs_NE.shape[0] == 0:
        return None
    return torch.special.entr(probs_NE.detach().double()).sum(-1).mean().item()


def _check_ids(expert_ids_NK: torch.Tensor, num_heads: int) -> None:
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r}: must be a positive integer")
    if expert_ids_NK.dim() != 2:
        raise ValueError(
            f"expert_ids has shape {tuple(expert_ids_NK.shape)}: must be (N, K), "
            "N = tokens * num_heads"
        )
    if expert_ids_NK.shape[0] % num_heads != 0:
        raise ValueError(
            f"expert_ids has N={expert_ids_NK.shape[0]} rows: must be a multiple of "
            f"num_heads={num_heads} (N = tokens * num_heads)"
        )


def _check_min_share(min_share: float) -> None:
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) \
            or not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share={min_share!r}: must be a number in [0, 1]")


def _distinct_per_token(expert_ids_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    num_units, top_k = expert_ids_NK.shape
    ids_TJ = expert_ids_NK.reshape(num_units // num_heads, num_heads * top_k)  # (N, K) -> (T, H*K)
    sorted_TJ = ids_TJ.sort(dim=1).values
    # Distinct values of a sorted row = 1 + number of steps where the value changes.
    return 1 + (sorted_TJ[:, 1:] != sorted_TJ[:, :-1]).sum(dim=1)


def distinct_experts_per_token(expert_ids_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    """d_t = number of distinct experts among token t's H * K choices; int64 (T,)."""
    _check_ids(expert_ids_NK, num_heads)
    if expert_ids_NK.shape[0] == 0:
        return expert_ids_NK.new_zeros(0)
    return _distinct_per_token(expert_ids_NK, num_heads)


def head_expert_counts(
    expert_ids_NK: torch.Tensor, num_heads: int, num_experts: int
) -> torch.Tensor:
    """c_{a,e}: assignments of head a's sub-tokens to expert e; int64 (H, E)."""
    _check_ids(expert_ids_NK, num_heads)
    num_units, top_k = expert_ids_NK.shape
    ids_THK = expert_ids_NK.reshape(num_units // num_heads, num_heads, top_k)  # (N,K)->(T,H,K)
    head_H11 = torch.arange(num_heads, device=ids_THK.device).view(1, num_heads, 1)
    return count_values(head_H11 * num_experts + ids_THK, num_heads * num_experts).view(
        num_heads, num_experts
    )


def _pairwise_mean(matrix_HH: torch.Tensor) -> float | None:
    num_heads = matrix_HH.shape[0]
    if num_heads < 2:
        return None
    upper = torch.triu_indices(num_heads, num_heads, offset=1)
    return matrix_HH[upper[0], upper[1]].double().mean().item()


def _js_matrix(head_counts_HE: torch.Tensor) -> torch.Tensor | None:
    counts = head_counts_HE.detach().double().cpu()
    totals_H1 = counts.sum(dim=1, keepdim=True)
    if bool((totals_H1 == 0).any()):
        return None
    q_HE = counts / totals_H1
    m_HHE = 0.5 * (q_HE[:, None, :] + q_HE[None, :, :])
    # KL(q_a || m_ab) with 0 log 0 = 0; m_ab > 0 wherever q_a > 0.
    kl_HH = (torch.special.xlogy(q_HE[:, None, :], q_HE[:, None, :])
             - torch.special.xlogy(q_HE[:, None, :], m_HHE)).sum(-1)
    return 0.5 * (kl_HH + kl_HH.T) / math.log(2.0)


def head_js_divergence(head_counts_HE: torch.Tensor) -> float | None:
    """Mean over head pairs of JS(q_a, q_b), base 2 (module docstring); None if H < 2 or a
    head has no assignment."""
    if head_counts_HE.dim() != 2:
        raise ValueError(
            f"head_counts has shape {tuple(head_counts_HE.shape)}: must be (num_heads, E)"
        )
    js_HH = _js_matrix(head_counts_HE)
    return None if js_HH is None else _pairwise_mean(js_HH)


def _top1_agreement_counts(expert_ids_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    top1_TH = expert_ids_NK[:, 0].reshape(-1, num_heads)  # (N,) -> (T, H), first choice
    return (top1_TH[:, :, None] == top1_TH[:, None, :]).sum(dim=0)  # (H, H) token counts


def head_top1_agreement(expert_ids_NK: torch.Tensor, num_heads: int) -> float | None:
    """Mean over head pairs a < b of the share of tokens whose heads a, b share the top-1
    expert; None if H < 2 or there is no token."""
    _check_ids(expert_ids_NK, num_heads)
    num_tokens = expert_ids_NK.shape[0] // num_heads
    if num_heads < 2 or num_tokens == 0:
        return None
    agreement = _pairwise_mean(_top1_agreement_counts(expert_ids_NK, num_heads))
    return agreement / num_tokens


# --------------------------------------------------------------------------------------------
# Per-layer summary and the accumulator
# --------------------------------------------------------------------------------------------


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


@dataclass
class _LayerState:
    """Device-side running sums of one layer (module docstring, "without host sync")."""

    num_experts: int
    num_heads: int
    top_k: int
    counts_E: torch.Tensor
    active_sum: torch.Tensor  # int64: sum over batches of the number of activated experts
    dropped: torch.Tensor  # dropped assignments reported on the device (float)
    entropy_sum: torch.Tensor  # sum over units of the router entropy (nats)
    distinct_hist: torch.Tensor | None  # (H*K + 1,) int64, H > 1
    head_counts_HE: torch.Tensor | None  # (H, E) int64, H > 1
    agree_HH: torch.Tensor | None  # (H, H) int64 token counts, H > 1
    num_tokens: int = 0
    num_assignments: int = 0
    num_batches: int = 0
    routed_batches: int = 0  # batches with at least one unit (the activation ratio's)
    entropy_units: int = 0
    dropped_host: float = 0.0  # dropped assignments reported as host scalars

    @classmethod
    def empty(cls, num_experts: int, num_heads: int, top_k: int, device) -> "_LayerState":
        zero = torch.zeros((), dtype=torch.float64, device=device)
        multi = num_heads > 1
        return cls(
            num_experts=num_experts,
            num_heads=num_heads,
            top_k=top_k,
            counts_E=torch.zeros(num_experts, dtype=torch.int64, device=device),
            active_sum=torch.zeros((), dtype=torch.int64, device=device),
            dropped=zero.clone(),
            entropy_sum=zero.clone(),
            distinct_hist=torch.zeros(num_heads * top_k + 1, dtype=torch.int64, device=device)
            if multi else None,
            head_counts_HE=torch.zeros(num_heads, num_experts, dtype=torch.int64, device=device)
            if multi else None,
            agree_HH=torch.zeros(num_heads, num_heads, dtype=torch.int64, device=device)
            if multi else None,
        )


class _EntropyHooks:
    """Forward hooks on the model's routers that keep the latest router entropy of each.

    Overwrite (not add) semantics: each forward replaces the slot, and ``update`` consumes it, so
    an evaluation forward between two training steps, or a recomputation under activation
    checkpointing, never double-counts.
    """

    def __init__(self, routers: list[torch.nn.Module]) -> None:
        self.pending: list[tuple[torch.Tensor, int] | None] = [None] * len(routers)
        self.handles = [
            router.register_forward_hook(self._make_hook(slot))
            for slot, router in enumerate(routers)
        ]

    def _make_hook(self, slot: int):
        def hook(module, inputs, output) -> None:
            probs_NE = output.probs_NE
            with torch.no_grad():
                # -sum p ln p; the clamp makes 0 ln 0 = 0. Written out rather than
                # torch.special.entr, which is about 4x slower on CPU (not vectorised).
                probs = probs_NE.detach()
                entropy_sum = -(probs * probs.clamp_min(1e-30).log()).sum().double()
            self.pending[slot] = (entropy_sum, probs_NE.shape[0])

        return hook

    def take(self, slot: int) -> tuple[torch.Tensor, int] | None:
        if slot >= len(self.pending):
            return None
        value, self.pending[slot] = self.pending[slot], None
        return value

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


class RoutingStatsAccumulator:
    """Accumulates per-MoE-layer routing statistics from the ``MoEAux`` list of each forward.

    Usage in a training loop (one ``update`` per forward, ``summary`` at the logging interval)::

        stats = RoutingStatsAccumulator()
        stats.attach(model)                      # optional: router entropy via forward hooks
        out = model(ids); stats.update(out.moe_aux)
        if step % log_every == 0: metrics.update(stats.summary()); stats.reset()

    ``update`` issues a few small tensor ops per layer on the counts' device and never
    synchronises with the host; ``summary`` synchronises once. Definitions: module docstring.

    Overhead (``benchmarks/bench_routing_stats.py``, CPU, one thread, 1024 tokens per step,
    d_model 192, 2 MoE layers): ``update`` + a ``summary`` every 10 steps costs 0.1 ms per
    step for SMoE (8 experts, top-1) and 1.9 ms for MH-MoE h=3 (96 experts, top-3, 3072
    sub-tokens), 0.03% and 0.26% of a training step; the entropy hooks 0.3 ms and 3.5 ms
    (0.07% and 0.48%). Whole-step timings agreed within the machine's noise. The MH-MoE head
    statistics are most of ``update``'s cost (``track_heads=False`` skips them).

    Args:
        prefix: metric name prefix of ``summary`` (``{prefix}/layer{i}/{metric}``).
        min_share: activation threshold (module docstring, ``activation_ratio``).
        log_counts: also put ``tokens_per_expert`` lists (E ints per layer) in ``summary``.
        track_heads: compute the MH-MoE head statistics (distinct experts, head similarity).
    """

    def __init__(
        self,
        prefix: str = "routing",
        min_share: float = 0.0,
        log_counts: bool = False,
        track_heads: bool = True,
    ) -> None:
        _check_min_share(min_share)
        if not isinstance(prefix, str) or not prefix or prefix.endswith("/"):
            raise ValueError(f"prefix={prefix!r}: must be a non-empty name without trailing '/'")
        self.prefix = prefix
        self.min_share = float(min_share)
        self.log_counts = log_counts
        self.track_heads = track_heads
        self._layers: list[_LayerState] = []
        self._hooks: _EntropyHooks | None = None

    # -- router entropy -------------------------------------------------------------------

    def attach(self, model: torch.nn.Module) -> "RoutingStatsAccumulator":
        """Hook every ``TopKRouter`` of ``model`` (module order = MoE layer order) to measure
        the router entropy; ``detach`` removes the hooks. Not needed when ``MoEAux`` carries
        ``router_entropy``."""
        from mhmoe.layers.routing import TopKRouter

        self.detach()
        routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
        self._hooks = _EntropyHooks(routers)
        return self

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None

    # -- accumulation ---------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the window (keeps hooks and options)."""
        self._layers = []

    def update(self, aux_list: Sequence[Any]) -> None:
        """Add one forward's statistics; ``aux_list`` holds one ``MoEAux`` per MoE layer."""
        if isinstance(aux_list, (str, bytes)) or not isinstance(aux_list, Sequence):
            raise ValueError(
                f"aux_list={type(aux_list).__name__}: must be a list of MoEAux, one per MoE layer"
            )
        if not aux_list:
            return  # a dense model: nothing to route
        if self._layers and len(aux_list) != len(self._layers):
            raise ValueError(
                f"aux_list has {len(aux_list)} MoE layers, but this window has "
                f"{len(self._layers)}: call reset() before switching models"
            )
        if self._hooks is not None and len(self._hooks.pending) != len(aux_list):
            raise ValueError(
                f"attached model has {len(self._hooks.pending)} routers, aux_list has "
                f"{len(aux_list)} MoE layers: attach the model that produced aux_list"
            )
        for index, aux in enumerate(aux_list):
            self._update_layer(index, aux)

    def _update_layer(self, index: int, aux: Any) -> None:
        counts_E = aux.tokens_per_expert.detach()
        ids_NK = aux.expert_ids.detach()
        num_heads = int(getattr(aux, "num_heads", 1))
        _check_ids(ids_NK, num_heads)
        num_experts, top_k = counts_E.numel(), ids_NK.shape[1]
        if index == len(self._layers):
            self._layers.append(_LayerState.empty(num_experts, num_heads, top_k, counts_E.device))
        state = self._layers[index]
        if (state.num_experts, state.num_heads, state.top_k) != (num_experts, num_heads, top_k):
            raise ValueError(
                f"MoE layer {index}: (experts, heads, top_k)=({num_experts}, {num_heads}, "
                f"{top_k}) differs from the window's ({state.num_experts}, {state.num_heads}, "
                f"{state.top_k}): call reset() before switching models"
            )
        num_units = ids_NK.shape[0]
        num_assignments = num_units * top_k
        state.num_batches += 1
        state.num_tokens += num_units // num_heads
        state.num_assignments += num_assignments
        state.counts_E += counts_E.to(torch.int64)
        if num_assignments:
            threshold = max(1.0, self.min_share * num_assignments)
            state.active_sum += (counts_E >= threshold).sum()
            state.routed_batches += 1
        dropped = aux.dropped_fraction.detach()
        if dropped.device.type == "cpu":  # a host scalar in mhmoe.layers.moe: read, no sync
            state.dropped_host += float(dropped) * num_assignments
        else:
            state.dropped += dropped.double() * num_assignments
        self._update_entropy(index, state, aux, num_units)
        if num_heads > 1 and self.track_heads and num_units:
            state.distinct_hist += count_values(
                _distinct_per_token(ids_NK, num_heads), num_heads * top_k + 1
            )
            state.head_counts_HE += head_expert_counts(ids_NK, num_heads, num_experts)
            state.agree_HH += _top1_agreement_counts(ids_NK, num_heads)

    def _update_entropy(self, index: int, state: _LayerState, aux: Any, num_units: int) -> None:
        hooked = self._hooks.take(index) if self._hooks is not None else None
        provided = getattr(aux, "router_entropy", None)
        if provided is not None:  # the layer reports the mean entropy over its units
            state.entropy_sum += provided.detach().double().to(state.entropy_sum.device) * num_units
            state.entropy_units += num_units
        elif hooked is not None:
            entropy_sum, units = hooked
            state.entropy_sum += entropy_sum.to(state.entropy_sum.device)
            state.entropy_units += units

    # -- results --------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer_summaries(self) -> list[LayerRoutingSummary]:
        """One ``LayerRoutingSummary`` per MoE layer of the window (empty before any update)."""
        return [self._summarize(i, s) for i, s in enumerate(self._layers)]

    @staticmethod
    def _summarize(index: int, state: _LayerState) -> LayerRoutingSummary:
        counts = state.counts_E.cpu()
        multi = state.num_heads > 1 and state.distinct_hist is not None \
            and int(state.distinct_hist.sum()) > 0
        distinct_mean = hist = head_counts = js = agreement = None
        if multi:
            hist_t = state.distinct_hist.cpu()
            hist = hist_t.tolist()
            distinct_mean = (hist_t.double() * torch.arange(hist_t.numel())).sum().item() \
                / hist_t.sum().item()
            head_counts_t = state.head_counts_HE.cpu()
            head_counts = head_counts_t.tolist()
            js = head_js_divergence(head_counts_t)
            agreement = _pairwise_mean(state.agree_HH.cpu()) / state.num_tokens
        has_units = state.num_assignments > 0
        return LayerRoutingSummary(
            layer=index,
            num_experts=state.num_experts,
            num_heads=state.num_heads,
            top_k=state.top_k,
            num_tokens=state.num_tokens,
            num_batches=state.num_batches,
            tokens_per_expert=counts.tolist(),
            load_imbalance=load_imbalance(counts),
            load_cv=load_cv(counts),
            load_entropy=load_entropy(counts),
            activation_ratio=state.active_sum.item() / (state.routed_batches * state.num_experts)
            if state.routed_batches else None,
            dead_experts=int((counts == 0).sum()),
            dropped_fraction=(state.dropped.item() + state.dropped_host) / state.num_assignments
            if has_units else None,
            router_entropy=state.entropy_sum.item() / state.entropy_units
            if state.entropy_units else None,
            distinct_experts_per_token=distinct_mean,
            distinct_experts_histogram=hist,
            head_js_divergence=js,
            head_top1_agreement=agreement,
            head_tokens_per_expert=head_counts,
        )

    def summary(self) -> dict[str, Any]:
        """Flat metrics for JSON lines: ``{prefix}/layer{i}/{metric}`` for every metric of
        ``SCALAR_METRICS`` that has a value and for ``LAYER_FACTS``, ``{prefix}/mean/{metric}``
        averaged over the MoE layers, and ``{prefix}/layer{i}/tokens_per_expert`` lists when ``log_counts``.
        Empty dict before any update (or for a dense model)."""
        layers = self.layer_summaries()
        return flat_metrics(layers, prefix=self.prefix, log_counts=self.log_counts)


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


# --------------------------------------------------------------------------------------------
# Running a model over data
# --------------------------------------------------------------------------------------------


def _moe_aux_of(output: Any) -> list[Any]:
    aux = getattr(output, "moe_aux", None)
    if aux is not None:
        return list(aux)
    if isinstance(output, tuple) and len(output) == 2 and hasattr(output[1], "expert_ids"):
        return [output[1]]  # a bare MoE layer: (y, MoEAux)
    raise ValueError(
        f"model output {type(output).__name__}: expected an LMOutput with .moe_aux or a "
        "(y, MoEAux) pair"
    )


@torch.no_grad()
def analyze_model(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], min_share: float = 0.0
) -> list[LayerRoutingSummary]:
    """Routing statistics of ``model`` over ``batches`` (each the model's input, e.g. token ids
    (B, T)), one forward per batch, in eval mode; router entropy through forward hooks.

    ``block`` is filled in when the model is a ``TransformerLM`` (its ``config.is_moe_block``).
    The model's training flag is restored afterwards.
    """
    stats = RoutingStatsAccumulator(min_share=min_share)
    was_training = model.training
    model.eval()
    stats.attach(model)
    try:
        for batch in batches:
            stats.update(_moe_aux_of(model(batch)))
    finally:
        stats.detach()
        model.train(was_training)
    layers = stats.layer_summaries()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "is_moe_block"):
        blocks = [i for i in range(config.num_layers) if config.is_moe_block(i)]
        if len(blocks) == len(layers):
            for layer, block in zip(layers, blocks):
                layer.block = block
    return layers


DEFAULT_MAX_TOKENS = 131_072
HELDOUT_CACHE = "eval-heldout"


def token_windows(
    tokens: Any, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Token ids (B, seq_len) batches cut from a 1-D token array: the first ``max_tokens``
    tokens in non-overlapping windows. Only full windows are used (a padded window would route
    padding tokens and count them), and the last batch is dropped when it has fewer rows than
    ``batch_size`` and a full batch exists (the activation ratio depends on the batch size).
    A set shorter than one window gives one shorter window."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r}: must be a positive integer or None")
    ids = torch.from_numpy(
        np.array(tokens[:max_tokens] if max_tokens else tokens[:], dtype=np.int64)
    )
    if ids.dim() != 1 or ids.numel() == 0:
        raise ValueError(f"token array of shape {tuple(ids.shape)}: must be 1-D and non-empty")
    num_windows = ids.numel() // seq_len
    if num_windows == 0:
        return [ids.view(1, -1)]
    windows_WT = ids[: num_windows * seq_len].view(num_windows, seq_len)  # (W*T,) -> (W, T)
    batches = list(windows_WT.split(batch_size))
    if len(batches) > 1 and batches[-1].shape[0] < batch_size:
        batches.pop()
    return batches


def _tokens_from_cache(path: Path) -> Any:
    from mhmoe.data.cache import MANIFEST_SUFFIX, TOKENS_SUFFIX, open_token_file, read_manifest

    name = path.name
    stem = name[: -len(TOKENS_SUFFIX)] if name.endswith(TOKENS_SUFFIX) \
        else name[: -len(MANIFEST_SUFFIX)]
    tokens_path = path.with_name(stem + TOKENS_SUFFIX)
    manifest_path = path.with_name(stem + MANIFEST_SUFFIX)
    if not tokens_path.is_file():
        raise FileNotFoundError(f"{tokens_path}: token file missing (next to {manifest_path})")
    manifest = read_manifest(manifest_path, tokens_path)
    return open_token_file(tokens_path, manifest["dtype"], manifest["n_tokens"])


def _tokens_from_text(path: Path, tokenizer: Any, max_tokens: int | None) -> Any:
    from mhmoe.data.sources import local_source

    # Same layout as the token caches (mhmoe.data.cache): [EOT] doc1 [EOT] doc2 ...; stop
    # encoding once enough tokens are there, so a large folder costs only what is used.
    pieces, total = [], 0
    for document in local_source(path).documents():
        ids = [tokenizer.eot_id, *tokenizer.encode(document)]
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise ValueError(f"{path}: no non-empty document to analyze")
    return np.concatenate(pieces)


def _find_heldout(run_dir: Path, run_config: Mapping[str, Any]) -> Path:
    from mhmoe.data.cache import TOKENS_SUFFIX

    candidates = [run_dir, run_dir / "data"]
    # mhmoe.train records the token-cache folder as "data_dir" (shared by all runs of a
    # reproduce); other path-like settings of the "data" section are tried after it.
    values = [run_config.get("data_dir")]
    data_section = run_config.get("data")
    if isinstance(data_section, Mapping):
        values += list(data_section.values())
    for value in values:
        if isinstance(value, str) and value:
            folder = Path(value) if Path(value).is_absolute() else run_dir / value
            candidates += [folder, Path(value)]
    seen = []
    for folder in candidates:
        if folder in seen or not folder.is_dir():
            continue
        seen.append(folder)
        heldout = folder / f"{HELDOUT_CACHE}{TOKENS_SUFFIX}"
        if heldout.is_file():
            return heldout
    for folder in seen:  # no automatic split: any named evaluation set, by name
        named = sorted(folder.glob(f"eval-*{TOKENS_SUFFIX}"))
        if named:
            return named[0]
    raise ValueError(
        f"{run_dir}: no held-out token cache ({HELDOUT_CACHE}{TOKENS_SUFFIX} or "
        f"eval-*{TOKENS_SUFFIX}) in {[str(f) for f in seen] or [str(run_dir)]}; "
        "pass --data PATH (a .txt/.jsonl/.parquet file or folder, or a .tokens cache)"
    )


def load_analysis_tokens(
    run_dir: str | Path,
    run_config: Mapping[str, Any],
    tokenizer: Any,
    data: str | Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> tuple[Any, str]:
    """(1-D token ids, description) to analyze a run on: ``data`` (a ``.tokens`` cache or its
    manifest, else text files read with ``mhmoe.data.local_source`` and encoded with the run's
    tokenizer), or by default the run's held-out cache ``eval-heldout.tokens`` (searched in
    RUN_DIR, RUN_DIR/data, the run config's ``data_dir`` and the folders named in its ``data``
    section)."""
    run_dir = Path(run_dir)
    if data is None:
        path = _find_heldout(run_dir, run_config)
        return _tokens_from_cache(path), str(path)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if path.name.endswith((".tokens", ".manifest.json")):
        return _tokens_from_cache(path), str(path)
    return _tokens_from_text(path, tokenizer, max_tokens), str(path)


def analyze_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    seq_len: int | None = None,
    step: int | None = None,
    device: str | torch.device | None = None,
    min_share: float = 0.0,
) -> dict[str, Any]:
    """The routing report of a run's checkpoint (``mhmoe analyze``): loads it with
    ``mhmoe.checkpoint.load_run``, runs ``max_tokens`` tokens of held-out (or ``data``) text in
    batches of ``batch_size`` windows of ``seq_len`` (default: the model's ``max_seq_len``)
    tokens, and returns a JSON-able dict::

        {"run_dir", "variant", "data", "num_tokens", "batch_size", "seq_len",
         "layers": [LayerRoutingSummary.to_dict(), ...]}   # [] for a dense model
    """
    from mhmoe.checkpoint import load_run

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, run_config = load_run(run_dir, step=step, device=device)
    tokens, description = load_analysis_tokens(run_dir, run_config, tokenizer, data, max_tokens)
    seq_len = model.config.max_seq_len if seq_len is None else seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len="
                         f"{model.config.max_seq_len}")
    batches = token_windows(tokens, seq_len, batch_size, max_tokens)
    layers = analyze_model(model, (b.to(device) for b in batches), min_share=min_share)
    return {
        "run_dir": str(run_dir),
        "variant": run_config.get("variant"),
        "data": description,
        "num_tokens": int(sum(b.numel() for b in batches)),
        "batch_size": int(batches[0].shape[0]),
        "seq_len": int(batches[0].shape[1]),
        "min_share": min_share,
        "layers": [layer.to_dict() for layer in layers],
    }


# --------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects, Agg canvas: no pyplot, so no global figure state)
# --------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    fig = _new_figure(min(3 + 0.18 * width, 20), 1.5 + 0.45 * len(layers))
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


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


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
