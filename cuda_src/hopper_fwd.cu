// hopper_fwd.cu — fused cosine-sim attention forward for sm_90a (H100 / H200): forward.cu's algorithm
// (fixed offset, or the running-max variant for a bias), rebuilt around the Hopper hardware in the
// FlashAttention-3 style: TMA bulk copies, mbarriers, warpgroup MMA (wgmma) and warp specialization.
//
// One block = 3 warpgroups (384 threads) and BLOCK_M = 128 query rows of one (batch, head):
//
//   warpgroup 0, the producer (setmaxnreg down to PRODUCER_REGS)
//     warp 0   one elected lane issues every TMA load: the Q tile once per (batch, head), then K and
//              V tiles of BLOCK_N keys into a ring of STAGES shared buffers, each stage guarded by a
//              full and an empty mbarrier per operand (K and V are released at different times)
//     warp 1   with a key mask: copies the tile's mask bytes next to its K stage (arrives on full_k)
//     warp 2   with a mask or causal: the V fix-up (below) between the load landing and full_v
//   warpgroups 1 and 2, the consumers (setmaxnreg up to CONSUMER_REGS), 64 query rows each
//     per key tile j, in one "slot":  S_j = Qhat Khat_j^T (wgmma, Q and K from shared memory, both
//     K-major) and O += P_{j-1} V_{j-1} (wgmma, P from registers, V MN-major) are issued together;
//     once S_j is complete, P_j = exp2(scale_h S_j log2e - offset) is computed in registers while
//     P_{j-1} V_{j-1} still runs. Ping-pong: the two consumers take turns issuing (named barriers
//     BAR_TURN + c), so one's exponentials overlap the other's tensor-core work.
//   epilogue   O / l (rounded to T) staged in the consumer's rows of the Q buffer, one TMA store per
//              64-column block (rows past Nq are not written: out-of-bound box elements), lse per row.
//
// Visibility and non-finite values. A key is visible to a query row when it is < Nk, unmasked and,
// under causal, j <= i + (Nk - Nq). An invisible pair never contributes, even when its key's k or v
// hold NaN or Inf: scores are selected per element (never 0 * exp), and V goes through the fix-up
// warp whenever some pair of the tile is invisible while its key is loaded: masked keys' V rows are
// zeroed; on a causal tile crossing the block's diagonal, V's non-finite elements are zeroed and their
// keys flagged, and a visible pair with a flagged key gets P = NaN. Keys past Nk arrive as zeros (TMA
// out-of-bound fill). The epilogue turns a row whose O is not finite into a NaN row (out and lse): a
// visible NaN or Inf poisons exactly the rows that see it.
//
// Template parameters: T (half_t, bf16_t), DP = head dim padded to 64 or 128 (the launch layer's
// storage_dim), RUNNING_MAX. Everything else is a runtime field of FwdParams, as in forward.cu.
// docs/kernels.md "The Hopper forward" has the pipeline, the register budget and what falls back.
#include "hopper.cuh"
#include "tiles.cuh"
#include "params.cuh"
#include "fixed_offset.cuh"

namespace ca {
namespace fwd90 {

// The kernel's one argument: the tensor maps of q, k, v, out (cupy_cosattn.tensormap; 4-D (DP, N,
// heads, B) views of the canonical arrays, 128B swizzle, boxes of 64 columns) and the forward's
// parameters. Mirrored by launch_sm90.args_dtype.
struct Args {
  sm90::TensorMap tq;  // box (64, BLOCK_M, 1, 1)
  sm90::TensorMap tk;  // box (64, BLOCK_N, 1, 1)
  sm90::TensorMap tv;  // box (64, BLOCK_N, 1, 1)
  sm90::TensorMap to;  // box (64, WG_ROWS, 1, 1)
  FwdParams p;
};

constexpr int WG = 128;                            // threads of a warpgroup
constexpr int CONSUMERS = 2;                       // consumer warpgroups
constexpr int WG_ROWS = 64;                        // query rows of one consumer (wgmma M)
constexpr int BLOCK_M = CONSUMERS * WG_ROWS;       // query rows per block
constexpr int BLOCK_N = 128;                       // keys per K/V tile (the S wgmma's N)
constexpr int THREADS = WG * (1 + CONSUMERS);
constexpr int RELEASERS = WG * CONSUMERS;         // consumer threads: each releases a K / V stage
constexpr int SPAN = 64;                           // 16-bit elements in one 128-byte swizzled row
constexpr uint32_t PRODUCER_REGS = 40;             // 128 x 40 + 256 x 232 <= 65536 registers
constexpr uint32_t CONSUMER_REGS = 232;
constexpr uint32_t BAR_TURN = 1;                   // + c: consumer c may issue its wgmmas (256 threads)
constexpr uint32_t BAR_EPILOGUE = 3;               // + c: consumer c's staging is complete (128 threads)
enum ProducerWarp { TMA_WARP = 0, MASK_WARP = 1, FIXUP_WARP = 2 };

// Shared memory, from a 1024-byte aligned shared address (the 128B swizzle repeats every 1024 bytes).
// A tile of R rows x DP columns is stored as DP / 64 column blocks of R rows x 128 bytes, each the
// dense 128B-swizzled box one TMA load writes; that is the K-major canonical layout (Q, K) and, read
// with keys as K, the MN-major one (V).
template <int DP>
struct Smem {
  // K/V ring depth: 2 at DP = 128 (FlashAttention-3's choice for this tile; K and V are released
  // separately, so a load has about a slot to land), 3 at DP = 64
  static constexpr int STAGES = DP <= 64 ? 3 : 2;
  static constexpr int CB = DP / SPAN;             // column blocks per tile
  static constexpr uint32_t Q_CB = BLOCK_M * 128;  // bytes of one column block
  static constexpr uint32_t KV_CB = BLOCK_N * 128;
  static constexpr uint32_t Q_BYTES = CB * Q_CB;   // TMA transaction bytes of a Q / K / V tile
  static constexpr uint32_t KV_BYTES = CB * KV_CB;
  static constexpr int Q = 0;
  static constexpr int K = Q + Q_BYTES;            // + stage * KV_BYTES
  static constexpr int V = K + STAGES * KV_BYTES;
  static constexpr int MASK = V + STAGES * KV_BYTES;  // BLOCK_N bytes per stage: the K tile's mask
  static constexpr int FLAG = MASK + STAGES * BLOCK_N;  // BLOCK_N bytes per stage: V rows scrubbed
  static constexpr int BARS = FLAG + STAGES * BLOCK_N;
  static constexpr int NBARS = 2 + 5 * STAGES;
  static constexpr int BYTES = BARS + 8 * NBARS + 1024;  // + slack to align the start (launch_sm90)
  static_assert(DP % SPAN == 0 && DP >= 64 && DP <= 128, "head dims padded to 64 or 128");
};

// The mbarriers. Stage s of K: full_k[s] completes when the tile has landed (and its mask bytes are
// in), empty_k[s] when both consumers are done with it; likewise V, whose landed_v[s] completes when
// the TMA load has landed and the fix-up warp may start (only used with a fix-up). Every consumer
// thread releases a stage after its own reads: the wgmma operands are read by the warpgroup as a
// whole, but the mask bytes and flags by each thread on its own (and a release by one lane would be
// a divergent branch while wgmmas are in flight, which makes ptxas serialize them).
struct Barriers {
  uint64_t* full_q;   // count 1 (+ Q_BYTES)
  uint64_t* empty_q;  // count CONSUMERS: the Q / staging buffer is free again
  uint64_t* full_k;   // [STAGES] count 1 (+ 32 mask-warp lanes with a mask) (+ KV_BYTES)
  uint64_t* empty_k;  // [STAGES] count RELEASERS
  uint64_t* full_v;   // [STAGES] count 1 (+ KV_BYTES), or 32 fix-up lanes with a fix-up
  uint64_t* empty_v;  // [STAGES] count RELEASERS
  uint64_t* landed_v; // [STAGES] count 1 (+ KV_BYTES), fix-up only
};

// A position in the ring: stage index and the parity of its current round.
template <int STAGES>
struct Ring {
  int stage = 0;
  uint32_t phase = 0;
  CA_DEVICE void advance() {
    if (++stage == STAGES) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// What every role of a block agrees on: its query rows, which key tiles it visits, and the
// (batch, head) it works on.
struct Work {
  const FwdParams& p;
  int64_t m0;      // first query row of the block
  int64_t diag;    // causal: key j visible to query i iff j <= i + diag
  int n_tiles;     // key tiles that can hold a visible key
  int b = 0, h = 0, hk = 0;
  const unsigned char* tile_any = nullptr;
  const unsigned char* mask = nullptr;

  CA_DEVICE explicit Work(const FwdParams& params) : p(params) {
    const int qtile = p.causal ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;  // longest first
    m0 = (int64_t)qtile * BLOCK_M;
    diag = (int64_t)p.Nk - p.Nq;
    n_tiles = (int)(((int64_t)p.Nk + BLOCK_N - 1) / BLOCK_N);
    if (p.causal) {
      const int64_t last_row = m0 + BLOCK_M - 1 < p.Nq - 1 ? m0 + BLOCK_M - 1 : (int64_t)p.Nq - 1;
      const int64_t last_key = last_row + diag;
      n_tiles = last_key < 0 ? 0 : (int)(last_key / BLOCK_N + 1 < n_tiles ? last_key / BLOCK_N + 1 : n_tiles);
    }
  }
  // The (batch, head) pairs of this block: blockIdx.y, + gridDim.y, ... below B * H (B * H + gridDim.y <
  // 2^31: the launch layer's condition for this kernel).
  int bh = -1;
  CA_DEVICE bool next_head() {
    bh = bh < 0 ? (int)blockIdx.y : bh + (int)gridDim.y;
    if (bh >= p.B * p.H) return false;
    b = bh / p.H;
    h = bh % p.H;
    hk = h / (p.H / p.Hk);
    tile_any = p.tile_any ? p.tile_any + b * p.tile_any_sb : nullptr;
    mask = p.mask ? p.mask + b * p.mask_sb : nullptr;
    return true;
  }
  // The next key tile at or after j with an unmasked key (every role reads the same flags).
  CA_DEVICE int next_tile(int j) const {
    if (tile_any != nullptr)
      while (j < n_tiles && !tile_any[j]) ++j;
    return j;
  }
  CA_DEVICE int keys_left(int j) const {
    const int64_t left = (int64_t)p.Nk - (int64_t)j * BLOCK_N;
    return (int)(left < BLOCK_N ? left : BLOCK_N);
  }
  // Some row of the block must not see some key of tile j that is loaded: its V needs the scrub.
  CA_DEVICE bool crosses_diagonal(int j) const {
    return p.causal && (int64_t)j * BLOCK_N + keys_left(j) - 1 > m0 + diag;
  }
  CA_DEVICE bool fixup() const { return p.mask != nullptr || p.causal; }
};

#if CA_SM90A
using namespace sm90;

CA_DEVICE float quiet_nan() { return bits_as_float(0x7fffffffu); }

// ---------------------------------------------------------------------------------------------
// Producer: warp 0's elected lane. Q once per (batch, head), then K_j and V_j for every visited tile.
template <int DP>
CA_DEVICE void produce(const Args& a, Work& w, unsigned char* smem, const Barriers& bar) {
  using L = Smem<DP>;
  Ring<L::STAGES> ring;
  uint32_t q_round = 0;
  for (; w.next_head(); ++q_round) {
    mbar_wait(bar.empty_q, (q_round & 1) ^ 1);  // the previous (batch, head)'s out stores have read it
    mbar_arrive_expect_tx(bar.full_q, L::Q_BYTES);
    for (int cb = 0; cb < L::CB; ++cb)
      tma_load(smem + L::Q + cb * L::Q_CB, &a.tq, bar.full_q, cb * SPAN, (int)w.m0, w.h, w.b);
    for (int j = w.next_tile(0); j < w.n_tiles; j = w.next_tile(j + 1), ring.advance()) {
      const int s = ring.stage;
      mbar_wait(&bar.empty_k[s], ring.phase ^ 1);
      mbar_arrive_expect_tx(&bar.full_k[s], L::KV_BYTES);
      for (int cb = 0; cb < L::CB; ++cb)
        tma_load(smem + L::K + s * L::KV_BYTES + cb * L::KV_CB, &a.tk, &bar.full_k[s], cb * SPAN, j * BLOCK_N, w.hk,
                 w.b);
      mbar_wait(&bar.empty_v[s], ring.phase ^ 1);
      uint64_t* const done = w.fixup() ? &bar.landed_v[s] : &bar.full_v[s];
      mbar_arrive_expect_tx(done, L::KV_BYTES);
      for (int cb = 0; cb < L::CB; ++cb)
        tma_load(smem + L::V + s * L::KV_BYTES + cb * L::KV_CB, &a.tv, done, cb * SPAN, j * BLOCK_N, w.hk, w.b);
    }
  }
}

// Mask warp: the mask bytes of K_j's keys (0 past Nk) next to its stage, before full_k completes.
template <int DP>
CA_DEVICE void copy_mask(const Args& a, Work& w, unsigned char* smem, const Barriers& bar, int lane) {
  using L = Smem<DP>;
  Ring<L::STAGES> ring;
  while (w.next_head()) {
    for (int j = w.next_tile(0); j < w.n_tiles; j = w.next_tile(j + 1), ring.advance()) {
      const int s = ring.stage;
      mbar_wait(&bar.empty_k[s], ring.phase ^ 1);
      unsigned char* const dst = smem + L::MASK + s * BLOCK_N;
      const int left = w.keys_left(j);
      for (int r = lane; r < BLOCK_N; r += 32) dst[r] = r < left ? w.mask[(int64_t)j * BLOCK_N + r] : 0;
      mbar_arrive(&bar.full_k[s]);
    }
  }
}

// Fix-up warp: between V_j landing and full_v, zero the V rows of masked keys and, on a tile that
// crosses the causal diagonal, the non-finite elements of the others, flagging their keys. Lane r
// owns key rows r, r + 32, ...; a row of a column block is one 128-byte line (the swizzle only
// permutes the 16-byte chunks within it).
template <typename T, int DP>
CA_DEVICE void fix_v(const Args& a, Work& w, unsigned char* smem, const Barriers& bar, int lane) {
  using L = Smem<DP>;
  constexpr uint32_t EXP = WgmmaInput<T>::bf16 ? 0x7f80u : 0x7c00u;  // exponent field: all ones = Inf/NaN
  Ring<L::STAGES> ring;
  while (w.next_head()) {
    for (int j = w.next_tile(0); j < w.n_tiles; j = w.next_tile(j + 1), ring.advance()) {
      const int s = ring.stage;
      mbar_wait(&bar.landed_v[s], ring.phase);
      unsigned char* const v = smem + L::V + s * L::KV_BYTES;
      unsigned char* const flags = smem + L::FLAG + s * BLOCK_N;
      const bool scrub = w.crosses_diagonal(j);
      const int left = w.keys_left(j);
      const unsigned char* const mrow = w.mask != nullptr ? w.mask + (int64_t)j * BLOCK_N : nullptr;
#pragma unroll 1
      for (int r = lane; r < BLOCK_N; r += 32) {
        const bool masked = mrow != nullptr && r < left && !mrow[r];
        if (!masked && !scrub) continue;
        uint32_t any = 0;
#pragma unroll 1
        for (int c = 0; c < 8 * L::CB; ++c) {  // the row's 16-byte chunks, 8 per column block
          bytes16* const chunk = reinterpret_cast<bytes16*>(v + (c / 8) * L::KV_CB + r * 128) + c % 8;
          bytes16 x = *chunk;
          uint32_t bad = 0;
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const uint32_t m =
                ((x.w[q] & EXP) == EXP ? 0x0000ffffu : 0u) | (((x.w[q] >> 16) & EXP) == EXP ? 0xffff0000u : 0u);
            bad |= m;
            x.w[q] &= masked ? 0u : ~m;
          }
          if (masked || bad) *chunk = x;
          any |= bad;
        }
        if (scrub) flags[r] = any != 0 ? 1 : 0;
      }
      fence_proxy_async_shared();  // the zeroed elements are read by wgmma (the async proxy)
      mbar_arrive(&bar.full_v[s]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Consumers.

// Per-thread state of one consumer thread for one (batch, head): its O accumulators, the tile's S /
// P accumulators, the packed P operand, and the statistics of its two rows (g and g + 8 of its warp's
// 16): partial row sums (this thread's columns) and, running max, the row maximum and the rescale
// factor still to be applied to O.
template <typename T, int DP>
struct ConsumerRegs {
  float o[DP / 2];                 // O (64 x DP): register i = row 16w + g + 8((i>>1)&1), dim 8(i>>2) + 2t + (i&1)
  float s[BLOCK_N / 2];            // S, then P, of the current tile, same layout over keys
  uint32_t pa[BLOCK_N / 16][4];    // P of the previous tile as wgmma A operands (k-step ks: keys 16ks..)
  float lsum[2], row_m[2], alpha[2];
};

// The S accumulator layout is the A operand layout: A element i of k-step ks is S register 8ks + i,
// so packing adjacent pairs to T makes P the A operand of O += P V without moving data across lanes.
template <typename T, int DP>
CA_DEVICE void pack_p(ConsumerRegs<T, DP>& r) {
#pragma unroll
  for (int ks = 0; ks < BLOCK_N / 16; ++ks)
#pragma unroll
    for (int q = 0; q < 4; ++q) r.pa[ks][q] = pack2<T>(r.s[8 * ks + 2 * q], r.s[8 * ks + 2 * q + 1]);
}

// S = Qhat Khat_j^T: DP / 16 wgmmas of m64 n128 k16, both operands K-major from 128B-swizzled tiles.
template <typename T, int DP>
CA_DEVICE void issue_scores(float (&s)[BLOCK_N / 2], const unsigned char* sQc, const unsigned char* sK) {
  using L = Smem<DP>;
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) {
    // k-step kk: 16 dims = 32 bytes at (kk % 4) * 32 of column block kk / 4; SBO = 8 rows x 128 bytes
    const uint64_t dq = make_smem_desc(sQc + (kk / 4) * L::Q_CB + (kk % 4) * 32, 16, 1024, Swizzle::B128);
    const uint64_t dk = make_smem_desc(sK + (kk / 4) * L::KV_CB + (kk % 4) * 32, 16, 1024, Swizzle::B128);
    wgmma_ss<BLOCK_N, T>(s, dq, dk, kk > 0);
  }
}

// O += P V_j: BLOCK_N / 16 wgmmas of m64 nDP k16, P from registers, V as the MN-major B operand
// (dims contiguous): LBO steps to the next 64-dim column block, SBO to the next 8 keys.
template <typename T, int DP>
CA_DEVICE void issue_pv(float (&o)[DP / 2], const uint32_t (&pa)[BLOCK_N / 16][4], const unsigned char* sV) {
  using L = Smem<DP>;
#pragma unroll
  for (int ks = 0; ks < BLOCK_N / 16; ++ks) {
    const uint64_t dv = make_smem_desc(sV + ks * 16 * 128, L::KV_CB, 1024, Swizzle::B128);
    wgmma_rs<DP, T, Major::MN>(o, pa[ks], dv, true);
  }
}

// x, as a value the compiler cannot derive from anything (no instruction on the GPU).
CA_DEVICE int opaque(int x) {
#ifndef CA_EMULATOR
  asm volatile("" : "+r"(x));
#endif
  return x;
}

// This consumer thread is done with a stage: its wgmmas reading it have completed (its wgmma_wait
// shows that for the warpgroup) and it has read its mask / flag bytes.
CA_DEVICE void release(uint64_t* empty) { mbar_arrive(empty); }

template <int R>
CA_DEVICE void fence_regs(float (&x)[R]) {
  fence_operand(x);
}
template <int KS>
CA_DEVICE void fence_regs(uint32_t (&x)[KS][4]) {
#pragma unroll
  for (int i = 0; i < KS; ++i) fence_operand(x[i]);
}

// This thread's columns of a tile as bits: column 8m + 2t + e (m = 0..15, e = 0..1) is bit 2m + e, the
// order of the S registers (register i holds bit 2(i>>2) + (i&1)). bytes[] is BLOCK_N bytes, one per
// key (mask bytes, or the fix-up's flags); bit set where the byte is non-zero.
CA_DEVICE uint32_t column_bits(const unsigned char* bytes, int t) {
  uint32_t bits = 0;
#pragma unroll
  for (int m = 0; m < BLOCK_N / 8; ++m) {
    const uint32_t pair = *reinterpret_cast<const uint16_t*>(bytes + 8 * m + 2 * t);  // columns 2t, 2t + 1
    bits |= ((pair & 0xffu) != 0 ? 1u : 0u) << (2 * m) | ((pair >> 8) != 0 ? 2u : 0u) << (2 * m);
  }
  return bits;
}

// The bits (as column_bits) of this thread's columns below `limit` (tile-relative): the columns
// 8m + 2t + e < limit form a prefix of the bit order.
CA_DEVICE uint32_t prefix_bits(int limit, int t) {
  const int L = limit - 2 * t;
  if (L <= 0) return 0u;
  const int n = 2 * (L >> 3) + ((L & 7) < 2 ? (L & 7) : 2);
  return n >= 32 ? 0xffffffffu : (1u << n) - 1u;
}

// Where the running-max variant's logits get their bias from: none, a bias of dtype T, or float32.
enum class Bias { NONE, SAME, F32 };

// The exponentials proper, in place in r.s. CHECK: select by the visibility bits vis[h] (and poison
// the pairs in `bad`); without it (a full tile nobody has to mask) every pair is visible. brow[h]:
// the bias of row h at the tile's first key (rows past Nq read the last row's: never stored), for
// BIAS != NONE.
template <typename T, int DP, bool RUNNING_MAX, bool CHECK, Bias BIAS>
CA_DEVICE void exponentials(ConsumerRegs<T, DP>& r, const uint32_t (&vis)[2], uint32_t bad,
                            const char* const (&brow)[2], int keys_left, int t, float scale_log2, float offset_log2) {
  auto bit = [](uint32_t word, int i) { return (word >> (2 * (i >> 2) + (i & 1))) & 1u; };
  if constexpr (!RUNNING_MAX) {
    // Fixed offset: exp2(scale_h s log2e - off log2e) <= exp(Headroom) by construction.
#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) {
      float x = r.s[i] * scale_log2 - offset_log2;
      if constexpr (CHECK) {
        x = bit(bad, i) ? quiet_nan() : x;
        x = bit(vis[(i >> 1) & 1], i) ? x : neg_inf();  // exp2(-inf) = 0
      }
      const float pe = exp2_fast(x);
      r.lsum[(i >> 1) & 1] += pe;
      r.s[i] = pe;
    }
  } else {
    // Online softmax: x = (scale_h s + bias) log2 e on visible pairs, -inf elsewhere.
    float tile_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) {
      float x = r.s[i] * scale_log2;
      if constexpr (BIAS != Bias::NONE) {
        int kr = 8 * (i >> 2) + 2 * t + (i & 1);
        if constexpr (CHECK) kr = kr < keys_left ? kr : 0;  // a key past Nk has no bias (the pair is invisible)
        const char* const b = brow[(i >> 1) & 1];
        x += (BIAS == Bias::F32 ? reinterpret_cast<const float*>(b)[kr] : to_float(reinterpret_cast<const T*>(b)[kr])) *
             LOG2E;
      }
      if constexpr (CHECK) {
        x = bit(bad, i) ? quiet_nan() : x;
        x = bit(vis[(i >> 1) & 1], i) ? x : neg_inf();
      }
      r.s[i] = x;
      tile_max[(i >> 1) & 1] = fmaxf(tile_max[(i >> 1) & 1], x);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float m_new = fmaxf(r.row_m[h], quad_max(tile_max[h]));
      // a row with nothing visible yet keeps m = -inf; subtract 0 then, never (-inf) - (-inf)
      const float m_use = m_new == neg_inf() ? 0.f : m_new;
      r.alpha[h] = exp2_fast(r.row_m[h] - m_use);  // 0 when row_m was -inf; applied to O before P_j V_j
      r.row_m[h] = m_new;
      tile_max[h] = m_use;
      r.lsum[h] *= r.alpha[h];
    }
#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) {
      const float pe = exp2_fast(r.s[i] - tile_max[(i >> 1) & 1]);  // exp2(-inf) = 0
      r.lsum[(i >> 1) & 1] += pe;
      r.s[i] = pe;
    }
  }
}

// exponentials<..., CHECK, BIAS> for the bias this problem has (uniform: one instantiation runs).
template <typename T, int DP, bool RUNNING_MAX, bool CHECK>
CA_DEVICE void exponentials_for(ConsumerRegs<T, DP>& r, const uint32_t (&vis)[2], uint32_t bad, const FwdParams& p,
                                const char* bias, int64_t wrow0, int64_t key0, int keys_left, int g, int t,
                                float scale_log2, float offset_log2) {
  const char* brow[2] = {nullptr, nullptr};
  if (RUNNING_MAX && bias != nullptr) {
    const int esize = p.bias_f32 ? 4 : (int)sizeof(T);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = wrow0 + g + 8 * h;
      brow[h] = bias + ((row < p.Nq ? row : p.Nq - 1) * p.bias_sq + key0) * esize;
    }
  }
  if (!RUNNING_MAX || bias == nullptr)
    exponentials<T, DP, RUNNING_MAX, CHECK, Bias::NONE>(r, vis, bad, brow, keys_left, t, scale_log2, offset_log2);
  else if (p.bias_f32)
    exponentials<T, DP, RUNNING_MAX, CHECK, Bias::F32>(r, vis, bad, brow, keys_left, t, scale_log2, offset_log2);
  else
    exponentials<T, DP, RUNNING_MAX, CHECK, Bias::SAME>(r, vis, bad, brow, keys_left, t, scale_log2, offset_log2);
}

// The exponentials of tile j, in place in r.s: P = exp2(x - off) on visible pairs, 0 elsewhere
// (selected, never multiplied: an invisible key's score may be NaN).
template <typename T, int DP, bool RUNNING_MAX>
CA_DEVICE void softmax(ConsumerRegs<T, DP>& r, const Work& w, int j, int64_t wrow0, int g, int t,
                       const unsigned char* sMask, const unsigned char* sFlag, float scale_log2, float offset_log2,
                       const char* bias) {
  const FwdParams& p = w.p;
  const int64_t key0 = (int64_t)j * BLOCK_N;
  // Visibility of row rr = g + 8h of the warp (h = (i>>1)&1): keys kr < keys_left, causal
  // key0 + kr <= wrow0 + rr + diag (kr < rr + cdiff + 1), and unmasked: a prefix of the row's bits
  // and the mask bits. Computed only where the tile needs it (warp-uniform): a tile past Nk, a mask,
  // a tile crossing this warp's causal diagonal, or a scrubbed tile (flags).
  const int keys_left = w.keys_left(j);
  const int cdiff = causal_cdiff(p.causal, wrow0 + w.diag, key0, BLOCK_N);
  const bool scrubbed = w.crosses_diagonal(j);
  uint32_t vis[2] = {0xffffffffu, 0xffffffffu};
  uint32_t bad = 0;  // keys whose V row held a NaN or Inf (scrubbed tiles): a visible one poisons P
  if (keys_left == BLOCK_N && p.mask == nullptr && cdiff >= BLOCK_N - 1 && !scrubbed) {
    exponentials_for<T, DP, RUNNING_MAX, false>(r, vis, bad, p, bias, wrow0, key0, keys_left, g, t, scale_log2,
                                                offset_log2);
    return;
  }
  const uint32_t mbits = p.mask != nullptr ? column_bits(sMask, t) : 0xffffffffu;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int causal_limit = g + 8 * h + cdiff + 1;
    vis[h] = mbits & prefix_bits(causal_limit < keys_left ? causal_limit : keys_left, t);
  }
  if (scrubbed) bad = column_bits(sFlag, t);
  exponentials_for<T, DP, RUNNING_MAX, true>(r, vis, bad, p, bias, wrow0, key0, keys_left, g, t, scale_log2,
                                             offset_log2);
}

// O *= alpha (running max): the rescale of the previous tile's statistics, applied while O is not in
// flight, before the next P V.
template <typename T, int DP, bool RUNNING_MAX>
CA_DEVICE void rescale_o(ConsumerRegs<T, DP>& r) {
  if constexpr (RUNNING_MAX) {
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) r.o[i] *= r.alpha[(i >> 1) & 1];
  }
}

// One consumer warpgroup c (0 or 1): rows m0 + 64c .. m0 + 64c + 63 of every (batch, head).
template <typename T, int DP, bool RUNNING_MAX>
CA_DEVICE void consume(const Args& a, Work& w, unsigned char* smem, const Barriers& bar, int c) {
  using L = Smem<DP>;
  const FwdParams& p = a.p;
  const int tid = (int)threadIdx.x - WG * (1 + c);  // thread in the warpgroup
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const uint32_t my_turn = BAR_TURN + c, other_turn = BAR_TURN + (1 - c);
  unsigned char* const sQc = smem + L::Q + c * WG_ROWS * 128;  // this warpgroup's rows of each column block
  Ring<L::STAGES> ring;
  uint32_t q_round = 0;
  ConsumerRegs<T, DP> r;

  for (; w.next_head(); ++q_round) {
    const int64_t wrow0 = w.m0 + c * WG_ROWS + 16 * warp;  // first query row of this warp
    const float scale_log2 = p.scale[w.h] * LOG2E;
    // every logit is at most scale_h groups (one cosine per normalized chunk): exp(s - offset) <= exp(Headroom)
    const float offset = p.scale[w.h] * p.groups - Headroom<T>::value;
    const float offset_log2 = offset * LOG2E;
    const int bias_esize = p.bias_f32 ? 4 : (int)sizeof(T);
    const char* const bias =
        p.bias ? static_cast<const char*>(p.bias) + (w.b * p.bias_sb + w.h * p.bias_sh) * bias_esize : nullptr;
#pragma unroll
    for (int i = 0; i < DP / 2; ++i) r.o[i] = 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      r.lsum[h] = 0.f;
      r.row_m[h] = neg_inf();
      r.alpha[h] = 1.f;
    }

    mbar_wait(bar.full_q, q_round & 1);  // also before the epilogue reuses the buffer: the load has landed
    if (c == 1) named_barrier_arrive(BAR_TURN, 2 * WG);  // consumer 0 issues first

    // Slots, software-pipelined over the visited key tiles: a slot issues S_j = Qhat Khat_j^T and
    // P_{j-1} V_{j-1}, hands the tensor cores to the other consumer, then computes the exponentials
    // of S_j while P_{j-1} V_{j-1} runs. The first slot has no P V, the last one no S. The three kinds
    // are separate branches, each with its own fixed sequence of commits and waits: ptxas keeps the
    // wgmmas asynchronous only when it can match every wait to its commits.
    auto exponentials_of = [&](int j, int s, uint32_t phase) {
      fence_regs(r.s);
      // the fix-up's flags of this tile are published by full_v (its mask bytes by full_k)
      if (w.crosses_diagonal(j)) mbar_wait(&bar.full_v[s], phase);
      softmax<T, DP, RUNNING_MAX>(r, w, j, wrow0, g, t, smem + L::MASK + s * BLOCK_N, smem + L::FLAG + s * BLOCK_N,
                                  scale_log2, offset_log2, bias);
      release(&bar.empty_k[s]);  // K_j and its mask bytes are no longer read by this thread
    };
    int j = w.next_tile(0);
    int prev = -1;  // ring stage of the previous tile (its V and P), -1: none
    uint32_t prev_phase = 0;
    while (j < w.n_tiles || prev >= 0) {
      if (j < w.n_tiles) {
        const int s = ring.stage;
        if (prev >= 0) mbar_wait(&bar.full_v[prev], prev_phase);
        mbar_wait(&bar.full_k[s], ring.phase);
        rescale_o<T, DP, RUNNING_MAX>(r);
        named_barrier_sync(my_turn, 2 * WG);
        fence_regs(r.o);
        fence_regs(r.s);
        fence_regs(r.pa);
        wgmma_fence();
        issue_scores<T, DP>(r.s, sQc, smem + L::K + s * L::KV_BYTES);
        wgmma_commit();
        if (prev >= 0) {  // a middle slot: S_j and P_{j-1} V_{j-1}
          issue_pv<T, DP>(r.o, r.pa, smem + L::V + prev * L::KV_BYTES);
          wgmma_commit();
          named_barrier_arrive(other_turn, 2 * WG);
          wgmma_wait<1>();  // S_j is complete; P_{j-1} V_{j-1} may still run
          exponentials_of(j, s, ring.phase);
          wgmma_wait<0>();
          fence_regs(r.o);
          release(&bar.empty_v[prev]);  // nor V_{j-1} and its flags
        } else {  // the first slot: S_0 only
          named_barrier_arrive(other_turn, 2 * WG);
          wgmma_wait<0>();
          exponentials_of(j, s, ring.phase);
        }
        fence_regs(r.pa);
        pack_p<T, DP>(r);  // the A registers of P_{j-1} V_{j-1} are free again
        prev = s;
        prev_phase = ring.phase;
        j = w.next_tile(j + 1);
        ring.advance();
      } else {  // the last slot: P V of the last tile
        mbar_wait(&bar.full_v[prev], prev_phase);
        rescale_o<T, DP, RUNNING_MAX>(r);
        named_barrier_sync(my_turn, 2 * WG);
        fence_regs(r.o);
        fence_regs(r.pa);
        wgmma_fence();
        issue_pv<T, DP>(r.o, r.pa, smem + L::V + prev * L::KV_BYTES);
        wgmma_commit();
        named_barrier_arrive(other_turn, 2 * WG);
        wgmma_wait<0>();
        fence_regs(r.o);
        release(&bar.empty_v[prev]);
        prev = -1;
      }
    }
    if (c == 0) named_barrier_sync(BAR_TURN, 2 * WG);  // consumer 1's last hand-off

    // Epilogue. lse per row; O / l (NaN rows where O is not finite) staged in this warpgroup's Q rows
    // (its own wgmmas are complete, the other consumer reads only its own rows), then TMA stores.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float l = quad_sum(r.lsum[h]);
      const float inv = l == 0.f ? 0.f : 1.f / l;  // no visible key: O = 0 (a NaN l stays NaN)
      // poison = NaN when some element of the row's O is NaN or Inf (x * 0 is NaN exactly then), else 0
      float poison = 0.f;
#pragma unroll
      for (int i = 2 * h; i < DP / 2; i += 4) poison += r.o[i] * 0.f + r.o[i + 1] * 0.f;
      poison = quad_sum(poison);
      const int64_t row = wrow0 + g + 8 * h;
      if (t == 0 && row < p.Nq) {
        float lse = neg_inf();  // (a NaN value row seen only through p = 0 still poisons it)
        if (l != 0.f) lse = RUNNING_MAX ? r.row_m[h] * LN2 + logf(l) : logf(l) + offset;
        p.lse[w.b * p.lse_sb + w.h * p.lse_sh + row] = lse + poison;
      }
      // Register i holds dims d = 8m + 2t, d + 1 (m = i >> 2) of row rr = 16 warp + g + 8h: byte
      // 2(d % 64) = 16(m % 8) + 4t of the row's 128-byte line in column block m / 8. The 128B swizzle
      // (sQc is 1024-byte aligned) XORs the 16-byte chunk index with rr % 8 = g. The lane coordinates
      // are re-read opaquely so that these addresses are computed here, not hoisted out of the loop
      // over (batch, head) into registers live across the main loop.
      const int ge = opaque(g), rr = 16 * warp + ge + 8 * h;
      unsigned char* const line = sQc + rr * 128 + 4 * opaque(t);
#pragma unroll
      for (int i = 2 * h; i < DP / 2; i += 4) {
        const int m = i >> 2;
        *reinterpret_cast<uint32_t*>(line + (m / 8) * L::Q_CB + 16 * ((m % 8) ^ ge)) =
            pack2<T>(r.o[i] * inv + poison, r.o[i + 1] * inv + poison);
      }
    }
    fence_proxy_async_shared();  // the staged tile is read by the TMA store (the async proxy)
    named_barrier_sync(BAR_EPILOGUE + c, WG);
    if (tid == 0) {
      for (int cb = 0; cb < L::CB; ++cb)
        tma_store(&a.to, sQc + cb * L::Q_CB, cb * SPAN, (int)(w.m0 + c * WG_ROWS), w.h, w.b);
      tma_store_commit();
      tma_store_wait<0>();
      mbar_arrive(bar.empty_q);  // the producer may load the next Q
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel. Grid: x = query tile of BLOCK_M rows (reversed under causal so the longest tiles start
// first), y = (batch, head), looping by gridDim.y when B*H exceeds the grid's y limit.
template <typename T, int DP, bool RUNNING_MAX>
__global__ void __launch_bounds__(THREADS, 1) attn_fwd_sm90(const __grid_constant__ Args args) {
  using L = Smem<DP>;
  CA_DYNAMIC_SHARED(smem_raw);
  unsigned char* const smem = smem_raw + ((1024u - window_addr(smem_raw) % 1024u) % 1024u);
  uint64_t* const bars = reinterpret_cast<uint64_t*>(smem + L::BARS);
  const Barriers bar{bars, bars + 1, bars + 2, bars + 2 + L::STAGES, bars + 2 + 2 * L::STAGES,
                     bars + 2 + 3 * L::STAGES, bars + 2 + 4 * L::STAGES};
  Work w(args.p);
  const bool with_mask = args.p.mask != nullptr;

  if (threadIdx.x == 0) {
    mbar_init(bar.full_q, 1);
    mbar_init(bar.empty_q, CONSUMERS);
    for (int s = 0; s < L::STAGES; ++s) {
      mbar_init(&bar.full_k[s], with_mask ? 1 + 32 : 1);
      mbar_init(&bar.empty_k[s], RELEASERS);
      mbar_init(&bar.full_v[s], w.fixup() ? 32 : 1);
      mbar_init(&bar.empty_v[s], RELEASERS);
      mbar_init(&bar.landed_v[s], 1);
    }
    fence_proxy_async_shared();  // the initialized mbarriers are visible to the TMA (the async proxy)
  }
  __syncthreads();

  const int wg = threadIdx.x / WG, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  if (wg == 0) {
    setmaxnreg_dec<PRODUCER_REGS>();
    if (warp == TMA_WARP) {
      if (elect_one_sync()) produce<DP>(args, w, smem, bar);
    } else if (warp == MASK_WARP) {
      if (with_mask) copy_mask<DP>(args, w, smem, bar, lane);
    } else if (warp == FIXUP_WARP) {
      if (w.fixup()) fix_v<T, DP>(args, w, smem, bar, lane);
    }
  } else {
    setmaxnreg_inc<CONSUMER_REGS>();
    consume<T, DP, RUNNING_MAX>(args, w, smem, bar, wg - 1);
  }
}

#endif  // CA_SM90A

}  // namespace fwd90
}  // namespace ca
