"""Tensor maps for TMA bulk tensor copies (cp.async.bulk.tensor), built on the host.

A tensor map (CUtensorMap) is 128 opaque bytes describing a tiled view of a global tensor: element
type, up to 5 dimensions (innermost first) with their byte strides, the box (tile) one copy moves,
the element strides inside the box, the shared-memory swizzle and the out-of-bound fill. Kernels
take it by value (``const __grid_constant__ ca::sm90::TensorMap``, see cuda_src/hopper.cuh).

    from cupy_cosattn import tensormap
    tm = tensormap.encode_tiled(ptr, "bfloat16", global_dims=(128, 4096), global_strides=(256,),
                                box_dims=(64, 64), swizzle=128, target="gpu")
    tm = tensormap.from_array(x, box_shape=(64, 64), swizzle=128, target="emulator")  # x: (4096, 128)

``target="gpu"`` encodes through the CUDA driver's cuTensorMapEncodeTiled (cuda-bindings'
``cuda.bindings.driver`` when importable, else ctypes on libcuda); ``target="emulator"`` writes the
CPU emulator's own documented layout (cuda_src/emu/hopper.h; the emulator cannot call the driver).
Arguments are checked as the driver checks them, before anything is encoded, so both targets reject
the same maps with a ValueError / TypeError naming the argument.

The result is a NumPy structured scalar of ``TENSOR_MAP_DTYPE`` (128 bytes), which a kernel launch
passes by value; inside a parameter struct it must sit at a 64-byte aligned offset.
"""
from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["TENSOR_MAP_BYTES", "TENSOR_MAP_DTYPE", "EMULATOR_MAGIC", "encode_tiled", "from_array", "TensorMapError"]

TENSOR_MAP_BYTES = 128
TENSOR_MAP_DTYPE = np.dtype([("opaque", "<u8", (16,))])
EMULATOR_MAGIC = 0x31414D54  # kCaemuTensorMapMagic in cuda_src/emu/hopper.h

MAX_RANK = 5
MAX_BOX_DIM = 256
MAX_ELEMENT_STRIDE = 8
MAX_GLOBAL_DIM = 2**32
MAX_GLOBAL_STRIDE = 2**40
GLOBAL_ALIGN = 16

# CUtensorMapDataType values, with the element size and whether the type is floating point.
_DTYPES = {
    "uint8": (0, 1, False),
    "uint16": (1, 2, False),
    "uint32": (2, 4, False),
    "int32": (3, 4, False),
    "uint64": (4, 8, False),
    "int64": (5, 8, False),
    "float16": (6, 2, True),
    "float32": (7, 4, True),
    "float64": (8, 8, True),
    "bfloat16": (9, 2, True),
}
# CUtensorMapSwizzle by span in bytes; CUtensorMapL2promotion by bytes; CUtensorMapFloatOOBfill.
_SWIZZLE = {0: 0, 32: 1, 64: 2, 128: 3}
_L2 = {0: 0, 64: 1, 128: 2, 256: 3}
_OOB = {"zero": 0, "nan": 1}
_TARGETS = ("gpu", "emulator")
_CUDA_SUCCESS = 0


class TensorMapError(RuntimeError):
    """The CUDA driver refused to encode a tensor map the Python checks accepted."""


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError as e:
            raise TypeError(f"dtype: {dtype!r} is not a NumPy dtype or a dtype name "
                            f"(one of {', '.join(_DTYPES)})") from e
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} has no tensor-map element type (one of {', '.join(_DTYPES)})")
    return name


def _int_tuple(v, what: str) -> tuple:
    try:
        out = tuple(v)
    except TypeError as e:
        raise TypeError(f"{what}: expected a sequence of integers, got {type(v).__name__}") from e
    for x in out:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise TypeError(f"{what}: expected integers, got {x!r} ({type(x).__name__})")
    return tuple(int(x) for x in out)


def _validate(global_address, dtype, global_dims, global_strides, box_dims, element_strides, swizzle, oob_fill,
              l2_promotion, target):
    """The driver's rules for cuTensorMapEncodeTiled (interleave none); returns the normalized arguments."""
    if target not in _TARGETS:
        raise ValueError(f"target: {target!r}, expected one of {_TARGETS}")
    if isinstance(global_address, (bool, np.bool_)) or not isinstance(global_address, (int, np.integer)):
        raise TypeError(f"global_address: expected an integer address, got {type(global_address).__name__}")
    global_address = int(global_address)
    if global_address <= 0:
        raise ValueError(f"global_address: {global_address:#x} is not a device address")
    if global_address % GLOBAL_ALIGN:
        raise ValueError(f"global_address: {global_address:#x} is not {GLOBAL_ALIGN}-byte aligned")
    name = _dtype_name(dtype)
    code, elem, is_float = _DTYPES[name]
    dims = _int_tuple(global_dims, "global_dims")
    rank = len(dims)
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"global_dims: rank {rank}, expected 1..{MAX_RANK} dimensions")
    for i, d in enumerate(dims):
        if not 1 <= d <= MAX_GLOBAL_DIM:
            raise ValueError(f"global_dims[{i}] = {d}, expected 1..2**32")
    strides = _int_tuple(global_strides, "global_strides")
    if len(strides) != rank - 1:
        raise ValueError(f"global_strides: {len(strides)} strides for rank {rank}, expected {rank - 1} "
                         "(the byte strides of dimensions 1..rank-1)")
    for i, s in enumerate(strides):
        if s <= 0 or s % GLOBAL_ALIGN or s >= MAX_GLOBAL_STRIDE:
            raise ValueError(f"global_strides[{i}] = {s} bytes, expected a positive multiple of {GLOBAL_ALIGN} "
                             "below 2**40")
    box = _int_tuple(box_dims, "box_dims")
    if len(box) != rank:
        raise ValueError(f"box_dims: {len(box)} dimensions for rank {rank}")
    for i, b in enumerate(box):
        if not 1 <= b <= MAX_BOX_DIM:
            raise ValueError(f"box_dims[{i}] = {b}, expected 1..{MAX_BOX_DIM}")
    inner = box[0] * elem
    if inner % 16:
        raise ValueError(f"box_dims[0] = {box[0]} elements of {elem} bytes = {inner} bytes, expected a multiple "
                         "of 16 bytes")
    es = (1,) * rank if element_strides is None else _int_tuple(element_strides, "element_strides")
    if len(es) != rank:
        raise ValueError(f"element_strides: {len(es)} strides for rank {rank}")
    for i, e in enumerate(es):
        if not 1 <= e <= MAX_ELEMENT_STRIDE:
            raise ValueError(f"element_strides[{i}] = {e}, expected 1..{MAX_ELEMENT_STRIDE}")
    if swizzle not in _SWIZZLE:
        raise ValueError(f"swizzle: {swizzle!r}, expected the span in bytes: 0 (none), 32, 64 or 128")
    if swizzle and inner > swizzle:
        raise ValueError(f"box_dims[0]: the inner box is {inner} bytes, more than the {swizzle}-byte swizzle span")
    if oob_fill not in _OOB:
        raise ValueError(f"oob_fill: {oob_fill!r}, expected 'zero' or 'nan'")
    if oob_fill == "nan" and not is_float:
        raise ValueError(f"oob_fill: 'nan' needs a floating-point dtype, got {name}")
    if l2_promotion not in _L2:
        raise ValueError(f"l2_promotion: {l2_promotion!r}, expected 0, 64, 128 or 256 bytes")
    return global_address, name, code, elem, dims, strides, box, es


def _as_map(raw: bytes) -> np.void:
    assert len(raw) == TENSOR_MAP_BYTES
    return np.frombuffer(raw, dtype=TENSOR_MAP_DTYPE)[0].copy()


def _encode_emulator(addr, code, elem, dims, strides, box, es, swizzle, oob, l2) -> bytes:
    """The layout of caemu_tensormap (cuda_src/emu/hopper.h)."""
    rank = len(dims)
    pad = lambda v, n: tuple(v) + (0,) * (n - len(v))  # noqa: E731
    raw = struct.pack("<IBBBBBBB5xQ5Q4Q5I5B7x", EMULATOR_MAGIC, code, rank, elem, _SWIZZLE[swizzle], 0, _OOB[oob],
                      _L2[l2], addr, *pad(dims, 5), *pad(strides, 4), *pad(box, 5), *pad(es, 5))
    assert len(raw) == TENSOR_MAP_BYTES
    return raw


def _encode_driver(addr, code, dims, strides, box, es, swizzle, oob, l2) -> bytes:
    """cuTensorMapEncodeTiled through cuda-bindings, or through ctypes on libcuda."""
    rank = len(dims)
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]
    except ImportError:
        driver = None
    if driver is not None:
        (err,) = driver.cuInit(0)
        if int(err) != _CUDA_SUCCESS:
            raise TensorMapError(f"cuInit failed with {err!r}")
        err, tmap = driver.cuTensorMapEncodeTiled(
            driver.CUtensorMapDataType(code), rank, addr, [driver.cuuint64_t(d) for d in dims],
            [driver.cuuint64_t(s) for s in strides], [driver.cuuint32_t(b) for b in box],
            [driver.cuuint32_t(e) for e in es], driver.CUtensorMapInterleave(0),
            driver.CUtensorMapSwizzle(_SWIZZLE[swizzle]), driver.CUtensorMapL2promotion(_L2[l2]),
            driver.CUtensorMapFloatOOBfill(_OOB[oob]))
        if int(err) != _CUDA_SUCCESS:
            raise TensorMapError(f"cuTensorMapEncodeTiled failed with {err!r}")
        return b"".join(int(w).to_bytes(8, "little") for w in tmap.opaque)
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise TensorMapError(f"target='gpu' needs the CUDA driver (libcuda.so.1): {e}") from e
    rc = lib.cuInit(0)
    if rc != _CUDA_SUCCESS:
        raise TensorMapError(f"cuInit failed with CUresult {rc}")
    fn = lib.cuTensorMapEncodeTiled
    u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(TENSOR_MAP_BYTES + 64)  # the map must be 64-byte aligned
    base = (ctypes.addressof(buf) + 63) & ~63
    rc = fn(base, code, rank, addr, (ctypes.c_uint64 * rank)(*dims),
            (ctypes.c_uint64 * max(1, rank - 1))(*strides), (ctypes.c_uint32 * rank)(*box),
            (ctypes.c_uint32 * rank)(*es), 0, _SWIZZLE[swizzle], _L2[l2], _OOB[oob])
    if rc != _CUDA_SUCCESS:
        raise TensorMapError(f"cuTensorMapEncodeTiled failed with CUresult {rc}")
    return ctypes.string_at(base, TENSOR_MAP_BYTES)


def encode_tiled(global_address: int, dtype: Any, global_dims: Sequence[int], global_strides: Sequence[int],
                 box_dims: Sequence[int], *, element_strides: Sequence[int] | None = None, swizzle: int = 0,
                 oob_fill: str = "zero", l2_promotion: int = 0, target: str) -> np.void:
    """A tiled tensor map (CUtensorMap) for ``cp.async.bulk.tensor`` copies.

    Args:
        global_address: device address of element (0, ..., 0); 16-byte aligned.
        dtype: element type: a NumPy dtype (``ml_dtypes.bfloat16`` too) or one of ``uint8, uint16,
            uint32, int32, uint64, int64, float16, float32, float64, bfloat16``.
        global_dims: (rank,) sizes in elements, innermost (contiguous) dimension first; rank 1..5,
            each 1..2**32.
        global_strides: (rank - 1,) byte strides of dimensions 1..rank-1 (dimension 0 is contiguous),
            each a multiple of 16 below 2**40.
        box_dims: (rank,) the box one copy moves, innermost first, each 1..256; the inner box
            (box_dims[0] * element size) a multiple of 16 bytes, and with a swizzle at most its span.
        element_strides: (rank,) traversal steps 1..8 (default all 1); dimension 0's is ignored, as
            by the hardware.
        swizzle: shared-memory swizzle span in bytes: 0 (none), 32, 64 or 128.
        oob_fill: ``"zero"`` or ``"nan"`` (floating-point types only) for out-of-bound elements.
        l2_promotion: L2 fetch granularity in bytes, 0, 64, 128 or 256 (recorded; the emulator does
            not model caches).
        target: ``"gpu"`` (the driver's encoding) or ``"emulator"``.

    Returns:
        A ``TENSOR_MAP_DTYPE`` scalar (128 bytes) to pass by value.
    """
    addr, _name, code, elem, dims, strides, box, es = _validate(
        global_address, dtype, global_dims, global_strides, box_dims, element_strides, swizzle, oob_fill,
        l2_promotion, target)
    if target == "emulator":
        raw = _encode_emulator(addr, code, elem, dims, strides, box, es, swizzle, oob_fill, l2_promotion)
    else:
        raw = _encode_driver(addr, code, dims, strides, box, es, swizzle, oob_fill, l2_promotion)
    return _as_map(raw)


def _device_address(a, target: str) -> int:
    if target == "emulator":
        from . import emulator

        return emulator.device_ptr(a)
    data = getattr(a, "data", None)
    ptr = getattr(data, "ptr", None)
    if ptr is None:
        raise TypeError(f"a: target='gpu' needs a CuPy array, got {type(a).__name__}")
    return int(ptr)


def from_array(a: Any, box_shape: Sequence[int], *, swizzle: int = 0, oob_fill: str = "zero", l2_promotion: int = 0,
               element_strides: Sequence[int] | None = None, target: str) -> np.void:
    """encode_tiled for an array in NumPy order (outermost dimension first).

    Args:
        a: a device array (an emulator device array for target="emulator", a CuPy array for
            target="gpu") of rank 1..5 whose last dimension is contiguous.
        box_shape: (a.ndim,) the box in the same order as ``a.shape``.
        element_strides: (a.ndim,) in the same order, default all 1.
        swizzle, oob_fill, l2_promotion, target: as for encode_tiled.
    """
    shape = tuple(int(s) for s in a.shape)
    ndim = len(shape)
    if not 1 <= ndim <= MAX_RANK:
        raise ValueError(f"a: {ndim} dimensions, expected 1..{MAX_RANK}")
    itemsize = int(np.dtype(a.dtype).itemsize)
    if int(a.strides[-1]) != itemsize:
        raise ValueError(f"a: the last dimension must be contiguous (stride {a.strides[-1]} bytes, element "
                         f"{itemsize} bytes)")
    box = _int_tuple(box_shape, "box_shape")
    if len(box) != ndim:
        raise ValueError(f"box_shape: {len(box)} dimensions for an array of {ndim}")
    es = None if element_strides is None else _int_tuple(element_strides, "element_strides")[::-1]
    if es is not None and len(es) != ndim:
        raise ValueError(f"element_strides: {len(es)} strides for an array of {ndim} dimensions")
    return encode_tiled(_device_address(a, target), a.dtype, shape[::-1],
                        tuple(int(s) for s in a.strides[:-1])[::-1], box[::-1], element_strides=es,
                        swizzle=swizzle, oob_fill=oob_fill, l2_promotion=l2_promotion, target=target)
