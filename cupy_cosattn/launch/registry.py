"""The kernel registry: every instantiation the launch layer can pick, its name expression, and how
instantiations group into compiled modules.

The name expressions are built here and nowhere else. ``python -m cupy_cosattn.resources`` compiles
exactly :func:`kernel_registry` with NVRTC, and tests check that every kernel :func:`dispatch.select`
picks is in it.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Optional

from . import sm90
from .limits import CTYPES, KERNEL_DTYPES, MAX_HEAD_DIM, SMEM_OPTIN_BY_ARCH
from .tiles import (
    APPEND_THREADS,
    COMBINE_WARPS,
    DECODE_THREADS,
    FWD_BIAS,
    FWD_MODES,
    FWD_THREADS,
    HEAD_DIM_PADS,
    INFO_THREADS,
    MMA_ROWS,
    NORM_THREADS,
    PREP_THREADS,
    FwdTile,
    choose_small,
    decode_config,
    decode_smem_bytes,
    fwd_smem_bytes,
    fwd_tile,
    kv_config,
    q_config,
)

FORWARD_SOURCE, NORM_SOURCE, BACKWARD_SOURCE, DECODE_SOURCE = "forward.cu", "norm.cu", "backward.cu", "decode.cu"
# Dtypes whose kernels have packed-batch (VARLEN) instantiations (cuda_src/params.cuh SeqView): the
# moved pointers and lengths need registers that the float32 kernels do not have (they would spill),
# so a float32 packed batch runs the dense kernels once per sequence (launch/packed.py).
VARLEN_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class KernelSpec:
    """One launchable kernel instantiation: its source file in cuda_src/, its NVRTC name expression,
    its block size, the dynamic shared memory the launch layer requests for it, and the NVRTC target it
    needs when it uses arch-specific instructions (None: it compiles for every architecture)."""

    source: str
    name: str
    threads: int
    smem: int = 0
    arch: Optional[str] = None  # e.g. "sm_90a" (wgmma, setmaxnreg): compiled with -arch=<arch>

    @property
    def group(self) -> tuple:
        """Kernels with the same group are compiled into one module (see :func:`module_group`)."""
        return module_group(self.source, self.name)


# ---------------------------------------------------------------------------------------------------
# Name expressions.


def fwd_name(dtype_name: str, dp: int, tile: FwdTile, mode: int, varlen: bool = False) -> str:
    """attn_fwd of `tile` and `mode` (launch.tiles FWD_FIXED, FWD_RUNNING_MAX, FWD_BIAS); the packed-batch
    (VARLEN) instantiation spells its seventh argument."""
    tail = ", true" if varlen else ""
    return f"ca::fwd::attn_fwd<{CTYPES[dtype_name]}, {dp}, {tile.bm}, {tile.bn}, {tile.kv_bufs}, {mode}{tail}>"


def sm90_fwd_name(dtype_name: str, dp: int, running_max: bool) -> str:
    """The Hopper forward (hopper_fwd.cu), fixed offset or running max."""
    return f"ca::fwd90::attn_fwd_sm90<{CTYPES[dtype_name]}, {dp}, {'true' if running_max else 'false'}>"


def norm_fwd_name(dtype_name: str) -> str:
    return f"ca::norm::l2norm_fwd<{CTYPES[dtype_name]}>"


def norm_bwd_name(dtype_name: str, grad_dtype_name: str) -> str:
    """l2norm_bwd reading dxhat of dtype grad_dtype_name ('float32' or the input's dtype)."""
    return f"ca::norm::l2norm_bwd<{CTYPES[dtype_name]}, {CTYPES[grad_dtype_name]}>"


def bwd_name(kind: str, dtype_name: str, dp: int, small: bool = False, varlen: bool = False) -> str:
    """Name expression of backward kernel `kind` ("prep", "dkdv", "dq", "info"); the default variant
    keeps its two-argument name (SMALL and VARLEN default to false). bwd_prep's third argument is
    VARLEN; bwd_dkdv's and bwd_dq's are SMALL, VARLEN."""
    if varlen:
        tail = ", true" if kind == "prep" else f", {'true' if small else 'false'}, true"
    else:
        tail = ", true" if small else ""
    return f"ca::bwd::bwd_{kind}<{CTYPES[dtype_name]}, {dp}{tail}>"


def is_varlen_name(source: str, name: str) -> bool:
    """Whether a name expression is a packed-batch (VARLEN) instantiation."""
    m = _TEMPLATE_ARGS.search(name)
    args = [a.strip() for a in m.group(1).split(",")] if m else []
    if source == FORWARD_SOURCE:
        return len(args) == 5 and args[4] == "true"
    if source == BACKWARD_SOURCE:
        want = 3 if "bwd_prep<" in name else 4
        return len(args) == want and args[-1] == "true" and "bwd_info<" not in name
    return False


def decode_name(dtype_name: str, dp: int, bn: int, wm: int, running_max: bool) -> str:
    return f"ca::dec::decode_fwd<{CTYPES[dtype_name]}, {dp}, {bn}, {wm}, {'true' if running_max else 'false'}>"


def combine_name(dtype_name: str, running_max: bool) -> str:
    return f"ca::dec::decode_combine<{CTYPES[dtype_name]}, {'true' if running_max else 'false'}>"


def append_name(dtype_name: str) -> str:
    return f"ca::dec::kv_append<{CTYPES[dtype_name]}>"


# ---------------------------------------------------------------------------------------------------
# The registry.


def forward_kernel_specs() -> list[KernelSpec]:
    """The forward instantiation of every mode (fixed offset, running max, running max with a bias)
    and tile that some architecture of SMEM_OPTIN_BY_ARCH picks, for every dtype and padded head dim."""
    specs = []
    for dt in KERNEL_DTYPES:
        for dp in range(16, MAX_HEAD_DIM + 1, 16):
            for mode in FWD_MODES:
                picked = {fwd_tile(dt, dp, lim, mode) for lim in SMEM_OPTIN_BY_ARCH.values()
                          if fwd_smem_bytes(dt, dp, fwd_tile(dt, dp, lim, mode)) <= lim}
                # packed batches have no bias: no VARLEN instantiation of the bias mode
                varlens = (False, True) if dt in VARLEN_DTYPES and mode != FWD_BIAS else (False,)
                for tile in sorted(picked, key=lambda t: (t.bm, t.bn, t.kv_bufs), reverse=True):
                    for varlen in varlens:
                        specs.append(KernelSpec(FORWARD_SOURCE, fwd_name(dt, dp, tile, mode, varlen), FWD_THREADS,
                                                fwd_smem_bytes(dt, dp, tile)))
    return specs


def norm_kernel_specs() -> list[KernelSpec]:
    specs = []
    for dt in KERNEL_DTYPES:
        specs.append(KernelSpec(NORM_SOURCE, norm_fwd_name(dt), NORM_THREADS))
        for gdt in sorted({"float32", dt}):
            specs.append(KernelSpec(NORM_SOURCE, norm_bwd_name(dt, gdt), NORM_THREADS))
    return specs


def backward_kernel_specs() -> list[KernelSpec]:
    """Every backward instantiation: the default variants, and the small ones that some architecture
    of SMEM_OPTIN_BY_ARCH picks (with their bwd_info). The kernels of one (dtype, head-dim pad) form
    one module."""
    specs = []
    for dt in KERNEL_DTYPES:
        for dp in HEAD_DIM_PADS:
            kv, q = kv_config(dt, dp), q_config(dt, dp)
            varlens = (False, True) if dt in VARLEN_DTYPES else (False,)
            for vl in varlens:
                specs += [KernelSpec(BACKWARD_SOURCE, bwd_name("prep", dt, dp, varlen=vl), PREP_THREADS),
                          KernelSpec(BACKWARD_SOURCE, bwd_name("dkdv", dt, dp, varlen=vl), kv.threads, kv.smem),
                          KernelSpec(BACKWARD_SOURCE, bwd_name("dq", dt, dp, varlen=vl), q.threads, q.smem)]
            specs.append(KernelSpec(BACKWARD_SOURCE, bwd_name("info", dt, dp), INFO_THREADS))
            picks = {choose_small(dt, dp, lim) for lim in SMEM_OPTIN_BY_ARCH.values()}
            kv_s = any(p[0] for p in picks)
            q_s = any(p[1] for p in picks)
            for vl in varlens:
                if kv_s:
                    c = kv_config(dt, dp, True)
                    specs.append(KernelSpec(BACKWARD_SOURCE, bwd_name("dkdv", dt, dp, True, vl), c.threads, c.smem))
                if q_s:
                    c = q_config(dt, dp, True)
                    specs.append(KernelSpec(BACKWARD_SOURCE, bwd_name("dq", dt, dp, True, vl), c.threads, c.smem))
            if kv_s or q_s:
                specs.append(KernelSpec(BACKWARD_SOURCE, bwd_name("info", dt, dp, True), INFO_THREADS))
    return specs


def decode_kernel_specs() -> list[KernelSpec]:
    """Every decode.cu instantiation some architecture of SMEM_OPTIN_BY_ARCH picks: decode_fwd for
    both row regimes (few rows: WM = 1; many: WM = 4) and both softmax variants, the combines and the
    appends."""
    specs = []
    for dt in KERNEL_DTYPES:
        for dp in range(16, MAX_HEAD_DIM + 1, 16):
            configs = set()
            for lim in SMEM_OPTIN_BY_ARCH.values():
                for rows in (1, MMA_ROWS + 1):
                    wm, bn = decode_config(dt, dp, rows, lim)
                    if decode_smem_bytes(dt, dp, bn, wm) <= lim:
                        configs.add((wm, bn))
            for wm, bn in sorted(configs):
                for rm in (False, True):
                    specs.append(KernelSpec(DECODE_SOURCE, decode_name(dt, dp, bn, wm, rm), DECODE_THREADS,
                                            decode_smem_bytes(dt, dp, bn, wm)))
        for rm in (False, True):
            specs.append(KernelSpec(DECODE_SOURCE, combine_name(dt, rm), COMBINE_WARPS * 32))
        specs.append(KernelSpec(DECODE_SOURCE, append_name(dt), APPEND_THREADS))
    return specs


def sm90_kernel_specs() -> list[KernelSpec]:
    """The Hopper forward (hopper_fwd.cu, sm_90a only): both variants of each 16-bit dtype and padded
    head dim it takes."""
    return [KernelSpec(sm90.SOURCE, sm90_fwd_name(dt, dp, rm), sm90.THREADS, sm90.smem_bytes(dp), sm90.ARCH)
            for dt in sm90.DTYPES for dp in sm90.HEAD_DIM_PADS for rm in (False, True)]


def kernel_registry() -> list[KernelSpec]:
    """Every (source, name expression) the package can launch, with block size, dynamic shared
    memory and NVRTC target."""
    return (norm_kernel_specs() + forward_kernel_specs() + sm90_kernel_specs() + backward_kernel_specs()
            + decode_kernel_specs())


_TEMPLATE_ARGS = re.compile(r"<(.*)>$")


def module_group(source: str, name: str) -> tuple:
    """Which instantiations share a compiled module: those of one source file with the same first
    two template arguments (element type, head dim), e.g. the fixed-offset and running-max forward
    kernels of one (dtype, D). Small enough to compile fast, few enough modules for the emulator."""
    m = _TEMPLATE_ARGS.search(name)
    args = [a.strip() for a in m.group(1).split(",")] if m else []
    varlen = ("varlen",) if is_varlen_name(source, name) else ()  # compiled apart: dense modules stay as they are
    return (source,) + tuple(args[:2] if source != NORM_SOURCE else args[:1]) + varlen


@functools.lru_cache(maxsize=1)
def _registry_cached() -> tuple[KernelSpec, ...]:
    return tuple(kernel_registry())


def module_members(source: str, name: str, registry: Optional[list[KernelSpec]] = None) -> tuple[str, ...]:
    """Name expressions compiled together with `name` (always includes `name`)."""
    grp = module_group(source, name)
    specs = registry if registry is not None else _registry_cached()
    names = [s.name for s in specs if s.source == source and s.group == grp]
    if name not in names:
        names.append(name)
    return tuple(sorted(names))
