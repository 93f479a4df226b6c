"""Text sources: where documents come from.

A *source spec* is one string:

* ``stdlib`` - the Python standard library source of the running interpreter: every ``.py``
  file under ``sysconfig.get_paths()["stdlib"]`` in sorted order, one document per file,
  skipping test folders (``test``, ``tests``, ``idle_test``), ``site-packages``,
  ``dist-packages``, ``__pycache__`` and hidden folders. It needs no download and is the same
  on every run of the same interpreter, so it serves as the embedded default corpus. A local
  folder literally named ``stdlib`` is written ``./stdlib``.
* ``hf:NAME[:CONFIG][:SPLIT]`` - a Hugging Face dataset, streamed with
  ``datasets.load_dataset(NAME, CONFIG, split=SPLIT, streaming=True)`` (split defaults to
  ``train``). Needs the optional ``datasets`` package and network access to the hub.
  ``NAME`` may contain ``/`` (``org/name``) but no ``:``.
* anything else is a local path:

  - ``.txt``: the whole file is one document;
  - ``.jsonl``: one JSON object per line, the document in its ``text`` field (the field name
    is an option); blank lines are skipped;
  - ``.parquet``: one document per row of a text column (same option), via the optional
    ``pyarrow`` package;
  - a folder: every file with one of those suffixes below it, recursively, in sorted order
    of relative path; other files and hidden files/folders are ignored.

Files must be UTF-8 text. Every user mistake raises ``ValueError`` or ``FileNotFoundError``
naming the path (and line or byte offset) and the rule broken. File contents are read lazily,
so content errors (NUL bytes, bad UTF-8, a JSON line without the text field) surface while
iterating.

``open_source`` returns a :class:`Source`: a re-iterable stream of non-empty documents, a
human-readable description, and a JSON fingerprint (paths, sizes and modification times) that
token caches compare to detect stale data.
"""

from __future__ import annotations

import codecs
import importlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

STDLIB_SPEC = "stdlib"
HF_PREFIX = "hf:"
SUPPORTED_SUFFIXES = (".jsonl", ".parquet", ".txt")
DEFAULT_TEXT_FIELD = "text"
# Folder names below the stdlib root that hold tests or third-party code, not the stdlib itself.
STDLIB_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

DatasetLoader = Callable[..., Iterable[Mapping[str, Any]]]


class MissingDependencyError(ImportError, ValueError):
    """An optional package is needed for this input. Also a ``ValueError`` so the CLI prints it
    as a one-line user error."""


@dataclass(frozen=True)
class Source:
    """A re-iterable stream of documents (non-empty ``str``) with a description and fingerprint.

    ``fingerprint`` is JSON-serialisable and changes whenever the content may have changed
    (a file added, removed, resized or touched; another byte budget or text field). Iterating
    twice yields the same documents as long as the underlying files are unchanged.
    """

    spec: str
    description: str
    fingerprint: dict[str, Any]
    reader: Callable[[], Iterator[str]] = field(repr=False, compare=False)

    def documents(self) -> Iterator[str]:
        """A fresh iterator over the documents (each call starts from the beginning)."""
        return self.reader()

    def __iter__(self) -> Iterator[str]:
        return self.documents()


def _text_field(record: Mapping, text_field: str, where: str) -> str:
    """The string under ``text_field`` of one record (a .jsonl line, a dataset row); ``where``
    names the record in errors."""
    if text_field not in record:
        keys = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(f"{where}: no {text_field!r} field (fields: {keys}); choose the field with the text_field option")
    value = record[text_field]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def open_source(
    spec: str,
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    max_bytes: int | None = None,
    hf_loader: DatasetLoader | None = None,
) -> Source:
    """Resolve a source spec (see the module docstring) into a :class:`Source`.

    ``max_bytes`` caps the UTF-8 size of the text yielded (the last document is cut on a
    character boundary); ``None`` means no cap. ``hf_loader`` replaces
    ``datasets.load_dataset`` for ``hf:`` specs (tests, custom hubs).
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for other bad specs.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"source spec {spec!r}: must be a non-empty string (a path, 'stdlib' or 'hf:NAME')")
    _require_text_field(text_field)
    _require_byte_budget("max_bytes", max_bytes)
    if spec == STDLIB_SPEC:
        return stdlib_source(max_bytes=max_bytes)
    if spec.startswith(HF_PREFIX):
        name, config, split = parse_hf_spec(spec)
        return _capped(hf_source(name, config, split, text_field=text_field, loader=hf_loader), max_bytes)
    return _capped(local_source(Path(spec), text_field=text_field, max_bytes=max_bytes), max_bytes)


def parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    """Split ``hf:NAME[:CONFIG][:SPLIT]`` into (name, config or None, split, default 'train')."""
    if not spec.startswith(HF_PREFIX):
        raise ValueError(f"{spec!r}: a Hugging Face source must start with {HF_PREFIX!r}")
    parts = spec[len(HF_PREFIX):].split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise ValueError(f"{spec!r}: expected hf:NAME[:CONFIG][:SPLIT] with a non-empty NAME and at most two ':' after it")
    name = parts[0].strip()
    config = parts[1].strip() or None if len(parts) > 1 else None
    split = parts[2].strip() or "train" if len(parts) > 2 else "train"
    return name, config, split


# ----------------------------------------------------------------------------------------------
# Local files and folders


def local_source(path: Path, *, text_field: str = DEFAULT_TEXT_FIELD, max_bytes: int | None = None) -> Source:
    """A file or folder of ``.txt`` / ``.jsonl`` / ``.parquet`` files (see the module docstring).

    ``max_bytes``: read no more than about that much text (the exact cut is ``cap_bytes``'s,
    applied by ``open_source``): a 300 MB ``.txt`` under a 1 MB cap was read whole, 868 MB at
    peak (issue 16). The documents are the same as without it, up to the cap."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder (a source is a path, 'stdlib' or 'hf:NAME')")
    if path.is_dir():
        files = list_supported_files(path)
        if not files:
            raise ValueError(
                f"{path}: empty folder: no {'/'.join(SUPPORTED_SUFFIXES)} files below it "
                "(other suffixes and hidden files are ignored)"
            )
        root = path
        description = f"{path} ({len(files)} files)"
    else:
        _require_supported_suffix(path)
        files = [path]
        root = path.parent
        description = str(path)
    fingerprint = {
        "kind": "files",
        "path": str(path.resolve()),
        "text_field": text_field,
        "files": [_file_entry(f, root) for f in files],
    }

    def read() -> Iterator[str]:
        remaining = max_bytes
        for file in files:
            if remaining is not None and remaining <= 0:
                return
            for document in read_documents(file, text_field=text_field, max_bytes=remaining):
                if remaining is not None:
                    remaining -= len(document.encode("utf-8"))
                yield document

    return Source(spec=str(path), description=description, fingerprint=fingerprint, reader=_skip_empty(read))


def list_supported_files(folder: Path) -> list[Path]:
    """Supported files below ``folder``, recursively, sorted by relative path; hidden entries and
    other suffixes are skipped. Symbolic links to folders are not followed (no cycles)."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            file = Path(dirpath, name)
            if name.startswith(".") or file.suffix.lower() not in SUPPORTED_SUFFIXES:
                continue
            found.append((file.relative_to(folder).as_posix(), file))
    return [file for _, file in sorted(found)]


def read_documents(path: Path, *, text_field: str = DEFAULT_TEXT_FIELD,
                   max_bytes: int | None = None) -> Iterator[str]:
    """The documents of one supported file, chosen by its suffix; a ``.txt`` is read only up to
    about ``max_bytes`` (the others stream, so a cap stops them early already)."""
    suffix = _require_supported_suffix(path)
    if suffix == ".txt":
        yield read_text_file(path, max_bytes)
    elif suffix == ".jsonl":
        yield from read_jsonl(path, text_field=text_field)
    else:
        yield from read_parquet(path, text_field=text_field)


_CAP_SLACK_BYTES = 8
"""Read this much past a cap: a byte-order mark (3) and a character cut at the cap (< 4) are
then decided exactly as if the whole file had been read."""


def read_text_file(path: Path, max_bytes: int | None = None) -> str:
    """The file (its first ``max_bytes`` bytes and a few more, when given) as one string;
    rejects binary (NUL bytes) and non-UTF-8 content in what is read."""
    if max_bytes is None:
        data = Path(path).read_bytes()
        truncated = False
    else:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + _CAP_SLACK_BYTES)
            truncated = bool(handle.read(1))
    if truncated:
        # A character cut by the read is left out (the cap cuts before it anyway).
        nul = data.find(b"\0")
        if nul >= 0:
            decode_utf8(data, str(path))  # the binary-file error
        try:
            text = codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
        except UnicodeDecodeError as err:
            raise ValueError(
                f"{path}: not valid UTF-8 at byte offset {err.start} ({err.reason}); re-encode the file as UTF-8"
            ) from None
    else:
        text = decode_utf8(data, str(path))
    # A byte-order mark is an artifact of the file's encoding, not part of the document.
    return text[1:] if text.startswith("\ufeff") else text


def read_jsonl(path: Path, *, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """One document per JSON line, from ``text_field``; errors name ``path:line``."""
    offset = 0
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            line = decode_utf8(raw, where, offset_base=offset)
            offset += len(raw)
            if line_number == 1 and line.startswith("\ufeff"):
                line = line[1:]
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno}); .jsonl needs one JSON object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
            yield _text_field(record, text_field, where)


def read_parquet(path: Path, *, text_field: str = DEFAULT_TEXT_FIELD) -> Iterator[str]:
    """One document per row of column ``text_field``; needs the optional ``pyarrow``."""
    parquet = import_optional("pyarrow.parquet", package="pyarrow", purpose=f"reading {path}")
    try:
        parquet_file = parquet.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid/OSError zoo for bad files
        raise ValueError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from None
    columns = parquet_file.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); choose it with the text_field option")
    row = 0
    for batch in parquet_file.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                kind = "null" if value is None else type(value).__name__
                raise ValueError(f"{path}: row {row}: column {text_field!r} must hold strings, got {kind}")
            yield value


def decode_utf8(data: bytes, where: str, *, offset_base: int = 0) -> str:
    """Decode strictly, naming ``where`` and the absolute byte offset of the first bad byte."""
    nul = data.find(b"\0")
    if nul >= 0:
        raise ValueError(f"{where}: binary file (NUL byte at byte offset {offset_base + nul}); sources must be UTF-8 text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{where}: not valid UTF-8 at byte offset {offset_base + err.start} ({err.reason}); re-encode the file as UTF-8"
        ) from None


# ----------------------------------------------------------------------------------------------
# The Python standard library


def stdlib_source(max_bytes: int | None = None, *, root: Path | None = None) -> Source:
    """The ``.py`` files of the standard library (or of ``root``), sorted, one document each.

    Files that are not UTF-8 are skipped rather than fatal: this corpus is not user input.
    ``max_bytes`` caps the text yielded, so only as many files as needed are read.
    """
    _require_byte_budget("max_bytes", max_bytes)
    root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: the standard library folder of this interpreter does not exist")
    files = list_stdlib_files(root)
    if not files:
        raise ValueError(f"{root}: no .py files found for the 'stdlib' source")
    fingerprint = {
        "kind": "stdlib",
        "path": str(root.resolve()),
        "python": sys.version,
        "files": [_file_entry(f, root) for f in files],
    }

    def read() -> Iterator[str]:
        for file in files:
            try:
                yield read_text_file(file)
            except (ValueError, OSError) as err:
                logger.debug("stdlib source: skipping %s (%s)", file, err)

    source = Source(
        spec=STDLIB_SPEC,
        description=f"Python {sys.version.split()[0]} standard library ({root}, {len(files)} .py files)",
        fingerprint=fingerprint,
        reader=_skip_empty(read),
    )
    return _capped(source, max_bytes)


def list_stdlib_files(root: Path) -> list[Path]:
    """``.py`` files below ``root`` in sorted relative-path order, minus tests and third-party code."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith(".")]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("."):
                file = Path(dirpath, name)
                found.append((file.relative_to(root).as_posix(), file))
    return [file for _, file in sorted(found)]


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets


def hf_source(
    name: str,
    config: str | None = None,
    split: str = "train",
    *,
    text_field: str = DEFAULT_TEXT_FIELD,
    loader: DatasetLoader | None = None,
) -> Source:
    """A dataset streamed from the Hugging Face hub, one document per row's ``text_field``.

    ``loader`` defaults to ``datasets.load_dataset`` (optional dependency, checked here so a
    missing package fails before any work). The fingerprint holds only the name, config, split
    and field: upstream changes to a hub dataset are not detected.
    """
    spec = HF_PREFIX + ":".join([name, config or "", split])
    if loader is None:
        datasets_module = import_optional("datasets", package="datasets", purpose=f"reading {spec}")
        loader = _module_loader(datasets_module)
    fingerprint = {"kind": "hf", "name": name, "config": config, "split": split, "text_field": text_field}

    def read() -> Iterator[str]:
        try:
            dataset = loader(name, config, split=split, streaming=True)
        except Exception as err:  # datasets raises many types (network, unknown config, auth)
            raise ValueError(
                f"{spec}: could not load the dataset ({type(err).__name__}: {err}); check the name, config, split and network access"
            ) from err
        for row_number, row in enumerate(dataset, start=1):
            yield _text_field(row, text_field, f"{spec}: row {row_number}")

    description = f"Hugging Face dataset {name}" + (f" ({config})" if config else "") + f" split {split}"
    return Source(spec=spec, description=description, fingerprint=fingerprint, reader=_skip_empty(read))


def _module_loader(datasets_module: ModuleType) -> DatasetLoader:
    # Look the function up at call time so a monkeypatched datasets.load_dataset is honoured.
    def load(*args: Any, **kwargs: Any) -> Iterable[Mapping[str, Any]]:
        return datasets_module.load_dataset(*args, **kwargs)

    return load


# ----------------------------------------------------------------------------------------------
# Helpers


def cap_bytes(documents: Iterable[str], max_bytes: int | None) -> Iterator[str]:
    """Yield documents until their UTF-8 size reaches ``max_bytes``; the last one is cut on a
    character boundary so the total never exceeds the budget. ``None`` means no cap."""
    if max_bytes is None:
        yield from documents
        return
    remaining = max_bytes
    for document in documents:
        if remaining <= 0:
            return
        encoded = document.encode("utf-8")
        if len(encoded) <= remaining:
            remaining -= len(encoded)
            yield document
            continue
        # "ignore" only drops the incomplete multi-byte character left at the cut.
        head = encoded[:remaining].decode("utf-8", errors="ignore")
        if head:
            yield head
        return


def import_optional(module: str, *, package: str, purpose: str) -> ModuleType:
    """Import an optional dependency or raise :class:`MissingDependencyError` saying what needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(f"{purpose} needs the optional package {package!r}: pip install {package}") from err


def _capped(source: Source, max_bytes: int | None) -> Source:
    if max_bytes is None:
        return source
    reader = source.reader
    return Source(
        spec=source.spec,
        description=f"{source.description}, first {max_bytes} bytes",
        fingerprint={**source.fingerprint, "max_bytes": max_bytes},
        reader=lambda: cap_bytes(reader(), max_bytes),
    )


def _skip_empty(read: Callable[[], Iterator[str]]) -> Callable[[], Iterator[str]]:
    # An empty document would only add a separator token, so documents are non-empty by contract.
    def non_empty() -> Iterator[str]:
        return (document for document in read() if document)

    return non_empty


def _file_entry(path: Path, root: Path) -> dict[str, Any]:
    stat = path.stat()
    return {"path": path.relative_to(root).as_posix(), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _require_supported_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"{path}: unsupported suffix {suffix or '(none)'!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    return suffix


def _require_text_field(text_field: Any) -> None:
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field={text_field!r}: must be a non-empty string")


def _require_byte_budget(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}={value!r}: must be a positive integer number of bytes or None")
