"""Token caches: tokenized text as memory-mapped numpy files plus a JSON manifest.

A cache named ``NAME`` in a folder is two files:

* ``NAME.tokens`` - raw little-endian token ids (``uint16`` when the vocabulary fits, else
  ``uint32``), read with ``numpy.memmap`` so training never loads the whole corpus. Each
  document is preceded by ``<|endoftext|>``: ``[EOT] doc1 [EOT] doc2 ...``, so the separator also
  acts as BOS and every text token of an evaluation set is a prediction target.
* ``NAME.manifest.json`` - format version, the cache *key* (everything the content depends on:
  source fingerprints with file sizes and modification times, the tokenizer's SHA-256, split
  options), the dtype, token count, UTF-8 byte count of the text (for bits-per-byte),
  document count, file size and SHA-256 of the token file.

Rules (``load_cache``):

* no manifest, an older format, or a different key -> the cache is *stale*: ``None`` is returned
  and the caller rebuilds it (the reason is logged);
* a manifest whose token file is missing -> rebuilt too (deleting the token file is a way to
  force a rebuild);
* a token file whose size differs from the manifest, a manifest that is not valid JSON, or (with
  ``verify=True``) a SHA-256 mismatch -> :class:`CorruptCacheError`. Damage is reported rather than
  silently repaired because it points at a disk or copy problem the user should know about; the
  message names both files to delete to rebuild.

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``). The old manifest is
removed before the new token file replaces the old one and the new manifest is written last, so
a crash at any point leaves either a consistent cache or no manifest (which means rebuild).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mhmoe.data.tokenizer import TextTokenizer
from mhmoe.runs.atomic import atomic_binary_writer, atomic_write_text

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
TOKENS_SUFFIX = ".tokens"
MANIFEST_SUFFIX = ".manifest.json"
_HASH_CHUNK_BYTES = 1 << 23


class CorruptCacheError(ValueError):
    """A token cache whose files do not match their manifest (truncated, damaged or edited)."""


class TokenSet(NamedTuple):
    """A tokenized text set: the 1-D token array (a read-only memmap) and the UTF-8 byte count of
    the text it encodes (separators count zero bytes), the denominator of bits-per-byte."""

    tokens: np.ndarray
    n_bytes: int

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


def cache_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """(token file, manifest file) of the cache ``name`` in ``directory``."""
    directory = Path(directory)
    return directory / f"{name}{TOKENS_SUFFIX}", directory / f"{name}{MANIFEST_SUFFIX}"


def normalize_key(key: Mapping[str, Any]) -> dict[str, Any]:
    """The key as it reads back from JSON (tuples become lists), so comparisons are exact."""
    return json.loads(json.dumps(key, sort_keys=True))


def load_cache(directory: Path, name: str, key: Mapping[str, Any], *, verify: bool = False) -> TokenSet | None:
    """The cached token set if its manifest matches ``key``; ``None`` if missing or stale.

    Raises :class:`CorruptCacheError` if the manifest matches but the token file does not
    (see the module docstring). ``verify`` also checks the SHA-256 of the token file (reads it
    all once).
    """
    tokens_path, manifest_path = cache_paths(directory, name)
    if not manifest_path.exists():
        logger.debug("cache %s: no manifest at %s", name, manifest_path)
        return None
    manifest = read_manifest(manifest_path, tokens_path)
    if manifest.get("format") != FORMAT_VERSION:
        logger.info("cache %s is stale (format %r, now %d): rebuilding", name, manifest.get("format"), FORMAT_VERSION)
        return None
    expected_key = normalize_key(key)
    if manifest.get("key") != expected_key:
        logger.info("cache %s is stale (%s): rebuilding", name, describe_key_change(manifest.get("key"), expected_key))
        return None
    if not tokens_path.exists():
        logger.warning("cache %s: %s is missing although %s exists: rebuilding", name, tokens_path, manifest_path)
        return None
    actual_size = tokens_path.stat().st_size
    if actual_size != manifest["file_bytes"]:
        raise CorruptCacheError(
            f"{tokens_path}: token cache is truncated or damaged: {actual_size} bytes, but {manifest_path} records "
            f"{manifest['n_tokens']} {manifest['dtype']} tokens = {manifest['file_bytes']} bytes; "
            f"delete {tokens_path} and {manifest_path} to rebuild"
        )
    if verify:
        digest = file_sha256(tokens_path)
        if digest != manifest["sha256"]:
            raise CorruptCacheError(
                f"{tokens_path}: token cache checksum mismatch (sha256 {digest[:16]}..., {manifest_path} records "
                f"{manifest['sha256'][:16]}...): the file is damaged; delete {tokens_path} and {manifest_path} to rebuild"
            )
    tokens = open_token_file(tokens_path, manifest["dtype"], manifest["n_tokens"])
    logger.info("cache %s: reusing %d tokens from %s", name, manifest["n_tokens"], tokens_path)
    return TokenSet(tokens, int(manifest["n_bytes"]))


def read_manifest(manifest_path: Path, tokens_path: Path | None = None) -> dict[str, Any]:
    """Parse a manifest; unreadable or incomplete ones raise :class:`CorruptCacheError`."""
    delete_hint = f"delete {manifest_path}" + (f" and {tokens_path}" if tokens_path is not None else "") + " to rebuild"
    try:
        manifest = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCacheError(f"{manifest_path}: unreadable cache manifest ({err}); {delete_hint}") from None
    required = ("format", "key", "dtype", "n_tokens", "n_bytes", "file_bytes", "sha256")
    missing = [field for field in required if not isinstance(manifest, dict) or field not in manifest]
    if missing:
        raise CorruptCacheError(f"{manifest_path}: cache manifest lacks {', '.join(missing)}; {delete_hint}")
    return manifest


def is_cache_path(path: Path) -> bool:
    """Whether ``path`` names a token cache (its ``.tokens`` file or its manifest)."""
    return Path(path).name.endswith((TOKENS_SUFFIX, MANIFEST_SUFFIX))


def check_cache_tokenizer(path: Path, tokenizer_sha256: str | None, flag: str = "--data") -> dict[str, Any]:
    """The manifest of the token cache ``path`` (``.tokens`` or ``.manifest.json``), checked to
    have been built with the tokenizer of hash ``tokenizer_sha256``; ValueError naming both
    hashes otherwise. Why: ids of another tokenizer run through a model give plausible
    nonsense (a smaller vocabulary fits in the embedding), never an error (issue 16)."""
    path = Path(path)
    stem = path.name[: -len(TOKENS_SUFFIX)] if path.name.endswith(TOKENS_SUFFIX) else path.name[: -len(MANIFEST_SUFFIX)]
    tokens_path, manifest_path = path.with_name(stem + TOKENS_SUFFIX), path.with_name(stem + MANIFEST_SUFFIX)
    if not manifest_path.is_file():
        raise ValueError(f"{flag} {path}: no manifest {manifest_path.name} next to it, so the tokenizer it was "
                         "built with is unknown; pass the text instead")
    manifest = read_manifest(manifest_path, tokens_path)
    key = manifest.get("key")
    built_with = key.get("tokenizer_sha256") if isinstance(key, dict) else None
    if tokenizer_sha256 is None or built_with != tokenizer_sha256:
        raise ValueError(
            f"{flag} {path}: built with tokenizer {str(built_with)[:16]}..., but the run's tokenizer is "
            f"{str(tokenizer_sha256)[:16]}...; token ids of another tokenizer mean other text: pass the "
            "text itself (it is encoded with the run's tokenizer) or that run's own cache"
        )
    return manifest


def open_token_file(path: Path, dtype: str, n_tokens: int) -> np.ndarray:
    """A read-only memmap of ``n_tokens`` little-endian ids of ``dtype`` ('uint16' or 'uint32')."""
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", shape=(int(n_tokens),))


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class _TokenStats:
    """Counts and running checksum of one token file being written."""

    def __init__(self) -> None:
        self.n_tokens = 0
        self.n_bytes = 0
        self.n_documents = 0
        self.sha256 = hashlib.sha256()


def build_caches(
    directory: Path,
    names: Sequence[str],
    key: Mapping[str, Any],
    tagged_documents: Iterable[tuple[str, str]],
    tokenizer: TextTokenizer,
    *,
    description: str = "the sources",
    batch_chars: int = 4_000_000,
) -> dict[str, TokenSet]:
    """Tokenize ``(name, document)`` pairs into the caches ``names`` in one pass, all with ``key``.

    Each document becomes ``[eot_id] + ids`` appended to its cache. Raises ``ValueError`` if a
    cache would receive no document (``description`` names the sources in that message).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = tokenizer.token_dtype.newbyteorder("<")
    stats = {name: _TokenStats() for name in names}
    with contextlib.ExitStack() as stack:
        handles = {name: stack.enter_context(atomic_binary_writer(cache_paths(directory, name)[0])) for name in names}
        for batch in _batched(tagged_documents, batch_chars):
            texts = [text for _, text in batch]
            for (name, text), ids in zip(batch, tokenizer.encode_batch(texts)):
                assert name in handles, f"document tagged {name!r}, expected one of {list(names)}"
                array = np.empty(len(ids) + 1, dtype=dtype)
                array[0] = tokenizer.eot_id
                array[1:] = ids
                data = array.tobytes()
                handles[name].write(data)
                entry = stats[name]
                entry.sha256.update(data)
                entry.n_tokens += array.shape[0]
                entry.n_bytes += len(text.encode("utf-8"))
                entry.n_documents += 1
        for name in names:
            if stats[name].n_documents == 0:
                raise ValueError(f"empty document set: {description} yielded no non-empty document for the {name!r} token set")
        # Drop the old manifests before the token files are replaced (on leaving this block) so a
        # crash in between never pairs an old manifest with a new token file.
        for name in names:
            cache_paths(directory, name)[1].unlink(missing_ok=True)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result = {}
    for name in names:
        tokens_path, manifest_path = cache_paths(directory, name)
        entry = stats[name]
        manifest = {
            "format": FORMAT_VERSION,
            "name": name,
            "key": normalize_key(key),
            "token_file": tokens_path.name,
            "dtype": dtype.name,
            "byte_order": "little",
            "n_tokens": entry.n_tokens,
            "n_bytes": entry.n_bytes,
            "n_documents": entry.n_documents,
            "file_bytes": entry.n_tokens * dtype.itemsize,
            "sha256": entry.sha256.hexdigest(),
            "created": created,
        }
        atomic_write_text(manifest_path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        logger.info(
            "cache %s: wrote %d tokens (%d documents, %d bytes of text) to %s",
            name, entry.n_tokens, entry.n_documents, entry.n_bytes, tokens_path,
        )
        result[name] = TokenSet(open_token_file(tokens_path, dtype.name, entry.n_tokens), entry.n_bytes)
    return result


def describe_key_change(old: Any, new: Mapping[str, Any]) -> str:
    """A short human-readable reason why two cache keys differ (for log messages)."""
    if not isinstance(old, dict):
        return "manifest has no key"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    reasons = []
    for field in changed:
        if field == "sources":
            reasons.append(_describe_source_change(old.get(field), new.get(field)))
        elif field == "tokenizer_sha256":
            reasons.append("tokenizer changed")
        else:
            reasons.append(f"{field}: {old.get(field)!r} -> {new.get(field)!r}")
    return "; ".join(reasons)


def _describe_source_change(old: Any, new: Any) -> str:
    if not isinstance(old, list) or not isinstance(new, list) or len(old) != len(new):
        return "the list of sources changed"
    for old_source, new_source in zip(old, new):
        if old_source == new_source:
            continue
        old_files = {f["path"]: f for f in old_source.get("files", [])} if isinstance(old_source, dict) else {}
        new_files = {f["path"]: f for f in new_source.get("files", [])}
        added = sorted(set(new_files) - set(old_files))
        removed = sorted(set(old_files) - set(new_files))
        modified = sorted(p for p in set(old_files) & set(new_files) if old_files[p] != new_files[p])
        details = [f"{label} {', '.join(paths[:3])}{' ...' if len(paths) > 3 else ''}" for label, paths in
                   (("added", added), ("removed", removed), ("modified", modified)) if paths]
        where = new_source.get("path") or new_source.get("name") or "a source"
        return f"source {where} changed: " + ("; ".join(details) if details else "options differ")
    return "sources changed"


def _batched(tagged_documents: Iterable[tuple[str, str]], batch_chars: int) -> Iterator[list[tuple[str, str]]]:
    # Batches of about batch_chars characters: large enough for parallel encoding to pay off,
    # small enough to bound memory.
    batch: list[tuple[str, str]] = []
    size = 0
    for item in tagged_documents:
        batch.append(item)
        size += len(item[1])
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
