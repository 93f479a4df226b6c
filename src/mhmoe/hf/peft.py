"""LoRA (PEFT) on mhmoe models: the default target set, and a merge that refuses BitNet models.

    from peft import get_peft_model
    from mhmoe.hf.peft import lora_config, merge_lora
    model = get_peft_model(AutoModelForCausalLM.from_pretrained("exported/h2"), lora_config(r=8))
    ...                                           # train (Trainer or a loop)
    merged = merge_lora(model)                    # merge_and_unload, refused for BitNet models

Targets (``DEFAULT_TARGET_MODULES`` / ``DEFAULT_TARGET_PARAMETERS``): the attention projections
``qkv`` and ``out`` and the MH-MoE ``head`` / ``merge`` layers (``nn.Linear``: PEFT's
``target_modules``), and the router weight and the stacked expert weights ``experts.w1``,
``experts.w3`` (SwiGLU), ``experts.w2`` (PEFT's ``target_parameters``: one LoRA per expert,
(E, out, in)). ``MHMoEModel.forward`` puts the parameter adapters' deltas on the modules for the
whole MoE dispatch (``mhmoe.hf.modeling.parameter_adapters_active``).

BitNet: LoRA trains on top of the quantised forward (the delta is full precision). Merging
folds the delta into the latent weight, which the forward then re-quantises: the merged model
is not the adapted one. PEFT's own ``merge_and_unload`` cannot be stopped from here; use
``merge_lora``, which raises unless ``allow_inexact=True``, or keep the adapter unmerged.

Needs the optional ``peft`` package (``pip install 'mhmoe[hf]'``); importing this module does
not import it.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from mhmoe.bitnet.convert import bitnet_modules

logger = logging.getLogger(__name__)

DEFAULT_TARGET_MODULES = ("qkv", "out", "head", "merge")
DEFAULT_TARGET_PARAMETERS = ("router.weight", "experts.w1", "experts.w3", "experts.w2")


def lora_config(r: int = 8, lora_alpha: int | None = None, **kwargs: Any):
    """A ``peft.LoraConfig`` with the default mhmoe targets (module docstring); ``kwargs`` go
    to LoraConfig and override the defaults (``target_modules=...``, ``lora_dropout=...``)."""
    from peft import LoraConfig  # optional extra

    options: dict[str, Any] = {
        "r": r,
        "lora_alpha": 2 * r if lora_alpha is None else lora_alpha,
        "target_modules": list(DEFAULT_TARGET_MODULES),
        "target_parameters": list(DEFAULT_TARGET_PARAMETERS),
        "task_type": "CAUSAL_LM",
    }
    options.update(kwargs)
    return LoraConfig(**options)


def _adapted_bitnet_modules(model: nn.Module) -> list[str]:
    """Names of the BitNet modules that carry a LoRA adapter in ``model`` (a PEFT model)."""
    quantised = {id(module) for _, module in _named_bitnet_modules(model)}
    names = []
    for name, module in model.named_modules():
        base = module
        while hasattr(base, "base_layer") and isinstance(base.base_layer, nn.Module):
            base = base.base_layer
        if base is not module and id(base) in quantised:
            names.append(name)
    return names


def _named_bitnet_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    names = set(bitnet_modules(model))
    return [(name, module) for name, module in model.named_modules() if name in names]


def merge_lora(model: Any, *, allow_inexact: bool = False, **kwargs: Any) -> nn.Module:
    """``model.merge_and_unload(**kwargs)`` for a PEFT model of an mhmoe model.

    Raises ValueError when an adapter sits on a BitNet module: merging there changes the
    model's outputs (module docstring). ``allow_inexact=True`` merges anyway, with a warning.
    """
    adapted = _adapted_bitnet_modules(model)
    if adapted:
        message = (f"merging LoRA into BitNet modules ({', '.join(adapted[:3])}{', ...' if len(adapted) > 3 else ''}) "
                   "is not exact: the merged delta is re-quantised with the latent weight, so the merged "
                   "model's outputs differ from the adapted model's; keep the adapter unmerged, or pass "
                   "allow_inexact=True")
        if not allow_inexact:
            raise ValueError(message)
        logger.warning("%s (merging anyway: allow_inexact=True)", message)
    return model.merge_and_unload(**kwargs)
