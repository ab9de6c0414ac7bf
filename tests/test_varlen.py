"""Packed variable-length batches (cupy_cosattn/varlen.py, ``ca.varlen_forward`` / ``varlen_backward``)
through the emulator and the reference.

The definition being checked: a packed batch is each sequence's own dense attention. Every result is
compared with the dense *public API* (``ca.forward`` / ``ca.backward``, backend "reference", float64)
run on each sequence separately, with the contract's tolerances (docs/design.md section 2); the
kernels' packed forward must also equal their own dense forward of each sequence bitwise (same tiles,
same arithmetic). Cases include empty and length-1 sequences, a sequence with queries but no keys,
very unequal lengths, grouped-query attention, causal (bottom-right per sequence), per-head scales and
strided inputs. Values planted in one sequence never reach another; batches beyond the grid's y limit
are split into launches with identical results; deterministic mode is bitwise repeatable; faults
planted in the kernels' sequence prologue (cuda_src/params.cuh) are caught.
"""
from __future__ import annotations

import numpy as np
import pytest

import cupy_cosattn as ca
from cupy_cosattn import emulator, problem, reference, tolerances, varlen
from cupy_cosattn.launch import devices, limits, tiles

from kernel_cases import DTYPES, rel_err
from planting import plant

# Lengths that exercise the edges: a sequence with keys but no queries, one of length 1, one with
# queries but no keys, Nq < Nk and Nq > Nk, and one longer than two query tiles.
LENS_Q = [0, 1, 77, 5, 3, 130]
LENS_K = [3, 1, 77, 40, 0, 70]


def cu(lens) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def make(seed, lens_q=LENS_Q, lens_k=LENS_K, *, H=4, Hk=2, D=32, dtype="float16", per_head_scale=True,
         scale=8.0, causal=True, groups=1):
    """(q, k, v, cu_q, cu_k, kw, dout) of a random packed batch."""
    rng = np.random.default_rng(seed)
    dt = DTYPES[dtype]
    tq, tk = int(sum(lens_q)), int(sum(lens_k))
    q = rng.standard_normal((tq, H, D)).astype(dt)
    k = rng.standard_normal((tk, Hk, D)).astype(dt)
    v = rng.standard_normal((tk, Hk, D)).astype(dt)
    kw = dict(causal=causal, groups=groups,
              scale=rng.uniform(0.5 * scale, 1.5 * scale, size=(H,)) if per_head_scale else scale)
    return q, k, v, cu(lens_q), cu(lens_k), kw, rng.standard_normal(q.shape).astype(dt)


def dense_per_sequence(q, k, v, cu_q, cu_k, kw, dout):
    """{out, lse, dq, dk, dv, dscale, dscale_T} in float64 from the dense reference API run on each
    sequence; dscale_T = sum |dS_ij <qhat_i, khat_j>| per head, the scale of dscale's error."""
    f = np.float64
    H = q.shape[1]
    res = dict(out=np.zeros(q.shape), lse=np.full(q.shape[:2], -np.inf), dq=np.zeros(q.shape),
               dk=np.zeros(k.shape), dv=np.zeros(v.shape), dscale=np.zeros(H), dscale_T=np.zeros(H))
    kw = dict(kw, scale=np.asarray(kw["scale"], dtype=f) * np.ones(H))
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.stop == qs.start:
            continue
        qb = q[qs].astype(f).transpose(1, 0, 2)[None]
        kb, vb = (x[ks].astype(f).transpose(1, 0, 2)[None] for x in (k, v))
        dob = dout[qs].astype(f).transpose(1, 0, 2)[None]
        out, lse = ca.forward(qb, kb, vb, backend="reference", **kw)
        dq, dk, dv, _, ds = ca.backward(dob, qb, kb, vb, out, lse, backend="reference", **kw)
        res["out"][qs], res["lse"][qs], res["dq"][qs] = out[0].transpose(1, 0, 2), lse[0].T, dq[0].transpose(1, 0, 2)
        res["dk"][ks], res["dv"][ks] = dk[0].transpose(1, 0, 2), dv[0].transpose(1, 0, 2)
        res["dscale"] += ds
        if ks.stop > ks.start:
            prob, inp = problem.canonicalize(qb, kb, vb, **kw)
            c = reference._compute(prob, inp)
            ds_full = c["p"] * (dob @ np.swapaxes(c["v_x"], -1, -2) - np.sum(dob * c["o"], -1, keepdims=True))
            res["dscale_T"] += np.sum(np.abs(ds_full * c["cos"]), axis=(0, 2, 3))
    return res


def varlen_run(q, k, v, cu_q, cu_k, kw, dout, backend="emulator", deterministic=False):
    """{out, lse, dq, dk, dv, dscale} of the packed API on `backend` (float64 NumPy)."""
    out, lse = ca.varlen_forward(q, k, v, cu_q, cu_k, backend=backend, **kw)
    dq, dk, dv, ds = ca.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, backend=backend,
                                        deterministic=deterministic, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:2] and lse.dtype == np.float32
    for g, x in ((dq, q), (dk, k), (dv, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
    f = np.float64
    return dict(out=np.asarray(out, f), lse=np.asarray(lse, f), dq=np.asarray(dq, f), dk=np.asarray(dk, f),
                dv=np.asarray(dv, f), dscale=np.asarray(ds, f), raw=(out, lse, dq, dk, dv, ds))


def assert_matches(got, ref, dtype, cu_k=None):
    """The contract's accuracy of every result against the per-sequence dense reference."""
    errs = {"out": rel_err(got["out"], ref["out"])}
    fin = np.isfinite(ref["lse"])
    assert np.array_equal(np.isfinite(got["lse"]), fin), "rows without keys: lse -inf exactly there"
    errs["lse"] = float(np.abs(got["lse"][fin] - ref["lse"][fin]).max(initial=0.0))
    for name in ("dq", "dk", "dv"):
        assert np.isfinite(got[name]).all(), f"NaN/Inf in {name}"
        errs[name] = rel_err(got[name], ref[name])
    errs["dscale"] = float(np.linalg.norm(got["dscale"] - ref["dscale"]) / max(np.linalg.norm(ref["dscale_T"]), 1e-30))
    tol = dict(out=tolerances.OUT[dtype], lse=tolerances.ROUNDING[dtype] * 8,
               dq=tolerances.GRAD[dtype], dk=tolerances.GRAD[dtype], dv=tolerances.GRAD[dtype],
               dscale=tolerances.GRAD[dtype])
    bad = {n: e for n, e in errs.items() if e > tol[n]}
    assert not bad, f"errors above tolerance: {bad} (tolerances {tol})"
    # rows that see no key: exactly 0, and no gradient through them
    empty = ~fin
    assert np.all(got["out"][empty] == 0) and np.all(got["dq"][np.any(empty, axis=1)] == 0)


# ---------------------------------------------------------------------------------------------------
# Packed == dense per sequence.

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_equals_dense_per_sequence(dtype, causal):
    """Forward and every gradient (dq, dk, dv, per-head dscale), fast and deterministic mode, GQA 2:1,
    empty / length-1 / key-less / very unequal sequences, causal bottom-right per sequence."""
    case = make(3 + causal, dtype=dtype, causal=causal)
    ref = dense_per_sequence(*case)
    for det in (False, True):
        assert_matches(varlen_run(*case, deterministic=det), ref, dtype)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_forward_is_the_dense_kernel_bitwise(dtype):
    """The packed forward's out and lse equal the dense kernel's on each sequence bit for bit: the same
    tiles and arithmetic, only the pointers and lengths come from cu_seqlens."""
    q, k, v, cu_q, cu_k, kw, _ = make(8, dtype=dtype)
    out, lse = ca.varlen_forward(q, k, v, cu_q, cu_k, backend="emulator", **kw)
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.stop == qs.start or ks.stop == ks.start:
            continue
        dense = (np.ascontiguousarray(x[s].transpose(1, 0, 2)[None]) for x, s in ((q, qs), (k, ks), (v, ks)))
        ob, lb = ca.forward(*dense, backend="emulator", **kw)
        assert np.array_equal(out[qs].view(np.uint8), np.ascontiguousarray(ob[0].transpose(1, 0, 2)).view(np.uint8))
        assert np.array_equal(lse[qs], lb[0].T, equal_nan=True)


def test_reference_backend_equals_dense_per_sequence():
    """backend="reference" (float64 input: no rounding) is the dense reference of every sequence."""
    q, k, v, cu_q, cu_k, kw, dout = make(11, dtype="float32")
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    got = varlen_run(q, k, v, cu_q, cu_k, kw, dout, backend="reference")
    ref = dense_per_sequence(q, k, v, cu_q, cu_k, kw, dout)
    for name in ("out", "dq", "dk", "dv", "dscale"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-12, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(got["lse"], ref["lse"].astype(np.float32), rtol=1e-7)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_deterministic_is_bitwise_repeatable(dtype):
    """deterministic=True under two emulator interleavings (thread and block order): equal bits."""
    case = make(5, dtype=dtype)
    runs = []
    for seed in (1, 4321):
        with emulator.interleave(seed):
            runs.append(varlen_run(*case, deterministic=True)["raw"])
    for a, b in zip(*runs):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Boundaries, layouts, launches.

@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nan_in_one_sequence_never_leaks_across_a_boundary(dtype):
    """NaN in q, k and v rows of sequence 2 (non-causal: it poisons all of that sequence's rows) leaves
    every other sequence's out, lse and gradients bitwise as in the clean run; sequence 2 is NaN."""
    q, k, v, cu_q, cu_k, kw, dout = make(6, dtype=dtype, causal=False)
    clean = varlen_run(q, k, v, cu_q, cu_k, kw, dout, deterministic=True)
    b = 2
    qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
    qn, kn, vn = q.copy(), k.copy(), v.copy()
    qn[qs.start + 3, 1, 5] = np.nan
    kn[ks.start, 0, 0] = np.nan
    vn[ks.stop - 1, 1, 7] = np.nan
    dirty = varlen_run(qn, kn, vn, cu_q, cu_k, kw, dout, deterministic=True)
    q_other = np.ones(q.shape[0], bool)
    q_other[qs] = False
    k_other = np.ones(k.shape[0], bool)
    k_other[ks] = False
    for name, rows in (("out", q_other), ("lse", q_other), ("dq", q_other), ("dk", k_other), ("dv", k_other)):
        assert np.array_equal(dirty[name][rows], clean[name][rows]), f"{name} changed outside sequence {b}"
    assert np.isnan(dirty["out"][qs]).all() and np.isnan(dirty["lse"][qs]).all()


def test_strided_inputs():
    """q, k, v as slices of one projection buffer (row strides other than heads x D, and padding
    between rows that holds NaN): the same bits as contiguous inputs."""
    q, k, v, cu_q, cu_k, kw, dout = make(7, lens_q=[9, 40, 2], lens_k=[9, 40, 2], H=2, Hk=2, D=24)
    buf = np.full((q.shape[0], 4, 2, 24), np.nan, dtype=q.dtype)  # (rows, q | k | v | unused, heads, D)
    buf[:, 0], buf[:, 1], buf[:, 2] = q, k, v
    qs, ks, vs = buf[:, 0], buf[:, 1], buf[:, 2]
    assert not qs.flags.c_contiguous
    a = varlen_run(q, k, v, cu_q, cu_k, kw, dout, deterministic=True)
    b = varlen_run(qs, ks, vs, cu_q, cu_k, kw, dout, deterministic=True)
    for name in ("out", "lse", "dq", "dk", "dv", "dscale"):
        assert np.array_equal(a[name], b[name]), name


def test_batches_beyond_the_grid_limit_split_into_launches(monkeypatch):
    """With the grid's y limit lowered below sequences x heads, the launch layer splits the batch
    (cu_seqlens and the backward's per-sequence buffers advanced per launch): identical bits."""
    case = make(9, H=2, Hk=1, dtype="bfloat16")
    whole = varlen_run(*case, deterministic=True)["raw"]
    monkeypatch.setattr(limits, "GRID_YZ_LIMIT", 5)  # 2 sequences x 2 heads per launch
    split = varlen_run(*case, deterministic=True)["raw"]
    for a, b in zip(whole, split):
        assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_query_head_splits(monkeypatch):
    """GQA 3:1 with the query heads of a kv head split over 3 bwd_dkdv blocks (the partial dK, dV of a
    packed batch summed by the launch layer), both backward modes."""
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 10**9)
    case = make(13, H=6, Hk=2, dtype="bfloat16")
    prob, _ = varlen.canonicalize_varlen(*case[:5], **case[5])
    assert tiles.choose_nsplit(prob, 1) == 3
    ref = dense_per_sequence(*case)
    for det in (False, True):
        assert_matches(varlen_run(*case, deterministic=det), ref, "bfloat16")


def test_query_heads_without_a_split(monkeypatch):
    """GQA 3:1 with one bwd_dkdv block per kv head (no query-head split, so a kv head's work items are
    not the query heads'): each block must find its sequence by kv heads x splits, both modes."""
    monkeypatch.setattr(tiles, "TARGET_BLOCKS", 1)
    case = make(14, H=6, Hk=2, dtype="float16")
    prob, _ = varlen.canonicalize_varlen(*case[:5], **case[5])
    assert tiles.choose_nsplit(prob, 1) == 1
    ref = dense_per_sequence(*case)
    for det in (False, True):
        assert_matches(varlen_run(*case, deterministic=det), ref, "float16")


def test_empty_batches():
    """No query rows, no keys at all, and no sequences: nothing is launched, the shapes are right."""
    H, D = 2, 16
    for lens_q, lens_k in (([0, 0], [4, 2]), ([3, 1], [0, 0]), ([], [])):
        q, k, v, cu_q, cu_k, kw, dout = make(1, lens_q, lens_k, H=H, Hk=H, D=D)
        got = varlen_run(q, k, v, cu_q, cu_k, kw, dout)
        assert got["out"].shape == (sum(lens_q), H, D) and np.all(got["out"] == 0)
        assert np.all(got["lse"] == -np.inf)
        assert not np.any(got["dk"]) and not np.any(got["dv"]) and not np.any(got["dscale"])


def test_max_seqlen_upper_bounds_are_accepted():
    case = make(2, dtype="float32")
    q, k, v, cu_q, cu_k, kw, _ = case
    a = ca.varlen_forward(q, k, v, cu_q, cu_k, backend="emulator", **kw)
    b = ca.varlen_forward(q, k, v, cu_q, cu_k, max_seqlen_q=130, max_seqlen_k=500, backend="emulator", **kw)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


# ---------------------------------------------------------------------------------------------------
# Argument checks: each raises naming the argument, before anything is launched.

def _bad_cases():
    q, k, v, cu_q, cu_k, kw, dout = make(0, lens_q=[3, 5], lens_k=[4, 6], H=2, Hk=1, D=16)
    base = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return base, [
        ("cu_int64", dict(cu_seqlens_q=cu_q.astype(np.int64)), TypeError, "cu_seqlens_q must have dtype int32"),
        ("cu_list", dict(cu_seqlens_k=[0, 4, 10]), TypeError, "cu_seqlens_k must be an int32 array"),
        ("cu_2d", dict(cu_seqlens_q=cu_q[None]), ValueError, "cu_seqlens_q must have shape (batch + 1,)"),
        ("cu_start", dict(cu_seqlens_q=np.array([1, 3, 8], np.int32)), ValueError, "cu_seqlens_q must start at 0"),
        ("cu_decreasing", dict(cu_seqlens_k=np.array([0, 7, 4, 10], np.int32),
                               cu_seqlens_q=np.array([0, 3, 3, 8], np.int32)), ValueError,
         "cu_seqlens_k must be non-decreasing"),
        ("cu_last", dict(cu_seqlens_q=np.array([0, 3, 7], np.int32)), ValueError, "cu_seqlens_q[-1] must equal"),
        ("batch_mismatch", dict(cu_seqlens_k=np.array([0, 10], np.int32)), ValueError,
         "cu_seqlens_q and cu_seqlens_k must describe the same batch"),
        ("max_seqlen_small", dict(max_seqlen_q=4), ValueError, "max_seqlen_q = 4 is smaller"),
        ("max_seqlen_type", dict(max_seqlen_k=6.0), TypeError, "max_seqlen_k must be an int"),
        ("q_4d", dict(q=q[None]), ValueError, "q must be 3-D"),
        ("kv_shapes", dict(v=v[:, :, :8]), ValueError, "k and v must have the same shape"),
        ("heads", dict(q=np.concatenate([q, q[:, :1]], axis=1), k=np.concatenate([k, k], axis=1),
                       v=np.concatenate([v, v], axis=1)), ValueError, "kv heads must divide"),
        ("head_dim", dict(k=k[..., :8], v=v[..., :8]), ValueError, "share the head dim"),
        ("dtype_mix", dict(v=v.astype(np.float32)), TypeError, "must share one dtype"),
        ("scale", dict(scale=-1.0), ValueError, "scale must be finite and > 0"),
        ("groups", dict(groups=3), ValueError, "groups must be a positive int dividing"),
        ("causal", dict(causal=1), TypeError, "causal must be a bool"),
    ]


@pytest.mark.parametrize("name", [c[0] for c in _bad_cases()[1]])
def test_bad_arguments_raise_before_launch(name, monkeypatch):
    base, cases = _bad_cases()
    _, change, exc, msg = next(c for c in cases if c[0] == name)

    def no_launch(*a, **k):
        raise AssertionError("launched despite a bad argument")

    monkeypatch.setattr(devices.EmulatedDevice, "launch", no_launch)
    args = dict(base, **change)
    pos = [args.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")]
    with pytest.raises(exc, match=None) as ei:
        ca.varlen_forward(*pos, backend="emulator", **args)
    assert msg in str(ei.value), str(ei.value)


def test_backward_extras_are_checked(monkeypatch):
    q, k, v, cu_q, cu_k, kw, dout = make(0, lens_q=[3, 5], lens_k=[4, 6], H=2, Hk=1, D=16)
    out, lse = ca.varlen_forward(q, k, v, cu_q, cu_k, backend="reference", **kw)
    def no_launch(*a, **k):
        raise AssertionError("launched despite a bad argument")

    monkeypatch.setattr(devices.EmulatedDevice, "launch", no_launch)
    for bad, exc, msg in ((dict(lse=lse[None]), ValueError, "lse must have shape (8, 2)"),
                          (dict(dout=dout.astype(np.float32)), TypeError, "dout must have dtype float16"),
                          (dict(out=out[:4]), ValueError, "out must have shape (8, 2, 16)")):
        a = dict(dict(dout=dout, out=out, lse=lse), **bad)
        with pytest.raises(exc) as ei:
            ca.varlen_backward(a["dout"], q, k, v, a["out"], a["lse"], cu_q, cu_k, backend="emulator", **kw)
        assert msg in str(ei.value), str(ei.value)


# ---------------------------------------------------------------------------------------------------
# Planted faults in the sequence prologue (cuda_src/params.cuh SeqView) are caught.

PROLOGUE_FAULTS = {
    # query rows read from the key sequence's first row
    "q_base_from_k": ("forward.cu", "p.q = rows_at(p.q, s.q_base, p.q_sn, e);",
                      "p.q = rows_at(p.q, s.k_base, p.q_sn, e);"),
    # the key count of a sequence taken from its query count
    "nk_from_nq": ("forward.cu", "p.Nk = s.nk;", "p.Nk = s.nq;"),
    # the causal diagonal and the row bound from the key count
    "nq_from_nk": ("forward.cu", "p.Nq = s.nq;", "p.Nq = s.nk;"),
    # sequence b's offsets read one entry late (the previous sequence's lengths are still right)
    "bounds_shifted": ("forward.cu", "const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];",
                       "const int q0 = p.cu_seqlens_q[b] + 1, k0 = p.cu_seqlens_k[b];"),
    # the backward's dk rows placed at the query sequence's start
    "dk_base_from_q": ("backward.cu", "p.dk = rows_at(p.dk, s.k_base, p.dkv_sn, p.dk_f32 ? 4 : (int)sizeof(T));",
                       "p.dk = rows_at(p.dk, s.q_base, p.dkv_sn, p.dk_f32 ? 4 : (int)sizeof(T));"),
    # lse written at the key sequence's rows
    "lse_base_from_k": ("forward.cu", "p.lse = rows_at(p.lse, s.q_base, 1, 4);",
                        "p.lse = rows_at(p.lse, s.k_base, 1, 4);"),
    # bwd_dkdv's sequence taken from blockIdx.y as if its work items were per query head
    "dkdv_sequence_index": ("backward.cu", "(int)(blockIdx.y / ((int64_t)params.nsplit * params.Hk))",
                            "(int)(blockIdx.y / ((int64_t)params.nsplit * params.H))"),
    # dout read at the key sequence's rows
    "dout_base_from_k": ("backward.cu", "p.dout = rows_at(p.dout, s.q_base, p.do_sn, (int)sizeof(T));",
                         "p.dout = rows_at(p.dout, s.k_base, p.do_sn, (int)sizeof(T));"),
}


@pytest.mark.parametrize("fault", sorted(PROLOGUE_FAULTS))
def test_planted_prologue_faults_are_caught(fault, monkeypatch):
    """Each fault in SeqView makes the packed results wrong (or trips the emulator's bounds checks)."""
    source, old, new = PROLOGUE_FAULTS[fault]
    case = make(12, dtype="float16")
    ref = dense_per_sequence(*case)
    plant(monkeypatch, source, old, new)
    with pytest.raises((AssertionError, RuntimeError, IndexError, MemoryError, ValueError)):
        assert_matches(varlen_run(*case), ref, "float16")


# ---------------------------------------------------------------------------------------------------
# Exhaustive grid (slow) and the GPU twin.

@pytest.mark.slow
@pytest.mark.parametrize("D", [16, 64, 96, 128, 256])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_grid(dtype, D):
    """Head dims x dtypes x {causal, groups 2, scalar scale, MQA 4:1, a large scale (running max)}."""
    lens_q, lens_k = [1, 64, 65, 0, 129, 7], [1, 64, 200, 5, 100, 7]
    for i, extra in enumerate((dict(causal=True), dict(causal=False, groups=2), dict(per_head_scale=False),
                               dict(H=4, Hk=1), dict(scale=30.0, causal=True))):
        opts = dict(H=2, Hk=2, D=D, dtype=dtype) | extra
        case = make(100 * D + i, lens_q, lens_k, **opts)
        ref = dense_per_sequence(*case)
        assert_matches(varlen_run(*case, deterministic=bool(i % 2)), ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_varlen_equals_dense_per_sequence_gpu(dtype):
    import cupy

    case = make(3, dtype=dtype, causal=True)
    ref = dense_per_sequence(*case)
    q, k, v, cu_q, cu_k, kw, dout = case
    dev = [cupy.asarray(x) for x in (q, k, v, cu_q, cu_k)]
    for det in (False, True):
        out, lse = ca.varlen_forward(*dev, backend="cuda", **kw)
        dq, dk, dv, ds = ca.varlen_backward(cupy.asarray(dout), dev[0], dev[1], dev[2], out, lse, dev[3], dev[4],
                                            backend="cuda", deterministic=det, **kw)
        f = np.float64
        got = dict(out=cupy.asnumpy(out).astype(f), lse=cupy.asnumpy(lse).astype(f), dq=cupy.asnumpy(dq).astype(f),
                   dk=cupy.asnumpy(dk).astype(f), dv=cupy.asnumpy(dv).astype(f), dscale=np.asarray(ds, f))
        assert_matches(got, ref, dtype)
