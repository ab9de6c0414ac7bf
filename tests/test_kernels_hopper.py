"""The sm_90a forward (cuda_src/hopper_fwd.cu; launch.sm90, picked by launch.dispatch) on the CPU emulator
presenting itself as an H100 (``limits.emulated_arch("sm_90a")``, or CUPY_COSATTN_EMU_ARCH=sm_90a),
against the float64 reference; planted synchronization faults; the non-finite rule; dispatch; and the
NVRTC gate for -arch=sm_90a.

Accuracy as for the portable forward (test_kernels_forward.check_forward: DESIGN.md section 2). Every
accuracy test also asserts that the Hopper kernel is what ran.
"""
from __future__ import annotations

import contextlib
import os
import re
import zlib

import numpy as np
import pytest

from cupy_cosattn import api, problem, reference, resources
from cupy_cosattn import emulator as emu
from cupy_cosattn.launch import devices, dispatch, forward, limits, params, registry, sm90, sources, staging, tiles

import test_kernels_backward as tkb
import test_kernels_forward as tkf
from kernel_cases import make_case, rel_err
from test_kernels_forward import check_forward

SM90 = limits.EMULATED_DEVICES["sm_90a"]


@pytest.fixture
def h100(monkeypatch):
    """The emulator as an H100; yields the list of Hopper forward launches (kernel names)."""
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM90)
    return _spy(monkeypatch)


def _spy(monkeypatch):
    """The names of the Hopper kernels launched from now on (Device.launch wrapped)."""
    ran = []
    real = devices.Device.launch

    def spy(self, choice, arg):
        if choice.spec.source == sm90.SOURCE:
            ran.append(choice.spec.name)
        return real(self, choice, arg)

    monkeypatch.setattr(devices.Device, "launch", spy)
    return ran


def _name(dtype, D, running_max):
    return registry.sm90_fwd_name(dtype, tiles.fwd_head_dim_pad(D), running_max)


def _check(h100, seed, **case):
    args, kw = make_case(seed, **case)
    n = len(h100)
    check_forward(args, kw)
    assert len(h100) == n + 1, "the Hopper forward did not run"


# ---------------------------------------------------------------------------------------------------
# The grid: one test per (dtype, D) runs every feature on ragged lengths (not multiples of the 128-row /
# 128-key tiles), so a failure names the case. B*H <= 4 and N <= 450 keep the emulator fast.

GRID = {
    "plain": dict(Nq=130, Nk=200),
    "causal_nk_gt_nq": dict(Nq=130, Nk=250, causal=True),
    "causal_nq_gt_nk": dict(Nq=200, Nk=70, causal=True),  # the first 130 rows see nothing
    "mask": dict(B=2, H=1, Nq=70, Nk=230, mask="random"),  # batch 0 fully masked
    "mask_causal": dict(B=2, H=1, Nq=150, Nk=150, mask="random", causal=True),
    "mask_ring_wraps": dict(B=2, H=1, Nq=70, Nk=450, mask="random"),  # 4 key tiles: every stage reused
    "bias_head": dict(H=2, Nq=90, Nk=140, bias="head"),
    "bias_batch_f32": dict(B=2, H=1, Nq=60, Nk=130, bias="batch", bias_f32=True),
    "bias_full_mask_causal": dict(B=2, H=1, Nq=129, Nk=190, bias="full", mask="random", causal=True),
    "gqa_causal": dict(H=4, Hk=2, Nq=100, Nk=170, causal=True),  # Hk > 1: h / (H / Hk), not h % Hk
    "groups4": dict(H=1, Nq=70, Nk=150, groups=4),
    "per_head_scale": dict(H=2, Nq=60, Nk=200, per_head_scale=True),
    "merged_3d": dict(merged=True, B=2, H=1, Nq=33, Nk=140, mask="random", bias="head"),
    "large_scale_running_max": dict(H=1, Nq=64, Nk=140, scale=24.0),
    "prenormalized": dict(H=1, Nq=50, Nk=129, l2norm_qk=False, causal=True),
    "nq1": dict(H=1, Nq=1, Nk=77),
    "nk1": dict(H=1, Nq=20, Nk=1),
}


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hopper_forward_grid(h100, dtype, D):
    failures = []
    for name, case in GRID.items():
        case = dict(case)
        if case.get("groups", 1) > 1 and D % case["groups"]:
            continue
        try:
            _check(h100, zlib.crc32(f"{name}{dtype}{D}".encode()), D=D, dtype=dtype, **case)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    assert set(h100) == {_name(dtype, D, rm) for rm in (False, True)}  # both variants ran


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hopper_forward_grid_gpu(monkeypatch, dtype, D):
    """The same grid on an H100 / H200 through CuPy (the dispatch picks the kernel by the device)."""
    cp = pytest.importorskip("cupy")
    if cp.cuda.Device().compute_capability != "90":
        pytest.skip(f"needs a compute capability 9.0 device, this one is {cp.cuda.Device().compute_capability}")
    ran = _spy(monkeypatch)
    failures = []
    for name, case in GRID.items():
        if case.get("groups", 1) > 1 and D % case["groups"]:
            continue
        args, kw = make_case(zlib.crc32(f"{name}{dtype}{D}".encode()), D=D, dtype=dtype, **case)
        try:
            check_forward(args, kw, backend="cuda")
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    assert set(ran) == {_name(dtype, D, rm) for rm in (False, True)}


# ---------------------------------------------------------------------------------------------------
# The kernel grids of test_kernels_forward.py and test_kernels_backward.py on the cases the Hopper forward
# takes (16-bit, D = 64, 128), the gradients from the backward fed by its out and lse. The whole files
# run with CUPY_COSATTN_EMU_ARCH=sm_90a too (docs/kernels.md); CI runs the covering subset below (every
# flag combination of both grids: mode x bias x kv layout x backward mode, in each dtype and D once),
# the rest is marked slow.

KERNEL_GRID = [(dtype, D, N) for dtype in ("float16", "bfloat16") for D in (64, 128) for N in (63, 127)]
CI_KERNEL_GRID = [("float16", 64, 63), ("bfloat16", 128, 63)]  # N = 127 (two backward key tiles): slow
SLOW_KERNEL_GRID = [c for c in KERNEL_GRID if c not in CI_KERNEL_GRID]


def _kernel_grids(h100, dtype, D, N):
    tkf._grid("emulator", dtype, D, N)
    assert len(h100) == len(tkf.GRID_FLAGS), "the Hopper forward did not run on every forward case"
    tkb._grid("emulator", dtype, D, N, forward="emulator")
    assert len(h100) == len(tkf.GRID_FLAGS) + len(tkb.GRID_FLAGS), "the backward was not fed by the Hopper forward"


@pytest.mark.parametrize("dtype,D,N", CI_KERNEL_GRID)
def test_kernel_grids_on_the_hopper_forward(h100, dtype, D, N):
    _kernel_grids(h100, dtype, D, N)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,D,N", SLOW_KERNEL_GRID)
def test_kernel_grids_on_the_hopper_forward_exhaustive(h100, dtype, D, N):
    _kernel_grids(h100, dtype, D, N)


# The backward's edge configurations that the Hopper forward takes, fed by it; in CI each in one dtype.
HOPPER_BWD_CONFIGS = sorted(n for n, c in tkb.CONFIGS.items() if c.get("D", 64) == 64)
CI_BWD_CONFIGS = [(n, ("float16", "bfloat16")[i % 2]) for i, n in enumerate(HOPPER_BWD_CONFIGS)]


def _bwd_config(h100, name, dtype):
    args, kw, dout = tkb.make_case(zlib.crc32(name.encode()), dtype=dtype, **tkb.CONFIGS[name])
    tkb.check_grads(args, kw, dout, forward="emulator")
    assert len(h100) == 1, "the Hopper forward did not run"


@pytest.mark.parametrize("name,dtype", CI_BWD_CONFIGS, ids=[f"{n}-{d}" for n, d in CI_BWD_CONFIGS])
def test_backward_configs_on_the_hopper_forward(h100, name, dtype):
    _bwd_config(h100, name, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name,dtype", [(n, d) for n in HOPPER_BWD_CONFIGS for d in ("float16", "bfloat16")
                                        if (n, d) not in CI_BWD_CONFIGS])
def test_backward_configs_on_the_hopper_forward_other_dtype(h100, name, dtype):
    _bwd_config(h100, name, dtype)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_deterministic_mode_on_the_hopper_forward_is_bitwise_repeatable(h100, dtype):
    """deterministic=True end to end on the H100 emulator: the Hopper forward and the backward fed by it,
    under two interleavings, give bitwise equal out, lse and gradients (GQA, a broadcast bias, causal)."""
    args, kw, dout = tkb.make_case(5, B=2, H=4, Hk=2, Nq=150, Nk=170, D=64, dtype=dtype, causal=True,
                                   bias="head", deterministic=True)
    runs = []
    for seed in (1, 12345):
        with emu.interleave(seed):
            out, lse = api.forward(*args, backend="emulator", **kw)
            runs.append((out, lse, *api.backward(dout, *args, out, lse, backend="emulator", **kw)))
    assert len(h100) == 2, "the Hopper forward did not run"
    for name, a, b in zip(("out", "lse", *tkb.GRADS), *runs):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"{name} differs between interleavings"


@pytest.mark.parametrize("dtype,D", [("float16", 56), ("bfloat16", 120)])
def test_hopper_forward_padded_head_dims(h100, dtype, D):
    """Head dims that pad to 64 / 128 (zero columns in the storage rows)."""
    _check(h100, D, D=D, dtype=dtype, H=2, Nq=70, Nk=140, causal=True, mask="random")


def test_hopper_forward_skips_fully_masked_tiles(h100):
    """A mask that empties whole 128-key tiles: their flags are off, so no role visits them; the rows
    still see the other tiles' keys, and a batch with no key at all gives zeros and -inf."""
    args, kw = make_case(5, B=2, H=1, Nq=90, Nk=300, D=64, dtype="bfloat16")
    m = np.ones((2, 300), bool)
    m[0, :] = False
    m[1, :128] = False  # tile 0
    m[1, 256:] = False  # the tail tile
    kw["mask"] = m
    check_forward(args, kw)
    assert len(h100) == 1
    flags = staging.tile_any(devices.EmulatedDevice(), m, sm90.BLOCK_N)
    np.testing.assert_array_equal(flags, [[0, 0, 0], [0, 1, 0]])


def test_hopper_forward_grid_y_loop(h100, monkeypatch):
    """B*H beyond the grid's y extent: every role loops over (batch, head) pairs, with the mbarrier
    phases, the Q buffer and the ping-pong carried across them."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    _check(h100, 9, B=3, H=2, Hk=1, Nq=140, Nk=150, D=64, dtype="float16", causal=True, mask="random", bias="head")


def test_hopper_forward_writes_preallocated_out_and_lse(h100):
    args, kw = make_case(8, H=2, Nq=70, Nk=140, D=64, dtype="bfloat16", causal=True)
    prob, inp = problem.canonicalize(*args, **kw)
    out = np.full((prob.B, prob.H, prob.Nq, prob.D), np.nan, dtype=prob.dtype)
    lse = np.full((prob.B, prob.H, prob.Nq), np.nan, dtype=np.float32)
    o, lse_got = api.forward_canonical(prob, inp, "emulator", out=out, lse=lse)
    assert o is out and lse_got is lse and len(h100) == 1
    ref_o, ref_l = reference.forward64(prob, inp)
    assert rel_err(out, ref_o) <= 2e-2 and np.allclose(lse, ref_l, atol=2e-2)


# ---------------------------------------------------------------------------------------------------
# Direct launches: the same staging and arguments as the launch layer, of this module's source (or a
# planted copy of it), under a chosen emulator interleaving.

@contextlib.contextmanager
def _source(text):
    """The launch layer compiles `text` as hopper_fwd.cu (a planted copy; fresh module caches, so that
    neither copy's compiled module serves the other); None: the real source."""
    if text is None:
        yield
        return
    saved = devices.load_source, devices._MODULE_CACHE, devices._FUNC_CACHE
    devices.load_source = lambda name: text if name == sm90.SOURCE else saved[0](name)
    devices._MODULE_CACHE, devices._FUNC_CACHE = {}, {}
    try:
        yield
    finally:
        devices.load_source, devices._MODULE_CACHE, devices._FUNC_CACHE = saved


def _run(args, kw, seed, source=None):
    prob, inp = problem.canonicalize(*args, **kw)
    with _source(source), limits.emulated_arch("sm_90a"), emu.interleave(seed):
        out, lse = forward.run_forward(devices.EmulatedDevice(), prob, inp)
    return np.asarray(out), np.asarray(lse), prob, inp


def test_hopper_forward_is_deterministic():
    """Bitwise the same out and lse under every interleaving of the block's threads (the emulator's
    asynchrony seeds: wgmma completion, TMA landing, mbarrier time limits, elect.sync)."""
    args, kw = make_case(21, B=2, H=1, Nq=200, Nk=230, D=64, dtype="bfloat16", causal=True, mask="random",
                         bias="head")
    o0, l0, *_ = _run(args, kw, None)
    for seed in (1, 2, 3):
        o, lse, *_ = _run(args, kw, seed)
        assert np.array_equal(o.view(np.uint16), o0.view(np.uint16)), f"seed {seed}"
        assert np.array_equal(lse.view(np.uint32), l0.view(np.uint32)), f"seed {seed}"


def test_hopper_forward_race_check():
    """No two blocks write the same bytes of out or lse (the emulator's race check: TMA stores and
    plain stores alike), with several query tiles and (batch, head) pairs."""
    args, kw = make_case(22, B=2, H=1, Nq=260, Nk=200, D=64, dtype="float16", causal=True, mask="random")
    with emu.race_check(True):
        out, _, prob, inp = _run(args, kw, 2)
    assert rel_err(out, reference.forward64(prob, inp)[0]) <= 3e-3


# ---------------------------------------------------------------------------------------------------
# Non-finite keys: an invisible key never influences anything, whatever its k and v hold; a visible
# NaN / Inf poisons exactly the rows that see it (out and lse NaN).

@pytest.mark.parametrize("dtype,D", [("float16", 64), ("bfloat16", 128)])
def test_masked_keys_with_nan_and_inf_change_no_bit(dtype, D):
    args, kw = make_case(3, B=2, H=1, Nq=70, Nk=200, D=D, dtype=dtype, mask="random")
    q, k, v = args
    k2, v2 = k.copy(), v.copy()
    for i, (b, j) in enumerate(np.argwhere(~kw["mask"])):
        k2[b, :, j, i % D] = (np.nan, np.inf, -np.inf)[i % 3]
        v2[b, :, j, (3 * i) % D] = (np.inf, np.nan, -np.inf)[i % 3]
    o1, l1, *_ = _run((q, k, v), kw, 2)
    o2, l2, *_ = _run((q, k2, v2), kw, 2)
    assert np.array_equal(o1.view(np.uint16), o2.view(np.uint16))
    assert np.array_equal(l1.view(np.uint32), l2.view(np.uint32))


@pytest.mark.parametrize("dtype,D", [("float16", 64), ("bfloat16", 128)])
def test_causally_invisible_nonfinite_keys_poison_only_the_rows_that_see_them(dtype, D):
    """Causal, Nq = 150 < Nk = 230: key Nk-1 is visible only to the last row, Nk-2 to the last two,
    Nk-3 to the last three. NaN / Inf there (v of Nk-1 and Nk-3, k of Nk-2) sit on tiles that cross the
    block's diagonal: every other row is bitwise unchanged, the rows that see one are NaN."""
    args, kw = make_case(4, B=1, H=2, Nq=150, Nk=230, D=D, dtype=dtype, causal=True)
    q, k, v = args
    k2, v2 = k.copy(), v.copy()
    v2[:, :, -1, 5] = np.nan
    v2[:, :, -3, 7] = np.inf
    k2[:, :, -2, 1] = np.nan
    o1, l1, *_ = _run((q, k, v), kw, 5)
    o2, l2, *_ = _run((q, k2, v2), kw, 5)
    seen = np.zeros(150, bool)
    seen[-3:] = True
    assert np.isnan(o2[:, :, seen]).all() and np.isnan(l2[:, :, seen]).all()
    assert np.array_equal(o1[:, :, ~seen].view(np.uint16), o2[:, :, ~seen].view(np.uint16))
    assert np.array_equal(l1[:, :, ~seen].view(np.uint32), l2[:, :, ~seen].view(np.uint32))


@pytest.mark.parametrize("dtype,D", [("float16", 64), ("bfloat16", 128)])
def test_minus_inf_bias_is_a_mask(dtype, D):
    """docs/design.md, non-finite rule 2: -inf bias columns give what masking those keys gives; a row
    whose pairs are all -inf gives out 0 and lse -inf."""
    args, kw = make_case(6, B=1, H=2, Nq=90, Nk=200, D=D, dtype=dtype, bias="full", bias_f32=True)
    cols = [0, 31, 64, 127, 128, 199]
    bias = kw["attn_bias"].copy()
    bias[..., cols] = -np.inf
    mask = np.ones((1, 200), bool)
    mask[0, cols] = False
    o_bias, l_bias, *_ = _run(args, dict(kw, attn_bias=bias), 1)
    o_mask, l_mask, *_ = _run(args, dict(kw, mask=mask), 1)
    assert rel_err(o_bias, o_mask) <= 2e-2 and np.allclose(l_bias, l_mask, atol=1e-2)
    bias[0, 1, [3, 70]] = -np.inf
    o, lse, *_ = _run(args, dict(kw, attn_bias=bias), 2)
    assert np.all(o[0, 1, [3, 70]] == 0) and np.all(np.isneginf(lse[0, 1, [3, 70]]))
    assert np.isfinite(o).all() and np.isfinite(np.delete(lse[0, 1], [3, 70])).all()


# ---------------------------------------------------------------------------------------------------
# Planted faults: each removes one synchronization from a scratch copy of the source. The emulator
# must report an error or the result must change, in the deterministic order and under most
# interleavings.

PLANTS = {  # name: [(text of the source, its replacement), ...]
    "consumer_skips_full_k_wait": [("        mbar_wait(&bar.full_k[s], ring.phase);\n", "")],
    "producer_skips_empty_k_wait": [("      mbar_wait(&bar.empty_k[s], ring.phase ^ 1);\n      mbar_arrive_expect_tx",
                                     "      mbar_arrive_expect_tx")],
    "producer_skips_empty_v_wait": [("      mbar_wait(&bar.empty_v[s], ring.phase ^ 1);\n", "")],
    "softmax_reads_s_before_wgmma_wait": [
        ("          wgmma_wait<1>();  // S_j is complete; P_{j-1} V_{j-1} may still run\n", "")],
    "p_packed_before_pv_wait": [("          exponentials_of(j, s, ring.phase);\n          wgmma_wait<0>();",
                                 "          exponentials_of(j, s, ring.phase);\n          pack_p<T, DP>(r);\n"
                                 "          wgmma_wait<0>();")],
    "ping_pong_hand_off_missing": [("          named_barrier_arrive(other_turn, 2 * WG);\n          wgmma_wait<1>();",
                                    "          wgmma_wait<1>();")],
    "fixup_without_proxy_fence": [
        ("      fence_proxy_async_shared();  // the zeroed elements are read by wgmma (the async proxy)\n", "")],
    # the transaction bytes of a stage miscounted: V's phase can never complete (deadlock), K's completes
    # while the TMA still writes (or the late bytes land on a completed phase)
    "expect_tx_too_large_for_v": [("      mbar_arrive_expect_tx(done, L::KV_BYTES);",
                                   "      mbar_arrive_expect_tx(done, L::KV_BYTES + L::KV_CB);")],
    "expect_tx_too_small_for_k": [("      mbar_arrive_expect_tx(&bar.full_k[s], L::KV_BYTES);",
                                   "      mbar_arrive_expect_tx(&bar.full_k[s], L::KV_BYTES / 2);")],
    # V_{j-1} released before the wait for P_{j-1} V_{j-1}: the producer may refill the stage by TMA
    # while that wgmma still reads it
    "empty_v_released_before_pv_wait": [
        ("          wgmma_wait<0>();\n          fence_regs(r.o);\n"
         "          release(&bar.empty_v[prev]);  // nor V_{j-1}",
         "          release(&bar.empty_v[prev]);\n          wgmma_wait<0>();\n"
         "          fence_regs(r.o);  // nor V_{j-1}")],
    # K (and its mask bytes) released by one thread per warpgroup, as if only wgmma operands lived there
    "mask_bytes_released_by_one_thread": [
        ("      release(&bar.empty_k[s]);", "      if (threadIdx.x % WG == 0) mbar_arrive(&bar.empty_k[s]);"),
        ("      mbar_init(&bar.empty_k[s], RELEASERS);", "      mbar_init(&bar.empty_k[s], CONSUMERS);")],
}


def _planted(name):
    src = sources.load_source(sm90.SOURCE)
    for old, new in PLANTS[name]:
        assert src.count(old) == 1, f"plant {name}: the text to change is not (once) in the source: {old!r}"
        src = src.replace(old, new)
    return src


def _plant_case(name):
    """(args, kw, reference out): a problem that exercises what the plant breaks, several key tiles per
    block; for the fix-up's proxy fence, NaN in the V rows of masked keys (the reference is computed
    from the finite values, which by the rule give the same result)."""
    masked = "fixup" in name or "mask" in name
    args, kw = make_case(31, B=1, H=1, Nq=140, Nk=400, D=64, dtype="float16", mask="random" if masked else None)
    if masked:
        kw["mask"][0] = True
        kw["mask"][0, 5::7] = False
    prob, inp = problem.canonicalize(*args, **kw)
    ref = reference.forward64(prob, inp)[0]
    if "fixup" in name:
        args[2][0, 0, ~kw["mask"][0], :] = np.nan
    return args, kw, ref


def _outcomes(name, source, seeds=(None, 1, 2, 3, 4, 5)):
    args, kw, ref = _plant_case(name)
    outcomes = []
    for seed in seeds:
        try:
            out, *_ = _run(args, kw, seed, source=source)
        except emu.EmulatorError as e:
            outcomes.append(f"error: {str(e).splitlines()[0][:200]}")
            continue
        err = rel_err(out, ref)
        outcomes.append("wrong" if not err <= 3e-3 else f"correct ({err:.1e})")
    return outcomes


# A read of accumulators before their wgmma.wait is stale whenever the emulator writes the result back
# at the wait: always in the deterministic order, by chance under interleavings (it may also write it
# back at once). A refill of a stage that a wgmma reads with no wait ordered before it is reported at
# the refill's issue in every order (the emulator tracks which wgmmas each thread knows complete).
# Every other plant is a race or a protocol error, caught under most interleavings.
STALE_READS = {"softmax_reads_s_before_wgmma_wait"}
REPORTED = {"empty_v_released_before_pv_wait": "cp.async.bulk.tensor (load) by thread"}


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_planted_fault_is_caught(name):
    outcomes = _outcomes(name, _planted(name))
    caught = sum(not o.startswith("correct") for o in outcomes)
    if name in STALE_READS:
        assert not outcomes[0].startswith("correct"), f"{name}: not caught in the deterministic order: {outcomes}"
    elif name in REPORTED:
        assert all(o.startswith("error") and REPORTED[name] in o for o in outcomes), f"{name}: {outcomes}"
    else:
        assert caught >= 3, f"{name}: caught under only {caught} of 6 orders: {outcomes}"


def test_unplanted_source_passes_the_plant_cases():
    """The plant cases pass with the real source (so a caught plant is the plant's doing)."""
    for name in ("consumer_skips_full_k_wait", "fixup_without_proxy_fence", "mask_bytes_released_by_one_thread"):
        outcomes = _outcomes(name, sources.load_source(sm90.SOURCE), seeds=(None, 1, 2))
        assert all(o.startswith("correct") for o in outcomes), (name, outcomes)


# ---------------------------------------------------------------------------------------------------
# Dispatch.

@pytest.mark.parametrize("dtype,D,why", [
    ("float32", 64, "16-bit only"),
    ("float16", 32, "pads to 32"),
    ("bfloat16", 96, "pads to 96"),
    ("float16", 256, "pads to 256"),
])
def test_problems_the_hopper_forward_does_not_cover_stay_portable(h100, dtype, D, why):
    reason = sm90.fallback_reason(dtype, D, tiles.fwd_head_dim_pad(D), 2, SM90.compute_capability,
                                         SM90.smem_optin)
    assert reason is not None and why in reason
    args, kw = make_case(1, H=2, Nq=20, Nk=30, D=D, dtype=dtype, causal=True)
    check_forward(args, kw)
    assert h100 == []


def test_other_devices_keep_the_portable_forward(monkeypatch):
    ran = []
    ran = _spy(monkeypatch)
    for caps in (limits.EMULATED_DEVICES["sm_80"], limits.EMULATED_DEVICES["sm_86"],
                 limits.DeviceCaps((10, 0), 227 * 1024, 148)):
        monkeypatch.setattr(limits, "EMULATED_DEVICE", caps)
        args, kw = make_case(2, H=1, Nq=20, Nk=30, D=64, dtype="bfloat16")
        check_forward(args, kw)
    assert not ran
    assert sm90.fallback_reason("bfloat16", 64, 64, 2, (8, 0), 163 * 1024).startswith("compute capability")
    assert "shared memory" in sm90.fallback_reason("bfloat16", 128, 128, 2, (9, 0), 160 * 1024)
    assert "B*H" in sm90.fallback_reason("float16", 64, 64, sm90.MAX_BH + 1, (9, 0), 227 * 1024)


def test_dispatch_picks_the_hopper_forward_on_sm90_only():
    """select(FORWARD) is hopper_forward where it covers the problem, portable_forward elsewhere; every
    choice is a registry entry with its NVRTC target."""
    reg = {s.name: s for s in registry.kernel_registry()}
    for dtype, D, caps, hopper in [("float16", 64, SM90, True), ("bfloat16", 120, SM90, True),
                                   ("float32", 64, SM90, False), ("bfloat16", 96, SM90, False),
                                   ("float16", 64, limits.EMULATED_DEVICES["sm_80"], False)]:
        args, kw = make_case(1, H=2, Nq=300, Nk=40, D=D, dtype=dtype)
        prob, inp = problem.canonicalize(*args, **kw)
        choice = dispatch.select(prob, caps, dispatch.FORWARD, scale=inp.scale)
        assert (choice.spec.source == sm90.SOURCE) == hopper, (dtype, D, caps)
        assert reg[choice.spec.name] == choice.spec
        if hopper:
            assert choice.spec.arch == "sm_90a" and choice.tile == sm90.BLOCK_N and choice.block == (384, 1, 1)
            assert choice.grid == (3, 2, 1) and choice.smem == sm90.smem_bytes(tiles.fwd_head_dim_pad(D))
            assert choice == dispatch.hopper_forward(prob, caps, inp.scale)
        else:
            assert choice.spec.arch is None and dispatch.hopper_forward(prob, caps, inp.scale) is None
            assert choice == dispatch.portable_forward(prob, caps, inp.scale)


def test_emulated_arch_setting():
    before = limits.EMULATED_DEVICE
    with limits.emulated_arch("sm_90a"):
        assert devices.EmulatedDevice().capabilities() == SM90
        assert SM90.compute_capability == (9, 0) and SM90.smem_optin == 227 * 1024 and SM90.sm_count == 132
    assert limits.EMULATED_DEVICE is before
    with pytest.raises(ValueError, match=r"arch: 'sm_70', expected one of sm_80, sm_86, sm_89, sm_90a"):
        limits.set_emulated_arch("sm_70")


def test_emulated_arch_environment_variable(monkeypatch):
    monkeypatch.setenv(limits.EMU_ARCH_ENV, "sm_90a")
    assert limits.emulated_from_env() == SM90
    monkeypatch.setenv(limits.EMU_ARCH_ENV, "")
    assert limits.emulated_from_env() == limits.EMULATED_DEVICES["sm_80"]
    monkeypatch.setenv(limits.EMU_ARCH_ENV, "h100")
    with pytest.raises(ValueError, match="CUPY_COSATTN_EMU_ARCH='h100'"):
        limits.emulated_from_env()


def test_args_record_layout():
    """hopper_fwd.cu Args: four 128-byte maps at 64-byte aligned offsets, then FwdParams; the size a
    multiple of 64 (the struct's alignment), as the C++ compiler lays it out."""
    dt = sm90.args_dtype(params.FWD_PARAMS)
    assert [dt.fields[n][1] for n in ("tq", "tk", "tv", "to", "p")] == [0, 128, 256, 384, 512]
    assert dt.itemsize % 64 == 0 and dt.itemsize >= 512 + params.FWD_PARAMS.itemsize
    src = r'''
#include "hopper_fwd.cu"
extern "C" __global__ void sizes(unsigned long long* out) {
  out[0] = sizeof(ca::fwd90::Args);
  out[1] = __builtin_offsetof(ca::fwd90::Args, p);
}
'''
    out = emu.device_zeros(2, np.uint64)
    emu.RawModule(code=src, options=sources.compile_options()).get_function("sizes")((1,), (1,), (out,))
    assert tuple(int(x) for x in out) == (dt.itemsize, 512)


# ---------------------------------------------------------------------------------------------------
# NVRTC: the registry's sm_90a kernels compile without spills or stack, setmaxnreg is honoured (no
# "setmaxnreg ignored" warning), and ptxas keeps the wgmmas asynchronous (no serialization).

def _nvrtc():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001
        if os.environ.get("CUPY_COSATTN_REQUIRE_NVRTC", "") not in ("", "0"):
            raise
        pytest.skip(f"NVRTC not available ({type(e).__name__}: {e})")
    return nvrtc


def _compile(nvrtc, names, arch):
    prog = nvrtc.createProgram(sources.load_source(sm90.SOURCE), sm90.SOURCE, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        # the options the cuda backend ends up with: ours, then CuPy's -arch of the device
        opts = [f"-arch={arch}", "-Xptxas=-v", *sources.compile_options(), "-arch=sm_90"]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"NVRTC {arch}: {e}\n{nvrtc.getProgramLog(prog)}")
        log = nvrtc.getProgramLog(prog)
        rows = resources.parse_ptxas(log)
        return {n: rows[nvrtc.getLoweredName(prog, n)] for n in names}, log
    finally:
        nvrtc.destroyProgram(prog)


@pytest.mark.slow
def test_sm90a_kernels_compile_without_spills():
    nvrtc = _nvrtc()
    names = [s.name for s in registry.kernel_registry() if s.arch == sm90.ARCH]
    assert len(names) == 8
    rows, log = _compile(nvrtc, names, "sm_90a")
    for n, r in rows.items():
        assert r["spill_st"] == 0 and r["spill_ld"] == 0 and r["stack"] == 0, (n, r)
    assert not re.search(r"setmaxnreg", log, re.I), log
    assert "serialized" not in log, log  # ptxas keeps every wgmma asynchronous


def test_sm90a_kernel_compiles_with_cupys_trailing_arch_option():
    """One instantiation (the fast CI subset of the test above), compiled with the option list the cuda
    backend produces (-arch=sm_90a first, CuPy's -arch=sm_90 last): sm_90a wins, no spills."""
    nvrtc = _nvrtc()
    name = _name("bfloat16", 64, False)
    rows, log = _compile(nvrtc, [name], "sm_90a")
    assert rows[name]["spill_st"] == 0 and rows[name]["stack"] == 0 and "setmaxnreg" not in log
    # ptxas serializes wgmmas (C7520 "wgmma.mma_async instructions are serialized") when it cannot
    # match waits to commits or finds divergent code while they are in flight
    assert "serialized" not in log, log


# ---------------------------------------------------------------------------------------------------
# The static SASS profiler (cupy_cosattn.sass) on the Hopper forward: its main loop is the consumers'
# slot loop, with HGMMA.

def test_profiler_knows_the_hopper_forward_only_on_sm90a():
    from cupy_cosattn import sass

    kernels = sass.select("fwd_sm90")
    assert {k.kind for k in kernels} == {"fwd_sm90", "fwd_sm90_rm"} and len(kernels) == 8
    assert sass.profile(["sm_80", "sm_90"], kernels) == []  # no rows (and nothing compiled) elsewhere
    inst = kernels[0].resolve("sm_90a")
    assert inst.threads == sm90.THREADS and inst.loop_warps == sm90.CONSUMER_WARPS
    assert len(inst.params) == sm90.args_dtype(params.FWD_PARAMS).itemsize


def test_profiler_reports_hgmma_for_the_hopper_forward():
    from cupy_cosattn import sass

    if sass.find_nvdisasm() is None:
        if os.environ.get("CUPY_COSATTN_REQUIRE_NVRTC", "") not in ("", "0"):
            pytest.fail("nvdisasm not found")
        pytest.skip("nvdisasm not found (pip install nvidia-cuda-nvdisasm)")
    _nvrtc()
    (row,) = sass.profile(["sm_90a"], sass.select("^fwd_sm90 fp16 D=64$"))
    assert row.error is None, row.error
    c, dp = row.cost, 64
    # one slot: S = Q K^T, DP / 16 wgmma of n128; O += P V, BLOCK_N / 16 wgmma of n64
    assert c.opcodes["HGMMA"] == c.tensor == dp // 16 + sm90.BLOCK_N // 16
    assert c.tensor_fma == {("HGMMA", "f16"): (64 * 128 * dp + 64 * dp * 128) // 4}  # per warp: a quarter
    assert c.classes["mufu"] == 64 * sm90.BLOCK_N // 128  # one ex2 per score, 64 rows x 128 keys / 128
    assert c.classes["ldsm"] == 0 and row.spills == (0, 0)
    assert row.model.tensor_share >= 0.7, row.model  # the target, in the profiler's model
