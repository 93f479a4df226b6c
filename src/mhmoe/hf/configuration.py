"""``MHMoEConfig``: the transformers configuration of an mhmoe language model.

It carries the fields of ``mhmoe.model.ModelConfig`` under Hugging Face names where one
exists (``mhmoe.hf.naming.HF_NAMES``: d_model -> hidden_size, num_layers -> num_hidden_layers,
max_seq_len -> max_position_embeddings, tie_embeddings -> tie_word_embeddings, norm_eps ->
rms_norm_eps) and under their own names otherwise (dense_ffn, moe_ffn, moe_every, rope_theta,
load_balancing_weight, z_loss_weight, seq_aux_loss_weight; the load-balancing mode and the
capacity rule are fields of the ``moe_ffn`` dict: load_balancing, capacity_priority,
capacity_at_eval, bias_update_rate), ``router_aux_loss_coef`` as an alias of
load_balancing_weight (transformers' MoE name: ``MHMoEConfig(router_aux_loss_coef=0.0)``,
``from_pretrained(path, router_aux_loss_coef=0.0)``), plus ``bitnet`` (the ``mhmoe.config.BitNetConfig``
dict of a BitNet model, None for full precision) and ``output_router_logits``.

The config is validated on creation through ``ModelConfig`` (ValueError naming the value and
the rule). The ``__init__`` is written out, as transformers' own configs were before v5.x
turned them into dataclasses; transformers keeps supporting this form, so the class works
across transformers 5.x.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedConfig

from mhmoe.config import ModelConfig
from mhmoe.hf.naming import HF_NAMES, MODEL_TYPE, model_config_from_hf


class MHMoEConfig(PreTrainedConfig):
    """Configuration of ``MHMoEForCausalLM`` (see the module docstring for the fields).

    ``dense_ffn`` / ``moe_ffn`` are the dicts of ``mhmoe.model.ffn_config_to_dict``
    (``{"kind": "dense", "d_model", "d_ff", ...}`` / ``{"kind": "moe", "num_experts", "top_k",
    "num_heads", ...}``); ``dense_ffn=None`` means a SwiGLU FFN of width 4 * hidden_size,
    ``moe_ffn=None`` a dense model.
    """

    model_type = MODEL_TYPE
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # The name of transformers' MoE models (Mixtral, Qwen3-MoE) for the load-balancing weight.
    attribute_map = {"router_aux_loss_coef": "load_balancing_weight"}

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 512,
        num_hidden_layers: int = 8,
        num_attention_heads: int = 8,
        max_position_embeddings: int = 1024,
        dense_ffn: dict[str, Any] | None = None,
        moe_ffn: dict[str, Any] | None = None,
        moe_every: int = 2,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        load_balancing_weight: float = 0.01,
        z_loss_weight: float = 0.0,
        seq_aux_loss_weight: float = 0.0,
        bitnet: dict[str, Any] | None = None,
        output_router_logits: bool = False,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.max_position_embeddings = max_position_embeddings
        if dense_ffn is None and isinstance(hidden_size, int):
            dense_ffn = {"kind": "dense", "d_model": hidden_size, "d_ff": 4 * hidden_size,
                         "activation": "swiglu", "bias": False}
        self.dense_ffn = dense_ffn
        self.moe_ffn = moe_ffn
        self.moe_every = moe_every
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.load_balancing_weight = load_balancing_weight
        self.z_loss_weight = z_loss_weight
        self.seq_aux_loss_weight = seq_aux_loss_weight
        self.bitnet = bitnet
        self.output_router_logits = output_router_logits
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        # Passed on, so that transformers versions whose base __init__ sets these keep ours.
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
        if bitnet is not None and not isinstance(bitnet, dict):
            raise ValueError(f"bitnet={bitnet!r}: must be a BitNetConfig dict or None")
        self.to_model_config()  # validates

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_key_value_heads(self) -> int:
        return self.num_attention_heads

    def to_model_config(self) -> ModelConfig:
        """The ``mhmoe.model.ModelConfig`` described by this config (validated)."""
        data = {HF_NAMES.get(name, name): getattr(self, HF_NAMES.get(name, name))
                for name in ModelConfig.__dataclass_fields__
                if hasattr(self, HF_NAMES.get(name, name))}
        data["model_type"] = MODEL_TYPE
        return model_config_from_hf(data)

    @classmethod
    def from_model_config(
        cls, model_config: ModelConfig, **kwargs: Any
    ) -> "MHMoEConfig":
        """An MHMoEConfig for a ``ModelConfig`` (``kwargs``: token ids, dtype, ...)."""
        fields = {HF_NAMES.get(name, name): value for name, value in model_config.to_dict().items()}
        return cls(**fields, **kwargs)


# Importing this module is enough for AutoConfig (mhmoe.hf.modeling registers the models). Not
# as the copy inside an export folder (mhmoe.hf.remote_code): there config.json's auto_map names
# the class, and registering the copy would take model_type "mhmoe" from an imported mhmoe.
if __name__ == "mhmoe.hf.configuration":
    AutoConfig.register(MODEL_TYPE, MHMoEConfig, exist_ok=True)
