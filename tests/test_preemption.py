"""Training on shared machines and clusters (docs/reliability.md, issue 16): SIGTERM/SIGINT
save a checkpoint and the run resumes bit-identically; a second signal aborts at once; one
trainer per run folder (an flock, which SIGKILL does not leave stale); atomic writes honour the
umask; time-based and default step-based checkpoints; ``--resume`` without a checkpoint says so
and keeps the old metrics; progress lines off a terminal; threads from the load average,
recorded for the resume.

The signal and lock tests run ``python -m mhmoe.cli train`` in subprocesses (a few seconds
each, ``--threads 1``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import (
    assert_same_run,
    comparable_metrics,
    final_model_sha,
    leftovers,
)
from test_train import train_args, write_corpus

from mhmoe import runtime
from mhmoe.cli import main
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs import lock as run_lock
from mhmoe.runs.atomic import atomic_write_bytes, atomic_write_text
from mhmoe.runs.preemption import EXIT_PREEMPTED
from mhmoe.training.config import default_save_every
from mhmoe.training.presets import get_preset
from mhmoe.training.run import RunOptions, train_config_for

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = 40  # long enough (a few seconds) for a signal to land mid-run
RUN_ARGS = ("--max-steps", str(STEPS), "--save-minutes", "0", "--keep-checkpoints", "2")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def data_dir(corpus, tmp_path_factory) -> Path:
    """Tokenizer and caches built once (the first run), reused by every subprocess."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference(corpus, data_dir, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_args(corpus, data_dir, out, *RUN_ARGS)) == 0
    return out


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _start(corpus: Path, data_dir: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "mhmoe.cli", *train_args(corpus, data_dir, out, *RUN_ARGS, *extra)]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=_environment())


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    """Until metrics.jsonl has a training line of ``step`` or later (the run is mid-way)."""
    deadline = time.monotonic() + timeout
    path = run_dir / ckpt.METRICS_FILE
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before the signal was sent"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line being written
                if "loss" in record and record["step"] >= step:
                    return
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def _wait_for_text(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_the_resume_is_bit_identical(
        corpus, data_dir, reference, tmp_path, signum):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(corpus, data_dir, run, log)
    _wait_for_step(proc, run, 3)
    proc.send_signal(signum)
    code = proc.wait(timeout=120)
    output = log.read_text()
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert last.startswith(f"mhmoe train: stopped by {name} after step "), last
    assert last.endswith("continue with --resume"), last
    # The checkpoint of the step it stopped at is the latest, intact, and not the end.
    stopped = int(last.split("after step ")[1].split("/")[0])
    assert 3 <= stopped < STEPS
    assert ckpt.latest_checkpoint(run).name == f"step_{stopped:08d}"
    state = ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))
    assert state["step"] == stopped and not state["finished"]
    assert not leftovers(run)
    assert not run_lock.is_held(run)
    # Resumed to the end: the same run line for line and tensor for tensor.
    assert main(train_args(corpus, data_dir, run, *RUN_ARGS, "--resume")) == 0
    assert_same_run(run, reference)


def test_a_second_signal_aborts_at_once(corpus, data_dir, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    # A save every step, so that a checkpoint exists whenever the abort lands.
    proc = _start(corpus, data_dir, run, log, "--save-every", "1")
    _wait_for_step(proc, run, 2)
    # Both signals while the process is stopped: on SIGCONT the first (SIGINT, the lower
    # number) asks for a stop, the second (SIGTERM) arrives before the step can finish, so
    # "at once" is tested without a race against a fast step.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    code = proc.wait(timeout=60)
    assert code == -signal.SIGTERM, log.read_text()[-2000:]  # died of the signal
    assert "SIGINT received" in log.read_text() and "stopped by" not in log.read_text()
    ckpt.verify_checkpoint(ckpt.latest_checkpoint(run))  # crash-safe as after SIGKILL
    # and resumable.
    assert main(train_args(corpus, data_dir, run, *RUN_ARGS, "--save-every", "1", "--resume")) == 0


# ---------------------------------------------------------------------------------------------
# One trainer per run folder
# ---------------------------------------------------------------------------------------------


def test_a_second_trainer_on_a_locked_folder_is_refused_and_the_first_completes(
        corpus, data_dir, reference, tmp_path, capsys):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(corpus, data_dir, run, log)
    _wait_for_step(proc, run, 2)
    config_before = (run / ckpt.CONFIG_FILE).read_bytes()
    capsys.readouterr()
    for extra in ([], ["--resume"], ["--seed", "7", "--resume"]):
        assert main(train_args(corpus, data_dir, run, *RUN_ARGS, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mhmoe train: error: "), err
        assert f"in use by pid {proc.pid} " in err[0], err
    assert (run / ckpt.CONFIG_FILE).read_bytes() == config_before  # nothing was written
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert_same_run(run, reference)  # the first one was not disturbed


def test_sigkill_leaves_no_stale_lock(corpus, data_dir, reference, tmp_path):
    run, log = tmp_path / "run", tmp_path / "log.txt"
    proc = _start(corpus, data_dir, run, log)
    _wait_for_step(proc, run, 2)
    with pytest.raises(run_lock.RunLockedError, match=f"pid {proc.pid} "):
        run_lock.acquire(run)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (run / run_lock.LOCK_FILE).is_file()  # the file stays; the kernel dropped the lock
    with run_lock.locked(run):
        assert run_lock.is_held(run)
    assert not run_lock.is_held(run)
    assert main(train_args(corpus, data_dir, run, *RUN_ARGS, "--resume")) == 0
    assert_same_run(run, reference)


def test_the_lock_is_reentrant_in_one_process_and_refuses_another(tmp_path):
    folder = tmp_path / "run"
    with run_lock.locked(folder, "test"):
        with run_lock.locked(folder, "test"):  # train -> train_loop -> cleanup
            pass
        assert run_lock.is_held(folder)
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from mhmoe.runs import lock; lock.acquire(sys.argv[1])", str(folder)],
            check=False, capture_output=True, text=True, env=_environment(), timeout=120)
        assert probe.returncode != 0
        assert f"in use by pid {os.getpid()} " in probe.stderr and "(test)" in probe.stderr
    assert not run_lock.is_held(folder)


# ---------------------------------------------------------------------------------------------
# Permissions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_bytes(tmp_path / "b.bin", b"x")
        with open(tmp_path / "plain.txt", "w") as handle:  # what a plain open() gives
            handle.write("x")
    finally:
        os.umask(old)
    for name in ("a.txt", "b.bin", "plain.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_run_folder_is_readable_by_colleagues_under_umask_022(corpus, data_dir, tmp_path):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(train_args(corpus, data_dir, run, "--max-steps", "2")) == 0
    finally:
        os.umask(old)
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == ckpt.MODEL_FILE for p in files) and any(p.name == ckpt.CONFIG_FILE for p in files)
    modes = {str(p.relative_to(run)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {"0o644"}, modes


# ---------------------------------------------------------------------------------------------
# Checkpoint intervals, --resume without a checkpoint, progress lines, threads
# ---------------------------------------------------------------------------------------------


def test_default_checkpoint_interval_is_a_tenth_of_the_run_and_ten_minutes():
    preset = get_preset("tiny")
    config = train_config_for(RunOptions(out=Path("x"), max_steps=100_000), preset)
    assert config.save_every == 10_000 == default_save_every(100_000)  # not 50%
    assert config.save_minutes == 10.0
    assert train_config_for(RunOptions(out=Path("x"), max_steps=8), preset).save_every is None
    off = train_config_for(RunOptions(out=Path("x"), max_steps=8, save_minutes=0), preset)
    assert off.save_minutes is None
    assert train_config_for(RunOptions(out=Path("x"), max_steps=100, save_every=7), preset).save_every == 7


def test_time_based_checkpoints_are_written_and_change_nothing_else(corpus, data_dir, reference, tmp_path):
    run = tmp_path / "run"
    # 1e-5 minutes: every step is "due"; retention keeps the newest 2 periodic ones.
    assert main(train_args(corpus, data_dir, run, *RUN_ARGS[:2], "--save-minutes", "1e-5",
                           "--keep-checkpoints", "40")) == 0
    steps = [s for s, _ in ckpt.list_checkpoints(run)]
    assert steps == list(range(1, STEPS + 1))
    assert comparable_metrics(run) == comparable_metrics(reference)
    assert final_model_sha(run) == final_model_sha(reference)


def test_resume_without_a_checkpoint_says_so_and_keeps_the_old_metrics(corpus, data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    assert main(train_args(corpus, data_dir, run, "--max-steps", "2", "--stop-at-step", "1")) == 0
    # As after a kill before the first checkpoint: metrics, no checkpoint.
    old_metrics = (run / ckpt.METRICS_FILE).read_text()
    for folder in (run / ckpt.CHECKPOINTS_DIR).iterdir():
        if folder.is_dir():
            for item in folder.iterdir():
                item.unlink()
            folder.rmdir()
        else:
            folder.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(train_args(corpus, data_dir, run, "--max-steps", "2", "--resume")) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("has no checkpoint yet; starting from step 1" in w and "metrics.before-1.jsonl" in w
               for w in warnings), warnings
    assert (run / "metrics.before-1.jsonl").read_text() == old_metrics
    assert [r["step"] for r in json_lines(run / ckpt.METRICS_FILE) if "loss" in r] == [1, 2]


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_off_a_terminal_progress_lines_reach_the_log(corpus, data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    args = [a for a in train_args(corpus, data_dir, run, "--max-steps", "4", "--progress-every", "1e-6")
            if a != "--quiet"]
    with caplog.at_level(logging.INFO, logger="mhmoe.training.loop"):
        assert main(args) == 0  # pytest's stderr is not a terminal
    lines = [r.getMessage() for r in caplog.records if "tokens/s, ETA" in r.getMessage()]
    assert [line.split(":")[1].split("(")[0].strip() for line in lines] == [f"step {s}/4" for s in range(1, 5)]
    assert all(", loss " in line for line in lines)


def test_default_threads_follow_the_load_average(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.setattr(runtime, "load_average", lambda: 0.2)
    assert runtime.default_threads() == 8
    assert runtime.default_threads(processes=2) == 4
    monkeypatch.setattr(runtime, "load_average", lambda: 5.0)
    assert runtime.default_threads() == 3
    monkeypatch.setattr(runtime, "load_average", lambda: 12.0)
    assert runtime.default_threads() == 1
    monkeypatch.setattr(runtime, "load_average", lambda: None)
    assert runtime.default_threads() == 8


def test_the_chosen_thread_count_is_recorded_and_reused_on_resume(corpus, data_dir, tmp_path, monkeypatch, caplog):
    import mhmoe.training.run as run_module

    run = tmp_path / "run"
    args = [a for a in train_args(corpus, data_dir, run, "--max-steps", "2", "--stop-at-step", "1")]
    args = args[: args.index("--threads")] + args[args.index("--threads") + 2:]  # no --threads
    monkeypatch.setattr(run_module, "default_threads", lambda processes=1: 1)
    assert main(args) == 0
    assert json.loads((run / ckpt.CONFIG_FILE).read_text())["train"]["threads"] == 1
    # The load changed (the default would now be 2); the resume keeps the recorded 1.
    monkeypatch.setattr(run_module, "default_threads", lambda processes=1: 2)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main(args[:-2] + ["--resume"]) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("1 torch threads" in m for m in messages) and not any("2 torch threads" in m for m in messages)


def test_absurd_thread_counts_are_refused_before_any_file_is_written(corpus, data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(corpus, data_dir, run, "--max-steps", "2")
    args[args.index("--threads") + 1] = "100000"
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --threads: '100000': must be at most 4 per usable core" in err and "Traceback" not in err
    assert not run.exists()
