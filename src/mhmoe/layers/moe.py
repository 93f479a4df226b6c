"""The one MoE core: route units top-k, run the experts on the sorted assignments, combine.

Shape legend: T tokens, D d_model, H heads (sub-tokens per token), S = D / H unit size,
N = T * H routed units, E experts, K top-k, M = N * K assignments (rows after dispatch),
F expert hidden size.

Every variant of the paper (SMoE, fine-grained SMoE, MH-MoE) calls ``moe_dispatch`` on its
routed units; only what surrounds it differs (``mhmoe.layers.mh_moe``).

Dispatch (dropless by default), paper Section 2.1 step 3:
1. route: weights_NK, ids_NK = top-k of softmax(router(x_NS));
2. permute: sort the M = N*K (unit, expert) assignments by expert (stable, so unit order is
   kept inside an expert; ``sort_assignments``) and gather the rows x_RS in that order;
3. compute: every expert on its block of rows;
4. unpermute and combine: y_n = sum_k w_nk * Expert_{id_nk}(x_n).

``moe_dispatch`` = route -> ``sort_assignments`` -> backend -> ``routing_aux`` (the losses).
A backend runs steps 2-4 with one signature, ``compute(x_NS, weights_NK, kept_order_R,
kept_counts_E, experts) -> y_NS`` (``DispatchCompute``); the registered ones
(``DISPATCH_BACKENDS``, chosen per call by ``select_backend``) replace only what they must:

* ``"grouped"``: gather (``gather_units``), the experts' own forward (``grouped_mm``; for
  BitNet's quantised experts, their quantised math), ``combine_assignments``; plain autograd.
* ``"blocked"`` (CPU default with many rows per expert): gather + experts + combine as one
  autograd Function on the raw stacked weights, saving nothing of size (M, .)
  (``_BlockedDispatch``).
* ``"reference"``: the experts one by one on their rows (``forward_one``, plain matmuls).

Small batches (decoding: a few tokens per step): with at most ``SMALL_BATCH_MAX_ASSIGNMENTS``
assignments on CPU, dropless, and no backend chosen, ``moe_dispatch`` skips the sort and the
grouped machinery: ``small_batch_compute`` runs only the experts that were chosen. Small plain
experts (MH-MoE's) as three batched matmuls over their gathered weights (equal to the
reference up to float rounding); others (large experts, BitNet's) by reading the ids once to
the host and running each chosen expert's ``forward_one`` (plain or integer matmuls) on its
units, in ascending expert order with units in order: exactly the "reference" backend's sums
in its order (the same values, bit for bit).

Expert parallelism (``mhmoe.distributed.expert_parallel``) installs its backend on the layer
(``MHMoE.dispatch_backend``): gather and combine as in "grouped", with all-to-alls between them.

With a capacity factor c (GShard), each expert keeps at most ceil(c * M / E) assignments;
dropped assignments contribute zero and their fraction is reported. Which ones are kept is the
``priority`` (``CAPACITY_PRIORITIES``):

* ``"position"`` (default): position in the sequence first, then sequence, sub-token and
  choice rank. No assignment of the token at position t can be dropped because of a token after
  t, so a decoder LM stays causal under capacity (issue 15: with GShard's order and top-k >= 2
  a later token's first choice evicted an earlier token's second choice, so the logits at t
  changed with the tokens after t).
* ``"choice"``: GShard (Lepikhin et al. 2020, Algorithm 1; Switch Transformer's
  "batch-prioritised" order is its k = 1 case): every unit's first choice before any second
  choice, then in unit order. Not causal for top-k >= 2.

``MHMoE`` applies the capacity in training only (``MoEConfig.capacity_at_eval``): evaluation,
``generate`` and the HF model are dropless by default, so perplexity does not depend on which
sequences share an evaluation batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.config import CAPACITY_PRIORITIES
from mhmoe.layers.experts import (
    DISPATCH_BACKENDS,
    DispatchBackend,
    DispatchCompute,
    Experts,
    block_backward,
    block_forward,
    fused_up_weight,
    select_backend,
)
from mhmoe.layers.routing import (
    RouterOutput,
    TopKRouter,
    count_values,
    sequence_balance_loss,
)


@dataclass
class MoEAux:
    """What an MoE layer reports besides its output; losses are returned, never stored."""

    load_balancing_loss: torch.Tensor  # scalar, E * sum_i f_i P_i over routed units
    z_loss: torch.Tensor  # scalar, mean logsumexp(logits)^2
    tokens_per_expert: torch.Tensor  # (E,) int64, assignments per expert before dropping
    dropped_fraction: torch.Tensor  # scalar float, share of assignments dropped by capacity
    expert_ids: torch.Tensor  # (N, K) int64, detached; N = tokens * num_heads, token-major
    num_heads: int = 1
    # DeepSeek-V3's sequence-wise balance loss (unweighted), when the layer was asked for it.
    seq_balance_loss: torch.Tensor | None = None
    # The aux-free selection bias (E,) at this forward (detached), None without aux-free.
    expert_bias: torch.Tensor | None = None


def expert_capacity(capacity_factor: float, num_assignments: int, num_experts: int) -> int:
    """GShard capacity: ceil(c * M / E) assignments per expert."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def sort_assignments(
    expert_ids_NK: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None,
    priority: str = "position",
    seq_len: int | None = None,
    num_heads: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Order the M = N*K assignments by expert; drop those over capacity.

    Returns (kept_order_R, kept_counts_E, tokens_per_expert_E): kept_order_R[r] is the
    assignment index m = n*K + k of sorted row r (R <= M rows kept), kept_counts_E the rows
    per expert after dropping, tokens_per_expert_E the rows per expert before dropping.
    ``priority`` (``CAPACITY_PRIORITIES``): which assignments a full expert keeps; for
    ``"position"``, units are n = (b * seq_len + t) * num_heads + h (token-major, as ``MHMoE``
    lays them out; seq_len None: one sequence).
    """
    if priority not in CAPACITY_PRIORITIES:
        raise ValueError(f"capacity priority {priority!r}: must be one of {', '.join(CAPACITY_PRIORITIES)}")
    num_units, top_k = expert_ids_NK.shape
    ids_M = expert_ids_NK.reshape(-1)  # (N, K) -> (M,), m = n * K + k
    tokens_per_expert_E = count_values(ids_M, num_experts)
    if capacity_factor is None:
        order_M = torch.argsort(ids_M, stable=True)
        return order_M, tokens_per_expert_E, tokens_per_expert_E
    num_assignments = ids_M.numel()
    capacity = expert_capacity(capacity_factor, num_assignments, num_experts)
    assignment_M = torch.arange(num_assignments, device=ids_M.device)
    if priority == "choice":
        # GShard: choice rank k first, then unit n (all top-1 choices before any top-2 choice).
        rank_M = assignment_M % top_k
        unit_M = assignment_M // top_k
        within_M = rank_M * num_units + unit_M
    else:
        # Position-major: position t, then sequence b, then (sub-token h, rank k), i.e. the
        # assignment index inside the token. Only positions <= t compete before t's choices.
        units_per_token = num_heads * top_k
        num_tokens = num_units // num_heads
        length = max(num_tokens if seq_len is None else seq_len, 1)
        if num_tokens % length:
            raise ValueError(f"{num_tokens} tokens are not whole sequences of seq_len={length}")
        token_M = assignment_M // units_per_token
        position_M, sequence_M = token_M % length, token_M // length
        within_M = ((position_M * (num_tokens // length) + sequence_M) * units_per_token
                    + assignment_M % units_per_token)
    priority_key_M = ids_M * num_assignments + within_M
    order_M = torch.argsort(priority_key_M)
    start_E = torch.cumsum(tokens_per_expert_E, 0) - tokens_per_expert_E
    position_M = torch.arange(num_assignments, device=ids_M.device) - start_E[ids_M[order_M]]
    kept_order_R = order_M[position_M < capacity]
    kept_counts_E = tokens_per_expert_E.clamp(max=capacity)
    return kept_order_R, kept_counts_E, tokens_per_expert_E


class _BlockedDispatch(torch.autograd.Function):
    """Gather, experts (``block_forward``) and combine of sorted assignments, in one Function.

    Inputs: x_NS (N, S); weights_NK (N, K) combine weights in x's dtype; the expert weights
    (w3 None for ReLU experts); kept_order_R (R,) the assignment index m = n*K + k of each
    sorted row; counts_E the rows per expert (Python ints, sum R); save_hidden_max_bytes the
    largest hidden pre-activations kept for backward (``Experts.save_hidden_max_bytes``). Output
    y_NS = sum_k w_nk * Expert_{id_nk}(x_n), dropped assignments contributing zero.

    Expert by expert, its rows are gathered (index_select), run through the expert while in
    cache, and added into y_NS weighted (index_add_, a scatter-add straight from the block:
    no (M, S) re-ordering and no bmm). Backward mirrors it: gather the rows and the output
    gradient again, run ``block_backward`` (hidden activations recomputed), scatter-add the
    input gradient. Nothing of size (M, .) is written to memory or saved: on CPU, traffic to
    memory, not arithmetic, is what separates small experts from large ones. Not twice
    differentiable.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x_NS: torch.Tensor,
        weights_NK: torch.Tensor,
        w1_EFS: torch.Tensor,
        w3_EFS: torch.Tensor | None,
        w2_ESF: torch.Tensor,
        kept_order_R: torch.Tensor,
        counts_E: list[int],
        save_hidden_max_bytes: int,
    ) -> torch.Tensor:
        num_units, d_unit = x_NS.shape
        top_k = weights_NK.shape[1]
        swiglu = w3_EFS is not None
        x_NS = x_NS.contiguous()
        w_up_EGS = fused_up_weight(w1_EFS, w3_EFS)  # (E, 2F, S) SwiGLU, (E, F, S) ReLU
        unit_of_row_R = kept_order_R // top_k
        weight_of_row_R1 = weights_NK.reshape(-1).index_select(0, kept_order_R).unsqueeze(1)
        y_NS = x_NS.new_zeros(num_units, d_unit)
        units = torch.split(unit_of_row_R, counts_E)
        row_weights = torch.split(weight_of_row_R1, counts_E)
        hidden_bytes = kept_order_R.numel() * w_up_EGS.shape[1] * x_NS.element_size()
        save_hidden = torch.is_grad_enabled() and hidden_bytes <= save_hidden_max_bytes
        hidden_per_expert = []
        for expert, count in enumerate(counts_E):
            if count == 0:
                hidden_per_expert.append(None)
                continue
            x_rS = x_NS.index_select(0, units[expert])  # gather this expert's rows
            y_rS, h_rG = block_forward(x_rS, w_up_EGS[expert], w2_ESF[expert], swiglu)
            hidden_per_expert.append(h_rG if save_hidden else None)
            y_NS.index_add_(0, units[expert], y_rS.mul_(row_weights[expert]))  # += w_nk y_nk
        # Nothing of size (M, .) is saved unless small: backward gathers again and recomputes.
        ctx.save_for_backward(x_NS, weight_of_row_R1, unit_of_row_R, kept_order_R, w_up_EGS,
                              w2_ESF)
        ctx.hidden_per_expert = hidden_per_expert if save_hidden else None
        ctx.counts_E = counts_E
        ctx.swiglu = swiglu
        ctx.top_k = top_k
        return y_NS

    @staticmethod
    def backward(ctx, grad_y_NS: torch.Tensor):  # type: ignore[override]
        x_NS, weight_of_row_R1, unit_of_row_R, kept_order_R, w_up_EGS, w2_ESF = (
            ctx.saved_tensors
        )
        counts_E, swiglu, top_k = ctx.counts_E, ctx.swiglu, ctx.top_k
        hidden_per_expert = ctx.hidden_per_expert or [None] * len(counts_E)
        ctx.hidden_per_expert = None
        need_x, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_units, d_unit = x_NS.shape
        grad_y_NS = grad_y_NS.contiguous()

        grad_w_up_EGS = torch.zeros_like(w_up_EGS)
        grad_w2_ESF = torch.zeros_like(w2_ESF)
        grad_x_NS = torch.zeros_like(x_NS) if need_x else None
        grad_x_block = x_NS.new_empty(max(counts_E, default=0), d_unit) if need_x else None
        grad_weight_R = x_NS.new_empty(kept_order_R.numel()) if need_weights else None
        units = torch.split(unit_of_row_R, counts_E)
        row_weights = torch.split(weight_of_row_R1, counts_E)
        grad_weights = torch.split(grad_weight_R, counts_E) if need_weights else None
        for expert, count in enumerate(counts_E):
            if count == 0:
                continue
            grad_x_rS = grad_x_block[:count] if need_x else None
            grad_weight_r = block_backward(
                x_NS.index_select(0, units[expert]),  # gather again (cheaper than saving)
                grad_y_NS.index_select(0, units[expert]),  # dL/dy_n of the rows' units
                row_weights[expert],
                w_up_EGS[expert],
                w2_ESF[expert],
                swiglu,
                grad_w_up_EGS[expert],
                grad_w2_ESF[expert],
                grad_x_rS,
                need_weight_grad=need_weights,
                h_rG=hidden_per_expert[expert],
            )
            if need_weights:  # dL/dw_nk = <dL/dy_n, Expert(x_n)>
                grad_weights[expert].copy_(grad_weight_r)
            if need_x:
                grad_x_NS.index_add_(0, units[expert], grad_x_rS)  # sum over the K choices
        grad_weights_NK = None
        if need_weights:
            grad_weights_M = grad_weight_R.new_zeros(num_units * top_k)
            grad_weights_M.index_copy_(0, kept_order_R, grad_weight_R)  # dropped: zero
            grad_weights_NK = grad_weights_M.view(num_units, top_k)
        if swiglu:
            d_hidden = w_up_EGS.shape[1] // 2
            grad_w1, grad_w3 = grad_w_up_EGS[:, :d_hidden], grad_w_up_EGS[:, d_hidden:]
        else:
            grad_w1, grad_w3 = grad_w_up_EGS, None
        return grad_x_NS, grad_weights_NK, grad_w1, grad_w3, grad_w2_ESF, None, None, None


SMALL_BATCH_MAX_ASSIGNMENTS = 96
"""At most this many assignments (units x top-k) on CPU: ``small_batch_compute`` (module
docstring). Decoding at batch 8 routes 8 units top-1 (SMoE) or 24 units top-3 (MH-MoE h=3,
72 assignments). Measured per `mini` MoE layer forward (CPU time, loaded machine): SMoE 1
token 0.8 ms vs 3.5 ms grouped; 8 tokens 5.4 vs 7.1 ms; h=3 8 tokens (gathered) 3.1 vs 5.8 ms."""


def use_small_batch(x_NS: torch.Tensor, num_assignments: int, experts: nn.Module,
                    capacity_factor: float | None, backend: DispatchCompute | None) -> bool:
    """Whether ``moe_dispatch`` takes the small-batch path (module docstring): plain ``Experts``
    or experts with a ``forward_blocks`` (BitNet's), never a subclass's own ``forward`` that the
    small-batch math would bypass."""
    consistent = type(experts).forward is Experts.forward or hasattr(experts, "forward_blocks")
    return (
        consistent
        and backend is None
        and capacity_factor is None
        and x_NS.device.type == "cpu"
        and 0 < num_assignments <= SMALL_BATCH_MAX_ASSIGNMENTS
        and getattr(experts, "implementation", None) is None
        and not torch.compiler.is_compiling()
    )


SMALL_BATCH_GATHER_MAX_BYTES = 8 * 2**20
"""Plain ``Experts`` whose M chosen weight sets take at most this many bytes run as batched
matmuls over gathered weights (``gathered_small_batch_compute``)."""


def gathers_weights(experts: nn.Module, num_assignments: int) -> bool:
    """Whether the small-batch path gathers the chosen experts' weights (plain stacked
    ``Experts`` with small experts: MH-MoE's), instead of one ``forward_one`` per expert."""
    if type(experts).forward is not Experts.forward:  # experts with their own math (BitNet)
        return False
    per_expert = sum(w[0].numel() * w.element_size() for w in experts.parameters(recurse=False))
    return num_assignments * per_expert <= SMALL_BATCH_GATHER_MAX_BYTES


def gathered_small_batch_compute(x_NS: torch.Tensor, weights_NK: torch.Tensor, expert_ids_NK: torch.Tensor,
                                 experts: Experts) -> torch.Tensor:
    """y_n = sum_k w_nk * Expert_{id_nk}(x_n) as three batched matmuls over the M = N*K chosen
    experts' weights, gathered (a copy of M weight sets: small by ``gathers_weights``); a
    dozen ops whatever M, where a loop over the chosen experts issues a dozen per expert
    (MH-MoE h=3 decoding routes 3 sub-tokens top-3: 9 experts per token)."""
    num_units, top_k = weights_NK.shape
    ids_M = expert_ids_NK.reshape(-1)  # (N, K) -> (M,), m = n * K + k
    x_M1S = x_NS.repeat_interleave(top_k, dim=0).unsqueeze(1)  # (N, S) -> (M, 1, S)
    gate_M1F = torch.bmm(x_M1S, experts.w1.index_select(0, ids_M).transpose(1, 2))
    if experts.activation == "swiglu":
        up_M1F = torch.bmm(x_M1S, experts.w3.index_select(0, ids_M).transpose(1, 2))
        hidden_M1F = F.silu(gate_M1F) * up_M1F
    else:
        hidden_M1F = F.relu(gate_M1F)
    y_M1S = torch.bmm(hidden_M1F, experts.w2.index_select(0, ids_M).transpose(1, 2))
    y_NKS = y_M1S.view(num_units, top_k, x_NS.shape[1])  # (M, 1, S) -> (N, K, S)
    return torch.bmm(weights_NK.to(y_NKS.dtype).unsqueeze(1), y_NKS).squeeze(1)  # sum_k w_nk y_nk


def small_batch_compute(x_NS: torch.Tensor, weights_NK: torch.Tensor, expert_ids_NK: torch.Tensor,
                        experts: nn.Module) -> torch.Tensor:
    """y_n = sum_k w_nk * Expert_{id_nk}(x_n), running only the chosen experts, no sort.

    Small plain experts: ``gathered_small_batch_compute`` (equal to the reference up to float
    rounding). Otherwise the M = N*K ids are read once (M is small); each chosen expert, in
    ascending order, runs ``forward_one`` on its units (in unit order) and its weighted rows are
    added into y_NS: the operations of ``reference_compute``, in its order, without its sort.
    """
    if gathers_weights(experts, expert_ids_NK.numel()):
        return gathered_small_batch_compute(x_NS, weights_NK, expert_ids_NK, experts)
    top_k = weights_NK.shape[1]
    assignments_by_expert: dict[int, list[int]] = {}
    for assignment, expert in enumerate(expert_ids_NK.reshape(-1).tolist()):  # m = n * K + k
        assignments_by_expert.setdefault(expert, []).append(assignment)
    weights_M = weights_NK.reshape(-1)  # (N, K) -> (M,)
    y_NS = x_NS.new_zeros(x_NS.shape)
    forward_blocks = getattr(experts, "forward_blocks", None)
    if forward_blocks is not None:
        # Experts with a blocks forward (BitNet's): all chosen experts' rows in one call,
        # sorted by expert on the host (M is small), then one weighted scatter-add in that
        # order: the reference's additions in the reference's order.
        order, blocks = [], []
        for expert in sorted(assignments_by_expert):
            rows = assignments_by_expert[expert]
            blocks.append((expert, len(order), len(order) + len(rows)))
            order += rows
        order_r = torch.tensor(order, dtype=torch.int64, device=x_NS.device)
        units_r = order_r // top_k
        out_rS = forward_blocks(x_NS.index_select(0, units_r), blocks)
        weight_r1 = weights_M[order_r].to(out_rS.dtype).unsqueeze(1)
        return y_NS.index_add(0, units_r, weight_r1 * out_rS)
    for expert in sorted(assignments_by_expert):  # at most M distinct experts
        order_r = torch.tensor(assignments_by_expert[expert], dtype=torch.int64, device=x_NS.device)
        units_r = order_r // top_k
        out_rS = experts.forward_one(expert, x_NS[units_r])
        weight_r1 = weights_M[order_r].to(out_rS.dtype).unsqueeze(1)
        y_NS = y_NS.index_add(0, units_r, weight_r1 * out_rS)
    return y_NS


def moe_dispatch(
    x_NS: torch.Tensor,
    router: TopKRouter,
    experts: nn.Module,
    capacity_factor: float | None = None,
    backend: DispatchCompute | None = None,
    *,
    priority: str = "position",
    seq_len: int | None = None,
    num_heads: int = 1,
    balance_counts_E: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """Top-k MoE over N routed units: y_n = sum_k G(x_n)_k * Expert_{id_nk}(x_n).

    ``backend``: the compute step (steps 2-4) to run; None picks a registered one per call.
    ``priority``/``seq_len``/``num_heads``: the capacity rule (``sort_assignments``).
    ``balance_counts_E``: the assignment counts f_i of the load-balancing loss is computed from
    (global-batch balancing); None: this call's own counts. ``num_sequences``: also compute the
    sequence-wise balance loss over that many equal sequences of units.
    """
    route = router(x_NS)
    num_experts = router.num_experts
    if use_small_batch(x_NS, route.expert_ids_NK.numel(), experts, capacity_factor, backend):
        y_NS = small_batch_compute(x_NS, route.weights_NK, route.expert_ids_NK, experts)
        tokens_per_expert_E = count_values(route.expert_ids_NK, num_experts)
        aux = routing_aux(route, tokens_per_expert_E, route.expert_ids_NK.numel(), None, balance_counts_E)
        if num_sequences is not None:
            aux.seq_balance_loss = sequence_balance_loss(route.probs_NE, route.expert_ids_NK, num_sequences)
        return y_NS, aux
    kept_order_R, kept_counts_E, tokens_per_expert_E = sort_assignments(
        route.expert_ids_NK, num_experts, capacity_factor, priority, seq_len, num_heads
    )
    if backend is None:
        rows_per_expert = route.expert_ids_NK.numel() / max(num_experts, 1)
        backend = DISPATCH_BACKENDS[select_backend(experts, x_NS, rows_per_expert)].compute
    y_NS = backend(x_NS, route.weights_NK, kept_order_R, kept_counts_E, experts)
    aux = routing_aux(route, tokens_per_expert_E, kept_order_R.numel(), capacity_factor, balance_counts_E)
    if num_sequences is not None:
        aux.seq_balance_loss = sequence_balance_loss(route.probs_NE, route.expert_ids_NK, num_sequences)
    return y_NS, aux


def routing_aux(
    route: RouterOutput,
    tokens_per_expert_E: torch.Tensor,
    kept_assignments: int,
    capacity_factor: float | None,
    balance_counts_E: torch.Tensor | None = None,
) -> MoEAux:
    """The losses and counts every dispatch reports (``MoEAux``); the load-balancing loss
    takes f_i from ``balance_counts_E`` when given (global-batch), else from this call."""
    num_assignments = max(route.expert_ids_NK.numel(), 1)
    counts_E = tokens_per_expert_E if balance_counts_E is None else balance_counts_E
    return MoEAux(
        # From the router's P_E and logsumexp_N: no pass over the (N, E) probabilities.
        load_balancing_loss=route.load_balancing_loss_value(counts_E),
        z_loss=route.z_loss_value(),
        tokens_per_expert=tokens_per_expert_E,
        dropped_fraction=torch.tensor(1.0 - kept_assignments / num_assignments)
        if capacity_factor is not None
        else torch.tensor(0.0),
        expert_ids=route.expert_ids_NK.detach(),
    )


def combine_assignments(
    y_RS: torch.Tensor, kept_order_R: torch.Tensor, weights_NK: torch.Tensor
) -> torch.Tensor:
    """Step 4: rows sorted by expert back to assignment order m = n*K + k (dropped ones stay
    zero), then y_n = sum_k w_nk * y_nk."""
    num_units, top_k = weights_NK.shape
    y_MS = unsort_rows(y_RS, kept_order_R, num_units * top_k)
    y_NKS = y_MS.view(num_units, top_k, y_RS.shape[1])  # (M, S) -> (N, K, S)
    weights_N1K = weights_NK.to(y_NKS.dtype).unsqueeze(1)
    return torch.bmm(weights_N1K, y_NKS).squeeze(1)  # sum_k w_nk * y_nk


def unsort_rows(rows_RS: torch.Tensor, kept_order_R: torch.Tensor, num_assignments: int) -> torch.Tensor:
    """Rows sorted by expert back to assignment order m = n*K + k: (R, S) -> (M, S); rows of
    assignments dropped by capacity are zero."""
    if rows_RS.shape[0] == num_assignments:  # dropless: every row is written
        rows_MS = rows_RS.new_empty(num_assignments, rows_RS.shape[1])
    else:
        rows_MS = rows_RS.new_zeros(num_assignments, rows_RS.shape[1])
    return rows_MS.index_copy_(0, kept_order_R, rows_RS)


class _GatherUnits(torch.autograd.Function):
    """x_RS = x_NS[unit of each sorted row] (row r holds assignment m = kept_order_R[r], unit
    m // K).

    Its backward sums each unit's K row gradients as a reshape and a sum: (R, S) -> (M, S)
    (a copy to assignment order) -> (N, K, S) -> (N, S). Plain indexing would backpropagate
    through an accumulating ``index_put_``, which runs serially on CPU.
    """

    @staticmethod
    def forward(ctx, x_NS: torch.Tensor, kept_order_R: torch.Tensor, top_k: int):  # type: ignore[override]
        ctx.save_for_backward(kept_order_R)
        ctx.num_units, ctx.top_k = x_NS.shape[0], top_k
        return x_NS.index_select(0, kept_order_R // top_k)

    @staticmethod
    def backward(ctx, grad_RS: torch.Tensor):  # type: ignore[override]
        (kept_order_R,) = ctx.saved_tensors
        grad_MS = unsort_rows(grad_RS.contiguous(), kept_order_R, ctx.num_units * ctx.top_k)
        grad_NKS = grad_MS.view(ctx.num_units, ctx.top_k, grad_RS.shape[1])  # (M, S) -> (N, K, S)
        return grad_NKS.sum(1), None, None


def gather_units(x_NS: torch.Tensor, kept_order_R: torch.Tensor, top_k: int) -> torch.Tensor:
    """Step 2's gather: x_RS, row r the unit of assignment kept_order_R[r] (``_GatherUnits``)."""
    return _GatherUnits.apply(x_NS, kept_order_R, top_k)


def grouped_compute(x_NS: torch.Tensor, weights_NK: torch.Tensor, kept_order_R: torch.Tensor,
                    kept_counts_E: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """"grouped": gather, the experts' own forward (``grouped_mm``), combine; plain autograd."""
    x_RS = gather_units(x_NS, kept_order_R, weights_NK.shape[1])
    offsets_E = torch.cumsum(kept_counts_E, 0).to(torch.int32)
    return combine_assignments(experts(x_RS, offsets_E), kept_order_R, weights_NK)


def blocked_compute(x_NS: torch.Tensor, weights_NK: torch.Tensor, kept_order_R: torch.Tensor,
                    kept_counts_E: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """"blocked": ``_BlockedDispatch`` on the raw stacked weights.

    Under autocast the block matmuls would see autocast's low-precision activations next to the
    float32 weights, which the in-place and ``out=`` kernels inside the Function refuse. So the
    cast autocast would make is made here, outside the Function (the casts stay in the autograd
    graph and their backward returns float32 gradients), and the Function runs with autocast off,
    in that one dtype: the grouped backend's precision."""
    device_type = x_NS.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x_NS.dtype
    w3_EFS = experts.w3.to(dtype) if experts.activation == "swiglu" else None
    with torch.autocast(device_type, enabled=False):
        return _BlockedDispatch.apply(x_NS.to(dtype), weights_NK.to(dtype), experts.w1.to(dtype), w3_EFS,
                                      experts.w2.to(dtype), kept_order_R, kept_counts_E.tolist(),
                                      experts.save_hidden_max_bytes)


def reference_compute(x_NS: torch.Tensor, weights_NK: torch.Tensor, kept_order_R: torch.Tensor,
                      kept_counts_E: torch.Tensor, experts: nn.Module) -> torch.Tensor:
    """"reference": expert by expert, its rows through ``forward_one`` (plain matmuls), weighted
    and added into y_NS: the per-expert loop of HF transformers v4, no grouped matmul."""
    top_k = weights_NK.shape[1]
    weights_M = weights_NK.reshape(-1)  # (N, K) -> (M,), m = n * K + k
    y_NS = x_NS.new_zeros(x_NS.shape)
    for expert, order_r in enumerate(torch.split(kept_order_R, kept_counts_E.tolist())):
        if order_r.numel() == 0:
            continue
        units_r = order_r // top_k
        out_rS = experts.forward_one(expert, x_NS[units_r])
        weight_r1 = weights_M[order_r].to(out_rS.dtype).unsqueeze(1)
        y_NS = y_NS.index_add(0, units_r, weight_r1 * out_rS)
    return y_NS


DISPATCH_BACKENDS.update(
    grouped=DispatchBackend(grouped_compute),
    blocked=DispatchBackend(blocked_compute, reads_raw_weights=True),
    reference=DispatchBackend(reference_compute),
)


def moe_dispatch_reference(
    x_NS: torch.Tensor,
    router: TopKRouter,
    experts: nn.Module,
    capacity_factor: float | None = None,
    *,
    priority: str = "position",
    seq_len: int | None = None,
    num_heads: int = 1,
    balance_counts_E: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> tuple[torch.Tensor, MoEAux]:
    """``moe_dispatch`` written plainly, kept for tests: the same router, the capacity rule as
    Python loops instead of ``sort_assignments``, then the "reference" backend."""
    route = router(x_NS)
    num_units, top_k = route.expert_ids_NK.shape
    ids_NK = route.expert_ids_NK.tolist()
    capacity = (
        expert_capacity(capacity_factor, num_units * top_k, router.num_experts)
        if capacity_factor is not None
        else num_units * top_k
    )
    if priority == "choice":
        # First choices of all units before second choices, each in unit order (GShard).
        candidates = [(unit, rank) for rank in range(top_k) for unit in range(num_units)]
    else:
        # Position in the sequence, then sequence, then sub-token and rank (causal).
        num_tokens = num_units // num_heads
        length = seq_len or num_tokens
        candidates = sorted(
            ((unit, rank) for unit in range(num_units) for rank in range(top_k)),
            key=lambda ur: ((ur[0] // num_heads) % length, (ur[0] // num_heads) // length, ur[0], ur[1]),
        )
    kept_order, kept_counts = [], []
    for expert in range(router.num_experts):
        rows = [unit * top_k + rank for unit, rank in candidates if ids_NK[unit][rank] == expert][:capacity]
        kept_order += rows
        kept_counts.append(len(rows))
    kept_order_R = torch.tensor(kept_order, dtype=torch.int64, device=x_NS.device)
    y_NS = reference_compute(x_NS, route.weights_NK, kept_order_R, torch.tensor(kept_counts), experts)
    # The same router statistics as moe_dispatch: this reference checks the dispatch; the
    # router's fused math is checked against the plain formulas in tests/test_layers.py.
    tokens_per_expert_E = torch.bincount(route.expert_ids_NK.reshape(-1), minlength=router.num_experts)
    aux = routing_aux(route, tokens_per_expert_E, len(kept_order), capacity_factor, balance_counts_E)
    if num_sequences is not None:
        aux.seq_balance_loss = sequence_balance_loss(route.probs_NE, route.expert_ids_NK, num_sequences)
    return y_NS, aux
