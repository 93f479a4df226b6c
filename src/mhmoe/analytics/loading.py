"""Routing analysis of a trained run: its evaluation tokens and the model's routing over them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mhmoe.analytics.accumulator import analyze_model
from mhmoe.data.batching import spread_window_indices
from mhmoe.data.cache import MANIFEST_SUFFIX, TOKENS_SUFFIX, open_token_file, read_manifest
from mhmoe.data.sources import local_source
from mhmoe.runs.checkpoint import load_run

DEFAULT_MAX_TOKENS = 131_072


HELDOUT_CACHE = "eval-heldout"


def token_windows(
    tokens: Any, seq_len: int, batch_size: int, max_tokens: int | None = None
) -> list[torch.Tensor]:
    """Token ids (B, seq_len) batches cut from a 1-D token array in non-overlapping windows:
    all of them, or with ``max_tokens`` about that many tokens in windows spread evenly over the
    whole array (``mhmoe.data.batching.spread_window_indices``, as the evaluation does), so the
    counts describe the whole set and not its opening. Only full windows are used (a padded
    window would route padding tokens and count them), and the last batch is dropped when it has
    fewer rows than ``batch_size`` and a full batch exists (the activation ratio depends on the
    batch size). A set shorter than one window gives one shorter window."""
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens < 1):
        raise ValueError(f"max_tokens={max_tokens!r}: must be a positive integer or None")
    if getattr(tokens, "ndim", 1) != 1 or len(tokens) == 0:
        raise ValueError(f"token array of shape {tuple(np.shape(tokens))}: must be 1-D and non-empty")
    num_windows = len(tokens) // seq_len
    if num_windows == 0:
        return [torch.from_numpy(np.array(tokens[:], dtype=np.int64)).view(1, -1)]
    chosen = spread_window_indices(num_windows, None if max_tokens is None else -(-max_tokens // seq_len))
    windows_WT = torch.from_numpy(np.stack(
        [np.asarray(tokens[start * seq_len: (start + 1) * seq_len], dtype=np.int64) for start in chosen.tolist()]
    ))  # (W, T)
    batches = list(windows_WT.split(batch_size))
    if len(batches) > 1 and batches[-1].shape[0] < batch_size:
        batches.pop()
    return batches


def _tokens_from_cache(path: Path) -> Any:
    name = path.name
    stem = name[: -len(TOKENS_SUFFIX)] if name.endswith(TOKENS_SUFFIX) \
        else name[: -len(MANIFEST_SUFFIX)]
    tokens_path = path.with_name(stem + TOKENS_SUFFIX)
    manifest_path = path.with_name(stem + MANIFEST_SUFFIX)
    if not tokens_path.is_file():
        raise FileNotFoundError(f"{tokens_path}: token file missing (next to {manifest_path})")
    manifest = read_manifest(manifest_path, tokens_path)
    return open_token_file(tokens_path, manifest["dtype"], manifest["n_tokens"])


def _tokens_from_text(path: Path, tokenizer: Any, max_tokens: int | None) -> Any:

    # Same layout as the token caches (mhmoe.data.cache): [EOT] doc1 [EOT] doc2 ...; stop
    # encoding once enough tokens are there, so a large folder costs only what is used.
    pieces, total = [], 0
    for document in local_source(path).documents():
        ids = [tokenizer.eot_id, *tokenizer.encode(document)]
        pieces.append(np.asarray(ids, dtype=np.int64))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise ValueError(f"{path}: no non-empty document to analyze")
    return np.concatenate(pieces)


def _find_heldout(run_dir: Path, run_config: Mapping[str, Any]) -> Path:
    candidates = [run_dir, run_dir / "data"]
    # mhmoe.training.run records the token-cache folder as "data_dir" (shared by all runs of a
    # reproduce); other path-like settings of the "data" section are tried after it.
    values = [run_config.get("data_dir")]
    data_section = run_config.get("data")
    if isinstance(data_section, Mapping):
        values += list(data_section.values())
    for value in values:
        if isinstance(value, str) and value:
            folder = Path(value) if Path(value).is_absolute() else run_dir / value
            candidates += [folder, Path(value)]
    seen = []
    for folder in candidates:
        if folder in seen or not folder.is_dir():
            continue
        seen.append(folder)
        heldout = folder / f"{HELDOUT_CACHE}{TOKENS_SUFFIX}"
        if heldout.is_file():
            return heldout
    for folder in seen:  # no automatic split: any named evaluation set, by name
        named = sorted(folder.glob(f"eval-*{TOKENS_SUFFIX}"))
        if named:
            return named[0]
    raise ValueError(
        f"{run_dir}: no held-out token cache ({HELDOUT_CACHE}{TOKENS_SUFFIX} or "
        f"eval-*{TOKENS_SUFFIX}) in {[str(f) for f in seen] or [str(run_dir)]}; "
        "pass --data PATH (a .txt/.jsonl/.parquet file or folder, or a .tokens cache)"
    )


def load_analysis_tokens(
    run_dir: str | Path,
    run_config: Mapping[str, Any],
    tokenizer: Any,
    data: str | Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
) -> tuple[Any, str]:
    """(1-D token ids, description) to analyze a run on: ``data`` (a ``.tokens`` cache or its
    manifest, else text files read with ``mhmoe.data.local_source`` and encoded with the run's
    tokenizer), or by default the run's held-out cache ``eval-heldout.tokens`` (searched in
    RUN_DIR, RUN_DIR/data, the run config's ``data_dir`` and the folders named in its ``data``
    section)."""
    run_dir = Path(run_dir)
    if data is None:
        path = _find_heldout(run_dir, run_config)
        return _tokens_from_cache(path), str(path)
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if path.name.endswith((".tokens", ".manifest.json")):
        return _tokens_from_cache(path), str(path)
    return _tokens_from_text(path, tokenizer, max_tokens), str(path)


def analyze_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    seq_len: int | None = None,
    step: int | None = None,
    device: str | torch.device | None = None,
    min_share: float = 0.0,
) -> dict[str, Any]:
    """The routing report of a run's checkpoint (``mhmoe analyze``): loads it with
    ``mhmoe.runs.checkpoint.load_run``, runs ``max_tokens`` tokens of held-out (or ``data``) text in
    batches of ``batch_size`` windows of ``seq_len`` (default: the model's ``max_seq_len``)
    tokens, and returns a JSON-able dict::

        {"run_dir", "variant", "data", "num_tokens", "batch_size", "seq_len",
         "layers": [LayerRoutingSummary.to_dict(), ...]}   # [] for a dense model
    """

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer, run_config = load_run(run_dir, step=step, device=device)
    tokens, description = load_analysis_tokens(run_dir, run_config, tokenizer, data, max_tokens)
    seq_len = model.config.max_seq_len if seq_len is None else seq_len
    if seq_len > model.config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len="
                         f"{model.config.max_seq_len}")
    batches = token_windows(tokens, seq_len, batch_size, max_tokens)
    layers = analyze_model(model, (b.to(device) for b in batches), min_share=min_share)
    return {
        "run_dir": str(run_dir),
        "variant": run_config.get("variant"),
        "data": description,
        "num_tokens": int(sum(b.numel() for b in batches)),
        "batch_size": int(batches[0].shape[0]),
        "seq_len": int(batches[0].shape[1]),
        "min_share": min_share,
        "layers": [layer.to_dict() for layer in layers],
    }
