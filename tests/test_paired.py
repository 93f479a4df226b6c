"""Paired statistics over seeds (mhmoe.analytics.paired), the spread evaluation windows with their
standard error (mhmoe.evaluate, mhmoe.data.batching), the per-window files
(mhmoe.runs.eval_windows), paired initialisation (mhmoe.model) and the comparisons that
``mhmoe reproduce`` writes."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import write_corpus

from mhmoe.analytics.paired import (
    PointValue,
    compare,
    paired_interval,
    paired_window_se,
    ratio_standard_error,
    seeds_needed,
    student_t_cdf,
    student_t_quantile,
    verdict,
)
from mhmoe.cli import main
from mhmoe.data.batching import eval_batches, spread_window_indices
from mhmoe.evaluate import evaluate_tokens
from mhmoe.model import TransformerLM
from mhmoe.planning.variants import parse_variant
from mhmoe.runs.eval_windows import (
    eval_windows_path,
    read_eval_windows,
    write_eval_windows,
)
from mhmoe.training.config import TrainConfig
from mhmoe.training.presets import get_preset, model_config
from mhmoe.training.reproduce import comparison_pairs, expected_directions

# Two-sided 95% and one-sided 80% Student t quantiles from printed tables (e.g. NIST/SEMATECH
# e-Handbook, Table 1.4.2.3.5), to 3 decimals.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045, 100: 1.984}
T_80 = {1: 1.376, 2: 1.061, 5: 0.920, 10: 0.879}


@pytest.mark.parametrize("df, expected", sorted(T_975.items()))
def test_t_quantile_matches_the_printed_table(df, expected):
    assert student_t_quantile(0.975, df) == pytest.approx(expected, abs=6e-4)
    assert student_t_quantile(0.025, df) == pytest.approx(-expected, abs=6e-4)


@pytest.mark.parametrize("df, expected", sorted(T_80.items()))
def test_t_quantile_one_sided(df, expected):
    assert student_t_quantile(0.8, df) == pytest.approx(expected, abs=6e-4)


def test_t_cdf_is_symmetric_and_tends_to_the_normal():
    assert student_t_cdf(0.0, 5) == pytest.approx(0.5)
    assert student_t_cdf(1.3, 7) + student_t_cdf(-1.3, 7) == pytest.approx(1.0)
    normal = 0.5 * (1 + math.erf(1.5 / math.sqrt(2)))
    assert student_t_cdf(1.5, 1e6) == pytest.approx(normal, abs=1e-5)
    assert student_t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    with pytest.raises(ValueError, match="df=0"):
        student_t_cdf(1.0, 0)
    with pytest.raises(ValueError, match="p=1.0"):
        student_t_quantile(1.0, 3)


def test_paired_interval_is_the_textbook_interval():
    # differences 1%, 2%, 3%: mean 2%, sd 1%, half width t_{0.975,2} * 0.01 / sqrt(3)
    interval = paired_interval([0.01, 0.02, 0.03])
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert interval.mean == pytest.approx(0.02)
    assert interval.sd == pytest.approx(0.01)
    assert interval.low == pytest.approx(0.02 - half, rel=1e-5)
    assert interval.high == pytest.approx(0.02 + half, rel=1e-5)
    assert interval.count == 3
    # The issue's own example: -6.0%, -0.8%, -5.6% -> mean -4.1%, 95% interval [-11.3%, +3.0%]
    example = paired_interval([-0.060, -0.008, -0.056])
    assert (round(100 * example.mean, 1), round(100 * example.low, 1), round(100 * example.high, 1)) == (-4.1, -11.3, 3.1)
    one = paired_interval([0.05])
    assert (one.sd, one.low, one.high) == (None, None, None)
    with pytest.raises(ValueError, match="finite"):
        paired_interval([0.1, math.nan])


def test_verdicts_holds_reversed_and_noise():
    rng = np.random.default_rng(0)
    better = paired_interval(list(-0.05 + 0.005 * rng.standard_normal(5)))
    worse = paired_interval(list(0.05 + 0.005 * rng.standard_normal(5)))
    noise = paired_interval([0.02, -0.03, 0.01, -0.015])
    assert verdict(better) == "holds" and verdict(worse) == "reversed" and verdict(noise) == "not resolved"
    # Where the paper expects the variant to be worse (Dense vs SMoE), the words swap.
    assert verdict(worse, expect_lower=False) == "holds" and verdict(better, expect_lower=False) == "reversed"
    assert verdict(paired_interval([-0.5])) == "not resolved"  # one seed resolves nothing


def test_paired_window_se_by_hand():
    nll_a = np.array([10.0, 12.0, 9.0, 11.0])
    nll_b = np.array([11.0, 12.5, 9.5, 12.0])
    targets = np.array([4, 4, 4, 4])
    d = nll_a - nll_b  # -1, -0.5, -0.5, -1 ; mean per token -3 / 16
    mean = d.sum() / targets.sum()
    expected = math.sqrt(4 / 3 * ((d - mean * targets) ** 2).sum()) / 16
    assert paired_window_se(nll_a, nll_b, targets) == pytest.approx(expected)
    # Pairing removes what the two models share: the unpaired SE of one loss is far larger here.
    assert ratio_standard_error(nll_a, targets.astype(float)) > 4 * expected
    with pytest.raises(ValueError, match="one 1-D shape"):
        paired_window_se(nll_a, nll_b[:3], targets)


def test_seeds_needed_grows_with_the_spread():
    assert seeds_needed(0.0) == 2
    small, large = seeds_needed(0.01), seeds_needed(0.03)
    assert small < large
    # the answer is the first N that satisfies the rule, and N - 1 does not
    n = large
    rule = lambda k: (student_t_quantile(0.975, k - 1) + student_t_quantile(0.8, k - 1)) * 0.03 / math.sqrt(k)  # noqa: E731
    assert rule(n) <= 0.02 < rule(n - 1)


def _values(losses_by_seed: dict[int, float]) -> dict[int, dict[tuple[str, str], PointValue]]:
    return {seed: {("books", "100%"): PointValue(loss)} for seed, loss in losses_by_seed.items()}


def test_compare_pairs_seeds_and_counts_wins():
    runs = {
        "smoe": _values({0: 5.00, 1: 5.10, 2: 4.95}),
        "mhmoe_h3": _values({0: 4.96, 1: 5.05, 2: 4.92}),   # better in every seed
        "dense": _values({0: 5.20, 1: 5.22, 2: 5.12}),      # worse in every seed
        "fine_grained": _values({0: 5.02, 1: 5.05}),        # seed 2 missing
    }
    pairs = comparison_pairs(["dense", "smoe", "fine_grained", "mhmoe_h3"])
    assert pairs == [("dense", "smoe"), ("fine_grained", "smoe"), ("mhmoe_h3", "smoe"),
                     ("dense", "fine_grained"), ("mhmoe_h3", "fine_grained")]
    entries = {(e["variant"], e["baseline"]): e for e in compare(runs, pairs, expected_directions(
        ["dense", "smoe", "fine_grained", "mhmoe_h3"]))}
    h3 = entries[("mhmoe_h3", "smoe")]
    diffs = [math.expm1(-0.04), math.expm1(-0.05), math.expm1(-0.03)]
    assert h3["mean_rel_diff"] == pytest.approx(sum(diffs) / 3)
    assert h3["wins"] == 3 and h3["seeds"] == 3 and h3["verdict"] == "holds"
    assert set(h3) >= {"set", "point", "variant", "baseline", "mean_rel_diff", "ci95", "wins", "seeds", "verdict"}
    dense = entries[("dense", "smoe")]
    assert dense["expected"] == "higher" and dense["wins"] == 0 and dense["verdict"] == "holds"
    assert entries[("fine_grained", "smoe")]["seeds"] == 2  # only the seeds both runs have
    assert entries[("mhmoe_h3", "fine_grained")]["seeds"] == 2


def test_spread_windows_cover_the_whole_set():
    assert spread_window_indices(10, None).tolist() == list(range(10))
    assert spread_window_indices(10, 4).tolist() == [0, 2, 5, 7]
    assert spread_window_indices(3, 8).tolist() == [0, 1, 2]
    tokens = np.arange(1001)
    batches = list(eval_batches(tokens, seq_len=10, batch_size=4, max_windows=5))
    starts = [int(row[0]) for batch in batches for row in batch.inputs]
    assert starts == [0, 200, 400, 600, 800]  # 100 windows, 5 kept, spread over all of them
    assert sum(b.n_targets for b in batches) == 50


class _Bigram(torch.nn.Module):
    """A fixed bigram model: logits depend on the previous token only, so the evaluation can be
    recomputed by hand."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return type("Out", (), {"logits": self.table[ids]})()


def test_evaluate_tokens_spread_windows_loss_and_standard_error():
    vocab, seq_len = 7, 8
    tokens = np.random.default_rng(1).integers(0, vocab, size=401)
    model = _Bigram(vocab)
    result = evaluate_tokens(model, tokens, seq_len=seq_len, batch_size=3, max_tokens=80)
    log_probs = torch.log_softmax(model.table.detach().double(), dim=-1)
    chosen = spread_window_indices(50, 10)
    window_nll = np.array([-sum(float(log_probs[tokens[s + i], tokens[s + i + 1]]) for i in range(seq_len))
                           for s in (chosen * seq_len).tolist()])
    assert result.windows == 10 and result.tokens == 80
    assert result.loss == pytest.approx(window_nll.sum() / 80, rel=1e-5)
    np.testing.assert_allclose(result.window_nll, window_nll, rtol=1e-5)
    residual = window_nll - result.loss * seq_len
    assert result.loss_se == pytest.approx(math.sqrt(10 / 9 * (residual ** 2).sum()) / 80, rel=1e-4)
    whole = evaluate_tokens(model, tokens, seq_len=seq_len, batch_size=16)
    assert whole.tokens == 400 and whole.windows == 50
    assert "window_nll" not in whole.as_dict() and "loss_se" in whole.as_dict()


def test_eval_windows_round_trip_and_bad_files(tmp_path):
    nll, targets = np.array([1.5, 2.5, 3.0]), np.array([4, 4, 2])
    path = write_eval_windows(tmp_path, 12, {"books": (nll, targets), "wiki": (nll[:2], targets[:2])})
    assert path == eval_windows_path(tmp_path, 12) and path.name == "step00000012.npz"
    back = read_eval_windows(tmp_path, 12)
    assert set(back) == {"books", "wiki"}
    np.testing.assert_array_equal(back["books"][0], nll)
    np.testing.assert_array_equal(back["wiki"][1], targets[:2])
    assert read_eval_windows(tmp_path, 13) is None
    path.write_bytes(b"not a zip file")
    assert read_eval_windows(tmp_path, 12) is None
    with pytest.raises(ValueError, match="one length"):
        write_eval_windows(tmp_path, 1, {"books": (nll, targets[:2])})


def test_final_eval_tokens_apply_to_the_last_step_only():
    config = TrainConfig(total_steps=10, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=1,
                         eval_tokens=64, final_eval_tokens=512)
    assert [config.eval_tokens_at(s) for s in (5, 9, 10)] == [64, 64, 512]
    assert TrainConfig(total_steps=10, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=1,
                       eval_tokens=64).eval_tokens_at(10) == 64
    with pytest.raises(ValueError, match="final_eval_tokens"):
        TrainConfig(total_steps=10, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=1, final_eval_tokens=0)


def test_one_seed_gives_every_variant_the_same_shared_weights():
    preset = get_preset("tiny")
    states = {}
    for name in ("dense", "smoe", "mhmoe_h3"):
        torch.manual_seed(7)
        states[name] = TransformerLM(model_config(preset, parse_variant(name), vocab_size=300, max_seq_len=32)).state_dict()
    shared = [key for key in states["dense"] if ".ffn." not in key]
    assert any(key.startswith("blocks.1.attention") for key in shared) and "lm_head.weight" in shared
    for key in shared:
        assert torch.equal(states["dense"][key], states["smoe"][key]), key
        assert torch.equal(states["dense"][key], states["mhmoe_h3"][key]), key
    torch.manual_seed(8)
    other_seed = TransformerLM(model_config(preset, parse_variant("smoe"), vocab_size=300, max_seq_len=32)).state_dict()
    assert not torch.equal(other_seed["blocks.0.attention.qkv.weight"], states["smoe"]["blocks.0.attention.qkv.weight"])


def test_reproduce_writes_paired_comparisons(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "text", documents=40, words=500, seed=3)
    out = tmp_path / "repro"
    code = main(["reproduce", "--preset", "tiny", "--data", str(corpus), "--variants", "smoe", "fine_grained",
                 "mhmoe_h2", "--seeds", "2", "--tokens", "512", "--eval-points", "2",
                 "--eval-tokens", "64", "--final-eval-tokens", "256",
                 "--quiet", "--threads", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    entries = results["comparisons"]
    assert {(e["variant"], e["baseline"]) for e in entries} == {
        ("fine_grained", "smoe"), ("mhmoe_h2", "smoe"), ("mhmoe_h2", "fine_grained")}
    assert {e["point"] for e in entries} == {"50%", "100%"}
    for entry in entries:
        assert entry["seeds"] == 2 and entry["verdict"] in ("holds", "reversed", "not resolved")
        low, high = entry["ci95"]
        assert low < entry["mean_rel_diff"] < high
        assert entry["eval_se"] is not None and entry["eval_se"] > 0
        assert 0 <= entry["wins"] <= 2
    # The final evaluation used more windows than the intermediate one.
    run = results["variants"][0]["runs"][0]
    assert [p["heldout/tokens"] for p in run["curve"]] == [64, 256]
    assert run["curve"][-1]["train_s"] > 0
    table = (out / "results.md").read_text()
    assert "## Paired comparisons over seeds" in table and "MH-MoE h=2 vs SMoE" in table
    assert "Power: seeds needed" in table
    for name in ("loss.png", "train_loss.png", "load_distribution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # --summarize-only trains nothing and leaves out runs that do not exist or have not finished.
    code = main(["reproduce", "--preset", "tiny", "--data", str(corpus), "--variants", "smoe", "fine_grained",
                 "mhmoe_h2", "--seeds", "3", "--tokens", "512", "--eval-points", "2", "--summarize-only",
                 "--quiet", "--threads", "1", "--out", str(out)])
    assert code == 0
    assert not (out / "runs" / "smoe" / "seed2").exists()
    again = json.loads((out / "results.json").read_text())
    assert again["seeds"] == [0, 1]
    assert [e["mean_rel_diff"] for e in again["comparisons"]] == [e["mean_rel_diff"] for e in entries]
    assert again["train_time_s"] == pytest.approx(results["train_time_s"])
    capsys.readouterr()


def _load_spread_study():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "seed_spread_study.py"
    spec = importlib.util.spec_from_file_location("seed_spread_study", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_study_folder(folder, per_seed, train_seconds, lr=2e-3, threads=1):
    """A reproduce folder reduced to what the study reads: results.json (comparisons as
    ``compare`` writes them, the budget, run curves with train_s) and the runs' config.json."""
    diffs = [d for _, d in per_seed]
    interval = paired_interval(diffs)
    comparison = {"set": "books", "point": "100%", "variant": "mhmoe_h3", "baseline": "smoe",
                  "mean_rel_diff": interval.mean, "ci95": [interval.low, interval.high], "sd": interval.sd,
                  "wins": sum(d < 0 for d in diffs), "seeds": len(diffs), "eval_se": 0.002,
                  "expected": "lower", "verdict": verdict(interval, True),
                  "per_seed": [{"seed": s, "rel_diff": d, "eval_se": 0.002} for s, d in per_seed]}
    variants = []
    for name, seconds in (("smoe", train_seconds[0]), ("mhmoe_h3", train_seconds[1])):
        runs = []
        for seed, _ in per_seed:
            run_dir = folder / "runs" / name / f"seed{seed}"
            run_dir.mkdir(parents=True)
            (run_dir / "config.json").write_text(json.dumps({"train": {"lr": lr, "threads": threads}}))
            runs.append({"seed": seed, "run_dir": str(run_dir), "curve": [{"train_s": seconds}]})
        variants.append({"name": name, "runs": runs})
    (folder / "results.json").write_text(json.dumps({
        "comparisons": [comparison], "variants": variants,
        "budget": {"tokens": 100 * 8 * 256, "steps": 100, "batch_size": 8, "seq_len": 256}}))


def test_seed_spread_study_reads_the_spread_and_prices_the_seeds(tmp_path, capsys):
    """benchmarks/seed_spread_study.py: per setting, the sd of the per-seed paired differences,
    the seeds that sd needs for a 2% difference (seeds_needed) and their CPU cost (seeds x the
    train seconds of one run of each variant); missing or bad folders are one clear line."""
    study = _load_spread_study()
    _fake_study_folder(tmp_path / "narrow", [(0, -0.021), (1, -0.019), (2, -0.020)], (600.0, 540.0))
    _fake_study_folder(tmp_path / "wide", [(0, -0.06), (1, 0.02), (2, -0.02)], (300.0, 300.0), lr=4e-3, threads=2)
    out = tmp_path / "study.json"
    assert study.main(["--setting", f"narrow=={tmp_path / 'narrow'}", "--setting", f"wide={tmp_path / 'wide'}",
                       "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["narrow=", "wide"]  # the label ends at the last '='
    narrow, wide = rows
    assert narrow["sd"] == pytest.approx(0.001) and wide["sd"] == pytest.approx(0.04)
    assert narrow["seeds_needed"] == seeds_needed(0.001) == 2
    assert wide["seeds_needed"] == seeds_needed(0.04) > 20
    assert narrow["resolve_cpu_hours"] == pytest.approx(2 * 1140.0 / 3600)
    assert wide["resolve_cpu_hours"] == pytest.approx(wide["seeds_needed"] * 2 * 600.0 / 3600)  # 2 threads
    assert narrow["tokens"] == 100 * 8 * 256 and wide["lr"] == 4e-3
    assert narrow["verdict"] == "holds" and wide["verdict"] == "not resolved"
    assert "| wide | 204,800 | 100 x 8 | 0.004 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="results.json: missing"):
        study.main(["--setting", f"none={tmp_path / 'absent'}"])
    with pytest.raises(SystemExit, match="expected LABEL=FOLDER"):
        study.main(["--setting", "no-separator"])
    with pytest.raises(SystemExit, match="no comparison of mhmoe_h3 vs smoe on 'wiki'"):
        study.main(["--setting", f"narrow={tmp_path / 'narrow'}", "--set", "wiki"])
    (tmp_path / "wide" / "runs" / "smoe" / "seed1" / "config.json").unlink()
    with pytest.raises(SystemExit, match=r"seed1/config.json: cannot be read"):
        study.main(["--setting", f"wide={tmp_path / 'wide'}"])
