"""Ring attention (context parallelism) for cosine-sim attention over ``torch.distributed``.

    from cupy_cosattn.torch.ring import ring_cosine_sim_attention, shard_sequence, gather_sequence
    q_loc, k_loc, v_loc = (shard_sequence(t, group) for t in (q, k, v))      # (B, H|Hk, N/W, D) each
    out_loc = ring_cosine_sim_attention(q_loc, k_loc, v_loc, group=group, causal=True)
    gather_sequence(out_loc, group) == cosine_sim_attention(q, k, v, causal=True)  # up to rounding

Each of the W ranks of ``group`` holds a slice of the sequence: its queries, keys and values. The
key/value slices travel around the ring (rank r sends to r + 1 and receives from r - 1); at step s rank r
attends its queries to the slice of rank (r - s) mod W, through the custom op
``torch.ops.cupy_cosattn.attn_fwd`` (the fused kernels on CUDA tensors), and adds the block's (out, lse)
into its rows. The backward sends the partial dK/dV of each slice (float32) around the ring with it, and
every rank ends with the gradients of its own slice. docs/ring.md explains the steps, the zigzag
layout, the fixed-offset combine, when the ring pays, and how to launch it.

Layouts: ``"zigzag"`` (default) cuts the global sequence into 2W chunks and gives rank r chunks r and
2W-1-r, so every rank does the same causal work; ``"contiguous"`` gives rank r chunk r of W (balanced only
without causality). `shard_sequence` / `gather_sequence` / `shard_indices` implement both.

Parameter gradients (of anything upstream of q, k, v, and of a tensor scale) are each rank's share: the
ring computes the gradient of the sum of all ranks' losses, so sum the parameter gradients over the
group (an all-reduce; DDP over the group averages them, which is the gradient of the mean of the ranks'
losses, i.e. of the global mean loss when every shard holds as many tokens).
"""
from __future__ import annotations

import contextlib
import numbers
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import problem as _problem
from ..backends import backward_uses_lse
from ..launch.backward import partial_rows
from ..launch.tiles import FIXED_OFFSET_MAX_BOUND as FIXED_OFFSET_BOUNDS
from . import ops  # noqa: F401  (registers the custom ops called through torch.ops)
from .backends import BACKENDS, bridge_for, check_backend
from .checks import check
from .cpu import compute_dtype, cpu_backward
from .functional import _autocast, _autocast_available

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["ring_cosine_sim_attention", "shard_sequence", "gather_sequence", "shard_indices", "LAYOUTS"]

LAYOUTS = ("zigzag", "contiguous")
# The ring adds the blocks' partial results in float32 (float64 for float64 inputs) with the fixed
# offset scale_h * groups while every logit bound is at most this: exp(lse_i - offset) then lies in
# [exp(-2 * 40), N_local], inside float32's normal range (min 1.2e-38 = exp(-87.3)).
FIXED_OFFSET_MAX_BOUND = FIXED_OFFSET_BOUNDS["float32"]


# --------------------------------------------------------------------------------------------- layouts

def _chunks_per_rank(layout: str) -> int:
    return 2 if layout == "zigzag" else 1


def _check_layout(layout) -> None:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _padding_advice(world: int) -> str:
    return (f"pad the global sequence at its end to a multiple of {2 * world} (layout 'zigzag') or {world} "
            f"('contiguous') before sharding it. Causal attention: no real query sees a later key, so the real "
            f"rows stay exact; leave the padded rows out of the loss. Non-causal: also pass mask=False for the "
            f"padded keys (mask is the (B, N_local) shard of a (B, N) key mask)")


def shard_indices(n: int, world: int, rank: int, layout: str = "zigzag",
                  device: Optional[torch.device] = None) -> Tensor:
    """The global positions (int64, length n / world, increasing) that `rank` of `world` holds.

    "zigzag": chunks rank and 2·world-1-rank of 2·world equal chunks; "contiguous": chunk rank of world."""
    _check_layout(layout)
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}")
    parts = world * _chunks_per_rank(layout)
    if n % parts:
        raise ValueError(f"a sequence of {n} positions does not split into {parts} equal chunks "
                         f"({world} ranks, layout {layout!r}): {_padding_advice(world)}")
    c = n // parts
    if layout == "contiguous":
        return torch.arange(rank * c, (rank + 1) * c, device=device)
    return torch.cat((torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((parts - 1 - rank) * c, (parts - rank) * c, device=device)))


def shard_sequence(x: Tensor, group: Optional[ProcessGroup] = None, layout: str = "zigzag", dim: int = -2) -> Tensor:
    """This rank's shard of x (the whole sequence, the same on every rank) along `dim`: a copy holding
    the positions `shard_indices` names, e.g. (B, H, N, D) -> (B, H, N / W, D). No communication."""
    ring = _Ring.open(group)
    return x.index_select(dim, shard_indices(x.shape[dim], ring.world, ring.rank, layout, device=x.device))


def gather_sequence(x: Tensor, group: Optional[ProcessGroup] = None, layout: str = "zigzag", dim: int = -2) -> Tensor:
    """The whole sequence from every rank's shard x (equal shapes on every rank): an all-gather along
    `dim`, then the positions put back in order. The result is the same on every rank and carries no
    autograd history."""
    ring = _Ring.open(group)
    _check_layout(layout)
    x = x.detach().contiguous()
    dim = dim % x.dim()
    parts = [torch.empty_like(x, device=ring.comm_device(x.device)) for _ in range(ring.world)]
    dist.all_gather(parts, x.to(ring.comm_device(x.device)), group=ring.group)
    n = x.shape[dim] * ring.world
    order = torch.cat([shard_indices(n, ring.world, r, layout) for r in range(ring.world)])
    full = torch.cat(parts, dim=dim).to(x.device)
    return full.index_select(dim, torch.argsort(order).to(x.device))


# ------------------------------------------------------------------------------------------ the ring

# torch.distributed backends that send CPU tensors
_HOST_BACKENDS = ("gloo", "mpi", "ucc")


class _Exchange:
    """Tensors in flight to the next rank and from the previous one; `wait` returns the received ones."""

    def __init__(self, works, sent, received, device, dtypes):
        self._works, self._sent, self._received = works, sent, received
        self._device, self._dtypes = device, dtypes

    def wait(self) -> list[Tensor]:
        for w in self._works:
            w.wait()
        self._sent = None  # the sends are complete: their buffers may go
        return [r.view(dt).to(self._device) for r, dt in zip(self._received, self._dtypes)]


@dataclass(frozen=True)
class _Ring:
    """The ranks of a process group as a ring: this rank, the group size, and the neighbours' global ranks."""

    group: object
    rank: int
    world: int
    next_peer: int
    prev_peer: int
    backend: str

    @staticmethod
    def open(group) -> _Ring:
        """The ring of `group` (None: the default group). Raises before any communication when
        torch.distributed cannot serve it."""
        if not dist.is_available():
            raise RuntimeError("ring attention needs torch.distributed, which this torch build lacks")
        if not dist.is_initialized():
            raise RuntimeError("ring attention needs an initialized process group: call "
                               "torch.distributed.init_process_group (torchrun sets up its environment)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if rank < 0:
            raise ValueError("this process is not a member of `group`")

        def peer(r: int) -> int:
            return r if group is None or group is dist.group.WORLD else dist.get_global_rank(group, r)

        return _Ring(group, rank, world, peer((rank + 1) % world), peer((rank - 1) % world),
                     str(dist.get_backend(group)).lower())

    def comm_device(self, device: torch.device) -> torch.device:
        """Where tensors living on `device` travel: the device itself for CUDA tensors on an NCCL group;
        the host on a group that carries CPU tensors (gloo sends CPU tensors only, so CUDA tensors on a
        gloo group are staged through the host)."""
        if device.type == "cuda" and "nccl" in self.backend:
            return device
        if any(b in self.backend for b in _HOST_BACKENDS):
            return torch.device("cpu")
        raise ValueError(f"the process group's backend {self.backend!r} cannot carry tensors on {device}: use "
                         f"NCCL for CUDA tensors, gloo for CPU tensors")

    def descriptor_device(self) -> torch.device:
        """The device of the small all-gathered descriptors: the host, unless the group is NCCL only."""
        if any(b in self.backend for b in _HOST_BACKENDS) or "nccl" not in self.backend:
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())

    def exchange(self, tensors: Sequence[Tensor]) -> _Exchange:
        """Send `tensors` to the next rank and receive tensors of the same shapes and dtypes from the
        previous one, asynchronously (``batch_isend_irecv``). On an NCCL group the transfers run on
        NCCL's own stream, which waits for the work queued so far on the current stream; `wait` makes the
        current stream wait for them without blocking the host."""
        device = tensors[0].device
        cdev = self.comm_device(device)
        dtypes = [t.dtype for t in tensors]
        # bool travels as its bytes (not every backend maps bool)
        sent = [(t.view(torch.uint8) if t.dtype == torch.bool else t).to(cdev).contiguous() for t in tensors]
        received = [torch.empty_like(s) for s in sent]
        ops_ = [dist.P2POp(dist.isend, s, self.next_peer, self.group) for s in sent]
        ops_ += [dist.P2POp(dist.irecv, r, self.prev_peer, self.group) for r in received]
        return _Exchange(dist.batch_isend_irecv(ops_), sent, received, device, dtypes)


# ------------------------------------------------------------------- agreement of the ranks' inputs

_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool, torch.uint8, torch.int8,
                torch.int16, torch.int32, torch.int64, torch.complex64, torch.complex128)
_MAX_DIMS = 4
_NOT_A_TENSOR, _NONE = -1, -2


def _tensor_fields(t) -> list[int]:
    """ndim, the first _MAX_DIMS sizes (-1 past ndim), dtype code, device code (cpu 0, cuda 1, other 2)."""
    if t is None:
        return [_NONE] * (_MAX_DIMS + 3)
    if not isinstance(t, Tensor):
        return [_NOT_A_TENSOR] * (_MAX_DIMS + 3)
    dims = list(t.shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(t.dim(), _MAX_DIMS))
    dt = _DTYPE_CODES.index(t.dtype) if t.dtype in _DTYPE_CODES else len(_DTYPE_CODES)
    return [t.dim()] + dims + [dt, {"cpu": 0, "cuda": 1}.get(t.device.type, 2)]


def _describe_tensor(f: Sequence[int]) -> str:
    if f[0] == _NONE:
        return "None"
    if f[0] == _NOT_A_TENSOR:
        return "not a tensor"
    shape = tuple(f[1:1 + min(f[0], _MAX_DIMS)]) + (("...",) if f[0] > _MAX_DIMS else ())
    dt = _DTYPE_CODES[f[-2]] if f[-2] < len(_DTYPE_CODES) else "another dtype"
    return f"shape {shape}, {dt}, on {('cpu', 'cuda', 'another device')[f[-1]]}"


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _scale_fields(scale) -> list[int]:
    """kind (0 number, 1 tensor, 2 other), then the number's bits or the tensor's fields."""
    if isinstance(scale, Tensor):
        return [1, 0] + _tensor_fields(scale)
    if isinstance(scale, numbers.Real):
        return [0, _float_bits(scale)] + [0] * (_MAX_DIMS + 3)
    return [2, 0] + [0] * (_MAX_DIMS + 3)


def _describe_scale(f: Sequence[int]) -> str:
    if f[0] == 0:
        return repr(struct.unpack("<d", struct.pack("<q", f[1]))[0])
    return "a tensor of " + _describe_tensor(f[2:]) if f[0] == 1 else "neither a number nor a tensor"


def _code(value, choices) -> int:
    return choices.index(value) if isinstance(value, str) and value in choices else -1


def _flag(x) -> int:
    return int(x) if isinstance(x, (bool, int)) else -1


def _describe_int(f: Sequence[int]) -> str:
    return str(f[0]) if f[0] >= 0 else "an invalid value"


def _describe_choice(choices):
    return lambda f: repr(choices[f[0]]) if f[0] >= 0 else "an invalid value"


def _descriptor(q, k, v, mask, scale, causal, layout, groups, l2norm_qk, deterministic, backend, needs_grad):
    """[(name, int64 fields, describe)]: what every rank must pass alike."""
    return [("q", _tensor_fields(q), _describe_tensor), ("k", _tensor_fields(k), _describe_tensor),
            ("v", _tensor_fields(v), _describe_tensor), ("mask", _tensor_fields(mask), _describe_tensor),
            ("scale", _scale_fields(scale), _describe_scale),
            ("causal", [_flag(causal)], _describe_int),
            ("layout", [_code(layout, LAYOUTS)], _describe_choice(LAYOUTS)),
            ("groups", [groups if isinstance(groups, int) else -1], _describe_int),
            ("l2norm_qk", [_flag(l2norm_qk)], _describe_int),
            ("deterministic", [_flag(deterministic)], _describe_int),
            ("backend", [_code(backend, BACKENDS)], _describe_choice(BACKENDS)),
            ("requires_grad (whether a backward follows)", [int(needs_grad)], _describe_int)]


def _agree(ring: _Ring, desc) -> None:
    """One all-gather of every rank's descriptor; ValueError on every rank, naming the ranks and what
    differs, when they do not pass alike. Nothing else has been communicated yet."""
    flat = [x for _, fields, _ in desc for x in fields]
    mine = torch.tensor(flat, dtype=torch.int64, device=ring.descriptor_device())
    everyone = [torch.empty_like(mine) for _ in range(ring.world)]
    dist.all_gather(everyone, mine, group=ring.group)
    rows = torch.stack(everyone).cpu().tolist()
    problems, at = [], 0
    for name, fields, describe in desc:
        vals = [tuple(r[at:at + len(fields)]) for r in rows]
        at += len(fields)
        if len(set(vals)) == 1:
            continue
        ref = vals[0]
        odd = [r for r in range(ring.world) if vals[r] != ref]
        got = "; ".join(f"rank {r}: {describe(vals[r])}" for r in [0] + odd)
        problems.append(f"{name} differs between the ranks ({got})")
        if name in ("q", "k", "v", "mask") and ref[0] >= 2 and any(vals[r][0] == ref[0] for r in odd):
            # a different sequence length: N_local is dim 2 of q, k, v and dim 1 of the mask
            n_dim = 2 if name == "mask" else 3  # fields: ndim, then the sizes
            if any(vals[r][n_dim] != ref[n_dim] for r in odd):
                problems[-1] += f". N_local must be the same on every rank: {_padding_advice(ring.world)}"
    if problems:
        raise ValueError(f"ring_cosine_sim_attention (this is rank {ring.rank} of {ring.world}): "
                         + "; ".join(problems))


# ------------------------------------------------------------------------------------------- blocks

@dataclass(frozen=True)
class _Config:
    """One call's settings, the same on every rank once `_agree` passed."""

    ring: _Ring
    causal: bool
    layout: str
    scale: float  # used only without a scale tensor
    groups: int
    l2norm_qk: bool
    deterministic: bool
    backend: str
    kernel: bool  # the blocks run the op's kernel backends (else the torch CPU implementation)


def _blocks(cfg: _Config, src: int, n: int) -> list[tuple[slice, slice, bool]]:
    """(local query rows, rows of the visiting K/V slice, causal) that the queries of this rank attend
    to in the slice of rank `src`; [] when no query sees any of its keys.

    Contiguous: slice src is wholly before (src < rank: full), the same (causal), or after (skipped).
    Zigzag: this rank holds chunks (r, 2W-1-r), the visitor (s, 2W-1-s). For s < r both query chunks see
    chunk s in full and neither sees 2W-1-s > 2W-1-r; for s > r only chunk 2W-1-r sees anything: both of
    the visitor's chunks (r < s and 2W-1-s < 2W-1-r), in full. Each such block is half a full one, which
    is what balances the ranks."""
    everything = slice(0, n)
    if not cfg.causal:
        return [(everything, everything, False)]
    r = cfg.ring.rank
    if src == r:  # the rank's own chunks, in increasing global order: plain causal
        return [(everything, everything, True)]
    if cfg.layout == "contiguous":
        return [(everything, everything, False)] if src < r else []
    h = n // 2
    return [(everything, slice(0, h), False)] if src < r else [(slice(h, n), everything, False)]


class _Combine:
    """The rows' (out, lse) from partial results over key blocks.

    A block's out_i, lse_i are the softmax over its keys alone; the whole row's are
    lse = log Σ_i exp(lse_i) and out = Σ_i exp(lse_i − lse)·out_i. With normalized q, k every logit is
    at most b_h = scale_h·groups, so with the fixed offset c = b_h the weights
    l_i = exp(lse_i − c) = Σ_j exp(s_ij − c) lie in [exp(−2·b_h), N_local] (the kernels' own fixed-offset
    row sums, up to their headroom factor, which is the same for every block of a row: docs/ring.md), and
    numerators Σ_i l_i·out_i and denominators Σ_i l_i simply add, with no maximum to track or exchange and
    no rescaling. Without that bound (l2norm_qk=False, or b_h above FIXED_OFFSET_MAX_BOUND) a running
    maximum per row takes c's place. A row that sees no key of a block has lse_i = −inf and out_i = 0,
    and contributes exactly 0."""

    def __init__(self, q: Tensor, offset: Optional[Tensor]):
        B, H, N, D = q.shape
        cd = compute_dtype(q.dtype)
        self.num = torch.zeros((B, H, N, D), dtype=cd, device=q.device)
        self.den = torch.zeros((B, H, N), dtype=cd, device=q.device)
        self.fixed = offset is not None
        self.m = (offset.to(cd).view(1, H, 1).expand(B, H, N) if self.fixed
                  else torch.full((B, H, N), float("-inf"), dtype=cd, device=q.device))

    def add(self, rows: slice, out_i: Tensor, lse_i: Tensor) -> None:
        cd = self.num.dtype
        lse_i, out_i = lse_i.to(cd), out_i.to(cd)
        if self.fixed:
            w = torch.exp(lse_i - self.m[:, :, rows])
        else:
            m_new = torch.maximum(self.m[:, :, rows], lse_i)
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))  # no key seen yet
            alpha = torch.exp(self.m[:, :, rows] - m_safe)
            self.num[:, :, rows] *= alpha.unsqueeze(-1)
            self.den[:, :, rows] *= alpha
            self.m[:, :, rows] = m_new
            w = torch.exp(lse_i - m_safe)
        self.num[:, :, rows] += w.unsqueeze(-1) * out_i
        self.den[:, :, rows] += w

    def result(self) -> tuple[Tensor, Tensor]:
        """(out, lse) in the compute dtype; a row without any visible key gets out 0 and lse −inf."""
        seen = self.den > 0
        den = torch.where(seen, self.den, torch.ones_like(self.den))
        out = self.num / den.unsqueeze(-1)
        lse = torch.where(seen, self.m + torch.log(den), torch.full_like(den, float("-inf")))
        return out, lse


def _op_flags(cfg: _Config, scale_t: Optional[Tensor], causal: bool):
    """The trailing arguments of attn_fwd / attn_bwd after scale_t."""
    return (1.0 if scale_t is not None else cfg.scale, False, cfg.groups, causal, cfg.l2norm_qk,
            cfg.deterministic, cfg.backend)


def _block_forward(cfg, q, k, v, mask, scale_t, causal):
    return torch.ops.cupy_cosattn.attn_fwd(q, k, v, mask, None, scale_t, *_op_flags(cfg, scale_t, causal))


def _block_backward(cfg, dout, q, k, v, out, lse, mask, scale_t, causal):
    """(dq, dk, dv, dscale) of one block given the *whole* row's out and lse: P = exp(s − lse) and
    D = rowsum(dO∘O) are then the global ones, and the result is exactly this block's share."""
    if cfg.kernel:  # the kernels take out and lse as given; this block's keys are a share of the rows
        with partial_rows():
            dq, dk, dv, _, dscale = torch.ops.cupy_cosattn.attn_bwd(
                dout, q, k, v, out.to(q.dtype), lse.to(torch.float32), mask, None, scale_t,
                *_op_flags(cfg, scale_t, causal))
        return dq, dk, dv, dscale
    # The torch CPU op recomputes each row's softmax over the keys it is given, which is not the block's
    # share: the CPU implementation with the whole rows' statistics is.
    scale = scale_t if scale_t is not None else cfg.scale
    prob, shapes = check(q, k, v, mask, None, scale, False, cfg.groups, causal, cfg.l2norm_qk, cfg.deterministic)
    dq, dk, dv, _, dscale = cpu_backward(prob, shapes, dout, q, k, v, mask, None, scale_t, cfg.scale,
                                         stats=(out, lse))
    return dq, dk, dv, (dscale if scale_t is not None else None)


# ------------------------------------------------------------------------------- forward / backward

def _kv_slice(kv: list[Tensor], rows: slice) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    k, v = kv[0][:, :, rows], kv[1][:, :, rows]
    return k, v, (kv[2][:, rows] if len(kv) > 2 else None)


def _ring_forward(cfg: _Config, q, k, v, mask, scale_t, offset):
    """(out in the compute dtype, lse in the compute dtype) of this rank's rows."""
    ring, n = cfg.ring, q.shape[2]
    acc = _Combine(q, offset)
    kv = [k, v] + ([mask] if mask is not None else [])
    for step in range(ring.world):
        # the next slice is on its way while this one is computed
        pending = ring.exchange(kv) if step + 1 < ring.world else None
        for rows, cols, causal in _blocks(cfg, (ring.rank - step) % ring.world, n):
            kb, vb, mb = _kv_slice(kv, cols)
            out_i, lse_i = _block_forward(cfg, q[:, :, rows], kb, vb, mb, scale_t, causal)
            acc.add(rows, out_i, lse_i)
        if pending is not None:
            kv = pending.wait()
    return acc.result()


def _ring_backward(cfg: _Config, dout, q, k, v, mask, scale_t, out, lse):
    """(dq, dk, dv, dscale) of this rank's q and K/V slice and its share of dscale. The partial dK, dV of
    each slice (float32) travel around the ring with it: rank r adds its share to the partials of slice
    (r − s) mod W at step s and passes them on; after W steps they are back with their owner."""
    ring, n = cfg.ring, q.shape[2]
    cd = compute_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dscale = None if scale_t is None else torch.zeros(scale_t.shape, dtype=torch.float64, device=scale_t.device)
    kv = [k, v] + ([mask] if mask is not None else [])
    partials: Optional[_Exchange] = None

    def zeros_kv():
        return torch.zeros(k.shape, dtype=cd, device=k.device), torch.zeros(v.shape, dtype=cd, device=v.device)

    for step in range(ring.world):
        pending = ring.exchange(kv) if step + 1 < ring.world else None
        mine = None  # this rank's share of the visiting slice's dK, dV
        for rows, cols, causal in _blocks(cfg, (ring.rank - step) % ring.world, n):
            kb, vb, mb = _kv_slice(kv, cols)
            dq_i, dk_i, dv_i, ds_i = _block_backward(cfg, dout[:, :, rows], q[:, :, rows], kb, vb, out[:, :, rows],
                                                     lse[:, :, rows], mb, scale_t, causal)
            dq[:, :, rows] += dq_i
            if mine is None:
                mine = zeros_kv()
            mine[0][:, :, cols] += dk_i
            mine[1][:, :, cols] += dv_i
            if dscale is not None:
                dscale += ds_i.to(torch.float64)
        if step == 0:
            dk, dv = mine if mine is not None else zeros_kv()
        else:
            dk, dv = partials.wait()  # the visiting slice's partials, sent by the previous rank
            if mine is not None:
                dk += mine[0]
                dv += mine[1]
        if ring.world > 1:
            partials = ring.exchange([dk, dv])  # overlaps the next step's compute
        if pending is not None:
            kv = pending.wait()
    if ring.world > 1:
        dk, dv = partials.wait()
    dscale = None if dscale is None else dscale.to(scale_t.dtype)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dscale


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale_t, mask, cfg: _Config, offset):
        with _no_autocast(q.device.type):
            out_c, lse = _ring_forward(cfg, q, k, v, mask, scale_t, offset)
        out = out_c.to(q.dtype)
        # The kernels' backward reads out as they wrote it (q's dtype); the torch path keeps the
        # more exact compute-dtype copy.
        ctx.save_for_backward(q, k, v, mask, scale_t, out if cfg.kernel else out_c, lse)
        ctx.cfg = cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask, scale_t, out, lse = ctx.saved_tensors
        with _no_autocast(q.device.type):
            dq, dk, dv, dscale = _ring_backward(ctx.cfg, dout.contiguous(), q, k, v, mask, scale_t, out, lse)
        return dq, dk, dv, dscale, None, None, None


def _no_autocast(device_type: str):
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ public

def _check_local(ring, q, k, v, mask, scale, causal, layout, groups, l2norm_qk, deterministic, backend):
    """The checks that need no other rank (the same outcome on every rank once `_agree` passed)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"ring attention takes 4-D shards: {name} must be (B, {'H' if name == 'q' else 'Hk'}, "
                             f"N_local, D), got shape {tuple(t.shape)}")
    if not (k.shape[2] == v.shape[2] == q.shape[2]):
        raise ValueError(f"ring attention is self-attention over one sharded sequence: q, k, v must have the same "
                         f"N_local (dim 2), got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    _check_layout(layout)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    n = q.shape[2]
    if causal and layout == "zigzag" and n % 2:
        raise ValueError(f"layout 'zigzag' holds two equal chunks per rank, so N_local must be even, got "
                         f"q.shape[2] = {n}: {_padding_advice(ring.world)}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                             or tuple(mask.shape) != (q.shape[0], n)):
        got = f"shape {tuple(mask.shape)}, {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of shape (B, N_local) = {(q.shape[0], n)}, got {got}")
    if isinstance(scale, Tensor):
        if scale.device != q.device:
            raise ValueError(f"scale is on {scale.device}, q on {q.device}")
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float or a torch.Tensor of shape (H,), got {type(scale).__name__}")
    check(q, k, v, mask, None, scale, False, groups, causal, l2norm_qk, deterministic)
    check_backend(backend, q)
    bridge = bridge_for(q, backend)
    if bridge is not None and not backward_uses_lse(bridge.backend):
        raise ValueError(f"backend {bridge.backend!r} cannot run a ring: its backward recomputes each row's softmax "
                         f"from the keys it is given, not from the whole row's lse; use 'torch' or 'emulator'")
    if ring.world > 1:
        ring.comm_device(q.device)  # raises for a device the group cannot carry
    return bridge is not None


def _offset(scale, q: Tensor, groups: int, l2norm_qk: bool) -> Optional[Tensor]:
    """The fixed offset b_h = scale_h·groups (H,) where it bounds every logit (normalized q, k and
    b_h <= FIXED_OFFSET_MAX_BOUND), else None (running maximum)."""
    H = q.shape[1]
    cd = compute_dtype(q.dtype)
    if isinstance(scale, Tensor):
        b = scale.detach().reshape(-1).to(device=q.device, dtype=cd).expand(H) * groups
    else:
        b = torch.full((H,), float(scale) * groups, dtype=cd, device=q.device)
    if not l2norm_qk or not bool(torch.isfinite(b).all()) or float(b.max()) > FIXED_OFFSET_MAX_BOUND:
        return None
    return b


def ring_cosine_sim_attention(q: Tensor, k: Tensor, v: Tensor, *, group: Optional[ProcessGroup] = None,
                              causal: bool = False, layout: str = "zigzag",
                              scale: float | Tensor = _problem.DEFAULT_SCALE, groups: int = 1,
                              l2norm_qk: bool = True, deterministic: bool = False, mask: Optional[Tensor] = None,
                              backend: str = "auto") -> Tensor:
    """Cosine-sim attention over a sequence sharded across the ranks of `group` (forward and backward).

    q: (B, H, N_local, D), k, v: (B, Hk, N_local, D) with H % Hk == 0: this rank's shards, as
    `shard_sequence` cuts them with the same `layout`; N_local is the same on every rank. Returns this
    rank's rows of ``cosine_sim_attention(Q, K, V, causal=causal, ...)`` over the gathered sequence (shape
    and dtype of q). scale: a float, or a tensor of shape (H,) (or one element) with a gradient: every
    rank must pass the same values. causal: query i sees key j iff j <= i (global positions). layout:
    "zigzag" (balanced causal work; N_local even) or "contiguous". mask: optional bool (B, N_local), this
    rank's shard of a key mask (True = may attend): how to pad a sequence for non-causal attention.
    backend: as for `cosine_sim_attention` ("auto": kernels on CUDA tensors, the torch implementation on
    the CPU; "emulator": the kernels on the CPU); "reference" cannot run a ring.

    Every rank must call it alike: the first thing it does is one all-gather of a small int64 descriptor
    (shapes, dtypes, devices, flags, a float scale) of every rank's arguments, and a mismatch raises
    ValueError on every rank, naming the ranks and what differs, before any K/V moves. The gradients of q,
    k, v are those of this rank's shards; a tensor scale (and any parameter upstream of q, k, v) gets this
    rank's share: sum them over the group (DDP over the group averages them). Group: gloo (CPU tensors,
    or CUDA tensors staged through the host) or NCCL (CUDA tensors).
    """
    ring = _Ring.open(group)
    if isinstance(q, Tensor):
        dev = q.device.type
        if _autocast_available(dev) and torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            q, k, v = _autocast(q, dt), _autocast(k, dt), _autocast(v, dt)
    scale_t = scale if isinstance(scale, Tensor) else None
    needs_grad = torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (q, k, v, scale_t))
    _agree(ring, _descriptor(q, k, v, mask, scale, causal, layout, groups, l2norm_qk, deterministic, backend,
                             needs_grad))
    kernel = _check_local(ring, q, k, v, mask, scale, causal, layout, groups, l2norm_qk, deterministic, backend)
    offset = _offset(scale, q, groups, l2norm_qk)
    cfg = _Config(ring, causal, layout, 1.0 if scale_t is not None else float(scale), int(groups), bool(l2norm_qk),
                  bool(deterministic), backend, kernel)
    return _RingAttention.apply(q, k, v, scale_t, mask, cfg, offset)
