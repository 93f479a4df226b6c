"""Routing statistics as pure functions of expert counts and expert ids (no state, no I/O).

Shape legend: E experts, H heads (sub-tokens per token), N = tokens * H routed units, K top-k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mhmoe.layers.routing import count_values


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
    check_min_share(min_share)
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


def check_ids(expert_ids_NK: torch.Tensor, num_heads: int) -> None:
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


def check_min_share(min_share: float) -> None:
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) \
            or not 0.0 <= min_share <= 1.0:
        raise ValueError(f"min_share={min_share!r}: must be a number in [0, 1]")


def distinct_per_token(expert_ids_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    num_units, top_k = expert_ids_NK.shape
    ids_TJ = expert_ids_NK.reshape(num_units // num_heads, num_heads * top_k)  # (N, K) -> (T, H*K)
    sorted_TJ = ids_TJ.sort(dim=1).values
    # Distinct values of a sorted row = 1 + number of steps where the value changes.
    return 1 + (sorted_TJ[:, 1:] != sorted_TJ[:, :-1]).sum(dim=1)


def distinct_experts_per_token(expert_ids_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    """d_t = number of distinct experts among token t's H * K choices; int64 (T,)."""
    check_ids(expert_ids_NK, num_heads)
    if expert_ids_NK.shape[0] == 0:
        return expert_ids_NK.new_zeros(0)
    return distinct_per_token(expert_ids_NK, num_heads)


def head_expert_counts(
    expert_ids_NK: torch.Tensor, num_heads: int, num_experts: int
) -> torch.Tensor:
    """c_{a,e}: assignments of head a's sub-tokens to expert e; int64 (H, E)."""
    check_ids(expert_ids_NK, num_heads)
    num_units, top_k = expert_ids_NK.shape
    ids_THK = expert_ids_NK.reshape(num_units // num_heads, num_heads, top_k)  # (N,K)->(T,H,K)
    head_H11 = torch.arange(num_heads, device=ids_THK.device).view(1, num_heads, 1)
    return count_values(head_H11 * num_experts + ids_THK, num_heads * num_experts).view(
        num_heads, num_experts
    )


def pairwise_mean(matrix_HH: torch.Tensor) -> float | None:
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
    return None if js_HH is None else pairwise_mean(js_HH)


def top1_agreement_counts(expert_ids_NK: torch.Tensor, num_heads: int) -> torch.Tensor:
    top1_TH = expert_ids_NK[:, 0].reshape(-1, num_heads)  # (N,) -> (T, H), first choice
    return (top1_TH[:, :, None] == top1_TH[:, None, :]).sum(dim=0)  # (H, H) token counts


def head_top1_agreement(expert_ids_NK: torch.Tensor, num_heads: int) -> float | None:
    """Mean over head pairs a < b of the share of tokens whose heads a, b share the top-1
    expert; None if H < 2 or there is no token."""
    check_ids(expert_ids_NK, num_heads)
    num_tokens = expert_ids_NK.shape[0] // num_heads
    if num_heads < 2 or num_tokens == 0:
        return None
    agreement = pairwise_mean(top1_agreement_counts(expert_ids_NK, num_heads))
    return agreement / num_tokens
