"""Emulator: detection of races between blocks in global memory (emulator.set_race_check).

Small kernels with and without races between blocks (plain read-modify-writes, a read of what
another block wrote, cp.async and memcpy reads and writes, vector stores) against atomics and
block-private data; the planted faults: backward.cu's dQ atomic_add2, and its broadcast-dbias
atomicAdd, each replaced by plain `+=` in a scratch copy of the source, must be reported; and a
small forward + backward of the real kernels, in both backward modes, must run clean in this mode."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from cupy_cosattn import api
from cupy_cosattn import emulator as emu

import kernel_cases
from planting import plant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 32  # threads per block, elements per block row

SRC = r"""
#include <string.h>
#include "common.cuh"
extern "C" __global__ void r_add_plain(float* acc, const float* x) {
  acc[threadIdx.x] += x[blockIdx.x * blockDim.x + threadIdx.x];
}
extern "C" __global__ void r_add_atomic(float* acc, const float* x) {
  atomicAdd(acc + threadIdx.x, x[blockIdx.x * blockDim.x + threadIdx.x]);
}
// Each block reads the row it owns and rereads it after a barrier: no race.
extern "C" __global__ void r_own_rows(float* y, const float* x) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  y[i] = 2.f * x[i];
  __syncthreads();
  y[i] += y[blockIdx.x * blockDim.x + (threadIdx.x + 1) % blockDim.x];
}
// Block b reads the row block b - 1 wrote: a race (the barrier orders only a block's own threads).
extern "C" __global__ void r_read_neighbour(float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  y[i] = 1.f;
  __syncthreads();
  if (blockIdx.x > 0) y[i] += y[i - blockDim.x];
}
// Block 1 copies (cp.async) what block 0 writes.
extern "C" __global__ void r_cp_async(float* y) {
  CA_DYNAMIC_SHARED(smem);
  if (blockIdx.x == 0) {
    y[4 * threadIdx.x] = 1.f;
  } else {
    ca::cp_async_16(smem + 16 * threadIdx.x, y + 4 * threadIdx.x);
    ca::cp_async_commit();
    ca::cp_async_wait<0>();
  }
}
// Every block memcpy's its row into row 0 (a library call, not inlined: n is a runtime value).
extern "C" __global__ void r_memcpy(float* y, int n) {
  if (threadIdx.x == 0) memcpy(y, y + blockIdx.x * n + n, n * sizeof(float));
}
// Struct stores: block b writes float4 b % 2 of the buffer.
extern "C" __global__ void r_float4(float4* y) {
  if (threadIdx.x == 0) y[blockIdx.x % 2] = make_float4(1.f, 2.f, 3.f, (float)blockIdx.x);
}
"""


@pytest.fixture(scope="module")
def mod():
    return emu.RawModule(code=SRC, options=("-std=c++17",))


def _x(blocks):
    return emu.to_device(np.arange(blocks * N, dtype=np.float32))


def _race(mod, kernel, grid, args, smem=0):
    """The race report of one launch in race mode (None when there is none)."""
    with emu.race_check():
        try:
            mod.get_function(kernel)((grid,), (N,), args, shared_mem=smem)
        except emu.EmulatorError as e:
            return str(e)
    return None


def test_race_mode_is_off_by_default_and_sees_nothing_then(mod):
    assert not emu.get_race_check()
    acc = emu.device_zeros(N, np.float32)
    mod.get_function("r_add_plain")((4,), (N,), (acc, _x(4)))  # no report without the mode


# One reported race: which buffer (byte offset, element) and which blocks and threads did what.
RACE = re.compile(r"in buffer of shape (?P<shape>\([0-9, ]*\)) dtype (?P<dtype>\w+) .*?"
                  r"at byte offset (?P<off>\d+), element (?P<elem>\d+).*?: "
                  r"block \((?P<b>\d+),0,0\) thread \((?P<t>\d+),0,0\) (?P<what>reads|writes) (?P<n>\d+) byte\(s\) "
                  r"that block \((?P<ob>\d+),0,0\) thread \((?P<ot>\d+),0,0\) (?P<owhat>wrote|read)")


def _first_race(msg):
    m = RACE.search(msg or "")
    assert m, msg
    return m


def test_plain_read_modify_write_by_several_blocks_is_reported(mod):
    msg = _race(mod, "r_add_plain", 4, (emu.device_zeros(N, np.float32), _x(4)))
    assert "r_add_plain" in msg and "data race in global memory between blocks" in msg
    assert "in 1 buffer(s)" in msg  # x is only read
    # the first race (which blocks depends on the interleaving): a block reads, in the (32,) float32
    # accumulator, the element its thread t owns, that thread t of another block wrote
    m = _first_race(msg)
    assert (m["shape"], m["dtype"], m["what"], m["n"], m["owhat"]) == ("(32,)", "float32", "reads", "4", "wrote")
    assert m["b"] != m["ob"] and m["t"] == m["ot"] == m["elem"] and int(m["off"]) == 4 * int(m["t"])


def test_atomics_and_block_private_data_are_clean(mod):
    acc = emu.device_zeros(N, np.float32)
    assert _race(mod, "r_add_atomic", 4, (acc, _x(4))) is None
    np.testing.assert_array_equal(acc, np.arange(4 * N, dtype=np.float32).reshape(4, N).sum(0))
    y = emu.device_empty(4 * N, np.float32)
    assert _race(mod, "r_own_rows", 4, (y, _x(4))) is None
    assert _race(mod, "r_read_neighbour", 1, (emu.device_empty(N, np.float32),)) is None  # one block


def test_read_of_another_blocks_store_is_reported(mod):
    m = _first_race(_race(mod, "r_read_neighbour", 3, (emu.device_empty(3 * N, np.float32),)))
    assert m["shape"] == "(96,)" and int(m["elem"]) // N in (int(m["b"]), int(m["b"]) - 1)
    assert abs(int(m["b"]) - int(m["ob"])) == 1  # neighbours: one reads the other's row


def test_runtime_copies_memcpy_and_vector_stores_are_seen(mod):
    m = _first_race(_race(mod, "r_cp_async", 2, (emu.device_zeros(4 * N, np.float32),), smem=16 * N))
    assert {m["b"], m["ob"]} == {"0", "1"} and {m["what"], m["owhat"]} <= {"reads", "writes", "wrote", "read"}
    assert (m["what"], m["n"]) in (("reads", "16"), ("writes", "4"))  # cp.async reads 16 bytes, block 0 stores 4
    m = _first_race(_race(mod, "r_memcpy", 3, (emu.device_zeros(4 * 8, np.float32), np.int32(8))))
    assert m["what"] == "writes" and m["n"] == "32" and int(m["off"]) < 32  # a whole row into row 0
    m = _first_race(_race(mod, "r_float4", 3, (emu.device_zeros(8, np.float32),)))
    # the compiler may split the float4 store: any part of it races
    assert (m["what"], m["owhat"]) == ("writes", "wrote") and {m["b"], m["ob"]} == {"0", "2"}
    assert _race(mod, "r_float4", 2, (emu.device_zeros(8, np.float32),)) is None


def test_race_check_setting_and_environment_variable():
    with emu.race_check():
        assert emu.get_race_check()
    assert not emu.get_race_check()
    code = "from cupy_cosattn import emulator; print(emulator.get_race_check())"
    for value, expect in (("1", "True"), ("off", "False"), ("", "False")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "CUPY_COSATTN_EMU_RACE": value})
        assert r.stdout.strip() == expect, r.stderr


# ------------------------------------------------------------------------------------------------
# The real kernels. One (dtype, D) for every test below, so that they share the instrumented builds.

CASE = dict(B=2, H=2, Nq=40, Nk=72, D=24, dtype="float16")  # 2 key tiles of bwd_dkdv per query row

DQ_ATOMIC = "atomic_add2(dq_row[r] + x, acc[n][2 * r], acc[n][2 * r + 1]);"
DQ_PLAIN = "{ dq_row[r][x] += acc[n][2 * r]; dq_row[r][x + 1] += acc[n][2 * r + 1]; }"
DBIAS_ATOMIC = "atomicAdd(static_cast<float*>(p.dbias) + off, x);"
DBIAS_PLAIN = "static_cast<float*>(p.dbias)[off] += x;"


def _scratch_backward(monkeypatch, old, new):
    """backward.cu with `old` replaced by `new`, in a scratch copy of the source (the file is untouched)."""
    plant(monkeypatch, "backward.cu", old, new)


def _backward(**kw):
    """The emulated backward of CASE in race mode (out and lse from the reference)."""
    args, k, dout = kernel_cases.make_case(5, with_dout=True, **{**CASE, **kw})
    out, lse = api.forward(*args, backend="reference", **k)
    with emu.race_check():
        return api.backward(dout, *args, out, lse, backend="emulator", **k)


def test_planted_plain_dq_accumulation_is_reported(monkeypatch):
    _scratch_backward(monkeypatch, DQ_ATOMIC, DQ_PLAIN)
    with pytest.raises(emu.EmulatorError) as ei:
        _backward(deterministic=False)
    msg = str(ei.value)
    assert "bwd_dkdv" in msg and "data race in global memory between blocks" in msg
    assert "in buffer of shape (2, 2, 40, 32) dtype float32" in msg  # dq-hat (B, H, Nq, DP)
    assert "in 1 buffer(s)" in msg


def test_planted_plain_broadcast_dbias_accumulation_is_reported(monkeypatch):
    _scratch_backward(monkeypatch, DBIAS_ATOMIC, DBIAS_PLAIN)
    with pytest.raises(emu.EmulatorError) as ei:
        _backward(deterministic=False, bias="head")
    msg = str(ei.value)
    assert "bwd_dkdv" in msg and "data race in global memory between blocks" in msg
    assert "in buffer of shape (1, 2, 40, 72) dtype float32" in msg  # dbias summed over the batch
    assert "in 1 buffer(s)" in msg  # dq's atomics are intact


@pytest.mark.parametrize("kw", [dict(deterministic=False, bias="head", causal=True),
                                dict(deterministic=True, bias="batch", mask="random", Hk=1)])
def test_forward_and_backward_are_race_free(kw):
    args, k, dout = kernel_cases.make_case(6, with_dout=True, **{**CASE, **kw})
    with emu.race_check():
        out, lse = api.forward(*args, backend="emulator", **k)
        grads = api.backward(dout, *args, out, lse, backend="emulator", **k)
    ref = api.backward(dout, *args, out, lse, backend="reference", **k)
    for g, r in zip(grads[:3], ref[:3]):
        assert kernel_cases.rel_err(g, r) < 1e-2
