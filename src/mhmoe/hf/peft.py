"""LoRA (PEFT) on mhmoe models: the default target set, and a merge that refuses inexact BitNet merges.

    from peft import get_peft_model
    from mhmoe.hf.peft import lora_config, merge_lora
    model = get_peft_model(AutoModelForCausalLM.from_pretrained("exported/h2"), lora_config(r=8))
    ...                                           # train (Trainer or a loop)
    merged = merge_lora(model)                    # merge_and_unload, refused where it is inexact

Targets (``DEFAULT_TARGET_MODULES`` / ``DEFAULT_TARGET_PARAMETERS``): the attention projections
``qkv`` and ``out`` and the MH-MoE ``head`` / ``merge`` layers (``nn.Linear``: PEFT's
``target_modules``), and the router weight and the stacked expert weights ``experts.w1``,
``experts.w3`` (SwiGLU), ``experts.w2`` (PEFT's ``target_parameters``: one LoRA per expert,
(E, out, in)). ``MHMoEModel.forward`` puts the parameter adapters' deltas on the modules for the
whole MoE dispatch (``mhmoe.hf.modeling.parameter_adapters_active``).

BitNet: the two kinds of adapter differ.

* Parameter adapters (``target_parameters``: BitExperts' ``experts.w1/w3/w2``, a quantised
  router's ``router.weight``) put W + dW on the module, which quantises it in its forward: the
  adapter trains through the quantisation, and merging (W <- W + dW) gives the same model.
* Module adapters over a BitLinear (``target_modules``: ``qkv``, ``out``, ``head``, ``merge``
  when they are BitLinear) add a full-precision delta to the quantised layer's output. Merging
  folds it into the latent weight, which the forward then re-quantises: the merged model is not
  the adapted one. ``merge_lora`` raises unless ``allow_inexact=True``; the forward warns once.

PEFT's own ``merge_and_unload`` cannot be made to refuse from here: its only check before
merging (``LoraModel._check_merge_allowed``) looks at GPTQ quantisation and layer replication,
nothing a model can declare, and it then merges and unloads one layer after another, so an
error raised from a custom BitLinear LoRA layer's ``merge`` would leave the model half merged.
Use ``merge_lora`` (or keep the adapters unmerged).

Needs the optional ``peft`` package (``pip install 'mhmoe[hf]'``); importing this module does
not import it.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from mhmoe.hf.modeling import inexact_bitnet_adapters

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


def merge_lora(model: Any, *, allow_inexact: bool = False, **kwargs: Any) -> nn.Module:
    """``model.merge_and_unload(**kwargs)`` for a PEFT model of an mhmoe model.

    Raises ValueError when a module adapter sits on a BitNet linear layer: merging there changes
    the model's outputs (module docstring). ``allow_inexact=True`` merges anyway, with a warning.
    """
    adapted = inexact_bitnet_adapters(model)
    if adapted:
        message = (f"merging LoRA into BitNet linear layers ({', '.join(adapted[:3])}"
                   f"{', ...' if len(adapted) > 3 else ''}) is not exact: the merged delta is re-quantised "
                   "with the latent weight, so the merged model's outputs differ from the adapted model's; "
                   "keep the adapter unmerged, target those weights through target_parameters (exact), "
                   "or pass allow_inexact=True")
        if not allow_inexact:
            raise ValueError(message)
        logger.warning("%s (merging anyway: allow_inexact=True)", message)
    return model.merge_and_unload(**kwargs)
