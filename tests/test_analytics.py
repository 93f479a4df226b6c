"""Routing analytics: statistics on constructed routings with known answers, the accumulator,
plots, the Markdown table and the ``mhmoe analyze`` command."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mhmoe import MHMoE, MoE
from mhmoe.analytics.accumulator import LayerRoutingSummary, RoutingStatsAccumulator, analyze_model
from mhmoe.analytics.loading import token_windows
from mhmoe.analytics.plots import plot_activation_ratio, write_plots
from mhmoe.analytics.report import routing_table_markdown
from mhmoe.analytics.stats import (
    activation_ratio,
    distinct_experts_per_token,
    head_expert_counts,
    head_js_divergence,
    head_top1_agreement,
    load_cv,
    load_entropy,
    load_imbalance,
    router_entropy,
)
from mhmoe.analytics.summary import layers_of
from mhmoe.layers.moe import MoEAux

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_aux(ids_NK, num_experts: int, num_heads: int = 1, dropped: float = 0.0) -> MoEAux:
    """An MoEAux for a given routing, as ``moe_dispatch`` would report it."""
    ids_NK = torch.as_tensor(ids_NK, dtype=torch.int64)
    return MoEAux(
        load_balancing_loss=torch.tensor(1.0),
        z_loss=torch.tensor(0.0),
        tokens_per_expert=torch.bincount(ids_NK.reshape(-1), minlength=num_experts),
        dropped_fraction=torch.tensor(dropped),
        expert_ids=ids_NK,
        num_heads=num_heads,
    )


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 2000, f"{path}: only {len(data)} bytes"


# --------------------------------------------------------------------------------------------
# Pure statistics, known answers
# --------------------------------------------------------------------------------------------


def test_uniform_load():
    counts = [5, 5, 5, 5]
    assert load_imbalance(counts) == pytest.approx(1.0)
    assert load_cv(counts) == pytest.approx(0.0)
    assert load_entropy(counts) == pytest.approx(1.0)
    assert activation_ratio(counts) == 1.0


@pytest.mark.parametrize("num_experts", [2, 4, 8])
def test_collapsed_load(num_experts):
    counts = [0] * num_experts
    counts[1] = 12
    assert load_imbalance(counts) == pytest.approx(num_experts)
    assert load_cv(counts) == pytest.approx(math.sqrt(num_experts - 1))
    assert load_entropy(counts) == pytest.approx(0.0, abs=1e-12)
    assert activation_ratio(counts) == pytest.approx(1 / num_experts)


def test_activation_ratio_threshold_and_empty():
    counts = [90, 9, 1, 0]
    assert activation_ratio(counts) == 0.75
    assert activation_ratio(counts, min_share=0.05) == 0.5  # 9 >= 5, 1 < 5
    assert activation_ratio([0, 0, 0]) == 0.0
    assert load_imbalance([0, 0]) is None and load_cv([0, 0]) is None and load_entropy([0]) is None
    assert load_entropy([7]) == 1.0


def test_router_entropy_uniform_and_one_hot():
    assert router_entropy(torch.full((3, 8), 1 / 8)) == pytest.approx(math.log(8))
    assert router_entropy(torch.eye(4)) == pytest.approx(0.0)
    assert router_entropy(torch.zeros(0, 4)) is None


def test_sub_tokens_spread_over_h_experts():
    # One token, H = 4 sub-tokens, top-1: each head on its own expert -> 4 distinct.
    spread = distinct_experts_per_token(torch.tensor([[0], [1], [2], [3]]), num_heads=4)
    assert spread.tolist() == [4]
    # Token-major layout: token 0 = rows 0..1, token 1 = rows 2..3.
    ids = torch.tensor([[0, 1], [1, 2], [3, 3 - 3], [0, 3]])  # token0 {0,1,2}, token1 {0,3}
    assert distinct_experts_per_token(ids, num_heads=2).tolist() == [3, 2]


def test_identical_heads():
    # 6 tokens, H = 3, top-2; every head of a token routes the same way.
    per_token = torch.tensor([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1], [2, 0]])
    ids_NK = per_token.repeat_interleave(3, dim=0)  # (T, K) -> (T*H, K), token-major
    assert distinct_experts_per_token(ids_NK, 3).tolist() == [2] * 6
    assert head_top1_agreement(ids_NK, 3) == pytest.approx(1.0)
    assert head_js_divergence(head_expert_counts(ids_NK, 3, 4)) == pytest.approx(0.0, abs=1e-12)


def test_disjoint_heads():
    # H = 2, E = 4: head 0 always uses experts {0, 1}, head 1 always {2, 3}.
    ids_NK = torch.tensor([[0, 1], [2, 3]] * 5)
    counts_HE = head_expert_counts(ids_NK, 2, 4)
    assert counts_HE.tolist() == [[5, 5, 0, 0], [0, 0, 5, 5]]
    assert head_js_divergence(counts_HE) == pytest.approx(1.0)  # base 2: disjoint supports
    assert head_top1_agreement(ids_NK, 2) == 0.0
    assert distinct_experts_per_token(ids_NK, 2).tolist() == [4] * 5


def test_single_head_has_no_head_statistics():
    ids = torch.tensor([[0], [1]])
    assert head_top1_agreement(ids, 1) is None
    assert head_js_divergence(head_expert_counts(ids, 1, 2)) is None


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: distinct_experts_per_token(torch.zeros(5, 2, dtype=torch.long), 2), "N=5"),
        (lambda: distinct_experts_per_token(torch.zeros(4, dtype=torch.long), 2), "(N, K)"),
        (lambda: head_top1_agreement(torch.zeros(4, 1, dtype=torch.long), 0), "num_heads=0"),
        (lambda: load_imbalance([3, -1]), "non-negative"),
        (lambda: load_cv(torch.zeros(2, 2)), "vector"),
        (lambda: activation_ratio([1, 2], min_share=1.5), "min_share=1.5"),
        (lambda: RoutingStatsAccumulator(min_share=-0.1), "min_share=-0.1"),
        (lambda: RoutingStatsAccumulator(prefix=""), "prefix=''"),
    ],
)
def test_errors_name_value_and_rule(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


@settings(max_examples=30, deadline=None)
@given(
    num_heads=st.integers(1, 4),
    top_k=st.integers(1, 3),
    num_experts=st.integers(3, 9),
    num_tokens=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_distinct_experts_matches_python_sets(num_heads, top_k, num_experts, num_tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    ids_NK = torch.stack(
        [torch.randperm(num_experts, generator=generator)[:top_k]
         for _ in range(num_tokens * num_heads)]
    )
    got = distinct_experts_per_token(ids_NK, num_heads).tolist()
    rows = ids_NK.tolist()
    want = [len({e for h in range(num_heads) for e in rows[t * num_heads + h]})
            for t in range(num_tokens)]
    assert got == want
    assert all(1 <= d <= min(num_heads * top_k, num_experts) for d in got)


# --------------------------------------------------------------------------------------------
# Accumulator
# --------------------------------------------------------------------------------------------


def test_accumulator_known_answers_over_two_batches():
    stats = RoutingStatsAccumulator(log_counts=True)
    collapsed = make_aux([[0]] * 8, num_experts=4)  # 8 tokens all on expert 0
    uniform = make_aux([[0], [1], [2], [3]] * 2, num_experts=4, dropped=0.25)
    stats.update([collapsed])
    stats.update([uniform])
    (layer,) = stats.layer_summaries()
    assert layer.tokens_per_expert == [10, 2, 2, 2]
    assert layer.num_tokens == 16 and layer.num_batches == 2
    assert layer.activation_ratio == pytest.approx((0.25 + 1.0) / 2)  # mean over batches
    assert layer.load_imbalance == pytest.approx(10 / 4)
    assert layer.dropped_fraction == pytest.approx(0.25 * 8 / 16)  # weighted by assignments
    assert layer.dead_experts == 0
    assert layer.router_entropy is None  # no hook attached, no field in MoEAux
    assert layer.distinct_experts_per_token is None  # H = 1
    summary = stats.summary()
    json.dumps(summary)  # JSON-lines ready
    assert summary["routing/layer0/load_imbalance"] == pytest.approx(2.5)
    assert summary["routing/layer0/activation_ratio"] == pytest.approx(0.625)
    assert summary["routing/layer0/tokens_per_expert"] == [10, 2, 2, 2]
    assert summary["routing/mean/load_imbalance"] == pytest.approx(2.5)
    assert "routing/layer0/distinct_experts_per_token" not in summary
    stats.reset()
    assert stats.summary() == {}


def test_accumulator_mh_moe_identical_and_spread_heads():
    stats = RoutingStatsAccumulator()
    identical = make_aux(torch.tensor([[0], [1], [2]]).repeat_interleave(2, 0), 4, num_heads=2)
    spread = make_aux([[0], [1], [2], [3], [1], [0]], 4, num_heads=2)  # heads always differ
    stats.update([identical, spread])
    first, second = stats.layer_summaries()
    assert first.distinct_experts_per_token == 1.0
    assert first.distinct_experts_histogram == [0, 3, 0]
    assert first.head_top1_agreement == 1.0 and first.head_js_divergence == pytest.approx(0.0)
    assert second.distinct_experts_per_token == 2.0
    assert second.head_top1_agreement == 0.0
    assert second.head_tokens_per_expert == [[1, 1, 1, 0], [1, 1, 0, 1]]
    with pytest.raises(ValueError, match="aux_list has 1 MoE layers, but this window has 2"):
        stats.update([identical])
    with pytest.raises(ValueError, match=r"\(experts, heads, top_k\)=\(4, 1, 1\)"):
        stats.update([make_aux([[0]], 4), identical])


def test_accumulator_equals_direct_computation_on_a_layer():
    torch.manual_seed(0)
    layer = MHMoE(d_model=24, num_heads=3, num_experts=6, top_k=2, d_expert=8)
    stats = RoutingStatsAccumulator().attach(layer)
    xs = [torch.randn(5, 24), torch.randn(7, 24)]
    all_ids, all_probs = [], []
    for x in xs:
        _, aux = layer(x)
        stats.update([aux])
        all_ids.append(aux.expert_ids)
        units = layer.head(x).reshape(-1, 8)
        all_probs.append(layer.router(units).probs_NE)
    stats.detach()
    ids = torch.cat(all_ids)
    (summary,) = stats.layer_summaries()
    assert summary.tokens_per_expert == torch.bincount(ids.reshape(-1), minlength=6).tolist()
    assert summary.distinct_experts_per_token == pytest.approx(
        distinct_experts_per_token(ids, 3).double().mean().item()
    )
    assert summary.head_top1_agreement == pytest.approx(head_top1_agreement(ids, 3))
    assert summary.router_entropy == pytest.approx(router_entropy(torch.cat(all_probs)), rel=1e-6)
    assert len(layer.router._forward_hooks) == 0  # detach removed the hook


def test_router_entropy_from_moe_aux_field_takes_precedence():
    stats = RoutingStatsAccumulator()
    aux = make_aux([[0], [1]], 2)
    aux.router_entropy = torch.tensor(0.5)  # a field a future MoEAux may carry
    stats.update([aux])
    assert stats.summary()["routing/layer0/router_entropy"] == pytest.approx(0.5)


def test_accumulator_in_a_training_step_of_the_lm():
    from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
    from mhmoe.model import TransformerLM, lm_loss

    config = ModelConfig(
        vocab_size=50, d_model=32, num_layers=4, num_attention_heads=2, max_seq_len=16,
        dense_ffn=DenseConfig(32, 48),
        moe_ffn=MoEConfig(d_model=32, num_experts=4, top_k=2, d_expert=16, num_heads=2),
    )
    torch.manual_seed(0)
    model = TransformerLM(config)
    stats = RoutingStatsAccumulator().attach(model)
    ids = torch.randint(0, 50, (2, 16))
    out = model(ids)
    (lm_loss(out.logits[:, :-1], ids[:, 1:]) + out.aux_loss).backward()
    stats.update(out.moe_aux)
    with torch.no_grad():
        model.eval()
        model(ids[:1])  # an evaluation forward between steps must not be counted
    out = model(ids)
    stats.update(out.moe_aux)
    summary = stats.summary()
    assert {f"routing/layer{i}/{m}" for i in (0, 1)
            for m in ("load_imbalance", "load_cv", "activation_ratio", "router_entropy",
                      "distinct_experts_per_token", "head_js_divergence")} <= set(summary)
    for layer in stats.layer_summaries():
        assert sum(layer.tokens_per_expert) == 2 * 32 * 2 * 2  # 2 forwards x T x H x K
    layers = analyze_model(model, [ids])
    assert [layer.block for layer in layers] == [1, 3]


# --------------------------------------------------------------------------------------------
# Plots and table
# --------------------------------------------------------------------------------------------


def _summaries(layer_cls, **kwargs):
    torch.manual_seed(1)
    layer = layer_cls(d_model=16, num_experts=8, d_expert=8, **kwargs)
    return analyze_model(layer, [torch.randn(12, 16), torch.randn(12, 16)])


def test_plots_are_written(tmp_path):
    mh = _summaries(MHMoE, num_heads=2, top_k=2)
    smoe = _summaries(MoE, top_k=1)
    written = write_plots(mh, tmp_path / "mh")
    assert sorted(p.name for p in written) == [
        "distinct_experts.png", "expert_load.png", "head_expert_load.png"
    ]
    assert [p.name for p in write_plots(smoe, tmp_path / "smoe")] == ["expert_load.png"]
    path = plot_activation_ratio({"SMoE": smoe, "MH-MoE h=2": mh, "Dense": []},
                                 tmp_path / "activation_ratio.png")
    for png in [*written, tmp_path / "smoe" / "expert_load.png", path]:
        assert_png(png)


def test_routing_table_markdown_accepts_every_summary_form():
    mh = _summaries(MHMoE, num_heads=2, top_k=2)
    stats = RoutingStatsAccumulator()
    stats.update([make_aux([[0], [0], [0], [1]], 4)])
    table = routing_table_markdown({
        "MH-MoE": mh,  # LayerRoutingSummary list
        "MH-MoE (report)": {"layers": [layer.to_dict() for layer in mh]},  # analyze JSON
        "SMoE (train log)": stats.summary(),  # flat accumulator metrics
        "Dense": {},
    })
    lines = table.splitlines()
    assert lines[0].startswith("| variant | MoE layers | E x h x k | activation ratio")
    rows = {line.split("|")[1].strip(): line for line in lines[2:] if line.startswith("| ")}
    assert rows["MH-MoE"].split("|")[3:] == rows["MH-MoE (report)"].split("|")[3:]
    assert "| 4 x 1 x 1 | 50.0% | 3.00 |" in rows["SMoE (train log)"]
    assert rows["Dense"].count("-") >= 8
    assert layers_of(stats.summary())[0].activation_ratio == 0.5
    assert layers_of({"step": 10, "loss": 1.0}) == []  # a dense model's metrics line
    with pytest.raises(ValueError, match="must be a LayerRoutingSummary or dict"):
        layers_of([1.0])


def test_token_windows_use_full_windows_only():
    batches = token_windows(list(range(200)), seq_len=8, batch_size=4, max_tokens=80)
    # 200 tokens = 25 windows of 8; 80 tokens -> 10 windows spread over all 25 (floor(i * 25 / 10):
    # 0, 2, 5, 7, 10, 12, 15, 17, 20, 22) -> batches of 4, 4 (the partial third is dropped)
    assert [tuple(b.shape) for b in batches] == [(4, 8), (4, 8)]
    assert batches[0][:, 0].tolist() == [0, 16, 40, 56]
    assert batches[1][:, 0].tolist() == [80, 96, 120, 136]
    assert torch.equal(batches[1][1], torch.arange(96, 104))  # a window is contiguous text
    assert [tuple(b.shape) for b in token_windows(list(range(100)), 8, 4)] == [(4, 8)] * 3  # all 12
    assert [tuple(b.shape) for b in token_windows(list(range(5)), 8, 4)] == [(1, 5)]
    with pytest.raises(ValueError, match="seq_len=0"):
        token_windows([1, 2], 0, 1)


# --------------------------------------------------------------------------------------------
# mhmoe analyze
# --------------------------------------------------------------------------------------------

TEXT = ("The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow. " * 30)


def _make_run(run_dir, moe: bool = True, num_heads: int = 2, data_dir=None):
    from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
    from mhmoe.data import build_caches, train_tokenizer
    from mhmoe.model import TransformerLM
    from mhmoe.runs.checkpoint import CONFIG_FILE, RUN_FORMAT, TOKENIZER_FILE, save_checkpoint

    tokenizer = train_tokenizer([TEXT], vocab_size=300)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, num_layers=2, num_attention_heads=2,
        max_seq_len=32, dense_ffn=DenseConfig(32, 64),
        moe_ffn=MoEConfig(d_model=32, num_experts=4, top_k=2, d_expert=16, num_heads=num_heads)
        if moe else None,
    )
    run_dir.mkdir()
    (run_dir / CONFIG_FILE).write_text(json.dumps(
        {"format": RUN_FORMAT, "model": config.to_dict(), "variant": "test", "data": {},
         "data_dir": None if data_dir is None else str(data_dir)}))
    tokenizer.save(run_dir / TOKENIZER_FILE)
    torch.manual_seed(0)
    save_checkpoint(run_dir, 1, TransformerLM(config), None, {})
    build_caches(run_dir / "data" if data_dir is None else data_dir, ["eval-heldout"], {},
                 [("eval-heldout", TEXT)], tokenizer)
    return run_dir


@pytest.fixture(scope="module")
def mh_run(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("runs") / "mh")


def test_analyze_json_schema(mh_run, tmp_path, capsys):
    from mhmoe.cli import main

    out = tmp_path / "out"
    code = main(["analyze", str(mh_run), "--json", "--out", str(out), "--max-tokens", "256",
                 "--batch-size", "2", "--seq-len", "16"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_tokens"] == 256 and report["batch_size"] == 2 and report["seq_len"] == 16
    assert report["data"].endswith("eval-heldout.tokens")
    assert len(report["layers"]) == 1
    (layer,) = report["layers"]
    required = {"layer", "tokens_per_expert", "load_imbalance", "activation_ratio",
                "router_entropy", "distinct_experts_per_token"}
    assert required <= set(layer)
    assert layer["layer"] == 0 and layer["block"] == 1
    assert len(layer["tokens_per_expert"]) == 4
    assert sum(layer["tokens_per_expert"]) == 256 * 2 * 2  # tokens x heads x top-k
    assert all(isinstance(layer[k], float) for k in required - {"layer", "tokens_per_expert"})
    assert 0 < layer["activation_ratio"] <= 1
    assert 0 <= layer["router_entropy"] <= math.log(4) + 1e-9
    assert 1 <= layer["distinct_experts_per_token"] <= 4
    assert json.loads((out / "routing.json").read_text()) == report
    for name in ("expert_load.png", "head_expert_load.png", "distinct_experts.png"):
        assert_png(out / name)


def test_analyze_text_output_and_data_file(mh_run, tmp_path, capsys):
    from mhmoe.cli import main

    text_file = tmp_path / "doc.txt"
    text_file.write_text("Judge my vow, quick fox. " * 20)
    code = main(["analyze", str(mh_run), "--data", str(text_file), "--out", str(tmp_path / "o"),
                 "--max-tokens", "64", "--no-plots"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "MoE layer 0 (block 1): E=4 h=2 k=2" in printed
    assert "distinct experts" in printed and str(text_file) in printed
    assert not (tmp_path / "o" / "expert_load.png").exists()


def test_analyze_dense_run_and_errors(tmp_path, capsys):
    from mhmoe.cli import main

    dense = _make_run(tmp_path / "dense", moe=False, data_dir=tmp_path / "shared-data")
    assert main(["analyze", str(dense), "--json", "--max-tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == []
    assert report["data"] == str(tmp_path / "shared-data" / "eval-heldout.tokens")  # data_dir
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["analyze", str(dense), "--data", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err


def test_layer_summary_round_trips_through_dict():
    (layer,) = _summaries(MHMoE, num_heads=2, top_k=2)
    assert LayerRoutingSummary.from_dict(json.loads(json.dumps(layer.to_dict()))) == layer
