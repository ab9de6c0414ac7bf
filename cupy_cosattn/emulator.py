"""CPU emulator of the CUDA kernels: the same sources, built with the host C++ compiler, run on NumPy
arrays with a faithful model of the warp-level execution.

    from cupy_cosattn import emulator
    mod = emulator.RawModule(code=src, options=("-std=c++17",), name_expressions=("k<float>",))
    k = mod.get_function("k<float>")
    x = emulator.to_device(np.arange(64, dtype=np.float32))
    k((1,), (64,), (x, np.int32(64)), shared_mem=256)

`RawModule` mirrors ``cupy.RawModule``; NumPy arrays stand for device pointers and NumPy scalars
(including structured ``np.void`` scalars, passed by value as their raw bytes) for by-value arguments.
See docs/emulator.md for what is modelled (every thread a fiber, real barriers, warp collectives from
the PTX fragment tables, cp.async landing at the wait, guarded and garbage-filled memory, a watchdog
for threads that spin without progress, an instrumented mode that finds races between blocks) and
what is not.

This module never imports CuPy.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import threading
import weakref
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ._paths import CUDA_SRC

__all__ = [
    "EmulatorError",
    "RawModule",
    "RawKernel",
    "device_empty",
    "device_zeros",
    "to_device",
    "to_host",
    "device_ptr",
    "is_device_array",
    "set_interleave",
    "get_interleave",
    "interleave",
    "set_placement",
    "get_placement",
    "placement",
    "set_fill",
    "get_fill",
    "fill",
    "set_num_workers",
    "get_num_workers",
    "set_watchdog",
    "get_watchdog",
    "watchdog",
    "set_race_check",
    "get_race_check",
    "race_check",
    "cache_dir",
]

_EMU_DIR = CUDA_SRC / "emu"
_SHIM = _EMU_DIR / "shim.h"
_RUNTIME_SRC = _EMU_DIR / "runtime.cpp"
_ABI = "caemu-3"

# Dynamic shared memory limits, as on sm_90 (the larger of the targets): 48 KiB without opting in
# through `max_dynamic_shared_size_bytes`, 227 KiB at most.
_SMEM_DEFAULT_LIMIT = 48 * 1024
_SMEM_MAX = 227 * 1024


class EmulatorError(RuntimeError):
    """A kernel did something that is an error on a GPU (or undefined behaviour the emulator
    detects): out-of-bounds memory access, a barrier not reached by every thread, a warp collective
    reached by part of a warp, a thread exiting with cp.async copies in flight, ... The message names
    the kernel, the block and the threads or buffer involved."""


# ------------------------------------------------------------------------------------------------
# Configuration.

def _env_interleave():
    v = os.environ.get("CUPY_COSATTN_EMU_INTERLEAVE", "").strip().lower()
    if v in ("", "off", "none", "no", "false"):
        return None
    try:
        return int(v, 0)
    except ValueError:
        return int.from_bytes(hashlib.sha256(v.encode()).digest()[:8], "little")


def _env_workers():
    v = os.environ.get("CUPY_COSATTN_EMU_THREADS", "").strip()
    if v:
        return max(1, int(v))
    return max(1, min(2, os.cpu_count() or 1))


def _env_stack():
    v = os.environ.get("CUPY_COSATTN_EMU_STACK", "").strip().lower()
    if not v:
        return 256 * 1024
    mult = 1
    if v[-1] in "kmg":
        mult = {"k": 1024, "m": 1024**2, "g": 1024**3}[v[-1]]
        v = v[:-1]
    return int(float(v) * mult)


# Where a device array sits between its two guard regions (see set_placement); codes as in runtime.cpp.
_PLACEMENTS = {"end": 0, "start": 1, "exact": 2, "alternate": 3}
_PLACEMENT_NAMES = {0: "end", 1: "start", 2: "exact"}


def _check_placement(mode, what):
    m = str(mode).strip().lower()
    if m not in _PLACEMENTS:
        raise ValueError(f"{what}: unknown placement {mode!r} (one of {', '.join(_PLACEMENTS)})")
    return m


def _env_placement():
    v = os.environ.get("CUPY_COSATTN_EMU_PLACE", "").strip()
    return _check_placement(v, "CUPY_COSATTN_EMU_PLACE") if v else "alternate"


# Fresh device arrays hold this byte everywhere (see set_fill); None leaves them as the OS maps them.
_FILL_DEFAULT = 0xFF


def _check_fill(value, what):
    if value is None or value is False:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not 0 <= int(value) <= 255:
        raise ValueError(f"{what}: expected a byte value 0..255 or None (off), got {value!r}")
    return int(value)


def _env_fill():
    v = os.environ.get("CUPY_COSATTN_EMU_FILL", "").strip().lower()
    if not v:
        return _FILL_DEFAULT
    if v in ("off", "none", "no", "false"):
        return None
    try:
        return _check_fill(int(v, 0), "CUPY_COSATTN_EMU_FILL")
    except ValueError:
        raise ValueError(f"CUPY_COSATTN_EMU_FILL: expected a byte value 0..255 (e.g. 0xff) or off, got {v!r}") from None


_WATCHDOG_DEFAULT = 10.0  # seconds without progress before a launch is reported as hung


def _check_watchdog(seconds, what):
    if seconds is None or seconds is False:
        return None
    try:
        v = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number of seconds > 0 or None (off), got {seconds!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{what}: expected a number of seconds > 0 or None (off), got {seconds!r}")
    return v


def _env_watchdog():
    v = os.environ.get("CUPY_COSATTN_EMU_WATCHDOG", "").strip().lower()
    if not v:
        return _WATCHDOG_DEFAULT
    if v in ("off", "none", "no", "false", "0"):
        return None
    return _check_watchdog(v, "CUPY_COSATTN_EMU_WATCHDOG")


def _env_race():
    v = os.environ.get("CUPY_COSATTN_EMU_RACE", "").strip().lower()
    return v not in ("", "0", "off", "no", "false", "none")


_state = {"interleave": _env_interleave(), "workers": _env_workers(), "placement": _env_placement(),
          "fill": _env_fill(), "watchdog": _env_watchdog(), "race": _env_race()}


def set_interleave(seed: Optional[int]) -> None:
    """Turn the interleaving mode on with an integer seed, or off with None.

    On, every scheduling point (barrier, warp collective, atomic, cp.async issue) picks the next
    thread of the block to run at random (seeded per block), and blocks run in a seeded random order,
    so a missing __syncthreads() shows up as a seed-dependent result. Off, threads run in a fixed
    round-robin order. The environment variable CUPY_COSATTN_EMU_INTERLEAVE=<seed> sets the initial
    value (the test suite's conftest turns it on).
    """
    if seed is None or seed is False:
        _state["interleave"] = None
    else:
        _state["interleave"] = int(seed) & 0xFFFFFFFFFFFFFFFF


def get_interleave() -> Optional[int]:
    """The current interleave seed, or None when the mode is off."""
    return _state["interleave"]


@contextlib.contextmanager
def _temporarily(key: str, setter, value):
    """Context manager: setter(value) inside the block, _state[key] restored after."""
    old = _state[key]
    setter(value)
    try:
        yield
    finally:
        _state[key] = old


def interleave(seed: Optional[int]) -> contextlib.AbstractContextManager:
    """Context manager: set_interleave(seed) inside the block, restored after."""
    return _temporarily("interleave", set_interleave, seed)


def set_placement(mode: str) -> None:
    """Where new device arrays sit between their two guard regions (PROT_NONE pages, so that a kernel
    touching them faults), for out-of-bounds reads to be caught on either side:

    - ``"end"``: the data ends flush against the guard after its size is rounded up to 16 bytes (the
      pointer is 16-byte aligned): reads past the end fault, except inside the rounding tail.
    - ``"start"``: the data starts flush against the guard before it: reads before the start fault.
    - ``"alternate"`` (the default): ``"end"`` and ``"start"`` by turns, by the parity of the
      emulator's allocation counter (odd: end, even: start), so that over the buffers of a launch
      both sides are checked.
    - ``"exact"``: the data ends exactly at the guard, without rounding, so that even a read inside
      what would be the rounding tail faults; the pointer is then aligned only to the largest power
      of two dividing the size (a 12-byte buffer is 4-byte aligned), not to 16 bytes as cudaMalloc's
      are, so a kernel doing 16-byte accesses (cp.async, float4) to such a buffer is reported as
      misaligned. Never chosen by ``"alternate"``; use it to hunt reads just past the end.

    Out-of-bounds writes are caught under every placement: the bytes between the guards that are not
    data hold canaries, checked after every launch. The environment variable
    CUPY_COSATTN_EMU_PLACE=end|start|alternate|exact sets the initial value. Arrays already
    allocated keep their placement.

    Dynamic shared memory follows the same setting at every launch, with ``"alternate"`` by the
    parity of the block index plus a launch counter: against its start guard (``smem[-1]`` faults)
    or its end guard, with canaries in the slack checked when each block is done.
    """
    _state["placement"] = _check_placement(mode, "set_placement")


def get_placement() -> str:
    """The placement new device arrays get: "end", "start", "alternate" or "exact"."""
    return _state["placement"]


def placement(mode: str) -> contextlib.AbstractContextManager:
    """Context manager: set_placement(mode) inside the block, restored after."""
    return _temporarily("placement", set_placement, mode)


def set_fill(value: Optional[int]) -> None:
    """What fresh device arrays (device_empty, and so every buffer the launch layer allocates without
    initializing it) hold: every byte set to `value` (0..255), or None to leave them as the OS maps
    them, all zeros.

    The default, 0xFF, is a NaN in float32, float16 and bfloat16 (and -1 in every signed integer
    type): on a GPU ``cupy.empty`` hands out recycled pool memory, so a kernel that fails to write
    part of its output (padding columns, say) must not pass because fresh memory happens to be zero.
    The environment variable CUPY_COSATTN_EMU_FILL=<byte, e.g. 0xff>|off sets the initial value.
    device_zeros and to_device are not affected (they write every byte).
    """
    _state["fill"] = _check_fill(value, "set_fill")


def get_fill() -> Optional[int]:
    """The byte fresh device arrays are filled with, or None when the fill is off."""
    return _state["fill"]


def fill(value: Optional[int]) -> contextlib.AbstractContextManager:
    """Context manager: set_fill(value) inside the block, restored after."""
    return _temporarily("fill", set_fill, value)


def set_watchdog(seconds: Optional[float]) -> None:
    """Report a launch as hung when none of its threads made progress for `seconds` (None: off).

    Progress is a barrier or warp collective completing, copies landing at a cp.async wait, a thread
    exiting, or any change in shared or global memory. Threads of a block switch only at scheduling
    points, so the watchdog also preempts a thread that runs long without one (after about 0.1 s), so
    that a spin-wait on a flag another thread sets (legal on Volta and later) makes progress; one
    that no thread ever sets raises EmulatorError after the bound, naming the spinning threads and
    their call sites (the function, its offsets in the module and the source lines). Off, the
    preemption is off too, and such a launch hangs. Default 10 s; the environment variable
    CUPY_COSATTN_EMU_WATCHDOG=<seconds>|off sets the initial value.
    """
    _state["watchdog"] = _check_watchdog(seconds, "set_watchdog")


def get_watchdog() -> Optional[float]:
    """The watchdog's bound in seconds, or None when it is off."""
    return _state["watchdog"]


def watchdog(seconds: Optional[float]) -> contextlib.AbstractContextManager:
    """Context manager: set_watchdog(seconds) inside the block, restored after."""
    return _temporarily("watchdog", set_watchdog, seconds)


def set_race_check(on: bool) -> None:
    """Turn the detection of races between blocks in global memory on or off (default off).

    On, kernels run from a build instrumented by the compiler (g++ -fsanitize=thread, with the
    emulator's own handlers instead of ThreadSanitizer's run-time library): every plain load and
    store to a device array is recorded per byte with the block that made it, and a launch in which
    one block writes a byte that another block reads or writes raises EmulatorError naming the
    kernel, both blocks and threads, and the buffer and byte offset. Atomics are exempt (as are
    accesses by threads of the same block, ordered by barriers). Blocks run on one worker thread.
    Slow: an instrumented build of each module (once, cached) and a call per memory access; use it
    on small problems. The environment variable CUPY_COSATTN_EMU_RACE=1 sets the initial value.
    """
    _state["race"] = bool(on)


def get_race_check() -> bool:
    """Whether race detection is on."""
    return _state["race"]


def race_check(on: bool = True) -> contextlib.AbstractContextManager:
    """Context manager: set_race_check(on) inside the block, restored after."""
    return _temporarily("race", set_race_check, on)


def set_num_workers(n: int) -> None:
    """Number of OS threads blocks are spread over (default min(2, cpu count), or
    CUPY_COSATTN_EMU_THREADS). With one worker, float atomics accumulate in a fixed order."""
    _state["workers"] = max(1, int(n))


def get_num_workers() -> int:
    return _state["workers"]


def cache_dir() -> Path:
    """Where builds are cached: $CUPY_COSATTN_CACHE, or ~/.cache/cupy_cosattn/emu."""
    d = os.environ.get("CUPY_COSATTN_CACHE")
    p = Path(d) if d else Path.home() / ".cache" / "cupy_cosattn" / "emu"
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------------------------
# Building.

def _cxx():
    return os.environ.get("CXX", "g++")


_compiler_id_cache = {}


def _compiler_id():
    cxx = _cxx()
    if cxx not in _compiler_id_cache:
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            raise EmulatorError(f"the emulator needs a host C++ compiler ({cxx!r}): {e}") from e
        _compiler_id_cache[cxx] = (shutil.which(cxx) or cxx) + "\n" + out.splitlines()[0]
    return _compiler_id_cache[cxx]


def _shim_digest():
    h = hashlib.sha256()
    for p in sorted(_EMU_DIR.iterdir()):
        if p.is_file() and p.suffix in (".h", ".cpp", ".hpp", ".inc"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _headers_digest(dirs):
    """Contents of the headers a source may include: cuda_src/ and the -I directories."""
    h = hashlib.sha256()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix in (".cuh", ".h", ".hpp", ".cu", ".inc"):
                h.update(str(p).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


def _compile(cmd, out: Path, what: str):
    """Run a compile command writing to a temporary file, then move it into place atomically."""
    tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    cmd = [c if c != "@OUT@" else str(tmp) for c in cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        try:
            tmp.unlink()
        except OSError:
            pass
        msg = proc.stderr.strip()
        if len(msg) > 20000:
            msg = msg[:20000] + "\n... (truncated)"
        raise EmulatorError(f"building {what} with the host compiler failed:\n$ {' '.join(cmd)}\n{msg}")
    os.replace(tmp, out)


class _ArgInfo(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("align", ctypes.c_size_t), ("is_pointer", ctypes.c_int)]


class _Result(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_int),
        ("sig", ctypes.c_int),
        ("addr", ctypes.c_uint64),
        ("alloc_id", ctypes.c_int64),
        ("offset", ctypes.c_int64),
        ("msg", ctypes.c_char * 4096),
    ]


_lock = threading.RLock()
_runtime_lib = None


def _runtime():
    """libcaemu: built once per shim version, loaded process-wide (RTLD_GLOBAL) so that kernel
    modules resolve the runtime's symbols against it."""
    global _runtime_lib
    with _lock:
        if _runtime_lib is not None:
            return _runtime_lib
        key = hashlib.sha256((_ABI + _compiler_id() + _shim_digest()).encode()).hexdigest()[:24]
        out = cache_dir() / f"libcaemu-{key}.so"
        if not out.exists():
            cmd = [_cxx(), "-O2", "-std=c++17", "-fPIC", "-shared", "-pthread", "-DCA_EMULATOR",
                   f"-I{CUDA_SRC}", str(_RUNTIME_SRC), "-o", "@OUT@"]
            _compile(cmd, out, "the emulator runtime")
        lib = ctypes.CDLL(str(out), mode=ctypes.RTLD_GLOBAL)
        lib.caemu_abi_version.restype = ctypes.c_int
        lib.caemu_configure.argtypes = [ctypes.c_size_t]
        lib.caemu_configure.restype = None
        lib.caemu_launch.argtypes = [
            ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_uint64,
            ctypes.c_void_p, ctypes.POINTER(_Result)]
        lib.caemu_launch.restype = ctypes.c_int
        lib.caemu_alloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int64)]
        lib.caemu_alloc.restype = ctypes.c_void_p
        lib.caemu_free.argtypes = [ctypes.c_void_p]
        lib.caemu_free.restype = None
        lib.caemu_check_canaries.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64),
                                             ctypes.c_int]
        lib.caemu_check_canaries.restype = ctypes.c_int
        lib.caemu_set_option.argtypes = [ctypes.c_int, ctypes.c_longlong]
        lib.caemu_set_option.restype = None
        lib.caemu_configure(_env_stack())
        _runtime_lib = lib
        return lib


# ------------------------------------------------------------------------------------------------
# Guarded device memory.

_allocs = {}  # id -> (ptr, nbytes, shape, dtype str, placement)


class _GuardedBuffer:
    """Owner of one guarded allocation; NumPy arrays over it keep it alive through `.base`."""

    def __init__(self, nbytes):
        lib = _runtime()
        aid = ctypes.c_int64()
        place = ctypes.c_int(_PLACEMENTS[_state["placement"]])  # in: requested, out: the one used
        ptr = lib.caemu_alloc(nbytes, ctypes.byref(place), ctypes.byref(aid))
        if not ptr:
            raise MemoryError(f"emulator: cannot allocate {nbytes} bytes")
        self.ptr = ptr
        self.nbytes = nbytes
        self.id = aid.value
        self.placement = _PLACEMENT_NAMES.get(place.value, "end")
        self.__array_interface__ = {
            "data": (ptr, False),
            "shape": (nbytes,),
            "typestr": "|u1",
            "version": 3,
        }
        weakref.finalize(self, _free, lib, ptr, self.id)


def _free(lib, ptr, aid):
    _allocs.pop(aid, None)
    lib.caemu_free(ptr)


def _dtype_name(dt):
    return str(np.dtype(dt))


def device_empty(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An uninitialized "device" array: a NumPy array over a guarded allocation (PROT_NONE pages on
    both sides, the data flush against one of them as set_placement says, canaries in the slack).
    Out-of-bounds kernel accesses fault or hit a canary and raise EmulatorError. Every byte holds the
    garbage of set_fill (0xFF by default: NaN as any float type)."""
    arr = _device_alloc(shape, dtype)
    value = _state["fill"]
    if value is not None and arr.size:
        np.asarray(_guarded_owner(arr)).fill(value)  # the allocation's bytes (uint8)
    return arr


def _device_alloc(shape, dtype):
    """A device array straight from the allocator: all zeros (fresh anonymous pages)."""
    dtype = np.dtype(dtype)
    shape = (shape,) if np.isscalar(shape) else tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        if s < 0:
            raise ValueError(f"negative dimension in shape {shape}")
        n *= s
    buf = _GuardedBuffer(n * dtype.itemsize)
    _allocs[buf.id] = (buf.ptr, buf.nbytes, shape, _dtype_name(dtype), buf.placement)
    arr = np.asarray(buf).view(dtype).reshape(shape)
    return arr


def device_zeros(shape: int | tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """device_empty, filled with zeros."""
    return _device_alloc(shape, dtype)  # fresh anonymous pages are zero


def to_device(a: Any, dtype: Any = None) -> np.ndarray:
    """A guarded copy of `a` (C-contiguous)."""
    a = np.asarray(a, dtype=dtype)
    d = _device_alloc(a.shape, a.dtype)  # every byte is copied: no fill needed
    if a.size:
        np.copyto(d, a, casting="no")
    return d


def to_host(a: np.ndarray) -> np.ndarray:
    """A plain NumPy copy of a device array."""
    return np.array(a, copy=True)


def _guarded_owner(a):
    b = a
    while isinstance(b, np.ndarray):
        b = b.base
    return b if isinstance(b, _GuardedBuffer) else None


def is_device_array(a: Any) -> bool:
    """True for NumPy arrays over a guarded allocation (device_empty / device_zeros / to_device)."""
    return isinstance(a, np.ndarray) and _guarded_owner(a) is not None


def device_ptr(a: np.ndarray) -> int:
    """Address of a device array's first element, as the kernels see it (for pointer fields of a
    params struct)."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"device_ptr expects a NumPy array from emulator.device_empty/to_device, "
                        f"got {type(a).__name__}")
    if _guarded_owner(a) is None:
        raise TypeError("device_ptr: the array is not a device array; make one with emulator.to_device(a) "
                        "(plain NumPy memory has no guard pages, so out-of-bounds accesses would go unnoticed)")
    return int(a.__array_interface__["data"][0])


def _describe_alloc(aid, offset):
    info = _allocs.get(aid)
    if info is None:
        return f"a guarded buffer (id {aid}) at byte offset {offset}"
    ptr, nbytes, shape, dt, place = info
    itemsize = np.dtype(dt).itemsize if dt else 1
    where = "before its start" if offset < 0 else "past its end" if offset >= nbytes else "inside"
    elem = f", element {offset // itemsize}" if itemsize > 1 else ""
    if 0 <= offset < nbytes and len(shape) > 1:
        elem += f" {tuple(int(i) for i in np.unravel_index(offset // itemsize, shape))}"
    return (f"buffer of shape {shape} dtype {dt} ({nbytes} bytes, placement {place}) at byte offset "
            f"{offset}{elem} ({where})")


def _check_canaries(kname):
    lib = _runtime()
    ids = (ctypes.c_int64 * 8)()
    offs = (ctypes.c_int64 * 8)()
    n = lib.caemu_check_canaries(ids, offs, 8)
    if n:
        parts = [_describe_alloc(ids[i], offs[i]) for i in range(min(n, 8))]
        raise EmulatorError(f"kernel '{kname}' wrote out of bounds: " + "; ".join(parts))


# ------------------------------------------------------------------------------------------------
# Modules and kernels.

_modules = {}  # build key -> loaded CDLL


def _strip_comments(src):
    out = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            i = n if j < 0 else j + 2
            out.append(" ")
        elif c == '"' or c == "'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(src[i:j + 1])
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_GLOBAL_RE = re.compile(r"\b__global__\b")
def _plain_kernels(src):
    """Names of the non-template __global__ functions (what get_function can find without a name
    expression), qualified with their namespaces; those inside classes or functions are skipped."""
    s = _strip_comments(src)
    events = []  # (pos, kind, label)
    for m in re.finditer(r"[{}]", s):
        events.append(m.start())
    names = []
    # brace stack with labels: "ns:<name>", "extern", or "other"
    stack = []
    globals_at = [m.start() for m in _GLOBAL_RE.finditer(s)]
    gi = 0
    for pos in events + [len(s)]:
        while gi < len(globals_at) and globals_at[gi] < pos:
            g = globals_at[gi]
            gi += 1
            if any(lbl == "other" for lbl in stack):
                continue
            before = s[max(0, g - 400):g]
            cut = max(before.rfind(";"), before.rfind("}"), before.rfind("{"))
            if "template" in before[cut + 1:]:
                continue
            m = re.match(r"\s*(?:__launch_bounds__\s*\([^)]*\)\s*)?(?:static\s+)?void\s+"
                         r"(?:__launch_bounds__\s*\([^)]*\)\s*)?([A-Za-z_]\w*)\s*\(", s[g + len("__global__"):])
            if not m:
                continue
            ns = [lbl[3:] for lbl in stack if lbl.startswith("ns:") and lbl[3:]]
            names.append(("::".join(ns + [m.group(1)]), m.group(1)))
        if pos >= len(s):
            break
        if s[pos] == "{":
            before = s[max(0, pos - 200):pos]
            mns = re.search(r"\bnamespace\s*([A-Za-z_]\w*)?\s*$", before)
            if mns:
                stack.append("ns:" + (mns.group(1) or ""))
            elif re.search(r'extern\s*"C"\s*$', before):
                stack.append("extern")
            else:
                stack.append("other")
        elif stack:
            stack.pop()
    seen, out = set(), []
    for q, short in names:
        if q not in seen:
            seen.add(q)
            out.append((q, short))
    return out


def _c_string(s):
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _wrappers(entries):
    """C++ appended to the source: for each (lookup name, expression) an entry point that calls the
    kernel with a `void** args` array, and a description of its argument sizes."""
    lines = ["", "// ---- appended by cupy_cosattn.emulator ----"]
    for i, (_, expr) in enumerate(entries):
        lines.append(f"static void caemu_entry_{i}(void** a) {{ emu::invoke(&({expr}), a); }}")
        lines.append(f"static int caemu_args_{i}(emu::ArgInfo* o, int m) {{ return emu::arg_info(&({expr}), o, m); }}")
    n = len(entries)
    names = ", ".join(_c_string(name) for name, _ in entries) or '""'
    ents = ", ".join(f"caemu_entry_{i}" for i in range(n)) or "nullptr"
    argf = ", ".join(f"caemu_args_{i}" for i in range(n)) or "nullptr"
    lines += [
        'extern "C" {',
        f"int caemu_module_count(void) {{ return {n}; }}",
        f"const char* caemu_module_name(int i) {{ static const char* const t[] = {{{names}}}; return t[i]; }}",
        f"void* caemu_module_entry(int i) {{ static void (*const t[])(void**) = {{{ents}}}; return (void*)t[i]; }}",
        "int caemu_module_args(int i, emu::ArgInfo* o, int m) {",
        f"  static int (*const t[])(emu::ArgInfo*, int) = {{{argf}}}; return t[i](o, m); }}",
        # static __shared__ variables are this module's thread_local data; the runtime finds this
        # thread's copy of the module's TLS segment from this probe and garbage-fills it per block
        "static thread_local char caemu_tls_probe_var;",
        "void* caemu_module_tls_probe(void) { return &caemu_tls_probe_var; }",
        "}",
        "",
    ]
    return "\n".join(lines)


def _translate_options(options):
    """NVRTC options -> host compiler flags: -I, -D, -U, --pre-include kept; the rest ignored."""
    flags, incdirs = [], []
    opts = list(options or ())
    i = 0
    while i < len(opts):
        o = str(opts[i])
        nxt = str(opts[i + 1]) if i + 1 < len(opts) else None
        for short, long_ in (("-I", "--include-path"), ("-D", "--define-macro"), ("-U", "--undefine-macro"),
                             ("-include", "--pre-include")):
            val = None
            if o.startswith(long_ + "="):
                val = o[len(long_) + 1:]
            elif o == long_ or o == short:
                val = nxt
                i += 1
            elif o.startswith(short) and short != "-include":
                val = o[len(short):]
            if val is not None:
                if short == "-I":
                    incdirs.append(val)
                    flags.append("-I" + val)
                elif short == "-include":
                    flags += ["-include", val]
                else:
                    flags.append(short + val)
                break
        i += 1
    return flags, incdirs


# Race mode: gcc's ThreadSanitizer pass (function entry/exit hooks off: only memory accesses), linked
# without libtsan; calls of memcpy / memset / memmove go to the runtime's __wrap_ versions.
_RACE_CFLAGS = ["-fsanitize=thread", "--param", "tsan-instrument-func-entry-exit=0"]
_RACE_LDFLAGS = ["-Wl,--wrap=memcpy,--wrap=memset,--wrap=memmove"]


def _extra_cflags():
    v = os.environ.get("CUPY_COSATTN_EMU_CFLAGS", "").split()
    return v


class RawKernel:
    """One kernel of an emulated module; call it like cupy.RawKernel:
    ``kernel(grid, block, args, shared_mem=0)``."""

    def __init__(self, module: RawModule, name: str, entry: int, arginfo: list[tuple[int, int, bool]],
                 tls_probe: Optional[int] = None) -> None:
        self._module = module  # keep the library loaded
        self._tls_probe = tls_probe
        self.name = name
        self._entry = entry
        self._arginfo = arginfo  # list of (size, align, is_pointer)
        self.max_dynamic_shared_size_bytes = 0
        self.preferred_shared_memory_carveout = -1

    @property
    def num_args(self) -> int:
        return len(self._arginfo)

    @property
    def attributes(self) -> dict[str, int]:
        return {"max_dynamic_shared_size_bytes": self.max_dynamic_shared_size_bytes, "num_regs": 0,
                "local_size_bytes": 0, "shared_size_bytes": 0, "max_threads_per_block": 1024}

    def __call__(self, grid: Any, block: Any, args: tuple, shared_mem: int = 0, stream: Any = None,
                 enable_cooperative_groups: bool = False) -> None:
        launch(self, grid, block, args, shared_mem=shared_mem)


def _dims(v, what, limits):
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3:
        raise EmulatorError(f"invalid launch configuration: {what} must have 1 to 3 dimensions, got {v}")
    v = v + (1,) * (3 - len(v))
    for x, lim, ax in zip(v, limits, "xyz"):
        if x < 1 or x > lim:
            raise EmulatorError(f"invalid launch configuration: {what}.{ax} = {x} (must be 1 .. {lim})")
    return v


def _arg_bytes(kname, i, a, info, temps):
    """Bytes of one kernel argument (as cuLaunchKernel's args[i] points to)."""
    size, _align, is_ptr = info
    if a is None:
        data, desc = bytes(8), "None (null pointer)"
    elif isinstance(a, np.ndarray):
        if not is_ptr:
            raise TypeError(f"kernel '{kname}' argument {i}: got an array, but the kernel takes a {size}-byte value")
        if _guarded_owner(a) is None:
            # A plain NumPy array: copy it into guarded memory for the launch, and back after.
            src = np.ascontiguousarray(a)
            d = to_device(src)
            temps.append((a, d))
            a = d
        data, desc = int(a.__array_interface__["data"][0]).to_bytes(8, "little"), "an array"
    else:
        if isinstance(a, bool):
            a = np.bool_(a)
        elif isinstance(a, int):
            a = np.int64(a)
        elif isinstance(a, float):
            a = np.float64(a)
        if not isinstance(a, np.generic):
            raise TypeError(f"kernel '{kname}' argument {i}: unsupported type {type(a).__name__} "
                            "(pass NumPy arrays, NumPy scalars or structured np.void scalars)")
        data = a.tobytes()
        desc = f"{type(a).__name__} ({a.dtype})"
    if len(data) != size:
        kind = "a pointer" if is_ptr else "by value"
        raise TypeError(f"kernel '{kname}' argument {i}: the kernel takes {size} bytes ({kind}), "
                        f"got {desc} of {len(data)} bytes")
    return data


# caemu_set_option keys (runtime.cpp).
_OPT_SMEM_PLACEMENT, _OPT_WATCHDOG_MS, _OPT_RACE = 1, 2, 3

_CODE_ADDRS = re.compile(r"\[(/[^\[\],]+?)\+(0x[0-9a-f]+(?:, \+0x[0-9a-f]+)*)\]")


def _source_line(path, line):
    try:
        with open(path, errors="replace") as f:
            for i, text in enumerate(f, 1):
                if i == line:
                    text = " ".join(text.split())
                    return text if len(text) <= 100 else text[:97] + "..."
    except OSError:
        pass
    return ""


def _resolve_code_addresses(msg):
    """Append the source lines (addr2line) to each "[library+0xoff, +0xoff, ...]" of a runtime message,
    when the library has line information; unchanged otherwise."""
    def lines(m):
        offs = [o.strip().lstrip("+") for o in m.group(2).split(",")]
        try:
            out = subprocess.run(["addr2line", "-e", m.group(1)] + offs, capture_output=True, text=True,
                                 timeout=30).stdout.splitlines()
        except (OSError, subprocess.SubprocessError):
            return m.group(0)
        found = []
        for loc in out:
            loc = loc.split(" (discriminator")[0].strip()
            path, _, num = loc.rpartition(":")
            if not path or path.startswith("??") or not num.isdigit():
                continue
            text = _source_line(path, int(num))
            item = f"{os.path.basename(path)}:{num}" + (f": `{text}`" if text else "")
            if item not in found:
                found.append(item)
        return f"{m.group(0)} ({'; '.join(found)})" if found else m.group(0)
    return _CODE_ADDRS.sub(lines, msg)


def launch(kernel: RawKernel, grid: Any, block: Any, args: tuple, shared_mem: int = 0) -> None:
    """Run `kernel` (a RawKernel of an emulated module) on the CPU. Same as calling the kernel."""
    lib = _runtime()
    kname = kernel.name
    g = _dims(grid, "grid", (2**31 - 1, 65535, 65535))
    b = _dims(block, "block", (1024, 1024, 64))
    if b[0] * b[1] * b[2] > 1024:
        raise EmulatorError(f"invalid launch configuration: block {b} has {b[0] * b[1] * b[2]} threads (max 1024)")
    shared_mem = int(shared_mem)
    limit = max(_SMEM_DEFAULT_LIMIT, int(kernel.max_dynamic_shared_size_bytes or 0))
    if shared_mem < 0 or shared_mem > min(limit, _SMEM_MAX):
        raise EmulatorError(
            f"kernel '{kname}': shared_mem={shared_mem} bytes exceeds the limit of {min(limit, _SMEM_MAX)} "
            f"(above 48 KiB, set kernel.max_dynamic_shared_size_bytes first, as on a GPU; max {_SMEM_MAX})")
    args = tuple(args)
    if len(args) != len(kernel._arginfo):
        raise TypeError(f"kernel '{kname}' takes {len(kernel._arginfo)} arguments, got {len(args)}")
    temps = []
    try:
        bufs = []
        for i, (a, info) in enumerate(zip(args, kernel._arginfo)):
            data = _arg_bytes(kname, i, a, info, temps)
            bufs.append(ctypes.create_string_buffer(data, max(len(data), 1)))
        argv = (ctypes.c_void_p * max(1, len(bufs)))(*[ctypes.cast(x, ctypes.c_void_p) for x in bufs])
        gv = (ctypes.c_uint * 3)(*g)
        bv = (ctypes.c_uint * 3)(*b)
        res = _Result()
        seed = _state["interleave"]
        race = _state["race"]
        entry, probe = kernel._module._race_entry(kname) if race else (kernel._entry, kernel._tls_probe)
        wd = _state["watchdog"]
        lib.caemu_set_option(_OPT_SMEM_PLACEMENT, _PLACEMENTS[_state["placement"]])
        lib.caemu_set_option(_OPT_WATCHDOG_MS, 0 if wd is None else max(1, int(wd * 1000)))
        lib.caemu_set_option(_OPT_RACE, int(race))
        code = lib.caemu_launch(entry, kname.encode(), gv, bv, argv, shared_mem, _state["workers"],
                                0 if seed is None else 1, 0 if seed is None else seed, probe,
                                ctypes.byref(res))
        if code:
            msg = res.msg.decode(errors="replace")
            if code == 2 and res.alloc_id >= 0:
                msg += ": out of bounds of " + _describe_alloc(res.alloc_id, res.offset)
            elif code == 3:
                msg = re.sub(r"\{alloc (-?\d+) (-?\d+)\}",
                             lambda m: "in " + _describe_alloc(int(m.group(1)), int(m.group(2))), msg)
            if "watchdog:" in msg:
                msg = _resolve_code_addresses(msg)
            try:
                _check_canaries(kname)  # re-arm, so the next launch starts clean
            except EmulatorError as e:
                msg += f"\n(also: {e})"
            raise EmulatorError(msg)
        _check_canaries(kname)
    finally:
        for orig, d in temps:
            if orig.flags.writeable:
                np.copyto(orig, d.reshape(orig.shape), casting="no")
        del temps


class RawModule:
    """Mirror of cupy.RawModule for the emulator. The source is compiled by the host C++ compiler
    (g++ -O2 -std=c++17 -DCA_EMULATOR, with cuda_src/ and emu/shim.h) on the first get_function, and
    cached on disk (see cache_dir()). -I / -D / -U options are honoured, NVRTC-only options ignored."""

    def __init__(self, code: Optional[str] = None, path: Optional[str] = None, options: tuple = (),
                 backend: str = "nvrtc", translate_cucomplex: bool = False, *, enable_cooperative_groups: bool = False,
                 name_expressions: Optional[tuple] = None, jitify: bool = False) -> None:
        if code is None:
            if path is None:
                raise TypeError("RawModule needs code= or path=")
            code = Path(path).read_text()
        self.code = code
        self.options = tuple(options or ())
        self.name_expressions = tuple(name_expressions or ())
        self._libs = {}  # variant ("plain" | "race") -> loaded library
        self._kernels = {}
        self._race_entries = {}

    def _build(self, race: bool = False):
        """The module's library: plain, or instrumented for race detection (see set_race_check)."""
        variant = "race" if race else "plain"
        if variant in self._libs:
            return self._libs[variant]
        _runtime()
        flags, incdirs = _translate_options(self.options)
        extra = _extra_cflags()
        auto = [(q, short) for q, short in _plain_kernels(self.code)]
        exprs = list(self.name_expressions)
        entries = [(e, e) for e in exprs]
        known = {e for e in exprs}
        entries_auto = entries + [(short, q) for q, short in auto if short not in known and q not in known]
        # -g1: line tables, so that the watchdog can name the source lines of its call sites
        base = [_cxx(), "-O2", "-g1", "-std=c++17", "-fPIC", "-shared", "-fno-strict-aliasing",
                "-fstack-clash-protection", "-Wno-unknown-pragmas",
                # cuda_src/emu/ first: its cuda_fp16.h / cuda_bf16.h stand in for CUDA's
                "-DCA_EMULATOR", f"-I{_EMU_DIR}", f"-I{CUDA_SRC}"] + flags + extra + ["-include", str(_SHIM)]
        digest = hashlib.sha256()
        for part in (_ABI, _compiler_id(), "\0".join(base), _shim_digest(),
                     _headers_digest([CUDA_SRC] + incdirs), self.code, "\0".join(exprs), variant,
                     "file-prefix-map"):
            digest.update(part.encode())
            digest.update(b"\1")
        key = digest.hexdigest()[:32]
        with _lock:
            lib = _modules.get(key)
            if lib is None:
                d = cache_dir()
                out = d / f"mod-{key}.so"
                if not out.exists():
                    src = d / f"mod-{key}.cpp"
                    try:
                        self._write_and_compile(src, out, base, entries_auto, race)
                    except EmulatorError:
                        if len(entries_auto) == len(entries):
                            raise
                        # A name found by the source scan did not work as an expression (an overload,
                        # say): build with the name expressions only.
                        self._write_and_compile(src, out, base, entries, race)
                lib = ctypes.CDLL(str(out))
                lib.caemu_module_count.restype = ctypes.c_int
                lib.caemu_module_name.restype = ctypes.c_char_p
                lib.caemu_module_name.argtypes = [ctypes.c_int]
                lib.caemu_module_entry.restype = ctypes.c_void_p
                lib.caemu_module_entry.argtypes = [ctypes.c_int]
                lib.caemu_module_args.restype = ctypes.c_int
                lib.caemu_module_args.argtypes = [ctypes.c_int, ctypes.POINTER(_ArgInfo), ctypes.c_int]
                _modules[key] = lib
        self._libs[variant] = lib
        return lib

    def _write_and_compile(self, src, out, base, entries, race=False):
        text = self.code + "\n" + _wrappers(entries)
        tmp_src = src.with_name(f"{src.name}.{os.getpid()}.{threading.get_ident()}.cpp")
        tmp_src.write_text(text)
        try:
            # line information names the source by the name it keeps after the build
            base = base + [f"-ffile-prefix-map={tmp_src}={src}"]
            if not race:
                _compile(base + [str(tmp_src), "-o", "@OUT@"], out, "an emulated module")
            else:
                # The compiler's ThreadSanitizer instrumentation without its run-time library: the
                # calls it inserts (and memcpy / memset / memmove, wrapped at link time) go to the
                # emulator runtime's race detector (cuda_src/emu/race.inc).
                obj = out.with_name(out.name + ".o")
                _compile(base + _RACE_CFLAGS + ["-c", str(tmp_src), "-o", "@OUT@"], obj, "an instrumented module")
                try:
                    _compile([_cxx(), "-shared", str(obj), "-o", "@OUT@"] + _RACE_LDFLAGS, out,
                             "an instrumented module")
                finally:
                    obj.unlink(missing_ok=True)
        finally:
            try:
                os.replace(tmp_src, src)  # keep the generated source beside the build, for debugging
            except OSError:
                pass

    def compile(self, log_stream: Any = None) -> None:
        self._build()

    def _race_entry(self, name):
        """(entry, TLS probe) of kernel `name` in the instrumented build."""
        got = self._race_entries.get(name)
        if got is None:
            lib = self._build(race=True)
            idx = self._kernel_index(lib, name)
            probe = ctypes.cast(lib.caemu_module_tls_probe, ctypes.c_void_p).value
            got = self._race_entries[name] = (lib.caemu_module_entry(idx), probe)
        return got

    def _kernel_index(self, lib, name):
        table = {}
        for i in range(lib.caemu_module_count()):
            table[lib.caemu_module_name(i).decode()] = i
        idx = table.get(name)
        if idx is None:
            squash = {re.sub(r"\s+", "", k): v for k, v in table.items()}
            idx = squash.get(re.sub(r"\s+", "", name))
        if idx is None:
            raise EmulatorError(f"no kernel named {name!r} in the module (known: {sorted(table)}); template "
                                "kernels must be listed in name_expressions")
        return idx

    def get_function(self, name: str) -> RawKernel:
        """The kernel named `name`: a name expression given to the constructor (exactly, or up to
        whitespace), or the name of a non-template __global__ function."""
        if name in self._kernels:
            return self._kernels[name]
        lib = self._build()
        idx = self._kernel_index(lib, name)
        infos = (_ArgInfo * 64)()
        n = lib.caemu_module_args(idx, infos, 64)
        arginfo = [(infos[i].size, infos[i].align, infos[i].is_pointer) for i in range(min(n, 64))]
        probe = ctypes.cast(lib.caemu_module_tls_probe, ctypes.c_void_p).value
        k = RawKernel(self, name, lib.caemu_module_entry(idx), arginfo, probe)
        self._kernels[name] = k
        return k
