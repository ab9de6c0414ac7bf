"""Packed variable-length batches (``cu_seqlens``, as FlashAttention's ``flash_attn_varlen_func``):
argument checks, the canonical problem, and the per-sequence float64 reference.

Layout: q (total_q, H, D), k and v (total_k, Hk, D) with H % Hk == 0; ``cu_seqlens_q``,
``cu_seqlens_k`` int32 (batch + 1,), starting at 0, non-decreasing, ending at total_q / total_k.
Sequence b holds query rows cu_seqlens_q[b] : cu_seqlens_q[b + 1] and key rows
cu_seqlens_k[b] : cu_seqlens_k[b + 1]; it attends within itself only, causal bottom-right per sequence
(query i of b sees key j iff j <= i + Nk_b - Nq_b). Empty sequences are allowed. lse is float32
(total_q, H) (q.shape[:-1], as in the dense API).

The canonical :class:`~cupy_cosattn.problem.Problem` of a varlen call has ``varlen=True``, B = the
number of sequences, Nq / Nk = the longest query / key sequence, and total_q / total_k; its
:class:`~cupy_cosattn.problem.Inputs` hold q, k, v in the caller's (total, heads, D) layout (any
strides) and the two cu_seqlens as host int32 NumPy copies (the launch needs the longest lengths on
the host for its grid, and the checks below read them there).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import problem as _p
from . import reference
from .problem import Array, Inputs, Problem, into_outputs

INT32 = np.dtype(np.int32)


def _host(x: Any) -> np.ndarray:
    return np.asarray(x.get() if _p.array_library(x) == "cupy" else x)


def _check_like_q(name: str, x: Any, lib: str, device: tuple, dtype: np.dtype) -> None:
    """Raise naming `name` unless x is an array of q's library `lib`, on q's `device`, of `dtype`."""
    if _p.array_library(x) != lib:
        raise TypeError(f"{name} must be a {lib} array like q, got {_p._describe(x)}")
    if _p._device_of(x) != device:
        raise ValueError(f"{name} is on {_p._device_str(_p._device_of(x))} but q is on {_p._device_str(device)}")
    if np.dtype(x.dtype) != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {x.dtype}")


def check_cu_seqlens(name: str, cu: Any, lib: str, device: tuple, total: int, total_name: str) -> np.ndarray:
    """The host int32 copy of cu_seqlens array `cu`; raises naming `name` unless it is an int32 1-D
    array of `lib` on `device` of length >= 1 that starts at 0, never decreases and ends at `total`."""
    _check_like_q(name, cu, lib, device, INT32)
    if cu.ndim != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must have shape (batch + 1,), got {tuple(cu.shape)}")
    host = np.ascontiguousarray(_host(cu), dtype=INT32)
    if host[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(host[0])}")
    steps = np.diff(host.astype(np.int64))
    if np.any(steps < 0):
        b = int(np.argmax(steps < 0))
        raise ValueError(f"{name} must be non-decreasing, got {name}[{b}] = {int(host[b])} > "
                         f"{name}[{b + 1}] = {int(host[b + 1])}")
    if int(host[-1]) != total:
        raise ValueError(f"{name}[-1] must equal {total_name} = {total}, got {int(host[-1])}")
    return host


def _max_seqlen(name: str, given: Any, lengths: np.ndarray) -> int:
    """The longest length; `given` (max_seqlen_q / _k), when not None, must be an int >= it."""
    longest = int(lengths.max()) if lengths.size else 0
    if given is None:
        return longest
    if isinstance(given, (bool, np.bool_)) or not isinstance(given, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {_p._describe(given)}")
    if int(given) < longest:
        raise ValueError(f"{name} = {int(given)} is smaller than the longest sequence in cu_seqlens ({longest})")
    return longest


def check_varlen_shapes(q_shape: tuple, k_shape: tuple, v_shape: tuple, cu_q_shape: tuple,
                        cu_k_shape: tuple) -> tuple[int, int, int, int, int, int]:
    """(batch, H, Hk, total_q, total_k, D) from the shapes alone (what a traced call can check);
    raises ValueError naming the argument."""
    for name, s in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(s) != 3:
            raise ValueError(f"{name} must be 3-D (total, heads, D) for a packed batch, got shape {tuple(s)}")
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"k and v must have the same shape, got k: {tuple(k_shape)}, v: {tuple(v_shape)}")
    total_q, H, D = (int(x) for x in q_shape)
    total_k, Hk, Dk = (int(x) for x in k_shape)
    if Dk != D:
        raise ValueError(f"q and k must share the head dim D, got q: {D}, k: {Dk}")
    if D < 1:
        raise ValueError(f"head dim D must be >= 1, got q of shape {tuple(q_shape)}")
    if H < 1 or Hk < 1 or H % Hk != 0:
        raise ValueError(f"q has H={H} heads, which k's Hk={Hk} kv heads must divide (grouped-query attention)")
    for name, s in (("cu_seqlens_q", cu_q_shape), ("cu_seqlens_k", cu_k_shape)):
        if len(s) != 1 or int(s[0]) < 1:
            raise ValueError(f"{name} must have shape (batch + 1,), got {tuple(s)}")
    if int(cu_q_shape[0]) != int(cu_k_shape[0]):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same batch, got shapes "
                         f"{tuple(cu_q_shape)} and {tuple(cu_k_shape)}")
    return int(cu_q_shape[0]) - 1, H, Hk, total_q, total_k, D


def canonicalize_varlen(q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, *,
                        max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                        scale: Any = _p.DEFAULT_SCALE, groups: int = 1, causal: bool = False, l2norm_qk: bool = True,
                        deterministic: bool = False) -> tuple[Problem, Inputs]:
    """Check every argument of a varlen call and return (Problem, Inputs); raises ValueError /
    TypeError naming the argument before any work (see the module docstring)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _p._check_array(name, x, (3,))
    libs = {_p.array_library(x) for x in (q, k, v)}
    if len(libs) != 1:
        raise TypeError(f"q, k and v must come from one array library, got q: {_p.array_library(q)}, "
                        f"k: {_p.array_library(k)}, v: {_p.array_library(v)}")
    if len({_p._device_of(x) for x in (q, k, v)}) != 1:
        raise ValueError("q, k and v must be on one device, got " + ", ".join(
            f"{n} on {_p._device_str(_p._device_of(x))}" for n, x in (("q", q), ("k", k), ("v", v))))
    for name, x in (("q", q), ("k", k), ("v", v)):
        _p._check_dtype(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q: {q.dtype}, k: {k.dtype}, v: {v.dtype}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not hasattr(cu, "shape") or not hasattr(cu, "dtype"):
            raise TypeError(f"{name} must be an int32 array of shape (batch + 1,), got {_p._describe(cu)}")
    B, H, Hk, total_q, total_k, D = check_varlen_shapes(q.shape, k.shape, v.shape, tuple(cu_seqlens_q.shape),
                                                        tuple(cu_seqlens_k.shape))
    lib, dev = _p.array_library(q), _p._device_of(q)
    cu_q = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, lib, dev, total_q, "q.shape[0] (total_q)")
    cu_k = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, lib, dev, total_k, "k.shape[0] (total_k)")
    Nq = _max_seqlen("max_seqlen_q", max_seqlen_q, np.diff(cu_q))
    Nk = _max_seqlen("max_seqlen_k", max_seqlen_k, np.diff(cu_k))

    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"groups must be an int dividing the head dim {D}, got {_p._describe(groups)}")
    groups = int(groups)
    if groups < 1 or D % groups != 0:
        raise ValueError(f"groups must be a positive int dividing the head dim D={D}, got {groups}")
    causal = _p._check_flag("causal", causal)
    l2norm_qk = _p._check_flag("l2norm_qk", l2norm_qk)
    deterministic = _p._check_flag("deterministic", deterministic)
    per_head, scale_vec = _p._scale_vector(scale, H, False)
    prob = Problem(B=B, H=H, Hk=Hk, Nq=Nq, Nk=Nk, D=D, dtype=np.dtype(q.dtype), groups=groups, causal=causal,
                   l2norm_qk=l2norm_qk, per_head_scale=per_head, deterministic=deterministic, varlen=True,
                   total_q=total_q, total_k=total_k)
    return prob, Inputs(q=q, k=k, v=v, scale=scale_vec, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)


def check_varlen_backward_extras(prob: Problem, lib: str, device: tuple, dout: Array, out: Array,
                                 lse: Array) -> None:
    """Validate varlen_backward's dout, out ((total_q, H, D), q's dtype) and lse ((total_q, H), float32)."""
    q_shape = (prob.total_q, prob.H, prob.D)
    for name, x, want_dtype, want_shape in (("dout", dout, prob.dtype, q_shape), ("out", out, prob.dtype, q_shape),
                                            ("lse", lse, np.dtype(np.float32), q_shape[:-1])):
        _check_like_q(name, x, lib, device, want_dtype)
        if tuple(x.shape) != want_shape:
            raise ValueError(f"{name} must have shape {want_shape}, got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------------------
# The per-sequence dense view, and the reference built on it.

def sequence(prob: Problem, inp: Inputs, b: int) -> tuple[Problem, Inputs, slice, slice]:
    """Sequence b of a varlen problem as a dense problem of one batch (q (1, H, Nq_b, D) and k, v
    (1, Hk, Nk_b, D) views), with its query and key row slices of the packed tensors."""
    qs = slice(int(inp.cu_seqlens_q[b]), int(inp.cu_seqlens_q[b + 1]))
    ks = slice(int(inp.cu_seqlens_k[b]), int(inp.cu_seqlens_k[b + 1]))
    sub = Problem(B=1, H=prob.H, Hk=prob.Hk, Nq=qs.stop - qs.start, Nk=ks.stop - ks.start, D=prob.D,
                  dtype=prob.dtype, groups=prob.groups, causal=prob.causal, l2norm_qk=prob.l2norm_qk,
                  per_head_scale=prob.per_head_scale, deterministic=prob.deterministic)

    def dense(x, rows):
        return x[rows].transpose(1, 0, 2)[None]

    return sub, Inputs(q=dense(inp.q, qs), k=dense(inp.k, ks), v=dense(inp.v, ks), scale=inp.scale), qs, ks


def reference_forward64(prob: Problem, inp: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """(out (total_q, H, D), lse (total_q, H)) in float64: the dense reference of every sequence."""
    out = np.zeros((prob.total_q, prob.H, prob.D))
    lse = np.full((prob.total_q, prob.H), -np.inf)
    for b in range(prob.B):
        sub, si, qs, _ = sequence(prob, inp, b)
        if sub.Nq and sub.Nk:
            o, ls = reference.forward64(sub, si)
            out[qs] = o[0].transpose(1, 0, 2)
            lse[qs] = ls[0].T
    return out, lse


def reference_backward64(prob: Problem, inp: Inputs, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    """(dq, dk, dv, dscale (H,)) in float64, packed like q, k, v: the dense reference per sequence."""
    dq = np.zeros((prob.total_q, prob.H, prob.D))
    dk = np.zeros((prob.total_k, prob.Hk, prob.D))
    dv = np.zeros_like(dk)
    dscale = np.zeros((prob.H,))
    for b in range(prob.B):
        sub, si, qs, ks = sequence(prob, inp, b)
        if sub.Nq and sub.Nk:
            g = reference.backward64(sub, si, np.asarray(dout)[qs].transpose(1, 0, 2)[None])
            dq[qs] = g[0][0].transpose(1, 0, 2)
            dk[ks] = g[1][0].transpose(1, 0, 2)
            dv[ks] = g[2][0].transpose(1, 0, 2)
            dscale += g[4]
    return dq, dk, dv, dscale


class VarlenReference:
    """The reference backend of a varlen problem (backends.ReferenceBackend delegates here)."""

    @staticmethod
    def forward(prob: Problem, inp: Inputs, out: Optional[np.ndarray] = None,
                lse: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        o64, l64 = reference_forward64(prob, inp)
        o, ls = o64.astype(prob.dtype), l64.astype(np.float32)
        return into_outputs(o, ls, out, lse)

    @staticmethod
    def backward(prob: Problem, inp: Inputs, dout: np.ndarray) -> tuple[Any, ...]:
        dq, dk, dv, dscale = reference_backward64(prob, inp, dout)
        dt = prob.dtype
        return dq.astype(dt), dk.astype(dt), dv.astype(dt), None, dscale
