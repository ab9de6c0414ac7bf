"""The kernel registry: every instantiation the launch layer can pick, and how they group into modules."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from .limits import *  # noqa: F401,F403
from .tiles import *  # noqa: F401,F403

# ---------------------------------------------------------------------------------------------------
# Kernel registry.


@dataclass(frozen=True)
class KernelSpec:
    """One launchable kernel instantiation: its source file in cuda_src/, its NVRTC name expression,
    its block size and the dynamic shared memory the launch layer requests for it."""

    source: str
    name: str
    threads: int
    smem: int = 0

    @property
    def group(self) -> tuple:
        """Kernels with the same group are compiled into one module (see :func:`module_group`)."""
        return module_group(self.source, self.name)


def fwd_name(dtype_name: str, dp: int, bn: int, running_max: bool) -> str:
    return f"ca::fwd::attn_fwd<{CTYPES[dtype_name]}, {dp}, {bn}, {'true' if running_max else 'false'}>"


def norm_fwd_name(dtype_name: str) -> str:
    return f"ca::norm::l2norm_fwd<{CTYPES[dtype_name]}>"


def norm_bwd_name(dtype_name: str, grad_dtype_name: str) -> str:
    """l2norm_bwd reading dxhat of dtype grad_dtype_name ('float32' or the input's dtype)."""
    return f"ca::norm::l2norm_bwd<{CTYPES[dtype_name]}, {CTYPES[grad_dtype_name]}>"


def forward_kernel_specs() -> list:
    specs = []
    for dt in DTYPE_NAMES:
        for dp in range(16, MAX_HEAD_DIM + 1, 16):
            bns = {fwd_block_n(dt, dp, lim) for lim in SMEM_OPTIN_BY_ARCH.values()
                   if fwd_smem_bytes(dt, dp, fwd_block_n(dt, dp, lim)) <= lim}
            for bn in sorted(bns, reverse=True):
                for rm in (False, True):
                    specs.append(KernelSpec("forward.cu", fwd_name(dt, dp, bn, rm), FWD_THREADS,
                                            fwd_smem_bytes(dt, dp, bn)))
    return specs


def norm_kernel_specs() -> list:
    specs = []
    for dt in DTYPE_NAMES:
        specs.append(KernelSpec("norm.cu", norm_fwd_name(dt), NORM_THREADS))
        for gdt in sorted({"float32", dt}):
            specs.append(KernelSpec("norm.cu", norm_bwd_name(dt, gdt), NORM_THREADS))
    return specs



def _name(kind: str, dtype_name: str, dp: int, small: bool = False) -> str:
    """NVRTC name expression; the default variant keeps its two-argument name (SMALL defaults to false)."""
    return f"ca::bwd::bwd_{kind}<{CTYPES[dtype_name]}, {dp}{', true' if small else ''}>"


def _names(dtype_name: str, dp: int, kv_small: bool = False, q_small: bool = False) -> dict:
    return {"prep": _name("prep", dtype_name, dp), "dkdv": _name("dkdv", dtype_name, dp, kv_small),
            "dq": _name("dq", dtype_name, dp, q_small), "info": _name("info", dtype_name, dp)}


def backward_kernel_specs() -> list:
    """Every backward instantiation (for launch.kernel_registry and python -m cupy_cosattn.resources):
    the default variants, and the small ones that some architecture of launch.SMEM_OPTIN_BY_ARCH
    picks (with their bwd_info). The kernels of one (dtype, head-dim pad) form one module."""
    specs = []
    for dt in DTYPE_NAMES:
        for dp in HEAD_DIM_PADS:
            n = _names(dt, dp)
            kv, q = kv_config(dt, dp), q_config(dt, dp)
            specs += [KernelSpec(SOURCE, n["prep"], PREP_THREADS), KernelSpec(SOURCE, n["dkdv"], kv.threads, kv.smem),
                      KernelSpec(SOURCE, n["dq"], q.threads, q.smem), KernelSpec(SOURCE, n["info"], 32)]
            picks = {choose_small(dt, dp, lim) for lim in SMEM_OPTIN_BY_ARCH.values()}
            kv_s = any(p[0] for p in picks)
            q_s = any(p[1] for p in picks)
            if kv_s:
                c = kv_config(dt, dp, True)
                specs.append(KernelSpec(SOURCE, _name("dkdv", dt, dp, True), c.threads, c.smem))
            if q_s:
                c = q_config(dt, dp, True)
                specs.append(KernelSpec(SOURCE, _name("dq", dt, dp, True), c.threads, c.smem))
            if kv_s or q_s:
                specs.append(KernelSpec(SOURCE, _name("info", dt, dp, True), 32))
    return specs


def kernel_registry() -> list:
    """Every (source, name expression) the package can launch, with block size and dynamic shared
    memory."""
    return norm_kernel_specs() + forward_kernel_specs() + backward_kernel_specs()


_TEMPLATE_ARGS = re.compile(r"<(.*)>$")


def module_group(source: str, name: str) -> tuple:
    """Which instantiations share a compiled module: those of one source file with the same first
    two template arguments (element type, head dim), e.g. the fixed-offset and running-max forward
    kernels of one (dtype, D). Small enough to compile fast, few enough modules for the emulator."""
    m = _TEMPLATE_ARGS.search(name)
    args = [a.strip() for a in m.group(1).split(",")] if m else []
    return (source,) + tuple(args[:2] if source != "norm.cu" else args[:1])


def module_members(source: str, name: str, registry: Optional[list] = None) -> tuple:
    """Name expressions compiled together with `name` (always includes `name`)."""
    grp = module_group(source, name)
    names = [s.name for s in (registry if registry is not None else _registry_cached()) if s.source == source and s.group == grp]
    if name not in names:
        names.append(name)
    return tuple(sorted(names))


_REGISTRY = None


def _registry_cached() -> list:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = kernel_registry()
    return _REGISTRY


