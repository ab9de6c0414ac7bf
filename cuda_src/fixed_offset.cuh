// fixed_offset.cuh — the constants of the fixed-offset softmax, shared by every forward kernel
// (forward.cu for sm_80+, hopper_fwd.cu for sm_90a), so both bound their exponentials identically.
#pragma once
#include "common.cuh"

namespace ca {

constexpr float LN2 = 0.6931471805599453f;

// Fixed-offset headroom: with b = scale_h groups the logit bound, P = exp(s - (b - HEADROOM)) lies in
// [exp(HEADROOM - 2b), exp(HEADROOM)]. For fp16, P is rounded to fp16 before P V, so the range is moved
// into fp16's normal range [6.1e-5, 65504] = [exp(-9.70), exp(11.09)]: with HEADROOM = 10.5 and the
// launch layer's limit b <= 10, P lies in [exp(-9.5), exp(10.5)] = [7.5e-5, 36316]. bf16 and fp32
// share fp32's exponent range (the launch layer's limit b <= 40 keeps P >= exp(-80), a normal float).
// The limits are launch.FIXED_OFFSET_MAX_BOUND.
template <typename T> struct Headroom { static constexpr float value = 0.f; };
template <> struct Headroom<half_t> { static constexpr float value = 10.5f; };

}  // namespace ca
