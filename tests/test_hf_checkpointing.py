"""Activation checkpointing of mhmoe's own model and of `mhmoe train --activation-checkpointing`
(issue 14): the same outputs, losses and gradients as without."""

from __future__ import annotations

import json
import random

import torch

from mhmoe.cli import main
from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
from mhmoe.layers.experts import grouped_mm_supported
from mhmoe.model import TransformerLM, lm_loss

WORDS = "the sea is calm and blue ships sail over waves under a bright sky while birds fly home".split()


def test_transformer_lm_checkpointing_gives_equal_forward_and_backward():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=48, num_layers=3, num_attention_heads=2, max_seq_len=16,
                         dense_ffn=DenseConfig(48, 96), moe_every=1, z_loss_weight=1e-3,
                         moe_ffn=MoEConfig(48, num_experts=4, top_k=2, d_expert=16, num_heads=3, shared_d_ff=24))
    model = TransformerLM(config).train()
    ids = torch.randint(0, 64, (2, 16))
    results = []
    for checkpointing in (True, False):
        # The first forward of the process probes torch._grouped_mm (a cached autograd check);
        # under checkpointing its tensors must not count among the block's saved ones.
        grouped_mm_supported.cache_clear()
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        out = model(ids)
        loss = lm_loss(out.logits[:, :-1], ids[:, 1:]) + out.aux_loss
        loss.backward()
        results.append((loss.detach(), out.aux_loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_c, aux_c, grads_c), (loss, aux, grads) = results
    assert torch.equal(loss, loss_c) and torch.equal(aux, aux_c) and float(aux) > 0
    for name, grad in grads.items():
        assert torch.equal(grad, grads_c[name]), name


def test_train_with_activation_checkpointing_logs_the_same_losses(tmp_path):
    rng = random.Random(0)
    (tmp_path / "data.txt").write_text("\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(300)) + "\n")
    losses = {}
    for name, extra in (("plain", []), ("checkpointed", ["--activation-checkpointing"])):
        out = tmp_path / name
        threads = torch.get_num_threads()
        try:
            assert main(["train", "--preset", "tiny", "--variant", "mhmoe_h2", "--max-steps", "3",
                         "--data", str(tmp_path / "data.txt"), "--out", str(out), "--quiet", "--threads", "1",
                         *extra]) == 0
        finally:
            torch.set_num_threads(threads)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [row["loss"] for row in rows if "loss" in row]
    assert len(losses["plain"]) >= 3 and losses["plain"] == losses["checkpointed"]
