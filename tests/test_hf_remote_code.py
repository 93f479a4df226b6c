"""Export folders as other tools see them: loaded with ``trust_remote_code=True`` in a Python that
cannot import mhmoe, and by the stock ``lm_eval`` command (issue 14).

The subprocesses run ``python -I`` (no PYTHONPATH, no user site, no script folder) and drop every
``sys.path`` entry holding an ``mhmoe`` package (the editable install's .pth adds ``src/``), then
assert that ``import mhmoe`` fails before loading anything.
"""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_hf import rolling_metrics_by_hand

from mhmoe.cli import main
from mhmoe.config import BitNetConfig, DenseConfig, ModelConfig, MoEConfig
from mhmoe.data.tokenizer import train_tokenizer
from mhmoe.decoding import generate_tokens
from mhmoe.hf.export import export_model
from mhmoe.hf.remote_code import AUTO_MAP, RemoteCodeError, _generate, remote_code_files
from mhmoe.model import TransformerLM
from mhmoe.runs.checkpoint import load_run

pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM

from mhmoe.hf.modeling import MHMoEForCausalLM

WORDS = "the sea is calm and blue ships sail over waves under a bright sky while birds fly home".split()
PROMPT = "The sea is calm and"
NEW_TOKENS = 8

# Run first in every subprocess: mhmoe must be unreachable.
ISOLATE = textwrap.dedent("""\
    import os, sys
    sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "mhmoe"))]
    try:
        import mhmoe
    except ImportError:
        pass
    else:
        raise SystemExit(f"mhmoe is importable from {mhmoe.__file__}: the isolation failed")
    """)


def _text(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n".join(
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
        for _ in range(lines)
    ) + "\n"


def _without_imports(source: str) -> list[str]:
    """The lines of ``source`` outside its import statements."""
    lines = source.splitlines()
    drop = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            drop.update(range(node.lineno - 1, node.end_lineno))
    return [line for index, line in enumerate(lines) if index not in drop]


def run_isolated(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(cwd / "hf-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-I", "-c", ISOLATE + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    (root / "data.txt").write_text(_text(300), encoding="utf-8")
    threads = torch.get_num_threads()
    try:
        code = main(["train", "--preset", "tiny", "--variant", "mhmoe_h2", "--max-steps", "2",
                     "--data", str(root / "data.txt"), "--out", str(root / "run"), "--quiet", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return root / "run"


def _variants(vocab_size: int) -> dict[str, ModelConfig]:
    def model(moe: MoEConfig | None, **extra) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, d_model=48, num_layers=2, num_attention_heads=2, max_seq_len=32,
                           dense_ffn=DenseConfig(48, 96), moe_ffn=moe, moe_every=1, **extra)

    return {
        "dense": model(None),
        "smoe_shared_expert": model(MoEConfig(48, num_experts=4, top_k=2, d_expert=24, shared_d_ff=32)),
        "fine_grained_tied": model(MoEConfig(48, num_experts=8, top_k=4, d_expert=12), tie_embeddings=True),
        "mhmoe_h3_shared_aux_free": model(MoEConfig(48, num_experts=4, top_k=2, d_expert=16, num_heads=3,
                                                    shared_d_ff=24, load_balancing="aux-free")),
        "bitnet_mhmoe_h2": model(MoEConfig(48, num_experts=4, top_k=2, d_expert=24, num_heads=2),
                                 bitnet=BitNetConfig(quantize_router=True)),
    }


@pytest.fixture(scope="module")
def exports(run_dir) -> tuple[Path, dict[str, dict]]:
    """Folders of the run and of every variant, with their reference logits and greedy tokens."""
    root = run_dir.parent / "exports"
    root.mkdir()
    model, tokenizer, _ = load_run(run_dir)
    assert main(["export", str(run_dir), str(root / "run")]) == 0
    models = {"run": model}
    torch.manual_seed(0)
    for name, config in _variants(model.config.vocab_size).items():
        lm = TransformerLM(config)
        with torch.no_grad():  # non-trivial buffers (the aux-free selection bias)
            for buffer in lm.buffers():
                buffer.copy_(torch.linspace(-0.05, 0.05, buffer.numel()).view_as(buffer))
        export_model(lm.eval(), tokenizer, root / name)
        models[name] = lm
    prompt = tokenizer.encode(PROMPT)  # as `mhmoe generate` and the exported tokenizer: no BOS
    references = {}
    for name, lm in models.items():
        lm.eval()
        with torch.no_grad():
            logits = lm(torch.tensor([prompt])).logits
        greedy = list(generate_tokens(lm, prompt, NEW_TOKENS, temperature=0, eos_id=tokenizer.eot_id))
        references[name] = {"logits": logits, "greedy": greedy, "prompt": prompt}
    return root, references


def test_generated_modeling_code_equals_the_package_source(exports):
    root, _ = exports
    files = remote_code_files()
    assert {"configuration_mhmoe.py", "modeling_mhmoe.py", "mhmoe_model.py", "mhmoe_layers_moe.py"} <= set(files)
    for folder in (root / "run", root / "bitnet_mhmoe_h2"):
        # The export writes every generated file and no other .py file (the same generator made
        # both, so this checks the writing, not drift).
        assert sorted(p.name for p in folder.glob("*.py")) == sorted(files)
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == AUTO_MAP
    # The drift check: each file is its package module, as it is now on disk, with only the
    # mhmoe imports rewritten.
    package = Path(__import__("mhmoe").__file__).parent
    for name, source in files.items():
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 or not (node.module or "").startswith("mhmoe"), (name, node.module)
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "mhmoe" for a in node.names), name
        origin = source.splitlines()[0].split("Generated from mhmoe/")[1].split(" ")[0]
        original = (package / origin).read_text(encoding="utf-8")
        assert _without_imports("".join(source.splitlines(keepends=True)[2:])) == _without_imports(original), name
    # Heavy parts of the package stay out of the folder (data, runs, training, CLI).
    assert not [n for n in files if n.startswith(("mhmoe_data", "mhmoe_runs", "mhmoe_training", "mhmoe_cli"))]


@pytest.mark.parametrize(("source", "rule"), [
    ("from mhmoe import MoEConfig\n", r"from mhmoe import MoEConfig.*package's __init__"),
    ("import mhmoe.model\n", r"import mhmoe.model.*'import mhmoe.x.y as z'"),
    ("from .model import TransformerLM\n", r"relative import 'from .model import"),
    ("x = 1; from mhmoe.model import TransformerLM\n", r"put the mhmoe import on lines of its own"),
    # Modules named by strings would not be rewritten (nor copied): refused outside __name__ guards.
    ("import importlib\nmoe = importlib.import_module('mhmoe.layers.moe')\n",
     r"probe.py:2: the string 'mhmoe.layers.moe' names an mhmoe module"),
    ("def load(name):\n    return __import__(f'mhmoe.layers.{name}')\n",
     r"probe.py:2: the string 'mhmoe.layers.' names an mhmoe module"),
    ("if __name__ == 'mhmoe.probe':\n    pass\nPATH = 'mhmoe.model.TransformerLM'\n",
     r"probe.py:3: the string 'mhmoe.model.TransformerLM'"),
])
def test_unsupported_import_forms_are_refused(tmp_path, monkeypatch, source, rule):
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    monkeypatch.setattr("mhmoe.hf.remote_code._source_path", lambda module: probe)
    monkeypatch.setattr("mhmoe.hf.remote_code._package_root", lambda: tmp_path)
    with pytest.raises(RemoteCodeError, match=rule):
        _generate("mhmoe.probe")


def test_module_strings_inside_a_name_guard_are_kept(tmp_path, monkeypatch):
    """A ``__name__`` guard (code that runs only in the package) and a docstring may name mhmoe
    modules: the copy keeps them unchanged, as the guards of mhmoe.hf.modeling / configuration."""
    probe = tmp_path / "probe.py"
    source = ('"""mhmoe.probe: a docstring may name modules."""\n'
              "import importlib\n"
              "if __name__ == 'mhmoe.probe':\n"
              "    generator = importlib.import_module('mhmoe.hf.remote_code')\n")
    probe.write_text(source)
    monkeypatch.setattr("mhmoe.hf.remote_code._source_path", lambda module: probe)
    monkeypatch.setattr("mhmoe.hf.remote_code._package_root", lambda: tmp_path)
    text, needed = _generate("mhmoe.probe")
    assert text.splitlines(keepends=True)[2:] == source.splitlines(keepends=True) and needed == []


def test_export_cli_reports_a_remote_code_failure_in_one_line(run_dir, tmp_path, monkeypatch, capsys):
    """A package source that the remote-code copy cannot carry fails ``mhmoe export`` with exit
    status 2 and one line (RemoteCodeError is an ExportError, a ValueError), writing nothing."""
    def refuse() -> dict[str, str]:
        raise RemoteCodeError("mhmoe/model.py:3: the string 'mhmoe.layers.moe' names an mhmoe module")

    monkeypatch.setattr("mhmoe.hf.export.remote_code_files", refuse)
    out = tmp_path / "out"
    assert main(["export", str(run_dir), str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "mhmoe export: error: mhmoe/model.py:3: the string 'mhmoe.layers.moe' names an mhmoe module")
    assert not out.exists()


def test_save_pretrained_of_a_package_model_loads_without_mhmoe(tmp_path):
    """``save_pretrained`` of a model of the package (loaded from an export with mhmoe imported,
    or built with ``from_mhmoe``, whose config had no auto_map) writes the generated modeling
    files and auto_map: the folder loads where mhmoe cannot be imported, with equal logits."""
    tokenizer = train_tokenizer([_text(50)], 300)
    torch.manual_seed(0)
    lm = TransformerLM(_variants(tokenizer.vocab_size)["mhmoe_h3_shared_aux_free"]).eval()
    export_model(lm, tokenizer, tmp_path / "export")
    models = {"loaded": AutoModelForCausalLM.from_pretrained(tmp_path / "export"),  # mhmoe's own class
              "from_mhmoe": MHMoEForCausalLM.from_mhmoe(lm)}
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    references = {}
    files = remote_code_files()
    for name, model in models.items():
        assert type(model).__module__ == "mhmoe.hf.modeling"
        model.save_pretrained(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).glob("*.py")) == sorted(files)
        assert json.loads((tmp_path / name / "config.json").read_text())["auto_map"] == AUTO_MAP
        assert not list((tmp_path / name).glob(".*"))  # no temporary files left behind
        with torch.no_grad():
            references[name] = model.eval()(ids).logits
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM
        for name in {sorted(models)!r}:
            model = AutoModelForCausalLM.from_pretrained(name, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            with torch.no_grad():
                logits = model(input_ids=torch.tensor({ids.tolist()!r})).logits
            save_file({{"logits": logits.contiguous()}}, name + "-logits.safetensors")
    """)
    result = run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for name, reference in references.items():
        logits = load_file(str(tmp_path / f"{name}-logits.safetensors"))["logits"]
        assert torch.equal(logits, reference), (name, float((logits - reference).abs().max()))


def test_save_pretrained_push_to_hub_uploads_after_writing_the_modeling_code(tmp_path, monkeypatch):
    """transformers uploads inside save_pretrained, before the modeling files would exist: the
    override saves locally, then hands the upload to push_to_hub (which saves again, with them)."""
    torch.manual_seed(0)
    model = MHMoEForCausalLM.from_mhmoe(TransformerLM(_variants(64)["dense"]))
    pushed = []

    def push_to_hub(repo_id, **options):
        assert (tmp_path / "model" / "modeling_mhmoe.py").is_file()  # the local folder is complete
        pushed.append((repo_id, options))

    monkeypatch.setattr(model, "push_to_hub", push_to_hub)
    model.save_pretrained(tmp_path / "model", push_to_hub=True, repo_id="someone/mhmoe-tiny", commit_message="tiny")
    assert pushed == [("someone/mhmoe-tiny", {"token": None, "max_shard_size": "50GB", "commit_message": "tiny"})]


def test_every_variant_loads_without_mhmoe_with_identical_logits(exports):
    root, references = exports
    code = textwrap.dedent(f"""
        import json, torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        root = {str(root)!r}
        summary = {{}}
        for name in {sorted(references)!r}:
            path = f"{{root}}/{{name}}"
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
            ids = tokenizer({PROMPT!r}, return_tensors="pt")
            with torch.no_grad():
                logits = model(input_ids=ids["input_ids"]).logits
            out = model.generate(**ids, max_new_tokens={NEW_TOKENS}, do_sample=False)
            save_file({{"logits": logits.contiguous()}}, f"{{root}}/{{name}}-logits.safetensors")
            summary[name] = {{"class": type(model).__module__ + "." + type(model).__name__,
                             "prompt": ids["input_ids"][0].tolist(),
                             "greedy": out[0, ids["input_ids"].shape[1]:].tolist()}}
        # A pipeline with its defaults (256 sampled new tokens, past the 32-token context).
        generator = pipeline("text-generation", model=f"{{root}}/run", trust_remote_code=True)
        summary["pipeline"] = generator("The sea")[0]["generated_text"]
        import sys
        summary["mhmoe_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "mhmoe")
        print("SUMMARY" + json.dumps(summary))
    """)
    result = run_isolated(code, root)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads(result.stdout.split("SUMMARY", 1)[1])
    assert summary["mhmoe_modules"] == []
    assert summary["pipeline"].startswith("The sea")
    assert "max_new_tokens=256" in result.stderr and "max_position_embeddings=32" in result.stderr
    for name, reference in references.items():
        got = summary[name]
        assert got["class"].startswith("transformers_modules.") and got["class"].endswith("MHMoEForCausalLM")
        assert got["prompt"] == reference["prompt"], name
        logits = load_file(str(root / f"{name}-logits.safetensors"))["logits"]
        assert torch.equal(logits, reference["logits"]), (name, float((logits - reference["logits"]).abs().max()))
        greedy = got["greedy"]
        assert greedy[:len(reference["greedy"])] == reference["greedy"], name


def test_stock_lm_eval_command_on_an_export(exports, run_dir):
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate", reason="lm-eval's hf model needs lm-eval[hf] (accelerate)")
    script = Path(sys.executable).parent / "lm_eval"
    if not script.is_file():
        pytest.skip("the lm_eval console script is not installed next to this Python")
    root, _ = exports
    docs = ["The sea is calm.", "Birds fly home under a bright sky.", "Ships sail over waves and the sea is blue."]
    work = root.parent / "lm-eval"
    (work / "tasks").mkdir(parents=True)
    data = work / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    (work / "tasks" / "tiny_text.yaml").write_text(textwrap.dedent(f"""\
        task: mhmoe_tiny_text
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {work / "datasets"}
        output_type: loglikelihood_rolling
        test_split: test
        doc_to_text: ""
        doc_to_target: "{{{{text}}}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
        metadata:
          version: 1.0
        """))
    argv = ["lm_eval", "--model", "hf", "--model_args",
            f"pretrained={root / 'run'},trust_remote_code=True,dtype=float32",
            "--tasks", "mhmoe_tiny_text", "--include_path", str(work / "tasks"), "--device", "cpu",
            "--batch_size", "1", "--output_path", str(work / "out")]
    code = f"\nimport runpy\nsys.argv = {argv!r}\nrunpy.run_path({str(script)!r}, run_name='__main__')\n"
    result = run_isolated(code, work, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    [results_file] = (work / "out").rglob("results_*.json")
    metrics = json.loads(results_file.read_text())["results"]["mhmoe_tiny_text"]
    # The same numbers by hand with mhmoe's own model: each document conditioned on <|endoftext|>.
    model, tokenizer, _ = load_run(run_dir)
    expected = rolling_metrics_by_hand(model, tokenizer, docs)
    for name in ("bits_per_byte", "word_perplexity"):
        assert metrics[f"{name},none"] == pytest.approx(expected[name], rel=1e-4)


def test_ternary_export_refuses_transformers_with_one_clear_line(run_dir, tmp_path):
    """A --ternary folder is mhmoe's packed format, not a transformers folder: loading it with
    transformers fails with one line that says what to do instead."""
    bitnet_run = tmp_path / "bitnet-run"
    (tmp_path / "data.txt").write_text(_text(300), encoding="utf-8")
    assert main(["train", "--preset", "tiny", "--variant", "mhmoe_h2", "--bitnet", "--max-steps", "1",
                 "--data", str(tmp_path / "data.txt"), "--out", str(bitnet_run), "--quiet", "--threads", "1"]) == 0
    out = tmp_path / "ternary"
    assert main(["export", str(bitnet_run), str(out), "--ternary"]) == 0
    code = textwrap.dedent(f"""
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
        except Exception as err:
            print("ERROR " + type(err).__name__ + ": " + str(err))
    """)
    result = run_isolated(code, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    line = result.stdout.split("ERROR ", 1)[1].strip()
    assert "\n" not in line
    assert "packed ternary" in line and "export without --ternary" in line
