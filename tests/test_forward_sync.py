"""Planted faults in the synchronization of the forward kernel (cuda_src/forward.cu attn_fwd): every
barrier and cp.async wait of its main loop (both K/V buffering schemes), of the causal V scrub and of
the epilogue, removed or weakened in a scratch copy of the source (tests/planting.py), must make the
emulated forward fail: a wrong result against the float64 reference, or an emulator error.

The emulator runs in interleave mode under the tests (conftest.py): threads switch at every
scheduling point in a seeded random order and half of the cp.async copies land at issue, so a
missing barrier lets a warp read a tile other threads have not copied yet (or one a prefetch is
overwriting), and a missing wait reads shared memory the copies have not reached.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupy_cosattn import api, reference
from cupy_cosattn import emulator as emu
from cupy_cosattn import problem as problem_mod
from cupy_cosattn.launch import limits, tiles

from kernel_cases import make_case
from planting import plant
from test_kernels_forward import check_forward

# D = 32 fp16: the smallest module of the 128-row kernels (fast to build). On the emulated A100 its
# K/V are double-buffered; a 48 KB device takes single buffers with staggered loads (two blocks fit
# only so).
D, DTYPE = 32, "float16"
SMALL = limits.DeviceCaps((8, 6), 48 * 1024, 84)


def _buffers(caps: limits.DeviceCaps) -> int:
    return tiles.fwd_tile(DTYPE, tiles.fwd_head_dim_pad(D), caps.smem_optin).kv_bufs


def test_devices_run_both_buffering_schemes():
    assert _buffers(limits.EMULATED_DEVICE) == 2 and _buffers(SMALL) == 1


def _case(dtype=DTYPE, d=D, **kw):
    # fp16 D = 32: 2 query blocks of 128 rows, 5 key tiles of 64 (the last partial)
    return make_case(17, B=1, H=2, Nq=200, Nk=300, D=d, dtype=dtype, **kw)


def _fails(run) -> None:
    with pytest.raises((AssertionError, emu.EmulatorError)):
        run()


# (id, original text, replacement, device, case): the original occurs exactly once in forward.cu with
# its headers inlined.
LOOP_FAULTS = [
    ("double_tile_ready", "        __syncthreads();                       // ... for every thread's copies\n", "",
     None, {}),
    ("double_wait_2", "cp_async_wait<1>();                    // all but the newest",
     "cp_async_wait<2>();                    // all but the newest", None, {}),
    ("double_buffer_reuse", "      if constexpr (KV_BUFS == 2) __syncthreads();  // every warp is done",
     "      if constexpr (KV_BUFS == 2) {}  // every warp is done", None, {}),
    ("single_k_ready",
     "        __syncthreads();                       // ... for every thread; every warp is done with V\n", "",
     SMALL, {}),
    ("single_v_ready", "        __syncthreads();     // ... for every thread; every warp is done with K",
     "        // ... for every thread; every warp is done with K", SMALL, {}),
    ("single_wait_k", "cp_async_wait<0>();                    // this tile's K landed",
     "cp_async_wait<1>();                    // this tile's K landed", SMALL, {}),
    ("single_wait_v", "cp_async_wait<0>();  // this tile's V landed", "cp_async_wait<1>();  // this tile's V landed",
     SMALL, {}),
    ("q_regs_wait", "cp_async_wait<1>();  // Q landed", "cp_async_wait<2>();  // Q landed", None, {}),
    ("q_regs_ready", "      __syncthreads();     // ... for every thread's Q copies\n", "", None, {}),
    ("syncwarp_before_stores", "      __syncwarp();\n      // 16-byte stores", "      // 16-byte stores", None, {}),
]


@pytest.mark.parametrize("fault", LOOP_FAULTS, ids=[f[0] for f in LOOP_FAULTS])
def test_planted_loop_fault_is_caught(monkeypatch, fault):
    _, old, new, caps, kw = fault
    args, kwargs = _case(causal=True, **kw)
    check_forward(args, kwargs)  # the real kernel passes this case
    plant(monkeypatch, "forward.cu", old, new)
    if caps is not None:
        monkeypatch.setattr(limits, "EMULATED_DEVICE", caps)
    _fails(lambda: check_forward(args, kwargs))


def test_planted_scrub_barrier_fault_is_caught(monkeypatch):
    """Causal, with NaN in the V rows of keys that the first rows of a diagonal tile must not see: the
    barrier after the scrub publishes the zeroed rows to every warp; without it some warp multiplies
    P = 0 by an unscrubbed NaN and poisons a row the reference keeps finite."""
    args, kw = _case(causal=True)
    v = np.array(args[2])
    v[:, :, 150:190:3, :] = np.nan  # keys of the third tile, hidden from the rows before them
    args = (args[0], args[1], v)
    prob, inp = problem_mod.canonicalize(*args, **kw)
    ref_o, _ = reference.forward64(prob, inp)
    finite_rows = np.isfinite(ref_o).all(axis=-1)

    def run():
        out, _ = api.forward(*args, backend="emulator", **kw)
        o = np.asarray(out, dtype=np.float64).reshape(ref_o.shape)
        assert np.isfinite(o[finite_rows]).all(), "a row that sees no NaN value came out NaN"
        assert np.isnan(o[~finite_rows]).all()

    assert finite_rows.any() and (~finite_rows).any()
    run()
    plant(monkeypatch, "forward.cu", "        scrub_v<T, DP, BN, L::ROW>(sVt);\n        __syncthreads();\n",
          "        scrub_v<T, DP, BN, L::ROW>(sVt);\n")
    _fails(run)


def test_planted_epilogue_barrier_fault_is_caught(monkeypatch):
    """Every key masked (make_case's batch row 0): no tile is visible, and the epilogue's barrier is all
    that keeps another thread's Q copy, landing at that thread's wait, from overwriting the O (zeros) a
    warp staged in its Q rows. Whether a copy lands in that window depends on the interleaving, so
    the planted fault runs under several seeds (the real kernel under all of them). fp32 (D = 128, where
    a seed of these exposes it): the 16-bit kernels wait for Q before their loop (its fragments go to
    registers), which closes the window."""
    args, kw = _case(dtype="float32", d=128, mask="random")
    assert not np.asarray(kw["mask"]).any()
    seeds = range(1, 9)

    def outputs():
        res = []
        for seed in seeds:
            with emu.interleave(seed):
                out, _ = api.forward(*args, backend="emulator", **kw)
            res.append(np.asarray(out, dtype=np.float64))
        return res

    assert all(np.all(o == 0) for o in outputs())
    plant(monkeypatch, "forward.cu", "    cp_async_wait<0>();\n    __syncthreads();\n    {\n",
          "    cp_async_wait<0>();\n    {\n")
    assert any(np.any(o != 0) for o in outputs()), "no seed exposed the missing epilogue barrier"


def test_planted_final_barrier_fault_is_caught(monkeypatch):
    """More (batch, head) pairs than the grid's y extent: the block loops, and the next pair's Q load
    must wait until every warp has copied its O out of the staging rows."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    args, kw = make_case(23, B=3, H=2, Nq=150, Nk=100, D=D, dtype=DTYPE)
    check_forward(args, kw)
    plant(monkeypatch, "forward.cu",
          "    __syncthreads();  // the staging area is Q's: the next (batch, head) reloads it\n", "")
    _fails(lambda: check_forward(args, kw))
