"""Hugging Face integration: export folders, Auto classes, cached generation, BitNet, lm-eval.

One tiny MH-MoE run (2 steps, trained through the CLI) and its export are shared by the module.
Tests that need transformers / lm-eval skip when those optional extras are missing; the
export and ``mhmoe generate`` tests need neither.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mhmoe.hf as mhmoe_hf
from mhmoe.cli import main
from mhmoe.config import BitNetConfig, DenseConfig, ModelConfig, MoEConfig
from mhmoe.hf.export import REQUIRED_FILES, ExportError, check_export_dir, export_model, load_hf_export
from mhmoe.hf.remote_code import remote_code_files
from mhmoe.model import TransformerLM, lm_loss
from mhmoe.runs.checkpoint import load_run

WORDS = "the sea is calm and blue ships sail over waves under a bright sky while birds fly home".split()


def _text(lines: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
        for _ in range(lines)
    ) + "\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf")
    data = root / "data.txt"
    data.write_text(_text(300), encoding="utf-8")
    out = root / "run"
    threads = torch.get_num_threads()  # training sets the process-wide thread count
    try:
        code = main(["train", "--preset", "tiny", "--variant", "mhmoe_h2", "--max-steps", "2",
                     "--data", str(data), "--out", str(out), "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return out


@pytest.fixture(scope="module")
def export_dir(run_dir) -> Path:
    out = run_dir.parent / "export"
    assert main(["export", str(run_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def run_model(run_dir):
    model, tokenizer, _ = load_run(run_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def hf():
    """transformers with the mhmoe classes registered."""
    transformers = pytest.importorskip("transformers")
    import mhmoe.hf

    mhmoe.hf.register()
    return transformers


def _ids(tokenizer, text: str = "The sea is calm and blue ships sail over the waves") -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)])


# ---------------------------------------------------------------------------------------------
# Export folder (no transformers needed)
# ---------------------------------------------------------------------------------------------


def test_export_writes_a_complete_folder_atomically(run_dir, export_dir, run_model):
    names = sorted(p.name for p in export_dir.iterdir())
    assert names == sorted([*REQUIRED_FILES, "generation_config.json", *remote_code_files()])
    config = check_export_dir(export_dir)
    assert config["model_type"] == "mhmoe" and config["architectures"] == ["MHMoEForCausalLM"]
    tokenizer = run_model[1]
    assert config["eos_token_id"] == config["bos_token_id"] == tokenizer.eot_id
    assert config["mhmoe_export"]["checkpoint"] == "step_00000002"
    tok_config = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == tok_config["bos_token"] == "<|endoftext|>"
    # Re-exporting replaces the earlier export; no temporary folders are left behind.
    assert main(["export", str(run_dir), str(export_dir)]) == 0
    assert not [p.name for p in export_dir.parent.iterdir() if p.name.startswith(".")]
    # A folder that is not an export is never overwritten.
    other = export_dir.parent / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_model(run_model[0], tokenizer, other)
    assert (other / "notes.txt").read_text() == "keep me"
    assert main(["export", str(run_dir), str(other)]) == 2


def test_transformers_free_loader_reproduces_the_run(export_dir, run_model):
    model, tokenizer = run_model
    loaded, loaded_tokenizer, _ = load_hf_export(export_dir)
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded_tokenizer.encode("The sea") == tokenizer.encode("The sea")


def test_missing_files_give_a_clear_error(export_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    (broken / "model.safetensors").unlink()
    (broken / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors, tokenizer\.json"):
        load_hf_export(broken)
    assert main(["generate", str(broken), "--prompt", "The"]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_cli_generate_streams_from_run_and_export(run_dir, export_dir, capsys):
    common = ["--prompt", "The sea", "--max-new-tokens", "8", "--temperature", "0"]
    assert main(["generate", str(run_dir), *common]) == 0
    from_run = capsys.readouterr().out
    assert main(["generate", str(export_dir), *common, "--no-cache"]) == 0
    from_export = capsys.readouterr().out
    assert from_run.startswith("The sea") and from_run == from_export
    sampled = ["--prompt", "The", "--max-new-tokens", "8", "--top-k", "5", "--seed", "3"]
    assert main(["generate", str(export_dir), *sampled]) == 0
    first = capsys.readouterr().out
    assert main(["generate", str(export_dir), *sampled]) == 0
    assert capsys.readouterr().out == first


def test_transformers_free_cached_decoding_matches_full_recompute(run_model):
    from mhmoe.decoding import generate_tokens

    model, tokenizer = run_model
    prompt = [tokenizer.eot_id, *tokenizer.encode("The sea")]
    cached = list(generate_tokens(model, prompt, 20, temperature=0))
    full = list(generate_tokens(model, prompt, 20, temperature=0, use_cache=False))
    assert cached == full and len(cached) > 0


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


def test_auto_classes_load_the_export_with_identical_logits(hf, export_dir, run_model):
    model, tokenizer = run_model
    hf_model = hf.AutoModelForCausalLM.from_pretrained(export_dir)  # no trust_remote_code
    assert type(hf_model).__name__ == "MHMoEForCausalLM" and not hf_model.training
    ids = _ids(tokenizer)
    with torch.no_grad():
        assert torch.equal(hf_model(ids).logits, model(ids).logits)
    hf_tokenizer = hf.AutoTokenizer.from_pretrained(export_dir)
    assert isinstance(hf_tokenizer, hf.PreTrainedTokenizerFast)
    assert hf_tokenizer.eos_token == hf_tokenizer.bos_token == "<|endoftext|>"
    assert hf_tokenizer("The sea")["input_ids"] == tokenizer.encode("The sea")  # no BOS, as `mhmoe generate`
    assert hf.AutoConfig.from_pretrained(export_dir).to_model_config() == model.config


def test_generate_with_and_without_cache_is_identical(hf, export_dir):
    model = hf.AutoModelForCausalLM.from_pretrained(export_dir)
    tok = hf.AutoTokenizer.from_pretrained(export_dir)
    single = tok("The sea", return_tensors="pt")
    batch = tok(["The sea", "Birds fly home under a bright"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0  # left padding
    for inputs in (single, batch):
        cached = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        uncached = model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)
    # The padded row continues exactly as the same prompt alone.
    alone = model.generate(**tok("The sea", return_tensors="pt"), max_new_tokens=12, do_sample=False)
    padded = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert padded[0, -12:].tolist() == alone[0, -12:].tolist()


def test_loss_and_routing_outputs(hf, export_dir, run_model):
    model, tokenizer = run_model
    hf_model = hf.AutoModelForCausalLM.from_pretrained(export_dir)
    first, second = _ids(tokenizer), _ids(tokenizer, "Ships sail over waves while birds fly home.")
    length = min(first.shape[1], second.shape[1])
    ids = torch.cat([first[:, :length], second[:, :length]])
    with torch.no_grad():
        reference = model(ids)
        plain = hf_model(ids, labels=ids)  # no routing outputs, no aux loss (Mixtral's rule) ...
        hf_model.train()
        trained = hf_model(ids, labels=ids)  # ... in training mode too
        hf_model.eval()
        routed = hf_model(ids, labels=ids, output_router_logits=True)
        labels = ids.clone()
        labels[:, :5] = -100
        masked = hf_model(ids, labels=labels)
    assert plain.aux_loss is None and plain.router_logits is None
    assert trained.aux_loss is None and trained.router_logits is None
    expected = lm_loss(reference.logits[:, :-1], ids[:, 1:])
    torch.testing.assert_close(plain.loss, expected)
    torch.testing.assert_close(routed.aux_loss, reference.aux_loss)
    torch.testing.assert_close(routed.loss, expected + reference.aux_loss)
    torch.testing.assert_close(masked.loss, lm_loss(reference.logits[:, 4:-1], ids[:, 5:]))
    moe = model.config.moe_ffn
    batch, seq = ids.shape
    heads = moe.num_heads
    # transformers' layout: num_moe_layers * H tensors (B*T, E), entry l * H + h = head h of layer l.
    assert len(routed.router_logits) == model.config.num_moe_layers * heads
    assert len(routed.expert_ids) == model.config.num_moe_layers == len(reference.moe_aux)
    for layer, (expert_ids, counts, aux) in enumerate(zip(routed.expert_ids, routed.tokens_per_expert,
                                                           reference.moe_aux)):
        logits = torch.stack(routed.router_logits[layer * heads:(layer + 1) * heads], dim=1)  # (B*T, H, E)
        assert logits.shape == (batch * seq, heads, moe.num_experts)
        assert expert_ids.shape == (batch, seq, heads, moe.top_k)
        assert torch.equal(expert_ids.reshape(-1, moe.top_k), aux.expert_ids)
        assert torch.equal(logits.topk(moe.top_k, dim=-1).indices, expert_ids.reshape(batch * seq, heads, -1))
        assert int(counts.sum()) == batch * seq * heads * moe.top_k


def test_import_hook_registers_when_transformers_is_first_imported(hf, export_dir):
    code = textwrap.dedent(f"""
        import sys
        import mhmoe.hf
        assert mhmoe.hf.install_import_hook()
        assert "transformers" not in sys.modules
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(export_dir)!r})
        print(type(model).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("MHMoEForCausalLM")


def test_in_memory_conversion_tied_embeddings_and_save_pretrained(hf, run_model, tmp_path):
    from mhmoe.config import DenseConfig, MoEConfig
    from mhmoe.hf.modeling import MHMoEForCausalLM

    tokenizer = run_model[1]
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.vocab_size, d_model=32, num_layers=2, num_attention_heads=2, max_seq_len=24,
        dense_ffn=DenseConfig(d_model=32, d_ff=64),
        moe_ffn=MoEConfig(d_model=32, num_experts=4, top_k=1, d_expert=16),  # SMoE, h = 1
        tie_embeddings=True,
    )
    lm = TransformerLM(config).eval()
    ids = _ids(tokenizer)
    with torch.no_grad():
        reference = lm(ids).logits
        converted = MHMoEForCausalLM.from_mhmoe(lm)
        assert converted.lm_head.weight is converted.model.embed_tokens.weight
        assert torch.equal(converted(ids).logits, reference)
        assert torch.equal(converted.to_mhmoe()(ids).logits, reference)
        export_model(lm, tokenizer, tmp_path / "export")
        loaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "export")
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(loaded(ids).logits, reference)
        loaded.save_pretrained(tmp_path / "saved")
        assert (tmp_path / "saved" / "model.safetensors").is_file()
        assert torch.equal(hf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, reference)


def test_fresh_model_initialisation_and_config_validation(hf):
    from mhmoe.hf.configuration import MHMoEConfig
    from mhmoe.hf.modeling import MHMoEForCausalLM

    config = MHMoEConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
        moe_ffn={"kind": "moe", "d_model": 16, "num_experts": 4, "top_k": 2, "d_expert": 8, "num_heads": 2},
    )
    model = MHMoEForCausalLM(config)
    experts = model.model.layers[1].ffn.experts
    for weight in (experts.w1, experts.w3, experts.w2):
        assert weight.abs().max() <= weight.shape[-1] ** -0.5 and weight.std() > 0
    assert torch.equal(model.model.norm.weight, torch.ones(16))
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    with pytest.raises(ValueError, match=r"d_model=16 is not divisible by num_attention_heads=3"):
        MHMoEConfig(hidden_size=16, num_attention_heads=3)


def test_bitnet_export_round_trip(hf, run_model, tmp_path):
    from mhmoe.bitnet import convert as quant

    base, tokenizer = run_model
    lm = quant.apply_bitnet(TransformerLM(base.config), True)
    lm.load_state_dict(base.state_dict(), strict=False)  # missing: only the inner norm gains (1)
    lm.eval()
    ids = _ids(tokenizer)
    with torch.no_grad():
        reference = lm(ids).logits
        export_model(lm, tokenizer, tmp_path / "bitnet")
        config = json.loads((tmp_path / "bitnet" / "config.json").read_text())
        assert config["bitnet"] == lm.config.bitnet.to_dict() == BitNetConfig().to_dict()
        loaded = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "bitnet")
        assert quant.bitnet_modules(loaded.model) and type(loaded.lm_head) is torch.nn.Linear
        assert torch.equal(loaded(ids).logits, reference)
        loaded.save_pretrained(tmp_path / "saved")
        again = hf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        assert torch.equal(again(ids).logits, reference)
        assert torch.equal(load_hf_export(tmp_path / "bitnet")[0](ids).logits, reference)


def test_from_pretrained_names_missing_weights(hf, export_dir, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(export_dir, broken)
    (broken / "model.safetensors").unlink()
    (broken / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"missing model\.safetensors.*safetensors only"):
        hf.AutoModelForCausalLM.from_pretrained(broken)


# ---------------------------------------------------------------------------------------------
# lm-evaluation-harness
# ---------------------------------------------------------------------------------------------


def test_lm_eval_rolling_loglikelihood_offline(hf, export_dir, run_model, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs lm-eval[hf] (accelerate)")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import lm_eval
    from lm_eval.tasks import TaskManager

    docs = ["The sea is calm.", "Birds fly home under a bright sky.", "Ships sail over waves and the sea is blue."]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_text.yaml").write_text(textwrap.dedent(f"""\
        task: mhmoe_tiny_text
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {tmp_path / "datasets"}
        output_type: loglikelihood_rolling
        test_split: test
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: byte_perplexity
          - metric: bits_per_byte
        metadata:
          version: 1.0
        """))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(export_dir), "dtype": "float32"},
        tasks=["mhmoe_tiny_text"],
        task_manager=TaskManager(include_path=str(tasks)),
        batch_size=1,
        device="cpu",
        bootstrap_iters=0,
        log_samples=False,
    )
    metrics = results["results"]["mhmoe_tiny_text"]
    # The same numbers by hand: every document fits one window, conditioned on <|endoftext|>.
    model, tokenizer = run_model
    expected = rolling_metrics_by_hand(model, tokenizer, docs)
    for name in ("bits_per_byte", "word_perplexity", "byte_perplexity"):
        assert metrics[f"{name},none"] == pytest.approx(expected[name], rel=1e-4)


def test_hf_model_carries_load_balancing_and_is_dropless_in_eval(hf):
    """Issue 15: the HF config carries --load-balancing (in moe_ffn) and --seq-aux-loss-weight;
    the aux-free bias is part of the weights; an HF model in eval mode (as from_pretrained
    returns it) is dropless whatever the training capacity."""
    from mhmoe.config import DenseConfig, MoEConfig
    from mhmoe.hf.configuration import MHMoEConfig
    from mhmoe.hf.modeling import MHMoEForCausalLM

    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, num_experts=4, top_k=2, d_expert=16, num_heads=2, capacity_factor=0.5,
                    load_balancing="aux-free")
    lm = TransformerLM(ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_attention_heads=2,
                                   max_seq_len=16, dense_ffn=DenseConfig(32, 64), moe_ffn=moe, moe_every=1,
                                   seq_aux_loss_weight=1e-4))
    with torch.no_grad():
        for name, buffer in lm.named_buffers():
            buffer.copy_(torch.linspace(-0.01, 0.01, buffer.numel()))
    model = MHMoEForCausalLM.from_mhmoe(lm)
    config = MHMoEConfig.from_dict(model.config.to_dict())
    assert config.moe_ffn["load_balancing"] == "aux-free" and config.seq_aux_loss_weight == 1e-4
    back = model.to_mhmoe()
    for (name, ours), (_, theirs) in zip(lm.named_buffers(), back.named_buffers()):
        assert torch.equal(ours, theirs), name
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert all(float(a.dropped_fraction) > 0 for a in lm.train()(ids).moe_aux)  # capacity binds
    model.eval()
    lm.eval()
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
        torch.testing.assert_close(out.logits, lm(ids).logits, rtol=0, atol=0)
        dropless = copy_without_capacity(lm)
        torch.testing.assert_close(out.logits, dropless(ids).logits, rtol=0, atol=0)
    # aux-free: no load-balancing loss, only the sequence-wise one.
    with torch.no_grad():
        expected = 1e-4 * sum(float(a.seq_balance_loss) for a in lm(ids).moe_aux) / 2
    assert float(out.aux_loss) == pytest.approx(expected, rel=1e-5)


def copy_without_capacity(lm: TransformerLM) -> TransformerLM:
    other = copy.deepcopy(lm)
    for block in other.blocks:
        if block.is_moe:
            block.ffn.capacity_factor = None
    return other


# ---------------------------------------------------------------------------------------------
# Issue 14: HF MoE conventions, gradient checkpointing, generation defaults, BOS
# ---------------------------------------------------------------------------------------------


def test_router_logits_fit_transformers_load_balancing_loss_with_padding(hf, export_dir):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = hf.AutoModelForCausalLM.from_pretrained(export_dir, router_aux_loss_coef=0.0)
    assert model.config.load_balancing_weight == 0.0 == model.config.router_aux_loss_coef
    tok = hf.AutoTokenizer.from_pretrained(export_dir)
    batch = tok(["The sea", "Birds fly home under a bright sky"], return_tensors="pt", padding=True)
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"], output_router_logits=True)
    moe = model.config.moe_ffn
    experts, top_k = moe["num_experts"], moe["top_k"]
    # router_aux_loss_coef=0 and no z-loss: nothing is added to the LM loss.
    assert float(out.aux_loss) == 0.0
    got = load_balancing_loss_func(out.router_logits, experts, top_k, mask)
    # By hand over the real (unpadded) sub-tokens of every layer and head: E * sum_i f_i P_i.
    rows = torch.cat([logits[mask.reshape(-1).bool()] for logits in out.router_logits])  # (R, E)
    probs = rows.softmax(dim=-1)
    counts = torch.zeros(experts).scatter_add_(0, probs.topk(top_k, dim=-1).indices.reshape(-1),
                                                torch.ones(rows.shape[0] * top_k))
    expected = experts * float((counts / rows.shape[0] * probs.mean(dim=0)).sum())
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(hf, export_dir, run_model):
    ids = _ids(run_model[1])
    results = []
    for checkpointing in (False, True):
        model = hf.AutoModelForCausalLM.from_pretrained(export_dir)
        assert model.supports_gradient_checkpointing
        if checkpointing:
            model.gradient_checkpointing_enable()  # the name Trainer and most users call (deprecated alias)
            assert model.model.gradient_checkpointing
        model.train()
        out = model(ids, labels=ids, output_router_logits=True, use_cache=False)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), out.aux_loss.detach(), grads))
    (loss, aux, grads), (loss_ckpt, aux_ckpt, grads_ckpt) = results
    assert torch.equal(loss, loss_ckpt) and torch.equal(aux, aux_ckpt) and float(aux) > 0
    assert grads.keys() == grads_ckpt.keys() and any("router" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)
    model = hf.AutoModelForCausalLM.from_pretrained(export_dir)
    with pytest.raises(ValueError, match="use_reentrant=True: not supported"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.train()(ids)


def test_checkpointing_every_n_layers_is_refused_naming_the_value(hf):
    """mhmoe models checkpoint every block: another every_n_layers is an error, not ignored."""
    torch.manual_seed(0)
    lm = TransformerLM(ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_attention_heads=2, max_seq_len=16,
                                   dense_ffn=DenseConfig(32, 64), moe_every=1,
                                   moe_ffn=MoEConfig(32, num_experts=4, top_k=2, d_expert=16, num_heads=2)))
    model = mhmoe_hf.MHMoEForCausalLM.from_mhmoe(lm)
    with pytest.raises(ValueError, match=r"every_n_layers=2: mhmoe models checkpoint every block"):
        model.activation_checkpointing_enable(every_n_layers=2)
    assert not model.model.gradient_checkpointing
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"every_n_layers=3"):
        model.gradient_checkpointing_enable(every_n_layers=3)  # the deprecated name
    model.activation_checkpointing_enable(every_n_layers=1)
    assert model.model.gradient_checkpointing
    model.activation_checkpointing_disable()
    assert not model.model.gradient_checkpointing


def test_generate_clamps_to_the_context_with_a_clear_warning(hf, export_dir, caplog):
    model = hf.AutoModelForCausalLM.from_pretrained(export_dir)
    tok = hf.AutoTokenizer.from_pretrained(export_dir)
    inputs = tok("The sea", return_tensors="pt")
    context = model.config.max_position_embeddings
    with caplog.at_level("WARNING", logger="mhmoe.hf.modeling"):
        out = model.generate(**inputs, max_new_tokens=10 * context, do_sample=False, eos_token_id=None)
    assert out.shape[1] == context
    assert f"max_new_tokens={10 * context}" in caplog.text and f"max_position_embeddings={context}" in caplog.text
    with pytest.raises(ValueError, match=f"must be shorter than the context length max_position_embeddings={context}"):
        model.generate(torch.zeros((1, context), dtype=torch.long), max_new_tokens=1)


def test_hf_greedy_text_equals_mhmoe_generate(hf, export_dir, capsys):
    model = hf.AutoModelForCausalLM.from_pretrained(export_dir)
    tok = hf.AutoTokenizer.from_pretrained(export_dir)
    prompt = "Ships sail over"
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    hf_text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert main(["generate", str(export_dir), "--prompt", prompt, "--max-new-tokens", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == prompt + hf_text + "\n"


def test_python_dash_m_mhmoe_runs_the_cli():
    for module in ("mhmoe", "mhmoe.cli"):
        result = subprocess.run([sys.executable, "-m", module, "export", "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.startswith("usage: mhmoe export"), module


def test_trainer_with_gradient_checkpointing_and_router_aux_loss(hf, export_dir, run_model, tmp_path):
    pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate")
    model = hf.AutoModelForCausalLM.from_pretrained(export_dir, output_router_logits=True)
    ids = _ids(run_model[1])[0].tolist()
    rows = [{"input_ids": ids, "labels": ids} for _ in range(4)]
    args = hf.TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=2,
                                gradient_checkpointing=True, use_cpu=True, report_to=[], save_strategy="no",
                                logging_steps=1, learning_rate=1e-3, disable_tqdm=True)
    trainer = hf.Trainer(model=model, args=args, train_dataset=rows)
    before = model.model.layers[1].ffn.router.weight.detach().clone()
    result = trainer.train()
    assert model.model.gradient_checkpointing and math.isfinite(result.training_loss)
    assert not torch.equal(model.model.layers[1].ffn.router.weight, before)  # the router was trained


def rolling_metrics_by_hand(model, tokenizer, docs: list[str]) -> dict[str, float]:
    """lm-eval's rolling log-likelihood metrics computed directly with mhmoe's model: every
    document fits one window and is conditioned on <|endoftext|>."""
    total_ll, words, num_bytes = 0.0, 0, 0
    with torch.no_grad():
        for doc in docs:
            ids = [tokenizer.eot_id, *tokenizer.encode(doc)]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
            total_ll += float(logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).sum())
            words += len(doc.split())
            num_bytes += len(doc.encode("utf-8"))
    return {"bits_per_byte": -total_ll / num_bytes / math.log(2),
            "word_perplexity": math.exp(-total_ll / words),
            "byte_perplexity": math.exp(-total_ll / num_bytes)}
