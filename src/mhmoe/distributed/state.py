"""Checkpoints that do not depend on the world size: gather to, and shard from, the
single-process layout.

A checkpoint written by a sharded job is byte-for-byte the format a single process writes
(``mhmoe.runs.checkpoint``: ``model.safetensors`` with the unsharded state dict, ``optimizer.pt``
with ``optimizer.state_dict()`` of the unsharded model), so it loads on any world size, any
``--dp``/``--ep`` choice, and in every single-process tool (``load_run``, evaluation,
exports). Saving gathers the full tensors (a collective on every rank); only rank 0 writes,
through ``mhmoe.runs.checkpoint``'s atomic temp-file-and-rename. Loading reads the full file on
every rank and keeps each rank's part.

The cost is that the full model and optimiser state pass through every rank's memory at
save time; for models beyond a host's memory, ``torch.distributed.checkpoint`` (sharded
files, resharded on load) is the way, at the price of a folder format that single-process
tools cannot read directly.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mhmoe.distributed.parallelize import ParallelModel
from mhmoe.runs import checkpoint as ckpt

logger = logging.getLogger(__name__)


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _gather_dim0(tensor: torch.Tensor, group: Any, size: int) -> torch.Tensor:
    """Concatenate the equal dim-0 shards of ``group``'s ranks, in group-rank order."""
    pieces = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=0)


def _unshard(parallel_model: ParallelModel, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of parameter ``name`` (or of an optimiser state shaped like it)."""
    if _is_dtensor(tensor):
        tensor = tensor.full_tensor()
    if name in parallel_model.expert_sharded:
        context = parallel_model.context
        tensor = _gather_dim0(tensor, context.ep_group, context.ep_size)
    return tensor


def _shard(parallel_model: ParallelModel, name: str, full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of full tensor ``full`` of parameter ``name``, laid out as ``like``
    (a plain tensor or an FSDP2 DTensor). No communication: every rank holds ``full``."""
    context = parallel_model.context
    if name in parallel_model.expert_sharded:
        full = full.chunk(context.ep_size, dim=0)[context.ep_rank]
    if _is_dtensor(like):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: take the local chunk of the (identical) full tensor, no broadcast.
        return distribute_tensor(
            full.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None
        )
    return full


def full_model_state_dict(parallel_model: ParallelModel) -> dict[str, torch.Tensor]:
    """The state dict the unsharded model would have, as contiguous CPU tensors, on every rank.

    A collective (all-gathers of FSDP2 and expert shards): every rank must call it.
    """
    parallel_model.reshard()
    result = {}
    for name, tensor in parallel_model.model.state_dict().items():
        result[name] = _unshard(parallel_model, name, tensor.detach()).to("cpu", copy=True).contiguous()
    return result


def load_full_model_state_dict(parallel_model: ParallelModel, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (``model.safetensors``) into the sharded model (strict).

    Every rank passes the same full ``state``. Raises ValueError on missing, unexpected or
    mis-shaped tensors.
    """
    parallel_model.reshard()
    own = parallel_model.model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    context = parallel_model.context
    with torch.no_grad():
        for name, target in own.items():
            expected = list(target.shape)
            if name in parallel_model.expert_sharded:
                expected[0] *= context.ep_size
            if list(state[name].shape) != expected:
                raise ValueError(
                    f"state dict entry {name!r} has shape {tuple(state[name].shape)}, "
                    f"the model expects {tuple(expected)}"
                )
            part = _shard(parallel_model, name, state[name], target)
            if _is_dtensor(target):
                target.to_local().copy_(part.to_local())
            else:
                target.copy_(part)


def _param_names(parallel_model: ParallelModel, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) in the optimiser's index order (the keys of its state_dict)."""
    parallel_model.reshard()
    by_id = {id(p): n for n, p in parallel_model.model.named_parameters()}
    ordered = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in by_id:
                raise ValueError("the optimiser holds a parameter that is not in the model")
            ordered.append((by_id[id(param)], param))
    return ordered


def _is_per_parameter(value: Any, param: torch.Tensor) -> bool:
    """Whether optimiser state ``value`` is shaped like its parameter (exp_avg, ...), as
    opposed to a scalar such as Adam's ``step``."""
    return isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) == tuple(param.shape)


def full_optimizer_state_dict(parallel_model: ParallelModel, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` as the unsharded model's optimiser would return it (same
    integer keys and param groups; full CPU tensors). A collective: every rank must call it."""
    state_dict = optimizer.state_dict()
    if not parallel_model.context.is_distributed:
        return state_dict
    named = _param_names(parallel_model, optimizer)
    full_state: dict[int, dict[str, Any]] = {}
    # Same order on every rank (index, then key): the gathers are collectives.
    for index in sorted(state_dict["state"]):
        name, param = named[index]
        entry = {}
        for key in sorted(state_dict["state"][index]):
            value = state_dict["state"][index][key]
            if _is_per_parameter(value, param):
                value = _unshard(parallel_model, name, value.detach()).to("cpu", copy=True)
            elif isinstance(value, torch.Tensor):
                value = value.detach().to("cpu", copy=True)
            entry[key] = value
        full_state[index] = entry
    return {"state": full_state, "param_groups": copy.deepcopy(state_dict["param_groups"])}


def load_full_optimizer_state_dict(
    parallel_model: ParallelModel, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
) -> None:
    """Load an unsharded ``optimizer.state_dict()`` (``optimizer.pt``) into the optimiser of
    the sharded model; every rank passes the same full dict."""
    if not parallel_model.context.is_distributed:
        optimizer.load_state_dict(state_dict)
        return
    named = _param_names(parallel_model, optimizer)
    local_state: dict[int, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        index = int(index)
        if not 0 <= index < len(named):
            raise ValueError(f"optimizer state has an entry for parameter {index}; the model has {len(named)}")
        name, param = named[index]
        full_shape = list(param.shape)
        if name in parallel_model.expert_sharded:
            full_shape[0] *= parallel_model.context.ep_size
        converted = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and list(value.shape) == full_shape:
                value = _shard(parallel_model, name, value, param)
            converted[key] = value
        local_state[index] = converted
    optimizer.load_state_dict({"state": local_state, "param_groups": state_dict["param_groups"]})


class _Snapshot:
    """Presents an already gathered state dict through ``state_dict()``, the one method
    ``mhmoe.runs.checkpoint.save_checkpoint`` calls on the model and the optimiser."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def save_checkpoint(
    parallel_model: ParallelModel,
    optimizer: torch.optim.Optimizer | None,
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """``mhmoe.runs.checkpoint.save_checkpoint`` for a sharded model: gather on every rank, write on
    rank 0 (atomic renames, ``latest`` last), then wait for rank 0 so that no rank runs ahead
    and reads a half-written checkpoint. Returns the checkpoint folder on every rank."""

    context = parallel_model.context
    model_state = full_model_state_dict(parallel_model)
    optimizer_state = full_optimizer_state_dict(parallel_model, optimizer) if optimizer is not None else None
    folder = ckpt.checkpoint_dir(run_dir, step)
    if context.is_main:
        ckpt.save_checkpoint(
            run_dir, step, _Snapshot(model_state),  # type: ignore[arg-type]
            _Snapshot(optimizer_state) if optimizer_state is not None else None,  # type: ignore[arg-type]
            state, keep=keep,
        )
    context.barrier()
    return folder


class _ShardingLoader:
    """Presents the sharded model or optimiser through ``load_state_dict(full_state)``, the one
    method ``mhmoe.runs.checkpoint.load_model_weights``/``load_optimizer_state`` call, so those
    readers (checksums, ``weights_only=True``) serve sharded jobs unchanged."""

    def __init__(self, parallel_model: ParallelModel, optimizer: torch.optim.Optimizer | None = None) -> None:
        self._parallel_model = parallel_model
        self._optimizer = optimizer

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> Any:
        if self._optimizer is not None:
            load_full_optimizer_state_dict(self._parallel_model, self._optimizer, state_dict)
            return None
        self._parallel_model.reshard()
        own = set(self._parallel_model.model.state_dict())
        missing, unexpected = sorted(own - set(state_dict)), sorted(set(state_dict) - own)
        if missing or unexpected:
            return missing, unexpected  # load_model_weights turns these into CheckpointError
        load_full_model_state_dict(self._parallel_model, state_dict)
        return [], []


def load_checkpoint(
    parallel_model: ParallelModel,
    optimizer: torch.optim.Optimizer | None,
    folder: Path,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint folder written by any world size into the sharded model (and
    optimiser); every rank reads the files (checksums verified, ``torch.load`` with
    ``weights_only=True``). Returns the checkpoint's state.json."""

    state = ckpt.read_checkpoint_state(folder) if state is None else state
    ckpt.load_model_weights(folder, _ShardingLoader(parallel_model), state)  # type: ignore[arg-type]
    if optimizer is not None:
        ckpt.load_optimizer_state(folder, _ShardingLoader(parallel_model, optimizer), state)  # type: ignore[arg-type]
    return state
