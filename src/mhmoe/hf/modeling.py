"""``MHMoEModel`` and ``MHMoEForCausalLM``: mhmoe's TransformerLM as a transformers model.

Shape legend: B batch, T new tokens, D d_model, H MoE heads (sub-tokens per token), E experts,
K top-k, V vocabulary.

The modules are those of ``mhmoe.model.TransformerLM`` (built by it, BitNet-converted by
``mhmoe.bitnet.convert.apply_bitnet`` with the options stored in the config, then adopted), laid out
under the usual Hugging Face names::

    model.embed_tokens   <- TransformerLM.embed
    model.layers.<i>     <- TransformerLM.blocks.<i>   (mhmoe.model.Block, unchanged inside)
    model.norm           <- TransformerLM.final_norm
    lm_head              <- TransformerLM.lm_head      (tied to model.embed_tokens when
                                                        tie_word_embeddings)

The forward pass is ``mhmoe.decoding.decoder_forward`` (KV cache through transformers'
``Cache``/``DynamicCache``, padding masks, explicit positions); with no cache and no padding
it reproduces ``TransformerLM.forward`` bit for bit.

Loss (``labels`` given): next-token cross-entropy in float32, labels shifted inside, -100
ignored, averaged over the counted tokens (or divided by ``num_items_in_batch`` when the
Trainer passes it); plus the model's auxiliary loss ``aux_loss`` = ``w_lb * mean_l L_lb +
w_z * mean_l L_z + w_seq * mean_l L_seq`` (``TransformerLM.aux_loss``, the training objective
of ``mhmoe.training``; w_lb = ``router_aux_loss_coef`` = ``load_balancing_weight``) when the
routing outputs are on. The rule of Mixtral / Qwen3-MoE: routing outputs, and so the aux loss,
only with ``output_router_logits=True`` (the argument, else ``config.output_router_logits``),
in training and eval mode alike. Unlike those models ``aux_loss`` is already weighted (it
combines up to three terms, each with its own weight), so ``loss = lm_loss + aux_loss``.

Routing outputs (``output_router_logits=True``):

* ``router_logits``: the layout of transformers' MoE models, so that
  ``transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func(out.router_logits,
  E, K, attention_mask)`` works: a tuple of ``num_moe_layers * H`` float32 tensors of shape
  (B*T, E), entry ``l * H + h`` holding head h's sub-tokens of MoE layer l (token-major rows, the
  same rows as the attention mask). That function then treats every sub-token as a token;
  it is transformers' formula (one f_i, P_i over all layers), not mhmoe's training loss
  (``aux_loss``: the mean over layers of each layer's loss, with capacity and balancing mode);
* ``expert_ids`` (B, T, H, K) and ``tokens_per_expert`` (E,) (assignments before capacity
  dropping, padding tokens included): one entry per MoE layer, in block order;
* ``aux_loss`` (above).

Gradient (activation) checkpointing: ``model.activation_checkpointing_enable()`` (the deprecated
``gradient_checkpointing_enable()``, or ``TrainingArguments(gradient_checkpointing=True)``)
recomputes each block in the backward pass (``torch.utils.checkpoint``, non-reentrant; the KV
cache is off meanwhile); logits, losses and gradients are those of the plain forward. Every
block is checkpointed: ``every_n_layers`` other than 1 raises ValueError.

Generation: ``generate`` keeps prompt + new tokens within ``max_position_embeddings``: a longer
request is clamped to the context, with a warning naming ``max_new_tokens`` and the context.

PEFT: LoRA on the ``nn.Linear`` layers works through their module calls; LoRA on parameters
(``target_parameters``: the router weight, the stacked ``experts.w1/w3/w2``) through
``parameter_adapters_active``, which puts the wrapped modules back, adapted, for the forward
pass, under a per-model lock (one adapted forward at a time per model; the wrappers are put back
also on errors). ``mhmoe.hf.peft``: the default targets, and a merge that refuses LoRA on
BitNet linear layers (``inexact_bitnet_adapters``).

An export folder carries a copy of this module as ``modeling_mhmoe.py`` (``mhmoe.hf.remote_code``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from mhmoe.bitnet.convert import bitnet_modules
from mhmoe.config import ModelConfig
from mhmoe.decoding import DecoderOutput, decoder_forward
from mhmoe.hf.configuration import MHMoEConfig
from mhmoe.hf.naming import MODEL_TYPE, WEIGHTS_FILE, hf_state_dict, mhmoe_state_dict
from mhmoe.layers.experts import Experts
from mhmoe.layers.mh_moe import MHMoE
from mhmoe.layers.routing import TopKRouter
from mhmoe.model import TransformerLM

logger = logging.getLogger(__name__)

# The generator of an export folder's modeling code, in the package only: a folder's copy of this
# module (``mhmoe.hf.remote_code``) is saved by transformers' own remote-code path, which copies
# the folder's files (``custom_object_save``). Imported by name relative to this package, so that
# the copy neither needs nor carries it.
_remote_code: Any = None
if __name__ == "mhmoe.hf.modeling":
    _remote_code = importlib.import_module(".remote_code", __package__)

# transformers renamed the cache argument/field from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
# The final norm of a block-by-block checkpointed forward (applied once, after the last block).
_IDENTITY = nn.Identity()


@dataclass
class MHMoEModelOutputWithPast(BaseModelOutputWithPast):
    """``BaseModelOutputWithPast`` plus the routing outputs (module docstring)."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_ids: tuple[torch.Tensor, ...] | None = None
    tokens_per_expert: tuple[torch.Tensor, ...] | None = None


@dataclass
class MHMoECausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the routing outputs (module docstring)."""

    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_ids: tuple[torch.Tensor, ...] | None = None
    tokens_per_expert: tuple[torch.Tensor, ...] | None = None


def causal_lm_loss(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean next-token cross-entropy (nats, float32): position t predicts ``labels[:, t + 1]``.

    Labels equal to ``ignore_index`` do not count. The sum is divided by ``num_items_in_batch``
    when given (gradient accumulation in the HF Trainer), else by the number of counted labels.
    """
    if labels_BT.shape != logits_BTV.shape[:2]:
        raise ValueError(
            f"labels have shape {tuple(labels_BT.shape)}, expected (batch, seq) = {tuple(logits_BTV.shape[:2])}"
        )
    vocab = logits_BTV.shape[-1]
    logits_NV = logits_BTV[:, :-1].reshape(-1, vocab).float()  # (B, T-1, V) -> (N, V)
    targets_N = labels_BT[:, 1:].reshape(-1).to(logits_NV.device)
    total = F.cross_entropy(logits_NV, targets_N, ignore_index=ignore_index, reduction="sum")
    if num_items_in_batch is None:
        count = (targets_N != ignore_index).sum().clamp(min=1)
    else:
        count = torch.as_tensor(num_items_in_batch, device=total.device)
    return total / count


def _model_config(config: MHMoEConfig) -> ModelConfig:
    """The ModelConfig of ``config``, built by this module's own MHMoEConfig class.

    In an export's remote code, transformers imports configuration_mhmoe.py twice (once for
    AutoConfig, once with modeling_mhmoe.py, in folders named by different hashes), so the
    config object's own ``to_model_config`` would build dataclasses of the other copy of
    mhmoe_config.py, which this copy's TransformerLM does not accept.
    """
    return MHMoEConfig.to_model_config(config)


def _aux_loss(config: MHMoEConfig, moe_aux: list, like: torch.Tensor) -> torch.Tensor:
    # The very function of TransformerLM.
    # The weights from self.config and, for which balancing loss applies, moe_ffn's
    # load_balancing (configs saved before issue 15 lack both new fields: their defaults).
    moe_ffn = config.moe_ffn
    owner = SimpleNamespace(config=SimpleNamespace(
        load_balancing_weight=config.load_balancing_weight, z_loss_weight=config.z_loss_weight,
        seq_aux_loss_weight=getattr(config, "seq_aux_loss_weight", 0.0),
        moe_ffn=None if moe_ffn is None else SimpleNamespace(
            load_balancing=moe_ffn.get("load_balancing", "micro-batch"))))
    return TransformerLM.aux_loss(owner, moe_aux, like)  # type: ignore[arg-type]


class MHMoEPreTrainedModel(PreTrainedModel):
    """Weight initialisation (mhmoe's scheme) and loading rules shared by the mhmoe models."""

    config_class = MHMoEConfig
    config: MHMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = False
    _can_compile_fullgraph = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """mhmoe's initialisation (``mhmoe.model`` / ``mhmoe.layers`` docstrings).

        nn.Linear (and BitLinear): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) weights and biases, as
        PyTorch's default; stacked experts (E, out, in) and the router: the same bound per
        expert matrix; MH-MoE head / merge: xavier-uniform (gain 1/sqrt(2) on the head), zero
        biases; token embedding N(0, 0.02); every RMSNorm gain 1. Tensors loaded from a
        checkpoint are left alone (transformers.initialization checks their flag).
        """
        if isinstance(module, nn.Linear):
            bound = module.in_features ** -0.5
            init.uniform_(module.weight, -bound, bound)
            if module.bias is not None:
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, Experts):
            for name in ("w1", "w3", "w2"):
                param = getattr(module, name, None)
                if param is not None:
                    bound = param.shape[-1] ** -0.5
                    init.uniform_(param, -bound, bound)
        elif isinstance(module, TopKRouter):
            bound = module.weight.shape[1] ** -0.5
            init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, MHMoE):
            # Children first (transformers applies this bottom-up): re-initialise head/merge.
            if module.head is not None:
                init.xavier_uniform_(module.head.weight, gain=2**-0.5)
                if module.head.bias is not None:
                    init.zeros_(module.head.bias)
            if module.merge is not None:
                init.xavier_uniform_(module.merge.weight)
                if module.merge.bias is not None:
                    init.zeros_(module.merge.bias)
        elif "RMSNorm" in type(module).__name__ and isinstance(getattr(module, "weight", None), nn.Parameter):
            init.ones_(module.weight)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None,
                                    every_n_layers: int = 1, **kwargs: Any) -> None:
        """transformers' switch behind ``activation_checkpointing_enable`` / ``_disable``; only
        ``every_n_layers=1`` (every block is recomputed): ValueError naming any other value."""
        if enable and every_n_layers != 1:
            raise ValueError(
                f"activation checkpointing with every_n_layers={every_n_layers!r}: mhmoe models "
                "checkpoint every block; call activation_checkpointing_enable() without every_n_layers"
            )
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable=enable, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """transformers' ``save_pretrained``, plus the folder's own modeling code.

        A model of the package (loaded from an export with mhmoe imported, or built with
        ``MHMoEForCausalLM.from_mhmoe``) writes the generated ``configuration_mhmoe.py``,
        ``modeling_mhmoe.py`` and ``mhmoe_*.py`` files and config.json's ``auto_map``
        (``mhmoe.hf.remote_code.write_remote_code``, each file atomically), so the saved folder
        loads with ``trust_remote_code=True`` where mhmoe is not installed, as an export does.
        ``push_to_hub=True`` then uploads with ``push_to_hub``, which saves (this method) again.
        A model of a folder's copy is saved by transformers itself, which copies those files.
        """
        if _remote_code is None:
            super().save_pretrained(save_directory, *args, **kwargs)
            return
        files = _remote_code.remote_code_files()  # fails before anything is written
        push_to_hub = kwargs.pop("push_to_hub", False)
        hub = {name: kwargs.pop(name) for name in ("repo_id", "commit_message", "create_pr", "private")
               if name in kwargs}
        super().save_pretrained(save_directory, *args, **kwargs)
        is_main_process = args[0] if args else kwargs.get("is_main_process", True)
        rank_saves = getattr(self, "should_save_on_this_rank", None)  # transformers >= 5.x: also TP ranks
        if (rank_saves(is_main_process) if rank_saves else is_main_process) and os.path.isdir(save_directory):
            _remote_code.write_remote_code(save_directory, files)
            if push_to_hub:
                self.push_to_hub(hub.pop("repo_id", Path(save_directory).name), token=kwargs.get("token"),
                                 max_shard_size=kwargs.get("max_shard_size", "50GB"), **hub)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *args: Any, **kwargs: Any):
        """transformers' ``from_pretrained``, with a clear error for incomplete local exports.

        A local folder must hold config.json and model.safetensors (or a safetensors index):
        FileNotFoundError names the folder and what is missing (mhmoe reads safetensors only).
        """
        if pretrained_model_name_or_path is not None and os.path.isdir(pretrained_model_name_or_path):
            folder = Path(pretrained_model_name_or_path)
            subfolder = kwargs.get("subfolder") or ""
            folder = folder / subfolder if subfolder else folder
            weights = (folder / WEIGHTS_FILE).is_file() or (folder / f"{WEIGHTS_FILE}.index.json").is_file()
            missing = [name for name, ok in (("config.json", (folder / "config.json").is_file() or
                                              kwargs.get("config") is not None),
                                             (WEIGHTS_FILE, weights)) if not ok]
            if missing:
                pickles = [p.name for p in folder.glob("*.bin")]
                hint = f" (found only pickle weights {pickles}: mhmoe loads safetensors only)" if pickles else ""
                raise FileNotFoundError(
                    f"{folder}: incomplete mhmoe model folder, missing {', '.join(missing)}{hint}; "
                    f"export a run with `mhmoe export RUN_DIR {folder}`"
                )
        kwargs.setdefault("use_safetensors", True)
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        _own_aligned_memory(model)
        return model


# The alignment of the CPU allocator; the kernels' vector paths assume it.
_ALIGNMENT_BYTES = 64


@torch.no_grad()
def _own_aligned_memory(model: nn.Module) -> None:
    """Give tensors that still point into the memory-mapped safetensors file memory of their own.

    A tensor of the file is aligned to 8 bytes only; on CPU, matmul kernels then take other
    vector paths and round differently (1 ulp in the logits, measured for an MH-MoE h=3 export),
    so the loaded model would not reproduce ``load_run``'s logits bit for bit. Copies only the
    misaligned tensors, one at a time; tied parameters stay tied (one Parameter object).
    """
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for tensor in tensors.values():
                if tensor is not None and tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT_BYTES:
                    tensor.data = tensor.data.clone()


def _is_parameter_adapter(module: nn.Module | None) -> bool:
    """Whether ``module`` is PEFT's wrapper of a module's parameter (LoRA ``target_parameters``:
    ``peft.tuners.lora.ParamWrapper``), which applies the adapter only inside its own forward."""
    # Class and instance dicts only: nn.Module.__getattr__ (raising for absent names) is slow, and
    # this runs over every module at every forward.
    return (module is not None and hasattr(type(module), "_activate_lora")
            and "parameter_name" in module.__dict__ and "base_layer" in module._modules)


def _unwrapped(module: nn.Module) -> nn.Module:
    """``module`` without PEFT parameter wrappers (the mhmoe module they wrap)."""
    while _is_parameter_adapter(module):
        module = module.base_layer
    return module


# One re-entrant lock per model (the module given as ``owner``): the swap below changes the
# module tree in place, so two threads must not forward one adapted model at the same time.
# Kept beside the modules, not on them (a lock attribute would break copy.deepcopy and pickling).
_ADAPTER_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_ADAPTER_LOCKS_GUARD = threading.Lock()


def _adapter_lock(owner: nn.Module) -> threading.RLock:
    with _ADAPTER_LOCKS_GUARD:
        lock = _ADAPTER_LOCKS.get(owner)
        if lock is None:
            lock = _ADAPTER_LOCKS[owner] = threading.RLock()
        return lock


def _put_back(parent: nn.Module, name: str, child: nn.Module) -> None:
    parent._modules[name] = child


@contextlib.contextmanager
def parameter_adapters_active(root: nn.Module, owner: nn.Module | None = None) -> Iterator[None]:
    """Within: every PEFT parameter wrapper under ``root`` replaced by the mhmoe module it wraps,
    with its LoRA delta applied to that module's parameter (PEFT's own parametrisation).

    The MoE dispatch reads the experts' and router's attributes and calls their methods
    (``forward_one``, ``num_experts``, the stacked weights of the grouped and blocked paths),
    which a ``ParamWrapper`` does not have; so, as PEFT does inside the wrapper's forward, the
    adapted weight W + dW is put on the module itself, for the whole forward pass. Adapters that
    are disabled or merged add nothing. The wrappers are back in place on exit, also when
    activating an adapter raises (each put-back is registered before its swap).

    Thread safety: the swap edits the module tree, so the context holds ``owner``'s lock (a
    re-entrant lock per model; ``owner`` defaults to ``root``): forwards of one adapted model
    from several threads run one at a time. The lock is held only while the context is open; a
    checkpointed block's recompute in the backward pass (in the caller's thread on CPU, in
    autograd's device thread on CUDA) takes it anew, never while the forward holds it.
    """
    with _adapter_lock(root if owner is None else owner), contextlib.ExitStack() as stack:
        for parent in list(root.modules()):
            if _is_parameter_adapter(parent):  # a nested wrapper: handled with its outermost one
                continue
            for name, child in list(parent._modules.items()):
                if not _is_parameter_adapter(child):
                    continue
                # Registered first, so it runs last: after every adapter of this chain is undone.
                stack.callback(_put_back, parent, name, child)
                wrapper = child
                while _is_parameter_adapter(wrapper):  # one wrapper per parameter (w1, w3, w2): nested
                    if not wrapper.disable_adapters and not wrapper.merged:
                        stack.enter_context(wrapper._activate_lora(wrapper.active_adapters))
                    wrapper = wrapper.base_layer
                parent._modules[name] = wrapper
        yield


def inexact_bitnet_adapters(model: nn.Module) -> list[str]:
    """Names of the PEFT module adapters of ``model`` that sit on a BitNet module (BitLinear):
    the adapters whose merge is not exact.

    A module adapter (``peft.tuners.lora.Linear`` wrapping a BitLinear) adds its full-precision
    delta to the quantised layer's output; merging folds it into the latent weight, which the
    forward then re-quantises, so the merged model is another model. A parameter adapter
    (``target_parameters``: BitExperts' ``w1/w3/w2``, a quantised router's weight) puts W + dW
    on the module before the module quantises it, so the merged model computes the same.
    """
    names = set(bitnet_modules(model))
    quantised = {id(module) for name, module in model.named_modules() if name in names}
    adapted = []
    for name, module in model.named_modules():
        if _is_parameter_adapter(module) or "lora_A" not in module._modules:
            continue
        base = module
        while isinstance(getattr(base, "base_layer", None), nn.Module):
            base = base.base_layer
        if base is not module and id(base) in quantised:
            adapted.append(name)
    return adapted


def _warn_if_lora_on_bitnet(model: "MHMoEModel") -> None:
    """Warn (once per model) when PEFT module adapters sit on BitNet modules: merging them is
    not exact (``inexact_bitnet_adapters``)."""
    adapted = inexact_bitnet_adapters(model)
    if adapted:
        model._warned_lora_on_bitnet = True
        logger.warning(
            "LoRA adapters on BitNet linear layers (%s%s): do not call merge_and_unload(), it folds the "
            "full-precision delta into the latent weights, which are then re-quantised, and silently "
            "changes the model; keep the adapters unmerged (mhmoe.hf.peft.merge_lora refuses)",
            ", ".join(adapted[:3]), ", ..." if len(adapted) > 3 else "")


def _peft_attached(model: nn.Module) -> bool:
    """Whether PEFT adapters were put on ``model``: PEFT sets ``peft_config`` on the model it
    tunes (``get_peft_model``), transformers' integration ``_hf_peft_config_loaded``
    (``add_adapter`` / ``load_adapter``). Cheap, unlike a walk over the modules."""
    return "peft_config" in model.__dict__ or bool(getattr(model, "_hf_peft_config_loaded", False))


def _block_forward(
    x_BTD: torch.Tensor, block: nn.Module, rotary: nn.Module, adapters: bool, owner: nn.Module, **kwargs: Any
) -> DecoderOutput:
    """``decoder_forward`` over one block (the unit of gradient checkpointing); its PEFT adapters
    are activated inside (under ``owner``'s lock), so that the backward pass's recompute sees
    them too."""
    with parameter_adapters_active(block, owner) if adapters else contextlib.nullcontext():
        return decoder_forward(x_BTD, [block], _IDENTITY, rotary, **kwargs)


def _take_cache(cache: Cache | None, kwargs: dict[str, Any]) -> Cache | None:
    legacy = kwargs.pop("past_key_values", None)
    if legacy is not None:
        if cache is not None:
            raise ValueError("pass the KV cache as `cache` or `past_key_values`, not both")
        cache = legacy
    if cache is not None and not hasattr(cache, "update"):
        raise ValueError(
            f"cache of type {type(cache).__name__}: must be a transformers Cache (e.g. DynamicCache); "
            "tuples of tensors are not supported"
        )
    return cache


class MHMoEModel(MHMoEPreTrainedModel):
    """The decoder without the output projection: embeddings, mhmoe Blocks, final RMSNorm."""

    def __init__(self, config: MHMoEConfig, lm: TransformerLM | None = None) -> None:
        super().__init__(config)
        if lm is None:
            lm = TransformerLM(_model_config(config))
        known = {"embed", "rotary", "blocks", "final_norm", "lm_head"}
        unknown = sorted(name for name, _ in lm.named_children() if name not in known)
        if unknown:
            raise NotImplementedError(
                f"TransformerLM has submodules {unknown} that mhmoe.hf does not map; update mhmoe/hf/modeling.py"
            )
        self.embed_tokens = lm.embed
        self.layers = lm.blocks
        self.norm = lm.final_norm
        self.rotary = lm.rotary
        # Set by transformers' gradient_checkpointing_enable, with _gradient_checkpointing_func.
        self.gradient_checkpointing = False
        self._warned_lora_on_bitnet = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        parameter_adapters: bool | None = None,
        **kwargs: Any,
    ) -> MHMoEModelOutputWithPast | tuple:
        """Hidden states after the final norm; see the module docstring for the options.

        ``parameter_adapters``: whether PEFT adapters may be attached (then the forward looks
        for parameter wrappers, ``parameter_adapters_active``); None: PEFT's marker on this model.
        """
        cache = _take_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        adapters = _peft_attached(self) if parameter_adapters is None else parameter_adapters
        if adapters and self.config.bitnet is not None and not self._warned_lora_on_bitnet:
            _warn_if_lora_on_bitnet(self)
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: mhmoe attention runs through SDPA")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = bool(self.config.output_router_logits)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and (use_cache or cache is not None):
            if use_cache:
                logger.warning_once("gradient checkpointing recomputes every block: use_cache=True is "
                                    "ignored while training (the KV cache is off)")
            use_cache, cache = False, None
        if output_hidden_states is None:
            output_hidden_states = bool(self.config.output_hidden_states)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids have shape {tuple(input_ids.shape)}, expected (batch, seq)")
            inputs_embeds = self.embed_tokens(input_ids)

        router_logits: list[torch.Tensor] = []
        handles = []
        if output_router_logits:
            # The hooks sit on modules shared by every thread: each forward keeps its own calls.
            thread = threading.get_ident()

            def keep_router_logits(_module: nn.Module, _inputs: Any, out: Any) -> None:
                if threading.get_ident() == thread:
                    router_logits.append(out.logits_NE)

            for block in self.layers:
                if block.is_moe:
                    handles.append(_unwrapped(block.ffn.router).register_forward_hook(keep_router_logits))
        try:
            if checkpointing:
                out = self._checkpointed_forward(inputs_embeds, attention_mask, position_ids, output_hidden_states,
                                                 adapters)
            else:
                with parameter_adapters_active(self.layers, self) if adapters else contextlib.nullcontext():
                    out = decoder_forward(
                        inputs_embeds, self.layers, self.norm, self.rotary,
                        attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        output_hidden_states=output_hidden_states,
                    )
        finally:
            for handle in handles:
                handle.remove()

        batch, seq_len = inputs_embeds.shape[:2]
        routing: dict[str, Any] = {}
        if output_router_logits:
            moe_blocks = [b for b in self.layers if b.is_moe]
            # (B*T*H, E) -> (B*T, H, E) (sub-tokens are token-major) -> H tensors (B*T, E).
            routing = {
                "aux_loss": _aux_loss(self.config, out.moe_aux, out.hidden_BTD),
                "router_logits": tuple(
                    head_logits
                    for logits, b in zip(router_logits, moe_blocks)
                    for head_logits in logits.view(batch * seq_len, b.ffn.num_heads, -1).unbind(1)
                ),
                "expert_ids": tuple(
                    a.expert_ids.view(batch, seq_len, a.num_heads, -1) for a in out.moe_aux
                ),
                "tokens_per_expert": tuple(a.tokens_per_expert for a in out.moe_aux),
            }
        result = MHMoEModelOutputWithPast(
            last_hidden_state=out.hidden_BTD,
            hidden_states=out.hidden_states,
            **{_CACHE_FIELD: cache},
            **routing,
        )
        return result if return_dict else result.to_tuple()


    def _checkpointed_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        output_hidden_states: bool,
        adapters: bool,
    ) -> DecoderOutput:
        """``decoder_forward`` one block at a time, each under the checkpoint function (no cache).

        The same operations in the same order as the whole-stack call, so the outputs are equal.
        """
        checkpoint = self._gradient_checkpointing_func
        if getattr(checkpoint, "keywords", {}).get("use_reentrant", False):
            raise ValueError(
                "gradient_checkpointing_kwargs use_reentrant=True: not supported, the MoE auxiliary "
                "losses would lose their gradients; use the default use_reentrant=False"
            )
        hidden: list[torch.Tensor] | None = [inputs_embeds] if output_hidden_states else None
        moe_aux = []
        x_BTD = inputs_embeds
        for block in self.layers:
            out = checkpoint(_block_forward, x_BTD, block, self.rotary, adapters, self,
                             attention_mask=attention_mask, position_ids=position_ids)
            x_BTD = out.hidden_BTD
            moe_aux.extend(out.moe_aux)
            if hidden is not None:
                hidden.append(x_BTD)
        return DecoderOutput(self.norm(x_BTD), moe_aux, tuple(hidden) if hidden is not None else None)

class MHMoEForCausalLM(MHMoEPreTrainedModel, GenerationMixin):
    """mhmoe's TransformerLM as a transformers causal LM (``generate``, Trainer, lm-eval)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MHMoEConfig) -> None:
        super().__init__(config)
        lm = TransformerLM(_model_config(config))
        self.model = MHMoEModel(config, lm)
        self.vocab_size = config.vocab_size
        # Untied: the LM's own head (BitNet-converted if the options say so). Tied: a Linear that
        # transformers ties to model.embed_tokens (TransformerLM then has no lm_head at all).
        self.lm_head = lm.lm_head if lm.lm_head is not None else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> MHMoECausalLMOutputWithPast | tuple:
        """Logits (B, T, V), optional loss and routing outputs (module docstring).

        ``logits_to_keep``: an int k > 0 keeps the last k positions' logits (0 keeps all),
        a tensor keeps those sequence indices. ``past_key_values`` is accepted for the cache.
        """
        cache = _take_cache(cache, kwargs)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        if output_router_logits is None:
            output_router_logits = bool(self.config.output_router_logits)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
            parameter_adapters=_peft_attached(self) or _peft_attached(self.model),
        )
        hidden_BTD = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep < 0:
                raise ValueError(f"logits_to_keep={logits_to_keep}: must be >= 0 (0 keeps every position)")
            if logits_to_keep:
                hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        else:
            hidden_BTD = hidden_BTD[:, logits_to_keep]
        # As TransformerLM.forward: F.linear with the head weight (never a quantised head call);
        # a head adapted by PEFT (LoRA on lm_head) through its module call, which adds the delta.
        if hasattr(self.lm_head, "base_layer"):
            logits_BTV = self.lm_head(hidden_BTD)
        else:
            logits_BTV = F.linear(hidden_BTD, self.lm_head.weight)

        loss = None
        if labels is not None:
            if logits_BTV.shape[1] != labels.shape[1]:
                raise ValueError(
                    f"labels cover {labels.shape[1]} positions but logits {logits_BTV.shape[1]}: "
                    "use logits_to_keep=0 when computing a loss"
                )
            loss = causal_lm_loss(logits_BTV, labels, num_items_in_batch)
            if outputs.aux_loss is not None:
                loss = loss + outputs.aux_loss.to(loss.device)
        result = MHMoECausalLMOutputWithPast(
            loss=loss,
            logits=logits_BTV,
            hidden_states=outputs.hidden_states,
            aux_loss=outputs.aux_loss,
            router_logits=outputs.router_logits,
            expert_ids=outputs.expert_ids,
            tokens_per_expert=outputs.tokens_per_expert,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return result if return_dict else result.to_tuple()

    def generate(self, inputs: torch.Tensor | None = None, generation_config: Any = None, **kwargs: Any):
        """``GenerationMixin.generate`` with prompt + new tokens kept within the context.

        A request for more (``max_new_tokens``, or ``max_length``, from the arguments, the
        ``generation_config`` passed or the model's) is clamped to ``max_position_embeddings``
        with a warning; a prompt that already fills the context raises ValueError.
        """
        context = int(self.config.max_position_embeddings)
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None and kwargs.get("inputs_embeds") is not None:
            prompt = kwargs["inputs_embeds"]
        prompt_len = int(prompt.shape[1]) if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else 0
        configs = [c for c in (generation_config, self.generation_config) if c is not None]

        def requested(name: str) -> int | None:
            if kwargs.get(name) is not None:
                return int(kwargs[name])
            for config in configs:
                if getattr(config, name, None) is not None:
                    return int(getattr(config, name))
            return None

        if prompt_len >= context:
            raise ValueError(f"the prompt has {prompt_len} tokens: it must be shorter than the context "
                             f"length max_position_embeddings={context} to generate")
        new_tokens = requested("max_new_tokens")
        if new_tokens is not None and prompt_len + new_tokens > context:
            logger.warning(
                "max_new_tokens=%d with a %d-token prompt exceeds the context length "
                "max_position_embeddings=%d: generating at most %d new tokens",
                new_tokens, prompt_len, context, context - prompt_len)
            kwargs["max_new_tokens"] = context - prompt_len
        elif new_tokens is None:
            max_length = requested("max_length")
            if max_length is not None and max_length > context:
                logger.warning("max_length=%d exceeds the context length max_position_embeddings=%d: "
                               "clamped to %d (pass max_new_tokens to set the new tokens)",
                               max_length, context, context)
                kwargs["max_length"] = context
        return super().generate(inputs, generation_config, **kwargs)

    # -- conversions to and from mhmoe ----------------------------------------------------------

    @classmethod
    def from_mhmoe(cls, lm: TransformerLM, **config_kwargs: Any) -> "MHMoEForCausalLM":
        """An MHMoEForCausalLM with the weights of ``lm`` (a TransformerLM, BitNet or not).

        ``config_kwargs`` go to ``MHMoEConfig`` (e.g. bos/eos/pad token ids).
        """
        config = MHMoEConfig.from_model_config(lm.config, **config_kwargs)
        model = cls(config)
        tensors = hf_state_dict(lm)
        if config.tie_word_embeddings:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        model.load_state_dict(tensors, strict=True)
        return model.to(lm.embed.weight.device).train(lm.training)

    def to_mhmoe(self) -> TransformerLM:
        """A TransformerLM (mhmoe's own model) with a copy of these weights."""
        lm = TransformerLM(_model_config(self.config))
        tensors = mhmoe_state_dict(self.state_dict())
        if self.config.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)
        lm.load_state_dict(tensors, strict=True)
        return lm.to(self.lm_head.weight.device).train(self.training)


def register_auto_classes() -> None:
    """Register the models with transformers' Auto classes (idempotent; the config registers itself)."""
    AutoModel.register(MHMoEConfig, MHMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(MHMoEConfig, MHMoEForCausalLM, exist_ok=True)
    logger.debug("registered model_type %r with transformers' Auto classes", MODEL_TYPE)


# Importing this module is enough to use the Auto classes (not as the copy inside an export
# folder, which transformers loads through config.json's auto_map; see mhmoe.hf.configuration).
if __name__ == "mhmoe.hf.modeling":
    register_auto_classes()
