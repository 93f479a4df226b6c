"""Byte-level BPE tokenizer: train locally, save/load ``tokenizer.json``, hash for cache checks.

Byte-level means the 256 byte values are base tokens, so every UTF-8 text encodes and
``decode(encode(text)) == text`` exactly (no normalisation, no unknown token). Training uses the
Hugging Face ``tokenizers`` library on a sample of the corpus (the first
``DEFAULT_SAMPLE_BYTES`` by default) so it stays fast; the result is deterministic for the same
sample and vocabulary size.

The special token ``<|endoftext|>`` (id 0 in trained tokenizers, ``eot_id`` in general) starts
every document in a token stream: it is both the document separator and the BOS token. Ordinary
text never produces it: a literal ``"<|endoftext|>"`` inside a document is encoded as plain
bytes (``encode_special_tokens``), so document boundaries exist only where the pipeline puts
them.

``TextTokenizer.sha256`` is the SHA-256 of the tokenizer's canonical JSON (sorted keys, no
whitespace), independent of how the file was formatted; token caches record it to detect a
changed tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mhmoe.data.sources import cap_bytes
from mhmoe.runs.atomic import atomic_write_text

logger = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
TOKENIZER_FILENAME = "tokenizer.json"
# 256 byte tokens plus <|endoftext|>: the smallest vocabulary that can encode everything.
MIN_VOCAB_SIZE = 257
DEFAULT_SAMPLE_BYTES = 5_000_000
# Documents longer than this are encoded in pieces (bounded memory), cut only where the
# pieces are guaranteed to tokenize exactly as the whole (see split_for_encoding).
DEFAULT_MAX_PIECE_CHARS = 1_000_000
# Characters that are certainly not whitespace to the pre-tokenizer regex (\s).
_NON_SPACE_PUNCTUATION = frozenset(string.punctuation)


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the pipeline's conventions: an ``<|endoftext|>`` token,
    exact byte-level round trips, a content hash and the numpy dtype for its ids."""

    def __init__(self, backend: Tokenizer, *, max_piece_chars: int = DEFAULT_MAX_PIECE_CHARS) -> None:
        eot_id = backend.token_to_id(EOT_TOKEN)
        if eot_id is None:
            raise ValueError(f"tokenizer has no {EOT_TOKEN!r} token; the data pipeline needs it as document separator")
        if max_piece_chars < 1:
            raise ValueError(f"max_piece_chars={max_piece_chars!r}: must be a positive integer")
        # Literal "<|endoftext|>" in a document is text, not a document boundary.
        backend.encode_special_tokens = True
        self.backend = backend
        self.eot_id: int = eot_id
        self.max_piece_chars = max_piece_chars
        canonical = canonical_json(backend)
        self.sha256: str = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        self._splits_safely_at_lines = _is_plain_byte_level(json.loads(canonical))

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (an embedding needs at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def token_dtype(self) -> np.dtype:
        """The smallest unsigned dtype holding every id."""
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, encoded in parallel; long texts are encoded piecewise."""
        pieces: list[str] = []
        owners: list[int] = []
        for index, text in enumerate(texts):
            for piece in self.split_for_encoding(text):
                pieces.append(piece)
                owners.append(index)
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        encodings = encode(pieces, add_special_tokens=False) if pieces else []
        result: list[list[int]] = [[] for _ in texts]
        for owner, encoding in zip(owners, encodings):
            result[owner].extend(encoding.ids)
        return result

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``; ``<|endoftext|>`` ids decode to that literal string."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def split_for_encoding(self, text: str) -> list[str]:
        """Cut ``text`` into pieces of about ``max_piece_chars`` that tokenize exactly as the whole.

        A cut goes right after a newline that sits between two characters that are certainly not
        whitespace (letters, digits, ASCII punctuation): the byte-level pre-tokenizer then ends a
        pre-token at the newline either way, and BPE never merges across pre-tokens. Tokenizers
        of another kind are never cut.
        """
        limit = self.max_piece_chars
        if len(text) <= limit or not self._splits_safely_at_lines:
            return [text]
        pieces = []
        start = 0
        while len(text) - start > limit:
            cut = _safe_cut(text, start, start + limit)
            if cut is None:
                break
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def save(self, path: Path) -> None:
        """Write ``tokenizer.json`` atomically."""
        atomic_write_text(Path(path), self.backend.to_str(pretty=True))

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size}, eot_id={self.eot_id}, sha256={self.sha256[:12]}...)"


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    *,
    sample_bytes: int | None = DEFAULT_SAMPLE_BYTES,
    description: str = "the training documents",
) -> TextTokenizer:
    """Train a byte-level BPE tokenizer on the first ``sample_bytes`` of ``documents``.

    The result has ``<|endoftext|>`` as id 0, the 256 byte tokens, and merges up to
    ``vocab_size`` ids (fewer if the sample is too small to find that many merges).
    ``description`` names the documents in the error raised when there are none.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an integer >= {MIN_VOCAB_SIZE} (256 bytes + {EOT_TOKEN})")
    if sample_bytes is not None and (isinstance(sample_bytes, bool) or not isinstance(sample_bytes, int) or sample_bytes < 1):
        raise ValueError(f"sample_bytes={sample_bytes!r}: must be a positive integer or None")
    sample = list(cap_bytes(documents, sample_bytes))
    if not any(sample):
        raise ValueError(f"empty document set: {description} yielded no non-empty document to train the tokenizer on")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        # All 256 bytes, even those absent from the sample, so any text can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sample, trainer=trainer, length=len(sample))
    tokenizer = TextTokenizer(backend)
    logger.info(
        "trained byte-level BPE: %d ids (asked %d) on %d bytes of text",
        tokenizer.vocab_size,
        vocab_size,
        sum(len(d.encode("utf-8")) for d in sample),
    )
    return tokenizer


def load_tokenizer(path: Path) -> TextTokenizer:
    """Load a ``tokenizer.json`` (a file, or a folder containing one)."""
    path = Path(path)
    if path.is_dir():
        path = path / TOKENIZER_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path}: not a valid tokenizer.json ({err})") from None
    try:
        return TextTokenizer(backend)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def canonical_json(backend: Tokenizer) -> str:
    """The tokenizer as JSON with sorted keys and no whitespace: equal tokenizers, equal strings."""
    return json.dumps(json.loads(backend.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise ValueError(f"vocab_size={vocab_size}: too large for 32-bit token ids")


def _is_plain_byte_level(config: dict[str, Any]) -> bool:
    # Safe cutting relies on exactly the GPT-2 regex of the ByteLevel pre-tokenizer and on no
    # normaliser changing text across the cut.
    pre = config.get("pre_tokenizer") or {}
    return config.get("normalizer") is None and pre.get("type") == "ByteLevel" and bool(pre.get("use_regex", True))


def _is_certainly_not_space(char: str) -> bool:
    return char.isalnum() or char in _NON_SPACE_PUNCTUATION


def _is_safe_cut(text: str, index: int) -> bool:
    return (
        index >= 2
        and index < len(text)
        and text[index - 1] == "\n"
        and _is_certainly_not_space(text[index - 2])
        and _is_certainly_not_space(text[index])
    )


def _safe_cut(text: str, start: int, target: int) -> int | None:
    """The safe cut nearest below ``target`` (after ``start``), else the first one above it."""
    newline = text.rfind("\n", start + 1, target)
    while newline > start:
        if _is_safe_cut(text, newline + 1):
            return newline + 1
        newline = text.rfind("\n", start + 1, newline)
    newline = text.find("\n", target)
    while newline != -1:
        if _is_safe_cut(text, newline + 1):
            return newline + 1
        newline = text.find("\n", newline + 1)
    return None
