"""Top-k router and the auxiliary routing losses (pure functions).

Shape legend: N routed units (tokens for SMoE, sub-tokens for MH-MoE), S unit size,
E experts, K top-k.

Router semantics (the paper is silent; these are our documented defaults):

1. logits_NE = x_NS @ W_router^T, computed in float32 whatever the autocast dtype, because
   low-precision logits flip near-tied top-k choices;
2. probs_NE = softmax(logits_NE) over all E experts;
3. weights_NK, ids_NK = top-k of probs_NE;
4. when K > 1 the K weights are renormalised to sum to 1; when K = 1 the raw probability is
   kept, so the router still receives a gradient from the language-model loss
   (``normalize_top_k`` overrides either default).

Losses (returned, never stored in module-global lists):

* load balancing (Switch Transformer / GShard): L_aux = E * sum_i f_i * P_i, with f_i the
  fraction of the N*K assignments that go to expert i and P_i the mean router probability of
  expert i over the N units. Its value is 1 under perfectly uniform routing.
* router z-loss (ST-MoE): mean over units of logsumexp(logits)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    logits_NE: torch.Tensor  # float32
    probs_NE: torch.Tensor  # float32, softmax over all experts
    weights_NK: torch.Tensor  # float32 combine weights of the selected experts
    expert_ids_NK: torch.Tensor  # int64


class TopKRouter(nn.Module):
    """Linear gate G: R^S -> R^E followed by softmax and top-k (see the module docstring)."""

    def __init__(
        self, d_in: int, num_experts: int, top_k: int, normalize_top_k: bool | None = None
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = top_k > 1 if normalize_top_k is None else bool(normalize_top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.weight.shape[1] ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_NS: torch.Tensor) -> RouterOutput:
        # Router logits in float32, outside autocast (module docstring, point 1).
        with torch.autocast(device_type=x_NS.device.type, enabled=False):
            logits_NE = F.linear(x_NS.float(), self.weight.float())
        probs_NE = torch.softmax(logits_NE, dim=-1)
        weights_NK, expert_ids_NK = top_k_experts(probs_NE, self.top_k)
        if self.normalize_top_k:
            weights_NK = weights_NK / weights_NK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_NE, probs_NE, weights_NK, expert_ids_NK)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize_top_k={self.normalize_top_k}"
        )


def top_k_experts(probs_NE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_NK, ids_NK): the k largest probabilities of each row, in descending order.

    On CPU with small k (MH-MoE h=3 routes 3 * T sub-tokens top-3 over 96 experts) k rounds of
    ``max`` are about twice as fast as ``torch.topk``; the ids are chosen without autograd and the
    weights gathered, so the gradient is the same as topk's.
    """
    if probs_NE.device.type != "cpu" or top_k > 4:
        return torch.topk(probs_NE, top_k, dim=-1)
    with torch.no_grad():
        remaining_NE = probs_NE.detach().clone()
        ids = []
        for _ in range(top_k):
            best_N1 = remaining_NE.argmax(dim=-1, keepdim=True)
            ids.append(best_N1)
            remaining_NE.scatter_(1, best_N1, -1.0)  # probabilities are >= 0: never chosen again
        expert_ids_NK = torch.cat(ids, dim=1)
    return probs_NE.gather(1, expert_ids_NK), expert_ids_NK


def load_balancing_loss(
    probs_NE: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """L_aux = E * sum_i f_i * P_i (Switch Transformer Eq. 4, GShard), over the routed units.

    ``tokens_per_expert_E`` counts the N*K assignments (before any capacity dropping), so f
    sums to 1 for every top-k; P_i is the mean softmax probability of expert i.
    """
    num_experts = probs_NE.shape[-1]
    if probs_NE.shape[0] == 0:
        return probs_NE.sum() * 0.0
    fraction_E = tokens_per_expert_E.to(probs_NE.dtype) / tokens_per_expert_E.sum().clamp(min=1)
    mean_prob_E = probs_NE.mean(dim=0)
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_n logsumexp(logits_n)^2 (keeps logits small and stable)."""
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0.0
    return torch.logsumexp(logits_NE, dim=-1).square().mean()
