"""Process-group setup: which rank am I, on which device, with which meshes.

Everything here reads what ``torchrun`` puts in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and builds on ``torch.distributed`` alone:

* backend: NCCL when the device is a CUDA GPU, gloo on CPU (chosen from the device, never
  from a flag, because a mismatched pair fails deep inside the first collective);
* device: ``cuda:LOCAL_RANK`` when CUDA is available (one GPU per process), else ``cpu``;
* meshes (``torch.distributed.device_mesh``): a 1-D ``("dp",)`` mesh over all ranks for FSDP2,
  and with expert parallelism a 2-D ``("dp_outer", "ep")`` mesh of shape (W / ep, ep). Ranks
  of one expert-parallel group are consecutive (rank = dp_outer * ep + ep_rank), so with
  torchrun's node-major rank order the all-to-all of an EP group stays inside a node as long
  as ep divides the GPUs per node.

The returned ``DistContext`` is the only state; nothing is stored at module level beyond what
``torch.distributed`` itself holds (the default process group).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


DP_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class ParallelConfig:
    """How a model is spread over the ranks of a job.

    ``dp``: ``"ddp"`` replicates the model (DistributedDataParallel, gradients all-reduced);
    ``"fsdp"`` shards parameters, gradients and optimiser state (FSDP2, ``fully_shard``).
    ``ep``: expert-parallel size; the experts of every MoE layer are split over groups of
    ``ep`` consecutive ranks and (sub-)tokens travel to them by all-to-all. 1 turns it off.
    """

    dp: str = "ddp"
    ep: int = 1

    def __post_init__(self) -> None:
        if self.dp not in DP_MODES:
            raise ValueError(f"dp={self.dp!r}: must be one of {', '.join(DP_MODES)}")
        if isinstance(self.ep, bool) or not isinstance(self.ep, int) or self.ep < 1:
            raise ValueError(f"ep={self.ep!r}: the expert-parallel size must be a positive integer")

    def check_world_size(self, world_size: int) -> None:
        """ValueError unless ``ep`` divides the number of processes."""
        if world_size % self.ep != 0:
            raise ValueError(
                f"--ep {self.ep}: the expert-parallel size must divide the number of processes "
                f"(WORLD_SIZE={world_size}); use one of {_divisors(world_size)}"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class DistContext:
    """Rank, device and meshes of this process (``init_distributed``).

    Single-process runs get a context too (``world_size == 1``, no process group, no mesh),
    so callers never branch on "is torch.distributed initialised?".
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: ParallelConfig
    backend: str | None = None
    world_mesh: Any = None  # DeviceMesh ("dp",) over all ranks; None when single-process
    ep_mesh: Any = None  # DeviceMesh ("dp_outer", "ep"); None without expert parallelism
    owns_process_group: bool = False  # destroy it in shutdown_distributed
    # Processes on this node (torchrun's LOCAL_WORLD_SIZE): they share its CPU cores.
    local_world_size: int = 1

    @classmethod
    def single_process(cls, device: torch.device | str = "cpu") -> "DistContext":
        """The context of a plain single-process run on ``device`` (no process group)."""
        return cls(rank=0, world_size=1, local_rank=0, device=torch.device(device), parallel=ParallelConfig())

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0

    @property
    def ep_size(self) -> int:
        return self.parallel.ep if self.is_distributed else 1

    @property
    def ep_rank(self) -> int:
        return self.ep_mesh.get_local_rank("ep") if self.ep_mesh is not None else 0

    @property
    def ep_group(self) -> Any:
        """Process group of this rank's expert-parallel group (None without EP)."""
        return self.ep_mesh.get_group("ep") if self.ep_mesh is not None else None

    @property
    def dp_outer_size(self) -> int:
        """How many replicas of each expert shard exist (world_size / ep)."""
        return self.world_size // self.ep_size

    @property
    def dp_outer_group(self) -> Any:
        """Process group of the ranks holding the same expert shard (None without EP)."""
        return self.ep_mesh.get_group("dp_outer") if self.ep_mesh is not None else None

    def barrier(self) -> None:
        if self.is_distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor | float) -> float:
        """Mean of a scalar over all ranks (for logging; a collective: every rank must call)."""
        tensor = torch.as_tensor(value, dtype=torch.float64, device=self.device).detach().clone()
        if self.is_distributed:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return float(tensor)

    def all_reduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all ranks, in place (a collective; identity in one process).
        Staged through the communication device, as NCCL cannot reduce host tensors."""
        if self.is_distributed:
            staged = tensor.to(self.device)
            dist.all_reduce(staged)
            if staged is not tensor:
                tensor.copy_(staged)
        return tensor

    def describe(self) -> str:
        if not self.is_distributed:
            return f"single process on {self.device}"
        return (
            f"rank {self.rank}/{self.world_size} on {self.device} ({self.backend}), "
            f"dp={self.parallel.dp}, ep={self.ep_size}"
        )


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: must be an integer") from None


def _resolve_device(name: str, local_rank: int, world_size: int) -> torch.device:
    """``auto``: cuda:LOCAL_RANK if CUDA is available, else cpu. ``cuda`` means cuda:LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r}: must be auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"device={name!r}: distributed training runs on cpu (gloo) or cuda (NCCL)")
    if not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine (use cpu or auto)")
    if device.index is not None and world_size > 1:
        # Every rank would pick the same GPU; torchrun's LOCAL_RANK is the only sane mapping.
        raise ValueError(
            f"device={name!r}: with {world_size} processes each rank uses cuda:LOCAL_RANK; "
            "pass cuda or auto instead of a fixed GPU"
        )
    index = device.index if device.index is not None else local_rank
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK={local_rank}: this node has only {torch.cuda.device_count()} GPUs; "
            "start at most that many processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", index)


def init_distributed(
    parallel: ParallelConfig | None = None,
    device: str = "auto",
    timeout_s: float = 1800.0,
) -> DistContext:
    """Join the job that ``torchrun`` started (or describe a single process) and build meshes.

    Without ``WORLD_SIZE`` in the environment, or with ``WORLD_SIZE=1``, returns a
    single-process context and initialises nothing. An already initialised default process
    group (a test harness, a notebook) is reused and left for its owner to destroy.
    Raises ValueError for settings that cannot work (``ep`` not dividing the world size,
    a fixed GPU index with several processes).
    """
    parallel = parallel or ParallelConfig()
    initialised = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialised else _env_int("WORLD_SIZE", 1)
    rank = dist.get_rank() if initialised else _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank if initialised else 0)
    parallel.check_world_size(world_size)
    resolved = _resolve_device(device, local_rank, world_size)
    if world_size == 1 and not initialised:
        return DistContext.single_process(resolved)
    if not dist.is_available():  # pragma: no cover - every official build has it
        raise RuntimeError("this PyTorch build has no torch.distributed; cannot run several processes")

    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = False
    if not initialised:
        kwargs: dict[str, Any] = {}
        if resolved.type == "cuda":
            kwargs["device_id"] = resolved  # eager NCCL init: fail here, not at the first collective
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
        owns = True
    else:
        backend = dist.get_backend()
        if resolved.type == "cuda" and "nccl" not in str(backend):
            raise ValueError(f"device {resolved} needs the nccl backend, the process group uses {backend}")
    world_mesh, ep_mesh = _build_meshes(resolved.type, world_size, parallel.ep)
    context = DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=resolved,
        parallel=parallel,
        backend=str(backend),
        world_mesh=world_mesh,
        ep_mesh=ep_mesh,
        owns_process_group=owns,
        local_world_size=_env_int("LOCAL_WORLD_SIZE", world_size),
    )
    logger.debug("joined: %s", context.describe())
    return context


def _build_meshes(device_type: str, world_size: int, ep: int) -> tuple[Any, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    world_mesh = init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    ep_mesh = None
    if ep > 1:
        # Every rank must create the same meshes in the same order (new_group is collective).
        ep_mesh = init_device_mesh(
            device_type, (world_size // ep, ep), mesh_dim_names=("dp_outer", "ep")
        )
    return world_mesh, ep_mesh


@contextlib.contextmanager
def main_rank_first(context: DistContext):
    """Run the body on rank 0 first, then on the other ranks (after rank 0 finished it).

    For work that fills a shared cache (tokenizer training, token files): rank 0 builds it,
    the others then find it ready instead of racing to build the same files. If rank 0 fails
    inside, torchrun stops the waiting ranks.
    """
    if not context.is_main:
        context.barrier()
    yield
    if context.is_main:
        context.barrier()


def shutdown_distributed(context: DistContext) -> None:
    """Destroy the process group if ``init_distributed`` created it (idempotent)."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()
        context.owns_process_group = False
