"""The backward kernels (cuda_src/backward.cu, launched by cupy_cosattn/launch/backward.py) through the
public API, against the float64 reference (cupy_cosattn.reference.backward64), on the CPU emulator
and, marked ``gpu``, on CuPy.

Accuracy (docs/design.md section 2), as ||x - ref|| / ||ref|| for dq, dk, dv and dbias: 1e-4 (fp32),
1e-2 (fp16), 5e-2 (bf16); no NaN/Inf; rows and keys nothing sees get exactly zero gradient.
dscale_h = sum_bij dS_bhij <qhat_i, khat_j> is an ill-conditioned sum (its terms cancel: sum_j dS_ij
= 0 for every row; |sum| is often 1/100 to 1/1000 of sum |terms|), and the kernels' inputs carry
the dtype's rounding (qhat, khat and out are stored in the dtype, as in every fused attention), so
its error is measured, with the same tolerances, relative to T_h = sum_bij |dS_bhij <qhat_i, khat_j>|,
the norm that bounds the error of a sum of perturbed terms. ``deterministic=True`` is bitwise
repeatable (checked under the emulator's interleaving mode with different seeds, which reorders
threads and blocks).

``out`` and ``lse`` come from the reference forward (rounded to the dtype, as the kernels' forward
stores them), so these tests judge the backward kernels alone; one end-to-end test chains the
emulated forward and backward.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from cupy_cosattn import api, emulator, problem, reference, tolerances
from cupy_cosattn.launch import arrays, devices, limits, registry, tiles
from cupy_cosattn.launch import backward as LB
from cupy_cosattn.problem import BFLOAT16

import kernel_cases
from kernel_cases import DTYPES, F16, F32, rel_err  # noqa: F401

GRAD_TOL = tolerances.GRAD
GRADS = ("dq", "dk", "dv", "dbias", "dscale")


# ---------------------------------------------------------------------------------------------------
# Inputs.

def make_case(seed, *, B=2, deterministic=False, **kw):
    """(args, kwargs, dout) for cupy_cosattn.backward (kernel_cases.make_case with a dout)."""
    return kernel_cases.make_case(seed, B=B, deterministic=deterministic, with_dout=True, **kw)


def _to(xp, x):
    return xp.asarray(x) if isinstance(x, np.ndarray) else x


def run_backward(args, kw, dout, backend="emulator", forward="reference"):
    """(dq, dk, dv, dbias, dscale) from `backend` as NumPy values, with out/lse of the `forward` backend
    (the reference, or "emulator": the kernels' own, e.g. the Hopper forward's in test_kernels_hopper)."""
    out, lse = api.forward(*args, backend=forward, **kw)
    if backend == "cuda":
        import cupy

        dev = lambda x: _to(cupy, x)  # noqa: E731
        kw_dev = {k: (dev(v) if k != "scale" else v) for k, v in kw.items()}
        res = api.backward(dev(dout), *[dev(a) for a in args], dev(out), dev(lse), backend="cuda", **kw_dev)
        return tuple(cupy.asnumpy(r) if isinstance(r, cupy.ndarray) else r for r in res)
    return api.backward(dout, *args, out, lse, backend=backend, **kw)


def reference_grads(args, kw, dout):
    """float64 (dq, dk, dv, dbias, dscale) in the caller's shapes (dscale: float or (H,))."""
    prob, inp = problem.canonicalize(*args, **kw)
    dq, dk, dv, dbias, dscale = reference.backward64(prob, inp, dout.reshape(prob.B, prob.H, prob.Nq, prob.D))
    q, k, v = args
    dbias = None if dbias is None else dbias.reshape(kw["attn_bias"].shape)
    dscale = dscale if prob.per_head_scale else float(np.sum(dscale))
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dbias, dscale


def dscale_term_norm(args, kw, dout):
    """T = sum_bij |dS_bhij <qhat_i, khat_j>| per head (summed over heads for a scalar scale), in
    float64 from the reference's probabilities: the scale of dscale's error (see the docstring)."""
    prob, inp = problem.canonicalize(*args, **kw)
    c = reference._compute(prob, inp)
    do = np.asarray(dout, dtype=np.float64).reshape(prob.B, prob.H, prob.Nq, prob.D)
    dp = do @ np.swapaxes(c["v_x"], -1, -2)
    ds = c["p"] * (dp - np.sum(do * c["o"], axis=-1, keepdims=True))
    t = np.sum(np.abs(ds * c["cos"]), axis=(0, 2, 3))
    return t if prob.per_head_scale else float(np.sum(t))


def check_grads(args, kw, dout, backend="emulator", tol=None, forward="reference"):
    """Assert the contract's accuracy of every gradient; returns {name: rel err}."""
    q, k, v = args
    dtype = problem.DTYPE_NAMES[np.dtype(q.dtype)]
    got = run_backward(args, kw, dout, backend, forward)
    ref = reference_grads(args, kw, dout)
    tol = tol or GRAD_TOL[dtype]
    errs = {}
    for name, g, r, like in zip(GRADS, got, ref, (q, k, v, kw.get("attn_bias"), None)):
        if r is None:
            assert g is None, f"{name} should be None"
            continue
        if like is not None:
            assert g.shape == like.shape and np.dtype(g.dtype) == np.dtype(like.dtype), \
                f"{name}: shape/dtype {g.shape}/{g.dtype}, want {like.shape}/{like.dtype}"
        g64 = np.asarray(g, dtype=np.float64)
        assert np.isfinite(g64).all(), f"NaN/Inf in {name}"
        if name == "dscale":
            den = np.linalg.norm(dscale_term_norm(args, kw, dout))
            errs[name] = float(np.linalg.norm(g64 - r) / (den if den > 0 else 1.0))
        else:
            errs[name] = rel_err(g64, r)
    bad = {n: e for n, e in errs.items() if e > tol}
    assert not bad, f"rel errors above {tol:.0e}: " + ", ".join(f"{n} {e:.2e}" for n, e in bad.items())
    return errs


# ---------------------------------------------------------------------------------------------------
# The grid: causal / mask / neither x bias (none, per head, per batch, full) x single kv head x D x
# lengths x dtypes. One test per (dtype, D, length) runs the 24 flag combinations (half of them in
# deterministic mode, with float32 biases on some), so a failure names them.

GRID_MODES = ("none", "causal", "mask")
GRID_BIASES = (None, "head", "batch", "full")
GRID_FLAGS = [(mode, bias, kv1) for mode in GRID_MODES for bias in GRID_BIASES for kv1 in (False, True)]


def grid_deterministic(mode, bias, kv1) -> bool:
    """Deterministic mode on a checkerboard of (mode, bias, kv1): under every mode each bias kind and
    each kv layout runs in both backward modes, and every (bias, kv layout) pair does too."""
    return (GRID_MODES.index(mode) + GRID_BIASES.index(bias) + int(kv1)) % 2 == 1


def _grid(backend, dtype, D, N, forward="reference"):
    failures = []
    for i, (mode, bias, kv1) in enumerate(GRID_FLAGS):
        det = grid_deterministic(mode, bias, kv1)
        args, kw, dout = make_case(1000 * D + N + i, B=2, H=2, Nq=N, D=D, dtype=dtype, kv_3d=kv1,
                                   causal=mode == "causal", mask="random" if mode == "mask" else None, bias=bias,
                                   bias_f32=(i % 3 == 0), deterministic=det)
        try:
            check_grads(args, kw, dout, backend, forward=forward)
        except AssertionError as e:
            failures.append(f"{mode=} {bias=} single_kv={kv1} deterministic={det}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("N", [63, 127])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_grid(dtype, D, N):
    _grid("emulator", dtype, D, N)


def test_grid_covers_both_modes_everywhere():
    """The grid's deterministic flag is independent of the other flags: every (mode, kv layout),
    (mode, bias) and (bias, kv layout) pair runs in both backward modes."""
    dets = {f: grid_deterministic(*f) for f in GRID_FLAGS}
    assert sum(dets.values()) == len(GRID_FLAGS) // 2
    for a, b in ((0, 2), (0, 1), (1, 2)):
        pairs = {}
        for f, det in dets.items():
            pairs.setdefault((f[a], f[b]), set()).add(det)
        assert all(v == {False, True} for v in pairs.values()), (a, b, pairs)


# ---------------------------------------------------------------------------------------------------
# Random and edge configurations.

CONFIGS = {
    "gqa": dict(H=4, Hk=2, Nq=70, Nk=90, D=64, causal=True),
    "gqa_bias_det": dict(H=6, Hk=2, Nq=40, Nk=50, D=32, bias="head", deterministic=True),
    "mqa_3d_kv": dict(H=3, kv_3d=True, Nq=40, Nk=150, D=32, mask="random"),
    "merged_3d": dict(merged=True, B=2, H=2, Nq=33, Nk=65, D=64, bias="head", mask="random"),
    "merged_3d_det": dict(merged=True, B=2, H=2, Nq=33, Nk=65, D=64, causal=True, deterministic=True),
    "groups4": dict(D=64, groups=4, Nq=50, Nk=77),
    "groups_chunk8_det": dict(D=32, groups=4, Nq=20, Nk=20, causal=True, deterministic=True),
    "per_head_scale": dict(H=3, per_head_scale=True, Nq=45, Nk=70, D=64, bias="batch"),
    "per_head_scale_det": dict(H=3, per_head_scale=True, Nq=45, Nk=70, D=32, deterministic=True),
    "prenormalized_big_bias": dict(l2norm_qk=False, bias="full", bias_scale=30.0, Nq=64, Nk=96, D=64),
    "prenormalized_no_bias_det": dict(l2norm_qk=False, Nq=31, Nk=64, D=32, causal=True, deterministic=True),
    "nq_gt_nk_causal": dict(Nq=100, Nk=30, causal=True, D=32, bias="full"),
    "nq_lt_nk_causal_det": dict(Nq=17, Nk=130, causal=True, D=64, bias="head", deterministic=True),
    "fully_masked_rows": dict(mask="random", causal=True, bias="batch", Nq=65, Nk=65, D=32),
    "fully_masked_rows_det": dict(mask="random", bias="full", Nq=40, Nk=90, D=64, deterministic=True),
    "nq1": dict(Nq=1, Nk=77, D=64),
    "nk2_det": dict(Nq=20, Nk=2, D=32, deterministic=True),
    "large_scale": dict(scale=24.0, Nq=40, Nk=70, D=64),
    "d8": dict(D=8, Nq=30, Nk=45),
    "d40_groups5_det": dict(D=40, groups=5, Nq=30, Nk=45, deterministic=True),
    "d33_groups3": dict(D=33, groups=3, Nq=30, Nk=45, causal=True),
    "d80_mask": dict(D=80, Nq=30, Nk=45, mask="random"),
    "d200_causal_det": dict(D=200, Nq=20, Nk=33, causal=True, deterministic=True),
    "d256_bias": dict(D=256, Nq=40, Nk=70, bias="head", B=1),
    # two head-dim chunks (DP = 160) summing a broadcast bias's dS by atomics: only chunk 0 adds it
    "d160_batch_bias": dict(D=160, Nq=24, Nk=40, bias="batch"),
    # one key block streams five query tiles through bwd_dkdv's two stages (each refilled while the
    # other is read) in deterministic mode, where no dQ barrier sits inside an iteration
    "long_q_det": dict(Nq=300, Nk=40, D=64, B=1, H=1, deterministic=True),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_configs(name, dtype):
    args, kw, dout = make_case(zlib.crc32(name.encode()), dtype=dtype, **CONFIGS[name])
    check_grads(args, kw, dout)


def test_invisible_rows_and_keys_get_zero_gradient():
    """A batch row with every key masked: its queries' dq and dbias rows are exactly 0, and so are
    dk, dv of masked keys; nothing is NaN."""
    args, kw, dout = make_case(11, B=2, H=2, Nq=30, Nk=40, D=32, dtype="float32", mask="random", bias="full")
    dq, dk, dv, dbias, _ = run_backward(args, kw, dout)
    m = kw["mask"]
    assert not m[0].any()
    assert np.all(dq[0] == 0) and np.all(dbias[0] == 0)
    keys = lambda x: np.swapaxes(x, 1, 2)[~m]  # noqa: E731  (B, Nk, H, D) rows of masked keys
    assert np.all(keys(dk) == 0) and np.all(keys(dv) == 0)
    assert np.all(dbias[1][..., ~m[1]] == 0)


FWD_TOL = tolerances.OUT


def skipped_tile_keys(dtype: str, D: int) -> int:
    """A key range of this many keys, starting at a multiple of it, is a union of whole key tiles of
    every kernel: the forward's (fwd_block_n on the emulated device), bwd_dkdv's key block and
    bwd_dq's key tile. All are powers of two, so the largest is a multiple of the others."""
    bn = tiles.fwd_block_n(dtype, tiles.fwd_head_dim_pad(D), limits.EMULATED_DEVICE.smem_optin)
    dp = tiles.bwd_head_dim_pad(D)
    return max(bn, tiles.kv_config(dtype, dp).rows, tiles.q_config(dtype, dp).tile)


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_fully_masked_tile_is_never_read(dtype, where):
    """K and V are NaN on keys that the mask hides as whole tiles (the first tile, or the last one,
    which is partial): every kernel must skip those tiles (no loads, no math), so forward out/lse and
    every gradient of both backward modes are finite and equal the reference computed without those
    keys; the hidden keys get exactly zero dk, dv and dbias."""
    D = 64
    T = skipped_tile_keys(dtype, D)
    Nk = 3 * T - 5
    lo, hi = (0, T) if where == "first" else (2 * T, Nk)
    args, kw, dout = make_case(31 + (where == "last"), B=2, H=2, Nq=40, Nk=Nk, D=D, dtype=dtype, bias="head")
    q, k, v = args
    rng = np.random.default_rng(7)
    mask = np.ones((2, Nk), dtype=bool)
    mask[1] = rng.random(Nk) < 0.7  # batch 1: random masking elsewhere too
    mask[:, lo:hi] = False
    k, v = k.copy(), v.copy()
    k[:, :, lo:hi] = np.nan
    v[:, :, lo:hi] = np.nan
    kw = dict(kw, mask=mask)
    keep = np.ones(Nk, dtype=bool)
    keep[lo:hi] = False
    args_r = (q, np.ascontiguousarray(k[:, :, keep]), np.ascontiguousarray(v[:, :, keep]))
    kw_r = dict(kw, mask=np.ascontiguousarray(mask[:, keep]),
                attn_bias=np.ascontiguousarray(kw["attn_bias"][..., keep]))

    out, lse = api.forward(q, k, v, backend="emulator", **kw)
    out_r, lse_r = api.forward(*args_r, backend="reference", **kw_r)
    assert np.isfinite(np.asarray(out, dtype=np.float64)).all() and np.isfinite(lse).all()
    assert rel_err(out, out_r) <= FWD_TOL[dtype] and rel_err(lse, lse_r) <= FWD_TOL[dtype]

    ref = reference_grads(args_r, kw_r, dout)
    den = dscale_term_norm(args_r, kw_r, dout)
    tol = GRAD_TOL[dtype]
    for det in (False, True):
        got = api.backward(dout, q, k, v, out, lse, backend="emulator", **dict(kw, deterministic=det))
        for name, g in zip(GRADS, got):
            assert np.isfinite(np.asarray(g, dtype=np.float64)).all(), f"NaN/Inf in {name} ({det=})"
        dq, dk, dv, dbias, dscale = (np.asarray(g, dtype=np.float64) for g in got)
        assert np.all(dk[:, :, ~keep] == 0) and np.all(dv[:, :, ~keep] == 0) and np.all(dbias[..., ~keep] == 0)
        errs = {"dq": rel_err(dq, ref[0]), "dk": rel_err(dk[:, :, keep], ref[1]), "dv": rel_err(dv[:, :, keep], ref[2]),
                "dbias": rel_err(dbias[..., keep], ref[3]), "dscale": abs(float(dscale) - ref[4]) / den}
        bad = {n: e for n, e in errs.items() if e > tol}
        assert not bad, f"{det=}: rel errors above {tol:.0e}: {bad}"


@pytest.mark.parametrize("deterministic", [False, True])
def test_single_key(deterministic):
    """Nk = 1: every query attends to its one key with p = 1, so dS = 0: dq and dk vanish (up to
    rounding; relative errors against an exact 0 are meaningless) and dv = sum_i dout_i."""
    args, kw, dout = make_case(9, B=2, H=2, Nq=20, Nk=1, D=32, dtype="float32", deterministic=deterministic)
    dq, dk, dv, _, dscale = run_backward(args, kw, dout)
    assert np.abs(dq).max() < 1e-5 and np.abs(dk).max() < 1e-5 and abs(dscale) < 1e-5
    assert np.allclose(dv, dout.sum(axis=2, keepdims=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_deterministic_is_bitwise_repeatable(dtype):
    """deterministic=True: two runs under different emulator interleavings (thread order inside a
    block and block order) give bitwise equal gradients, GQA and a broadcast bias included, for
    every dtype."""
    assert set(DTYPES) == {"float16", "bfloat16", "float32"}
    args, kw, dout = make_case(5, B=2, H=4, Hk=2, Nq=70, Nk=90, D=64, dtype=dtype, causal=True, bias="head",
                               deterministic=True)
    runs = []
    for seed in (1, 12345):
        with emulator.interleave(seed):
            assert emulator.get_interleave() == seed
            runs.append(run_backward(args, kw, dout))
    for name, a, b in zip(GRADS, *runs):
        assert np.array_equal(np.asarray(a), np.asarray(b)), f"{name} differs between runs"


def test_query_head_splits(monkeypatch):
    """GQA with the query heads of a kv head split over several blocks (partial dK/dV summed by the
    launch layer in a fixed order), in both modes."""
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 10**9)
    prob, _ = problem.canonicalize(*make_case(0, H=6, Hk=2, Nq=8, D=32)[0])
    assert tiles.choose_nsplit(prob, 1) == 3
    for det in (False, True):
        args, kw, dout = make_case(21 + det, B=1, H=6, Hk=2, Nq=45, Nk=70, D=32, dtype="float32", bias="head",
                                   deterministic=det)
        check_grads(args, kw, dout)


def test_head_walk_per_head_scale(monkeypatch):
    """One bwd_dkdv block walks all four query heads of its kv head (no split: heads_per_split = 4),
    each with its own scale, in fast mode: the scale, bias, dbias, dQ rows and dscale row sums of every
    iteration must follow the head it loads."""
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 1)
    args, kw, dout = make_case(24, B=1, H=8, Hk=2, Nq=70, Nk=90, D=32, dtype="float16", bias="head",
                               per_head_scale=True, deterministic=False)
    prob, _ = problem.canonicalize(*args, **kw)
    assert tiles.choose_nsplit(prob, 1) == 1
    assert len(set(np.asarray(kw["scale"]).tolist())) == prob.H
    check_grads(args, kw, dout)


def test_grid_yz_limit_loops(monkeypatch):
    """B*H beyond the grid's y extent: every backward kernel loops over its y work items."""
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 2)
    for det in (False, True):
        args, kw, dout = make_case(7 + det, B=3, H=3, Hk=1, Nq=20, Nk=70, D=32, dtype="float32", mask="random",
                                   bias="head", deterministic=det)
        check_grads(args, kw, dout)


def test_dscale_last_and_optional(monkeypatch):
    """run_backward copies dscale to the host once, after every kernel is launched (no host wait
    between launches on the CUDA path); need_dscale=False skips it (None) and changes nothing else."""
    args, kw, dout = make_case(13, B=2, H=3, Nq=40, Nk=70, D=32, dtype="float16", mask="random", bias="batch",
                               per_head_scale=True, deterministic=True)
    prob, inp = problem.canonicalize(*args, **kw)
    out, lse = api.forward(*args, backend="reference", **kw)
    dev = devices.EmulatedDevice()
    events = []
    real_launch, real_host = dev.launch, dev.to_host
    monkeypatch.setattr(dev, "launch", lambda *a, **k: (events.append("launch"), real_launch(*a, **k))[1])
    monkeypatch.setattr(dev, "to_host", lambda x: (events.append("host"), real_host(x))[1])
    with_ds = LB.run_backward(dev, prob, inp, dout, out, lse)
    assert events.count("host") == 1 and events[-1] == "host" and events.count("launch") >= 4, events
    events.clear()
    without = LB.run_backward(dev, prob, inp, dout, out, lse, need_dscale=False)
    assert "host" not in events and without[4] is None
    for name, a, b in zip(GRADS[:4], with_ds, without):
        assert np.array_equal(np.asarray(a), np.asarray(b)), name
    ref = reference_grads(args, kw, dout)[4]
    err = np.linalg.norm(with_ds[4] - ref) / np.linalg.norm(dscale_term_norm(args, kw, dout))
    assert with_ds[4].shape == (3,) and with_ds[4].dtype == np.float64 and err <= GRAD_TOL["float16"]


def test_forward_then_backward_emulated():
    """End to end on the emulator: forward's out and lse feed backward."""
    args, kw, dout = make_case(3, B=2, H=2, Nq=50, Nk=70, D=64, dtype="float16", causal=True, bias="head")
    out, lse = api.forward(*args, backend="emulator", **kw)
    got = api.backward(dout, *args, out, lse, backend="emulator", **kw)
    ref = reference_grads(args, kw, dout)
    for name, g, r in zip(GRADS[:4], got, ref):
        assert rel_err(g, r) <= GRAD_TOL["float16"], name
    assert abs(got[4] - ref[4]) <= GRAD_TOL["float16"] * dscale_term_norm(args, kw, dout)


@pytest.mark.parametrize("dtype,dp,small", [("float16", 64, False), ("bfloat16", 128, False), ("float32", 96, False),
                                            ("float32", 128, False), ("float16", 256, True), ("bfloat16", 224, True),
                                            ("float32", 128, True), ("float32", 256, True)])
def test_tile_config_mirrors_kernel(dtype, dp, small):
    """tiles.kv_config / q_config (grids, shared memory) agree with the compiled traits, for
    the default variant and the small-shared-memory one (bwd_info<T, DP, true>)."""
    dev = devices.EmulatedDevice()
    kv, q = tiles.kv_config(dtype, dp, small), tiles.q_config(dtype, dp, small)
    want = (kv.threads, kv.rows, kv.tile, kv.dc, kv.n_chunks, kv.smem, q.threads, q.rows, q.tile, q.dc, q.n_chunks,
            q.smem)
    assert LB.tile_info(dev, dtype, dp, small) == want


SM86 = limits.DeviceCaps((8, 6), limits.SMEM_OPTIN_BY_ARCH["sm_86"], 84)


def test_small_variants_are_registered_where_a_device_picks_them():
    """Every (dtype, DP) fits a 99 KB device with the variant choose_small picks, and the registry holds
    every variant some architecture of SMEM_OPTIN_BY_ARCH picks (and no small one that none does)."""
    names = {s.name for s in registry.backward_kernel_specs()}
    picked = set()
    for dt in limits.KERNEL_DTYPES:
        for dp in tiles.HEAD_DIM_PADS:
            for lim in limits.SMEM_OPTIN_BY_ARCH.values():
                kv_s, q_s = tiles.choose_small(dt, dp, lim)
                assert max(tiles.kv_config(dt, dp, kv_s).smem, tiles.q_config(dt, dp, q_s).smem) <= lim, (dt, dp, lim)
                picked |= {registry.bwd_name("dkdv", dt, dp, kv_s), registry.bwd_name("dq", dt, dp, q_s)}
                if kv_s or q_s:
                    picked.add(registry.bwd_name("info", dt, dp, True))
    assert picked <= names
    dense = {n for n in names if not registry.is_varlen_name(registry.BACKWARD_SOURCE, n)}
    assert {n for n in dense if n.endswith(", true>")} <= picked
    # packed-batch (VARLEN) instantiations: exactly the 16-bit twins of the dense kernels
    varlen = names - dense
    assert varlen == {n for n in varlen if any(f"<{limits.CTYPES[dt]}," in n for dt in registry.VARLEN_DTYPES)}
    assert varlen and len(varlen) == len({n for n in dense if "bwd_info<" not in n
                                          and any(f"<{limits.CTYPES[dt]}," in n for dt in registry.VARLEN_DTYPES)})
    assert tiles.choose_small("float16", 128, SM86.smem_optin) == (False, False)
    assert tiles.choose_small("float32", 192, SM86.smem_optin) == (True, False)


# (dtype, D) whose default backward tiles exceed 99 KB: on sm_86 they run the small variants.
SMALL_CASES = [("float16", 192), ("float16", 256), ("bfloat16", 200), ("float32", 128), ("float32", 180),
               ("float32", 256)]


@pytest.mark.parametrize("dtype,D", SMALL_CASES)
def test_small_shared_memory_device_runs_small_backward_tiles(monkeypatch, dtype, D):
    """On a 99 KB device (sm_86) the backward picks the small variant of each kernel whose default
    tiles do not fit, and every gradient still meets the contract, in both modes, with a bias and a
    mask."""
    monkeypatch.setattr(limits, "EMULATED_DEVICE", SM86)
    dp = tiles.bwd_head_dim_pad(D)
    kv_s, q_s = tiles.choose_small(dtype, dp, SM86.smem_optin)
    assert kv_s
    kernels = []
    real_kernel = devices.Device.kernel
    monkeypatch.setattr(devices.Device, "kernel",
                        lambda self, spec: (kernels.append(spec.name), real_kernel(self, spec))[1])
    for det in (False, True):
        kernels.clear()
        args, kw, dout = make_case(4000 + D + det, B=1, H=2, Hk=1, Nq=21, Nk=37, D=D, dtype=dtype, mask="random",
                                   bias="head", deterministic=det)
        check_grads(args, kw, dout)
        ran = {n for n in kernels if "bwd_dkdv" in n or "bwd_dq" in n}
        want = {registry.bwd_name("dkdv", dtype, dp, kv_s)}
        if det:
            want.add(registry.bwd_name("dq", dtype, dp, q_s))
        assert ran == want, (det, ran)


def test_bfloat16_cast_matches_ml_dtypes():
    """launch.arrays.cast (integer bit arithmetic, what CuPy runs for bfloat16) rounds exactly as
    ml_dtypes does, both ways."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 5000),
                        np.array([0.0, -0.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3.0e38, 1e-45], np.float32)])
    x = x.astype(np.float32)
    got = arrays.cast(np, x, BFLOAT16)
    assert got.dtype == BFLOAT16 and np.array_equal(got.view(np.uint16), x.astype(BFLOAT16).view(np.uint16))
    back = arrays.cast(np, got, np.float32)
    assert np.array_equal(back, got.astype(np.float32))
    assert arrays.cast(np, got[-6:-2], np.float16).dtype == np.float16


def test_tile_configs_fit():
    """Every instantiation: chunks divide the padded head dim; shared memory within sm_80's limit."""
    for dt in limits.KERNEL_DTYPES:
        for dp in tiles.HEAD_DIM_PADS:
            for c in (tiles.kv_config(dt, dp), tiles.q_config(dt, dp)):
                assert c.dc % 16 == 0 and c.dc * c.n_chunks == dp
                assert c.smem <= limits.SMEM_OPTIN_LIMIT, (dt, dp, c)
    pads = [tiles.bwd_head_dim_pad(d) for d in (1, 8, 16, 33, 128, 129, 200, 256)]
    assert pads == [16, 16, 16, 48, 128, 160, 224, 256]


# ---------------------------------------------------------------------------------------------------
# The same on a GPU (skipped with the reason elsewhere, see conftest.py).

@pytest.mark.gpu
@pytest.mark.parametrize("N", [63, 127])
@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_backward_grid_gpu(dtype, D, N):
    _grid("cuda", dtype, D, N)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backward_configs_gpu(name, dtype):
    args, kw, dout = make_case(zlib.crc32(name.encode()), dtype=dtype, **CONFIGS[name])
    check_grads(args, kw, dout, backend="cuda")


@pytest.mark.gpu
def test_deterministic_is_bitwise_repeatable_gpu():
    args, kw, dout = make_case(5, B=4, H=8, Hk=2, Nq=300, Nk=333, D=64, dtype="float16", causal=True, bias="head",
                               deterministic=True)
    a = run_backward(args, kw, dout, "cuda")
    b = run_backward(args, kw, dout, "cuda")
    for name, x, y in zip(GRADS, a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{name} differs between runs"


def _far_bias_case(seed, deterministic):
    """A full bias near -100 on every pair and Nk = 70 (a partial last key tile): the softmax is that
    of an ordinary problem (a constant shift per row), but lse is near -100 while a padding key (zero
    row, no bias) has logit 0, so its P would be exp(-lse) = Inf in fp32 if it were not hidden."""
    args, kw, dout = make_case(seed, Nq=40, Nk=70, D=32, bias="full", deterministic=deterministic)
    kw["attn_bias"] = (kw["attn_bias"].astype(np.float64) - 100.0).astype(F16)
    return args, kw, dout


LEAN_CASES = {
    "causal": lambda det: make_case(31, Nq=70, Nk=128, D=32, causal=True, deterministic=det),
    "mask": lambda det: make_case(32, Nq=40, Nk=128, D=32, mask="random", deterministic=det),
    "far_bias_tail": lambda det: _far_bias_case(33, det),
    # whole key tiles, no mask, not causal: every tile takes the loops without the per-pair test, with
    # the bias term
    "full_tiles_bias": lambda det: make_case(34, Nq=40, Nk=128, D=32, bias="full", deterministic=det),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["fast", "deterministic"])
@pytest.mark.parametrize("case", sorted(LEAN_CASES))
def test_without_dscale_matches_reference(case, deterministic):
    """need_dscale=False (the torch op with a float scale) takes the kernels' other probability
    loops: tiles whose pairs are all visible skip the per-pair test (and, without a bias, the bias
    term; with one, they must keep it). dq, dk, dv still meet the
    contract where some pairs of a tile are hidden (causal horizon, masked keys, keys past Nk), and so
    does dbias."""
    args, kw, dout = LEAN_CASES[case](deterministic)
    prob, inp = problem.canonicalize(*args, **kw)
    out, lse = api.forward_canonical(prob, inp, "reference")
    d4 = dout.reshape(prob.B, prob.H, prob.Nq, prob.D)
    got = api.backward_canonical(prob, inp, d4, out, lse, "emulator", need_dscale=False)
    assert got[4] is None
    ref = reference_grads(args, kw, dout)
    for name, g, r in zip(GRADS[:4], got[:4], ref[:4]):
        if r is None:
            assert g is None, f"{case}: {name} should be None"
            continue
        g = np.asarray(g, dtype=np.float64).reshape(r.shape)
        assert np.isfinite(g).all(), f"{case}: NaN/Inf in {name}"
        assert rel_err(g, r) <= GRAD_TOL["float16"], f"{case}: {name} rel err {rel_err(g, r):.2e}"


def test_backward_canonical_can_skip_dscale():
    """api.backward_canonical(need_dscale=False) reaches the kernels: the same gradients, no dscale
    (the torch op asks for it only when the scale is a tensor)."""
    args, kw, dout = make_case(21, Nq=20, D=32, dtype="float32", bias="head", deterministic=True)
    prob, inp = problem.canonicalize(*args, **kw)
    out, lse = api.forward_canonical(prob, inp, "emulator")
    d4 = dout.reshape(prob.B, prob.H, prob.Nq, prob.D)
    full = api.backward_canonical(prob, inp, d4, out, lse, "emulator")
    lean = api.backward_canonical(prob, inp, d4, out, lse, "emulator", need_dscale=False)
    assert full[4] is not None and lean[4] is None
    for a, b in zip(full[:4], lean[:4]):
        np.testing.assert_array_equal(a, b)
    ref = api.backward_canonical(prob, inp, d4, out, lse, "reference", need_dscale=False)
    assert ref[4] is not None  # the reference has no such shortcut
