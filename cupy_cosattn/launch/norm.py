"""The grouped l2 norm passes (cuda_src/norm.cu) on any device: the l2norm_qk pre-pass and its gradient."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .devices import Device
from .dispatch import KernelChoice, norm_choice
from .limits import MAX_HEAD_DIM, dtype_name, storage_dim
from .params import NORM_PARAMS, make_record


def _rows(x: Any) -> tuple[tuple, int]:
    lead = tuple(x.shape[:-1])
    return lead, int(np.prod(lead, dtype=np.int64))


def l2norm(dev: Device, x: Any, groups: int, cols: Optional[int] = None, want_rnorm: bool = False,
           choice: Optional[KernelChoice] = None, mode: int = 0) -> tuple[Any, Optional[Any]]:
    """Grouped l2 norm (norm.cu l2norm_fwd) of a contiguous device array x (..., D).

    Returns (xhat, rnorm): xhat (..., cols) in x's dtype, columns past D zero (cols defaults to
    storage_dim(D)); rnorm (..., groups) float32 = 1/max(||chunk||, eps), or None unless want_rnorm.
    `choice` (from dispatch.select) defaults to the norm kernel over x's rows. `mode`: params.NORM_MODE_*
    bits (NORM_MODE_COPY: xhat is a zero-padded copy of x)."""
    D = int(x.shape[-1])
    cols = storage_dim(D) if cols is None else int(cols)
    lead, rows = _rows(x)
    if D > MAX_HEAD_DIM or cols > MAX_HEAD_DIM:
        raise ValueError(f"l2norm: head dim {max(D, cols)} exceeds {MAX_HEAD_DIM}")
    xhat = dev.empty(lead + (cols,), x.dtype)
    rnorm = dev.empty(lead + (groups,), np.float32) if want_rnorm else None
    if rows:
        rec = make_record(NORM_PARAMS, x=dev.ptr(x), xhat=dev.ptr(xhat), rnorm=dev.ptr(rnorm), dxhat=0, dx=0,
                          rows=rows, x_stride=D, xhat_stride=cols, dxhat_stride=0, dx_stride=0, D=D,
                          groups=groups, xhat_cols=cols, mode=mode)
        dev.launch(choice or norm_choice(dtype_name(x.dtype), rows), rec)
    return xhat, rnorm


def l2norm_backward(dev: Device, x: Any, dxhat: Any, groups: int, out: Optional[Any] = None,
                    choice: Optional[KernelChoice] = None) -> Any:
    """Gradient through the grouped l2 norm (norm.cu l2norm_bwd): dx (..., D) in x's dtype from
    x (..., D) (the un-normalized input, contiguous device array) and dxhat (..., Dg) with
    Dg >= D (float32 or x's dtype, contiguous; only the first D columns are read). `out`
    (contiguous, x's shape and dtype) is written when given."""
    D = int(x.shape[-1])
    lead, rows = _rows(x)
    if tuple(dxhat.shape[:-1]) != lead or dxhat.shape[-1] < D:
        raise ValueError(f"l2norm_backward: dxhat shape {tuple(dxhat.shape)} does not match x {tuple(x.shape)}")
    dx = dev.empty(x.shape, x.dtype) if out is None else out
    if rows:
        rec = make_record(NORM_PARAMS, x=dev.ptr(x), xhat=0, rnorm=0, dxhat=dev.ptr(dxhat), dx=dev.ptr(dx),
                          rows=rows, x_stride=D, xhat_stride=0, dxhat_stride=int(dxhat.shape[-1]), dx_stride=D,
                          D=D, groups=groups, xhat_cols=0, mode=0)
        dev.launch(choice or norm_choice(dtype_name(x.dtype), rows, dtype_name(dxhat.dtype)), rec)
    return dx
