"""Expert parallelism: each rank of an EP group holds E / ep experts of every MoE layer.

Shape legend (as in ``mhmoe.layers.moe``): N routed units (sub-tokens for MH-MoE, tokens for
SMoE) on this rank, S unit size, E experts in the layer, K top-k, P = ep ranks in the group,
L = E / P experts held locally, R rows kept after capacity (sorted by expert), Q rows received
from all ranks for the local experts.

The layer's dispatch is the single-process ``moe_dispatch`` (route, capacity rule, sort by
expert, losses: the router is replicated) with ``ExpertParallelDispatch`` installed as its
compute step, which moves the grouped matmul to the ranks that own the experts, in the manner
of torchtitan's ``ExpertParallel``. Of the "grouped" backend it keeps the gather, the experts'
forward and the combine, and puts the all-to-alls between them:

1. the rows sorted by expert are gathered, so rows for experts [p*L, (p+1)*L) form the
   contiguous block that goes to rank p;
2. exchange the per-expert row counts (an all-to-all of E integers), then the rows themselves
   (``all_to_all_single``, autograd-aware: its backward is the reverse all-to-all);
3. the received rows arrive grouped by source rank; reorder them by local expert (stable, so
   each expert sees source 0's rows first) and run the local ``Experts`` forward;
4. undo the reorder, send the results back by the reverse all-to-all, and combine with the
   router weights.

MH-MoE needs nothing special: its sub-tokens are the routed units, so they are what travels.

Routing statistics and the auxiliary losses are those of the local units (the same numbers
DDP would compute on this rank's micro-batch), so a step with expert parallelism equals a
step of plain data parallelism on the same per-rank micro-batches.

A rank whose experts receive no row still runs them on one zero row whose output is
discarded: the stacked expert weights then get zero gradients (not None), and every rank
issues the same collectives in backward, which the all-to-alls and data-parallel reductions
need to avoid deadlock.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.layers.experts import Experts
from mhmoe.layers.mh_moe import MHMoE
from mhmoe.layers.moe import combine_assignments, gather_units

__all__ = [
    "EXPERT_WEIGHT_NAMES",
    "ExpertParallelDispatch",
    "all_to_all_single_autograd",
    "check_expert_parallel",
    "expert_layers",
    "source_to_expert_order",
]

EXPERT_WEIGHT_NAMES = ("w1", "w3", "w2")


class _AllToAllSingle(torch.autograd.Function):
    """``dist.all_to_all_single`` with variable splits; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # type: ignore[override]
        ctx.output_splits = output_splits
        ctx.input_splits = input_splits
        ctx.group = group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes=output_splits, input_split_sizes=input_splits,
            group=group,
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in = grad_out.new_empty((sum(ctx.input_splits),) + tuple(grad_out.shape[1:]))
        dist.all_to_all_single(
            grad_in, grad_out.contiguous(), output_split_sizes=ctx.input_splits,
            input_split_sizes=ctx.output_splits, group=ctx.group,
        )
        return grad_in, None, None, None


def all_to_all_single_autograd(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group=None
) -> torch.Tensor:
    """Send ``input_splits[p]`` leading rows of ``x`` (in order) to rank p of ``group``;
    receive ``output_splits[p]`` rows from rank p. Differentiable (reverse exchange)."""
    return _AllToAllSingle.apply(x, list(output_splits), list(input_splits), group)


def source_to_expert_order(counts_PL: torch.Tensor) -> torch.Tensor:
    """Permutation that regroups rows received source-major into local-expert-major order.

    ``counts_PL[p, l]``: rows from source rank p for local expert l; received rows are laid out
    p-major, l-minor. Returns ``order_Q`` with ``x_expert_major = x_received[order_Q]``; inside
    one expert, rows keep their source order (source 0 first, each source in its own order).
    """
    sources, local_experts = counts_PL.shape
    device = counts_PL.device
    # Sort key of every received row: its expert first, then its source.
    key_PL = (
        torch.arange(local_experts, device=device).unsqueeze(0) * sources
        + torch.arange(sources, device=device).unsqueeze(1)
    )  # (P, L)
    key_Q = torch.repeat_interleave(key_PL.reshape(-1), counts_PL.reshape(-1))  # (P*L,) -> (Q,)
    return torch.argsort(key_Q, stable=True)


def expert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every MoE layer (an ``MHMoE``, which includes ``MoE``)."""

    return [(name, module) for name, module in model.named_modules() if isinstance(module, MHMoE)]


def check_expert_parallel(model: nn.Module, ep: int) -> None:
    """ValueError unless every MoE layer's expert count divides by ``ep`` (and one exists)."""
    if ep == 1:
        return
    layers = expert_layers(model)
    if not layers:
        raise ValueError(f"--ep {ep}: the model has no MoE layer to shard (a dense model); use --ep 1")
    for name, layer in layers:
        num_experts = layer.experts.num_experts
        if num_experts % ep != 0:
            choices = [d for d in range(1, num_experts + 1) if num_experts % d == 0]
            raise ValueError(
                f"--ep {ep}: MoE layer {name!r} has num_experts={num_experts}, which does not "
                f"divide over {ep} expert-parallel ranks; choose --ep among {choices} "
                "(that also divides the number of processes)"
            )


class ExpertParallelDispatch:
    """The expert-parallel compute step of ``moe_dispatch`` (``DispatchCompute``):
    ``(x_NS, weights_NK, kept_order_R, kept_counts_E, experts) -> y_NS``, with ``experts``
    holding this rank's L = E / P experts (``experts.w1`` is (L, F, S)) and kept_counts_E the
    rows per expert of all E (the router is the full E-way router).

    ``group``: the expert-parallel process group; rank p of it owns experts [p*L, (p+1)*L).
    """

    def __init__(self, group, ep_size: int, ep_rank: int) -> None:
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank

    def __repr__(self) -> str:
        return f"ExpertParallelDispatch(ep_size={self.ep_size}, ep_rank={self.ep_rank})"

    def __call__(
        self,
        x_NS: torch.Tensor,
        weights_NK: torch.Tensor,
        kept_order_R: torch.Tensor,
        kept_counts_E: torch.Tensor,
        experts: nn.Module,
    ) -> torch.Tensor:
        d_unit = x_NS.shape[1]
        num_experts, sources = kept_counts_E.numel(), self.ep_size
        local_experts = experts.w1.shape[0]
        if local_experts * sources != num_experts:
            raise RuntimeError(
                f"expert-parallel dispatch: the router has {num_experts} experts but this rank "
                f"holds {local_experts} of them over {sources} ranks; shard the model with "
                "mhmoe.distributed.parallelize"
            )
        # 1. Rows sorted by expert, so sorted by owner rank.
        x_RS = gather_units(x_NS, kept_order_R, weights_NK.shape[1])

        # 2. Counts first (the receiver must size its buffers), then the rows.
        send_counts_E = kept_counts_E.to(torch.int64)
        recv_counts_E = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts_E, send_counts_E, group=self.group)
        send_counts_PL = send_counts_E.view(sources, local_experts)  # (E,) -> (P, L) by owner
        recv_counts_PL = recv_counts_E.view(sources, local_experts)  # (E,) -> (P, L) by source
        # One host sync per layer: all_to_all_single takes its splits as Python ints.
        input_splits = send_counts_PL.sum(dim=1).tolist()
        output_splits = recv_counts_PL.sum(dim=1).tolist()
        x_QS = all_to_all_single_autograd(x_RS, output_splits, input_splits, self.group)

        # 3. Regroup by local expert and run the local experts.
        order_Q = source_to_expert_order(recv_counts_PL)
        x_local_QS = x_QS[order_Q]
        local_counts_L = recv_counts_PL.sum(dim=0)
        num_received = x_local_QS.shape[0]
        if num_received == 0:
            # No row for any local expert: run expert 0 on one zero row (output dropped), so
            # the weights get zero gradients and backward issues the same collectives as on
            # every other rank. cat keeps x_QS in the graph (its reverse all-to-all must run).
            x_local_QS = torch.cat([x_local_QS, x_local_QS.new_zeros(1, d_unit)])
            local_counts_L = local_counts_L.clone()
            local_counts_L[0] = 1
        offsets_L = torch.cumsum(local_counts_L, 0).to(torch.int32)
        with warnings.catch_warnings():
            # FSDP2 warns that Experts.forward returns a view (its autograd identity); harmful
            # only if modified in place, which nothing here does.
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view")
            y_local_QS = experts(x_local_QS, offsets_L)[:num_received]

        # 4. Back to source-major order, back to the senders, combine.
        inverse_Q = torch.empty_like(order_Q)
        inverse_Q[order_Q] = torch.arange(order_Q.numel(), device=order_Q.device)
        y_QS = y_local_QS[inverse_Q]
        y_RS = all_to_all_single_autograd(y_QS, input_splits, output_splits, self.group)
        return combine_assignments(y_RS, kept_order_R, weights_NK)


def shard_experts(experts: Experts, ep_size: int, ep_rank: int) -> None:
    """Keep experts [ep_rank*L, (ep_rank+1)*L) of ``experts`` (L = E / ep_size), in place.

    The stacked weights are replaced by new Parameters holding copies of the local slices
    (the full tensors are freed); names and registration order are unchanged, so state-dict
    keys and optimiser parameter order match the unsharded model.
    """
    num_experts = experts.w1.shape[0]
    local = num_experts // ep_size
    rows = slice(ep_rank * local, (ep_rank + 1) * local)
    for name in EXPERT_WEIGHT_NAMES:
        weight = getattr(experts, name, None)
        if weight is None:
            continue
        setattr(experts, name, nn.Parameter(weight.detach()[rows].clone(), requires_grad=weight.requires_grad))
    experts.num_experts = local


def install_dispatch(layer: MHMoE, dispatch: ExpertParallelDispatch) -> None:
    """Make MoE ``layer`` run ``dispatch`` as the compute step of its ``moe_dispatch``."""
    layer.dispatch_backend = dispatch
