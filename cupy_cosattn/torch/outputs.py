"""How the backward op returns the gradients it may not have: an empty tensor for an absent bias or a
float scale, and dscale reduced to the scale tensor's shape and dtype."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def empty_grad(q: Tensor) -> Tensor:
    return q.new_empty((0,), dtype=torch.float32)


def user_dscale(dscale: Tensor, scale_t: Optional[Tensor], q: Tensor) -> Tensor:
    """The (H,) gradient of the scale reduced to scale_t's shape and dtype (empty for a float scale)."""
    if scale_t is None:
        return empty_grad(q)
    if scale_t.numel() == 1:
        dscale = dscale.sum()
    return dscale.to(device=scale_t.device, dtype=scale_t.dtype).reshape(scale_t.shape)
