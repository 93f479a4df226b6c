"""Benchmarks behind ``mhmoe bench``: layer and end-to-end timing (``timing``), and the peer
implementations they compare against (``peers``)."""

from mhmoe.bench.peers import HF_IMPLEMENTATIONS, PEERS, build_peer, hf_available
from mhmoe.bench.timing import (
    VARIANTS,
    format_e2e_report,
    format_layer_report,
    run_e2e_benchmark,
    run_layer_benchmark,
    write_json,
)

__all__ = [
    "HF_IMPLEMENTATIONS",
    "PEERS",
    "VARIANTS",
    "build_peer",
    "format_e2e_report",
    "format_layer_report",
    "hf_available",
    "run_e2e_benchmark",
    "run_layer_benchmark",
    "write_json",
]
