"""Step-level load balancing of the MoE layers of a model: global-batch counts and the
aux-loss-free selection bias (``MoEConfig.load_balancing``; docs/load_balancing.md).

Both need what a single forward cannot see, the routing of the whole optimiser step (all
micro-batches, all data-parallel ranks); the training loop calls these around each step.

* Global-batch balancing (Qiu et al., "Demons in the Detail", arXiv 2501.11873, Sec. 3): the
  loss E * sum_i f_i * P_i with f_i counted over the global batch, P_i local and differentiable.
  The counts of later micro-batches are not known when an earlier micro-batch runs its
  backward, so ``global_batch_counts`` counts them first in a no-grad forward of every
  micro-batch (routing only depends on the weights, unchanged within the step), sums them over
  the ranks, and ``global_counts`` hands them to the layers for the step's real forwards. Then
  with equal micro-batches, the mean over micro-batches and ranks of E * sum_i f^G_i P^mb_i is
  E * sum_i f^G_i P^G_i: the same loss, and gradient, as one forward over the whole global
  batch. The price is one extra forward without autograd per micro-batch (about a third of a
  step's compute); with one micro-batch on one rank nothing is counted twice. Megatron-core's
  ``global_aux_loss`` instead uses the counts accumulated so far (exact only for the last
  micro-batch).
* Aux-loss-free (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2): ``BiasBalancer`` sums the
  assignment counts of the step's micro-batches, all-reduces them over the ranks and moves
  each layer's bias b_i by gamma * sign(mean load - load_i) once per optimiser step
  (``mhmoe.layers.routing.update_selection_bias``). Every rank applies the same update to the
  same bias, so the replicated buffers stay equal (also under expert parallelism, where the
  router is replicated).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from mhmoe.layers.mh_moe import MHMoE
from mhmoe.layers.moe import MoEAux
from mhmoe.layers.routing import update_selection_bias

ReduceSum = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the data-parallel ranks in place (``DistContext.all_reduce_sum_``)."""


def moe_layers(model: nn.Module) -> list[MHMoE]:
    """The MoE layers of ``model`` in module order (the order of ``LMOutput.moe_aux``)."""
    return [module for module in model.modules() if isinstance(module, MHMoE)]


def uses_global_batch(model: nn.Module) -> bool:
    return any(layer.config.load_balancing == "global-batch" for layer in moe_layers(model))


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def global_batch_counts(
    forward: Callable[[torch.Tensor], object], micro_batches: Iterable[torch.Tensor],
    reduce_sum: ReduceSum = _identity,
) -> list[torch.Tensor]:
    """Per MoE layer, the (E,) assignment counts of the whole step: a no-grad ``forward`` of
    every micro-batch (returning an ``LMOutput``), summed, then summed over the ranks."""
    totals: list[torch.Tensor] | None = None
    with torch.no_grad():
        for inputs in micro_batches:
            counts = [aux.tokens_per_expert for aux in forward(inputs).moe_aux]
            totals = counts if totals is None else [t + c for t, c in zip(totals, counts)]
    if not totals:
        return []
    sizes = [t.numel() for t in totals]
    flat = reduce_sum(torch.cat(totals))  # one collective for all layers
    return list(torch.split(flat, sizes))


@contextlib.contextmanager
def global_counts(model: nn.Module, counts: list[torch.Tensor] | None) -> Iterator[None]:
    """Within the block, the MoE layers take f_i from ``counts`` (``global_batch_counts``;
    None: nothing changes); cleared on exit, so evaluation never sees them."""
    layers = moe_layers(model)
    if counts is not None and len(counts) != len(layers):
        raise ValueError(f"{len(counts)} global-batch counts for {len(layers)} MoE layers")
    try:
        if counts is not None:
            for layer, layer_counts in zip(layers, counts):
                layer.global_counts_E = layer_counts
        yield
    finally:
        for layer in layers:
            layer.global_counts_E = None


class BiasBalancer:
    """Aux-loss-free balancing over the optimiser steps (module docstring): ``add`` each
    micro-batch's ``moe_aux``, then ``step`` once after the optimiser step."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = moe_layers(model)
        self.biased = [getattr(layer.router, "expert_bias", None) is not None for layer in self.layers]
        self.counts: list[torch.Tensor | None] = [None] * len(self.layers)

    @property
    def active(self) -> bool:
        return any(self.biased)

    def add(self, moe_aux: list[MoEAux]) -> None:
        if not self.active:
            return
        for index, aux in enumerate(moe_aux):
            if self.biased[index]:
                counts = aux.tokens_per_expert.detach()
                previous = self.counts[index]
                self.counts[index] = counts.clone() if previous is None else previous + counts

    def step(self, reduce_sum: ReduceSum = _identity, apply: bool = True) -> None:
        """Update every biased layer from the step's counts summed over ranks (``apply``
        False: a skipped step, the counts are dropped and the bias kept), then reset."""
        indices = [i for i, counts in enumerate(self.counts) if counts is not None]
        if apply and indices:
            sizes = [self.counts[i].numel() for i in indices]
            flat = reduce_sum(torch.cat([self.counts[i] for i in indices]))
            for i, counts in zip(indices, torch.split(flat, sizes)):
                router = self.layers[i].router
                with torch.no_grad():
                    update_selection_bias(router.expert_bias, counts.to(router.expert_bias.device),
                                          self.layers[i].config.bias_update_rate)
        self.counts = [None] * len(self.layers)
