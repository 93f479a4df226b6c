"""Batches from a token array: random windows for training, sequential windows for evaluation.

Training (:class:`TrainBatchSampler`): an epoch cuts the token array into non-overlapping
windows of ``seq_len + 1`` tokens (neighbours share one token: the last target of one window is
the first input of the next) starting at a random offset in ``[0, seq_len)``, and visits them in
a random order. Offset and order come from ``numpy.random.default_rng([seed, epoch])``, so a
batch is a pure function of ``(seed, epoch, position)``: the sampler's ``state_dict()`` is just
those numbers and resuming reproduces the exact batch sequence. Epochs roll over by themselves;
a batch may straddle two epochs. With ``world_size > 1`` every rank computes the same global
order and takes its own ``batch_size`` windows of each global step, so ranks never overlap.

Evaluation (:func:`eval_batches`): windows ``tokens[s : s + seq_len + 1]`` for
``s = 0, seq_len, 2 * seq_len, ...``, so every token but the first is a target exactly once.
The last window may be shorter; rows are padded with ``ignore_index`` targets, and each batch
reports its number of real targets. ``max_windows`` keeps only that many windows, spread evenly
over the whole set (window ``floor(i * W / n)`` for ``i < n`` of the ``W`` windows), so a cheap
evaluation samples every part of a multi-document set instead of its opening. Summing ``cross_entropy(..., reduction="sum",
ignore_index=-100)`` over all batches and dividing by ``n_bytes * ln 2`` gives bits per byte
(:func:`bits_per_byte`).

Shapes: B = batch size, T = ``seq_len``. Inputs and targets are ``torch.long`` of shape (B, T).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

IGNORE_INDEX = -100


def _require_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _require_rank(rank: int, world_size: int) -> None:
    _require_positive("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r}: must be an integer in [0, world_size={world_size})")


def _windows_to_tensors(windows_BW: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # (B, T+1) ids -> inputs (B, T), targets (B, T), int64 as embedding and cross_entropy expect.
    windows_BW = torch.from_numpy(windows_BW.astype(np.int64))
    return windows_BW[:, :-1].contiguous(), windows_BW[:, 1:].contiguous()


class TrainBatchSampler:
    """Deterministic, resumable random windows over a 1-D token array (see the module docstring).

    ``next_batch()`` (or iteration, which never ends) returns ``(inputs_BT, targets_BT)``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        _require_positive("batch_size", batch_size)
        _require_positive("seq_len", seq_len)
        _require_rank(rank, world_size)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r}: must be a non-negative integer")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        if tokens.shape[0] < seq_len + 1:
            raise ValueError(
                f"the training set has {tokens.shape[0]} tokens; a window of seq_len={seq_len} needs at least {seq_len + 1}"
            )
        self.tokens = tokens
        self.batch_size = int(batch_size)
        self.seq_len = int(seq_len)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0
        self.position = 0  # windows of the current epoch already consumed by all ranks together
        self._layout_epoch: int | None = None
        self._layout: tuple[int, np.ndarray] = (0, np.empty(0, dtype=np.int64))

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def epoch_layout(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, order) of ``epoch``: window ``j`` starts at ``offset + order[j] * seq_len``."""
        if self._layout_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            # Offsets that still leave at least one full window; varying the offset per epoch
            # shows the model different window boundaries on repeated data.
            offset = int(rng.integers(0, min(self.seq_len, self.n_tokens - self.seq_len)))
            n_windows = (self.n_tokens - 1 - offset) // self.seq_len
            self._layout = (offset, rng.permutation(n_windows))
            self._layout_epoch = epoch
        return self._layout

    def windows_per_epoch(self, epoch: int | None = None) -> int:
        """Number of windows in ``epoch`` (default: the current one)."""
        return int(self.epoch_layout(self.epoch if epoch is None else epoch)[1].shape[0])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs_BT, targets_BT)`` for this rank; advances the state by one global step."""
        needed = self.batch_size * self.world_size
        starts: list[np.ndarray] = []
        while needed > 0:
            offset, order = self.epoch_layout(self.epoch)
            take = min(needed, order.shape[0] - self.position)
            starts.append(offset + order[self.position : self.position + take] * self.seq_len)
            self.position += take
            needed -= take
            if self.position == order.shape[0]:
                self.epoch += 1
                self.position = 0
        starts_G = np.concatenate(starts)  # G = batch_size * world_size global windows
        starts_B = starts_G[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        index_BW = starts_B[:, None] + np.arange(self.seq_len + 1)  # W = T + 1
        return _windows_to_tensors(np.asarray(self.tokens[index_BW]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        """Everything needed to continue the exact batch sequence (plain ints, checkpoint-friendly)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "seq_len": self.seq_len,
            "n_tokens": self.n_tokens,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``. ``seq_len`` and the token count must match (the window
        layout depends on them); batch size and world size may change, since the position
        counts windows."""
        missing = [k for k in ("seed", "epoch", "position", "seq_len", "n_tokens") if k not in state]
        if missing:
            raise ValueError(f"sampler state lacks {', '.join(missing)}")
        if int(state["seq_len"]) != self.seq_len or int(state["n_tokens"]) != self.n_tokens:
            raise ValueError(
                f"sampler state is for seq_len={state['seq_len']} over {state['n_tokens']} tokens, "
                f"but this sampler has seq_len={self.seq_len} over {self.n_tokens} tokens"
            )
        self.seed = int(state["seed"])
        self._layout_epoch = None
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.windows_per_epoch(epoch):
            raise ValueError(f"sampler state epoch={epoch}, position={position}: out of range")
        self.epoch, self.position = epoch, position


class EvalBatch(NamedTuple):
    """Sequential evaluation windows: inputs/targets (B, T) long, padded targets are
    ``IGNORE_INDEX``; ``n_targets`` counts the real ones."""

    inputs: torch.Tensor
    targets: torch.Tensor
    n_targets: int


def count_eval_windows(n_tokens: int, seq_len: int) -> int:
    """Number of evaluation windows (each predicts up to ``seq_len`` of the ``n_tokens - 1`` targets)."""
    return math.ceil((n_tokens - 1) / seq_len) if n_tokens > 1 else 0


def spread_window_indices(n_windows: int, max_windows: int | None) -> np.ndarray:
    """Indices of ``min(n_windows, max_windows)`` windows spread evenly over ``range(n_windows)``:
    ``floor(i * n_windows / n)``; every window when ``max_windows`` is None or large enough."""
    if max_windows is not None:
        _require_positive("max_windows", max_windows)
    if max_windows is None or max_windows >= n_windows:
        return np.arange(n_windows)
    return (np.arange(max_windows, dtype=np.int64) * n_windows) // max_windows


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int = 1,
    *,
    rank: int = 0,
    world_size: int = 1,
    ignore_index: int = IGNORE_INDEX,
    max_windows: int | None = None,
) -> Iterator[EvalBatch]:
    """Sequential non-overlapping windows covering every target token once (module docstring).

    With ``world_size > 1`` rank ``r`` gets windows ``r, r + world_size, ...``; the ranks
    together cover the set once. Padded input positions hold token 0; they come after the real
    positions, so causal attention keeps them from affecting real targets.
    """
    _require_positive("seq_len", seq_len)
    _require_positive("batch_size", batch_size)
    _require_rank(rank, world_size)
    if tokens.ndim != 1 or tokens.shape[0] < 2:
        raise ValueError(f"an evaluation set needs a 1-D array of at least 2 tokens, got shape {tokens.shape}")
    n_targets_total = tokens.shape[0] - 1
    all_starts = np.arange(0, n_targets_total, seq_len)
    starts = all_starts[spread_window_indices(all_starts.shape[0], max_windows)][rank::world_size]
    for first in range(0, starts.shape[0], batch_size):
        batch_starts = starts[first : first + batch_size]
        lengths = np.minimum(seq_len, n_targets_total - batch_starts)  # real targets per row
        width = int(lengths.max())
        inputs_BT = torch.zeros((batch_starts.shape[0], width), dtype=torch.long)
        targets_BT = torch.full((batch_starts.shape[0], width), ignore_index, dtype=torch.long)
        for row, (start, length) in enumerate(zip(batch_starts.tolist(), lengths.tolist())):
            window = torch.from_numpy(np.asarray(tokens[start : start + length + 1]).astype(np.int64))
            inputs_BT[row, :length] = window[:-1]
            targets_BT[row, :length] = window[1:]
        yield EvalBatch(inputs_BT, targets_BT, int(lengths.sum()))


def bits_per_byte(total_nll_nats: float, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text: ``total_nll / (ln 2 * n_bytes)``, the NLL summed in nats over
    every target token of the set (separator tokens included; they carry zero bytes)."""
    if isinstance(n_bytes, bool) or not isinstance(n_bytes, (int, np.integer)) or n_bytes < 1:
        raise ValueError(f"n_bytes={n_bytes!r}: must be a positive integer")
    return float(total_nll_nats) / (math.log(2) * int(n_bytes))
