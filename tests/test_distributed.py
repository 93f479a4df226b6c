"""torch.distributed on CPU (gloo, 2 processes): DDP, FSDP2 and expert parallelism against
single-process references, and checkpoints across world sizes.

One spawn of 2 ranks (module fixture ``distributed_results``) runs every multi-process
scenario and saves what it measured; the tests compare those numbers with single-process
references computed here. The ranks rendezvous on 127.0.0.1 at a free port, through the same
environment variables torchrun sets, so ``init_distributed``'s torchrun path is what runs.

Reference semantics (docs/distributed.md): W ranks each with micro-batch b equal one process
accumulating gradients over the same W micro-batches; with the load-balancing and z-loss
weights at 0 and no capacity limit, that is also one forward over the whole global batch.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
from mhmoe.layers.mh_moe import MHMoE
from mhmoe.model import TransformerLM, lm_loss

WORLD = 2
GLOBAL_BATCH = 4  # sequences per step; 2 per rank, one micro-batch of 1 at a time
SEQ_LEN = 8
VOCAB = 64
MAX_NORM = 0.5  # small enough that clipping is active: tests the global gradient norm
LR = 1e-2
# (dp, ep) of every training-step scenario, each run with and without auxiliary losses.
STEP_MODES = {"ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "ddp_ep": ("ddp", 2), "fsdp_ep": ("fsdp", 2)}
# (dp, ep) used to load the single-process checkpoint on 2 ranks.
LOAD_MODES = {"ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "ddp_ep": ("ddp", 2), "fsdp_ep": ("fsdp", 2)}
LAYER_CASES = {"empty_experts": (3, 2), "empty_rank": (3, 0)}  # tokens on rank 0, rank 1


# ---------------------------------------------------------------------------------------------
# Shared by the ranks and the references
# ---------------------------------------------------------------------------------------------


def model_config(aux: bool, num_experts: int = 4) -> ModelConfig:
    """Two MH-MoE blocks (h=2, top-2). ``aux``: load-balancing and z-loss on, capacity 1.25 (the
    per-micro-batch semantics matter); otherwise neither (equal to one global-batch forward)."""
    return ModelConfig(
        vocab_size=VOCAB, d_model=32, num_layers=2, num_attention_heads=2, max_seq_len=SEQ_LEN,
        dense_ffn=DenseConfig(32, 64),
        moe_ffn=MoEConfig(d_model=32, num_experts=num_experts, top_k=2, d_expert=16, num_heads=2,
                          capacity_factor=1.25 if aux else None),
        moe_every=1,
        load_balancing_weight=0.01 if aux else 0.0,
        z_loss_weight=0.001 if aux else 0.0,
    )


def build_model(aux: bool, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(model_config(aux))


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    return ids[:, :-1], ids[:, 1:]


def probe_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ_LEN), generator=torch.Generator().manual_seed(7))


def forced_layer() -> MHMoE:
    """MH-MoE layer whose router sends every sub-token to expert 0 or 1 (top-1): with ep=2,
    rank 1's experts 2 and 3 receive nothing from anyone."""
    torch.manual_seed(1)
    layer = MHMoE(d_model=16, num_heads=2, num_experts=4, top_k=1, d_expert=8)
    with torch.no_grad():
        direction = torch.randn(8)
        layer.router.weight.zero_()
        layer.router.weight[0] = direction
        layer.router.weight[1] = -direction
    return layer


def layer_input(rank: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(tokens, 16, generator=generator)
    upstream = torch.randn(tokens, 16, generator=generator)
    return x, upstream


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    """The trainer's optimiser (fused AdamW, decay/no-decay groups), so that the parameter
    kinds a sharded model hands it (DTensors, tensors) are what training will see."""
    from mhmoe.training.config import TrainConfig
    from mhmoe.training.loop import build_optimizer

    # eps well above float32 gradient noise: Adam's first update lr * g / (|g| + eps) turns a
    # rounding difference in a gradient near 0 into a difference of up to lr; with eps = 1e-3
    # the update is a smooth function of g and "updated parameters equal" is a strict check.
    config = TrainConfig(total_steps=2, batch_size=GLOBAL_BATCH, seq_len=SEQ_LEN, lr=LR,
                         warmup_steps=0, adam_eps=1e-3, weight_decay=0.01)
    return build_optimizer(model, config)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The ranks
# ---------------------------------------------------------------------------------------------


def _full_grads(pm) -> dict[str, torch.Tensor]:
    from mhmoe.distributed.state import _unshard

    return {
        name: _unshard(pm, name, param.grad).detach().to("cpu", copy=True)
        for name, param in pm.model.named_parameters()
    }


def _train_step(context, aux: bool) -> dict:
    from mhmoe.distributed import full_model_state_dict, parallelize

    pm = parallelize(build_model(aux), context)
    optimizer = adamw(pm.model)
    inputs, targets = global_batch()
    per_rank = GLOBAL_BATCH // context.world_size
    rows = range(context.rank * per_rank, (context.rank + 1) * per_rank)
    step_loss = torch.zeros(())
    for index, row in enumerate(rows):
        last = index == per_rank - 1
        with contextlib.nullcontext() if last else pm.no_sync():
            output = pm(inputs[row : row + 1])
            loss = (lm_loss(output.logits, targets[row : row + 1]) + output.aux_loss) / per_rank
            loss.backward()
        step_loss += loss.detach()
    norm = pm.clip_grad_norm_(MAX_NORM)
    grads = _full_grads(pm)
    optimizer.step()
    with torch.no_grad():
        probe_logits = pm(probe_ids()).logits.detach().clone()
    return {
        "loss": context.all_reduce_mean(step_loss),
        "norm": float(norm),
        "grads": grads,
        "params": full_model_state_dict(pm),
        "probe_logits": probe_logits,
        "pm": pm,
        "optimizer": optimizer,
    }


def _layer_case(context, tokens: tuple[int, int]) -> dict:
    from mhmoe.distributed.expert_parallel import ExpertParallelDispatch, install_dispatch, shard_experts

    layer = forced_layer()
    shard_experts(layer.experts, context.ep_size, context.ep_rank)
    install_dispatch(layer, ExpertParallelDispatch(context.ep_group, context.ep_size, context.ep_rank))
    x, upstream = layer_input(context.rank, tokens[context.rank])
    x.requires_grad_(True)
    y, aux = layer(x)
    objective = (y * upstream).sum() + 0.1 * aux.load_balancing_loss
    objective.backward()
    return {
        "y": y.detach(),
        "lb": aux.load_balancing_loss.detach(),
        "tokens_per_expert": aux.tokens_per_expert,
        "x_grad": x.grad,
        # None would mean a missing gradient: record it as such, not as zeros.
        "grads": {n: (None if p.grad is None else p.grad.clone()) for n, p in layer.named_parameters()},
    }


def _worker(rank: int, world: int, port: int, out_dir: str, scenarios: tuple[str, ...]) -> None:
    """One rank: run the scenarios, save the results to OUT_DIR/rank{rank}.pt."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    from mhmoe.distributed import (
        ParallelConfig,
        full_optimizer_state_dict,
        init_distributed,
        load_checkpoint,
        parallelize,
        save_checkpoint,
        shutdown_distributed,
    )
    from mhmoe.runs import checkpoint as ckpt

    out = Path(out_dir)
    base = init_distributed(ParallelConfig(), device="cpu")  # owns the process group
    results: dict = {"world_size": base.world_size, "backend": base.backend}
    try:
        if "steps" in scenarios:
            for name, (dp, ep) in STEP_MODES.items():
                for aux in (False, True):
                    context = init_distributed(ParallelConfig(dp, ep), device="cpu")
                    step = _train_step(context, aux)
                    if name == "fsdp_ep" and aux:
                        # Save with 2 ranks (sharded experts, FSDP2): the test loads it with 1.
                        save_checkpoint(step["pm"], step["optimizer"], out / "saved_run", 1, {"tokens": 0})
                    del step["pm"], step["optimizer"]
                    results[f"step/{name}/{'aux' if aux else 'noaux'}"] = step
        if "layer" in scenarios:
            context = init_distributed(ParallelConfig("ddp", world), device="cpu")
            for name, tokens in LAYER_CASES.items():
                results[f"layer/{name}"] = _layer_case(context, tokens)
        if "load" in scenarios:
            folder = ckpt.latest_checkpoint(out / "single_run")
            for name, (dp, ep) in LOAD_MODES.items():
                context = init_distributed(ParallelConfig(dp, ep), device="cpu")
                pm = parallelize(build_model(aux=True, seed=99), context)  # other weights
                optimizer = adamw(pm.model)
                load_checkpoint(pm, optimizer, folder)
                with torch.no_grad():
                    logits = pm(probe_ids()).logits.detach().clone()
                results[f"load/{name}"] = {
                    "logits": logits,
                    "optimizer": full_optimizer_state_dict(pm, optimizer),
                }
    finally:
        shutdown_distributed(base)
    torch.save(results, out / f"rank{rank}.pt")


def run_ranks(tmp_path: Path, world: int, scenarios: tuple[str, ...]) -> list[dict]:
    import torch.multiprocessing as mp

    mp.start_processes(
        _worker, args=(world, free_port(), str(tmp_path), scenarios), nprocs=world,
        start_method="spawn", join=True,
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Single-process references
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)  # read-only results, shared by the tests
def reference_step(aux: bool) -> dict:
    """One optimiser step in one process: micro-batches of 1 accumulated (aux), or one forward
    over the whole global batch (no aux, no capacity: the exact global-batch semantics)."""
    model = build_model(aux)
    optimizer = adamw(model)
    inputs, targets = global_batch()
    if aux:
        total = torch.zeros(())
        for row in range(GLOBAL_BATCH):
            output = model(inputs[row : row + 1])
            loss = (lm_loss(output.logits, targets[row : row + 1]) + output.aux_loss) / GLOBAL_BATCH
            loss.backward()
            total += loss.detach()
    else:
        output = model(inputs)
        total = lm_loss(output.logits, targets) + output.aux_loss
        total.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    with torch.no_grad():
        probe_logits = model(probe_ids()).logits
    return {
        "loss": float(total.detach()), "norm": float(norm), "grads": grads,
        "params": {k: v.clone() for k, v in model.state_dict().items()},
        "probe_logits": probe_logits, "model": model, "optimizer": optimizer,
    }


def write_single_process_checkpoint(run_dir: Path) -> tuple[torch.Tensor, dict]:
    """A checkpoint saved by one process after one step; returns its probe logits and
    optimiser state."""
    from mhmoe.runs import checkpoint as ckpt

    reference = reference_step(aux=True)
    ckpt.save_checkpoint(run_dir, 1, reference["model"], reference["optimizer"], {"tokens": 0})
    return reference["probe_logits"], reference["optimizer"].state_dict()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> tuple[list[dict], dict]:
    out = tmp_path_factory.mktemp("distributed")
    single_logits, single_optimizer = write_single_process_checkpoint(out / "single_run")
    results = run_ranks(out, WORLD, ("steps", "layer", "load"))
    return results, {"dir": out, "single_logits": single_logits, "single_optimizer": single_optimizer}


def assert_close(actual, expected, what: str, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Multi-process tests
# ---------------------------------------------------------------------------------------------


def test_ranks_ran_on_gloo(distributed_results):
    results, _ = distributed_results
    assert [r["world_size"] for r in results] == [WORLD, WORLD]
    assert all(r["backend"] == "gloo" for r in results)


@pytest.mark.parametrize("aux", [False, True], ids=["global_batch", "micro_batches_with_aux"])
@pytest.mark.parametrize("mode", list(STEP_MODES))
def test_one_step_equals_single_process(distributed_results, mode, aux):
    results, _ = distributed_results
    reference = reference_step(aux)
    for rank, result in enumerate(results):
        step = result[f"step/{mode}/{'aux' if aux else 'noaux'}"]
        assert step["loss"] == pytest.approx(reference["loss"], rel=1e-5), f"rank {rank} loss"
        assert step["norm"] == pytest.approx(reference["norm"], rel=1e-5), f"rank {rank} grad norm"
        assert reference["norm"] > MAX_NORM  # clipping was active
        assert set(step["grads"]) == set(reference["grads"])
        for name, grad in reference["grads"].items():
            assert_close(step["grads"][name], grad, f"rank {rank} grad {name}")
        for name, value in reference["params"].items():
            assert_close(step["params"][name], value, f"rank {rank} updated {name}", atol=1e-5)
        assert_close(step["probe_logits"], reference["probe_logits"], f"rank {rank} logits", atol=1e-5)


@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_expert_parallel_layer_equals_single_process(distributed_results, case):
    """Forward and backward of one MH-MoE layer with experts 2 and 3 (rank 1's) receiving no
    sub-token at all (and, in ``empty_rank``, rank 1 holding no token either)."""
    results, _ = distributed_results
    tokens = LAYER_CASES[case]
    layer = forced_layer()
    outputs = []
    for rank in range(WORLD):
        x, upstream = layer_input(rank, tokens[rank])
        x.requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y, aux = layer(x)
        (y * upstream).sum().add(0.1 * aux.load_balancing_loss).backward()
        outputs.append((y.detach(), aux, x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}))
    # Expert weights are shared: their reference gradient sums both ranks' objectives.
    layer.zero_grad(set_to_none=True)
    for rank in range(WORLD):
        x, upstream = layer_input(rank, tokens[rank])
        y, aux = layer(x)
        (y * upstream).sum().add(0.1 * aux.load_balancing_loss).backward()
    expert_grads = {n: p.grad for n, p in layer.experts.named_parameters()}

    for rank, result in enumerate(results):
        got = result[f"layer/{case}"]
        y, aux, x_grad, grads = outputs[rank]
        assert_close(got["y"], y, f"rank {rank} output")
        assert_close(got["lb"], aux.load_balancing_loss, f"rank {rank} load-balancing loss")
        assert torch.equal(got["tokens_per_expert"], aux.tokens_per_expert)
        assert_close(got["x_grad"], x_grad, f"rank {rank} input gradient")
        for name in ("router.weight", "head.weight", "merge.weight"):
            assert_close(got["grads"][name], grads[name], f"rank {rank} {name} gradient")
        for name, full in expert_grads.items():
            local = got["grads"][f"experts.{name}"]
            assert local is not None, f"rank {rank} experts.{name}: gradient missing"
            assert_close(local, full.chunk(WORLD)[rank], f"rank {rank} experts.{name} gradient")
    # Rank 1's experts saw no row: zero gradients, present.
    for name in ("w1", "w3", "w2"):
        assert torch.count_nonzero(results[1][f"layer/{case}"]["grads"][f"experts.{name}"]) == 0
        assert torch.count_nonzero(results[0][f"layer/{case}"]["grads"][f"experts.{name}"]) > 0


def test_saved_on_two_ranks_loads_on_one(distributed_results):
    from mhmoe.runs import checkpoint as ckpt

    results, info = distributed_results
    folder = ckpt.latest_checkpoint(info["dir"] / "saved_run")
    assert folder is not None and folder.name == "step_00000001"
    model = TransformerLM(model_config(aux=True))
    ckpt.load_model_weights(folder, model)
    with torch.no_grad():
        logits = model(probe_ids()).logits
    two_rank_logits = results[0]["step/fsdp_ep/aux"]["probe_logits"]
    assert_close(logits, two_rank_logits, "logits after loading on 1 rank", atol=1e-5)
    # The optimiser state is the single-process one (same keys, full tensors).
    optimizer = adamw(model)
    ckpt.load_optimizer_state(folder, optimizer)
    reference = reference_step(aux=True)["optimizer"].state_dict()
    saved = optimizer.state_dict()
    assert saved["state"].keys() == reference["state"].keys()
    for index, entry in reference["state"].items():
        for key, value in entry.items():
            assert_close(saved["state"][index][key], value, f"optimizer state {index}/{key}", atol=1e-6)
    # Only rank 0 wrote, atomically: no temporary files left behind.
    assert not [p for p in folder.parent.rglob("*.tmp")]


@pytest.mark.parametrize("mode", list(LOAD_MODES))
def test_saved_on_one_rank_loads_on_two(distributed_results, mode):
    results, info = distributed_results
    for rank, result in enumerate(results):
        loaded = result[f"load/{mode}"]
        assert_close(loaded["logits"], info["single_logits"], f"rank {rank} logits", atol=1e-5)
        reference = info["single_optimizer"]
        assert loaded["optimizer"]["param_groups"] == reference["param_groups"]
        for index, entry in reference["state"].items():
            for key, value in entry.items():
                assert_close(loaded["optimizer"]["state"][index][key], value,
                             f"rank {rank} optimizer {index}/{key}")


# ---------------------------------------------------------------------------------------------
# Single-process tests (no process group)
# ---------------------------------------------------------------------------------------------


def test_parallel_config_rejects_bad_values():
    from mhmoe.distributed import ParallelConfig

    with pytest.raises(ValueError, match="dp='zero'"):
        ParallelConfig(dp="zero")
    with pytest.raises(ValueError, match="ep=0"):
        ParallelConfig(ep=0)
    with pytest.raises(ValueError, match=r"--ep 3: .*WORLD_SIZE=8.*\[1, 2, 4, 8\]"):
        ParallelConfig(ep=3).check_world_size(8)


def test_expert_count_must_divide_over_ep():
    from mhmoe.distributed import check_expert_parallel

    model = TransformerLM(model_config(aux=False, num_experts=6))
    check_expert_parallel(model, 2)
    check_expert_parallel(model, 3)
    with pytest.raises(ValueError, match=r"--ep 4: .*num_experts=6.*\[1, 2, 3, 6\]"):
        check_expert_parallel(model, 4)
    dense = TransformerLM(model_config(aux=False).replace(moe_ffn=None))
    with pytest.raises(ValueError, match="no MoE layer"):
        check_expert_parallel(dense, 2)


@pytest.mark.parametrize("num_experts", [40, 96])
def test_paper_expert_counts_divide_over_eight_ranks(num_experts):
    from mhmoe.distributed import check_expert_parallel

    layer = MHMoE(d_model=24, num_heads=3, num_experts=num_experts, top_k=3, d_expert=8)
    check_expert_parallel(layer, 8)


def test_single_process_context_needs_no_process_group(monkeypatch):
    from mhmoe.distributed import ParallelConfig, full_model_state_dict, init_distributed, parallelize

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    context = init_distributed(ParallelConfig(dp="fsdp"), device="cpu")
    assert not context.is_distributed and context.world_size == 1 and context.is_main
    assert context.ep_size == 1
    model = build_model(aux=False)
    pm = parallelize(model, context)
    assert pm.module is model and pm.model is model
    assert set(full_model_state_dict(pm)) == set(model.state_dict())


def test_source_to_expert_order():
    from mhmoe.distributed.expert_parallel import source_to_expert_order

    # 2 sources x 3 local experts; rows named (source, expert, index).
    counts = torch.tensor([[2, 0, 1], [1, 2, 0]])
    rows = [(0, 0, 0), (0, 0, 1), (0, 2, 0), (1, 0, 0), (1, 1, 0), (1, 1, 1)]
    order = source_to_expert_order(counts).tolist()
    assert [rows[i] for i in order] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 1, 0), (1, 1, 1), (0, 2, 0)]
    assert source_to_expert_order(torch.zeros(2, 3, dtype=torch.long)).numel() == 0


# ---------------------------------------------------------------------------------------------
# torchrun end to end: `mhmoe train` on 2 processes equals the single-process run
# ---------------------------------------------------------------------------------------------


def write_small_corpus(folder: Path) -> Path:
    import random

    words = "the expert router token head merge layer sparse dense mixture routes sub each".split()
    rng = random.Random(0)
    folder.mkdir(parents=True)
    for index in range(30):
        text = " ".join(rng.choice(words) for _ in range(400))
        (folder / f"doc{index:02d}.txt").write_text(text.capitalize() + ".\n", encoding="utf-8")
    return folder


def test_torchrun_train_equals_single_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m mhmoe.cli train --dp fsdp --ep 2` writes the run a single
    process writes: same losses per step, and a checkpoint load_run reads to the same logits."""
    from mhmoe.cli import main
    from mhmoe.runs.checkpoint import load_run
    from mhmoe.runs.metrics import read_metrics

    corpus = write_small_corpus(tmp_path / "text")
    common = [
        "train", "--preset", "tiny", "--variant", "mhmoe_h2", "--data", str(corpus),
        "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--max-steps", "3",
        "--quiet", "--threads", "1", "--eval-tokens", "256",
    ]
    assert main([*common, "--out", str(tmp_path / "single")]) == 0  # also fills the data cache
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "mhmoe.cli", *common, "--out", str(tmp_path / "two"), "--dp", "fsdp", "--ep", "2",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("finished at step 3") == 1  # rank 0 alone reports

    def steps(run: str) -> list[dict]:
        return [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]

    single, two = steps("single"), steps("two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for ours, theirs in zip(two, single):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (ours["step"], key)
    ids = probe_ids() % 300
    logits = []
    for run in ("single", "two"):
        model, _, _ = load_run(tmp_path / run)
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert_close(logits[1], logits[0], "logits of the 2-process run", atol=1e-5)


def test_torchrun_global_batch_balancing_equals_the_whole_batch(tmp_path):
    """`--load-balancing global-batch` through the real loop: one process on the whole batch
    (micro-batch 8), one process accumulating 4 micro-batches of 2, and `torchrun` with 2 DDP
    ranks x 2 micro-batches log the same loss, aux loss (f_i counted over the global batch)
    and gradient norm at every step (docs/load_balancing.md)."""
    from mhmoe.cli import main
    from mhmoe.runs.metrics import read_metrics

    corpus = write_small_corpus(tmp_path / "text")
    common = [
        "train", "--preset", "tiny", "--variant", "mhmoe_h2", "--data", str(corpus),
        "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--max-steps", "3", "--batch-size", "8",
        "--quiet", "--threads", "1", "--eval-tokens", "256", "--load-balancing", "global-batch",
        "--load-balancing-weight", "0.5",
    ]
    assert main([*common, "--micro-batch-size", "8", "--out", str(tmp_path / "whole")]) == 0
    assert main([*common, "--micro-batch-size", "2", "--out", str(tmp_path / "accumulated")]) == 0
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "mhmoe.cli", *common, "--micro-batch-size", "2", "--out", str(tmp_path / "two"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]

    def steps(run: str) -> list[dict]:
        return [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "loss" in r]

    whole = steps("whole")
    assert [r["step"] for r in whole] == [1, 2, 3] and whole[0]["aux_loss"] > 0.4  # the loss is on
    for run in ("accumulated", "two"):
        for ours, theirs in zip(steps(run), whole, strict=True):
            for key in ("loss", "aux_loss", "grad_norm"):
                assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (run, ours["step"], key)


# ---------------------------------------------------------------------------------------------
# Slow: 4 ranks (expert shards replicated twice)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_ranks_two_expert_replicas(tmp_path):
    """ep=2 on 4 ranks: every expert shard has 2 replicas whose gradients must be averaged."""
    results = run_ranks(tmp_path, 4, ("steps",))
    for aux in (False, True):
        reference = reference_step(aux)
        for mode in STEP_MODES:
            for rank, result in enumerate(results):
                step = result[f"step/{mode}/{'aux' if aux else 'noaux'}"]
                assert step["loss"] == pytest.approx(reference["loss"], rel=1e-5), (mode, rank)
                for name, grad in reference["grads"].items():
                    assert_close(step["grads"][name], grad, f"{mode} rank {rank} grad {name}")
