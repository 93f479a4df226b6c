"""Hostile or odd input ends in one line naming the value and the rule, exit 2 (user error) or
1 (environment), never a traceback, and leaves nothing half-written (issue 16, lists 4, 5, 8;
docs/reliability.md "Validated inputs")."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from test_train import train_args, write_corpus

import mhmoe.cli.bench as bench_cli
from mhmoe.cli import main
from mhmoe.data.sources import open_source
from mhmoe.decoding import sample_next
from mhmoe.runs import checkpoint as ckpt


def one_line_error(capsys, command: str) -> str:
    """The single stderr line of a refused command (no traceback), returned for more checks."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mhmoe {command}: error: "), err
    return lines[0]


def argparse_error(capsys, command: str) -> str:
    """argparse's last line (its usage comes first), no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mhmoe {command}: error: "), err
    return last


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text", documents=30, words=400)


@pytest.fixture(scope="module")
def run_dir(corpus, tmp_path_factory) -> Path:
    """A 2-step run with its own data folder (RUN/data), for the readers below."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    threads = torch.get_num_threads()
    try:
        assert main(["train", "--preset", "tiny", "--variant", "mhmoe_h2", "--max-steps", "2", "--data",
                     str(corpus), "--out", str(out), "--quiet", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def export_dir(run_dir) -> Path:
    out = run_dir.parent / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# mhmoe generate
# ---------------------------------------------------------------------------------------------


def test_a_prompt_that_is_not_utf8_is_one_line(run_dir, capsys):
    # What Python makes of the argv bytes b"caf\xe9" (Latin-1): a lone surrogate.
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")
    assert main(["generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "2"]) == 2
    line = one_line_error(capsys, "generate")
    assert "--prompt b'caf\\xe9': not valid UTF-8 text (byte 0xe9 at byte offset 3)" in line


def test_a_tiny_temperature_samples_the_most_likely_token():
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-320, 1e-45, 1e-300):
        assert sample_next(logits, temperature).tolist() == [1, 0]
    # Ordinary temperatures are untouched: the same draw as softmax(logits / T).
    generator = torch.Generator().manual_seed(0)
    expected = torch.multinomial(torch.softmax(logits / 0.7, dim=-1), 1,
                                 generator=torch.Generator().manual_seed(0)).squeeze(-1)
    assert torch.equal(sample_next(logits, 0.7, generator=generator), expected)


def test_generate_with_a_denormal_temperature_works(run_dir, capsys):
    assert main(["generate", str(run_dir), "--prompt", "The", "--temperature", "1e-320",
                 "--max-new-tokens", "3", "--seed", "0"]) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_a_tampered_safetensors_header_in_an_export_is_one_line(export_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "export"
    shutil.copytree(export_dir, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 10**12)  # a header length far past the end of the file
    weights.write_bytes(bytes(data))
    assert main(["generate", str(bad), "--prompt", "The", "--max-new-tokens", "2"]) == 2
    line = one_line_error(capsys, "generate")
    assert f"{weights}: not a readable safetensors file" in line


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_absurd_vocab_size_in_config_json_is_refused_before_allocating(run_dir, tmp_path, capsys, command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("data"))
    config = json.loads((run / "config.json").read_text())
    config["model"]["vocab_size"] = 100_000_000_000
    (run / "config.json").write_text(json.dumps(config))
    argv = ["generate", str(run), "--prompt", "x"] if command == "generate" else ["eval", str(run)]
    assert main(argv) == 2
    line = one_line_error(capsys, command)
    assert "vocab_size=100000000000: must be at most 16,777,216" in line


def test_a_model_larger_than_memory_is_refused_before_allocating(run_dir, tmp_path, capsys, monkeypatch):
    import shutil

    import mhmoe.config as config_module

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("data"))
    monkeypatch.setattr(config_module, "_physical_memory", lambda: 2**16)  # a 64 KiB machine
    assert main(["generate", str(run), "--prompt", "x"]) == 2
    line = one_line_error(capsys, "generate")
    assert "config.json: a model of about" in line and "more than this machine's 0.0 GiB" in line


# ---------------------------------------------------------------------------------------------
# mhmoe train
# ---------------------------------------------------------------------------------------------


def test_a_huge_batch_is_refused_before_any_file_is_written(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(corpus, tmp_path / "data", out, "--max-steps", "2", "--batch-size", "1000000000")) == 2
    line = one_line_error(capsys, "train")
    assert "--batch-size 1000000000 x --seq-len 32: one step's token batch needs" in line
    assert not out.exists() and not (tmp_path / "data").exists()


def test_a_huge_seq_len_names_seq_len_not_the_preset_budget(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(corpus, tmp_path / "data", out, "--seq-len", "99999999999999999999")) == 2
    line = one_line_error(capsys, "train")
    assert "--seq-len 99999999999999999999: one optimiser step of" in line
    assert "exceeds the preset's budget of" in line and "--tokens 1536" not in line
    assert not out.exists()


def test_a_variant_that_cannot_be_built_is_refused_before_any_data_work(corpus, tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    args = train_args(corpus, data, out, "--max-steps", "2")
    args[args.index("--variant") + 1] = "mhmoe_h5"  # d_model 48 does not split into 5 heads
    assert main(args) == 2
    line = one_line_error(capsys, "train")
    assert "d_model=48 of preset 'tiny' is not divisible by h=5" in line
    assert not out.exists() and not data.exists()  # no tokenizer, no caches, no run folder


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(corpus, tmp_path, capsys, monkeypatch):
    import mhmoe.training.run as run_module

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(run_module, "train_loop", fail)
    out = tmp_path / "run"
    assert main(train_args(corpus, tmp_path / "shared-data", out, "--max-steps", "2")) == 1
    one_line_error(capsys, "train")
    assert not out.exists()
    assert (tmp_path / "shared-data").is_dir()  # a --data-dir outside the run is the user's: kept


def test_a_state_json_without_its_checksum_is_refused_unless_allowed(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(corpus, tmp_path / "data", run, "--max-steps", "4", "--stop-at-step", "2")
    assert main(args) == 0
    path = ckpt.latest_checkpoint(run) / ckpt.STATE_FILE
    state = json.loads(path.read_text())
    del state[ckpt.STATE_CHECKSUM_KEY]
    state["step"], state["finished"] = 2, True  # edited values that nothing can verify
    path.write_text(json.dumps(state))
    with pytest.raises(ckpt.CheckpointError, match="has no state_sha256 checksum"):
        ckpt.read_checkpoint_state(path.parent)
    assert ckpt.read_checkpoint_state(path.parent, allow_unchecked=True)["finished"] is True
    capsys.readouterr()
    resume = args[:-2] + ["--resume"]
    assert main(resume) == 2
    line = one_line_error(capsys, "train")
    assert "no intact checkpoint to resume from" in line and "--allow-unchecked-state" in line
    # The override accepts it (the user vouches for the file): "finished" is taken at its word.
    assert main(resume + ["--allow-unchecked-state"]) == 0


def test_a_capped_text_file_is_read_only_up_to_the_cap(tmp_path):
    path = tmp_path / "big.txt"
    text = ("\ufeff" + "caf\u00e9 " * 50_000)  # 300 kB with a BOM and two-byte characters
    path.write_text(text, encoding="utf-8")
    for cap in (1, 2, 4, 5, 1000, 1001, 99_999):
        read = list(open_source(str(path), max_bytes=cap).documents())
        # Exactly what the whole file cut at ``cap`` bytes gives (the documented result) ...
        expected = text[1:].encode("utf-8")[:cap].decode("utf-8", errors="ignore")
        assert read == ([expected] if expected else []), cap
    # ... while reading only the first bytes: invalid UTF-8 far past the cap is never seen.
    path.write_bytes(b"hello world " * 100 + b"\xff" * 10)
    assert list(open_source(str(path), max_bytes=12).documents()) == ["hello world "]
    with pytest.raises(ValueError, match="not valid UTF-8 at byte offset 1200"):
        list(open_source(str(path)).documents())


# ---------------------------------------------------------------------------------------------
# mhmoe analyze: token caches of another tokenizer
# ---------------------------------------------------------------------------------------------


def test_analyze_refuses_a_token_cache_of_another_tokenizer(run_dir, corpus, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--preset", "tiny", "--variant", "smoe", "--max-steps", "1", "--vocab-size", "300",
                 "--data", str(corpus), "--out", str(other), "--quiet", "--threads", "1"]) == 0
    cache = next((other / "data").glob("eval-*.tokens"))
    capsys.readouterr()
    assert main(["analyze", str(run_dir), "--data", str(cache), "--no-plots"]) == 2
    line = one_line_error(capsys, "analyze")
    assert f"--data {cache}: built with tokenizer" in line and "but the run's tokenizer is" in line
    assert not (run_dir / "routing").exists()
    # The run's own cache is accepted.
    own = next((run_dir / "data").glob("eval-*.tokens"))
    assert main(["analyze", str(run_dir), "--data", str(own), "--no-plots", "--max-tokens", "64"]) == 0


# ---------------------------------------------------------------------------------------------
# mhmoe bench
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_benchmark(monkeypatch):
    """The benchmark itself must not run: every check comes first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark ran before its arguments were checked")

    monkeypatch.setattr(bench_cli.bench, "run_layer_benchmark", refuse)
    monkeypatch.setattr(bench_cli.bench, "run_e2e_benchmark", refuse)


@pytest.mark.parametrize("value, rule", [("-5", "must be a positive integer"), ("0", "must be a positive integer"),
                                         ("x", "is not an integer")])
def test_bench_token_counts_are_validated(no_benchmark, capsys, value, rule):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "layers", "--tokens", value])
    assert exit_info.value.code == 2
    line = argparse_error(capsys, "bench layers")
    assert f"argument --tokens: '{value}'" in line and rule in line


def test_bench_json_path_is_checked_before_the_run(no_benchmark, capsys, tmp_path):
    assert main(["bench", "layers", "--tokens", "64", "--json", "/nonexistent/x.json", "--threads", "1"]) == 2
    assert "--json /nonexistent/x.json: the folder /nonexistent does not exist" in one_line_error(capsys, "bench")
    assert main(["bench", "e2e", "--json", str(tmp_path), "--threads", "1"]) == 2
    assert "is a folder" in one_line_error(capsys, "bench")


def test_bench_refuses_a_case_larger_than_memory(no_benchmark, capsys):
    assert main(["bench", "layers", "--tokens", str(10**12), "--threads", "1"]) == 2
    assert "--tokens 1000000000000 x --d-model 192: the input and its gradient alone need" in \
        one_line_error(capsys, "bench")


def test_bench_reports_progress_per_case_and_round(caplog, tmp_path):
    import logging

    from mhmoe import bench

    messages: list[str] = []
    with caplog.at_level(logging.INFO):
        report = bench.run_layer_benchmark([48], [64], variants=["smoe"], peers=["ours"], rounds=2, warmup=1,
                                           memory=False, progress=messages.append, matmul_size=64)
    assert any("smoe/ours: warmup" in m for m in messages), messages
    assert sum("round " in m for m in messages) == 2, messages
    bench.write_json(report, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["rounds"] == 2
