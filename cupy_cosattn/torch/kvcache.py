"""KV-cache attention for torch: the custom op ``cupy_cosattn::kvcache_fwd`` and
:func:`kvcache_attention` (inference: no autograd).

The op mutates ``k_cache`` and ``v_cache`` (``mutates_args``): with ``k_new`` / ``v_new`` it writes them
into the cache before attending; without, it writes nothing (the declaration is the conservative
one, so ``torch.compile`` orders every later read of the cache after the call). Under
``torch.compile(fullgraph=True)`` a call is one opaque node: no graph break.

- CUDA tensors run cuda_src/decode.cu (``kvcache.kvcache_forward``'s "cuda" path) on zero-copy CuPy
  views, on torch's current stream; the caches are written in place.
- CPU tensors run a torch implementation (the append by index assignment, then per sequence the CPU
  path of the main op over the sequence's gathered keys), or, with ``backend="emulator"`` /
  ``"reference"`` (or ``set_cpu_backend``), the package's kernels on the emulator / the NumPy
  reference, on zero-copy NumPy views of the tensors.

Arguments are checked by ``kvcache.check_kvcache`` itself (NumPy stand-ins for the large tensors, the
host copy of cache_seqlens and of the block table entries in use), so messages match the NumPy/CuPy
API.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import api as _api
from .. import kvcache as _kv
from .. import problem as _problem
from .backends import bridge_for, check_backend
from .checks import FLOAT64_HINT, _stand_in, np_dtype
from .cpu import cpu_forward

OP_KVCACHE = "cupy_cosattn::kvcache_fwd"

__all__ = ["kvcache_attention", "OP_KVCACHE"]


def _host_int(t: Optional[Tensor]) -> Optional[np.ndarray]:
    return None if t is None else t.detach().cpu().numpy()


def check_tensors(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Optional[Tensor],
                  k_new: Optional[Tensor], v_new: Optional[Tensor], scale: Any, groups: int, causal: bool,
                  l2norm_qk: bool, num_splits: int, values: bool = True) -> tuple[Any, Any]:
    """kvcache.check_kvcache on stand-ins: zero-memory NumPy arrays with the tensors' shapes and dtypes,
    and (values=True) the host copies of cache_seqlens and the block table. values=False checks the
    shapes, dtypes and flags only (zero lengths stand in for cache_seqlens, page 0 for the table)."""
    named = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens),
             ("block_table", block_table), ("k_new", k_new), ("v_new", v_new))
    for name, t in named:
        if t is None and name in ("block_table", "k_new", "v_new"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__} "
                            f"(cupy_cosattn.kvcache_forward takes NumPy/CuPy arrays)")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}")
    def stand_in(name: str, t: Optional[Tensor]) -> Optional[np.ndarray]:
        return None if t is None else _stand_in(tuple(t.shape), np_dtype(name, t.dtype))

    def index(name: str, t: Optional[Tensor]) -> Optional[np.ndarray]:
        if t is None:
            return None
        if values:
            return _host_int(t)
        return np.zeros(tuple(t.shape), dtype=np_dtype(name, t.dtype))

    if isinstance(scale, Tensor):
        if scale.device != q.device:
            raise ValueError(f"scale is on device {scale.device} but q is on {q.device}")
        scale = scale.detach().to(torch.float64).cpu().numpy() if values else np.ones(tuple(scale.shape))
    try:
        prob, inp = _kv.check_kvcache(stand_in("q", q), stand_in("k_cache", k_cache), stand_in("v_cache", v_cache),
                                      index("cache_seqlens", cache_seqlens),
                                      block_table=index("block_table", block_table),
                                      k_new=stand_in("k_new", k_new), v_new=stand_in("v_new", v_new), scale=scale,
                                      groups=groups, causal=causal, l2norm_qk=l2norm_qk, num_splits=num_splits)
    except TypeError as e:
        msg = str(e)
        if msg.endswith(_problem.FLOAT64_NOTE):  # the torch CPU implementation takes float64 too
            raise TypeError(msg[:-len(_problem.FLOAT64_NOTE)] + "and float64 on CPU tensors") from None
        raise
    if q.device.type == "cuda":  # CUDA tensors run the kernels
        _problem.check_kernel_dtype(prob.dtype, "cuda", FLOAT64_HINT)
    return prob, inp


def _slot_index(prob: Any, inp: Any, block_table: Optional[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """(page, row) long tensors (B, Nq) of the append's slots."""
    pos = torch.as_tensor(inp.seqlens_host, device=device).view(-1, 1) + torch.arange(prob.Nq, device=device)
    if not prob.paged:
        return torch.arange(prob.B, device=device).view(-1, 1).expand_as(pos), pos
    table = block_table.to(torch.long)
    return torch.gather(table, 1, pos // prob.page_size), pos % prob.page_size


def torch_kvcache(prob: Any, inp: Any, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Optional[Tensor],
                  k_new: Optional[Tensor], v_new: Optional[Tensor], scale_t: Optional[Tensor],
                  scale: float) -> tuple[Tensor, Tensor]:
    """The torch implementation: the append by index assignment, then each sequence's gathered keys
    through the main op's CPU path (cpu_forward: same math as the dense op)."""
    if prob.append and prob.Nq:
        page, row = _slot_index(prob, inp, block_table, q.device)
        k_cache[page, :, row] = k_new.transpose(1, 2)  # (B, Nq, Hk, D) into the slots
        v_cache[page, :, row] = v_new.transpose(1, 2)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(prob.B):
        L = int(inp.lengths[b])
        if L == 0 or prob.Nq == 0:
            continue
        shapes = dict(q=(1, prob.H, prob.Nq, prob.D), k=(1, prob.Hk, L, prob.D), v=(1, prob.Hk, L, prob.D), bias=None)
        o, ls = cpu_forward(prob.dense(L), shapes, q[b:b + 1], _gather(prob, k_cache, block_table, b, L),
                            _gather(prob, v_cache, block_table, b, L), None, None, scale_t, scale)
        out[b], lse[b] = o[0], ls[0]
    return out, lse


def _gather(prob: Any, cache: Tensor, block_table: Optional[Tensor], b: int, length: int) -> Tensor:
    """Sequence b's first `length` rows of a cache as (1, Hk, length, D)."""
    if not prob.paged:
        return cache[b, :, :length].unsqueeze(0)
    n = -(-length // prob.page_size)
    pages = block_table[b, :n].to(torch.long)
    return cache[pages].transpose(0, 1).reshape(prob.Hk, n * prob.page_size, prob.D)[:, :length].unsqueeze(0)


def kernel_kvcache(bridge: Any, q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                   block_table: Optional[Tensor], k_new: Optional[Tensor], v_new: Optional[Tensor], scale: Any,
                   groups: int, causal: bool, l2norm_qk: bool, num_splits: int) -> tuple[Tensor, Tensor]:
    """A kernel backend ("cuda", "emulator", "reference") on views of the tensors: the caches are the
    tensors' own memory, so the append lands in them."""
    with bridge.context(q.device):
        arr = bridge.to_array
        out, lse = _api.kvcache_forward(arr(q.contiguous()), arr(k_cache), arr(v_cache),
                                        arr(cache_seqlens.contiguous()),
                                       block_table=arr(None if block_table is None else block_table.contiguous()),
                                       k_new=arr(None if k_new is None else k_new.contiguous()),
                                       v_new=arr(None if v_new is None else v_new.contiguous()), scale=scale,
                                       groups=groups, causal=causal, l2norm_qk=l2norm_qk, num_splits=num_splits,
                                       backend=bridge.backend)
        return bridge.to_tensor(out, q.dtype, q.shape), bridge.to_tensor(lse, torch.float32, q.shape[:-1])


@torch.library.custom_op(OP_KVCACHE, mutates_args=("k_cache", "v_cache"))
def _kvcache_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, block_table: Optional[Tensor],
                 k_new: Optional[Tensor], v_new: Optional[Tensor], scale_t: Optional[Tensor], scale: float,
                 groups: int, causal: bool, l2norm_qk: bool, num_splits: int,
                 backend: str = "auto") -> tuple[Tensor, Tensor]:
    """(out like q, lse float32 of shape q.shape[:-1]). scale_t (if given) overrides scale."""
    bridge = bridge_for(q, backend)
    user_scale = scale if scale_t is None else scale_t
    if bridge is not None:
        host_scale = user_scale if scale_t is None else scale_t.detach().to(torch.float64).cpu().numpy()
        return kernel_kvcache(bridge, q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, host_scale,
                              groups, causal, l2norm_qk, num_splits)
    prob, inp = check_tensors(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, user_scale, groups,
                              causal, l2norm_qk, num_splits)
    return torch_kvcache(prob, inp, q, k_cache, v_cache, block_table, k_new, v_new, scale_t, scale)


@_kvcache_fwd.register_fake
def _kvcache_fwd_fake(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale_t, scale, groups, causal,
                      l2norm_qk, num_splits, backend="auto"):
    check_backend(backend, q)
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def kvcache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                      block_table: Optional[Tensor] = None, k_new: Optional[Tensor] = None,
                      v_new: Optional[Tensor] = None, scale: Any = _problem.DEFAULT_SCALE, groups: int = 1,
                      causal: bool = True, l2norm_qk: bool = True, num_splits: int = 0, backend: str = "auto",
                      return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """KV-cache attention on tensors (inference; see cupy_cosattn.kvcache for the layouts).

    q (B, H, Nq, D); k_cache, v_cache (B, Hk, N_max, D), or with block_table (int32 (B, max_pages)) a
    paged cache (num_pages, Hk, page_size, D); cache_seqlens int32 (B,) keys per sequence before the
    append; k_new, v_new (B, Hk, Nq, D) are written into the caches in place at cache_seqlens[b] + i
    and attended to. scale: a float or a tensor of shape (H,). backend: as for cosine_sim_attention
    ("auto", "cuda", "torch", "emulator", "reference").

    Returns out (q's shape and dtype), or (out, lse) with return_lse. No gradient flows through it."""
    if not torch.compiler.is_compiling():  # eager: shapes, dtypes and flags here; lengths in the op
        check_tensors(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, scale, groups, causal,
                      l2norm_qk, num_splits, values=False)
        if not isinstance(scale, (Tensor, numbers.Real)) or isinstance(scale, bool):
            raise TypeError(f"scale must be a float or a torch.Tensor of shape (H,), got {type(scale).__name__}")
    check_backend(backend, q)
    scale_t = scale.detach() if isinstance(scale, Tensor) else None
    scale_f = 1.0 if scale_t is not None else float(scale)
    with torch.no_grad():
        out, lse = torch.ops.cupy_cosattn.kvcache_fwd(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new,
                                                      scale_t, scale_f, int(groups), bool(causal), bool(l2norm_qk),
                                                      int(num_splits), backend)
    return (out, lse) if return_lse else out
