"""The kernel backend: device adapter, kernel cache and forward launch."""
from __future__ import annotations

import threading
from typing import Optional

import numpy as np

from ..problem import Inputs, Problem
from .arrays import *  # noqa: F401,F403
from .arrays import _bits_dtype, _dtype_name
from .limits import *  # noqa: F401,F403
from .params import *  # noqa: F401,F403
from .registry import *  # noqa: F401,F403
from .sources import *  # noqa: F401,F403
from .tiles import *  # noqa: F401,F403
from . import limits
from .backward import run_backward

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
            from .. import emulator

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
            return limits.EMULATED_DEVICE
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
        if grid[1] > limits.GRID_YZ_LIMIT or grid[2] > limits.GRID_YZ_LIMIT or grid[0] > GRID_X_LIMIT:
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
        grid = (cdiv(Nq, FWD_BLOCK_M), min(B * H, limits.GRID_YZ_LIMIT), 1)
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
        return run_backward(self, prob, inp, dout, out, lse, need_dscale=need_dscale)


