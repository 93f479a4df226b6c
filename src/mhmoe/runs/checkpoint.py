"""Run directories and checkpoints: atomic, checksummed, loadable without pickle.

Layout of a run directory (``mhmoe train --out RUN_DIR``)::

    RUN_DIR/
      config.json                 the run config (below)
      tokenizer.json              the tokenizer (Hugging Face ``tokenizers`` JSON)
      metrics.jsonl               one JSON object per line (below)
      data/                       token caches + tokenizer manifest (mhmoe.data; absent when
                                  the run used a shared --data-dir, e.g. under mhmoe reproduce)
      tensorboard/                only with --tensorboard
      checkpoints/
        latest                    the name of the newest complete checkpoint ("step_00000100")
        step_00000100/
          model.safetensors       model weights (state_dict, float32 on CPU)
          optimizer.pt            {"optimizer": optimizer.state_dict()}; torch.save, read only
                                  with torch.load(weights_only=True)
          rng.safetensors         torch CPU (and CUDA) generator states
          state.json              step, tokens seen, data-sampler state, python/numpy RNG
                                  states, finished flag, and the sha256 of the three files above

config.json (``RUN_FORMAT``): ``format``; ``preset``; ``variant`` (canonical name, see
``mhmoe.planning.variants``) and ``label``; ``model`` (``ModelConfig.to_dict()``: rebuild with
``ModelConfig.from_dict``); ``train`` (``TrainConfig.to_dict()``); ``data`` (sources, eval specs,
byte caps, vocabulary, tokenizer path: how to rebuild the token caches); ``data_dir`` (where the
caches were); ``tokenizer_sha256``; ``counts`` (analytic parameters, active parameters, FLOPs per
token, expert shapes); ``versions``; ``command``; ``created``.

metrics.jsonl: training lines ``{"step", "tokens", "loss" (LM loss, nats/token), "aux_loss",
"lr", "grad_norm", "skipped_steps" (steps skipped so far for a non-finite loss or gradient;
a skipped step's line also has ``"skipped": true``), "tokens_per_s", "elapsed_s", "train_s"
(seconds spent in optimiser steps, without evaluations and saves; carried across resumes)}``;
evaluation lines ``{"step", "tokens", "fraction" (of the run), "eval/<set>/loss",
"eval/<set>/ppl", "eval/<set>/bpb", "eval/<set>/loss_se", "eval/<set>/tokens"}``; the
per-window sums behind them are in ``eval_windows/`` (``mhmoe.runs.eval_windows``). Evaluation
lines have no ``loss`` key.

Writes are atomic: each file goes to a hidden temporary file in its destination folder, is
fsynced, then ``os.replace``d into place; ``state.json`` (holding the checksums) is written after
the files it describes and ``latest`` is updated last, so a crash at any point leaves the
previous checkpoint as ``latest``. Loading verifies the checksums (``state.json`` carries its
own, ``state_sha256``) and raises ``CheckpointError`` (a ``ValueError``) naming the file on any
mismatch. A save that fails (e.g. a full disk) removes its folder and raises ``OSError``.

Recovery (docs/reliability.md): ``--resume`` first removes leftovers of interrupted writes
(``clean_incomplete_saves``), then continues from the newest *intact* checkpoint
(``find_resume_checkpoint``: ``latest`` first, then older ones, each verified; a bad one is
skipped with a warning). ``load_run`` does not fall back: a corrupted checkpoint raises
``CheckpointError`` naming the file and the run's other checkpoints.

``load_run(run_dir, step=None)`` is the public entry point for later tools (evaluation,
exports, analytics): it returns the model (weights from safetensors only), the tokenizer and
the run config.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from mhmoe.config import ModelConfig
from mhmoe.data import load_tokenizer
from mhmoe.model import TransformerLM
from mhmoe.runs import lock as run_lock
from mhmoe.runs.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)


RUN_FORMAT = "mhmoe-run/1"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FORMAT = "mhmoe-checkpoint/1"
_CHECKPOINT_NAME = re.compile(r"^step_(\d+)$")
STATE_CHECKSUM_KEY = "state_sha256"
# Hidden temporary files of the atomic writers (``.NAME.XXXXXXXX.tmp``).
_TEMP_NAME = re.compile(r"^\..+\.tmp$")


def _state_checksum(state: dict[str, Any]) -> str:
    """sha256 of state.json's content without its own checksum (canonical JSON)."""
    content = {k: v for k, v in state.items() if k != STATE_CHECKSUM_KEY}
    return sha256_bytes(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def _safetensors_load(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(data)
    except Exception as err:  # SafetensorError: a header or length that does not parse
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


class CheckpointError(ValueError):
    """A missing, incomplete or corrupted checkpoint (the message names the file)."""


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# RNG states (torch CPU/CUDA, python random, numpy's legacy global generator)
# ---------------------------------------------------------------------------------------------


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor states for rng.safetensors, JSON-able states for state.json)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    json_states = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    return tensors, json_states


def restore_rng_state(tensors: dict[str, torch.Tensor], json_states: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    version, internal, gauss = json_states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder holding a state.json, by step."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder named by ``checkpoints/latest`` (None when the run has no checkpoint)."""
    pointer = Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8").strip()
    if not _CHECKPOINT_NAME.match(name):
        raise CheckpointError(f"{pointer}: holds {name!r}, expected a checkpoint name like step_00000100")
    folder = pointer.parent / name
    if not (folder / STATE_FILE).is_file():
        raise CheckpointError(f"{pointer}: names {name}, but {folder / STATE_FILE} does not exist")
    return folder


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``step`` (layout in the module docstring), then point ``latest`` at it.

    ``state`` (JSON-able: tokens seen, sampler state, ...) is stored in state.json together with
    the step, the RNG states and the checksums. ``keep`` (None: all) removes the oldest
    checkpoints beyond that number once ``latest`` is updated.
    """
    folder = checkpoint_dir(run_dir, step)
    model_state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}
    blobs: dict[str, bytes] = {
        MODEL_FILE: safetensors_save(model_state, metadata={"format": "pt", "step": str(step)})
    }
    if optimizer is not None:
        buffer = io.BytesIO()
        torch.save({"optimizer": optimizer.state_dict()}, buffer)
        blobs[OPTIMIZER_FILE] = buffer.getvalue()
    rng_tensors, rng_json = capture_rng_state()
    blobs[RNG_FILE] = safetensors_save(rng_tensors)
    # A folder of this step left by an earlier, interrupted timeline (the run resumed from an
    # older checkpoint) is replaced as a whole, never mixed with the new files.
    if folder.exists():
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for name, data in blobs.items():
            atomic_write_bytes(folder / name, data)
            files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        record = {
            "format": CHECKPOINT_FORMAT,
            **state,
            "step": step,
            "rng": rng_json,
            "files": files,
        }
        record[STATE_CHECKSUM_KEY] = _state_checksum(record)
        atomic_write_json(folder / STATE_FILE, record)
    except OSError as err:
        # Full disk, lost permissions...: no partial checkpoint stays behind; ``latest`` still
        # names the previous one.
        shutil.rmtree(folder, ignore_errors=True)
        previous = (Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE)
        kept = previous.read_text(encoding="utf-8").strip() if previous.is_file() else "none"
        raise OSError(
            err.errno,
            f"could not write checkpoint {folder} ({err.strerror or err}); nothing of it was kept "
            f"and the previous checkpoint ({kept}) is intact",
        ) from err
    atomic_write_text(Path(run_dir) / CHECKPOINTS_DIR / LATEST_FILE, folder.name + "\n")
    if keep is not None:
        for _, old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
            if old != folder:
                shutil.rmtree(old, ignore_errors=True)
    logger.debug("saved checkpoint %s", folder)
    return folder


def read_checkpoint_state(folder: Path, allow_unchecked: bool = False) -> dict[str, Any]:
    """state.json of a checkpoint folder (format and its own checksum checked).

    A state.json without ``state_sha256`` is refused unless ``allow_unchecked``
    (``mhmoe train --allow-unchecked-state``): deleting the field used to be enough to have an
    edited ``step`` or ``finished`` accepted as an "older checkpoint" (issue 16); every
    checkpoint this package writes carries the field."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {folder} is not a complete checkpoint")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        reason = err.msg if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise CheckpointError(f"{path}: not valid JSON ({reason}): the file is corrupted") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not an mhmoe checkpoint state (format {CHECKPOINT_FORMAT!r} expected)")
    # state.json checksums itself.
    recorded = state.get(STATE_CHECKSUM_KEY)
    if recorded is None and not allow_unchecked:
        raise CheckpointError(
            f"{path}: has no {STATE_CHECKSUM_KEY} checksum, so its step and other values cannot be "
            "verified (an edited file, or one from an mhmoe older than the field); "
            "mhmoe train --allow-unchecked-state accepts it anyway"
        )
    if recorded is not None and recorded != _state_checksum(state):
        raise CheckpointError(
            f"{path}: checksum mismatch ({STATE_CHECKSUM_KEY} does not match the content): "
            "the file is corrupted or was modified"
        )
    if not isinstance(state.get("files"), dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path}: lacks the files/step entries of a checkpoint state")
    return state


def _read_verified(folder: Path, name: str, state: dict[str, Any]) -> bytes:
    path = Path(folder) / name
    entry = state.get("files", {}).get(name)
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise CheckpointError(f"{path}: not listed in {Path(folder) / STATE_FILE}")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in {STATE_FILE})")
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{path}: checksum mismatch (sha256 {digest[:16]}..., {STATE_FILE} records "
            f"{entry['sha256'][:16]}...): the file is corrupted or was modified"
        )
    return data


def load_model_weights(folder: Path, model: torch.nn.Module, state: dict[str, Any] | None = None) -> None:
    """Load model.safetensors (checksum verified) into ``model`` (strict)."""
    state = read_checkpoint_state(folder) if state is None else state
    tensors = _safetensors_load(Path(folder) / MODEL_FILE, _read_verified(folder, MODEL_FILE, state))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{Path(folder) / MODEL_FILE}: does not fit the model (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )


def load_optimizer_state(folder: Path, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None = None) -> None:
    """Load optimizer.pt (checksum verified) with ``torch.load(weights_only=True)``."""
    state = read_checkpoint_state(folder) if state is None else state
    path = Path(folder) / OPTIMIZER_FILE
    data = _read_verified(folder, OPTIMIZER_FILE, state)
    try:
        # weights_only: tensors and plain containers only; a pickle that would import or call
        # anything else (e.g. a __reduce__ payload) is refused before it runs.
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError... depending on the damage
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: not a plain optimizer state loadable with torch.load(weights_only=True) "
            f"({type(err).__name__}: {reason[:200]})"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("optimizer"), dict):
        raise CheckpointError(f"{path}: holds no optimizer state")
    try:
        optimizer.load_state_dict(payload["optimizer"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{path}: does not fit the optimizer ({err})") from None


def load_rng_state(folder: Path, state: dict[str, Any] | None = None) -> None:
    """Restore the RNG states saved with a checkpoint (checksum verified)."""
    state = read_checkpoint_state(folder) if state is None else state
    tensors = _safetensors_load(Path(folder) / RNG_FILE, _read_verified(folder, RNG_FILE, state))
    try:
        restore_rng_state(tensors, state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{Path(folder) / STATE_FILE}: unusable RNG states ({err})") from None


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """config.json of a run directory (format checked)."""
    run_dir = Path(run_dir)
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {run_dir} is not an mhmoe run directory")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise CheckpointError(f"{path}: not an mhmoe run config (format {RUN_FORMAT!r} expected)")
    return config


def resolve_checkpoint(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint folder of ``step`` (None: ``latest``); CheckpointError when absent."""
    if step is None:
        folder = latest_checkpoint(run_dir)
        if folder is None:
            raise CheckpointError(f"{run_dir}: has no checkpoint yet ({CHECKPOINTS_DIR}/{LATEST_FILE} missing)")
        return folder
    folder = checkpoint_dir(run_dir, step)
    if not (folder / STATE_FILE).is_file():
        available = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
        raise CheckpointError(f"{run_dir}: no checkpoint at step {step} (available steps: {available})")
    return folder


def run_model_config(run_config: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of a run's config.json. Runs written before the BitNet options
    moved into the model config keep them in a top-level "bitnet" section."""
    if not isinstance(run_config.get("model"), dict):
        raise CheckpointError(f"run config: 'model' must be a JSON object, found {run_config.get('model')!r:.80}")
    model = dict(run_config["model"])
    if "bitnet" not in model:
        model["bitnet"] = run_config.get("bitnet")
    return ModelConfig.from_dict(model)


def load_run(
    run_dir: Path | str,
    step: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[TransformerLM, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, run config) of a run; weights from safetensors only.

    ``step`` None loads the ``latest`` checkpoint. The tokenizer is RUN_DIR/tokenizer.json
    loaded with ``mhmoe.data.load_tokenizer``.
    """

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    folder = resolve_checkpoint(run_dir, step)
    # BitNet runs (``mhmoe train --bitnet``): the config carries the conversion, so the
    # BitLinear/BitExperts modules and their norm gains exist before the weights are loaded.
    model_config = run_model_config(config)
    model_config.check_memory(str(run_dir / CONFIG_FILE))  # sizes from a file: bounded first
    model = TransformerLM(model_config)
    try:
        load_model_weights(folder, model)
    except CheckpointError as err:
        # No silent fallback for evaluation: a number reported for another step than asked is
        # a wrong result. Name the other checkpoints instead (``--step N``).
        others = [str(s) for s, f in list_checkpoints(run_dir) if f != folder]
        raise CheckpointError(
            f"{err}; other checkpoints of this run: {', '.join(others) or 'none'} (choose one with --step)"
        ) from None
    model.to(device)
    model.eval()
    tokenizer_path = run_dir / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{tokenizer_path}: missing; the run's tokenizer is needed to evaluate it")
    tokenizer = load_tokenizer(tokenizer_path)
    return model, tokenizer, config


# ---------------------------------------------------------------------------------------------
# Crash recovery: verification, fallback, leftovers of interrupted saves
# ---------------------------------------------------------------------------------------------


def has_checkpoints(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a ``latest`` pointer or any checkpoint folder (intact or not)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if (root / LATEST_FILE).exists():
        return True
    return root.is_dir() and any(_CHECKPOINT_NAME.match(child.name) for child in root.iterdir())


def verify_checkpoint(folder: Path, allow_unchecked: bool = False) -> dict[str, Any]:
    """Read state.json (its own checksum verified; ``read_checkpoint_state``) and check the
    sha256 of every file it lists (model, RNG and, when listed, optimizer); returns the state,
    CheckpointError otherwise."""
    state = read_checkpoint_state(folder, allow_unchecked)
    for name in (MODEL_FILE, RNG_FILE):
        if name not in state["files"]:
            raise CheckpointError(f"{Path(folder) / name}: not listed in {Path(folder) / STATE_FILE}")
    for name in state["files"]:
        _read_verified(folder, name, state)
    return state


def find_resume_checkpoint(run_dir: Path, allow_unchecked: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint a resumed run continues from: (folder, verified state), None when the run
    has none.

    The folder named by ``latest`` comes first, then every other checkpoint folder, newest
    first. Each candidate is verified (``verify_checkpoint``); a bad one is skipped with a
    warning naming it and the reason, so a corrupted newest checkpoint costs the steps since the
    previous one and nothing else. CheckpointError when checkpoints exist but none is intact.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    candidates: list[Path] = []
    problems: list[str] = []
    pointer = root / LATEST_FILE
    if pointer.is_file():
        try:
            named = latest_checkpoint(run_dir)
        except (CheckpointError, OSError, UnicodeDecodeError) as err:
            problems.append(str(err))
            logger.warning("%s is unusable (%s); looking for the newest intact checkpoint", pointer, err)
        else:
            if named is not None:
                candidates.append(named)
    if root.is_dir():
        folders = sorted(
            ((int(m.group(1)), child) for child in root.iterdir() if (m := _CHECKPOINT_NAME.match(child.name))),
            reverse=True,
        )
        candidates += [folder for _, folder in folders if folder not in candidates]
    for index, folder in enumerate(candidates):
        try:
            state = verify_checkpoint(folder, allow_unchecked)
        except (CheckpointError, OSError) as err:
            problems.append(str(err))
            logger.warning("checkpoint %s is unusable: %s; falling back to the previous checkpoint", folder, err)
            continue
        if index > 0 or problems:
            logger.warning("resuming from %s, the newest intact checkpoint", folder)
        return folder, state
    if candidates or problems:
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from ({'; '.join(problems)}); "
            "move the checkpoints folder away to start the run over"
        )
    return None


def clean_incomplete_saves(run_dir: Path) -> list[Path]:
    """Remove what interrupted writes leave behind: hidden ``.NAME.XXXX.tmp`` files of the
    atomic writers in the run folder, ``checkpoints/`` and every checkpoint folder, and
    checkpoint folders without a state.json (a save killed before its last file). Returns the
    removed paths. Runs under the folder's lock (``mhmoe.runs.lock``, reentrant): a live trainer's
    checkpoint in progress is not a leftover, and a second process is refused before it
    removes anything (issue 16: it had deleted the first trainer's save)."""
    run_dir = Path(run_dir)
    with run_lock.locked(run_dir, "mhmoe train"):
        return _clean_incomplete_saves(run_dir)


def _clean_incomplete_saves(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS_DIR
    removed: list[Path] = []
    folders = [run_dir, root]
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if _CHECKPOINT_NAME.match(child.name) and child.is_dir():
                if not (child / STATE_FILE).is_file():
                    shutil.rmtree(child, ignore_errors=True)
                    removed.append(child)
                else:
                    folders.append(child)
    for folder in folders:
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if _TEMP_NAME.match(child.name) and child.is_file():
                child.unlink(missing_ok=True)
                removed.append(child)
    if removed:
        logger.warning("removed %d leftover(s) of interrupted writes: %s", len(removed),
                       ", ".join(str(p.relative_to(run_dir)) for p in removed[:8]) + (" ..." if len(removed) > 8 else ""))
    return removed
