"""cupy_cosattn.torch.varlen_cosine_sim_attention: the packed-batch custom ops (autograd, fake
implementations, opcheck, torch.compile without graph breaks) on CPU tensors, against the dense op run
on each sequence; the kernel glue through the emulator; the argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cupy_cosattn.torch as cat

LENS_Q = [0, 1, 9, 20, 3]
LENS_K = [2, 1, 12, 20, 0]


def cu(lens, device="cpu"):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)


def make(seed=0, dtype=torch.float32, H=4, Hk=2, D=16, lens_q=LENS_Q, lens_k=LENS_K):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    k = torch.randn(sum(lens_k), Hk, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(sum(lens_k), Hk, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    scale = torch.linspace(4.0, 9.0, H, dtype=dtype).requires_grad_()
    return q, k, v, cu(lens_q), cu(lens_k), scale


def dense_per_sequence(q, k, v, cu_q, cu_k, scale, causal):
    """out of the dense op on each sequence, packed back (the definition of the packed op)."""
    outs = []
    for b in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        qb = q[qs].transpose(0, 1).unsqueeze(0)
        kb, vb = (x[ks].transpose(0, 1).unsqueeze(0) for x in (k, v))
        outs.append(cat.cosine_sim_attention(qb, kb, vb, scale=scale, causal=causal)[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_dense_op_per_sequence_with_gradients(causal):
    q, k, v, cu_q, cu_k, scale = make(1)
    args = (q, k, v, scale)
    o = cat.varlen_cosine_sim_attention(q, k, v, cu_q, cu_k, scale=scale, causal=causal)
    ref = dense_per_sequence(q, k, v, cu_q, cu_k, scale, causal)
    w = torch.randn_like(ref)
    g = torch.autograd.grad((o * w).sum(), args)
    gr = torch.autograd.grad((ref * w).sum(), args)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6)
    for a, b, name in zip(g, gr, ("dq", "dk", "dv", "dscale")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_gradcheck_float64():
    q, k, v, cu_q, cu_k, scale = make(2, torch.float64, H=2, Hk=1, D=8, lens_q=[2, 0, 3], lens_k=[3, 1, 2])
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: cat.varlen_cosine_sim_attention(q, k, v, cu_q, cu_k, scale=s, causal=True), (q, k, v, scale))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_emulator_backend_matches_torch_backend(dtype):
    """The kernel glue (zero-copy views, preallocated out / lse, gradients back to torch) through the
    emulator, against the CPU implementation."""
    q, k, v, cu_q, cu_k, scale = make(3, dtype)
    res = {}
    for backend in ("torch", "emulator"):
        o, lse = cat.varlen_forward(q, k, v, cu_q, cu_k, scale=scale, causal=True, backend=backend)
        res[backend] = (o, lse, *torch.autograd.grad((o.float() ** 2).sum(), (q, k, v, scale)))
    finite = torch.isfinite(res["torch"][1])
    assert torch.equal(finite, torch.isfinite(res["emulator"][1]))
    lse_err = (res["torch"][1][finite] - res["emulator"][1][finite]).abs().max()
    assert lse_err < {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}[dtype]
    res = {name: r[:1] + r[2:] for name, r in res.items()}
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}[dtype]
    for a, b in zip(res["emulator"], res["torch"]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        a, b = a.detach().double(), b.detach().double()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err < tol


def test_lse_and_empty_rows():
    q, k, v, cu_q, cu_k, scale = make(4)
    out, lse = cat.varlen_forward(q, k, v, cu_q, cu_k, scale=scale)
    assert lse.shape == q.shape[:2] and lse.dtype == torch.float32 and not lse.requires_grad
    rows = slice(int(cu_q[4]), int(cu_q[5]))  # the sequence with queries and no keys
    assert torch.all(out[rows] == 0) and torch.all(lse[rows] == float("-inf"))


def test_custom_ops_opcheck():
    q, k, v, cu_q, cu_k, scale = (t.detach() for t in make(5))
    fwd_args = (q, k, v, cu_q, cu_k, scale, 1.0, None, None, 1, True, True, False)
    torch.library.opcheck(torch.ops.cupy_cosattn.varlen_fwd.default, fwd_args)
    torch.library.opcheck(torch.ops.cupy_cosattn.varlen_fwd.default,
                          tuple(t.clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
                                else t for t in fwd_args))
    out, lse = torch.ops.cupy_cosattn.varlen_fwd(*fwd_args)
    bwd_args = (torch.randn_like(out), q, k, v, out, lse, cu_q, cu_k, scale, 1.0, None, None, 1, True, True, False)
    torch.library.opcheck(torch.ops.cupy_cosattn.varlen_bwd.default, bwd_args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method.* is deprecated:DeprecationWarning")  # torch internals
def test_compile_fullgraph_forward_and_backward():
    q, k, v, cu_q, cu_k, scale = make(6)

    def loss_fn(q, k, v, scale):
        o = cat.varlen_cosine_sim_attention(q, k, v, cu_q, cu_k, scale=scale, causal=True)
        return (o * o).sum()

    args = (q, k, v, scale)
    torch._dynamo.reset()
    lc = torch.compile(loss_fn, fullgraph=True)(*args)
    gc = torch.autograd.grad(lc, args)
    le = loss_fn(*args)
    ge = torch.autograd.grad(le, args)
    torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    explain = torch._dynamo.explain(loss_fn)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1


@pytest.mark.parametrize("bad, exc, msg", [
    (dict(cu_seqlens_q=cu([0, 1, 9, 20, 4])), ValueError, "cu_seqlens_q[-1] must equal"),
    (dict(cu_seqlens_q=cu(LENS_Q).long()), TypeError, "cu_seqlens_q must have dtype int32"),
    (dict(cu_seqlens_k=cu(LENS_K[:-1])), ValueError, "describe the same batch"),
    (dict(cu_seqlens_k=torch.tensor([0, 2, 1, 13, 33, 33], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(max_seqlen_q=5), ValueError, "max_seqlen_q = 5 is smaller"),
    (dict(q=np.zeros((33, 4, 16))), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.zeros(35, 3, 16)), ValueError, "k and v must have the same shape"),
])
def test_bad_arguments_raise(bad, exc, msg):
    q, k, v, cu_q, cu_k, _ = (t.detach() if isinstance(t, torch.Tensor) else t for t in make(7))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k) | bad
    pos = [args.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k")]
    with pytest.raises(exc) as ei:
        cat.varlen_cosine_sim_attention(*pos, **args)
    assert msg in str(ei.value), str(ei.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_matches_cpu(dtype):
    q, k, v, cu_q, cu_k, scale = make(8, dtype)
    res = {}
    for device in ("cpu", "cuda"):
        args = [t.detach().to(device).requires_grad_(t.requires_grad) for t in (q, k, v, scale)]
        o = cat.varlen_cosine_sim_attention(args[0], args[1], args[2], cu_q.to(device), cu_k.to(device),
                                            scale=args[3], causal=True)
        res[device] = [x.cpu() for x in (o, *torch.autograd.grad((o.float() ** 2).sum(), args))]
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-4}[dtype]
    for a, b in zip(res["cuda"], res["cpu"]):
        a, b = a.detach().double(), b.detach().double()
        assert float((a - b).norm() / b.norm().clamp_min(1e-30)) < tol
