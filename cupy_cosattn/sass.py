"""Static SASS profile of the kernels' main loops: what one iteration costs, read from the machine code.

    python -m cupy_cosattn.sass [--arch sm_80 sm_90 sm_90a] [--kernels REGEX] [--markdown] [--listing]
                                [--jobs N]

No GPU is needed. For each kernel of :data:`PROFILED_KERNELS` (the instantiation the launch layer
picks for a representative problem, :data:`REP_B` etc.) and each architecture, NVRTC compiles the
kernel, ``nvdisasm`` (pip: ``nvidia-cuda-nvdisasm``) disassembles the cubin, and (sass_cfg.py holds
steps 1-3):

1. **Control-flow graph and natural loops** of the kernel (back edges of the dominator tree).
2. **Parameters.** The kernel's parameter struct for the representative problem (no mask, no bias,
   not causal, long sequences; bwd_dkdv in the default fast mode) and its block size are constants;
   propagating them through the integer and predicate instructions removes the branches that
   problem never takes (optional inputs, modes), and marks the instructions they predicate off.
3. **Main loop.** The loop with the most tensor-core instructions (HMMA/HGMMA, static count over its
   blocks); among those with as many, the one with the fewest instructions, i.e. the innermost. For
   the kernels here that is the loop over key tiles (forward, bwd_dq) or query tiles (bwd_dkdv): the
   loops around it (over (batch, head) beyond the grid) hold the same tensor instructions plus the
   per-block work, the loops inside it fewer.
4. **Common path** (:func:`common_path`). Loops nested in the main loop count as one node each,
   costing their own common path times their trip count (sass_cfg.trip_count: exact for a counter
   that starts at a constant; a counter starting at a run-time value such as a thread or warp index
   is taken to start at 0, the first thread's count, and reported; an unknown count counts once and
   is reported). On the resulting acyclic graph, among the paths from the loop header to a block
   that branches back to it, the common path has (a) the most tensor-core instructions, then (b) the
   most global-memory instructions not predicated off by the parameters, then (c) the fewest
   instructions. (a) excludes skipped tiles; (b) keeps the prefetch of the next tile (only the last
   iteration skips it) and the per-element stores and atomics behind bounds checks (a full tile
   passes them); (c) drops the per-element mask / bounds / causal checks around exponentials (longer,
   and the same mma), the first iteration's one-off work (Q fragments loaded on it == 0), and warps
   that sit out work shared by a subset of them. That is the no-mask, full-tile, middle iteration.
   Predicated instructions on the path are counted: they issue whether their guard holds or not.
5. **Report.** Registers and static shared memory (ptxas), dynamic shared memory (the launch
   layer's request), blocks per SM (:func:`blocks_per_sm`), instructions per class on the common
   path (:data:`OPCODE_CLASSES`), instructions and LDSM per tensor instruction, and a throughput
   model per SM (:func:`model`, :class:`ArchModel`): a model from published peak rates, not a
   measurement.

Counts are per warp and per iteration of the main loop.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from .sass_cfg import (  # noqa: F401 (re-exported)
    BLOCK_DIM_CBANK,
    CFG,
    Function,
    Instr,
    Loop,
    SassError,
    TripCount,
    build_cfg,
    dominators,
    find_loops,
    is_jump,
    parse_sass,
    propagate,
    rpo,
    trip_count,
)

# ---------------------------------------------------------------------------------------------------
# Opcode classes.

# Per-class base opcodes (the part before the first '.'); anything else counts as "other".
OPCODE_CLASSES = {
    "tensor": {"HMMA", "HGMMA", "IMMA", "DMMA", "BMMA"},
    "ldsm": {"LDSM"},
    "global": {"LDGSTS", "LDG", "STG", "RED", "REDG", "ATOM", "ATOMG", "LD", "ST", "UBLKCP", "UTMALDG", "UTMASTG",
               "UTMAPF", "UBLKPF", "CCTL"},
    "shared": {"LDS", "STS", "ATOMS", "STSM"},
    "mufu": {"MUFU"},
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "FCHK", "FSWZADD", "FADD32I", "FMUL32I", "FFMA32I",
             "HADD2", "HMUL2", "HFMA2", "HMNMX2"},
    "cvt": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND", "I2I", "I2IP"},
    "int": {"IADD3", "IADD", "IMAD", "IMUL", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "IABS", "IMNMX", "VIMNMX",
            "VIADD", "VIADDMNMX", "SEL", "MOV", "MOV32I", "PRMT", "SGXT", "BMSK", "FLO", "POPC", "BREV", "CS2R",
            "UIADD3", "UIMAD", "ULEA", "USHF", "ULOP3", "USEL", "UMOV", "UPRMT", "USGXT", "UFLO", "UPOPC", "UBREV",
            "UBMSK", "ULOP"},
    "pred": {"ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "PSETP", "UISETP", "UPLOP3", "UPSETP", "P2R", "R2P"},
    "control": {"BRA", "BRX", "JMP", "JMX", "CALL", "RET", "EXIT", "BSSY", "BSYNC", "BREAK", "BMOV", "WARPSYNC",
                "YIELD", "KILL", "NANOSLEEP", "BPT"},
    "barrier": {"BAR", "DEPBAR", "LDGDEPBAR", "MEMBAR", "ERRBAR", "ARRIVES", "SYNCS", "WARPGROUP", "FENCE"},
    "shuffle": {"SHFL", "VOTE", "VOTEU", "MATCH", "REDUX"},
}
CLASS_LABELS = {"tensor": "HMMA/HGMMA", "ldsm": "LDSM", "global": "LDGSTS/LDG/STG/RED/ATOM", "shared": "LDS/STS",
                "mufu": "MUFU", "fp32": "FADD/FMUL/FFMA/FMNMX/FSEL, HADD2/HFMA2...", "cvt": "F2F/F2FP/I2F/F2I...",
                "int": "IADD3/IMAD/LEA/SHF/LOP3/MOV/SEL/PRMT/CS2R and uniform forms",
                "pred": "ISETP/FSETP/PLOP3/P2R...", "control": "BRA/BSSY/BSYNC/WARPSYNC/CALL/YIELD...",
                "barrier": "BAR/DEPBAR/LDGDEPBAR...", "shuffle": "SHFL/VOTE...", "other": "S2R/LDC/ULDC/NOP..."}
_CLASS_OF = {op: c for c, ops in OPCODE_CLASSES.items() for op in ops}


def opcode_class(ins: Instr) -> str:
    return _CLASS_OF.get(ins.base, "other")


@dataclass
class Cost:
    """What a stretch of code costs one warp: instructions per class, tensor-core multiply-adds by
    operand type, shared-memory bytes moved (ldmatrix, shared loads/stores, the shared side of
    cp.async), MUFU operations, and its listing [(multiplicity, Instr)]."""

    classes: Counter = field(default_factory=Counter)
    opcodes: Counter = field(default_factory=Counter)
    tensor_fma: Counter = field(default_factory=Counter)  # (opcode, operand type) -> multiply-adds per warp
    smem_bytes: float = 0.0
    live_global: float = 0.0  # global-memory instructions not predicated off by the parameters
    calls: float = 0.0
    listing: list = field(default_factory=list)
    loops: list = field(default_factory=list)  # [(header offset, TripCount)] of nested loops on the path

    @property
    def instructions(self) -> float:
        return sum(self.classes.values())

    @property
    def tensor(self) -> float:
        return self.classes["tensor"]

    def add(self, other: Cost, times: float = 1) -> None:
        for k, v in other.classes.items():
            self.classes[k] += v * times
        for k, v in other.opcodes.items():
            self.opcodes[k] += v * times
        for k, v in other.tensor_fma.items():
            self.tensor_fma[k] += v * times
        self.smem_bytes += other.smem_bytes * times
        self.live_global += other.live_global * times
        self.calls += other.calls * times
        self.listing += [(m * times, x) for m, x in other.listing]
        self.loops += other.loops

    def key(self) -> tuple:
        """The common-path order: most tensor instructions, then most global-memory instructions,
        then fewest instructions."""
        return (self.tensor, self.live_global, -self.instructions)


_MMA_SHAPE = re.compile(r"^(16)(8)(\d+)$")
_HGMMA_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def tensor_work(ins: Instr) -> Optional[tuple]:
    """(operand type, multiply-adds per warp) of a tensor-core instruction: HMMA.16816 is 16*8*16;
    the operand type is tf32/bf16/f16 from the modifiers. An HGMMA (warpgroup, m64) is split over
    its 4 warps."""
    parts = ins.opcode.split(".")
    if "TF32" in parts:
        typ = "tf32"
    elif "BF16" in parts:
        typ = "bf16"
    else:
        typ = "f16" if ins.base in ("HMMA", "HGMMA") else ins.base.lower()
    if ins.base == "HMMA":
        m = next((_MMA_SHAPE.match(p) for p in parts[1:] if _MMA_SHAPE.match(p)), None)
        if m:
            return typ, int(m.group(1)) * int(m.group(2)) * int(m.group(3))
    if ins.base == "HGMMA":
        m = next((_HGMMA_SHAPE.match(p) for p in parts[1:] if _HGMMA_SHAPE.match(p)), None)
        if m:
            return typ, int(m.group(1)) * int(m.group(2)) * int(m.group(3)) // 4
    return None


SMEM_WAVEFRONT = 128  # bytes: 32 banks x 4 bytes served per clock (conflict-free)


def smem_bytes(ins: Instr) -> int:
    """Shared-memory bytes a warp instruction moves, counted in whole 128-byte wavefronts (no bank
    conflicts assumed): ldmatrix .x1/.x2/.x4 = 1/2/4 wavefronts (8x8 b16 matrices), LDS/STS by
    access width, cp.async's shared-memory write by its width."""
    parts = ins.opcode.split(".")
    if ins.base == "LDSM" or ins.base == "STSM":
        n = next((int(p) for p in parts[1:] if p in ("2", "4")), 1)
        return n * SMEM_WAVEFRONT
    if ins.base in ("LDS", "STS", "ATOMS", "LDGSTS"):
        width = next((int(p) for p in parts[1:] if p in ("64", "128")), 32)
        return max(1, 32 * width // 8 // SMEM_WAVEFRONT) * SMEM_WAVEFRONT
    return 0


def block_cost(instrs: list, dead: tuple = ()) -> Cost:
    """Cost of a straight run of instructions; `dead`: flags of those known predicated off."""
    c = Cost()
    for k, x in enumerate(instrs):
        c.live_global += opcode_class(x) == "global" and not (dead and dead[k])
        c.classes[opcode_class(x)] += 1
        c.opcodes[x.base] += 1
        tw = tensor_work(x)
        if tw:
            c.tensor_fma[(x.base, tw[0])] += tw[1]
        c.smem_bytes += smem_bytes(x)
        c.calls += x.base == "CALL" and not is_jump(x)
        c.listing.append((1, x))
    return c


# ---------------------------------------------------------------------------------------------------
# The main loop and its common path.


@dataclass
class LoopPath:
    """The common path of one loop iteration: its cost, nested loops expanded by their trip counts
    (``cost.loops`` lists them)."""

    loop: Loop
    cost: Cost


def common_path(cfg: CFG, idom: list, loops: list, index: int) -> LoopPath:
    """The common path of loops[index] (module docstring, point 4). `idom`: dominators(cfg)."""
    L = loops[index]
    position = {b: i for i, b in enumerate(rpo(cfg))}
    node_of = {b: ("b", b) for b in L.body}
    for ci in L.children:
        for b in loops[ci].body:
            node_of[b] = ("l", ci)
    node_cost = {}
    for b in L.body:
        if node_of[b][0] == "b":
            lo, hi = cfg.blocks[b]
            node_cost[node_of[b]] = block_cost(cfg.instrs(b), tuple(i in cfg.dead for i in range(lo, hi)))
    for ci in L.children:
        C = loops[ci]
        tc = trip_count(cfg, idom, C)
        c = Cost(loops=[(cfg.func.instrs[cfg.blocks[C.header][0]].offset, tc)])
        c.add(common_path(cfg, idom, loops, ci).cost, tc.value if tc.value is not None else 1)
        node_cost[("l", ci)] = c

    def order(n):
        return position[n[1] if n[0] == "b" else loops[n[1]].header]

    succ = {n: set() for n in node_cost}
    latches = set()
    for b in L.body:
        for s in cfg.succ[b]:
            if s == L.header:
                latches.add(node_of[b])
            elif s in L.body and node_of[s] != node_of[b]:
                succ[node_of[b]].add(node_of[s])
    # best path from the header to each node, in topological (reverse postorder) order
    start = node_of[L.header]
    best = {start: node_cost[start]}
    for n in sorted(node_cost, key=order):
        if n not in best:
            continue
        for m in sorted(succ[n], key=order):
            cand = Cost()
            cand.add(best[n])
            cand.add(node_cost[m])
            if m not in best or cand.key() > best[m].key():
                best[m] = cand
    ends = [best[n] for n in latches if n in best]
    if not ends:
        raise SassError(f"{cfg.func.name}: no path from the loop header back to it")
    return LoopPath(L, max(ends, key=Cost.key))


def main_loop(cfg: CFG, loops: list) -> int:
    """Index of the main loop (module docstring, point 3)."""
    if not loops:
        raise SassError(f"{cfg.func.name}: no loop")

    def score(i):
        ins = [x for b in loops[i].body for x in cfg.instrs(b)]
        return (sum(opcode_class(x) == "tensor" for x in ins), -len(ins))

    return max(range(len(loops)), key=score)


@dataclass
class Analysis:
    """Everything the report shows of one function's main loop."""

    function: str
    path: LoopPath
    header_offset: int
    n_loops: int


def analyze(func: Function, cbank: Optional[dict] = None) -> Analysis:
    """Main loop and common path of one function, after the branches that the constant bank `cbank`
    ({byte offset: 32-bit word}; see :func:`constant_bank`) decides are pruned. Raises SassError when
    the function has no loop or irreducible control flow."""
    cfg = build_cfg(func)
    if cbank:
        cfg = propagate(cfg, cbank)
    idom = dominators(cfg)
    loops = find_loops(cfg)
    i = main_loop(cfg, loops)
    path = common_path(cfg, idom, loops, i)
    return Analysis(func.name, path, func.instrs[cfg.blocks[loops[i].header][0]].offset, len(loops))


# ---------------------------------------------------------------------------------------------------
# Architectures: occupancy limits and the throughput model's rates.


@dataclass(frozen=True)
class ArchModel:
    """Per-architecture constants. Sources:

    - limits: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" (resident
      blocks, threads and 32-bit registers per SM, shared memory per SM and per block) and "Shared
      Memory" of compute capability 8.x / 9.0 (1 KB of shared memory reserved per block);
    - register allocation: registers are allocated per warp in units of REG_ALLOC_UNIT and each warp's
      registers come from one of SUB_PARTITIONS equal register files (the CUDA occupancy calculator,
      cuda_occupancy.h);
    - tensor rates, dense multiply-adds per clock per SM sub-partition (one tensor core each): A100
      whitepaper ("NVIDIA A100 Tensor Core GPU Architecture", 2020: 256 FP16/BF16 FMA per clock per
      tensor core, TF32 half of that) and H100 whitepaper ("NVIDIA H100 Tensor Core GPU
      Architecture", 2022: twice A100's per SM clock for clock, i.e. 512 FP16/BF16) for wgmma
      (HGMMA). For mma.sync (HMMA) on sm_90 the model assumes 2/3 of the wgmma rate, the
      ~660 of 989 dense fp16 TFLOP/s that docs/kernels.md uses for an H100 SXM: an assumption, not a
      measurement made here;
    - shared memory: 32 banks of 4 bytes per clock per SM (CUDA C++ Programming Guide, "Shared
      Memory"), i.e. one 128-byte wavefront per clock;
    - issue: one warp instruction per clock per sub-partition (4 schedulers per SM, A100/H100
      whitepapers);
    - MUFU: 16 results per clock per SM for ex2/rcp/lg2/rsqrt/sin/cos (CUDA C++ Programming Guide,
      "Arithmetic Instructions" throughput table, compute capability 8.0 and 9.0).
    """

    name: str
    param_base: int  # constant-bank offset of the kernel parameters
    max_blocks_per_sm: int
    max_threads_per_sm: int
    regs_per_sm: int
    regs_per_block: int
    smem_per_sm: int  # bytes, largest carve-out
    smem_per_block: int  # bytes, largest opt-in (static + dynamic)
    hmma_fma_per_clk: dict  # operand type -> dense FMA per clock per sub-partition, mma.sync
    hgmma_fma_per_clk: dict  # likewise for wgmma (empty: no HGMMA on this architecture)
    sub_partitions: int = 4
    reg_alloc_unit: int = 256
    smem_reserved_per_block: int = 1024
    smem_alloc_unit: int = 128
    smem_bytes_per_clk: int = 128
    issue_per_clk: int = 1  # per sub-partition
    mufu_per_clk: int = 16  # per SM


_A100_TC = {"f16": 256, "bf16": 256, "tf32": 128}
_H100_TC = {"f16": 512, "bf16": 512, "tf32": 256}
SM90_HMMA_FRACTION = 2 / 3  # mma.sync on sm_90 relative to wgmma (see ArchModel)
ARCHS = {
    "sm_80": ArchModel("sm_80", 0x160, 32, 2048, 65536, 65536, 164 * 1024, 163 * 1024, _A100_TC, {}),
    "sm_90": ArchModel("sm_90", 0x210, 32, 2048, 65536, 65536, 228 * 1024, 227 * 1024,
                       {k: v * SM90_HMMA_FRACTION for k, v in _H100_TC.items()}, {}),
}
# sm_90a: sm_90 plus the architecture-specific instructions (wgmma); HGMMA at the whitepaper rate.
ARCHS["sm_90a"] = dataclasses.replace(ARCHS["sm_90"], name="sm_90a", hgmma_fma_per_clk=dict(_H100_TC))


def arch_model(arch: str) -> ArchModel:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


def blocks_per_sm(arch: str, regs: int, threads: int, smem: int) -> tuple:
    """(resident blocks per SM, what limits it: 'registers' | 'shared memory' | 'threads' | 'blocks')
    for a kernel of `regs` registers per thread, `threads` per block and `smem` bytes of shared memory
    per block (static + dynamic)."""
    a = arch_model(arch)
    warps = -(-threads // 32)
    per_warp = -(-max(regs, 1) * 32 // a.reg_alloc_unit) * a.reg_alloc_unit
    if per_warp * warps > a.regs_per_block:
        by_regs = 0
    else:
        by_regs = (a.regs_per_sm // a.sub_partitions // per_warp) * a.sub_partitions // warps
    need = -(-(smem + a.smem_reserved_per_block) // a.smem_alloc_unit) * a.smem_alloc_unit
    by_smem = a.smem_per_sm // need if smem <= a.smem_per_block else 0
    limits = {"registers": by_regs, "shared memory": by_smem, "threads": a.max_threads_per_sm // (32 * warps),
              "blocks": a.max_blocks_per_sm}
    name = min(limits, key=lambda k: limits[k])
    return limits[name], name


@dataclass(frozen=True)
class Model:
    """Cycles on one SM for one main-loop iteration of one block (all its warps on the common path),
    per resource, if that resource alone limited it. A model from peak rates (ArchModel), assuming no
    bank conflicts, no latency stalls and enough resident warps: the bound is a ceiling, not a
    prediction. The shared-memory column counts what the SM's load/store path moves (LDSM, LDS/STS,
    the shared side of LDGSTS); the operands an HGMMA reads from shared memory through its
    descriptors are not in it."""

    tensor: float
    smem: float
    issue: float
    mufu: float

    @property
    def bound(self) -> str:
        return max(("tensor", "smem", "issue", "mufu"), key=lambda k: getattr(self, k))

    @property
    def cycles(self) -> float:
        return getattr(self, self.bound)

    @property
    def tensor_share(self) -> float:
        """Tensor-core busy fraction at the bound (1.0: tensor-bound)."""
        return self.tensor / self.cycles if self.cycles else 0.0


def model(arch: str, cost: Cost, warps: int) -> Model:
    """The throughput model of one block iteration: `warps` warps each running `cost`, spread over
    the SM's sub-partitions (each with its tensor core and scheduler), sharing its shared-memory
    bandwidth and MUFU units."""
    a = arch_model(arch)
    tensor = 0.0
    for (op, typ), fma in cost.tensor_fma.items():
        rate = (a.hgmma_fma_per_clk if op == "HGMMA" else a.hmma_fma_per_clk).get(typ)
        if rate is None:
            raise SassError(f"no {op} rate for operand type {typ!r} on {arch} in the model")
        tensor += fma / rate
    # warps spread over the sub-partitions: per-warp tensor and issue time / sub-partitions
    sp = a.sub_partitions
    return Model(tensor=warps * tensor / sp,
                 smem=warps * cost.smem_bytes / a.smem_bytes_per_clk,
                 issue=warps * cost.instructions / (a.issue_per_clk * sp),
                 mufu=warps * cost.classes["mufu"] * 32 / a.mufu_per_clk)


# ---------------------------------------------------------------------------------------------------
# The launch layer. Everything this module takes from it is in this section: which instantiation the
# dispatch picks for a representative problem on an architecture, its block size and dynamic shared
# memory, and the parameter record it would be launched with.

from .launch import dispatch as _dispatch  # noqa: E402  (kept next to the code that uses it)
from .launch import params as _params  # noqa: E402
from .launch import registry as _registry  # noqa: E402
from .launch import sm90 as _sm90  # noqa: E402
from .launch import sources as _sources  # noqa: E402
from .launch.limits import SMEM_OPTIN_BY_ARCH, DeviceCaps, cdiv  # noqa: E402
from .launch.tiles import nq_padded  # noqa: E402
from .problem import Problem  # noqa: E402

# The representative problem: no mask, no bias, not causal, q and k normalized here (so the forward
# takes the fixed-offset path unless the kind asks for the running max), long sequences (every tile
# full), enough (batch, head) pairs that the backward needs no query-head split.
REP_B, REP_H, REP_N = 4, 16, 4096
_FAKE_PTR = 0x7F00_0000_0000  # non-null, 256-byte aligned device addresses for the required tensors
_SM_COUNT = 132  # SMs of the representative device (enough blocks either way: no head split)
# A scale whose bound exceeds every dtype's fixed-offset limit: the dispatch then picks the running max.
_RUNNING_MAX_SCALE = 100.0


@dataclass(frozen=True)
class Instantiation:
    """What the launch layer runs: source file, NVRTC name expression, threads per block, dynamic
    shared memory, and the bytes of its parameter struct for the representative problem."""

    source: str
    name: str
    threads: int
    smem: int
    params: bytes
    loop_warps: int = 0  # warps that run the main loop (warp-specialized kernels); 0: all of the block's


def _choice(kind: str, dtype: str, D: int, arch: str, scale: float = 8.0, bias: bool = False,
            varlen: bool = False, pick: Optional[Callable] = None) -> Optional[_dispatch.KernelChoice]:
    """What the dispatch (launch.select, or `pick`(prob, caps, scale) for the forward) picks for the
    representative problem (with a full bias when `bias`; as a packed batch of REP_B sequences of REP_N
    with `varlen`) on `arch`; SassError when that instantiation is missing from the registry."""
    import numpy as np

    from .problem import BIAS_FULL, BIAS_NONE

    caps = DeviceCaps((int(arch[3]), int(arch[4])), SMEM_OPTIN_BY_ARCH[arch.rstrip("a")], _SM_COUNT)
    prob = Problem(B=REP_B, H=REP_H, Hk=REP_H, Nq=REP_N, Nk=REP_N, D=D, dtype=_dtype(dtype),
                   deterministic=kind == _dispatch.DQ, bias_layout=BIAS_FULL if bias else BIAS_NONE, varlen=varlen,
                   total_q=REP_B * REP_N if varlen else 0, total_k=REP_B * REP_N if varlen else 0)
    scales = np.full((REP_H,), scale)
    choice = _dispatch.select(prob, caps, kind, scale=scales) if pick is None else pick(prob, caps, scales)
    if choice is None:
        return None
    spec = choice.spec
    if (spec.source, spec.name) not in {(s.source, s.name) for s in _registry.kernel_registry()}:
        raise SassError(f"{spec.source}: {spec.name} is picked by the dispatch but missing from the registry")
    return choice


def _dtype(name: str):
    import numpy as np

    from .problem import BFLOAT16

    return BFLOAT16 if name == "bfloat16" else np.dtype(name)


def _ptrs(names: tuple, null: tuple = ()) -> dict:
    """Pointer fields: distinct non-null fake addresses, 0 for the optional inputs in `null`."""
    return {n: 0 if n in null else _FAKE_PTR + (i << 32) for i, n in enumerate(names)}


def _strides(tensors: tuple, dp: int, varlen: bool) -> dict:
    """(batch, head, row) strides of rows of dp elements: (B, H, N, dp), or packed (B N, H, dp)."""
    H, N = REP_H, REP_N
    s = (0, dp, H * dp) if varlen else (H * N * dp, N * dp, dp)
    return {f"{t}_s{d}": x for t in tensors for d, x in zip("bhn", s)}


def _seqlens(varlen: bool) -> tuple:
    """The cu_seqlens pointer fields: fake addresses of a packed batch, else null."""
    return () if varlen else ("cu_seqlens_q", "cu_seqlens_k")


def _fwd_record(dp: int, bn: int, varlen: bool = False, bias: bool = False) -> Any:
    """The FwdParams record of the representative problem (padded head dim dp, key tile bn; a full bias
    of q's dtype with `bias`)."""
    B, H, N = REP_B, REP_H, REP_N
    return _params.make_record(
        _params.FWD_PARAMS, **_ptrs(("q", "k", "v", "o", "lse", "scale", "mask", "tile_any", "bias", "cu_seqlens_q",
                                     "cu_seqlens_k"),
                                    null=("mask", "tile_any") + (() if bias else ("bias",)) + _seqlens(varlen)),
        **_strides(("q", "k", "v", "o"), dp, varlen),
        lse_sb=0 if varlen else H * N, lse_sh=B * N if varlen else N, bias_sb=H * N * N if bias else 0,
        bias_sh=N * N if bias else 0, bias_sq=N if bias else 0, mask_sb=0,
        tile_any_sb=0, B=B, H=H, Hk=H, Nq=N, Nk=N, D=dp, causal=0, bias_f32=0, n_key_tiles=cdiv(N, bn), groups=1)


def _fwd(dtype: str, D: int, arch: str, running_max: bool, bias: bool = False, varlen: bool = False) -> Instantiation:
    """forward.cu attn_fwd on every architecture (on sm_90 the dispatch runs the Hopper forward where
    it covers the problem: kind fwd_sm90): fixed offset, running max (a scale beyond the fixed-offset
    bound), or with a full bias of q's dtype (`bias`, the running max with a bias)."""
    choice = _choice(_dispatch.FORWARD, dtype, D, arch, _RUNNING_MAX_SCALE if running_max else 8.0, bias, varlen,
                     pick=_dispatch.portable_forward)
    spec = choice.spec
    rec = _fwd_record(_dp_of(choice), choice.tile, varlen, bias)
    return Instantiation(spec.source, spec.name, spec.threads, spec.smem, rec.tobytes())


def _dp_of(choice: _dispatch.KernelChoice) -> int:
    """The padded head dim of an instantiation: its second template argument."""
    return int(choice.spec.name.split("<", 1)[1].rstrip(">").split(",")[1])


def _fwd_sm90(dtype: str, D: int, arch: str, running_max: bool) -> Optional[Instantiation]:
    """The Hopper forward, where the dispatch picks it (sm_90a; None elsewhere): its argument is the
    tensor maps (opaque to the profile) and the forward's record; only its consumer warps run the main
    loop."""
    if arch != _sm90.ARCH:
        return None
    choice = _choice(_dispatch.FORWARD, dtype, D, arch, _RUNNING_MAX_SCALE if running_max else 8.0,
                     pick=_dispatch.hopper_forward)
    if choice is None:
        return None
    spec, dp = choice.spec, _dp_of(choice)
    rec = _fwd_record(dp, choice.tile)
    layout = _sm90.args_dtype(_params.FWD_PARAMS)
    head = layout.fields["p"][1]  # the four tensor maps: zero bytes here
    params = (bytes(head) + rec.tobytes()).ljust(layout.itemsize, b"\0")
    return Instantiation(spec.source, spec.name, spec.threads, spec.smem, params, loop_warps=_sm90.CONSUMER_WARPS)


def _bwd(kind: str, dtype: str, D: int, arch: str, varlen: bool = False) -> Instantiation:
    """bwd_dkdv in the default (fast) mode, bwd_dq in deterministic mode (the only one it runs in)."""
    choice = _choice(_dispatch.DKDV if kind == "dkdv" else _dispatch.DQ, dtype, D, arch, varlen=varlen)
    spec, dp = choice.spec, _dp_of(choice)
    B, H, N = REP_B, REP_H, REP_N
    strides = _strides(("q", "k", "v", "o", "do", "dq", "dkv"), dp, varlen)
    rec = _params.make_record(
        _params.BWD_PARAMS, **_ptrs(("q", "k", "v", "o", "dout", "lse", "lse2", "dvec", "scale", "mask", "tile_any",
                                     "bias", "dbias", "dq", "dk", "dv", "dscale_rows", "cu_seqlens_q",
                                     "cu_seqlens_k"),
                                    null=("mask", "tile_any", "bias", "dbias", "dscale_rows") + _seqlens(varlen)),
        **strides, lse_sb=0 if varlen else H * N, lse_sh=B * N if varlen else N, bias_sb=0, bias_sh=0, bias_sq=0,
        dbias_sb=0, dbias_sh=0, dbias_sq=0,
        mask_sb=0, tile_any_sb=0, n_y=B * H, B=B, H=H, Hk=H, Nq=N, Nk=N, D=dp, nq_pad=nq_padded(N), causal=0,
        bias_f32=0, dbias_mode=_params.DBIAS_NONE, dbias_f32=0, dq_atomic=int(kind == "dkdv"), dk_f32=1, dv_f32=0,
        nsplit=choice.nsplit, heads_per_split=H // choice.nsplit if kind == "dkdv" else 1,
        n_chunks=choice.n_chunks, dscale_stats=0)
    return Instantiation(spec.source, spec.name, spec.threads, spec.smem, rec.tobytes())


# The representative decode problem: single-token decoding with GQA 8:1 (H = 64 query heads on Hk = 8
# kv heads: 8 rows per block, the WM = 1 shape), a paged cache of 16-slot pages (the shift path of the
# slot lookup), on-the-fly key normalization, causal, the fixed offset, and the key range split.
REP_DECODE_B, REP_DECODE_H, REP_DECODE_HK, REP_DECODE_N, REP_DECODE_PAGE, REP_DECODE_SPLITS = 8, 64, 8, 32768, 16, 2


def _decode(dtype: str, D: int, arch: str) -> Instantiation:
    """decode_fwd (fixed offset) as the dispatch picks it for the representative decode problem."""
    import numpy as np

    from .kvcache import KVCacheProblem

    B, H, Hk, N, ps = REP_DECODE_B, REP_DECODE_H, REP_DECODE_HK, REP_DECODE_N, REP_DECODE_PAGE
    pages = N // ps
    caps = DeviceCaps((int(arch[3]), int(arch[4])), SMEM_OPTIN_BY_ARCH[arch.rstrip("a")], _SM_COUNT)
    prob = KVCacheProblem(B=B, H=H, Hk=Hk, Nq=1, D=D, dtype=_dtype(dtype), paged=True, page_size=ps,
                          num_pages=B * pages, max_pages=pages, append=True, causal=True,
                          num_splits=REP_DECODE_SPLITS, max_len=N)
    choice = _dispatch.select(prob, caps, _dispatch.DECODE, scale=np.full((H,), 8.0))
    spec = choice.spec
    if (spec.source, spec.name) not in {(x.source, x.name) for x in _registry.kernel_registry()}:
        raise SassError(f"{spec.source}: {spec.name} is picked by the dispatch but missing from the registry")
    rec = _params.make_record(
        _params.DECODE_PARAMS, **_ptrs(("q", "k", "v", "k_new", "v_new", "seqlens", "block_table", "scale", "o",
                                        "lse", "opart", "lpart", "mpart"), null=("k_new", "v_new", "o", "mpart")),
        q_sn=D, k_sp=Hk * ps * D, k_sh=ps * D, k_sn=D, v_sp=Hk * ps * D, v_sh=ps * D, v_sn=D, o_sn=D, bt_sb=pages,
        part_rows=B * H, B=B, H=H, Hk=Hk, Nq=1, D=D, new_keys=1, page_size=ps, page_shift=ps.bit_length() - 1,
        num_splits=choice.nsplit, n_row_tiles=choice.grid[0] // choice.nsplit, causal=1, groups=1, norm_qk=1)
    return Instantiation(spec.source, spec.name, spec.threads, spec.smem, rec.tobytes())


def _module_group(source: str, name: str) -> tuple:
    return _registry.module_group(source, name)


def _load_source(source: str) -> str:
    return _sources.load_source(source)


def _compile_options() -> tuple:
    return tuple(_sources.compile_options())


# kind -> (dtype, head dim, arch) -> the instantiation the dispatch picks. A new kernel family (sm_90a
# Hopper, varlen, decode) adds one resolver here and its kind to PROFILED_KERNELS.
KINDS: dict = {
    "fwd": lambda dt, D, arch: _fwd(dt, D, arch, running_max=False),
    "fwd_rm": lambda dt, D, arch: _fwd(dt, D, arch, running_max=True),
    "fwd_bias": lambda dt, D, arch: _fwd(dt, D, arch, running_max=True, bias=True),
    "bwd_dkdv": lambda dt, D, arch: _bwd("dkdv", dt, D, arch),
    "bwd_dq": lambda dt, D, arch: _bwd("dq", dt, D, arch),
    # packed batches (cu_seqlens): the VARLEN instantiations, 16-bit dtypes only (registry.VARLEN_DTYPES)
    "fwd_varlen": lambda dt, D, arch: _fwd(dt, D, arch, running_max=False, varlen=True),
    "bwd_dkdv_varlen": lambda dt, D, arch: _bwd("dkdv", dt, D, arch, varlen=True),
    "bwd_dq_varlen": lambda dt, D, arch: _bwd("dq", dt, D, arch, varlen=True),
    "decode": _decode,
    "fwd_sm90": lambda dt, D, arch: _fwd_sm90(dt, D, arch, running_max=False),
    "fwd_sm90_rm": lambda dt, D, arch: _fwd_sm90(dt, D, arch, running_max=True),
}
KIND_LABELS = {"fwd": "forward, fixed offset", "fwd_rm": "forward, running max",
               "fwd_bias": "forward, running max with a bias", "bwd_dkdv": "bwd_dkdv (fast mode)",
               "bwd_dq": "bwd_dq (deterministic mode)", "fwd_varlen": "forward, fixed offset, packed batch",
               "bwd_dkdv_varlen": "bwd_dkdv (fast mode), packed batch",
               "bwd_dq_varlen": "bwd_dq (deterministic mode), packed batch",
               "decode": "decode_fwd (KV cache, GQA 8:1 single-token, paged, fixed offset)",
               "fwd_sm90": "Hopper forward (hopper_fwd.cu), fixed offset", "fwd_sm90_rm": "Hopper forward, running max"}
DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@dataclass(frozen=True)
class Profiled:
    """One row of the profile: a kernel kind of KINDS, a dtype and a head dim."""

    kind: str
    dtype: str
    head_dim: int

    @property
    def label(self) -> str:
        return f"{self.kind} {DTYPE_SHORT[self.dtype]} D={self.head_dim}"

    def resolve(self, arch: str) -> Optional[Instantiation]:
        """The instantiation on `arch`, or None where this kind does not exist (sm_90a-only kernels)."""
        return KINDS[self.kind](self.dtype, self.head_dim, arch)


PROFILED_KERNELS = (tuple(Profiled(k, dt, d) for k in ("fwd", "fwd_rm", "fwd_bias", "bwd_dkdv", "bwd_dq", "decode")
                          for dt in ("float16", "bfloat16", "float32") for d in (64, 128))
                    + tuple(Profiled(k, dt, d) for k in ("fwd_varlen", "bwd_dkdv_varlen", "bwd_dq_varlen")
                            for dt in ("float16", "bfloat16") for d in (64, 128))
                    + tuple(Profiled(k, dt, d) for k in ("fwd_sm90", "fwd_sm90_rm") for dt in ("float16", "bfloat16")
                            for d in (64, 128)))


def constant_bank(arch: str, params: bytes, threads: int) -> dict:
    """{byte offset: 32-bit word} of constant bank 0 known at launch: the kernel parameters (at the
    architecture's parameter base) and blockDim = (threads, 1, 1)."""
    base = arch_model(arch).param_base
    b = bytes(params) + b"\0" * (-len(params) % 4)
    out = {base + i: int.from_bytes(b[i:i + 4], "little") for i in range(0, len(b), 4)}
    out.update({BLOCK_DIM_CBANK: threads, BLOCK_DIM_CBANK + 4: 1, BLOCK_DIM_CBANK + 8: 1})
    return out


# ---------------------------------------------------------------------------------------------------
# Compiling and disassembling.

NVDISASM_ENV = "CUPY_COSATTN_NVDISASM"  # path of an nvdisasm to use instead of the pip wheel's


def find_nvdisasm() -> Optional[str]:
    """Path of nvdisasm: $CUPY_COSATTN_NVDISASM, the pip wheel nvidia-cuda-nvdisasm (nvidia/*/bin),
    $PATH, or $CUDA_PATH/bin; None when there is none."""
    env = os.environ.get(NVDISASM_ENV)
    if env:
        return env if os.path.isfile(env) else None
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
        roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    except (ImportError, ValueError):
        roots = []
    for root in roots:
        for cand in sorted(glob.glob(os.path.join(root, "*", "bin", "nvdisasm"))):
            if os.access(cand, os.X_OK):
                return cand
    found = shutil.which("nvdisasm")
    if found:
        return found
    cuda = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME")
    cand = os.path.join(cuda, "bin", "nvdisasm") if cuda else None
    return cand if cand and os.access(cand, os.X_OK) else None


def complete_elf(image: bytes) -> bytes:
    """`image` zero-padded to the end of its last section or header table: CuPy's getCUBIN can return
    the cubin one byte short, which nvdisasm rejects as an invalid ELF file."""
    if len(image) < 64 or image[:4] != b"\x7fELF":
        raise SassError("not an ELF image")
    def u(fmt, off):
        return struct.unpack_from(fmt, image, off)

    phoff, shoff = u("<QQ", 0x20)  # ELF64 header: program / section header table offsets
    phentsize, phnum, shentsize, shnum = u("<HHHH", 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    for i in range(shnum):
        o = shoff + i * shentsize
        if o + 0x28 > len(image):
            break
        typ, = u("<I", o + 4)
        off, size = u("<QQ", o + 0x18)
        if typ != 8:  # SHT_NOBITS occupies no file bytes
            end = max(end, off + size)
    return image + b"\0" * max(0, end - len(image))


def disassemble(cubin: bytes, nvdisasm: Optional[str] = None) -> str:
    """``nvdisasm -c`` of a cubin (code sections only)."""
    tool = nvdisasm or find_nvdisasm()
    if tool is None:
        raise SassError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or set "
                        f"{NVDISASM_ENV})")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(complete_elf(cubin))
        res = subprocess.run([tool, "-c", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise SassError(f"nvdisasm failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def compile_sass(code: str, names: tuple, arch: str, options: tuple = (), filename: str = "kernel.cu") -> dict:
    """Compile `code` with NVRTC for `arch` and disassemble it. Returns {"lowered": {name expression:
    mangled name}, "ptxas": {mangled name: ptxas row (ptxas.parse_ptxas)}, "sass": nvdisasm text}.
    Raises SassError with the compile log on failure."""
    from cupy.cuda import nvrtc

    from .ptxas import parse_ptxas

    prog = nvrtc.createProgram(code, filename, [], [])
    try:
        for n in names:
            nvrtc.addNameExpression(prog, n)
        try:
            nvrtc.compileProgram(prog, [f"-arch={arch}", "-Xptxas=-v"] + list(options))
        except Exception as e:  # noqa: BLE001 - NVRTCError: report the log
            raise SassError(f"{type(e).__name__}: {e}\n{nvrtc.getProgramLog(prog)}") from None
        log = nvrtc.getProgramLog(prog)
        lowered = {n: nvrtc.getLoweredName(prog, n) for n in names}
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    return {"lowered": lowered, "ptxas": parse_ptxas(log), "sass": disassemble(cubin)}


def _compile_module(source: str, names: tuple, arch: str) -> dict:
    """A process-pool task: one module of the package's sources."""
    return compile_sass(_load_source(source), names, arch, _compile_options(), source)


# ---------------------------------------------------------------------------------------------------
# The profile.


@dataclass
class Row:
    """One (kernel, arch) of the profile; `error` set instead of the numbers when it failed."""

    kernel: Profiled
    arch: str
    inst: Optional[Instantiation] = None
    regs: int = 0
    smem_static: int = 0
    spills: tuple = (0, 0)
    blocks: int = 0
    limiter: str = ""
    analysis: Optional[Analysis] = None
    model: Optional[Model] = None
    error: Optional[str] = None

    @property
    def cost(self) -> Cost:
        return self.analysis.path.cost


def select(kernels: Optional[str] = None) -> list:
    """PROFILED_KERNELS whose label (e.g. 'fwd fp16 D=64') or kind matches regex `kernels`."""
    if kernels is None:
        return list(PROFILED_KERNELS)
    rx = re.compile(kernels)
    return [p for p in PROFILED_KERNELS if rx.search(p.label) or rx.search(p.kind)]


def profile(archs: list, kernels: Optional[list] = None, jobs: int = 2) -> list:
    """Rows for every kernel of `kernels` (default PROFILED_KERNELS) on every arch of `archs`. The
    modules compile in `jobs` processes (kernels of one module group compile together)."""
    kernels = list(PROFILED_KERNELS) if kernels is None else list(kernels)
    for a in archs:
        arch_model(a)
    rows, groups = [], {}
    for p in kernels:
        for arch in archs:
            row = Row(p, arch)
            try:
                row.inst = p.resolve(arch)
            except Exception as e:  # noqa: BLE001 - reported in the row
                row.error = f"{type(e).__name__}: {e}"
                rows.append(row)
                continue
            if row.inst is None:  # no such kernel on this architecture
                continue
            rows.append(row)
            key = (row.inst.source, _module_group(row.inst.source, row.inst.name), arch)
            groups.setdefault(key, set()).add(row.inst.name)
    results = {}
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as ex:
        futs = {key: ex.submit(_compile_module, key[0], tuple(sorted(names)), key[2]) for key, names in groups.items()}
        for key, fut in futs.items():
            try:
                results[key] = fut.result()
            except Exception as e:  # noqa: BLE001
                results[key] = f"{type(e).__name__}: {e}"
    for row in rows:
        if row.error:
            continue
        res = results[(row.inst.source, _module_group(row.inst.source, row.inst.name), row.arch)]
        if isinstance(res, str):
            row.error = res
            continue
        try:
            _fill(row, res)
        except SassError as e:
            row.error = str(e)
    return rows


def _fill(row: Row, res: dict) -> None:
    low = res["lowered"][row.inst.name]
    pt = res["ptxas"].get(low)
    if pt is None:
        raise SassError(f"no ptxas report for {row.inst.name}")
    funcs = parse_sass(res["sass"])
    if low not in funcs:
        raise SassError(f"{low} not in the disassembly")
    row.regs, row.smem_static, row.spills = pt["regs"], pt["smem"], (pt["spill_st"], pt["spill_ld"])
    row.blocks, row.limiter = blocks_per_sm(row.arch, row.regs, row.inst.threads, row.smem_static + row.inst.smem)
    row.analysis = analyze(funcs[low], constant_bank(row.arch, row.inst.params, row.inst.threads))
    row.model = model(row.arch, row.cost, row.inst.loop_warps or -(-row.inst.threads // 32))


# ---------------------------------------------------------------------------------------------------
# Report.

_CLASS_COLS = ("tensor", "ldsm", "global", "shared", "mufu", "fp32", "cvt", "int", "pred", "control", "barrier",
               "shuffle", "other")
_CLASS_HEAD = ("HMMA", "LDSM", "global", "LDS/STS", "MUFU", "FP32", "CVT", "int", "pred", "ctrl", "bar", "shfl",
               "other")


def _fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 1e-9 else f"{x:.1f}"


def summary_cells(r: Row) -> list:
    c, m = r.cost, r.model
    t = c.tensor or float("nan")
    return [r.kernel.label, r.arch, str(r.regs), f"{r.smem_static}+{r.inst.smem}", f"{r.blocks} ({r.limiter})",
            _fmt(c.instructions), _fmt(c.tensor), f"{c.instructions / t:.1f}", f"{c.classes['ldsm'] / t:.2f}",
            _fmt(m.tensor), _fmt(m.smem), _fmt(m.issue), _fmt(m.mufu), f"{m.bound} ({100 * m.tensor_share:.0f} %)"]


SUMMARY_HEAD = ["kernel", "arch", "regs", "smem st+dyn", "blocks/SM", "instr", "HMMA", "instr/HMMA", "LDSM/HMMA",
                "tensor clk", "smem clk", "issue clk", "MUFU clk", "bound (tensor busy)"]


def class_cells(r: Row) -> list:
    return [r.kernel.label, r.arch] + [_fmt(r.cost.classes[k]) for k in _CLASS_COLS]


def notes(r: Row) -> list:
    """How the path was counted where that is not exact: nested loops whose trip count is assumed or
    unknown, calls (callee not counted), spills."""
    out = []
    assumed = [f"/*{off:04x}*/ x{tc.value}" for off, tc in r.cost.loops if tc.value and tc.how != "constant"]
    unknown = [f"/*{off:04x}*/ ({tc.how})" for off, tc in r.cost.loops if tc.value is None]
    if assumed:
        out.append("nested loops whose counter starts at a run-time value, taken as 0: " + ", ".join(assumed))
    if unknown:
        out.append("nested loops counted once, trip count unknown: " + ", ".join(unknown))
    if r.cost.calls:
        out.append(f"{_fmt(r.cost.calls)} CALL on the path (callee not counted)")
    if any(r.spills):
        out.append(f"spills {r.spills[0]}/{r.spills[1]} bytes")
    return out


def _table(head: list, rows: list, markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    def fmt(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([fmt(head)] + [fmt(r) for r in rows])


def report(rows: list, markdown: bool = False, listing: bool = False) -> str:
    ok = [r for r in rows if r.error is None]
    kinds = sorted({r.kernel.kind for r in ok}, key=list(KINDS).index)
    parts = ["Main loop, common path, per warp and iteration (static count from SASS; the clock columns are a "
             "model per SM and block iteration, not a measurement). Kinds: "
             + "; ".join(f"{k} = {KIND_LABELS.get(k, k)}" for k in kinds) + ".", "",
             _table(SUMMARY_HEAD, [summary_cells(r) for r in ok], markdown), "",
             "Instructions per class on the same path ("
             + "; ".join(f"{h} = {CLASS_LABELS[k]}" for k, h in zip(_CLASS_COLS, _CLASS_HEAD) if h != CLASS_LABELS[k])
             + "):", "",
             _table(["kernel", "arch", *_CLASS_HEAD], [class_cells(r) for r in ok], markdown)]
    extra = [(r, n) for r in ok for n in notes(r)]
    if extra:
        parts += ["", "Notes:"] + [f"- {r.kernel.label} {r.arch}: {n}" for r, n in extra]
    for r in rows:
        if r.error is not None:
            parts += ["", f"ERROR {r.kernel.label} {r.arch}: {r.error}"]
    if listing:
        for r in ok:
            parts += ["", f"--- {r.kernel.label} {r.arch}: {r.inst.name}, loop at /*{r.analysis.header_offset:04x}*/"]
            parts += [f"{_fmt(m):>4} x  /*{x.offset:04x}*/  {x.text}" for m, x in r.cost.listing]
    return "\n".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cupy_cosattn.sass", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="architectures (default: sm_80 sm_90; "
                    "also sm_90a)")
    ap.add_argument("--kernels", default=None, help="only kernels whose label (e.g. 'fwd fp16 D=64') or kind "
                    f"({', '.join(KINDS)}) matches this regex")
    ap.add_argument("--markdown", action="store_true", help="markdown tables")
    ap.add_argument("--listing", action="store_true", help="also print each common path's instructions")
    ap.add_argument("--jobs", type=int, default=2, help="parallel NVRTC processes (default 2)")
    args = ap.parse_args(argv)
    for a in args.arch:
        if a not in ARCHS:
            ap.error(f"--arch: {a!r} is not one of {', '.join(sorted(ARCHS))}")
    kernels = select(args.kernels)
    if not kernels:
        print(f"no profiled kernel matches {args.kernels!r}", file=sys.stderr)
        return 1
    try:
        from cupy.cuda import nvrtc  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"NVRTC is not available through CuPy ({type(e).__name__}: {e}); pip install cupy-cuda12x "
              f"nvidia-cuda-nvrtc-cu12", file=sys.stderr)
        return 1
    if find_nvdisasm() is None:
        print(f"nvdisasm not found: pip install nvidia-cuda-nvdisasm (or set {NVDISASM_ENV})", file=sys.stderr)
        return 1
    t0 = time.time()
    rows = profile(args.arch, kernels, args.jobs)
    print(report(rows, args.markdown, args.listing))
    print(f"\n{len(rows)} rows, {sum(r.error is not None for r in rows)} errors, {time.time() - t0:.0f} s")
    return 1 if any(r.error is not None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
