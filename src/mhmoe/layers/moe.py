"""The one MoE core: route units top-k, run the experts grouped, combine.

Shape legend: T tokens, D d_model, H heads (sub-tokens per token), S = D / H unit size,
N = T * H routed units, E experts, K top-k, M = N * K assignments (rows after dispatch),
F expert hidden size.

Every variant of the paper (SMoE, fine-grained SMoE, MH-MoE) calls ``moe_dispatch`` on its
routed units; only what surrounds it differs (``mhmoe.layers.mh_moe``).

Dispatch (dropless by default):
1. route: weights_NK, ids_NK = top-k of softmax(router(x_NS));
2. sort the M = N*K (unit, expert) assignments by expert (stable, so unit order is kept inside
   an expert), gather the rows x_MS in that order;
3. one grouped matmul per expert weight over the sorted rows;
4. put the rows back in assignment order and combine: y_n = sum_k w_nk * Expert_{id_nk}(x_n)
   (paper Section 2.1, step 3).

With a capacity factor c (GShard), each expert keeps at most ceil(c * M / E) assignments,
first choices of every unit before second choices, then in unit order; dropped assignments
contribute zero and their fraction is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mhmoe.layers.experts import Experts
from mhmoe.layers.routing import TopKRouter, load_balancing_loss, router_z_loss


@dataclass
class MoEAux:
    """What an MoE layer reports besides its output; losses are returned, never stored."""

    load_balancing_loss: torch.Tensor  # scalar, E * sum_i f_i P_i over routed units
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2
    tokens_per_expert: torch.Tensor  # (E,) int64, assignments per expert before dropping
    dropped_fraction: torch.Tensor  # scalar float, share of assignments dropped by capacity
    expert_ids: torch.Tensor  # (N, K) int64, detached; N = tokens * num_heads, token-major
    num_heads: int = 1


def expert_capacity(capacity_factor: float, num_assignments: int, num_experts: int) -> int:
    """GShard capacity: ceil(c * M / E) assignments per expert."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def sort_assignments(
    expert_ids_NK: torch.Tensor, num_experts: int, capacity_factor: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the M = N*K assignments by expert; drop those over capacity.

    Returns (kept_order_R, kept_counts_E, tokens_per_expert_E): kept_order_R[r] is the
    assignment index m = n*K + k of sorted row r (R <= M rows kept), kept_counts_E the rows
    per expert after dropping, tokens_per_expert_E the rows per expert before dropping.
    """
    num_units, top_k = expert_ids_NK.shape
    ids_M = expert_ids_NK.reshape(-1)  # (N, K) -> (M,), m = n * K + k
    tokens_per_expert_E = torch.bincount(ids_M, minlength=num_experts)
    if capacity_factor is None:
        order_M = torch.argsort(ids_M, stable=True)
        return order_M, tokens_per_expert_E, tokens_per_expert_E
    num_assignments = ids_M.numel()
    capacity = expert_capacity(capacity_factor, num_assignments, num_experts)
    # Priority inside an expert: choice rank k first, then unit n (GShard: all top-1 choices
    # are served before any top-2 choice).
    assignment_M = torch.arange(num_assignments, device=ids_M.device)
    rank_M = assignment_M % top_k
    unit_M = assignment_M // top_k
    priority_key_M = (ids_M * top_k + rank_M) * num_units + unit_M
    order_M = torch.argsort(priority_key_M)
    start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    position_M = torch.arange(num_assignments, device=ids_M.device) - start_E[ids_M[order_M]]
    kept_order_R = order_M[position_M < capacity]
    kept_counts_E = tokens_per_expert_E.clamp(max=capacity)
    return kept_order_R, kept_counts_E, tokens_per_expert_E


def moe_dispatch(
    x_NS: torch.Tensor,
    router: TopKRouter,
    experts: Experts,
    capacity_factor: float | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """Top-k MoE over N routed units: y_n = sum_k G(x_n)_k * Expert_{id_nk}(x_n)."""
    num_units, d_unit = x_NS.shape
    route = router(x_NS)
    num_experts, top_k = router.num_experts, router.top_k

    kept_order_R, kept_counts_E, tokens_per_expert_E = sort_assignments(
        route.expert_ids_NK, num_experts, capacity_factor
    )
    unit_of_row_R = kept_order_R // top_k
    x_RS = x_NS[unit_of_row_R]  # gather rows, sorted by expert
    offsets_E = torch.cumsum(kept_counts_E, 0).to(torch.int32)
    y_RS = experts(x_RS, offsets_E)

    # Back to assignment order m = n*K + k; dropped assignments stay zero.
    y_MS = y_RS.new_zeros(num_units * top_k, d_unit).index_copy(0, kept_order_R, y_RS)
    y_NKS = y_MS.view(num_units, top_k, d_unit)  # (M, S) -> (N, K, S)
    weights_N1K = route.weights_NK.to(y_NKS.dtype).unsqueeze(1)
    y_NS = torch.bmm(weights_N1K, y_NKS).squeeze(1)  # sum_k w_nk * y_nk

    num_assignments = max(num_units * top_k, 1)
    aux = MoEAux(
        load_balancing_loss=load_balancing_loss(route.probs_NE, tokens_per_expert_E),
        z_loss=router_z_loss(route.logits_NE),
        tokens_per_expert=tokens_per_expert_E,
        dropped_fraction=torch.tensor(1.0 - kept_order_R.numel() / num_assignments)
        if capacity_factor is not None
        else torch.tensor(0.0),
        expert_ids=route.expert_ids_NK.detach(),
    )
    return y_NS, aux


def moe_dispatch_reference(
    x_NS: torch.Tensor,
    router: TopKRouter,
    experts: Experts,
    capacity_factor: float | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """Plain per-expert Python loop (the HF transformers v4 pattern), kept for tests.

    Same router, same capacity rule written out as loops; no sorting, no grouped matmul.
    """
    num_units, d_unit = x_NS.shape
    route = router(x_NS)
    num_experts, top_k = router.num_experts, router.top_k
    ids_NK = route.expert_ids_NK
    capacity = (
        expert_capacity(capacity_factor, num_units * top_k, num_experts)
        if capacity_factor is not None
        else None
    )
    y_NS = x_NS.new_zeros(num_units, d_unit)
    kept = 0
    for expert in range(num_experts):
        units, ranks = [], []
        for rank in range(top_k):  # first choices before second choices
            for unit in range(num_units):
                if int(ids_NK[unit, rank]) == expert:
                    units.append(unit)
                    ranks.append(rank)
        if capacity is not None:
            units, ranks = units[:capacity], ranks[:capacity]
        if not units:
            continue
        kept += len(units)
        unit_index = torch.tensor(units, device=x_NS.device)
        rank_index = torch.tensor(ranks, device=x_NS.device)
        out_RS = experts.forward_one(expert, x_NS[unit_index])
        weight_R1 = route.weights_NK[unit_index, rank_index].to(out_RS.dtype).unsqueeze(1)
        y_NS = y_NS.index_add(0, unit_index, weight_R1 * out_RS)
    tokens_per_expert_E = torch.bincount(ids_NK.reshape(-1), minlength=num_experts)
    aux = MoEAux(
        load_balancing_loss=load_balancing_loss(route.probs_NE, tokens_per_expert_E),
        z_loss=router_z_loss(route.logits_NE),
        tokens_per_expert=tokens_per_expert_E,
        dropped_fraction=torch.tensor(1.0 - kept / max(num_units * top_k, 1)),
        expert_ids=ids_NK.detach(),
    )
    return y_NS, aux
