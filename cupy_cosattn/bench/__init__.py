"""Benchmark harness: cupy-cosattn against PyTorch's scaled_dot_product_attention and an unfused torch attention.

What is timed (docs/benchmark.md has the full method):

- ``cosattn``: ``cupy_cosattn.torch.cosine_sim_attention`` on CUDA tensors, called the way users call it
  (autograd forward, ``torch.autograd.grad`` backward);
- ``sdpa_flash``, ``sdpa_cudnn``, ``sdpa_efficient``, ``sdpa_math``: ``F.scaled_dot_product_attention``
  with one backend forced through ``torch.nn.attention.sdpa_kernel``; a backend that does not take a
  case (fp32 on flash, a mask on flash, ...) is recorded as ``skip`` with torch's reason;
- ``unfused``: matmul -> masked_fill -> softmax -> matmul in plain torch.

Every implementation gets the same pre-normalized q, k (l2-normalized over the head dim), the same v,
dout and scale. Cosine-sim attention on pre-normalized inputs is plain softmax attention with that
scale, so all of them compute the same function (checked per case against a float64 reference).

Cases: dtypes x head dims x sequence lengths x masks ('none', 'causal', 'keypad' = per-batch key
padding), with B*H chosen so that B*H*N^2 stays constant (``--work``). Each (case, implementation) is
timed for 'fwd', 'bwd' and 'fwd+bwd' with CUDA events, after warm-up, as the median of ``--repeats``
calls, rotating through enough input buffers that they do not fit in L2.

Outputs in ``--out``: ``benchmark.csv`` (one row per case, implementation and pass), ``benchmark.md``
(a pivot table) and ``benchmark.png`` (TFLOP/s against N).

Without CUDA (or with ``--smoke``) it runs a CPU SMOKE mode: tiny sizes, CPU torch implementations,
wall-clock timers. Its numbers are not performance numbers; it exists so CI runs this file end to end.

    python -m cupy_cosattn.bench --quick --out /tmp/bench      # ~1 minute on an H100
    python -m cupy_cosattn.bench --out /tmp/bench              # the full grid
    python -m cupy_cosattn.bench --smoke --out /tmp/smoke      # CPU smoke (automatic without CUDA)

Modules: ``cases`` (the grid and its inputs), ``impls`` (the implementations), ``timers``,
``runner`` (measuring one case), ``report`` (CSV, markdown, PNG, versions), ``cli`` (arguments and
the main loop), ``decode`` (the decode section, ``--decode``: KV-cache decoding against SDPA, tokens/s).
examples/benchmark.py runs :func:`cli.main`.
"""
