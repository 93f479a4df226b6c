"""Reliability (docs/reliability.md): crash-safe checkpoints with fallback to the newest intact
one, exact resume after SIGKILL at random moments, numerical guards, validated inputs, disk
failures, and loading that never unpickles untrusted data.

The SIGKILL fault injection runs ``python -m mhmoe.cli train`` in subprocesses: a few trials in
the default suite, ``test_sigkill_many_trials`` (``-m slow``) runs 24. Set
``MHMOE_RELIABILITY_REPORT=PATH`` to have them write their figures as JSON.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import train_args, training_losses, write_corpus

from mhmoe.cli import main
from mhmoe.data import CorruptCacheError
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs.metrics import read_metrics

SRC = Path(__file__).resolve().parents[1] / "src"
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "train_s")


def comparable_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock fields (everything else must match exactly)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in read_metrics(run_dir / "metrics.jsonl")]


def final_model_sha(run_dir: Path) -> str:
    """sha256 of the latest checkpoint's tensors (names and bytes; the file's own bytes vary
    with the order safetensors writes its metadata in)."""
    from safetensors.torch import load_file

    tensors = load_file(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)
    blob = b"".join(name.encode() + tensors[name].contiguous().view(torch.uint8).numpy().tobytes()
                    for name in sorted(tensors))
    return ckpt.sha256_bytes(blob)


def leftovers(run_dir: Path) -> list[Path]:
    """Temporary files and incomplete checkpoint folders of interrupted writes."""
    found = [p for p in run_dir.rglob(".*.tmp") if "data" not in p.relative_to(run_dir).parts[:1]]
    root = run_dir / ckpt.CHECKPOINTS_DIR
    if root.is_dir():
        found += [p for p in root.glob("step_*") if not (p / ckpt.STATE_FILE).is_file()]
    return found


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    index = len(data) // 2 if offset is None else offset
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


REFERENCE_ARGS = ("--max-steps", "8", "--save-every", "2", "--keep-checkpoints", "3")


@pytest.fixture(scope="module")
def reference(corpus, data_dir, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run (checkpoints every 2 steps), the yardstick of every resume."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(corpus, data_dir, out, *REFERENCE_ARGS)) == 0
    return out


def assert_same_run(run_dir: Path, reference_dir: Path) -> None:
    assert comparable_metrics(run_dir) == comparable_metrics(reference_dir)
    assert final_model_sha(run_dir) == final_model_sha(reference_dir)
    assert not leftovers(run_dir)


# ---------------------------------------------------------------------------------------------
# Checkpoints: corruption is detected; resume falls back to the newest intact checkpoint
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [ckpt.MODEL_FILE, ckpt.OPTIMIZER_FILE, ckpt.RNG_FILE, ckpt.STATE_FILE])
def test_a_flipped_byte_in_any_checkpoint_file_is_detected(reference, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    folder = ckpt.latest_checkpoint(run)
    ckpt.verify_checkpoint(folder)  # intact before
    path = folder / name
    if name == ckpt.STATE_FILE:
        # A digit of the token count: still valid JSON, so only the self-checksum can tell.
        text = path.read_text()
        match = re.search(r'"tokens": (\d)', text)
        digit = match.group(1)
        text = text[: match.start(1)] + str((int(digit) + 1) % 10) + text[match.end(1):]
        path.write_text(text)
    else:
        flip_byte(path)
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path)) + ": checksum mismatch"):
        ckpt.verify_checkpoint(folder)


def test_resume_falls_back_to_the_previous_intact_checkpoint(corpus, data_dir, reference, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--stop-at-step", "6")) == 0
    assert ckpt.latest_checkpoint(run).name == "step_00000006"
    flip_byte(run / "checkpoints" / "step_00000006" / ckpt.MODEL_FILE)
    caplog.clear()
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("step_00000006" in w and "checksum mismatch" in w for w in warnings), warnings
    assert any("resuming from" in w and "step_00000004" in w for w in warnings), warnings
    assert_same_run(run, reference)  # steps 5-6 re-run, the damaged checkpoint rewritten


def test_a_damaged_latest_pointer_falls_back_too(corpus, data_dir, reference, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--stop-at-step", "4")) == 0
    (run / "checkpoints" / "latest").write_bytes(b"\x00garbage")
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 0
    assert any("latest" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert_same_run(run, reference)


def test_no_intact_checkpoint_is_a_clear_error(corpus, data_dir, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    for _, folder in ckpt.list_checkpoints(run):
        flip_byte(folder / ckpt.MODEL_FILE)
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no intact checkpoint to resume from" in err and "checksum mismatch" in err


def test_load_run_refuses_a_damaged_checkpoint_and_names_the_others(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    flip_byte(run / "checkpoints" / "step_00000008" / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match=r"step_00000008/model.safetensors: checksum mismatch.*"
                                                    r"other checkpoints of this run: 2, 4, 6"):
        ckpt.load_run(run)
    model, _, _ = ckpt.load_run(run, step=6)  # an intact one still loads
    assert model is not None


def test_leftovers_of_a_killed_save_are_removed_on_resume(corpus, data_dir, reference, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--stop-at-step", "4")) == 0
    # What a SIGKILL in the middle of saving step 6 can leave behind.
    partial = run / "checkpoints" / "step_00000006"
    partial.mkdir()
    (partial / ckpt.MODEL_FILE).write_bytes(b"half a model")
    (partial / ".optimizer.pt.k1ll3d.tmp").write_bytes(b"half an optimizer")
    (run / "checkpoints" / ".latest.abcdefgh.tmp").write_text("step_00000006")
    (run / "checkpoints" / "step_00000004" / ".rng.safetensors.x.tmp").write_bytes(b"")
    (run / ".metrics.jsonl.zz.tmp").write_text("{}")
    # ... and metrics lines of steps no checkpoint covers (one torn): resume drops them.
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 5, "loss": 99.0}) + "\n" + '{"step": 6, "lo')
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 0
    assert any("leftover" in r.getMessage() for r in caplog.records)
    assert_same_run(run, reference)


def test_metrics_past_the_checkpoint_are_truncated_on_resume(corpus, data_dir, reference, tmp_path):
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--stop-at-step", "4")) == 0
    with open(run / "metrics.jsonl", "a") as handle:
        for step in (5, 6, 7):
            handle.write(json.dumps({"step": step, "loss": 1e9}) + "\n")
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 0
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))  # each step once, re-run values only
    assert training_losses(run) == training_losses(reference)


# ---------------------------------------------------------------------------------------------
# Disks: a full disk while saving, an unwritable folder, too little space
# ---------------------------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes stop halfway with ENOSPC."""

    def __init__(self, handle) -> None:
        self._handle = handle

    def write(self, data) -> int:
        self._handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def test_a_full_disk_while_saving_fails_cleanly_and_keeps_the_previous_checkpoint(
        corpus, data_dir, reference, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "step_00000006" in target and ".optimizer.pt." in target:
            return _FullDisk(handle)
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err, err
    assert "previous checkpoint (step_00000004) is intact" in err
    assert not (run / "checkpoints" / "step_00000006").exists()  # no partial checkpoint
    assert not leftovers(run)
    assert ckpt.latest_checkpoint(run).name == "step_00000004"
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))
    monkeypatch.setattr(os, "fdopen", real_fdopen)  # space freed: the run resumes, nothing lost
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 0
    assert_same_run(run, reference)


def test_an_unwritable_output_folder_fails_before_any_work(corpus, data_dir, tmp_path, monkeypatch, capsys):
    import mhmoe.runs.validation

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(mhmoe.runs.validation.tempfile, "mkstemp", read_only)
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the folder is not writable (Read-only file system)" in err
    assert list(run.iterdir()) == []


def test_too_little_free_space_fails_before_training(corpus, data_dir, tmp_path, monkeypatch, capsys):
    import mhmoe.runs.validation

    monkeypatch.setattr(mhmoe.runs.validation.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MiB free, but one checkpoint needs about" in err
    assert not (run / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------
# Loading never unpickles: a crafted optimizer.pt with valid checksums is refused
# ---------------------------------------------------------------------------------------------


class _Exploit:
    """Pickles as a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _plant_pickle(folder: Path, marker: Path) -> None:
    buffer = io.BytesIO()
    torch.save({"optimizer": {"state": {}, "param_groups": [], "x": _Exploit(f"touch {marker}")}}, buffer)
    data = buffer.getvalue()
    (folder / ckpt.OPTIMIZER_FILE).write_bytes(data)
    # The attacker also rewrites the checksums: only weights_only loading stands in the way.
    state = json.loads((folder / ckpt.STATE_FILE).read_text())
    state["files"][ckpt.OPTIMIZER_FILE] = {"sha256": ckpt.sha256_bytes(data), "bytes": len(data)}
    state[ckpt.STATE_CHECKSUM_KEY] = ckpt._state_checksum(state)
    (folder / ckpt.STATE_FILE).write_text(json.dumps(state))


def test_a_crafted_pickle_is_refused_and_never_runs(corpus, data_dir, reference, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    folder = ckpt.latest_checkpoint(run)
    marker = tmp_path / "pwned"
    _plant_pickle(folder, marker)
    ckpt.verify_checkpoint(folder)  # the checksums match ...
    model, _, _ = ckpt.load_run(run)  # ... weights (safetensors) are unaffected ...
    from mhmoe.training.config import TrainConfig
    from mhmoe.training.loop import build_optimizer

    optimizer = build_optimizer(model, TrainConfig(total_steps=2, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=0))
    with pytest.raises(ckpt.CheckpointError, match=r"optimizer.pt: refused.*weights_only"):
        ckpt.load_optimizer_state(folder, optimizer)  # ... and the pickle is refused
    # A resume refuses it too (a tampered checkpoint is a hard stop, not a fallback).
    assert main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.pt: refused" in err, err
    assert not marker.exists()


def test_source_never_unpickles():
    """Every torch.load in src/ passes weights_only=True; no pickle, numpy or jit loaders."""
    forbidden = re.compile(r"\bpickle\.loads?\(|\bimport pickle\b|\bfrom pickle\b|allow_pickle\s*=\s*True|"
                           r"torch\.jit\.load|\bdill\b|\bcloudpickle\b|yaml\.load\(|\bmarshal\.loads?\(")
    loads = 0
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not forbidden.search(text), f"{path}: {forbidden.search(text).group(0)}"
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 1, match.end()
            while depth:  # the whole call, nested parentheses included
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start(): end]
            assert "weights_only=True" in call, f"{path}: {call}"
            loads += 1
    assert loads >= 1


# ---------------------------------------------------------------------------------------------
# Numerical guards: non-finite steps are skipped and counted; too many in a row stop the run
# ---------------------------------------------------------------------------------------------


def poison(monkeypatch, steps: set[int], module: str = "blocks.1.ffn") -> None:
    """Make ``module``'s output NaN during training steps ``steps`` (tracked through the
    schedule, which train_loop calls once per step)."""
    import mhmoe.training.loop as loop_module
    import mhmoe.training.run as train_module

    current = {"step": 0}
    real_learning_rate = loop_module.learning_rate

    def learning_rate(step, config):
        current["step"] = step
        return real_learning_rate(step, config)

    base = train_module.TransformerLM

    class Poisoned(base):
        def __init__(self, config):
            super().__init__(config)

            def hook(_module, _inputs, output):
                if _module.training and current["step"] in steps:
                    if isinstance(output, tuple):
                        return (output[0] * float("nan"), *output[1:])
                    return output * float("nan")
                return None

            self.get_submodule(module).register_forward_hook(hook)

    monkeypatch.setattr(loop_module, "learning_rate", learning_rate)
    monkeypatch.setattr(train_module, "TransformerLM", Poisoned)


def test_a_non_finite_step_is_skipped_counted_and_resumable(corpus, data_dir, tmp_path, monkeypatch):
    poison(monkeypatch, {3})
    full = tmp_path / "full"
    assert main(train_args(corpus, data_dir, full, *REFERENCE_ARGS)) == 0
    lines = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    assert [r["skipped_steps"] for r in lines] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert lines[2].get("skipped") is True and lines[2]["loss"] != lines[2]["loss"]  # NaN
    assert all("skipped" not in r for i, r in enumerate(lines) if i != 2)
    assert all(r["loss"] == r["loss"] for i, r in enumerate(lines) if i != 2)  # finite after the skip
    # No update at the skipped step: AdamW counted 7 steps out of 8.
    folder = ckpt.latest_checkpoint(full)
    payload = torch.load(folder / ckpt.OPTIMIZER_FILE, weights_only=True)
    assert {float(s["step"]) for s in payload["optimizer"]["state"].values()} == {7.0}
    assert ckpt.read_checkpoint_state(folder)["skipped_steps"] == 1
    # The count and the skip replay identically across an interruption.
    split = tmp_path / "split"
    assert main(train_args(corpus, data_dir, split, *REFERENCE_ARGS, "--stop-at-step", "4")) == 0
    assert main(train_args(corpus, data_dir, split, *REFERENCE_ARGS, "--resume")) == 0
    # (compared as JSON text: NaN != NaN)
    assert json.dumps(comparable_metrics(split)) == json.dumps(comparable_metrics(full))


def test_consecutive_non_finite_steps_stop_the_run_naming_step_layer_and_value(
        corpus, data_dir, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, set(range(3, 100)))
    run = tmp_path / "run"
    code = main(train_args(corpus, data_dir, run, *REFERENCE_ARGS, "--max-skipped-steps", "3"))
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "step 5:" in err and "loss nan" in err and "3 consecutive steps" in err
    assert "--max-skipped-steps 3" in err
    assert "first non-finite output: module blocks.1.ffn (nan)" in err
    assert re.search(r"non-finite gradients in \d+ of \d+ parameters, first [\w.]+ \(nan\)", err)
    assert "The last checkpoint (step_00000004) is intact" in err
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))
    skipped = [r["skipped_steps"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert skipped == [0, 0, 1, 2]  # step 5 stopped the run before its line was written


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5"])
def test_max_skipped_steps_is_validated(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--out", str(tmp_path / "x"), "--max-skipped-steps", value])
    assert info.value.code == 2
    assert f"--max-skipped-steps: {value!r}" in capsys.readouterr().err


def test_router_runs_in_float32_under_bf16_autocast_on_cpu():
    from mhmoe.config import MoEConfig
    from mhmoe.layers.mh_moe import build_ffn
    from mhmoe.layers.routing import TopKRouter

    torch.manual_seed(0)
    router = TopKRouter(16, num_experts=8, top_k=2)
    x = torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, router.weight).dtype == torch.bfloat16  # autocast is on
        routed = router(x.to(torch.bfloat16))
    assert routed.logits_NE.dtype == routed.probs_NE.dtype == routed.weights_NK.dtype == torch.float32
    expected = torch.nn.functional.linear(x.to(torch.bfloat16).float(), router.weight)
    torch.testing.assert_close(routed.logits_NE, expected, rtol=0, atol=0)

    # Inside a whole MH-MoE layer under autocast too.
    layer = build_ffn(MoEConfig(d_model=32, num_experts=8, top_k=2, d_expert=16, num_heads=2))
    seen = []
    for module in layer.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output, _ = layer(torch.randn(2, 5, 32))
    assert seen and all(o.logits_NE.dtype == torch.float32 and o.probs_NE.dtype == torch.float32 for o in seen)
    assert torch.isfinite(output.float()).all()


# ---------------------------------------------------------------------------------------------
# Data problems and configs: one clear line, exit status 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file or folder"),
        (b"", "empty document set"),
        (b"text\x00more text", "binary file (NUL byte at byte offset 4)"),
        ("caf\u00e9 au lait".encode("latin-1"), "not valid UTF-8 at byte offset 3"),
    ],
    ids=["missing", "empty", "binary", "latin-1"],
)
def test_bad_data_fails_with_one_line(content, message, tmp_path, capsys):
    source = tmp_path / "corpus" / "doc.txt"
    if content is not None:
        source.parent.mkdir()
        source.write_bytes(content)
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), "--data", str(source), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert str(source) in err


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_token_cache_is_detected(corpus, data_dir, reference, tmp_path, damage, capsys):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    tokens = copy / "train.tokens"
    if damage == "truncated":
        os.truncate(tokens, tokens.stat().st_size - 3)
    else:
        flip_byte(tokens)
    code = main(train_args(corpus, copy, tmp_path / "run", "--max-steps", "1")[:-2] + [
        "--data-dir", str(copy), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert str(tokens) in err
    assert ("truncated or damaged" if damage == "truncated" else "checksum mismatch") in err
    assert issubclass(CorruptCacheError, ValueError)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda c: c(d_model=48, num_experts=4, top_k=1, d_expert=8, capacity_factor=float("inf")),
         "capacity_factor=inf: must be a finite positive number"),
        # (MoEConfig's unused z_loss flag is gone; bias is its other strict boolean.)
        (lambda c: c(d_model=48, num_experts=4, top_k=1, d_expert=8, bias="yes"), "bias='yes': must be true or false"),
        (lambda c: c(d_model=48, num_experts=4, top_k=1, d_expert=8, head_layer=1), "head_layer=1: must be true or false"),
    ],
)
def test_moe_config_rejects_non_finite_and_non_boolean_values(build, message):
    from mhmoe.config import MoEConfig

    with pytest.raises(ValueError, match=re.escape(message)):
        build(MoEConfig)


def test_model_config_rejects_infinities_and_incomplete_dicts():
    from mhmoe.config import ModelConfig
    from mhmoe.training.presets import model_config

    base = model_config("tiny", "smoe")
    for field, value in (("rope_theta", float("inf")), ("norm_eps", float("nan")), ("load_balancing_weight", float("inf"))):
        with pytest.raises(ValueError, match=f"{field}="):
            base.replace(**{field: value})
    data = base.to_dict()
    del data["d_model"]
    with pytest.raises(ValueError, match=r"model config lacks the required fields \['d_model'\]"):
        ModelConfig.from_dict(data)
    data = base.to_dict()
    data["moe_ffn"] = {"kind": ["moe"]}
    with pytest.raises(ValueError, match="FFN config kind="):
        ModelConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------
# Fault injection: SIGKILL at random moments, then resume; compare with an uninterrupted run
# ---------------------------------------------------------------------------------------------

KILL_STEPS = 12


def _kill_command(corpus: Path, data_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mhmoe.cli", *train_args(corpus, data_dir, out), "--max-steps", str(KILL_STEPS),
            "--save-every", "1", "--keep-checkpoints", "2", "--resume"]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


TRAINING_STARTED = "torch threads"  # train_loop's first log line


def _pointer(run_dir: Path) -> str:
    try:
        return (run_dir / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return ""


def _run(command: list[str], log: Path, run_dir: Path, kill_after: float | None = None,
         anchor: str = "start") -> dict:
    """Run ``command``; SIGKILL it ``kill_after`` seconds after the anchor: ``start`` (train_loop's
    first log line) or ``checkpoint`` (the first checkpoint this process writes). Returns what
    happened and, relative to the start, when the first and the final checkpoint appeared."""
    final = f"step_{KILL_STEPS:08d}"
    initial = _pointer(run_dir)
    with open(log, "w") as handle:
        begin = time.monotonic()
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=_environment())
        started = first = last = None
        killed = False
        while proc.poll() is None:
            now = time.monotonic()
            if started is None and TRAINING_STARTED in log.read_text(errors="replace"):
                started = now
            if last is None:
                name = _pointer(run_dir)
                if name and name != initial and first is None:
                    first = now
                if name == final and name != initial:
                    last = now
            origin = started if anchor == "start" else first
            if kill_after is not None and origin is not None and now - origin >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.002)
        code = proc.wait(timeout=300)
    origin = started if started is not None else begin
    return {"killed": killed, "returncode": code, "seconds": time.monotonic() - begin,
            "first_checkpoint_s": None if first is None else first - origin,
            "final_checkpoint_s": None if last is None else last - origin}


STARTUP_WINDOW_S = 3.0  # train_loop start -> first checkpoint in a fresh process (optimizer setup imports)


@pytest.fixture(scope="module")
def kill_reference(corpus, data_dir, reference, tmp_path_factory) -> dict:
    """The uninterrupted run with the fault-injection settings, in this process (the subprocess
    runs reproduce it bit for bit; the data cache is already built by ``reference``)."""
    out = tmp_path_factory.mktemp("kill-reference") / "run"
    assert main(_kill_command(corpus, data_dir, out)[3:]) == 0
    steps = max(r["elapsed_s"] for r in read_metrics(out / "metrics.jsonl") if "elapsed_s" in r)
    return {"dir": out, "metrics": comparable_metrics(out), "model_sha": final_model_sha(out),
            "first_checkpoint_s": STARTUP_WINDOW_S, "final_checkpoint_s": STARTUP_WINDOW_S + steps + 0.1}


def _kill_moment(rng: random.Random, reference: dict, trial: int, trials: int) -> tuple[float, str]:
    """(seconds, anchor): a quarter of the kills during startup (after train_loop starts:
    optimizer setup, resume, the first step), the rest at a uniform moment of the steps and
    saves after the first checkpoint this process writes; stratified when trials are few."""
    startup = reference["first_checkpoint_s"]
    steps = reference["final_checkpoint_s"] - reference["first_checkpoint_s"] + 0.05
    if trials <= 3:
        return [(rng.uniform(0, startup), "start"), (rng.uniform(0, steps / 2), "checkpoint"),
                (rng.uniform(steps / 2, steps), "checkpoint")][trial % 3]
    return (rng.uniform(0, startup), "start") if rng.random() < 0.25 else (rng.uniform(0, steps), "checkpoint")


def _fault_trials(corpus: Path, data_dir: Path, reference: dict, root: Path, trials: int, seed: int) -> dict:
    """``trials`` runs, each killed 1-3 times at random moments, then resumed to the end."""
    rng = random.Random(seed)
    report = {"trials": trials, "kills": 0, "kills_mid_run": 0, "kills_before_first_checkpoint": 0, "killed_runs_finished_anyway": 0,
              "resumes": 0, "resume_points": [], "leftovers_found_after_kill": 0, "kills_mid_write": 0, "metrics_lines_past_checkpoint": 0,
              "latest_intact_after_every_kill": True, "identical_to_uninterrupted": 0, "lost": 0,
              "kill_moments": [], "first_checkpoint_s": round(reference["first_checkpoint_s"], 3),
              "final_checkpoint_s": round(reference["final_checkpoint_s"], 3)}
    for trial in range(trials):
        out = root / f"trial{trial:02d}"
        kills = 1 if trials <= 3 else rng.choice([1, 1, 2, 3])
        for attempt in range(kills):
            delay, anchor = _kill_moment(rng, reference, trial, trials)
            report["kill_moments"].append(f"{anchor}+{delay:.3f}s")
            result = _run(_kill_command(corpus, data_dir, out), root / f"log{trial:02d}-{attempt}.txt", out,
                          delay, anchor)
            # A kill landed only if the process died of the signal (it may have exited on its own
            # between the last poll and the signal).
            if result["returncode"] != -signal.SIGKILL:
                report["killed_runs_finished_anyway"] += 1
                assert result["returncode"] == 0, (trial, attempt, result)
                continue
            report["kills"] += 1
            # Mid-run: the final checkpoint is not there and metrics.jsonl has fewer lines than
            # the uninterrupted run's (a kill after the last save, while exiting, does not count).
            final_saved = (ckpt.checkpoint_dir(out, KILL_STEPS) / ckpt.STATE_FILE).is_file()
            lines = len(read_metrics(out / "metrics.jsonl", strict=False)) if (out / "metrics.jsonl").exists() else 0
            report["kills_mid_run"] += int(not final_saved and lines < len(reference["metrics"]))
            found = len(leftovers(out)) if out.is_dir() else 0
            report["leftovers_found_after_kill"] += found
            report["kills_mid_write"] += int(found > 0)  # temp files or a half-saved checkpoint
            if not out.is_dir() or ckpt.find_resume_checkpoint(out) is None:
                report["kills_before_first_checkpoint"] += 1
                continue
            # The pointer always names a complete, intact checkpoint (written last).
            if (out / "checkpoints" / "latest").exists():
                try:
                    ckpt.verify_checkpoint(ckpt.latest_checkpoint(out))
                except ckpt.CheckpointError:
                    report["latest_intact_after_every_kill"] = False
            folder, state = ckpt.find_resume_checkpoint(out)
            report["resume_points"].append(state["step"])
            if (out / "metrics.jsonl").exists():
                report["metrics_lines_past_checkpoint"] += sum(
                    1 for r in read_metrics(out / "metrics.jsonl", strict=False) if r.get("step", 0) > state["step"])
        log = root / f"log{trial:02d}-final.txt"
        result = _run(_kill_command(corpus, data_dir, out), log, out)
        report["resumes"] += 1
        assert result["returncode"] == 0, log.read_text()[-3000:]
        same = (comparable_metrics(out) == reference["metrics"] and final_model_sha(out) == reference["model_sha"]
                and not leftovers(out))
        report["identical_to_uninterrupted"] += int(same)
        report["lost"] += int(not same)
        assert comparable_metrics(out) == reference["metrics"], f"trial {trial}"
        assert final_model_sha(out) == reference["model_sha"], f"trial {trial}"
        assert not leftovers(out), f"trial {trial}: {leftovers(out)}"
    assert report["latest_intact_after_every_kill"]
    report_path = os.environ.get("MHMOE_RELIABILITY_REPORT")
    if report_path:
        with open(report_path, "a") as handle:
            handle.write(json.dumps(report) + "\n")
    print(json.dumps(report))
    return report


def test_sigkill_at_random_moments_then_resume_matches_an_uninterrupted_run(
        corpus, data_dir, kill_reference, tmp_path):
    report = _fault_trials(corpus, data_dir, kill_reference, tmp_path, trials=3, seed=1)
    assert report["lost"] == 0 and report["identical_to_uninterrupted"] == 3
    # The resumes above prove something only if a kill actually interrupted a run.
    assert report["kills_mid_run"] >= 1, report


@pytest.mark.slow
def test_sigkill_many_trials(corpus, data_dir, kill_reference, tmp_path):
    report = _fault_trials(corpus, data_dir, kill_reference, tmp_path, trials=24, seed=2024)
    assert report["lost"] == 0 and report["identical_to_uninterrupted"] == 24
    assert report["kills"] >= 24
    assert report["kills_mid_run"] >= 1, report
