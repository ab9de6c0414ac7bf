"""Device limits, device capabilities, and the dimension arithmetic every other launch module uses.

The constants mirror static_asserts and constants of cuda_src/; the grid limits are read at call time
(``limits.GRID_YZ_LIMIT``), so a test may lower them to exercise the kernels' grid loops.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..problem import DTYPE_NAMES, Problem

GRID_YZ_LIMIT = 65535  # largest grid y (and z) extent; kernels loop over B*H beyond it
GRID_X_LIMIT = 2**31 - 1
MAX_HEAD_DIM = 256  # the fused kernels keep a row of O (D fp32 accumulators per 4 lanes) in registers
SMEM_OPTIN_LIMIT = 163 * 1024  # largest dynamic shared memory per block on sm_80 (sm_90 allows 227 KB)
SMEM_DEFAULT_LIMIT = 48 * 1024  # dynamic shared memory a kernel may use without raising its opt-in attribute
# Largest dynamic shared memory per block (opt-in) of the architectures the tiles are chosen for:
# A100/A30 (sm_80), consumer Ampere and Ada (sm_86, sm_89: 99 KB), Hopper (sm_90). The registry holds
# the tile shapes every one of these picks; other devices pick by their own limit among them.
SMEM_OPTIN_BY_ARCH = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
MIN_COMPUTE_CAPABILITY = (8, 0)  # cp.async, ldmatrix, bf16 and tf32 mma

# The kernels' element types (cuda_src/common.cuh), by the dtype names of problem.DTYPE_NAMES.
CTYPES = {"float16": "ca::half_t", "bfloat16": "ca::bf16_t", "float32": "float"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
KERNEL_DTYPES = tuple(CTYPES)  # every dtype the kernels are instantiated for


@dataclass(frozen=True)
class DeviceCaps:
    """What the launch layer needs to know of a device to pick tiles and grids."""

    compute_capability: tuple[int, int]  # (major, minor)
    smem_optin: int  # largest dynamic shared memory per block, bytes (with the opt-in attribute)
    sm_count: int

    def check(self) -> None:
        """Raise RuntimeError on a device the kernels cannot run on (nothing is launched)."""
        if tuple(self.compute_capability) < MIN_COMPUTE_CAPABILITY:
            cc = ".".join(map(str, self.compute_capability))
            raise RuntimeError(f"the fused kernels need an NVIDIA GPU of compute capability >= 8.0 (Ampere or newer: "
                               f"cp.async, bf16/tf32 tensor cores); this device has {cc}. Use backend='reference'")


# The devices the emulator can present itself as (what the launch layer then picks kernels for): an
# A100 (sm_80, the default), consumer Ampere / Ada, and an H100 (sm_90a: its Hopper kernels run too).
EMULATED_DEVICES = {
    "sm_80": DeviceCaps((8, 0), SMEM_OPTIN_BY_ARCH["sm_80"], 108),
    "sm_86": DeviceCaps((8, 6), SMEM_OPTIN_BY_ARCH["sm_86"], 84),
    "sm_89": DeviceCaps((8, 9), SMEM_OPTIN_BY_ARCH["sm_89"], 128),
    "sm_90a": DeviceCaps((9, 0), SMEM_OPTIN_BY_ARCH["sm_90"], 132),
}
EMU_ARCH_ENV = "CUPY_COSATTN_EMU_ARCH"


def emulated_from_env() -> DeviceCaps:
    """EMULATED_DEVICES[$CUPY_COSATTN_EMU_ARCH], sm_80 when unset; ValueError for another name."""
    arch = os.environ.get(EMU_ARCH_ENV, "").strip() or "sm_80"
    if arch not in EMULATED_DEVICES:
        raise ValueError(f"{EMU_ARCH_ENV}={arch!r}: expected one of {', '.join(EMULATED_DEVICES)}")
    return EMULATED_DEVICES[arch]


# The device the emulator presents itself as: CUPY_COSATTN_EMU_ARCH (default sm_80), set_emulated_arch()
# or emulated_arch(); tests also replace it to mimic other GPUs.
EMULATED_DEVICE = emulated_from_env()


def set_emulated_arch(arch: str) -> None:
    """Make the emulator present itself as a device of `arch` (a key of EMULATED_DEVICES): "sm_90a"
    runs the Hopper kernels on the CPU."""
    global EMULATED_DEVICE
    if arch not in EMULATED_DEVICES:
        raise ValueError(f"arch: {arch!r}, expected one of {', '.join(EMULATED_DEVICES)}")
    EMULATED_DEVICE = EMULATED_DEVICES[arch]


@contextlib.contextmanager
def emulated_arch(arch: str) -> Iterator[None]:
    """set_emulated_arch(arch) for the duration of a with-block."""
    global EMULATED_DEVICE
    before = EMULATED_DEVICE
    set_emulated_arch(arch)
    try:
        yield
    finally:
        EMULATED_DEVICE = before


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def storage_dim(D: int) -> int:
    """Row length of the arrays the attention kernels read and write: D rounded up to a multiple of
    16 (at least 16), zero past D. Tile loads then need no column checks and every row is whole
    16-byte cp.async chunks. Equal to D (no copy) for every D % 16 == 0."""
    return max(16, round_up(D, 16))


def dtype_name(dtype: np.dtype) -> str:
    """The kernels' name ("float16", "bfloat16", "float32") of an array dtype."""
    return DTYPE_NAMES[np.dtype(dtype)]


def check_supported(prob: Problem) -> None:
    """Raise ValueError for problems the fused kernels cannot run (nothing is launched)."""
    if prob.D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={prob.D} is not supported by the fused kernels (at most {MAX_HEAD_DIM}); "
                         f"use backend='reference'")
    if prob.Nq >= 2**31 or prob.Nk >= 2**31:
        raise ValueError(f"sequence lengths must be < 2^31, got Nq={prob.Nq}, Nk={prob.Nk}")


def check_smem(what: str, prob: Problem, need: int, caps: DeviceCaps) -> None:
    """Raise ValueError (before anything is launched) when a kernel's tiles do not fit the device."""
    if need > caps.smem_optin:
        raise ValueError(f"{what} for head dim D={prob.D} in {prob.dtype_name} needs {need} bytes of shared memory "
                         f"per block; this device allows {caps.smem_optin}. Use a smaller head dim, another dtype, "
                         f"or backend='reference'")
