"""The data pipeline: text sources -> byte-level BPE tokenizer -> memory-mapped token caches -> batches.

Modules, one job each:

* :mod:`~mhmoe.data.sources` - source specs (``stdlib``, local ``.txt``/``.jsonl``/``.parquet``
  files and folders, ``hf:NAME[:CONFIG][:SPLIT]``) as streams of documents with fingerprints;
* :mod:`~mhmoe.data.tokenizer` - train/load/save the tokenizer, its hash and id dtype;
* :mod:`~mhmoe.data.splits` - ``NAME=PATH`` evaluation specs and the held-out split;
* :mod:`~mhmoe.data.cache` - token files + manifests: reuse, staleness, corruption, atomic writes;
* :mod:`~mhmoe.data.batching` - resumable training batches, evaluation windows, bits per byte;
* :mod:`~mhmoe.data.prepare` - :func:`prepare_data`, the one call a trainer needs.

Optional dependencies, imported only when used: ``pyarrow`` (``.parquet`` files) and
``datasets`` (``hf:`` sources); without them those inputs raise
:class:`~mhmoe.data.sources.MissingDependencyError` with the ``pip install`` line.
"""

from mhmoe.data.batching import (
    IGNORE_INDEX,
    EvalBatch,
    TrainBatchSampler,
    bits_per_byte,
    count_eval_windows,
    eval_batches,
)
from mhmoe.data.cache import CorruptCacheError, TokenSet, build_caches, cache_paths, load_cache
from mhmoe.data.prepare import PreparedData, prepare_data, prepare_eval_sets
from mhmoe.data.sources import (
    MissingDependencyError,
    Source,
    cap_bytes,
    hf_source,
    local_source,
    open_source,
    parse_hf_spec,
    stdlib_source,
)
from mhmoe.data.splits import parse_eval_spec, parse_eval_specs, split_heldout
from mhmoe.data.tokenizer import EOT_TOKEN, TextTokenizer, load_tokenizer, token_dtype, train_tokenizer

__all__ = [
    "EOT_TOKEN",
    "IGNORE_INDEX",
    "CorruptCacheError",
    "EvalBatch",
    "MissingDependencyError",
    "PreparedData",
    "Source",
    "TextTokenizer",
    "TokenSet",
    "TrainBatchSampler",
    "bits_per_byte",
    "build_caches",
    "cache_paths",
    "cap_bytes",
    "count_eval_windows",
    "eval_batches",
    "hf_source",
    "load_cache",
    "load_tokenizer",
    "local_source",
    "open_source",
    "parse_eval_spec",
    "parse_eval_specs",
    "parse_hf_spec",
    "prepare_data",
    "prepare_eval_sets",
    "split_heldout",
    "stdlib_source",
    "token_dtype",
    "train_tokenizer",
]
