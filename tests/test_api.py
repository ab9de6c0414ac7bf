"""The public NumPy API end to end (backend "reference" and "auto"): every user layout in float32,
float16 and bfloat16, checking output/gradient shapes and dtypes, lse (float32, q.shape[:-1]), dbias
(attn_bias's shape and dtype, None without a bias), dscale (a float for a scalar scale, an array of
shape (H,) for per-head scales), and accuracy against the float64 reference on the same (rounded)
inputs within docs/design.md's tolerances."""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import cupy_cosattn as ca
from cupy_cosattn import problem, reference, tolerances

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def rel_err(x, ref):
    x, ref = np.asarray(x, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert x.shape == ref.shape
    n = np.linalg.norm(ref)
    return np.linalg.norm(x - ref) / n if n > 0 else np.linalg.norm(x)


def user_case(rng, layout, bias_kind, dtype, *, B=2, H=4, Nq=9, Nk=12, D=32):
    """(q, k, v, kwargs) in one of the user layouts, arrays in `dtype`."""
    if layout == "merged":
        qs, ks = (B * H, Nq, D), (B * H, Nk, D)
        Bm, Hm = B * H, 1
    elif layout == "mqa3d":
        qs, ks = (B, H, Nq, D), (B, Nk, D)
        Bm, Hm = B, H
    elif layout == "gqa":
        qs, ks = (B, H, Nq, D), (B, 2, Nk, D)
        Bm, Hm = B, H
    else:
        qs, ks = (B, H, Nq, D), (B, H, Nk, D)
        Bm, Hm = B, H
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in (qs, ks, ks))
    kw = dict(mask=rng.random((Bm, Nk)) < 0.8, causal=True)
    kw["mask"][:, -1] = True
    bias_dtype = np.float32 if bias_kind.endswith("f32") else dtype
    if bias_kind.startswith("head"):
        kw["attn_bias"] = rng.standard_normal((Hm, Nq, Nk) if layout != "merged" else (Bm, Nq, Nk)).astype(bias_dtype)
    elif bias_kind.startswith("batch"):
        kw["attn_bias"] = rng.standard_normal((Bm, Nq, Nk)).astype(bias_dtype)
        kw["attn_bias_batch_dim"] = True
    elif bias_kind.startswith("full"):
        shape = (Bm, Hm, Nq, Nk) if layout != "merged" else (Bm, Nq, Nk)
        kw["attn_bias"] = rng.standard_normal(shape).astype(bias_dtype)
    return q, k, v, kw


def float64_reference(q, k, v, dout, kw):
    """(out, lse, dq, dk, dv, dbias, dscale (H,)) from the reference in float64 on these exact values."""
    prob, inp = problem.canonicalize(q, k, v, **kw)
    f64 = lambda x: np.asarray(x).astype(np.float64)  # noqa: E731
    inp.q, inp.k, inp.v = f64(inp.q), f64(inp.k), f64(inp.v)
    if inp.bias is not None:
        inp.bias = f64(inp.bias)
    prob = dataclasses.replace(prob, dtype=np.dtype(np.float64))
    out, lse = reference.forward64(prob, inp)
    grads = reference.backward64(prob, inp, f64(dout).reshape(out.shape))
    return (out, lse) + grads


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["mha", "gqa", "mqa3d", "merged"])
@pytest.mark.parametrize("bias_kind,per_head", [("none", False), ("head", True), ("batch_f32", False),
                                                ("full", True), ("full_f32", False)])
def test_public_api_end_to_end(dtype, layout, bias_kind, per_head):
    rng = np.random.default_rng(7)
    q, k, v, kw = user_case(rng, layout, bias_kind, dtype)
    H = 1 if layout == "merged" else q.shape[1]
    if per_head:
        kw["scale"] = rng.uniform(4.0, 10.0, size=H).astype(np.float32)
    kw["groups"] = 2
    out, lse = ca.forward(q, k, v, backend="reference", **kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == np.float32
    assert np.all(np.isfinite(out.astype(np.float32))) and not np.any(np.isnan(lse))

    dout = rng.standard_normal(q.shape).astype(dtype)
    dq, dk, dv, dbias, dscale = ca.backward(dout, q, k, v, out, lse, backend="reference", **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == q.dtype
    if "attn_bias" in kw:
        assert dbias.shape == kw["attn_bias"].shape and dbias.dtype == kw["attn_bias"].dtype
    else:
        assert dbias is None
    if per_head:
        assert isinstance(dscale, np.ndarray) and dscale.shape == (H,) and dscale.dtype == np.float32
    else:
        assert isinstance(dscale, float)

    want = float64_reference(q, k, v, dout, kw)
    name = problem.DTYPE_NAMES[np.dtype(dtype)]
    tol_out, tol_grad = tolerances.OUT[name], tolerances.GRAD[name]
    assert rel_err(out, want[0].reshape(q.shape)) <= tol_out
    lse_ref = want[1].reshape(lse.shape)
    assert np.array_equal(np.isneginf(lse), np.isneginf(lse_ref))
    fin = np.isfinite(lse_ref)
    np.testing.assert_allclose(lse[fin], lse_ref[fin], rtol=1e-6, atol=1e-6)
    for x, r in ((dq, want[2]), (dk, want[3]), (dv, want[4])):
        assert np.all(np.isfinite(x.astype(np.float32)))
        assert rel_err(x, r.reshape(x.shape)) <= tol_grad
    if dbias is not None:
        assert rel_err(dbias, want[5].reshape(dbias.shape)) <= tol_grad
    ds_ref = want[6] if per_head else want[6].sum()
    assert rel_err(dscale, ds_ref) <= 1e-5  # dscale comes back in float64 (then the scale's dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float16", "bfloat16"])
def test_auto_backend_is_reference_for_numpy(dtype):
    rng = np.random.default_rng(8)
    q, k, v, kw = user_case(rng, "gqa", "full", dtype)
    a_out, a_lse = ca.forward(q, k, v, **kw)
    r_out, r_lse = ca.forward(q, k, v, backend="reference", **kw)
    np.testing.assert_array_equal(a_out.view(np.uint8), r_out.view(np.uint8))
    np.testing.assert_array_equal(a_lse, r_lse)
    c_out = ca.cosine_sim_attention(q, k, v, **kw)
    np.testing.assert_array_equal(c_out.view(np.uint8), r_out.view(np.uint8))
    dout = rng.standard_normal(q.shape).astype(dtype)
    ga = ca.backward(dout, q, k, v, a_out, a_lse, **kw)
    gr = ca.backward(dout, q, k, v, r_out, r_lse, backend="reference", deterministic=True, **kw)
    for x, y in zip(ga[:4], gr[:4]):
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))
    assert ga[4] == gr[4]


def test_defaults_scale_8_and_no_causal():
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((1, 2, 4, 16)).astype(np.float32) for _ in range(3))
    out = ca.cosine_sim_attention(q, k, v)
    explicit = ca.cosine_sim_attention(q, k, v, scale=8.0, causal=False, l2norm_qk=True, groups=1)
    np.testing.assert_array_equal(out, explicit)
    # by hand, float64: softmax(8 * cos) v
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
    s = 8.0 * qn.astype(np.float64) @ np.swapaxes(kn, -1, -2).astype(np.float64)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert rel_err(out, p @ v.astype(np.float64)) <= 1e-5


@pytest.mark.parametrize("scale,expect", [(np.array(3.0), float), (np.float32(3.0), float), (3, float),
                                          (np.array([3.0, 4.0], dtype=np.float16), np.float16),
                                          (np.array([3, 4]), np.float64),
                                          (np.array([3.0, 4.0], dtype=ml_dtypes.bfloat16), BF16)])
def test_dscale_form_follows_scale(scale, expect):
    rng = np.random.default_rng(10)
    q, k, v = (rng.standard_normal((2, 2, 3, 8)).astype(np.float32) for _ in range(3))
    out, lse = ca.forward(q, k, v, scale=scale)
    dscale = ca.backward(np.ones_like(q), q, k, v, out, lse, scale=scale)[4]
    if expect is float:
        assert isinstance(dscale, float)
    else:
        assert isinstance(dscale, np.ndarray) and dscale.shape == (2,) and dscale.dtype == np.dtype(expect)


def test_scalar_dscale_is_the_sum_of_per_head_dscale():
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 3, 5, 16)).astype(np.float32) for _ in range(3))
    out, lse = ca.forward(q, k, v, scale=5.0)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    ds = ca.backward(dout, q, k, v, out, lse, scale=5.0)[4]
    ds_h = ca.backward(dout, q, k, v, out, lse, scale=np.full(3, 5.0))[4]
    assert ds == pytest.approx(float(ds_h.sum()), rel=1e-12)


def test_numpy_bool_flags_and_3d_scale_merged():
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((6, 4, 8)).astype(np.float16) for _ in range(3))
    out, lse = ca.forward(q, k, v, causal=np.bool_(True), l2norm_qk=np.bool_(True), scale=np.array([6.0]))
    assert out.shape == (6, 4, 8) and lse.shape == (6, 4)
    g = ca.backward(np.ones_like(q), q, k, v, out, lse, causal=np.bool_(True), scale=np.array([6.0]))
    assert g[4].shape == (1,)


@pytest.mark.parametrize("backend,dtype", [("reference", np.float32), ("emulator", np.float32),
                                           ("emulator", ml_dtypes.bfloat16)])
def test_noncontiguous_inputs(backend, dtype):
    """Strided views (transposed heads, a reversed bias, a column slice of v) give bit-identical
    results to their contiguous copies: the kernels' launch layer copies them to contiguous rows."""
    rng = np.random.default_rng(13)
    base = rng.standard_normal((2, 5, 3, 16)).astype(dtype)
    q = base.transpose(0, 2, 1, 3)  # (B, H, N, D) view of a (B, N, H, D) array
    k = rng.standard_normal((2, 5, 3, 16)).astype(dtype).transpose(0, 2, 1, 3)
    v = rng.standard_normal((2, 3, 5, 32)).astype(dtype)[..., 3:19]
    bias = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)[:, :, ::-1]
    dout = rng.standard_normal((2, 3, 5, 24)).astype(dtype)[..., ::-1][..., :16]
    assert not any(x.flags.c_contiguous for x in (q, k, v, bias, dout))
    out, lse = ca.forward(q, k, v, attn_bias=bias, backend=backend)
    c = [np.ascontiguousarray(x) for x in (q, k, v)]
    out_c, lse_c = ca.forward(*c, attn_bias=np.ascontiguousarray(bias), backend=backend)
    np.testing.assert_array_equal(out.view(np.uint8), out_c.view(np.uint8))
    np.testing.assert_array_equal(lse, lse_c)
    g = ca.backward(dout, q, k, v, out, lse, attn_bias=bias, deterministic=True, backend=backend)
    g_c = ca.backward(np.ascontiguousarray(dout), *c, out_c, lse_c, attn_bias=np.ascontiguousarray(bias),
                      deterministic=True, backend=backend)
    assert g[0].shape == q.shape and g[3].shape == bias.shape
    for a, b in zip(g[:4], g_c[:4]):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    assert g[4] == g_c[4]


def test_bfloat16_large_scale_no_nan():
    rng = np.random.default_rng(14)
    q, k, v = (rng.standard_normal((1, 2, 16, 32)).astype(ml_dtypes.bfloat16) for _ in range(3))
    bias = (100 * rng.standard_normal((2, 16, 16))).astype(ml_dtypes.bfloat16)
    out, lse = ca.forward(q, k, v, scale=64.0, attn_bias=bias, causal=True)
    g = ca.backward(out, q, k, v, out, lse, scale=64.0, attn_bias=bias, causal=True)
    for x in (out, lse) + g[:4]:
        assert np.all(np.isfinite(np.asarray(x, dtype=np.float32)))


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("layout,bias_kind", [("mha", "full"), ("gqa", "head_f32"), ("mqa3d", "batch"),
                                              ("merged", "none")])
def test_float64_numpy_input_on_the_reference(backend, layout, bias_kind):
    """np.random gives float64: "reference" (and "auto" on NumPy) take it and return float64 out and
    gradients (lse stays float32; dbias has the bias's dtype), the reference's float64 results unrounded."""
    rng = np.random.default_rng(11)
    q, k, v, kw = user_case(rng, layout, bias_kind, np.float64)
    scale = np.array([3.0, 5.0, 7.0, 9.0]) if layout != "merged" else 8.0
    out, lse = ca.forward(q, k, v, scale=scale, backend=backend, **kw)
    assert out.dtype == np.float64 and out.shape == q.shape and lse.dtype == np.float32
    dout = rng.standard_normal(q.shape)
    dq, dk, dv, dbias, dscale = ca.backward(dout, q, k, v, out, lse, scale=scale, backend=backend, **kw)
    assert dq.dtype == dk.dtype == dv.dtype == np.float64
    bias = kw.get("attn_bias")
    assert dbias is None if bias is None else dbias.dtype == bias.dtype
    want = float64_reference(q, k, v, dout, dict(kw, scale=scale))
    np.testing.assert_array_equal(out, want[0].reshape(q.shape))
    for x, r in ((dq, want[2]), (dk, want[3]), (dv, want[4])):
        np.testing.assert_array_equal(x, r.reshape(x.shape))
    # and float64 carries more than float32 input does: the float32 run differs from it
    out32 = ca.forward(*(x.astype(np.float32) for x in (q, k, v)), scale=scale, backend=backend,
                       **{n: (a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a)
                          for n, a in kw.items()})[0]
    assert 0 < rel_err(out32, out) <= tolerances.OUT["float32"]
