"""Property-based fuzzing (hypothesis) of configs and command lines (docs/reliability.md).

The property: no input produces anything but a result or a clear error. For the CLI, a clear
error is exit status 2 with the last stderr line ``mhmoe <command>: error: ...`` (exactly one
line when the command itself, not argparse, rejects the input) and never a traceback; for the
config dataclasses it is a ``ValueError``. ``mhmoe train`` runs with ``train_loop`` stubbed out,
so every validation (arguments, configs, data, run folder, sampler) runs but no training.

Examples per test: ``MHMOE_FUZZ_EXAMPLES`` (default 40); the default suite is derandomized
(``MHMOE_FUZZ_RANDOM=1`` draws fresh inputs). ``MHMOE_RELIABILITY_REPORT=PATH`` appends the
tallies as JSON lines.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_train import write_corpus

from mhmoe.cli import main

EXAMPLES = int(os.environ.get("MHMOE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("MHMOE_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
    database=None,
)
TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def report_tally():
    yield
    for name, counts in sorted(TALLY.items()):
        print(f"fuzz {name}: {dict(counts)}")
    path = os.environ.get("MHMOE_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as handle:
            handle.write(json.dumps({"fuzz": {k: dict(v) for k, v in TALLY.items()}}) + "\n")


# ---------------------------------------------------------------------------------------------
# Values: what a user (or a damaged config.json) might pass
# ---------------------------------------------------------------------------------------------

NUMBER_TEXT = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-0", "1", "2", "-1", "1e309", "-1e309", "nan", "inf", "-inf", "1.5", "0.5", "1e-9",
                     "", " ", "0x10", "1_000", "12k", "1.5M", "3B", "99999999999999999999999", "NaN", "1e3",
                     "--", "=", "None", "true", "٣", "１２", "1,000", "1 000"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
)
ANY_VALUE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=6,
)


def _clear_error(code: int, err: str, command: str, parsed: bool) -> None:
    """A result (0) or a clear error: status 2, the last line ``mhmoe CMD: error: ...``, no
    traceback; exactly one line when past argparse."""
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert code == 2, (code, err)
    lines = err.strip("\n").split("\n")
    assert lines[-1].startswith(f"mhmoe {command}: error: ") or lines[-1].startswith("mhmoe: error: "), err
    if parsed:
        assert len(lines) == 1, err


def run_cli(argv: list[str], capsys, command: str) -> tuple[int, str]:
    capsys.readouterr()
    parsed = True
    try:
        code = main(argv)
    except SystemExit as exit_info:  # argparse rejected the command line
        code, parsed = exit_info.code if isinstance(exit_info.code, int) else 2, False
    out, err = capsys.readouterr()
    _clear_error(code, err, command, parsed)
    TALLY[command][f"exit {code}" + ("" if parsed or code == 0 else " (argparse)")] += 1
    return code, err


# ---------------------------------------------------------------------------------------------
# Config dataclasses
# ---------------------------------------------------------------------------------------------


def _fuzz_fields(draw, valid: dict) -> dict:
    """``valid`` with some fields replaced by arbitrary values and maybe one unknown field."""
    fields = dict(valid)
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=len(valid), unique=True)):
        fields[name] = draw(st.one_of(ANY_VALUE, st.integers(-3, 300), st.sampled_from([0.0, -1.0, math.inf, math.nan])))
    return fields


@FUZZ
@given(data=st.data())
def test_fuzz_moe_and_dense_configs(data):
    from mhmoe.config import DenseConfig, MoEConfig

    for cls, valid in (
        (MoEConfig, dict(d_model=48, num_experts=8, top_k=2, d_expert=16, num_heads=2, head_layer=None,
                         merge_layer=None, shared_d_ff=None, activation="swiglu", bias=False,
                         capacity_factor=None, normalize_top_k=None)),
        (DenseConfig, dict(d_model=48, d_ff=96, activation="swiglu", bias=False)),
    ):
        fields = _fuzz_fields(data.draw, valid)
        try:
            config = cls(**fields)
        except ValueError as err:
            assert str(err), fields
            TALLY[f"{cls.__name__}"]["ValueError"] += 1
        else:
            TALLY[f"{cls.__name__}"]["built"] += 1
            assert config.d_model >= 1


@FUZZ
@given(data=st.data())
def test_fuzz_model_config_from_dict(data):
    from mhmoe.config import ModelConfig
    from mhmoe.training.presets import model_config

    valid = model_config("tiny", data.draw(st.sampled_from(["dense", "smoe", "mhmoe_h2", "fine_grained.shared"]))).to_dict()
    choice = data.draw(st.integers(0, 3))
    if choice == 0:
        payload = data.draw(ANY_VALUE)
    elif choice == 1:
        payload = _fuzz_fields(data.draw, valid)
    else:  # nested: the FFN configs
        payload = dict(valid)
        key = "dense_ffn" if choice == 2 or valid["moe_ffn"] is None else "moe_ffn"
        payload[key] = _fuzz_fields(data.draw, valid[key]) if data.draw(st.booleans()) else data.draw(ANY_VALUE)
    try:
        config = ModelConfig.from_dict(payload)
    except ValueError as err:
        assert str(err)
        TALLY["ModelConfig.from_dict"]["ValueError"] += 1
    else:
        TALLY["ModelConfig.from_dict"]["built"] += 1
        assert ModelConfig.from_dict(config.to_dict()) == config


@FUZZ
@given(data=st.data())
def test_fuzz_train_config(data):
    from mhmoe.training.config import TrainConfig

    valid = {f.name: getattr(TrainConfig(total_steps=100, batch_size=4, seq_len=8, lr=1e-3, warmup_steps=10), f.name)
             for f in dataclasses.fields(TrainConfig)}
    fields = _fuzz_fields(data.draw, valid)
    try:
        config = TrainConfig.from_dict(fields)
    except ValueError as err:
        assert str(err)
        TALLY["TrainConfig"]["ValueError"] += 1
    else:
        TALLY["TrainConfig"]["built"] += 1
        assert config.accumulation_steps >= 1 and config.eval_steps() is not None


# ---------------------------------------------------------------------------------------------
# mhmoe train (training stubbed), parity, eval
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("fuzz-corpus") / "text", documents=30, words=400, seed=3)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory) -> Path:
    """A data folder with the tokenizer and caches, so fuzzed runs only reuse them."""
    data_dir = tmp_path_factory.mktemp("fuzz-data")
    out = tmp_path_factory.mktemp("fuzz-first") / "run"
    assert main(["train", "--quiet", "--threads", "1", "--data", str(corpus), "--data-dir", str(data_dir),
                 "--out", str(out), "--max-steps", "1"]) == 0
    return data_dir


@pytest.fixture
def stub_training(monkeypatch):
    import mhmoe.training.run as train_module

    calls = []

    def train_loop(model, sampler, eval_sets, config, run_dir, **kwargs):
        calls.append(config)
        return train_module.LoopResult(step=0, tokens=0, last_loss=None, finished=True)

    monkeypatch.setattr(train_module, "train_loop", train_loop)
    return calls


# Numbers: mostly plausible (so that many command lines get past argparse into the run's own
# checks), often not.
INT_TEXT = st.one_of(st.integers(0, 70).map(str), st.integers(0, 70).map(str), st.integers(1, 10**7).map(str),
                     NUMBER_TEXT)
REAL_TEXT = st.one_of(st.sampled_from(["0", "1e-3", "0.01", "0.5", "1", "2", "10", "1e-12", "1e30"]),
                      st.floats(min_value=0, max_value=100).map(repr), NUMBER_TEXT)
# Options whose valid values would only re-tokenize (slow, not interesting) get invalid ones.
TRAIN_OPTIONS = {
    "--max-steps": INT_TEXT, "--tokens": INT_TEXT, "--seed": INT_TEXT, "--batch-size": INT_TEXT,
    "--micro-batch-size": INT_TEXT, "--seq-len": INT_TEXT, "--lr": REAL_TEXT,
    "--warmup-steps": INT_TEXT, "--weight-decay": REAL_TEXT, "--clip-grad-norm": REAL_TEXT,
    "--load-balancing-weight": REAL_TEXT, "--z-loss-weight": REAL_TEXT, "--eval-tokens": INT_TEXT,
    "--eval-every": INT_TEXT, "--save-every": INT_TEXT, "--keep-checkpoints": INT_TEXT,
    "--max-skipped-steps": INT_TEXT, "--stop-at-step": INT_TEXT, "--threads": INT_TEXT,
    "--ep": INT_TEXT,
    "--vocab-size": st.sampled_from(["0", "-5", "abc", "1.5", "", "256"]),
    "--heldout-fraction": st.sampled_from(["1", "1.5", "-0.1", "nan", "x", ""]),
    "--max-train-bytes": st.sampled_from(["0", "-1", "abc", "1e3"]),
    "--preset": st.sampled_from(["tiny", "huge", "", "TINY"]),
    "--variant": st.one_of(st.sampled_from(["smoe", "dense", "mhmoe_h2", "mhmoe_h3", "mhmoe_h5", "mhmoe_h0",
                                            "mhmoe_h1", "smoe.head_merge", "dense.shared", "mhmoe_h2.no_head",
                                            "mhmoe_h2.shared.no_merge", "fine_grained.nope", "", "moe", "smoe..",
                                            "mhmoe_h999999999999"]), st.text(max_size=10)),
    "--schedule": st.sampled_from(["polynomial", "cosine", "constant", "linear", ""]),
    "--precision": st.sampled_from(["auto", "fp32", "bf16", "fp16", ""]),
    "--device": st.one_of(st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "cuda:x", "cpu:0", "tpu", "mps", "",
                                           "meta", "cpu:-1", "cuda:99"]), st.text(max_size=8)),
    "--dp": st.sampled_from(["ddp", "fsdp", "zero"]),
    "--eval": st.sampled_from(["nameonly", "=x", "a=", "a=/nonexistent/file", "bad name=x", "heldout=/dev/null"]),
    "--tokenizer": st.sampled_from(["/nonexistent/tokenizer.json", "/dev/null", "/"]),
    "--data": st.sampled_from(["/nonexistent", "hf:", "hf:a:b:c:d", "/dev/null", "stdlib:x", "/etc/hostname"]),
}
FLAGS = ["--shared-expert", "--head-merge", "--no-head-layer", "--no-merge-layer", "--resume", "--tensorboard"]


@FUZZ
@given(data=st.data())
def test_fuzz_train_arguments(data, corpus, prepared, stub_training, capsys, tmp_path):
    argv = ["train", "--quiet", "--threads", "1", "--data", str(corpus), "--data-dir", str(prepared),
            "--out", tempfile.mkdtemp(dir=tmp_path)]
    options = data.draw(st.lists(st.sampled_from(sorted(TRAIN_OPTIONS)), min_size=1, max_size=4, unique=True))
    for option in options:
        argv += [option, data.draw(TRAIN_OPTIONS[option])]
    argv += data.draw(st.lists(st.sampled_from(FLAGS), max_size=2, unique=True))
    if "--max-steps" not in options and "--tokens" not in options:
        argv += ["--max-steps", "3"]
    code, err = run_cli(argv, capsys, "train")
    if code == 0:
        assert stub_training, "exit 0 without reaching the training loop"


PARITY_OPTIONS = {
    "--d-model": NUMBER_TEXT, "--d-ff": NUMBER_TEXT, "--experts": NUMBER_TEXT, "--top-k": NUMBER_TEXT,
    "--fine-grained-top-k": NUMBER_TEXT, "--shared-d-ff": NUMBER_TEXT, "--round-experts": NUMBER_TEXT,
    "--round-d-expert": NUMBER_TEXT, "--preset": st.sampled_from(["paper", "mini", "tiny", ""]),
    "--activation": st.sampled_from(["swiglu", "relu", "gelu"]),
}
SMALL_INT_TEXT = st.one_of(st.integers(-4, 4096).map(str), NUMBER_TEXT)


@FUZZ
@given(data=st.data())
def test_fuzz_parity_arguments(data, capsys):
    argv = ["parity"]
    free_form = data.draw(st.booleans())
    if free_form:  # all four, so the planner itself runs on odd values
        for option in ("--d-model", "--d-ff", "--experts", "--top-k"):
            argv += [option, data.draw(SMALL_INT_TEXT)]
    for option in data.draw(st.lists(st.sampled_from(sorted(PARITY_OPTIONS)), max_size=3, unique=True)):
        argv += [option, data.draw(PARITY_OPTIONS[option] if option in ("--preset", "--activation") else SMALL_INT_TEXT)]
    if data.draw(st.booleans()):
        argv += ["--heads", *data.draw(st.lists(SMALL_INT_TEXT, min_size=1, max_size=3))]
    argv += data.draw(st.lists(st.sampled_from(["--json", "--bias", "--shared-expert"]), max_size=2, unique=True))
    run_cli(argv, capsys, "parity")


@pytest.fixture(scope="module")
def eval_targets(corpus, prepared, tmp_path_factory) -> dict[str, Path]:
    """A trained run and a few things that are not (quite) runs."""
    root = tmp_path_factory.mktemp("fuzz-eval")
    run = root / "run"
    assert main(["train", "--quiet", "--threads", "1", "--data", str(corpus), "--data-dir", str(prepared),
                 "--out", str(run), "--max-steps", "2"]) == 0
    empty = root / "empty"
    empty.mkdir()
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    wrong = root / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps({"format": "mhmoe-run/1", "model": {"d_model": -1}}))
    a_file = root / "file.txt"
    a_file.write_text("hello")
    return {"run": run, "missing": root / "missing", "empty": empty, "broken": broken, "wrong": wrong,
            "file": a_file}


@FUZZ
@given(data=st.data())
def test_fuzz_eval_arguments(data, eval_targets, corpus, capsys):
    target = data.draw(st.sampled_from(sorted(eval_targets)))
    argv = ["eval", str(eval_targets[target]), "--device", data.draw(st.sampled_from(["cpu", "auto", "gpu", "cuda:x"]))]
    options = {
        "--step": SMALL_INT_TEXT, "--eval-tokens": st.one_of(st.integers(-2, 64).map(str), NUMBER_TEXT),
        "--batch-size": st.one_of(st.integers(-2, 8).map(str), NUMBER_TEXT),
        "--eval": st.sampled_from([f"doc={corpus / 'doc000.txt'}", "x=/nonexistent", "noequals", "a=",
                                   f"bad/name={corpus / 'doc001.txt'}", f"d={corpus}"]),
    }
    for option in data.draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
        argv += [option, data.draw(options[option])]
    if "--eval-tokens" not in argv:
        argv += ["--eval-tokens", "64"]
    argv += data.draw(st.lists(st.just("--json"), max_size=1))
    run_cli(argv, capsys, "eval")
