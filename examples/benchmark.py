#!/usr/bin/env python3
"""Benchmark cupy-cosattn against PyTorch's scaled_dot_product_attention and an unfused torch attention.

The harness is cupy_cosattn.bench (docs/benchmark.md has the method); this script runs it from a source
checkout without installing anything:

    python examples/benchmark.py --quick --out /tmp/bench      # ~1 minute on an H100
    python examples/benchmark.py --out /tmp/bench              # the full grid
    python examples/benchmark.py --smoke --out /tmp/smoke      # CPU smoke (automatic without CUDA)
    python examples/benchmark.py --decode --out /tmp/decode    # the decode section (KV cache, tokens/s)
    python examples/benchmark.py --help                        # every option
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if (REPO / "cupy_cosattn").is_dir() and str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # a source checkout: use the package beside this script

from cupy_cosattn.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
