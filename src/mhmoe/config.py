"""Typed configuration of the feed-forward slot of a Transformer block.

One dataclass describes every layer the paper compares:

* ``DenseConfig``: a dense FFN (SwiGLU by default, ReLU for the paper's complexity analysis).
* ``MoEConfig``: the one MoE core, with optional head/merge layers, ``num_heads`` sub-tokens per
  token and an optional shared expert. SMoE is ``num_heads=1`` without head/merge; fine-grained
  SMoE is the same with more, smaller experts; MH-MoE is ``num_heads=h`` with head and merge.

Validation raises ``ValueError`` naming the offending value and the rule it breaks.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from typing import Any

from mhmoe import checks

ACTIVATIONS = ("swiglu", "relu")

LOAD_BALANCING = ("micro-batch", "global-batch", "aux-free", "none")
"""How MoE layers are balanced (``MoEConfig.load_balancing``; docs/load_balancing.md):

* ``micro-batch``: the load-balancing loss with f_i counted over this micro-batch on this rank
  (the behaviour before issue 15, and the default, so old configs train as they did);
* ``global-batch``: the same loss with f_i counted over all micro-batches of the optimiser step
  and all data-parallel ranks (Qiu et al., "Demons in the Detail", arXiv 2501.11873; Qwen3-MoE);
* ``aux-free``: no load-balancing loss; a per-expert selection bias updated once per optimiser
  step from the global-batch loads (DeepSeek-V3, arXiv 2412.19437, Sec. 2.1.2);
* ``none``: neither.
"""

CAPACITY_PRIORITIES = ("position", "choice")
"""Which assignments a full expert keeps (``mhmoe.layers.moe``): position-major (causal, the
default) or GShard's choice-major."""






def _require_activation(activation: Any) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: must be one of {', '.join(ACTIVATIONS)}")


@dataclass(frozen=True)
class DenseConfig:
    """A dense feed-forward network: d_model -> d_ff -> d_model."""

    d_model: int
    d_ff: int
    activation: str = "swiglu"
    bias: bool = False

    def __post_init__(self) -> None:
        checks.positive_int("d_model", self.d_model)
        checks.positive_int("d_ff", self.d_ff)
        _require_activation(self.activation)
        checks.boolean("bias", self.bias)

    @property
    def kind(self) -> str:
        return "dense"

    def replace(self, **changes: Any) -> "DenseConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MoEConfig:
    """The MoE core (router + experts), optionally wrapped by MH-MoE's head and merge layers.

    ``head_layer``/``merge_layer`` default to ``num_heads > 1`` (MH-MoE has both, SMoE neither);
    set them explicitly for the paper's Table 4/5 ablations. ``capacity_priority``,
    ``capacity_at_eval``: the capacity rule (``mhmoe.layers.moe``); ``load_balancing``,
    ``bias_update_rate``: ``LOAD_BALANCING`` (docs/load_balancing.md).
    """

    d_model: int
    num_experts: int
    top_k: int
    d_expert: int
    num_heads: int = 1
    head_layer: bool | None = None
    merge_layer: bool | None = None
    shared_d_ff: int | None = None
    activation: str = "swiglu"
    bias: bool = False
    capacity_factor: float | None = None
    normalize_top_k: bool | None = None
    # Capacity: kept-assignment priority when an expert is full, and whether the
    # capacity also applies outside training (default: evaluation and generation dropless).
    capacity_priority: str = "position"
    capacity_at_eval: bool = False
    # Balancing (LOAD_BALANCING); bias_update_rate is aux-free's gamma (DeepSeek-V3: 1e-3).
    load_balancing: str = "micro-batch"
    bias_update_rate: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("d_model", "num_experts", "top_k", "d_expert", "num_heads"):
            checks.positive_int(name, getattr(self, name))
        _require_activation(self.activation)
        if self.d_model % self.num_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}: "
                "each token must split into num_heads equal sub-tokens"
            )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"top_k={self.top_k} exceeds num_experts={self.num_experts}: "
                "a (sub-)token cannot be routed to more experts than exist"
            )
        if self.shared_d_ff is not None:
            checks.positive_int("shared_d_ff", self.shared_d_ff)
        if self.capacity_factor is not None:
            checks.positive_number("capacity_factor", self.capacity_factor)
        for name in ("head_layer", "merge_layer", "normalize_top_k"):
            checks.boolean(name, getattr(self, name), allow_none=True)
        checks.boolean("bias", self.bias)
        if self.capacity_priority not in CAPACITY_PRIORITIES:
            raise ValueError(f"capacity_priority={self.capacity_priority!r}: must be one of "
                             f"{', '.join(CAPACITY_PRIORITIES)}")
        checks.boolean("capacity_at_eval", self.capacity_at_eval)
        if self.load_balancing not in LOAD_BALANCING:
            raise ValueError(f"load_balancing={self.load_balancing!r}: must be one of {', '.join(LOAD_BALANCING)}")
        checks.non_negative_number("bias_update_rate", self.bias_update_rate)

    @property
    def kind(self) -> str:
        return "moe"

    @property
    def has_head(self) -> bool:
        """Whether the head layer is present (default: MH-MoE, num_heads > 1)."""
        return self.num_heads > 1 if self.head_layer is None else bool(self.head_layer)

    @property
    def has_merge(self) -> bool:
        """Whether the merge layer is present (default: MH-MoE, num_heads > 1)."""
        return self.num_heads > 1 if self.merge_layer is None else bool(self.merge_layer)

    @property
    def renormalizes(self) -> bool:
        """Whether the top-k weights are renormalised to sum to 1 (default: top_k > 1)."""
        return self.top_k > 1 if self.normalize_top_k is None else bool(self.normalize_top_k)

    @property
    def d_sub(self) -> int:
        """Size of one sub-token (the experts' input size): d_model / num_heads."""
        return self.d_model // self.num_heads

    def replace(self, **changes: Any) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


FFNConfig = DenseConfig | MoEConfig




def ffn_config_to_dict(config: DenseConfig | MoEConfig) -> dict[str, Any]:
    """A JSON-able dict of an FFN config, with its ``kind`` ("dense" or "moe")."""
    return {"kind": config.kind, **dataclasses.asdict(config)}


def ffn_config_from_dict(data: dict[str, Any]) -> DenseConfig | MoEConfig:
    """Inverse of ``ffn_config_to_dict``; validates through the dataclass."""
    if not isinstance(data, dict):
        raise ValueError(f"FFN config {data!r}: must be a JSON object")
    fields = dict(data)
    kind = fields.pop("kind", None)
    # Files written before MoEConfig lost its unused z_loss flag (the z-loss is weighted by
    # ModelConfig.z_loss_weight) still load.
    if kind == "moe":
        fields.pop("z_loss", None)
    cls = {"dense": DenseConfig, "moe": MoEConfig}.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"FFN config kind={kind!r}: must be 'dense' or 'moe'")
    checks.known_fields(f"FFN config ({kind})", cls, fields)
    return cls(**fields)




DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head", "*.lm_head")
"""Module names ``to_bitnet`` leaves in full precision unless ``exclude`` is given."""


BITNET_FULL_PRECISION: dict[str, tuple[str, ...]] = {
    "head-merge": ("*.ffn.head", "*.ffn.merge"),
    "attention": ("*.attention.qkv", "*.attention.out"),
}
"""Parts a BitNet run can keep in full precision on top of ``DEFAULT_EXCLUDE`` (the name on
``--bitnet-full-precision`` and the module-name patterns it adds to ``exclude``)."""


def bitnet_config_keeping(parts: tuple[str, ...] | list[str] = ()) -> "BitNetConfig":
    """The default BitNet config with ``parts`` (keys of ``BITNET_FULL_PRECISION``) also left in
    full precision."""
    unknown = [part for part in parts if part not in BITNET_FULL_PRECISION]
    if unknown:
        raise ValueError(f"BitNet full-precision parts {unknown}: must be among {sorted(BITNET_FULL_PRECISION)}")
    extra = tuple(pattern for part in dict.fromkeys(parts) for pattern in BITNET_FULL_PRECISION[part])
    return BitNetConfig(exclude=DEFAULT_EXCLUDE + extra)


@dataclass(frozen=True)
class BitNetConfig:
    """The options of ``to_bitnet``, JSON-able (stored with run configs and ternary exports)."""

    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    quantize_router: bool = False
    norm: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"] = None if self.include is None else list(self.include)
        data["exclude"] = list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BitNetConfig":
        if not isinstance(data, dict):
            raise ValueError(f"bitnet config {data!r}: must be a JSON object")
        unknown = sorted(set(data) - {"include", "exclude", "quantize_router", "norm"})
        if unknown:
            raise ValueError(f"bitnet config has unknown fields {unknown}")
        fields = dict(data)
        if fields.get("include") is not None:
            fields["include"] = tuple(fields["include"])
        if "exclude" in fields:
            fields["exclude"] = tuple(fields["exclude"] or ())
        return cls(**fields)


MAX_VOCAB_SIZE = 2**24
"""Largest accepted vocabulary (16,777,216; the largest in use are about 256k): a config.json
with ``vocab_size`` 1e11 made the model try to allocate terabytes (issue 16)."""

MAX_PARAMETERS = 2**40
"""Largest accepted model (about 1.1e12 parameters), a bound checked before anything is
allocated; ``ModelConfig.check_memory`` compares the size with this machine's memory."""


def _ffn_parameters(ffn: DenseConfig | MoEConfig | None, d_model: int) -> int:
    """About the weights of one FFN (SwiGLU's three matrices; a lower bound otherwise)."""
    if ffn is None:
        return 0
    if isinstance(ffn, DenseConfig):
        return 3 * d_model * ffn.d_ff
    total = ffn.num_experts * 3 * ffn.d_sub * ffn.d_expert + ffn.num_experts * ffn.d_sub
    total += d_model * d_model * (int(ffn.has_head) + int(ffn.has_merge))
    return total + (3 * d_model * ffn.shared_d_ff if ffn.shared_d_ff else 0)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a ``TransformerLM``.

    ``dense_ffn`` fills the FFN slot of the blocks without MoE (and of every block when
    ``moe_ffn`` is None, the Dense baseline); ``moe_ffn`` fills every ``moe_every``-th block.
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_attention_heads: int
    max_seq_len: int
    dense_ffn: DenseConfig
    moe_ffn: MoEConfig | None = None
    moe_every: int = 2
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 0.0
    bitnet: BitNetConfig | None = None
    # DeepSeek-V3's sequence-wise balance loss weight alpha (about 1e-4 there); 0: off.
    seq_aux_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_attention_heads",
                     "max_seq_len", "moe_every"):
            checks.positive_int(name, getattr(self, name))
        if self.d_model % self.num_attention_heads != 0:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if (self.d_model // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"attention head size d_model/num_attention_heads="
                f"{self.d_model // self.num_attention_heads}: must be even for rotary embeddings"
            )
        if self.vocab_size > MAX_VOCAB_SIZE:
            raise ValueError(f"vocab_size={self.vocab_size}: must be at most {MAX_VOCAB_SIZE:,}")
        if not isinstance(self.dense_ffn, DenseConfig):
            raise ValueError(f"dense_ffn={self.dense_ffn!r}: must be a DenseConfig")
        if self.moe_ffn is not None and not isinstance(self.moe_ffn, MoEConfig):
            raise ValueError(f"moe_ffn={self.moe_ffn!r}: must be a MoEConfig or None")
        for name, ffn in (("dense_ffn", self.dense_ffn), ("moe_ffn", self.moe_ffn)):
            if ffn is not None and ffn.d_model != self.d_model:
                raise ValueError(
                    f"{name}.d_model={ffn.d_model} differs from the model's d_model={self.d_model}"
                )
        if self.moe_ffn is not None and self.moe_every > self.num_layers:
            raise ValueError(
                f"moe_every={self.moe_every} exceeds num_layers={self.num_layers}: "
                "the model would have no MoE layer"
            )
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"tie_embeddings={self.tie_embeddings!r}: must be true or false")
        checks.positive_number("rope_theta", self.rope_theta)
        checks.positive_number("norm_eps", self.norm_eps)
        checks.non_negative_number("load_balancing_weight", self.load_balancing_weight)
        checks.non_negative_number("z_loss_weight", self.z_loss_weight)
        checks.non_negative_number("seq_aux_loss_weight", self.seq_aux_loss_weight)
        if self.bitnet is not None and not isinstance(self.bitnet, BitNetConfig):
            raise ValueError(f"bitnet={self.bitnet!r}: must be a BitNetConfig or None")
        if self.approx_parameters() > MAX_PARAMETERS:
            raise ValueError(
                f"model config (vocab_size={self.vocab_size}, d_model={self.d_model}, "
                f"num_layers={self.num_layers}): about {self.approx_parameters():.3g} parameters, "
                f"more than the {MAX_PARAMETERS:.3g} accepted"
            )

    def approx_parameters(self) -> int:
        """About the parameter count (embeddings, attention, FFNs; norms left out), cheap
        enough to check sizes from a file before anything is allocated."""
        embeddings = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        blocks = sum(4 * self.d_model * self.d_model + _ffn_parameters(self.ffn_for_block(i), self.d_model)
                     for i in range(min(self.num_layers, 2 * self.moe_every)))
        # Blocks repeat with period moe_every: count two periods exactly, scale the rest.
        counted = min(self.num_layers, 2 * self.moe_every)
        return embeddings + blocks * self.num_layers // counted

    def check_memory(self, what: str) -> None:
        """ValueError naming ``what`` (e.g. a config.json) when the float32 weights alone would
        not fit in this machine's memory: refused before allocating, not a MemoryError."""
        needed = 4 * self.approx_parameters()
        memory = _physical_memory()
        if memory is not None and needed > memory:
            raise ValueError(
                f"{what}: a model of about {self.approx_parameters():,} parameters needs "
                f"{needed / 2**30:,.1f} GiB for its weights, more than this machine's "
                f"{memory / 2**30:,.1f} GiB of memory"
            )

    @property
    def head_size(self) -> int:
        return self.d_model // self.num_attention_heads

    def is_moe_block(self, index: int) -> bool:
        """Whether block ``index`` (0-based) holds the MoE layer: (index + 1) % moe_every == 0."""
        return self.moe_ffn is not None and (index + 1) % self.moe_every == 0

    def ffn_for_block(self, index: int) -> DenseConfig | MoEConfig:
        return self.moe_ffn if self.is_moe_block(index) else self.dense_ffn  # type: ignore[return-value]

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_block(i) for i in range(self.num_layers))

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["dense_ffn"] = ffn_config_to_dict(self.dense_ffn)
        data["moe_ffn"] = None if self.moe_ffn is None else ffn_config_to_dict(self.moe_ffn)
        data["bitnet"] = None if self.bitnet is None else self.bitnet.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        if not isinstance(data, dict):
            raise ValueError(f"model config {data!r}: must be a JSON object")
        fields = dict(data)
        if "dense_ffn" not in fields:
            raise ValueError("model config lacks 'dense_ffn'")
        checks.known_fields("model config", cls, fields)
        fields["dense_ffn"] = ffn_config_from_dict(fields["dense_ffn"])
        if fields.get("moe_ffn") is not None:
            fields["moe_ffn"] = ffn_config_from_dict(fields["moe_ffn"])
        if fields.get("bitnet") is not None:
            fields["bitnet"] = BitNetConfig.from_dict(fields["bitnet"])
        return cls(**fields)


