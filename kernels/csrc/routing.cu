// MoE routers (spec §5.1; references in kernels/routing.py).
//
//   hash_route_kernel           tid2eid gather + the k chosen experts' dot products + sqrt-softplus + renorm.
//   router_gemv_f64_kernel      decode batches (T <= 8): fp64 gate logits, threads split D, 4 experts per CTA.
//   router_gemm_f64_kernel      gate GEMM partials, fp64 accumulation, split over (expert tile, K slice, token tile).
//   router_topk_kernel          sum of the K-slice partials (or fp32 logits) + sqrt-softplus + bias + top-k
//                               (ties -> lower id) + renormalise + scale; one warp per token, E <= 512, k <= 16.
//
// Numerics: the reference accumulates the gate dot products in float64 and rounds the logit once to fp32, then
// evaluates softplus and sqrt in float64. Products of an fp32 x and a bf16 weight are exact in fp64, so fp64
// FMA accumulation gives the same fp32 logit unless the fp64 sum lands within ~1e-16 relative of an fp32
// rounding boundary (both sides round a nearly exact sum). That is the price of bit-identical expert choices:
// an fp32 or bf16 tensor-core GEMM flips near-tied experts several times per thousand tokens.
//
// Invalid ids (mask rule, no host sync): a token id outside [0, vocab) gives ids -1 and NaN weights for the whole
// row; a tid2eid entry outside [0, E) gives id -1 for that slot and NaN weights for the row. The Python wrapper's
// validation path (DSV4_KERNEL_CHECKS, on by default outside graph capture) raises before that can be used.
#include "common.cuh"
#include "ops.h"

namespace dsv4 {

// bf16 -> fp64 with integer ops (normal numbers), avoiding the slow F2F.F64 path; zero/subnormal take the cvt.
__device__ __forceinline__ double bf16_to_double(uint32_t b16) {
  const uint32_t f = b16 << 16;
  if ((f & 0x7F800000u) == 0u) return static_cast<double>(__uint_as_float(f));
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

// torch.nn.functional.softplus (beta 1, threshold 20) then sqrt, in float64; rounded to fp32 like ref_math.
__device__ __forceinline__ float sqrt_softplus(float logit) {
  const double x = static_cast<double>(logit);
  const double sp = x > 20.0 ? x : log1p(exp(x));
  return static_cast<float>(sqrt(sp));
}

// ------------------------------------------------------------------------------------------- hash router
// One CTA per token: the 256 threads split D (4 contiguous elements each, 16/8-byte loads) for all k experts at
// once, so a decode token costs two or three memory round trips instead of D/32 dependent ones.
constexpr int kMaxTopk = 16;
constexpr int kHashThreads = 256;

template <typename XT>
__device__ __forceinline__ void load4(const XT* p, double (&v)[4]);
template <>
__device__ __forceinline__ void load4<float>(const float* p, double (&v)[4]) {
  const float4 f = *reinterpret_cast<const float4*>(p);
  v[0] = f.x; v[1] = f.y; v[2] = f.z; v[3] = f.w;
}
template <>
__device__ __forceinline__ void load4<__nv_bfloat16>(const __nv_bfloat16* p, double (&v)[4]) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  v[0] = bf16_to_double(u.x & 0xFFFFu); v[1] = bf16_to_double(u.x >> 16);
  v[2] = bf16_to_double(u.y & 0xFFFFu); v[3] = bf16_to_double(u.y >> 16);
}

template <typename XT, typename IdT>
__global__ void __launch_bounds__(kHashThreads) hash_route_kernel(
    const XT* __restrict__ x, const __nv_bfloat16* __restrict__ w, const IdT* __restrict__ tid2eid,
    const int64_t* __restrict__ token_ids, float* __restrict__ weights_out, int64_t* __restrict__ ids_out,
    int dim, int num_experts, int64_t vocab, int k, float route_scale) {
  __shared__ int s_experts[kMaxTopk];
  __shared__ int s_ok;
  __shared__ double s_part[kHashThreads / kWarp][kMaxTopk];
  __shared__ float s_score[kMaxTopk];
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  if (warp == 0) {
    const int64_t tok = token_ids[t];
    const bool tok_ok = tok >= 0 && tok < vocab;
    int64_t my_id = -1;
    if (tok_ok && lane < k) my_id = static_cast<int64_t>(tid2eid[tok * k + lane]);
    const bool id_ok = my_id >= 0 && my_id < num_experts;
    const bool row_ok = tok_ok && __all_sync(0xffffffffu, lane >= k || id_ok);
    if (lane < k) {
      ids_out[static_cast<int64_t>(t) * k + lane] = id_ok && tok_ok ? my_id : -1;
      s_experts[lane] = id_ok ? static_cast<int>(my_id) : 0;
      if (!row_ok) weights_out[static_cast<int64_t>(t) * k + lane] = __int_as_float(0x7fc00000);
    }
    if (lane == 0) s_ok = row_ok;
  }
  __syncthreads();
  if (!s_ok) return;
  const __nv_bfloat16* rows[kMaxTopk];
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) rows[j] = w + static_cast<int64_t>(s_experts[j < k ? j : 0]) * dim;
  double acc[kMaxTopk];
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) acc[j] = 0.0;
  const XT* xrow = x + static_cast<int64_t>(t) * dim;
#pragma unroll 2
  for (int d = 4 * tid; d < dim; d += 4 * kHashThreads) {
    double xv[4];
    load4(xrow + d, xv);   // x converted to fp64 once, reused by the k experts
#pragma unroll
    for (int j = 0; j < kMaxTopk; ++j) {
      if (j < k) {
        double wv[4];
        load4(rows[j] + d, wv);
        acc[j] = fma(xv[0], wv[0], acc[j]);
        acc[j] = fma(xv[1], wv[1], acc[j]);
        acc[j] = fma(xv[2], wv[2], acc[j]);
        acc[j] = fma(xv[3], wv[3], acc[j]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) {
    if (j < k) {
      const double v = warp_sum(acc[j]);
      if (lane == 0) s_part[warp][j] = v;
    }
  }
  __syncthreads();
  if (tid < k) {
    double sum = 0.0;
    for (int i = 0; i < kHashThreads / kWarp; ++i) sum += s_part[i][tid];
    s_score[tid] = sqrt_softplus(static_cast<float>(sum));
  }
  __syncthreads();
  if (tid < k) {
    double total = 0.0;
    for (int j = 0; j < k; ++j) total += static_cast<double>(s_score[j]);
    weights_out[static_cast<int64_t>(t) * k + tid] =
        __fmul_rn(static_cast<float>(static_cast<double>(s_score[tid]) / total), route_scale);
  }
}

// ------------------------------------------------------------------------------------------- router GEMM
// partial[ks, t, e] = sum over the ks-th K slice of x[t, :] * w[e, :], in fp64. Tile: 32 experts x 64 tokens per
// CTA; warp i owns experts 4i..4i+3 (broadcast smem reads), lane l owns tokens l and l + 32. The next K chunk is
// prefetched into registers while the current one is multiplied, so a CTA pays about one memory round trip.
constexpr int kGemmExperts = 32;
constexpr int kGemmTokens = 64;
constexpr int kGemmK = 32;
constexpr int kXPer = kGemmTokens * kGemmK / 256;    // 8 x values per thread per chunk
constexpr int kWPer = kGemmExperts * kGemmK / 256;   // 4 w values per thread per chunk

template <typename XT>
__global__ void __launch_bounds__(256) router_gemm_f64_kernel(const XT* __restrict__ x,
                                                              const __nv_bfloat16* __restrict__ w,
                                                              double* __restrict__ partial, int num_tokens, int dim,
                                                              int num_experts, int k_slice) {
  __shared__ double xs[kGemmK][kGemmTokens];
  __shared__ double ws[kGemmExperts][kGemmK + 1];
  const int tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int e0 = blockIdx.x * kGemmExperts, t0 = blockIdx.z * kGemmTokens;
  const int k_begin = blockIdx.y * k_slice, k_end = min(dim, k_begin + k_slice);
  const int c = tid % kGemmK;
  double xr[kXPer], wr[kWPer];
  auto fetch = [&](int k0) {
#pragma unroll
    for (int j = 0; j < kXPer; ++j) {
      const int t = t0 + tid / kGemmK + j * (256 / kGemmK), k = k0 + c;
      xr[j] = (t < num_tokens && k < k_end) ? to_double(x[static_cast<int64_t>(t) * dim + k]) : 0.0;
    }
#pragma unroll
    for (int j = 0; j < kWPer; ++j) {
      const int e = e0 + tid / kGemmK + j * (256 / kGemmK), k = k0 + c;
      wr[j] = (e < num_experts && k < k_end) ? to_double(w[static_cast<int64_t>(e) * dim + k]) : 0.0;
    }
  };
  double acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = 0.0;
  fetch(k_begin);
  for (int k0 = k_begin; k0 < k_end; k0 += kGemmK) {
#pragma unroll
    for (int j = 0; j < kXPer; ++j) xs[c][tid / kGemmK + j * (256 / kGemmK)] = xr[j];
#pragma unroll
    for (int j = 0; j < kWPer; ++j) ws[tid / kGemmK + j * (256 / kGemmK)][c] = wr[j];
    __syncthreads();
    if (k0 + kGemmK < k_end) fetch(k0 + kGemmK);   // in flight during the FMAs below
#pragma unroll 8
    for (int kk = 0; kk < kGemmK; ++kk) {
      const double xa = xs[kk][lane], xb = xs[kk][lane + 32];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const double wv = ws[warp * 4 + i][kk];
        acc[i][0] = fma(wv, xa, acc[i][0]);
        acc[i][1] = fma(wv, xb, acc[i][1]);
      }
    }
    __syncthreads();
  }
  double* out = partial + static_cast<int64_t>(blockIdx.y) * num_tokens * num_experts;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int e = e0 + warp * 4 + i;
    if (e >= num_experts) continue;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = t0 + lane + 32 * h;
      if (t < num_tokens) out[static_cast<int64_t>(t) * num_experts + e] = acc[i][h];
    }
  }
}

// ------------------------------------------------------------------------------------------- router GEMV
// Decode batches of <= 8 tokens: one CTA per 4 experts, the 256 threads split D (4 contiguous elements each) for
// all tokens, block reduction in a fixed order, fp32 logits out. No tile of zeros multiplied for absent tokens.
constexpr int kGemvExperts = 4;
constexpr int kGemvMaxTokens = 8;
constexpr int kGemvThreads = 256;

template <typename XT>
__global__ void __launch_bounds__(kGemvThreads) router_gemv_f64_kernel(const XT* __restrict__ x,
                                                                       const __nv_bfloat16* __restrict__ w,
                                                                       float* __restrict__ logits, int num_tokens,
                                                                       int dim, int num_experts) {
  __shared__ double part[kGemvThreads / kWarp][kGemvMaxTokens * kGemvExperts];
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int e0 = blockIdx.x * kGemvExperts;
  const __nv_bfloat16* rows[kGemvExperts];
#pragma unroll
  for (int i = 0; i < kGemvExperts; ++i) rows[i] = w + static_cast<int64_t>(min(e0 + i, num_experts - 1)) * dim;
  double acc[kGemvMaxTokens][kGemvExperts];
#pragma unroll
  for (int t = 0; t < kGemvMaxTokens; ++t)
#pragma unroll
    for (int i = 0; i < kGemvExperts; ++i) acc[t][i] = 0.0;
  for (int d = 4 * tid; d < dim; d += 4 * kGemvThreads) {
    double wv[kGemvExperts][4];
#pragma unroll
    for (int i = 0; i < kGemvExperts; ++i) load4(rows[i] + d, wv[i]);
#pragma unroll
    for (int t = 0; t < kGemvMaxTokens; ++t) {
      if (t < num_tokens) {
        double xv[4];
        load4(x + static_cast<int64_t>(t) * dim + d, xv);
#pragma unroll
        for (int i = 0; i < kGemvExperts; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[t][i] = fma(xv[q], wv[i][q], acc[t][i]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kGemvMaxTokens; ++t) {
    if (t < num_tokens) {
#pragma unroll
      for (int i = 0; i < kGemvExperts; ++i) {
        const double v = warp_sum(acc[t][i]);
        if (lane == 0) part[warp][t * kGemvExperts + i] = v;
      }
    }
  }
  __syncthreads();
  if (tid < num_tokens * kGemvExperts) {
    const int t = tid / kGemvExperts, i = tid % kGemvExperts;
    double sum = 0.0;
#pragma unroll
    for (int r = 0; r < kGemvThreads / kWarp; ++r) sum += part[r][tid];
    if (e0 + i < num_experts) logits[static_cast<int64_t>(t) * num_experts + e0 + i] = static_cast<float>(sum);
  }
}

// ------------------------------------------------------------------------------------------- top-k epilogue
// One CTA per token: every expert's logit (sum of the K-slice partials in slice order, or the fp32 logit), score,
// biased key; a bitonic sort of (biased score, lower id first) decides the top-k exactly as the reference's stable
// descending sort; weights from the unbiased scores.
constexpr int kTopkThreads = 256;
constexpr int kMaxExperts = 512;

__device__ __forceinline__ uint32_t orderable(float v) {
  uint32_t u = __float_as_uint(v);
  if (u == 0x80000000u) u = 0;   // -0 ties with +0, as in the reference's sort
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__global__ void __launch_bounds__(kTopkThreads) router_topk_kernel(
    const double* __restrict__ partial, const float* __restrict__ logits, int num_slices,
    const float* __restrict__ bias, float* __restrict__ weights_out, int64_t* __restrict__ ids_out, int num_tokens,
    int num_experts, int k, float route_scale) {
  __shared__ unsigned long long keys[kMaxExperts];
  __shared__ float scores[kMaxExperts];
  __shared__ float chosen[kMaxTopk];
  const int t = blockIdx.x, tid = threadIdx.x;
  int size = 1;
  while (size < num_experts) size <<= 1;
  for (int e = tid; e < size; e += kTopkThreads) {
    unsigned long long key = 0ull;   // padding sorts last: real keys have orderable() > 0
    if (e < num_experts) {
      float logit;
      if (num_slices == 0) {
        logit = logits[static_cast<int64_t>(t) * num_experts + e];
      } else {
        double sum = 0.0;
#pragma unroll 8
        for (int ks = 0; ks < num_slices; ++ks)
          sum += partial[(static_cast<int64_t>(ks) * num_tokens + t) * num_experts + e];
        logit = static_cast<float>(sum);
      }
      const float score = sqrt_softplus(logit);
      scores[e] = score;
      const float v = bias != nullptr ? __fadd_rn(score, bias[e]) : score;
      key = (static_cast<unsigned long long>(orderable(v)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(e));
    }
    keys[e] = key;
  }
  __syncthreads();
  bitonic_sort_desc<kTopkThreads>(keys, size, tid);
  if (tid < k) {
    const int e = static_cast<int>(0xFFFFFFFFu - static_cast<uint32_t>(keys[tid]));
    chosen[tid] = scores[e];
    ids_out[static_cast<int64_t>(t) * k + tid] = e;
  }
  __syncthreads();
  if (tid < k) {
    double total = 0.0;
    for (int j = 0; j < k; ++j) total += static_cast<double>(chosen[j]);
    weights_out[static_cast<int64_t>(t) * k + tid] =
        __fmul_rn(static_cast<float>(static_cast<double>(chosen[tid]) / total), route_scale);
  }
}

// ------------------------------------------------------------------------------------------- host
static void check_router_inputs(const at::Tensor& x, const at::Tensor& gate_weight) {
  check_cuda(x, "x");
  check_cuda(gate_weight, "gate_weight");
  check_dim(x, 2, "x");
  check_dim(gate_weight, 2, "gate_weight");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "x must be float32 or bfloat16");
  check_dtype(gate_weight, at::kBFloat16, "gate_weight");
  TORCH_CHECK(x.size(1) == gate_weight.size(1), "x has ", x.size(1), " features, gate_weight ", gate_weight.size(1));
  TORCH_CHECK(gate_weight.size(0) <= kMaxExperts, "at most ", kMaxExperts, " experts");
  TORCH_CHECK(x.size(1) % 4 == 0, "the hidden size must be a multiple of 4, got ", x.size(1));
}

std::vector<at::Tensor> hash_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& tid2eid,
                                   const at::Tensor& token_ids, double route_scale) {
  check_router_inputs(x, gate_weight);
  check_cuda(tid2eid, "tid2eid");
  check_cuda(token_ids, "token_ids");
  check_dim(tid2eid, 2, "tid2eid");
  check_dtype(token_ids, at::kLong, "token_ids");
  TORCH_CHECK(tid2eid.scalar_type() == at::kLong || tid2eid.scalar_type() == at::kInt, "tid2eid must be int64/int32");
  const int64_t num_tokens = x.size(0), k = tid2eid.size(1);
  TORCH_CHECK(token_ids.numel() == num_tokens, "token_ids has ", token_ids.numel(), " ids for ", num_tokens, " rows");
  TORCH_CHECK(k >= 1 && k <= kMaxTopk, "top-k must be in [1, ", kMaxTopk, "], got ", k);
  const c10::cuda::CUDAGuard guard(x.device());
  auto weights = at::empty({num_tokens, k}, x.options().dtype(at::kFloat));
  auto ids = at::empty({num_tokens, k}, x.options().dtype(at::kLong));
  if (num_tokens == 0) return {weights, ids};
  auto stream = current_stream();
  auto launch = [&](auto xt, auto idt) {
    using XT = decltype(xt);
    using IdT = decltype(idt);
    hash_route_kernel<XT, IdT><<<static_cast<unsigned>(num_tokens), kHashThreads, 0, stream>>>(
        reinterpret_cast<const XT*>(x.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr()),
        tid2eid.data_ptr<IdT>(), token_ids.data_ptr<int64_t>(), weights.data_ptr<float>(), ids.data_ptr<int64_t>(),
        static_cast<int>(x.size(1)), static_cast<int>(gate_weight.size(0)), tid2eid.size(0), static_cast<int>(k),
        static_cast<float>(route_scale));
  };
  const bool x_f32 = x.scalar_type() == at::kFloat, id64 = tid2eid.scalar_type() == at::kLong;
  if (x_f32 && id64) launch(float{}, int64_t{});
  else if (x_f32) launch(float{}, int32_t{});
  else if (id64) launch(__nv_bfloat16{}, int64_t{});
  else launch(__nv_bfloat16{}, int32_t{});
  DSV4_LAUNCH_CHECK();
  return {weights, ids};
}

static void launch_topk(const double* partial, const float* logits, int num_slices, const at::Tensor& bias,
                        at::Tensor& weights, at::Tensor& ids, int num_tokens, int num_experts, int k,
                        double route_scale, cudaStream_t stream) {
  router_topk_kernel<<<static_cast<unsigned>(num_tokens), kTopkThreads, 0, stream>>>(
      partial, logits, num_slices, bias.defined() ? bias.data_ptr<float>() : nullptr, weights.data_ptr<float>(),
      ids.data_ptr<int64_t>(), num_tokens, num_experts, k, static_cast<float>(route_scale));
  DSV4_LAUNCH_CHECK();
}

static void check_bias_topk(const at::Tensor& bias, int64_t num_experts, int64_t topk) {
  check_cuda(bias, "bias");
  check_dtype(bias, at::kFloat, "bias");
  TORCH_CHECK(bias.numel() == num_experts, "bias has ", bias.numel(), " entries for ", num_experts, " experts");
  TORCH_CHECK(topk >= 1 && topk <= kMaxTopk && topk <= num_experts, "top-k must be in [1, min(16, E)], got ", topk);
}

// T <= 8: fp64 GEMV (threads split D) -> fp32 logits -> epilogue. 8 < T <= 64: fp64 GEMM tile partials over K
// slices -> epilogue (no fp32 logits round trip). Larger T: cuBLAS fp64 GEMM, then the same epilogue.
std::vector<at::Tensor> dense_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& bias,
                                    int64_t topk, double route_scale) {
  check_router_inputs(x, gate_weight);
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = gate_weight.size(0);
  check_bias_topk(bias, num_experts, topk);
  const c10::cuda::CUDAGuard guard(x.device());
  auto weights = at::empty({num_tokens, topk}, x.options().dtype(at::kFloat));
  auto ids = at::empty({num_tokens, topk}, x.options().dtype(at::kLong));
  if (num_tokens == 0) return {weights, ids};
  auto stream = current_stream();
  if (num_tokens > kGemmTokens) {
    // Prefill sizes: cuBLAS's fp64 GEMM (DMMA tensor cores) outruns the CUDA-core tile below; same function as
    // the reference's torch.matmul(x.double(), w.double().T).float().
    auto logits = at::matmul(x.to(at::kDouble), gate_weight.to(at::kDouble).t()).to(at::kFloat).contiguous();
    launch_topk(nullptr, logits.data_ptr<float>(), 0, bias, weights, ids, static_cast<int>(num_tokens),
                static_cast<int>(num_experts), static_cast<int>(topk), route_scale, stream);
    return {weights, ids};
  }
  if (num_tokens <= kGemvMaxTokens) {
    auto logits = at::empty({num_tokens, num_experts}, x.options().dtype(at::kFloat));
    const dim3 grid((num_experts + kGemvExperts - 1) / kGemvExperts);
    auto w = reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr());
    if (x.scalar_type() == at::kFloat) {
      router_gemv_f64_kernel<float><<<grid, kGemvThreads, 0, stream>>>(
          x.data_ptr<float>(), w, logits.data_ptr<float>(), static_cast<int>(num_tokens), static_cast<int>(dim),
          static_cast<int>(num_experts));
    } else {
      router_gemv_f64_kernel<__nv_bfloat16><<<grid, kGemvThreads, 0, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), w, logits.data_ptr<float>(),
          static_cast<int>(num_tokens), static_cast<int>(dim), static_cast<int>(num_experts));
    }
    DSV4_LAUNCH_CHECK();
    launch_topk(nullptr, logits.data_ptr<float>(), 0, bias, weights, ids, static_cast<int>(num_tokens),
                static_cast<int>(num_experts), static_cast<int>(topk), route_scale, stream);
    return {weights, ids};
  }
  const int64_t sm_count = num_sms();
  // Split K until the grid covers the GPU (decode sizes); prefill sizes get one slice.
  const int64_t tiles = ((num_experts + kGemmExperts - 1) / kGemmExperts) * ((num_tokens + kGemmTokens - 1) / kGemmTokens);
  int64_t slices = std::max<int64_t>(1, std::min<int64_t>((sm_count + tiles - 1) / tiles, (dim + 127) / 128));
  int64_t k_slice = ((dim + slices - 1) / slices + kGemmK - 1) / kGemmK * kGemmK;
  slices = (dim + k_slice - 1) / k_slice;
  auto partial = at::empty({slices, num_tokens, num_experts}, x.options().dtype(at::kDouble));
  const dim3 grid((num_experts + kGemmExperts - 1) / kGemmExperts, slices, (num_tokens + kGemmTokens - 1) / kGemmTokens);
  auto w = reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr());
  if (x.scalar_type() == at::kFloat) {
    router_gemm_f64_kernel<float><<<grid, 256, 0, stream>>>(x.data_ptr<float>(), w, partial.data_ptr<double>(),
                                                            num_tokens, dim, num_experts, k_slice);
  } else {
    router_gemm_f64_kernel<__nv_bfloat16><<<grid, 256, 0, stream>>>(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), w, partial.data_ptr<double>(), num_tokens, dim,
        num_experts, k_slice);
  }
  DSV4_LAUNCH_CHECK();
  launch_topk(partial.data_ptr<double>(), nullptr, static_cast<int>(slices), bias, weights, ids,
              static_cast<int>(num_tokens), static_cast<int>(num_experts), static_cast<int>(topk), route_scale, stream);
  return {weights, ids};
}

// The router epilogue alone, on fp32 logits [T, E] (e.g. from a separate GEMM).
std::vector<at::Tensor> router_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t topk,
                                    double route_scale) {
  check_cuda(logits, "logits");
  check_dim(logits, 2, "logits");
  check_dtype(logits, at::kFloat, "logits");
  const int64_t num_tokens = logits.size(0), num_experts = logits.size(1);
  TORCH_CHECK(num_experts <= kMaxExperts, "at most ", kMaxExperts, " experts");
  check_bias_topk(bias, num_experts, topk);
  const c10::cuda::CUDAGuard guard(logits.device());
  auto weights = at::empty({num_tokens, topk}, logits.options());
  auto ids = at::empty({num_tokens, topk}, logits.options().dtype(at::kLong));
  if (num_tokens == 0) return {weights, ids};
  launch_topk(nullptr, logits.data_ptr<float>(), 0, bias, weights, ids, static_cast<int>(num_tokens),
              static_cast<int>(num_experts), static_cast<int>(topk), route_scale, current_stream());
  return {weights, ids};
}

}  // namespace dsv4
