"""Public functions: forward, backward, cosine_sim_attention (docs/design.md section 2).

Each call checks its arguments once (problem.canonicalize), picks a backend, runs it on the canonical
4-D views and reshapes the results back to the caller's layout. Backends implement

    forward(prob, inp, out=None, lse=None) -> (out (B, H, Nq, D), lse (B, H, Nq) float32)
    backward(prob, inp, dout, out, lse)   -> (dq (B, H, Nq, D), dk (B, Hk, Nk, D), dv, dbias | None,
                                              dscale (H,) float64 NumPy)

where dbias has the shape of ``inp.bias`` (the 4-D broadcast view). Empty problems (Nq = 0 or
Nk = 0) are answered here and never reach a backend: nothing is launched for them.
"""
from __future__ import annotations

import numpy as np

from . import problem as _problem
from .problem import Inputs, Problem, array_library, canonicalize, check_backward_extras

BACKENDS = ("auto", "cuda", "emulator", "reference")


def resolve_backend(backend, lib: str) -> str:
    """The concrete backend for arrays of library `lib` ('numpy' or 'cupy')."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {_problem._quote(backend)}")
    if backend == "auto":
        return "cuda" if lib == "cupy" else "reference"
    if backend == "cuda" and lib != "cupy":
        raise TypeError(f"backend='cuda' runs on CuPy arrays, got {lib} arrays (use backend='emulator' "
                        f"to run the same kernels on the CPU)")
    if backend in ("emulator", "reference") and lib != "numpy":
        raise TypeError(f"backend={backend!r} runs on NumPy arrays, got {lib} arrays")
    return backend


def backend_impl(name: str):
    """The module implementing backend `name` (imported lazily: CuPy only for 'cuda')."""
    if name == "reference":
        from . import reference

        return reference
    from . import launch

    return launch.Backend(name)


def _xp(lib: str):
    if lib == "cupy":
        import cupy

        return cupy
    return np


def _empty_forward(prob: Problem, inp: Inputs, xp):
    out = xp.zeros((prob.B, prob.H, prob.Nq, prob.D), dtype=prob.dtype)
    lse = xp.full((prob.B, prob.H, prob.Nq), -np.inf, dtype=np.float32)
    return out, lse


def check_backend_dtype(prob: Problem, backend: str) -> None:
    """Raise TypeError when `backend` cannot run prob's dtype (float64 runs on the reference only)."""
    if backend != "reference":
        _problem.check_kernel_dtype(prob.dtype, backend)


def forward_canonical(prob: Problem, inp: Inputs, backend: str, out=None, lse=None):
    """Run a checked problem on backend `backend`; `out`/`lse` optionally preallocated (canonical shapes)."""
    check_backend_dtype(prob, backend)
    xp = _xp(array_library(inp.q))
    if prob.Nq == 0 or prob.Nk == 0:
        o, l = _empty_forward(prob, inp, xp)
        if out is not None:
            out[...] = o
            o = out
        if lse is not None:
            lse[...] = l
            l = lse
        return o, l
    return backend_impl(backend).forward(prob, inp, out=out, lse=lse)


def backward_canonical(prob: Problem, inp: Inputs, dout, out, lse, backend: str, need_dscale: bool = True):
    """Gradients of a checked problem (canonical shapes in and out; see the module docstring).
    need_dscale=False lets the kernel backends skip dscale (returned as None), which on the GPU also
    skips the backward's only device-to-host copy; the reference computes it regardless."""
    check_backend_dtype(prob, backend)
    xp = _xp(array_library(inp.q))
    if prob.Nq == 0 or prob.Nk == 0:
        dq = xp.zeros(inp.q.shape, dtype=prob.dtype)
        dk = xp.zeros(inp.k.shape, dtype=prob.dtype)
        dv = xp.zeros(inp.v.shape, dtype=prob.dtype)
        dbias = None if inp.bias is None else xp.zeros(inp.bias.shape, dtype=inp.bias.dtype)
        return dq, dk, dv, dbias, np.zeros((prob.H,), dtype=np.float64)
    impl = backend_impl(backend)
    if need_dscale or backend == "reference":
        return impl.backward(prob, inp, dout, out, lse)
    return impl.backward(prob, inp, dout, out, lse, need_dscale=False)


def forward(q, k, v, *, mask=None, attn_bias=None, attn_bias_batch_dim=False, scale=_problem.DEFAULT_SCALE,
            groups=1, causal=False, l2norm_qk=True, deterministic=False, backend="auto"):
    """Cosine-sim attention forward pass.

    q: (B, H, Nq, D) or merged (BH, Nq, D); k, v: (B, Hk, Nk, D), (B, Nk, D) or merged (BH, Nk, D).
    dtypes float16, bfloat16, float32; float64 too on backend "reference" (and "auto" with NumPy
    arrays, which is the reference), which computes in float64 whatever the input.
    Returns (out, lse): out has q's shape and dtype; lse (q.shape[:-1], float32) is the log-sum-exp
    of each row's visible logits (-inf for a row with no visible key), which `backward` needs.
    """
    prob, inp = canonicalize(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim,
                             scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                             deterministic=deterministic)
    name = resolve_backend(backend, array_library(q))
    out, lse = forward_canonical(prob, inp, name)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward(dout, q, k, v, out, lse, *, mask=None, attn_bias=None, attn_bias_batch_dim=False,
             scale=_problem.DEFAULT_SCALE, groups=1, causal=False, l2norm_qk=True, deterministic=False,
             backend="auto"):
    """Gradients of `forward` given dout = dL/dout, and out, lse from `forward`.

    Returns (dq, dk, dv, dbias, dscale): dq, dk, dv shaped and typed like q, k, v; dbias like attn_bias
    (None without a bias); dscale a float for a scalar scale, else an array of shape (H,) in the scale
    array's library and dtype.
    """
    prob, inp = canonicalize(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim,
                             scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                             deterministic=deterministic)
    lib = array_library(q)
    name = resolve_backend(backend, lib)
    dout4, out4, lse3 = check_backward_extras(prob, q.shape, _problem._device_of(q), lib, dout, out, lse)
    dq, dk, dv, dbias, dscale = backward_canonical(prob, inp, dout4, out4, lse3, name)
    dbias = None if dbias is None else dbias.reshape(attn_bias.shape)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape), dbias, _user_dscale(dscale, scale, prob)


def _user_dscale(dscale, scale, prob: Problem):
    """dscale in the caller's form: a float for a scalar scale, else like the scale array."""
    dscale = np.asarray(dscale, dtype=np.float64)
    if not prob.per_head_scale:
        return float(dscale.sum())
    lib = array_library(scale)
    dtype = np.dtype(scale.dtype)
    dtype = dtype if _problem.is_real_dtype(dtype) and not np.issubdtype(dtype, np.integer) else np.float64
    res = dscale.reshape(scale.shape).astype(dtype)
    return _xp(lib).asarray(res) if lib == "cupy" else res


def cosine_sim_attention(q, k, v, *, mask=None, attn_bias=None, attn_bias_batch_dim=False,
                         scale=_problem.DEFAULT_SCALE, groups=1, causal=False, l2norm_qk=True,
                         deterministic=False, backend="auto"):
    """Cosine-sim attention output (q's shape and dtype); see `forward`. For gradients use
    `backward`, or cupy_cosattn.torch for autograd."""
    return forward(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim, scale=scale,
                   groups=groups, causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic,
                   backend=backend)[0]
