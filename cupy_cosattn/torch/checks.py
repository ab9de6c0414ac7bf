"""Argument checks for the torch op, shared with the NumPy/CuPy API.

``problem.canonicalize`` itself runs on zero-memory NumPy stand-ins that have the tensors' shapes and
dtypes, so every message matches the NumPy/CuPy API. Results are cached per signature (shapes, dtypes,
flags), which keeps the check off the hot path of a training loop.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from .. import problem as _problem

# torch dtypes with a NumPy twin (a static table: this also runs under FakeTensorMode, where no tensor
# can be turned into a NumPy array).
_NUMPY_OF_TORCH = {
    torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64, torch.bool: np.bool_,
    torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.complex64: np.complex64, torch.complex128: np.complex128,
}


def np_dtype(name: str, dt: torch.dtype) -> np.dtype:
    """The NumPy dtype that stands in for torch dtype `dt` when problem.canonicalize checks it."""
    if dt == torch.bfloat16:
        if _problem.BFLOAT16 is None:  # pragma: no cover - ml_dtypes is a dependency
            raise TypeError(f"{name} is bfloat16, which needs the ml_dtypes package")
        return _problem.BFLOAT16
    if dt in _NUMPY_OF_TORCH:
        return np.dtype(_NUMPY_OF_TORCH[dt])
    raise TypeError(f"{name} has dtype {dt}; supported are float16, bfloat16 and float32, and float64 on CPU tensors")


# float64 runs on CPU tensors only: the torch CPU implementation and the reference compute in float64.
FLOAT64_HINT = "float64 runs on CPU tensors (backend 'torch' or 'reference', both compute in float64)"


def _stand_in(shape, dtype):
    """A read-only NumPy array of `shape` and `dtype` backed by a single element (all strides 0)."""
    base = np.zeros((1,), dtype=dtype)
    return np.lib.stride_tricks.as_strided(base, shape=tuple(shape), strides=(0,) * len(shape), writeable=False)


def check_signature(q_sig: tuple, k_sig: tuple, v_sig: tuple, mask_sig: Optional[tuple], bias_sig: Optional[tuple],
                    scale_sig: Any, attn_bias_batch_dim: bool, groups: int, causal: bool, l2norm_qk: bool,
                    deterministic: bool, cpu: bool, arg_types: Optional[tuple] = None) -> tuple[_problem.Problem, dict]:
    """(Problem, canonical shapes {q, k, v, bias}) for tensor signatures; raises like canonicalize.
    `arg_types` only keys the cache (so causal=1 is not served the answer cached for causal=True)."""
    def arr(name, sig):
        return None if sig is None else _stand_in(sig[0], np_dtype(name, sig[1]))

    if isinstance(scale_sig, tuple):  # a tensor: its shape and dtype are checked here, its values elsewhere
        scale = np.ones(scale_sig[0], dtype=np_dtype("scale", scale_sig[1]))
    else:
        scale = scale_sig
    try:
        prob, inp = _problem.canonicalize(
            arr("q", q_sig), arr("k", k_sig), arr("v", v_sig), mask=arr("mask", mask_sig),
            attn_bias=arr("attn_bias", bias_sig), attn_bias_batch_dim=attn_bias_batch_dim, scale=scale,
            groups=groups, causal=causal, l2norm_qk=l2norm_qk, deterministic=deterministic)
    except TypeError as e:
        msg = str(e)
        if msg.endswith(_problem.FLOAT64_NOTE):  # the torch CPU implementation takes float64 too
            raise TypeError(msg[:-len(_problem.FLOAT64_NOTE)] + "and float64 on CPU tensors") from None
        raise
    if not cpu:  # CUDA tensors run the kernels
        _problem.check_kernel_dtype(prob.dtype, "cuda", FLOAT64_HINT)
    shapes = dict(q=inp.q.shape, k=inp.k.shape, v=inp.v.shape, bias=None if inp.bias is None else inp.bias.shape)
    return prob, shapes


_check_cached = functools.lru_cache(maxsize=512)(check_signature)


def _sig(x):
    return None if x is None else (tuple(int(s) for s in x.shape), x.dtype)


def check(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], attn_bias: Optional[Tensor], scale: Any,
          attn_bias_batch_dim: bool, groups: int, causal: bool, l2norm_qk: bool,
          deterministic: bool) -> tuple[_problem.Problem, dict]:
    """Check every argument (tensors or fake tensors); returns (Problem, canonical shapes)."""
    named = (("q", q), ("k", k), ("v", v), ("mask", mask), ("attn_bias", attn_bias))
    for name, t in named:
        if t is None and name in ("mask", "attn_bias"):
            continue
        if not isinstance(t, Tensor):
            like = " like q" if name != "q" else ""
            raise TypeError(f"{name} must be a torch.Tensor{like}, got {_problem._describe(t)} "
                            f"(cupy_cosattn.cosine_sim_attention takes NumPy/CuPy arrays)")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}")
    if isinstance(scale, Tensor):
        if scale.device != q.device:
            raise ValueError(f"scale is on device {scale.device} but q is on {q.device}")
        scale_sig = _sig(scale)
    elif isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, (bool, np.bool_)):
        scale_sig = float(scale)
    else:
        scale_sig = scale  # canonicalize says what is wrong with it
    flags = (attn_bias_batch_dim, groups, causal, l2norm_qk, deterministic)
    key = (_sig(q), _sig(k), _sig(v), _sig(mask), _sig(attn_bias), scale_sig, *flags, q.device.type != "cuda",
           tuple(type(f) for f in flags))
    try:
        hash(key)
    except TypeError:  # an unhashable (hence wrong) argument: check it uncached for the message
        return check_signature(*key)
    return _check_cached(*key)


def check_scale_values(scale_t: Tensor, prob: _problem.Problem) -> None:
    """Raise the NumPy API's ValueError when the scale tensor holds a value <= 0, NaN or Inf.

    This reads the values on the host, so it runs only inside the real implementations of the ops
    (eager and compiled graphs alike), where the values are on the host already (CPU tensors) or
    are copied there anyway (the kernel backends pick their kernel variant from them); never in a
    fake implementation, whose tensors have no values."""
    host = scale_t.detach().to(torch.float64).cpu().numpy()
    _problem._scale_vector(host, prob.H, prob.merged)


def is_static(*tensors) -> bool:
    """True when every shape is concrete (not symbolic), so the NumPy check can run on it."""
    return all(t is None or all(type(s) is int for s in t.shape) for t in tensors)

