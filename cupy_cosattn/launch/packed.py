"""Launching a packed (varlen) batch.

The kernels' VARLEN instantiations (cuda_src/params.cuh ``SeqView``) pick a block's sequence from
blockIdx.y once, so every block must serve exactly one (sequence, head) work item and the grid's y
extent must cover them all without the kernels' loop past gridDim.y. Batches whose work items exceed
the grid's y limit are split into launches over consecutive sequences (:func:`batch_ranges`,
:func:`sub_launch`): each launch gets the cu_seqlens pointers advanced to its first sequence (the
offsets in them are absolute rows, so nothing else moves) and the per-(sequence, head) buffers of the
backward (lse2, dvec) advanced alike.

Dtypes without VARLEN instantiations (float32: registry.VARLEN_DTYPES) run the dense kernels once per
sequence instead (:func:`forward_by_sequence`, :func:`backward_by_sequence`): the same results, one
launch sequence per sequence.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np

from ..problem import Inputs, Problem
from ..varlen import sequence
from . import limits
from .arrays import copy_into
from .devices import Device
from .dispatch import KernelChoice
from .registry import VARLEN_DTYPES

INT32_BYTES = 4
F32_BYTES = 4


def batch_ranges(prob: Problem, items_per_batch: int) -> Iterator[tuple[int, int]]:
    """(first sequence, count) of each launch for a kernel with `items_per_batch` grid-y work items
    per sequence: the whole batch in one launch unless that exceeds the grid's y limit."""
    per_launch = max(1, limits.GRID_YZ_LIMIT // items_per_batch)
    for b0 in range(0, prob.B, per_launch):
        yield b0, min(per_launch, prob.B - b0)


def sub_launch(choice: KernelChoice, fields: dict, b0: int, nb: int, items_per_batch: int,
               row_buffers: Optional[dict[str, int]] = None) -> tuple[KernelChoice, dict]:
    """The choice and record fields of the launch over sequences b0 .. b0 + nb - 1: B = nb, grid y =
    its work items, cu_seqlens advanced by b0 entries, and each fp32 buffer named in `row_buffers`
    (name -> floats per sequence) advanced by b0 sequences (a null pointer stays null)."""
    n_y = nb * items_per_batch
    f = dict(fields, B=nb, cu_seqlens_q=fields["cu_seqlens_q"] + b0 * INT32_BYTES,
             cu_seqlens_k=fields["cu_seqlens_k"] + b0 * INT32_BYTES)
    for name, per_batch in (row_buffers or {}).items():
        if fields[name]:
            f[name] = fields[name] + b0 * per_batch * F32_BYTES
    if "n_y" in fields:
        f["n_y"] = n_y
    return dataclasses.replace(choice, grid=(choice.grid[0], n_y, 1), n_y=n_y), f


def in_kernel(prob: Problem) -> bool:
    """Whether the VARLEN instantiations run this packed batch (else one dense launch per sequence)."""
    return prob.dtype_name in VARLEN_DTYPES


def forward_by_sequence(run: Callable[..., tuple[Any, Any]], dev: Device, prob: Problem, inp: Inputs,
                        out: Optional[Any] = None, lse: Optional[Any] = None) -> tuple[Any, Any]:
    """(out (total_q, H, D), lse (total_q, H)) of a packed batch by `run` (run_forward) per sequence."""
    xp = dev.xp
    o = out if out is not None else xp.zeros((prob.total_q, prob.H, prob.D), dtype=prob.dtype)
    ls = lse if lse is not None else xp.empty((prob.total_q, prob.H), dtype=np.float32)
    o[...] = 0
    ls[...] = -np.inf
    for b in range(prob.B):
        sub, si, qs, _ = sequence(prob, inp, b)
        if sub.Nq and sub.Nk:
            ob, lb = run(dev, sub, si)
            copy_into(o[qs], ob[0].transpose(1, 0, 2))
            copy_into(ls[qs], lb[0].T)
    return o, ls


def backward_by_sequence(run: Callable[..., tuple], dev: Device, prob: Problem, inp: Inputs, dout: Any, out: Any,
                         lse: Any, need_dscale: bool = True) -> tuple[Any, Any, Any, None, Optional[np.ndarray]]:
    """(dq, dk, dv, None, dscale) of a packed batch by `run` (run_backward) per sequence."""
    xp = dev.xp
    dq = xp.zeros((prob.total_q, prob.H, prob.D), dtype=prob.dtype)
    dk = xp.zeros((prob.total_k, prob.Hk, prob.D), dtype=prob.dtype)
    dv = xp.zeros_like(dk)
    dscale = np.zeros((prob.H,), dtype=np.float64)
    for b in range(prob.B):
        sub, si, qs, ks = sequence(prob, inp, b)
        if sub.Nq and sub.Nk:
            do_b, o_b = (x[qs].transpose(1, 0, 2)[None] for x in (dout, out))
            g = run(dev, sub, si, do_b, o_b, lse[qs].T[None], need_dscale=need_dscale)
            copy_into(dq[qs], g[0][0].transpose(1, 0, 2))
            copy_into(dk[ks], g[1][0].transpose(1, 0, 2))
            copy_into(dv[ks], g[2][0].transpose(1, 0, 2))
            if need_dscale:
                dscale += g[4]
    return dq, dk, dv, None, dscale if need_dscale else None
