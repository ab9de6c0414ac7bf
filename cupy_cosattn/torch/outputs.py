"""The layout of the ops' outputs, and the gradients the backward op may not have.

Every tensor both ops return is contiguous (row-major in the caller's shape), whatever the inputs'
strides (transposed projections, expanded kv, ...): the fake implementations promise exactly that to
torch.compile, and it is the layout the CUDA kernels write, so the CUDA path hands its results back
without a copy. (Gradients in the inputs' strides would need a strided copy after every kernel.) An
absent bias or a float scale gets an empty tensor, and dscale is reduced to the scale tensor's shape
and dtype."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def as_output(x: Tensor, dtype: torch.dtype, shape: tuple) -> Tensor:
    """x as a contiguous tensor of `dtype` and `shape` (at most one copy; none when x already is)."""
    return x.to(dtype=dtype, memory_format=torch.contiguous_format).reshape(shape)


def empty_grad(q: Tensor) -> Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def user_dscale(dscale: Tensor, scale_t: Optional[Tensor], q: Tensor) -> Tensor:
    """The (H,) gradient of the scale reduced to scale_t's shape and dtype (empty for a float scale)."""
    if scale_t is None:
        return empty_grad(q)
    if scale_t.numel() == 1:
        dscale = dscale.sum()
    return as_output(dscale.to(device=scale_t.device), scale_t.dtype, scale_t.shape)
