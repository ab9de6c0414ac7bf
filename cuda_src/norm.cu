// norm.cu — grouped l2 normalization of q and k (the forward pre-pass) and its gradient (the backward
// post-pass). Each row of D elements is split into `groups` equal chunks; a chunk x becomes
// x / max(||x||, 1e-12). One warp owns one row: lane l keeps elements l, l+32, ... in registers
// (coalesced 32-element sweeps, D <= 256 -> at most 8 per lane), and each chunk's sum of squares is
// a warp-wide sum (xor butterfly, so every lane gets the bitwise same norm and the same branch).
// Both kernels are memory-bound one-pass kernels; sums are in fp32 for every dtype.
//
// Non-finite rows (docs/kernels.md "Non-finite values"): the forward pre-pass keeps them non-finite
// (a NaN or Inf in a chunk makes its norm NaN or Inf, so the chunk comes out NaN and every logit it
// takes part in is NaN). The backward's pre-pass asks for NORM_ZERO_NONFINITE instead: there q-hat and
// k-hat are only operands of the products over pairs, where a row that is not finite must add exactly
// 0 on the pairs it does not see (its visible pairs are NaN already through lse and D).
#include "common.cuh"
#include "params.cuh"

namespace ca {
namespace norm {

constexpr float EPS = 1e-12f;          // problem.NORM_EPS
constexpr int WARPS = 4;               // rows per block
constexpr int THREADS = 32 * WARPS;
constexpr int MAX_D = 256;
constexpr int PER_LANE = MAX_D / 32;   // register slots per lane
constexpr float FLT_MAX_ = 3.402823466e38f;

// NormParams::mode bits (launch.py NORM_MODE_*).
constexpr int NORM_ZERO_NONFINITE = 1;  // a chunk whose norm is not finite (COPY: an element) becomes 0
constexpr int NORM_COPY = 2;            // copy x (zero-padded to xhat_cols) without normalizing it

template <typename T>
CA_DEVICE float load(const void* base, int64_t i) { return to_float(static_cast<const T*>(base)[i]); }

// Sum over the lane-strided elements of one chunk [lo, hi) of a row held as v[i] = row[lane + 32 i].
CA_DEVICE float chunk_sum_sq(const float* v, int lane, int lo, int hi) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) {
    const int e = lane + 32 * i;
    if (e >= lo && e < hi) s += v[i] * v[i];
  }
  return warp_sum(s);
}

// xhat = grouped_l2norm(x), written with xhat_cols >= D columns (zeros past D, so the attention
// kernels can read 16-byte chunks of a padded row); rnorm = 1 / max(||chunk||, eps) per chunk.
// p.mode: NORM_COPY writes x itself (no rnorm), NORM_ZERO_NONFINITE zeroes what is not finite.
template <typename T>
__global__ void __launch_bounds__(THREADS) l2norm_fwd(const NormParams p) {
  const int lane = threadIdx.x % 32;
  const int chunk = p.D / p.groups;
  const bool zero_nonfinite = (p.mode & NORM_ZERO_NONFINITE) != 0;
  for (int64_t row = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32; row < p.rows;
       row += (int64_t)gridDim.x * WARPS) {
    float v[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int e = lane + 32 * i;
      v[i] = e < p.D ? load<T>(p.x, row * p.x_stride + e) : 0.f;
    }
    if (p.mode & NORM_COPY) {
      if (zero_nonfinite) {
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) v[i] = fabsf(v[i]) <= FLT_MAX_ ? v[i] : 0.f;
      }
    } else {
      for (int g = 0; g < p.groups; ++g) {
        const int lo = g * chunk, hi = lo + chunk;
        const float n = sqrtf(chunk_sum_sq(v, lane, lo, hi));
        const float r = 1.f / fmaxf(n, EPS);
        const bool zero = zero_nonfinite && !(n <= FLT_MAX_);  // warp-uniform: one n per chunk
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
          const int e = lane + 32 * i;
          if (e >= lo && e < hi) v[i] = zero ? 0.f : v[i] * r;
        }
        if (lane == 0 && p.rnorm != nullptr) p.rnorm[row * p.groups + g] = r;
      }
    }
    T* y = static_cast<T*>(p.xhat) + row * p.xhat_stride;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int e = lane + 32 * i;
      if (e < p.xhat_cols) y[e] = from_float<T>(v[i]);  // v[i] == 0 past D
    }
  }
}

// Gradient through the norm, per chunk with n = ||x||, xhat = x / max(n, eps):
//   dx = (dxhat - xhat <xhat, dxhat>) / n   when n > eps,   dx = dxhat / eps   otherwise
// (below eps the map is x -> x / eps, a plain scaling). The norm is recomputed from x exactly as
// l2norm_fwd computes it, so the branch agrees with the forward's; xhat is rebuilt in fp32 from x
// rather than read back rounded to T. dxhat has dtype TG (float32 accumulators, or T).
// A chunk whose dxhat is all zero gets dx = 0 even when x is not finite (a masked key with a NaN k took
// part in nothing): <xhat, dxhat> sums only the nonzero dxhat, and a zero dot skips the projection,
// which changes nothing for a finite x.
template <typename T, typename TG>
__global__ void __launch_bounds__(THREADS) l2norm_bwd(const NormParams p) {
  const int lane = threadIdx.x % 32;
  const int chunk = p.D / p.groups;
  for (int64_t row = (int64_t)blockIdx.x * WARPS + threadIdx.x / 32; row < p.rows;
       row += (int64_t)gridDim.x * WARPS) {
    float x[PER_LANE], dy[PER_LANE];
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int e = lane + 32 * i;
      x[i] = e < p.D ? load<T>(p.x, row * p.x_stride + e) : 0.f;
      dy[i] = e < p.D ? load<TG>(p.dxhat, row * p.dxhat_stride + e) : 0.f;
    }
    for (int g = 0; g < p.groups; ++g) {
      const int lo = g * chunk, hi = lo + chunk;
      const float n = sqrtf(chunk_sum_sq(x, lane, lo, hi));
      const float r = 1.f / fmaxf(n, EPS);
      if (n > EPS) {  // warp-uniform: every lane holds the same n
        float dot = 0.f;  // <xhat, dxhat> over the chunk, xhat = x r rebuilt in fp32
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
          const int e = lane + 32 * i;
          if (e >= lo && e < hi && dy[i] != 0.f) dot += x[i] * r * dy[i];
        }
        dot = warp_sum(dot);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
          const int e = lane + 32 * i;
          if (e >= lo && e < hi) dy[i] = (dot != 0.f ? dy[i] - x[i] * r * dot : dy[i]) * r;
        }
      } else {
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) {
          const int e = lane + 32 * i;
          if (e >= lo && e < hi) dy[i] *= r;
        }
      }
    }
    T* dx = static_cast<T*>(p.dx) + row * p.dx_stride;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) {
      const int e = lane + 32 * i;
      if (e < p.D) dx[e] = from_float<T>(dy[i]);
    }
  }
}

}  // namespace norm
}  // namespace ca
