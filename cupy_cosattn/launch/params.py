"""Parameter records: the structs of cuda_src/params.cuh as NumPy structured dtypes, from one table.

Every kernel takes one struct by value. :data:`STRUCTS` lists each struct's fields in C order (a
struct may extend a base struct, as ``FwdParams`` and ``BwdParams`` extend ``AttnParams``);
:func:`record_dtype` lays them out by the C++ rules (natural alignment, a base class first and padded
to its own alignment), and tests/test_params_layout.py checks every offset and size against the host
C++ compiler's. :func:`make_record` fills one record, refusing a missing or unknown field.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

PTR, I64, I32 = np.dtype(np.uint64), np.dtype(np.int64), np.dtype(np.int32)


def _of(dtype: np.dtype, *names: str) -> tuple[tuple[str, np.dtype], ...]:
    return tuple((n, dtype) for n in names)


def _strides(*tensors: str, dims: str = "bhn") -> tuple[str, ...]:
    """Stride fields `{t}_s{d}`: element strides of tensor t over (batch, head, row)."""
    return tuple(f"{t}_s{d}" for t in tensors for d in dims)


@dataclass(frozen=True)
class Struct:
    """One C struct: its base struct's name (or None) and its own fields in declaration order."""

    base: Optional[str]
    fields: tuple[tuple[str, np.dtype], ...]


STRUCTS: dict[str, Struct] = {
    # norm.cu: the grouped l2 norm and its gradient.
    "NormParams": Struct(None, _of(PTR, "x", "xhat", "rnorm", "dxhat", "dx")
                         + _of(I64, "rows", "x_stride", "xhat_stride", "dxhat_stride", "dx_stride")
                         + _of(I32, "D", "groups", "xhat_cols", "mode")),
    # What the forward and the backward kernels both read: q, k, v, o, lse, scale, mask, bias, and the
    # sequence offsets of a packed (varlen) batch.
    "AttnParams": Struct(None, _of(PTR, "q", "k", "v", "o", "lse", "scale", "mask", "tile_any", "bias",
                                                "cu_seqlens_q", "cu_seqlens_k")
                         + _of(I64, *_strides("q", "k", "v", "o"), "lse_sb", "lse_sh", "bias_sb", "bias_sh",
                               "bias_sq", "mask_sb", "tile_any_sb")
                         + _of(I32, "B", "H", "Hk", "Nq", "Nk", "D", "causal", "bias_f32")),
    "FwdParams": Struct("AttnParams", _of(I32, "n_key_tiles", "groups")),
    "BwdParams": Struct("AttnParams", _of(PTR, "dout", "lse2", "dvec", "dbias", "dq", "dk", "dv", "dscale_rows")
                        + _of(I64, *_strides("do", "dq", "dkv"), "dbias_sb", "dbias_sh", "dbias_sq", "n_y")
                        + _of(I32, "nq_pad", "dbias_mode", "dbias_f32", "dq_atomic", "dk_f32", "dv_f32", "nsplit",
                              "heads_per_split", "n_chunks", "dscale_stats")),
    # decode.cu: KV-cache attention (decode_fwd, decode_combine, kv_append).
    "DecodeParams": Struct(None, _of(PTR, "q", "k", "v", "k_new", "v_new", "seqlens", "block_table", "scale", "o",
                                     "lse", "opart", "lpart", "mpart")
                           + _of(I64, "q_sn", "k_sp", "k_sh", "k_sn", "v_sp", "v_sh", "v_sn", "o_sn", "bt_sb",
                                 "part_rows")
                           + _of(I32, "B", "H", "Hk", "Nq", "D", "new_keys", "page_size", "page_shift", "num_splits",
                                 "n_row_tiles", "causal", "groups", "norm_qk", "pad_")),
}

# NormParams.mode bits (norm.cu NORM_ZERO_NONFINITE, NORM_COPY): zero what is not finite (a chunk with a
# non-finite element; single elements with COPY), and copy the rows (zero-padded) instead of normalizing.
NORM_MODE_ZERO_NONFINITE, NORM_MODE_COPY = 1, 2

# BwdParams.dbias_mode: where dS goes.
DBIAS_NONE, DBIAS_STORE, DBIAS_ATOMIC = 0, 1, 2


def _nested(name: str) -> np.dtype:
    """The struct as a NumPy dtype whose first field is its base struct (aligned like C++)."""
    s = STRUCTS[name]
    fields = ([("__base__", _nested(s.base))] if s.base else []) + list(s.fields)
    return np.dtype(fields, align=True)


def _flatten(dtype: np.dtype, offset: int = 0) -> list[tuple[str, np.dtype, int]]:
    out = []
    for n in dtype.names:
        sub, off = dtype.fields[n][:2]
        out += _flatten(sub, offset + off) if sub.names else [(n, sub, offset + off)]
    return out


def record_dtype(name: str) -> np.dtype:
    """Struct `name` of STRUCTS as a flat NumPy dtype with the C++ offsets and size."""
    nested = _nested(name)
    flat = _flatten(nested)
    return np.dtype({"names": [f[0] for f in flat], "formats": [f[1] for f in flat],
                     "offsets": [f[2] for f in flat], "itemsize": nested.itemsize}, align=True)


NORM_PARAMS = record_dtype("NormParams")
FWD_PARAMS = record_dtype("FwdParams")
BWD_PARAMS = record_dtype("BwdParams")
DECODE_PARAMS = record_dtype("DecodeParams")


def make_record(dtype: np.dtype, **fields: int) -> np.void:
    """A NumPy structured scalar of `dtype` (a kernel's params struct) with the given fields set.

    Every field except those named ``pad_``/ending in ``_pad`` must be given (a forgotten field is a
    silent wrong answer on the device, so it is an error here); pointers are ints (``Device.ptr``)."""
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
