"""The launch layer: one parameter struct per kernel family, grid/block/shared-memory choice, and the
two kernel backends behind one small interface (DESIGN.md section 3).

``Backend("cuda")`` runs the kernels of cuda_src/ through ``cupy.RawModule`` on CuPy arrays;
``Backend("emulator")`` runs the *same* sources, launched by the *same* code below, on the CPU through
``cupy_cosattn.emulator`` on NumPy arrays. The two differ only in

- the module class that compiles a source (``cupy.RawModule`` | ``emulator.RawModule``),
- array allocation and host/device copies (``empty``, ``zeros``, ``to_device``, ``to_host_into``),
- how a pointer is read (``ptr``).

Importing this module imports neither CuPy nor the emulator: ``Backend("cuda")`` imports CuPy.

Kernel parameters are passed by value as one struct (cuda_src/params.cuh). :func:`make_record` builds
the matching NumPy structured scalar; the dtypes below (``NORM_PARAMS``, ``FWD_PARAMS``) list the C
fields in order and ``align=True`` gives them the C compiler's natural alignment.

Every kernel the package can launch is listed by :func:`kernel_registry` (forward and norm kernels
from here, backward kernels from ``launch_backward.kernel_specs()``); ``python -m
cupy_cosattn.resources`` compiles exactly that list with NVRTC.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from . import _paths
from .problem import NORM_EPS, Inputs, Problem  # noqa: F401  (NORM_EPS mirrors norm.cu's EPS)

# ---------------------------------------------------------------------------------------------------
# Limits and tile choices (mirrored by static_asserts / constants in the .cu files).

GRID_YZ_LIMIT = 65535  # largest grid y (and z) extent; kernels loop over B*H beyond it
GRID_X_LIMIT = 2**31 - 1
MAX_HEAD_DIM = 256  # the fused kernels keep a row of O (D fp32 accumulators per 4 lanes) in registers
SMEM_OPTIN_LIMIT = 163 * 1024  # largest dynamic shared memory per block on sm_80 (sm_90 allows 227 KB)
# Largest dynamic shared memory per block (opt-in) of the architectures the tiles are chosen for:
# A100/A30 (sm_80), consumer Ampere and Ada (sm_86, sm_89: 99 KB), Hopper (sm_90). The registry holds
# the tile shapes every one of these picks; other devices pick by their own limit among them.
SMEM_OPTIN_BY_ARCH = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90": 227 * 1024}
MIN_COMPUTE_CAPABILITY = (8, 0)  # cp.async, ldmatrix, bf16 and tf32 mma


@dataclass(frozen=True)
class DeviceCaps:
    """What the launch layer needs to know of a device to pick tiles and grids."""

    compute_capability: tuple  # (major, minor)
    smem_optin: int  # largest dynamic shared memory per block, bytes (with the opt-in attribute)
    sm_count: int

    def check(self):
        """Raise RuntimeError on a device the kernels cannot run on (nothing is launched)."""
        if tuple(self.compute_capability) < MIN_COMPUTE_CAPABILITY:
            cc = ".".join(map(str, self.compute_capability))
            raise RuntimeError(f"the fused kernels need an NVIDIA GPU of compute capability >= 8.0 (Ampere or newer: "
                               f"cp.async, bf16/tf32 tensor cores); this device has {cc}. Use backend='reference'")


# The emulator runs the kernels as on an A100 (sm_80, 108 SMs); tests replace it to mimic other GPUs.
EMULATED_DEVICE = DeviceCaps((8, 0), SMEM_OPTIN_BY_ARCH["sm_80"], 108)

FWD_BLOCK_M = 64  # query rows per block (forward.cu BLOCK_M)
FWD_THREADS = 128  # 4 warps
NORM_THREADS = 128  # norm.cu THREADS: 4 warps, one row each
NORM_ROWS_PER_BLOCK = 4

# Fixed-offset path (forward.cu Headroom): usable when q, k are normalized here, there is no bias,
# and every head's logit bound scale_h * groups is at most this (so exp(s - offset) stays in the
# dtype's normal range).
FIXED_OFFSET_MAX_BOUND = {"float16": 10.0, "bfloat16": 40.0, "float32": 40.0}

CTYPES = {"float16": "ca::half_t", "bfloat16": "ca::bf16_t", "float32": "float"}
DTYPE_NAMES = ("float16", "bfloat16", "float32")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def head_dim_pad(D: int) -> int:
    """The kernels' template head dim: D rounded up to a multiple of 16 (zero-filled past D)."""
    return max(16, round_up(D, 16))


def storage_dim(D: int) -> int:
    """Row length of the arrays the attention kernels read and write: the padded head dim
    head_dim_pad(D), zero past D. Tile loads then need no column checks and every row is whole
    16-byte cp.async chunks. Equal to D (no copy) for every D % 16 == 0."""
    return head_dim_pad(D)


def fwd_block_n(dtype_name: str, dp: int, smem_limit: int = SMEM_OPTIN_LIMIT) -> int:
    """Keys per K/V tile: as many as registers allow (see docs/kernels.md), halved (down to 16) while
    the tiles exceed the device's shared memory per block `smem_limit`."""
    if dtype_name == "float32":
        bn = 32 if dp <= 128 else 16
    else:
        bn = 64 if dp <= 128 else 32
    while bn > 16 and fwd_smem_bytes(dtype_name, dp, bn) > smem_limit:
        bn //= 2
    return bn


def check_smem(what: str, prob: Problem, need: int, caps: DeviceCaps):
    """Raise ValueError (before anything is launched) when a kernel's tiles do not fit the device."""
    if need > caps.smem_optin:
        raise ValueError(f"{what} for head dim D={prob.D} in {prob.dtype_name} needs {need} bytes of shared memory "
                         f"per block; this device allows {caps.smem_optin}. Use a smaller head dim, another dtype, "
                         f"or backend='reference'")


def fwd_smem_bytes(dtype_name: str, dp: int, bn: int) -> int:
    """Dynamic shared memory of attn_fwd (forward.cu Smem::BYTES): Q, 2 x K, 2 x V (rows padded by
    one 16-byte chunk) and 2 x BN mask bytes."""
    size = ITEMSIZE[dtype_name]
    row = dp + 16 // size
    return (FWD_BLOCK_M + 4 * bn) * row * size + 2 * bn


def fixed_offset_ok(prob: Problem, scale: np.ndarray) -> bool:
    """Whether the fixed-offset instantiation (no running max) is correct for this problem."""
    bound = float(np.max(scale)) * prob.groups  # |logit| <= scale_h * groups
    return bool(prob.fixed_offset_safe and bound <= FIXED_OFFSET_MAX_BOUND[prob.dtype_name])


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


def kernel_registry() -> list:
    """Every (source, name expression) the package can launch, with block size and dynamic shared
    memory. Backward kernels come from ``launch_backward.kernel_specs()`` when that module defines it
    (a list of :class:`KernelSpec`), the KV-cache kernels from ``launch_decode.kernel_specs()``."""
    specs = norm_kernel_specs() + forward_kernel_specs()
    try:
        from . import launch_backward
    except ImportError:
        launch_backward = None
    if launch_backward is not None and hasattr(launch_backward, "kernel_specs"):
        specs += list(launch_backward.kernel_specs())
    from . import launch_decode

    return specs + launch_decode.kernel_specs()


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


# ---------------------------------------------------------------------------------------------------
# Sources. Project headers (common.cuh, params.cuh) are inlined so that the module cache keys (CuPy
# hashes the source text, not the files it includes) change whenever a header does; the emulator shim
# (emu/...) stays an include, found through -I.

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def load_source(name: str) -> str:
    """Text of cuda_src/<name> with its project-header includes inlined once each (pragma once)."""
    seen = set()

    def expand(fname: str) -> str:
        text = _paths.read_source(fname)

        def repl(m):
            inc = m.group(1)
            if inc.startswith("emu/") or not (_paths.CUDA_SRC / inc).exists():
                return m.group(0)
            if inc in seen:
                return f"// (already included: {inc})"
            seen.add(inc)
            return f"// ---- begin {inc}\n{expand(inc)}\n// ---- end {inc}"

        return _INCLUDE.sub(repl, text.replace("#pragma once", "// #pragma once"))

    seen.add(name)
    return expand(name)


def compile_options() -> tuple:
    """NVRTC / emulator compile options shared by every module."""
    return ("-std=c++17", f"-I{_paths.CUDA_SRC}")


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


# ---------------------------------------------------------------------------------------------------
# Backends.

_MODULE_CACHE: dict = {}
_DEVICE_CAPS: dict = {}  # device id -> DeviceCaps
_FUNC_CACHE: dict = {}  # (module key, name) -> [kernel function, dynamic shared memory opted in]
_MODULE_LOCK = threading.Lock()


class Backend:
    """Kernel backend "cuda" (CuPy) or "emulator" (CPU). See the module docstring."""

    def __init__(self, name: str):
        if name == "cuda":
            import cupy

            self.xp = cupy
            self._module_class = cupy.RawModule
        elif name == "emulator":
            from . import emulator

            self.xp = np
            self._emu = emulator
            self._module_class = emulator.RawModule
        else:
            raise ValueError(f"kernel backend must be 'cuda' or 'emulator', got {name!r}")
        self.name = name

    # -- the device -----------------------------------------------------------------------------
    def device_caps(self) -> DeviceCaps:
        """Compute capability, shared memory per block and SM count of the current device (cuda; read
        once per device), or EMULATED_DEVICE (emulator)."""
        if self.name != "cuda":
            return EMULATED_DEVICE
        dev = self.xp.cuda.Device()
        caps = _DEVICE_CAPS.get(dev.id)
        if caps is None:
            rt = self.xp.cuda.runtime
            cc = str(dev.compute_capability)  # e.g. "90"
            caps = _DEVICE_CAPS[dev.id] = DeviceCaps(
                (int(cc[:-1]), int(cc[-1])),
                int(rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.id)),
                int(rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, dev.id)))
        return caps

    # -- arrays ---------------------------------------------------------------------------------
    def empty(self, shape, dtype):
        """A device array (C-contiguous)."""
        if self.name == "cuda":
            return self.xp.empty(shape, dtype=dtype)
        return self._emu.device_empty(shape, dtype)

    def zeros(self, shape, dtype):
        if self.name == "cuda":
            dtype = np.dtype(dtype)
            return self.xp.zeros(shape, dtype=_bits_dtype(dtype)).view(dtype)
        return self._emu.device_zeros(shape, dtype)

    def to_device(self, arr):
        """A C-contiguous device copy of `arr`, or `arr` itself when it already is one whose start is
        16-byte aligned (cuda). The emulator always copies into guarded device memory."""
        if self.name == "cuda":
            a = contiguous(self.xp, arr)
            if a.data.ptr % 16:
                a = bits(a).copy().view(a.dtype)
            return a
        return self._emu.to_device(np.ascontiguousarray(arr))

    def is_device_array(self, arr) -> bool:
        """Whether kernels may write `arr` directly (C-contiguous, 16-byte aligned device memory)."""
        if self.name == "cuda":
            return bool(arr.flags.c_contiguous and arr.data.ptr % 16 == 0)
        is_dev = getattr(self._emu, "is_device_array", None)
        return bool(is_dev is not None and is_dev(arr) and arr.flags.c_contiguous and self.ptr(arr) % 16 == 0)

    def ptr(self, arr) -> int:
        """Device address of `arr`'s first element (0 for None)."""
        if arr is None:
            return 0
        if self.name == "cuda":
            return int(arr.data.ptr)
        return int(self._emu.device_ptr(arr))

    # -- kernels --------------------------------------------------------------------------------
    def kernel(self, source: str, name: str, smem: int = 0):
        """The compiled kernel `name` (an NVRTC name expression) of cuda_src/`source`.

        Modules are cached per (backend, source, options, name expressions); the kernels compiled
        together are those of :func:`module_group`. `smem`: dynamic shared memory the launch will
        request; above 48 KB the kernel's opt-in attribute is raised (cuda)."""
        options = compile_options()
        names = module_members(source, name)
        # per device on the GPU: compiled functions and their shared-memory opt-in are per device
        device = int(self.xp.cuda.Device().id) if self.name == "cuda" else None
        key = (self.name, device, source, options, names)
        with _MODULE_LOCK:
            entry = _FUNC_CACHE.get((key, name))
            if entry is None:
                mod = _MODULE_CACHE.get(key)
                if mod is None:
                    mod = self._module_class(code=load_source(source), options=options, name_expressions=names)
                    _MODULE_CACHE[key] = mod
                entry = _FUNC_CACHE[(key, name)] = [mod.get_function(name), 0]
            fn = entry[0]
            if smem > 48 * 1024 and entry[1] < smem:
                fn.max_dynamic_shared_size_bytes = smem  # opt in above 48 KB (the emulator checks it too)
                entry[1] = smem
        return fn

    def launch(self, kern, grid, block, record, shared_mem: int = 0):
        """Launch `kern` with one by-value params struct, on CuPy's current stream (cuda)."""
        grid = tuple(int(g) for g in grid)
        if any(g <= 0 for g in grid):
            return
        if grid[1] > GRID_YZ_LIMIT or grid[2] > GRID_YZ_LIMIT or grid[0] > GRID_X_LIMIT:
            raise ValueError(f"grid {grid} exceeds the launch limits")
        if self.name == "cuda" and isinstance(record, np.void):
            # CuPy passes a size-1 NumPy array by value as its raw bytes (its documented path for
            # user structs); the emulator takes the structured scalar itself.
            record = np.array(record)
        kern(grid, tuple(int(b) for b in block), (record,), shared_mem=int(shared_mem))

    # -- passes ---------------------------------------------------------------------------------
    def l2norm(self, x, groups: int, cols: Optional[int] = None, want_rnorm: bool = False):
        """Grouped l2 norm pre-pass (norm.cu l2norm_fwd) of a contiguous device array x (..., D).

        Returns (xhat, rnorm): xhat (..., cols) in x's dtype, columns past D zero (cols defaults to
        storage_dim(D)); rnorm (..., groups) float32 = 1/max(||chunk||, eps), or None unless
        want_rnorm."""
        D = int(x.shape[-1])
        cols = storage_dim(D) if cols is None else int(cols)
        lead = tuple(x.shape[:-1])
        rows = int(np.prod(lead, dtype=np.int64))
        dt = _dtype_name(x.dtype)
        if D > MAX_HEAD_DIM or cols > MAX_HEAD_DIM:
            raise ValueError(f"l2norm: head dim {max(D, cols)} exceeds {MAX_HEAD_DIM}")
        xhat = self.empty(lead + (cols,), x.dtype)
        rnorm = self.empty(lead + (groups,), np.float32) if want_rnorm else None
        if rows:
            rec = make_record(NORM_PARAMS, x=self.ptr(x), xhat=self.ptr(xhat), rnorm=self.ptr(rnorm), dxhat=0, dx=0,
                              rows=rows, x_stride=D, xhat_stride=cols, dxhat_stride=0, dx_stride=0, D=D,
                              groups=groups, xhat_cols=cols)
            self._launch_rows(norm_fwd_name(dt), rows, rec)
        return xhat, rnorm

    def l2norm_backward(self, x, dxhat, groups: int, out=None):
        """Gradient through the grouped l2 norm (norm.cu l2norm_bwd): dx (..., D) in x's dtype from
        x (..., D) (the un-normalized input, contiguous device array) and dxhat (..., Dg) with
        Dg >= D (float32 or x's dtype, contiguous; only the first D columns are read). `out`
        (contiguous, x's shape and dtype) is written when given."""
        D = int(x.shape[-1])
        lead = tuple(x.shape[:-1])
        rows = int(np.prod(lead, dtype=np.int64))
        if tuple(dxhat.shape[:-1]) != lead or dxhat.shape[-1] < D:
            raise ValueError(f"l2norm_backward: dxhat shape {tuple(dxhat.shape)} does not match x {tuple(x.shape)}")
        dx = self.empty(x.shape, x.dtype) if out is None else out
        if rows:
            rec = make_record(NORM_PARAMS, x=self.ptr(x), xhat=0, rnorm=0, dxhat=self.ptr(dxhat), dx=self.ptr(dx),
                              rows=rows, x_stride=D, xhat_stride=0, dxhat_stride=int(dxhat.shape[-1]), dx_stride=D,
                              D=D, groups=groups, xhat_cols=0)
            self._launch_rows(norm_bwd_name(_dtype_name(x.dtype), _dtype_name(dxhat.dtype)), rows, rec)
        return dx

    def _launch_rows(self, name: str, rows: int, rec):
        kern = self.kernel("norm.cu", name)
        blocks = min(cdiv(rows, NORM_ROWS_PER_BLOCK), GRID_X_LIMIT)
        self.launch(kern, (blocks, 1, 1), (NORM_THREADS, 1, 1), rec)

    def prepare_qkv(self, prob: Problem, inp: Inputs):
        """(qhat, khat, v) as contiguous device arrays with rows of storage_dim(D) elements: the norm
        pre-pass output when prob.l2norm_qk, else (zero-padded) copies of q and k."""
        Ds = storage_dim(prob.D)
        if prob.l2norm_qk:
            qhat, _ = self.l2norm(self.to_device(inp.q), prob.groups, Ds)
            khat, _ = self.l2norm(self.to_device(inp.k), prob.groups, Ds)
        else:
            qhat, khat = self.padded(inp.q, Ds), self.padded(inp.k, Ds)
        return qhat, khat, self.padded(inp.v, Ds)

    def padded(self, x, cols: int):
        """Contiguous device copy of x (..., D) with rows zero-padded to `cols` elements."""
        if x.shape[-1] == cols:
            return self.to_device(x)
        if self.name == "cuda":
            dev = self.zeros(tuple(x.shape[:-1]) + (cols,), x.dtype)
            copy_into(dev[..., : x.shape[-1]], x)
            return dev
        host = np.zeros(tuple(x.shape[:-1]) + (cols,), dtype=x.dtype)
        copy_into(host[..., : x.shape[-1]], x)
        return self.to_device(host)

    def device_scale(self, scale: np.ndarray):
        """The (H,) float32 per-head scale array on the device."""
        return self.to_device(np.asarray(scale, dtype=np.float32) if self.name != "cuda" else self.xp.asarray(scale, dtype=np.float32))

    def device_mask(self, mask):
        """(B, Nk) uint8 device copy of a bool mask (1 = may attend), or None."""
        if mask is None:
            return None
        return self.to_device(mask.view(np.uint8) if mask.dtype == np.bool_ else mask.astype(np.uint8))

    def tile_any(self, mask, block_n: int):
        """(B, ceil(Nk / block_n)) uint8 flags: whether key tile j of batch b has any unmasked key.
        Kernels skip the flagged-off tiles entirely (no loads, no math)."""
        if mask is None:
            return None
        xp = self.xp
        B, Nk = mask.shape
        nt = cdiv(Nk, block_n)
        padded = xp.zeros((B, nt * block_n), dtype=np.bool_)
        padded[:, :Nk] = mask
        return self.to_device(padded.reshape(B, nt, block_n).any(axis=-1).astype(np.uint8))

    def device_bias(self, bias, prob: Problem):
        """(bias device array, element strides (b, h, q), is_float32) for the kernels: a contiguous
        copy of the 4-D (Bb, Hb, Nq, Nk) view with stride 0 over broadcast dims; (None, (0,0,0), False)."""
        if bias is None:
            return None, (0, 0, 0), False
        dev = self.to_device(bias)
        Bb, Hb, Nq, Nk = (int(s) for s in dev.shape)
        strides = (Hb * Nq * Nk if Bb > 1 else 0, Nq * Nk if Hb > 1 else 0, Nk)
        return dev, strides, np.dtype(bias.dtype) == np.float32

    # -- public passes ----------------------------------------------------------------------------
    def forward(self, prob: Problem, inp: Inputs, out=None, lse=None):
        """Fused forward: (out (B, H, Nq, D) in prob.dtype, lse (B, H, Nq) float32). `out` / `lse`,
        when given (canonical shapes, this backend's arrays), are written and returned."""
        check_supported(prob)
        caps = self.device_caps()
        caps.check()
        B, H, Nq, Nk, D = prob.B, prob.H, prob.Nq, prob.Nk, prob.D
        dt = prob.dtype_name
        dp = head_dim_pad(D)
        bn = fwd_block_n(dt, dp, caps.smem_optin)
        smem = fwd_smem_bytes(dt, dp, bn)
        check_smem("the forward kernel", prob, smem, caps)
        running_max = not fixed_offset_ok(prob, inp.scale)

        qhat, khat, v = self.prepare_qkv(prob, inp)
        Ds = int(qhat.shape[-1])
        scale = self.device_scale(inp.scale)
        mask = self.device_mask(inp.mask)
        tiles = self.tile_any(inp.mask, bn)
        bias, (bsb, bsh, bsq), bias_f32 = self.device_bias(inp.bias, prob)

        direct_out = out is not None and Ds == D and self.is_device_array(out)
        o = out if direct_out else self.empty((B, H, Nq, Ds), prob.dtype)
        direct_lse = lse is not None and self.is_device_array(lse)
        l = lse if direct_lse else self.empty((B, H, Nq), np.float32)

        n_tiles = cdiv(Nk, bn)
        rec = make_record(
            FWD_PARAMS,
            q=self.ptr(qhat), k=self.ptr(khat), v=self.ptr(v), o=self.ptr(o), lse=self.ptr(l), scale=self.ptr(scale),
            mask=self.ptr(mask), tile_any=self.ptr(tiles), bias=self.ptr(bias),
            q_sb=H * Nq * Ds, q_sh=Nq * Ds, q_sn=Ds,
            k_sb=prob.Hk * Nk * Ds, k_sh=Nk * Ds, k_sn=Ds,
            v_sb=prob.Hk * Nk * Ds, v_sh=Nk * Ds, v_sn=Ds,
            o_sb=H * Nq * Ds, o_sh=Nq * Ds, o_sn=Ds,
            lse_sb=H * Nq, lse_sh=Nq,
            bias_sb=bsb, bias_sh=bsh, bias_sq=bsq,
            mask_sb=Nk if mask is not None else 0, tile_any_sb=n_tiles if tiles is not None else 0,
            B=B, H=H, Hk=prob.Hk, Nq=Nq, Nk=Nk, D=Ds, causal=int(prob.causal), bias_f32=int(bias_f32),
            n_key_tiles=n_tiles, groups=prob.groups,
        )
        kern = self.kernel("forward.cu", fwd_name(dt, dp, bn, running_max), smem)
        grid = (cdiv(Nq, FWD_BLOCK_M), min(B * H, GRID_YZ_LIMIT), 1)
        self.launch(kern, grid, (FWD_THREADS, 1, 1), rec, smem)
        _keep_alive = (qhat, khat, v, scale, mask, tiles, bias)  # noqa: F841  (until the launch is queued)

        res_o = o if Ds == D else o[..., :D]
        res_o = res_o if direct_out else self.to_host_into(res_o, out)
        res_l = l if direct_lse else self.to_host_into(l, lse)
        return res_o, res_l

    def to_host_into(self, src, dst):
        """Copy a kernel result into the caller's preallocated `dst` and return it; with dst None,
        return a plain contiguous array of this backend's library (NumPy for the emulator)."""
        if dst is None:
            if self.name == "cuda":
                return contiguous(self.xp, src)
            return np.array(src, copy=True, order="C")
        copy_into(dst, src)
        return dst

    def backward(self, prob: Problem, inp: Inputs, dout, out, lse, need_dscale: bool = True):
        """Gradients (dq, dk, dv, dbias | None, dscale float64 (H,) | None without need_dscale):
        launch_backward.run_backward."""
        from .launch_backward import run_backward

        return run_backward(self, prob, inp, dout, out, lse, need_dscale=need_dscale)


# ---------------------------------------------------------------------------------------------------
# 2-byte floats move as 16-bit integers. CuPy before 14 has no bfloat16 kernels at all, so a copy, a
# fill or a strided slice of a bfloat16 array would fail there; moving the bits is exact for every
# 2-byte type and works with any CuPy (and NumPy, so the emulator tests run the same path).


def _bits_dtype(dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    return np.dtype(np.uint16) if dtype.itemsize == 2 and dtype.kind not in "iu" else dtype


def bits(x):
    """`x` viewed as uint16 when it holds a 2-byte float (float16, bfloat16), else `x` itself."""
    return x.view(_bits_dtype(x.dtype))


def contiguous(xp, x):
    """`x` itself when C-contiguous, else a C-contiguous copy (of the bits for 2-byte floats)."""
    if x.flags.c_contiguous:
        return x
    return xp.ascontiguousarray(bits(x)).view(x.dtype)


def copy_into(dst, src):
    """dst[...] = src. Arrays of one 2-byte float dtype are copied as their bits (no float kernel);
    anything else is an ordinary (converting) assignment."""
    if np.dtype(dst.dtype) == np.dtype(src.dtype):
        bits(dst)[...] = bits(src)
    else:
        dst[...] = src


def _dtype_name(dtype) -> str:
    from .problem import DTYPE_NAMES as names

    return names[np.dtype(dtype)]


def check_supported(prob: Problem):
    """Raise ValueError for problems the fused kernels cannot run (nothing is launched)."""
    if prob.D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={prob.D} is not supported by the fused kernels (at most {MAX_HEAD_DIM}); "
                         f"use backend='reference'")
    if prob.Nq >= 2**31 or prob.Nk >= 2**31:
        raise ValueError(f"sequence lengths must be < 2^31, got Nq={prob.Nq}, Nk={prob.Nk}")
