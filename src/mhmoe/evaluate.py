"""Perplexity and bits per byte of a language model on tokenized evaluation sets.

The paper reports validation perplexity (Section 3, Tables 1-5). For a set of N target tokens
encoding n_bytes bytes of UTF-8 text:

    loss = (1/N) sum_i -ln p(t_i | t_<i)         (nats per token)
    ppl  = exp(loss)
    bpb  = sum_i -ln p(t_i | t_<i) / (ln 2 * n_bytes)   (bits per byte; tokenizer-independent)

Windows are sequential and non-overlapping (``mhmoe.data.batching.eval_batches``): every token
but the first is predicted exactly once, with up to ``seq_len`` tokens of context.
``max_tokens`` evaluates ``ceil(max_tokens / seq_len)`` of those windows, spread evenly over the
whole set (not its opening), so about ``max_tokens`` targets. The byte count then comes from
the per-token byte lengths of a byte-level tokenizer, exact; for other tokenizers the set's
byte count is scaled by the share of targets evaluated, and the result says so. Every result
carries the standard error of its loss over windows (``EvalResult.loss_se``).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mhmoe.analytics.paired import ratio_standard_error
from mhmoe.data import build_caches, load_cache, open_source
from mhmoe.data.batching import IGNORE_INDEX, eval_batches
from mhmoe.data.prepare import prepare_run_data
from mhmoe.data.splits import validate_eval_name
from mhmoe.runs.checkpoint import load_run, read_checkpoint_state, resolve_checkpoint
from mhmoe.runtime import autocast_context, resolve_device, resolve_precision

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """One evaluation set's numbers.

    ``loss_se`` is the standard error of ``loss`` with the evaluation windows as the sampling
    units (ratio estimator: sqrt(W / (W - 1) * sum_w (nll_w - loss * n_w)^2) / sum_w n_w); it
    measures how much the number would move on other text of the same kind, and ignores the
    correlation between neighbouring windows. ``window_nll`` / ``window_targets`` hold the
    per-window sums behind it, in window order: two models evaluated on the same set and settings
    see the same windows, so paired differences can be taken window by window.
    """

    name: str
    loss: float  # mean nats per target token
    ppl: float
    bpb: float | None  # bits per byte (None when the byte count is unknown)
    tokens: int  # target tokens evaluated
    bytes: int | None  # bytes of text those targets encode
    bytes_exact: bool = True
    loss_se: float | None = None  # None with a single window
    windows: int = 0
    window_nll: np.ndarray | None = field(default=None, repr=False, compare=False)
    window_targets: np.ndarray | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("window_nll")
        data.pop("window_targets")
        return data


def token_byte_lengths(tokenizer: Any) -> np.ndarray | None:
    """UTF-8 bytes each token id stands for (0 for special tokens), or None if unknown.

    Exact for byte-level BPE (GPT-2 ``bytes_to_unicode`` alphabet: one character per byte),
    which is what ``mhmoe.data.train_tokenizer`` builds.
    """
    backend = getattr(tokenizer, "backend", tokenizer)
    try:
        config = json.loads(backend.to_str())
    except Exception:  # not a tokenizers.Tokenizer
        return None
    pre = config.get("pre_tokenizer") or {}
    kinds = {pre.get("type")} | {p.get("type") for p in pre.get("pretokenizers", []) or []}
    if "ByteLevel" not in kinds:
        return None
    special = {entry["id"] for entry in config.get("added_tokens", []) if entry.get("special")}
    vocab_size = backend.get_vocab_size(with_added_tokens=True)
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for token_id in range(vocab_size):
        if token_id in special:
            continue
        piece = backend.id_to_token(token_id)
        lengths[token_id] = 0 if piece is None else len(piece)
    return lengths


@torch.no_grad()
def evaluate_tokens(
    model: torch.nn.Module,
    tokens: np.ndarray,
    *,
    name: str = "eval",
    seq_len: int,
    batch_size: int = 8,
    n_bytes: int | None = None,
    byte_lengths: np.ndarray | None = None,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Loss, perplexity and bits per byte of ``model`` on one token array (module docstring).

    ``n_bytes`` is the byte count of the whole array's text; ``byte_lengths`` (from
    ``token_byte_lengths``) makes the byte count exact for a ``max_tokens`` selection of windows.
    """
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r}: must be a positive integer or None")
    device = torch.device(device)
    total_targets = int(tokens.shape[0]) - 1
    if total_targets < 1:
        raise ValueError(f"evaluation set {name!r} has {tokens.shape[0]} tokens; at least 2 are needed")
    max_windows = None if max_tokens is None else math.ceil(max_tokens / seq_len)
    was_training = model.training
    model.eval()
    window_nll: list[np.ndarray] = []
    window_targets: list[np.ndarray] = []
    evaluated_bytes_exact = 0
    try:
        for batch in eval_batches(tokens, seq_len, batch_size, max_windows=max_windows):
            inputs = batch.inputs.to(device)
            targets = batch.targets.to(device)
            with autocast_context(device, autocast_dtype):
                logits = model(inputs).logits
            rows, width = targets.shape
            nll_BT = F.cross_entropy(
                logits.reshape(rows * width, -1).float(),  # (B, T, V) -> (B*T, V): no transposed copy
                targets.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="none",
            ).view(rows, width)
            window_nll.append(nll_BT.sum(dim=1).double().cpu().numpy())
            real = batch.targets != IGNORE_INDEX
            window_targets.append(real.sum(dim=1).numpy())
            if byte_lengths is not None:
                evaluated_bytes_exact += int(byte_lengths[batch.targets[real].numpy()].sum())
    finally:
        model.train(was_training)
    nll_W = np.concatenate(window_nll)
    targets_W = np.concatenate(window_targets).astype(np.float64)
    nll_sum = float(nll_W.sum())
    n_targets = int(targets_W.sum())
    loss = nll_sum / n_targets
    evaluated_bytes: int | None
    exact = True
    if byte_lengths is not None:
        evaluated_bytes = evaluated_bytes_exact
    elif n_bytes is not None:
        evaluated_bytes = n_bytes if n_targets == total_targets else round(n_bytes * n_targets / total_targets)
        exact = n_targets == total_targets
    else:
        evaluated_bytes = None
    bpb = nll_sum / (math.log(2) * evaluated_bytes) if evaluated_bytes else None
    return EvalResult(
        name=name,
        loss=loss,
        ppl=math.exp(min(loss, 700.0)),
        bpb=bpb,
        tokens=n_targets,
        bytes=evaluated_bytes,
        bytes_exact=exact,
        loss_se=ratio_standard_error(nll_W, targets_W),
        windows=int(nll_W.shape[0]),
        window_nll=nll_W,
        window_targets=targets_W.astype(np.int64),
    )


def evaluate_sets(
    model: torch.nn.Module,
    sets: dict[str, Any],
    *,
    seq_len: int,
    batch_size: int = 8,
    max_tokens: int | None = None,
    byte_lengths: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, EvalResult]:
    """``evaluate_tokens`` on every set; ``sets`` maps names to ``TokenSet``s (tokens, n_bytes)."""
    results = {}
    for name, token_set in sets.items():
        results[name] = evaluate_tokens(
            model,
            token_set.tokens,
            name=name,
            seq_len=seq_len,
            batch_size=batch_size,
            n_bytes=token_set.n_bytes,
            byte_lengths=byte_lengths,
            max_tokens=max_tokens,
            device=device,
            autocast_dtype=autocast_dtype,
        )
    return results


def metrics_line(results: dict[str, EvalResult]) -> dict[str, float]:
    """Flat metrics keys: ``eval/<name>/loss``, ``/ppl``, ``/bpb``, ``/loss_se``, ``/tokens``."""
    line: dict[str, float] = {}
    for name, result in results.items():
        line[f"eval/{name}/loss"] = result.loss
        line[f"eval/{name}/ppl"] = result.ppl
        if result.bpb is not None:
            line[f"eval/{name}/bpb"] = result.bpb
        if result.loss_se is not None:
            line[f"eval/{name}/loss_se"] = result.loss_se
        line[f"eval/{name}/tokens"] = result.tokens
    return line


def prepare_eval_sets(
    specs: dict[str, str],
    tokenizer: Any,
    cache_dir: Path | str,
    max_eval_bytes: int | None = None,
) -> dict[str, Any]:
    """Tokenize ``{name: source spec}`` evaluation sets with ``tokenizer`` into ``cache_dir``.

    An adapter over ``mhmoe.data`` for evaluating a trained run on new sets without its
    training data (``mhmoe.data.prepare_data`` always prepares the training corpus too). It uses
    the same cache names (``eval-NAME``) and key layout as ``prepare_data``, so caches are shared
    with training runs whenever their inputs match.
    """

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, spec in specs.items():
        validate_eval_name(name)
        sources[name] = open_source(spec, max_bytes=max_eval_bytes)
    sets = {}
    for name, source in sources.items():
        cache_name = f"eval-{name}"
        key = {
            "role": "eval",
            "tokenizer_sha256": tokenizer.sha256,
            "sources": [source.fingerprint],
            "max_eval_bytes": max_eval_bytes,
        }
        token_set = load_cache(cache_dir, cache_name, key)
        if token_set is None:
            tagged = ((cache_name, document) for document in source.documents())
            token_set = build_caches(cache_dir, [cache_name], key, tagged, tokenizer,
                                     description=source.description)[cache_name]
        sets[name] = token_set
    return sets


def evaluate_run(
    run_dir: Path | str,
    eval_specs: dict[str, str] | None = None,
    *,
    step: int | None = None,
    max_tokens: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
) -> tuple[int, dict[str, EvalResult]]:
    """Evaluate a run's checkpoint (``step``, default latest): (step, results by set name).

    ``eval_specs`` ({name: source spec}) are tokenized with the run's tokenizer into
    ``RUN_DIR/data`` (or the run's data folder); without them the run's own evaluation sets are
    used (rebuilt from the recorded sources if their caches are gone). ``max_tokens`` defaults
    to the run's ``eval_tokens``.
    """

    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    model, tokenizer, config = load_run(run_dir, step=step, device=torch_device)
    checkpoint_step = int(read_checkpoint_state(resolve_checkpoint(run_dir, step))["step"])
    train = config["train"]
    data_dir = Path(config.get("data_dir") or run_dir / "data")
    if eval_specs:
        cache_dir = data_dir if data_dir.is_dir() else run_dir / "data"
        sets = prepare_eval_sets(eval_specs, tokenizer, cache_dir, config["data"].get("max_eval_bytes"))
    else:
        data = prepare_run_data(config["data"], data_dir, tokenizer_path=run_dir / "tokenizer.json",
                                verify_checksum=False)
        sets = data.evals
        if not sets:
            raise ValueError(f"{run_dir}: the run has no evaluation set; name one with --eval NAME=PATH")
    results = evaluate_sets(
        model,
        sets,
        seq_len=int(train["seq_len"]),
        batch_size=batch_size or int(train["eval_batch_size"]),
        max_tokens=max_tokens if max_tokens is not None else train.get("eval_tokens"),
        byte_lengths=token_byte_lengths(tokenizer),
        device=torch_device,
        autocast_dtype=resolve_precision(train.get("precision", "auto"), torch_device),
    )
    return checkpoint_step, results
