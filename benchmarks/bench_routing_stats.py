"""Overhead of collecting routing statistics during training (plain timers, not a test).

    python benchmarks/bench_routing_stats.py                       # CPU, small LM
    python benchmarks/bench_routing_stats.py --device cuda --d-model 768 --batch 16 --seq-len 1024

For each variant (SMoE top-1, MH-MoE h=3 top-3 with FLOPs-matched experts) it times a full
training step (forward, LM + auxiliary loss, backward, AdamW step) three ways, interleaved
round by round so that machine noise hits all of them alike:

* ``base``: no statistics;
* ``update``: ``RoutingStatsAccumulator.update(out.moe_aux)`` every step and ``summary()`` +
  ``reset()`` every ``--log-every`` steps (the trainer's use);
* ``update+entropy``: the same with ``attach(model)`` (router-entropy forward hooks).

It prints the fastest block of each (interference only adds time) and the overhead relative
to ``base``; then, as the steadier figures on a shared machine, the time per step of ``update``
alone and of the entropy hooks alone. On CUDA, steps are synchronised only at the end of each timed block,
so a host synchronisation inside ``update`` would show up as lost overlap.
"""

from __future__ import annotations

import argparse
import time

import torch

from mhmoe.analytics.accumulator import RoutingStatsAccumulator
from mhmoe.config import DenseConfig, ModelConfig, MoEConfig
from mhmoe.model import TransformerLM, lm_loss


def build(variant: str, d_model: int, num_layers: int, vocab: int, seq_len: int) -> TransformerLM:
    d_ff = 4 * d_model * 2 // 3  # SwiGLU at ~4d MLP cost
    if variant == "smoe":
        moe = MoEConfig(d_model=d_model, num_experts=8, top_k=1, d_expert=d_ff)
    elif variant == "mhmoe":
        # h = 3, top-3, 3x smaller experts, 12x as many: same active expert FLOPs as SMoE top-1
        moe = MoEConfig(d_model=d_model, num_experts=96, top_k=3, d_expert=max(8, d_ff // 3),
                        num_heads=3)
    else:
        raise ValueError(f"variant={variant!r}: must be 'smoe' or 'mhmoe'")
    config = ModelConfig(
        vocab_size=vocab, d_model=d_model, num_layers=num_layers,
        num_attention_heads=max(1, d_model // 64), max_seq_len=seq_len,
        dense_ffn=DenseConfig(d_model, d_ff), moe_ffn=moe,
    )
    return TransformerLM(config)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_block(model, optimizer, batches, stats, log_every, device) -> float:
    sync(device)
    start = time.perf_counter()
    for step, ids in enumerate(batches):
        out = model(ids)
        loss = lm_loss(out.logits[:, :-1], ids[:, 1:]) + out.aux_loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if stats is not None:
            stats.update(out.moe_aux)
            if (step + 1) % log_every == 0:
                stats.summary()
                stats.reset()
    sync(device)
    return (time.perf_counter() - start) / len(batches)


def bench_variant(variant: str, args, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build(variant, args.d_model, args.layers, args.vocab, args.seq_len).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
               for _ in range(args.steps)]
    plain = RoutingStatsAccumulator()
    hooked_model_stats = RoutingStatsAccumulator()
    modes = ["base", "update", "update+entropy"]
    times: dict[str, list[float]] = {m: [] for m in modes}
    timed_block(model, optimizer, batches[:2], plain, args.log_every, device)  # warm-up
    plain.reset()
    for _ in range(args.rounds):
        for mode in modes:
            if mode == "update+entropy":
                hooked_model_stats.attach(model)
                stats = hooked_model_stats
            else:
                stats = plain if mode == "update" else None
            times[mode].append(timed_block(model, optimizer, batches, stats, args.log_every,
                                           device))
            hooked_model_stats.detach()
    # update() alone, on the aux of one forward, per step
    with torch.no_grad():
        aux = model(batches[0]).moe_aux
    plain.reset()
    sync(device)
    start = time.perf_counter()
    for step in range(100):
        plain.update(aux)
        if (step + 1) % args.log_every == 0:
            plain.summary()
            plain.reset()
    sync(device)
    update_ms = (time.perf_counter() - start) / 100 * 1e3
    hook_ms = entropy_hook_cost_ms(model, batches[0], 50, device)
    # Minimum over rounds: interference from other processes only ever adds time.
    base = min(times["base"])
    tokens = args.batch * args.seq_len
    print(f"{variant}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{model.config.num_moe_layers} MoE layers, {tokens} tokens/step, device {device}")
    for mode in modes:
        best = min(times[mode])
        print(f"  {mode:15s} min {best * 1e3:9.2f} ms/step  overhead {100 * (best / base - 1):+6.2f}%"
              f"  (rounds: {', '.join(f'{t * 1e3:.1f}' for t in times[mode])})")
    print(f"  update() alone (+summary every {args.log_every}): {update_ms:.3f} ms/step "
          f"= {100 * update_ms / (base * 1e3):.2f}% of a base step")
    print(f"  entropy hooks alone: {hook_ms:.3f} ms/step "
          f"= {100 * hook_ms / (base * 1e3):.2f}% of a base step")


def entropy_hook_cost_ms(model, ids, repeats: int, device: torch.device) -> float:
    """Extra time of the router forwards of one step with the entropy hooks attached."""
    from mhmoe.layers.routing import TopKRouter

    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    inputs = []  # each router's input of one forward, captured once
    handles = [r.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
               for r in routers]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()

    def run_routers() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(repeats):
                for router, x in zip(routers, inputs):
                    router(x)
        sync(device)
        return (time.perf_counter() - start) / repeats

    stats = RoutingStatsAccumulator()
    plain = min(run_routers() for _ in range(3))
    stats.attach(model)
    hooked = min(run_routers() for _ in range(3))
    stats.detach()
    return max(0.0, hooked - plain) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=["smoe", "mhmoe"])
    parser.add_argument("--d-model", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per mode")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for variant in args.variants:
        bench_variant(variant, args, device)


if __name__ == "__main__":
    main()
