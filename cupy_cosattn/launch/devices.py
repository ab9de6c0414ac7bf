"""Device adapters: where the kernels run, behind one small interface.

:class:`Device` is what the runners (``forward``, ``backward``, ``norm``) see: allocation (``empty``,
``zeros``), copies (``to_device``, ``to_host``, ``export``), pointers (``ptr``, ``is_device_array``),
capabilities, and :meth:`Device.launch` of a :class:`~.dispatch.KernelChoice` with its params record.
Compiling and caching modules is common to every device; an adapter supplies its module class and the
primitives above.

- :class:`CudaDevice`: CuPy arrays on the current CUDA device, ``cupy.RawModule``, CuPy's current
  stream. Creating one imports CuPy.
- :class:`EmulatedDevice`: NumPy arrays in guarded host memory, ``emulator.RawModule``: the same
  sources run on the CPU (cupy_cosattn.emulator), as on a device of capabilities
  ``limits.EMULATED_DEVICE``.

Which backend name selects which adapter is decided in one place, ``cupy_cosattn.backends``.
"""
from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Any, Optional

import numpy as np

from . import limits
from .arrays import bits, bits_dtype, contiguous
from .dispatch import KernelChoice
from .limits import DeviceCaps
from .registry import KernelSpec, module_members
from .sources import compile_options, load_source

_MODULE_CACHE: dict = {}  # (adapter class, device key, source, options, names) -> compiled module
_FUNC_CACHE: dict = {}  # (module key, name) -> [kernel function, dynamic shared memory opted in]
_MODULE_LOCK = threading.Lock()


class Device:
    """A device the kernels run on. Subclasses supply the primitives; compiling and launching are here."""

    xp: Any  # the array namespace of this device's arrays (cupy or numpy)
    module_class: Any  # compiles a source: cupy.RawModule or emulator.RawModule
    tensormap_target: str  # how tensormap encodes TMA tensor maps for it: "gpu" (the driver) or "emulator"

    # -- primitives (per adapter) --------------------------------------------------------------------
    def capabilities(self) -> DeviceCaps:
        raise NotImplementedError

    def empty(self, shape: tuple, dtype: np.dtype) -> Any:
        """An uninitialized C-contiguous device array."""
        raise NotImplementedError

    def zeros(self, shape: tuple, dtype: np.dtype) -> Any:
        raise NotImplementedError

    def to_device(self, arr: Any) -> Any:
        """A C-contiguous device copy of `arr`, or `arr` itself where it already is one the kernels may
        read (see :meth:`is_device_array`)."""
        raise NotImplementedError

    def is_device_array(self, arr: Any) -> bool:
        """Whether kernels may write `arr` directly (C-contiguous, 16-byte aligned device memory)."""
        raise NotImplementedError

    def holds(self, arr: Any) -> bool:
        """Whether `arr` lies in this device's memory, whatever its layout (a strided view of a cache
        the kernels write in place)."""
        raise NotImplementedError

    def address(self, arr: Any) -> int:
        raise NotImplementedError

    def to_host(self, arr: Any) -> np.ndarray:
        """A NumPy copy of device array `arr` (on the GPU: the device-to-host copy, a stream sync)."""
        raise NotImplementedError

    def export(self, arr: Any) -> Any:
        """`arr` as a plain C-contiguous array of this device's library that the caller owns."""
        raise NotImplementedError

    def cache_key(self) -> Hashable:
        """Which compiled modules are this device's (the GPU's compiled functions are per device)."""
        raise NotImplementedError

    def pack(self, arg: Any) -> Any:
        """A kernel argument as this module class's launch takes it."""
        return arg

    # -- common --------------------------------------------------------------------------------------
    def ptr(self, arr: Optional[Any]) -> int:
        """Device address of `arr`'s first element (0 for None)."""
        return 0 if arr is None else self.address(arr)

    def kernel(self, spec: KernelSpec) -> Any:
        """The compiled kernel of registry entry `spec`, its module built (once per device) with the
        kernels of its module group (:func:`~.registry.module_members`). Above 48 KB of dynamic shared
        memory the kernel's opt-in attribute is raised to spec.smem (the emulator checks it too). A kernel
        with an arch-specific target (spec.arch, "sm_90a") is compiled with -arch=<target>: CuPy appends
        -arch=sm_XX of the device after it, and NVRTC keeps the arch-specific one (the emulator ignores
        the option)."""
        options = compile_options() + ((f"-arch={spec.arch}",) if spec.arch else ())
        names = module_members(spec.source, spec.name)
        key = (type(self).__name__, self.cache_key(), spec.source, options, names)
        with _MODULE_LOCK:
            entry = _FUNC_CACHE.get((key, spec.name))
            if entry is None:
                mod = _MODULE_CACHE.get(key)
                if mod is None:
                    mod = self.module_class(code=load_source(spec.source), options=options, name_expressions=names)
                    _MODULE_CACHE[key] = mod
                entry = _FUNC_CACHE[(key, spec.name)] = [mod.get_function(spec.name), 0]
            fn = entry[0]
            if spec.smem > limits.SMEM_DEFAULT_LIMIT and entry[1] < spec.smem:
                fn.max_dynamic_shared_size_bytes = spec.smem
                entry[1] = spec.smem
        return fn

    def launch(self, choice: KernelChoice, arg: Any) -> None:
        """Launch the kernel of `choice` with its one argument (a params record, or an array), on
        CuPy's current stream on the GPU. An empty grid launches nothing."""
        grid = tuple(int(g) for g in choice.grid)
        if any(g <= 0 for g in grid):
            return
        if grid[1] > limits.GRID_YZ_LIMIT or grid[2] > limits.GRID_YZ_LIMIT or grid[0] > limits.GRID_X_LIMIT:
            raise ValueError(f"grid {grid} exceeds the launch limits")
        self.kernel(choice.spec)(grid, choice.block, (self.pack(arg),), shared_mem=int(choice.smem))


_CUDA_CAPS: dict = {}  # device id -> DeviceCaps


class CudaDevice(Device):
    """CuPy arrays on the current CUDA device. `xp` stands in for CuPy in tests."""

    tensormap_target = "gpu"

    def __init__(self, xp: Any = None) -> None:
        if xp is None:
            import cupy as xp
        self.xp = xp

    @property
    def module_class(self) -> Any:
        return self.xp.RawModule

    def capabilities(self) -> DeviceCaps:
        """Compute capability, shared memory per block and SM count of the current device (read once
        per device)."""
        dev = self.xp.cuda.Device()
        caps = _CUDA_CAPS.get(dev.id)
        if caps is None:
            rt = self.xp.cuda.runtime
            cc = str(dev.compute_capability)  # e.g. "90"
            caps = _CUDA_CAPS[dev.id] = DeviceCaps(
                (int(cc[:-1]), int(cc[-1])),
                int(rt.deviceGetAttribute(rt.cudaDevAttrMaxSharedMemoryPerBlockOptin, dev.id)),
                int(rt.deviceGetAttribute(rt.cudaDevAttrMultiProcessorCount, dev.id)))
        return caps

    def empty(self, shape: tuple, dtype: np.dtype) -> Any:
        return self.xp.empty(shape, dtype=dtype)

    def zeros(self, shape: tuple, dtype: np.dtype) -> Any:
        dtype = np.dtype(dtype)
        return self.xp.zeros(shape, dtype=bits_dtype(dtype)).view(dtype)

    def to_device(self, arr: Any) -> Any:
        a = contiguous(self.xp, arr)
        if a.data.ptr % 16:
            a = bits(a).copy().view(a.dtype)
        return a

    def is_device_array(self, arr: Any) -> bool:
        return bool(arr.flags.c_contiguous and arr.data.ptr % 16 == 0)

    def holds(self, arr: Any) -> bool:
        return isinstance(arr, self.xp.ndarray)

    def address(self, arr: Any) -> int:
        return int(arr.data.ptr)

    def to_host(self, arr: Any) -> np.ndarray:
        return arr.get()

    def export(self, arr: Any) -> Any:
        return contiguous(self.xp, arr)

    def cache_key(self) -> Hashable:
        return int(self.xp.cuda.Device().id)

    def pack(self, arg: Any) -> Any:
        # CuPy passes a size-1 NumPy array by value as its raw bytes (its documented path for user
        # structs); the emulator takes the structured scalar itself.
        return np.array(arg) if isinstance(arg, np.void) else arg


class EmulatedDevice(Device):
    """NumPy arrays in the emulator's guarded memory; kernels compiled for and run on the CPU."""

    xp = np
    tensormap_target = "emulator"

    def __init__(self) -> None:
        from .. import emulator

        self._emu = emulator

    @property
    def module_class(self) -> Any:
        return self._emu.RawModule

    def capabilities(self) -> DeviceCaps:
        return limits.EMULATED_DEVICE

    def empty(self, shape: tuple, dtype: np.dtype) -> Any:
        return self._emu.device_empty(shape, dtype)

    def zeros(self, shape: tuple, dtype: np.dtype) -> Any:
        return self._emu.device_zeros(shape, dtype)

    def to_device(self, arr: Any) -> Any:
        """Always a copy, into guarded memory."""
        return self._emu.to_device(np.ascontiguousarray(arr))

    def is_device_array(self, arr: Any) -> bool:
        return bool(self._emu.is_device_array(arr) and arr.flags.c_contiguous and self.address(arr) % 16 == 0)

    def holds(self, arr: Any) -> bool:
        return bool(self._emu.is_device_array(arr))

    def address(self, arr: Any) -> int:
        return int(self._emu.device_ptr(arr))

    def to_host(self, arr: Any) -> np.ndarray:
        return np.array(arr, copy=True)

    def export(self, arr: Any) -> Any:
        return np.array(arr, copy=True, order="C")

    def cache_key(self) -> Hashable:
        return None
