"""Tests of the data pipeline (mhmoe.data): tokenizer, sources, caches, splits, batching.

Every test builds its own tiny corpus under tmp_path; nothing is downloaded. Optional
dependencies (pyarrow, datasets) are exercised when installed and skipped otherwise; their
"missing package" errors are tested by hiding the module.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from mhmoe.cli.options import parse_byte_size
from mhmoe.cli.prepare_data import register
from mhmoe.data import (
    EOT_TOKEN,
    IGNORE_INDEX,
    CorruptCacheError,
    MissingDependencyError,
    TextTokenizer,
    TrainBatchSampler,
    bits_per_byte,
    cache_paths,
    cap_bytes,
    count_eval_windows,
    eval_batches,
    hf_source,
    load_tokenizer,
    open_source,
    parse_eval_spec,
    parse_eval_specs,
    parse_hf_spec,
    prepare_data,
    prepare_eval_sets,
    split_heldout,
    stdlib_source,
    token_dtype,
    train_tokenizer,
)
from mhmoe.data import prepare as prepare_module
from mhmoe.data.cache import file_sha256
from mhmoe.data.sources import list_stdlib_files, read_documents

# ------------------------------------------------------------------------------------------------
# Helpers

WORDS = "the of expert router token head merge split layer model data train loss byte café naïve 数据 😀".split()


def make_text(seed: int, n_words: int = 200) -> str:
    """Deterministic pseudo-English with some non-ASCII, enough for BPE to find merges."""
    rng = random.Random(seed)
    lines = []
    for _ in range(max(1, n_words // 10)):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(10)) + rng.choice([".", ",", "!", ""]))
    return "\n".join(lines)


def write_corpus(folder: Path, n_docs: int = 30, n_words: int = 60) -> list[str]:
    """n_docs .txt files doc000.txt ... in folder; returns their texts in sorted order."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n_docs):
        text = make_text(i, n_words)
        (folder / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def stream_text(tokenizer: TextTokenizer, tokens: np.ndarray) -> str:
    return tokenizer.decode(tokens.tolist())


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return train_tokenizer([make_text(i, 300) for i in range(20)], vocab_size=400)


# ------------------------------------------------------------------------------------------------
# Tokenizer


def test_trained_tokenizer_conventions(tokenizer: TextTokenizer) -> None:
    assert tokenizer.eot_id == 0
    assert tokenizer.backend.id_to_token(0) == EOT_TOKEN
    assert 257 < tokenizer.vocab_size <= 400
    assert tokenizer.token_dtype == np.uint16
    assert len(tokenizer.sha256) == 64


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200))
def test_round_trip_is_exact_for_any_unicode(tokenizer: TextTokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eot_id not in ids  # ordinary text never yields the separator


def test_literal_end_of_text_string_is_plain_text(tokenizer: TextTokenizer) -> None:
    text = f"before {EOT_TOKEN} after"
    ids = tokenizer.encode(text)
    assert tokenizer.eot_id not in ids
    assert tokenizer.decode(ids) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab1 \n\t.'é", max_size=120), st.integers(min_value=1, max_value=12))
def test_piecewise_encoding_equals_whole_encoding(tokenizer: TextTokenizer, text: str, piece_chars: int) -> None:
    small = TextTokenizer(Tokenizer.from_str(tokenizer.backend.to_str()), max_piece_chars=piece_chars)
    pieces = small.split_for_encoding(text)
    assert "".join(pieces) == text
    assert small.encode(text) == tokenizer.encode(text)


def test_long_documents_are_cut_into_pieces(tokenizer: TextTokenizer) -> None:
    small = TextTokenizer(Tokenizer.from_str(tokenizer.backend.to_str()), max_piece_chars=50)
    text = make_text(3, 100)
    assert len(small.split_for_encoding(text)) > 2
    assert small.encode_batch([text, "x"]) == [tokenizer.encode(text), tokenizer.encode("x")]


def test_training_is_deterministic_and_hash_ignores_formatting(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    again = train_tokenizer([make_text(i, 300) for i in range(20)], vocab_size=400)
    assert again.sha256 == tokenizer.sha256
    tokenizer.save(tmp_path / "tokenizer.json")
    (tmp_path / "compact.json").write_text(tokenizer.backend.to_str(pretty=False), encoding="utf-8")
    assert load_tokenizer(tmp_path / "tokenizer.json").sha256 == tokenizer.sha256
    assert load_tokenizer(tmp_path).sha256 == tokenizer.sha256  # a folder holding tokenizer.json
    assert load_tokenizer(tmp_path / "compact.json").sha256 == tokenizer.sha256
    other = train_tokenizer([make_text(i, 300) for i in range(20)], vocab_size=300)
    assert other.sha256 != tokenizer.sha256


def test_tokenizer_sample_is_capped() -> None:
    seen = []

    def documents():
        for i in range(1000):
            seen.append(i)
            yield make_text(i, 50)

    train_tokenizer(documents(), vocab_size=300, sample_bytes=2_000)
    assert len(seen) < 10  # stopped reading once the sample budget was reached


def test_tokenizer_errors(tmp_path: Path, tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match="vocab_size=100: must be an integer >= 257"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="empty document set"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="bad.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")
    Tokenizer(models.BPE(vocab={"a": 0}, merges=[])).save(str(tmp_path / "no_eot.json"))
    with pytest.raises(ValueError, match=r"no_eot.json: tokenizer has no '<\|endoftext\|>' token"):
        load_tokenizer(tmp_path / "no_eot.json")


def test_token_dtype_boundaries() -> None:
    assert token_dtype(257) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert token_dtype(65537) == np.uint32


# ------------------------------------------------------------------------------------------------
# Sources


def test_txt_source_is_one_document_per_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeffhello\nwörld\n".encode("utf-8"))
    source = open_source(str(path))
    assert list(source) == ["hello\nwörld\n"]  # the byte-order mark is not text
    assert list(source.documents()) == ["hello\nwörld\n"]  # re-iterable
    assert source.fingerprint["files"][0]["size"] == path.stat().st_size
    assert source.fingerprint["files"][0]["mtime_ns"] == path.stat().st_mtime_ns


def test_jsonl_source_reads_the_text_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "two ✓"}, {"text": ""}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert list(open_source(str(path))) == ["one", "two ✓"]  # blank lines and empty texts skipped
    other = tmp_path / "b.jsonl"
    other.write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    assert list(open_source(str(other), text_field="body")) == ["x", "y"]


def test_folder_source_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "z.txt").write_text("z", encoding="utf-8")
    (root / "a.txt").write_text("a", encoding="utf-8")
    (root / "b" / "deep" / "c.jsonl").write_text('{"text": "c1"}\n{"text": "c2"}\n', encoding="utf-8")
    (root / "b" / "notes.md").write_text("ignored", encoding="utf-8")
    (root / ".hidden" / "h.txt").write_text("ignored", encoding="utf-8")
    (root / ".dotfile.txt").write_text("ignored", encoding="utf-8")
    source = open_source(str(root))
    assert list(source) == ["a", "c1", "c2", "z"]
    assert [f["path"] for f in source.fingerprint["files"]] == ["a.txt", "b/deep/c.jsonl", "z.txt"]
    assert "3 files" in source.description


def test_parquet_source(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["p1", "p2 ü", ""], "n": [1, 2, 3]}), path)
    assert list(open_source(str(path))) == ["p1", "p2 ü"]
    with pytest.raises(ValueError, match=r"a.parquet: no column 'body' \(columns: text, n\)"):
        list(open_source(str(path), text_field="body"))
    pq.write_table(pa.table({"text": ["ok", None]}), tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match="nulls.parquet: row 2: column 'text' must hold strings, got null"):
        list(open_source(str(tmp_path / "nulls.parquet")))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(MissingDependencyError, match=r"reading .*a.parquet needs the optional package 'pyarrow': pip install pyarrow"):
        list(open_source(str(path)))


def test_stdlib_source_is_deterministic_capped_and_excludes_tests() -> None:
    source = stdlib_source(max_bytes=30_000)
    first = list(source)
    assert first == list(source)
    assert first and sum(len(d.encode("utf-8")) for d in first) <= 30_000
    paths = [f["path"] for f in source.fingerprint["files"]]
    assert paths == sorted(paths) and all(p.endswith(".py") for p in paths)
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
    assert not any(set(p.split("/")[:-1]) & excluded for p in paths)
    assert "os.py" in paths
    assert open_source("stdlib", max_bytes=30_000).fingerprint == source.fingerprint


def test_stdlib_file_selection(tmp_path: Path) -> None:
    for rel in ["b.py", "a.py", "pkg/m.py", "pkg/tests/t.py", "test/x.py", "site-packages/y.py", "pkg/data.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n", encoding="utf-8")
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9\n")  # not UTF-8: skipped, not fatal
    files = [p.relative_to(tmp_path).as_posix() for p in list_stdlib_files(tmp_path)]
    assert files == ["a.py", "b.py", "latin1.py", "pkg/m.py"]
    assert list(stdlib_source(root=tmp_path)) == ["# a.py\n", "# b.py\n", "# pkg/m.py\n"]


def test_a_local_folder_named_stdlib_is_reachable_as_a_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "stdlib").mkdir()
    (tmp_path / "stdlib" / "x.txt").write_text("local", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert list(open_source("./stdlib")) == ["local"]


def test_parse_hf_spec() -> None:
    assert parse_hf_spec("hf:wikitext") == ("wikitext", None, "train")
    assert parse_hf_spec("hf:Salesforce/wikitext:wikitext-2-raw-v1") == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train")
    assert parse_hf_spec("hf:org/ds:cfg:validation") == ("org/ds", "cfg", "validation")
    assert parse_hf_spec("hf:org/ds::test") == ("org/ds", None, "test")
    for bad in ["hf:", "hf::cfg", "hf:a:b:c:d"]:
        with pytest.raises(ValueError, match=r"expected hf:NAME\[:CONFIG\]\[:SPLIT\]"):
            parse_hf_spec(bad)


def test_hf_source_with_an_injected_loader() -> None:
    calls = []

    def loader(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return [{"text": "doc one"}, {"text": ""}, {"text": "doc two", "meta": 1}]

    source = open_source("hf:org/ds:cfg:validation", hf_loader=loader)
    assert list(source) == ["doc one", "doc two"]
    assert calls == [("org/ds", "cfg", "validation", True)]
    assert source.fingerprint == {"kind": "hf", "name": "org/ds", "config": "cfg", "split": "validation", "text_field": "text"}

    bad = hf_source("org/ds", loader=lambda *a, **k: [{"content": "x"}])
    with pytest.raises(ValueError, match=r"row 1: no 'text' field \(fields: content\)"):
        list(bad)

    def offline(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    with pytest.raises(ValueError, match="could not load the dataset .*ConnectionError: hub unreachable"):
        list(hf_source("org/ds", loader=offline))


def test_hf_source_through_datasets_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    data_file = tmp_path / "local.jsonl"
    data_file.write_text('{"text": "hf one"}\n{"text": "hf two"}\n', encoding="utf-8")
    real_load_dataset = datasets.load_dataset
    seen = []

    def local_load_dataset(name, config=None, *, split, streaming):
        # The hub name is replaced by the local JSON builder; everything else is the real library.
        seen.append((name, config, split, streaming))
        return real_load_dataset("json", data_files={split: str(data_file)}, split=split, streaming=streaming)

    monkeypatch.setattr(datasets, "load_dataset", local_load_dataset)
    assert list(open_source("hf:someone/corpus::test")) == ["hf one", "hf two"]
    assert seen == [("someone/corpus", None, "test", True)]


def test_hf_without_datasets_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependencyError, match="needs the optional package 'datasets': pip install datasets"):
        open_source("hf:wikitext")


def test_cap_bytes_cuts_on_character_boundaries() -> None:
    assert list(cap_bytes(["abc", "déf", "ghi"], 5)) == ["abc", "d"]  # 'é' is 2 bytes: would overshoot
    assert list(cap_bytes(["abc", "déf"], 6)) == ["abc", "dé"]
    assert list(cap_bytes(["abc"], None)) == ["abc"]
    assert list(cap_bytes(["abc", "d"], 3)) == ["abc"]


# ------------------------------------------------------------------------------------------------
# Bad input: one clear error per rule


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nothing_here"
    with pytest.raises(FileNotFoundError, match=f"{missing}: no such file or folder"):
        open_source(str(missing))


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: empty folder: no .jsonl/.parquet/.txt files"):
        open_source(str(tmp_path / "empty"))
    (tmp_path / "csv_only").mkdir()
    (tmp_path / "csv_only" / "a.csv").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="csv_only: empty folder"):
        open_source(str(tmp_path / "csv_only"))


def test_unsupported_suffix(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    path.write_text("a,b", encoding="utf-8")
    with pytest.raises(ValueError, match=r"table.csv: unsupported suffix '.csv'; supported: .jsonl, .parquet, .txt"):
        open_source(str(path))


def test_binary_file(tmp_path: Path) -> None:
    path = tmp_path / "image.txt"
    path.write_bytes(b"GIF89a\x00\x01")
    with pytest.raises(ValueError, match=r"image.txt: binary file \(NUL byte at byte offset 6\)"):
        list(open_source(str(path)))


def test_non_utf8_file_names_the_byte_offset(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc".encode() + "é".encode("latin-1") + b"xyz")
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8 at byte offset 3"):
        list(open_source(str(path)))
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    # line 1 is 15 bytes, then 'caf' starts 11 bytes into line 2: offset 15 + 13 = 28
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not valid UTF-8 at byte offset 28"):
        list(open_source(str(jsonl)))


def test_jsonl_line_without_text_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:2: no 'text' field \(fields: body\)"):
        list(open_source(str(path)))


def test_jsonl_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:3: invalid JSON"):
        list(open_source(str(path)))
    path.write_text('["text"]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:1: expected a JSON object"):
        list(open_source(str(path)))
    path.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"a.jsonl:1: field 'text' must be a string, got int"):
        list(open_source(str(path)))


def test_empty_document_set(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("", encoding="utf-8")
    (corpus / "b.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="empty document set: .*corpus"):
        prepare_data([str(corpus)], None, tmp_path / "out", vocab_size=300)
    good = tmp_path / "good.txt"
    good.write_text(make_text(0), encoding="utf-8")
    with pytest.raises(ValueError, match="empty document set: .*corpus"):
        prepare_data([str(good)], {"dev": str(corpus)}, tmp_path / "out", vocab_size=300)


def test_bad_prepare_arguments(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text(make_text(0), encoding="utf-8")
    with pytest.raises(ValueError, match="vocab_size is required"):
        prepare_data([str(good)], None, tmp_path / "out")
    with pytest.raises(ValueError, match=r"heldout_fraction=1.5: must be a number in \[0, 1\)"):
        prepare_data([str(good)], None, tmp_path / "out", vocab_size=300, heldout_fraction=1.5)
    with pytest.raises(ValueError, match="at least one source"):
        prepare_data([], None, tmp_path / "out", vocab_size=300)
    with pytest.raises(ValueError, match="evaluation set name 'a b'"):
        prepare_data([str(good)], {"a b": str(good)}, tmp_path / "out", vocab_size=300)
    with pytest.raises(ValueError, match="max_train_bytes=0"):
        prepare_data([str(good)], None, tmp_path / "out", vocab_size=300, max_train_bytes=0)


def test_eval_spec_parsing() -> None:
    assert parse_eval_spec("wiki=data/wiki.jsonl") == ("wiki", "data/wiki.jsonl")
    assert parse_eval_spec("a=b=c.txt") == ("a", "b=c.txt")
    assert parse_eval_specs(["x=stdlib", "y=hf:org/ds::test"]) == {"x": "stdlib", "y": "hf:org/ds::test"}
    assert parse_eval_specs(None) == {}
    cases = {
        "wiki": "expected NAME=PATH",
        "=data.txt": "the NAME before '=' is empty",
        "wiki=": "the PATH after '=' is empty",
        "bad name=x.txt": "must start with a letter or digit",
        "../up=x.txt": "must start with a letter or digit",
    }
    for text, message in cases.items():
        with pytest.raises(ValueError, match=message):
            parse_eval_spec(text)
    with pytest.raises(ValueError, match="name 'a' is already used by a=x.txt"):
        parse_eval_specs(["a=x.txt", "a=y.txt"])


# ------------------------------------------------------------------------------------------------
# Held-out split


def test_heldout_split_is_deterministic_and_exact() -> None:
    documents = [f"doc {i}" for i in range(100)]
    tagged = list(split_heldout(documents, 0.05))
    assert [d for _, d in tagged] == documents
    assert [i for i, (held, _) in enumerate(tagged) if held] == [19, 39, 59, 79, 99]
    assert tagged == list(split_heldout(iter(documents), 0.05))
    assert sum(held for held, _ in split_heldout(documents, 0.3)) == 30
    assert not any(held for held, _ in split_heldout(documents, 0))


def test_heldout_split_falls_back_to_the_tail_of_the_last_document() -> None:
    tagged = list(split_heldout(["first doc", "x" * 100], 0.1))
    assert tagged == [(False, "first doc"), (False, "x" * 90), (True, "x" * 10)]
    with pytest.raises(ValueError, match="too little text"):
        list(split_heldout(["y"], 0.1))


# ------------------------------------------------------------------------------------------------
# prepare_data and token caches


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "corpus"
    return folder, write_corpus(folder, n_docs=40)


def test_prepare_builds_streams_with_separators(corpus, tmp_path: Path) -> None:
    folder, texts = corpus
    data = prepare_data([str(folder)], None, tmp_path / "out", vocab_size=320)
    assert data.built == ("tokenizer", "train", "eval-heldout")
    tok = data.tokenizer
    heldout_texts = [texts[19], texts[39]]
    train_texts = [t for i, t in enumerate(texts) if i not in (19, 39)]
    assert stream_text(tok, data.train.tokens) == "".join(EOT_TOKEN + t for t in train_texts)
    assert stream_text(tok, data.evals["heldout"].tokens) == "".join(EOT_TOKEN + t for t in heldout_texts)
    assert data.train.n_bytes == sum(len(t.encode("utf-8")) for t in train_texts)
    assert data.evals["heldout"].n_bytes == sum(len(t.encode("utf-8")) for t in heldout_texts)
    assert data.train.tokens.dtype == np.uint16 and isinstance(data.train.tokens, np.memmap)
    assert (tmp_path / "out" / "tokenizer.json").exists()
    # the manifest records what the cache depends on and what it holds
    tokens_path, manifest_path = cache_paths(tmp_path / "out", "train")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    assert manifest["dtype"] == "uint16"
    assert manifest["n_tokens"] == data.train.n_tokens
    assert manifest["n_bytes"] == data.train.n_bytes
    assert manifest["n_documents"] == 38
    assert manifest["sha256"] == file_sha256(tokens_path)
    assert manifest["file_bytes"] == tokens_path.stat().st_size
    assert manifest["key"]["tokenizer_sha256"] == tok.sha256
    files = manifest["key"]["sources"][0]["files"]
    assert files[0] == {"path": "doc000.txt", "size": (folder / "doc000.txt").stat().st_size,
                        "mtime_ns": (folder / "doc000.txt").stat().st_mtime_ns}
    # atomic writes leave no temporary files behind
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_second_call_reuses_caches_without_tokenizing(corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, _ = corpus
    first = prepare_data([str(folder)], None, tmp_path / "out", vocab_size=320)
    tokens_path, _ = cache_paths(tmp_path / "out", "train")
    mtime = tokens_path.stat().st_mtime_ns
    calls = {"encode": 0, "train": 0}
    original_encode = TextTokenizer.encode_batch

    def counting_encode(self, texts):
        calls["encode"] += 1
        return original_encode(self, texts)

    def counting_train(*args, **kwargs):
        calls["train"] += 1
        raise AssertionError("the tokenizer must be reused")

    monkeypatch.setattr(TextTokenizer, "encode_batch", counting_encode)
    monkeypatch.setattr(prepare_module, "train_tokenizer", counting_train)
    second = prepare_data([str(folder)], None, tmp_path / "out", vocab_size=320)
    assert second.built == ()
    assert calls == {"encode": 0, "train": 0}
    assert tokens_path.stat().st_mtime_ns == mtime
    assert second.tokenizer.sha256 == first.tokenizer.sha256
    np.testing.assert_array_equal(second.train.tokens, first.train.tokens)
    assert second.evals["heldout"].n_bytes == first.evals["heldout"].n_bytes


def test_changed_source_makes_the_cache_stale(corpus, tmp_path: Path) -> None:
    folder, _ = corpus
    out = tmp_path / "out"
    prepare_data([str(folder)], None, out, vocab_size=320)
    (folder / "doc005.txt").write_text("a changed document", encoding="utf-8")
    data = prepare_data([str(folder)], None, out, vocab_size=320)
    assert "train" in data.built
    assert "a changed document" in stream_text(data.tokenizer, data.train.tokens)
    (folder / "new.txt").write_text("an added document", encoding="utf-8")
    assert "train" in prepare_data([str(folder)], None, out, vocab_size=320).built
    # other options that change the content also invalidate
    assert "train" in prepare_data([str(folder)], None, out, vocab_size=320, max_train_bytes=5_000).built
    assert "train" in prepare_data([str(folder)], None, out, vocab_size=320, max_train_bytes=5_000, heldout_fraction=0.1).built


def test_changed_tokenizer_makes_the_cache_stale(corpus, tmp_path: Path, tokenizer: TextTokenizer) -> None:
    folder, _ = corpus
    out = tmp_path / "out"
    prepare_data([str(folder)], None, out, vocab_size=320)
    tokenizer.save(tmp_path / "mine.json")
    data = prepare_data([str(folder)], None, out, tokenizer_path=tmp_path / "mine.json")
    assert data.tokenizer.sha256 == tokenizer.sha256
    assert data.built == ("train", "eval-heldout")
    assert load_tokenizer(out / "tokenizer.json").sha256 == tokenizer.sha256  # the run folder keeps a copy
    again = prepare_data([str(folder)], None, out, tokenizer_path=tmp_path / "mine.json")
    assert again.built == ()
    # asking for a trained tokenizer again retrains (the folder's tokenizer was a loaded one)
    assert "tokenizer" in prepare_data([str(folder)], None, out, vocab_size=320).built


def test_named_eval_sets_replace_the_heldout_split(corpus, tmp_path: Path) -> None:
    folder, texts = corpus
    dev = tmp_path / "dev.jsonl"
    dev.write_text('{"text": "dev one"}\n{"text": "dev two"}\n', encoding="utf-8")
    data = prepare_data([str(folder)], {"dev": str(dev)}, tmp_path / "out", vocab_size=320)
    assert list(data.evals) == ["dev"]
    assert stream_text(data.tokenizer, data.train.tokens) == "".join(EOT_TOKEN + t for t in texts)
    assert stream_text(data.tokenizer, data.evals["dev"].tokens) == f"{EOT_TOKEN}dev one{EOT_TOKEN}dev two"
    assert data.evals["dev"].n_bytes == len("dev onedev two")
    dev.write_text('{"text": "dev three"}\n', encoding="utf-8")
    rerun = prepare_data([str(folder)], {"dev": str(dev)}, tmp_path / "out", vocab_size=320)
    assert rerun.built == ("eval-dev",)  # only the changed evaluation set is rebuilt


def test_single_document_corpus_gets_a_heldout_tail(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    text = make_text(7, 400)
    path.write_text(text, encoding="utf-8")
    data = prepare_data([str(path)], None, tmp_path / "out", vocab_size=300, heldout_fraction=0.1)
    train_text = stream_text(data.tokenizer, data.train.tokens)
    heldout_text = stream_text(data.tokenizer, data.evals["heldout"].tokens)
    assert train_text.removeprefix(EOT_TOKEN) + heldout_text.removeprefix(EOT_TOKEN) == text
    assert data.evals["heldout"].n_bytes == len(heldout_text.removeprefix(EOT_TOKEN).encode("utf-8"))


def test_truncated_token_file_is_reported(corpus, tmp_path: Path) -> None:
    folder, _ = corpus
    out = tmp_path / "out"
    prepare_data([str(folder)], None, out, vocab_size=320)
    tokens_path, manifest_path = cache_paths(out, "train")
    with open(tokens_path, "r+b") as handle:
        handle.truncate(tokens_path.stat().st_size - 2)
    with pytest.raises(CorruptCacheError, match=f"{tokens_path}: token cache is truncated or damaged.*delete .*to rebuild"):
        prepare_data([str(folder)], None, out, vocab_size=320)


def test_flipped_bytes_are_caught_by_the_checksum(corpus, tmp_path: Path) -> None:
    folder, _ = corpus
    out = tmp_path / "out"
    prepare_data([str(folder)], None, out, vocab_size=320)
    tokens_path, _ = cache_paths(out, "train")
    data = bytearray(tokens_path.read_bytes())
    data[10] ^= 0xFF
    tokens_path.write_bytes(bytes(data))
    # without verification only the size is checked: the damage goes unnoticed (documented)
    assert prepare_data([str(folder)], None, out, vocab_size=320, verify_checksum=False).built == ()
    with pytest.raises(CorruptCacheError, match="token cache checksum mismatch"):
        prepare_data([str(folder)], None, out, vocab_size=320, verify_checksum=True)


def test_unreadable_manifest_is_reported_and_missing_token_file_rebuilt(corpus, tmp_path: Path) -> None:
    folder, _ = corpus
    out = tmp_path / "out"
    prepare_data([str(folder)], None, out, vocab_size=320)
    tokens_path, manifest_path = cache_paths(out, "train")
    tokens_path.unlink()
    assert "train" in prepare_data([str(folder)], None, out, vocab_size=320).built
    manifest_path.write_text("{truncated", encoding="utf-8")
    with pytest.raises(CorruptCacheError, match="unreadable cache manifest"):
        prepare_data([str(folder)], None, out, vocab_size=320)


def test_failed_build_leaves_no_partial_cache(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=5)
    (folder / "doc999.txt").write_bytes(b"bad \xff byte")
    with pytest.raises(ValueError, match="doc999.txt: not valid UTF-8 at byte offset 4"):
        prepare_data([str(folder)], None, tmp_path / "out", vocab_size=300, heldout_fraction=0.2, tokenizer_sample_bytes=500)
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(("train", "eval", ".train", ".eval"))]
    assert leftovers == []


def test_prepare_with_stdlib_default(tmp_path: Path) -> None:
    data = prepare_data(["stdlib"], None, tmp_path / "out", vocab_size=300, max_train_bytes=60_000, heldout_fraction=0.2)
    assert data.train.n_bytes + data.evals["heldout"].n_bytes <= 60_000
    assert data.train.n_tokens > 1000


# ------------------------------------------------------------------------------------------------
# Batching


def test_train_batches_are_windows_with_shifted_targets() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = TrainBatchSampler(tokens, batch_size=4, seq_len=16, seed=3)
    inputs, targets = sampler.next_batch()
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == targets.dtype == torch.long
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    offset, _ = sampler.epoch_layout(0)
    assert ((inputs[:, 0] - offset) % 16 == 0).all()  # windows start on the epoch's grid
    assert (targets - inputs == 1).all()  # contiguous slices of the token array


def test_train_sampler_is_deterministic_and_covers_an_epoch() -> None:
    tokens = np.arange(2000, dtype=np.uint32)
    a = TrainBatchSampler(tokens, batch_size=8, seq_len=10, seed=1)
    b = TrainBatchSampler(tokens, batch_size=8, seq_len=10, seed=1)
    c = TrainBatchSampler(tokens, batch_size=8, seq_len=10, seed=2)
    batches_a = [a.next_batch()[0] for _ in range(5)]
    batches_b = [b.next_batch()[0] for _ in range(5)]
    batches_c = [c.next_batch()[0] for _ in range(5)]
    for x, y in zip(batches_a, batches_b):
        torch.testing.assert_close(x, y)
    assert any(not torch.equal(x, z) for x, z in zip(batches_a, batches_c))
    # one epoch visits every window exactly once
    sampler = TrainBatchSampler(tokens, batch_size=1, seq_len=10, seed=5)
    n = sampler.windows_per_epoch()
    starts = [int(sampler.next_batch()[0][0, 0]) for _ in range(n)]
    assert len(set(starts)) == n and sampler.epoch == 1 and sampler.position == 0
    offset = sampler.epoch_layout(0)[0]
    assert sorted(starts) == [offset + 10 * i for i in range(n)]


def test_train_sampler_resumes_exactly() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    reference = TrainBatchSampler(tokens, batch_size=3, seq_len=8, seed=11)
    expected = [reference.next_batch() for _ in range(40)]  # crosses several epochs
    sampler = TrainBatchSampler(tokens, batch_size=3, seq_len=8, seed=11)
    for _ in range(17):
        sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))  # survives a JSON checkpoint
    resumed = TrainBatchSampler(tokens, batch_size=3, seq_len=8, seed=0)
    resumed.load_state_dict(state)
    for inputs, targets in expected[17:]:
        got_inputs, got_targets = resumed.next_batch()
        torch.testing.assert_close(got_inputs, inputs)
        torch.testing.assert_close(got_targets, targets)


def test_train_sampler_ranks_split_the_global_batch() -> None:
    tokens = np.arange(3000, dtype=np.uint16)
    single = TrainBatchSampler(tokens, batch_size=6, seq_len=12, seed=4)
    ranks = [TrainBatchSampler(tokens, batch_size=2, seq_len=12, seed=4, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        whole = single.next_batch()[0]
        parts = torch.cat([r.next_batch()[0] for r in ranks])
        torch.testing.assert_close(parts, whole)


def test_train_sampler_errors() -> None:
    with pytest.raises(ValueError, match="has 10 tokens; a window of seq_len=16 needs at least 17"):
        TrainBatchSampler(np.arange(10), batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match="batch_size=0"):
        TrainBatchSampler(np.arange(100), batch_size=0, seq_len=4)
    with pytest.raises(ValueError, match="rank=2"):
        TrainBatchSampler(np.arange(100), batch_size=1, seq_len=4, rank=2, world_size=2)
    sampler = TrainBatchSampler(np.arange(100), batch_size=1, seq_len=4)
    other = TrainBatchSampler(np.arange(100), batch_size=1, seq_len=5)
    with pytest.raises(ValueError, match="sampler state is for seq_len=5"):
        sampler.load_state_dict(other.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"seed": 1})


@settings(max_examples=80, deadline=None)
@given(
    n_tokens=st.integers(min_value=2, max_value=200),
    seq_len=st.integers(min_value=1, max_value=40),
    batch_size=st.integers(min_value=1, max_value=5),
    world_size=st.integers(min_value=1, max_value=3),
)
def test_eval_windows_cover_every_target_once(n_tokens: int, seq_len: int, batch_size: int, world_size: int) -> None:
    tokens = np.arange(n_tokens, dtype=np.uint16)
    seen_targets: list[int] = []
    total = 0
    n_windows = 0
    for rank in range(world_size):
        for batch in eval_batches(tokens, seq_len, batch_size, rank=rank, world_size=world_size):
            assert batch.inputs.shape == batch.targets.shape and batch.inputs.shape[1] <= seq_len
            real = batch.targets != IGNORE_INDEX
            assert int(real.sum()) == batch.n_targets
            # each real target follows its input, as in training
            assert (batch.targets[real] == batch.inputs[real] + 1).all()
            seen_targets.extend(batch.targets[real].tolist())
            total += batch.n_targets
            n_windows += batch.inputs.shape[0]
    assert sorted(seen_targets) == list(range(1, n_tokens))
    assert total == n_tokens - 1
    assert n_windows == count_eval_windows(n_tokens, seq_len)


def test_eval_windows_handle_the_last_partial_window() -> None:
    tokens = np.arange(11, dtype=np.uint16)  # 10 targets, seq_len 4: windows of 4, 4, 2
    batches = list(eval_batches(tokens, seq_len=4, batch_size=2))
    assert [b.n_targets for b in batches] == [8, 2]
    last = batches[1]
    assert last.inputs.shape == (1, 2)  # a batch of only a short window is not padded to seq_len
    assert last.targets.tolist() == [[9, 10]]
    batches = list(eval_batches(tokens, seq_len=4, batch_size=3))
    assert batches[0].targets[2].tolist() == [9, 10, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(ValueError, match="at least 2 tokens"):
        list(eval_batches(np.arange(1), seq_len=4))


def test_bits_per_byte() -> None:
    assert bits_per_byte(100 * math.log(2), 100) == pytest.approx(1.0)
    assert bits_per_byte(3.0, 7) == pytest.approx(3.0 / (math.log(2) * 7))
    with pytest.raises(ValueError, match="n_bytes=0"):
        bits_per_byte(1.0, 0)
    # a uniform model over V ids: every target costs ln V nats
    vocab, tokens = 50, np.arange(30, dtype=np.uint16) % 50
    total = 0.0
    for batch in eval_batches(tokens, seq_len=7, batch_size=2):
        logits = torch.zeros(*batch.targets.shape, vocab)
        total += float(torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
    assert bits_per_byte(total, 58) == pytest.approx(29 * math.log(vocab) / (math.log(2) * 58))


def test_batches_from_a_prepared_cache(corpus, tmp_path: Path) -> None:
    folder, _ = corpus
    data = prepare_data([str(folder)], None, tmp_path / "out", vocab_size=320)
    sampler = TrainBatchSampler(data.train.tokens, batch_size=2, seq_len=32, seed=0)
    inputs, targets = sampler.next_batch()
    assert int(inputs.max()) < data.tokenizer.vocab_size
    heldout = data.evals["heldout"]
    assert sum(b.n_targets for b in eval_batches(heldout.tokens, 32, 4)) == heldout.n_tokens - 1
    assert heldout.tokens[0] == data.tokenizer.eot_id  # every text token is a prediction target
    assert os.path.getsize(cache_paths(tmp_path / "out", "train")[0]) == 2 * data.train.n_tokens


def test_read_documents_dispatches_on_suffix(tmp_path: Path) -> None:
    (tmp_path / "a.TXT").write_text("upper", encoding="utf-8")
    assert list(read_documents(tmp_path / "a.TXT")) == ["upper"]


# ------------------------------------------------------------------------------------------------
# Command-line glue


def test_parse_byte_size() -> None:
    assert parse_byte_size("5000") == 5000
    assert parse_byte_size("20MB") == 20_000_000
    assert parse_byte_size("1.5g") == 1_500_000_000
    assert parse_byte_size("64KiB") == 65536
    for bad in ["", "MB", "-3", "0", "5 parsecs"]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse_byte_size(bad)


def test_prepare_data_subcommand(corpus, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = corpus
    parser = argparse.ArgumentParser(prog="mhmoe")
    register(parser.add_subparsers(dest="command"))
    argv = ["prepare-data", "--out", str(tmp_path / "out"), "--train", str(folder), "--vocab-size", "300",
            "--eval", f"dev={folder / 'doc001.txt'}", "--max-train-bytes", "20KB"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    output = capsys.readouterr().out
    assert "eval dev:" in output and "rebuilt: tokenizer, train, eval-dev" in output
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert "nothing (all caches reused)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # checked when the command line is parsed, as by mhmoe train
        parser.parse_args([*argv, "--eval", "oops"])
    assert "expected NAME=PATH" in capsys.readouterr().err


def test_stale_cache_log_names_the_changed_file(corpus, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder, _ = corpus
    prepare_data([str(folder)], None, tmp_path / "out", vocab_size=320)
    (folder / "doc003.txt").write_text("edited", encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="mhmoe.data"):
        prepare_data([str(folder)], None, tmp_path / "out", vocab_size=320)
    assert "modified doc003.txt" in caplog.text


def test_prepare_eval_sets_shares_caches_with_prepare_data(corpus, tmp_path: Path) -> None:
    folder, _ = corpus
    dev = tmp_path / "dev.txt"
    dev.write_text("some evaluation text", encoding="utf-8")
    data = prepare_data([str(folder)], {"dev": str(dev)}, tmp_path / "out", vocab_size=320)
    tokens_path, _ = cache_paths(tmp_path / "out", "eval-dev")
    mtime = tokens_path.stat().st_mtime_ns
    sets = prepare_eval_sets({"dev": str(dev)}, data.tokenizer, tmp_path / "out")
    assert tokens_path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    np.testing.assert_array_equal(sets["dev"].tokens, data.evals["dev"].tokens)
    fresh = prepare_eval_sets({"other": str(dev)}, data.tokenizer, tmp_path / "elsewhere")
    np.testing.assert_array_equal(fresh["other"].tokens, data.evals["dev"].tokens)
