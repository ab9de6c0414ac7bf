// tiles.cuh — the tile layer of the attention kernels (forward.cu, backward.cu), between the
// warp-level primitives of common.cuh and the kernels:
//
//   visible()        the one visibility rule (causal diagonal and key mask), in tile coordinates
//   TileCopy         a ROWS x (CPR 16-byte chunks) tile from global rows into padded shared rows with
//                    cp.async: per-thread offsets computed once, rows past the end zero-filled
//   lane offsets     where each lane points its ldmatrix for an A operand, a B operand whose rows are
//                    the n index (K in Q K^T), and a transposed B operand (V in P V)
//   mma_*_step       one k-step of a warp's tile product on the tensor cores, for MT m16 row tiles
//                    at once, so that every B fragment read from shared memory feeds 2 MT mma
//   *_step<T>        the same products for any element type on one row tile (KStep<T>), operands
//                    named by their storage order, for code written once for every dtype (backward)
//
// Shared memory is addressed with saddr_t values (common.cuh): a buffer's address is taken once and
// every fragment address is that plus a compile-time byte offset.
#pragma once
#include "common.cuh"

namespace ca {

// ---------------------------------------------------------------------------------------------
// Visibility. Key j is visible to query i iff the key exists and is not masked (key_ok) and, under
// causal, j <= i + (Nk - Nq). With rows and keys counted from a tile's first row i0 and first key j0
// (rr = i - i0, kr = j - j0) the causal test is kr - rr <= cdiff, cdiff = i0 + (Nk - Nq) - j0;
// without causal, cdiff is any bound >= every kr - rr of the tile (causal_cdiff gives both).
CA_DEVICE bool visible(int kr, int rr, int cdiff, bool key_ok) { return key_ok && kr - rr <= cdiff; }

// cdiff of a tile whose keys and rows differ by at most `span` (keys kr < span, rows rr >= 0 and
// rr < span), from the first row's horizon i0 + (Nk - Nq) and the first key j0, clamped into
// [-span, span] so that it fits an int whatever the 64-bit sizes.
CA_DEVICE int causal_cdiff(bool causal, int64_t horizon, int64_t j0, int span) {
  if (!causal) return span;
  const int64_t c = horizon - j0;
  return (int)(c < -span ? -span : (c > span ? span : c));
}

// ---------------------------------------------------------------------------------------------
// Tile copies, global -> shared, one 16-byte cp.async per chunk.
//
// The tile is ROWS rows of CPR chunks; global rows are `src_pitch` bytes apart (from the tile start
// `src`; offsets inside a tile are 32-bit, the 64-bit part is in `src`), shared rows DST_PITCH bytes. NT threads share the work: chunk i = pass * NT + tid is row
// i / CPR, chunk i % CPR. When NT is a multiple of CPR every pass of a thread copies the same chunk
// column, NT / CPR rows further on: each pass adds a constant to the shared address (an immediate) and
// a stride to the global pointer. Rows at or
// past `rows_left` are zero-filled (src_bytes = 0, the source then the tile start: never out of
// bounds); FULL copies skip that test.
template <int ROWS, int CPR, int DST_PITCH, int NT>
struct TileCopy {
  static constexpr int TOTAL = ROWS * CPR;
  static constexpr int PASSES = (TOTAL + NT - 1) / NT;
  static constexpr bool STRIDED = NT % CPR == 0 && TOTAL % NT == 0;
  static constexpr int RSTEP = NT / CPR;  // rows between a thread's passes (STRIDED)

  // Thread `tid` copies rows r < rows_left whose row_ok[r] (global bytes; MASKED only) is nonzero;
  // the others become zeros in shared memory. Nothing is kept between calls (registers are the
  // scarce resource of the kernels that call this in their main loop): the thread's offsets are a
  // few integer instructions from tid.
  template <bool FULL, bool MASKED = false>
  static CA_DEVICE void copy(saddr_t dst, const char* src, int src_pitch, int rows_left, int tid,
                             const unsigned char* row_ok = nullptr) {
    if constexpr (STRIDED) {
      const int row0 = tid / CPR;
      const saddr_t d = dst + row0 * DST_PITCH + (tid % CPR) * 16;
      const char* s = src + row0 * src_pitch + (tid % CPR) * 16;
#pragma unroll
      for (int it = 0; it < PASSES; ++it) {
        const int r = row0 + it * RSTEP;
        bool inside = FULL || r < rows_left;
        if constexpr (MASKED) inside = inside && row_ok[r < rows_left ? r : 0] != 0;
        cp_async_16_s(d + it * RSTEP * DST_PITCH, inside ? s : src, inside ? 16 : 0);
        s += RSTEP * src_pitch;
      }
    } else {
      // The thread's chunk moves NT chunks on per pass: NT / CPR rows and NT % CPR columns, plus a row
      // when the column wraps. Pointers are advanced, not recomputed (a recomputed offset per pass
      // would be a loop invariant the compiler keeps in registers across the caller's loop).
      int r = tid / CPR, c = tid % CPR;
      const char* s = src + r * src_pitch + c * 16;
      saddr_t d = dst + r * DST_PITCH + c * 16;
#pragma unroll
      for (int it = 0; it < PASSES; ++it) {
        if (TOTAL % NT == 0 || r < ROWS) {
          bool inside = FULL || r < rows_left;
          if constexpr (MASKED) inside = inside && row_ok[r < rows_left ? r : 0] != 0;
          cp_async_16_s(d, inside ? s : src, inside ? 16 : 0);
        }
        r += NT / CPR;
        c += NT % CPR;
        s += (NT / CPR) * src_pitch + (NT % CPR) * 16;
        d += (NT / CPR) * DST_PITCH + (NT % CPR) * 16;
        if (c >= CPR) {
          c -= CPR;
          r += 1;
          s += src_pitch - CPR * 16;
          d += DST_PITCH - CPR * 16;
        }
      }
    }
  }

  // copy() of the first `chunks_left` chunks of each row, the others zero-filled like the rows at or
  // past rows_left (a head dim padded past the global rows' length: the backward's D_PAD above 128).
  template <bool FULL>
  static CA_DEVICE void copy_cols(saddr_t dst, const char* src, int src_pitch, int rows_left, int chunks_left,
                                  int tid) {
    int r = tid / CPR, c = tid % CPR;
    const char* s = src + r * src_pitch + c * 16;
    saddr_t d = dst + r * DST_PITCH + c * 16;
#pragma unroll
    for (int it = 0; it < PASSES; ++it) {
      if (TOTAL % NT == 0 || r < ROWS) {
        const bool inside = (FULL || r < rows_left) && c < chunks_left;
        cp_async_16_s(d, inside ? s : src, inside ? 16 : 0);
      }
      r += NT / CPR;
      c += NT % CPR;
      s += (NT / CPR) * src_pitch + (NT % CPR) * 16;
      d += (NT / CPR) * DST_PITCH + (NT % CPR) * 16;
      if (NT % CPR != 0 && c >= CPR) {
        c -= CPR;
        r += 1;
        s += src_pitch - CPR * 16;
        d += DST_PITCH - CPR * 16;
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Lane offsets of ldmatrix.x4 (bytes, rows PITCH bytes apart). Fragment layouts: common.cuh header.
//
// A operand, 16 rows x 16 b16 columns at the tile origin: matrices (rows 0-7 | 8-15) x (columns 0-7 |
// 8-15), lane l pointing at row l % 16, column 8 (l / 16).
template <int PITCH>
CA_DEVICE int a_lane_off(int lane) { return (lane % 16) * PITCH + (lane / 16) * 16; }
// B operand of two 8-wide n tiles, stored with n as the row (K rows in Q K^T): matrices (n 0-7, k 0-7),
// (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15), so registers 0-1 are n tile 0, 2-3 n tile 1.
template <int PITCH>
CA_DEVICE int bn_lane_off(int lane) { return ((lane / 16) * 8 + lane % 8) * PITCH + ((lane / 8) % 2) * 16; }
// B operand of two 8-wide n tiles stored with k as the row (V in P V), loaded with .trans: matrices
// (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <int PITCH>
CA_DEVICE int bk_lane_off(int lane) { return (((lane / 8) % 2) * 8 + lane % 8) * PITCH + (lane / 16) * 16; }

// ---------------------------------------------------------------------------------------------
// 16-bit tile products (mma.m16n8k16, fp32 accumulators). A warp owns MT m16 row tiles; acc[mt][n]
// is the accumulator of row tile mt and 8-column tile n.

// The A fragments of MT row tiles (16 rows apart) at one k16 step: `a_lane` = tile origin + a_lane_off.
template <int MT, int PITCH>
CA_DEVICE void load_a(uint32_t (&a)[MT][4], saddr_t a_lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) ldsm_x4(a[mt], a_lane + mt * 16 * PITCH);
}

// acc += A B^T over one k16 step, B stored as N rows (the n index) of k: `b_lane` = the step's
// column origin + bn_lane_off. Each ldmatrix.x4 of B feeds 2 MT mma.
template <typename T, int MT, int N, int PITCH>
CA_DEVICE void mma_abt_step(float (&acc)[MT][N / 8][4], const uint32_t (&a)[MT][4], saddr_t b_lane) {
#pragma unroll
  for (int jj = 0; jj < N / 16; ++jj) {
    uint32_t b[4];
    ldsm_x4(b, b_lane + jj * 16 * PITCH);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_m16n8k16(acc[mt][2 * jj], a[mt], b, T());
      mma_m16n8k16(acc[mt][2 * jj + 1], a[mt], b + 2, T());
    }
  }
}

// acc += A B over one k16 step, B stored as 16 rows (the k index) of N columns: `b_lane` = the step's
// row origin + bk_lane_off. Each ldmatrix.x4.trans of B feeds 2 MT mma.
template <typename T, int MT, int N, int PITCH>
CA_DEVICE void mma_ab_step(float (&acc)[MT][N / 8][4], const uint32_t (&a)[MT][4], saddr_t b_lane) {
#pragma unroll
  for (int nn = 0; nn < N / 16; ++nn) {
    uint32_t b[4];
    ldsm_x4_trans(b, b_lane + nn * 32);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      mma_m16n8k16(acc[mt][2 * nn], a[mt], b, T());
      mma_m16n8k16(acc[mt][2 * nn + 1], a[mt], b + 2, T());
    }
  }
}

// The accumulators of two adjacent 8-column tiles are exactly the A layout of one k16 step: (c0, c1)
// of tile 0 -> a0 (row g), (c2, c3) -> a1 (row g + 8), tile 1 -> a2, a3. Packed to T, no shuffle.
template <typename T>
CA_DEVICE void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack2<T>(c0[0], c0[1]);
  a[1] = pack2<T>(c0[2], c0[3]);
  a[2] = pack2<T>(c1[0], c1[1]);
  a[3] = pack2<T>(c1[2], c1[3]);
}

// ---------------------------------------------------------------------------------------------
// fp32 tile products: 3xTF32 on mma.m16n8k8 (split_tf32 / mma_3xtf32 in common.cuh). An 8 x 4 block of
// fp32 is an 8 x 8 block of b16 to ldmatrix, and lane (g, t) receives 32-bit word t of row g: the
// tf32 A and B fragments. So the fp32 operands load with the 16-bit lane offsets, one 8-float k-step
// per 32 bytes.

// acc += A B^T over one k8 step (one m16 row tile), A and B as above.
template <int N, int PITCH>
CA_DEVICE void mma_abt_step_f32(float (&acc)[N / 8][4], saddr_t a_lane, saddr_t b_lane) {
  uint32_t a[4], ab[4], as[4];
  ldsm_x4(a, a_lane);
#pragma unroll
  for (int i = 0; i < 4; ++i) split_tf32(bits_as_float(a[i]), ab[i], as[i]);
#pragma unroll
  for (int jj = 0; jj < N / 16; ++jj) {
    uint32_t b[4], bb[4], bs[4];
    ldsm_x4(b, b_lane + jj * 16 * PITCH);
#pragma unroll
    for (int i = 0; i < 4; ++i) split_tf32(bits_as_float(b[i]), bb[i], bs[i]);
    mma_3xtf32(acc[2 * jj], ab, as, bb, bs);
    mma_3xtf32(acc[2 * jj + 1], ab, as, bb + 2, bs + 2);
  }
}

// acc += P B for the 8 keys of accumulator tile c (P in its accumulator layout), B stored as key rows
// of N fp32 columns. The k index is permuted so that the accumulator layout is the A layout: A column
// t <-> key 2t, column t + 4 <-> key 2t + 1, i.e. a0 = c0 (g, 2t), a1 = c2 (g + 8, 2t), a2 = c1,
// a3 = c3; B rows follow the same map: b0 = B[key 2t][n g], b1 = B[key 2t + 1][n g]. `b_lane` = the
// 8 keys' origin + 2t rows + g columns (scalar loads, conflict-free with a padded pitch).
template <int N, int PITCH>
CA_DEVICE void mma_pb_step_f32(float (&acc)[N / 8][4], const float (&c)[4], saddr_t b_lane) {
  uint32_t ab[4], as[4];
  split_tf32(c[0], ab[0], as[0]);
  split_tf32(c[2], ab[1], as[1]);
  split_tf32(c[1], ab[2], as[2]);
  split_tf32(c[3], ab[3], as[3]);
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
    uint32_t bb[2], bs[2];
    split_tf32(lds_f32(b_lane + n * 32), bb[0], bs[0]);
    split_tf32(lds_f32(b_lane + n * 32 + PITCH), bb[1], bs[1]);
    mma_3xtf32(acc[n], ab, as, bb, bs);
  }
}

// ---------------------------------------------------------------------------------------------
// Products of any element type on one m16 row tile, one k-step at a time (KStep<T>: 16 for the 16-bit
// types, 8 for fp32; 32 bytes of a row either way), for kernels whose code is written once for every
// dtype (backward.cu). Operands are named by how they are stored: A "mk" = rows m (k contiguous),
// A "km" = rows k; B "nk" = rows n (K in Q K^T), B "kn" = rows k (V in P V); C = fp32 accumulators
// of a 16 x 8 KT tile in registers. Each function takes lane addresses: the tile origin (step 0)
// plus the *_lane_off below; step s adds a compile-time offset.
template <typename T> struct KStep { static constexpr int value = sizeof(T) == 4 ? 8 : 16; };

// A "km" (rows k, 16 m columns): the transposed A operand, loaded with .trans: matrices (k 0-7, m 0-7),
// (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) give a0..a3. fp32: lane (g, t) at row t, column g.
template <typename T, int PITCH>
CA_DEVICE int km_lane_off(int lane) {
  if constexpr (sizeof(T) == 4) return (lane % 4) * PITCH + (lane / 4) * 4;
  else return bn_lane_off<PITCH>(lane);  // (the same rows and halves as an "nk" B operand's)
}
// B "kn" read against A "km" (the same k rows): 16-bit as in mma_ab_step; fp32 lane (g, t) at row t,
// column g.
template <typename T, int PITCH>
CA_DEVICE int kn_lane_off(int lane) {
  if constexpr (sizeof(T) == 4) return km_lane_off<T, PITCH>(lane);
  else return bk_lane_off<PITCH>(lane);  // (the layout mma_ab_step reads)
}
// B "kn" read against C (cb_step): 16-bit as in mma_ab_step; fp32 as in mma_pb_step_f32 (rows 2t,
// 2t + 1, column g).
template <typename T, int PITCH>
CA_DEVICE int cb_lane_off(int lane) {
  if constexpr (sizeof(T) == 4) return 2 * (lane % 4) * PITCH + (lane / 4) * 4;
  else return bk_lane_off<PITCH>(lane);
}

// acc += A B^T over k-step ks: A "mk" (a_lane = a_lane_off), B "nk" of N rows (b_lane = bn_lane_off).
template <typename T, int N, int PITCH_B>
CA_DEVICE void abt_step(float (&acc)[N / 8][4], saddr_t a_lane, saddr_t b_lane, int ks) {
  if constexpr (sizeof(T) == 4) {
    mma_abt_step_f32<N, PITCH_B>(acc, a_lane + 32 * ks, b_lane + 32 * ks);
  } else {
    uint32_t a[1][4];
    ldsm_x4(a[0], a_lane + 32 * ks);
    mma_abt_step<T, 1, N, PITCH_B>(*reinterpret_cast<float(*)[1][N / 8][4]>(&acc), a, b_lane + 32 * ks);
  }
}

// abt_step of a 16-bit type with the step's A fragment already in registers (ldsm_x4 at a_lane).
template <typename T, int N, int PITCH_B>
CA_DEVICE void abt_step_regs(float (&acc)[N / 8][4], const uint32_t (&a)[4], saddr_t b_lane, int ks) {
  static_assert(sizeof(T) == 2, "16-bit A fragments");
  const uint32_t a1[1][4] = {{a[0], a[1], a[2], a[3]}};
  mma_abt_step<T, 1, N, PITCH_B>(*reinterpret_cast<float(*)[1][N / 8][4]>(&acc), a1, b_lane + 32 * ks);
}

// acc += C B over k-step ks (C's 8-column tiles 2 ks, 2 ks + 1; fp32: tile ks): B "kn" of N columns,
// b_lane = cb_lane_off. C goes from registers into the A operand (acc_to_a; fp32 mma_pb_step_f32).
template <typename T, int N, int KT, int PITCH_B>
CA_DEVICE void cb_step(float (&acc)[N / 8][4], const float (&c)[KT][4], saddr_t b_lane, int ks) {
  if constexpr (sizeof(T) == 4) {
    mma_pb_step_f32<N, PITCH_B>(acc, c[ks], b_lane + ks * 8 * PITCH_B);
  } else {
    uint32_t a[1][4];
    acc_to_a<T>(a[0], c[2 * ks], c[2 * ks + 1]);
    mma_ab_step<T, 1, N, PITCH_B>(*reinterpret_cast<float(*)[1][N / 8][4]>(&acc), a, b_lane + ks * 16 * PITCH_B);
  }
}

// The A operand of k-step ks of A "km" (a_lane = km_lane_off<T>), as loaded for atb_step: 16-bit
// a.big holds the fragment; fp32 its 3xTF32 split.
struct FragA { uint32_t big[4], small[4]; };
template <typename T, int PITCH_A>
CA_DEVICE FragA load_km(saddr_t a_lane, int ks) {
  FragA a;
  const saddr_t p = a_lane + ks * KStep<T>::value * PITCH_A;
  if constexpr (sizeof(T) == 4) {
    split_tf32(lds_f32(p), a.big[0], a.small[0]);
    split_tf32(lds_f32(p + 32), a.big[1], a.small[1]);
    split_tf32(lds_f32(p + 4 * PITCH_A), a.big[2], a.small[2]);
    split_tf32(lds_f32(p + 4 * PITCH_A + 32), a.big[3], a.small[3]);
  } else {
    ldsm_x4_trans(a.big, p);
  }
  return a;
}

// acc += A B over k-step ks with A from load_km and B "kn" of N columns (b_lane = kn_lane_off<T>).
template <typename T, int N, int PITCH_B>
CA_DEVICE void atb_step(float (&acc)[N / 8][4], const FragA& a, saddr_t b_lane, int ks) {
  const saddr_t p = b_lane + ks * KStep<T>::value * PITCH_B;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int n = 0; n < N / 8; ++n) {
      uint32_t bb[2], bs[2];
      split_tf32(lds_f32(p + 32 * n), bb[0], bs[0]);
      split_tf32(lds_f32(p + 32 * n + 4 * PITCH_B), bb[1], bs[1]);
      mma_3xtf32(acc[n], a.big, a.small, bb, bs);
    }
  } else {
    uint32_t a1[1][4] = {{a.big[0], a.big[1], a.big[2], a.big[3]}};
    mma_ab_step<T, 1, N, PITCH_B>(*reinterpret_cast<float(*)[1][N / 8][4]>(&acc), a1, p);
  }
}

// acc += the row sums of an A operand (an mma against a B of ones): rows g and g + 8 in acc[0] and
// acc[2] (every column holds the same sum). From load_km, or from C's k-step ks (the operand cb_step
// makes of it).
template <typename T>
CA_DEVICE void ones_step(float (&acc)[4], const FragA& a) {
  if constexpr (sizeof(T) == 4) {
    uint32_t bb[2], bs[2];
    split_tf32(1.f, bb[0], bs[0]);
    split_tf32(1.f, bb[1], bs[1]);
    mma_3xtf32(acc, a.big, a.small, bb, bs);
  } else {
    const uint32_t ones[2] = {pack2<T>(1.f, 1.f), pack2<T>(1.f, 1.f)};
    mma_m16n8k16(acc, a.big, ones, T());
  }
}
template <typename T, int KT>
CA_DEVICE void c_ones_step(float (&acc)[4], const float (&c)[KT][4], int ks) {
  FragA a;
  if constexpr (sizeof(T) == 4) {
    split_tf32(c[ks][0], a.big[0], a.small[0]);
    split_tf32(c[ks][2], a.big[1], a.small[1]);
    split_tf32(c[ks][1], a.big[2], a.small[2]);
    split_tf32(c[ks][3], a.big[3], a.small[3]);
  } else {
    acc_to_a<T>(a.big, c[2 * ks], c[2 * ks + 1]);
  }
  ones_step<T>(acc, a);
}

}  // namespace ca
