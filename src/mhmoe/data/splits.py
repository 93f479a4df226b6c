"""Evaluation sets: ``NAME=PATH`` specs and a deterministic held-out split by documents.

When the user names no evaluation set, a fraction of the training documents is held out. The
choice is by position, not by chance: document ``i`` (0-based, counting non-empty documents
across all training sources in order) is held out when ``floor((i + 1) * f) > floor(i * f)``,
which spreads held-out documents evenly through the corpus (with ``f = 0.05``: documents 19, 39,
59, ...) and holds out exactly ``floor(n * f)`` of ``n`` documents. It needs no shuffling buffer,
works on streams, and gives the same split on every run.

A corpus with too few documents for that rule to pick any (fewer than ``1 / f``; typically one
big ``.txt`` file) falls back to holding out the last ``f`` fraction of the characters of the
last document, so a single-file corpus still gets an evaluation set (a warning is logged).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator
from fractions import Fraction

logger = logging.getLogger(__name__)

# Eval names become file names (cache NAME.tokens) and metric labels: keep them plain.
EVAL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
DEFAULT_HELDOUT_FRACTION = 0.05


def validate_eval_name(name: str) -> str:
    """Return ``name`` if it is a valid evaluation-set name, else raise ``ValueError``."""
    if not isinstance(name, str) or not EVAL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"evaluation set name {name!r}: must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
        )
    return name


def parse_eval_spec(text: str) -> tuple[str, str]:
    """Parse ``NAME=PATH`` (the path may itself contain '='; it may also be 'stdlib' or 'hf:...')."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"evaluation spec {text!r}: expected NAME=PATH, e.g. wiki=data/wiki.jsonl")
    name, path = text.split("=", 1)
    name, path = name.strip(), path.strip()
    if not name:
        raise ValueError(f"evaluation spec {text!r}: the NAME before '=' is empty (expected NAME=PATH)")
    if not path:
        raise ValueError(f"evaluation spec {text!r}: the PATH after '=' is empty (expected NAME=PATH)")
    validate_eval_name(name)
    return name, path


def parse_eval_specs(texts: Iterable[str] | None) -> dict[str, str]:
    """Parse several ``NAME=PATH`` specs into an ordered ``{name: path}``; names must be unique."""
    specs: dict[str, str] = {}
    for text in texts or ():
        name, path = parse_eval_spec(text)
        if name in specs:
            raise ValueError(f"evaluation spec {text!r}: name {name!r} is already used by {name}={specs[name]}")
        specs[name] = path
    return specs


def validate_heldout_fraction(fraction: float) -> Fraction:
    """``fraction`` as an exact ``Fraction`` in [0, 1); raises ``ValueError`` otherwise."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, Fraction)) or not 0 <= fraction < 1:
        raise ValueError(f"heldout_fraction={fraction!r}: must be a number in [0, 1)")
    # An exact fraction keeps the floor() rule free of float rounding (0.3 * 3 < 0.9 in floats).
    return Fraction(fraction).limit_denominator(1_000_000)


def is_heldout(index: int, fraction: Fraction) -> bool:
    """Whether document ``index`` is held out under the rule in the module docstring."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def split_heldout(documents: Iterable[str], fraction: float) -> Iterator[tuple[bool, str]]:
    """Yield ``(held_out, document)`` for each document, following the module docstring's rule.

    Raises ``ValueError`` if the fraction is positive but the corpus is too small to hold out
    even one character.
    """
    exact = validate_heldout_fraction(fraction)
    pending: tuple[bool, str] | None = None  # one document of look-ahead for the fallback
    any_heldout = False
    for index, document in enumerate(documents):
        if pending is not None:
            yield pending
        held_out = is_heldout(index, exact)
        any_heldout = any_heldout or held_out
        pending = (held_out, document)
    if pending is None:
        return
    if any_heldout or exact == 0:
        yield pending
        return
    _, last = pending
    n_heldout = max(1, round(len(last) * exact))
    cut = len(last) - n_heldout
    if cut <= 0:
        raise ValueError(
            f"cannot hold out {float(exact):g} of the training text: too little text; add documents or name an evaluation set (NAME=PATH)"
        )
    logger.warning(
        "too few training documents to hold out %g of them: holding out the last %d characters of the last document instead",
        float(exact),
        n_heldout,
    )
    yield False, last[:cut]
    yield True, last[cut:]
