"""KV-cache attention (inference, forward only): the problem description, its argument checks and the
NumPy reference. The public function is ``api.kvcache_forward`` (``ca.kvcache_forward``):

    out, lse = ca.kvcache_forward(q, k_cache, v_cache, cache_seqlens, block_table=None,
                                  k_new=None, v_new=None, scale=8.0, groups=1, causal=True,
                                  l2norm_qk=True, num_splits=0, backend="auto")

Layouts (B sequences, H query heads, Hk kv heads with H % Hk == 0, head dim D):

- q: (B, H, Nq, D), Nq new queries per sequence (1 for single-token decode, a few for speculative
  decoding, up to a chunk of a prompt for chunked prefill);
- contiguous cache: k_cache, v_cache (B, Hk, N_max, D); sequence b's key j is k_cache[b, :, j];
- paged cache (block_table given): k_cache, v_cache (num_pages, Hk, page_size, D) with page_size a
  multiple of 16, block_table int32 (B, max_pages); key j of sequence b is
  k_cache[block_table[b, j // page_size], :, j % page_size];
- cache_seqlens int32 (B,): valid keys of each sequence *before* the append;
- k_new, v_new (B, Hk, Nq, D), both or neither: written in place into the cache at positions
  cache_seqlens[b] ... cache_seqlens[b] + Nq - 1, then attended to. L_b = cache_seqlens[b] (+ Nq with
  an append) keys take part;
- causal (default True) is bottom-right per sequence: query i of sequence b sees keys
  j <= L_b - Nq + i; not causal: every one of the L_b keys.

The cache holds **raw** keys (the cache contract): with l2norm_qk the kernels normalize every key they
read, on the fly, exactly as the dense forward normalizes k. A cache filled by anyone (this function's
append, a prefill, a copy from another model) is therefore valid as it is, and one holding keys that
were normalized already gives the same result (normalization is idempotent).

Returns out (B, H, Nq, D) in q's dtype and lse (B, H, Nq) float32 (-inf for a query without a visible
key, whose output row is 0). Every argument is checked before anything is launched or written: the
host needs cache_seqlens (and the block table entries in use) anyway, to size the launch, so the
lengths against the cache's capacity and the page indices against num_pages are checked there.

Backends: "reference" (NumPy float64, :func:`reference_kvcache`: performs the append on the caller's
arrays, gathers each sequence's keys and runs the dense reference; it also takes float64), "emulator"
and "cuda" (cuda_src/decode.cu through launch.decode), "auto" (CuPy arrays: "cuda", NumPy: "reference").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import problem as _problem
from . import reference as _reference
from .problem import (
    ACCEPTED_DTYPES,
    DEFAULT_SCALE,
    FLOAT64_NOTE,
    Array,
    Inputs,
    Problem,
    _check_flag,
    _describe,
    _device_of,
    _device_str,
    array_library,
)

PAGE_MULTIPLE = 16  # page_size must be a multiple of this (whole 16-key mma steps per page)
MAX_NUM_SPLITS = 128  # largest num_splits accepted (the partial buffers grow with it)

__all__ = ["KVCacheProblem", "KVCacheInputs", "check_kvcache", "reference_kvcache", "gather_sequence",
           "PAGE_MULTIPLE", "MAX_NUM_SPLITS"]


@dataclass(frozen=True)
class KVCacheProblem:
    """Sizes and flags of one checked KV-cache call."""

    B: int
    H: int
    Hk: int
    Nq: int
    D: int
    dtype: np.dtype
    paged: bool
    page_size: int  # slots per page; N_max for a contiguous cache (one page per sequence)
    num_pages: int  # pages of a paged cache; B for a contiguous one
    max_pages: int  # block table columns; 1 for a contiguous cache
    append: bool  # k_new / v_new given
    groups: int = 1
    causal: bool = True
    l2norm_qk: bool = True
    num_splits: int = 0  # 0: chosen by the launch layer's heuristic
    per_head_scale: bool = False
    max_len: int = 0  # the longest sequence's keys after the append (read from cache_seqlens on the host)

    @property
    def dtype_name(self) -> str:
        return _problem.DTYPE_NAMES.get(self.dtype, self.dtype.name)

    @property
    def q_per_kv(self) -> int:
        return self.H // self.Hk

    @property
    def capacity(self) -> int:
        """Keys a sequence can hold."""
        return self.max_pages * self.page_size

    @property
    def new_keys(self) -> int:
        return self.Nq if self.append else 0

    def dense(self, nk: int, batch: int = 1) -> Problem:
        """The dense problem of `batch` sequences of `nk` keys with this call's flags."""
        return Problem(B=batch, H=self.H, Hk=self.Hk, Nq=self.Nq, Nk=nk, D=self.D, dtype=self.dtype,
                       groups=self.groups, causal=self.causal, l2norm_qk=self.l2norm_qk,
                       per_head_scale=self.per_head_scale)


@dataclass
class KVCacheInputs:
    """The arrays of one checked call and the host copies the checks (and the launch) read."""

    q: Any
    k_cache: Any
    v_cache: Any
    cache_seqlens: Any
    block_table: Any
    k_new: Any
    v_new: Any
    scale: np.ndarray  # float64 (H,)
    seqlens_host: np.ndarray  # int64 (B,): cache_seqlens
    lengths: np.ndarray  # int64 (B,): L_b, keys after the append


def _check_array(name: str, x: Any, ndim: int, lib: Optional[str] = None, device: Optional[tuple] = None) -> None:
    got = array_library(x)
    if not got or got == "torch":
        raise TypeError(f"{name} must be a NumPy or CuPy array (use cupy_cosattn.torch for torch tensors), "
                        f"got {_describe(x)}")
    if lib is not None and got != lib:
        raise TypeError(f"{name} must be a {lib} array like q, got {_describe(x)}")
    if device is not None and _device_of(x) != device:
        raise ValueError(f"{name} is on {_device_str(_device_of(x))} but q is on {_device_str(device)}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(x.shape)} ({x.ndim}-D)")


def _to_host(x: Array) -> np.ndarray:
    return np.asarray(x.get() if array_library(x) == "cupy" else x)


def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {_describe(value)}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return value


def check_kvcache(q: Array, k_cache: Array, v_cache: Array, cache_seqlens: Array, *,
                  block_table: Optional[Array] = None, k_new: Optional[Array] = None, v_new: Optional[Array] = None,
                  scale: Any = DEFAULT_SCALE, groups: int = 1, causal: bool = True, l2norm_qk: bool = True,
                  num_splits: int = 0) -> tuple[KVCacheProblem, KVCacheInputs]:
    """Check every argument of ``api.kvcache_forward``; returns (KVCacheProblem, KVCacheInputs).

    Raises TypeError / ValueError naming the argument, what it got and what was expected. Reads
    cache_seqlens and the block table entries in use on the host (one device-to-host copy each on
    CuPy)."""
    _check_array("q", q, 4)
    lib, dev = array_library(q), _device_of(q)
    if np.dtype(q.dtype) not in ACCEPTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; supported are float16, bfloat16 (ml_dtypes.bfloat16 for NumPy) "
                        f"and float32, {FLOAT64_NOTE}")
    B, H, Nq, D = (int(s) for s in q.shape)
    if D < 1:
        raise ValueError(f"head dim D must be >= 1, got q of shape {tuple(q.shape)}")
    paged = block_table is not None
    layout = "(num_pages, Hk, page_size, D)" if paged else "(B, Hk, N_max, D)"
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_array(name, x, 4, lib, dev)
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    n0, Hk, page_size, Dk = (int(s) for s in k_cache.shape)
    if Dk != D:
        raise ValueError(f"k_cache must have q's head dim D={D} in its last axis {layout}, got shape "
                         f"{tuple(k_cache.shape)}")
    if Hk < 1 or H % Hk != 0:
        raise ValueError(f"q has H={H} heads, which the cache's Hk={Hk} kv heads (k_cache.shape[1]) must divide")

    _check_array("cache_seqlens", cache_seqlens, 1, lib, dev)
    if np.dtype(cache_seqlens.dtype) != np.int32:
        raise TypeError(f"cache_seqlens must have dtype int32, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (B,):
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")

    if paged:
        _check_array("block_table", block_table, 2, lib, dev)
        if np.dtype(block_table.dtype) != np.int32:
            raise TypeError(f"block_table must have dtype int32, got {block_table.dtype}")
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape (B, max_pages) with B={B}, got {tuple(block_table.shape)}")
        if page_size < 1 or page_size % PAGE_MULTIPLE != 0:
            raise ValueError(f"page_size (k_cache.shape[2] of a paged cache {layout}) must be a positive multiple of "
                             f"{PAGE_MULTIPLE}, got {page_size}")
        num_pages, max_pages = n0, int(block_table.shape[1])
    else:
        if n0 != B:
            raise ValueError(f"a contiguous k_cache must have shape {layout} with q's batch B={B}, got "
                             f"{tuple(k_cache.shape)} (pass block_table for a paged cache)")
        num_pages, max_pages = B, 1

    if (k_new is None) != (v_new is None):
        raise ValueError(f"k_new and v_new must be given together, got k_new: "
                         f"{'None' if k_new is None else _describe(k_new)}, v_new: "
                         f"{'None' if v_new is None else _describe(v_new)}")
    append = k_new is not None
    if append:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            _check_array(name, x, 4, lib, dev)
            if x.dtype != q.dtype:
                raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
            if tuple(x.shape) != (B, Hk, Nq, D):
                raise ValueError(f"{name} must have shape (B, Hk, Nq, D) = {(B, Hk, Nq, D)}, got {tuple(x.shape)}")

    groups = _problem.check_groups(groups, D)
    causal = _check_flag("causal", causal)
    l2norm_qk = _check_flag("l2norm_qk", l2norm_qk)
    num_splits = _check_int("num_splits", num_splits, 0, MAX_NUM_SPLITS)
    per_head, scale_vec = _problem._scale_vector(scale, H, False)

    # The host copies: lengths against the capacity, block table entries in use against num_pages.
    seqlens = _to_host(cache_seqlens).astype(np.int64)
    bad = np.flatnonzero(seqlens < 0)
    if bad.size:
        raise ValueError(f"cache_seqlens must be >= 0, got cache_seqlens[{bad[0]}] = {seqlens[bad[0]]}")
    lengths = seqlens + (Nq if append else 0)
    capacity = max_pages * page_size
    over = np.flatnonzero(lengths > capacity)
    if over.size:
        b = int(over[0])
        what = (f"block_table's {max_pages} pages of {page_size} slots" if paged
                else f"k_cache's N_max = {page_size} slots")
        raise ValueError(f"cache_seqlens[{b}] = {seqlens[b]}{f' + Nq = {Nq} appended keys' if append else ''} exceeds "
                         f"the cache capacity of {capacity} keys per sequence ({what})")
    if paged and B > 0:
        used = -(-lengths // page_size)  # pages in use per sequence
        n_used = int(used.max()) if used.size else 0
        table = _to_host(block_table[:, :n_used]).astype(np.int64) if n_used else np.zeros((B, 0), np.int64)
        in_use = np.arange(n_used)[None, :] < used[:, None]
        bad_entry = in_use & ((table < 0) | (table >= num_pages))
        if bad_entry.any():
            b, j = (int(x) for x in np.argwhere(bad_entry)[0])
            raise ValueError(f"block_table[{b}, {j}] = {table[b, j]} is not a page index in [0, {num_pages}) "
                             f"(num_pages = k_cache.shape[0]); sequence {b} uses its first {used[b]} pages")

    prob = KVCacheProblem(B=B, H=H, Hk=Hk, Nq=Nq, D=D, dtype=np.dtype(q.dtype), paged=paged, page_size=page_size,
                          num_pages=num_pages, max_pages=max_pages, append=append, groups=groups, causal=causal,
                          l2norm_qk=l2norm_qk, num_splits=num_splits, per_head_scale=per_head,
                          max_len=int(lengths.max()) if B else 0)
    inp = KVCacheInputs(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens, block_table=block_table,
                        k_new=k_new, v_new=v_new, scale=scale_vec, seqlens_host=seqlens, lengths=lengths)
    return prob, inp


# ---------------------------------------------------------------------------------------------------
# The reference backend (NumPy).


def _slots(prob: KVCacheProblem, table: Optional[np.ndarray], b: np.ndarray,
           pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(page, row) arrays of the cache slots of keys `pos` of sequences `b` (broadcast together)."""
    if not prob.paged:
        return np.broadcast_to(b, pos.shape), pos
    return table[b, pos // prob.page_size], pos % prob.page_size


def append_host(prob: KVCacheProblem, inp: KVCacheInputs, table: Optional[np.ndarray] = None) -> None:
    """Write k_new, v_new into the (NumPy) caches at positions cache_seqlens[b] + i, in place."""
    if not prob.append or prob.B == 0 or prob.Nq == 0:
        return
    if table is None and prob.paged:
        table = np.asarray(inp.block_table, dtype=np.int64)
    b = np.arange(prob.B)[:, None]
    pos = inp.seqlens_host[:, None] + np.arange(prob.Nq)[None, :]  # (B, Nq)
    page, row = _slots(prob, table, b, pos)
    for cache, new in ((inp.k_cache, inp.k_new), (inp.v_cache, inp.v_new)):
        # cache[page, :, row] is (B, Nq, Hk, D); 2-byte floats move as their bits
        _bits(cache)[page, :, row] = _bits(np.asarray(new)).transpose(0, 2, 1, 3)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint16) if x.dtype.itemsize == 2 else x


def gather_sequence(prob: KVCacheProblem, k_cache: Array, v_cache: Array, block_table: Optional[Array], b: int,
                    length: int) -> tuple[np.ndarray, np.ndarray]:
    """(k, v) of sequence b's first `length` keys as (Hk, length, D) NumPy arrays (copies)."""
    k_cache, v_cache = np.asarray(k_cache), np.asarray(v_cache)
    if not prob.paged:
        return k_cache[b, :, :length].copy(), v_cache[b, :, :length].copy()
    n = -(-length // prob.page_size)
    pages = np.asarray(block_table)[b, :n].astype(np.int64)

    def gather(c: np.ndarray) -> np.ndarray:
        g = c[pages]  # (n, Hk, page_size, D)
        return np.ascontiguousarray(g.transpose(1, 0, 2, 3).reshape(prob.Hk, n * prob.page_size, prob.D)[:, :length])

    return gather(k_cache), gather(v_cache)


def reference_kvcache(prob: KVCacheProblem, inp: KVCacheInputs, want64: bool = False) -> tuple[Any, Any]:
    """The reference backend: append on the caller's arrays, then per sequence the dense float64
    reference over its gathered keys. Returns (out (B, H, Nq, D), lse (B, H, Nq)): in q's dtype and
    float32, or float64 both with want64."""
    append_host(prob, inp)
    out = np.zeros((prob.B, prob.H, prob.Nq, prob.D), dtype=np.float64)
    lse = np.full((prob.B, prob.H, prob.Nq), -np.inf, dtype=np.float64)
    for b in range(prob.B):
        L = int(inp.lengths[b])
        if L == 0 or prob.Nq == 0:
            continue
        k, v = gather_sequence(prob, inp.k_cache, inp.v_cache, inp.block_table, b, L)
        o, ls = _reference.forward64(prob.dense(L), Inputs(q=np.asarray(inp.q)[b:b + 1], k=k[None], v=v[None],
                                                           scale=inp.scale))
        out[b], lse[b] = o[0], ls[0]
    if want64:
        return out, lse
    return out.astype(prob.dtype), lse.astype(np.float32)
