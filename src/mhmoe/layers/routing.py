"""Top-k router and the auxiliary routing losses (pure functions).

Shape legend: N routed units (tokens for SMoE, sub-tokens for MH-MoE), S unit size,
E experts, K top-k.

Router semantics (the paper is silent; these are our documented defaults):

1. logits_NE = x_NS @ W_router^T, computed in float32 whatever the autocast dtype, because
   low-precision logits flip near-tied top-k choices; float64 inputs stay in float64 (float32
   would hide router errors below about 1e-7 from float64 reference tests);
2. probs_NE = softmax(logits_NE) over all E experts;
3. weights_NK, ids_NK = top-k of probs_NE, in descending order; exact ties go to the lowest
   expert index first (``torch.argmax``'s rule) on CPU with K <= 4, to ``torch.topk``'s order
   elsewhere;
4. when K > 1 the K weights are renormalised to sum to 1; when K = 1 the raw probability is
   kept, so the router still receives a gradient from the language-model loss
   (``normalize_top_k`` overrides either default).

Losses (returned, never stored in module-global lists):

* load balancing: L_aux = E * sum_i f_i * P_i, with f_i the fraction of the N*K assignments
  that go to expert i (counts over all N*K assignments, before capacity dropping) and P_i the
  mean router probability of expert i over the N units. This is the Megatron-core /
  DeepSeekMoE form (DeepSeekMoE, arXiv 2401.06066, Eq. 12-14, with f'_i = f_i * E), equal to
  Switch Transformer's Eq. 4 for k = 1; its value is 1 under perfectly uniform routing for
  every k. HF transformers' Mixtral ``load_balancing_loss_func`` divides the counts by N
  instead of N*K, so its value is k times ours. Where the counts come from (this micro-batch,
  or the whole global batch: ``MoEConfig.load_balancing``) is the caller's choice:
  ``tokens_per_expert_E`` may be any counts, P_i stays this call's differentiable mean.
* sequence-wise balance (DeepSeek-V3, arXiv 2412.19437, Eq. 17-20): the same product per
  sequence, averaged over the sequences (``sequence_balance_loss``).
* router z-loss (ST-MoE): mean over units of logsumexp(logits)^2.

Implementation: steps 2-4 and the two statistics the losses need (P_E and logsumexp_N) are one
autograd node, ``_RouteFunction`` (see ``route_logits``). Written with plain autograd the router
made a dozen passes over the (N, E) matrix forward and backward (softmax, k rounds of argmax,
logsumexp, mean, their backwards); for MH-MoE, which routes H sub-tokens per token over many
experts, that was a sixth of the MoE layer's time on CPU. The node makes one softmax, a top-k
selection on packed integer keys (``_top_k_ids_packed``), one matrix-vector product for P_E,
and one fused backward expression: about 3x less time at N = 49152, E = 96, K = 3. The plain
formulas stay public (``load_balancing_loss``, ``router_z_loss``): routers that do not provide
the fused statistics fall back to them, and the tests check the node against them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class RouterOutput:
    """What a router returns.

    ``probs_NE`` (float32 softmax over all experts) is computed on first access, from the
    logits, when the router did not store it: the dispatch never needs the (N, E) matrix, only
    analytics hooks and tests do. ``mean_probs_E`` (P_i) and ``logsumexp_N`` carry gradients
    and are what the losses are computed from (``load_balancing_loss_value``,
    ``z_loss_value``); routers that leave them None get the plain formulas.
    """

    def __init__(
        self,
        logits_NE: torch.Tensor,  # float32 (float64 for float64 inputs)
        probs_NE: torch.Tensor | None,  # logits' dtype, softmax over all experts (None: lazy)
        weights_NK: torch.Tensor,  # logits' dtype, combine weights of the selected experts
        expert_ids_NK: torch.Tensor,  # int64
        mean_probs_E: torch.Tensor | None = None,  # P_i = mean_n probs_ni
        logsumexp_N: torch.Tensor | None = None,  # logsumexp_i logits_ni
    ) -> None:
        self.logits_NE = logits_NE
        self._probs_NE = probs_NE
        self.weights_NK = weights_NK
        self.expert_ids_NK = expert_ids_NK
        self.mean_probs_E = mean_probs_E
        self.logsumexp_N = logsumexp_N

    @property
    def probs_NE(self) -> torch.Tensor:
        if self._probs_NE is None:
            # The same kernel on the same logits as inside _RouteFunction: the same values.
            self._probs_NE = torch.softmax(self.logits_NE, dim=-1)
        return self._probs_NE

    def load_balancing_loss_value(self, tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        """``load_balancing_loss`` of this routing, from P_E when the router computed it."""
        if self.mean_probs_E is None:
            return load_balancing_loss(self.probs_NE, tokens_per_expert_E)
        return load_balancing_loss_from_mean_probs(self.mean_probs_E, tokens_per_expert_E)

    def z_loss_value(self) -> torch.Tensor:
        """``router_z_loss`` of this routing, from logsumexp_N when the router computed it."""
        if self.logsumexp_N is None:
            return router_z_loss(self.logits_NE)
        if self.logsumexp_N.shape[0] == 0:
            return self.logsumexp_N.sum() * 0.0
        return self.logsumexp_N.square().mean()

    def __repr__(self) -> str:
        shapes = ", ".join(
            f"{name}={tuple(value.shape)}"
            for name, value in (("logits_NE", self.logits_NE), ("weights_NK", self.weights_NK),
                                ("expert_ids_NK", self.expert_ids_NK))
        )
        return f"RouterOutput({shapes})"


class TopKRouter(nn.Module):
    """Linear gate G: R^S -> R^E followed by softmax and top-k (see the module docstring)."""

    def __init__(
        self, d_in: int, num_experts: int, top_k: int, normalize_top_k: bool | None = None,
        selection_bias: bool = False,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_top_k = top_k > 1 if normalize_top_k is None else bool(normalize_top_k)
        self.weight = nn.Parameter(torch.empty(num_experts, d_in))
        # Aux-loss-free balancing (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2 Eq. 16): a
        # per-expert bias b_i added to the scores for the top-k selection only. A float32
        # buffer, not a parameter: saved in the state_dict (so checkpointed and restored
        # exactly), never seen by the optimiser or weight decay; updated by
        # ``update_selection_bias`` once per optimiser step.
        self.expert_bias: torch.Tensor | None
        if selection_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.weight.shape[1] ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x_NS: torch.Tensor) -> RouterOutput:
        # Router logits in float32 (float64 kept), outside autocast (module docstring, point 1).
        dtype = torch.float64 if x_NS.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x_NS.device.type, enabled=False):
            logits_NE = F.linear(x_NS.to(dtype), self.weight.to(dtype))
        return route_logits(logits_NE, self.top_k, self.normalize_top_k, self.expert_bias)

    def extra_repr(self) -> str:
        return (
            f"d_in={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"normalize_top_k={self.normalize_top_k}"
        )


def route_logits(
    logits_NE: torch.Tensor, top_k: int, normalize_top_k: bool,
    selection_bias_E: torch.Tensor | None = None,
) -> RouterOutput:
    """Steps 2-4 of the module docstring, plus P_E and logsumexp_N, as one autograd node.

    Values equal the plain formulas up to rounding and the ids are the same ones
    (``top_k_experts`` on the same softmax); any floating dtype, any device, N = 0 allowed.
    ``selection_bias_E`` (aux-loss-free balancing): the ids are the top-k of probs + bias
    (DeepSeek-V3 Eq. 16); the combine weights stay the unbiased probabilities of those ids.
    """
    weights_NK, expert_ids_NK, mean_probs_E, logsumexp_N = _RouteFunction.apply(
        logits_NE, top_k, normalize_top_k, selection_bias_E
    )
    return RouterOutput(logits_NE, None, weights_NK, expert_ids_NK, mean_probs_E, logsumexp_N)


class _RouteFunction(torch.autograd.Function):
    """logits_NE -> (weights_NK, ids_NK, P_E, logsumexp_N); ids_NK has no gradient.

    Forward, with p = softmax(l) per row:
      ids   = top-k of p (``_top_k_ids``);  p_sel_nk = p_{n, id_nk}
      w_nk  = p_sel_nk / sum_k p_sel_nk  (normalised; = softmax over the K selected logits)
            = p_sel_nk                   (raw)
      P_E   = (1/N) sum_n p_nE
      lse_n = l_ni - ln p_ni for any i; i = id_n1, the largest p, loses least to rounding.

    Backward, with g_w, g_P, g_lse the output gradients and dp_nj/dl_ni = p_nj (delta_ij - p_ni):
      grad_l_ni = p_ni (c_i + a_n) + sum_k [i = id_nk] b_nk, where
      c_i = g_P_i / N                                       (from P: p_ni (c_i - sum_j p_nj c_j))
      a_n = g_lse_n - sum_j p_nj c_j  [- sum_k g_w_nk w_nk when raw]
      b_nk = w_nk (g_w_nk - sum_k' w_nk' g_w_nk')  (normalised: softmax over the selected)
           = w_nk g_w_nk                             (raw: w_nk (delta - p_ni) summed over k)
    One (N, E) matrix is saved, p (softmax's own backward saves it too; the plain formulation
    also kept the logits, for logsumexp's backward), and the backward makes three passes over
    (N, E) matrices (p @ c, the broadcast sum, the product).
    """

    @staticmethod
    def forward(ctx, logits_NE: torch.Tensor, top_k: int, normalize_top_k: bool,
                selection_bias_E: torch.Tensor | None = None):
        num_units = logits_NE.shape[0]
        probs_NE = torch.softmax(logits_NE, dim=-1)
        if selection_bias_E is None:
            expert_ids_NK = _top_k_ids(probs_NE, top_k)
        else:  # biased scores can be negative: not for the packed keys (they need p >= 0)
            with torch.no_grad():
                biased_NE = probs_NE + selection_bias_E.to(probs_NE.dtype)
                expert_ids_NK = (torch.topk(biased_NE, top_k, dim=-1).indices
                                 if biased_NE.device.type != "cpu" or top_k > 4
                                 else _top_k_ids_argmax(biased_NE, top_k))
        probs_NK = probs_NE.gather(1, expert_ids_NK)
        weights_NK = probs_NK / probs_NK.sum(dim=-1, keepdim=True) if normalize_top_k else probs_NK
        # P_E = (1/N) sum_n p_nE as a matrix-vector product (faster than a column sum on CPU);
        # zeros when N = 0.
        mean_probs_E = torch.mv(probs_NE.t(), probs_NE.new_full((num_units,), 1.0 / max(num_units, 1)))
        # lse_n = l_ni - ln p_ni at i = id_n1 (the top choice: p_ni >= 1/E, no underflow).
        if selection_bias_E is None:
            logsumexp_N = logits_NE.gather(1, expert_ids_NK[:, :1]).squeeze(1) - probs_NK[:, 0].log()
        else:  # the biased first choice may have a tiny p: take the largest p instead
            top_N1 = probs_NE.argmax(dim=-1, keepdim=True)
            logsumexp_N = logits_NE.gather(1, top_N1).squeeze(1) - probs_NE.gather(1, top_N1).squeeze(1).log()

        ctx.mark_non_differentiable(expert_ids_NK)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(probs_NE, weights_NK, expert_ids_NK)
        ctx.normalize_top_k = normalize_top_k
        return weights_NK, expert_ids_NK, mean_probs_E, logsumexp_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_weights_NK, _grad_ids, grad_mean_probs_E, grad_logsumexp_N):
        probs_NE, weights_NK, expert_ids_NK = ctx.saved_tensors
        num_units = probs_NE.shape[0]
        # a_n (row term) starts as g_lse_n; c_i = g_P_i / N (column term).
        row_N = (
            grad_logsumexp_N.clone()
            if grad_logsumexp_N is not None
            else probs_NE.new_zeros(num_units)
        )
        column_E = None
        if grad_mean_probs_E is not None:
            column_E = grad_mean_probs_E / max(num_units, 1)
            row_N -= torch.mv(probs_NE, column_E)  # a_n -= sum_j p_nj c_j
        sparse_NK = None
        if grad_weights_NK is not None:
            gw_w_NK = grad_weights_NK * weights_NK
            if ctx.normalize_top_k:
                # b_nk = w_nk g_w_nk - w_nk sum_k' w_nk' g_w_nk'
                sparse_NK = gw_w_NK - weights_NK * gw_w_NK.sum(dim=-1, keepdim=True)
            else:
                # b_nk = w_nk g_w_nk; a_n -= sum_k g_w_nk w_nk
                sparse_NK = gw_w_NK
                row_N -= gw_w_NK.sum(dim=-1)
        # grad_l_ni = p_ni (c_i + a_n) + sum_k [i = id_nk] b_nk
        if column_E is not None:
            grad_logits_NE = torch.add(column_E, row_N.unsqueeze(1)).mul_(probs_NE)
        else:
            grad_logits_NE = probs_NE * row_N.unsqueeze(1)
        if sparse_NK is not None:
            grad_logits_NE.scatter_add_(1, expert_ids_NK, sparse_NK)
        return grad_logits_NE, None, None, None


def top_k_experts(probs_NE: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights_NK, ids_NK): the k largest probabilities of each row, in descending order.

    The ids are chosen without autograd (``_top_k_ids``) and the weights gathered, so the
    gradient is the same as ``torch.topk``'s.
    """
    expert_ids_NK = _top_k_ids(probs_NE, top_k)
    return probs_NE.gather(1, expert_ids_NK), expert_ids_NK


SMALL_ROUTING_ELEMENTS = 4096
"""Routing problems with at most this many N x E probabilities take the plain argmax rounds."""


def _top_k_ids(probs_NE: torch.Tensor, top_k: int) -> torch.Tensor:
    """ids_NK of the k largest probabilities of each row, in descending order (no gradient).

    ``torch.topk`` on GPUs and for k > 4. On CPU with small k (MH-MoE h=3 routes 3 * T
    sub-tokens top-3 over 96 experts) k rounds of ``argmax`` are about twice as fast as topk,
    and the packed-key rounds of ``_top_k_ids_packed`` (float32, eager) about four times faster
    than argmax; both break exact ties towards the lowest expert index and give the same ids.
    """
    with torch.no_grad():
        probs_NE = probs_NE.detach()
        if probs_NE.device.type != "cpu" or top_k > 4:
            return torch.topk(probs_NE, top_k, dim=-1).indices
        # At decoding sizes the packed keys' fixed cost dominates: argmax rounds take 13 vs
        # 145 us at (N, E, K) = (1, 8, 1) and 56 vs 416 us at (3, 96, 3) (CPU time, this CPU).
        small = probs_NE.shape[0] * probs_NE.shape[1] <= SMALL_ROUTING_ELEMENTS
        if probs_NE.dtype == torch.float32 and not small and not torch.compiler.is_compiling():
            return _top_k_ids_packed(probs_NE, top_k)
        return _top_k_ids_argmax(probs_NE, top_k)


def _top_k_ids_argmax(probs_NE: torch.Tensor, top_k: int) -> torch.Tensor:
    """k rounds of argmax, each choice then set to -inf (ties: lowest index first)."""
    remaining_NE = probs_NE.clone()
    ids = []
    for _ in range(top_k):
        best_N1 = remaining_NE.argmax(dim=-1, keepdim=True)
        ids.append(best_N1)
        remaining_NE.scatter_(1, best_N1, float("-inf"))
    return torch.cat(ids, dim=1)


def _top_k_ids_packed(probs_NE: torch.Tensor, top_k: int) -> torch.Tensor:
    """``_top_k_ids_argmax`` on float32 probabilities through vectorised integer maxima.

    ``argmax`` over the last dimension is a scalar loop on CPU while ``amax`` over int32 is
    vectorised (7 ms vs 0.5 ms at (49152, 96)). So each probability (>= 0, whose float32 bit
    pattern therefore orders like the value) becomes an int32 key: its bits with the low
    b = ceil(log2 E) bits replaced by (E - 1 - i), so that one ``amax`` gives both the value's
    "bucket" (the high bits) and, inside the bucket, the lowest index i. J = min(K + 1, E)
    rounds of amax, each removing the key it found, give the row's first J keys in
    (bucket, index) order. If those J keys lie in J distinct buckets, each of the first K was
    alone in its bucket and buckets order like the values, so the first K ids are exactly the
    argmax rounds' ids. Rows where two adjacent keys share a bucket (an exact or a near tie,
    within 2^b float32 ulps: a few rows in 10^4 for random logits) are redone with argmax.
    """
    probs_NE = probs_NE.contiguous()
    num_units, num_experts = probs_NE.shape
    low_bits = max(1, (num_experts - 1).bit_length())
    low_mask = (1 << low_bits) - 1
    # key_ni = (bits(p_ni) & ~low_mask) | (E - 1 - i). The mask is an (E,) tensor, not a Python
    # int: the broadcast kernel is vectorised, the scalar one is not (2x slower).
    high_mask_E = torch.full((num_experts,), ~low_mask, dtype=torch.int32, device=probs_NE.device)
    key_NE = torch.bitwise_and(probs_NE.view(torch.int32), high_mask_E)
    key_NE.bitwise_or_(
        torch.arange(num_experts - 1, -1, -1, dtype=torch.int32, device=probs_NE.device)
    )
    # Flat index (into key_NE.view(-1)) of each row's last expert; expert i = E - 1 - low bits.
    row_end_N = torch.arange(num_units, device=probs_NE.device) * num_experts + (num_experts - 1)
    num_rounds = min(top_k + 1, num_experts)
    flat_ids = []
    tied_N = torch.zeros(num_units, dtype=torch.bool, device=probs_NE.device)
    for round_ in range(num_rounds):
        best_N = key_NE.amax(dim=-1)
        if round_:  # same bucket (high bits) as the previous pick: not decided by the keys
            tied_N |= torch.bitwise_xor(best_N, previous_N) <= low_mask
        if round_ < top_k:
            flat_ids.append(row_end_N - (best_N & low_mask))
            if round_ + 1 < num_rounds:  # remove the pick: below every key of a probability
                key_NE.view(-1).index_fill_(0, flat_ids[-1], torch.iinfo(torch.int32).min)
        previous_N = best_N
    expert_ids_NK = torch.stack(flat_ids, dim=1) - (row_end_N - (num_experts - 1)).unsqueeze(1)
    if bool(tied_N.any()):
        tied_rows = tied_N.nonzero().squeeze(1)
        expert_ids_NK[tied_rows] = _top_k_ids_argmax(probs_NE[tied_rows], top_k)
    return expert_ids_NK


def count_values(index: torch.Tensor, size: int) -> torch.Tensor:
    """Histogram of ``index`` values in [0, size) as int64 (size,), e.g. assignments per expert.

    ``torch.bincount`` would do, but its output shape depends on the data: on CUDA it reads
    max(index) back to the host (a sync in every step) and under torch.compile it breaks the
    graph. ``index_add_`` into a fixed size does neither.
    """
    flat = index.reshape(-1)
    return torch.zeros(size, dtype=torch.int64, device=flat.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int64)
    )


def load_balancing_loss(
    probs_NE: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """L_aux = E * sum_i f_i * P_i (Switch Transformer Eq. 4, GShard), over the routed units.

    ``tokens_per_expert_E`` counts the N*K assignments (before any capacity dropping), so f
    sums to 1 for every top-k; P_i is the mean softmax probability of expert i.
    """
    if probs_NE.shape[0] == 0:
        return probs_NE.sum() * 0.0
    return load_balancing_loss_from_mean_probs(probs_NE.mean(dim=0), tokens_per_expert_E)


def load_balancing_loss_from_mean_probs(
    mean_probs_E: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """``load_balancing_loss`` given P_E = mean_n probs_nE (zeros when there are no units)."""
    num_experts = mean_probs_E.shape[-1]
    fraction_E = tokens_per_expert_E.to(mean_probs_E.dtype) / tokens_per_expert_E.sum().clamp(min=1)
    return num_experts * torch.sum(fraction_E * mean_probs_E)


def router_z_loss(logits_NE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_n logsumexp(logits_n)^2 (keeps logits small and stable)."""
    if logits_NE.shape[0] == 0:
        return logits_NE.sum() * 0.0
    return torch.logsumexp(logits_NE, dim=-1).square().mean()


def sequence_balance_loss(
    probs_NE: torch.Tensor, expert_ids_NK: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, Eq. 17-20),
    without its weight alpha: mean over sequences s of E * sum_i f_si * P_si, with f_si the
    fraction of the sequence's assignments that go to expert i and P_si the mean probability
    of expert i over its units (the same convention as ``load_balancing_loss``; V3 writes
    f'_i = E f_i). The N units are ``num_sequences`` equal blocks in order (token-major).
    Our scores are softmax probabilities, which already sum to 1 over the experts (V3
    normalises its sigmoid affinities to get the same)."""
    num_units, num_experts = probs_NE.shape
    if num_units == 0:
        return probs_NE.sum() * 0.0
    if num_sequences < 1 or num_units % num_sequences:
        raise ValueError(f"{num_units} routed units do not split into {num_sequences} equal sequences")
    per_sequence = num_units // num_sequences
    mean_probs_SE = probs_NE.reshape(num_sequences, per_sequence, num_experts).mean(dim=1)
    ids_SM = expert_ids_NK.reshape(num_sequences, -1)
    counts_SE = torch.zeros(num_sequences, num_experts, dtype=probs_NE.dtype, device=probs_NE.device)
    counts_SE.scatter_add_(1, ids_SM, torch.ones_like(ids_SM, dtype=probs_NE.dtype))
    fraction_SE = counts_SE / ids_SM.shape[1]
    return num_experts * (fraction_SE * mean_probs_SE).sum(dim=1).mean()


def update_selection_bias(
    bias_E: torch.Tensor, tokens_per_expert_E: torch.Tensor, rate: float
) -> torch.Tensor:
    """Aux-loss-free balancing's update (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2): in place,
    b_i += gamma * sign(mean_j c_j - c_i), with c the global-batch assignment counts of one
    optimiser step (overloaded experts go down, underloaded ones up; gamma = 1e-3 in the paper
    and in torchtitan's ``load_balance_coeff``). Returns ``bias_E``."""
    counts_E = tokens_per_expert_E.to(torch.float64)
    step_E = torch.sign(counts_E.mean() - counts_E).to(bias_E.dtype)
    return bias_E.add_(step_E, alpha=rate)
