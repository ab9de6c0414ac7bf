"""The sm_90a (Hopper) forward, cuda_src/hopper_fwd.cu ``attn_fwd_sm90``: its tiles and shared memory,
which problems it runs (:func:`fallback_reason`), and its one argument (four tensor maps and the
``FwdParams`` record, :func:`make_args`). Its name expressions are registry.sm90_fwd_name.

The kernel is FlashAttention-3 shaped (docs/kernels.md, "The Hopper forward (sm_90a)"): 384 threads, a
producer warpgroup feeding K/V tiles of 128 keys through TMA into a ring of shared buffers, two consumer
warpgroups of 64 query rows each computing with wgmma. It covers every feature of the portable forward
(causal with Nq != Nk, key mask with tile skipping, bias with the running-max variant, GQA, groups,
per-head scale, any lengths, lse) for float16 and bfloat16 with a padded head dim of 64 or 128 on a
compute capability 9.0 device; :func:`fallback_reason` says why any other problem stays on
``forward.cu``. It compiles for ``-arch=sm_90a`` only (``ARCH``, the registry's ``KernelSpec.arch``):
``Device.kernel`` passes that option itself (CuPy appends ``-arch=sm_XX`` of the device after it;
NVRTC then keeps the arch-specific target).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import tensormap

ARCH = "sm_90a"  # NVRTC target: wgmma and setmaxnreg exist only on the arch-specific sm_90a
SOURCE = "hopper_fwd.cu"
COMPUTE_CAPABILITY = (9, 0)  # devices that run sm_90a code
DTYPES = ("float16", "bfloat16")
HEAD_DIM_PADS = (64, 128)  # storage_dim(D) the kernel is instantiated for
BLOCK_M = 128  # query rows per block (2 consumer warpgroups x 64)
BLOCK_N = 128  # keys per K/V tile (and per tile_any flag)
WG_ROWS = 64  # query rows per consumer warpgroup (one TMA store box)
THREADS = 384  # 3 warpgroups
CONSUMER_WARPS = 8  # the warps of the 2 consumer warpgroups: they run the main loop over key tiles
SPAN = 64  # 16-bit elements of one 128-byte swizzled row: the boxes' inner dimension
SWIZZLE = 128
ALIGN_SLACK = 1024  # the kernel aligns its shared memory to 1024 bytes (the 128B swizzle's repeat)
MAX_BH = 2**31 - 65536  # (batch, head) pairs counted in 32 bits, stepping by up to 65535


def stages(dp: int) -> int:
    """K/V ring depth (hopper_fwd.cu Smem::STAGES)."""
    return 3 if dp <= 64 else 2


def smem_bytes(dp: int) -> int:
    """Dynamic shared memory of attn_fwd_sm90 (hopper_fwd.cu Smem::BYTES): Q, the K and V rings, a
    mask byte and a flag byte per key and stage, the mbarriers, and the alignment slack."""
    st = stages(dp)
    q = BLOCK_M * dp * 2
    kv = BLOCK_N * dp * 2
    bars = 8 * (2 + 5 * st)
    return q + 2 * st * kv + 2 * st * BLOCK_N + bars + ALIGN_SLACK


def fallback_reason(dtype_name: str, D: int, dp: int, BH: int, compute_capability: tuple[int, int],
                    smem_optin: int) -> Optional[str]:
    """None when attn_fwd_sm90 runs a problem of this dtype, head dim D (padded to dp) and B*H (query)
    heads on a device of this compute capability and opt-in shared memory; else why the portable
    forward runs it instead."""
    if tuple(compute_capability) != COMPUTE_CAPABILITY:
        return f"compute capability {compute_capability} is not 9.0 (sm_90a)"
    if dtype_name not in DTYPES:
        return f"{dtype_name} (the Hopper forward is 16-bit only; float32 uses 3xTF32 mma.sync)"
    if dp not in HEAD_DIM_PADS:
        return f"head dim {D} pads to {dp}, not one of {HEAD_DIM_PADS}"
    if BH > MAX_BH:
        return f"B*H = {BH} (the kernel counts (batch, head) pairs in 32 bits)"
    if smem_bytes(dp) > smem_optin:
        return f"needs {smem_bytes(dp)} bytes of shared memory, the device allows {smem_optin}"
    return None


def args_dtype(fwd_params: np.dtype) -> np.dtype:
    """hopper_fwd.cu ``Args``: the tensor maps of q, k, v, out (64-byte aligned, 128 bytes each) and
    the FwdParams record, the struct padded to its 64-byte alignment."""
    tm = tensormap.TENSOR_MAP_DTYPE
    off = 4 * tensormap.TENSOR_MAP_BYTES
    size = -(-(off + fwd_params.itemsize) // 64) * 64
    return np.dtype({"names": ["tq", "tk", "tv", "to", "p"], "formats": [tm, tm, tm, tm, fwd_params],
                     "offsets": [0, 128, 256, 384, off], "itemsize": size})


def make_args(fwd_record: np.void, q: Any, k: Any, v: Any, o: Any, target: str) -> np.void:
    """The kernel's argument: tensor maps of the canonical device arrays q, o (B, H, Nq, dp) and k, v
    (B, Hk, Nk, dp) (each 4-D, last dim contiguous; boxes of 64 columns x BLOCK_M / BLOCK_N / WG_ROWS
    rows, 128B swizzle; rows past N read as zeros and are never written), and `fwd_record`
    (FwdParams). `target`: "gpu" (the driver's encoding, CuPy arrays) or "emulator"."""
    rec = np.zeros((), args_dtype(fwd_record.dtype))
    for field, arr, rows in (("tq", q, BLOCK_M), ("tk", k, BLOCK_N), ("tv", v, BLOCK_N), ("to", o, WG_ROWS)):
        rec[field] = tensormap.from_array(arr, (1, 1, rows, SPAN), swizzle=SWIZZLE, target=target)
    rec["p"] = fwd_record
    return rec[()]
