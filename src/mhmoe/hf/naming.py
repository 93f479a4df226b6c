"""Names shared by the export folder and the transformers classes: the config keys, the weight
names and their conversions (pure functions of torch and ``mhmoe.config``).

A module of its own, without the writing and reading machinery of ``mhmoe.hf.export`` (run
directories, tokenizers, atomic folders), so that the self-contained remote code of an export
(``mhmoe.hf.remote_code``) needs only the model's own modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from mhmoe.config import ModelConfig
from mhmoe.runtime import resolve_dtype

MODEL_TYPE = "mhmoe"
ARCHITECTURE = "MHMoEForCausalLM"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# ModelConfig field -> Hugging Face config key. Every other ModelConfig field keeps its name.
HF_NAMES: dict[str, str] = {
    "d_model": "hidden_size",
    "num_layers": "num_hidden_layers",
    "max_seq_len": "max_position_embeddings",
    "tie_embeddings": "tie_word_embeddings",
    "norm_eps": "rms_norm_eps",
}
_MHMOE_NAMES = {hf: ours for ours, hf in HF_NAMES.items()}

# TransformerLM state_dict prefix -> Hugging Face prefix (MHMoEForCausalLM).
_KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("embed.", "model.embed_tokens."),
    ("blocks.", "model.layers."),
    ("final_norm.", "model.norm."),
    ("lm_head.", "lm_head."),
)


class ExportError(ValueError):
    """An export folder that cannot be written or read (the message names the path and the rule)."""


def model_config_from_hf(data: Mapping[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` inside an export's config.json (or an ``MHMoEConfig.to_dict()``).

    Keys that are not ModelConfig fields (HF metadata) are ignored; ModelConfig validates the
    rest and raises ValueError naming the offending value.
    """
    if not isinstance(data, Mapping):
        raise ExportError(f"config {data!r}: must be a JSON object")
    model_type = data.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ExportError(f"config model_type={model_type!r}: must be {MODEL_TYPE!r} (an mhmoe export)")
    fields = set(ModelConfig.__dataclass_fields__)
    model: dict[str, Any] = {}
    for key, value in data.items():
        name = _MHMOE_NAMES.get(key, key)
        if name in fields:
            model[name] = value
    missing = sorted(HF_NAMES.get(f, f) for f in ("vocab_size", "d_model", "num_layers",
                                                  "num_attention_heads", "max_seq_len", "dense_ffn")
                     if f not in model)
    if missing:
        raise ExportError(f"config lacks the keys {missing} needed to build the model")
    return ModelConfig.from_dict(model)


def _hf_key(name: str) -> str:
    for ours, theirs in _KEY_PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ExportError(f"state_dict key {name!r}: no Hugging Face name (expected a key under "
                      f"{', '.join(p for p, _ in _KEY_PREFIXES)})")


def _mhmoe_key(name: str) -> str:
    for ours, theirs in _KEY_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise ExportError(f"weight {name!r}: not an MHMoEForCausalLM weight (expected a key under "
                      f"{', '.join(t for _, t in _KEY_PREFIXES)})")


def hf_state_dict(model: torch.nn.Module, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` of a TransformerLM under Hugging Face names, CPU, contiguous.

    Floating tensors are cast to ``dtype`` (None keeps theirs).
    """
    target = None if dtype is None else resolve_dtype(dtype)
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        if target is not None and t.is_floating_point():
            t = t.to(target)
        out[_hf_key(name)] = t.contiguous().clone()
    return out


def mhmoe_state_dict(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``hf_state_dict``: Hugging Face names back to TransformerLM names."""
    return {_mhmoe_key(name): t for name, t in tensors.items()}
