"""Parameter records: NumPy mirrors of the structs of cuda_src/params.cuh."""
from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------------------------------------------
# Parameter records.

_PTR = np.uint64
NORM_PARAMS = np.dtype(
    [("x", _PTR), ("xhat", _PTR), ("rnorm", _PTR), ("dxhat", _PTR), ("dx", _PTR), ("rows", np.int64),
     ("x_stride", np.int64), ("xhat_stride", np.int64), ("dxhat_stride", np.int64), ("dx_stride", np.int64),
     ("D", np.int32), ("groups", np.int32), ("xhat_cols", np.int32), ("pad_", np.int32)],
    align=True,
)

FWD_PARAMS = np.dtype(
    [("q", _PTR), ("k", _PTR), ("v", _PTR), ("o", _PTR), ("lse", _PTR), ("scale", _PTR), ("mask", _PTR),
     ("tile_any", _PTR), ("bias", _PTR)]
    + [(f"{t}_s{d}", np.int64) for t in ("q", "k", "v", "o") for d in ("b", "h", "n")]
    + [("lse_sb", np.int64), ("lse_sh", np.int64), ("bias_sb", np.int64), ("bias_sh", np.int64),
       ("bias_sq", np.int64), ("mask_sb", np.int64), ("tile_any_sb", np.int64)]
    + [(f, np.int32) for f in ("B", "H", "Hk", "Nq", "Nk", "D", "causal", "bias_f32", "n_key_tiles", "groups")],
    align=True,
)


def make_record(dtype: np.dtype, **fields):
    """A NumPy structured scalar of `dtype` (a kernel's params struct) with the given fields set.

    Every field except those named ``pad_``/ending in ``_pad`` must be given (a forgotten field is a
    silent wrong answer on the device, so it is an error here); pointers are ints (``Backend.ptr``)."""
    names = set(dtype.names)
    unknown = set(fields) - names
    if unknown:
        raise KeyError(f"unknown fields for {dtype}: {sorted(unknown)}")
    missing = {n for n in names - set(fields) if not (n.startswith("pad") or n.endswith("pad_"))}
    if missing:
        raise KeyError(f"missing fields: {sorted(missing)}")
    rec = np.zeros((), dtype=dtype)
    for k, v in fields.items():
        rec[k] = v
    return rec[()]


_PTR = np.uint64
BWD_PARAMS = np.dtype(
    [(f, _PTR) for f in ("q", "k", "v", "o", "dout", "lse", "lse2", "dvec", "scale", "mask", "tile_any", "bias",
                         "dbias", "dq", "dk", "dv")]
    + [(f"{t}_s{d}", np.int64) for t in ("q", "k", "v", "o", "do") for d in ("b", "h", "n")]
    + [("lse_sb", np.int64), ("lse_sh", np.int64)]
    + [(f"dq_s{d}", np.int64) for d in ("b", "h", "n")]
    + [(f"dkv_s{d}", np.int64) for d in ("b", "h", "n")]
    + [("bias_sb", np.int64), ("bias_sh", np.int64), ("bias_sq", np.int64)]
    + [("dbias_sb", np.int64), ("dbias_sh", np.int64), ("dbias_sq", np.int64)]
    + [("mask_sb", np.int64), ("tile_any_sb", np.int64), ("n_y", np.int64)]
    + [(f, np.int32) for f in ("B", "H", "Hk", "Nq", "Nk", "D", "nq_pad", "causal", "bias_f32", "dbias_mode",
                               "dbias_f32", "dq_atomic", "dk_f32", "dv_f32", "nsplit", "heads_per_split",
                               "n_chunks")],
    align=True,
)

DBIAS_NONE, DBIAS_STORE, DBIAS_ATOMIC = 0, 1, 2

