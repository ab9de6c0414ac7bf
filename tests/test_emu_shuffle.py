"""Emulator: warp shuffles against the PTX ISA's definition of shfl.sync, case by case.

PTX ISA, shfl.sync (semantics section), for lane `lane` with operands b and c:

    bval = b[4:0]; cval = c[4:0]; segmask = c[12:8]
    maxLane = (lane & segmask) | (cval & ~segmask);  minLane = lane & segmask
    .up:   j = lane - bval;                     p = j >= maxLane
    .down: j = lane + bval;                     p = j <= maxLane
    .bfly: j = lane ^ bval;                     p = j <= maxLane
    .idx:  j = minLane | (bval & ~segmask);     p = j <= maxLane
    if !p: j = lane;  d = a[j]

and CUDA's intrinsics pass c = ((32 - width) << 8) | clamp, clamp 0 for __shfl_up_sync and 0x1f for
the others. `isa_source_lane` below transcribes the ISA text; the kernels shuffle each lane's own
index (and a 64-bit pattern) through emu::shfl_sync (raw b, c) and through the four intrinsics.
"""
import itertools

import numpy as np
import pytest

from cupy_cosattn import emulator as emu

MODES = {"idx": 0, "up": 1, "down": 2, "bfly": 3}


def isa_source_lane(mode: str, lane: int, b: int, c: int) -> int:
    """The lane whose value `lane` receives (PTX ISA shfl.sync)."""
    bval, cval, segmask = b & 31, c & 31, (c >> 8) & 31
    max_lane = (lane & segmask) | (cval & ~segmask)
    min_lane = lane & segmask
    if mode == "up":
        j, p = lane - bval, lane - bval >= max_lane
    elif mode == "down":
        j, p = lane + bval, lane + bval <= max_lane
    elif mode == "bfly":
        j, p = lane ^ bval, (lane ^ bval) <= max_lane
    else:
        j = min_lane | (bval & ~segmask)
        p = j <= max_lane
    return j if p else lane


def intrinsic_c(mode: str, width: int) -> int:
    return ((32 - width) << 8) | (0 if mode == "up" else 0x1F)


SRC = r"""
#include "common.cuh"
// cases[k] = {mode, b0, b_lane_step, c}: lane l shuffles with b = b0 + b_lane_step * l.
extern "C" __global__ void shfl_raw(const int* cases, int n, int* out, long long* out64) {
  const int l = threadIdx.x;
  for (int k = 0; k < n; ++k) {
    const int* cs = cases + 4 * k;
    const unsigned b = (unsigned)(cs[1] + cs[2] * l), c = (unsigned)cs[3];
    out[32 * k + l] = emu::shfl_sync(cs[0], 0xffffffffu, l, b, c);
    out64[32 * k + l] = emu::shfl_sync(cs[0], 0xffffffffu, (long long)l * 0x100000001ll - (1ll << 40), b, c);
  }
}
// cases[k] = {mode, b, width}, through the CUDA intrinsics.
extern "C" __global__ void shfl_intrinsics(const int* cases, int n, int* out) {
  const int l = threadIdx.x;
  for (int k = 0; k < n; ++k) {
    const int mode = cases[3 * k], b = cases[3 * k + 1], w = cases[3 * k + 2];
    int v = l;
    if (mode == 0) v = __shfl_sync(0xffffffffu, v, b, w);
    if (mode == 1) v = __shfl_up_sync(0xffffffffu, v, (unsigned)b, w);
    if (mode == 2) v = __shfl_down_sync(0xffffffffu, v, (unsigned)b, w);
    if (mode == 3) v = __shfl_xor_sync(0xffffffffu, v, b, w);
    out[32 * k + l] = v;
  }
}
"""


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17",))


# b values past 31 and negative (only b[4:0] counts), c values with every segment mask used by a
# power-of-two width and some that none gives (clamps below 31, masks that are not low bits).
B_VALUES = [0, 1, 3, 7, 16, 31, 32, 33, 37, 63, 64 + 5, 1000, -1, -5, -32, -33, 2**31 - 1, -(2**31)]
C_VALUES = [0x1F, 0x0, 0x101F, 0x181F, 0x1C1F, 0x1E1F, 0x1F1F, 0x1800, 0x1F00, 0x0007, 0x0815, 0x1010, 0x0A1F,
            0xFFFF, 0x7FFF_E01F]


def _run_raw(mod, cases):
    arr = np.array(cases, dtype=np.int64).astype(np.int32)  # b, c as 32-bit registers
    out = emu.device_zeros(32 * len(cases), np.int32)
    out64 = emu.device_zeros(32 * len(cases), np.int64)
    mod.get_function("shfl_raw")((1,), (32,), (emu.to_device(arr.reshape(-1)), np.int32(len(cases)), out, out64))
    return out.reshape(-1, 32), out64.reshape(-1, 32)


@pytest.mark.parametrize("mode", list(MODES))
def test_shfl_sync_raw_operands_follow_the_isa(mod, mode):
    cases = [(MODES[mode], b, 0, c) for b, c in itertools.product(B_VALUES, C_VALUES)]
    cases += [(MODES[mode], b0, step, c) for b0, step in ((0, 1), (5, 3), (-7, 11), (40, -1)) for c in C_VALUES]
    out, out64 = _run_raw(mod, cases)
    for k, (_, b0, step, c) in enumerate(cases):
        c32 = c & 0xFFFFFFFF
        expect = [isa_source_lane(mode, lane, (b0 + step * lane) & 0xFFFFFFFF, c32) for lane in range(32)]
        assert out[k].tolist() == expect, f"shfl.sync.{mode} b={b0}+{step}*lane c={c32:#x}"
        v64 = [j * 0x100000001 - (1 << 40) for j in expect]
        assert out64[k].tolist() == v64, f"64-bit shfl.sync.{mode} b={b0}+{step}*lane c={c32:#x}"


@pytest.mark.parametrize("mode", list(MODES))
def test_intrinsics_build_c_from_the_width(mod, mode):
    cases = [(MODES[mode], b, w) for b in B_VALUES for w in (1, 2, 4, 8, 16, 32)]
    arr = np.array(cases, dtype=np.int64).astype(np.int32)
    out = emu.device_zeros(32 * len(cases), np.int32)
    mod.get_function("shfl_intrinsics")((1,), (32,), (emu.to_device(arr.reshape(-1)), np.int32(len(cases)), out))
    out = out.reshape(-1, 32)
    for k, (_, b, w) in enumerate(cases):
        expect = [isa_source_lane(mode, lane, b & 0xFFFFFFFF, intrinsic_c(mode, w)) for lane in range(32)]
        assert out[k].tolist() == expect, f"{mode} b={b} width={w}"


def test_hand_worked_cases(mod):
    """A few results worked out by hand from the ISA text, independent of the transcription above."""
    lanes = np.arange(32)
    cases = [
        (2, 33, 0, 0x1F),    # down by 33 = down by 1: lane 31 keeps its own value
        (1, 32, 0, 0x0),     # up by 32 = up by 0: every lane its own
        (3, 33, 0, 0x1F),    # xor 33 = xor 1
        (0, -1, 0, 0x1F),    # idx -1 = idx 31
        (0, -1, 0, 0x181F),  # width 8 (segmask 0x18): idx 31 -> the segment's last lane
        (1, 1, 0, 0x1800),   # width 8 up by 1: each segment's first lane keeps its own
        (2, 1, 0, 0x0007),   # down by 1 with clamp 7, no segments: lanes 7.. keep their own
    ]
    out, _ = _run_raw(mod, cases)
    np.testing.assert_array_equal(out[0], np.minimum(lanes + 1, 31))
    np.testing.assert_array_equal(out[1], lanes)
    np.testing.assert_array_equal(out[2], lanes ^ 1)
    np.testing.assert_array_equal(out[3], np.full(32, 31))
    np.testing.assert_array_equal(out[4], (lanes // 8) * 8 + 7)
    np.testing.assert_array_equal(out[5], np.where(lanes % 8 == 0, lanes, lanes - 1))
    np.testing.assert_array_equal(out[6], np.where(lanes < 7, lanes + 1, lanes))


@pytest.mark.parametrize("width", [0, 3, 64, -32])
def test_intrinsic_width_not_a_power_of_two_is_an_error(mod, width):
    arr = np.array([2, 1, width], dtype=np.int32)
    with pytest.raises(emu.EmulatorError, match=rf"__shfl_down_sync with width {width}"):
        out = emu.device_zeros(32, np.int32)
        mod.get_function("shfl_intrinsics")((1,), (32,), (emu.to_device(arr), np.int32(1), out))
