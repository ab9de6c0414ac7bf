"""PyTorch autograd for cosine-sim attention, registered as torch custom ops.

    import cupy_cosattn.torch as cat
    out = cat.cosine_sim_attention(q, k, v, causal=True)      # same keywords as the NumPy API
    out = cat.varlen_cosine_sim_attention(q, k, v, cu_seqlens_q, cu_seqlens_k)   # packed batches

Two custom ops do the work (``torch.ops.cupy_cosattn.attn_fwd`` / ``attn_bwd``; ``ops``), so
``torch.compile(fullgraph=True)`` sees one opaque node per call and no graph break.

- CUDA tensors run the fused kernels (``api.forward_canonical`` / ``api.backward_canonical`` with
  backend "cuda") on zero-copy DLPack views, on torch's current stream (``bridge``).
- Other tensors (the CPU) run a plain torch implementation of the same math (``cpu``), or, when chosen
  with ``backend=`` or ``set_cpu_backend``, the emulator or the reference through the CUDA path's glue.

Arguments are checked by ``problem.canonicalize`` itself, on NumPy stand-ins (``checks``). Importing
this package does not import CuPy.

Modules: ``checks`` (argument checks), ``cpu`` (the torch CPU implementation), ``bridge`` (tensors <->
kernel-backend arrays), ``backends`` (which implementation runs a call), ``ops`` (the custom ops and
autograd), ``functional`` (the public functions), ``ring`` (ring attention over torch.distributed: context
parallelism, docs/ring.md), ``compat`` (the function names of lucidrains/flash-cosine-sim-attention),
``kvcache`` (``kvcache_attention``: decoding from a KV cache, the custom op ``cupy_cosattn::kvcache_fwd``;
inference only).
"""
from . import ring
from .backends import BACKENDS, CPU_BACKENDS, cpu_backend, get_cpu_backend, set_cpu_backend
from .compat import flash_cosine_sim_attention, l2norm_tensors, plain_cosine_sim_attention
from .functional import cosine_sim_attention, forward
from .kvcache import OP_KVCACHE, kvcache_attention
from .ops import OP_BACKWARD, OP_FORWARD
from .ring import ring_cosine_sim_attention
from .varlen import OP_VARLEN_BACKWARD, OP_VARLEN_FORWARD, varlen_cosine_sim_attention, varlen_forward

__all__ = ["cosine_sim_attention", "forward", "OP_FORWARD", "OP_BACKWARD", "BACKENDS", "CPU_BACKENDS",
           "get_cpu_backend", "set_cpu_backend", "cpu_backend", "ring", "ring_cosine_sim_attention",
           "flash_cosine_sim_attention", "plain_cosine_sim_attention", "l2norm_tensors",
           "varlen_cosine_sim_attention", "varlen_forward", "OP_VARLEN_FORWARD", "OP_VARLEN_BACKWARD",
           "kvcache_attention", "OP_KVCACHE"]
