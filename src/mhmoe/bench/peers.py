"""Peer implementations the layer benchmark times against ours: the plain per-expert loop
(transformers v4's pattern), transformers v5's Qwen3-MoE block (eager, batched_mm, grouped_mm
experts), and a GShard-style dense-dispatch einsum.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mhmoe.layers.mh_moe import MHMoE

PEERS = ("ours", "grouped", "loop", "hf_eager", "hf_batched_mm", "hf_grouped_mm", "gshard")


HF_IMPLEMENTATIONS = {"hf_eager": "eager", "hf_batched_mm": "batched_mm", "hf_grouped_mm": "grouped_mm"}


class _CorePeer(nn.Module):
    """A peer's MoE core (units x_NS -> y_NS) as step 3 of a copy of our layer, whose head,
    split, merge and shared expert stay its own (``MHMoE.forward_with_dispatch``)."""

    def __init__(self, layer: MHMoE) -> None:
        super().__init__()
        self.layer = copy.deepcopy(layer)

    def core(self, x_NS: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        # Peers compute no routing losses: no aux.
        return self.layer.forward_with_dispatch(x_TD, lambda x_NS, *_: (self.core(x_NS), None))[0]


class LoopPeer(_CorePeer):
    """The per-expert loop of HF transformers v4 MoE blocks (Mixtral/Qwen2-MoE pattern)."""

    def core(self, x_NS: torch.Tensor) -> torch.Tensor:
        router, experts = self.layer.router, self.layer.experts
        route = router(x_NS)
        weights_NK = route.weights_NK.to(x_NS.dtype)
        y_NS = torch.zeros_like(x_NS)
        expert_mask_EKN = F.one_hot(route.expert_ids_NK, router.num_experts).permute(2, 1, 0)
        hit = torch.nonzero(expert_mask_EKN.sum(dim=(1, 2)) > 0).flatten().tolist()
        for expert in hit:
            rank_idx, unit_idx = torch.where(expert_mask_EKN[expert])
            out_rS = experts.forward_one(expert, x_NS[unit_idx])
            out_rS = out_rS * weights_NK[unit_idx, rank_idx, None]
            y_NS.index_add_(0, unit_idx, out_rS)
        return y_NS


def hf_available(implementation: str = "eager") -> bool:
    """Whether transformers v5's Qwen3-MoE block with this experts implementation is importable."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401
        from transformers.models.qwen3_moe.modeling_qwen3_moe import (  # noqa: F401
            Qwen3MoeSparseMoeBlock,
        )
    except Exception:  # ImportError, or an incompatible version
        return False
    return implementation == "eager" or implementation in ALL_EXPERTS_FUNCTIONS


class HFPeer(_CorePeer):
    """HF transformers v5 ``Qwen3MoeSparseMoeBlock`` as the MoE core, our weights copied in.

    Same router semantics as ours: softmax over all experts, top-k, renormalised when k > 1.
    """

    def __init__(self, layer: MHMoE, implementation: str) -> None:
        super().__init__(layer)
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        if layer.experts.activation != "swiglu":
            raise ValueError("the HF Qwen3-MoE block has SwiGLU experts only")
        cfg = Qwen3MoeConfig(
            hidden_size=layer.d_sub,
            num_experts=layer.router.num_experts,
            num_experts_per_tok=layer.router.top_k,
            moe_intermediate_size=layer.experts.d_expert,
            norm_topk_prob=layer.router.normalize_top_k,
            hidden_act="silu",
        )
        cfg._experts_implementation = implementation
        self.block = Qwen3MoeSparseMoeBlock(cfg)
        with torch.no_grad():
            self.block.gate.weight.copy_(layer.router.weight)
            self.block.experts.gate_up_proj.copy_(
                torch.cat([layer.experts.w1, layer.experts.w3], dim=1)  # (E, 2F, S)
            )
            self.block.experts.down_proj.copy_(layer.experts.w2)  # (E, S, F)
        self.block.to(dtype=layer.experts.w1.dtype, device=layer.experts.w1.device)

    def core(self, x_NS: torch.Tensor) -> torch.Tensor:
        return self.block(x_NS.unsqueeze(0)).squeeze(0)  # (N, S) -> (1, N, S) -> (N, S)


class GShardPeer(_CorePeer):
    """GShard-style einsum dispatch with capacity (Lepikhin et al. 2020; fairseq/torchscale MoE).

    Units are cut into groups of ``group_size``; per group each expert takes at most
    C = ceil(capacity_factor * group_size * K / E) assignments, first choices of all units
    before second choices. dispatch_GSEC (0/1) and combine_GSEC (gate weights) are dense
    one-hot tensors; expert inputs are einsum("gsec,gsm->egcm"), outputs are combined by
    einsum("gsec,egcm->gsm").
    """

    def __init__(self, layer: MHMoE, capacity_factor: float = 1.25, group_size: int = 512) -> None:
        super().__init__(layer)
        self.capacity_factor = capacity_factor
        self.group_size = group_size

    def core(self, x_NS: torch.Tensor) -> torch.Tensor:
        router, experts = self.layer.router, self.layer.experts
        num_units, d_unit = x_NS.shape
        num_experts, top_k = router.num_experts, router.top_k
        group = min(self.group_size, num_units)
        pad = (-num_units) % group
        route = router(x_NS)
        ids_NK, weights_NK = route.expert_ids_NK, route.weights_NK.to(x_NS.dtype)
        x_pad = F.pad(x_NS, (0, 0, 0, pad))
        num_groups = x_pad.shape[0] // group
        capacity = max(1, math.ceil(self.capacity_factor * group * top_k / num_experts))
        ids_GSK = F.pad(ids_NK, (0, 0, 0, pad), value=0).view(num_groups, group, top_k)
        w_GSK = F.pad(weights_NK, (0, 0, 0, pad)).view(num_groups, group, top_k)
        valid_GS1 = F.pad(x_NS.new_ones(num_units, 1), (0, 0, 0, pad)).view(num_groups, group, 1)
        dispatch = x_NS.new_zeros(num_groups, group, num_experts, capacity)
        combine = x_NS.new_zeros(num_groups, group, num_experts, capacity)
        filled_GE = torch.zeros(num_groups, 1, num_experts, dtype=torch.long, device=x_NS.device)
        for k in range(top_k):  # k-th choices after all (k-1)-th choices
            mask_GSE = F.one_hot(ids_GSK[..., k], num_experts) * valid_GS1.long()
            position_GSE = torch.cumsum(mask_GSE, dim=1) - 1 + filled_GE
            filled_GE = filled_GE + mask_GSE.sum(dim=1, keepdim=True)
            keep_GSE = mask_GSE * (position_GSE < capacity)
            slot_GSEC = F.one_hot(position_GSE.clamp(0, capacity - 1), capacity) * keep_GSE[..., None]
            dispatch = dispatch + slot_GSEC.to(x_NS.dtype)
            combine = combine + slot_GSEC.to(x_NS.dtype) * w_GSK[..., k, None, None]
        x_EGCS = torch.einsum("gsec,gsm->egcm", dispatch, x_pad.view(num_groups, group, d_unit))
        x_EMS = x_EGCS.reshape(num_experts, num_groups * capacity, d_unit)
        hidden = F.silu(torch.bmm(x_EMS, experts.w1.transpose(1, 2)))
        if experts.activation == "swiglu":
            hidden = hidden * torch.bmm(x_EMS, experts.w3.transpose(1, 2))
        else:
            hidden = F.relu(torch.bmm(x_EMS, experts.w1.transpose(1, 2)))
        y_EMS = torch.bmm(hidden, experts.w2.transpose(1, 2))
        y_EGCS = y_EMS.view(num_experts, num_groups, capacity, d_unit)
        y_GSS = torch.einsum("gsec,egcm->gsm", combine, y_EGCS)
        return y_GSS.reshape(-1, d_unit)[:num_units]


PEER_MEMORY_LIMIT_BYTES = 3 * 2**30
"""Peers whose big intermediate tensors would exceed this are skipped (reported as such)."""


def peer_memory_estimate(name: str, layer: nn.Module, tokens: int, element_size: int = 4,
                         gshard_capacity_factor: float = 1.25, gshard_group_size: int = 512) -> int:
    """Bytes of the largest intermediates a peer materialises (0 when nothing out of scale)."""
    if not isinstance(layer, MHMoE):
        return 0
    units = tokens * layer.num_heads
    experts = layer.experts
    if name == "hf_batched_mm":  # one gathered copy of the expert weights per assignment
        per_row = 3 * experts.d_expert * experts.d_in
        return units * layer.router.top_k * per_row * element_size
    if name == "gshard":  # dispatch and combine (G, S, E, C) and their one-hot temporaries
        group = min(gshard_group_size, units)
        capacity = math.ceil(gshard_capacity_factor * group * layer.router.top_k / experts.num_experts)
        return 4 * units * experts.num_experts * capacity * element_size
    return 0


def build_peer(name: str, layer: nn.Module, **options) -> Callable[[torch.Tensor], Any]:
    """The module of peer ``name`` for our ``layer`` (weights copied)."""
    if name == "ours":
        return layer
    if not isinstance(layer, MHMoE):
        raise ValueError(f"peer {name!r} applies to MoE variants only")
    if name == "grouped":
        peer = copy.deepcopy(layer)
        peer.experts.implementation = "grouped"
        return peer
    if name == "loop":
        return LoopPeer(layer)
    if name in HF_IMPLEMENTATIONS:
        return HFPeer(layer, HF_IMPLEMENTATIONS[name])
    if name == "gshard":
        return GShardPeer(layer, **options)
    raise ValueError(f"peer={name!r}: must be one of {', '.join(PEERS)}")
