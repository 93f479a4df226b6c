"""A run's metrics.jsonl: one JSON line per logged step or evaluation, flushed per line;
optional TensorBoard mirror.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from mhmoe.runs.atomic import atomic_write_text


class MetricsLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (flushed per line); optional TensorBoard."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = Path(path)
        self._handle = open(self.path, "a", encoding="utf-8")
        self._writer = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self._writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=False) + "\n")
        self._handle.flush()
        if self._writer is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(key if "/" in key else f"train/{key}", value, step)

    def close(self) -> None:
        self._handle.close()
        if self._writer is not None:
            self._writer.close()

    @staticmethod
    def truncate_after(path: Path, step: int) -> None:
        """Drop lines of a metrics file whose step is beyond ``step`` (resuming from ``step``)."""
        path = Path(path)
        if not path.is_file():
            return
        kept = [line for line in read_metrics(path, strict=False) if int(line.get("step", 0)) <= step]
        atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in kept))


def read_metrics(path: Path, strict: bool = True) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; ``strict=False`` skips a torn last line."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if strict:
                raise ValueError(f"{path}:{number}: not valid JSON") from None
    return records


def tensorboard_available() -> bool:
    """Whether the optional tensorboard package is installed (without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


class NullMetrics:
    """MetricsLog of the ranks other than 0: they compute the same numbers, rank 0 writes."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
