"""Array helpers shared by both device adapters: 2-byte floats moved as their bits, and the
bfloat16-safe cast.

CuPy before 14 has no bfloat16 kernels at all, so a copy, a fill or a strided slice of a bfloat16 array
would fail there; moving the bits is exact for every 2-byte type and works with any CuPy (and NumPy,
so the emulator tests run the same path).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..problem import BFLOAT16


def bits_dtype(dtype: np.dtype) -> np.dtype:
    """uint16 for a 2-byte float dtype, else the dtype itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype.itemsize == 2 and dtype.kind not in "iu" else dtype


def bits(x: Any) -> Any:
    """`x` viewed as uint16 when it holds a 2-byte float (float16, bfloat16), else `x` itself."""
    return x.view(bits_dtype(x.dtype))


def contiguous(xp: Any, x: Any) -> Any:
    """`x` itself when C-contiguous, else a C-contiguous copy (of the bits for 2-byte floats)."""
    if x.flags.c_contiguous:
        return x
    return xp.ascontiguousarray(bits(x)).view(x.dtype)


def copy_into(dst: Any, src: Any) -> None:
    """dst[...] = src. Arrays of one 2-byte float dtype are copied as their bits (no float kernel);
    anything else is an ordinary (converting) assignment."""
    if np.dtype(dst.dtype) == np.dtype(src.dtype):
        bits(dst)[...] = bits(src)
    else:
        dst[...] = src


def cast(xp: Any, x: Any, dtype: np.dtype) -> Any:
    """x converted to `dtype` (round to nearest even). Conversions to and from bfloat16 go through
    the bit patterns with integer arithmetic, which CuPy can run (it has no bfloat16 arithmetic);
    NumPy takes the same path, so the emulator tests cover it."""
    dtype = np.dtype(dtype)
    src = np.dtype(x.dtype)
    if src == dtype:
        return x
    if dtype == BFLOAT16:
        u = xp.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        u = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
        return u.astype(np.uint16).view(BFLOAT16)
    if src == BFLOAT16:
        f = (xp.ascontiguousarray(x).view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
        return f if dtype == np.float32 else f.astype(dtype)
    return x.astype(dtype)
