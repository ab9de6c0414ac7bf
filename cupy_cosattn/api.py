"""Public functions: forward, backward, cosine_sim_attention (docs/design.md section 2), and
kvcache_forward (attention of new queries against a KV cache; cupy_cosattn.kvcache).

Each call checks its arguments once (problem.canonicalize), resolves the backend name once
(backends.resolve_backend), runs its implementation (backends.backend_impl) on the canonical 4-D
views and reshapes the results back to the caller's layout. Implementations provide

    forward(prob, inp, out=None, lse=None) -> (out (B, H, Nq, D), lse (B, H, Nq) float32)
    backward(prob, inp, dout, out, lse, need_dscale=True)
        -> (dq (B, H, Nq, D), dk (B, Hk, Nk, D), dv, dbias | None, dscale (H,) float64 NumPy | None)

where dbias has the shape of ``inp.bias`` (the 4-D broadcast view). Empty problems (Nq = 0 or
Nk = 0) are answered here and never reach a backend: nothing is launched for them.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import problem as _problem
from .backends import BACKENDS, backend_impl, check_backend_dtype, resolve_backend  # noqa: F401  (BACKENDS: part of this module's names)
from .problem import Array, Inputs, Problem, array_library, canonicalize, check_backward_extras, into_outputs


def _xp(lib: str) -> Any:
    if lib == "cupy":
        import cupy

        return cupy
    return np


def _empty_forward(prob: Problem, inp: Inputs, xp: Any) -> tuple[Array, Array]:
    out = xp.zeros((prob.B, prob.H, prob.Nq, prob.D), dtype=prob.dtype)
    lse = xp.full((prob.B, prob.H, prob.Nq), -np.inf, dtype=np.float32)
    return out, lse


def forward_canonical(prob: Problem, inp: Inputs, backend: str, out: Optional[Array] = None,
                      lse: Optional[Array] = None) -> tuple[Array, Array]:
    """Run a checked problem on backend `backend`; `out`/`lse` optionally preallocated (canonical shapes)."""
    check_backend_dtype(prob, backend)
    xp = _xp(array_library(inp.q))
    if prob.Nq == 0 or prob.Nk == 0:
        o, ls = _empty_forward(prob, inp, xp)
        return into_outputs(o, ls, out, lse)
    return backend_impl(backend).forward(prob, inp, out=out, lse=lse)


def backward_canonical(prob: Problem, inp: Inputs, dout: Array, out: Array, lse: Array, backend: str,
                       need_dscale: bool = True) -> tuple[Array, Array, Array, Optional[Array], Optional[np.ndarray]]:
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
    return backend_impl(backend).backward(prob, inp, dout, out, lse, need_dscale=need_dscale)


def forward(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None, attn_bias: Optional[Array] = None,
            attn_bias_batch_dim: bool = False, scale: Any = _problem.DEFAULT_SCALE, groups: int = 1,
            causal: bool = False, l2norm_qk: bool = True, deterministic: bool = False,
            backend: str = "auto") -> tuple[Array, Array]:
    """Cosine-sim attention forward pass.

    q: (B, H, Nq, D) or merged (BH, Nq, D); k, v: (B, Hk, Nk, D), (B, Nk, D) or merged (BH, Nk, D).
    Returns (out, lse): out has q's shape and dtype; lse (q.shape[:-1], float32) is the log-sum-exp
    of each row's visible logits (-inf for a row with no visible key), which `backward` needs.
    """
    prob, inp = canonicalize(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim,
                             scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                             deterministic=deterministic)
    name = resolve_backend(backend, array_library(q))
    out, lse = forward_canonical(prob, inp, name)
    return out.reshape(q.shape), lse.reshape(q.shape[:-1])


def backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, *, mask: Optional[Array] = None,
             attn_bias: Optional[Array] = None, attn_bias_batch_dim: bool = False, scale: Any = _problem.DEFAULT_SCALE,
             groups: int = 1, causal: bool = False, l2norm_qk: bool = True, deterministic: bool = False,
             backend: str = "auto") -> tuple[Array, Array, Array, Optional[Array], Any]:
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


def _user_dscale(dscale: np.ndarray, scale: Any, prob: Problem) -> Any:
    """dscale in the caller's form: a float for a scalar scale, else like the scale array."""
    dscale = np.asarray(dscale, dtype=np.float64)
    if not prob.per_head_scale:
        return float(dscale.sum())
    lib = array_library(scale)
    dtype = np.dtype(scale.dtype)
    dtype = dtype if _problem.is_real_dtype(dtype) and not np.issubdtype(dtype, np.integer) else np.float64
    res = dscale.reshape(scale.shape).astype(dtype)
    return _xp(lib).asarray(res) if lib == "cupy" else res


def cosine_sim_attention(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None,
                         attn_bias: Optional[Array] = None, attn_bias_batch_dim: bool = False,
                         scale: Any = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = False,
                         l2norm_qk: bool = True, deterministic: bool = False, backend: str = "auto") -> Array:
    """Cosine-sim attention output (q's shape and dtype); see `forward`. For gradients use
    `backward`, or cupy_cosattn.torch for autograd."""
    return forward(q, k, v, mask=mask, attn_bias=attn_bias, attn_bias_batch_dim=attn_bias_batch_dim, scale=scale,
                   groups=groups, causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic,
                   backend=backend)[0]


# ---------------------------------------------------------------------------------------------------
# Packed variable-length batches (cupy_cosattn/varlen.py).

def _varlen_empty(prob: Problem) -> bool:
    """No kernel to run: no query rows, or no key in any sequence (every row then has none)."""
    return prob.total_q == 0 or prob.Nk == 0


def varlen_forward_canonical(prob: Problem, inp: Inputs, backend: str, out: Optional[Array] = None,
                             lse: Optional[Array] = None) -> tuple[Array, Array]:
    """varlen_forward of a checked problem (out (total_q, H, D), lse (total_q, H); optionally preallocated)."""
    check_backend_dtype(prob, backend)
    xp = _xp(array_library(inp.q))
    if _varlen_empty(prob):
        o = xp.zeros((prob.total_q, prob.H, prob.D), dtype=prob.dtype)
        ls = xp.full((prob.total_q, prob.H), -np.inf, dtype=np.float32)
        return into_outputs(o, ls, out, lse)
    return backend_impl(backend).forward(prob, inp, out=out, lse=lse)


def varlen_backward_canonical(prob: Problem, inp: Inputs, dout: Array, out: Array, lse: Array, backend: str,
                              need_dscale: bool = True) -> tuple[Array, Array, Array, Optional[np.ndarray]]:
    """(dq, dk, dv, dscale (H,) float64 | None) of a checked varlen problem, packed like q, k, v."""
    check_backend_dtype(prob, backend)
    xp = _xp(array_library(inp.q))
    if _varlen_empty(prob):
        zeros = [xp.zeros(x.shape, dtype=prob.dtype) for x in (inp.q, inp.k, inp.v)]
        return (*zeros, np.zeros((prob.H,), dtype=np.float64))
    dq, dk, dv, _, dscale = backend_impl(backend).backward(prob, inp, dout, out, lse, need_dscale=need_dscale)
    return dq, dk, dv, dscale


def varlen_forward(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, *,
                   max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                   scale: Any = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = False, l2norm_qk: bool = True,
                   backend: str = "auto") -> tuple[Array, Array]:
    """Cosine-sim attention over a packed batch of variable-length sequences.

    q (total_q, H, D); k, v (total_k, Hk, D) with H % Hk == 0 (any strides); cu_seqlens_q,
    cu_seqlens_k int32 (batch + 1,), starting at 0, non-decreasing, ending at total_q / total_k:
    sequence b is q[cu_seqlens_q[b]:cu_seqlens_q[b+1]] attending to k, v[cu_seqlens_k[b]:cu_seqlens_k[b+1]]
    only (causal: bottom-right per sequence). max_seqlen_q / _k, when given, must be at least the
    longest sequence (they are checked against the cu_seqlens; the host copy of cu_seqlens that this
    check and the launch read costs one device-to-host copy on CuPy arrays). Other keywords as `forward`.

    Returns (out (total_q, H, D) in q's dtype, lse (total_q, H) float32; -inf for a row without keys).
    """
    from .varlen import canonicalize_varlen

    prob, inp = canonicalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                    max_seqlen_k=max_seqlen_k, scale=scale, groups=groups, causal=causal,
                                    l2norm_qk=l2norm_qk)
    name = resolve_backend(backend, array_library(q))
    return varlen_forward_canonical(prob, inp, name)


def varlen_backward(dout: Array, q: Array, k: Array, v: Array, out: Array, lse: Array, cu_seqlens_q: Array,
                    cu_seqlens_k: Array, *, max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                    scale: Any = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = False,
                    l2norm_qk: bool = True, deterministic: bool = False,
                    backend: str = "auto") -> tuple[Array, Array, Array, Any]:
    """Gradients of `varlen_forward` given dout = dL/dout (total_q, H, D) and its out, lse.

    Returns (dq, dk, dv, dscale): dq, dk, dv shaped and typed like q, k, v; dscale a float for a scalar
    scale, else an array of shape (H,) like the scale. deterministic=True: bitwise repeatable."""
    from .varlen import canonicalize_varlen, check_varlen_backward_extras

    prob, inp = canonicalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=max_seqlen_q,
                                    max_seqlen_k=max_seqlen_k, scale=scale, groups=groups, causal=causal,
                                    l2norm_qk=l2norm_qk, deterministic=deterministic)
    lib = array_library(q)
    name = resolve_backend(backend, lib)
    check_varlen_backward_extras(prob, lib, _problem._device_of(q), dout, out, lse)
    dq, dk, dv, dscale = varlen_backward_canonical(prob, inp, dout, out, lse, name)
    return dq, dk, dv, _user_dscale(dscale, scale, prob)


def kvcache_forward(q: Array, k_cache: Array, v_cache: Array, cache_seqlens: Array, *,
                    block_table: Optional[Array] = None, k_new: Optional[Array] = None, v_new: Optional[Array] = None,
                    scale: Any = _problem.DEFAULT_SCALE, groups: int = 1, causal: bool = True, l2norm_qk: bool = True,
                    num_splits: int = 0, backend: str = "auto") -> tuple[Array, Array]:
    """KV-cache attention (inference): q (B, H, Nq, D) against a contiguous (B, Hk, N_max, D) or, with
    block_table int32 (B, max_pages), paged (num_pages, Hk, page_size, D) cache holding cache_seqlens
    (int32 (B,)) raw keys per sequence; k_new, v_new (B, Hk, Nq, D), when given, are first written into
    the cache in place at positions cache_seqlens[b] ... + Nq - 1. Causal is bottom-right per sequence.
    num_splits: key-range splits per sequence (0: chosen from the problem and the device). See
    cupy_cosattn.kvcache for the layouts and the cache contract.

    Returns (out (B, H, Nq, D) in q's dtype, lse (B, H, Nq) float32, -inf for a query without a visible
    key). Every argument is checked, on the host copy of cache_seqlens and of the block table entries
    in use, before anything is launched or written."""
    from .kvcache import check_kvcache

    prob, inp = check_kvcache(q, k_cache, v_cache, cache_seqlens, block_table=block_table, k_new=k_new,
                              v_new=v_new, scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm_qk,
                              num_splits=num_splits)
    name = resolve_backend(backend, array_library(q))
    check_backend_dtype(prob, name)
    return backend_impl(name).kvcache(prob, inp)
