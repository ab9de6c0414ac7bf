"""Argument checking and the canonical problem description.

Every public entry point funnels its arguments through :func:`canonicalize`, which either raises a
``ValueError``/``TypeError`` naming the offending argument (before any work is done) or returns a
:class:`Problem` (sizes and flags) and :class:`Inputs` (the arrays, as 4-D views). Backends only ever
see the canonical form:

- ``q``: (B, H, Nq, D); ``k``, ``v``: (B, Hk, Nk, D) with H % Hk == 0.
- ``mask``: (B, Nk) bool or None.
- ``bias``: a 4-D view (Bb, Hb, Nq, Nk) with Bb in {1, B} and Hb in {1, H}; a size-1 dim is broadcast
  (its stride is irrelevant), or None.
- ``scale``: float64 array of shape (H,) (a scalar scale is repeated; ``Problem.per_head_scale`` says
  which the caller gave).

User layouts map onto it as follows. Merged 3-D q (BH, Nq, D) becomes B = BH, H = Hk = 1 (so its
(BH, Nk) mask and (BH, Nq, Nk) bias are the per-batch kinds). A 3-D k/v with a 4-D q is one shared
kv head (Hk = 1).
"""
from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

try:  # bfloat16 for NumPy arrays (a runtime dependency, but keep the import failure readable)
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BFLOAT16 = None

# The dtypes the kernels take (backends "cuda" and "emulator").
SUPPORTED_DTYPES = tuple(d for d in (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32)) if d is not None)
DTYPE_NAMES = {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}
if BFLOAT16 is not None:
    DTYPE_NAMES[BFLOAT16] = "bfloat16"
FLOAT64 = np.dtype(np.float64)
# canonicalize also accepts float64, which only the reference backend (it computes in float64 anyway)
# runs: NumPy's default dtype, so np.random.randn input works with backend "reference" / "auto".
ACCEPTED_DTYPES = SUPPORTED_DTYPES + (FLOAT64,)
FLOAT64_NOTE = "and float64 on the reference backend"  # the tail of the unsupported-dtype message

DEFAULT_SCALE = 8.0
NORM_EPS = 1e-12  # each l2-normalized chunk is x / max(||x||, NORM_EPS)

# Bias layouts (how the user's bias maps onto (B, H, Nq, Nk)).
BIAS_NONE, BIAS_PER_HEAD, BIAS_PER_BATCH, BIAS_FULL = "none", "head", "batch", "full"

# A NumPy or CuPy array (CuPy is optional, so there is no narrower static type for both).
Array = Any


@dataclass(frozen=True)
class Problem:
    """Sizes and flags of one attention call, independent of the array library."""

    B: int
    H: int
    Hk: int
    Nq: int
    Nk: int
    D: int
    dtype: np.dtype
    groups: int = 1
    causal: bool = False
    l2norm_qk: bool = True
    has_mask: bool = False
    bias_layout: str = BIAS_NONE
    per_head_scale: bool = False
    deterministic: bool = False
    merged: bool = False  # the caller passed 3-D (BH, N, D) arrays
    # A packed variable-length batch (cupy_cosattn/varlen.py): B sequences, Nq / Nk the longest, q, o
    # (total_q, H, D) and k, v (total_k, Hk, D); no mask or bias.
    varlen: bool = False
    total_q: int = 0
    total_k: int = 0

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, self.dtype.name)

    @property
    def has_bias(self) -> bool:
        return self.bias_layout != BIAS_NONE

    @property
    def bias_shape(self) -> tuple[int, ...]:
        """(Bb, Hb, Nq, Nk) of the canonical bias view (Bb in {1, B}, Hb in {1, H}); () without a bias."""
        if not self.has_bias:
            return ()
        Bb = self.B if self.bias_layout in (BIAS_PER_BATCH, BIAS_FULL) else 1
        Hb = self.H if self.bias_layout in (BIAS_PER_HEAD, BIAS_FULL) else 1
        return (Bb, Hb, self.Nq, self.Nk)

    @property
    def bias_dense(self) -> bool:
        """The bias has one element per (b, h, query, key), so dbias is dS itself (no reduction)."""
        return self.bias_shape == (self.B, self.H, self.Nq, self.Nk)

    @property
    def bias_sum_axes(self) -> tuple[int, ...]:
        """The axes of (B, H, Nq, Nk) over which dS sums to dbias: those the bias has size 1 along."""
        return tuple(ax for ax in (0, 1) if self.bias_shape[ax] == 1)

    @property
    def q_rows(self) -> int:
        """Rows of D elements in q (and o, dout): B·H·Nq, or total_q·H for a packed batch."""
        return self.total_q * self.H if self.varlen else self.B * self.H * self.Nq

    @property
    def k_rows(self) -> int:
        """Rows of D elements in k (and v): B·Hk·Nk, or total_k·Hk for a packed batch."""
        return self.total_k * self.Hk if self.varlen else self.B * self.Hk * self.Nk

    @property
    def q_per_kv(self) -> int:
        """Query heads per kv head (GQA group size)."""
        return self.H // self.Hk

    @property
    def fixed_offset_safe(self) -> bool:
        """exp(s - scale) cannot overflow: q, k normalized here and no bias (docs/design.md section 1)."""
        return self.l2norm_qk and not self.has_bias


def visible(prob: Problem, rows: Any, cols: Any, mask: Any = None) -> Any:
    """Which (query, key) pairs take part in the softmax: key j is visible to query i iff the mask
    allows it (with prob.has_mask: `mask` (B, K) bool, True = may attend, for the keys `cols`) and,
    with prob.causal, j <= i + (Nk - Nq) (bottom-right aligned). `rows` (R, 1) and `cols` (1, K) are
    integer index arrays of NumPy or torch.

    Returns a bool array broadcastable to (B, 1, R, K), or None when every pair is visible."""
    vis = None
    if prob.causal:
        vis = (cols <= rows + (prob.Nk - prob.Nq))[None, None]
    if prob.has_mask:
        m = mask[:, None, None, :]
        vis = m if vis is None else vis & m
    return vis


@dataclass
class Inputs:
    """Canonical (4-D) views of the arrays of one call; see the module docstring."""

    q: Any
    k: Any
    v: Any
    mask: Any = None
    bias: Any = None
    scale: Any = None  # float64 (H,), on the host (NumPy)
    cu_seqlens_q: Any = None  # packed batches: int32 (B + 1,) host copies (cupy_cosattn/varlen.py)
    cu_seqlens_k: Any = None


def array_library(x: Any) -> str:
    """'numpy', 'cupy', or 'torch' for an array; anything else is not an array here."""
    mod = type(x).__module__.split(".")[0]
    if isinstance(x, np.ndarray):
        return "numpy"
    if mod in ("cupy", "cupy_backends"):
        return "cupy"
    if mod == "torch":
        return "torch"
    return ""


QUOTE_LIMIT = 80  # at most this many characters of any value quoted in an error message

_REPR = reprlib.Repr()
_REPR.maxlevel = 2
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdict = 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = QUOTE_LIMIT


def _quote(x, limit: int = QUOTE_LIMIT) -> str:
    """A repr of x for an error message, at most `limit` characters: containers are elided by reprlib
    and the rest is cut, so that a huge value never makes a huge message."""
    try:
        r = _REPR.repr(x)
    except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the error being reported
        r = f"<{type(x).__name__} object>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _describe(x) -> str:
    """What x is, briefly: an array by library, shape and dtype; a container by type and length (and
    its first elements); anything else by type and a capped repr."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{array_library(x) or type(x).__name__} array of shape {_quote(tuple(x.shape))} and dtype {x.dtype}"
    if isinstance(x, (list, tuple, dict, set, frozenset)):
        return f"{type(x).__name__} of len {len(x)}: {_quote(x)}"
    return f"{type(x).__name__} {_quote(x)}"


def _device_of(x):
    lib = array_library(x)
    if lib == "cupy":
        return ("cupy", int(x.device.id))
    return (lib, None)


def _device_str(dev) -> str:
    lib, idx = dev
    return f"CUDA device {idx}" if lib == "cupy" else "the host"


def _check_array(name: str, x, ndims, lib: Optional[str] = None):
    if not array_library(x) or array_library(x) == "torch":
        raise TypeError(
            f"{name} must be a NumPy or CuPy array (use cupy_cosattn.torch for torch tensors), got {_describe(x)}"
        )
    if x.ndim not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)} ({x.ndim}-D)")


def _check_dtype(name: str, x):
    if np.dtype(x.dtype) not in ACCEPTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; supported are float16, bfloat16 (ml_dtypes.bfloat16 for NumPy) "
                        f"and float32, {FLOAT64_NOTE}")


FLOAT64_HINT = "backend='reference' (NumPy arrays) takes float64 and computes in float64"


def check_kernel_dtype(dtype: Any, backend: str, hint: str = FLOAT64_HINT) -> None:
    """Raise TypeError unless the kernel backend `backend` ("cuda", "emulator") takes q's `dtype`."""
    if np.dtype(dtype) not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k and v have dtype {dtype}, which backend={backend!r} does not take: its kernels take "
                        f"float16, bfloat16 and float32; {hint}")


def _check_flag(name: str, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {_describe(value)}")
    return bool(value)


def is_real_dtype(dtype: Any) -> bool:
    """A float (bfloat16 included: ml_dtypes' type is not an np.floating subtype) or integer dtype."""
    dtype = np.dtype(dtype)
    return (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer)
            or (BFLOAT16 is not None and dtype == BFLOAT16))


def _scale_vector(scale, H: int, merged: bool):
    """(per_head, float64 (H,) host array) from the user's scale; raises on bad values."""
    if isinstance(scale, (bool, np.bool_)):
        raise TypeError(f"scale must be a positive finite float or a length-H array, got {_describe(scale)}")
    if isinstance(scale, (int, float, np.integer, np.floating)) or (
            isinstance(scale, np.generic) and BFLOAT16 is not None and scale.dtype == BFLOAT16):
        s = float(scale)
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"scale must be finite and > 0, got {s}")
        return False, np.full((H,), s, dtype=np.float64)
    lib = array_library(scale)
    if not lib:
        raise TypeError(f"scale must be a positive finite float or a length-H array, got {_describe(scale)}")
    if lib == "torch":
        raise TypeError(f"scale must be a float or a NumPy/CuPy array (use cupy_cosattn.torch for torch tensors), "
                        f"got {_describe(scale)}")
    host = np.asarray(scale.get() if lib == "cupy" else scale)
    if host.ndim == 0:
        return _scale_vector(float(host), H, merged)
    if host.ndim != 1 or host.shape[0] != H:
        extra = " (merged 3-D inputs have one head per row, so only a scalar or length-1 scale)" if merged else ""
        raise ValueError(f"scale must be a scalar or have shape ({H},) = (H,), got shape {tuple(host.shape)}{extra}")
    if not is_real_dtype(host.dtype):
        raise TypeError(f"scale must hold real numbers, got dtype {host.dtype}")
    host = host.astype(np.float64)
    if not np.all(np.isfinite(host)) or not np.all(host > 0):
        raise ValueError(f"scale must be finite and > 0 for every head, got {_quote(host.tolist())}")
    return True, host


def check_groups(groups: Any, D: int) -> int:
    """`groups` as an int: a positive int (not a bool) dividing the head dim D, else a clear error."""
    if isinstance(groups, (bool, np.bool_)) or not isinstance(groups, (int, np.integer)):
        raise TypeError(f"groups must be an int dividing the head dim {D}, got {_describe(groups)}")
    groups = int(groups)
    if groups < 1 or D % groups != 0:
        raise ValueError(f"groups must be a positive int dividing the head dim D={D}, got {groups}")
    return groups


def canonicalize(q: Array, k: Array, v: Array, *, mask: Optional[Array] = None, attn_bias: Optional[Array] = None,
                 attn_bias_batch_dim: bool = False, scale: Any = DEFAULT_SCALE, groups: int = 1, causal: bool = False,
                 l2norm_qk: bool = True, deterministic: bool = False) -> tuple[Problem, Inputs]:
    """Check every argument and return (Problem, Inputs). Raises ValueError/TypeError before any work.

    Shapes accepted (docs/design.md section 1): q (B, H, Nq, D) or merged (BH, Nq, D); k, v (B, Hk, Nk, D),
    or (B, Nk, D) with a 4-D q (one shared kv head), or (BH, Nk, D) with a 3-D q.
    dtypes: float16, bfloat16, float32 and float64 (float64 runs only on the reference backend, see
    `check_kernel_dtype`). Empty lengths are allowed: Nq = 0 gives empty outputs; Nk = 0 leaves every
    query without a visible key, so its output row is 0 (and its lse is -inf).
    """
    _check_array("q", q, (3, 4))
    _check_array("k", k, (3, 4))
    _check_array("v", v, (3, 4))
    libs = {array_library(x) for x in (q, k, v)}
    if len(libs) != 1:
        raise TypeError(f"q, k and v must come from one array library, got q: {array_library(q)}, "
                        f"k: {array_library(k)}, v: {array_library(v)}")
    devices = {_device_of(x) for x in (q, k, v)}
    if len(devices) != 1:
        raise ValueError("q, k and v must be on one device, got " + ", ".join(
            f"{n} on {_device_str(_device_of(x))}" for n, x in (("q", q), ("k", k), ("v", v))))
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_dtype(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q: {q.dtype}, k: {k.dtype}, v: {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k: {tuple(k.shape)}, v: {tuple(v.shape)}")

    merged = q.ndim == 3
    kv_3d = (not merged) and k.ndim == 3
    if merged:
        if k.ndim != 3:
            raise ValueError(f"with a 3-D (merged batch-heads) q, k must be 3-D (BH, Nk, D), "
                             f"got shape {tuple(k.shape)}")
        BH, Nq, D = q.shape
        if k.shape[0] != BH:
            raise ValueError(f"k has {k.shape[0]} batch-heads but q has {BH} "
                             f"(shapes k {tuple(k.shape)}, q {tuple(q.shape)})")
        B, H, Hk, Nk = BH, 1, 1, k.shape[1]
        q4 = q.reshape(B, 1, Nq, D)
        k4 = k.reshape(B, 1, Nk, D)
        v4 = v.reshape(B, 1, Nk, D)
    else:
        B, H, Nq, D = q.shape
        if kv_3d:
            Hk = 1
            if k.shape[0] != B:
                raise ValueError(f"k has batch size {k.shape[0]} but q has {B} "
                                 f"(shapes k {tuple(k.shape)}, q {tuple(q.shape)})")
            Nk = k.shape[1]
            k4 = k.reshape(B, 1, Nk, k.shape[2])
            v4 = v.reshape(B, 1, Nk, v.shape[2])
        else:
            if k.shape[0] != B:
                raise ValueError(f"k has batch size {k.shape[0]} but q has {B} "
                                 f"(shapes k {tuple(k.shape)}, q {tuple(q.shape)})")
            Hk, Nk = k.shape[1], k.shape[2]
            if Hk < 1 or H % Hk != 0:
                raise ValueError(f"q has H={H} heads, which k's Hk={Hk} kv heads must divide (grouped-query attention)")
            k4, v4 = k, v
        q4 = q
    if k4.shape[-1] != D:
        raise ValueError(f"q and k must share the head dim D, got q: {D}, k: {k4.shape[-1]}")
    if D < 1:
        raise ValueError(f"head dim D must be >= 1, got q of shape {tuple(q.shape)}")

    groups = check_groups(groups, D)
    causal = _check_flag("causal", causal)
    l2norm_qk = _check_flag("l2norm_qk", l2norm_qk)
    deterministic = _check_flag("deterministic", deterministic)
    attn_bias_batch_dim = _check_flag("attn_bias_batch_dim", attn_bias_batch_dim)

    lib = array_library(q)
    mask2 = None
    if mask is not None:
        if array_library(mask) != lib:
            raise TypeError(f"mask must be a {lib} array like q, got {_describe(mask)}")
        if _device_of(mask) != _device_of(q):
            raise ValueError(f"mask is on {_device_str(_device_of(mask))} but q is on {_device_str(_device_of(q))}")
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must have dtype bool (True = may attend), got {mask.dtype}")
        want = (B, Nk)
        if tuple(mask.shape) != want:
            what = "(BH, Nk)" if merged else "(B, Nk)"
            raise ValueError(f"mask must have shape {what} = {want}, got {tuple(mask.shape)}")
        mask2 = mask

    bias4, layout = None, BIAS_NONE
    if attn_bias is not None:
        if array_library(attn_bias) != lib:
            raise TypeError(f"attn_bias must be a {lib} array like q, got {_describe(attn_bias)}")
        if _device_of(attn_bias) != _device_of(q):
            raise ValueError(f"attn_bias is on {_device_str(_device_of(attn_bias))} but q is on "
                             f"{_device_str(_device_of(q))}")
        if np.dtype(attn_bias.dtype) not in (np.dtype(q.dtype), np.dtype(np.float32)):
            raise TypeError(f"attn_bias must have q's dtype ({q.dtype}) or float32, got {attn_bias.dtype}")
        bs = tuple(attn_bias.shape)
        if merged:
            if bs != (B, Nq, Nk):
                raise ValueError(f"attn_bias for merged 3-D q must have shape (BH, Nq, Nk) = {(B, Nq, Nk)}, got {bs}")
            bias4, layout = attn_bias.reshape(B, 1, Nq, Nk), BIAS_PER_BATCH
        elif attn_bias.ndim == 4:
            if bs != (B, H, Nq, Nk):
                raise ValueError(f"a 4-D attn_bias must have shape (B, H, Nq, Nk) = {(B, H, Nq, Nk)}, got {bs}")
            bias4, layout = attn_bias, BIAS_FULL
        elif attn_bias.ndim == 3 and attn_bias_batch_dim:
            if bs != (B, Nq, Nk):
                raise ValueError(f"attn_bias with attn_bias_batch_dim=True must have shape (B, Nq, Nk) = "
                                 f"{(B, Nq, Nk)}, got {bs}")
            bias4, layout = attn_bias.reshape(B, 1, Nq, Nk), BIAS_PER_BATCH
        elif attn_bias.ndim == 3:
            if bs != (H, Nq, Nk):
                hint = " (pass attn_bias_batch_dim=True for a per-batch (B, Nq, Nk) bias)" if bs == (B, Nq, Nk) else ""
                raise ValueError(f"attn_bias must have shape (H, Nq, Nk) = {(H, Nq, Nk)}, got {bs}{hint}")
            bias4, layout = attn_bias.reshape(1, H, Nq, Nk), BIAS_PER_HEAD
        else:
            raise ValueError(f"attn_bias must be (H, Nq, Nk), (B, Nq, Nk) with attn_bias_batch_dim=True, "
                             f"or (B, H, Nq, Nk); got shape {bs}")
    if attn_bias is None and attn_bias_batch_dim:
        pass  # harmless: the flag only picks a layout when a 3-D bias is given

    per_head, scale_vec = _scale_vector(scale, H, merged)

    prob = Problem(B=B, H=H, Hk=Hk, Nq=Nq, Nk=Nk, D=D, dtype=np.dtype(q.dtype), groups=groups, causal=causal,
                   l2norm_qk=l2norm_qk, has_mask=mask2 is not None, bias_layout=layout,
                   per_head_scale=per_head, deterministic=deterministic, merged=merged)
    return prob, Inputs(q=q4, k=k4, v=v4, mask=mask2, bias=bias4, scale=scale_vec)


def check_backward_extras(prob: Problem, q_shape: tuple[int, ...], q_device: tuple, lib: str, dout: Array, out: Array,
                          lse: Array) -> tuple[Array, Array, Array]:
    """Validate `backward`'s dout, out (q's shape and dtype) and lse (q.shape[:-1], float32).

    Returns canonical views: dout, out as (B, H, Nq, D) and lse as (B, H, Nq).
    """
    q_shape = tuple(q_shape)
    canon = (prob.B, prob.H, prob.Nq, prob.D)
    views = []
    for name, x, want_dtype, want_shape, view in (
        ("dout", dout, prob.dtype, q_shape, canon),
        ("out", out, prob.dtype, q_shape, canon),
        ("lse", lse, np.dtype(np.float32), q_shape[:-1], canon[:-1]),
    ):
        if array_library(x) != lib:
            raise TypeError(f"{name} must be a {lib} array like q, got {_describe(x)}")
        if _device_of(x) != q_device:
            raise ValueError(f"{name} is on {_device_str(_device_of(x))} but q is on {_device_str(q_device)}")
        if np.dtype(x.dtype) != want_dtype:
            raise TypeError(f"{name} must have dtype {want_dtype}, got {x.dtype}")
        if tuple(x.shape) != want_shape:
            raise ValueError(f"{name} must have shape {want_shape}, got {tuple(x.shape)}")
        views.append(x.reshape(view))
    return tuple(views)


def into_outputs(o: Array, ls: Array, out: Optional[Array] = None,
                 lse: Optional[Array] = None) -> tuple[Array, Array]:
    """(out, lse) of a forward: `o` and `ls` copied into the caller's preallocated `out` / `lse` where
    given (then those are returned), else `o` and `ls` themselves."""
    if out is not None:
        out[...] = o
        o = out
    if lse is not None:
        lse[...] = ls
        ls = lse
    return o, ls

