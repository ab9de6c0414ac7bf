"""The sm_90a (Hopper) forward, cuda_src/hopper_fwd.cu ``attn_fwd_sm90``: which problems it runs, its
registry entries, its one argument (four tensor maps and the ``FwdParams`` record) and its launch.

The kernel is FlashAttention-3 shaped (docs/kernels.md, "The Hopper forward"): 384 threads, a producer
warpgroup feeding K/V tiles of 128 keys through TMA into a ring of shared buffers, two consumer
warpgroups of 64 query rows each computing with wgmma. It covers every feature of the portable forward
(causal with Nq != Nk, key mask with tile skipping, bias with the running-max variant, GQA, groups,
per-head scale, any lengths, lse) for float16 and bfloat16 with a padded head dim of 64 or 128 on a
compute capability 9.0 device; :func:`fallback_reason` says why any other problem stays on
``forward.cu``. It compiles for ``-arch=sm_90a`` only (``ARCH``): the launch layer passes that option
itself (CuPy appends ``-arch=sm_XX`` of the device after it; NVRTC then keeps the arch-specific target).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import tensormap

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
_CTYPES = {"float16": "ca::half_t", "bfloat16": "ca::bf16_t"}


def stages(dp: int) -> int:
    """K/V ring depth (hopper_fwd.cu Smem::STAGES): what 227 KB of shared memory hold next to Q."""
    return 3 if dp <= 64 else 2


def smem_bytes(dp: int) -> int:
    """Dynamic shared memory of attn_fwd_sm90 (hopper_fwd.cu Smem::BYTES): Q, the K and V rings, a
    mask byte and a flag byte per key and stage, the mbarriers, and the alignment slack."""
    st = stages(dp)
    q = BLOCK_M * dp * 2
    kv = BLOCK_N * dp * 2
    bars = 8 * (2 + 5 * st)
    return q + 2 * st * kv + 2 * st * BLOCK_N + bars + ALIGN_SLACK


def kernel_name(dtype_name: str, dp: int, running_max: bool) -> str:
    return f"ca::fwd90::attn_fwd_sm90<{_CTYPES[dtype_name]}, {dp}, {'true' if running_max else 'false'}>"


def fallback_reason(dtype_name: str, D: int, dp: int, BH: int, compute_capability: tuple,
                    smem_optin: int) -> Optional[str]:
    """None when attn_fwd_sm90 runs a problem of this dtype, head dim D (padded to dp), B*H (query)
    heads on a device of this compute capability and opt-in shared memory; else why the portable
    forward runs it instead."""
    if tuple(compute_capability) != COMPUTE_CAPABILITY:
        return f"compute capability {compute_capability} is not 9.0 (sm_90a)"
    if dtype_name not in DTYPES:
        return f"{dtype_name} (the Hopper forward is 16-bit only; float32 uses 3xTF32 mma.sync)"
    if dp not in HEAD_DIM_PADS:
        return f"head dim {D} pads to {dp}, not one of {HEAD_DIM_PADS}"
    if BH + 65535 >= 2**31:
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


def grid(Nq: int, BH: int, grid_yz_limit: int) -> tuple:
    """x: query tiles of BLOCK_M rows; y: (batch, head) pairs up to the grid limit (the kernel loops)."""
    return (-(-Nq // BLOCK_M), min(BH, grid_yz_limit), 1)


def run_forward(backend: Any, prob: Any, inp: Any, out: Optional[Any] = None, lse: Optional[Any] = None,
                kernel: Optional[Any] = None) -> tuple:
    """attn_fwd_sm90 for a canonical problem on `backend` (a launch.Backend whose device passed
    :func:`fallback_reason`): (out (B, H, Nq, D), lse (B, H, Nq) float32), as Backend.forward.
    `kernel`: a compiled attn_fwd_sm90 to launch instead of the registry's (tests launch planted
    copies of the source through it)."""
    from . import launch

    B, H, Hk, Nq, Nk, D = prob.B, prob.H, prob.Hk, prob.Nq, prob.Nk, prob.D
    dt = prob.dtype_name
    dp = launch.head_dim_pad(D)
    running_max = not launch.fixed_offset_ok(prob, inp.scale)
    qhat, khat, v = backend.prepare_qkv(prob, inp)
    Ds = int(qhat.shape[-1])
    scale = backend.device_scale(inp.scale)
    mask = backend.device_mask(inp.mask)
    tiles = backend.tile_any(inp.mask, BLOCK_N)
    bias, (bsb, bsh, bsq), bias_f32 = backend.device_bias(inp.bias, prob)
    direct_out = out is not None and Ds == D and backend.is_device_array(out)
    o = out if direct_out else backend.empty((B, H, Nq, Ds), prob.dtype)
    direct_lse = lse is not None and backend.is_device_array(lse)
    lse_d = lse if direct_lse else backend.empty((B, H, Nq), np.float32)

    n_tiles = -(-Nk // BLOCK_N)
    rec = launch.make_record(
        launch.FWD_PARAMS,
        q=backend.ptr(qhat), k=backend.ptr(khat), v=backend.ptr(v), o=backend.ptr(o), lse=backend.ptr(lse_d),
        scale=backend.ptr(scale), mask=backend.ptr(mask), tile_any=backend.ptr(tiles), bias=backend.ptr(bias),
        q_sb=H * Nq * Ds, q_sh=Nq * Ds, q_sn=Ds,
        k_sb=Hk * Nk * Ds, k_sh=Nk * Ds, k_sn=Ds,
        v_sb=Hk * Nk * Ds, v_sh=Nk * Ds, v_sn=Ds,
        o_sb=H * Nq * Ds, o_sh=Nq * Ds, o_sn=Ds,
        lse_sb=H * Nq, lse_sh=Nq,
        bias_sb=bsb, bias_sh=bsh, bias_sq=bsq,
        mask_sb=Nk if mask is not None else 0, tile_any_sb=n_tiles if tiles is not None else 0,
        B=B, H=H, Hk=Hk, Nq=Nq, Nk=Nk, D=Ds, causal=int(prob.causal), bias_f32=int(bias_f32),
        n_key_tiles=n_tiles, groups=prob.groups,
    )
    args = make_args(rec, qhat, khat, v, o, "gpu" if backend.name == "cuda" else "emulator")
    smem = smem_bytes(dp)
    if kernel is None:
        kernel = backend.kernel(SOURCE, kernel_name(dt, dp, running_max), smem, ARCH)
    else:
        kernel.max_dynamic_shared_size_bytes = smem
    backend.launch(kernel, grid(Nq, B * H, launch.GRID_YZ_LIMIT), (THREADS, 1, 1), args, smem)
    _keep_alive = (qhat, khat, v, scale, mask, tiles, bias)  # noqa: F841  (the maps hold their addresses)

    res_o = o if Ds == D else o[..., :D]
    res_o = res_o if direct_out else backend.to_host_into(res_o, out)
    res_l = lse_d if direct_lse else backend.to_host_into(lse_d, lse)
    return res_o, res_l
