"""The language model: pieces (RMSNorm, RoPE, causal attention), block layout, auxiliary loss,
configs, variants and presets (parameter/FLOP counts against the parity planner)."""

from __future__ import annotations

import math

import pytest
import torch

from mhmoe import DenseConfig, MoEConfig
from mhmoe.config import ModelConfig
from mhmoe.data.batching import IGNORE_INDEX
from mhmoe.model import RMSNorm, RotaryEmbedding, TransformerLM, apply_rotary, lm_loss
from mhmoe.planning.counts import (
    active_multiply_adds,
    count_flops,
    count_model_flops,
    count_model_params,
    count_params,
    register_grouped_mm_flop_formula,
)
from mhmoe.planning.variants import (
    PAPER_VARIANTS,
    ablation_variants,
    apply_variant_flags,
    parse_variant,
    plan_variants,
    variant_label,
)
from mhmoe.training.presets import get_preset, model_config, preset_names


def small_config(**changes) -> ModelConfig:
    fields = dict(
        vocab_size=50,
        d_model=24,
        num_layers=4,
        num_attention_heads=2,
        max_seq_len=16,
        dense_ffn=DenseConfig(24, 40),
        moe_ffn=MoEConfig(24, num_experts=6, top_k=2, d_expert=16, num_heads=2),
    )
    fields.update(changes)
    return ModelConfig(**fields)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_rmsnorm_matches_formula_and_keeps_dtype():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    assert norm(x.to(torch.bfloat16)).dtype == torch.bfloat16
    # Scale invariance: RMSNorm(c x) == RMSNorm(x) for c > 0.
    torch.testing.assert_close(norm(7.0 * x), norm(x), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norm_and_depends_only_on_relative_position():
    torch.manual_seed(0)
    rotary = RotaryEmbedding(head_size=8, max_seq_len=32)
    cos, sin = rotary(32, torch.device("cpu"))
    q = torch.randn(8, dtype=torch.float64)
    k = torch.randn(8, dtype=torch.float64)

    def at(vector, position):
        x = vector.expand(1, 1, 32, 8).clone()
        return apply_rotary(x, cos.double(), sin.double())[0, 0, position]

    torch.testing.assert_close(at(q, 5).norm(), q.norm())
    # <R_m q, R_n k> depends on m - n only.
    score_a = at(q, 7) @ at(k, 3)
    score_b = at(q, 20) @ at(k, 16)
    torch.testing.assert_close(score_a, score_b)
    # Position 0 is the identity.
    torch.testing.assert_close(at(q, 0), q)


def test_rope_rejects_sequences_beyond_max_seq_len():
    model = TransformerLM(small_config())
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_causal_no_future_leakage():
    torch.manual_seed(0)
    model = TransformerLM(small_config()).eval()
    ids = torch.randint(0, 50, (2, 12))
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 17) % 50
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    # Not bit-exact: an expert's matmul over a different number of rows (the later tokens route
    # elsewhere) may round the earlier rows' sums differently in the last bit (measured: up to
    # 2.4e-7 here, with every dispatch backend). A leak of the future moves logits by ~1e-2.
    torch.testing.assert_close(a[:, :8], b[:, :8], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 8:], b[:, 8:], atol=1e-3)


def test_moe_in_every_second_block_and_aux_loss():
    torch.manual_seed(0)
    config = small_config(load_balancing_weight=0.01, z_loss_weight=0.001)
    model = TransformerLM(config)
    kinds = [type(block.ffn).__name__ for block in model.blocks]
    assert kinds == ["FeedForward", "MHMoE", "FeedForward", "MHMoE"]
    out = model(torch.randint(0, 50, (2, 10)))
    assert out.logits.shape == (2, 10, 50)
    assert len(out.moe_aux) == 2
    lb = sum(a.load_balancing_loss for a in out.moe_aux) / 2
    z = sum(a.z_loss for a in out.moe_aux) / 2
    torch.testing.assert_close(out.aux_loss, 0.01 * lb + 0.001 * z)
    # The aux loss is differentiable with respect to the routers.
    out.aux_loss.backward()
    assert model.blocks[1].ffn.router.weight.grad is not None


def test_dense_model_has_zero_aux_loss_and_moe_every_three():
    dense = TransformerLM(small_config(moe_ffn=None))
    out = dense(torch.randint(0, 50, (1, 6)))
    assert out.moe_aux == [] and float(out.aux_loss) == 0.0
    config = small_config(num_layers=6, moe_every=3)
    assert [config.is_moe_block(i) for i in range(6)] == [False, False, True, False, False, True]


def test_tied_embeddings_share_the_matrix():
    model = TransformerLM(small_config(tie_embeddings=True))
    assert model.lm_head is None
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names
    assert model.num_parameters() == count_model_params(model.config)["total"]


def _reference_lm_loss(logits_BTV: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """Mean over the non-ignored positions of ``logsumexp(row) - row[target]``, written out
    position by position in float64 (independent of ``F.cross_entropy``)."""
    logits = logits_BTV.detach().to(torch.float64).reshape(-1, logits_BTV.shape[-1])
    targets = targets_BT.reshape(-1).tolist()
    terms = [torch.logsumexp(row, dim=0) - row[t] for row, t in zip(logits, targets) if t != IGNORE_INDEX]
    return torch.stack(terms).mean()


def test_lm_loss_is_mean_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7) * 3.0
    targets = torch.randint(0, 7, (2, 3))
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    # Float32 log-softmax over 7 logits of size ~10: a few ulps of ~10, so 1e-5 absolute is ample.
    torch.testing.assert_close(loss.double(), _reference_lm_loss(logits, targets), rtol=1e-6, atol=1e-5)
    # A hand-checkable case: uniform logits give log(V) whatever the targets.
    torch.testing.assert_close(lm_loss(torch.zeros(1, 4, 7), torch.tensor([[0, 3, 6, 2]])), torch.tensor(math.log(7.0)))


def test_lm_loss_ignores_padded_targets_and_averages_over_the_rest():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11) * 3.0
    targets = torch.randint(0, 11, (2, 5))
    targets[0, 3:] = IGNORE_INDEX  # padding at the end of a window, as eval_batches makes it
    targets[1, 4] = IGNORE_INDEX
    loss = lm_loss(logits, targets)
    reference = _reference_lm_loss(logits, targets)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-5)
    # The mean is over the 7 real targets, not the 10 positions: the ignored ones neither add
    # loss nor count in the denominator, so their logits do not matter either.
    kept = targets != IGNORE_INDEX
    assert int(kept.sum()) == 7
    scrambled = logits.clone()
    scrambled[~kept] = torch.randn(int((~kept).sum()), 11) * 50.0
    torch.testing.assert_close(lm_loss(scrambled, targets), loss)
    all_positions = _reference_lm_loss(logits, torch.where(kept, targets, 0))
    assert not torch.isclose(reference, all_positions)


def test_lm_loss_upcasts_low_precision_logits_to_float32():
    torch.manual_seed(2)
    logits = (torch.randn(2, 4, 9) * 3.0).to(torch.bfloat16)
    targets = torch.randint(0, 9, (2, 4))
    loss = lm_loss(logits, targets)
    assert loss.dtype == torch.float32
    # The bf16 values are exact in float32/float64, so only float32 rounding separates the two.
    torch.testing.assert_close(loss.double(), _reference_lm_loss(logits, targets), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(vocab_size=0), "vocab_size=0"),
        (dict(num_attention_heads=5), "not divisible by num_attention_heads=5"),
        (dict(moe_every=0), "moe_every=0"),
        (dict(moe_every=5), "moe_every=5 exceeds num_layers=4"),
        (dict(load_balancing_weight=-1.0), "load_balancing_weight=-1.0"),
        (dict(dense_ffn=DenseConfig(16, 40)), "dense_ffn.d_model=16"),
        (dict(num_attention_heads=8), "must be even for rotary"),
    ],
)
def test_model_config_validation_names_value_and_rule(changes, message):
    with pytest.raises(ValueError, match=message):
        small_config(**changes)


def test_model_config_json_round_trip():
    config = small_config(tie_embeddings=True, z_loss_weight=0.1)
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown fields"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})


# ---------------------------------------------------------------------------------------------
# Counts against built modules, FlopCounterMode and the planner
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["dense", "smoe", "mhmoe_h3", "mhmoe_h2.no_head.shared", "smoe.head_merge"])
def test_analytic_flops_match_flop_counter(variant):
    from torch.utils.flop_counter import FlopCounterMode

    register_grouped_mm_flop_formula()
    config = model_config("tiny", variant)
    model = TransformerLM(config).eval()
    seq_len = config.max_seq_len
    ids = torch.randint(0, config.vocab_size, (2, seq_len))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(ids)
    flops = count_model_flops(config, seq_len)
    # torch has no FLOP formula for the fused CPU attention kernel, so the counter sees every
    # matmul except QK^T and AV; those are checked against the textbook 4 T d per layer.
    # torch may lower the top-1 combine (a bmm with inner size 1) to an elementwise product, so
    # the combine FLOPs are the only allowed difference.
    combine = sum(count_flops(config.ffn_for_block(i)).combine for i in range(config.num_layers))
    expected = (flops["total"] - flops["attention_scores"]) * ids.numel()
    assert expected - combine * ids.numel() <= counter.get_total_flops() <= expected
    assert flops["attention_scores"] == config.num_layers * 4 * seq_len * config.d_model


@pytest.mark.parametrize("preset_name", ["tiny", "demo", "mini", "paper"])
def test_every_preset_builds_with_planner_sizes(preset_name):
    preset = get_preset(preset_name)
    planned = {v.name: v for v in plan_variants(preset.smoe(), preset.round_experts)}
    for variant in PAPER_VARIANTS:
        config = model_config(preset, variant)
        with torch.device("meta"):
            model = TransformerLM(config)
        counts = count_model_params(config)
        assert model.num_parameters() == counts["total"]
        assert config.dense_ffn == planned["dense"].config
        moe_blocks = [b.ffn for b in model.blocks if b.is_moe]
        if variant == "dense":
            assert config.moe_ffn is None and not moe_blocks
            continue
        assert len(moe_blocks) == preset.num_layers // 2
        assert config.moe_ffn == planned[variant].config
        # Parameters of each MoE slot as the planner counts them.
        assert sum(p.numel() for p in moe_blocks[0].parameters()) == count_params(config.moe_ffn).total
        # Equal active FLOPs for every MoE variant (the paper's parity).
        assert count_flops(config.moe_ffn).layer == count_flops(planned["smoe"].config).layer


def test_paper_preset_is_section_3():
    preset = get_preset("paper")
    assert (preset.num_layers, preset.d_model, preset.num_attention_heads, preset.seq_len) == (12, 768, 12, 2048)
    assert preset.batch_size * preset.seq_len == 524_288  # 0.5M tokens per batch
    assert preset.tokens // preset.tokens_per_step == 100_000
    expected = {
        "smoe": (8, 1, 2048, 768),
        "fine_grained": (16, 2, 1024, 768),
        "mhmoe_h2": (40, 2, 768, 384),
        "mhmoe_h3": (96, 3, 512, 256),
    }
    for variant, (experts, top_k, d_ff, d_in) in expected.items():
        moe = model_config(preset, variant).moe_ffn
        assert (moe.num_experts, moe.top_k, moe.d_expert, moe.d_sub) == (experts, top_k, d_ff, d_in)
        assert active_multiply_adds(moe) == 4_718_592  # per MoE layer per token, Section 3
    shared = model_config(preset, "mhmoe_h3.shared").moe_ffn
    assert shared.shared_d_ff == 2048


def test_mini_preset_is_quarter_width():
    expected = {
        "smoe": (8, 1, 512),
        "fine_grained": (16, 2, 256),
        "mhmoe_h2": (40, 2, 192),
        "mhmoe_h3": (96, 3, 128),
    }
    for variant, (experts, top_k, d_ff) in expected.items():
        moe = model_config("mini", variant).moe_ffn
        assert moe.d_model == 192
        assert (moe.num_experts, moe.top_k, moe.d_expert) == (experts, top_k, d_ff)


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------


def test_variant_names_parse_and_canonicalise():
    assert parse_variant("mhmoe_h2.shared.no_merge").name == "mhmoe_h2.no_merge.shared"
    spec = parse_variant("smoe.head_merge")
    assert spec.has_head and spec.has_merge and spec.num_heads == 1
    assert parse_variant("mhmoe_h4").num_heads == 4
    assert variant_label("mhmoe_h2.no_head") == "MH-MoE h=2 (merge only)"
    assert variant_label("fine_grained.head_merge.shared") == "Fine-grained SMoE (+ head & merge, shared expert)"
    assert len(set(ablation_variants())) == 8


@pytest.mark.parametrize(
    "name, message",
    [
        ("moe", "unknown variant 'moe'"),
        ("mhmoe_h1", "N >= 2"),
        ("dense.shared", "needs an MoE variant"),
        ("smoe.no_head", "unknown suffix 'no_head'"),
        ("mhmoe_h2.head_merge", "unknown suffix 'head_merge'"),
        ("smoe.shared.shared", "given twice"),
    ],
)
def test_bad_variant_names(name, message):
    with pytest.raises(ValueError, match=message):
        parse_variant(name)


def test_variant_flags():
    assert apply_variant_flags("mhmoe_h2", no_head_layer=True).name == "mhmoe_h2.no_head"
    assert apply_variant_flags("mhmoe_h2", no_head_layer=True, no_merge_layer=True).name == "mhmoe_h2.no_head_merge"
    assert apply_variant_flags("fine_grained", head_merge=True, shared_expert=True).name == "fine_grained.head_merge.shared"
    with pytest.raises(ValueError, match="--head-merge"):
        apply_variant_flags("mhmoe_h3", head_merge=True)
    with pytest.raises(ValueError, match="--no-head-layer"):
        apply_variant_flags("smoe", no_head_layer=True)
    with pytest.raises(ValueError, match="--shared-expert"):
        apply_variant_flags("dense", shared_expert=True)


def test_ablation_keeps_the_base_experts():
    base = model_config("tiny", "mhmoe_h2").moe_ffn
    ablated = model_config("tiny", "mhmoe_h2.no_head_merge").moe_ffn
    assert (ablated.num_experts, ablated.d_expert, ablated.top_k) == (base.num_experts, base.d_expert, base.top_k)
    assert not ablated.has_head and not ablated.has_merge
    with_layers = model_config("tiny", "smoe.head_merge").moe_ffn
    assert with_layers.has_head and with_layers.has_merge and with_layers.num_heads == 1


def test_unknown_preset_and_indivisible_heads():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")
    with pytest.raises(ValueError, match="not divisible by h=5"):
        model_config("tiny", "mhmoe_h5")
    assert set(preset_names()) >= {"paper", "mini", "demo", "tiny"}
    assert math.isclose(get_preset("paper").warmup_steps, 375)
