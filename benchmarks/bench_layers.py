"""Layer and end-to-end speed benchmarks: a script entry to ``mhmoe bench`` (same options).

    python benchmarks/bench_layers.py layers --d-model 192 --tokens 16384
    python benchmarks/bench_layers.py layers --d-model 192 768 --tokens 4096 16384 --json out.json
    python benchmarks/bench_layers.py e2e --preset mini

See docs/benchmarks.md for the peers, the method and the latest results.
"""

from __future__ import annotations

import sys

from mhmoe.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
