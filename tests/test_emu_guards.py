"""Emulator: the guard region before dynamic shared memory (smem[-1] is caught, as smem[n] is) and
the watchdog (a spin-wait on another thread's store makes progress; one that never ends is reported
with the spinning threads' call sites instead of hanging)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from cupy_cosattn import emulator as emu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SRC = r"""
#include <time.h>
#include "common.cuh"

// Thread 0 of each block reads (or writes) float i of the dynamic shared memory.
extern "C" __global__ void g_smem_at(int i, int write, float* out) {
  CA_DYNAMIC_SHARED(sm);
  float* s = (float*)sm;
  if (threadIdx.x == 0) {
    if (write) s[i] = 1.f;
    else out[blockIdx.x] = s[i];
  }
  if (threadIdx.x == 1) out[gridDim.x + blockIdx.x] = (float)((uintptr_t)sm % 4096);
}

// Thread 0 waits for a flag that thread 33 (another warp) sets with a plain store: legal on Volta+.
extern "C" __global__ void g_spin_for_flag(int* out) {
  __shared__ volatile int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x == 0) {
    while (flag == 0) {
    }
    out[0] = flag;
  }
  if (threadIdx.x == 33) flag = 7;
}

// Threads 0 and 1 wait for a flag that no thread sets.
extern "C" __global__ void g_spin_forever(int* out) {
  __shared__ volatile int flag;
  if (threadIdx.x == 0) flag = 0;
  __syncthreads();
  if (threadIdx.x < 2) {
    while (flag == 0) {
    }
  }
  out[threadIdx.x] = 1;
}

// A spin lock that the first thread takes and never releases.
extern "C" __global__ void g_lock_forever(int* lock) {
  while (atomicCAS(lock, 0, 1) != 0) {
  }
}

// Thread 0 computes for `seconds` without any scheduling point, storing to shared memory as it goes
// (touch = 1) or keeping everything in registers and its own stack (touch = 0).
extern "C" __global__ void g_busy(unsigned* out, double seconds, int touch) {
  __shared__ volatile unsigned count;
  if (threadIdx.x == 0) {
    count = 0;
    volatile unsigned local = 0;
    timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
      for (int i = 0; i < 20000; ++i) {
        if (touch) count = count + 1;
        else local = local + 1;
      }
      clock_gettime(CLOCK_MONOTONIC, &t);
      if ((t.tv_sec - t0.tv_sec) + 1e-9 * (t.tv_nsec - t0.tv_nsec) > seconds) break;
    }
    out[0] = count + local;
  }
}
"""


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17",))


def _smem_at(mod, i, write, smem=1024, grid=1):
    out = emu.device_zeros(2 * grid, np.float32)
    mod.get_function("g_smem_at")((grid,), (32,), (np.int32(i), np.int32(write), out), shared_mem=smem)
    return out


# ------------------------------------------------------------------------------------------------
# the guard before dynamic shared memory

@pytest.mark.parametrize("write", [0, 1])
def test_smem_minus_one_faults_under_start_placement(mod, write):
    with emu.placement("start"), pytest.raises(emu.EmulatorError) as ei:
        _smem_at(mod, -1, write)
    assert "g_smem_at" in str(ei.value) and "dynamic shared memory at byte offset -4" in str(ei.value)


def test_smem_minus_one_write_hits_a_canary_under_end_placement(mod):
    with emu.placement("end"), pytest.raises(emu.EmulatorError) as ei:
        _smem_at(mod, -1, 1, smem=1000)
    msg = str(ei.value)
    assert "g_smem_at" in msg and "out-of-bounds write to dynamic shared memory at byte offset -4" in msg


@pytest.mark.parametrize("launches", [1, 2])
def test_alternate_placement_catches_smem_minus_one_read(mod, launches):
    """Blocks alternate between the two guards (by block index and launch count): in a launch of two
    blocks, one of them reads s[-1] against the start guard."""
    for _ in range(launches):
        with emu.placement("alternate"), pytest.raises(emu.EmulatorError, match="byte offset -4"):
            _smem_at(mod, -1, 0, grid=2)


@pytest.mark.parametrize("place,smem,i,write,caught", [
    ("end", 1024, 256, 0, "access"),       # past the end: the end guard
    ("exact", 1000, 250, 0, "access"),     # past the end, no rounding
    ("start", 1024, 256, 1, "write"),      # past the end, in the slack: its canaries
    ("end", 1000, 250, 1, "write"),        # inside the rounding tail: a canary
])
def test_smem_past_the_end(mod, place, smem, i, write, caught):
    with emu.placement(place), pytest.raises(emu.EmulatorError) as ei:
        _smem_at(mod, i, write, smem=smem)
    assert f"out-of-bounds {caught}" in str(ei.value) and f"byte offset {4 * i}" in str(ei.value)


@pytest.mark.parametrize("place", ["start", "end", "exact", "alternate"])
def test_smem_in_bounds_and_aligned(mod, place):
    with emu.placement(place):
        for i in (0, 255):
            _smem_at(mod, i, 1, grid=2)
            out = _smem_at(mod, i, 0, grid=2)
            assert np.isnan(out[:2]).all()  # fresh shared memory of each block: garbage (NaN)
            assert np.all(out[2:] % 16 == 0)  # 16-byte aligned under every placement
            if place == "start":
                assert np.all(out[2:] == 0)  # page aligned: flush against the start guard


# ------------------------------------------------------------------------------------------------
# the watchdog

@pytest.mark.parametrize("seed", [None, 4])
def test_spin_wait_on_another_threads_store_makes_progress(mod, seed):
    out = emu.device_zeros(1, np.int32)
    with emu.interleave(seed), emu.watchdog(5.0):
        mod.get_function("g_spin_for_flag")((2,), (64,), (out,))
    assert out[0] == 7


def _watchdog_error(mod, kernel, args, bound=0.5):
    t = time.monotonic()
    with emu.watchdog(bound), pytest.raises(emu.EmulatorError) as ei:
        mod.get_function(kernel)((1,), (32,), args)
    return str(ei.value), time.monotonic() - t


def test_spin_on_a_flag_no_one_sets_is_reported(mod):
    msg, took = _watchdog_error(mod, "g_spin_forever", (emu.device_zeros(32, np.int32),))
    assert "g_spin_forever" in msg and "watchdog: no progress" in msg
    assert "2 thread(s) found spinning" in msg and "thread (0,0,0)" in msg and "thread (1,0,0)" in msg
    assert "in g_spin_forever [" in msg and "while (flag == 0)" in msg  # the function and source line
    assert "30 exited" in msg
    assert 0.5 <= took < 30
    _normal_kernel_still_runs(mod)


def test_spin_lock_never_released_is_reported(mod):
    msg, _ = _watchdog_error(mod, "g_lock_forever", (emu.to_device(np.ones(1, np.int32)),))
    assert "g_lock_forever" in msg and "watchdog: no progress" in msg and "in g_lock_forever [" in msg
    _normal_kernel_still_runs(mod)


def test_computing_without_memory_changes_counts_as_no_progress(mod):
    msg, _ = _watchdog_error(mod, "g_busy", (emu.device_zeros(1, np.uint32), np.float64(60.0), np.int32(0)))
    assert "1 thread(s) found spinning" in msg and "thread (0,0,0)" in msg and "in g_busy [" in msg


def test_computing_with_memory_changes_is_progress(mod):
    out = emu.device_zeros(1, np.uint32)
    with emu.watchdog(0.3):
        mod.get_function("g_busy")((1,), (32,), (out, np.float64(1.0), np.int32(1)))
    assert out[0] > 0


def _normal_kernel_still_runs(mod):
    out = emu.device_zeros(1, np.int32)
    mod.get_function("g_spin_for_flag")((1,), (64,), (out,))
    assert out[0] == 7


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "soon"])
def test_watchdog_setting_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="set_watchdog"):
        emu.set_watchdog(bad)


@pytest.mark.parametrize("value,expect", [("", "10.0"), ("off", "None"), ("2.5", "2.5")])
def test_watchdog_environment_variable(value, expect):
    code = "from cupy_cosattn import emulator; print(emulator.get_watchdog())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "CUPY_COSATTN_EMU_WATCHDOG": value})
    assert r.stdout.strip() == expect, r.stderr
