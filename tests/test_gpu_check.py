"""``benchmarks/gpu_check.py`` on the CPU: its dry mode runs every phase at tiny sizes in the
default suite (so the script cannot rot between GPU runs), an exhausted budget still leaves a
report, and bad command lines get one clear line."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mhmoe.bench import VARIANTS, hf_available
from mhmoe.data.prepare import prepare_data

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up there
_spec.loader.exec_module(gpu_check)

WORDS = "the a model expert router token head merge layer sparse dense mixture routes each sub".split()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MAX_FILE_BYTES = 16 * 2**20


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """What `mhmoe prepare-data` writes, for a small synthetic corpus (held-out split included)."""
    root = tmp_path_factory.mktemp("gpu_check_data")
    text = root / "text"
    text.mkdir()
    rng = random.Random(0)
    for index in range(30):
        (text / f"doc{index:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + ".\n",
                                                  encoding="utf-8")
    prepare_data([str(text)], None, root / "data", vocab_size=300)
    return root / "data"


def test_dry_run_goes_through_every_phase_in_under_a_minute(data_dir, tmp_path):
    out = tmp_path / "report"
    command = [sys.executable, str(SCRIPT), "--out", str(out), "--minutes", "2", "--device", "cpu", "--dry",
               "--data-dir", str(data_dir)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert {name: p["status"] for name, p in report["phases"].items()} == {name: "ok" for name in gpu_check.PHASES}
    assert report["elapsed_s"] < 60 and wall < 90, (report["elapsed_s"], wall)
    assert report["environment"]["matmul"]["tflops"] > 0

    # pytest -m gpu ran the gpu-marked tests: collected, skipped here without CUDA.
    tests = report["tests"]["tests"]
    assert len(tests) >= 30 and all(t["id"].startswith("tests/test_gpu.py::") for t in tests)
    if not torch.cuda.is_available():
        assert {t["outcome"] for t in tests} == {"skipped"}
        assert report["tests"]["skip_reasons"] == {"needs a CUDA device": len(tests)}

    layers = report["layers"]
    token_counts = sorted({c["tokens"] for c in layers["cases"]})
    assert token_counts == list(gpu_check.dry_plan().layer_tokens)
    for tokens in token_counts:
        for variant in VARIANTS:
            ours = gpu_check._case(layers["cases"], tokens, variant, "ours")
            assert ours and len(ours["times_s"]) == gpu_check.dry_plan().layer_rounds and ours["median_s"] > 0
            if variant != "dense" and hf_available("grouped_mm"):
                assert gpu_check._case(layers["cases"], tokens, variant, "hf_grouped_mm"), (tokens, variant)
    h3_targets = [row for row in layers["targets"] if row["target"].startswith("MH-MoE h=3")]
    assert len(h3_targets) == len(token_counts) and all(row["value"] > 0 for row in h3_targets)

    shapes = report["e2e"]["shapes"]
    assert set(shapes) == {"mini", "paper"}
    for shape in shapes.values():
        assert set(shape["variants"]) == set(VARIANTS)
        for v in shape["variants"].values():
            assert v["tokens_per_s"] > 0 and v["mfu_measured_peak"] > 0 and v["train_flops_per_token"] > 0

    training = report["training"]
    assert set(training["runs"]) == set(VARIANTS)
    for variant, run in training["runs"].items():
        assert run["finished"] and run["steps"] == run["planned_steps"] >= 2, variant
        assert 1.0 < run["eval"]["heldout"]["ppl"] < 300 and run["eval"]["heldout"]["bpb"] > 0
        assert run["curve"][-1][1] < run["curve"][0][1], variant  # the loss fell

    markdown = (out / "report.md").read_text()
    for heading in ("## Tests", "## Layers", "## End to end", "## Training"):
        assert heading in markdown
    assert all(f"| {variant} |" in markdown for variant in VARIANTS)
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    for name in ("report.json", "report.md", "loss.png", "gpu_check.log"):
        assert 0 < (out / name).stat().st_size < MAX_FILE_BYTES


def test_an_exhausted_budget_skips_phases_and_still_writes_the_report(tmp_path):
    out = tmp_path / "report"
    code = gpu_check.main(["--out", str(out), "--minutes", "0.01", "--device", "cpu", "--dry"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    statuses = {name: p["status"] for name, p in report["phases"].items()}
    assert statuses["environment"] == "ok"
    assert all(statuses[name] == "skipped" for name in ("tests", "layers", "e2e", "training")), statuses
    assert all("out of time" in report["phases"][name]["reason"] for name in ("tests", "layers", "e2e", "training"))
    assert "| layers | skipped |" in (out / "report.md").read_text()
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC


def _bad_data_dirs(data_dir: Path, tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_train = tmp_path / "no_train"
    no_train.mkdir()
    shutil.copy(data_dir / "tokenizer.json", no_train / "tokenizer.json")
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    tokens = damaged / "train.tokens"
    content = bytearray(tokens.read_bytes())
    content[-1] ^= 0xFF  # same size, other content
    tokens.write_bytes(bytes(content))
    return {"missing": tmp_path / "nowhere", "empty": empty, "no_train": no_train, "damaged": damaged}


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "the following arguments are required: --out"),
        (["--minutes", "0"], "'0': must be a positive number of minutes"),
        (["--minutes", "soon"], "'soon' is not a number of minutes"),
        (["--minutes", "inf"], "must be a positive number of minutes"),
        (["--device", "tpu"], "device='tpu'"),
        (["--seed", "-1"], "'-1': must be a non-negative integer"),
        (["--gpus", "1"], "unrecognized arguments: --gpus 1"),
        (["--data-dir", "{missing}"], "no such folder"),
        (["--data-dir", "{empty}"], "has no tokenizer.json"),
        (["--data-dir", "{no_train}"], "has no train.tokens with train.manifest.json"),
        (["--data-dir", "{damaged}"], "does not match train.manifest.json"),
        (["--out-is-a-file"], "exists and is not a folder"),
    ],
)
def test_bad_arguments_get_one_clear_line(arguments, message, data_dir, tmp_path, capsys):
    dirs = _bad_data_dirs(data_dir, tmp_path)
    out = tmp_path / "out"
    if arguments == ["--out-is-a-file"]:
        out.write_text("not a folder")
        arguments = []
    argv = [] if message.startswith("the following") else ["--out", str(out)]
    argv += [a.format(**{k: str(v) for k, v in dirs.items()}) for a in arguments]
    assert gpu_check.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: "), captured.err
    assert message in lines[0]
    assert captured.out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "CUDA is not available" in err[0]


def test_pytest_output_is_parsed_per_test_partial_output_included():
    output = "\n".join([
        "tests/test_gpu.py::test_a[x] PASSED                                  [ 25%]",
        "tests/test_gpu.py::test_b FAILED                                     [ 50%]",
        "tests/test_gpu.py::test_c SKIPPED (needs a CUDA device)              [ 75%]",
        "tests/test_gpu.py::test_e ERROR                                      [ 90%]",
        "=========================== short test summary info ============================",
        "SKIPPED [3] tests/test_gpu.py:12: needs a CUDA device",
        "FAILED tests/test_gpu.py::test_b - AssertionError: error 3.1e-02 > 0.02",
        "ERROR tests/test_gpu.py::test_e - RuntimeError: CUDA error",
        "FAILED tests/test_gpu.py::test_d - killed before its progress line",
    ])
    parsed = gpu_check.parse_pytest_output(output)
    outcomes = {t["id"].split("::")[1]: t["outcome"] for t in parsed["tests"]}
    assert outcomes == {"test_a[x]": "passed", "test_b": "failed", "test_c": "skipped", "test_e": "error",
                        "test_d": "failed"}
    assert parsed["counts"] == {"passed": 1, "failed": 2, "skipped": 1, "error": 1}
    messages = {t["id"].split("::")[1]: t.get("message") for t in parsed["tests"]}
    assert messages["test_b"] == "AssertionError: error 3.1e-02 > 0.02" and messages["test_a[x]"] is None
    assert parsed["skip_reasons"] == {"needs a CUDA device": 3}
    # Cut off mid-run (the time limit): what was printed still counts.
    partial = gpu_check.parse_pytest_output(output.splitlines()[0] + "\ntests/test_gpu.py::test_b ")
    assert partial["counts"] == {"passed": 1}


def test_training_budget_follows_the_measured_rate_within_its_bounds():
    plan = gpu_check.Plan()
    step = plan.train_batch * plan.train_preset.seq_len
    budgets = [gpu_check._planned_tokens(plan, seconds, 200_000.0) for seconds in (1, 30, 60, 120, 10_000)]
    assert all(b % step == 0 for b in budgets)
    assert budgets == sorted(budgets) and budgets[0] < budgets[2] < budgets[3]
    assert budgets[0] == plan.train_min_steps * step  # too little time: the minimum
    assert budgets[-1] == (plan.train_max_tokens // step) * step  # plenty: the cap
    # In between: the share of the measured rate the plan keeps for training itself.
    assert abs(budgets[2] - 200_000 * 60 * plan.train_safety) < step
    assert gpu_check._planned_tokens(plan, 60, None) == plan.train_fallback_steps * step


def test_deadline_sampler_stops_between_steps_and_delegates_its_state():
    class Sampler:
        def __init__(self):
            self.state = {"position": 0}

        def next_batch(self):
            self.state["position"] += 1
            return self.state["position"]

        def state_dict(self):
            return dict(self.state)

        def load_state_dict(self, state):
            self.state = dict(state)

    inner = Sampler()
    sampler = gpu_check.DeadlineSampler(inner, time.monotonic() + 60)
    assert sampler.next_batch() == 1 and sampler.state_dict() == {"position": 1}
    sampler.load_state_dict({"position": 7})
    assert inner.state == {"position": 7}
    sampler.deadline = time.monotonic() - 1
    with pytest.raises(gpu_check.OutOfTime):
        sampler.next_batch()
    assert inner.state == {"position": 7}  # no batch drawn after the deadline


def test_a_peer_that_fails_here_is_dropped_with_its_reason(monkeypatch):
    real = gpu_check.bench.build_peer

    def build_peer(name, layer, **options):
        if name == "hf_grouped_mm":
            raise AttributeError("'Qwen3MoeConfig' object has no attribute '_experts_implementation'")
        return real(name, layer, **options)

    monkeypatch.setattr(gpu_check.bench, "build_peer", build_peer)
    monkeypatch.setattr(gpu_check.bench, "hf_available", lambda implementation="eager": True)
    peers, problems = gpu_check.usable_peers(torch.device("cpu"), gpu_check.dry_plan())
    assert peers == ["ours"]
    assert problems == {"hf_grouped_mm": "AttributeError: 'Qwen3MoeConfig' object has no attribute "
                                          "'_experts_implementation'"}
