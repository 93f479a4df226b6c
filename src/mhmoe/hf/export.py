"""Export a trained run as a Hugging Face model folder, and read such folders back.

    mhmoe export runs/h2 exported/h2                 # the CLI (mhmoe.cli.export) calls export_hf

    import mhmoe
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("exported/h2")   # no trust_remote_code

Nothing here imports ``transformers``: the files are plain JSON and safetensors, so exporting
(and reading an export back into a ``mhmoe.model.TransformerLM`` with ``load_hf_export``) works
without the optional ``[hf]`` extra. ``mhmoe.hf`` holds the ``transformers`` classes that read
the same folder.

Export folder layout (``EXPORT_FORMAT``)::

    OUT/
      config.json              MHMoEConfig (model_type "mhmoe", architectures MHMoEForCausalLM):
                               the ModelConfig fields under Hugging Face names (HF_NAMES), the
                               BitNet options ("bitnet", null for full precision), token ids,
                               dtype, and "mhmoe_export" (format, source run, step, variant)
      model.safetensors        the weights under Hugging Face names (``hf_state_dict``):
                                 embed.weight       -> model.embed_tokens.weight
                                 blocks.<i>.<rest>  -> model.layers.<i>.<rest>
                                 final_norm.weight  -> model.norm.weight
                                 lm_head.weight     -> lm_head.weight (absent when tied)
      tokenizer.json           the run's tokenizer (Hugging Face ``tokenizers`` JSON)
      tokenizer_config.json    PreTrainedTokenizerFast, bos = eos = pad = <|endoftext|>, no BOS
                               added (as ``mhmoe generate``: the same prompt, the same ids)
      generation_config.json   bos/eos/pad token ids (no max_length: MHMoEForCausalLM.generate
                               clamps prompt + new tokens to max_position_embeddings, with a
                               warning, whatever max_new_tokens a client asks for)
      configuration_mhmoe.py,  the modeling code, generated from mhmoe's own modules
      modeling_mhmoe.py,       (``mhmoe.hf.remote_code``): config.json's "auto_map" names them,
      mhmoe_*.py               so the folder loads with trust_remote_code=True where mhmoe is
                               not installed (and without it where mhmoe is imported)

The folder is written atomically: every file goes into a hidden temporary folder next to OUT,
which is then renamed to OUT. An existing OUT is replaced only when it is empty or an earlier
mhmoe export; anything else raises ``ExportError`` (nothing is deleted).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save_file as safetensors_save_file

from mhmoe.bitnet.convert import bitnet_modules
from mhmoe.config import ModelConfig
from mhmoe.data import load_tokenizer
from mhmoe.hf.naming import (
    ARCHITECTURE,
    CONFIG_FILE,
    HF_NAMES,
    MODEL_TYPE,
    WEIGHTS_FILE,
    ExportError,
    hf_state_dict,
    mhmoe_state_dict,
    model_config_from_hf,
)
from mhmoe.hf.remote_code import AUTO_MAP, remote_code_files
from mhmoe.model import TransformerLM
from mhmoe.runs.atomic import fsync_directory
from mhmoe.runs.checkpoint import load_run, resolve_checkpoint
from mhmoe.runtime import dtype_name
from mhmoe.version import __version__

logger = logging.getLogger(__name__)


EXPORT_FORMAT = "mhmoe-hf/1"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE)
EOT_TOKEN = "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# Config (pure functions; the names and weight conversions are in mhmoe.hf.naming)
# ---------------------------------------------------------------------------------------------


def hf_config_dict(
    model_config: ModelConfig,
    *,
    eot_id: int | None = None,
    dtype: str = "float32",
    export_info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """config.json of an export: ``model_config`` under Hugging Face names plus HF metadata.

    ``model_config.bitnet`` is written as "bitnet" (None: full precision); ``eot_id``: the id of ``<|endoftext|>`` (bos = eos = pad).
    """
    data: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
    }
    for name, value in model_config.to_dict().items():
        data[HF_NAMES.get(name, name)] = value
    data.update(
        {
            "auto_map": dict(AUTO_MAP),
            "bos_token_id": eot_id,
            "eos_token_id": eot_id,
            "pad_token_id": eot_id,
            "dtype": dtype_name(dtype),
            "initializer_range": 0.02,
            "output_router_logits": False,
            "use_cache": True,
        }
    )
    if export_info is not None:
        data["mhmoe_export"] = dict(export_info)
    return data


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _tokenizer_files(tokenizer: Any, model_config: ModelConfig) -> tuple[str, dict[str, Any], int]:
    backend = getattr(tokenizer, "backend", tokenizer)
    if not hasattr(backend, "to_str") or not hasattr(backend, "token_to_id"):
        raise ExportError(
            f"tokenizer {tokenizer!r}: expected an mhmoe TextTokenizer or a tokenizers.Tokenizer"
        )
    eot_id = backend.token_to_id(EOT_TOKEN)
    if eot_id is None:
        raise ExportError(f"tokenizer has no {EOT_TOKEN!r} token: it is the export's bos/eos/pad token")
    vocab = backend.get_vocab_size(with_added_tokens=True)
    if vocab > model_config.vocab_size:
        raise ExportError(
            f"tokenizer has {vocab} ids but the model's vocab_size={model_config.vocab_size}: "
            "the tokenizer does not belong to this model"
        )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": EOT_TOKEN,
        "unk_token": None,
        # No BOS, as `mhmoe generate` (the same prompt gives the same ids) and as lm-eval
        # expects: it conditions rolling log-likelihoods on <|endoftext|> itself (prefix token).
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_config.max_seq_len,
        "padding_side": "left",
    }
    return backend.to_str(pretty=True), tokenizer_config, eot_id


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_json(path: Path, data: Any) -> None:
    _write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _replaceable(out: Path) -> bool:
    """Whether an existing ``out`` may be replaced: an empty folder or an earlier mhmoe export."""
    if not out.is_dir():
        return False
    if not any(out.iterdir()):
        return True
    try:
        config = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temporary folder to ``out`` (replacing an earlier export)."""
    if out.exists() or out.is_symlink():
        if not _replaceable(out):
            raise ExportError(
                f"{out}: exists and is neither empty nor an mhmoe export; refusing to overwrite it "
                "(choose another output folder or remove it)"
            )
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.rmdir(old)
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_directory(out.parent)


def export_model(
    model: TransformerLM,
    tokenizer: Any,
    out: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "float32",
    source: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (a TransformerLM, BitNet-converted or not) and its tokenizer to ``out``.

    ``tokenizer``: an mhmoe ``TextTokenizer`` (or a ``tokenizers.Tokenizer``) with
    ``<|endoftext|>``; ``dtype``: float32 (default, exact), bfloat16 or float16;
    ``source``: JSON-able provenance stored under config.json's "mhmoe_export".
    Returns the output folder. Layout and atomicity: module docstring.
    """
    if not isinstance(model, TransformerLM):
        raise ExportError(f"model of type {type(model).__name__}: must be an mhmoe.model.TransformerLM")
    out = Path(out)
    model_config = model.config
    bitnet = model_config.bitnet
    if bitnet is None and bitnet_modules(model):
        raise ExportError(
            f"the model has BitNet modules ({bitnet_modules(model)[:3]}...) but model.config.bitnet "
            "is None: the export could not record how to rebuild it (convert the TransformerLM "
            "itself with mhmoe.bitnet.convert.to_bitnet, or build it from a config with bitnet set)"
        )
    tokenizer_json, tokenizer_config, eot_id = _tokenizer_files(tokenizer, model_config)
    stored_dtype = dtype_name(dtype)

    info = {"format": EXPORT_FORMAT, "mhmoe_version": __version__, **(dict(source or {}))}
    config = hf_config_dict(model_config, eot_id=eot_id, dtype=stored_dtype, export_info=info)
    generation_config = {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "pad_token_id": eot_id,
        "_from_model_config": False,
    }
    remote_code = remote_code_files()
    tensors = hf_state_dict(model, stored_dtype)

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not _replaceable(out):  # fail before doing the work
        raise ExportError(
            f"{out}: exists and is neither empty nor an mhmoe export; refusing to overwrite it "
            "(choose another output folder or remove it)"
        )
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        safetensors_save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        with open(tmp / WEIGHTS_FILE, "rb+") as handle:
            os.fsync(handle.fileno())
        _write_json(tmp / CONFIG_FILE, config)
        _write_bytes(tmp / TOKENIZER_FILE, tokenizer_json.encode("utf-8"))
        _write_json(tmp / TOKENIZER_CONFIG_FILE, tokenizer_config)
        _write_json(tmp / GENERATION_CONFIG_FILE, generation_config)
        for name, source in remote_code.items():
            _write_bytes(tmp / name, source.encode("utf-8"))
        fsync_directory(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (%s%s) to %s", type(model).__name__, stored_dtype,
                ", BitNet" if bitnet else "", out)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def export_hf(
    run_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Export checkpoint ``step`` (None: latest) of a training run to the HF folder ``out``.

    Loads the run with ``mhmoe.runs.checkpoint.load_run`` and writes it with ``export_model``;
    prints nothing (``mhmoe export`` reports the files). Returns ``out``.
    """

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run directory {str(run_dir)!r} does not exist")
    model, tokenizer, run_config = load_run(run_dir, step=step)
    checkpoint = resolve_checkpoint(run_dir, step)
    source = {
        "run_dir": str(run_dir.resolve()),
        "checkpoint": checkpoint.name,
        "variant": run_config.get("variant"),
        "preset": run_config.get("preset"),
        "tokenizer_sha256": run_config.get("tokenizer_sha256"),
    }
    path = export_model(model, tokenizer, out, dtype=dtype, source=source)
    sizes = {p.name: p.stat().st_size for p in sorted(path.iterdir())}
    logger.info("export %s: %s", path, ", ".join(f"{n} {s:,} B" for n, s in sizes.items()))
    return path


# ---------------------------------------------------------------------------------------------
# Reading (without transformers)
# ---------------------------------------------------------------------------------------------


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose config.json has model_type "mhmoe"."""
    config = Path(path) / CONFIG_FILE
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("model_type") == MODEL_TYPE


def check_export_dir(path: str | os.PathLike, required: tuple[str, ...] = REQUIRED_FILES) -> dict[str, Any]:
    """Check an export folder; returns its config.json.

    Raises FileNotFoundError naming the folder and every missing file, and ExportError when
    config.json is not an mhmoe config or the weights are not safetensors.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such export folder (write one with `mhmoe export RUN_DIR {path}`)")
    missing = [name for name in required if not (path / name).is_file()]
    if missing:
        hint = ""
        if WEIGHTS_FILE in missing and any(path.glob("*.bin")):
            hint = " (only pickle *.bin weights found: mhmoe reads safetensors only)"
        raise FileNotFoundError(
            f"{path}: incomplete mhmoe export, missing {', '.join(missing)}{hint}; "
            f"re-export with `mhmoe export RUN_DIR {path}`"
        )
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except ValueError as err:
        raise ExportError(f"{path / CONFIG_FILE}: not valid JSON ({err})") from None
    if not isinstance(config, dict) or config.get("model_type") != MODEL_TYPE:
        found = config.get("model_type") if isinstance(config, dict) else None
        raise ExportError(f"{path / CONFIG_FILE}: model_type={found!r}, expected {MODEL_TYPE!r} (not an mhmoe export)")
    return config


def load_hf_export(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[TransformerLM, Any, dict[str, Any]]:
    """(TransformerLM in eval mode, TextTokenizer, config.json) of an export folder.

    Needs no ``transformers``: this is how ``mhmoe generate`` reads exports. Weights are read
    from safetensors only and must match the model exactly (ExportError naming the keys).
    """

    path = Path(path)
    config = check_export_dir(path)
    model_config = model_config_from_hf(config)
    model_config.check_memory(str(path / CONFIG_FILE))  # sizes from a file: bounded first
    model = TransformerLM(model_config)
    try:
        weights = safetensors_load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:  # a tampered header or length, an unreadable file: one line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{path / WEIGHTS_FILE}: not a readable safetensors file ({reason[:200]}); "
                          "re-export the run") from None
    tensors = mhmoe_state_dict(weights)
    if model_config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ExportError(
            f"{path / WEIGHTS_FILE}: does not fit the config (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise ExportError(
                f"{path / WEIGHTS_FILE}: {name} has shape {tuple(tensor.shape)}, the config needs "
                f"{tuple(expected[name].shape)}"
            )
    # Loaded in float32 (the training dtype) whatever the stored dtype.
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
    model.to(device)
    model.eval()
    tokenizer = load_tokenizer(path / TOKENIZER_FILE)
    return model, tokenizer, config
