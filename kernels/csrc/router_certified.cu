// Certified dense router for decode batches (spec §5.1; reference: kernels/routing.py dense_route): the
// reference's expert choice and weights, bit for bit, with the gate GEMM on tensor cores.
//
//   router_estimate_kernel  bf16 mma.sync, fp32 accumulation. Grid (expert tiles of 16, K slices). For each K
//                           slice: the partial logit sum_d x w and the partial sum_d |x| |w| (the scale of its
//                           rounding error), for 16 experts x up to 64 tokens. No shared-memory staging: every
//                           thread loads 16-byte runs of its rows straight into MMA fragments (below).
//   router_certify_kernel   one CTA per token: an interval per expert that provably holds the reference's fp32
//                           logit, hence its selection key; the experts that could still be in the top-k (usually
//                           exactly k); exact fp64 logits for those alone; the reference's selection and weights.
//
// Why the answer is the reference's. The reference rounds an fp64 sum of exact bf16 products once to fp32, then
// scores in fp64 (routing.py). Here the estimate L~ of a logit L differs from L by at most
//   beta = gamma * A,   A = sum_d |x_d w_d|,
// where gamma counts the roundings on the longest accumulation path with a 2x margin: every m16n8k16 step adds 16
// exact products to its accumulator with alignment and normalisation by truncation, off by at most
// 18 * 2^-23 * (|c| + sum |p|) (each of 17 aligned terms loses < 2^-23 of the largest, the truncated result
// < 2^-23 of itself); then the 4-warp and the K-slice fp32 sums. A is estimated the same way, all terms >= 0, so
// A <= A~ / (1 - gamma). The GPU tests check |L~ - L| <= beta on adversarial inputs. The reference logit lies
// in [rd(L~ - beta), ru(L~ + beta)]; score (softplus, sqrt) and key (+ bias, orderable) are monotone, widened by
// one fp32 ulp against the fp64 library's last-bit non-monotonicity, so key_lo <= key <= key_hi for every expert.
// If tau is the k-th largest key_lo, an expert with key_hi < tau has k experts certainly above it and is out;
// the others (the candidates) get their exact logits and keys, and the top-k among them is the reference's.
// A row with a non-finite estimate or bound makes every expert a candidate (the fp64 path, exactly).
//
// Fragments (PTX ISA, mma.m16n8k16 bf16, g = lane / 4, q = lane % 4): A (16 experts x 16) a0:(g, 2q..2q+1)
// a1:(g+8, ..) a2:(g, 2q+8..) a3:(g+8, 2q+8..); B (16 x 8 tokens) b0:(2q..2q+1, g) b1:(2q+8.., g); C c0,c1:(g, 2q..)
// c2,c3:(g+8, 2q..). A dot product does not care how K is ordered as long as both operands agree: lane q takes
// the 8 elements [8q, 8q + 8) of each 32-element block as one 16-byte load, and its registers .x .y feed the
// first MMA's (2q, 2q + 8) pairs and .z .w the second's, for the expert rows and the token rows alike.
#include "ops.h"
#include "routing.cuh"

namespace dsv4 {

constexpr int kEstWarps = 4;
constexpr int kEstExperts = 16;     // one m16 tile per CTA
constexpr int kEstBlock = 32;       // K elements per 16-byte load per lane group: two k16 MMAs
constexpr int kCertMaxTokens = 64;  // 8 n-tiles
constexpr int kCertThreads = 512;  // 16 warps: the exact dots spread thin, more latency hidden
constexpr int kCertMaxChunks = 2;   // x row in registers: D <= 2 * 8 * 512 = 8192
constexpr int kCertGroup = 8;       // exact dot products per reduction round
constexpr int kSliceBatch = 16;     // K-slice partials loaded together
constexpr double kAbsFloor = 0x1p-100;   // products the tensor cores may flush: D * 2^-126, with room to spare

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 abs_bf16x8(uint4 v) {
  return make_uint4(v.x & 0x7FFF7FFFu, v.y & 0x7FFF7FFFu, v.z & 0x7FFF7FFFu, v.w & 0x7FFF7FFFu);
}

// Unrolled 32-element blocks per warp: every load of a warp's K range is in flight at once, within ~64 registers.
constexpr int est_unroll(int nt) { return nt <= 2 ? 4 : (nt <= 4 ? 2 : 1); }
constexpr int est_slice(int nt) { return kEstWarps * kEstBlock * est_unroll(nt); }

// part_logit, part_abs [S, T, E]: slice s of CTA (tile, s) = the fixed-order sum of its 4 warps' K quarters.
template <int NT>
__global__ void __launch_bounds__(kEstWarps * kWarp) router_estimate_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, float* __restrict__ part_logit,
    float* __restrict__ part_abs, int num_tokens, int dim, int num_experts) {
  constexpr int kUnroll = est_unroll(NT), kSub = kEstBlock * kUnroll, kTok = NT * 8;
  __shared__ float red[kEstWarps][2][kEstExperts][kTok];
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, g = lane / 4, q = lane % 4;
  const int e0 = blockIdx.x * kEstExperts, s = blockIdx.y;
  const int k_begin = s * kSub * kEstWarps + warp * kSub;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  const bool ea_ok = e0 + g < num_experts, eb_ok = e0 + g + 8 < num_experts;
  const uint4* wa = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(ea_ok ? e0 + g : 0) * dim);
  const uint4* wb = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(eb_ok ? e0 + g + 8 : 0) * dim);
  uint4 ra[kUnroll], rb[kUnroll], rx[kUnroll][NT];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int d = k_begin + kEstBlock * u + 8 * q;   // dim % 128 == 0: a block is all in or all out
    const bool in = d < dim;
    ra[u] = in && ea_ok ? __ldg(wa + d / 8) : zero;
    rb[u] = in && eb_ok ? __ldg(wb + d / 8) : zero;
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int tok = n * 8 + g;
      rx[u][n] = in && tok < num_tokens ? __ldg(reinterpret_cast<const uint4*>(x + static_cast<int64_t>(tok) * dim) + d / 8)
                                        : zero;
    }
  }
  float acc[NT][4], acc_abs[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = acc_abs[n][i] = 0.0f;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const uint4 a = ra[u], b = rb[u], aa = abs_bf16x8(ra[u]), ba = abs_bf16x8(rb[u]);
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const uint4 xv = rx[u][n], xa = abs_bf16x8(rx[u][n]);
      mma_bf16(acc[n], a.x, b.x, a.y, b.y, xv.x, xv.y);
      mma_bf16(acc[n], a.z, b.z, a.w, b.w, xv.z, xv.w);
      mma_bf16(acc_abs[n], aa.x, ba.x, aa.y, ba.y, xa.x, xa.y);
      mma_bf16(acc_abs[n], aa.z, ba.z, aa.w, ba.w, xa.z, xa.w);
    }
  }
#pragma unroll
  for (int n = 0; n < NT; ++n) {
    const int c = n * 8 + 2 * q;
    red[warp][0][g][c] = acc[n][0];
    red[warp][0][g][c + 1] = acc[n][1];
    red[warp][0][g + 8][c] = acc[n][2];
    red[warp][0][g + 8][c + 1] = acc[n][3];
    red[warp][1][g][c] = acc_abs[n][0];
    red[warp][1][g][c + 1] = acc_abs[n][1];
    red[warp][1][g + 8][c] = acc_abs[n][2];
    red[warp][1][g + 8][c + 1] = acc_abs[n][3];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * kEstExperts * kTok; i += kEstWarps * kWarp) {   // experts fastest: coalesced
    const int which = i / (kEstExperts * kTok), tok = i / kEstExperts % kTok, e = i % kEstExperts;
    if (tok >= num_tokens || e0 + e >= num_experts) continue;
    float v = red[0][which][e][tok];
#pragma unroll
    for (int r = 1; r < kEstWarps; ++r) v = __fadd_rn(v, red[r][which][e][tok]);
    float* out = which == 0 ? part_logit : part_abs;
    out[(static_cast<int64_t>(s) * num_tokens + tok) * num_experts + e0 + e] = v;
  }
}

// Bounds on the reference's score sqrt(softplus(x)) (fp64, threshold 20, rounded to fp32) of an fp32 logit x, in
// fp32: expf (<= 2 ulp), log1pf (<= 1 ulp) and sqrtf (correctly rounded) put the result within 3 fp32 ulp of the
// reference's, so a 2^-20 relative widening (8 ulp) brackets it. Outside [-80, 20] (expf would lose precision near
// underflow) and for NaN, the fp64 reference function widened by one ulp.
__device__ __forceinline__ void score_bounds(float x, float& lo, float& hi) {
  if (x > 20.0f) {
    const float r = sqrtf(x);
    lo = __fmul_rd(r, 1.0f - 0x1p-20f);
    hi = __fmul_ru(r, 1.0f + 0x1p-20f);
  } else if (x >= -80.0f) {
    const float r = sqrtf(log1pf(expf(x)));
    lo = __fmul_rd(r, 1.0f - 0x1p-20f);
    hi = __fmul_ru(r, 1.0f + 0x1p-20f);
  } else {
    const float r = sqrt_softplus(x);
    lo = nextafterf(r, -INFINITY);
    hi = nextafterf(r, INFINITY);
  }
}

template <int PL>
__device__ __forceinline__ void select_candidates(const unsigned long long* s_key, const float* s_score, int count,
                                                  int k, float route_scale, float* weights_out, int64_t* ids_out,
                                                  int t, int lane) {
  unsigned long long key[PL];
  float score[PL];
#pragma unroll
  for (int i = 0; i < PL; ++i) {
    const int slot = lane + kWarp * i;
    key[i] = slot < count ? s_key[slot] : 0ull;
    score[i] = slot < count ? s_score[slot] : 0.0f;
  }
  warp_topk_store<PL>(key, score, k, route_scale, weights_out + static_cast<int64_t>(t) * k,
                      ids_out + static_cast<int64_t>(t) * k, lane);
}

// One CTA per token. Thread tid owns experts tid + 512 i for the intervals; warp 0 finds tau; the whole CTA then
// takes the candidates kCertGroup at a time (threads split D, x held in registers as fp64); warp 0 selects.
template <int CH>
__global__ void __launch_bounds__(kCertThreads, 1) router_certify_kernel(
    const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias,
    const float* __restrict__ part_logit, const float* __restrict__ part_abs, int num_slices, double gamma,
    float* __restrict__ weights_out, int64_t* __restrict__ ids_out, int num_tokens, int dim, int num_experts, int k,
    float route_scale) {
  constexpr int kPer = (kMaxExperts + kCertThreads - 1) / kCertThreads;
  constexpr int kWarps = kCertThreads / kWarp;
  __shared__ unsigned long long s_lo[kMaxExperts];    // key lower bounds, by expert
  __shared__ int s_cand[kMaxExperts];                  // candidate experts, ascending
  __shared__ unsigned long long s_key[kMaxExperts];   // their exact keys, by candidate slot
  __shared__ float s_score[kMaxExperts];               // their exact unbiased scores
  __shared__ double s_part[kWarps][kCertGroup];
  __shared__ int s_warp_count[kWarps];
  __shared__ unsigned long long s_top[kWarps * kMaxTopk];   // each warp's k largest lower bounds
  __shared__ unsigned long long s_tau;
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;

  // x row as fp64, issued first so that its loads overlap the partial-sum loads.
  const __nv_bfloat16* xrow = x + static_cast<int64_t>(t) * dim;
  double xv[CH][8];
#pragma unroll
  for (int c = 0; c < CH; ++c) {
    const int d = 8 * (tid + kCertThreads * c);
    if (d < dim) load8(xrow + d, xv[c]);
    else
#pragma unroll
      for (int j = 0; j < 8; ++j) xv[c][j] = 0.0;
  }

  // ---- key intervals
  unsigned long long hi_key[kPer];
  bool bad = false;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = tid + kCertThreads * i;
    hi_key[i] = 0ull;
    if (e >= kMaxExperts) continue;
    s_lo[e] = 0ull;
    if (e >= num_experts) continue;
    float l = 0.0f, a = 0.0f;
    const int64_t stride = static_cast<int64_t>(num_tokens) * num_experts;
    const float* pl = part_logit + static_cast<int64_t>(t) * num_experts + e;
    const float* pa = part_abs + static_cast<int64_t>(t) * num_experts + e;
    for (int s0 = 0; s0 < num_slices; s0 += kSliceBatch) {   // a batch of loads in flight, then the ordered sum
      float vl[kSliceBatch], va[kSliceBatch];
#pragma unroll
      for (int j = 0; j < kSliceBatch; ++j) {
        vl[j] = s0 + j < num_slices ? __ldg(pl + (s0 + j) * stride) : 0.0f;
        va[j] = s0 + j < num_slices ? __ldg(pa + (s0 + j) * stride) : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < kSliceBatch; ++j) {
        l = __fadd_rn(l, vl[j]);
        a = __fadd_rn(a, va[j]);
      }
    }
    const double beta = gamma * static_cast<double>(a) + kAbsFloor;
    bad = bad || !(isfinite(l) && isfinite(beta));
    const float lo = __double2float_rd(static_cast<double>(l) - beta);
    const float hi = __double2float_ru(static_cast<double>(l) + beta);
    const float b = bias[e];
    float score_lo, score_hi, unused;
    score_bounds(lo, score_lo, unused);
    score_bounds(hi, unused, score_hi);
    s_lo[e] = route_key(__fadd_rn(score_lo, b), e);
    hi_key[i] = route_key(__fadd_rn(score_hi, b), e);
  }
  bad = __syncthreads_or(bad);

  // ---- tau: the k-th largest lower bound (keys are distinct: the expert id is in the low bits). Each warp
  // lists the k largest of its experts' bounds, then warp 0 takes the k-th largest of those lists.
  if (!bad) {
    unsigned long long key[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) key[i] = tid + kCertThreads * i < kMaxExperts ? s_lo[tid + kCertThreads * i] : 0ull;
    for (int r = 0; r < k; ++r) {
      const unsigned long long best = warp_take_max<kPer>(key);
      if (lane == 0) s_top[warp * kMaxTopk + r] = best;
    }
  }
  __syncthreads();
  if (!bad && warp == 0) {
    constexpr int kPL = kWarps * kMaxTopk / kWarp;
    unsigned long long key[kPL];
#pragma unroll
    for (int i = 0; i < kPL; ++i) {
      const int j = lane + kWarp * i;
      key[i] = j % kMaxTopk < k ? s_top[j] : 0ull;
    }
    unsigned long long best = 0ull;
    for (int r = 0; r < k; ++r) best = warp_take_max<kPL>(key);
    if (lane == 0) s_tau = best;
  }
  __syncthreads();

  // ---- candidates (key_hi >= tau), compacted in expert order
  const unsigned long long tau = bad ? 0ull : s_tau;
  int count = 0;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = tid + kCertThreads * i;
    const bool take = e < num_experts && hi_key[i] >= tau;   // bad: every expert (keys are > 0)
    const unsigned mask = __ballot_sync(0xffffffffu, take);
    if (lane == 0) s_warp_count[warp] = __popc(mask);
    __syncthreads();
    int before = count, total = count;
#pragma unroll
    for (int r = 0; r < kWarps; ++r) {
      const int c = s_warp_count[r];
      before += r < warp ? c : 0;
      total += c;
    }
    if (take) s_cand[before + __popc(mask & ((1u << lane) - 1u))] = e;
    count = total;
    __syncthreads();
  }

  // ---- exact logits of the candidates: fp64 products of bf16 values are exact, one fixed summation order
  for (int c0 = 0; c0 < count; c0 += kCertGroup) {
    double acc[kCertGroup];
#pragma unroll
    for (int j = 0; j < kCertGroup; ++j) {
      acc[j] = 0.0;
      if (c0 + j >= count) continue;
      const __nv_bfloat16* row = w + static_cast<int64_t>(s_cand[c0 + j]) * dim;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int d = 8 * (tid + kCertThreads * c);
        if (d >= dim) continue;
        double wv[8];
        load8(row + d, wv);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[j] = fma(xv[c][q], wv[q], acc[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < kCertGroup; ++j) {
      const double v = warp_sum(acc[j]);
      if (lane == 0) s_part[warp][j] = v;
    }
    __syncthreads();
    if (tid < kCertGroup && c0 + tid < count) {
      double sum = 0.0;
#pragma unroll
      for (int r = 0; r < kWarps; ++r) sum += s_part[r][tid];
      const int slot = c0 + tid, e = s_cand[slot];
      const float score = sqrt_softplus(static_cast<float>(sum));
      s_score[slot] = score;
      s_key[slot] = route_key(__fadd_rn(score, bias[e]), e);
    }
    __syncthreads();
  }

  // ---- the reference's selection among the candidates (one per lane in the usual case)
  if (warp == 0) {
    if (count <= kWarp) select_candidates<1>(s_key, s_score, count, k, route_scale, weights_out, ids_out, t, lane);
    else select_candidates<kMaxExperts / kWarp>(s_key, s_score, count, k, route_scale, weights_out, ids_out, t, lane);
  }
}

// gamma for a chain of `steps` MMA steps, `warps` fp32 partials per slice and `slices` slices, with a 2x margin.
static double estimate_gamma(int steps, int warps, int slices) {
  return 2.0 * 0x1p-23 * (18.0 * (steps + 1) + (warps - 1) + slices);
}

struct RouterEstimate {
  at::Tensor part_logit, part_abs;   // [S, T, E] fp32
  double gamma;
};

static RouterEstimate launch_estimate(const at::Tensor& x, const at::Tensor& gate_weight, cudaStream_t stream) {
  const int num_tokens = static_cast<int>(x.size(0)), dim = static_cast<int>(x.size(1));
  const int num_experts = static_cast<int>(gate_weight.size(0));
  const int nt = (num_tokens + 7) / 8;
  RouterEstimate est{};
  auto run = [&](auto nt_tag) {
    constexpr int NT = decltype(nt_tag)::value;
    const int slices = (dim + est_slice(NT) - 1) / est_slice(NT);
    est.part_logit = at::empty({slices, num_tokens, num_experts}, x.options().dtype(at::kFloat));
    est.part_abs = at::empty_like(est.part_logit);
    est.gamma = estimate_gamma(2 * est_unroll(NT), kEstWarps, slices);
    const dim3 grid((num_experts + kEstExperts - 1) / kEstExperts, slices);
    router_estimate_kernel<NT><<<grid, kEstWarps * kWarp, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
        reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr()), est.part_logit.data_ptr<float>(),
        est.part_abs.data_ptr<float>(), num_tokens, dim, num_experts);
  };
  switch (nt) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    case 5: run(std::integral_constant<int, 5>{}); break;
    case 6: run(std::integral_constant<int, 6>{}); break;
    case 7: run(std::integral_constant<int, 7>{}); break;
    default: run(std::integral_constant<int, 8>{}); break;
  }
  DSV4_LAUNCH_CHECK();
  return est;
}

static bool certified_shape(const at::Tensor& x, int64_t num_experts) {
  return x.scalar_type() == at::kBFloat16 && x.size(0) >= 1 && x.size(0) <= kCertMaxTokens &&
         x.size(1) % (kEstWarps * kEstBlock) == 0 && x.size(1) <= kCertMaxChunks * 8 * kCertThreads &&
         num_experts <= kMaxExperts;
}

bool certified_dense_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& bias, int64_t topk,
                           double route_scale, at::Tensor& weights, at::Tensor& ids) {
  if (!certified_shape(x, gate_weight.size(0))) return false;
  auto stream = current_stream();
  const RouterEstimate est = launch_estimate(x, gate_weight, stream);
  const int num_tokens = static_cast<int>(x.size(0)), dim = static_cast<int>(x.size(1));
  const int num_experts = static_cast<int>(gate_weight.size(0));
  const int chunks = (dim + 8 * kCertThreads - 1) / (8 * kCertThreads);
  auto run = [&](auto kernel) {
    kernel<<<num_tokens, kCertThreads, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
        reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr()), bias.data_ptr<float>(),
        est.part_logit.data_ptr<float>(), est.part_abs.data_ptr<float>(), static_cast<int>(est.part_logit.size(0)),
        est.gamma, weights.data_ptr<float>(), ids.data_ptr<int64_t>(), num_tokens, dim, num_experts,
        static_cast<int>(topk), static_cast<float>(route_scale));
  };
  switch (chunks) {
    case 1: run(router_certify_kernel<1>); break;
    default: run(router_certify_kernel<2>); break;
  }
  DSV4_LAUNCH_CHECK();
  return true;
}

// The estimate alone, summed over slices in slice order (for the tests of the bound): logits [T, E], abs [T, E]
// and gamma, so that |logit - exact| <= gamma * abs / (1 - gamma) must hold everywhere.
std::vector<at::Tensor> router_gate_estimate(const at::Tensor& x, const at::Tensor& gate_weight) {
  check_cuda(x, "x");
  check_cuda(gate_weight, "gate_weight");
  check_dtype(gate_weight, at::kBFloat16, "gate_weight");
  TORCH_CHECK(certified_shape(x, gate_weight.size(0)) && x.size(1) == gate_weight.size(1),
              "router_gate_estimate: bf16 x [T <= ", kCertMaxTokens, ", D % 128 == 0, D <= 8192]");
  const c10::cuda::CUDAGuard guard(x.device());
  const RouterEstimate est = launch_estimate(x, gate_weight, current_stream());
  return {est.part_logit.sum(0), est.part_abs.sum(0),
          at::full({}, est.gamma, x.options().dtype(at::kDouble))};
}

}  // namespace dsv4
