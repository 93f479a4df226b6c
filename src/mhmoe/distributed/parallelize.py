"""Wrap a model for data parallelism (DDP or FSDP2) and, optionally, expert parallelism.

What each option shards (W processes, ep = expert-parallel size, D = W / ep):

=================  ======================================  ======================================
                   non-expert parameters                   stacked expert weights (w1, w3, w2)
=================  ======================================  ======================================
ddp                replicated; DDP all-reduces gradients    replicated (part of DDP)
fsdp               sharded over all W ranks (FSDP2)         sharded over all W ranks (FSDP2)
ddp + ep           replicated; DDP all-reduces gradients    E/ep experts per rank; gradients
                                                            averaged over the D replicas of a shard
fsdp + ep          sharded over all W ranks (FSDP2)         E/ep experts per rank, each shard
                                                            FSDP2-sharded over its D replicas
=================  ======================================  ======================================

Every rank reads a different micro-batch (data parallelism spans all W ranks; expert
parallelism borrows its ranks from it, as in torchtitan), and the gradient of every
parameter is the mean over ranks of the per-rank loss gradients, i.e. the gradient of
single-process gradient accumulation over the same W micro-batches:

* DDP and FSDP2 average over W ranks by themselves;
* an expert shard's gradient arrives, through the reverse all-to-all, as the *sum* over its
  EP group of the per-rank loss gradients; a gradient hook scales it by 1/ep (DDP), or
  FSDP2's divide factor is set to W instead of D (FSDP2), and the D replicas are averaged.

Before sharding, rank 0's parameters are broadcast to all ranks, so a model initialised
differently per rank (or loaded by rank 0 only) starts identical everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mhmoe.distributed.expert_parallel import (
    EXPERT_WEIGHT_NAMES,
    ExpertParallelDispatch,
    check_expert_parallel,
    expert_layers,
    install_dispatch,
    shard_experts,
)
from mhmoe.distributed.runtime import DistContext

logger = logging.getLogger(__name__)


@dataclass
class ParallelModel:
    """A model as placed on this rank.

    ``module``: what to call for training (the DDP wrapper, or the FSDP2/plain model);
    ``model``: the unwrapped model (config, state dicts, evaluation); the same object as
    ``module`` under FSDP2 and in a single process. ``expert_sharded``: qualified names of
    the parameters split along dim 0 over the expert-parallel group.
    """

    module: nn.Module
    model: nn.Module
    context: DistContext
    expert_sharded: frozenset[str] = frozenset()
    _hooks: list[Any] = field(default_factory=list, repr=False)

    @property
    def is_fsdp(self) -> bool:
        return self.context.is_distributed and self.context.parallel.dp == "fsdp"

    @property
    def is_ddp(self) -> bool:
        return self.context.is_distributed and self.context.parallel.dp == "ddp"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def reshard(self) -> None:
        """Put FSDP2 parameters back in their sharded form.

        FSDP2 leaves the root module's parameters unsharded after a forward without backward
        (an evaluation); state dicts and the optimiser address the sharded ones, so the
        state-dict helpers call this first. A no-op without FSDP2.
        """
        if not self.is_fsdp:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Skip the gradient reduction of the backward passes inside (gradient accumulation:
        all but the last micro-batch). A no-op under FSDP2, which reduces every micro-batch
        so as to keep only sharded gradients in memory, and in a single process."""
        if self.is_ddp:
            with self.module.no_sync():  # also read by the expert-gradient hooks
                yield
        else:
            yield

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model; see the function."""
        return clip_grad_norm_(self, max_norm)


def _broadcast_from_rank0(model: nn.Module, device: torch.device) -> None:
    """Copy rank 0's parameters and buffers to every rank (one tensor at a time, through the
    communication device: NCCL cannot broadcast host tensors)."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            staged = tensor.detach().to(device)
            dist.broadcast(staged, src=0)
            if staged.data_ptr() != tensor.data_ptr():
                tensor.copy_(staged)


def parallelize(model: nn.Module, context: DistContext) -> ParallelModel:
    """Place ``model`` on this rank's device according to ``context.parallel``.

    Call before building the optimiser (FSDP2 and expert sharding replace parameters) and
    after loading any single-process checkpoint into ``model`` (every rank may load the same
    full file; sharding then keeps each rank's part). In a single process the model is only
    moved to the device. Raises ValueError when an MoE layer's expert count does not divide
    over the expert-parallel size.
    """
    if not context.is_distributed:
        model.to(context.device)
        return ParallelModel(module=model, model=model, context=context)
    parallel = context.parallel
    check_expert_parallel(model, context.ep_size)
    if parallel.dp == "ddp":
        model.to(context.device)  # replicated anyway: broadcast in place, on the device
    # FSDP2 keeps the full model in host memory until fully_shard moves each shard over.
    _broadcast_from_rank0(model, context.device)

    expert_sharded: set[str] = set()
    if context.ep_size > 1:
        dispatch = ExpertParallelDispatch(context.ep_group, context.ep_size, context.ep_rank)
        for name, layer in expert_layers(model):
            shard_experts(layer.experts, context.ep_size, context.ep_rank)
            install_dispatch(layer, dispatch)
            prefix = f"{name}.experts." if name else "experts."
            expert_sharded.update(
                prefix + weight for weight in EXPERT_WEIGHT_NAMES if hasattr(layer.experts, weight)
            )

    if parallel.dp == "fsdp":
        return _apply_fsdp(model, context, frozenset(expert_sharded))
    return _apply_ddp(model, context, frozenset(expert_sharded))


def _apply_ddp(model: nn.Module, context: DistContext, expert_sharded: frozenset[str]) -> ParallelModel:
    from torch.nn.parallel import DistributedDataParallel

    model.to(context.device)
    if expert_sharded:
        # Expert shards differ between the ranks of an EP group: DDP must not average them.
        # (The private helper is DDP's documented way to exclude parameters; torchrec uses it.)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(expert_sharded))
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, init_sync=False)
    wrapped = ParallelModel(module=ddp, model=model, context=context, expert_sharded=expert_sharded)
    if expert_sharded:
        wrapped._hooks.extend(_expert_gradient_hooks(model, expert_sharded, context, ddp))
    return wrapped


def _expert_gradient_hooks(
    model: nn.Module, expert_sharded: frozenset[str], context: DistContext, ddp: nn.Module
) -> list[Any]:
    """Hooks that turn an expert shard's summed gradient into the data-parallel mean.

    1/ep before accumulation (the reverse all-to-all sums the gradients of the ep ranks that
    sent rows); then, when D = W / ep > 1 replicas of the shard exist, a mean over the
    replicas once the gradient is accumulated, skipped while ``ddp`` is inside ``no_sync``.
    Both are linear and the mean is idempotent, so accumulation with or without ``no_sync``
    stays exact.
    """
    handles = []
    ep, replicas = context.ep_size, context.dp_outer_size
    group = context.dp_outer_group
    ddp_ref = weakref.ref(ddp)  # no cycle model -> hook -> DDP -> model

    def scale(grad: torch.Tensor) -> torch.Tensor:
        return grad / ep

    def average_replicas(param: torch.Tensor) -> None:
        wrapper = ddp_ref()
        if wrapper is not None and not wrapper.require_backward_grad_sync:
            return  # inside no_sync: the last micro-batch reduces the accumulated sum
        dist.all_reduce(param.grad, group=group)  # SUM: gloo has no AVG
        param.grad /= replicas

    for name, param in model.named_parameters():
        if name not in expert_sharded:
            continue
        handles.append(param.register_hook(scale))
        if replicas > 1:
            handles.append(param.register_post_accumulate_grad_hook(average_replicas))
    return handles


def _apply_fsdp(model: nn.Module, context: DistContext, expert_sharded: frozenset[str]) -> ParallelModel:
    from torch.distributed.fsdp import fully_shard

    world_mesh = context.world_mesh
    if expert_sharded:
        # Expert shards: FSDP2 over the D replicas of each shard, dividing by W instead of D
        # (module docstring). Also with D = 1, where nothing is sharded: every parameter must
        # be a DTensor, because fused/foreach optimisers reject a mix of DTensors and tensors.
        replica_mesh = context.ep_mesh["dp_outer"]
        for _, layer in expert_layers(model):
            fully_shard(layer.experts, mesh=replica_mesh)
            layer.experts.set_gradient_divide_factor(float(context.world_size))
            if context.device.type == "cpu" and context.dp_outer_size > 1:
                # gloo has no PREMUL_SUM: sum, then divide. Not with D = 1, where FSDP2 only
                # divides locally and, forced to sum, would divide twice (torch 2.13).
                layer.experts.set_force_sum_reduction_for_comms(True)
    # One FSDP2 unit per Transformer block (all-gathered just before it runs), then the root
    # for what is left (embeddings, final norm, output projection).
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=world_mesh)
    fully_shard(model, mesh=world_mesh)
    return ParallelModel(module=model, model=model, context=context, expert_sharded=expert_sharded)


# ---------------------------------------------------------------------------------------------
# Gradient clipping over sharded parameters
# ---------------------------------------------------------------------------------------------


def clip_grad_norm_(parallel_model: ParallelModel, max_norm: float) -> torch.Tensor:
    """Scale all gradients so that their global 2-norm is at most ``max_norm``; return the
    norm before clipping (a float32 tensor, the same on every rank).

    The same formula as ``torch.nn.utils.clip_grad_norm_`` (coefficient
    max_norm / (norm + 1e-6), clamped at 1), with the squared norm summed over the pieces each
    rank holds: FSDP2 shards over all ranks, expert shards over their EP group, replicated
    gradients counted once. ``max_norm=math.inf`` only measures. A collective under
    torch.distributed: every rank must call it.
    """
    from torch.distributed.tensor import DTensor

    context = parallel_model.context
    model = parallel_model.model
    parallel_model.reshard()
    if not context.is_distributed:
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm).float()

    device = context.device
    replicated = torch.zeros((), dtype=torch.float32, device=device)
    over_world = torch.zeros((), dtype=torch.float32, device=device)
    over_ep = torch.zeros((), dtype=torch.float32, device=device)
    grads: list[torch.Tensor] = []
    for name, param in model.named_parameters():
        grad = param.grad
        if grad is None:
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        grads.append(local)
        square = local.detach().float().pow(2).sum()
        if isinstance(grad, DTensor):
            # FSDP2 shard; an expert shard's FSDP2 pieces and its EP siblings together tile
            # the world, so the world-sum covers both.
            over_world += square
        elif name in parallel_model.expert_sharded:
            over_ep += square
        else:
            replicated += square
    # Unconditional (zeros where a kind is absent): every rank must issue the same collectives.
    dist.all_reduce(over_world)
    if context.ep_size > 1:
        dist.all_reduce(over_ep, group=context.ep_group)
    total = (replicated + over_world + over_ep).sqrt()
    if math.isfinite(max_norm):
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for local in grads:
            local.mul_(coefficient.to(local.dtype))
    return total
