"""The static SASS profiler (cupy_cosattn.sass, sass_cfg): loop detection, common paths and counts on
small kernels compiled with NVRTC, the nvdisasm parser on canned text, and one real forward kernel
against the counts its tile shape implies. Needs CuPy's NVRTC and nvdisasm (pip: cupy-cuda12x,
nvidia-cuda-nvrtc-cu12, nvidia-cuda-nvdisasm), not a GPU; the tests that do not compile run anyway."""
from __future__ import annotations

import os
import struct
from collections import Counter

import pytest

from cupy_cosattn import launch, resources, sass, sass_cfg
from cupy_cosattn.launch import limits, registry, tiles


def _tools_missing():
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception as e:  # noqa: BLE001
        return f"NVRTC not available ({type(e).__name__}: {e})"
    if sass.find_nvdisasm() is None:
        return "nvdisasm not found (pip install nvidia-cuda-nvdisasm)"
    return None


# CI sets CUPY_COSATTN_REQUIRE_NVRTC=1 (.ci/run) and installs the tools: there a missing tool fails.
REQUIRED = os.environ.get("CUPY_COSATTN_REQUIRE_NVRTC", "") not in ("", "0")
needs_tools = pytest.mark.skipif(not REQUIRED and _tools_missing() is not None, reason=str(_tools_missing()))

# Small kernels with known loop structure. Every loop over `it` is rolled (#pragma unroll 1) so that
# one SASS iteration is one source iteration; the inline-PTX mma cannot be removed or merged.
KERNELS = r"""
__device__ __forceinline__ void mma(float* d, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void load6(const unsigned* p, unsigned* a, unsigned* b) {
  a[0] = p[0]; a[1] = p[1]; a[2] = p[2]; a[3] = p[3]; b[0] = p[4]; b[1] = p[5];
}
__device__ __forceinline__ void store4(float* out, const float* d) {
  for (int i = 0; i < 4; ++i) out[4 * threadIdx.x + i] = d[i];
}

template <int N>  // exactly N mma per iteration of a loop with a run-time trip count
__global__ void loop_n(const unsigned* in, float* out, int iters) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    load6(in + 6 * (32 * it + threadIdx.x), a, b);
#pragma unroll
    for (int k = 0; k < N; ++k) mma(d, a, b);
  }
  store4(out, d);
}

// if/else, 2 mma on either side; the `sel` side also runs a long chain of MUFU math.
__global__ void if_else(const unsigned* in, const int* sel, float* out, int iters) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    load6(in + 6 * (32 * it + threadIdx.x), a, b);
    if (sel[32 * it + threadIdx.x]) {
      mma(d, a, b);
      mma(d, b, a);
      float x = d[0];
#pragma unroll
      for (int k = 0; k < 8; ++k) x = __sinf(x) * __cosf(x + 1.f) + __expf(x * 0.5f);
      d[1] += x;
    } else {
      mma(d, a, a);
      mma(d, a, b);
    }
  }
  store4(out, d);
}

// One side: 1 mma and a long chain; the other: 3 mma and a short chain.
__global__ void more_mma_side(const unsigned* in, const int* sel, float* out, int iters) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    load6(in + 6 * (32 * it + threadIdx.x), a, b);
    if (sel[32 * it + threadIdx.x]) {
      mma(d, a, b);
      float x = d[0];
#pragma unroll
      for (int k = 0; k < 16; ++k) x = __sinf(x) * __cosf(x + 1.f) + __expf(x * 0.5f);
      d[1] += x;
    } else {
      mma(d, a, a);
      mma(d, b, a);
      mma(d, a, b);
      float x = d[2];
#pragma unroll
      for (int k = 0; k < 2; ++k) x = __sinf(x) * __cosf(x + 1.f) + __expf(x * 0.5f);
      d[3] += x;
    }
  }
  store4(out, d);
}

template <int INNER>  // 1 mma in the outer body, a rolled inner loop of INNER iterations with 2 each
__global__ void nested(const unsigned* in, float* out, int iters) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    load6(in + 6 * (32 * it + threadIdx.x), a, b);
    mma(d, a, b);
#pragma unroll 1
    for (int k = 0; k < INNER; ++k) {
      unsigned a2[4], b2[2];
      load6(in + 6 * (32 * (it + k) + threadIdx.x) + 3, a2, b2);
      mma(d, a2, b);
      mma(d, a, b2);
    }
  }
  store4(out, d);
}

// The inner loop's counter starts at the warp index: taken as 0 (3 iterations).
__global__ void nested_warp_start(const unsigned* in, float* out, int iters) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    load6(in + 6 * (32 * it + threadIdx.x), a, b);
    mma(d, a, b);
#pragma unroll 1
    for (int u = threadIdx.x / 32; u < 3; ++u) {
      unsigned a2[4], b2[2];
      load6(in + 6 * (32 * (it + u) + threadIdx.x), a2, b2);
      mma(d, a2, b2);
    }
  }
  store4(out, d);
}

__global__ void no_loop(const unsigned* in, float* out) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
  load6(in + 6 * threadIdx.x, a, b);
  mma(d, a, b);
  store4(out, d);
}

// An optional output behind a parameter flag, and atomics behind a bounds check.
struct FlagParams { const unsigned* in; float* out; float* extra; int iters; int n; int flag; };
__global__ void flagged(const FlagParams p) {
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  unsigned a[4], b[2];
#pragma unroll 1
  for (int it = 0; it < p.iters; ++it) {
    load6(p.in + 6 * (32 * it + threadIdx.x), a, b);
    mma(d, a, b);
    const int i = 32 * it + threadIdx.x;
    if (p.flag) {
      float x = d[1];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        x = __sinf(x) + __cosf(x);
        p.extra[8 * i + k] = x;
      }
    }
    if (i < p.n) {
#pragma unroll
      for (int k = 0; k < 4; ++k) atomicAdd(p.out + 4 * i + k, d[k]);
    }
  }
}

// Reads only its third parameter: where the parameters start in constant bank 0.
__global__ void third_param(int a, int b, int c, int* out) { *out = c; }
"""
NAMES = ("loop_n<1>", "loop_n<3>", "loop_n<8>", "if_else", "more_mma_side", "nested<4>", "nested<7>",
         "nested_warp_start", "no_loop", "flagged", "third_param")


@pytest.fixture(scope="module")
def sm80():
    """{name expression: Function} of KERNELS compiled for sm_80."""
    res = sass.compile_sass(KERNELS, NAMES, "sm_80")
    funcs = sass.parse_sass(res["sass"])
    return {n: funcs[res["lowered"][n]] for n in NAMES}


def _path(func, cbank=None) -> sass.Cost:
    return sass.analyze(func, cbank).path.cost


# ---------------------------------------------------------------------------------------------------
# Small kernels compiled with NVRTC.


@needs_tools
def test_tools_available():
    assert _tools_missing() is None, _tools_missing()


@needs_tools
@pytest.mark.parametrize("n", [1, 3, 8])
def test_loop_of_n_mma_gives_n_hmma(sm80, n):
    c = _path(sm80[f"loop_n<{n}>"])
    assert c.tensor == n and c.opcodes["HMMA"] == n
    assert c.tensor_fma == Counter({("HMMA", "f16"): n * 16 * 8 * 16})
    assert c.classes["global"] == 6  # the six operand loads of one iteration
    assert not c.loops


@needs_tools
def test_if_else_takes_the_shorter_side(sm80):
    f = sm80["if_else"]
    cfg = sass.build_cfg(f)
    loops = sass.find_loops(cfg)
    body = loops[sass.main_loop(cfg, loops)].body
    assert sum(x.base == "MUFU" for b in body for x in cfg.instrs(b)) >= 16  # the long side is in the loop
    c = _path(f)
    assert c.tensor == 2 and c.classes["mufu"] == 0


@needs_tools
def test_more_tensor_instructions_win_over_fewer_instructions(sm80):
    c = _path(sm80["more_mma_side"])
    assert c.tensor == 3
    assert c.classes["mufu"] == 6  # the short chain: 2 x (sin, cos, ex2), not the long side's 48


@needs_tools
@pytest.mark.parametrize("inner", [4, 7])
def test_nested_loop_expanded_by_its_constant_trip_count(sm80, inner):
    f = sm80[f"nested<{inner}>"]
    cfg = sass.build_cfg(f)
    loops = sass.find_loops(cfg)
    main = sass.main_loop(cfg, loops)
    assert loops[main].parent is None and len(loops[main].children) == 1  # the outer loop is the main one
    c = _path(f)
    assert c.tensor == 1 + 2 * inner
    assert [tc for _, tc in c.loops] == [sass.TripCount(inner, "constant")]
    assert c.classes["global"] == 6 * (1 + inner)


@needs_tools
def test_nested_loop_with_run_time_start_taken_from_zero(sm80):
    c = _path(sm80["nested_warp_start"])
    assert [tc for _, tc in c.loops] == [sass.TripCount(3, "start assumed 0")]
    assert c.tensor == 1 + 3


@needs_tools
def test_kernel_without_a_loop_raises(sm80):
    with pytest.raises(sass.SassError, match="no loop"):
        sass.analyze(sm80["no_loop"])


def _flag_params(flag: int) -> bytes:
    return struct.pack("<QQQiii", 1 << 40, 2 << 40, 3 << 40, 100, 1000, flag)


@needs_tools
def test_parameters_decide_the_optional_branch(sm80):
    f = sm80["flagged"]
    off = _path(f, sass.constant_bank("sm_80", _flag_params(0), 32))
    on = _path(f, sass.constant_bank("sm_80", _flag_params(1), 32))
    unknown = _path(f)
    # flag = 0: the optional stores and their math are off the path; the bounds-checked atomics stay
    assert off.opcodes["STG"] == 0 and off.classes["mufu"] == 0 and off.opcodes["RED"] == 4
    assert on.opcodes["STG"] == 8 and on.classes["mufu"] == 16 and on.opcodes["RED"] == 4
    # unknown flag: the side with more global-memory instructions
    assert unknown.opcodes["STG"] == 8 and unknown.opcodes["RED"] == 4
    assert off.tensor == on.tensor == 1


@needs_tools
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_parameter_base_of_constant_bank(arch):
    res = sass.compile_sass(KERNELS, ("third_param",), arch)
    text = res["sass"]
    assert f"c[0x0][{sass.arch_model(arch).param_base + 8:#x}]" in text


@needs_tools
def test_sm_90a_is_accepted():
    res = sass.compile_sass(KERNELS, ("loop_n<3>",), "sm_90a")
    c = _path(sass.parse_sass(res["sass"])[res["lowered"]["loop_n<3>"]])
    assert c.tensor == 3


WGMMA = r"""
__global__ void wg(float* out, unsigned long long da, unsigned long long db, int iters) {
  float d[32];
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
#pragma unroll 1
  for (int it = 0; it < iters; ++it) {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
    asm volatile("{ .reg .pred p; setp.ne.b32 p, 1, 0; wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 "{REGS}, %32, %33, p, 1, 1, 0, 0; }" : OUTS : "l"(da + it), "l"(db));
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
  }
  for (int i = 0; i < 32; ++i) out[32 * threadIdx.x + i] = d[i];
}
""".replace("REGS", ",".join(f"%{i}" for i in range(32))).replace("OUTS", ", ".join(f'"+f"(d[{i}])' for i in range(32)))


@needs_tools
def test_hgmma_on_sm_90a():
    """A warpgroup mma: one HGMMA.64x64x16 per iteration, a quarter of its 64*64*16 multiply-adds
    per warp, at the wgmma rate of the model."""
    res = sass.compile_sass(WGMMA, ("wg",), "sm_90a")
    c = _path(sass.parse_sass(res["sass"])[res["lowered"]["wg"]])
    assert c.tensor == 1 and c.opcodes["HGMMA"] == 1
    assert c.tensor_fma == Counter({("HGMMA", "bf16"): 64 * 64 * 16 // 4})
    assert sass.model("sm_90a", c, warps=4).tensor == 4 * (64 * 64 * 16 // 4) / 512 / 4
    with pytest.raises(sass.SassError, match="HGMMA"):
        sass.model("sm_90", c, warps=4)


@needs_tools
def test_complete_elf_restores_a_short_cubin():
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(KERNELS, "k.cu", [], [])
    try:
        nvrtc.addNameExpression(prog, "no_loop")
        nvrtc.compileProgram(prog, ["-arch=sm_80"])
        cubin = nvrtc.getCUBIN(prog)
    finally:
        nvrtc.destroyProgram(prog)
    full = sass.complete_elf(cubin)
    assert len(full) >= len(cubin) and full.startswith(cubin)
    assert sass.complete_elf(full[:-3]) == full
    assert "HMMA" in sass.disassemble(cubin)


# ---------------------------------------------------------------------------------------------------
# The parser and the flow analysis on canned nvdisasm text (no tools needed).

CANNED = """
//--------------------- .text.k --------------------------
	.section	.text.k,"ax",@progbits
	.sectionflags	@"SHF_BARRIERS=1"
	.align	128
.text.k:
        .type           k,@function
k:
        /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;
        /*0010*/                   ISETP.NE.AND P1, PT, RZ, c[0x0][0x164], PT ;
        /*0020*/                   IMAD.MOV.U32 R2, RZ, RZ, RZ ;
.L_x_0:
        /*0030*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0040*/              @!P1 BRA `(.L_x_1) ;
        /*0050*/                   FMUL R3, R3, 1.4426950216293334961 ;
        /*0060*/                   MUFU.EX2 R3, R3 ;
.L_x_1:
        /*0070*/                   VIADD R2, R2, 0x10 ;
        /*0080*/                   ISETP.GE.U32.AND P0, PT, R2, 0x40, PT ;
        /*0090*/              @!P0 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_2:
        /*00b0*/                   BRA `(.L_x_2);
        /*00c0*/                   NOP;
"""


def test_parse_sass_fields():
    f = sass.parse_sass(CANNED)["k"]
    assert len(f.instrs) == 13
    assert f.labels == {".text.k": 0, "k": 0, ".L_x_0": 3, ".L_x_1": 7, ".L_x_2": 11}
    br = f.instrs[4]
    assert (br.offset, br.guard, br.opcode, br.target, br.base) == (0x40, "@!P1", "BRA", ".L_x_1", "BRA")
    h = f.instrs[3]
    assert (h.opcode, h.operands) == ("HMMA.16816.F32", "R4, R8, R12, R4")
    assert sass.tensor_work(h) == ("f16", 2048)
    assert [sass.opcode_class(x) for x in f.instrs[4:10]] == ["control", "fp32", "mufu", "int", "pred", "control"]


def test_cfg_loops_and_trip_count_on_canned_text():
    f = sass.parse_sass(CANNED)["k"]
    cfg = sass.build_cfg(f)
    starts = [f.instrs[lo].offset for lo, _ in cfg.blocks]
    assert starts == [0x00, 0x30, 0x50, 0x70, 0xa0]  # the self-loop padding after EXIT is unreachable
    assert cfg.succ == [[1], [3, 2], [3], [1, 4], []]
    loops = sass.find_loops(cfg)
    assert len(loops) == 1 and loops[0].header == 1 and loops[0].latches == (3,)
    assert sass.trip_count(cfg, sass.dominators(cfg), loops[0]) == sass.TripCount(4, "constant")
    c = _path(f)
    assert c.tensor == 1 and c.instructions == 5 and c.classes["mufu"] == 0  # skips the optional block


def test_parameters_prune_canned_branch():
    f = sass.parse_sass(CANNED)["k"]
    base = 0x160
    on = _path(f, {base + 4: 1})  # c[0x0][0x164] != 0: the FMUL/MUFU block is always run
    assert on.instructions == 7 and on.classes["mufu"] == 1
    off = _path(f, {base + 4: 0})
    assert off.instructions == 5
    pruned = sass.propagate(sass.build_cfg(f), {base + 4: 0})
    assert len(pruned.blocks) == 4


def _loop_text(prologue: str, body: str) -> str:
    lines = ["\t.section\t.text.k,\"ax\",@progbits"]
    off = 0
    for part, label in ((prologue, None), (body, ".L_x_0:")):
        if label:
            lines.append(label)
        for ins in filter(None, (x.strip() for x in part.split(";"))):
            lines.append(f"        /*{off:04x}*/                   {ins} ;")
            off += 16
    lines.append(f"        /*{off:04x}*/                   EXIT ;")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("prologue, body, want", [
    # counter copied before its step and compared (bwd_dkdv's dQ unit loop): u = warp .. 3
    ("S2R R0, SR_TID.X; SHF.R.U32.HI R9, RZ, 0x5, R0",
     "IMAD.MOV.U32 R5, RZ, RZ, R9; VIADD R9, R9, 0x1; ISETP.GE.AND P0, PT, R5, 0x3, PT; "
     "HMMA.16816.F32 R12, R4, R8, R12; @!P0 BRA `(.L_x_0)", (4, "start assumed 0")),
    # the next value computed into a temporary, compared before the move (a cp.async row loop)
    ("IMAD.MOV.U32 R6, RZ, RZ, 0x10",
     "VIADD R7, R6, 0x10; HMMA.16816.F32 R12, R4, R8, R12; ISETP.GE.AND P0, PT, R6, 0x30, PT; "
     "IMAD.MOV.U32 R6, RZ, RZ, R7; @!P0 BRA `(.L_x_0)", (3, "constant")),
    # start = thread index - 16, stepped by 16 before the test: 0, 16, 32, 48
    ("S2R R10, SR_TID.X; VIADD R42, R10, 0xfffffff0",
     "VIADD R42, R42, 0x10; ISETP.GE.AND P1, PT, R42, 0x30, PT; @!P1 BRA `(.L_x_0)", (4, "start assumed 0")),
    # exit test against RZ (u = warp; u < 4; u += 4 rewritten as u_old >= 0)
    ("S2R R0, SR_TID.X; SHF.R.S32.HI R39, RZ, 0x5, R0",
     "IMAD.MOV.U32 R54, RZ, RZ, R39; IADD3 R39, R39, 0x4, RZ; ISETP.GE.AND P3, PT, R54, RZ, PT; "
     "@!P3 BRA `(.L_x_0)", (1, "start assumed 0")),
    # unsigned test, constant start, a uniform-register counter
    ("UMOV UR4, 0x2",
     "UIADD3 UR4, UR4, 0x2, URZ; UISETP.NE.U32.AND UP0, UPT, UR4, 0xa, UPT; @UP0 BRA `(.L_x_0)", (4, "constant")),
    # the bound is a run-time value: unknown
    ("MOV R2, RZ", "VIADD R2, R2, 0x1; ISETP.GE.AND P0, PT, R2, c[0x0][0x160], PT; @!P0 BRA `(.L_x_0)", (None, None)),
    # the counter is stepped twice: unknown
    ("MOV R2, RZ", "VIADD R2, R2, 0x1; VIADD R2, R2, 0x1; ISETP.GE.AND P0, PT, R2, 0x8, PT; @!P0 BRA `(.L_x_0)",
     (None, None)),
])
def test_trip_count_forms(prologue, body, want):
    f = sass.parse_sass(_loop_text(prologue, body))["k"]
    cfg = sass.build_cfg(f)
    (loop,) = sass.find_loops(cfg)
    tc = sass.trip_count(cfg, sass.dominators(cfg), loop)
    assert tc.value == want[0]
    if want[1] is not None:
        assert tc.how == want[1]
    else:
        assert tc.how.startswith("unknown")


@pytest.mark.parametrize("ops, cbank, want", [
    # 64-bit pointer != 0: low word, then .EX on the high word chained with the low result
    (("ISETP.NE.U32.AND P0, PT, RZ, c[0x0][0x170], PT", "ISETP.NE.AND.EX P0, PT, RZ, c[0x0][0x174], PT, P0"),
     {0x170: 0, 0x174: 0}, 0),
    (("ISETP.NE.U32.AND P0, PT, RZ, c[0x0][0x170], PT", "ISETP.NE.AND.EX P0, PT, RZ, c[0x0][0x174], PT, P0"),
     {0x170: 0, 0x174: 0x7f00}, 1),
    # a combining predicate that decides the result whatever the unknown comparison gives
    (("PLOP3.LUT P1, PT, PT, PT, PT, 0x80, 0x0", "ISETP.GE.OR P0, PT, R3, R4, P1"), {}, 1),
    (("PLOP3.LUT P1, PT, PT, PT, PT, 0x8, 0x0", "ISETP.GE.AND P0, PT, R3, R4, P1"), {}, 0),
    # PLOP3 whose LUT ignores its unknown input: P0 = P1 | !P2 with P1 = 1
    (("PLOP3.LUT P1, PT, PT, PT, PT, 0x80, 0x0", "PLOP3.LUT P0, PT, P1, P2, PT, 0xf8, 0x0"), {}, 1),
    (("IMAD.MOV.U32 R2, RZ, RZ, c[0x0][0x170]", "LOP3.LUT P0, RZ, R2, 0x4, RZ, 0xc0, !PT"), {0x170: 6}, 1),
    (("CS2R R2, SRZ", "IADD3 R2, R2, 0x5, RZ", "ISETP.GT.AND P0, PT, R2, 0x4, PT"), {}, 1),
    (("ISETP.GE.AND P0, PT, R7, 0x4, PT",), {}, None),
])
def test_predicate_evaluation(ops, cbank, want):
    ev = sass_cfg._Eval(cbank)
    st = {}
    for k, text in enumerate(ops):
        opcode, _, operands = text.partition(" ")
        sass_cfg._transfer(ev, sass.Instr(16 * k, "", opcode, operands), st, {})
    assert st.get("P0") == want


def test_irreducible_flow_is_an_error():
    text = """	.section	.text.k,"ax",@progbits
        /*0000*/              @P0 BRA `(.L_x_1) ;
.L_x_0:
        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_1:
        /*0020*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0030*/              @P1 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""
    f = sass.parse_sass(text)["k"]
    with pytest.raises(sass.SassError, match="irreducible"):
        sass.find_loops(sass.build_cfg(f))


# ---------------------------------------------------------------------------------------------------
# Occupancy and the throughput model (arithmetic, no tools).


@pytest.mark.parametrize("arch, regs, threads, smem, want", [
    # 158 regs -> 5120 per warp -> 3 warps per sub-partition -> 12 warps = 3 blocks of 4; smem also 3
    ("sm_80", 158, 128, 46208, (3, "registers")),
    # 87168 + 1 KB reserved per block: one block in 164 KB
    ("sm_80", 214, 128, 87168, (1, "shared memory")),
    ("sm_90", 220, 128, 87168, (2, "registers")),
    ("sm_80", 32, 1024, 0, (2, "registers")),
    ("sm_90", 16, 32, 0, (32, "blocks")),
    ("sm_80", 64, 128, 164 * 1024, (0, "shared memory")),  # above the per-block opt-in
])
def test_blocks_per_sm(arch, regs, threads, smem, want):
    assert sass.blocks_per_sm(arch, regs, threads, smem) == want


def test_model_cycles():
    c = sass.Cost(classes=Counter({"tensor": 68, "mufu": 32, "int": 400}),
                  tensor_fma=Counter({("HMMA", "f16"): 68 * 2048}), smem_bytes=20864)
    m = sass.model("sm_80", c, warps=4)
    assert m.tensor == 4 * 68 * 2048 / 256 / 4  # 544: one tensor core per sub-partition
    assert m.smem == 4 * 20864 / 128
    assert m.issue == 4 * 500 / 4
    assert m.mufu == 4 * 32 * 32 / 16
    assert m.bound == "smem" and m.cycles == m.smem and m.tensor_share == pytest.approx(544 / 652)
    m90 = sass.model("sm_90", c, warps=4)
    assert m90.tensor == pytest.approx(544 * 256 / (512 * 2 / 3))
    with pytest.raises(ValueError, match="arch"):
        sass.model("sm_75", c, 4)


def test_smem_bytes_per_instruction():
    mk = lambda op: sass.Instr(0, "", op, "R0, [R1]")  # noqa: E731
    assert [sass.smem_bytes(mk(o)) for o in ("LDSM.16.M88.4", "LDSM.16.MT88.2", "LDSM.16.M88", "LDS.128",
                                             "LDS.64", "LDS", "LDS.U8", "LDGSTS.E.BYPASS.128", "LDG.E")] == \
        [512, 256, 128, 512, 256, 128, 128, 512, 0]


# ---------------------------------------------------------------------------------------------------
# The package's kernels.


@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "sm_90a"])
def test_profiled_kernels_resolve_to_registered_instantiations(arch):
    registry = {(s.source, s.name): s for s in launch.kernel_registry()}
    for p in sass.PROFILED_KERNELS:
        inst = p.resolve(arch)
        if inst is None:  # a kernel that does not exist on this architecture: the sm_90a-only Hopper forward
            assert p.kind.startswith("fwd_sm90") and arch != "sm_90a", (p.label, arch)
            continue
        spec = registry[(inst.source, inst.name)]
        assert (inst.threads, inst.smem) == (spec.threads, spec.smem)
        assert inst.smem <= sass.arch_model(arch).smem_per_block
    assert {p.kind for p in sass.PROFILED_KERNELS} == set(sass.KINDS)
    assert [p.label for p in sass.select(r"^fwd fp16 D=64$")] == ["fwd fp16 D=64"]


@pytest.fixture(scope="module")
def fwd_rows():
    return sass.profile(["sm_80"], sass.select(r"^fwd fp16 D=64$"), jobs=1)


@needs_tools
def test_forward_kernel_counts_match_its_tile_shape(fwd_rows):
    (row,) = fwd_rows
    assert row.error is None, row.error
    dp, threads = 64, tiles.FWD_THREADS
    tile = tiles.fwd_tile("float16", dp, limits.SMEM_OPTIN_BY_ARCH["sm_80"])
    assert row.inst.name == registry.fwd_name("float16", dp, tile, tiles.FWD_FIXED)
    bn, mt = tile.bn, tile.bm // (threads // 32) // 16
    assert mt == 2  # two m16 row tiles per warp: each K/V fragment feeds 4 mma
    c = row.cost
    # S = Q K^T: (BN / 8) n-tiles x (DP / 16) k-steps; O += P V: (DP / 8) x (BN / 16); the row sums: one
    # mma per 16-key k-step against an all-ones operand; all per row tile.
    assert c.tensor == mt * ((bn // 8) * (dp // 16) + (dp // 8) * (bn // 16) + bn // 16) == 136
    # ldmatrix.x4 of K (two 8-key tiles per 16 dims) and of V^T (two 8-dim tiles per 16 keys), shared by
    # the row tiles; Q's A fragments are all held in registers at this head dim (forward.cu QRegSteps:
    # O, S and Q take 64 + 64 + 32 of its 184-register budget), so none is re-read in the loop
    assert c.classes["ldsm"] == 2 * (dp // 16) * (bn // 16) == 32
    # one ex2 per score: 32 rows x BN keys over 32 lanes
    assert c.classes["mufu"] == 16 * mt * bn // 32
    # the next tile's K and V, 16-byte cp.async chunks spread over the block's threads
    assert c.opcodes["LDGSTS"] == c.live_global == 2 * bn * dp * 2 // 16 // threads
    assert not c.loops and not c.calls
    assert row.regs > 0 and row.spills == (0, 0) and row.blocks >= 2
    assert row.model.tensor == pytest.approx(4 * 136 * 2048 / 256 / 4)


@needs_tools
def test_decode_kernel_counts_match_its_tile_shape():
    """decode_fwd for single-token GQA 8:1 (WM = 1: four warps share 16 rows, KT = BN / 4 keys each)."""
    (row,) = sass.profile(["sm_80"], sass.select(r"^decode fp16 D=64$"), jobs=1)
    assert row.error is None, row.error
    dp, threads = 64, tiles.DECODE_THREADS
    wm, bn = tiles.decode_config("float16", dp, sass.REP_DECODE_H // sass.REP_DECODE_HK,
                                 limits.SMEM_OPTIN_BY_ARCH["sm_80"])
    assert (wm, bn) == (1, 64)
    assert row.inst.name == registry.decode_name("float16", dp, bn, wm, False)
    kt = bn // (threads // 32)  # each warp's keys of a tile
    c = row.cost
    assert c.tensor == (kt // 8) * (dp // 16) + (dp // 8) * (kt // 16) + kt // 16 == 17
    assert c.classes["ldsm"] == 2 * (dp // 16) * (kt // 16)
    assert c.classes["mufu"] == 16 * kt // 32
    # the next tile's K and V in 16-byte cp.async pieces, and one block-table entry per warp (its
    # 16-key group's page)
    assert c.opcodes["LDGSTS"] == 2 * bn * dp * 2 // 16 // threads
    assert c.opcodes["LDG"] == 1
    assert row.regs > 0 and row.spills == (0, 0) and row.blocks >= 2


def test_main_prints_the_tables(monkeypatch, capsys, fwd_rows):
    if fwd_rows[0].error is not None:
        pytest.skip(f"the forward kernel did not compile here: {fwd_rows[0].error}")
    monkeypatch.setattr(sass, "profile", lambda archs, kernels, jobs: fwd_rows)
    monkeypatch.setattr(sass, "find_nvdisasm", lambda: "nvdisasm")
    assert sass.main(["--arch", "sm_80", "--kernels", "^fwd fp16 D=64$", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| fwd fp16 D=64 | sm_80 |" in out and "| 136 |" in out
    assert resources.main(["--sass", "--arch", "sm_80", "--match", "^fwd fp16 D=64$"]) == 0
    assert "fwd fp16 D=64" in capsys.readouterr().out


def test_main_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        sass.main(["--arch", "sm_75"])
    assert sass.main(["--kernels", "no such kernel"]) == 1
    assert "no profiled kernel matches" in capsys.readouterr().err
