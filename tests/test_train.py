"""Training: schedules, configs, checkpoints (atomic, checksummed, pickle-free loading),
resumption that reproduces an uninterrupted run exactly, and the reloaded model."""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mhmoe.cli import build_parser, main
from mhmoe.cli.options import run_options_from_args
from mhmoe.model import TransformerLM, lm_loss
from mhmoe.runs import checkpoint as ckpt
from mhmoe.runs.metrics import MetricsLog, read_metrics
from mhmoe.training.config import TrainConfig
from mhmoe.training.loop import build_optimizer
from mhmoe.training.presets import model_config
from mhmoe.training.run import RunOptions, _compare_for_resume, run_training
from mhmoe.training.schedules import learning_rate

WORDS = (
    "the a model expert router token head merge layer sparse dense mixture of heads learns "
    "routes each sub token to experts and merges them back into one vector per position"
).split()


def write_corpus(folder: Path, documents: int = 60, words: int = 700, seed: int = 0) -> Path:
    """A small synthetic corpus: one .txt file per document, deterministic."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(documents):
        sentences = []
        for _ in range(words // 10):
            sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14)))
            sentences.append(sentence.capitalize() + ".")
        (folder / f"doc{index:03d}.txt").write_text(" ".join(sentences) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """One token cache + tokenizer for every run of this module."""
    return tmp_path_factory.mktemp("data")


def train_args(corpus: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--preset", "tiny", "--variant", "mhmoe_h2", "--data", str(corpus),
        "--data-dir", str(data_dir), "--quiet", "--threads", "1", "--out", str(out), *extra,
    ]


def training_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def eval_lines(run_dir: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k.startswith("eval/") or k == "step"}
        for r in read_metrics(run_dir / "metrics.jsonl") if any(k.startswith("eval/") for k in r)
    ]


# ---------------------------------------------------------------------------------------------
# Schedules and configs
# ---------------------------------------------------------------------------------------------


def test_polynomial_schedule_warms_up_then_decays_linearly_to_zero():
    config = TrainConfig(total_steps=100, batch_size=2, seq_len=8, lr=1.0, warmup_steps=10)
    assert learning_rate(1, config) == pytest.approx(0.1)
    assert learning_rate(10, config) == pytest.approx(1.0)
    assert learning_rate(55, config) == pytest.approx(0.5)
    assert learning_rate(100, config) == pytest.approx(0.0)


def test_cosine_and_constant_schedules():
    cosine = TrainConfig(total_steps=110, batch_size=2, seq_len=8, lr=1.0, warmup_steps=10,
                         schedule="cosine", end_lr=0.1)
    assert learning_rate(60, cosine) == pytest.approx(0.55)
    assert learning_rate(110, cosine) == pytest.approx(0.1)
    constant = cosine.replace(schedule="constant")
    assert learning_rate(80, constant) == 1.0


def test_default_hyperparameters_are_the_authors():
    config = TrainConfig(total_steps=100, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=10)
    assert (config.beta1, config.beta2, config.weight_decay, config.clip_grad_norm) == (0.9, 0.98, 0.01, 2.0)
    assert config.schedule == "polynomial" and config.eval_fractions == (0.5, 1.0)
    assert config.eval_steps() == [50, 100]
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(total_steps=0), "total_steps=0"),
        (dict(lr=0.0), "lr=0.0"),
        (dict(warmup_steps=100), "warmup_steps=100"),
        (dict(micro_batch_size=3), "multiple of micro_batch_size=3"),
        (dict(schedule="linear"), "schedule='linear'"),
        (dict(beta2=1.0), "beta2=1.0"),
        (dict(precision="fp8"), "precision='fp8'"),
        (dict(eval_fractions=(0.5, 1.5)), "eval_fractions=1.5"),
    ],
)
def test_train_config_validation(changes, message):
    fields = dict(total_steps=100, batch_size=4, seq_len=8, lr=1e-3, warmup_steps=10)
    fields.update(changes)
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_weight_decay_skips_norms():
    model = TransformerLM(model_config("tiny", "smoe"))
    config = TrainConfig(total_steps=10, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=1)
    decay, no_decay = build_optimizer(model, config).param_groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) > 0


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_is_atomic_and_verified(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = TransformerLM(model_config("tiny", "mhmoe_h3"))
    config = TrainConfig(total_steps=10, batch_size=2, seq_len=8, lr=1e-3, warmup_steps=1)
    optimizer = build_optimizer(model, config)
    out = model(torch.randint(0, 100, (2, 8)))
    (out.logits.mean() + out.aux_loss).backward()
    optimizer.step()
    folder = ckpt.save_checkpoint(tmp_path, 3, model, optimizer, {"tokens": 48, "sampler": {}})
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"]
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind

    reloaded = TransformerLM(model_config("tiny", "mhmoe_h3"))
    ckpt.load_model_weights(folder, reloaded)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name

    # The optimizer state is loaded only with weights_only=True.
    calls = []
    original = torch.load

    def spying_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    optimizer2 = build_optimizer(reloaded, config)
    ckpt.load_optimizer_state(folder, optimizer2)
    assert calls == [True]
    assert torch.equal(optimizer2.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    # A flipped byte is reported with the file's name.
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors: checksum mismatch"):
        ckpt.load_model_weights(folder, reloaded)


def test_rng_states_round_trip():
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    tensors, states = ckpt.capture_rng_state()
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9)
    random.seed(9)
    np.random.seed(9)
    ckpt.restore_rng_state(tensors, json.loads(json.dumps(states)))
    actual = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(actual[0], expected[0]) and actual[1:] == expected[1:]


def test_metrics_truncation_drops_lines_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)) + '{"step": 7, "lo')
    MetricsLog.truncate_after(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# End-to-end (tiny preset, CLI main)
# ---------------------------------------------------------------------------------------------


def test_resume_reproduces_an_uninterrupted_run_exactly(corpus, data_dir, tmp_path):
    full = tmp_path / "full"
    assert main(train_args(corpus, data_dir, full, "--max-steps", "8")) == 0

    split = tmp_path / "split"
    assert main(train_args(corpus, data_dir, split, "--max-steps", "8", "--save-every", "2", "--stop-at-step", "5")) == 0
    assert ckpt.latest_checkpoint(split).name == "step_00000005"
    state = ckpt.read_checkpoint_state(ckpt.latest_checkpoint(split))
    assert state["step"] == 5 and not state["finished"]
    # A crash after step 5 may leave lines of steps that no checkpoint covers: resume drops them.
    with open(split / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 6, "loss": 123.0}) + "\n")
    assert main(train_args(corpus, data_dir, split, "--max-steps", "8", "--save-every", "2", "--resume")) == 0

    assert training_losses(split) == training_losses(full)  # bit-identical
    assert eval_lines(split) == eval_lines(full)
    assert [s for s, _ in training_losses(full)] == list(range(1, 9))
    final = ckpt.read_checkpoint_state(ckpt.latest_checkpoint(split))
    assert final["finished"] and final["step"] == 8

    # Resuming a finished run does nothing; without --resume an existing run is refused.
    assert main(train_args(corpus, data_dir, split, "--max-steps", "8", "--save-every", "2", "--resume")) == 0
    assert training_losses(split) == training_losses(full)
    assert main(train_args(corpus, data_dir, split, "--max-steps", "8")) == 2
    # Changing a setting that changes the results is refused on resume.
    assert main(train_args(corpus, data_dir, split, "--max-steps", "9", "--resume")) == 2


def test_trained_model_reloads_with_identical_logits(corpus, data_dir, tmp_path):
    options = RunOptions(
        out=tmp_path / "run", preset="tiny", variant="fine_grained.head_merge.shared",
        data=[str(corpus)], data_dir=data_dir, max_steps=4, quiet=True, threads=1,
    )
    result = run_training(options)
    assert result.loop.finished and result.loop.step == 4
    model, tokenizer, config = ckpt.load_run(result.run_dir)
    assert config["variant"] == "fine_grained.head_merge.shared"
    assert tokenizer.vocab_size == model.config.vocab_size
    ids = torch.tensor([tokenizer.encode("the router learns to merge experts")])
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, result.model(ids).logits, rtol=0, atol=0)
    # Earlier checkpoints (the 50% evaluation) load too.
    model_half, _, _ = ckpt.load_run(result.run_dir, step=2)
    assert not torch.equal(model_half.embed.weight, model.embed.weight)
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at step 3"):
        ckpt.load_run(result.run_dir, step=3)


class _FixedBatches:
    """A sampler for ``train_loop`` that hands out given (inputs, targets) batches in order."""

    def __init__(self, batches):
        self.batches, self.position = list(batches), 0

    def next_batch(self):
        batch = self.batches[self.position]
        self.position += 1
        return batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])


def _accumulated_step_gradients(model, inputs_BT, targets_BT, micro_batch_size, run_dir, monkeypatch):
    """The gradients ``train_loop`` hands to ``optimizer.step()`` in a one-step run of
    ``batch_size = len(inputs_BT)`` rows in micro-batches of ``micro_batch_size`` (recorded by
    wrapping the optimiser that ``mhmoe.training.loop.build_optimizer`` builds), and the step's
    logged loss."""
    import mhmoe.training.loop as loop_mod

    recorded = []
    real_build = loop_mod.build_optimizer

    def recording_build(module, config):
        optimizer = real_build(module, config)
        real_step = optimizer.step

        def step(*args, **kwargs):
            recorded.append({name: p.grad.detach().clone() for name, p in module.named_parameters()})
            return real_step(*args, **kwargs)

        optimizer.step = step
        return optimizer

    monkeypatch.setattr(loop_mod, "build_optimizer", recording_build)
    # clip_grad_norm=None: the recorded gradients are not rescaled; fp32: no autocast.
    config = TrainConfig(total_steps=1, batch_size=inputs_BT.shape[0], seq_len=inputs_BT.shape[1], lr=1e-3,
                         warmup_steps=0, schedule="constant", micro_batch_size=micro_batch_size,
                         clip_grad_norm=None, device="cpu", precision="fp32", threads=1, eval_tokens=None)
    result = loop_mod.train_loop(model, _FixedBatches([(inputs_BT, targets_BT)]), {}, config, run_dir, quiet=True)
    assert result.finished and result.step == 1 and len(recorded) == 1
    return recorded[0], result.last_loss


def _assert_accumulation_matches_one_big_batch(run_dir: Path, monkeypatch) -> None:
    """One ``train_loop`` step over 4 micro-batches hands the optimiser the gradients of one
    forward/backward over the 8 sequences together."""
    # An MH-MoE model (dropless dispatch) with load_balancing_weight=0 and z_loss_weight=0: the
    # aux losses are averaged per micro-batch, so with them the accumulated gradient is *not*
    # that of the big batch; without them the loss is the mean token cross-entropy, and with
    # equal-sized micro-batches mean_k(mean over micro-batch k) is the mean over the batch.
    torch.manual_seed(0)
    config = model_config("tiny", "mhmoe_h2", vocab_size=64, load_balancing_weight=0.0, z_loss_weight=0.0)
    model = TransformerLM(config).double()  # float64 parameters and activations
    batch, seq_len, micro = 8, 16, 2  # 4 micro-batches
    tokens = torch.randint(0, 64, (batch, seq_len + 1))
    inputs_BT, targets_BT = tokens[:, :-1], tokens[:, 1:]

    # The reference: one forward/backward of all 8 sequences at the initial weights.
    big = copy.deepcopy(model)
    output = big(inputs_BT)
    big_loss = lm_loss(output.logits, targets_BT) + output.aux_loss
    assert float(output.aux_loss.detach()) == 0.0
    big_loss.backward()
    expected = {name: p.grad for name, p in big.named_parameters()}
    assert all(g is not None and bool(g.abs().sum() > 0) for g in expected.values())

    run_dir.mkdir(parents=True)
    grads, logged_loss = _accumulated_step_gradients(model, inputs_BT, targets_BT, micro, run_dir, monkeypatch)
    assert grads.keys() == expected.keys()
    # Tolerance: parameters, activations and gradients are float64 (the router keeps float64
    # inputs in float64), but lm_loss's log-softmax runs in float32 by design. Its values can
    # differ by an ulp (~6e-8 relative) between a 2-row and an 8-row batch; the 1/tokens and 1/accumulation factors are powers of two
    # (exact). Measured worst difference: 2.3e-9 absolute; rtol=1e-5, atol=1e-7 leave a wide
    # margin, while a missing 1/accumulation, a dropped or repeated micro-batch, or grads
    # zeroed between micro-batches is off by >= 25% (every tensor's largest gradient >= 2e-3).
    for name, grad in grads.items():
        assert grad.dtype == torch.float64, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # The logged loss (mean of the micro-batch lm losses) is the big batch's loss.
    assert logged_loss == pytest.approx(float(big_loss.detach()), rel=1e-6)
    # Not degenerate: the update changed the weights, and the micro-batches differ (the first
    # one alone gives another gradient).
    assert not torch.equal(model.embed.weight, big.embed.weight)
    first = copy.deepcopy(big)
    first.zero_grad(set_to_none=True)
    out_first = first(inputs_BT[:micro])
    lm_loss(out_first.logits, targets_BT[:micro]).backward()
    assert not torch.allclose(first.embed.weight.grad, expected["embed.weight"], rtol=1e-2, atol=0)


def test_loss_falls_with_gradient_accumulation(corpus, data_dir, tmp_path, monkeypatch):
    # Accumulation itself: one step's accumulated gradients equal those of the big batch.
    _assert_accumulation_matches_one_big_batch(tmp_path / "exact", monkeypatch)
    out = tmp_path / "run"
    args = train_args(corpus, data_dir, out, "--max-steps", "16", "--batch-size", "8", "--micro-batch-size", "4",
                      "--variant", "smoe")
    assert main(args) == 0
    losses = [loss for _, loss in training_losses(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["micro_batch_size"] == 4 and config["train"]["batch_size"] == 8
    assert config["variant"] == "smoe"


def test_global_batch_balancing_with_accumulation_matches_one_big_batch(tmp_path, monkeypatch):
    """--load-balancing global-batch in ``train_loop``: with the load-balancing loss on, one
    step over 4 micro-batches hands the optimiser the gradients of one forward/backward over
    the 8 sequences together (f_i counted over the whole step; mhmoe.layers.balancing), and
    logs the big batch's aux loss."""
    torch.manual_seed(0)
    base = model_config("tiny", "mhmoe_h2", vocab_size=64, load_balancing_weight=0.5, z_loss_weight=0.0)
    config = base.replace(moe_ffn=base.moe_ffn.replace(load_balancing="global-batch"))
    model = TransformerLM(config).double()
    tokens = torch.randint(0, 64, (8, 17))
    inputs_BT, targets_BT = tokens[:, :-1], tokens[:, 1:]
    big = copy.deepcopy(model)
    output = big(inputs_BT)
    assert float(output.aux_loss.detach()) > 0.4  # the balancing loss is on (about w_lb * 1)
    (lm_loss(output.logits, targets_BT) + output.aux_loss).backward()
    expected = {name: p.grad for name, p in big.named_parameters()}
    (tmp_path / "run").mkdir()
    grads, _ = _accumulated_step_gradients(model, inputs_BT, targets_BT, 2, tmp_path / "run", monkeypatch)
    for name, grad in grads.items():  # tolerance: as in _assert_accumulation_matches_one_big_batch
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "aux_loss" in r]
    assert logged[0]["aux_loss"] == pytest.approx(float(output.aux_loss.detach()), rel=1e-6)


def test_aux_free_bias_resumes_bit_exactly(corpus, data_dir, tmp_path):
    """--load-balancing aux-free: the selection biases move (once per step), are saved in the
    checkpoints and restored exactly on --resume; the routing analytics log their range."""
    extra = ("--max-steps", "4", "--load-balancing", "aux-free", "--batch-size", "4", "--micro-batch-size", "2")
    full, split = tmp_path / "full", tmp_path / "split"
    assert main(train_args(corpus, data_dir, full, *extra)) == 0
    assert main(train_args(corpus, data_dir, split, *extra, "--save-every", "2", "--stop-at-step", "2")) == 0
    assert main(train_args(corpus, data_dir, split, *extra, "--save-every", "2", "--resume")) == 0
    assert training_losses(split) == training_losses(full)
    biases = []
    for run in (full, split):
        model, _, config = ckpt.load_run(run)
        assert config["model"]["moe_ffn"]["load_balancing"] == "aux-free"
        biases.append({n: b for n, b in model.named_buffers() if n.endswith("expert_bias")})
    assert biases[0] and biases[0].keys() == biases[1].keys()
    for name, bias in biases[0].items():
        assert torch.equal(bias, biases[1][name]), name
        # 4 updates of +-1e-3 (or 0) each: every entry a multiple of 1e-3, at most 4e-3.
        assert float(bias.abs().max()) <= 4e-3 + 1e-9 and float(bias.abs().max()) > 0, name
    line = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r][-1]
    assert line["routing/layer0/expert_bias_max"] >= line["routing/layer0/expert_bias_min"]
    assert "routing/layer0/load_cv" in line


def test_resume_accepts_a_config_without_activation_checkpointing_and_turning_it_on(corpus, data_dir, tmp_path):
    """Runs started before ``--activation-checkpointing`` existed have no such key in
    config.json; resuming them, with or without the option, is allowed (it does not change the
    results: the losses are those of an uninterrupted run)."""
    full = tmp_path / "full"
    assert main(train_args(corpus, data_dir, full, "--max-steps", "4")) == 0
    split = tmp_path / "split"
    assert main(train_args(corpus, data_dir, split, "--max-steps", "4", "--save-every", "2",
                           "--stop-at-step", "2")) == 0
    config = json.loads((split / ckpt.CONFIG_FILE).read_text())
    del config["train"]["activation_checkpointing"]  # as written before the option existed
    (split / ckpt.CONFIG_FILE).write_text(json.dumps(config))
    assert main(train_args(corpus, data_dir, split, "--max-steps", "4", "--save-every", "2", "--resume",
                           "--activation-checkpointing")) == 0
    assert json.loads((split / ckpt.CONFIG_FILE).read_text())["train"]["activation_checkpointing"] is True
    assert training_losses(split) == training_losses(full)
    assert ckpt.read_checkpoint_state(ckpt.latest_checkpoint(split))["finished"]


def test_resume_comparison_reads_a_missing_train_key_as_its_default(tmp_path):
    """A TrainConfig field added after a run started is missing from its config.json: it
    compares equal to the field's default, and differs from any other value."""
    model = model_config("tiny", "mhmoe_h2", vocab_size=64).to_dict()
    new_train = TrainConfig(total_steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=1).to_dict()
    old_train = {k: v for k, v in new_train.items() if k not in ("weight_decay", "activation_checkpointing")}
    old = {"preset": "tiny", "variant": "mhmoe_h2", "data": {}, "model": model, "train": old_train}
    _compare_for_resume(old, {**old, "train": new_train}, tmp_path)  # the defaults: equal
    _compare_for_resume(old, {**old, "train": {**new_train, "activation_checkpointing": True}}, tmp_path)
    with pytest.raises(ValueError, match=r"weight_decay \(0\.01 -> 0\.5\)"):
        _compare_for_resume(old, {**old, "train": {**new_train, "weight_decay": 0.5}}, tmp_path)


@pytest.mark.parametrize(("argv0", "recorded"), [
    ("/venv/bin/mhmoe", True),                                 # the console script
    ("/work/src/mhmoe/__main__.py", True),                     # python -m mhmoe (torchrun -m mhmoe)
    ("/work/src/mhmoe/cli/__main__.py", True),                 # python -m mhmoe.cli
    ("/work/notebook.py", False),                              # called from a Python program
])
def test_the_train_command_line_is_recorded_for_every_way_to_run_mhmoe(monkeypatch, argv0, recorded):
    argv = ["train", "--preset", "tiny", "--max-steps", "3", "--out", "/tmp/never-written"]
    monkeypatch.setattr(sys, "argv", [argv0, *argv])
    options = run_options_from_args(build_parser().parse_args(argv))
    assert options.command == (["mhmoe", *argv] if recorded else None)
