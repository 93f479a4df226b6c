"""The console script: help of every subcommand, end-to-end train / eval / reproduce on the tiny
preset, and one-line errors with exit status 2 for bad input."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from test_train import write_corpus

from mhmoe.cli import build_parser, main
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs.metrics import read_metrics


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text", documents=50, words=600, seed=1)


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "h3"
    code = main(["train", "--preset", "tiny", "--variant", "mhmoe_h3", "--data", str(corpus),
                 "--max-steps", "12", "--quiet", "--threads", "1", "--out", str(out)])
    assert code == 0
    return out


def subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


def test_help_of_every_subcommand(capsys):
    names = subcommands()
    assert {"train", "eval", "reproduce"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0, name
        assert "usage: mhmoe " + name in capsys.readouterr().out


def test_train_writes_a_complete_run(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "checkpoints"} <= names
    records = read_metrics(trained_run / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/heldout/ppl" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in evals] == [6, 12]  # 50% and 100% of the budget
    assert all(r["eval/heldout/bpb"] > 0 for r in evals)
    config = json.loads((trained_run / "config.json").read_text())
    assert config["format"] == ckpt.RUN_FORMAT and config["variant"] == "mhmoe_h3"
    assert config["model"]["moe_ffn"]["num_experts"] == 96
    assert config["counts"]["params"] > config["counts"]["active_params"]
    assert ckpt.latest_checkpoint(trained_run).name == "step_00000012"


def test_eval_reproduces_the_logged_perplexity(trained_run, corpus, capsys):
    assert main(["eval", str(trained_run), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    logged = [r for r in read_metrics(trained_run / "metrics.jsonl") if "eval/heldout/ppl" in r][-1]
    assert payload["step"] == 12
    assert payload["results"]["heldout"]["ppl"] == pytest.approx(logged["eval/heldout/ppl"], rel=1e-9)

    assert main(["eval", str(trained_run), "--step", "6", "--eval", f"doc={corpus / 'doc000.txt'}"]) == 0
    out = capsys.readouterr().out
    assert "at step 6" in out and "doc" in out


def test_reproduce_tiny_writes_table_json_and_plot(corpus, tmp_path, capsys):
    out = tmp_path / "repro"
    code = main(["reproduce", "--preset", "tiny", "--data", str(corpus), "--max-train-bytes", "200000",
                 "--tokens", "768", "--quiet", "--threads", "1", "--out", str(out)])
    assert code == 0
    table = (out / "results.md").read_text()
    for label in ("Dense", "SMoE", "Fine-grained SMoE", "MH-MoE h=2", "MH-MoE h=3"):
        assert f"| {label} |" in table
    assert "heldout @50%" in table and "heldout @100%" in table
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3"]
    for variant in results["variants"]:
        assert set(variant["ppl"]["heldout"]) == {"50%", "100%"}
        assert len(variant["runs"]) == 1 and variant["params"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(
        ["dense", "smoe", "fine_grained", "mhmoe_h2", "mhmoe_h3"])
    # One tokenizer and one token cache for all runs.
    assert len(list(out.rglob("train.tokens"))) == 1
    capsys.readouterr()


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--max-steps", "0"], "--max-steps: '0': must be a positive integer"),
        (["train", "--variant", "moe"], "unknown variant 'moe'"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--tokens", "lots"], "is not a token count"),
        (["train", "--eval", "nameonly"], "expected NAME=PATH"),
        (["reproduce", "--seeds", "-1"], "--seeds: '-1': must be a positive integer"),
        (["reproduce", "--ablation", "heads"], "invalid choice: 'heads'"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variant", "smoe", "--no-head-layer"], "--no-head-layer: variant 'smoe' has no such layer"),
        (["--variant", "dense", "--shared-expert"], "--shared-expert: needs an MoE variant"),
        (["--variant", "mhmoe_h5"], "not divisible by h=5"),
        (["--tokens", "10"], "exceeds --tokens 10"),
        (["--tokens", "1000", "--max-steps", "3"], "give one of them"),
        (["--data", "/nonexistent/corpus"], "/nonexistent/corpus: no such file or folder"),
        (["--warmup-steps", "50", "--max-steps", "10"], "warmup_steps=50"),
    ],
)
def test_bad_settings_exit_2_with_one_line(extra, message, tmp_path, capsys):
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("mhmoe train: error:")


def test_out_dir_must_be_a_writable_folder(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["train", "--quiet", "--out", str(blocker)]) == 2
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["train", "--quiet", "--out", str(blocker / "run")]) == 2
    assert "cannot create the folder" in capsys.readouterr().err


def test_eval_errors(tmp_path, trained_run, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["eval", str(trained_run), "--step", "7"]) == 2
    assert "no checkpoint at step 7" in capsys.readouterr().err


def test_reproduce_seeds_and_shared_expert(corpus, tmp_path, capsys):
    out = tmp_path / "repro"
    code = main(["reproduce", "--preset", "tiny", "--data", str(corpus), "--variants", "smoe", "mhmoe_h2",
                 "--shared-expert", "--seeds", "2", "--tokens", "512", "--eval-points", "2",
                 "--quiet", "--threads", "1", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in results["variants"]] == ["smoe.shared", "mhmoe_h2.shared"]
    assert results["seeds"] == [0, 1]
    for variant in results["variants"]:
        assert len(variant["ppl"]["heldout"]["100%"]["values"]) == 2
        assert variant["experts"]["shared_d_ff"] == 128
    assert " ± " in (out / "results.md").read_text()
    # A rerun reads the finished runs back instead of training again.
    before = (out / "runs" / "smoe.shared" / "seed1" / "metrics.jsonl").read_text()
    assert main(["reproduce", "--preset", "tiny", "--data", str(corpus), "--variants", "smoe", "mhmoe_h2",
                 "--shared-expert", "--seeds", "2", "--tokens", "512", "--eval-points", "2",
                 "--quiet", "--threads", "1", "--out", str(out)]) == 0
    assert (out / "runs" / "smoe.shared" / "seed1" / "metrics.jsonl").read_text() == before
    capsys.readouterr()


def test_reproduce_bitnet_keeps_head_merge_full_precision_and_reuses_a_data_dir(corpus, tmp_path, capsys):
    """--bitnet-full-precision head-merge leaves the MH-MoE head and merge layers as nn.Linear
    (everything else quantised as usual), and --data-dir puts the shared caches there, so a
    second experiment on the same data tokenizes nothing again."""
    data_dir = tmp_path / "shared-data"
    args = ["reproduce", "--preset", "tiny", "--data", str(corpus), "--max-train-bytes", "200000",
            "--variants", "mhmoe_h2", "--tokens", "256", "--bitnet",
            "--bitnet-full-precision", "head-merge", "--data-dir", str(data_dir),
            "--quiet", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / "data").exists() and (data_dir / "train.tokens").is_file()
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["bitnet"] and results["bitnet_full_precision"] == ["head-merge"]
    assert results["experiment"].startswith("BitNet b1.58, head-merge in full precision")
    model, _, _ = ckpt.load_run(tmp_path / "a" / "runs" / "mhmoe_h2" / "seed0")
    kinds = {name: type(module).__name__ for name, module in model.named_modules()}
    assert kinds["blocks.1.ffn.head"] == "Linear" and kinds["blocks.1.ffn.merge"] == "Linear"
    assert kinds["blocks.1.ffn.experts"] == "BitExperts" and kinds["blocks.1.attention.qkv"] == "BitLinear"
    stamp = (data_dir / "train.tokens").stat().st_mtime_ns
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (data_dir / "train.tokens").stat().st_mtime_ns == stamp
    capsys.readouterr()


def test_bitnet_full_precision_needs_bitnet(corpus, tmp_path, capsys):
    code = main(["train", "--preset", "tiny", "--data", str(corpus), "--bitnet-full-precision", "head-merge",
                 "--max-steps", "1", "--quiet", "--out", str(tmp_path / "r")])
    assert code == 2
    assert "--bitnet-full-precision head-merge: needs --bitnet" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_reproduce_ablation_variants():
    from mhmoe.training.reproduce import default_variants

    assert default_variants(ablation="head-merge") == [
        "smoe", "smoe.head_merge", "fine_grained", "fine_grained.head_merge",
        "mhmoe_h2.no_head_merge", "mhmoe_h2.no_merge", "mhmoe_h2.no_head", "mhmoe_h2",
    ]
    assert default_variants(shared_expert=True) == [
        "smoe.shared", "fine_grained.shared", "mhmoe_h2.shared", "mhmoe_h3.shared"]
