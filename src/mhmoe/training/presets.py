"""Named experiment scales and the compared model variants.

A ``Preset`` fixes the Transformer's shape (depth, width, attention heads, sequence length,
vocabulary), the SMoE baseline of the paper (8 experts x (8/3) d_model, top-1; Section 3) and
the training defaults (batch, token budget, learning-rate schedule). The expert sizes of every
other variant come from the parity planner (``mhmoe.planning.variants.plan_variants``), never typed here.

Presets (paper Section 3 and three smaller scales of the same shape):

* ``paper``: exactly Section 3: 12 layers, d_model 768, 12 heads, sequence 2048, 256 x 2048 =
  0.5M tokens per batch, 100k steps (52.4B tokens). Built on the meta device in the tests.
* ``mini``: the paper's shape at 1/4 width: d_model 192 (SMoE 8 x 512 top-1, fine-grained
  16 x 256 top-2, MH-MoE h=2 40 x 192 top-2, h=3 96 x 128 top-3), 4 layers, 3 attention heads of
  64, sequence 256, batch 8, vocabulary 4096, 1.536M tokens (750 steps): measured at about
  2,100 tokens/s per variant on a busy 2-core CPU, so the five variants take about an hour.
* ``demo``: d_model 96 (8 x 256 top-1 ... h=3 96 x 64 top-3), 4 layers, sequence 128, batch 4,
  vocabulary 1024, 204,800 tokens (400 steps) on the first 3 MB of the embedded ``stdlib``
  text: the five variants, tokenizer included, in about 3 minutes on a busy 2-core CPU
  (the README's first command). Small batches: at this budget more updates beat larger batches.
* ``tiny``: seconds; for tests.

Variant names (``dense``, ``smoe``, ``fine_grained``, ``mhmoe_h<N>`` and their suffixes):
``mhmoe.planning.variants``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
from mhmoe.planning.counts import count_model_flops, count_model_params
from mhmoe.planning.variants import Variant, VariantSpec, paper_smoe, parse_variant, plan_variants


@dataclass(frozen=True)
class Preset:
    """One experiment scale: model shape, SMoE baseline and training defaults.

    ``batch_size`` sequences of ``seq_len`` tokens form one optimiser step (processed
    ``micro_batch_size`` at a time, gradients accumulated); ``tokens`` is the default budget
    (``--tokens`` overrides it), so steps = tokens // (batch_size * seq_len).
    ``warmup_steps`` is the authors' 375 for ``paper`` and smaller for the small presets; a run
    uses at most 10% of its steps for warmup (``mhmoe.training.run.train_config_for``).
    """

    name: str
    description: str
    # model
    d_model: int
    num_layers: int
    num_attention_heads: int
    seq_len: int
    vocab_size: int
    moe_every: int = 2
    tie_embeddings: bool = False
    smoe_num_experts: int = 8
    smoe_top_k: int = 1
    round_experts: int = 8
    # training
    batch_size: int = 8
    micro_batch_size: int = 8
    tokens: int = 1_000_000
    lr: float = 1e-3
    warmup_steps: int = 10
    eval_tokens: int = 65_536
    final_eval_tokens: int | None = None  # the final evaluation's tokens per set (None: eval_tokens)
    eval_batch_size: int = 8
    # data
    train_text_bytes: int | None = None
    eval_text_bytes: int | None = None
    tokenizer_text_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "num_layers", "num_attention_heads", "seq_len", "vocab_size",
                     "moe_every", "smoe_num_experts", "smoe_top_k", "round_experts",
                     "batch_size", "micro_batch_size", "tokens", "eval_tokens",
                     "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"preset {self.name}: {name}={value!r}: must be a positive integer")
        if self.batch_size % self.micro_batch_size != 0:
            raise ValueError(
                f"preset {self.name}: batch_size={self.batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}"
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes: Any) -> "Preset":
        return dataclasses.replace(self, **changes)

    def smoe(self, shared_expert: bool = False) -> MoEConfig:
        """The paper's SMoE baseline at this width (8 x (8/3)d top-1 SwiGLU experts)."""
        return paper_smoe(
            self.d_model,
            num_experts=self.smoe_num_experts,
            top_k=self.smoe_top_k,
            shared_expert=shared_expert,
        )

    def planned_variants(self, heads: tuple[int, ...] = (2, 3), shared_expert: bool = False) -> dict[str, Variant]:
        """The planner's variants (dense, smoe, fine_grained, mhmoe_h<N> for N in heads)."""
        plans = plan_variants(
            self.smoe(shared_expert), self.round_experts, heads=tuple(sorted(set(heads)))
        )
        return {v.name: v for v in plans}


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        description="the paper's Section 3: 12 layers, d_model 768, seq 2048, 0.5M tokens/batch, 100k steps",
        d_model=768,
        num_layers=12,
        num_attention_heads=12,
        seq_len=2048,
        vocab_size=32_000,
        batch_size=256,
        micro_batch_size=8,
        tokens=100_000 * 256 * 2048,
        lr=6e-4,
        warmup_steps=375,
        eval_tokens=4_194_304,
        eval_batch_size=8,
    ),
    "mini": Preset(
        name="mini",
        description="the paper's shape at 1/4 width (d_model 192); five variants in about an hour on 2 CPU cores",
        d_model=192,
        num_layers=4,
        num_attention_heads=3,
        seq_len=256,
        vocab_size=4096,
        batch_size=8,
        micro_batch_size=8,
        tokens=1_536_000,
        lr=2e-3,
        warmup_steps=40,
        eval_tokens=32_768,
        final_eval_tokens=262_144,
        eval_batch_size=16,
        train_text_bytes=20_000_000,
        tokenizer_text_bytes=4_000_000,
    ),
    "demo": Preset(
        name="demo",
        description="five variants at d_model 96 in a few minutes on 2 CPU cores (no download)",
        d_model=96,
        num_layers=4,
        num_attention_heads=2,
        seq_len=128,
        vocab_size=1024,
        batch_size=4,
        micro_batch_size=4,
        tokens=204_800,
        lr=3e-3,
        warmup_steps=20,
        eval_tokens=16_384,
        eval_batch_size=32,
        train_text_bytes=3_000_000,
        tokenizer_text_bytes=1_000_000,
    ),
    "tiny": Preset(
        name="tiny",
        description="seconds, for tests",
        d_model=48,
        num_layers=2,
        num_attention_heads=2,
        seq_len=32,
        vocab_size=384,
        batch_size=4,
        micro_batch_size=2,
        tokens=4 * 32 * 12,
        lr=3e-3,
        warmup_steps=2,
        eval_tokens=1024,
        eval_batch_size=8,
        train_text_bytes=1_000_000,
        tokenizer_text_bytes=200_000,
    ),
}


def preset_names() -> tuple[str, ...]:
    return tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError naming the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: must be one of {', '.join(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def ffn_configs(preset: Preset, spec: VariantSpec | str) -> tuple[DenseConfig, MoEConfig | None, Variant]:
    """(dense FFN of the non-MoE blocks, MoE FFN or None, the planner's Variant) of a variant.

    The planner (``plan_variants`` on the preset's SMoE) gives every size: the dense d_ff
    (k * d_moe, the SMoE's active expert width) fills the dense baseline's blocks and the
    non-MoE blocks of every MoE model; the MoE config is the planned variant with the spec's
    head/merge overrides.
    """
    if isinstance(spec, str):
        spec = parse_variant(spec)
    heads = (2, 3) if spec.num_heads == 1 else tuple(sorted({2, 3, spec.num_heads}))
    if spec.num_heads > 1 and preset.d_model % spec.num_heads != 0:
        raise ValueError(
            f"variant {spec.name!r}: d_model={preset.d_model} of preset {preset.name!r} is not "
            f"divisible by h={spec.num_heads}"
        )
    planned = preset.planned_variants(heads=heads, shared_expert=spec.shared_expert)
    dense_ffn = planned["dense"].config
    assert isinstance(dense_ffn, DenseConfig)
    variant = planned[spec.base]
    if spec.is_dense:
        return dense_ffn, None, variant
    moe = variant.config
    assert isinstance(moe, MoEConfig)
    if spec.head_layer is not None or spec.merge_layer is not None:
        moe = moe.replace(head_layer=spec.has_head, merge_layer=spec.has_merge)
    return dense_ffn, moe, variant


def model_config(
    preset: Preset | str,
    variant: VariantSpec | str,
    vocab_size: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """The ``ModelConfig`` of a variant at a preset's scale; ``vocab_size`` defaults to the
    preset's (pass the trained tokenizer's); ``overrides`` go to ``ModelConfig``."""
    if isinstance(preset, str):
        preset = get_preset(preset)
    dense_ffn, moe_ffn, _ = ffn_configs(preset, variant)
    fields: dict[str, Any] = dict(
        vocab_size=preset.vocab_size if vocab_size is None else vocab_size,
        d_model=preset.d_model,
        num_layers=preset.num_layers,
        num_attention_heads=preset.num_attention_heads,
        max_seq_len=preset.seq_len,
        dense_ffn=dense_ffn,
        moe_ffn=moe_ffn,
        moe_every=preset.moe_every,
        tie_embeddings=preset.tie_embeddings,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def variant_summary(config: ModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Analytic counts of a model config for result tables (planner-derived FFN counts)."""
    params = count_model_params(config)
    flops = count_model_flops(config, seq_len)
    moe = config.moe_ffn
    return {
        "params": params["total"],
        "active_params": params["active"],
        "flops_per_token": flops["total"],
        "moe_layer_active_flops_per_token": (
            flops["moe_layers_active"] // config.num_moe_layers if config.num_moe_layers else 0
        ),
        "num_moe_layers": config.num_moe_layers,
        "experts": None if moe is None else {
            "num_experts": moe.num_experts,
            "top_k": moe.top_k,
            "d_expert": moe.d_expert,
            "expert_input": moe.d_sub,
            "num_heads": moe.num_heads,
            "head_layer": moe.has_head,
            "merge_layer": moe.has_merge,
            "shared_d_ff": moe.shared_d_ff,
        },
        "dense_d_ff": config.dense_ffn.d_ff,
    }
