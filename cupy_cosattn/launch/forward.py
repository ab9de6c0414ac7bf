"""The fused forward on any device: cuda_src/forward.cu attn_fwd, or on an H100 / H200 hopper_fwd.cu
attn_fwd_sm90 (dispatch.select decides), after the norm pre-pass."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..problem import Inputs, Problem
from . import sm90
from .devices import Device
from .dispatch import FORWARD, select
from .limits import cdiv, check_smem, check_supported
from .packed import batch_ranges, sub_launch
from .params import FWD_PARAMS, make_record
from .staging import attn_fields, deliver, stage


def run_forward(dev: Device, prob: Problem, inp: Inputs, out: Optional[Any] = None,
                lse: Optional[Any] = None) -> tuple[Any, Any]:
    """Fused forward of one canonical problem on `dev`: (out (B, H, Nq, D) in prob.dtype, lse
    (B, H, Nq) float32); for a packed batch out (total_q, H, D) and lse (total_q, H). `out` / `lse`,
    when given (canonical shapes, arrays of dev's library), are written and returned; the kernel
    writes them in place where they are device arrays it may write."""
    check_supported(prob)
    caps = dev.capabilities()
    caps.check()
    fwd = select(prob, caps, FORWARD, scale=inp.scale)
    check_smem("the forward kernel", prob, fwd.smem, caps)

    st = stage(dev, prob, inp, caps, tile=fwd.tile)
    Ds = st.cols
    direct_out = out is not None and Ds == prob.D and dev.is_device_array(out)
    rows = (prob.total_q, prob.H) if prob.varlen else (prob.B, prob.H, prob.Nq)
    o = out if direct_out else dev.empty(rows + (Ds,), prob.dtype)
    # the kernels' lse rows are contiguous per head: a packed batch's (total_q, H) is written as (H, total_q)
    direct_lse = lse is not None and dev.is_device_array(lse) and not prob.varlen
    lse_d = lse if direct_lse else dev.empty((prob.H, prob.total_q) if prob.varlen else rows, np.float32)

    fields = dict(attn_fields(dev, prob, st, o, lse_d), n_key_tiles=cdiv(prob.Nk, fwd.tile), groups=prob.groups)
    if prob.varlen:
        for b0, nb in batch_ranges(prob, prob.H):
            choice, f = sub_launch(fwd, fields, b0, nb, prob.H)
            dev.launch(choice, make_record(FWD_PARAMS, **f))
        lse_d = lse_d.T
    elif fwd.spec.source == sm90.SOURCE:  # the Hopper forward takes the record with its tensor maps
        dev.launch(fwd, sm90.make_args(make_record(FWD_PARAMS, **fields), st.q, st.k, st.v, o, dev.tensormap_target))
    else:
        dev.launch(fwd, make_record(FWD_PARAMS, **fields))

    res_o = o if Ds == prob.D else o[..., : prob.D]
    res_o = res_o if direct_out else deliver(dev, res_o, out)
    res_l = lse_d if direct_lse else deliver(dev, lse_d, lse)
    return res_o, res_l
