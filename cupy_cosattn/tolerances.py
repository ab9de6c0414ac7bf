"""Accuracy tolerances against the float64 reference (docs/design.md section 2), by dtype name, defined once
for the tests, scripts/emu_vs_gpu.py and the benchmark.

Each is a bound on a relative error ||x - ref|| / ||ref|| unless its comment says otherwise.
"""
from __future__ import annotations

# The contract: the forward's output, and the gradients dq, dk, dv, dbias.
OUT = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 1e-5}
GRAD = {"float16": 1e-2, "bfloat16": 5e-2, "float32": 1e-4}

# About one rounding of a magnitude-1 value in the dtype (unit roundoff with headroom): the absolute
# error of lse relative to the logit bound, and of an l2-normalized row.
ROUNDING = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 1e-6}

# The same kernels on the CPU emulator and on a GPU (scripts/emu_vs_gpu.py): about one unit of the
# dtype, as summation orders differ between the two.
AGREE = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 2e-6}

# The benchmark's check of each implementation's forward: OUT doubled for the rounding of the
# pre-normalized q, k that every implementation gets in the benchmark's dtype.
BENCH_CHECK = {name: 2 * tol for name, tol in OUT.items()}
