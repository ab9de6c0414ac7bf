"""cupy-cosattn: fused cosine-similarity attention for NVIDIA GPUs (CUDA C compiled at run time by
NVRTC through CuPy), with a float64 NumPy reference and a CPU emulator of the same kernels.

    import cupy_cosattn as ca
    out = ca.cosine_sim_attention(q, k, v, causal=True)
    out, lse = ca.forward(q, k, v)
    dq, dk, dv, dbias, dscale = ca.backward(dout, q, k, v, out, lse)
    out, lse = ca.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k)   # packed batches
    out, lse = ca.kvcache_forward(q, k_cache, v_cache, cache_seqlens, k_new=k, v_new=v)  # decoding

Importing this package needs neither CuPy nor a GPU; CuPy is imported only on a CUDA path.
"""
from .api import backward, cosine_sim_attention, forward, kvcache_forward, varlen_backward, varlen_forward
from .problem import Problem

__all__ = ["cosine_sim_attention", "forward", "backward", "varlen_forward", "varlen_backward", "kvcache_forward",
           "Problem"]
__version__ = "0.1.0"
