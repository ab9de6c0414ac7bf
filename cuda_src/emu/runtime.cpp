// runtime.cpp — the CPU emulator's execution model (libcaemu), loaded once per process by
// cupy_cosattn.emulator, shared by every kernel module it builds.
//
//  * Every CUDA thread is a fiber with its own stack (x86-64: a 6-register context switch in asm;
//    elsewhere ucontext). A block's fibers run on one OS worker thread; blocks are spread over a
//    small pool of workers.
//  * __syncthreads() blocks the fiber until every thread of the block has arrived.
//  * Warp collectives (shuffles, votes, __syncwarp, ldmatrix, mma): each lane deposits a pointer to
//    its operands and blocks; the last lane named by the member mask computes every lane's result
//    (from the PTX ISA's definitions) and wakes the others.
//  * cp.async reads its source at issue and writes its destination only at the cp.async.wait_group
//    that retires it (interleave mode: half of the copies, seeded, land at once, at issue).
//  * Guarded allocations (PROT_NONE pages on both sides, canaries in the slack) for global memory
//    and dynamic shared memory; a fault inside a kernel is caught (signal handler on an alternate
//    stack, siglongjmp back to the worker's scheduler) and reported, and the process goes on. A
//    global buffer sits flush against its end guard or its start guard (the placement, chosen per
//    allocation by the caller), so that out-of-bounds reads on either side fault; a block's dynamic
//    shared memory likewise (chosen per launch, or alternating by block).
//  * Interleave mode: a seeded random choice of the next runnable thread at every scheduling point,
//    so races between barriers show up as seed-dependent results.
//  * Watchdog (watchdog.inc): a thread that runs long without reaching a scheduling point is
//    preempted (so a spin-wait on another thread's store makes progress), and a launch in which
//    nothing progresses past a bound is reported with the spinning threads' call sites.
//  * Race mode (race.inc): kernels built with the compiler's ThreadSanitizer instrumentation report
//    every global access here; two blocks touching the same byte in one launch, one of them
//    writing with a plain (non-atomic) store, is reported.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>
#include <link.h>
#include <pthread.h>
#include <time.h>
#include <cxxabi.h>
#include <dlfcn.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "shim.h"

__thread emu::ThreadPub* caemu_tl_thread = nullptr;
__thread emu::BlockPub* caemu_tl_block = nullptr;

namespace {

// ---------------------------------------------------------------------------------------------
// Context switch.
#if defined(__x86_64__)
extern "C" void caemu_switch(void** save_sp, void* new_sp);
extern "C" void caemu_fiber_trampoline();
extern "C" void caemu_fiber_main(void* fiber);
// System V: rbx, rbp, r12-r15 are callee-saved; everything else is saved by the caller of
// caemu_switch (it is an ordinary function call). MXCSR / x87 control words are never changed by
// kernels, so they are not switched.
asm(R"(
  .text
  .p2align 4
  .globl caemu_switch
  .hidden caemu_switch
  .type caemu_switch,@function
caemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size caemu_switch, .-caemu_switch

  .p2align 4
  .globl caemu_fiber_trampoline
  .hidden caemu_fiber_trampoline
  .type caemu_fiber_trampoline,@function
caemu_fiber_trampoline:
  movq %r12, %rdi
  andq $-16, %rsp
  call caemu_fiber_main
  ud2
  .size caemu_fiber_trampoline, .-caemu_fiber_trampoline
)");
#endif

struct Fiber;
struct Worker;
struct Block;
struct Launch;

struct Copy {
  void* dst;
  int bytes;
  uint64_t group;
  bool landed;  // written at issue (interleave mode); still in flight until its wait
  unsigned char data[16];
};

enum FState : int { F_READY, F_RUNNING, F_BARRIER, F_WARP, F_DONE };

struct Fiber {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t uc;
#endif
  char* map = nullptr;  // mapping: guard page, then the stack
  size_t maplen = 0;
  char* stack_lo = nullptr;
  size_t stack_size = 0;
  emu::ThreadPub pub;
  int linear = 0;
  int state = F_DONE;
  Worker* w = nullptr;
  std::vector<Copy> copies;
  uint64_t group_next = 0;  // id of the group that uncommitted copies belong to
  unsigned yield_counter = 0;
  uintptr_t spin_pc = 0;     // where the watchdog last found the thread (0: never in this block)
  uint64_t spin_seen = 0;    // the launch's progress count then
};

struct Pending {
  bool used = false;
  uint32_t mask = 0, arrived = 0, op = 0;
  void* slot[32];
};

struct Warp {
  uint32_t existing = 0, exited = 0, at_barrier = 0;
  int npending = 0;
  Pending pend[32];
};

struct Launch {
  void (*entry)(void**) = nullptr;
  void** args = nullptr;
  const char* name = "";
  uint3 grid{1, 1, 1}, block{1, 1, 1};
  size_t smem = 0;
  int nthreads = 0;
  long long nblocks = 0;
  int nworkers = 1;
  bool interleave = false;
  uint64_t seed = 0;
  void* (*tls_probe)() = nullptr;  // the module's caemu_module_tls_probe (static __shared__ lives in its TLS)
  int smem_place = 3;              // where dynamic shared memory sits in its mapping (Placement below)
  uint64_t seq = 0;                // launch counter (the alternate shared-memory placement)
  std::vector<long long> order;
  std::atomic<long long> next{0};
  std::atomic<int> abort{0};
  std::mutex err_mu;
  bool has_err = false;
};

struct Block {
  Launch* L = nullptr;
  emu::BlockPub pub;
  long long linear = 0;
  int n = 0, live = 0, bar_count = 0, nwarps = 0;
  Warp warps[32];
  std::vector<Fiber*> fibers;
  std::vector<int> ring;  // run queue (circular)
  int head = 0, count = 0;
  uint64_t rng = 0;
  bool interleave = false;
  bool failed = false;
  std::string err;
};

struct Worker {
  int index = 0;
  std::thread th;
  void* sched_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t sched_uc;
#endif
  Fiber* cur = nullptr;
  Block blk;
  std::vector<Fiber*> pool;
  sigjmp_buf jb;
  volatile sig_atomic_t in_kernel = 0;
  volatile sig_atomic_t faulted = 0;
  void* fault_addr = nullptr;
  int fault_sig = 0;
  char* smem_map = nullptr;
  size_t smem_maplen = 0, smem_cap = 0;
  unsigned char* smem_lo = nullptr;   // the accessible pages between the shared memory's guards
  unsigned char* smem_hi = nullptr;
  pthread_t pth{};
  std::atomic<uint64_t> progress{0};  // scheduling points that moved the block forward (watchdog)
  std::atomic<int> wd_poke{0};        // the watchdog asks the running thread to check in
  uint64_t wd_seen = 0, wd_digest = 0;
  double wd_since = 0;
  void* altstack = nullptr;
  struct TlsRange { void* probe_fn; void* base; size_t size; };
  std::vector<TlsRange> tls;  // per module: this thread's instance of its TLS segment
};

// The sm_90a model (hopper.cpp, included at the end of this file) hooks into the scheduler here.
void hopper_block_start(Block* B);
void hopper_thread_exit(Fiber* f);
bool hopper_progress(Block* B);  // no thread can run: land an in-flight TMA load; true if that changed anything
std::string hopper_blocked_detail(Block* B);
void hopper_syncthreads(Block* B);  // __syncthreads() completed: its threads share what they know of wgmma completion
void hopper_shared_store(const void* p, size_t n);  // race mode: a plain store of the current thread

}  // namespace

// Result of a launch, read by Python (ctypes mirror in emulator.py).
struct caemu_result {
  int code;          // 0 ok, 1 error described in msg, 2 fault (signal) described in msg + fields
  int sig;
  uint64_t addr;
  int64_t alloc_id;  // guarded allocation whose guard page was hit, or -1
  int64_t offset;    // byte offset of addr from that allocation's data start
  char msg[4096];
};

namespace {

size_t g_page = 4096;
// PROT_NONE guard regions: 64 KiB of address space (no memory) on each side of every buffer and below
// every fiber stack, so an access up to 64 KiB past an end faults.
const size_t kGuard = 64 * 1024;
size_t g_stack_size = 256 * 1024;
thread_local Worker* tl_worker = nullptr;

// ---------------------------------------------------------------------------------------------
// Small helpers.

// A scheduling point that moved a block forward (a barrier or warp collective completed, copies
// landed, a thread exited, a block started): the watchdog's notion of progress. One writer per
// worker, read by the watchdog's monitor thread.
inline void note_progress(Worker* w) {
  w->progress.store(w->progress.load(std::memory_order_relaxed) + 1, std::memory_order_relaxed);
}
void race_access(const void* p, size_t n, bool write);  // race.inc
void watchdog_point(Fiber* f, uintptr_t pc);             // watchdog.inc
uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string lanes_str(uint32_t m) {
  std::string s;
  int i = 0;
  while (i < 32) {
    if (!(m >> i & 1)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
    if (!s.empty()) s += ",";
    s += j == i ? fmt("%d", i) : fmt("%d-%d", i, j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

std::string op_name(uint32_t op) {
  uint32_t kind = op & 0xff;
  switch (kind) {
    case 1: {
      static const char* m[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
      return m[(op >> 8) & 3];
    }
    case 2: {
      static const char* m[] = {"__ballot_sync", "__any_sync", "__all_sync"};
      return m[(op >> 8) % 3];
    }
    case 3: return "__syncwarp";
    case 4: return fmt("ldmatrix.x%u%s", (op >> 8) & 7, (op >> 12) & 1 ? ".trans" : "");
    case 5: {
      static const char* m[] = {"mma.m16n8k16.f16", "mma.m16n8k16.bf16", "mma.m16n8k8.tf32"};
      return m[(op >> 8) % 3];
    }
    case 6: return "elect.sync";
  }
  return "collective";
}

std::string thread_str(const Fiber* f) {
  return fmt("thread (%u,%u,%u) [warp %d lane %d]", f->pub.tid.x, f->pub.tid.y, f->pub.tid.z,
             f->pub.warp, f->pub.lane);
}

std::string block_prefix(const Block* B) {
  return fmt("kernel '%s', block (%u,%u,%u)", B->L->name, B->pub.bid.x, B->pub.bid.y, B->pub.bid.z);
}

// ---------------------------------------------------------------------------------------------
// Guarded allocations.
//
// The accessible pages [lo, hi) between the two guard regions hold the data and canary bytes in
// every byte that is not data. Where the data sits (the placement, see caemu_alloc):
//   end    the data ends flush against the end guard after its size is rounded up to 16 bytes
//          (16-byte aligned): a read past the end faults unless it is inside the rounding tail;
//          canaries before the data and in the tail.
//   start  the data starts flush against the start guard (page aligned): a read before the start
//          faults; canaries after the data, up to the end of the page.
//   exact  the data ends exactly at the end guard, with no rounding: a read of even one byte past
//          the end faults, but the data is aligned only to the largest power of two dividing its
//          size (4 bytes for 3 floats), not to 16 bytes as cudaMalloc's pointers are.
// Writes into the canary bytes are found by caemu_check_canaries after every launch.
enum Placement : int { P_END = 0, P_START = 1, P_EXACT = 2 };
struct Alloc {
  int64_t id;
  char* map;
  size_t maplen;
  unsigned char* data;
  size_t nbytes;
  int placement;
  unsigned char* lo() const { return (unsigned char*)map + kGuard; }
  unsigned char* hi() const { return (unsigned char*)map + maplen - kGuard; }
};
std::mutex g_alloc_mu;
std::map<uintptr_t, Alloc> g_allocs;  // keyed by map start
int64_t g_next_id = 1;
const unsigned char kCanary = 0xCB;

void arm(const Alloc& a) {
  memset(a.lo(), kCanary, a.data - a.lo());
  memset(a.data + a.nbytes, kCanary, a.hi() - (a.data + a.nbytes));
}

// ---------------------------------------------------------------------------------------------
// Fibers.
void fiber_init_stack(Fiber* f) {
  if (f->map && f->stack_size == g_stack_size) return;
  if (f->map) munmap(f->map, f->maplen);
  f->stack_size = g_stack_size;
  f->maplen = g_stack_size + kGuard;
  f->map = (char*)mmap(nullptr, f->maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (f->map == MAP_FAILED) {
    f->map = nullptr;
    fprintf(stderr, "cupy_cosattn emulator: cannot map a fiber stack\n");
    abort();
  }
  mprotect(f->map, kGuard, PROT_NONE);
  f->stack_lo = f->map + kGuard;
}

#if !defined(__x86_64__)
extern "C" void caemu_fiber_main(void* fiber);
void uc_entry(unsigned lo, unsigned hi) {
  caemu_fiber_main((void*)(((uintptr_t)hi << 32) | lo));
}
#endif

void fiber_prepare(Fiber* f) {
#if defined(__x86_64__)
  uintptr_t top = ((uintptr_t)(f->stack_lo + f->stack_size)) & ~(uintptr_t)15;
  void** s = (void**)(top - 8 * sizeof(void*));
  s[0] = nullptr;                            // r15
  s[1] = nullptr;                            // r14
  s[2] = nullptr;                            // r13
  s[3] = f;                                  // r12 -> first argument of caemu_fiber_main
  s[4] = nullptr;                            // rbx
  s[5] = nullptr;                            // rbp
  s[6] = (void*)&caemu_fiber_trampoline;     // return address
  s[7] = nullptr;
  f->sp = s;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_size;
  f->uc.uc_link = nullptr;
  uintptr_t p = (uintptr_t)f;
  makecontext(&f->uc, (void (*)())uc_entry, 2, (unsigned)(p & 0xffffffffu), (unsigned)(p >> 32));
#endif
}

inline void switch_to_fiber(Worker* w, Fiber* f) {
#if defined(__x86_64__)
  caemu_switch(&w->sched_sp, f->sp);
#else
  swapcontext(&w->sched_uc, &f->uc);
#endif
}

inline void switch_to_sched(Fiber* f) {
#if defined(__x86_64__)
  caemu_switch(&f->sp, f->w->sched_sp);
#else
  swapcontext(&f->uc, &f->w->sched_uc);
#endif
}

inline Fiber* cur_fiber() {
  Worker* w = tl_worker;
  if (!w || !w->cur) {
    fprintf(stderr, "cupy_cosattn emulator: a device function was called outside a kernel launch\n");
    abort();
  }
  return w->cur;
}

// Run queue.
inline void rq_push(Block* B, int i) {
  int n = (int)B->ring.size();
  B->ring[(B->head + B->count) % n] = i;
  B->count++;
}
inline int rq_pop(Block* B) {
  int n = (int)B->ring.size();
  if (B->interleave && B->count > 1) {
    int k = (int)(splitmix(B->rng) % (uint64_t)B->count);
    int a = B->head, b = (B->head + k) % n;
    std::swap(B->ring[a], B->ring[b]);
  }
  int i = B->ring[B->head];
  B->head = (B->head + 1) % n;
  B->count--;
  return i;
}

[[noreturn]] void fail(Fiber* f, const std::string& msg) {
  Block* B = &f->w->blk;
  if (!B->failed) {
    B->failed = true;
    B->err = block_prefix(B) + ": " + msg;
  }
  f->state = F_DONE;
  switch_to_sched(f);
  __builtin_unreachable();
}

inline void block_wait(Fiber* f, int state) {
  f->state = state;
  switch_to_sched(f);
  // resumed by the scheduler with state F_RUNNING
}

// Give other threads a chance (interleave mode), keeping this one runnable.
inline void yield_ready(Fiber* f) {
  Block* B = &f->w->blk;
  f->state = F_READY;
  rq_push(B, f->linear);
  switch_to_sched(f);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Fiber entry and exit.
extern "C" __attribute__((visibility("hidden"))) void caemu_fiber_main(void* p) {
  Fiber* f = (Fiber*)p;
  Block* B = &f->w->blk;
  B->L->entry(B->L->args);
  // The thread returned from the kernel.
  if (!f->copies.empty())
    fail(f, fmt("%s exited with %zu cp.async copies not yet waited for (cp.async.wait_group)", thread_str(f).c_str(),
                f->copies.size()));
  hopper_thread_exit(f);
  Warp& W = B->warps[f->pub.warp];
  uint32_t bit = 1u << f->pub.lane;
  for (int i = 0; i < 32 && W.npending; ++i) {
    Pending& P = W.pend[i];
    if (P.used && (P.mask & bit))
      fail(f, fmt("partial warp: %s exited while lanes %s of warp %d wait for it at %s (mask 0x%08x)",
                  thread_str(f).c_str(), lanes_str(P.arrived).c_str(), f->pub.warp, op_name(P.op).c_str(), P.mask));
  }
  if (B->bar_count > 0) {
    std::string waiting;
    int shown = 0;
    for (Fiber* g : B->fibers)
      if (g->state == F_BARRIER && shown++ < 8) waiting += (waiting.empty() ? "" : ", ") + thread_str(g);
    if (shown > 8) waiting += fmt(" and %d more", shown - 8);
    fail(f, fmt("deadlock: %s exited while %d thread(s) wait at __syncthreads() (%s); every thread of the block "
                "must reach every barrier",
                thread_str(f).c_str(), B->bar_count, waiting.c_str()));
  }
  f->state = F_DONE;
  B->live--;
  W.exited |= bit;
  note_progress(f->w);
  switch_to_sched(f);
  __builtin_unreachable();
}

// ---------------------------------------------------------------------------------------------
// Barriers.
extern "C" void caemu_syncthreads(void) {
  Fiber* f = cur_fiber();
  Block* B = &f->w->blk;
  Warp& W = B->warps[f->pub.warp];
  uint32_t bit = 1u << f->pub.lane;
  for (int i = 0; i < 32 && W.npending; ++i) {
    Pending& P = W.pend[i];
    if (P.used && (P.mask & bit))
      fail(f, fmt("partial warp: %s reached __syncthreads() while lanes %s of warp %d wait for it at %s (mask 0x%08x)",
                  thread_str(f).c_str(), lanes_str(P.arrived).c_str(), f->pub.warp, op_name(P.op).c_str(), P.mask));
  }
  if (B->live != B->n) {
    std::string gone;
    int shown = 0, total = 0;
    for (Fiber* g : B->fibers)
      if (g->state == F_DONE) {
        ++total;
        if (shown++ < 8) gone += (gone.empty() ? "" : ", ") + thread_str(g);
      }
    if (total > 8) gone += fmt(" and %d more", total - 8);
    fail(f, fmt("deadlock: %s reached __syncthreads() but %d thread(s) of the block have exited (%s); every thread "
                "of the block must reach every barrier",
                thread_str(f).c_str(), total, gone.c_str()));
  }
  B->bar_count++;
  if (B->bar_count == B->live) {
    hopper_syncthreads(B);
    for (Fiber* g : B->fibers)
      if (g->state == F_BARRIER) {
        g->state = F_READY;
        rq_push(B, g->linear);
      }
    for (int i = 0; i < B->nwarps; ++i) B->warps[i].at_barrier = 0;
    B->bar_count = 0;
    note_progress(f->w);
    if (B->interleave) yield_ready(f);
    return;
  }
  W.at_barrier |= bit;
  block_wait(f, F_BARRIER);
}

extern "C" void caemu_threadfence(void) {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  caemu_maybe_yield();
}

extern "C" void caemu_maybe_yield(void) {
  Fiber* f = cur_fiber();
  if (f->w->wd_poke.load(std::memory_order_relaxed)) watchdog_point(f, (uintptr_t)__builtin_return_address(0));
  Block* B = &f->w->blk;
  if (B->interleave) {
    if (splitmix(B->rng) & 1) yield_ready(f);
  } else if (++f->yield_counter >= 64) {  // so that spin loops on atomics make progress
    f->yield_counter = 0;
    yield_ready(f);
  }
}

extern "C" void caemu_trap(const char* what) {
  Fiber* f = cur_fiber();
  fail(f, fmt("%s executed by %s", what, thread_str(f).c_str()));
}

// ---------------------------------------------------------------------------------------------
// Warp collectives.
namespace {

// Returns the pending record when the calling lane completes it (the caller then computes and calls
// warp_release), or nullptr once another lane has completed it and woken this one.
Pending* warp_arrive(Fiber* f, uint32_t op, uint32_t mask, void* slot) {
  Block* B = &f->w->blk;
  Warp& W = B->warps[f->pub.warp];
  int lane = f->pub.lane;
  uint32_t bit = 1u << lane;
  if (!(mask & bit))
    fail(f, fmt("%s by %s with member mask 0x%08x, which does not name the calling lane", op_name(op).c_str(),
                thread_str(f).c_str(), mask));
  if (mask & ~W.existing)
    fail(f, fmt("partial warp: %s by %s names lanes %s of warp %d, which do not exist (%d threads per block)",
                op_name(op).c_str(), thread_str(f).c_str(), lanes_str(mask & ~W.existing).c_str(), f->pub.warp, B->n));
  if (mask & W.exited)
    fail(f, fmt("partial warp: %s (mask 0x%08x) by %s, but lanes %s of warp %d have exited", op_name(op).c_str(), mask,
                thread_str(f).c_str(), lanes_str(mask & W.exited).c_str(), f->pub.warp));
  if (mask & W.at_barrier)
    fail(f, fmt("partial warp: %s (mask 0x%08x) by %s, but lanes %s of warp %d wait at __syncthreads()",
                op_name(op).c_str(), mask, thread_str(f).c_str(), lanes_str(mask & W.at_barrier).c_str(), f->pub.warp));
  Pending* P = nullptr;
  Pending* freeP = nullptr;
  for (int i = 0; i < 32; ++i) {
    Pending& p = W.pend[i];
    if (!p.used) {
      if (!freeP) freeP = &p;
      continue;
    }
    if (!(p.mask & mask)) continue;
    if (p.op != op)
      fail(f, fmt("partial warp: %s reached %s (mask 0x%08x) while lanes %s of warp %d wait at %s (mask 0x%08x)",
                  thread_str(f).c_str(), op_name(op).c_str(), mask, lanes_str(p.arrived).c_str(), f->pub.warp,
                  op_name(p.op).c_str(), p.mask));
    if (p.mask != mask)
      fail(f, fmt("%s by %s with mask 0x%08x while lanes %s of warp %d wait at it with mask 0x%08x",
                  op_name(op).c_str(), thread_str(f).c_str(), mask, lanes_str(p.arrived).c_str(), f->pub.warp, p.mask));
    P = &p;
    break;
  }
  if (!P) {
    P = freeP;
    P->used = true;
    P->mask = mask;
    P->arrived = 0;
    P->op = op;
    W.npending++;
  }
  P->slot[lane] = slot;
  P->arrived |= bit;
  if (P->arrived == mask) return P;
  block_wait(f, F_WARP);
  return nullptr;
}

void warp_release(Fiber* f, Pending* P) {
  Block* B = &f->w->blk;
  Warp& W = B->warps[f->pub.warp];
  int base = f->pub.warp * 32;
  uint32_t others = P->mask & ~(1u << f->pub.lane);
  P->used = false;
  W.npending--;
  note_progress(f->w);
  while (others) {
    int l = __builtin_ctz(others);
    others &= others - 1;
    Fiber* g = B->fibers[base + l];
    g->state = F_READY;
    rq_push(B, g->linear);
  }
  if (B->interleave) yield_ready(f);
}

struct ShflSlot {
  unsigned long long v, out;
  int b, c;
};
struct VoteSlot {
  int pred;
  unsigned out;
};
struct LdmSlot {
  uint32_t* r;
  const void* row;
};
struct MmaSlot {
  float* d;
  const uint32_t* a;
  const uint32_t* b;
};

}  // namespace

namespace {
// PTX ISA, shfl.sync: the lane whose `a` operand lane `lane` receives, for operands b and c, in
// mode 0 .idx, 1 .up, 2 .down, 3 .bfly. Only b[4:0], c[4:0] (the clamp) and c[12:8] (the segment
// mask) take part; when the computed lane is out of range the lane keeps its own value.
int shfl_source_lane(int mode, int lane, uint32_t b, uint32_t c) {
  const int bval = (int)(b & 31), cval = (int)(c & 31), segmask = (int)((c >> 8) & 31);
  const int maxLane = (lane & segmask) | (cval & ~segmask);
  const int minLane = lane & segmask;
  int j;
  bool in_range;
  switch (mode) {
    case 1: j = lane - bval; in_range = j >= maxLane; break;
    case 2: j = lane + bval; in_range = j <= maxLane; break;
    case 3: j = lane ^ bval; in_range = j <= maxLane; break;
    default: j = minLane | (bval & ~segmask); in_range = j <= maxLane; break;
  }
  return in_range ? j : lane;
}
}  // namespace

// shfl.sync.mode.b32 d, a=v, b, c, membermask=mask (8-byte values move as two shuffles with the
// same b and c would).
extern "C" unsigned long long caemu_shfl_c(int mode, unsigned mask, unsigned long long v, int b, int c) {
  Fiber* f = cur_fiber();
  ShflSlot s{v, 0, b, c};
  Pending* P = warp_arrive(f, 1u | (uint32_t)(mode & 3) << 8, mask, &s);
  if (P) {
    ShflSlot* sl[32];
    for (int l = 0; l < 32; ++l) sl[l] = (P->mask >> l & 1) ? (ShflSlot*)P->slot[l] : nullptr;
    for (int l = 0; l < 32; ++l) {
      if (!sl[l]) continue;
      int j = shfl_source_lane(mode & 3, l, (uint32_t)sl[l]->b, (uint32_t)sl[l]->c);
      // Reading a lane outside the member mask is undefined: give a visible garbage value.
      sl[l]->out = sl[j] ? sl[j]->v : ~0ull;
    }
    warp_release(f, P);
  }
  return s.out;
}

// __shfl_sync / _up / _down / _xor (mode 0 .. 3) as CUDA's headers build them:
// c = ((32 - width) << 8) | clamp, clamp 0 for .up and 31 otherwise.
extern "C" unsigned long long caemu_shfl(int mode, unsigned mask, unsigned long long v, int b, int width) {
  if (width < 1 || width > 32 || (width & (width - 1))) {
    Fiber* f = cur_fiber();
    fail(f, fmt("%s with width %d (must be a power of two up to 32)", op_name(1 | mode << 8).c_str(), width));
  }
  return caemu_shfl_c(mode, mask, v, b, ((32 - width) << 8) | (mode == 1 ? 0 : 31));
}

extern "C" unsigned caemu_vote(int mode, unsigned mask, int pred) {
  Fiber* f = cur_fiber();
  VoteSlot s{pred, 0};
  Pending* P = warp_arrive(f, 2u | (uint32_t)mode << 8, mask, &s);
  if (P) {
    unsigned ballot = 0;
    for (int l = 0; l < 32; ++l)
      if ((P->mask >> l & 1) && ((VoteSlot*)P->slot[l])->pred) ballot |= 1u << l;
    unsigned r = mode == 0 ? ballot : mode == 1 ? (ballot != 0) : (ballot == P->mask);
    for (int l = 0; l < 32; ++l)
      if (P->mask >> l & 1) ((VoteSlot*)P->slot[l])->out = r;
    warp_release(f, P);
  }
  return s.out;
}

extern "C" void caemu_syncwarp(unsigned mask) {
  Fiber* f = cur_fiber();
  Pending* P = warp_arrive(f, 3u, mask, nullptr);
  if (P) warp_release(f, P);
}

extern "C" void caemu_ldmatrix(uint32_t* r, int num, int trans, const void* row) {
  Fiber* f = cur_fiber();
  if (num != 1 && num != 2 && num != 4) fail(f, fmt("ldmatrix with %d matrices (must be 1, 2 or 4)", num));
  LdmSlot s{r, row};
  uint32_t op = 4u | (uint32_t)num << 8 | (uint32_t)(trans ? 1 : 0) << 12;
  Pending* P = warp_arrive(f, op, 0xffffffffu, &s);
  if (P) {
    uint16_t m[4][8][8];
    for (int i = 0; i < num; ++i)
      for (int rr = 0; rr < 8; ++rr) {
        const void* p = ((LdmSlot*)P->slot[8 * i + rr])->row;
        if ((uintptr_t)p & 15)
          fail(f, fmt("%s: row address %p given by lane %d of warp %d is not 16-byte aligned", op_name(op).c_str(), p,
                      8 * i + rr, f->pub.warp));
        memcpy(m[i][rr], p, 16);
      }
    for (int l = 0; l < 32; ++l) {
      LdmSlot* sl = (LdmSlot*)P->slot[l];
      int g = l >> 2, t = l & 3;
      for (int i = 0; i < num; ++i) {
        uint32_t lo, hi;
        if (!trans) {
          lo = m[i][g][2 * t];
          hi = m[i][g][2 * t + 1];
        } else {
          lo = m[i][2 * t][g];
          hi = m[i][2 * t + 1][g];
        }
        sl->r[i] = lo | hi << 16;
      }
    }
    warp_release(f, P);
  }
}

namespace {
inline double half_lo(uint32_t r) { return (double)emu::f16_to_f32((uint16_t)(r & 0xffff)); }
inline double half_hi(uint32_t r) { return (double)emu::f16_to_f32((uint16_t)(r >> 16)); }
inline double bf_lo(uint32_t r) { return (double)emu::bits_to_f32(r << 16); }
inline double bf_hi(uint32_t r) { return (double)emu::bits_to_f32(r & 0xffff0000u); }
inline double tf32v(uint32_t r) { return (double)emu::bits_to_f32(r & 0xffffe000u); }
}  // namespace

extern "C" void caemu_mma(int kind, float* d, const uint32_t* a, const uint32_t* b) {
  Fiber* f = cur_fiber();
  MmaSlot s{d, a, b};
  uint32_t op = 5u | (uint32_t)kind << 8;
  Pending* P = warp_arrive(f, op, 0xffffffffu, &s);
  if (P) {
    double A[16][16], Bm[16][8], C[16][8];
    int K = kind == 2 ? 8 : 16;
    for (int l = 0; l < 32; ++l) {
      MmaSlot* sl = (MmaSlot*)P->slot[l];
      int g = l >> 2, t = l & 3;
      if (kind == 2) {
        // m16n8k8 tf32: a0 (g,t) a1 (g+8,t) a2 (g,t+4) a3 (g+8,t+4); b0 (k t, n g) b1 (k t+4, n g)
        A[g][t] = tf32v(sl->a[0]);
        A[g + 8][t] = tf32v(sl->a[1]);
        A[g][t + 4] = tf32v(sl->a[2]);
        A[g + 8][t + 4] = tf32v(sl->a[3]);
        Bm[t][g] = tf32v(sl->b[0]);
        Bm[t + 4][g] = tf32v(sl->b[1]);
      } else {
        double (*lo)(uint32_t) = kind == 0 ? half_lo : bf_lo;
        double (*hi)(uint32_t) = kind == 0 ? half_hi : bf_hi;
        // m16n8k16: a0 (g, 2t..+1) a1 (g+8, 2t..+1) a2 (g, 2t+8..+9) a3 (g+8, 2t+8..+9)
        A[g][2 * t] = lo(sl->a[0]);
        A[g][2 * t + 1] = hi(sl->a[0]);
        A[g + 8][2 * t] = lo(sl->a[1]);
        A[g + 8][2 * t + 1] = hi(sl->a[1]);
        A[g][2 * t + 8] = lo(sl->a[2]);
        A[g][2 * t + 9] = hi(sl->a[2]);
        A[g + 8][2 * t + 8] = lo(sl->a[3]);
        A[g + 8][2 * t + 9] = hi(sl->a[3]);
        // b0 (k 2t..2t+1, n g)  b1 (k 2t+8..+9, n g)
        Bm[2 * t][g] = lo(sl->b[0]);
        Bm[2 * t + 1][g] = hi(sl->b[0]);
        Bm[2 * t + 8][g] = lo(sl->b[1]);
        Bm[2 * t + 9][g] = hi(sl->b[1]);
      }
      // c0,c1 (g, 2t..+1)  c2,c3 (g+8, 2t..+1)
      C[g][2 * t] = sl->d[0];
      C[g][2 * t + 1] = sl->d[1];
      C[g + 8][2 * t] = sl->d[2];
      C[g + 8][2 * t + 1] = sl->d[3];
    }
    float D[16][8];
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        double acc = C[i][j];
        for (int k = 0; k < K; ++k) acc += A[i][k] * Bm[k][j];
        D[i][j] = (float)acc;
      }
    for (int l = 0; l < 32; ++l) {
      MmaSlot* sl = (MmaSlot*)P->slot[l];
      int g = l >> 2, t = l & 3;
      sl->d[0] = D[g][2 * t];
      sl->d[1] = D[g][2 * t + 1];
      sl->d[2] = D[g + 8][2 * t];
      sl->d[3] = D[g + 8][2 * t + 1];
    }
    warp_release(f, P);
  }
}

// ---------------------------------------------------------------------------------------------
// cp.async: source read at issue, destination written when the group retires.
extern "C" void caemu_cp_async(void* dst, const void* src, int cp_bytes, int src_bytes) {
  Fiber* f = cur_fiber();
  if (cp_bytes != 4 && cp_bytes != 8 && cp_bytes != 16)
    fail(f, fmt("cp.async of %d bytes by %s (must be 4, 8 or 16)", cp_bytes, thread_str(f).c_str()));
  if (src_bytes < 0 || src_bytes > cp_bytes)
    fail(f, fmt("cp.async by %s with src-size %d outside [0, %d]", thread_str(f).c_str(), src_bytes, cp_bytes));
  if ((uintptr_t)dst % cp_bytes)
    fail(f, fmt("cp.async by %s: shared destination %p not aligned to %d bytes", thread_str(f).c_str(), dst, cp_bytes));
  if ((uintptr_t)src % cp_bytes)
    fail(f, fmt("cp.async by %s: global source %p not aligned to %d bytes", thread_str(f).c_str(), src, cp_bytes));
  Copy c;
  c.dst = dst;
  c.bytes = cp_bytes;
  c.group = f->group_next;
  memset(c.data, 0, sizeof c.data);
  if (src_bytes) {
    race_access(src, (size_t)src_bytes, false);
    memcpy(c.data, src, src_bytes);
  }
  // The hardware may land a copy at any moment between its issue and the wait that retires it.
  // Landing half of them (seeded) at once in interleave mode exposes the races that landing at the
  // wait hides: a buffer still being read by other threads (a missing barrier before it is
  // refilled) changes under them.
  Block* B = &f->w->blk;
  c.landed = B->interleave && (splitmix(B->rng) & 1);
  if (c.landed) memcpy(c.dst, c.data, c.bytes);
  f->copies.push_back(c);
  caemu_maybe_yield();
}

extern "C" void caemu_cp_async_commit(void) {
  Fiber* f = cur_fiber();
  f->group_next++;
}

extern "C" void caemu_cp_async_wait(int n) {
  Fiber* f = cur_fiber();
  if (n < 0) fail(f, fmt("cp.async.wait_group %d", n));
  if (f->copies.empty()) return;
  // Committed groups are 0 .. group_next-1; all but the n most recent retire.
  uint64_t limit = f->group_next >= (uint64_t)n ? f->group_next - (uint64_t)n : 0;
  size_t keep = 0;
  for (size_t i = 0; i < f->copies.size(); ++i) {
    Copy& c = f->copies[i];
    if (c.group < limit) {
      if (!c.landed) memcpy(c.dst, c.data, c.bytes);
    } else {
      f->copies[keep++] = c;
    }
  }
  if (keep != f->copies.size()) note_progress(f->w);
  f->copies.resize(keep);
}

// ---------------------------------------------------------------------------------------------
// Blocks and workers.
namespace {

// The worker pool lives until the process ends: its threads are detached and sleep on g_cv_work, so
// the pool's mutex and condition variables are deliberately never destroyed (destroying a condition
// variable that a thread still waits on blocks forever in glibc, which would hang interpreter exit).
std::mutex& g_launch_mu = *new std::mutex;  // one launch at a time
std::mutex& g_pool_mu = *new std::mutex;
std::condition_variable& g_cv_work = *new std::condition_variable;
std::condition_variable& g_cv_done = *new std::condition_variable;
std::vector<Worker*> g_workers;
uint64_t g_gen = 0;
Launch* g_launch = nullptr;
int g_active = 0;

// Dynamic shared memory: the fewest whole pages that hold it, between two guard regions. The
// mapping is resized whenever a launch needs a different number of pages, so that the slack on the
// side away from the guard the data sits against is under a page.
void ensure_smem(Worker* w, size_t bytes) {
  size_t rounded = (bytes + 15) & ~(size_t)15;
  size_t cap = (rounded + g_page - 1) / g_page * g_page;
  if (cap == 0) cap = g_page;
  if (!w->smem_map || w->smem_cap != cap) {
    if (w->smem_map) munmap(w->smem_map, w->smem_maplen);
    w->smem_maplen = cap + 2 * kGuard;
    w->smem_map = (char*)mmap(nullptr, w->smem_maplen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    mprotect(w->smem_map + kGuard, cap, PROT_READ | PROT_WRITE);
    w->smem_cap = cap;
    w->smem_lo = (unsigned char*)w->smem_map + kGuard;
    w->smem_hi = w->smem_lo + cap;
  }
}

// Places a block's dynamic shared memory (`bytes`) in the worker's mapping, flush against the start
// guard (P_START: s[-1] faults) or the end guard (P_END after rounding to 16 bytes, P_EXACT
// without), fills it with garbage (0xFF: NaN as any float type) and the slack around it with
// canaries, which check_smem_canaries reads when the block is done.
unsigned char* place_smem(Worker* w, size_t bytes, int place) {
  size_t rounded = (bytes + 15) & ~(size_t)15;
  unsigned char* data = place == P_START ? w->smem_lo : place == P_EXACT ? w->smem_hi - bytes : w->smem_hi - rounded;
  memset(w->smem_lo, kCanary, data - w->smem_lo);
  memset(data, 0xFF, bytes);
  memset(data + bytes, kCanary, w->smem_hi - (data + bytes));
  return data;
}

// Offset of the first byte of [p, p + n) that is not a canary, or -1.
long long first_non_canary(const unsigned char* p, size_t n) {
  const uint64_t word = 0x0101010101010101ull * kCanary;
  size_t i = 0;
  for (; i < n && ((uintptr_t)(p + i) & 7); ++i)
    if (p[i] != kCanary) return (long long)i;
  for (; i + 8 <= n; i += 8) {
    uint64_t x;
    memcpy(&x, p + i, 8);
    if (x != word) break;
  }
  for (; i < n; ++i)
    if (p[i] != kCanary) return (long long)i;
  return -1;
}

// An out-of-bounds write into the slack around a block's dynamic shared memory, as an error
// message with its byte offset from the start of the shared memory, or "" when the canaries hold.
std::string check_smem_canaries(Worker* w, const Block* B) {
  unsigned char* data = B->pub.dyn_smem;
  size_t bytes = B->pub.dyn_smem_bytes;
  long long off = first_non_canary(w->smem_lo, data - w->smem_lo);
  if (off >= 0) {
    off -= (long long)(data - w->smem_lo);
  } else {
    long long o = first_non_canary(data + bytes, w->smem_hi - (data + bytes));
    if (o < 0) return "";
    off = (long long)bytes + o;
  }
  return fmt("out-of-bounds write to dynamic shared memory at byte offset %lld (shared_mem=%zu bytes)", off, bytes);
}

void record_error(Launch* L, caemu_result* res, const std::string& msg, int code) {
  std::lock_guard<std::mutex> lk(L->err_mu);
  if (L->has_err) return;
  L->has_err = true;
  res->code = code;
  snprintf(res->msg, sizeof res->msg, "%s", msg.c_str());
}

caemu_result* g_res = nullptr;

// Which region of the emulator's own memory an address is in (for fault messages).
std::string describe_internal(Worker* w, uintptr_t a) {
  Block* B = &w->blk;
  for (Fiber* f : B->fibers)
    if (a >= (uintptr_t)f->map && a < (uintptr_t)f->map + kGuard)
      return fmt("stack overflow of %s (the emulator's per-thread stack is %zu bytes; raise CUPY_COSATTN_EMU_STACK)",
                 thread_str(f).c_str(), f->stack_size);
  if (w->smem_map && a >= (uintptr_t)w->smem_map && a < (uintptr_t)w->smem_map + w->smem_maplen)
    return fmt("out-of-bounds access to dynamic shared memory at byte offset %lld (shared_mem=%zu bytes)",
               (long long)(a - (uintptr_t)B->pub.dyn_smem), B->L->smem);
  return "";
}

struct TlsFind {
  uintptr_t probe;
  void* base;
  size_t size;
};

int tls_find_cb(struct dl_phdr_info* info, size_t, void* p) {
  TlsFind* f = (TlsFind*)p;
  if (!info->dlpi_tls_data) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      uintptr_t b = (uintptr_t)info->dlpi_tls_data;
      size_t sz = info->dlpi_phdr[i].p_memsz;
      if (f->probe >= b && f->probe < b + sz) {
        f->base = (void*)b;
        f->size = sz;
        return 1;
      }
    }
  return 0;
}

// Fill this worker's copy of a module's TLS segment (its static __shared__ variables; kernel modules
// have no other thread_local data) with 0xFF bytes.
void poison_static_shared(Worker* w, void* (*probe)()) {
  for (auto& r : w->tls)
    if (r.probe_fn == (void*)probe) {
      if (r.base) memset(r.base, 0xFF, r.size);
      return;
    }
  TlsFind f{(uintptr_t)probe(), nullptr, 0};  // calling the probe allocates the segment in this thread
  dl_iterate_phdr(tls_find_cb, &f);
  w->tls.push_back(Worker::TlsRange{(void*)probe, f.base, f.size});
  if (f.base) memset(f.base, 0xFF, f.size);
}

void run_block(Worker* w, Launch* L, long long bl) {
  Block* B = &w->blk;
  B->L = L;
  B->linear = bl;
  B->pub.gdim = L->grid;
  B->pub.bdim = L->block;
  B->pub.bid.x = (unsigned)(bl % L->grid.x);
  B->pub.bid.y = (unsigned)((bl / L->grid.x) % L->grid.y);
  B->pub.bid.z = (unsigned)(bl / ((long long)L->grid.x * L->grid.y));
  ensure_smem(w, L->smem);
  // Fresh shared memory holds garbage (0xFF bytes: NaN as fp32/fp16/bf16), so reading what no one
  // wrote shows up. With the alternate placement, blocks sit against the start or the end guard by
  // the parity of their index and the launch counter, so that both sides are checked.
  int place = L->smem_place;
  if (place != P_START && place != P_END && place != P_EXACT) place = ((uint64_t)bl + L->seq) & 1 ? P_END : P_START;
  B->pub.dyn_smem = place_smem(w, L->smem, place);
  B->pub.dyn_smem_bytes = L->smem;
  // Static __shared__ variables are the module's thread_local variables (see shim.h), one copy per
  // worker: garbage them too, so a block never sees what an earlier block (or launch) left there.
  if (L->tls_probe) poison_static_shared(w, L->tls_probe);
  int n = L->nthreads;
  B->n = n;
  B->live = n;
  B->bar_count = 0;
  B->nwarps = (n + 31) / 32;
  for (int i = 0; i < B->nwarps; ++i) {
    Warp& W = B->warps[i];
    int lanes = n - 32 * i < 32 ? n - 32 * i : 32;
    W.existing = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    W.exited = 0;
    W.at_barrier = 0;
    W.npending = 0;
    for (auto& p : W.pend) p.used = false;
  }
  while ((int)w->pool.size() < n) {
    Fiber* f = new Fiber();
    f->w = w;
    w->pool.push_back(f);
  }
  B->fibers.assign(w->pool.begin(), w->pool.begin() + n);
  B->ring.assign(n + 1, 0);
  B->head = 0;
  B->count = 0;
  B->interleave = L->interleave;
  B->rng = L->seed * 0x9E3779B97F4A7C15ull + (uint64_t)bl * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  B->failed = false;
  B->err.clear();
  hopper_block_start(B);
  for (int i = 0; i < n; ++i) {
    Fiber* f = B->fibers[i];
    fiber_init_stack(f);
    f->linear = i;
    f->pub.tid.x = (unsigned)(i % L->block.x);
    f->pub.tid.y = (unsigned)((i / L->block.x) % L->block.y);
    f->pub.tid.z = (unsigned)(i / (L->block.x * L->block.y));
    f->pub.lane = i & 31;
    f->pub.warp = i >> 5;
    f->copies.clear();
    f->group_next = 0;
    f->yield_counter = 0;
    f->spin_pc = 0;
    f->state = F_READY;
    fiber_prepare(f);
    rq_push(B, i);
  }
  caemu_tl_block = &B->pub;
  note_progress(w);
  w->faulted = 0;
  w->cur = nullptr;
  if (sigsetjmp(w->jb, 1)) {
    // A fault inside the kernel: the signal handler jumped back here.
    w->in_kernel = 0;
    Fiber* f = w->cur;
    std::string where = block_prefix(B) + (f ? ", " + thread_str(f) : std::string());
    std::string internal = describe_internal(w, (uintptr_t)w->fault_addr);
    const char* sname = w->fault_sig == SIGSEGV ? "SIGSEGV" : w->fault_sig == SIGBUS ? "SIGBUS" : w->fault_sig == SIGFPE ? "SIGFPE" : "signal";
    std::string msg;
    if (!internal.empty())
      msg = where + ": " + internal;
    else if (w->fault_sig == SIGFPE)
      msg = where + ": arithmetic exception (SIGFPE, e.g. integer division by zero)";
    else
      msg = where + fmt(": invalid memory access (%s) at address %p", sname, w->fault_addr);
    {
      std::lock_guard<std::mutex> lk(L->err_mu);
      if (!L->has_err) {
        L->has_err = true;
        g_res->code = internal.empty() && w->fault_sig != SIGFPE ? 2 : 1;
        g_res->sig = w->fault_sig;
        g_res->addr = (uint64_t)(uintptr_t)w->fault_addr;
        snprintf(g_res->msg, sizeof g_res->msg, "%s", msg.c_str());
      }
    }
    L->abort.store(1);
    w->cur = nullptr;
    caemu_tl_thread = nullptr;
    return;
  }
  w->in_kernel = 1;
  for (;;) {
    if (B->failed) {
      record_error(L, g_res, B->err, 1);
      L->abort.store(1);
      break;
    }
    if (L->abort.load(std::memory_order_relaxed)) break;
    if (B->count == 0) {
      if (B->live == 0) break;
      if (hopper_progress(B)) continue;
      // Nothing can run but threads are alive: a deadlock.
      int at_bar = 0, at_warp = 0;
      std::string detail;
      for (Fiber* g : B->fibers) {
        if (g->state == F_BARRIER) ++at_bar;
        if (g->state == F_WARP) ++at_warp;
      }
      for (int i = 0; i < B->nwarps; ++i)
        for (auto& p : B->warps[i].pend)
          if (p.used)
            detail += fmt("; warp %d: lanes %s wait at %s (mask 0x%08x) for lanes %s", i, lanes_str(p.arrived).c_str(),
                          op_name(p.op).c_str(), p.mask, lanes_str(p.mask & ~p.arrived).c_str());
      detail += hopper_blocked_detail(B);
      record_error(L, g_res,
                   block_prefix(B) + fmt(": deadlock: %d thread(s) wait at __syncthreads(), %d at warp collectives, "
                                         "none can proceed%s",
                                         at_bar, at_warp, detail.c_str()),
                   1);
      L->abort.store(1);
      break;
    }
    Fiber* f = B->fibers[rq_pop(B)];
    f->state = F_RUNNING;
    w->cur = f;
    caemu_tl_thread = &f->pub;
    switch_to_fiber(w, f);
  }
  w->in_kernel = 0;
  w->cur = nullptr;
  caemu_tl_thread = nullptr;
  if (B->live == 0 && !B->failed) {
    std::string err = check_smem_canaries(w, B);
    if (!err.empty()) {
      record_error(L, g_res, block_prefix(B) + ": " + err, 1);
      L->abort.store(1);
    }
  }
}

void worker_run(Worker* w, Launch* L) {
  for (;;) {
    if (L->abort.load(std::memory_order_relaxed)) return;
    long long i = L->next.fetch_add(1);
    if (i >= L->nblocks) return;
    run_block(w, L, L->order.empty() ? i : L->order[i]);
  }
}

void worker_main(Worker* w) {
  tl_worker = w;
  // Alternate signal stack, so a fault on a fiber's guard page (stack overflow) can be handled.
  stack_t ss;
  ss.ss_size = 256 * 1024;
  w->altstack = mmap(nullptr, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ss.ss_sp = w->altstack;
  ss.ss_flags = 0;
  sigaltstack(&ss, nullptr);
  w->pth = pthread_self();
  uint64_t seen = 0;
  for (;;) {
    Launch* L;
    {
      std::unique_lock<std::mutex> lk(g_pool_mu);
      g_cv_work.wait(lk, [&] { return g_gen != seen; });
      seen = g_gen;
      L = g_launch;
    }
    if (w->index < L->nworkers) worker_run(w, L);
    {
      std::lock_guard<std::mutex> lk(g_pool_mu);
      if (--g_active == 0) g_cv_done.notify_all();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Signals.
struct sigaction g_old[65];
bool g_have_old[65];

void on_fault(int sig, siginfo_t* si, void* uc) {
  Worker* w = tl_worker;
  if (w && w->in_kernel) {
    w->in_kernel = 0;
    w->faulted = 1;
    w->fault_addr = si->si_addr;
    w->fault_sig = sig;
    siglongjmp(w->jb, 1);
  }
  // Not ours: hand over to whoever was installed before.
  struct sigaction& o = g_old[sig];
  if (g_have_old[sig] && (o.sa_flags & SA_SIGINFO) && o.sa_sigaction) {
    o.sa_sigaction(sig, si, uc);
    return;
  }
  if (g_have_old[sig] && o.sa_handler != SIG_DFL && o.sa_handler != SIG_IGN) {
    o.sa_handler(sig);
    return;
  }
  signal(sig, SIG_DFL);
  if (si->si_code <= 0) raise(sig);  // sent by kill: re-raise; a real fault re-faults on return
}

void install_handlers() {
  for (int sig : {SIGSEGV, SIGBUS, SIGFPE}) {
    struct sigaction cur;
    sigaction(sig, nullptr, &cur);
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault) continue;
    g_old[sig] = cur;
    g_have_old[sig] = true;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, nullptr);
  }
}

}  // namespace

#include "watchdog.inc"
#include "race.inc"

namespace {
// Settings (caemu_set_option), read by each launch.
int g_opt_smem_place = 3;  // Placement of dynamic shared memory; 3: alternate
bool g_opt_race = false;
uint64_t g_launch_seq = 0;
}  // namespace

// ---------------------------------------------------------------------------------------------
// C API used by cupy_cosattn/emulator.py.
extern "C" {

int caemu_abi_version(void) { return 3; }

// key 1: placement of dynamic shared memory (0 end, 1 start, 2 exact, 3 alternate); 2: watchdog
// bound in milliseconds (<= 0: off); 3: race mode (kernels must come from an instrumented build).
void caemu_set_option(int key, long long value) {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  if (key == 1) g_opt_smem_place = (int)value;
  if (key == 2) g_wd_bound_ms.store(value);
  if (key == 3) g_opt_race = value != 0;
}

void caemu_configure(size_t stack_bytes) {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  g_page = (size_t)sysconf(_SC_PAGESIZE);
  if (stack_bytes >= 16384) g_stack_size = (stack_bytes + g_page - 1) / g_page * g_page;
}

int caemu_launch(void* entry, const char* name, const unsigned* grid, const unsigned* block, void** args,
                 size_t smem, int nworkers, int interleave, uint64_t seed, void* tls_probe, caemu_result* res) {
  std::lock_guard<std::mutex> lk(g_launch_mu);
  memset(res, 0, sizeof *res);
  res->alloc_id = -1;
  Launch L;
  L.entry = (void (*)(void**))entry;
  L.args = args;
  L.name = name;
  L.grid = uint3{grid[0], grid[1], grid[2]};
  L.block = uint3{block[0], block[1], block[2]};
  L.smem = smem;
  L.nthreads = (int)(block[0] * block[1] * block[2]);
  L.nblocks = (long long)grid[0] * grid[1] * grid[2];
  L.interleave = interleave != 0;
  L.seed = seed;
  L.tls_probe = (void* (*)())tls_probe;
  L.smem_place = g_opt_smem_place;
  L.seq = g_launch_seq++;
  if (g_opt_race) nworkers = 1;  // the race shadow is not locked
  if (nworkers < 1) nworkers = 1;
  if (nworkers > 64) nworkers = 64;
  if (L.nblocks < nworkers) nworkers = (int)(L.nblocks > 0 ? L.nblocks : 1);
  L.nworkers = nworkers;
  if (L.nblocks == 0 || L.nthreads == 0) return 0;
  if (L.interleave && L.nblocks > 1 && L.nblocks <= (1 << 22)) {
    L.order.resize(L.nblocks);
    for (long long i = 0; i < L.nblocks; ++i) L.order[i] = i;
    uint64_t s = seed ^ 0xA0761D6478BD642Full;
    for (long long i = L.nblocks - 1; i > 0; --i) std::swap(L.order[i], L.order[(long long)(splitmix(s) % (uint64_t)(i + 1))]);
  }
  install_handlers();
  watchdog_begin(entry);
  if (g_opt_race) race_begin(L);
  g_res = res;
  {
    std::unique_lock<std::mutex> plk(g_pool_mu);
    while ((int)g_workers.size() < nworkers) {
      Worker* w = new Worker();
      w->index = (int)g_workers.size();
      g_workers.push_back(w);
      w->th = std::thread(worker_main, w);
      w->th.detach();
    }
    g_launch = &L;
    g_active = (int)g_workers.size();
    g_gen++;
    g_cv_work.notify_all();
    g_cv_done.wait(plk, [] { return g_active == 0; });
    g_launch = nullptr;
  }
  g_res = nullptr;
  watchdog_end();
  if (g_opt_race) race_end(L, res);
  if (res->code == 2) {
    // Which guarded allocation (if any) holds the faulting address?
    std::lock_guard<std::mutex> alk(g_alloc_mu);
    uintptr_t a = (uintptr_t)res->addr;
    auto it = g_allocs.upper_bound(a);
    if (it != g_allocs.begin()) {
      --it;
      const Alloc& al = it->second;
      if (a < (uintptr_t)al.map + al.maplen) {
        res->alloc_id = al.id;
        res->offset = (int64_t)(a - (uintptr_t)al.data);
      }
    }
  }
  return res->code;
}

// *placement: 0 end, 1 start, 2 exact (see Alloc above), or 3 alternate: end for odd allocation ids,
// start for even ones. On return it holds the placement used. Returns the data pointer and the id.
void* caemu_alloc(size_t nbytes, int* placement, int64_t* id_out) {
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t rounded = (nbytes + 15) & ~(size_t)15;
  size_t data_pages = (rounded + page - 1) / page * page;
  if (data_pages == 0) data_pages = page;
  size_t maplen = data_pages + 2 * kGuard;
  char* map = (char*)mmap(nullptr, maplen, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) return nullptr;
  if (mprotect(map + kGuard, data_pages, PROT_READ | PROT_WRITE) != 0) {
    munmap(map, maplen);
    return nullptr;
  }
  Alloc a;
  a.map = map;
  a.maplen = maplen;
  a.nbytes = nbytes;
  std::lock_guard<std::mutex> lk(g_alloc_mu);
  a.id = g_next_id++;
  int want = *placement;
  if (want == 3) want = (a.id & 1) ? P_END : P_START;
  a.placement = want == P_START || want == P_EXACT ? want : P_END;
  *placement = a.placement;
  unsigned char* lo = (unsigned char*)map + kGuard;
  if (a.placement == P_START)
    a.data = lo;
  else if (a.placement == P_EXACT)
    a.data = lo + data_pages - nbytes;
  else
    a.data = lo + data_pages - rounded;
  arm(a);
  g_allocs[(uintptr_t)map] = a;
  *id_out = a.id;
  return a.data;
}

void caemu_free(void* data) {
  std::lock_guard<std::mutex> lk(g_alloc_mu);
  for (auto it = g_allocs.begin(); it != g_allocs.end(); ++it)
    if (it->second.data == data) {
      munmap(it->second.map, it->second.maplen);
      g_allocs.erase(it);
      return;
    }
}

// Checks every live allocation's canaries; reports up to max corrupted ones (id and the byte offset
// of the first bad byte relative to the data start) and re-arms them. Returns how many were bad.
int caemu_check_canaries(int64_t* ids, int64_t* offsets, int max) {
  std::lock_guard<std::mutex> lk(g_alloc_mu);
  int bad = 0;
  for (auto& kv : g_allocs) {
    const Alloc& a = kv.second;
    int64_t off = 0;
    bool found = false;
    for (unsigned char* p = a.lo(); p < a.data; ++p)
      if (*p != kCanary) {
        off = (int64_t)(p - a.data);
        found = true;
        break;
      }
    if (!found)
      for (unsigned char* p = a.data + a.nbytes; p < a.hi(); ++p)
        if (*p != kCanary) {
          off = (int64_t)(p - a.data);
          found = true;
          break;
        }
    if (found) {
      if (bad < max) {
        ids[bad] = a.id;
        offsets[bad] = off;
      }
      ++bad;
      arm(a);
    }
  }
  return bad;
}

}  // extern "C"

#include "hopper.cpp"
