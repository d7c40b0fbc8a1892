// Device helpers shared by the router kernels (routing.cu, router_certified.cu): fp64 loads of bf16 data, the
// reference's sqrt-softplus, order-preserving selection keys and the one-warp top-k with its renormalisation.
#pragma once

#include "common.cuh"

namespace dsv4 {

constexpr int kMaxTopk = 16;
constexpr int kMaxExperts = 512;
constexpr int kRouteThreads = 256;

// bf16 -> fp64 with integer ops for finite normal numbers, avoiding the slow F2F.F64 path: the fp64 high word is
// sign | (exponent + 1023 - 127) << 20 | mantissa << 13. Zero, subnormals, inf and NaN (biased exponent 0 or 255:
// one unsigned compare after the shift below) take the cvt.
__device__ __forceinline__ double bf16_to_double(uint32_t b16) {
  const uint32_t f = b16 << 16;
  if ((f & 0x7F800000u) - 0x00800000u >= 0x7F000000u) return static_cast<double>(__uint_as_float(f));
  const uint32_t hi = (((f & 0x7FFFFFFFu) >> 3) + 0x38000000u) | (f & 0x80000000u);
  return __hiloint2double(static_cast<int>(hi), 0);
}

template <typename T>
__device__ __forceinline__ double to_double(T v);
template <>
__device__ __forceinline__ double to_double<float>(float v) { return static_cast<double>(v); }
template <>
__device__ __forceinline__ double to_double<__nv_bfloat16>(__nv_bfloat16 v) {
  return bf16_to_double(*reinterpret_cast<uint16_t*>(&v));
}

// Eight consecutive elements (16- or 32-byte aligned) as fp64.
template <typename XT>
__device__ __forceinline__ void load8(const XT* p, double (&v)[8]);
template <>
__device__ __forceinline__ void load8<float>(const float* p, double (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, double (&v)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = bf16_to_double(w[i] & 0xFFFFu);
    v[2 * i + 1] = bf16_to_double(w[i] >> 16);
  }
}

// torch.nn.functional.softplus (beta 1, threshold 20) then sqrt, in float64; rounded to fp32 like ref_math.
__device__ __forceinline__ float sqrt_softplus(float logit) {
  const double x = static_cast<double>(logit);
  const double sp = x > 20.0 ? x : log1p(exp(x));
  return static_cast<float>(sqrt(sp));
}

__device__ __forceinline__ uint32_t orderable(float v) {
  uint32_t u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;   // -0 ties with +0, as in the reference's sort
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Selection key of expert e: higher is better; 0 (never a real key: orderable() > 0) marks padding.
__device__ __forceinline__ unsigned long long route_key(float biased, int e) {
  return (static_cast<unsigned long long>(orderable(biased)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(e));
}

__device__ __forceinline__ unsigned long long umax64(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}

// Lane l's experts l + 32 i: unbiased scores from score_of(e) and their selection keys (0 marks no expert).
template <int PL, typename ScoreOf>
__device__ __forceinline__ void lane_keys(int lane, int num_experts, const float* __restrict__ bias,
                                          ScoreOf score_of, unsigned long long (&key)[PL], float (&score)[PL]) {
#pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int e = lane + kWarp * i;
    key[i] = 0ull;
    score[i] = 0.0f;
    if (e < num_experts) {
      score[i] = score_of(e);
      key[i] = route_key(bias != nullptr ? __fadd_rn(score[i], bias[e]) : score[i], e);
    }
  }
}

// The warp-wide maximum of the lanes' keys (distinct, 0 = absent); the owner retires it (sets it to 0).
template <int PL>
__device__ __forceinline__ unsigned long long warp_take_max(unsigned long long (&key)[PL]) {
  unsigned long long best = 0ull;
#pragma unroll
  for (int i = 0; i < PL; ++i) best = umax64(best, key[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) best = umax64(best, __shfl_xor_sync(0xffffffffu, best, o));
#pragma unroll
  for (int i = 0; i < PL; ++i)
    if (key[i] == best) key[i] = 0ull;
  return best;
}

// One warp picks a token's top-k: each lane holds up to PL keys (0 = absent) and their unbiased scores, in any
// placement (the expert id is in the key).
// k rounds of a warp maximum; the owner of each winner retires it. Weights: the chosen scores over their fp64 sum
// (in choice order, as the reference's), times the scale in fp32. Writes weights_row[0, k) and ids_row[0, k).
template <int PL>
__device__ __forceinline__ void warp_topk_store(unsigned long long (&key)[PL], const float (&score)[PL], int k,
                                                float route_scale, float* weights_row, int64_t* ids_row, int lane) {
  int my_expert = 0;
  float my_score = 0.0f;
  for (int r = 0; r < k; ++r) {
    unsigned long long best = 0ull;
#pragma unroll
    for (int i = 0; i < PL; ++i) best = umax64(best, key[i]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) best = umax64(best, __shfl_xor_sync(0xffffffffu, best, o));
    const int e = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(best));
    float s = 0.0f;
    bool owner = false;
#pragma unroll
    for (int i = 0; i < PL; ++i) {   // keys are distinct: only the owner lane matches
      if (key[i] == best) {
        s = score[i];
        key[i] = 0ull;
        owner = true;
      }
    }
    s = __shfl_sync(0xffffffffu, s, __ffs(__ballot_sync(0xffffffffu, owner)) - 1);
    if (lane == r) {
      my_expert = e;
      my_score = s;
    }
  }
  double total = 0.0;
  for (int j = 0; j < k; ++j) total += static_cast<double>(__shfl_sync(0xffffffffu, my_score, j));
  if (lane < k) {
    weights_row[lane] = __fmul_rn(static_cast<float>(static_cast<double>(my_score) / total), route_scale);
    ids_row[lane] = my_expert;
  }
}

// The certified decode router (router_certified.cu): weights [T, k] and ids [T, k] of bf16 x [T, D] with T <= 64,
// D % 128 == 0, D <= 8192. Returns false (and does nothing) when the shape is outside that envelope.
bool certified_dense_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& bias, int64_t topk,
                           double route_scale, at::Tensor& weights, at::Tensor& ids);

}  // namespace dsv4
