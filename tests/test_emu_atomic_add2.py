"""common.cuh ``atomic_add2``: two adjacent fp32 atomic adds (one ``red.global.add.v2.f32`` on sm_90,
two ``atomicAdd`` before and in the emulator), as bwd_dkdv's dQ accumulation uses it.

Per lane on the emulator: every lane of several blocks adds its own pair to overlapping pairs of a
small buffer; the sums are exact (small integers), both elements of each pair are updated, the guard
elements past them are not, and race mode sees atomics, not races. Under NVRTC (when installed): the
sm_90 build holds the vector reduction and the sm_80 build two scalar ones."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cupy_cosattn import emulator as emu
from cupy_cosattn import sass
from cupy_cosattn.launch import sources

N = 32   # threads per block
PAIRS = 4
GUARD = 2  # elements past the pairs that nothing may touch

SRC = r"""
#include "common.cuh"
// Lane l of block b adds (b + 1, -(l + 1)) to pair l % pairs (elements 2p, 2p + 1) of acc.
extern "C" __global__ void add2(float* acc, int pairs) {
  const int l = threadIdx.x;
  ca::atomic_add2(acc + 2 * (l % pairs), (float)(blockIdx.x + 1), -(float)(l + 1));
}
"""


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=sources.compile_options())


def _expected(blocks):
    want = np.zeros(2 * PAIRS + GUARD, dtype=np.float64)
    for b in range(blocks):
        for lane in range(N):
            p = lane % PAIRS
            want[2 * p] += b + 1
            want[2 * p + 1] -= lane + 1
    return want


@pytest.mark.parametrize("blocks", [1, 3])
def test_every_lane_adds_both_elements(mod, blocks):
    acc = emu.device_zeros(2 * PAIRS + GUARD, np.float32)
    with emu.race_check():  # atomics from several blocks: no race report
        mod.get_function("add2")((blocks,), (N,), (acc, np.int32(PAIRS)))
    np.testing.assert_array_equal(np.asarray(acc, dtype=np.float64), _expected(blocks))


def _tools_missing():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001
        return f"NVRTC not available ({type(e).__name__}: {e})"
    return None if sass.find_nvdisasm() else "nvdisasm not found (pip install nvidia-cuda-nvdisasm)"


REQUIRED = os.environ.get("CUPY_COSATTN_REQUIRE_NVRTC", "") not in ("", "0")


@pytest.mark.skipif(not REQUIRED and _tools_missing() is not None, reason=str(_tools_missing()))
@pytest.mark.parametrize("arch,vector", [("sm_80", False), ("sm_90", True)])
def test_vector_reduction_where_the_architecture_has_it(arch, vector):
    res = sass.compile_sass(SRC, ("add2",), arch, options=sources.compile_options())
    reds = [line for line in res["sass"].splitlines() if "RED" in line and ".ADD" in line]
    if vector:
        assert len(reds) == 1 and "F32x2" in reds[0], reds
    else:
        assert len(reds) == 2 and not any("F32x2" in r for r in reds), reds
