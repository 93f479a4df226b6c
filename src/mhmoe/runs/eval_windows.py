"""Per-window evaluation sums kept beside a run's metrics, for paired comparisons.

Every evaluation writes ``RUN_DIR/eval_windows/step<NNNNNNNN>.npz`` with, per evaluation set,
``<set>/nll`` (summed negative log-likelihood of each evaluation window, float64) and
``<set>/targets`` (its number of target tokens, int64), in window order. Two runs evaluated on
the same token set with the same ``seq_len`` and token count see the same windows, so the
difference of their losses can be taken window by window: its standard error is the
evaluation's own noise in a comparison (``mhmoe.analytics.paired``), much smaller than the
standard error of either loss alone because both models meet the same hard and easy text.

Read with ``numpy.load(..., allow_pickle=False)``: the file holds plain arrays only.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from mhmoe.runs.atomic import atomic_write_bytes

FOLDER = "eval_windows"


def eval_windows_path(run_dir: Path | str, step: int) -> Path:
    return Path(run_dir) / FOLDER / f"step{int(step):08d}.npz"


def write_eval_windows(run_dir: Path | str, step: int, windows: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write ``{set: (nll per window, targets per window)}`` for ``step`` atomically."""
    arrays = {}
    for name, (nll, targets) in windows.items():
        nll = np.asarray(nll, dtype=np.float64)
        targets = np.asarray(targets, dtype=np.int64)
        if nll.ndim != 1 or nll.shape != targets.shape:
            raise ValueError(f"eval windows of set {name!r}: nll {nll.shape} and targets {targets.shape} "
                             "must be 1-D arrays of one length")
        arrays[f"{name}/nll"] = nll
        arrays[f"{name}/targets"] = targets
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    path = eval_windows_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_eval_windows(run_dir: Path | str, step: int) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    """``{set: (nll, targets)}`` written for ``step``, or None if there is no (readable) file."""
    path = eval_windows_path(run_dir, step)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    windows = {}
    for key in arrays:
        name, _, kind = key.rpartition("/")
        if kind == "nll" and f"{name}/targets" in arrays:
            nll, targets = arrays[key], arrays[f"{name}/targets"]
            if nll.ndim == 1 and nll.shape == targets.shape:
                windows[name] = (nll.astype(np.float64), targets.astype(np.int64))
    return windows
