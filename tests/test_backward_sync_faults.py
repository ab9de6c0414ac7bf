"""Planted faults in the synchronization of the backward kernels (cuda_src/backward.cu), on the CPU
emulator: each test compiles a scratch copy of the source with one barrier removed or one atomic made
plain (tests/planting.py) and checks that the emulator exposes it.

A removed barrier shows up under interleaving (docs/emulator.md, "Race exposure": threads run in a
seeded random order and half of the cp.async copies land late) as an emulator error or as gradients
off the float64 reference; a plain read-modify-write where blocks share an element shows up in race
mode as a data race between blocks. The unplanted kernels pass the same checks (the first test), so
each planted test fails only because of its fault."""
from __future__ import annotations

import numpy as np
import pytest

from cupy_cosattn import api, tolerances
from cupy_cosattn import emulator as emu

import kernel_cases
from planting import plant

# float16, D = 24 (DP = 32: bwd_dkdv 64 keys x 64 queries, bwd_dq 64 queries x 64 keys); 3 key tiles
# and 3 query tiles, so blocks share dq rows (fast mode) and each loop refills a stage it has read.
CASE = dict(B=1, H=2, Nq=160, Nk=144, D=24, dtype="float16")
SEEDS = (1, 2, 3)


def _grads(deterministic, seed, race=False):
    args, kw, dout = kernel_cases.make_case(11, with_dout=True, deterministic=deterministic, **CASE)
    out, lse = api.forward(*args, backend="reference", **kw)
    with emu.interleave(seed):
        if race:
            with emu.race_check():
                got = api.backward(dout, *args, out, lse, backend="emulator", **kw)
        else:
            got = api.backward(dout, *args, out, lse, backend="emulator", **kw)
    ref = api.backward(dout, *args, out, lse, backend="reference", **kw)
    return got, ref


def _off(got, ref) -> bool:
    """Any of dq, dk, dv, dscale outside the float16 gradient tolerance (or not finite)."""
    tol = tolerances.GRAD["float16"]
    for g, r in zip(got[:3] + (got[4],), ref[:3] + (ref[4],)):
        g, r = np.asarray(g, dtype=np.float64), np.asarray(r, dtype=np.float64)
        if not np.isfinite(g).all() or np.linalg.norm(g - r) > tol * max(np.linalg.norm(r), 1e-30):
            return True
    return False


def _exposed(deterministic) -> list:
    """For each seed: whether the fault was exposed (an emulator error, or gradients off)."""
    seen = []
    for seed in SEEDS:
        try:
            got, ref = _grads(deterministic, seed)
        except emu.EmulatorError:
            seen.append(True)
            continue
        seen.append(_off(got, ref))
    return seen


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
def test_unplanted_kernels_pass_every_seed(deterministic):
    assert _exposed(deterministic) == [False] * len(SEEDS)


BARRIERS = {
    # bwd_dkdv: a warp would read Qhat / dO / lse2 / D of a stage before other threads' copies landed.
    "dkdv_stage_landed": ("__syncthreads();  // this stage's copies (every thread's) have landed", False),
    # bwd_dkdv: the dQ products would read other warps' dS^T before it is written.
    "dkdv_ds_staged": ("__syncthreads();  // every warp's dS^T is staged before the dQ products read it", False),
    # bwd_dkdv: the next prefetch would overwrite a stage other warps still read. Deterministic mode:
    # with the dQ atomics the dS^T barrier already keeps every warp's stage reads before any refill.
    "dkdv_stage_released": ("__syncthreads();  // everyone is done with this stage (and sdS) before it is refilled",
                            True),
    # bwd_dq: a warp would read K / V / flags of a key tile before other threads' copies landed.
    "dq_tile_landed": ("__syncthreads();  // key tile kt's copies and flags have landed", True),
    # bwd_dq: the prefetch would overwrite a key tile other warps still read.
    "dq_stage_released": ("__syncthreads();  // this stage may be refilled next iteration", True),
}


@pytest.mark.parametrize("name", sorted(BARRIERS))
def test_removed_barrier_is_exposed(monkeypatch, name):
    old, deterministic = BARRIERS[name]
    plant(monkeypatch, "backward.cu", old, "/* planted: barrier removed */")
    assert any(_exposed(deterministic)), f"{name}: removing the barrier went unnoticed under seeds {SEEDS}"


ATOMICS = {
    # bwd_dkdv's per-row sums for dscale: the key-tile blocks of one head add to the same rows.
    "c_rows": ("atomicAdd(rows_c + col, cs[r]);", "rows_c[col] += cs[r];"),
    "r_rows": ("atomicAdd(rows_r + i, acc_r[2 * r]);", "rows_r[i] += acc_r[2 * r];"),
}


@pytest.mark.parametrize("name", sorted(ATOMICS))
def test_plain_dscale_row_sums_are_reported(monkeypatch, name):
    old, new = ATOMICS[name]
    plant(monkeypatch, "backward.cu", old, new)
    with pytest.raises(emu.EmulatorError) as ei:
        _grads(False, SEEDS[0], race=True)
    msg = str(ei.value)
    assert "bwd_dkdv" in msg and "data race in global memory between blocks" in msg
    assert "in buffer of shape (2, 2, 256) dtype float32" in msg  # (c, r) x (B*H) x nq_pad
    assert "in 1 buffer(s)" in msg  # dq's atomics are intact
