"""mhmoe.parity: the paper's arithmetic, the planner, the CLI, and proofs against real modules.

"Proof, not trust": analytic parameter counts are compared with ``sum(p.numel())`` of the
built module, analytic FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward pass.
"""

from __future__ import annotations

import json
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mhmoe import DenseConfig, FeedForward, MHMoE, MoE, MoEConfig, build_ffn
from mhmoe.cli import main
from mhmoe.layers.moe import SMALL_BATCH_MAX_ASSIGNMENTS
from mhmoe.planning import counts, variants
from mhmoe.planning.counts import active_multiply_adds, count_flops, count_params
from mhmoe.planning.planner import flops_parity_d_expert, params_parity_num_experts, plan_mhmoe
from mhmoe.training.presets import get_preset

D = 768  # the paper's d_model (Section 3)


def relu_moe(d, num_experts, top_k, d_expert, num_heads=1, **kwargs) -> MoEConfig:
    return MoEConfig(
        d_model=d,
        num_experts=num_experts,
        top_k=top_k,
        d_expert=d_expert,
        num_heads=num_heads,
        activation="relu",
        **kwargs,
    )


# ---------------------------------------------------------------------------------------------
# The paper's arithmetic (Section 2.2, "scalar multiplications")
# ---------------------------------------------------------------------------------------------


def test_projection_cost_is_2Bd2_minus_Bd():
    B, d = 7, 96
    assert counts.matmul_cost(B, d, d, "paper") == 2 * B * d**2 - B * d
    assert counts.matmul_cost(B, d, d, "flops") == 2 * B * d**2


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 6),
    d_sub=st.integers(1, 40),
    d_moe=st.integers(1, 300),
    k=st.integers(1, 4),
    extra_experts=st.integers(0, 5),
    B=st.integers(1, 50),
)
def test_eq6_whole_layer(h, d_sub, d_moe, k, extra_experts, B):
    """Eq. 6: (2Bd^2 - Bd) + (4 B d d_moe - B d - B d_moe h) k + (2Bd^2 - Bd)."""
    d = h * d_sub
    cfg = relu_moe(d, k + extra_experts, k, d_moe, h, head_layer=True, merge_layer=True)
    eq6 = (2 * B * d**2 - B * d) + (4 * B * d * d_moe - B * d - B * d_moe * h) * k + (
        2 * B * d**2 - B * d
    )
    cost = count_flops(cfg, B, convention="paper")
    assert cost.layer == eq6
    # The expert term alone, exactly as the paper writes it.
    assert cost.experts == (4 * B * d * d_moe - B * d - B * d_moe * h) * k
    # The router and the combine are not part of Eq. 6.
    assert cost.total == eq6 + cost.router + cost.combine


@pytest.mark.parametrize("d", [12, 64, 768])
@pytest.mark.parametrize("B", [1, 3, 512])
def test_smoe_top1_relu_4d_is_16Bd2_minus_5Bd(d, B):
    smoe = relu_moe(d, 8, 1, 4 * d)
    assert count_flops(smoe, B, convention="paper").layer == 16 * B * d**2 - 5 * B * d


@pytest.mark.parametrize("d", [64, 128, 768])
def test_original_mhmoe_leading_term_67Bd2(d):
    """Original MH-MoE (2404.15045): h = 4, d_moe = 4 beta h d, beta = 63/64 (= 15.75 d).

    Each of the h sub-tokens is routed top-1 (k = 1): head + merge give 4Bd^2, the experts
    4 B d d_moe k = 63 Bd^2, together 67 Bd^2; with the lower-order terms
    (-2Bd for head/merge, -(Bd + B d_moe h) k = -64Bd for the experts): 67Bd^2 - 66Bd,
    about 4x the 16Bd^2 of the SMoE.
    """
    h, B = 4, 5
    d_moe = Fraction(4 * 63, 64) * h * d
    assert d_moe.denominator == 1 and d_moe == Fraction(63, 4) * d
    cfg = relu_moe(d, 16, 1, int(d_moe), h, head_layer=True, merge_layer=True)
    cost = count_flops(cfg, B, convention="paper").layer
    assert cost == 67 * B * d**2 - 66 * B * d
    # ... while the parameters match the SMoE's (Eq. 9 with E = 16, router aside):
    # 16 * 2 (d/4) (63d/4) + 2d^2 = 128 d^2 = 16 * 2 d (4d).
    smoe = relu_moe(d, 16, 1, 4 * d)
    assert count_params(cfg).experts + count_params(cfg).head_merge == count_params(smoe).experts


def test_new_implementation_h2_3d_keeps_16Bd2():
    """Section 2.2: h = 2, d_moe = 3d, top-1: 4Bd^2 + 12Bd^2 = 16Bd^2 leading term."""
    d, B = 96, 3
    cfg = relu_moe(d, 8, 1, 3 * d, 2)
    assert count_flops(cfg, B, convention="paper").layer == 16 * B * d**2 - 9 * B * d


# ---------------------------------------------------------------------------------------------
# Parity rules (Section 2.3)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h", [2, 3, 4])
def test_eq8_relu_flops_parity_d_moe_4d_top1_gives_3d(h):
    d = 768
    smoe = relu_moe(d, 8, 1, 4 * d)
    assert flops_parity_d_expert(smoe, h, 1) == 3 * d


@pytest.mark.parametrize("k", [1, 2, 4])
def test_eq8_general_form_d_moe_minus_d_over_k(k):
    d, d_moe = 768, 3072
    smoe = relu_moe(d, 8, k, d_moe)
    assert flops_parity_d_expert(smoe, 2, k) == d_moe - Fraction(d, k)


def test_swiglu_flops_parity():
    """h k' 3 (d/h) d_mhmoe + 2 d^2 = k 3 d d_moe  =>  d_mhmoe = (k d_moe - 2d/3) / k'."""
    smoe = MoEConfig(d_model=D, num_experts=8, top_k=1, d_expert=2048)
    assert flops_parity_d_expert(smoe, 2, 2) == 768
    assert flops_parity_d_expert(smoe, 3, 3) == 512
    assert flops_parity_d_expert(smoe, 1, 2) == 1024  # fine-grained: k d_moe / k'
    assert flops_parity_d_expert(smoe, 2, 1) == Fraction(2048 - 512)


@pytest.mark.parametrize("num_experts", [1, 2, 8, 16, 64])
def test_eq9_eq10_example_4E_minus_1(num_experts):
    """d_moe = 4d, k = 1, h = 3: d_mhmoe = 3d and E_mhmoe = 4 E_moe - 1."""
    d = 768
    smoe = relu_moe(d, num_experts, 1, 4 * d)
    assert flops_parity_d_expert(smoe, 3, 1) == 3 * d
    exact = params_parity_num_experts(smoe, 3, 3 * d, include_router=False)
    assert exact == 4 * num_experts - 1
    plan = plan_mhmoe(smoe, 3, top_k=1)
    assert (plan.config.d_expert, plan.config.num_experts) == (3 * d, 4 * num_experts - 1)
    assert plan.flops_deviation_pct == 0


# ---------------------------------------------------------------------------------------------
# The paper's models (Section 3) from the planner
# ---------------------------------------------------------------------------------------------


def test_paper_variants_match_the_paper_table():
    v = variants.paper_variants()
    assert list(v) == list(variants.PAPER_VARIANTS)
    assert v["dense"] == DenseConfig(d_model=D, d_ff=2048)
    rows = {
        name: (c.num_experts, c.top_k, c.d_expert, c.d_sub, c.has_head and c.has_merge)
        for name, c in v.items()
        if name != "dense"
    }
    assert rows == {
        "smoe": (8, 1, 2048, 768, False),
        "fine_grained": (16, 2, 1024, 768, False),
        "mhmoe_h2": (40, 2, 768, 384, True),
        "mhmoe_h3": (96, 3, 512, 256, True),
    }


def test_paper_active_multiply_adds_4718592():
    """Active expert multiply-adds per token identical: 4,718,592 (head+merge included)."""
    for name, cfg in variants.paper_variants().items():
        assert active_multiply_adds(cfg) == 4_718_592, name
        assert count_flops(cfg).layer == 2 * 4_718_592, name


def test_paper_expert_params():
    """SMoE and fine-grained 37.75M; h=2 35.39M + 1.18M head/merge; h=3 37.75M + 1.18M."""
    v = variants.paper_variants()
    p = {name: count_params(cfg) for name, cfg in v.items()}
    assert p["smoe"].experts == p["fine_grained"].experts == 37_748_736
    assert p["mhmoe_h2"].experts == 35_389_440
    assert p["mhmoe_h3"].experts == 37_748_736
    assert p["mhmoe_h2"].head_merge == p["mhmoe_h3"].head_merge == 1_179_648
    assert round(p["smoe"].experts / 1e6, 2) == 37.75
    assert round(p["mhmoe_h2"].experts / 1e6, 2) == 35.39
    assert round(p["mhmoe_h2"].head_merge / 1e6, 2) == 1.18


def test_planner_exact_d_expert_and_rounding_of_experts():
    smoe = variants.paper_smoe()
    h2 = plan_mhmoe(smoe, 2, round_experts=8)
    assert h2.d_expert_is_exact and h2.d_expert_exact == 768
    assert h2.config.num_experts == 40
    assert 41 < h2.num_experts_exact < 42
    assert plan_mhmoe(smoe, 2).config.num_experts == 41  # closest integer without rounding
    h3 = plan_mhmoe(smoe, 3, round_experts=8)
    assert (h3.config.d_expert, h3.config.num_experts) == (512, 96)
    assert plan_mhmoe(smoe, 3).config.num_experts == 93
    # Every deviation is reported in percent.
    assert h2.flops_deviation_pct == 0 and h3.flops_deviation_pct == 0
    assert h2.params_deviation_pct == pytest.approx(-3.10, abs=0.01)
    assert h3.params_deviation_pct == pytest.approx(3.17, abs=0.01)
    assert set(h2.deviations_pct) == {"flops", "router_flops", "total_flops", "params"}
    assert any("41.3" in note and "40" in note for note in h2.notes)
    assert "params" in h2.report()
    # MH-MoE copies the rest of the baseline and switches head and merge on.
    assert h2.config.has_head and h2.config.has_merge and h2.config.activation == "swiglu"


def test_planner_fine_grained():
    smoe = variants.paper_smoe()
    fine = plan_mhmoe(smoe, 1, top_k=2)
    assert (fine.config.num_experts, fine.config.top_k, fine.config.d_expert) == (16, 2, 1024)
    assert not fine.config.has_head and not fine.config.has_merge
    assert fine.flops_deviation_pct == 0


def test_planner_rounds_non_integral_d_expert_and_reports_it():
    smoe = MoEConfig(d_model=512, num_experts=16, top_k=2, d_expert=1408)
    plan = plan_mhmoe(smoe, 2)  # (2*1408 - 1024/3) / 4 = 618.67
    assert not plan.d_expert_is_exact
    assert plan.config.d_expert == 619
    # 4 * 3 * 512 * (619 - 618.67) extra multiply-adds on 2 * 3 * 512 * 1408.
    assert plan.flops_deviation_pct == pytest.approx(100 * (4 / 3) / (2 * 1408), rel=1e-9)
    assert any("618.6667" in note for note in plan.notes)
    assert plan_mhmoe(smoe, 2, round_d_expert=8).config.d_expert == 616


def test_planner_keeps_shared_expert_and_bias():
    smoe = variants.paper_smoe(192, shared_expert=True, bias=True)
    assert smoe.shared_d_ff == 512
    plan = plan_mhmoe(smoe, 2, round_experts=8)
    assert plan.config.shared_d_ff == 512 and plan.config.bias
    assert plan.flops_deviation_pct == 0  # the shared expert is the same on both sides


def test_mini_variants():
    v = variants.variants_from_smoe(get_preset("mini").smoe(), round_experts=8)
    assert v == {n: v.config for n, v in get_preset("mini").planned_variants().items()} == variants.paper_variants(192)
    got = {n: (c.num_experts, c.top_k, c.d_expert) for n, c in v.items() if n != "dense"}
    assert got == {
        "smoe": (8, 1, 512),
        "fine_grained": (16, 2, 256),
        "mhmoe_h2": (40, 2, 192),
        "mhmoe_h3": (96, 3, 128),
    }
    assert v["dense"].d_ff == 512
    assert len({active_multiply_adds(c) for c in v.values()}) == 1


@settings(max_examples=100, deadline=None)
@given(
    d_unit=st.integers(1, 16),
    h=st.integers(1, 4),
    E=st.integers(1, 16),
    k=st.integers(1, 2),
    d_moe=st.integers(8, 400),
    activation=st.sampled_from(["swiglu", "relu"]),
)
def test_planner_properties(d_unit, h, E, k, d_moe, activation):
    d = 12 * d_unit  # divisible by 1, 2, 3, 4
    smoe = MoEConfig(
        d_model=d, num_experts=max(E, k), top_k=k, d_expert=d_moe, activation=activation
    )
    try:
        plan = plan_mhmoe(smoe, h, round_experts=1)
    except ValueError as err:
        assert "d_expert=" in str(err)
        assert flops_parity_d_expert(smoe, h, h * k) < 1
        return
    cfg = plan.config
    assert cfg.top_k == h * k and cfg.num_heads == h and cfg.num_experts >= cfg.top_k
    if plan.d_expert_is_exact:
        assert count_flops(cfg).layer == count_flops(smoe).layer
    else:
        assert abs(cfg.d_expert - plan.d_expert_exact) <= Fraction(1, 2)
    # No other expert count (>= top_k) is closer in parameters.
    target = count_params(smoe).total
    best = abs(count_params(cfg).total - target)
    for e in (cfg.num_experts - 1, cfg.num_experts + 1):
        if e >= cfg.top_k:
            assert abs(count_params(cfg.replace(num_experts=e)).total - target) >= best


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_value_and_rule():
    smoe = variants.paper_smoe()
    with pytest.raises(ValueError, match=r"d_model=768 is not divisible by num_heads=5"):
        plan_mhmoe(smoe, 5)
    with pytest.raises(ValueError, match=r"num_heads=0: must be a positive integer"):
        plan_mhmoe(smoe, 0)
    with pytest.raises(ValueError, match=r"top_k=-1: must be a positive integer"):
        plan_mhmoe(smoe, 2, top_k=-1)
    with pytest.raises(ValueError, match=r"round_experts=0"):
        plan_mhmoe(smoe, 2, round_experts=0)
    small = MoEConfig(d_model=768, num_experts=8, top_k=1, d_expert=256)
    with pytest.raises(ValueError, match=r"d_expert=-128 .*must be at least 1"):
        plan_mhmoe(small, 2)
    with pytest.raises(ValueError, match=r"num_heads=2.*plain SMoE"):
        variants.variants_from_smoe(smoe.replace(num_heads=2))
    with pytest.raises(ValueError, match=r"d_model=100.*divisible by 3"):
        variants.paper_smoe(100)
    with pytest.raises(ValueError, match=r"preset 'huge': must be one of paper, mini"):
        get_preset("huge")
    with pytest.raises(ValueError, match=r"convention='macs'"):
        count_flops(smoe, convention="macs")
    with pytest.raises(ValueError, match=r"tokens=-1"):
        count_flops(smoe, -1)
    with pytest.raises(TypeError):
        count_params("smoe")


# ---------------------------------------------------------------------------------------------
# Proof, not trust: the built modules
# ---------------------------------------------------------------------------------------------

MODULE_CONFIGS = {
    "dense_swiglu": DenseConfig(d_model=48, d_ff=40),
    "dense_relu_bias": DenseConfig(d_model=48, d_ff=40, activation="relu", bias=True),
    "smoe": MoEConfig(d_model=48, num_experts=4, top_k=1, d_expert=32),
    "fine_grained": MoEConfig(d_model=48, num_experts=8, top_k=2, d_expert=16),
    "mhmoe_h2": MoEConfig(d_model=48, num_experts=8, top_k=2, d_expert=24, num_heads=2),
    "mhmoe_h3": MoEConfig(d_model=48, num_experts=12, top_k=3, d_expert=16, num_heads=3),
    "mhmoe_h4_relu": MoEConfig(
        d_model=48, num_experts=6, top_k=2, d_expert=20, num_heads=4, activation="relu"
    ),
    "head_only": MoEConfig(
        d_model=48, num_experts=8, top_k=2, d_expert=24, num_heads=2, merge_layer=False
    ),
    "merge_only": MoEConfig(
        d_model=48, num_experts=8, top_k=2, d_expert=24, num_heads=2, head_layer=False
    ),
    "h2_neither": MoEConfig(
        d_model=48, num_experts=8, top_k=2, d_expert=24, num_heads=2, head_layer=False,
        merge_layer=False,
    ),
    "smoe_with_head_merge": MoEConfig(
        d_model=48, num_experts=4, top_k=1, d_expert=32, head_layer=True, merge_layer=True
    ),
    "shared_bias_swiglu": MoEConfig(
        d_model=48, num_experts=8, top_k=2, d_expert=24, num_heads=2, shared_d_ff=32, bias=True
    ),
    "shared_bias_relu": MoEConfig(
        d_model=48, num_experts=4, top_k=1, d_expert=32, shared_d_ff=40, bias=True,
        activation="relu",
    ),
}


def _numel(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("name", sorted(MODULE_CONFIGS))
def test_param_count_equals_module_numel(name):
    cfg = MODULE_CONFIGS[name]
    module = build_ffn(cfg)
    counts = count_params(cfg)
    assert counts.total == _numel(module)
    if isinstance(cfg, MoEConfig):
        assert counts.head == _numel(module, "head.")
        assert counts.merge == _numel(module, "merge.")
        assert counts.router == _numel(module, "router.")
        assert counts.experts == _numel(module, "experts.")
        assert counts.shared == _numel(module, "shared.")


def test_param_count_of_direct_constructors():
    assert count_params(DenseConfig(48, 40)).total == _numel(FeedForward(48, 40))
    smoe = MoEConfig(d_model=48, num_experts=4, top_k=2, d_expert=16)
    assert count_params(smoe).total == _numel(MoE(48, 4, 2, 16))
    mh = MoEConfig(d_model=48, num_experts=6, top_k=2, d_expert=16, num_heads=3, bias=True)
    assert count_params(mh).total == _numel(MHMoE(48, 3, 6, 2, 16, bias=True))


@pytest.mark.parametrize("preset", ["paper", "mini"])
def test_param_count_of_preset_modules(preset):
    for name, cfg in {n: v.config for n, v in get_preset(preset).planned_variants().items()}.items():
        with torch.device("meta"):  # shapes only, no memory
            module = build_ffn(cfg)
        assert count_params(cfg).total == _numel(module), name


def _measure_flops(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict]:
    counts.register_grouped_mm_flop_formula()
    with torch.no_grad():
        module(x)  # warm-up outside the counter (capability probes, caches)
        counter = FlopCounterMode(display=False)
        with counter:
            module(x)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op


HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


FLOP_CASES = [
    (name, use_grouped_mm)
    for name in sorted(MODULE_CONFIGS)
    for use_grouped_mm in (True, False)
    # a dense FFN has no experts, so it has no segment-loop path to measure
    if use_grouped_mm or not isinstance(MODULE_CONFIGS[name], DenseConfig)
]


@pytest.mark.parametrize("name,use_grouped_mm", FLOP_CASES)
def test_flops_equal_flop_counter_mode(name, use_grouped_mm):
    cfg = MODULE_CONFIGS[name]
    if use_grouped_mm and not HAS_GROUPED_MM:
        pytest.skip("this torch has no torch._grouped_mm")
    torch.manual_seed(0)
    module = build_ffn(cfg)
    if isinstance(cfg, MoEConfig):
        # Force the path: the capability probe is cached per process.
        module.experts.use_grouped_mm = use_grouped_mm
    per_token = count_flops(cfg)
    # 10 tokens take the small-batch dispatch (at most SMALL_BATCH_MAX_ASSIGNMENTS assignments:
    # the chosen experts' gathered weights, batched matmuls); 200 tokens the sorted dispatch.
    for batch, length in ((2, 5), (4, 50)):
        tokens = batch * length
        measured, by_op = _measure_flops(module, torch.randn(batch, length, cfg.d_model))
        expected = count_flops(cfg, tokens=tokens)
        # Dropless routing: every (sub-)token meets exactly k experts, so the count is exact;
        # FlopCounterMode sees the router's matmul and the combine too, so compare the total.
        assert measured == expected.total == tokens * per_token.total, (tokens, by_op)
    if isinstance(cfg, MoEConfig):
        assert tokens * cfg.top_k * cfg.num_heads > SMALL_BATCH_MAX_ASSIGNMENTS
        assert by_op.get("aten._grouped_mm", 0) == (expected.experts if use_grouped_mm else 0)
        assert by_op.get("aten.bmm", 0) == expected.combine


def test_grouped_mm_flop_formula_registration():
    assert counts.register_grouped_mm_flop_formula()
    assert counts.register_grouped_mm_flop_formula()  # idempotent
    x = torch.randn(6, 8)
    w = torch.randn(3, 8, 4)
    offs = torch.tensor([2, 3, 6], dtype=torch.int32)
    counter = FlopCounterMode(display=False)
    with counter:
        torch._grouped_mm(x, w, offs=offs)
    assert counter.get_total_flops() == 2 * 6 * 8 * 4
    assert counts.grouped_mm_flops((3, 6, 8), (3, 8, 4)) == 2 * 3 * 6 * 8 * 4
    assert counts.grouped_mm_flops((6, 12), (12, 4)) == 2 * 6 * 12 * 4


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_paper_table(capsys):
    assert main(["parity", "--preset", "paper", "--round-experts", "8"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["mhmoe_h2"][1:5] == ["2", "40", "2", "768"]
    assert lines["mhmoe_h3"][1:5] == ["3", "96", "3", "512"]
    assert lines["fine_grained"][1:5] == ["1", "16", "2", "1024"]
    assert lines["smoe"][1:5] == ["1", "8", "1", "2048"]
    assert "dense" in lines
    assert out.count("9,437,184") == 5  # active FLOPs per token, identical for all five


def test_cli_json(capsys):
    data = _json(capsys, ["parity", "--preset", "paper", "--round-experts", "8", "--json"])
    rows = {r["name"]: r for r in data["variants"]}
    assert list(rows) == list(variants.PAPER_VARIANTS)
    for row in rows.values():
        for key in (
            "name", "num_heads", "num_experts", "top_k", "d_expert", "moe_layer_params",
            "moe_layer_flops_per_token", "router_flops_per_token",
        ):
            assert key in row
        assert row["moe_layer_flops_per_token"] == 9_437_184
    assert (rows["mhmoe_h2"]["num_experts"], rows["mhmoe_h3"]["num_experts"]) == (40, 96)
    assert rows["smoe"]["moe_layer_params"] == 37_748_736 + 8 * 768
    assert rows["smoe"]["router_flops_per_token"] == 2 * 768 * 8
    assert rows["mhmoe_h3"]["router_flops_per_token"] == 2 * 3 * 256 * 96
    assert rows["dense"]["num_experts"] is None and rows["dense"]["router_flops_per_token"] == 0


def test_cli_round_experts_1_and_mini(capsys):
    data = _json(capsys, ["parity", "--preset", "mini", "--round-experts", "1", "--json"])
    rows = {r["name"]: r for r in data["variants"]}
    assert (rows["mhmoe_h2"]["num_experts"], rows["mhmoe_h3"]["num_experts"]) == (41, 93)
    assert rows["mhmoe_h2"]["d_expert"] == 192 and rows["mhmoe_h2"]["d_expert_input"] == 96


def test_cli_default_is_paper_rounded_to_8(capsys):
    data = _json(capsys, ["parity", "--json"])
    rows = {r["name"]: r for r in data["variants"]}
    assert data["round_experts"] == 8 and rows["mhmoe_h3"]["num_experts"] == 96


def test_cli_free_form(capsys):
    argv = ["parity", "--d-model", "512", "--d-ff", "1408", "--experts", "16", "--top-k", "2"]
    data = _json(capsys, argv + ["--heads", "2", "3", "4", "--json"])
    names = [r["name"] for r in data["variants"]]
    assert names == ["dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h4"]
    assert data["skipped"][0]["num_heads"] == 3
    assert "not divisible by num_heads=3" in data["skipped"][0]["reason"]
    rows = {r["name"]: r for r in data["variants"]}
    assert rows["fine_grained"]["top_k"] == 4 and rows["fine_grained"]["d_expert"] == 704
    assert rows["mhmoe_h4"]["top_k"] == 8
    # Table mode shows the skip and the rounding note.
    assert main(argv + ["--heads", "2", "3", "--shared-d-ff", "1408", "--activation", "relu"]) == 0
    out = capsys.readouterr().out
    assert "mhmoe_h3: skipped" in out and "shared expert d_ff 1408" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "paper", "--d-model", "512"], "cannot be combined with --d-model"),
        (["--d-model", "512", "--d-ff", "1408"], "needs --experts, --top-k"),
        (["--round-experts", "0"], "--round-experts=0"),
        (["--d-model", "0", "--d-ff", "8", "--experts", "2", "--top-k", "1"], "d_model=0"),
        (["--d-model", "8", "--d-ff", "8", "--experts", "2", "--top-k", "3"], "top_k=3"),
        (["--shared-d-ff", "-4"], "--shared-d-ff=-4"),
        (["--heads", "0"], "--heads 0"),
    ],
)
def test_cli_errors_exit_2(capsys, argv, message):
    assert main(["parity", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("mhmoe parity: error:")
