// hopper.cpp — the emulator's model of the sm_90a primitives of cuda_src/hopper.cuh: warpgroup MMA
// with shared-memory matrix descriptors, mbarriers with transaction counts, named barriers, the async
// proxy, elect.sync, setmaxnreg and TMA bulk tensor copies.
//
// This file is part of libcaemu: runtime.cpp includes it at its end, so it works with the runtime's
// fibers, blocks and run queue directly. runtime.cpp calls four hooks: hopper_block_start (a block
// begins), hopper_thread_exit (a thread returns from the kernel), hopper_progress (no thread can run:
// land an in-flight TMA load, which may wake waiters) and hopper_blocked_detail (the deadlock report).
//
// Model (docs/emulator.md, "The Hopper model", says more):
//  * A warpgroup is 4 consecutive warps starting at a multiple of 4. wgmma.mma_async and setmaxnreg
//    are warpgroup collectives: each thread deposits its operands and blocks until all 128 have
//    arrived; they must agree on every operand but their registers.
//  * Asynchrony. An issued wgmma, TMA load or TMA store is performed (operands read, results written)
//    at one point the emulator chooses between its issue and the wait that retires it: at the wait
//    (wgmma, stores) or when no thread can run any more (loads) in the deterministic mode; in
//    interleave mode, seeded per operation, at issue, at that latest point, or after a random number
//    of Hopper events of the block (calls of these primitives by any of its threads).
//  * The async proxy (wgmma operands, TMA store sources) reads a separate copy of dynamic shared
//    memory that plain stores reach only through fence.proxy.async (any thread's fence publishes all
//    plain stores so far: a missing fence is caught when no thread fences). TMA loads write both.
//  * Completion as threads see it. Each thread knows, per warpgroup, up to which wgmma (counted in
//    issue order) the warpgroup's wgmmas are complete: its own wgmma.wait_group tells it, and so does
//    what another thread knew when it arrived on an mbarrier phase (or a named barrier, or
//    __syncthreads) that this thread then passed. A write into shared memory that a wgmma reads which
//    the writing thread does not know to be complete is a race, reported at once whatever the
//    interleaving: a TMA load at its issue, a plain store (race mode) when it is made.
//  * Shared-window addresses: dynamic shared memory starts at address kDynSmemBase.
#include "hopper.h"

#include <algorithm>
#include <unordered_map>

namespace {

const int F_HOPPER = 16;               // fiber state: blocked in an mbarrier wait, bar.sync or a warpgroup collective
const uint32_t kDynSmemBase = 1024;    // shared-window address of dynamic shared memory (1024-byte aligned)
const uint32_t kMbarMaxCount = (1u << 20) - 1;  // arrival and tx-count limits of an mbarrier
const int64_t kMbarMaxTx = (1 << 20) - 1;
const int kWarpgroup = 128;
const int kMaxWarpgroups = 8;          // 1024 threads

// What a thread knows of wgmma completion: per warpgroup, the count of its wgmmas (in issue order,
// from 1) known complete. wgmmas of a warpgroup complete in order, so one count says it all.
struct Seen {
  uint32_t wg[kMaxWarpgroups] = {0, 0, 0, 0, 0, 0, 0, 0};
  void join(const Seen& o) {
    for (int i = 0; i < kMaxWarpgroups; ++i) wg[i] = std::max(wg[i], o.wg[i]);
  }
};

enum WaitKind : int { W_NONE, W_MBAR, W_NAMED, W_WG };
enum GatherKind : int { G_NONE, G_WGMMA, G_SETMAXNREG };

struct HopThread {
  int wait = W_NONE;
  uintptr_t wait_bar = 0;
  uint32_t wait_parity = 0, wait_id = 0;
  bool timed_out = false;       // woken from mbarrier.try_wait by its time limit, not by the phase
  bool fenced = false;          // a wgmma.fence since the start or since the last wait that retired a wgmma
  const char* unfenced_since = "the start of the kernel";
  uint64_t wg_commits = 0;      // wgmma.commit_group executed: the id of the open (uncommitted) group
  uint64_t wg_retired = 0;      // wgmma groups below this id have been waited for
  uint64_t bulk_commits = 0;    // cp.async.bulk.commit_group executed
  uint64_t bulk_retired = 0;
  Seen seen;                    // wgmma completion this thread knows of (its waits, the barriers it passed)
};

struct Mbar {
  uint32_t expected = 0, pending = 0;  // arrivals per phase, arrivals still missing in the current phase
  int64_t tx = 0;                      // transaction count (bytes expected minus bytes delivered)
  uint64_t phase = 0;                  // completed phases; the current phase has parity phase & 1
  uint64_t word = 0;                   // what the emulator last wrote into the object's 8 bytes
  Seen arrived;                        // what the arrivals of the current phase knew (release)
  Seen completed;                      // ... of every completed phase: a thread passing a wait learns it (acquire)
};

// One issued wgmma. It is performed (operands read, D computed) once; each thread's accumulators are
// written back when that thread waits for it, or at once when it is performed (seeded, interleave
// mode), or before a later wgmma of the warpgroup is performed (they complete in order).
struct WgmmaOp {
  uint64_t seq = 0;
  int wg = 0;
  uint32_t ordinal = 0;            // its place among the wgmmas of its warpgroup, from 1
  uint64_t group = 0;
  caemu_wgmma_args args{};  // common operands (thread 0's d / a pointers unused)
  float* d[kWarpgroup];
  const uint32_t* a[kWarpgroup];
  bool executed = false;
  bool writeback_at_once = false;
  bool written[kWarpgroup];
  bool retired = false;            // a thread of the warpgroup has waited for it: it is complete
  long countdown = -1;             // Hopper events until it is performed by itself; -1: only when forced
  std::vector<float> result;       // 128 x N/2, per thread, once performed
  std::vector<uint32_t> chunks;    // 16-byte chunks of shared memory (address >> 4) its operands read
};

struct TmaLoad {
  uint64_t seq = 0;
  int issuer = 0;
  uint32_t dst = 0;          // shared-window address
  int swizzle = 0;           // CUtensorMapSwizzle
  uintptr_t bar = 0;
  std::vector<unsigned char> data;  // the box, dense, read from global memory at issue
  long countdown = -1;
};

struct TmaStore {
  uint64_t seq = 0;
  int issuer = 0;
  uint64_t group = 0;
  caemu_tensormap map{};
  int32_t coords[5] = {0, 0, 0, 0, 0};
  uint32_t src = 0;
  bool executed = false;
  long countdown = -1;
};

struct Gather {  // a warpgroup collective in progress
  int kind = G_NONE;
  int count = 0;
  bool arrived[kWarpgroup];
  caemu_wgmma_args args[kWarpgroup];
  bool fenced[kWarpgroup];
  uint64_t commits[kWarpgroup];
  int inc[kWarpgroup];
  uint32_t nreg[kWarpgroup];
};

struct NamedBar {
  uint32_t count = 0, arrived = 0;
  std::vector<int> members;  // threads arrived in the current generation
  Seen seen;                 // what they knew of wgmma completion
};

// Per worker (a worker runs one block at a time): the Hopper state of its current block.
struct HopBlock {
  Block* B = nullptr;
  bool active = false;  // a Hopper primitive has run in this block
  std::vector<HopThread> th;
  std::vector<Gather> gathers;  // per warpgroup
  std::vector<uint32_t> maxnreg;  // per warpgroup: the setmaxnreg limit, 0 = as compiled
  std::unordered_map<uintptr_t, Mbar> mbars;
  NamedBar named[16];
  std::vector<WgmmaOp> wgmma;
  std::vector<TmaLoad> loads;
  std::vector<TmaStore> stores;
  std::vector<unsigned char> shadow;  // the async proxy's view of dynamic shared memory
  std::vector<std::vector<uint16_t>> issued;  // per warpgroup: the N of each wgmma issued, by ordinal - 1
  // Per warpgroup and 16-byte chunk of dynamic shared memory: the ordinal of the last wgmma of the
  // warpgroup that reads the chunk (0: none). Empty until the block's first wgmma.
  std::vector<uint32_t> readers;
  size_t nchunks = 0;
  uint64_t seq = 0;
  uint64_t epoch = 0;                 // counts changes of mbarriers and named barriers
  uint64_t timeout_epoch = ~0ull;     // epoch when waiting threads last timed out
};
thread_local HopBlock tl_hop;

// ---------------------------------------------------------------------------------------------
// Block state, addresses, small helpers.

inline uint64_t rnd(Block* B) { return splitmix(B->rng); }

HopBlock& hop(Fiber* f) {
  HopBlock& h = tl_hop;
  Block* B = &f->w->blk;
  if (h.B != B || !h.active) {
    h.B = B;
    h.active = true;
    h.th.assign(B->n, HopThread());
    h.gathers.assign((B->n + kWarpgroup - 1) / kWarpgroup, Gather());
    h.maxnreg.assign(h.gathers.size(), 0);
    h.mbars.clear();
    for (auto& nb : h.named) nb = NamedBar();
    h.wgmma.clear();
    h.loads.clear();
    h.stores.clear();
    h.seq = 0;
    h.issued.assign(h.gathers.size(), {});
    h.readers.clear();
    h.nchunks = (B->pub.dyn_smem_bytes + 15) / 16;
    h.epoch = 0;
    h.timeout_epoch = ~0ull;
    // The async proxy's view starts as the generic one: plain stores made before the block's first
    // Hopper primitive count as published.
    h.shadow.assign(B->pub.dyn_smem, B->pub.dyn_smem + B->pub.dyn_smem_bytes);
  }
  return h;
}

inline size_t dyn_bytes(Block* B) { return B->pub.dyn_smem_bytes; }

inline bool in_dyn(Block* B, const void* p, size_t n) {
  uintptr_t a = (uintptr_t)p, lo = (uintptr_t)B->pub.dyn_smem;
  return a >= lo && a + n <= lo + dyn_bytes(B);
}

bool in_static_shared(Worker* w, const void* p, size_t n) {
  uintptr_t a = (uintptr_t)p;
  for (auto& r : w->tls)
    if (r.base && a >= (uintptr_t)r.base && a + n <= (uintptr_t)r.base + r.size) return true;
  return false;
}

// Window address range check: [a, a+n) inside dynamic shared memory.
inline bool window_ok(Block* B, uint64_t a, uint64_t n) {
  return a >= kDynSmemBase && a + n <= kDynSmemBase + dyn_bytes(B);
}
inline unsigned char* host_of(Block* B, uint32_t a) { return B->pub.dyn_smem + (a - kDynSmemBase); }
inline uint32_t window_of(Block* B, const void* p) {
  return kDynSmemBase + (uint32_t)((const unsigned char*)p - B->pub.dyn_smem);
}

// The swizzle pattern on a shared-window address (CuTe Swizzle<B,4,3>): bits 4.. XOR bits 7.., B bits.
inline uint32_t swizzle_bits_of_span(uint32_t span) { return span == 128 ? 3 : span == 64 ? 2 : span == 32 ? 1 : 0; }
inline uint32_t swz(uint32_t addr, uint32_t bits) {
  uint32_t mask = (1u << bits) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}
// CUtensorMapSwizzle (0 none, 1 32B, 2 64B, 3 128B) is the number of XOR bits.
inline uint32_t tma_swizzle_bits(int s) { return (uint32_t)s; }

std::string where_str(Block* B, uintptr_t p) {
  if (in_dyn(B, (const void*)p, 1)) return fmt("shared address 0x%x", window_of(B, (const void*)p));
  return fmt("%p (static __shared__)", (void*)p);
}

void wake(Block* B, int linear) {
  Fiber* g = B->fibers[linear];
  if (g->state == F_HOPPER) {
    g->state = F_READY;
    rq_push(B, linear);
    note_progress(g->w);  // a completed phase or named barrier is progress for the watchdog
  }
}

void hwait(Fiber* f, HopThread& t, int kind) {
  t.wait = kind;
  block_wait(f, F_HOPPER);
  t.wait = W_NONE;
}

// Records an error found outside any thread's own instruction (an asynchronous operation landing).
void block_error(Block* B, const std::string& msg) {
  if (!B->failed) {
    B->failed = true;
    B->err = block_prefix(B) + ": " + msg;
  }
}

// Ends the calling thread after block_error recorded what went wrong (fail keeps the first message).
[[noreturn]] void fail_recorded(Fiber* f) { fail(f, "asynchronous operation failed"); }

std::string thread_name(Block* B, int linear) { return thread_str(B->fibers[linear]); }

// Threads of a warpgroup as ranges of linear ids, for messages.
std::string wg_threads_str(int wg, const bool* sel) {
  std::string s;
  int i = 0;
  while (i < kWarpgroup) {
    if (!sel[i]) { ++i; continue; }
    int j = i;
    while (j + 1 < kWarpgroup && sel[j + 1]) ++j;
    if (!s.empty()) s += ",";
    int a = wg * kWarpgroup + i, b = wg * kWarpgroup + j;
    s += a == b ? fmt("%d", a) : fmt("%d-%d", a, b);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

// ---------------------------------------------------------------------------------------------
// mbarrier objects.

uint64_t mbar_word(const Mbar& m) {
  return 0xCA5E000000000000ull | ((m.phase & 0xFFull) << 40) | ((uint64_t)(m.pending & 0xFFFFFu) << 20) |
         ((uint64_t)m.tx & 0xFFFFFull);
}

std::string mbar_state_str(const Mbar& m) {
  return fmt("phase %llu (parity %llu) has %u of %u arrivals, tx-count %lld bytes", (unsigned long long)m.phase,
             (unsigned long long)(m.phase & 1), m.expected - m.pending, m.expected, (long long)m.tx);
}

void mbar_store(HopBlock& h, uintptr_t key, Mbar& m) {
  m.word = mbar_word(m);
  *(uint64_t*)key = m.word;
  h.epoch++;
}

void check_mbar_pointer(Fiber* f, const void* bar, const char* what) {
  Block* B = &f->w->blk;
  if ((uintptr_t)bar & 7)
    fail(f, fmt("%s by %s: mbarrier address %p is not 8-byte aligned", what, thread_str(f).c_str(), bar));
  if (!in_dyn(B, bar, 8) && !in_static_shared(f->w, bar, 8))
    fail(f, fmt("%s by %s: %p is not in shared memory (an mbarrier is a shared-memory object)", what,
                thread_str(f).c_str(), bar));
}

Mbar& get_mbar(Fiber* f, HopBlock& h, uint64_t* bar, const char* what) {
  check_mbar_pointer(f, bar, what);
  Block* B = &f->w->blk;
  auto it = h.mbars.find((uintptr_t)bar);
  if (it == h.mbars.end())
    fail(f, fmt("%s by %s on the mbarrier at %s, which was never initialized (mbarrier.init)", what,
                thread_str(f).c_str(), where_str(B, (uintptr_t)bar).c_str()));
  if (*bar != it->second.word)
    fail(f, fmt("%s by %s: the mbarrier at %s was overwritten by a plain store since its last mbarrier "
                "operation (it is an opaque object; only mbarrier instructions may touch it)",
                what, thread_str(f).c_str(), where_str(B, (uintptr_t)bar).c_str()));
  return it->second;
}

// After a change: complete the phase if every arrival and every expected byte is in, and wake the
// threads waiting for it. Returns false (and records the error) on an inconsistent state.
bool mbar_settle(HopBlock& h, uintptr_t key, Mbar& m, std::string* err) {
  Block* B = h.B;
  if (m.tx > kMbarMaxTx || m.tx < -kMbarMaxTx) {
    *err = fmt("the tx-count of the mbarrier at %s left its range +-(2^20-1) (%lld)", where_str(B, key).c_str(),
               (long long)m.tx);
    return false;
  }
  if (m.pending == 0 && m.tx < 0) {
    *err = fmt("the mbarrier at %s received %lld bytes more than its phase %llu expects (expect_tx) after all %u "
               "arrivals: the expect_tx byte counts are smaller than the bytes its copies deliver",
               where_str(B, key).c_str(), (long long)-m.tx, (unsigned long long)m.phase, m.expected);
    return false;
  }
  if (m.pending == 0 && m.tx == 0) {
    m.phase++;
    m.pending = m.expected;
    m.completed.join(m.arrived);
    m.arrived = Seen();
    for (int i = 0; i < (int)h.th.size(); ++i) {
      HopThread& t = h.th[i];
      if (t.wait == W_MBAR && t.wait_bar == key && (m.phase & 1) != t.wait_parity) wake(B, i);
    }
  }
  mbar_store(h, key, m);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Descriptor-addressed wgmma operands.

struct Desc {
  uint32_t start, lbo, sbo, base_offset, layout;  // layout: 0 none, 1 128B, 2 64B, 3 32B
  uint32_t span() const { return layout == 1 ? 128 : layout == 2 ? 64 : layout == 3 ? 32 : 0; }
};

Desc decode_desc(uint64_t d) {
  Desc r;
  r.start = (uint32_t)(d & 0x3FFF) << 4;
  r.lbo = (uint32_t)((d >> 16) & 0x3FFF) << 4;
  r.sbo = (uint32_t)((d >> 32) & 0x3FFF) << 4;
  r.base_offset = (uint32_t)((d >> 49) & 7);
  r.layout = (uint32_t)(d >> 62);
  return r;
}
const uint64_t kDescFieldMask = 0x3FFFull | (0x3FFFull << 16) | (0x3FFFull << 32) | (7ull << 49) | (3ull << 62);

// Shared-window byte address of element (mn, k) (k = 0..15) of a 16-bit operand, from the canonical
// layouts of the PTX ISA ("Canonical Layouts", T = 8 elements = 16 bytes, W = span / 16):
//   K-major,  none:  ((8,m),(T,2k)):((1T,SBO),(1,LBO))    K-major,  W: ((8,m),(T,2k)):((W*T,SBO),(1,T))
//   MN-major, none:  ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))  MN-major, W: ((T,W,m),(8,k)):((1,T,LBO),(W*T,SBO))
// then the swizzle applied to the address.
uint32_t operand_addr(const Desc& d, bool mn_major, uint32_t mn, uint32_t k) {
  uint32_t span = d.span();
  uint32_t off;
  if (!mn_major) {
    if (span == 0)
      off = (mn % 8) * 16 + (mn / 8) * d.sbo + (k % 8) * 2 + (k / 8) * d.lbo;
    else
      off = (mn % 8) * span + (mn / 8) * d.sbo + k * 2;
  } else {
    if (span == 0) {
      off = (mn % 8) * 2 + (mn / 8) * d.sbo + (k % 8) * 16 + (k / 8) * d.lbo;
    } else {
      uint32_t w = span / 16;
      off = (mn % 8) * 2 + ((mn / 8) % w) * 16 + (mn / (8 * w)) * d.lbo + (k % 8) * span + (k / 8) * d.sbo;
    }
  }
  uint32_t a = d.start + off;
  return span ? swz(a, swizzle_bits_of_span(span)) : a;
}

// Checks a descriptor operand of `rows` x 16 elements and adds the 16-byte chunks it reads to
// *chunks; returns an empty string or what is wrong.
std::string check_operand(Block* B, uint64_t raw, bool mn_major, uint32_t rows, const char* name,
                          std::vector<uint32_t>* chunks) {
  if (raw & ~kDescFieldMask)
    return fmt("descriptor of %s (0x%016llx) has bits set outside its fields (bits 14-15, 30-31, 46-48 and 52-61 "
               "are not part of the format)",
               name, (unsigned long long)raw);
  Desc d = decode_desc(raw);
  if (d.layout != 0) {
    if (d.base_offset != 0)
      return fmt("descriptor of %s has matrix base offset %u: a swizzle pattern that does not start on its "
                 "boundary is not modelled by the emulator (place the tile at a %u-byte aligned shared address)",
                 name, d.base_offset, 8 * d.span());
    uint32_t repeat = 8 * d.span();
    uint32_t pattern = d.start & ~(d.span() - 1);
    if (pattern % repeat)
      return fmt("descriptor of %s (%uB swizzle) points at shared address 0x%x, whose %u-byte swizzle pattern "
                 "starts at 0x%x, not on a %u-byte boundary: a %uB-swizzled tile must be %u-byte aligned (with "
                 "base offset 0)",
                 name, d.span(), d.start, repeat, pattern, repeat, d.span(), repeat);
  }
  for (uint32_t mn = 0; mn < rows; ++mn)
    for (uint32_t k = 0; k < 16; ++k) {
      uint32_t a = operand_addr(d, mn_major, mn, k);
      if (!window_ok(B, a, 2))
        return fmt("descriptor of %s (start 0x%x, LBO %u, SBO %u, %s%s) reaches shared address 0x%x for element "
                   "(%s %u, k %u), outside dynamic shared memory [0x%x, 0x%x)",
                   name, d.start, d.lbo, d.sbo, d.layout ? fmt("%uB swizzle", d.span()).c_str() : "no swizzle",
                   mn_major ? ", MN-major" : ", K-major", a, name[0] == 'A' ? "m" : "n", mn, k, kDynSmemBase,
                   kDynSmemBase + (uint32_t)dyn_bytes(B));
      chunks->push_back(a >> 4);
    }
  return "";
}

inline double load16(const unsigned char* p, bool bf16) {
  uint16_t v;
  memcpy(&v, p, 2);
  return bf16 ? (double)emu::bf16_to_f32(v) : (double)emu::f16_to_f32(v);
}

// Performs one wgmma: reads its operands (shared memory through the async proxy's view, registers as
// they are now) and writes every thread's accumulators.
void wgmma_perform(HopBlock& h, WgmmaOp& op) {
  const caemu_wgmma_args& g = op.args;
  int N = g.n;
  bool bf16 = g.bf16 != 0;
  static thread_local double A[64][16], Bm[16][256], C[64][256];
  if (op.a[0]) {
    for (int r = 0; r < kWarpgroup; ++r) {
      int w = r / 32, lane = r % 32, gq = lane >> 2, t = lane & 3;
      for (int i = 0; i < 8; ++i) {
        uint32_t reg = op.a[r][i / 2];
        uint16_t bits = (uint16_t)((i & 1) ? reg >> 16 : reg & 0xFFFF);
        double v = bf16 ? (double)emu::bf16_to_f32(bits) : (double)emu::f16_to_f32(bits);
        A[16 * w + gq + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = v;
      }
    }
  } else {
    Desc d = decode_desc(g.desc_a);
    for (int m = 0; m < 64; ++m)
      for (int k = 0; k < 16; ++k) A[m][k] = load16(&h.shadow[operand_addr(d, g.trans_a, m, k) - kDynSmemBase], bf16);
  }
  Desc db = decode_desc(g.desc_b);
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < 16; ++k) Bm[k][n] = load16(&h.shadow[operand_addr(db, g.trans_b, n, k) - kDynSmemBase], bf16);
  double sa = g.neg_a ? -1.0 : 1.0, sb = g.neg_b ? -1.0 : 1.0;
  // C[m][n] = sum over k = 0..15, in that order, of (sa A[m][k]) (sb B[k][n]), for 8 columns at a time
  // (N is a multiple of 8): 8 independent sums in registers instead of one chain of dependent adds.
  for (int m = 0; m < 64; ++m)
    for (int n0 = 0; n0 < N; n0 += 8) {
      double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int k = 0; k < 16; ++k) {
        const double a = sa * A[m][k];
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) acc[j] += a * (sb * Bm[k][n0 + j]);
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) C[m][n0 + j] = acc[j];
    }
  op.result.resize((size_t)kWarpgroup * (N / 2));
  for (int r = 0; r < kWarpgroup; ++r) {
    int w = r / 32, lane = r % 32, gq = lane >> 2, t = lane & 3;
    const float* d = op.d[r];
    for (int i = 0; i < N / 2; ++i) {
      int row = 16 * w + gq + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * t + (i & 1);
      double v = C[row][col] + (g.scale_d ? (double)d[i] : 0.0);
      op.result[(size_t)r * (N / 2) + i] = (float)v;
    }
  }
  op.executed = true;
}

void wgmma_writeback(WgmmaOp& op, int r) {
  if (op.written[r]) return;
  memcpy(op.d[r], &op.result[(size_t)r * (op.args.n / 2)], sizeof(float) * (op.args.n / 2));
  op.written[r] = true;
}

// Performs op `idx` after completing every earlier wgmma of its warpgroup (performed, and written back
// to every thread: a later wgmma may read those registers as its accumulators).
void wgmma_perform_upto(HopBlock& h, size_t idx) {
  int wg = h.wgmma[idx].wg;
  for (size_t i = 0; i <= idx; ++i) {
    WgmmaOp& op = h.wgmma[i];
    if (op.wg != wg) continue;
    if (!op.executed) {
      wgmma_perform(h, op);
      if (op.writeback_at_once)
        for (int r = 0; r < kWarpgroup; ++r) wgmma_writeback(op, r);
    }
    if (i < idx)
      for (int r = 0; r < kWarpgroup; ++r) wgmma_writeback(op, r);
  }
}

// Whether a 16-byte chunk list overlaps the operands of a wgmma still in flight (not yet waited for
// by any thread of its warpgroup); returns it, or null.
const WgmmaOp* inflight_reader(HopBlock& h, const std::vector<uint32_t>& chunks) {
  for (auto& op : h.wgmma) {
    if (op.retired) continue;
    for (uint32_t c : chunks)
      if (std::binary_search(op.chunks.begin(), op.chunks.end(), c)) return &op;
  }
  return nullptr;
}

// Drops wgmmas that are performed and waited for by every thread of their warpgroup.
void wgmma_collect(HopBlock& h) {
  size_t keep = 0;
  for (size_t i = 0; i < h.wgmma.size(); ++i) {
    WgmmaOp& op = h.wgmma[i];
    bool done = op.executed;
    if (done)
      for (int r = 0; r < kWarpgroup && done; ++r)
        if (h.th[op.wg * kWarpgroup + r].wg_retired <= op.group || !op.written[r]) done = false;
    if (!done) {
      if (keep != i) h.wgmma[keep] = h.wgmma[i];
      ++keep;
    }
  }
  h.wgmma.resize(keep);
}

// ---------------------------------------------------------------------------------------------
// Tensor maps and TMA.

struct Box {
  int rank;
  uint32_t n[5];       // elements along each dimension of the box in shared memory
  uint32_t step[5];    // traversal step (element stride), dimension 0 always 1
  uint64_t bytes;
};

Box box_of(const caemu_tensormap& m) {
  Box b;
  b.rank = m.rank;
  b.bytes = m.elem_bytes;
  for (int i = 0; i < 5; ++i) {
    if (i < m.rank) {
      b.step[i] = i == 0 ? 1 : m.element_stride[i];
      b.n[i] = (m.box_dim[i] + b.step[i] - 1) / b.step[i];
    } else {
      b.step[i] = 1;
      b.n[i] = 1;
    }
    b.bytes *= b.n[i];
  }
  return b;
}

void decode_map(Fiber* f, const void* p, int rank, const char* what, caemu_tensormap& m) {
  if ((uintptr_t)p & 63)
    fail(f, fmt("%s by %s: the tensor map at %p is not 64-byte aligned", what, thread_str(f).c_str(), p));
  memcpy(&m, p, sizeof m);
  if (m.magic != kCaemuTensorMapMagic)
    fail(f, fmt("%s by %s: %p is not a tensor map for the emulator (make it with "
                "cupy_cosattn.tensormap.encode_tiled(..., target=\"emulator\"))",
                what, thread_str(f).c_str(), p));
  std::string bad;
  if (m.rank != rank) bad = fmt("a %dd copy with a rank-%d tensor map", rank, m.rank);
  else if (m.elem_bytes != 1 && m.elem_bytes != 2 && m.elem_bytes != 4 && m.elem_bytes != 8)
    bad = fmt("element size %u", m.elem_bytes);
  else if (m.swizzle > 3) bad = fmt("swizzle mode %u (only none, 32B, 64B, 128B are modelled)", m.swizzle);
  else if (m.interleave != 0) bad = "an interleaved layout (not modelled)";
  else if ((m.global_address & 15) != 0) bad = "a global address not 16-byte aligned";
  else if ((m.box_dim[0] * m.elem_bytes) % 16) bad = "an inner box dimension that is not a multiple of 16 bytes";
  else if (m.swizzle && m.box_dim[0] * m.elem_bytes > (16u << m.swizzle))
    bad = fmt("an inner box of %u bytes, more than the %u-byte swizzle span", m.box_dim[0] * m.elem_bytes,
              16u << m.swizzle);
  for (int i = 0; bad.empty() && i < rank; ++i) {
    if (m.box_dim[i] < 1 || m.box_dim[i] > 256) bad = fmt("box dimension %d = %u (1..256)", i, m.box_dim[i]);
    else if (m.element_stride[i] < 1 || m.element_stride[i] > 8)
      bad = fmt("element stride %d = %u (1..8)", i, m.element_stride[i]);
    else if (m.global_dim[i] < 1) bad = fmt("global dimension %d = 0", i);
    else if (i > 0 && (m.global_stride[i - 1] & 15)) bad = fmt("global stride %d not a multiple of 16 bytes", i);
  }
  if (!bad.empty()) fail(f, fmt("%s by %s: invalid tensor map (%s)", what, thread_str(f).c_str(), bad.c_str()));
}

// Visits the box's elements in shared-memory order: fn(dense byte offset, in bounds, global address).
template <class Fn>
void for_box(const caemu_tensormap& m, const Box& b, const int32_t* c, Fn fn) {
  uint64_t off = 0;
  uint32_t j[5] = {0, 0, 0, 0, 0};
  for (;;) {
    bool in = true;
    uint64_t ga = m.global_address;
    for (int i = 0; i < b.rank; ++i) {
      int64_t x = (int64_t)c[i] + (int64_t)j[i] * b.step[i];
      if (x < 0 || x >= (int64_t)m.global_dim[i]) in = false;
      else ga += (uint64_t)x * (i == 0 ? m.elem_bytes : m.global_stride[i - 1]);
    }
    fn(off, in, ga);
    off += m.elem_bytes;
    int i = 0;
    while (i < 5 && ++j[i] == b.n[i]) j[i++] = 0;
    if (i == 5) break;
  }
}

void check_box_region(Fiber* f, const char* what, uint32_t addr, const Box& b, int swizzle) {
  Block* B = &f->w->blk;
  if (addr % 128)
    fail(f, fmt("%s by %s: shared address 0x%x is not 128-byte aligned (TMA requires it)", what,
                thread_str(f).c_str(), addr));
  uint32_t bits = tma_swizzle_bits(swizzle);
  for (uint64_t o = 0; o < b.bytes; o += 16) {
    uint32_t a = bits ? swz(addr + (uint32_t)o, bits) : addr + (uint32_t)o;
    if (!window_ok(B, a, std::min<uint64_t>(16, b.bytes - o)))
      fail(f, fmt("%s by %s: the %llu-byte box at shared address 0x%x reaches 0x%x, outside dynamic shared memory "
                  "[0x%x, 0x%x)",
                  what, thread_str(f).c_str(), (unsigned long long)b.bytes, addr, a, kDynSmemBase,
                  kDynSmemBase + (uint32_t)dyn_bytes(B)));
  }
}

// The 16-byte chunks (address >> 4) a box of `bytes` at shared address `addr` occupies.
std::vector<uint32_t> box_chunks(uint32_t addr, uint64_t bytes, int swizzle) {
  std::vector<uint32_t> c;
  uint32_t bits = tma_swizzle_bits(swizzle);
  for (uint64_t o = 0; o < bytes; o += 16) c.push_back((bits ? swz(addr + (uint32_t)o, bits) : addr + (uint32_t)o) >> 4);
  return c;
}

// A TMA load landing in memory that a wgmma issued while the load was in flight still reads (one
// issued before the load is checked at the load's issue).
std::string landing_msg(Block* B, int issuer, uint32_t addr, uint64_t bytes, const WgmmaOp& op) {
  return fmt("the TMA load issued by %s into shared [0x%x, 0x%llx) lands while a wgmma.mma_async of warpgroup %d "
             "(m64n%dk16), issued while the load was in flight, still reads that memory: a wgmma may read a "
             "buffer only once the mbarrier its load completes on says it has landed",
             thread_name(B, issuer).c_str(), addr, (unsigned long long)(addr + bytes), op.wg, op.args.n);
}

// A write by thread f into the 16-byte chunks `chunks` (address >> 4) of dynamic shared memory: fails
// if a wgmma that f does not know to be complete reads one of them. Such a wgmma may be in flight, or
// complete only by the emulator's schedule: no wgmma.wait_group that retired it is ordered before
// this write (its waiting thread's arrive or barrier, then passed by f), so on a GPU its operand read
// and the write race.
void check_unseen_readers(Fiber* f, HopBlock& h, const std::vector<uint32_t>& chunks, const char* what, uint32_t addr,
                          uint64_t bytes) {
  if (h.readers.empty()) return;
  const Seen& seen = h.th[f->linear].seen;
  for (uint32_t c : chunks) {
    size_t i = c - kDynSmemBase / 16;
    if (i >= h.nchunks) continue;  // (a plain store reaching past dynamic shared memory faults by itself)
    for (size_t wg = 0; wg < h.gathers.size(); ++wg) {
      uint32_t r = h.readers[wg * h.nchunks + i];
      if (r <= seen.wg[wg]) continue;
      const WgmmaOp* op = nullptr;
      for (auto& o : h.wgmma)
        if (o.wg == (int)wg && o.ordinal == r) op = &o;
      const char* state = op == nullptr ? "since waited for by every thread of its warpgroup"
                          : op->retired ? "since waited for by another thread"
                                        : "not yet waited for by any thread";
      fail(f, fmt("%s by %s into shared [0x%x, 0x%llx) writes [0x%x, 0x%x), which wgmma.mma_async #%u of warpgroup "
                  "%d (m64n%dk16) reads (%s): no wgmma.wait_group that retired it is ordered before this write (a "
                  "wait, then an mbarrier arrive, named barrier or __syncthreads that this thread passed after it), "
                  "so on a GPU the write may land while the wgmma still reads; release a buffer only after waiting "
                  "for the wgmmas that read it",
                  what, thread_str(f).c_str(), addr, (unsigned long long)(addr + bytes), c << 4, (c << 4) + 16, r,
                  (int)wg, (int)h.issued[wg][r - 1], state));
    }
  }
}

// Lands a TMA load: the box into shared memory (both views), its bytes completed on its mbarrier.
bool land_load(HopBlock& h, TmaLoad& op, std::string* err) {
  Block* B = h.B;
  if (const WgmmaOp* r = inflight_reader(h, box_chunks(op.dst, op.data.size(), op.swizzle))) {
    *err = landing_msg(B, op.issuer, op.dst, op.data.size(), *r);
    return false;
  }
  uint32_t bits = tma_swizzle_bits(op.swizzle);
  for (size_t o = 0; o < op.data.size(); o += 16) {
    uint32_t a = bits ? swz(op.dst + (uint32_t)o, bits) : op.dst + (uint32_t)o;
    size_t n = std::min<size_t>(16, op.data.size() - o);
    memcpy(host_of(B, a), &op.data[o], n);
    memcpy(&h.shadow[a - kDynSmemBase], &op.data[o], n);
  }
  auto it = h.mbars.find(op.bar);
  if (it == h.mbars.end() || *(uint64_t*)op.bar != it->second.word) {
    *err = fmt("the TMA load issued by %s completed on the mbarrier at %s, which %s", thread_name(B, op.issuer).c_str(),
               where_str(B, op.bar).c_str(),
               it == h.mbars.end() ? "is not initialized" : "was overwritten by a plain store");
    return false;
  }
  it->second.tx -= (int64_t)op.data.size();
  return mbar_settle(h, op.bar, it->second, err);
}

// Performs a TMA store: the box from shared memory (the async proxy's view) to global memory, the
// out-of-bound elements skipped.
void perform_store(HopBlock& h, TmaStore& op) {
  Box b = box_of(op.map);
  uint32_t bits = tma_swizzle_bits(op.map.swizzle);
  uint32_t eb = op.map.elem_bytes;
  for_box(op.map, b, op.coords, [&](uint64_t off, bool in, uint64_t ga) {
    if (!in) return;
    uint32_t a = op.src + (uint32_t)off;
    if (bits) a = swz(a, bits);
    race_access((const void*)ga, eb, true);
    memcpy((void*)ga, &h.shadow[a - kDynSmemBase], eb);
  });
  op.executed = true;
}

// ---------------------------------------------------------------------------------------------
// Scheduling of the asynchronous operations.

// When an operation issued now is performed: 0 at once, -1 only when forced (its wait, or no thread
// can run), or after that many Hopper events.
long choose_countdown(Block* B) {
  if (!B->interleave) return -1;
  uint64_t r = rnd(B);
  switch (r & 3) {
    case 0: return 0;
    case 1: return -1;
    default: return 1 + (long)((r >> 2) % 16);
  }
}

// One Hopper event of the block: operations whose countdown runs out are performed. Returns false
// with *err set if landing one failed.
bool tick(HopBlock& h, std::string* err) {
  for (size_t i = 0; i < h.wgmma.size(); ++i) {
    WgmmaOp& op = h.wgmma[i];
    if (!op.executed && op.countdown > 0 && --op.countdown == 0) wgmma_perform_upto(h, i);
  }
  for (size_t i = 0; i < h.stores.size(); ++i) {
    TmaStore& op = h.stores[i];
    if (!op.executed && op.countdown > 0 && --op.countdown == 0) perform_store(h, op);
  }
  for (size_t i = 0; i < h.loads.size();) {
    TmaLoad& op = h.loads[i];
    if (op.countdown > 0 && --op.countdown == 0) {
      TmaLoad done = std::move(op);
      h.loads.erase(h.loads.begin() + i);
      if (!land_load(h, done, err)) return false;
      continue;
    }
    ++i;
  }
  return true;
}

// Entry of every primitive: the block's Hopper state, after one event.
HopBlock& enter(Fiber* f) {
  HopBlock& h = hop(f);
  std::string err;
  if (!tick(h, &err)) {
    block_error(&f->w->blk, err);
    fail_recorded(f);
  }
  return h;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Hooks called by runtime.cpp.
namespace {

void hopper_block_start(Block* B) {
  tl_hop.active = false;
  tl_hop.B = B;
}

void hopper_thread_exit(Fiber* f) {
  HopBlock& h = tl_hop;
  Block* B = &f->w->blk;
  if (!h.active || h.B != B) return;
  HopThread& t = h.th[f->linear];
  int wg = f->pub.warp / 4, r = f->linear % kWarpgroup;
  if (wg < (int)h.gathers.size()) {
    Gather& g = h.gathers[wg];
    if (g.kind != G_NONE && !g.arrived[r])
      fail(f, fmt("partial warpgroup: %s exited while threads %s of warpgroup %d wait for it at %s",
                  thread_str(f).c_str(), wg_threads_str(wg, g.arrived).c_str(), wg,
                  g.kind == G_WGMMA ? "wgmma.mma_async" : "setmaxnreg"));
  }
  int inflight = 0;
  for (auto& op : h.wgmma)
    if (op.wg == wg && op.group >= t.wg_retired) ++inflight;
  if (inflight)
    fail(f, fmt("%s exited with %d wgmma.mma_async not waited for (wgmma.commit_group + wgmma.wait_group)",
                thread_str(f).c_str(), inflight));
  int stores = 0;
  for (auto& op : h.stores)
    if (op.issuer == f->linear && op.group >= t.bulk_retired) ++stores;
  if (stores)
    fail(f, fmt("%s exited with %d TMA stores not waited for (cp.async.bulk.commit_group + "
                "cp.async.bulk.wait_group{.read})",
                thread_str(f).c_str(), stores));
  if (B->live == 1) {
    if (!h.loads.empty())
      fail(f, fmt("the block ends with %zu TMA loads in flight (the first issued by %s): no thread waited for them "
                  "on their mbarrier",
                  h.loads.size(), thread_name(B, h.loads[0].issuer).c_str()));
    for (auto& kv : h.mbars)
      if (kv.second.tx < 0)
        fail(f, fmt("the block ends with the mbarrier at %s holding %lld delivered bytes that no expect_tx accounted "
                    "for (in phase %llu): the expect_tx byte counts are smaller than the bytes delivered",
                    where_str(B, kv.first).c_str(), (long long)-kv.second.tx, (unsigned long long)kv.second.phase));
  }
}

// __syncthreads() completed: every thread of the block learns what any of them knew.
void hopper_syncthreads(Block* B) {
  HopBlock& h = tl_hop;
  if (!h.active || h.B != B || h.readers.empty()) return;
  Seen all;
  for (auto& t : h.th) all.join(t.seen);
  for (auto& t : h.th) t.seen = all;
}

// Race mode: a plain store of `n` bytes at `p` by the running thread (from race_access).
void hopper_shared_store(const void* p, size_t n) {
  HopBlock& h = tl_hop;
  if (!h.active || h.readers.empty() || !in_dyn(h.B, p, 1)) return;
  Fiber* f = cur_fiber();
  uint32_t a = window_of(h.B, p);
  std::vector<uint32_t> chunks;
  for (uint32_t c = a >> 4; c <= (uint32_t)((a + n - 1) >> 4); ++c) chunks.push_back(c);
  check_unseen_readers(f, h, chunks, "a plain store", a, n);
}

// No thread can run: land one in-flight TMA load (any, in interleave mode; the oldest otherwise) and
// report whether that woke a thread or failed; more loads are landed until one does.
bool hopper_progress(Block* B) {
  HopBlock& h = tl_hop;
  if (!h.active || h.B != B) return false;
  while (!h.loads.empty()) {
    size_t i = B->interleave ? (size_t)(rnd(B) % h.loads.size()) : 0;
    TmaLoad done = std::move(h.loads[i]);
    h.loads.erase(h.loads.begin() + i);
    std::string err;
    if (!land_load(h, done, &err)) {
      block_error(B, err);
      return true;
    }
    if (B->count > 0) return true;
  }
  // mbarrier.try_wait suspends a thread only up to a time limit. Let it expire for every thread
  // waiting on an mbarrier (they return false and may do something else) -- unless that already
  // happened with no mbarrier or named barrier changing since: then nothing can change any more.
  if (h.epoch == h.timeout_epoch) return false;
  bool woke = false;
  for (int i = 0; i < (int)h.th.size(); ++i)
    if (h.th[i].wait == W_MBAR && B->fibers[i]->state == F_HOPPER) {
      h.th[i].timed_out = true;
      wake(B, i);
      woke = true;
    }
  if (woke) h.timeout_epoch = h.epoch;
  return woke;
}

std::string hopper_blocked_detail(Block* B) {
  HopBlock& h = tl_hop;
  if (!h.active || h.B != B) return "";
  // Threads blocked at the same place are reported together, as ranges of thread indices.
  std::vector<std::pair<std::string, std::vector<int>>> groups;
  for (int i = 0; i < (int)h.th.size(); ++i) {
    HopThread& t = h.th[i];
    if (B->fibers[i]->state != F_HOPPER) continue;
    std::string what;
    if (t.wait == W_MBAR) {
      auto it = h.mbars.find(t.wait_bar);
      what = fmt("wait on the mbarrier at %s for the phase of parity %u: ", where_str(B, t.wait_bar).c_str(),
                 t.wait_parity);
      what += it == h.mbars.end() ? std::string("(not initialized)") : mbar_state_str(it->second);
      int loads = 0;
      for (auto& op : h.loads)
        if (op.bar == t.wait_bar) ++loads;
      if (it != h.mbars.end() && it->second.tx > 0 && loads == 0)
        what += ", and no TMA load in flight completes on it";
    } else if (t.wait == W_NAMED) {
      NamedBar& nb = h.named[t.wait_id];
      what = fmt("wait at named barrier %u (bar.sync, %u of %u threads arrived)", t.wait_id, nb.arrived, nb.count);
    } else if (t.wait == W_WG) {
      int wg = i / kWarpgroup;
      Gather& g = h.gathers[wg];
      bool missing[kWarpgroup];
      for (int r = 0; r < kWarpgroup; ++r) missing[r] = !g.arrived[r];
      what = fmt("wait at %s for threads %s of warpgroup %d", g.kind == G_WGMMA ? "wgmma.mma_async" : "setmaxnreg",
                 wg_threads_str(wg, missing).c_str(), wg);
    }
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == what; });
    if (it == groups.end()) groups.push_back({what, {i}});
    else it->second.push_back(i);
  }
  std::string s;
  for (auto& g : groups) {
    std::string ids;
    for (size_t a = 0; a < g.second.size();) {
      size_t b = a;
      while (b + 1 < g.second.size() && g.second[b + 1] == g.second[b] + 1) ++b;
      if (!ids.empty()) ids += ",";
      ids += a == b ? fmt("%d", g.second[a]) : fmt("%d-%d", g.second[a], g.second[b]);
      a = b + 1;
    }
    s += fmt("; thread%s %s %s", g.second.size() > 1 ? "s" : "", ids.c_str(), g.first.c_str());
  }
  return s;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The primitives.
extern "C" {

uint32_t caemu_smem_addr(const void* p) {
  Fiber* f = cur_fiber();
  Block* B = &f->w->blk;
  hop(f);
  uintptr_t a = (uintptr_t)p, lo = (uintptr_t)B->pub.dyn_smem;
  if (a >= lo && a <= lo + dyn_bytes(B)) return window_of(B, p);
  if (in_static_shared(f->w, p, 1))
    fail(f, fmt("smem_addr by %s of %p, a static __shared__ variable: the emulator gives shared-window addresses "
                "(descriptors, TMA) only to dynamic shared memory",
                thread_str(f).c_str(), p));
  fail(f, fmt("smem_addr by %s of %p, which is not in shared memory", thread_str(f).c_str(), p));
}

void caemu_wgmma_fence(void) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  h.th[f->linear].fenced = true;
}

void caemu_wgmma_commit(void) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  h.th[f->linear].wg_commits++;
}

void caemu_wgmma_wait(int n) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  if (n < 0 || n > 7) fail(f, fmt("wgmma.wait_group %d by %s (0..7)", n, thread_str(f).c_str()));
  HopThread& t = h.th[f->linear];
  int wg = f->pub.warp / 4;
  uint64_t limit = t.wg_commits >= (uint64_t)n ? t.wg_commits - (uint64_t)n : 0;
  bool retired = false;
  for (size_t i = 0; i < h.wgmma.size(); ++i) {
    WgmmaOp& op = h.wgmma[i];
    if (op.wg != wg || op.group >= limit) continue;
    if (!op.executed) wgmma_perform_upto(h, i);
    wgmma_writeback(op, f->linear % kWarpgroup);
    op.retired = true;
    t.seen.wg[wg] = std::max(t.seen.wg[wg], op.ordinal);
    if (op.group >= t.wg_retired) retired = true;
  }
  if (limit > t.wg_retired) t.wg_retired = limit;
  if (retired) {
    // The thread may now read or write the registers of the retired wgmmas: the next wgmma using
    // registers needs a wgmma.fence first.
    t.fenced = false;
    t.unfenced_since = "its last wgmma.wait_group";
  }
  wgmma_collect(h);
}

void caemu_wgmma(const caemu_wgmma_args* args) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  int wg = f->pub.warp / 4, r = f->linear % kWarpgroup;
  if ((wg + 1) * kWarpgroup > B->n)
    fail(f, fmt("wgmma.mma_async by %s: warpgroup %d (threads %d-%d) is incomplete in a block of %d threads; "
                "a warpgroup is 4 whole warps",
                thread_str(f).c_str(), wg, wg * kWarpgroup, wg * kWarpgroup + kWarpgroup - 1, B->n));
  if (args->n < 8 || args->n > 256 || args->n % 8)
    fail(f, fmt("wgmma.mma_async.m64n%dk16 by %s (N = 8..256, a multiple of 8)", args->n, thread_str(f).c_str()));
  Gather& g = h.gathers[wg];
  if (g.kind != G_NONE && g.kind != G_WGMMA)
    fail(f, fmt("%s reached wgmma.mma_async while threads %s of warpgroup %d wait at setmaxnreg",
                thread_str(f).c_str(), wg_threads_str(wg, g.arrived).c_str(), wg));
  if (g.kind == G_NONE) {
    g.kind = G_WGMMA;
    g.count = 0;
    for (int i = 0; i < kWarpgroup; ++i) g.arrived[i] = false;
  }
  HopThread& t = h.th[f->linear];
  g.arrived[r] = true;
  g.args[r] = *args;
  g.fenced[r] = t.fenced;
  g.commits[r] = t.wg_commits;
  if (++g.count < kWarpgroup) {
    hwait(f, t, W_WG);
    return;
  }
  // The last thread of the warpgroup: check the operands and issue.
  g.kind = G_NONE;
  g.count = 0;
  const caemu_wgmma_args& a0 = g.args[0];
  for (int i = 1; i < kWarpgroup; ++i) {
    const caemu_wgmma_args& ai = g.args[i];
    std::string what;
    if (ai.n != a0.n || ai.bf16 != a0.bf16 || (ai.a == nullptr) != (a0.a == nullptr))
      what = fmt("m64n%dk16.%s%s vs m64n%dk16.%s%s", a0.n, a0.bf16 ? "bf16" : "f16", a0.a ? " (A in registers)" : "",
                 ai.n, ai.bf16 ? "bf16" : "f16", ai.a ? " (A in registers)" : "");
    else if (!a0.a && ai.desc_a != a0.desc_a)
      what = fmt("descriptor of A 0x%016llx vs 0x%016llx", (unsigned long long)a0.desc_a, (unsigned long long)ai.desc_a);
    else if (ai.desc_b != a0.desc_b)
      what = fmt("descriptor of B 0x%016llx vs 0x%016llx", (unsigned long long)a0.desc_b, (unsigned long long)ai.desc_b);
    else if (ai.scale_d != a0.scale_d)
      what = fmt("scale-d %d vs %d", a0.scale_d, ai.scale_d);
    else if (ai.neg_a != a0.neg_a || ai.neg_b != a0.neg_b || ai.trans_a != a0.trans_a || ai.trans_b != a0.trans_b)
      what = "imm-scale / imm-trans flags";
    if (!what.empty())
      fail(f, fmt("wgmma.mma_async of warpgroup %d: threads disagree on their operands (%s and %s: %s); every "
                  "thread of the warpgroup must give the same",
                  wg, thread_name(B, wg * kWarpgroup).c_str(), thread_name(B, wg * kWarpgroup + i).c_str(), what.c_str()));
    if (g.commits[i] != g.commits[0])
      fail(f, fmt("wgmma.mma_async of warpgroup %d: %s has executed %llu wgmma.commit_group and %s %llu; every thread "
                  "of the warpgroup must execute the same wgmma instructions",
                  wg, thread_name(B, wg * kWarpgroup).c_str(), (unsigned long long)g.commits[0],
                  thread_name(B, wg * kWarpgroup + i).c_str(), (unsigned long long)g.commits[i]));
  }
  for (int i = 0; i < kWarpgroup; ++i)
    if (!g.fenced[i]) {
      bool sel[kWarpgroup];
      for (int j = 0; j < kWarpgroup; ++j) sel[j] = !g.fenced[j];
      fail(f, fmt("wgmma.mma_async of warpgroup %d without a wgmma.fence since %s (threads %s): the fence must "
                  "come before the first wgmma and between register accesses and a wgmma that uses the registers",
                  wg, h.th[wg * kWarpgroup + i].unfenced_since, wg_threads_str(wg, sel).c_str()));
    }
  std::string bad;
  std::vector<uint32_t> chunks;
  if (!a0.a) bad = check_operand(B, a0.desc_a, a0.trans_a, 64, "A", &chunks);
  if (bad.empty()) bad = check_operand(B, a0.desc_b, a0.trans_b, (uint32_t)a0.n, "B", &chunks);
  if (!bad.empty())
    fail(f, fmt("wgmma.mma_async.m64n%dk16 of warpgroup %d (issued by %s): %s", a0.n, wg,
                thread_name(B, wg * kWarpgroup).c_str(), bad.c_str()));
  WgmmaOp op;
  op.seq = ++h.seq;
  op.wg = wg;
  h.issued[wg].push_back((uint16_t)a0.n);
  op.ordinal = (uint32_t)h.issued[wg].size();
  op.group = g.commits[0];
  op.args = a0;
  for (int i = 0; i < kWarpgroup; ++i) {
    op.d[i] = g.args[i].d;
    op.a[i] = g.args[i].a;
    op.written[i] = false;
  }
  std::sort(chunks.begin(), chunks.end());
  chunks.erase(std::unique(chunks.begin(), chunks.end()), chunks.end());
  op.chunks = std::move(chunks);
  if (h.readers.empty()) h.readers.assign(h.gathers.size() * h.nchunks, 0);
  for (uint32_t c : op.chunks) h.readers[wg * h.nchunks + (c - kDynSmemBase / 16)] = op.ordinal;
  op.countdown = choose_countdown(B);
  op.writeback_at_once = B->interleave && (rnd(B) & 1);
  h.wgmma.push_back(op);
  if (op.countdown == 0) wgmma_perform_upto(h, h.wgmma.size() - 1);
  for (int i = 0; i < kWarpgroup; ++i)
    if (i != r) wake(B, wg * kWarpgroup + i);
  if (B->interleave) yield_ready(f);
}

void caemu_mbar_init(uint64_t* bar, uint32_t count) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  check_mbar_pointer(f, bar, "mbarrier.init");
  if (count < 1 || count > kMbarMaxCount)
    fail(f, fmt("mbarrier.init by %s with count %u (1..2^20-1)", thread_str(f).c_str(), count));
  uintptr_t key = (uintptr_t)bar;
  for (int i = 0; i < (int)h.th.size(); ++i)
    if (h.th[i].wait == W_MBAR && h.th[i].wait_bar == key)
      fail(f, fmt("mbarrier.init by %s on the mbarrier at %s while %s waits on it", thread_str(f).c_str(),
                  where_str(B, key).c_str(), thread_name(B, i).c_str()));
  for (auto& op : h.loads)
    if (op.bar == key)
      fail(f, fmt("mbarrier.init by %s on the mbarrier at %s while a TMA load (issued by %s) will complete on it",
                  thread_str(f).c_str(), where_str(B, key).c_str(), thread_name(B, op.issuer).c_str()));
  Mbar m;
  m.expected = m.pending = count;
  h.mbars[key] = m;
  mbar_store(h, key, h.mbars[key]);
}

void caemu_mbar_arrive(uint64_t* bar, uint32_t count, uint32_t tx) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  const char* what = tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
  Mbar& m = get_mbar(f, h, bar, what);
  if (tx > (uint32_t)kMbarMaxTx) fail(f, fmt("%s by %s with %u bytes (at most 2^20-1)", what, thread_str(f).c_str(), tx));
  if (count > m.pending)
    fail(f, fmt("%s by %s on the mbarrier at %s: phase %llu already has all %u of its expected arrivals%s", what,
                thread_str(f).c_str(), where_str(B, (uintptr_t)bar).c_str(), (unsigned long long)m.phase, m.expected,
                m.tx > 0 ? fmt(" (it waits for %lld more bytes)", (long long)m.tx).c_str() : ""));
  m.tx += tx;
  m.pending -= count;
  m.arrived.join(h.th[f->linear].seen);  // release: what this thread knows goes with its arrival
  std::string err;
  if (!mbar_settle(h, (uintptr_t)bar, m, &err)) fail(f, fmt("%s by %s: %s", what, thread_str(f).c_str(), err.c_str()));
  caemu_maybe_yield();
}

void caemu_mbar_expect_tx(uint64_t* bar, uint32_t tx) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Mbar& m = get_mbar(f, h, bar, "mbarrier.expect_tx");
  if (tx > (uint32_t)kMbarMaxTx)
    fail(f, fmt("mbarrier.expect_tx by %s with %u bytes (at most 2^20-1)", thread_str(f).c_str(), tx));
  m.tx += tx;
  m.arrived.join(h.th[f->linear].seen);
  std::string err;
  if (!mbar_settle(h, (uintptr_t)bar, m, &err))
    fail(f, fmt("mbarrier.expect_tx by %s: %s", thread_str(f).c_str(), err.c_str()));
  caemu_maybe_yield();
}

void caemu_mbar_complete_tx(uint64_t* bar, uint32_t tx) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Mbar& m = get_mbar(f, h, bar, "mbarrier.complete_tx");
  if (tx > (uint32_t)kMbarMaxTx)
    fail(f, fmt("mbarrier.complete_tx by %s with %u bytes (at most 2^20-1)", thread_str(f).c_str(), tx));
  m.tx -= tx;
  m.arrived.join(h.th[f->linear].seen);
  std::string err;
  if (!mbar_settle(h, (uintptr_t)bar, m, &err))
    fail(f, fmt("mbarrier.complete_tx by %s: %s", thread_str(f).c_str(), err.c_str()));
  caemu_maybe_yield();
}

int caemu_mbar_try_wait_parity(uint64_t* bar, uint32_t parity) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  Mbar& m = get_mbar(f, h, bar, "mbarrier.try_wait.parity");
  if (parity > 1)
    fail(f, fmt("mbarrier.try_wait.parity by %s with parity %u (0 or 1)", thread_str(f).c_str(), parity));
  HopThread& t = h.th[f->linear];
  if ((m.phase & 1) != parity) {
    t.seen.join(m.completed);  // acquire: what the arrivals of the completed phases knew
    return 1;
  }
  // The phase is not complete. The instruction may time out (returning false); in interleave mode
  // it sometimes does, so that a wait that does not loop is exposed.
  if (B->interleave && (rnd(B) & 3) == 0) {
    yield_ready(f);
    return 0;
  }
  t.wait_bar = (uintptr_t)bar;
  t.wait_parity = parity;
  hwait(f, t, W_MBAR);
  if (t.timed_out) {
    t.timed_out = false;
    return 0;
  }
  t.seen.join(m.completed);
  return 1;
}

void caemu_named_barrier(uint32_t id, uint32_t count, int sync) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  const char* what = sync ? "bar.sync" : "bar.arrive";
  if (id > 15) fail(f, fmt("%s %u by %s: barrier ids are 0..15", what, id, thread_str(f).c_str()));
  if (count == 0 || count % 32 || count > (uint32_t)B->n)
    fail(f, fmt("%s %u, %u by %s: the thread count must be a multiple of 32, at most the block's %d threads", what, id,
                count, thread_str(f).c_str(), B->n));
  if (id == 0) {
    if (sync && count == (uint32_t)((B->n + 31) / 32 * 32)) {
      caemu_syncthreads();
      return;
    }
    fail(f, fmt("%s 0, %u by %s: barrier 0 is __syncthreads()'s; use ids 1..15 for named barriers", what, count,
                thread_str(f).c_str()));
  }
  NamedBar& nb = h.named[id];
  if (nb.arrived > 0 && nb.count != count)
    fail(f, fmt("%s %u, %u by %s while %u thread(s) arrived at barrier %u with count %u", what, id, count,
                thread_str(f).c_str(), nb.arrived, id, nb.count));
  nb.count = count;
  nb.arrived++;
  nb.members.push_back(f->linear);
  nb.seen.join(h.th[f->linear].seen);
  h.epoch++;
  if (nb.arrived == count) {
    // .aligned: whole warps arrive (every existing lane of each warp that takes part).
    for (int m : nb.members) {
      int w = m / 32;
      uint32_t lanes = 0;
      for (int x : nb.members)
        if (x / 32 == w) lanes |= 1u << (x % 32);
      if (lanes != B->warps[w].existing)
        fail(f, fmt("named barrier %u (count %u) completed with only lanes %s of warp %d: bar.sync / bar.arrive are "
                    "executed by whole warps",
                    id, count, lanes_str(lanes).c_str(), w));
    }
    for (int m : nb.members)
      if (m != f->linear && h.th[m].wait == W_NAMED && h.th[m].wait_id == id) {
        h.th[m].seen.join(nb.seen);  // bar.sync acquires what every arrival knew; bar.arrive does not
        wake(B, m);
      }
    if (sync) h.th[f->linear].seen.join(nb.seen);
    nb = NamedBar();
    caemu_maybe_yield();
    return;
  }
  if (sync) {
    HopThread& t = h.th[f->linear];
    t.wait_id = id;
    hwait(f, t, W_NAMED);
  } else {
    caemu_maybe_yield();
  }
}

void caemu_fence_proxy_async(void) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  memcpy(h.shadow.data(), B->pub.dyn_smem, h.shadow.size());
}

int caemu_elect_sync(uint32_t mask) {
  Fiber* f = cur_fiber();
  Block* B = &f->w->blk;
  enter(f);
  struct ElectSlot { int out; } s{0};
  Pending* P = warp_arrive(f, 6u, mask, &s);
  if (P) {
    // The ISA fixes no lane, only that a mask always elects the same one: the lowest lane, or in
    // interleave mode a lane picked by the launch seed and the mask.
    int lanes[32], n = 0;
    for (int l = 0; l < 32; ++l)
      if (P->mask >> l & 1) lanes[n++] = l;
    int leader = lanes[0];
    if (B->interleave) {
      uint64_t st = B->L->seed ^ ((uint64_t)P->mask * 0x9E3779B97F4A7C15ull);
      leader = lanes[splitmix(st) % (uint64_t)n];
    }
    for (int i = 0; i < n; ++i) ((ElectSlot*)P->slot[lanes[i]])->out = lanes[i] == leader;
    warp_release(f, P);
  }
  return s.out;
}

void caemu_setmaxnreg(int inc, uint32_t count) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  const char* what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  int wg = f->pub.warp / 4, r = f->linear % kWarpgroup;
  if (count < 24 || count > 256 || count % 8)
    fail(f, fmt("%s %u by %s (24..256, a multiple of 8)", what, count, thread_str(f).c_str()));
  if ((wg + 1) * kWarpgroup > B->n)
    fail(f, fmt("%s by %s: warpgroup %d is incomplete in a block of %d threads", what, thread_str(f).c_str(), wg, B->n));
  Gather& g = h.gathers[wg];
  if (g.kind != G_NONE && g.kind != G_SETMAXNREG)
    fail(f, fmt("%s reached %s while threads %s of warpgroup %d wait at wgmma.mma_async", thread_str(f).c_str(), what,
                wg_threads_str(wg, g.arrived).c_str(), wg));
  if (g.kind == G_NONE) {
    g.kind = G_SETMAXNREG;
    g.count = 0;
    for (int i = 0; i < kWarpgroup; ++i) g.arrived[i] = false;
  }
  g.arrived[r] = true;
  g.inc[r] = inc;
  g.nreg[r] = count;
  HopThread& t = h.th[f->linear];
  if (++g.count < kWarpgroup) {
    hwait(f, t, W_WG);
    return;
  }
  g.kind = G_NONE;
  g.count = 0;
  for (int i = 1; i < kWarpgroup; ++i)
    if (g.inc[i] != g.inc[0] || g.nreg[i] != g.nreg[0])
      fail(f, fmt("setmaxnreg is not uniform over warpgroup %d: %s executed setmaxnreg.%s %u and %s setmaxnreg.%s %u",
                  wg, thread_name(B, wg * kWarpgroup).c_str(), g.inc[0] ? "inc" : "dec", g.nreg[0],
                  thread_name(B, wg * kWarpgroup + i).c_str(), g.inc[i] ? "inc" : "dec", g.nreg[i]));
  uint32_t cur = h.maxnreg[wg];
  if (cur && (inc ? count < cur : count > cur))
    fail(f, fmt("%s %u by warpgroup %d, whose limit is %u: .inc may only raise it, .dec only lower it", what, count, wg,
                cur));
  h.maxnreg[wg] = count;
  for (int i = 0; i < kWarpgroup; ++i)
    if (i != r) wake(B, wg * kWarpgroup + i);
  if (B->interleave) yield_ready(f);
}

void caemu_tma_load(void* dst, const void* tmap, uint64_t* bar, int rank, const int32_t* coords) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  const char* what = "cp.async.bulk.tensor (load)";
  caemu_tensormap m;
  decode_map(f, tmap, rank, what, m);
  if (!in_dyn(B, dst, 1))
    fail(f, fmt("%s by %s: destination %p is not in dynamic shared memory", what, thread_str(f).c_str(), dst));
  get_mbar(f, h, bar, what);
  Box b = box_of(m);
  uint32_t addr = window_of(B, dst);
  check_box_region(f, what, addr, b, m.swizzle);
  check_unseen_readers(f, h, box_chunks(addr, b.bytes, m.swizzle), what, addr, b.bytes);
  TmaLoad op;
  op.seq = ++h.seq;
  op.issuer = f->linear;
  op.dst = addr;
  op.swizzle = m.swizzle;
  op.bar = (uintptr_t)bar;
  op.data.resize(b.bytes);
  unsigned char fill[8];
  memset(fill, 0, sizeof fill);
  if (m.oob_fill) {  // the NaN fill: the canonical quiet NaN of the element type
    if (m.elem_bytes == 2) { uint16_t v = 0x7FFF; memcpy(fill, &v, 2); }
    else if (m.elem_bytes == 4) { uint32_t v = 0x7FFFFFFFu; memcpy(fill, &v, 4); }
    else if (m.elem_bytes == 8) { uint64_t v = 0x7FFFFFFFFFFFFFFFull; memcpy(fill, &v, 8); }
  }
  unsigned char* out = op.data.data();
  uint32_t eb = m.elem_bytes;
  for_box(m, b, coords, [&](uint64_t off, bool in, uint64_t ga) {
    if (in) race_access((const void*)ga, eb, false);  // the race mode sees the bulk copy's reads
    memcpy(out + off, in ? (const void*)ga : (const void*)fill, eb);
  });
  op.countdown = choose_countdown(B);
  if (op.countdown == 0) {
    std::string err;
    if (!land_load(h, op, &err)) fail(f, fmt("%s by %s: %s", what, thread_str(f).c_str(), err.c_str()));
  } else {
    h.loads.push_back(std::move(op));
  }
  caemu_maybe_yield();
}

void caemu_tma_store(const void* tmap, const void* src, int rank, const int32_t* coords) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  Block* B = &f->w->blk;
  const char* what = "cp.async.bulk.tensor (store)";
  TmaStore op;
  decode_map(f, tmap, rank, what, op.map);
  for (int i = 1; i < rank; ++i)
    if (op.map.element_stride[i] != 1)
      fail(f, fmt("%s by %s: element strides other than 1 are modelled for loads only", what, thread_str(f).c_str()));
  if (!in_dyn(B, src, 1))
    fail(f, fmt("%s by %s: source %p is not in dynamic shared memory", what, thread_str(f).c_str(), src));
  Box b = box_of(op.map);
  op.src = window_of(B, src);
  check_box_region(f, what, op.src, b, op.map.swizzle);
  op.seq = ++h.seq;
  op.issuer = f->linear;
  op.group = h.th[f->linear].bulk_commits;
  for (int i = 0; i < rank; ++i) op.coords[i] = coords[i];
  op.countdown = choose_countdown(B);
  if (op.countdown == 0) perform_store(h, op);
  h.stores.push_back(op);
  caemu_maybe_yield();
}

void caemu_bulk_commit(void) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  h.th[f->linear].bulk_commits++;
}

void caemu_bulk_wait(int n, int read_only) {
  Fiber* f = cur_fiber();
  HopBlock& h = enter(f);
  if (n < 0 || n > 63)
    fail(f, fmt("cp.async.bulk.wait_group%s %d by %s (0..63)", read_only ? ".read" : "", n, thread_str(f).c_str()));
  HopThread& t = h.th[f->linear];
  uint64_t limit = t.bulk_commits >= (uint64_t)n ? t.bulk_commits - (uint64_t)n : 0;
  // The model performs a store's read of shared memory and its write to global memory together, so
  // .read and the full wait retire the same stores.
  for (auto& op : h.stores)
    if (op.issuer == f->linear && op.group < limit && !op.executed) perform_store(h, op);
  if (limit > t.bulk_retired) t.bulk_retired = limit;
  size_t keep = 0;
  for (size_t i = 0; i < h.stores.size(); ++i) {
    TmaStore& op = h.stores[i];
    bool done = op.executed && op.group < h.th[op.issuer].bulk_retired;
    if (!done) {
      if (keep != i) h.stores[keep] = h.stores[i];
      ++keep;
    }
  }
  h.stores.resize(keep);
}

}  // extern "C"
