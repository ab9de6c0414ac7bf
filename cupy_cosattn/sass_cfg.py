"""SASS control flow for the static profiler (cupy_cosattn.sass): the nvdisasm text parser, basic
blocks, dominators, natural loops, the trip counts of counted loops, and the branches a kernel's
parameters decide.

- **Control-flow graph** (:func:`build_cfg`). Basic blocks start at the entry, at every label and
  after every branch, exit or return; ``BRA``/``JMP`` with a guard predicate (or a condition operand)
  has two successors, without one only its target; ``EXIT``/``RET`` without a guard end the path. A
  ``CALL`` to a subroutine falls through (its callee is not followed); a ``CALL`` to a local label
  (ptxas' ``@P0 CALL.REL.NOINC `(.L_x_10)`` loop exit) is a branch. Only blocks reachable from the
  entry are kept.
- **Natural loops** (:func:`find_loops`). Dominators by Cooper, Harvey and Kennedy's iterative
  algorithm; an edge u -> h whose target dominates its source is a back edge; the loop of header h is
  h plus every block that reaches a back edge's source without passing h. Irreducible cycles raise
  SassError.
- **Trip counts** (:func:`trip_count`) of loops in the rotated form ptxas emits for counted loops.
- **Parameters** (:func:`propagate`): conditional constant propagation of the launch's constant bank
  (kernel parameters, block size) prunes the edges that a representative problem never takes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

# ---------------------------------------------------------------------------------------------------
# Parsing nvdisasm output.

_SECTION = re.compile(r"^\s*\.section\s+\.text\.([^,\s]+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*([.$A-Za-z_][\w.$]*):\s*$")
_GUARD = re.compile(r"^(@!?U?P(?:T|\d+))\s+")
_TARGET = re.compile(r"`\(([^)`]+)\)")


@dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte offset in its function, guard predicate ('' when none, e.g. '@!P0'),
    full opcode with modifiers ('HMMA.16816.F32'), its operands and its branch/call target label."""

    offset: int
    guard: str
    opcode: str
    operands: str
    target: Optional[str] = None

    @property
    def base(self) -> str:
        """Opcode without modifiers ('HMMA')."""
        return self.opcode.split(".", 1)[0]

    @property
    def text(self) -> str:
        return f"{self.guard + ' ' if self.guard else ''}{self.opcode} {self.operands}".strip()


@dataclass
class Function:
    """The code of one function: instructions in address order and labels -> instruction index."""

    name: str
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)


def parse_sass(text: str) -> dict:
    """{function (mangled) name: Function} from ``nvdisasm -c`` output. A label binds to the next
    instruction; code before the first ``.section .text.*`` line is ignored."""
    funcs, cur, pending = {}, None, []
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            cur = funcs[m.group(1)] = Function(m.group(1))
            pending = []
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            body = m.group(2)
            g = _GUARD.match(body)
            guard = g.group(1) if g else ""
            body = body[g.end():] if g else body
            opcode, _, operands = body.partition(" ")
            t = _TARGET.search(operands)
            for lab in pending:
                cur.labels[lab] = len(cur.instrs)
            pending = []
            cur.instrs.append(Instr(int(m.group(1), 16), guard, opcode, operands.strip(), t.group(1) if t else None))
            continue
        m = _LABEL.match(line)
        if m and not line.lstrip().startswith("//"):
            pending.append(m.group(1))
    return funcs


# ---------------------------------------------------------------------------------------------------
# Control-flow graph.

_BRANCH = {"BRA", "JMP"}


def is_jump(ins: Instr) -> bool:
    """A direct branch: BRA/JMP, or a CALL to a local label (.L_x_N) rather than to a subroutine:
    ptxas emits ``@P0 CALL.REL.NOINC `(.L_x_10)`` as a loop exit that never returns."""
    return ins.base in _BRANCH or (ins.base == "CALL" and ins.target is not None and ins.target.startswith(".L"))


_INDIRECT = {"BRX", "JMX"}
_END = {"EXIT", "RET", "KILL"}


class SassError(RuntimeError):
    """The code does not have the structure the analysis needs (irreducible flow, no loop, ...)."""


def _unconditional(ins: Instr) -> bool:
    """A branch/exit taken whatever the thread's state: no guard (or @PT) and, for a branch, no
    condition operand before its target (``BRA.U !UP0, `(...)``, ``BRA.DIV UR4, `(...)`` are
    conditional)."""
    if ins.guard not in ("", "@PT"):
        return False
    if is_jump(ins):
        before_target = ins.operands.split("`", 1)[0].strip().rstrip(",").strip()
        return before_target == ""
    return True


@dataclass
class CFG:
    """Basic blocks of a function. blocks[i] = (first, last + 1) instruction indices; succ/pred are
    lists of block indices; block 0 is the entry. Only blocks reachable from the entry are listed
    (indices are into `blocks`). `indirect` names blocks ending in an indirect branch (no known
    successors)."""

    func: Function
    blocks: list
    succ: list
    pred: list
    indirect: list
    dead: frozenset = frozenset()  # instruction indices whose guard is known false (they issue, do nothing)

    def instrs(self, b: int) -> list:
        lo, hi = self.blocks[b]
        return self.func.instrs[lo:hi]


def build_cfg(func: Function) -> CFG:
    ins = func.instrs
    if not ins:
        raise SassError(f"{func.name}: no instructions")
    n = len(ins)
    leaders = {0} | {i for i in func.labels.values() if i < n}
    for i, x in enumerate(ins):
        if (is_jump(x) or x.base in _INDIRECT or x.base in _END) and i + 1 < n:
            leaders.add(i + 1)
    starts = sorted(leaders)
    bounds = [(s, starts[k + 1] if k + 1 < len(starts) else n) for k, s in enumerate(starts)]
    block_of_instr = {s: k for k, (s, _) in enumerate(bounds)}
    raw_succ, indirect = [], []
    for k, (_, e) in enumerate(bounds):
        last = ins[e - 1]
        nxt = [k + 1] if k + 1 < len(bounds) else []
        if is_jump(last):
            if last.target not in func.labels:
                raise SassError(f"{func.name}: branch to unknown label {last.target!r} at /*{last.offset:04x}*/")
            tgt = [block_of_instr[func.labels[last.target]]]
            out = tgt if _unconditional(last) else tgt + [x for x in nxt if x not in tgt]
        elif last.base in _INDIRECT:
            out = [] if _unconditional(last) else nxt
            indirect.append(k)
        elif last.base in _END:
            out = [] if _unconditional(last) else nxt
        else:
            out = nxt
        raw_succ.append(out)
    # keep what the entry reaches (drops callees reached only by CALL and the padding after EXIT)
    seen, stack = {0}, [0]
    while stack:
        for v in raw_succ[stack.pop()]:
            if v not in seen:
                seen.add(v)
                stack.append(v)
    keep = sorted(seen)
    new = {old: i for i, old in enumerate(keep)}
    succ = [[new[v] for v in raw_succ[old]] for old in keep]
    pred = [[] for _ in keep]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    return CFG(func, [bounds[old] for old in keep], succ, pred, [new[k] for k in indirect if k in new])


def rpo(cfg: CFG) -> list:
    """Blocks in reverse postorder from the entry (a topological order once back edges are dropped)."""
    order, seen = [], {0}
    stack = [(0, iter(cfg.succ[0]))]
    while stack:
        u, it = stack[-1]
        for v in it:
            if v not in seen:
                seen.add(v)
                stack.append((v, iter(cfg.succ[v])))
                break
        else:
            order.append(u)
            stack.pop()
    return order[::-1]


def dominators(cfg: CFG) -> list:
    """idom[b] for every block (idom[0] = 0): Cooper, Harvey and Kennedy, "A Simple, Fast Dominance
    Algorithm" (2001)."""
    order = rpo(cfg)
    index = {b: i for i, b in enumerate(order)}
    idom = [None] * len(cfg.blocks)
    idom[0] = 0

    def intersect(a, b):
        while a != b:
            while index[a] > index[b]:
                a = idom[a]
            while index[b] > index[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for b in order[1:]:
            ps = [p for p in cfg.pred[b] if idom[p] is not None]
            new = ps[0]
            for p in ps[1:]:
                new = intersect(p, new)
            if idom[b] != new:
                idom[b] = new
                changed = True
    return idom


def _dominates(idom: list, a: int, b: int) -> bool:
    while True:
        if a == b:
            return True
        if b == 0:
            return False
        b = idom[b]


@dataclass
class Loop:
    """A natural loop: header block, body (blocks, header included), latches (sources of its back
    edges), parent loop index (None at top level) and its children."""

    header: int
    body: frozenset
    latches: tuple
    parent: Optional[int] = None
    children: list = field(default_factory=list)


def find_loops(cfg: CFG) -> list:
    """Natural loops of `cfg`, outer before inner. Raises SassError on a cycle that is not a natural
    loop (irreducible control flow)."""
    idom = dominators(cfg)
    back = {}
    for u, vs in enumerate(cfg.succ):
        for h in vs:
            if _dominates(idom, h, u):
                back.setdefault(h, []).append(u)
    loops = []
    for h, latches in back.items():
        body, stack = {h}, [u for u in latches if u != h]
        body.update(stack)
        while stack:
            for p in cfg.pred[stack.pop()]:
                if p not in body:
                    body.add(p)
                    stack.append(p)
        loops.append(Loop(h, frozenset(body), tuple(sorted(latches))))
    loops.sort(key=lambda lp: -len(lp.body))
    for i, lp in enumerate(loops):
        outer = [j for j in range(i) if lp.header in loops[j].body and lp.body <= loops[j].body]
        if outer:
            lp.parent = min(outer, key=lambda j: len(loops[j].body))
            loops[lp.parent].children.append(i)
    # every cycle must go through a back edge: the graph without back edges is acyclic
    backedges = {(u, h) for h, us in back.items() for u in us}
    state = [0] * len(cfg.blocks)
    for root in range(len(cfg.blocks)):
        if state[root]:
            continue
        stack = [(root, iter(cfg.succ[root]))]
        state[root] = 1
        while stack:
            u, it = stack[-1]
            for v in it:
                if (u, v) in backedges:
                    continue
                if state[v] == 1:
                    raise SassError(f"{cfg.func.name}: irreducible control flow (cycle through block {v} "
                                    f"at /*{cfg.func.instrs[cfg.blocks[v][0]].offset:04x}*/ without a back edge)")
                if state[v] == 0:
                    state[v] = 1
                    stack.append((v, iter(cfg.succ[v])))
                    break
            else:
                state[u] = 2
                stack.pop()
    return loops


# ---------------------------------------------------------------------------------------------------
# Trip counts of nested loops.

_REG = re.compile(r"^(U?R(?:\d+|Z))(?:\.\w+)*$")
_IMM = re.compile(r"^-?0x[0-9a-fA-F]+$|^-?\d+$")
# Opcodes without a register destination (stores, reductions without return, control, barriers).
_NO_DEST = {"ST", "STS", "STG", "STL", "STSM", "RED", "REDG", "BRA", "BRX", "JMP", "JMX", "BAR", "EXIT", "RET", "CALL",
            "BSSY", "BSYNC", "BREAK", "BMOV", "WARPSYNC", "NOP", "DEPBAR", "LDGDEPBAR", "LDGSTS", "MEMBAR", "BPT",
            "YIELD", "KILL", "UTMALDG", "UTMASTG", "UTMAPF", "UBLKCP", "UBLKPF", "CCTL", "ERRBAR", "FENCE"}
TRIP_CAP = 4096  # larger constant trip counts are treated as unknown


def _operands(ins: Instr) -> list:
    return [o.strip() for o in ins.operands.split(",")] if ins.operands else []


def _imm(tok: str) -> Optional[int]:
    if not _IMM.match(tok):
        return None
    return int(tok, 16) if "x" in tok else int(tok)


def _dest_regs(ins: Instr) -> set:
    """Registers (R*, UR*) an instruction may write: its first operand when that is a register, widened
    to the register tuple of vector forms (an over-approximation is harmless: it only makes a trip
    count unknown)."""
    ops = _operands(ins)
    if not ops or ins.base in _NO_DEST:
        return set()
    m = _REG.match(ops[0])
    if not m or m.group(1) in ("RZ", "URZ"):
        return set()
    name = m.group(1)
    prefix, num = ("UR", int(name[2:])) if name.startswith("UR") else ("R", int(name[1:]))
    parts = ins.opcode.split(".")
    wide = any(t in parts for t in ("64", "WIDE", "F64")) or ins.base in ("CS2R", "DADD", "DMUL", "DFMA", "DMNMX")
    if ins.base in ("HMMA", "HGMMA", "IMMA", "DMMA", "LDSM") or "128" in parts:
        width = 4
    else:
        width = 2 if wide else 1
    return {f"{prefix}{num + i}" for i in range(width)}


def _writes_pred(ins: Instr, p: str) -> bool:
    return p in _operands(ins)[:2] and ins.base not in _NO_DEST


def _const_value(ins: Instr, reg: str) -> Optional[int]:
    """The constant an instruction writes to `reg`, when it is a constant move; else None."""
    ops = _operands(ins)
    zero = ("RZ", "URZ", "SRZ")
    if ins.base in ("MOV", "MOV32I", "UMOV") and len(ops) >= 2:
        return 0 if ops[1] in zero else _imm(ops[1])
    if ins.opcode.startswith("IMAD.MOV") and len(ops) == 4 and ops[1] in zero and ops[2] in zero:
        return 0 if ops[3] in zero else _imm(ops[3])
    if ins.base == "CS2R" and len(ops) == 2 and ops[1] == "SRZ":
        return 0
    return None


def _add_form(ins: Instr) -> Optional[tuple]:
    """(destination, source register, constant) for dst = src + constant forms (IADD3 dst, src, imm,
    RZ; VIADD dst, src, imm; moves: constant 0), else None."""
    ops = _operands(ins)
    zero = ("RZ", "URZ")
    if ins.opcode in ("IADD3", "UIADD3") and len(ops) == 4 and ops[3] in zero:
        a, b = ops[1], ops[2]
        if _REG.match(a) and _imm(b) is not None:
            return ops[0], a, _imm(b)
        if _REG.match(b) and _imm(a) is not None:
            return ops[0], b, _imm(a)
    if ins.opcode == "VIADD" and len(ops) == 3 and _REG.match(ops[1]) and _imm(ops[2]) is not None:
        return ops[0], ops[1], _imm(ops[2])
    if ins.base in ("MOV", "UMOV") and len(ops) == 2 and _REG.match(ops[1]) and ops[1] not in zero:
        return ops[0], ops[1], 0
    if ins.opcode.startswith("IMAD.MOV") and len(ops) == 4 and ops[1] in zero and ops[2] in zero \
            and _REG.match(ops[3]) and ops[3] not in zero:
        return ops[0], ops[3], 0
    return None


_CMP = {"LT": lambda a, b: a < b, "LE": lambda a, b: a <= b, "GT": lambda a, b: a > b, "GE": lambda a, b: a >= b,
        "EQ": lambda a, b: a == b, "NE": lambda a, b: a != b}


def _as32(x: int, unsigned: bool) -> int:
    x &= 0xFFFFFFFF
    return x if unsigned or x < 2**31 else x - 2**32


@dataclass(frozen=True)
class TripCount:
    """A nested loop's trip count: `value` (None: unknown, counted once) and how it was found:
    'constant', 'start assumed 0' (the counter starts at a run-time value, e.g. a thread or warp
    index, taken as 0: the first thread's count) or why it is unknown."""

    value: Optional[int]
    how: str


def trip_count(cfg: CFG, idom: list, loop: Loop) -> TripCount:
    """Trip count of a loop in the rotated form ptxas emits for counted loops: one latch, which is the
    only block leaving the loop and ends in ``@[!]P BRA header``; P set by ``ISETP.<cmp>[.U32].AND P,
    PT, C, imm, PT`` on the spine header -> latch, C = counter (+ constant), the counter stepped once
    per iteration by a constant and set before the loop by a constant move."""
    exiting = [b for b in loop.body if any(s not in loop.body for s in cfg.succ[b])]
    if len(loop.latches) != 1 or exiting != [loop.latches[0]]:
        return TripCount(None, "unknown (not a single bottom-tested exit)")
    latch = loop.latches[0]
    br = cfg.instrs(latch)[-1]
    if br.base != "BRA" or not br.guard or br.guard in ("@PT", "@!PT") or "`" not in br.operands \
            or br.operands.split("`", 1)[0].strip():
        return TripCount(None, "unknown (exit branch form)")
    neg = br.guard.startswith("@!")
    pred = br.guard.lstrip("@!")
    back_taken = cfg.succ[latch][0] == loop.header  # the branch target is the header
    # spine: header ... latch along the dominator tree, in execution order
    chain, b = [], latch
    while True:
        chain.append(b)
        if b == loop.header:
            break
        b = idom[b]
        if b not in loop.body:
            return TripCount(None, "unknown (spine)")
    spine = [(blk, i, x) for blk in reversed(chain) for i, x in enumerate(cfg.instrs(blk))]
    pos = {(blk, i): k for k, (blk, i, _) in enumerate(spine)}
    br_pos = len(spine) - 1
    setp = [k for k in range(br_pos) if _writes_pred(spine[k][2], pred)]
    if not setp:
        return TripCount(None, "unknown (exit predicate not set on the spine)")
    cmp_ins = spine[setp[-1]][2]
    ops = _operands(cmp_ins)
    parts = cmp_ins.opcode.split(".")
    bound = 0 if len(ops) > 3 and ops[3] in ("RZ", "URZ") else (_imm(ops[3]) if len(ops) > 3 else None)
    if parts[0] not in ("ISETP", "UISETP") or len(ops) != 5 or ops[1] not in ("PT", "UPT") \
            or ops[4] not in ("PT", "UPT") or "EX" in parts or parts[1] not in _CMP or bound is None \
            or not _REG.match(ops[2]):
        return TripCount(None, f"unknown (exit test {cmp_ins.text})")
    cmp_fn, unsigned = _CMP[parts[1]], "U32" in parts
    compared = _REG.match(ops[2]).group(1)
    cmp_pos = setp[-1]

    def writers(reg):
        return [(blk, i, x) for blk in loop.body for i, x in enumerate(cfg.instrs(blk)) if reg in _dest_regs(x)]

    def spine_def(reg, before):
        """Spine index of the definition of `reg` that reaches spine index `before` (None when it is
        not on the spine, or another block of the loop may redefine it in between)."""
        k = next((k for k in range(before - 1, -1, -1) if reg in _dest_regs(spine[k][2])), None)
        if k is None or spine[k][2].guard:
            return None
        if spine[k][0] != spine[before][0] and any(
                b not in chain and any(reg in _dest_regs(x) for x in cfg.instrs(b)) for b in loop.body):
            return None
        return k

    # the compared register: the counter itself, or counter + constant defined on the spine
    counter, offset, read_pos = compared, 0, cmp_pos
    k = spine_def(compared, cmp_pos)
    if k is not None:
        f = _add_form(spine[k][2])
        if f is not None and _REG.match(f[1]).group(1) != compared:
            counter, offset, read_pos = _REG.match(f[1]).group(1), f[2], k
    w = writers(counter)
    if len(w) != 1 or (w[0][0], w[0][1]) not in pos or w[0][2].guard:
        return TripCount(None, f"unknown (counter {counter} is not stepped once per iteration)")
    step_pos = pos[(w[0][0], w[0][1])]
    f = _add_form(w[0][2])
    step = None
    if f is not None and _REG.match(f[1]).group(1) == counter:
        step = f[2]
    elif f is not None:  # counter = tmp + c, tmp = counter + c2 computed earlier on the spine
        k = spine_def(_REG.match(f[1]).group(1), step_pos)
        if k is not None:
            g = _add_form(spine[k][2])
            if g is not None and _REG.match(g[1]).group(1) == counter:
                step = f[2] + g[2]
    if not step:
        return TripCount(None, f"unknown (counter step {w[0][2].text})")
    # start value: the reaching definition of the counter on entry (through the one predecessor
    # outside the loop)
    outside = [p for p in cfg.pred[loop.header] if p not in loop.body]
    if len(outside) != 1:
        return TripCount(None, "unknown (several loop entries)")
    kind, start = _reaching_start(cfg, idom, outside[0], counter, loop)
    if kind == "unknown":
        return TripCount(None, f"unknown ({start})")
    how = "constant" if kind == "const" else "start assumed 0"
    c = start
    for k in range(1, TRIP_CAP + 1):
        v = (c + step if step_pos < read_pos else c) + offset
        guard_holds = cmp_fn(_as32(v, unsigned), _as32(bound, unsigned)) != neg
        c += step
        if guard_holds != back_taken:  # the branch leaves the loop
            return TripCount(k, how)
    return TripCount(None, f"unknown (more than {TRIP_CAP} iterations)")


def _reaching_start(cfg: CFG, idom: list, block: int, reg: str, loop: Loop,
                    end: Optional[int] = None) -> tuple:
    """The value of `reg` at the end of `block` (or before its instruction `end`): ("const", v) when
    its one reaching definition is a chain of constant moves and adds, ("runtime", c) when that chain
    starts from a run-time value (e.g. a thread index) plus c, or ("unknown", why). Walks up the
    dominator tree to the closest block D writing `reg`, and checks that no other block on a path
    from D to `block` writes it."""
    d, first = block, True
    while True:
        ins = cfg.instrs(d)
        top = len(ins) if (end is None or not first) else end
        for i in range(top - 1, -1, -1):
            if reg not in _dest_regs(ins[i]):
                continue
            if ins[i].guard:
                return ("unknown", f"{reg} is set under a predicate before the loop")
            if not first:  # another path from d to `block` must not redefine reg
                between = _reach(cfg.succ, list(cfg.succ[d]), stop={d, loop.header}) & \
                    _reach(cfg.pred, [block], stop={d})
                if any(reg in _dest_regs(x) for b in between - {block} for x in cfg.instrs(b)):
                    return ("unknown", f"{reg} has several definitions before the loop")
            v = _const_value(ins[i], reg)
            if v is not None:
                return ("const", v)
            f = _add_form(ins[i])  # reg = src + c: follow src
            if f is not None and _REG.match(f[1]).group(1) != reg:
                kind, val = _reaching_start(cfg, idom, d, _REG.match(f[1]).group(1), loop, end=i)
                return (kind, val + f[2]) if kind in ("const", "runtime") else (kind, val)
            return ("runtime", 0)
        if d == 0:
            return ("unknown", f"{reg} is not set before the loop")
        d, first = idom[d], False


def _reach(edges: list, roots: list, stop: set) -> set:
    seen, stack = set(), [r for r in roots if r not in stop]
    seen.update(stack)
    while stack:
        for v in edges[stack.pop()]:
            if v not in seen and v not in stop:
                seen.add(v)
                stack.append(v)
    return seen


# ---------------------------------------------------------------------------------------------------
# Branches decided by the kernel's parameters (conditional constant propagation).
#
# The kernel parameters of a representative problem (no mask, no bias, ...) and the block size are
# known constants (constant bank 0); propagating them through the integer and predicate instructions
# decides the branches that depend on them alone (optional inputs, modes, causal), so that the common
# path never enters code a representative problem does not run. Branches on thread, tile or data
# dependent values stay two-way. Wegman and Zadeck, "Constant Propagation with Conditional Branches"
# (1991), in its simple dense form: a value per register per block entry, meet = agreement.

_PRED = re.compile(r"^U?P[0-6T]$")
_RNAME = re.compile(r"^U?R\d+$")
_CBANK = re.compile(r"^c\[0x0\]\[(0x[0-9a-fA-F]+)\]$")
_SETP = {"ISETP", "FSETP", "DSETP", "HSETP2", "PLOP3", "PSETP", "UISETP", "UPLOP3", "UPSETP"}
_M32 = 0xFFFFFFFF
BLOCK_DIM_CBANK = 0x0  # c[0x0][0x0], [0x4], [0x8]: blockDim.x, .y, .z (sm_70 and newer)


def _dests(ins: Instr) -> list:
    """Registers and predicates an instruction may write (an over-approximation)."""
    ops = _operands(ins)
    if not ops or ins.base in _NO_DEST:
        return []
    if ins.base in _SETP:
        return [o for o in ops[:2] if _PRED.match(o)]
    if ins.base == "R2P":
        return [f"P{i}" for i in range(7)]
    out = []
    if _PRED.match(ops[0]):
        out.append(ops[0])
        if len(ops) > 1 and _RNAME.match(ops[1].split(".")[0]):
            out += sorted(_dest_regs(Instr(0, "", ins.opcode, ", ".join(ops[1:]))))
        return out
    out += sorted(_dest_regs(ins))
    if ins.base == "HGMMA" and out:  # the accumulator tuple: everything from its first register on
        first = out[0]
        prefix = "UR" if first.startswith("UR") else "R"
        out = [f"{prefix}{i}" for i in range(int(first[len(prefix):]), 256)]
    for o in ops[1:]:
        if not _PRED.match(o):
            break
        out.append(o)
    return out


class _Eval:
    """Values of the constant bank and of registers/predicates in one state (dict name -> int)."""

    def __init__(self, cbank: dict):
        self.cbank = cbank

    def val(self, tok: str, st: dict) -> Optional[int]:
        tok = tok.replace(".reuse", "")
        neg = tok.startswith("-")
        inv = tok.startswith("~") or tok.startswith("!")
        t = tok[1:] if (neg or inv) else tok
        if t in ("RZ", "URZ"):
            v = 0
        elif t in ("PT", "UPT"):
            v = 1
        elif _RNAME.match(t) or _PRED.match(t):
            v = st.get(t)
        elif _IMM.match(t):
            v = _imm(t) & _M32
        else:
            m = _CBANK.match(t)
            v = self.cbank.get(int(m.group(1), 16)) if m else None
        if v is None:
            return None
        if _PRED.match(t):
            return (1 - v) if inv else v
        if neg:
            v = -v
        if inv:
            v = ~v
        return v & _M32

    def cword(self, tok: str, k: int) -> Optional[int]:
        m = _CBANK.match(tok)
        return self.cbank.get(int(m.group(1), 16) + 4 * k) if m else None


def _lut3(lut: int, a: int, b: int, c: int, bits: int = 32) -> int:
    r = 0
    for i in range(bits):
        idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        r |= ((lut >> idx) & 1) << i
    return r


def _setp(ev: _Eval, ins: Instr, ops: list, st: dict) -> Optional[tuple]:
    """(value of the first destination, of the second) of an ISETP/UISETP/PLOP3/UPLOP3, or None."""
    parts = ins.opcode.split(".")
    if ins.base in ("PLOP3", "UPLOP3") and len(ops) == 7 and parts[1:] == ["LUT"]:
        ins3 = [ev.val(o, st) for o in ops[2:5]]
        l1, l2 = _imm(ops[5]), _imm(ops[6])
        if None in (l1, l2):
            return None
        # an unknown input that the LUT ignores (given the known ones) still gives a known result
        outs = set()
        for combo in range(8):
            x = [((combo >> (2 - i)) & 1) if v is None else v for i, v in enumerate(ins3)]
            if all(v is None or v == x[i] for i, v in enumerate(ins3)):
                outs.add((_lut3(l1, *x, 1), _lut3(l2, *x, 1)))
        return outs.pop() if len(outs) == 1 else None
    if ins.base not in ("ISETP", "UISETP") or len(parts) < 3 or parts[1] not in _CMP:
        return None
    ex = "EX" in parts
    if len(ops) != (6 if ex else 5):
        return None
    a, b, pc = ev.val(ops[2], st), ev.val(ops[3], st), ev.val(ops[4], st)
    bop = next((p for p in parts if p in ("AND", "OR", "XOR")), None)
    if pc is not None and ((bop == "AND" and pc == 0) or (bop == "OR" and pc == 1)):
        return pc, pc  # the combining predicate decides both results
    if None in (a, b, pc):
        return None
    unsigned = "U32" in parts
    x, y = _as32(a, unsigned), _as32(b, unsigned)
    if ex:
        lo = ev.val(ops[5], st)
        if lo is None:
            return None
        cmp = parts[1]
        if cmp == "EQ":
            r = x == y and lo
        elif cmp == "NE":
            r = x != y or lo
        elif cmp in ("LT", "LE"):
            r = x < y or (x == y and lo)
        else:
            r = x > y or (x == y and lo)
        r = int(bool(r))
    else:
        r = int(_CMP[parts[1]](x, y))
    if bop is None:
        return None
    comb = {"AND": lambda u, v: u & v, "OR": lambda u, v: u | v, "XOR": lambda u, v: u ^ v}[bop]
    return comb(r, pc), comb(1 - r, pc)


def _transfer(ev: _Eval, ins: Instr, st: dict, kills: dict) -> None:
    """Update state `st` by one instruction (in place)."""
    if ins.base == "CALL" and not is_jump(ins):
        for d in kills.get(ins.target, None) or list(st):
            st.pop(d, None)
        return
    dests = _dests(ins)
    if not dests:
        return
    g = ev.val(ins.guard[1:], st) if ins.guard else 1
    if g == 0:
        return
    results = None if g is None else _compute(ev, ins, st)
    for d in dests:
        st.pop(d, None)
    if results:
        for k, v in results.items():
            if k not in ("RZ", "URZ", "PT", "UPT"):
                st[k] = v


def _compute(ev: _Eval, ins: Instr, st: dict) -> Optional[dict]:
    """{destination: value} of an instruction with known inputs, for the integer and predicate
    instructions that carry parameters into branch conditions; None otherwise."""
    ops = _operands(ins)
    op, parts = ins.opcode, ins.opcode.split(".")
    base = ins.base
    v = lambda i: ev.val(ops[i], st)  # noqa: E731
    if base in _SETP:
        r = _setp(ev, ins, ops, st)
        return None if r is None else {ops[0]: r[0], ops[1]: r[1]}
    if base in ("LDC", "ULDC") and len(ops) == 2:
        n = 2 if "64" in parts else 1
        if len(parts) > (2 if n == 2 else 1):
            return None
        words = [ev.cword(ops[1], k) for k in range(n)]
        if None in words or not _RNAME.match(ops[0]):
            return None
        pre = "UR" if ops[0].startswith("UR") else "R"
        r0 = int(ops[0][len(pre):])
        return {f"{pre}{r0 + k}": w for k, w in enumerate(words)}
    if not ops or not _RNAME.match(ops[0].replace(".reuse", "")):
        if base == "LOP3" and len(ops) == 7 and _PRED.match(ops[0]) and parts[1:] == ["LUT"]:
            a, b, c, lut = v(2), v(3), v(4), _imm(ops[5])
            return None if None in (a, b, c, lut) else {ops[0]: int(_lut3(lut, a, b, c) != 0)}
        return None
    d = ops[0]
    if op == "CS2R" and len(ops) == 2 and ops[1] == "SRZ":
        n = int(d[1:])
        return {f"R{n}": 0, f"R{n + 1}": 0}
    if op in ("MOV", "UMOV", "MOV32I") and len(ops) in (2, 3):
        x = v(1)
    elif op.startswith("IMAD.MOV") and len(ops) == 4:
        x = v(3)
    elif op in ("IMAD", "IMAD.U32", "IMAD.SHL.U32", "IMAD.IADD", "UIMAD") and len(ops) == 4:
        a, b, c = v(1), v(2), v(3)
        x = None if None in (a, b, c) else (a * b + c) & _M32
    elif op in ("IADD3", "UIADD3") and len(ops) == 4:
        a, b, c = v(1), v(2), v(3)
        x = None if None in (a, b, c) else (a + b + c) & _M32
    elif op == "VIADD" and len(ops) == 3:
        a, b = v(1), v(2)
        x = None if None in (a, b) else (a + b) & _M32
    elif op in ("SEL", "USEL") and len(ops) == 4:
        p = v(3)
        x = None if p is None else (v(1) if p else v(2))
    elif op in ("LOP3.LUT", "ULOP3.LUT") and len(ops) == 6:
        a, b, c, lut = v(1), v(2), v(3), _imm(ops[4])
        x = None if None in (a, b, c, lut) else _lut3(lut, a, b, c)
    elif op == "P2R" and len(ops) == 4 and ops[1] == "PR":
        base_v, mask = v(2), _imm(ops[3])
        bits = [st.get(f"P{i}") if (mask or 0) >> i & 1 else 0 for i in range(7)]
        if base_v is None or mask is None or None in bits:
            return None
        x = (base_v & ~mask & _M32) | sum(b << i for i, b in enumerate(bits))
    else:
        return None
    return None if x is None else {d: x & _M32}


def callee_kills(func: Function) -> dict:
    """{subroutine label: registers and predicates it may write}: the instructions from a '$' label
    (nvdisasm names internal subroutines $__internal_...) to the next one or the end."""
    starts = sorted((i, lab) for lab, i in func.labels.items() if lab.startswith("$"))
    out = {}
    for k, (i, lab) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(func.instrs)
        kill = set()
        for x in func.instrs[i:end]:
            kill.update(_dests(x))
        out[lab] = sorted(kill)
    return out


def propagate(cfg: CFG, cbank: dict) -> CFG:
    """The CFG without the edges that the constants in `cbank` ({byte offset in constant bank 0:
    32-bit word}) show are never taken, and without the blocks only those edges reach."""
    ev = _Eval(cbank)
    kills = callee_kills(cfg.func)
    out, edges, work = {}, set(), [0]
    while work:
        b = work.pop()
        ins_states = [out[p] for p in cfg.pred[b] if (p, b) in edges]
        if b == 0:
            ins_states.append({})
        st = dict(ins_states[0])
        for o in ins_states[1:]:
            for k in list(st):
                if o.get(k) != st[k]:
                    del st[k]
        instrs = cfg.instrs(b)
        for x in instrs[:-1]:
            _transfer(ev, x, st, kills)
        last = instrs[-1]
        taken = list(cfg.succ[b])
        if last.guard and (is_jump(last) or last.base in _END) and len(taken) >= 1:
            g = ev.val(last.guard[1:], st)
            if g is not None and _unconditional(Instr(0, "", last.opcode, last.operands)):
                if is_jump(last):
                    tgt = cfg.succ[b][0]
                    fall = [s for s in cfg.succ[b] if s != tgt]
                    taken = [tgt] if g else fall
                else:  # a guarded EXIT/RET: its successor is the fall-through
                    taken = [] if g else taken
        _transfer(ev, last, st, kills)
        changed = out.get(b) != st
        out[b] = st
        for s in taken:
            if (b, s) not in edges:
                edges.add((b, s))
                work.append(s)
            elif changed:
                work.append(s)
    # instructions whose guard the constants show false on every visit: issued, but no effect
    dead = set()
    for b in out:
        st = {}
        ins_states = [out[p] for p in cfg.pred[b] if (p, b) in edges] + ([{}] if b == 0 else [])
        st = dict(ins_states[0])
        for o in ins_states[1:]:
            for k in list(st):
                if o.get(k) != st[k]:
                    del st[k]
        lo, _ = cfg.blocks[b]
        for i, x in enumerate(cfg.instrs(b)):
            if x.guard and ev.val(x.guard[1:], st) == 0:
                dead.add(lo + i)
            _transfer(ev, x, st, kills)
    return _restrict(cfg, edges, frozenset(dead))


def _restrict(cfg: CFG, edges: set, dead: frozenset = frozenset()) -> CFG:
    keep = sorted({0} | {v for _, v in edges})
    new = {old: i for i, old in enumerate(keep)}
    succ = [[new[v] for v in cfg.succ[old] if (old, v) in edges] for old in keep]
    pred = [[] for _ in keep]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    return CFG(cfg.func, [cfg.blocks[o] for o in keep], succ, pred, [new[k] for k in cfg.indirect if k in new], dead)
