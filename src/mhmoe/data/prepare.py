"""One call from source specs to ready token arrays: :func:`prepare_data`.

What it does, in order (every step reuses earlier work in ``out_dir`` when still valid):

1. opens the training and evaluation sources (missing paths and bad specs fail here, before
   any long work);
2. resolves the tokenizer: loads ``tokenizer_path`` (and copies it to ``out_dir/tokenizer.json``
   so the folder is self-contained), or reuses ``out_dir/tokenizer.json`` if it was trained from
   the same sources and options, or trains a byte-level BPE on the first
   ``tokenizer_sample_bytes`` of the training documents (held-out documents excluded);
3. tokenizes the training sources into the ``train`` cache and, when no evaluation set is named,
   the held-out documents into ``eval-heldout`` (one pass; see :mod:`mhmoe.data.splits`);
4. tokenizes each named evaluation set into ``eval-NAME`` (:func:`prepare_eval_sets` does only
   this step, for a given tokenizer).

Files in ``out_dir``: ``tokenizer.json``, ``tokenizer.manifest.json`` (why the tokenizer is what
it is), and per cache ``NAME.tokens`` + ``NAME.manifest.json`` (see :mod:`mhmoe.data.cache`).
Caches are keyed by the source fingerprints (sizes and modification times), the tokenizer hash
and the options, so a rerun with unchanged inputs only memory-maps the files.

Example::

    data = prepare_data(["stdlib"], None, "runs/tiny/data", vocab_size=8192, max_train_bytes=20_000_000)
    sampler = TrainBatchSampler(data.train.tokens, batch_size=16, seq_len=256, seed=0)
    for name, eval_set in data.evals.items():
        for batch in eval_batches(eval_set.tokens, seq_len=256, batch_size=16):
            ...
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mhmoe.data.cache import TokenSet, build_caches, load_cache, normalize_key
from mhmoe.data.sources import DEFAULT_TEXT_FIELD, DatasetLoader, Source, cap_bytes, open_source
from mhmoe.data.splits import DEFAULT_HELDOUT_FRACTION, split_heldout, validate_eval_name, validate_heldout_fraction
from mhmoe.data.tokenizer import (
    DEFAULT_SAMPLE_BYTES,
    TOKENIZER_FILENAME,
    TextTokenizer,
    load_tokenizer,
    train_tokenizer,
)
from mhmoe.runs.atomic import atomic_write_text

logger = logging.getLogger(__name__)

TRAIN_CACHE = "train"
EVAL_CACHE_PREFIX = "eval-"
TOKENIZER_MANIFEST = "tokenizer.manifest.json"
HELDOUT_NAME = "heldout"


@dataclass(frozen=True)
class PreparedData:
    """The result of :func:`prepare_data`.

    ``evals`` maps each evaluation-set name (``heldout`` for the automatic split) to its
    :class:`~mhmoe.data.cache.TokenSet` ``(tokens, n_bytes)``. ``built`` names what this call
    had to (re)build: ``"tokenizer"`` and/or cache names; empty when everything was reused.
    """

    tokenizer: TextTokenizer
    train: TokenSet
    evals: dict[str, TokenSet]
    out_dir: Path
    built: tuple[str, ...] = field(default=())

    @property
    def train_tokens(self) -> np.ndarray:
        return self.train.tokens


def prepare_data(
    train_sources: Sequence[str] | str,
    eval_specs: Mapping[str, str] | None,
    out_dir: str | os.PathLike[str],
    vocab_size: int | None = None,
    tokenizer_path: str | os.PathLike[str] | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    max_train_bytes: int | None = None,
    *,
    max_eval_bytes: int | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    tokenizer_sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
    verify_checksum: bool = True,
    heldout_name: str = HELDOUT_NAME,
    hf_loader: DatasetLoader | None = None,
) -> PreparedData:
    """Tokenize training and evaluation text into memory-mapped caches in ``out_dir``.

    ``train_sources``: source specs (paths, ``stdlib``, ``hf:NAME[:CONFIG][:SPLIT]``), read in
    order as one corpus, capped at ``max_train_bytes`` of UTF-8 text in total.
    ``eval_specs``: ``{name: spec}`` (see :func:`~mhmoe.data.splits.parse_eval_specs`); when
    empty, ``heldout_fraction`` of the training documents become the evaluation set
    ``heldout_name`` (``0`` means no evaluation set). Each evaluation source is capped at
    ``max_eval_bytes``.
    ``vocab_size`` is required unless ``tokenizer_path`` names a tokenizer to load; a trained
    tokenizer may have fewer ids than asked on a small corpus (use ``tokenizer.vocab_size``).
    ``verify_checksum`` checks the SHA-256 of reused token files (one read of each).

    Raises ``FileNotFoundError``/``ValueError`` for bad inputs and
    :class:`~mhmoe.data.cache.CorruptCacheError` (a ``ValueError``) for a damaged cache.
    """
    specs = [train_sources] if isinstance(train_sources, str) else list(train_sources)
    if not specs:
        raise ValueError("train_sources: at least one source spec is needed (a path, 'stdlib' or 'hf:NAME')")
    eval_specs = dict(eval_specs or {})
    for name, spec in eval_specs.items():
        validate_eval_name(name)
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"evaluation set {name!r}: its source spec must be a non-empty string, got {spec!r}")
    validate_eval_name(heldout_name)
    fraction = validate_heldout_fraction(heldout_fraction)
    if max_train_bytes is not None and (isinstance(max_train_bytes, bool) or not isinstance(max_train_bytes, int) or max_train_bytes < 1):
        raise ValueError(f"max_train_bytes={max_train_bytes!r}: must be a positive integer number of bytes or None")
    if tokenizer_path is None and vocab_size is None:
        raise ValueError("vocab_size is required to train a tokenizer (or pass tokenizer_path to load one)")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = [open_source(spec, text_field=text_field, hf_loader=hf_loader) for spec in specs]
    evals = {
        name: open_source(spec, text_field=text_field, max_bytes=max_eval_bytes, hf_loader=hf_loader)
        for name, spec in eval_specs.items()
    }
    use_heldout = not evals and fraction > 0
    train_description = " + ".join(source.description for source in train)

    def tagged_training_documents() -> Iterator[tuple[bool, str]]:
        documents = cap_bytes(itertools.chain.from_iterable(s.documents() for s in train), max_train_bytes)
        if use_heldout:
            return split_heldout(documents, fraction)
        return ((False, document) for document in documents)

    train_identity = {
        "sources": [source.fingerprint for source in train],
        "max_train_bytes": max_train_bytes,
        "heldout_fraction": str(fraction) if use_heldout else None,
    }
    built: list[str] = []

    if tokenizer_path is not None:
        tokenizer = _load_and_record_tokenizer(Path(tokenizer_path), out_dir)
        if vocab_size is not None and vocab_size != tokenizer.vocab_size:
            logger.warning("vocab_size=%d ignored: the loaded tokenizer %s has %d ids", vocab_size, tokenizer_path, tokenizer.vocab_size)
    else:
        tokenizer, trained = _reuse_or_train_tokenizer(
            out_dir,
            key={"vocab_size": vocab_size, "sample_bytes": tokenizer_sample_bytes, **train_identity},
            training_documents=lambda: (doc for held_out, doc in tagged_training_documents() if not held_out),
            vocab_size=vocab_size,
            sample_bytes=tokenizer_sample_bytes,
            description=train_description,
        )
        if trained:
            built.append("tokenizer")

    # Training (and held-out) caches: one key, built together in one pass.
    heldout_cache = EVAL_CACHE_PREFIX + heldout_name
    train_names = [TRAIN_CACHE, heldout_cache] if use_heldout else [TRAIN_CACHE]
    train_key = {"role": "train", "tokenizer_sha256": tokenizer.sha256, **train_identity}
    train_sets = {name: load_cache(out_dir, name, train_key, verify=verify_checksum) for name in train_names}
    if any(token_set is None for token_set in train_sets.values()):
        tagged = ((heldout_cache if held_out else TRAIN_CACHE, doc) for held_out, doc in tagged_training_documents())
        train_sets = build_caches(out_dir, train_names, train_key, tagged, tokenizer, description=train_description)
        built.extend(train_names)

    eval_sets: dict[str, TokenSet] = {}
    if use_heldout:
        eval_sets[heldout_name] = train_sets[heldout_cache]
    for name, source in evals.items():
        eval_sets[name], was_built = _eval_set(name, source, tokenizer, out_dir, max_eval_bytes, verify_checksum)
        if was_built:
            built.append(EVAL_CACHE_PREFIX + name)

    train_set = train_sets[TRAIN_CACHE]
    logger.info(
        "data ready in %s: train %d tokens (%d bytes); %s",
        out_dir,
        train_set.n_tokens,
        train_set.n_bytes,
        ", ".join(f"{n} {s.n_tokens} tokens" for n, s in eval_sets.items()) or "no evaluation set",
    )
    return PreparedData(tokenizer=tokenizer, train=train_set, evals=eval_sets, out_dir=out_dir, built=tuple(built))


def prepare_eval_sets(
    eval_specs: Mapping[str, str],
    tokenizer: TextTokenizer,
    out_dir: str | os.PathLike[str],
    *,
    max_eval_bytes: int | None = None,
    text_field: str = DEFAULT_TEXT_FIELD,
    verify_checksum: bool = True,
    hf_loader: DatasetLoader | None = None,
) -> dict[str, TokenSet]:
    """Tokenize only evaluation sets ``{name: spec}`` with a given tokenizer (e.g. to evaluate a
    trained run on new text). Uses the same cache names (``eval-NAME``) and keys as
    :func:`prepare_data`, so the caches are shared when the inputs match."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = {}
    for name, spec in eval_specs.items():
        validate_eval_name(name)
        sources[name] = open_source(spec, text_field=text_field, max_bytes=max_eval_bytes, hf_loader=hf_loader)
    return {
        name: _eval_set(name, source, tokenizer, out_dir, max_eval_bytes, verify_checksum)[0]
        for name, source in sources.items()
    }


def _eval_set(
    name: str, source: Source, tokenizer: TextTokenizer, out_dir: Path, max_eval_bytes: int | None, verify: bool
) -> tuple[TokenSet, bool]:
    """(token set, built now?) of one named evaluation set: reuse its cache or build it."""
    cache_name = EVAL_CACHE_PREFIX + name
    key = {"role": "eval", "tokenizer_sha256": tokenizer.sha256, "sources": [source.fingerprint], "max_eval_bytes": max_eval_bytes}
    token_set = load_cache(out_dir, cache_name, key, verify=verify)
    if token_set is not None:
        return token_set, False
    tagged = ((cache_name, doc) for doc in source.documents())
    return build_caches(out_dir, [cache_name], key, tagged, tokenizer, description=source.description)[cache_name], True


def _load_and_record_tokenizer(path: Path, out_dir: Path) -> TextTokenizer:
    """Load a user tokenizer and keep a copy in ``out_dir`` so the run folder is self-contained."""
    tokenizer = load_tokenizer(path)
    destination = out_dir / TOKENIZER_FILENAME
    source_file = path / TOKENIZER_FILENAME if path.is_dir() else path
    if destination.exists() and destination.resolve() == source_file.resolve():
        return tokenizer
    if _existing_tokenizer_sha(destination) != tokenizer.sha256:
        (out_dir / TOKENIZER_MANIFEST).unlink(missing_ok=True)
        tokenizer.save(destination)
        manifest = {"origin": "loaded", "from": str(source_file.resolve()), "sha256": tokenizer.sha256}
        atomic_write_text(out_dir / TOKENIZER_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return tokenizer


def _reuse_or_train_tokenizer(
    out_dir: Path,
    *,
    key: Mapping[str, Any],
    training_documents: Callable[[], Iterator[str]],
    vocab_size: int,
    sample_bytes: int | None,
    description: str,
) -> tuple[TextTokenizer, bool]:
    """(tokenizer, trained now?): reuse ``out_dir/tokenizer.json`` if its manifest records the
    same training key and hash, else train and save it (manifest last)."""
    destination = out_dir / TOKENIZER_FILENAME
    manifest_path = out_dir / TOKENIZER_MANIFEST
    expected_key = normalize_key(key)
    previous = _read_json(manifest_path)
    if previous and previous.get("origin") == "trained" and previous.get("key") == expected_key:
        try:
            tokenizer = load_tokenizer(destination)
        except (OSError, ValueError) as err:
            logger.warning("cannot reuse %s (%s): retraining", destination, err)
        else:
            if tokenizer.sha256 == previous.get("sha256"):
                logger.info("reusing tokenizer %s (%d ids)", destination, tokenizer.vocab_size)
                return tokenizer, False
            logger.warning("%s was changed after training (hash differs from %s): retraining", destination, manifest_path)
    logger.info("training a byte-level BPE tokenizer (vocab_size=%d) on %s", vocab_size, description)
    tokenizer = train_tokenizer(training_documents(), vocab_size, sample_bytes=sample_bytes, description=description)
    manifest_path.unlink(missing_ok=True)
    tokenizer.save(destination)
    manifest = {"origin": "trained", "key": expected_key, "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return tokenizer, True


def _existing_tokenizer_sha(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        return load_tokenizer(path).sha256
    except (OSError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def prepare_run_data(settings: dict[str, Any], data_dir: Path, tokenizer_path: Path | None = None,
                     verify_checksum: bool = True):
    """``mhmoe.data.prepare_data`` with a run's data settings (see ``data_settings``)."""

    tokenizer = tokenizer_path if tokenizer_path is not None else settings.get("tokenizer")
    return prepare_data(
        settings["sources"],
        settings["eval"],
        data_dir,
        vocab_size=settings["vocab_size"],
        tokenizer_path=tokenizer,
        heldout_fraction=settings["heldout_fraction"],
        max_train_bytes=settings["max_train_bytes"],
        max_eval_bytes=settings["max_eval_bytes"],
        tokenizer_sample_bytes=settings.get("tokenizer_sample_bytes") or DEFAULT_SAMPLE_BYTES,
        verify_checksum=verify_checksum,
    )
