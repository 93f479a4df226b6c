"""Scale-out on torch.distributed: DDP or FSDP2 data parallelism, expert parallelism, and
checkpoints independent of the world size. Launch with ``torchrun`` (docs/distributed.md).

Typical use (what ``mhmoe train`` does)::

    context = init_distributed(ParallelConfig(dp="fsdp", ep=2))   # reads torchrun's env
    model = TransformerLM(config)            # same seed on every rank (rank 0 wins anyway)
    pm = parallelize(model, context)         # DDP / FSDP2 / expert shards
    optimizer = build_optimizer(pm.model, train_config)
    with pm.no_sync():                       # all but the last micro-batch (DDP)
        output = pm(ids)
        (lm_loss(output.logits, targets) + output.aux_loss).backward()
    pm.clip_grad_norm_(2.0)                  # global norm over FSDP2 and expert shards
    optimizer.step()
    save_checkpoint(pm, optimizer, run_dir, step, state)   # rank 0 writes the full model
    shutdown_distributed(context)

The model code knows nothing of this package: expert parallelism plugs in through the
dispatch function that ``MHMoE`` calls (``ExpertParallelDispatch``).
"""

from mhmoe.distributed.expert_parallel import (
    ExpertParallelDispatch,
    all_to_all_single_autograd,
    check_expert_parallel,
)
from mhmoe.distributed.parallelize import ParallelModel, clip_grad_norm_, parallelize
from mhmoe.distributed.runtime import (
    DP_MODES,
    DistContext,
    ParallelConfig,
    init_distributed,
    main_rank_first,
    shutdown_distributed,
)
from mhmoe.distributed.state import (
    full_model_state_dict,
    full_optimizer_state_dict,
    load_checkpoint,
    load_full_model_state_dict,
    load_full_optimizer_state_dict,
    save_checkpoint,
)

__all__ = [
    "DP_MODES",
    "DistContext",
    "ExpertParallelDispatch",
    "ParallelConfig",
    "ParallelModel",
    "all_to_all_single_autograd",
    "check_expert_parallel",
    "clip_grad_norm_",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "init_distributed",
    "load_checkpoint",
    "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
    "main_rank_first",
    "parallelize",
    "save_checkpoint",
    "shutdown_distributed",
]
