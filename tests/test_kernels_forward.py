"""The fused forward kernels (cuda_src/forward.cu, norm.cu) through the shared launch layer, against
the float64 reference (cupy_cosattn.reference), on the CPU emulator and, marked ``gpu``, on CuPy.

Accuracy (docs/design.md section 2): ||out - ref|| / ||ref|| <= 1e-5 (fp32), 3e-3 (fp16), 2e-2 (bf16); no
NaN/Inf; rows without a visible key are 0 with lse = -inf.
"""
from __future__ import annotations

import dataclasses
import os
import types
import zlib

import numpy as np
import pytest

from cupy_cosattn import api, emulator, problem, reference, tolerances
from cupy_cosattn.launch import arrays, devices, limits, norm, params, registry, staging, tiles
from cupy_cosattn.problem import BFLOAT16

from kernel_cases import DTYPES, F16, F32, make_case, rel_err  # noqa: F401

OUT_TOL = tolerances.OUT
# lse: absolute error relative to the logit bound scale * groups + max|bias| (q, k are rounded to the
# dtype after normalization, so logits carry an error proportional to that bound).
LSE_TOL = tolerances.ROUNDING


# ---------------------------------------------------------------------------------------------------
# Checks (inputs: kernel_cases.make_case).

def check_forward(args, kw, backend="emulator", dtype=None, out_tol=None):
    """Run the kernels and the float64 reference; assert the contract's accuracy."""
    q = args[0]
    dtype = dtype or problem.DTYPE_NAMES[np.dtype(q.dtype)]
    prob, inp = problem.canonicalize(*args, **kw)
    ref_o, ref_l = reference.forward64(prob, inp)
    if backend == "cuda":
        import cupy

        dev = [cupy.asarray(a) for a in args]
        kw_dev = {k: (cupy.asarray(v) if isinstance(v, np.ndarray) and k != "scale" else v) for k, v in kw.items()}
        out, lse = api.forward(*dev, backend="cuda", **kw_dev)
        out, lse = cupy.asnumpy(out), cupy.asnumpy(lse)
    else:
        out, lse = api.forward(*args, backend=backend, **kw)
    assert out.shape == q.shape and np.dtype(out.dtype) == np.dtype(q.dtype)
    assert lse.shape == q.shape[:-1] and lse.dtype == np.float32
    o64 = np.asarray(out, dtype=np.float64)
    assert np.isfinite(o64).all(), "NaN/Inf in out"
    err = rel_err(o64, ref_o.reshape(q.shape))
    tol = out_tol or OUT_TOL[dtype]
    assert err <= tol, f"out rel err {err:.3e} > {tol:.0e}"
    ref_l = ref_l.reshape(lse.shape)
    empty = ~np.isfinite(ref_l)
    assert np.all(np.isneginf(lse[empty])), "rows without a visible key must have lse = -inf"
    assert np.all(o64[empty] == 0), "rows without a visible key must be 0"
    assert np.isfinite(lse[~empty]).all(), "NaN/Inf in lse"
    if (~empty).any():
        bound = float(np.max(inp.scale)) * prob.groups
        if inp.bias is not None:
            bound += float(np.max(np.abs(np.asarray(inp.bias, dtype=np.float64))))
        lerr = np.max(np.abs(lse[~empty] - ref_l[~empty])) / max(1.0, bound)
        assert lerr <= LSE_TOL[dtype], f"lse err {lerr:.3e} (relative to the logit bound {bound:.1f})"
    return err


# ---------------------------------------------------------------------------------------------------
# The grid: causal / mask / neither x bias (none, per head, per batch) x single kv head x D x lengths x
# dtypes. One test per (dtype, D, length) runs the 18 flag combinations, so a failure names them.

GRID_FLAGS = [(mode, bias, kv1) for mode in ("none", "causal", "mask") for bias in (None, "head", "batch")
              for kv1 in (False, True)]


def _grid(backend, dtype, D, N):
    failures = []
    for i, (mode, bias, kv1) in enumerate(GRID_FLAGS):
        args, kw = make_case(1000 * D + N + i, B=2, H=2, Nq=N, D=D, dtype=dtype, kv_3d=kv1, causal=mode == "causal",
                             mask="random" if mode == "mask" else None, bias=bias)
        try:
            check_forward(args, kw, backend)
        except AssertionError as e:
            failures.append(f"{mode=} {bias=} single_kv={kv1}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("N", [63, 127])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_grid(dtype, D, N):
    _grid("emulator", dtype, D, N)


# ---------------------------------------------------------------------------------------------------
# Random and edge configurations.

CONFIGS = {
    "gqa": dict(H=4, Hk=2, Nq=70, Nk=90, D=64, causal=True),
    "mqa_3d_kv": dict(H=3, kv_3d=True, Nq=40, Nk=150, D=32, mask="random", B=2),
    "merged_3d": dict(merged=True, B=2, H=2, Nq=33, Nk=65, D=64, bias="head", mask="random"),
    "groups4": dict(D=64, groups=4, Nq=50, Nk=77),
    "groups_chunk8": dict(D=32, groups=4, Nq=20, Nk=20, causal=True),
    "per_head_scale": dict(H=3, per_head_scale=True, Nq=45, Nk=70, D=64),
    "prenormalized_big_bias": dict(l2norm_qk=False, bias="full", bias_scale=30.0, Nq=64, Nk=96, D=64),
    "prenormalized_no_bias": dict(l2norm_qk=False, Nq=31, Nk=64, D=32, causal=True),
    "bias_f32": dict(bias="batch", bias_f32=True, B=2, Nq=40, Nk=60, D=64, causal=True),
    "full_bias_mask_causal": dict(bias="full", mask="random", causal=True, B=2, Nq=65, Nk=65, D=32),
    "nq_gt_nk_causal": dict(Nq=100, Nk=30, causal=True, D=32),
    "nq_lt_nk_causal": dict(Nq=17, Nk=130, causal=True, D=64, bias="head"),
    "nq1": dict(Nq=1, Nk=77, D=64),
    "nq1_causal": dict(Nq=1, Nk=5, D=64, causal=True),
    "nk1": dict(Nq=20, Nk=1, D=32),
    "nk3_mask": dict(Nq=9, Nk=3, D=32, mask="random", B=2),
    "large_scale": dict(scale=24.0, Nq=40, Nk=70, D=64),
    "small_scale": dict(scale=0.5, Nq=40, Nk=70, D=64),
    "d8": dict(D=8, Nq=30, Nk=45),
    "d24": dict(D=24, Nq=30, Nk=45, causal=True),
    "d40_groups5": dict(D=40, groups=5, Nq=30, Nk=45),
    "d33_groups3": dict(D=33, groups=3, Nq=30, Nk=45, causal=True),
    "d80": dict(D=80, Nq=30, Nk=45, mask="random", B=2),
    "d256": dict(D=256, Nq=40, Nk=70, bias="head"),
    "d200": dict(D=200, Nq=20, Nk=33, causal=True),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_configs(name, dtype):
    args, kw = make_case(zlib.crc32(name.encode()), dtype=dtype, **CONFIGS[name])
    check_forward(args, kw)


def test_grid_yz_limit_loops(monkeypatch):
    """B*H beyond the grid's y extent: the kernel loops over (batch, head) by gridDim.y."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    args, kw = make_case(7, B=3, H=3, Hk=1, Nq=20, Nk=70, D=32, dtype="float32", mask="random", bias="head")
    check_forward(args, kw)


@pytest.mark.parametrize("dtype,D", [("float16", 64), ("bfloat16", 128), ("float32", 32)])
def test_blocks_without_a_visible_tile_under_interleavings(dtype, D):
    """Batch row 0 fully masked (make_case): its blocks skip the key loop, so (fp32: Q's fragments are
    not taken into registers before the loop) their Q copies are still in flight at the epilogue,
    where each warp stages its rows of O in its Q rows (filled by every warp's copies). The barrier
    after the drain keeps other warps' late copies out; whether a late copy lands inside the window
    depends on the thread order, so several interleavings run (the suite's default seed alone misses
    it). Every such row is exactly 0 with lse = -inf, the other batch row is accurate."""
    args, kw = make_case(5, B=2, H=4, Nq=128, Nk=40, D=D, dtype=dtype, mask="random")  # row 0 fully masked
    assert not kw["mask"][0].any()
    for seed in (1, 2, 3, 4):
        with emulator.interleave(seed):
            check_forward(args, kw)


def test_preallocated_out_and_lse():
    args, kw = make_case(8, B=1, H=2, Nq=30, Nk=40, D=64, dtype="float16", causal=True)
    prob, inp = problem.canonicalize(*args, **kw)
    out = np.full((prob.B, prob.H, prob.Nq, prob.D), np.nan, dtype=prob.dtype)
    lse = np.full((prob.B, prob.H, prob.Nq), np.nan, dtype=np.float32)
    o, ls = api.forward_canonical(prob, inp, "emulator", out=out, lse=lse)
    assert o is out and ls is lse
    ref_o, ref_l = reference.forward64(prob, inp)
    assert rel_err(out, ref_o) <= OUT_TOL["float16"]
    assert np.allclose(lse, ref_l, atol=1e-2)


def test_fixed_offset_choice():
    """The running max is used exactly where the fixed offset is not provably safe."""
    args, kw = make_case(9, D=32)
    prob, inp = problem.canonicalize(*args, **kw)
    assert tiles.fixed_offset_ok(prob, inp.scale)
    assert not tiles.fixed_offset_ok(dataclasses.replace(prob, l2norm_qk=False), inp.scale)
    assert not tiles.fixed_offset_ok(dataclasses.replace(prob, bias_layout=problem.BIAS_PER_HEAD), inp.scale)
    assert not tiles.fixed_offset_ok(prob, inp.scale * 2)  # fp16: scale 16 > 10
    assert not tiles.fixed_offset_ok(dataclasses.replace(prob, groups=2), inp.scale)  # bound 16 > 10
    assert tiles.fixed_offset_ok(dataclasses.replace(prob, dtype=F32), inp.scale * 2)


def test_unsupported_head_dim_raises():
    args, kw = make_case(10, D=264, Nq=4, dtype="float32")
    with pytest.raises(ValueError, match="head dim"):
        api.forward(*args, backend="emulator", **kw)


# ---------------------------------------------------------------------------------------------------
# The l2norm kernels on their own.

def _grouped_norm64(x, groups):
    x = np.asarray(x, dtype=np.float64)
    c = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
    n = np.linalg.norm(c, axis=-1, keepdims=True)
    return (c / np.maximum(n, problem.NORM_EPS)).reshape(x.shape), n[..., 0]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("D,groups", [(64, 1), (40, 5), (256, 8), (24, 24)])
def test_l2norm_forward(dtype, D, groups):
    dev = devices.EmulatedDevice()
    rng = np.random.default_rng(D + groups)
    x = rng.standard_normal((3, 5, D)).astype(DTYPES[dtype])
    x[0, 0] = 0  # zero rows: x / eps = 0
    x[0, 1, : D // groups] = 1e-20  # a chunk below eps
    cols = limits.storage_dim(D)
    xhat, rnorm = norm.l2norm(dev, dev.to_device(x), groups, cols, want_rnorm=True)
    assert xhat.shape == (3, 5, cols) and np.all(np.asarray(xhat[..., D:], dtype=np.float64) == 0)
    ref, n = _grouped_norm64(x, groups)
    tol = tolerances.ROUNDING[dtype]
    assert np.max(np.abs(np.asarray(xhat[..., :D], dtype=np.float64) - ref)) <= tol
    np.testing.assert_allclose(rnorm, 1 / np.maximum(n, problem.NORM_EPS), rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_l2norm_forward_rounds_to_nearest(dtype):
    """xhat is its fp32 value rounded to nearest even in the dtype (cvt.rn): it equals the float64
    quotient rounded to the dtype except where the fp32 computation's error (a few fp32 ulps) straddles
    a rounding midpoint, a fraction far below 1 %. A truncating conversion (cvt.rz) misses on about
    half the elements while staying within the accuracy tolerances."""
    dev = devices.EmulatedDevice()
    rng = np.random.default_rng(17)
    x = rng.standard_normal((32, 16, 64)).astype(DTYPES[dtype])
    xhat, _ = norm.l2norm(dev, dev.to_device(x), 2, limits.storage_dim(64))
    want = _grouped_norm64(x, 2)[0].astype(DTYPES[dtype])
    same = np.asarray(xhat).view(np.uint16) == want.view(np.uint16)
    assert same.mean() >= 0.99, f"only {same.mean():.1%} of xhat equal the correctly rounded quotient"


@pytest.mark.parametrize("grad_f32", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_l2norm_backward(dtype, grad_f32):
    dev = devices.EmulatedDevice()
    rng = np.random.default_rng(3)
    D, groups = 48, 3
    x = rng.standard_normal((4, 7, D)).astype(DTYPES[dtype])
    x[1, 2, 16:32] = 0  # a chunk with norm 0 <= eps: dx = dxhat / eps
    dxh = rng.standard_normal((4, 7, D)).astype(F32 if grad_f32 else DTYPES[dtype])
    dx = norm.l2norm_backward(dev, dev.to_device(x), dev.to_device(dxh), groups)
    x64 = np.asarray(x, dtype=np.float64)
    g64 = np.asarray(dxh, dtype=np.float64)
    xhat, n = _grouped_norm64(x64, groups)
    c = xhat.reshape(4, 7, groups, D // groups)
    gc = g64.reshape(4, 7, groups, D // groups)
    nn = n[..., None]
    proj = (gc - c * np.sum(c * gc, axis=-1, keepdims=True)) / np.maximum(nn, problem.NORM_EPS)
    ref = np.where(nn > problem.NORM_EPS, proj, gc / problem.NORM_EPS).reshape(x.shape)
    small = n[1, 2, 1] <= problem.NORM_EPS
    assert small
    got = np.asarray(dx, dtype=np.float64)
    mask = np.ones(x.shape, bool)
    mask[1, 2, 16:32] = False
    assert rel_err(got[mask], ref[mask]) <= {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-6}[dtype]
    if dtype == "float16":  # dxhat / 1e-12 is beyond fp16's range: correctly rounded to +-inf
        assert np.array_equal(got[1, 2, 16:32], np.sign(ref[1, 2, 16:32]) * np.inf)
    else:
        np.testing.assert_allclose(got[1, 2, 16:32], ref[1, 2, 16:32], rtol=1e-2)


def test_make_record_checks_fields():
    with pytest.raises(KeyError, match="missing"):
        params.make_record(params.NORM_PARAMS, x=0)
    with pytest.raises(KeyError, match="unknown"):
        params.make_record(params.NORM_PARAMS, bogus=1)


def test_registry_covers_launches():
    """Every forward instantiation the launch layer can pick (each mode's tile on every architecture's
    shared memory) is in the registry (so resources.py compiles it), grouped per (dtype, head dim)."""
    names = {s.name for s in registry.kernel_registry()}
    for dt in limits.KERNEL_DTYPES:
        for D in (8, 16, 24, 40, 64, 96, 128, 200, 256):
            dp = tiles.fwd_head_dim_pad(D)
            for mode in tiles.FWD_MODES:
                tile = tiles.fwd_tile(dt, dp, mode=mode)
                assert registry.fwd_name(dt, dp, tile, mode) in names
                assert tiles.fwd_smem_bytes(dt, dp, tile) <= limits.SMEM_OPTIN_LIMIT
                for limit in limits.SMEM_OPTIN_BY_ARCH.values():  # the tiles each architecture picks
                    t = tiles.fwd_tile(dt, dp, limit, mode)
                    if tiles.fwd_smem_bytes(dt, dp, t) <= limit:
                        assert registry.fwd_name(dt, dp, t, mode) in names
        assert registry.norm_fwd_name(dt) in names
    mode_names = {registry.fwd_name("float16", 64, tiles.fwd_tile("float16", 64, mode=m), m) for m in tiles.FWD_MODES}
    for n in mode_names:
        members = registry.module_members("forward.cu", n)
        assert mode_names <= set(members)
        assert all(m.startswith("ca::fwd::attn_fwd<ca::half_t, 64, ") for m in members)


def test_forward_tiles():
    """16-bit head dims up to 128 run 32 query rows per warp (128 per block) and fit two blocks on an
    SM of an A100 (164 KB) with K/V double-buffered where that fits and single-buffered (staggered
    loads) where it does not; the bias kernel and larger head dims run 64 rows."""
    sm80 = limits.SMEM_OPTIN_BY_ARCH["sm_80"]
    for dt in ("float16", "bfloat16"):
        for dp in (16, 64, 96, 128):
            for mode in (tiles.FWD_FIXED, tiles.FWD_RUNNING_MAX):
                t = tiles.fwd_tile(dt, dp, sm80, mode)
                assert t.bm == 128 and t.bn == (64 if dp <= 64 else 32)
                assert 2 * (tiles.fwd_smem_bytes(dt, dp, t) + 1024) <= sm80 + 1024, (dt, dp, t)
            assert tiles.fwd_tile(dt, dp, sm80, tiles.FWD_BIAS).bm == 64
        assert tiles.fwd_tile(dt, 256, sm80).bm == 64
    # single buffers where double ones would leave one block per SM (sm_80 DP = 256, sm_86 DP = 64)
    assert tiles.fwd_tile("float16", 256, sm80).kv_bufs == 1
    assert tiles.fwd_tile("float16", 256, limits.SMEM_OPTIN_BY_ARCH["sm_90"]).kv_bufs == 2
    assert tiles.fwd_tile("float16", 64, limits.SMEM_OPTIN_BY_ARCH["sm_86"]).kv_bufs == 1
    assert tiles.fwd_tile("float32", 64, sm80) == tiles.FwdTile(64, 32, 2)


# ---------------------------------------------------------------------------------------------------
# Device-dependent choices: tiles by the device's shared memory, a clear error where they cannot fit.

SM86 = limits.DeviceCaps((8, 6), limits.SMEM_OPTIN_BY_ARCH["sm_86"], 84)  # RTX 30xx: 99 KB per block


@pytest.mark.parametrize("dtype,D", [("float16", 64), ("bfloat16", 60), ("float32", 64)])
def test_small_shared_memory_device_gets_smaller_tiles(monkeypatch, dtype, D):
    """On a 99 KB device the forward takes smaller tiles (single K/V buffers, fewer keys) where the
    sm_80 tile does not fit, and the smaller instantiation is as accurate."""
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM86)
    dp = tiles.fwd_head_dim_pad(D)
    tile = tiles.fwd_tile(dtype, dp, SM86.smem_optin)
    assert tiles.fwd_smem_bytes(dtype, dp, tile) < tiles.fwd_smem_bytes(dtype, dp, tiles.fwd_tile(dtype, dp))
    assert tiles.fwd_smem_bytes(dtype, dp, tile) <= SM86.smem_optin
    used = []
    real_kernel = devices.Device.kernel
    monkeypatch.setattr(devices.Device, "kernel",
                        lambda self, spec: (used.append(spec.name), real_kernel(self, spec))[1])
    args, kw = make_case(11, Nq=40, Nk=70, D=D, dtype=dtype, causal=True)
    check_forward(args, kw)
    assert registry.fwd_name(dtype, dp, tile, tiles.FWD_FIXED) in used


# Single K/V buffers (the staggered loads a 99 KB device gets) under every feature of the key loop:
# a random mask (whole masked key tiles skipped, the mask slot's parity), caller-normalized q, k (the
# running max), a bias (its own kernel), and two query blocks of the tile's rows.
SINGLE_BUFFER_CASES = [
    ("float16", 64, tiles.FWD_FIXED, dict(mask="random", B=2)),
    ("bfloat16", 96, tiles.FWD_FIXED, dict(mask="random", B=2, causal=True)),
    ("bfloat16", 64, tiles.FWD_RUNNING_MAX, dict(l2norm_qk=False, mask="random", B=2)),
    ("float16", 128, tiles.FWD_BIAS, dict(bias="head", mask="random", B=2, causal=True)),
    ("float32", 64, tiles.FWD_RUNNING_MAX, dict(l2norm_qk=False, mask="random", B=2, causal=True)),
    ("float32", 64, tiles.FWD_BIAS, dict(bias="batch", B=2)),
]


@pytest.mark.parametrize("dtype,D,mode,features", SINGLE_BUFFER_CASES)
def test_single_buffered_forward_features(monkeypatch, dtype, D, mode, features):
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM86)
    dp = tiles.fwd_head_dim_pad(D)
    tile = tiles.fwd_tile(dtype, dp, SM86.smem_optin, mode)
    assert tile.kv_bufs == 1, tile
    used = []
    real_kernel = devices.Device.kernel
    monkeypatch.setattr(devices.Device, "kernel",
                        lambda self, spec: (used.append(spec.name), real_kernel(self, spec))[1])
    args, kw = make_case(41 + D, Nq=2 * tile.bm + 6, Nk=150, D=D, dtype=dtype, **features)
    check_forward(args, kw)
    assert registry.fwd_name(dtype, dp, tile, mode) in used, used


def test_tiles_that_do_not_fit_the_device_raise_before_any_launch(monkeypatch):
    # The smallest fp32 D=256 forward tile (64 rows, 16 keys, K/V double-buffered) needs 133152 bytes.
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM86)
    launches = []
    monkeypatch.setattr(devices.Device, "launch", lambda self, *a, **k: launches.append(a))
    args, kw = make_case(3, Nq=8, D=256, dtype="float32")
    with pytest.raises(ValueError, match=r"forward kernel for head dim D=256 in float32 needs \d+ bytes of shared "
                                         r"memory per block; this device allows 101376"):
        api.forward(*args, backend="emulator", **kw)
    # The backward has a small-shared-memory variant that fits every head dim in 99 KB; on a device
    # with 48 KB per block even that does not fit bf16 D=192 (53120 bytes).
    monkeypatch.setattr(limits, "EMULATED_DEVICE", limits.DeviceCaps((8, 6), 48 * 1024, 84))
    args, kw = make_case(3, Nq=8, D=192, dtype="bfloat16")
    out, lse = api.forward(*args, backend="reference", **kw)
    with pytest.raises(ValueError, match=r"backward kernels for head dim D=192 in bfloat16 needs \d+ bytes of shared "
                                         r"memory per block; this device allows 49152"):
        api.backward(out, *args, out, lse, backend="emulator", **kw)
    assert not launches


def test_pre_ampere_device_raises(monkeypatch):
    monkeypatch.setattr(limits, "EMULATED_DEVICE", limits.DeviceCaps((7, 5), 64 * 1024, 40))
    args, kw = make_case(3, Nq=8, D=64)
    with pytest.raises(RuntimeError, match=r"compute capability >= 8.0.*this device has 7.5"):
        api.forward(*args, backend="emulator", **kw)
    out, lse = api.forward(*args, backend="reference", **kw)
    with pytest.raises(RuntimeError, match="compute capability"):
        api.backward(out, *args, out, lse, backend="emulator", **kw)


class _NoBf16(np.ndarray):
    """A NumPy array that, like CuPy without bfloat16 kernels, refuses element-wise work (copies,
    fills, assignments) on bfloat16; 16-bit integer views of it work. ``.data.ptr`` as in CuPy."""

    def __setitem__(self, key, value):
        if self.dtype == BFLOAT16:
            raise TypeError("bfloat16 assignment: CuPy has no such kernel")
        super().__setitem__(key, value)

    def copy(self, order="C"):
        if self.dtype == BFLOAT16:
            raise TypeError("bfloat16 copy: CuPy has no such kernel")
        return super().copy(order)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])


class _XpNoBf16:
    """The slice of the CuPy namespace the launch layer uses, refusing bfloat16 work."""

    @staticmethod
    def ascontiguousarray(a, dtype=None):
        if np.dtype(dtype or a.dtype) == BFLOAT16 and not (a.flags.c_contiguous and dtype is None):
            raise TypeError("bfloat16 copy: CuPy has no such kernel")
        return np.ascontiguousarray(a, dtype=dtype).view(_NoBf16)

    @staticmethod
    def zeros(shape, dtype):
        if np.dtype(dtype) == BFLOAT16:
            raise TypeError("bfloat16 fill: CuPy has no such kernel")
        return np.zeros(shape, dtype=dtype).view(_NoBf16)


def test_cuda_array_plumbing_runs_no_bfloat16_kernel():
    """The cuda backend's copies, zero padding and column slices move bfloat16 as 16-bit integers,
    bit-exactly, so they work with any CuPy (checked on a NumPy stand-in that refuses bfloat16 work)."""
    dev = devices.CudaDevice(xp=_XpNoBf16())
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 10)).astype(BFLOAT16).view(_NoBf16)
    strided = x[:, ::2, 1:6]  # (2, 2, 5), not contiguous
    with pytest.raises(TypeError):  # the stand-in does refuse a bfloat16 copy
        strided.copy()

    padded = staging.padded(dev, strided, 16)
    assert padded.shape == (2, 2, 16) and padded.dtype == BFLOAT16 and padded.flags.c_contiguous
    assert np.array_equal(padded.view(np.uint16)[..., :5], strided.view(np.uint16))
    assert not padded.view(np.uint16)[..., 5:].any()

    copy = dev.to_device(strided)
    assert copy.flags.c_contiguous and np.array_equal(copy.view(np.uint16), strided.view(np.uint16))
    assert dev.to_device(copy) is copy  # already a contiguous, aligned device array: no copy
    assert not dev.zeros((3, 4), BFLOAT16).view(np.uint16).any()

    out = staging.deliver(dev, padded[..., :5], None)  # the forward's column slice of a padded result
    assert out.flags.c_contiguous and np.array_equal(out.view(np.uint16), strided.view(np.uint16))
    dst = np.zeros((2, 2, 5), dtype=BFLOAT16).view(_NoBf16)
    assert staging.deliver(dev, padded[..., :5], dst) is dst
    assert np.array_equal(dst.view(np.uint16), strided.view(np.uint16))
    f32 = np.zeros((2, 2, 5), dtype=np.float32)
    arrays.copy_into(f32, strided.view(np.ndarray))  # different dtypes: an ordinary converting copy
    assert np.array_equal(f32, strided.view(np.ndarray).astype(np.float32))


def test_launch_imports_no_cupy():
    import subprocess
    import sys

    code = "import sys, cupy_cosattn.launch, cupy_cosattn.resources; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------------
# GPU twins (skipped with a reason on machines without CuPy and a device).

@pytest.mark.gpu
@pytest.mark.parametrize("N", [63, 127])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_forward_grid_gpu(dtype, D, N):
    _skip_unsupported_gpu_dtype(dtype)
    _grid("cuda", dtype, D, N)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_configs_gpu(name, dtype):
    _skip_unsupported_gpu_dtype(dtype)
    args, kw = make_case(zlib.crc32(name.encode()), dtype=dtype, **CONFIGS[name])
    check_forward(args, kw, backend="cuda")


@pytest.mark.gpu
def test_grid_yz_limit_loops_gpu(monkeypatch):
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    args, kw = make_case(7, B=3, H=3, Hk=1, Nq=20, Nk=70, D=32, dtype="float32", mask="random", bias="head")
    check_forward(args, kw, backend="cuda")


@pytest.mark.gpu
def test_device_caps_gpu():
    import cupy

    caps = devices.CudaDevice().capabilities()
    dev = cupy.cuda.Device()
    assert caps.compute_capability == (int(dev.compute_capability[:-1]), int(dev.compute_capability[-1]))
    assert caps.smem_optin >= 99 * 1024 and caps.sm_count > 0
    caps.check()


def _skip_unsupported_gpu_dtype(dtype):
    if dtype != "bfloat16":
        return
    import cupy

    try:
        cupy.zeros(1, dtype=BFLOAT16)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"this CuPy cannot hold bfloat16 arrays ({type(e).__name__})")
