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
Trainer passes it); plus the model's auxiliary loss ``w_lb * mean_l L_lb + w_z * mean_l L_z``
(the training objective of ``mhmoe.training``) whenever routing outputs are on: by default in
training mode, or with ``output_router_logits=True``.

Routing outputs (``output_router_logits=True``): one entry per MoE layer, in block order:
``router_logits`` (B, T, H, E) float32, ``expert_ids`` (B, T, H, K), ``tokens_per_expert``
(E,) (assignments before capacity dropping, padding tokens included), and ``aux_loss``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from mhmoe.decoding import decoder_forward
from mhmoe.hf.configuration import MHMoEConfig
from mhmoe.hf.export import MODEL_TYPE, WEIGHTS_FILE, hf_state_dict, mhmoe_state_dict
from mhmoe.layers.experts import Experts
from mhmoe.layers.mh_moe import MHMoE
from mhmoe.layers.routing import TopKRouter
from mhmoe.model import TransformerLM

logger = logging.getLogger(__name__)


# transformers renamed the cache argument/field from `past_key_values` to `cache` during 5.x.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


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
    supports_gradient_checkpointing = False
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
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


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
            lm = TransformerLM(config.to_model_config())
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
        **kwargs: Any,
    ) -> MHMoEModelOutputWithPast | tuple:
        """Hidden states after the final norm; see the module docstring for the options."""
        cache = _take_cache(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if output_attentions:
            raise ValueError("output_attentions=True is not supported: mhmoe attention runs through SDPA")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_router_logits is None:
            output_router_logits = bool(self.config.output_router_logits) or self.training
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
            for block in self.layers:
                if block.is_moe:
                    handles.append(block.ffn.router.register_forward_hook(
                        lambda _m, _i, out: router_logits.append(out.logits_NE)))
        try:
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
            # (B*T*H, E) -> (B, T, H, E); (B*T*H, K) -> (B, T, H, K); sub-tokens are token-major.
            routing = {
                "aux_loss": _aux_loss(self.config, out.moe_aux, out.hidden_BTD),
                "router_logits": tuple(
                    logits.view(batch, seq_len, b.ffn.num_heads, -1) for logits, b in zip(router_logits, moe_blocks)
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


class MHMoEForCausalLM(MHMoEPreTrainedModel, GenerationMixin):
    """mhmoe's TransformerLM as a transformers causal LM (``generate``, Trainer, lm-eval)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MHMoEConfig) -> None:
        super().__init__(config)
        lm = TransformerLM(config.to_model_config())
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
            output_router_logits = bool(self.config.output_router_logits) or self.training
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
        )
        hidden_BTD = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            if logits_to_keep < 0:
                raise ValueError(f"logits_to_keep={logits_to_keep}: must be >= 0 (0 keeps every position)")
            if logits_to_keep:
                hidden_BTD = hidden_BTD[:, -logits_to_keep:]
        else:
            hidden_BTD = hidden_BTD[:, logits_to_keep]
        # As TransformerLM.forward: F.linear with the head weight (never a quantised head call).
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
        lm = TransformerLM(self.config.to_model_config())
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


# Importing this module is enough to use the Auto classes.
register_auto_classes()
