"""cupy_cosattn.torch: the autograd op against the float64 NumPy reference, gradcheck, argument errors
shared with the NumPy API, the custom-op registration (opcheck, torch.compile, autocast) and, on a GPU,
the zero-copy CUDA path."""
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cupy_cosattn as ca  # noqa: E402
import cupy_cosattn.api as ca_api  # noqa: E402
import cupy_cosattn.torch as cat  # noqa: E402
from cupy_cosattn.tolerances import GRAD, OUT  # noqa: E402


def rel(x, ref):
    x = np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def to_np(t):
    if t is None:
        return None
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


# name: (q shape, kv shape, bias shape or None, mask?, extra keywords)
CASES = {
    "mha": ((2, 4, 9, 16), (2, 4, 11, 16), None, False, {}),
    "mha-causal": ((2, 4, 9, 16), (2, 4, 11, 16), None, False, dict(causal=True)),
    "gqa-groups-causal": ((2, 4, 9, 16), (2, 2, 11, 16), None, False, dict(causal=True, groups=2)),
    "mqa-3d-kv": ((2, 4, 9, 16), (2, 11, 16), None, True, {}),
    "merged-bias-mask-causal": ((6, 9, 16), (6, 11, 16), (6, 9, 11), True, dict(causal=True)),
    "head-bias-per-head-scale": ((2, 4, 9, 16), (2, 4, 11, 16), (4, 9, 11), True, dict(per_head=True)),
    "batch-bias-mqa-causal": ((2, 4, 9, 16), (2, 1, 11, 16), (2, 9, 11), False,
                              dict(attn_bias_batch_dim=True, causal=True, per_head=True)),
    "full-bias-nq-gt-nk-causal": ((2, 4, 13, 16), (2, 4, 5, 16), (2, 4, 13, 5), False,
                                  dict(causal=True, per_head=True)),
    "no-l2norm": ((2, 4, 13, 32), (2, 2, 5, 32), None, False, dict(l2norm_qk=False)),
    "single-key": ((1, 2, 3, 8), (1, 2, 1, 8), None, False, dict(causal=True)),
}


def make_case(name, dtype=torch.float32, seed=0):
    qs, ks, bs, with_mask, kw = CASES[name]
    kw = dict(kw)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(qs, generator=g).to(dtype).requires_grad_()
    k = torch.randn(ks, generator=g).to(dtype).requires_grad_()
    v = torch.randn(ks, generator=g).to(dtype).requires_grad_()
    if not kw.get("l2norm_qk", True):  # the caller's promise: already normalized
        with torch.no_grad():
            q.copy_(torch.nn.functional.normalize(q.float(), dim=-1))
            k.copy_(torch.nn.functional.normalize(k.float(), dim=-1))
    bias = None if bs is None else (torch.randn(bs, generator=g).to(dtype)).requires_grad_()
    mask = None
    if with_mask:
        mask = torch.rand((qs[0], ks[-2]), generator=g) > 0.3
        mask[0] = False  # a fully masked row of keys: those queries see nothing
    H = qs[1] if len(qs) == 4 else 1
    if kw.pop("per_head", False):
        scale = (torch.rand(H, generator=g, dtype=torch.float64) * 6 + 2).to(dtype).requires_grad_()
    else:
        scale = 8.0
    return q, k, v, mask, bias, scale, kw


def run_both(q, k, v, mask, bias, scale, kw, seed=1):
    """(torch out, torch grads, reference out, reference grads); grads (dq, dk, dv, dbias, dscale)."""
    for t in (q, k, v, bias, scale):
        if isinstance(t, torch.Tensor):
            t.grad = None
    out = cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=scale, **kw)
    # drawn on the CPU (the same numbers whatever the device), then moved to out's device and dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device=out.device,
                                                                                    dtype=out.dtype)
    out.backward(dout)
    np_scale = to_np(scale).astype(np.float64) if isinstance(scale, torch.Tensor) else scale
    args = dict(mask=to_np(mask), attn_bias=to_np(bias), scale=np_scale, backend="reference", **kw)
    ro, rl = ca.forward(to_np(q), to_np(k), to_np(v), **args)
    rg = ca.backward(to_np(dout), to_np(q), to_np(k), to_np(v), ro, rl, **args)
    grads = (q.grad, k.grad, v.grad, None if bias is None else bias.grad,
             scale.grad if isinstance(scale, torch.Tensor) else None)
    return out, grads, ro, rg


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_matches_reference(name):
    q, k, v, mask, bias, scale, kw = make_case(name)
    out, grads, ro, rg = run_both(q, k, v, mask, bias, scale, kw)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, ro) <= 1e-5
    for what, g, r in zip(("dq", "dk", "dv", "dbias", "dscale"), grads, rg):
        if r is None or (what == "dscale" and g is None):
            continue
        assert g is not None, what
        assert torch.isfinite(g).all(), what
        assert g.shape == (q, k, v, bias, scale)[("dq", "dk", "dv", "dbias", "dscale").index(what)].shape
        assert rel(g, r) <= 1e-4, (what, rel(g, r))
    if mask is not None:  # queries of the fully masked batch row: output 0, no gradient
        assert out[0].abs().max() == 0
        assert q.grad[0].abs().max() == 0


@pytest.mark.parametrize("dtype,tol_out,tol_grad", [(torch.float16, OUT["float16"], GRAD["float16"]),
                                                   (torch.bfloat16, OUT["bfloat16"], GRAD["bfloat16"])])
@pytest.mark.parametrize("name", ["gqa-groups-causal", "merged-bias-mask-causal", "head-bias-per-head-scale"])
def test_half_dtypes_match_reference(name, dtype, tol_out, tol_grad):
    q, k, v, mask, bias, scale, kw = make_case(name, dtype)
    if isinstance(scale, torch.Tensor):  # a learned scale usually stays float32
        scale = scale.detach().float().requires_grad_()
    out, grads, ro, rg = run_both(q, k, v, mask, bias, scale, kw)
    assert out.dtype == dtype
    assert rel(out, ro.astype(np.float64)) <= tol_out
    for g, r in zip(grads, rg):
        if g is None or r is None:
            continue
        assert torch.isfinite(g.float()).all()
        assert rel(g.float(), np.asarray(r, dtype=np.float64)) <= tol_grad


def test_lse_matches_reference():
    q, k, v, mask, bias, scale, kw = make_case("merged-bias-mask-causal")
    out, lse = cat.forward(q, k, v, mask=mask, attn_bias=bias, scale=scale, **kw)
    ro, rl = ca.forward(to_np(q), to_np(k), to_np(v), mask=to_np(mask), attn_bias=to_np(bias), scale=scale,
                        backend="reference", **kw)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert not lse.requires_grad
    fin = np.isfinite(rl)
    assert np.array_equal(torch.isfinite(lse).numpy(), fin)
    np.testing.assert_allclose(lse.numpy()[fin], rl[fin], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_gradcheck_float64_bias_per_head_scale_causal_mask(backend):
    """float64 CPU tensors run on the torch implementation and on the reference (both compute in
    float64), so gradcheck holds on both."""
    g = torch.Generator().manual_seed(0)
    kw = dict(dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 4, 5, 8, generator=g, **{"dtype": torch.float64}).requires_grad_()
    k = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(2, 5, 6, generator=g, **kw)
    scale = torch.tensor([2.0, 3.0, 5.0, 7.0], **kw)
    mask = torch.tensor([[True, False, True, True, True, True], [False, True, True, False, True, True]])

    def f(q, k, v, bias, scale):
        return cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, attn_bias_batch_dim=True, scale=scale,
                                        causal=True, groups=2, backend=backend)

    assert f(q, k, v, bias, scale).dtype == torch.float64
    assert torch.autograd.gradcheck(f, (q, k, v, bias, scale), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64_merged_and_empty_rows():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 6, 8, generator=g, dtype=torch.float64).requires_grad_()
    k = torch.randn(3, 4, 8, generator=g, dtype=torch.float64).requires_grad_()
    v = torch.randn(3, 4, 8, generator=g, dtype=torch.float64).requires_grad_()
    bias = torch.randn(3, 6, 4, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.tensor([[True] * 4, [False] * 4, [True, True, False, True]])

    def f(q, k, v, bias):  # causal with Nq > Nk: the first two queries see no key
        return cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, causal=True, scale=4.0)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-6, rtol=1e-5)
    out = f(q, k, v, bias)
    assert out[:, :2].abs().max() == 0 and out[1].abs().max() == 0


def test_empty_lengths_give_zeros():
    for nq, nk in ((0, 5), (4, 0), (0, 0)):
        q = torch.randn(2, 2, nq, 8, requires_grad=True)
        k = torch.randn(2, 2, nk, 8, requires_grad=True)
        v = torch.randn(2, 2, nk, 8, requires_grad=True)
        out, lse = cat.forward(q, k, v, causal=True)
        assert out.shape == q.shape and torch.all(out == 0)
        assert torch.all(torch.isneginf(lse))
        out.sum().backward()
        for t in (q, k, v):
            assert t.grad.shape == t.shape and torch.all(t.grad == 0)


def test_chunked_cpu_path_equals_single_block(monkeypatch):
    q, k, v, mask, bias, scale, kw = make_case("full-bias-nq-gt-nk-causal")
    out1, grads1, _, _ = run_both(q, k, v, mask, bias, scale, kw)
    grads1 = [g.clone() for g in grads1]
    monkeypatch.setattr(cat.cpu, "CPU_BLOCK_ELEMS", 2 * 4 * 3 * 5)  # 3 query rows per block
    q2, k2, v2, b2, s2 = (t.detach().clone().requires_grad_() for t in (q, k, v, bias, scale))
    out2, grads2, _, _ = run_both(q2, k2, v2, mask, b2, s2, kw)
    torch.testing.assert_close(out2, out1, rtol=1e-6, atol=1e-6)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)


def test_non_contiguous_inputs_and_0d_scale():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 4, 16, generator=g)  # (B, N, H, D), as a projection would give
    q = x.transpose(1, 2).requires_grad_()
    scale = torch.tensor(6.0, requires_grad=True)
    out = cat.cosine_sim_attention(q, q, q, scale=scale, causal=True)
    ref = cat.cosine_sim_attention(q.detach().contiguous(), q.detach().contiguous(), q.detach().contiguous(),
                                   scale=6.0, causal=True)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    assert scale.grad.shape == () and torch.isfinite(scale.grad)


def test_requires_no_grad_inputs():
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    out = cat.cosine_sim_attention(q, k, v)
    assert not out.requires_grad


# ------------------------------------------------------------- the kernel-backend glue, run on the CPU

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gqa-groups-causal", "merged-bias-mask-causal", "batch-bias-mqa-causal"])
def test_kernel_glue_on_cpu_with_reference_backend(name, dtype):
    """The path CUDA tensors take (canonical array views, out/lse preallocated by torch and written in
    place, gradients handed back, dscale reduced to the scale tensor) run with NumPy views and the
    reference backend: it must agree with the reference called directly."""
    q, k, v, mask, bias, scale, kw = make_case(name, dtype)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().float().requires_grad_()
    seen = {}
    fwd = ca_api.forward_canonical

    def spy(prob, inp, backend, out=None, lse=None):
        if out is not None:  # the torch op's call (ca.forward, called by run_both too, passes no out)
            seen["in"] = inp.q.__array_interface__["data"][0]
            seen["out"] = out.__array_interface__["data"][0]
        return fwd(prob, inp, backend, out=out, lse=lse)

    with cat.cpu_backend("reference"):
        ca_api.forward_canonical = spy
        try:
            out, grads, ro, rg = run_both(q, k, v, mask, bias, scale, kw)
        finally:
            ca_api.forward_canonical = fwd
    assert cat.get_cpu_backend() == "torch"
    assert seen["in"] == q.data_ptr() and seen["out"] == out.data_ptr()  # zero-copy both ways
    assert out.dtype == dtype
    assert rel(out.float(), np.asarray(ro, np.float64)) == 0
    for g, r in zip(grads, rg):
        if g is not None and r is not None:
            tol = 1e-6 if np.asarray(r).dtype == np.float64 else 0  # dscale: float64 -> the scale's float32
            assert rel(g.float(), np.asarray(r, np.float64)) <= tol


def backend_vs_default(backend, name="head-bias-per-head-scale", dtype=torch.float32):
    """Run case `name` with `backend=` and with the default (no keyword, CPU backend "torch"), forward and
    backward; returns (relative errors of out, dq, dk, dv, dbias, dscale against the default, the backends
    the kernel entry points were called with)."""
    q, k, v, mask, bias, scale, kw = make_case(name, dtype)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().float().requires_grad_()
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    leaves = [t for t in (q, k, v, bias, scale) if isinstance(t, torch.Tensor)]
    seen = []
    fwd, bwd = ca_api.forward_canonical, ca_api.backward_canonical

    def spy_fwd(prob, inp, be, out=None, lse=None):
        seen.append(("fwd", be))
        return fwd(prob, inp, be, out=out, lse=lse)

    def spy_bwd(prob, inp, do, out, lse, be, need_dscale=True):
        seen.append(("bwd", be))
        return bwd(prob, inp, do, out, lse, be, need_dscale=need_dscale)

    results = []
    for b in (None, backend):
        for t in leaves:
            t.grad = None
        extra = {} if b is None else dict(backend=b)
        ca_api.forward_canonical, ca_api.backward_canonical = spy_fwd, spy_bwd
        try:
            out = cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=scale, **kw, **extra)
            out.backward(dout)
        finally:
            ca_api.forward_canonical, ca_api.backward_canonical = fwd, bwd
        results.append([out.detach().float()] + [t.grad.float() for t in leaves])
        if b is None:
            assert not seen, seen  # the default CPU path is the torch implementation: no kernel backend
    errs = [rel(x, r.double().numpy()) for x, r in zip(results[1], results[0])]
    return errs, seen


_EMULATOR_CHILD = r"""
import os, sys, traceback
sys.path.insert(0, sys.argv[1])
code = 1
try:
    import numpy as np, torch
    import cupy_cosattn.torch as cat
    from test_torch import make_case, run_both, rel, backend_vs_default
    from cupy_cosattn.tolerances import GRAD, OUT
    for name in ("head-bias-per-head-scale", "merged-bias-mask-causal"):
        q, k, v, mask, bias, scale, kw = make_case(name, torch.float16)
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().float().requires_grad_()
        with cat.cpu_backend("emulator"):
            out, grads, ro, rg = run_both(q, k, v, mask, bias, scale, kw)
        errs = [rel(out.float(), np.asarray(ro, np.float64))] + [
            rel(g.float(), np.asarray(r, np.float64)) for g, r in zip(grads, rg) if g is not None and r is not None]
        print(name, errs, flush=True)
        assert errs[0] <= OUT["float16"] and max(errs[1:]) <= GRAD["float16"], (name, errs)
    # the backend= keyword (not the process-wide setting) runs the emulator, forward and backward
    errs, seen = backend_vs_default("emulator", "gqa-groups-causal")
    print("backend='emulator'", errs, seen, flush=True)
    assert seen == [("fwd", "emulator"), ("bwd", "emulator")], seen
    assert errs[0] <= 1e-5 and max(errs[1:]) <= 1e-4, errs
    assert cat.get_cpu_backend() == "torch"
    code = 0
except Exception:
    traceback.print_exc()
sys.stdout.flush(); sys.stderr.flush()
os._exit(code)  # do not wait on the emulator's worker threads at interpreter exit
"""


def test_kernel_glue_on_cpu_with_emulator_backend():
    """The same glue with the package's kernels run by the CPU emulator (float16, small shapes)."""
    r = subprocess.run([sys.executable, "-c", _EMULATOR_CHILD, str(__import__("pathlib").Path(__file__).parent)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


def test_cpu_backend_setting():
    with pytest.raises(ValueError, match="cpu backend"):
        cat.set_cpu_backend("cuda")
    q = torch.randn(1, 1, 2, 8, dtype=torch.float64)
    with cat.cpu_backend("emulator"):
        with pytest.raises(TypeError, match="dtype float64, which backend='emulator' does not take"):
            cat.cosine_sim_attention(q, q, q)
    with cat.cpu_backend("reference"):  # float64 in, float64 out
        assert cat.cosine_sim_attention(q, q, q).dtype == torch.float64
    assert cat.get_cpu_backend() == "torch"


# ------------------------------------------------------------------------------------ the backend keyword

@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_backend_keyword_on_cpu_matches_default(backend):
    """backend= on CPU tensors: "auto" and "torch" are the default torch implementation, "reference" runs
    the kernel glue with the float64 reference, forward and backward (the keyword travels to the
    backward op). "emulator" is checked the same way in test_kernel_glue_on_cpu_with_emulator_backend."""
    errs, seen = backend_vs_default(backend)
    assert errs[0] <= 1e-5 and max(errs[1:]) <= 1e-4, errs
    if backend == "reference":
        assert seen == [("fwd", "reference"), ("bwd", "reference")], seen
    else:
        assert seen == [], seen


def test_backend_keyword_overrides_cpu_backend_setting():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)  # float64: the emulator refuses it
    with cat.cpu_backend("emulator"):
        with pytest.raises(TypeError, match="float64"):
            cat.cosine_sim_attention(q, q, q)  # auto: the process-wide setting
        cat.cosine_sim_attention(q, q, q, backend="torch")  # the keyword wins
        cat.cosine_sim_attention(q, q, q, backend="reference")


@pytest.mark.parametrize("bad", ["CUDA", "numpy", "", None, 1, ("cuda",)])
def test_backend_bad_value_raises_value_error(bad):
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'cuda'"):
        cat.cosine_sim_attention(q, q, q, backend=bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        cat.forward(q, q, q, backend=bad)
    with pytest.raises(ValueError, match="backend must be one of"):  # the op itself checks too
        torch.ops.cupy_cosattn.attn_fwd(q, q, q, None, None, None, 8.0, False, 1, False, True, False,
                                        bad if isinstance(bad, str) else "bogus")


def test_backend_cuda_needs_cuda_tensors():
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(ValueError, match="backend='cuda' runs CUDA tensors, but q is on cpu"):
        cat.cosine_sim_attention(q, q, q, backend="cuda")
    qm = q.to("meta")
    with pytest.raises(ValueError, match="backend='reference' runs CPU tensors, but q is on meta"):
        cat.cosine_sim_attention(qm, qm, qm, backend="reference")


def test_backend_keyword_under_compile_fullgraph():
    """The backend string is a constant argument of the custom op: no graph break, and the compiled
    forward and backward (aot_eager: fake tensors + the registered autograd) run the chosen backend."""
    q, k, v, mask, bias, scale, kw = make_case("head-bias-per-head-scale")

    def loss_fn(q, k, v, bias, scale):
        return cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=scale, causal=True,
                                        backend="reference").square().sum()

    args = (q, k, v, bias, scale)
    torch._dynamo.reset()
    explain = torch._dynamo.explain(loss_fn)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    seen = []
    fwd, bwd = ca_api.forward_canonical, ca_api.backward_canonical
    ca_api.forward_canonical = lambda p, i, b, out=None, lse=None: (seen.append(b), fwd(p, i, b, out=out, lse=lse))[1]
    ca_api.backward_canonical = lambda p, i, d, o, ls, b, **kw: (seen.append(b), bwd(p, i, d, o, ls, b, **kw))[1]
    try:
        torch._dynamo.reset()
        lc = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*args)
        gc = torch.autograd.grad(lc, args)
    finally:
        ca_api.forward_canonical, ca_api.backward_canonical = fwd, bwd
    assert seen == ["reference", "reference"], seen
    le = cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=scale, causal=True).square().sum()
    ge = torch.autograd.grad(le, args)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- CuPy stream choice

class _FakeStreamNS:
    """Stand-in for the `cupy` module: cupy.cuda.Stream (with or without from_external) and
    cupy.cuda.ExternalStream, recording how they were called."""

    def __init__(self, with_from_external):
        calls = self.calls = []

        class Stream:
            pass

        if with_from_external:
            Stream.from_external = staticmethod(lambda obj: calls.append(("from_external", obj)) or "S")

        def external(ptr, device_id):
            calls.append(("ExternalStream", ptr, device_id))
            return "E"

        self.cuda = type("cuda", (), dict(Stream=Stream, ExternalStream=staticmethod(external)))


class _TorchStreamWithProtocol:
    cuda_stream = 0xABC

    def __cuda_stream__(self):
        return (0, self.cuda_stream)


class _TorchStreamWithoutProtocol:
    cuda_stream = 0xDEF


@pytest.mark.parametrize("cupy_has,torch_has", [(True, True), (True, False), (False, True), (False, False)])
def test_cupy_stream_selection(cupy_has, torch_has):
    """Stream.from_external only when CuPy has it and torch's stream speaks the CUDA stream protocol;
    otherwise ExternalStream on the raw handle, with the device index."""
    cp = _FakeStreamNS(cupy_has)
    ts = (_TorchStreamWithProtocol if torch_has else _TorchStreamWithoutProtocol)()
    got = cat.bridge.cupy_stream(cp, ts, 3)
    if cupy_has and torch_has:
        assert got == "S" and cp.calls == [("from_external", ts)]
    else:
        assert got == "E" and cp.calls == [("ExternalStream", ts.cuda_stream, 3)]


# --------------------------------------------------------------------------------------- argument errors

def _both_raise(torch_args, np_args, kw_torch=None, kw_np=None):
    """The torch call and the NumPy call raise the same exception type with the same message."""
    with pytest.raises((TypeError, ValueError)) as et:
        cat.cosine_sim_attention(*torch_args, **(kw_torch or {}))
    with pytest.raises((TypeError, ValueError)) as en:
        ca.cosine_sim_attention(*np_args, **(kw_np or {}))
    assert type(et.value) is type(en.value)
    assert str(et.value) == str(en.value)
    return str(et.value)


def _qkv(qs, ks, vs=None, dtype=torch.float32):
    t = [torch.zeros(s, dtype=dtype) for s in (qs, ks, vs or ks)]
    return t, [x.numpy() for x in t]


@pytest.mark.parametrize("what", ["gqa", "kv-shape", "batch", "head-dim", "groups", "mask-shape", "mask-dtype",
                                  "bias-shape", "bias-batch-hint", "scale-len", "scale-neg", "causal-flag",
                                  "q-ndim", "dtype"])
def test_errors_match_numpy_api(what):
    t, n = _qkv((2, 4, 5, 8), (2, 4, 6, 8))
    kt, kn = {}, {}
    if what == "gqa":
        t, n = _qkv((2, 4, 5, 8), (2, 3, 6, 8))
    elif what == "kv-shape":
        t, n = _qkv((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 7, 8))
    elif what == "batch":
        t, n = _qkv((2, 4, 5, 8), (3, 4, 6, 8))
    elif what == "head-dim":
        t, n = _qkv((2, 4, 5, 8), (2, 4, 6, 16))
    elif what == "groups":
        kt = kn = dict(groups=3)
    elif what == "mask-shape":
        kt, kn = dict(mask=torch.ones(2, 5, dtype=torch.bool)), dict(mask=np.ones((2, 5), bool))
    elif what == "mask-dtype":
        kt, kn = dict(mask=torch.ones(2, 6, dtype=torch.int64)), dict(mask=np.ones((2, 6), np.int64))
    elif what == "bias-shape":
        kt, kn = dict(attn_bias=torch.zeros(4, 5, 5)), dict(attn_bias=np.zeros((4, 5, 5), np.float32))
    elif what == "bias-batch-hint":
        t, n = _qkv((2, 3, 5, 8), (2, 3, 6, 8))
        kt, kn = dict(attn_bias=torch.zeros(2, 5, 6)), dict(attn_bias=np.zeros((2, 5, 6), np.float32))
    elif what == "scale-len":
        kt, kn = dict(scale=torch.ones(3)), dict(scale=np.ones(3))
    elif what == "scale-neg":
        kt = kn = dict(scale=-1.0)
    elif what == "causal-flag":
        kt = kn = dict(causal="yes")
    elif what == "q-ndim":
        t, n = _qkv((2, 5, 8, 1, 1), (2, 4, 6, 8))
    elif what == "dtype":
        t, n = _qkv((2, 4, 5, 8), (2, 4, 6, 8), dtype=torch.int32)
        with pytest.raises(TypeError, match="int32.*supported"):
            cat.cosine_sim_attention(*t)
        return
    _both_raise(t, n, kt, kn)


def test_torch_specific_errors():
    q = torch.zeros(1, 2, 3, 8)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        cat.cosine_sim_attention(q.numpy(), q, q)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        cat.cosine_sim_attention(q, q, q, mask=np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="k is on device meta but q is on cpu"):
        cat.cosine_sim_attention(q, q.to("meta"), q)
    with pytest.raises(TypeError, match="scale"):
        cat.cosine_sim_attention(q, q, q, scale="big")
    with pytest.raises(TypeError, match="scale"):
        cat.cosine_sim_attention(q, q, q, scale=np.ones(2))
    with pytest.raises(TypeError, match="float64"):
        cat.cosine_sim_attention(q.long(), q.long(), q.long())  # the CPU message mentions float64


@pytest.mark.parametrize("what", ["q", "k", "mask", "attn_bias", "scale", "groups", "causal", "backend",
                                  "set_cpu_backend"])
def test_huge_values_make_short_messages(what):
    """A list of 100k elements (or a 100k-character string) in any argument: a message under 300
    characters that names the argument."""
    huge = [0.5] * 100_000
    q = torch.zeros(1, 2, 3, 8)
    args, kw = dict(q=q, k=q, v=q), {}
    if what in ("q", "k"):
        args[what] = huge
    elif what == "backend":
        kw["backend"] = "c" * 100_000
    else:
        kw[what] = huge
    with pytest.raises((TypeError, ValueError)) as info:
        if what == "set_cpu_backend":
            cat.set_cpu_backend("c" * 100_000)
        else:
            cat.cosine_sim_attention(args["q"], args["k"], args["v"], **kw)
    msg = str(info.value)
    assert len(msg) < 300 and (what.split("_")[0] in msg or what == "set_cpu_backend"), (len(msg), msg[:400])


# ------------------------------------------------------------------------- scale values, every backend

BAD_SCALES = {"negative": [2.0, -1.0, 3.0, 4.0], "zero": [2.0, 0.0, 3.0, 4.0], "nan": [2.0, float("nan"), 3.0, 4.0],
              "inf": [2.0, float("inf"), 3.0, 4.0], "0-d negative": -2.0, "0-d nan": float("nan")}


def _numpy_scale_error(values, backend):
    q = np.random.default_rng(0).standard_normal((1, 4, 5, 8)).astype(np.float32)
    with pytest.raises(ValueError) as info:
        ca.forward(q, q, q, scale=np.asarray(values, dtype=np.float64), backend=backend)
    return str(info.value)


@pytest.mark.parametrize("bad", sorted(BAD_SCALES))
def test_bad_scale_tensor_raises_the_same_error_on_every_backend(bad):
    """A scale tensor with a value <= 0, NaN or Inf: the same ValueError from the NumPy reference and
    emulator, and from the torch op on each CPU backend, eager and compiled, forward and backward op."""
    values = BAD_SCALES[bad]
    want = _numpy_scale_error(values, "reference")
    assert want.startswith("scale must be finite and > 0")
    assert _numpy_scale_error(values, "emulator") == want
    q = torch.randn(1, 4, 5, 8, requires_grad=True)
    scale = torch.tensor(values, requires_grad=True)
    for backend in ("auto", "torch", "reference", "emulator"):
        with pytest.raises(ValueError) as info:
            cat.cosine_sim_attention(q, q, q, scale=scale, backend=backend)
        assert str(info.value) == want, backend
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, s: cat.cosine_sim_attention(q, q, q, scale=s), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(ValueError) as info:
        compiled(q, scale)
    assert want in str(info.value)
    # the backward op checks too (it may be called on its own)
    good = torch.full_like(scale, 3.0)
    out, lse = torch.ops.cupy_cosattn.attn_fwd(q.detach(), q.detach(), q.detach(), None, None, good.detach(), 1.0,
                                               False, 1, False, True, False)
    with pytest.raises(ValueError) as info:
        torch.ops.cupy_cosattn.attn_bwd(out, q.detach(), q.detach(), q.detach(), out, lse, None, None,
                                        scale.detach(), 1.0, False, 1, False, True, False)
    assert str(info.value) == want


@pytest.mark.gpu
@pytest.mark.parametrize("bad", ["negative", "nan", "0-d negative"])
def test_gpu_bad_scale_tensor_raises_the_same_error(bad):
    import cupy

    values = BAD_SCALES[bad]
    want = _numpy_scale_error(values, "reference")
    qc = cupy.asarray(np.random.default_rng(0).standard_normal((1, 4, 5, 8)).astype(np.float32))
    with pytest.raises(ValueError) as info:
        ca.forward(qc, qc, qc, scale=cupy.asarray(values, dtype=cupy.float64))
    assert str(info.value) == want
    q = torch.randn(1, 4, 5, 8, device="cuda", requires_grad=True)
    with pytest.raises(ValueError) as info:
        cat.cosine_sim_attention(q, q, q, scale=torch.tensor(values, device="cuda", requires_grad=True))
    assert str(info.value) == want


# ---------------------------------------------------------------------------------- custom op machinery

def test_custom_ops_registered_and_opcheck():
    assert hasattr(torch.ops.cupy_cosattn, "attn_fwd") and hasattr(torch.ops.cupy_cosattn, "attn_bwd")
    q, k, v, mask, bias, scale, kw = make_case("head-bias-per-head-scale")
    q, k, v, bias, scale = (t.detach() for t in (q, k, v, bias, scale))
    fwd_args = (q, k, v, mask, bias, scale, 1.0, False, 1, True, True, False)
    torch.library.opcheck(torch.ops.cupy_cosattn.attn_fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.cupy_cosattn.attn_fwd.default,
                          tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                                for t in fwd_args))
    out, lse = torch.ops.cupy_cosattn.attn_fwd(*(t.detach() if isinstance(t, torch.Tensor) else t for t in fwd_args))
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, mask, bias.detach(),
                scale.detach(), 1.0, False, 1, True, True, False)
    torch.library.opcheck(torch.ops.cupy_cosattn.attn_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")  # torch internals
def test_compile_fullgraph_matches_eager():
    q, k, v, mask, bias, scale, kw = make_case("head-bias-per-head-scale")

    def loss_fn(q, k, v, bias, scale):
        o = cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=scale, causal=True)
        return (o * o).sum()

    args = (q, k, v, bias, scale)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    lc = compiled(*args)
    gc = torch.autograd.grad(lc, args)
    le = loss_fn(*args)
    ge = torch.autograd.grad(le, args)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the op is one node of the graph, not a graph break
    explain = torch._dynamo.explain(loss_fn)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


def test_autocast_bf16_cpu_runs_in_autocast_dtype():
    q, k, v, mask, bias, scale, kw = make_case("head-bias-per-head-scale")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cat.cosine_sim_attention(q, k, v, mask=mask, attn_bias=bias, scale=scale, causal=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for t in (q, k, v, bias, scale):  # gradients reach the float32 leaves in their own dtype
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()
    ref = cat.cosine_sim_attention(q.detach(), k.detach(), v.detach(), mask=mask, attn_bias=bias.detach(),
                                   scale=scale.detach(), causal=True)
    assert rel(out.float(), ref.numpy()) < 2e-2


def test_import_does_not_import_cupy():
    code = "import sys, cupy_cosattn.torch, cupy_cosattn.transformer; sys.exit('cupy' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_gpu_zero_copy_reads_and_writes_torch_memory(monkeypatch):
    """On a non-default torch stream: the kernels read and write the tensors' own memory (both ways),
    launch on that stream (CuPy's current stream during the calls is torch's), and every CuPy allocation
    comes from torch's caching allocator (CuPy's default pool is not touched)."""
    import cupy

    from cupy_cosattn import api

    seen = {}
    fwd, bwd = api.forward_canonical, api.backward_canonical
    pool = cupy.get_default_memory_pool()

    def spy_fwd(prob, inp, backend, out=None, lse=None):
        seen["fwd_in"] = (inp.q.data.ptr, inp.k.data.ptr, inp.v.data.ptr, inp.bias.data.ptr)
        seen["fwd_out"] = (out.data.ptr, lse.data.ptr)
        seen["backend"] = backend
        seen["fwd_stream"] = cupy.cuda.get_current_stream().ptr
        res = fwd(prob, inp, backend, out=out, lse=lse)
        seen["fwd_pool"] = pool.used_bytes()
        return res

    def spy_bwd(prob, inp, dout, out, lse, backend, need_dscale=True):
        seen.setdefault("bwd_stream", []).append(cupy.cuda.get_current_stream().ptr)
        seen.setdefault("need_dscale", []).append(need_dscale)
        res = bwd(prob, inp, dout, out, lse, backend, need_dscale=need_dscale)
        seen.setdefault("bwd_pool", []).append(pool.used_bytes())  # the gradients are alive here
        seen["bwd_in"] = (inp.q.data.ptr, dout.data.ptr, out.data.ptr, lse.data.ptr)
        seen["bwd_out"] = tuple(r.data.ptr for r in res[:4])
        return res

    monkeypatch.setattr(api, "forward_canonical", spy_fwd)
    monkeypatch.setattr(api, "backward_canonical", spy_bwd)
    dev = torch.device("cuda")
    used0, total0 = pool.used_bytes(), pool.total_bytes()
    s = torch.cuda.Stream(device=dev)
    assert s.cuda_stream != torch.cuda.current_stream(dev).cuda_stream
    with torch.cuda.stream(s):
        q = torch.randn(2, 4, 64, 64, device=dev, dtype=torch.float16, requires_grad=True)
        k = torch.randn(2, 4, 80, 64, device=dev, dtype=torch.float16, requires_grad=True)
        v = torch.randn(2, 4, 80, 64, device=dev, dtype=torch.float16, requires_grad=True)
        bias = torch.randn(4, 64, 80, device=dev, dtype=torch.float16, requires_grad=True)
        out, lse = cat.forward(q, k, v, attn_bias=bias, causal=True)
        assert seen["backend"] == "cuda"
        assert seen["fwd_in"] == (q.data_ptr(), k.data_ptr(), v.data_ptr(), bias.data_ptr())
        assert seen["fwd_out"] == (out.data_ptr(), lse.data_ptr())
        dout = torch.randn_like(out)
        grads = torch.ops.cupy_cosattn.attn_bwd(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, None,
                                                bias.detach(), None, 8.0, False, 1, True, True, False)
        assert seen["bwd_in"] == (q.data_ptr(), dout.data_ptr(), out.data_ptr(), lse.data_ptr())
        assert seen["bwd_out"] == tuple(g.data_ptr() for g in grads[:4])  # the kernels' gradients, not copies
        out.backward(dout)  # autograd runs the backward on the forward's stream, s
        for g, t in zip(grads, (q, k, v, bias)):
            torch.testing.assert_close(t.grad, g, rtol=1e-2, atol=1e-2)  # float atomics: order may differ
    torch.cuda.synchronize()
    assert seen["fwd_stream"] == s.cuda_stream
    assert seen["bwd_stream"] == [s.cuda_stream, s.cuda_stream]  # the explicit op call and autograd's
    assert seen["need_dscale"] == [False, False]  # a float scale: no dscale, no device-to-host copy
    assert seen["fwd_pool"] == used0 and seen["bwd_pool"] == [used0, used0]
    assert pool.used_bytes() == used0 and pool.total_bytes() == total0


@pytest.mark.gpu
def test_gpu_float64_is_refused_with_where_it_runs():
    import cupy

    q = torch.randn(1, 2, 5, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype float64, which backend='cuda' does not take.*CPU tensors"):
        cat.cosine_sim_attention(q, q, q)
    qc = cupy.asarray(q.cpu().numpy())
    with pytest.raises(TypeError, match="dtype float64, which backend='cuda' does not take.*backend='reference'"):
        ca.forward(qc, qc, qc)


@pytest.mark.gpu
def test_gpu_backend_keyword():
    dev = torch.device("cuda")
    q, k, v = (torch.randn(2, 4, 33, 32, device=dev, dtype=torch.float16) for _ in range(3))
    auto = cat.cosine_sim_attention(q, k, v, causal=True)
    torch.testing.assert_close(cat.cosine_sim_attention(q, k, v, causal=True, backend="cuda"), auto, rtol=0, atol=0)
    for b in ("torch", "emulator", "reference"):
        with pytest.raises(ValueError, match=f"backend='{b}' runs CPU tensors, but q is on cuda"):
            cat.cosine_sim_attention(q, k, v, backend=b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol_out,tol_grad",
                         [(dt, OUT[n], GRAD[n]) for dt, n in ((torch.float32, "float32"), (torch.float16, "float16"),
                                                              (torch.bfloat16, "bfloat16"))])
@pytest.mark.parametrize("name", ["mha-causal", "gqa-groups-causal", "mqa-3d-kv", "merged-bias-mask-causal",
                                  "head-bias-per-head-scale", "full-bias-nq-gt-nk-causal"])
def test_gpu_matches_reference(name, dtype, tol_out, tol_grad):
    q, k, v, mask, bias, scale, kw = make_case(name, dtype)
    dev = torch.device("cuda")
    q, k, v = (t.detach().to(dev).requires_grad_() for t in (q, k, v))
    bias = None if bias is None else bias.detach().to(dev).requires_grad_()
    mask = None if mask is None else mask.to(dev)
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().float().to(dev).requires_grad_()
    out, grads, ro, rg = run_both(q, k, v, mask, bias, scale, kw)
    assert out.is_cuda and out.dtype == dtype
    assert rel(out.float(), np.asarray(ro, np.float64)) <= tol_out
    for g, r in zip(grads, rg):
        if g is None or r is None:
            continue
        assert g.is_cuda and torch.isfinite(g.float()).all()
        assert rel(g.float(), np.asarray(r, dtype=np.float64)) <= tol_grad


@pytest.mark.gpu
def test_gpu_autocast_and_compile():
    dev = torch.device("cuda")
    q, k, v = (torch.randn(2, 4, 128, 64, device=dev, requires_grad=True) for _ in range(3))
    with torch.autocast("cuda", dtype=torch.float16):
        out = cat.cosine_sim_attention(q, k, v, causal=True)
    assert out.dtype == torch.float16
    out.float().sum().backward()
    assert q.grad.dtype == torch.float32
    f = torch.compile(lambda q, k, v: cat.cosine_sim_attention(q, k, v, causal=True), fullgraph=True)
    torch.testing.assert_close(f(q, k, v), cat.cosine_sim_attention(q, k, v, causal=True))


@pytest.mark.parametrize("tensor_scale", [False, True])
def test_kernel_backward_asks_for_dscale_only_for_a_tensor_scale(monkeypatch, tensor_scale):
    """dscale is the backward's only device-to-host copy on the GPU: the op skips it for a float scale
    (checked on CPU tensors through the emulator backend, which takes the same glue)."""
    from cupy_cosattn import api

    calls = []
    real = api.backward_canonical

    def spy(*args, need_dscale=True):
        calls.append(need_dscale)
        return real(*args, need_dscale=need_dscale)

    monkeypatch.setattr(api, "backward_canonical", spy)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 16, generator=g, requires_grad=True) for _ in range(3))
    scale = torch.tensor([6.0, 9.0], requires_grad=True) if tensor_scale else 8.0
    cat.cosine_sim_attention(q, k, v, scale=scale, backend="emulator").sum().backward()
    assert calls == [tensor_scale]
    if tensor_scale:
        ref = torch.tensor([6.0, 9.0], requires_grad=True)
        cat.cosine_sim_attention(q.detach(), k.detach(), v.detach(), scale=ref, backend="reference").sum().backward()
        torch.testing.assert_close(scale.grad, ref.grad, rtol=1e-4, atol=1e-5)
