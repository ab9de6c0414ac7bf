"""Bad input: one test per mistake, each asserting the exception type and that the message names the
argument (docs/design.md section 2). A fixture makes any backend call fail, so every error is also shown to
be raised before anything is launched. Plus the empty-length semantics (Nq = 0, Nk = 0)."""
from __future__ import annotations

import re

import ml_dtypes
import numpy as np
import pytest
import torch

import cupy_cosattn as ca
from cupy_cosattn import api

B, H, NQ, NK, D = 2, 4, 5, 7, 16


@pytest.fixture(autouse=True)
def no_launch(monkeypatch):
    """Bad input must be rejected before a backend is even looked up."""
    real = api.backend_impl
    calls = []

    def guarded(name):
        calls.append(name)
        return real(name)

    monkeypatch.setattr(api, "backend_impl", guarded)
    yield calls


def arr(*shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def qkv(dtype=np.float32):
    return arr(B, H, NQ, D, dtype=dtype), arr(B, H, NK, D, dtype=dtype, seed=1), arr(B, H, NK, D, dtype=dtype, seed=2)


def check(exc, match, **kwargs):
    """ca.forward on good q, k, v with `kwargs` overriding arrays/keywords must raise exc naming `match`."""
    q, k, v = qkv()
    args = dict(q=kwargs.pop("q", q), k=kwargs.pop("k", k), v=kwargs.pop("v", v))
    with pytest.raises(exc, match=match) as info:
        ca.forward(args["q"], args["k"], args["v"], **kwargs)
    return str(info.value)


@pytest.fixture
def nothing_launched(no_launch):
    yield
    assert no_launch == [], f"a backend was called on bad input: {no_launch}"


pytestmark = pytest.mark.usefixtures("nothing_launched")


# ---- ranks -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("shape", [(NQ, D), (1, B, H, NQ, D)])
def test_wrong_rank(name, shape):
    msg = check(ValueError, rf"^{name} must be 3-D or 4-D", **{name: arr(*shape)})
    assert str(shape) in msg


# ---- q, k, v disagreeing -----------------------------------------------------------------------------

def test_batch_mismatch():
    msg = check(ValueError, r"k has batch size 3 but q has 2", k=arr(3, H, NK, D), v=arr(3, H, NK, D))
    assert "(3, 4, 7, 16)" in msg


def test_batch_mismatch_merged():
    check(ValueError, r"k has 5 batch-heads but q has 8", q=arr(B * H, NQ, D), k=arr(5, NK, D), v=arr(5, NK, D))


def test_batch_mismatch_mqa_3d_kv():
    check(ValueError, r"k has batch size 3", k=arr(3, NK, D), v=arr(3, NK, D))


def test_merged_q_with_4d_kv():
    check(ValueError, r"k must be 3-D", q=arr(B * H, NQ, D))


def test_head_dim_mismatch():
    check(ValueError, r"q and k must share the head dim D, got q: 16, k: 8", k=arr(B, H, NK, 8), v=arr(B, H, NK, 8))


def test_key_length_mismatch_k_vs_v():
    check(ValueError, r"k and v must have the same shape.*\(2, 4, 7, 16\).*\(2, 4, 6, 16\)", v=arr(B, H, NK - 1, D))


def test_v_head_dim_mismatch():
    check(ValueError, r"k and v must have the same shape", v=arr(B, H, NK, 8))


def test_heads_not_divisible_by_kv_heads():
    check(ValueError, r"H=4 heads, which k's Hk=3", k=arr(B, 3, NK, D), v=arr(B, 3, NK, D))


def test_zero_kv_heads():
    check(ValueError, r"Hk=0", k=arr(B, 0, NK, D), v=arr(B, 0, NK, D))


# ---- mask ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(B, NK + 1), (B,), (B, 1, NK), (1, NK)])
def test_mask_wrong_shape(shape):
    msg = check(ValueError, r"^mask must have shape \(B, Nk\) = \(2, 7\)", mask=np.ones(shape, dtype=bool))
    assert str(shape) in msg


def test_mask_wrong_shape_merged():
    check(ValueError, r"^mask must have shape \(BH, Nk\) = \(8, 7\)", q=arr(B * H, NQ, D), k=arr(B * H, NK, D),
          v=arr(B * H, NK, D), mask=np.ones((B, NK), dtype=bool))


@pytest.mark.parametrize("dtype", [np.int32, np.float32, np.uint8])
def test_mask_not_bool(dtype):
    check(TypeError, r"^mask must have dtype bool", mask=np.ones((B, NK), dtype=dtype))


def test_mask_not_an_array():
    check(TypeError, r"^mask must be a numpy array", mask=[[True] * NK] * B)


# ---- attn_bias -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(H + 1, NQ, NK), (H, NQ, NK + 1), (H, NQ + 1, NK)])
def test_bias_3d_fits_no_layout(shape):
    msg = check(ValueError, r"^attn_bias must have shape \(H, Nq, Nk\)", attn_bias=arr(*shape))
    assert str(shape) in msg


def test_bias_per_batch_shape_without_flag_hints_at_the_flag():
    q, k, v = arr(3, H, NQ, D), arr(3, H, NK, D), arr(3, H, NK, D)
    with pytest.raises(ValueError, match=r"attn_bias.*attn_bias_batch_dim=True"):
        ca.forward(q, k, v, attn_bias=arr(3, NQ, NK))


def test_bias_3d_batch_wrong_shape():
    check(ValueError, r"^attn_bias with attn_bias_batch_dim=True must have shape \(B, Nq, Nk\)",
          attn_bias=arr(H, NQ, NK), attn_bias_batch_dim=True)


@pytest.mark.parametrize("shape", [(1, H, NQ, NK), (B, 1, NQ, NK), (B, H, NK, NQ)])
def test_bias_4d_fits_no_layout(shape):
    check(ValueError, r"^a 4-D attn_bias must have shape \(B, H, Nq, Nk\)", attn_bias=arr(*shape))


@pytest.mark.parametrize("shape", [(NQ, NK), (NK,), (1, B, H, NQ, NK)])
def test_bias_other_rank(shape):
    check(ValueError, r"^attn_bias must be \(H, Nq, Nk\).*got shape", attn_bias=arr(*shape))


def test_bias_merged_wrong_shape():
    check(ValueError, r"^attn_bias for merged 3-D q must have shape \(BH, Nq, Nk\)", q=arr(B * H, NQ, D),
          k=arr(B * H, NK, D), v=arr(B * H, NK, D), attn_bias=arr(H, NQ, NK))


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32, ml_dtypes.bfloat16])
def test_bias_wrong_dtype(dtype):
    check(TypeError, r"^attn_bias must have q's dtype \(float32\) or float32", attn_bias=arr(H, NQ, NK, dtype=dtype))


def test_bias_float16_with_bfloat16_q():
    q, k, v = qkv(ml_dtypes.bfloat16)
    with pytest.raises(TypeError, match=r"^attn_bias must have q's dtype \(bfloat16\)"):
        ca.forward(q, k, v, attn_bias=arr(H, NQ, NK, dtype=np.float16))


# ---- scale ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 0, np.float32("nan")])
def test_scale_bad_value(scale):
    check(ValueError, r"^scale must be finite and > 0", scale=scale)


@pytest.mark.parametrize("values", [[1.0, 2.0, float("nan"), 1.0], [1.0, 0.0, 1.0, 1.0], [1.0, -2.0, 3.0, 4.0],
                                    [1.0, float("inf"), 1.0, 1.0]])
def test_per_head_scale_bad_value(values):
    check(ValueError, r"^scale must be finite and > 0 for every head", scale=np.array(values))


@pytest.mark.parametrize("shape", [(H - 1,), (H + 1,), (1,), (H, 1), (1, H)])
def test_scale_wrong_length(shape):
    msg = check(ValueError, r"^scale must be a scalar or have shape \(4,\)", scale=np.ones(shape))
    assert str(shape) in msg


def test_scale_merged_allows_only_length_one():
    check(ValueError, r"^scale must be a scalar or have shape \(1,\).*merged", q=arr(B * H, NQ, D),
          k=arr(B * H, NK, D), v=arr(B * H, NK, D), scale=np.ones(H))


@pytest.mark.parametrize("scale", ["8", None, [8.0] * H, (8.0,), True, np.bool_(True), 1j])
def test_scale_not_a_number(scale):
    check(TypeError, r"^scale must be a positive finite float or a length-H array", scale=scale)


@pytest.mark.parametrize("dtype", [np.bool_, np.complex64, np.str_])
def test_scale_array_not_real(dtype):
    check(TypeError, r"^scale must hold real numbers", scale=np.ones(H, dtype=dtype))


def test_scale_torch_tensor_with_numpy_q():
    check(TypeError, r"^scale must be a float or a NumPy/CuPy array", scale=torch.ones(H))


# ---- groups ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [3, 5, 32, 0, -2])
def test_groups_bad_value(groups):
    check(ValueError, rf"^groups must be a positive int dividing the head dim D=16, got {groups}", groups=groups)


@pytest.mark.parametrize("groups", [2.0, "2", None, True, np.float32(2)])
def test_groups_not_int(groups):
    check(TypeError, r"^groups must be an int", groups=groups)


# ---- dtypes and array libraries ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_, np.longdouble])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_unsupported_dtype(name, dtype):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].astype(dtype)
    msg = check(TypeError, rf"^{name} has dtype {np.dtype(dtype)}; supported are float16, bfloat16", **args)
    assert "float32" in msg and "float64 on the reference backend" in msg


def _float64_refusal(backend, call):
    with pytest.raises(TypeError) as info:
        call()
    msg = str(info.value)
    assert msg.startswith(f"q, k and v have dtype float64, which backend='{backend}' does not take: its kernels "
                          f"take float16, bfloat16 and float32; backend='reference'"), msg
    assert "computes in float64" in msg


def test_float64_refused_by_the_emulator():
    """float64 runs on the reference only: the emulator says which dtypes it takes and where float64 runs."""
    q, k, v = qkv(np.float64)
    _float64_refusal("emulator", lambda: ca.forward(q, k, v, backend="emulator"))
    out, lse = np.zeros_like(q), np.zeros(q.shape[:-1], np.float32)
    _float64_refusal("emulator", lambda: ca.backward(out, q, k, v, out, lse, backend="emulator"))


def test_float64_refused_by_the_cuda_backend():
    """The same check guards the cuda backend (shown on the canonical entry points, which need no GPU
    to refuse: CuPy arrays reach them after canonicalize accepted float64)."""
    q, k, v = qkv(np.float64)
    prob, inp = api.canonicalize(q, k, v)
    _float64_refusal("cuda", lambda: api.forward_canonical(prob, inp, "cuda"))
    out, lse = np.zeros_like(q), np.zeros(q.shape[:-1], np.float32)
    _float64_refusal("cuda", lambda: api.backward_canonical(prob, inp, out, out, lse, "cuda"))


@pytest.mark.parametrize("name,dtype", [("k", np.float16), ("v", ml_dtypes.bfloat16), ("q", np.float16)])
def test_qkv_dtypes_differ(name, dtype):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].astype(dtype)
    msg = check(TypeError, r"^q, k and v must share one dtype", **args)
    assert f"{name}: {np.dtype(dtype)}" in msg


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_torch_tensor_to_numpy_api(name):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args[name] = torch.from_numpy(args[name])
    msg = check(TypeError, rf"^{name} must be a NumPy or CuPy array \(use cupy_cosattn.torch", **args)
    assert "torch" in msg


@pytest.mark.parametrize("name", ["q", "k"])
def test_list_instead_of_array(name):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v)
    args[name] = args[name].tolist()
    check(TypeError, rf"^{name} must be a NumPy or CuPy array", **args)


def test_numpy_q_with_torch_mask():
    check(TypeError, r"^mask must be a numpy array like q.*torch", mask=torch.ones(B, NK, dtype=torch.bool))


def test_numpy_q_with_torch_bias():
    check(TypeError, r"^attn_bias must be a numpy array like q.*torch", attn_bias=torch.zeros(H, NQ, NK))


@pytest.mark.gpu  # CuPy cannot allocate an array without a GPU, so this mixing case runs only on one
def test_numpy_q_with_cupy_arrays():
    import cupy

    q, k, v = qkv()
    check(TypeError, r"^mask must be a numpy array like q.*cupy", mask=cupy.ones((B, NK), dtype=bool))
    check(TypeError, r"^attn_bias must be a numpy array like q.*cupy", attn_bias=cupy.zeros((H, NQ, NK), cupy.float32))
    check(TypeError, r"^q, k and v must come from one array library", k=cupy.asarray(k))


class FakeCupyArray:
    """Stands in for a CuPy array on a CPU-only machine (CuPy cannot allocate without a GPU): the
    argument checks look only at the array's library, shape, dtype and device, and must reject a
    mixture before touching the data."""

    __module__ = "cupy._core.core"

    def __init__(self, a, device=0):
        self._a = np.asarray(a)
        self.shape, self.ndim, self.dtype = self._a.shape, self._a.ndim, self._a.dtype
        self.device = type("Device", (), {"id": device})()

    def reshape(self, *shape):
        return FakeCupyArray(self._a.reshape(*shape), self.device.id)


def fake_cupy(a, device=0):
    return FakeCupyArray(a, device)


def test_numpy_q_with_cupy_like_arrays():
    q, k, v = qkv()
    check(TypeError, r"^q, k and v must come from one array library, got q: numpy, k: cupy, v: numpy", k=fake_cupy(k))
    check(TypeError, r"^mask must be a numpy array like q.*cupy", mask=fake_cupy(np.ones((B, NK), dtype=bool)))
    check(TypeError, r"^attn_bias must be a numpy array like q.*cupy",
          attn_bias=fake_cupy(np.zeros((H, NQ, NK), np.float32)))


def test_qkv_on_different_devices():
    q, k, v = qkv()
    check(ValueError, r"^q, k and v must be on one device, got q on CUDA device 0, k on CUDA device 1, "
                      r"v on CUDA device 0", q=fake_cupy(q), k=fake_cupy(k, device=1), v=fake_cupy(v))


@pytest.mark.parametrize("name,value", [("mask", np.ones((B, NK), dtype=bool)),
                                        ("attn_bias", np.zeros((H, NQ, NK), np.float32))])
def test_mask_or_bias_on_another_device(name, value):
    q, k, v = (fake_cupy(x) for x in qkv())
    check(ValueError, rf"^{name} is on CUDA device 1 but q is on CUDA device 0", q=q, k=k, v=v,
          **{name: fake_cupy(value, device=1)})


def test_backward_extras_on_another_device():
    from cupy_cosattn import problem

    q, k, v = (fake_cupy(x) for x in qkv())
    prob, _ = problem.canonicalize(q, k, v)
    good = dict(dout=fake_cupy(np.zeros((B, H, NQ, D), np.float32)), out=fake_cupy(np.zeros((B, H, NQ, D), np.float32)),
                lse=fake_cupy(np.zeros((B, H, NQ), np.float32)))
    for name in good:
        bad = dict(good, **{name: fake_cupy(np.asarray(good[name]._a), device=1)})
        with pytest.raises(ValueError, match=rf"^{name} is on CUDA device 1 but q is on CUDA device 0"):
            problem.check_backward_extras(prob, q.shape, problem._device_of(q), "cupy", bad["dout"], bad["out"],
                                          bad["lse"])


# ---- flags and backend ----------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["causal", "l2norm_qk", "deterministic", "attn_bias_batch_dim"])
@pytest.mark.parametrize("value", [1, 0, "yes", None, np.array(True)])
def test_non_bool_flag(flag, value):
    check(TypeError, rf"^{flag} must be a bool", **{flag: value})


# (no "gpu" here: conftest skips items whose keywords contain "gpu", and a parameter id is a keyword)
@pytest.mark.parametrize("backend", ["nvidia", "CUDA", "", None, "torch"])
def test_bad_backend_name(backend):
    check(ValueError, r"^backend must be one of \('auto', 'cuda', 'emulator', 'reference'\)", backend=backend)


def test_cuda_backend_with_numpy_arrays():
    check(TypeError, r"^backend='cuda' runs on CuPy arrays, got numpy arrays", backend="cuda")


def test_bad_backend_name_in_backward(fwd):
    q, k, v, out, lse = fwd
    with pytest.raises(ValueError, match=r"^backend must be one of"):
        ca.backward(out, q, k, v, out, lse, backend="nope")


def test_bad_backend_name_in_cosine_sim_attention():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^backend='cuda'"):
        ca.cosine_sim_attention(q, k, v, backend="cuda")


# ---- backward's extra arrays ----------------------------------------------------------------------

@pytest.fixture
def fwd(no_launch):
    q, k, v = qkv()
    out, lse = ca.forward(q, k, v, backend="reference")
    no_launch.clear()  # the good forward above is allowed to run
    return q, k, v, out, lse


def _backward(fwd, **over):
    q, k, v, out, lse = fwd
    args = dict(dout=out, out=out, lse=lse)
    args.update(over)
    return ca.backward(args["dout"], q, k, v, args["out"], args["lse"], backend="reference")


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("shape", [(B, H, NQ, D + 1), (B, H, NQ - 1, D), (B * H, NQ, D), (B, H, NQ)])
def test_backward_wrong_shape(fwd, name, shape):
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} must have shape (2, 4, 5, 16), got {shape}")):
        _backward(fwd, **{name: arr(*shape)})


@pytest.mark.parametrize("name", ["dout", "out"])
@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_backward_wrong_dtype(fwd, name, dtype):
    with pytest.raises(TypeError, match=rf"^{name} must have dtype float32, got {np.dtype(dtype)}"):
        _backward(fwd, **{name: arr(B, H, NQ, D, dtype=dtype)})


@pytest.mark.parametrize("shape", [(B, H, NQ, 1), (B, H, NQ + 1), (B * H, NQ), (B, H)])
def test_backward_lse_wrong_shape(fwd, shape):
    with pytest.raises(ValueError, match=r"^lse must have shape \(2, 4, 5\)"):
        _backward(fwd, lse=arr(*shape))


@pytest.mark.parametrize("dtype", [np.float16, np.float64, ml_dtypes.bfloat16])
def test_backward_lse_wrong_dtype(fwd, dtype):
    with pytest.raises(TypeError, match=rf"^lse must have dtype float32, got {np.dtype(dtype)}"):
        _backward(fwd, lse=arr(B, H, NQ, dtype=dtype))


@pytest.mark.parametrize("name", ["dout", "out", "lse"])
def test_backward_torch_extra(fwd, name):
    q, k, v, out, lse = fwd
    x = dict(dout=out, out=out, lse=lse)[name]
    with pytest.raises(TypeError, match=rf"^{name} must be a numpy array like q"):
        _backward(fwd, **{name: torch.from_numpy(x)})


def test_backward_checks_its_inputs_too(fwd):
    q, k, v, out, lse = fwd
    with pytest.raises(ValueError, match=r"^groups must be a positive int"):
        ca.backward(out, q, k, v, out, lse, groups=3, backend="reference")


# ---- empty lengths (allowed: answered without a backend) ------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("layout", ["4d", "merged", "mqa3d"])
def test_empty_queries(dtype, layout):
    if layout == "merged":
        q, k, v = arr(B * H, 0, D, dtype=dtype), arr(B * H, NK, D, dtype=dtype), arr(B * H, NK, D, dtype=dtype)
    elif layout == "mqa3d":
        q, k, v = arr(B, H, 0, D, dtype=dtype), arr(B, NK, D, dtype=dtype), arr(B, NK, D, dtype=dtype)
    else:
        q, k, v = arr(B, H, 0, D, dtype=dtype), arr(B, H, NK, D, dtype=dtype), arr(B, H, NK, D, dtype=dtype)
    out, lse = ca.forward(q, k, v, causal=True)
    assert out.shape == q.shape and out.dtype == np.dtype(dtype) and out.size == 0
    assert lse.shape == q.shape[:-1] and lse.dtype == np.float32 and lse.size == 0
    dq, dk, dv, dbias, dscale = ca.backward(out, q, k, v, out, lse, causal=True)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dq.dtype == dk.dtype == dv.dtype == np.dtype(dtype)
    assert not dk.any() and not dv.any() and dbias is None and dscale == 0.0 and isinstance(dscale, float)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_empty_keys(dtype):
    q = arr(B, H, NQ, D, dtype=dtype)
    k = arr(B, 2, 0, D, dtype=dtype)
    bias = arr(B, NQ, 0)
    mask = np.ones((B, 0), dtype=bool)
    scale = np.full(H, 4.0, dtype=np.float32)
    kw = dict(attn_bias=bias, attn_bias_batch_dim=True, mask=mask, scale=scale, causal=True)
    out, lse = ca.forward(q, k, k, **kw)
    assert out.shape == q.shape and out.dtype == np.dtype(dtype)
    assert np.all(out.astype(np.float32) == 0)
    assert lse.shape == (B, H, NQ) and lse.dtype == np.float32 and np.all(np.isneginf(lse))
    dout = arr(B, H, NQ, D, dtype=dtype, seed=5)
    dq, dk, dv, dbias, dscale = ca.backward(dout, q, k, k, out, lse, **kw)
    assert dq.shape == q.shape and dq.dtype == np.dtype(dtype) and np.all(dq.astype(np.float32) == 0)
    assert dk.shape == k.shape and dv.shape == k.shape
    assert dbias.shape == bias.shape and dbias.dtype == np.float32
    assert isinstance(dscale, np.ndarray) and dscale.shape == (H,) and dscale.dtype == np.float32
    assert np.all(dscale == 0)


def test_empty_keys_merged_scalar_scale():
    q, k = arr(B * H, NQ, D), arr(B * H, 0, D)
    out, lse = ca.forward(q, k, k)
    assert np.all(out == 0) and np.all(np.isneginf(lse)) and lse.shape == (B * H, NQ)
    dq, dk, dv, dbias, dscale = ca.backward(np.ones_like(q), q, k, k, out, lse)
    assert np.all(dq == 0) and dk.shape == k.shape and dbias is None and dscale == 0.0


def test_empty_forward_canonical_with_preallocated_outputs():
    from cupy_cosattn.problem import canonicalize

    q, k = arr(1, 2, 3, D), arr(1, 2, 0, D)
    prob, inp = canonicalize(q, k, k)
    out = np.full((1, 2, 3, D), 7.0, dtype=np.float32)
    lse = np.zeros((1, 2, 3), dtype=np.float32)
    o, ls = api.forward_canonical(prob, inp, "reference", out=out, lse=lse)
    assert o is out and ls is lse and not out.any() and np.all(np.isneginf(lse))
    o, ls = api.forward_canonical(prob, inp, "reference", out=out)
    assert o is out and np.all(np.isneginf(ls))


# ---- messages stay short -------------------------------------------------------------------------

MESSAGE_LIMIT = 300
HUGE_LIST = [0.5] * 100_000


class _HugeRepr:
    def __repr__(self):
        return "x" * 1_000_000


@pytest.mark.parametrize("what", ["q", "k", "v", "mask", "attn_bias", "scale", "scale-str", "scale-object",
                                  "scale-values", "groups", "causal", "backend", "backend-list"])
def test_huge_values_make_short_messages(what):
    """A value that is not an array is named by its type and length and a capped repr, never its
    full repr (a list q of 100k elements once gave a 330,000-character message)."""
    q, k, v = qkv()
    args, kw = dict(q=q, k=k, v=v), {}
    if what in ("q", "k", "v"):
        args[what] = HUGE_LIST
    elif what in ("mask", "attn_bias"):
        kw[what] = HUGE_LIST
    elif what == "scale":
        kw["scale"] = HUGE_LIST
    elif what == "scale-str":
        kw["scale"] = "8" * 100_000
    elif what == "scale-object":
        kw["scale"] = _HugeRepr()
    elif what == "scale-values":  # an (H,) array with one bad value is quoted by its values, capped
        H_big = 50_000
        args = dict(q=arr(1, H_big, 2, 8), k=arr(1, H_big, 2, 8), v=arr(1, H_big, 2, 8))
        kw["scale"] = np.full(H_big, -1.0)
    elif what == "groups":
        kw["groups"] = _HugeRepr()
    elif what == "causal":
        kw["causal"] = HUGE_LIST
    elif what == "backend":
        kw["backend"] = "c" * 100_000
    else:
        kw["backend"] = HUGE_LIST
    with pytest.raises((TypeError, ValueError)) as info:
        ca.forward(args["q"], args["k"], args["v"], **kw)
    msg = str(info.value)
    assert len(msg) < MESSAGE_LIMIT, (len(msg), msg[:400])
    if isinstance(kw.get("scale", args.get(what)), list) or kw.get("causal") is HUGE_LIST:
        assert "list of len 100000" in msg, msg


def test_huge_values_in_backward_make_short_messages():
    q, k, v = qkv()
    out, lse = np.zeros_like(q), np.zeros(q.shape[:-1], np.float32)
    for args in ((HUGE_LIST, q, k, v, out, lse), (out, q, k, v, HUGE_LIST, lse), (out, q, k, v, out, HUGE_LIST)):
        with pytest.raises(TypeError) as info:
            ca.backward(*args)
        assert len(str(info.value)) < MESSAGE_LIMIT and "list of len 100000" in str(info.value)


def test_short_values_are_still_quoted_in_full():
    msg = check(TypeError, r"^scale must be a positive finite float or a length-H array", scale=[8.0, 8.0])
    assert msg.endswith("got list of len 2: [8.0, 8.0]"), msg
    msg = check(ValueError, r"^backend must be one of", backend="gpu")
    assert msg.endswith("got 'gpu'"), msg
