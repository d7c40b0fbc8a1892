// MoE routers (spec §5.1; references in kernels/routing.py).
//
//   hash_route_cluster_kernel   k <= 8: one thread-block cluster of k CTAs per token; CTA j computes the dot product
//                               of chosen expert j (threads split D, 16-byte loads, one memory round trip), and the
//                               k scores meet over distributed shared memory for the renormalisation.
//   hash_route_kernel           k > 8: one CTA per token computes all k dot products.
//   router_decode_kernel        dense routing, T <= 8 (bf16 x: T <= 4), ONE launch: each CTA computes 2 experts'
//                               logits and scores for every token; the last CTA to finish (a ticket in a caller-owned
//                               workspace that the kernel leaves at zero) selects each token's top-k with one warp.
//   (router_certified.cu)       dense routing, bf16 x, 4 < T <= 64: tensor-core estimate with a proven error bound,
//                               exact fp64 logits only for the experts that could be in the top-k.
//   router_gemm_f64_kernel      dense routing, fp32 x, 8 < T <= 64: fp64 gate GEMM partials over K slices.
//   router_topk_kernel          epilogue, one warp per token: logits (sum of the K-slice partials in slice order, or
//                               fp32 logits) -> sqrt-softplus -> + bias -> top-k (ties -> lower id) -> renormalise.
//
// Numerics: the reference accumulates the gate dot products in float64 and rounds the logit once to fp32, then
// evaluates softplus and sqrt in float64. Products of an fp32 x and a bf16 weight are exact in fp64, so fp64
// FMA accumulation gives the same fp32 logit unless the fp64 sum lands within ~1e-16 relative of an fp32
// rounding boundary (both sides round a nearly exact sum). A plain fp32 or bf16 tensor-core GEMM would flip
// near-tied experts several times per thousand tokens; router_certified.cu uses one only as a certified filter.
//
// Top-k: keys (orderable(score + bias) << 32 | ~expert) are distinct, so k rounds of a warp-wide maximum give
// exactly the reference's stable descending sort (equal scores -> lower expert id, -0 == +0).
//
// Invalid ids (mask rule, no host sync): a token id outside [0, vocab) gives ids -1 and NaN weights for the whole
// row; a tid2eid entry outside [0, E) gives id -1 for that slot and NaN weights for the row. The Python wrapper's
// validation path (DSV4_KERNEL_CHECKS, on by default outside graph capture) raises before that can be used.
#include <cooperative_groups.h>

#include "ops.h"
#include "routing.cuh"

namespace cg = cooperative_groups;

namespace dsv4 {

constexpr int kMaxClusterTopk = 8;      // portable cluster size
constexpr int kDecodeMaxTokens = kRouteThreads / kWarp;   // one selecting warp per token in the last CTA
constexpr int kDecodeExperts = 2;       // experts per CTA: E / 2 CTAs cover the GPU for E = 256
constexpr int kDecodePreferredTokens = 4;   // up to here the fp64 decode kernel beats the certified path

// ------------------------------------------------------------------------------------------- hash router
// Cluster of k CTAs per token (grid k x T, cluster k x 1): CTA j = cluster rank j owns chosen expert j. Each thread
// takes 8 consecutive elements per step, so D = 4096 costs two 16-byte loads per thread and one round trip.
template <typename XT, typename IdT>
__global__ void __launch_bounds__(kRouteThreads) hash_route_cluster_kernel(
    const XT* __restrict__ x, const __nv_bfloat16* __restrict__ w, const IdT* __restrict__ tid2eid,
    const int64_t* __restrict__ token_ids, float* __restrict__ weights_out, int64_t* __restrict__ ids_out,
    int dim, int num_experts, int64_t vocab, int k, float route_scale) {
  cg::cluster_group cluster = cg::this_cluster();
  __shared__ double part[kRouteThreads / kWarp];
  __shared__ float s_score[kMaxClusterTopk];   // every CTA's expert score, pushed here by its owner
  __shared__ int s_ok[kMaxClusterTopk];        // every CTA's expert id is valid
  const int j = blockIdx.x, t = blockIdx.y, tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t tok = token_ids[t];
  const bool tok_ok = tok >= 0 && tok < vocab;
  const int64_t id = tok_ok ? static_cast<int64_t>(tid2eid[tok * k + j]) : -1;
  const bool id_ok = id >= 0 && id < num_experts;
  double acc = 0.0;
  if (id_ok) {
    const __nv_bfloat16* row = w + id * dim;
    const XT* xrow = x + static_cast<int64_t>(t) * dim;
    for (int d = 8 * tid; d < dim; d += 8 * kRouteThreads) {
      double xv[8], wv[8];
      load8(xrow + d, xv);
      load8(row + d, wv);
#pragma unroll
      for (int q = 0; q < 8; ++q) acc = fma(xv[q], wv[q], acc);
    }
  }
  acc = warp_sum(acc);
  if (lane == 0) part[warp] = acc;
  __syncthreads();
  // Thread r < k pushes this CTA's score and validity into CTA r's shared memory (remote stores, no round trip);
  // after the one cluster barrier every CTA reads all k from its own shared memory, so none reads a peer's
  // memory late and no second barrier is needed before exit.
  if (tid < k) {
    double sum = 0.0;
#pragma unroll
    for (int i = 0; i < kRouteThreads / kWarp; ++i) sum += part[i];
    const float score = id_ok ? sqrt_softplus(static_cast<float>(sum)) : 0.0f;
    *cluster.map_shared_rank(&s_score[j], tid) = score;
    *cluster.map_shared_rank(&s_ok[j], tid) = id_ok;
  }
  cluster.sync();
  if (tid == 0) {
    bool row_ok = true;
    double total = 0.0;
    for (int r = 0; r < k; ++r) {
      row_ok = row_ok && s_ok[r];
      total += static_cast<double>(s_score[r]);
    }
    const int64_t o = static_cast<int64_t>(t) * k + j;
    ids_out[o] = id_ok ? id : -1;
    weights_out[o] = row_ok ? __fmul_rn(static_cast<float>(static_cast<double>(s_score[j]) / total), route_scale)
                            : __int_as_float(0x7fc00000);
  }
}

// k > 8 (no portable cluster): one CTA per token, the 256 threads split D for all k experts at once.
template <typename XT, typename IdT>
__global__ void __launch_bounds__(kRouteThreads) hash_route_kernel(
    const XT* __restrict__ x, const __nv_bfloat16* __restrict__ w, const IdT* __restrict__ tid2eid,
    const int64_t* __restrict__ token_ids, float* __restrict__ weights_out, int64_t* __restrict__ ids_out,
    int dim, int num_experts, int64_t vocab, int k, float route_scale) {
  __shared__ int s_experts[kMaxTopk];
  __shared__ int s_ok;
  __shared__ double s_part[kRouteThreads / kWarp][kMaxTopk];
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
  double acc[kMaxTopk];
#pragma unroll
  for (int j = 0; j < kMaxTopk; ++j) acc[j] = 0.0;
  const XT* xrow = x + static_cast<int64_t>(t) * dim;
  for (int d = 8 * tid; d < dim; d += 8 * kRouteThreads) {
    double xv[8];
    load8(xrow + d, xv);   // x converted to fp64 once, reused by the k experts
#pragma unroll
    for (int j = 0; j < kMaxTopk; ++j) {
      if (j < k) {
        double wv[8];
        load8(w + static_cast<int64_t>(s_experts[j]) * dim + d, wv);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[j] = fma(xv[q], wv[q], acc[j]);
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
    for (int i = 0; i < kRouteThreads / kWarp; ++i) sum += s_part[i][tid];
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

// ------------------------------------------------------------------------------------------- decode router
// T <= 8 in one launch. CTA b owns experts 2b, 2b + 1: its threads split D (8 elements per step) for both experts
// and every token, a fixed-order block reduction gives the fp32 logit, then the fp64 score goes to `scores` [T, E].
// The CTA that takes the last ticket (atomicInc wraps the counter back to 0, so the workspace is ready for the
// next call or graph replay) reads all scores through L2 and runs one selecting warp per token.
template <typename XT, int PL>
__global__ void __launch_bounds__(kRouteThreads) router_decode_kernel(
    const XT* __restrict__ x, const __nv_bfloat16* __restrict__ w, const float* __restrict__ bias,
    float* __restrict__ scores, unsigned int* __restrict__ ticket, float* __restrict__ weights_out,
    int64_t* __restrict__ ids_out, int num_tokens, int dim, int num_experts, int k, float route_scale) {
  __shared__ double part[kRouteThreads / kWarp][kDecodeMaxTokens * kDecodeExperts];
  __shared__ bool s_last;
  const int tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int e0 = blockIdx.x * kDecodeExperts;
  const __nv_bfloat16* rows[kDecodeExperts];
#pragma unroll
  for (int i = 0; i < kDecodeExperts; ++i) rows[i] = w + static_cast<int64_t>(min(e0 + i, num_experts - 1)) * dim;
  double acc[kDecodeMaxTokens][kDecodeExperts];
#pragma unroll
  for (int t = 0; t < kDecodeMaxTokens; ++t)
#pragma unroll
    for (int i = 0; i < kDecodeExperts; ++i) acc[t][i] = 0.0;
  for (int d = 8 * tid; d < dim; d += 8 * kRouteThreads) {
    double wv[kDecodeExperts][8];
#pragma unroll
    for (int i = 0; i < kDecodeExperts; ++i) load8(rows[i] + d, wv[i]);
#pragma unroll
    for (int t = 0; t < kDecodeMaxTokens; ++t) {
      if (t < num_tokens) {
        double xv[8];
        load8(x + static_cast<int64_t>(t) * dim + d, xv);
#pragma unroll
        for (int i = 0; i < kDecodeExperts; ++i)
#pragma unroll
          for (int q = 0; q < 8; ++q) acc[t][i] = fma(xv[q], wv[i][q], acc[t][i]);
      }
    }
  }
#pragma unroll
  for (int t = 0; t < kDecodeMaxTokens; ++t) {
    if (t < num_tokens) {
#pragma unroll
      for (int i = 0; i < kDecodeExperts; ++i) {
        const double v = warp_sum(acc[t][i]);
        if (lane == 0) part[warp][t * kDecodeExperts + i] = v;
      }
    }
  }
  __syncthreads();
  if (tid < num_tokens * kDecodeExperts) {
    const int t = tid / kDecodeExperts, e = e0 + tid % kDecodeExperts;
    double sum = 0.0;
#pragma unroll
    for (int r = 0; r < kRouteThreads / kWarp; ++r) sum += part[r][tid];
    if (e < num_experts) scores[static_cast<int64_t>(t) * num_experts + e] = sqrt_softplus(static_cast<float>(sum));
    __threadfence();   // publish the scores before this CTA's ticket
  }
  __syncthreads();
  if (tid == 0) s_last = atomicInc(ticket, gridDim.x - 1) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  if (warp < num_tokens) {
    const int t = warp;
    unsigned long long key[PL];
    float score[PL];
    const float* row = scores + static_cast<int64_t>(t) * num_experts;
    lane_keys<PL>(lane, num_experts, bias, [&](int e) { return __ldcg(row + e); }, key, score);   // L2: peers' writes
    warp_topk_store<PL>(key, score, k, route_scale, weights_out + static_cast<int64_t>(t) * k,
                        ids_out + static_cast<int64_t>(t) * k, lane);
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

// ------------------------------------------------------------------------------------------- top-k epilogue
// One warp per token (8 per CTA): lane l scores experts l + 32 i from the summed K-slice partials (slice order) or
// the fp32 logits, then the warp top-k.
template <int PL>
__global__ void __launch_bounds__(kRouteThreads) router_topk_kernel(
    const double* __restrict__ partial, const float* __restrict__ logits, int num_slices,
    const float* __restrict__ bias, float* __restrict__ weights_out, int64_t* __restrict__ ids_out, int num_tokens,
    int num_experts, int k, float route_scale) {
  const int lane = threadIdx.x % kWarp;
  const int t = blockIdx.x * (kRouteThreads / kWarp) + threadIdx.x / kWarp;
  if (t >= num_tokens) return;
  unsigned long long key[PL];
  float score[PL];
  lane_keys<PL>(lane, num_experts, bias, [&](int e) {
    if (num_slices == 0) return sqrt_softplus(logits[static_cast<int64_t>(t) * num_experts + e]);
    double sum = 0.0;
    for (int ks = 0; ks < num_slices; ++ks)
      sum += partial[(static_cast<int64_t>(ks) * num_tokens + t) * num_experts + e];
    return sqrt_softplus(static_cast<float>(sum));
  }, key, score);
  warp_topk_store<PL>(key, score, k, route_scale, weights_out + static_cast<int64_t>(t) * k,
                      ids_out + static_cast<int64_t>(t) * k, lane);
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
  TORCH_CHECK(x.size(1) % 8 == 0, "the hidden size must be a multiple of 8, got ", x.size(1));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(gate_weight.data_ptr()) % 16 == 0,
              "x and gate_weight must start on a 16-byte boundary");
}

template <typename F>
static void dispatch_x(const at::Tensor& x, F&& f) {
  if (x.scalar_type() == at::kFloat) f(float{});
  else f(__nv_bfloat16{});
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
  const int dim = static_cast<int>(x.size(1)), num_experts = static_cast<int>(gate_weight.size(0));
  const int64_t vocab = tid2eid.size(0);
  auto launch = [&](auto xt, auto idt) {
    using XT = decltype(xt);
    using IdT = decltype(idt);
    const auto* xp = reinterpret_cast<const XT*>(x.data_ptr());
    const auto* wp = reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr());
    const auto* table = tid2eid.data_ptr<IdT>();
    const int64_t* tok = token_ids.data_ptr<int64_t>();
    float* wout = weights.data_ptr<float>();
    int64_t* iout = ids.data_ptr<int64_t>();
    const int kk = static_cast<int>(k);
    const float scale = static_cast<float>(route_scale);
    if (k <= kMaxClusterTopk && num_tokens <= 65535) {   // grid.y holds the tokens
      launch_clustered(hash_route_cluster_kernel<XT, IdT>,
                       dim3(static_cast<unsigned>(k), static_cast<unsigned>(num_tokens)), dim3(kRouteThreads),
                       static_cast<unsigned>(k), stream, xp, wp, table, tok, wout, iout, dim, num_experts, vocab, kk,
                       scale);
    } else {
      hash_route_kernel<XT, IdT><<<static_cast<unsigned>(num_tokens), kRouteThreads, 0, stream>>>(
          xp, wp, table, tok, wout, iout, dim, num_experts, vocab, kk, scale);
    }
  };
  dispatch_x(x, [&](auto xt) {
    if (tid2eid.scalar_type() == at::kLong) launch(xt, int64_t{});
    else launch(xt, int32_t{});
  });
  DSV4_LAUNCH_CHECK();
  return {weights, ids};
}

static void launch_topk(const double* partial, const float* logits, int num_slices, const at::Tensor& bias,
                        at::Tensor& weights, at::Tensor& ids, int num_tokens, int num_experts, int k,
                        double route_scale, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((num_tokens + kRouteThreads / kWarp - 1) / (kRouteThreads / kWarp));
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (num_experts <= 8 * kWarp) {
    router_topk_kernel<8><<<grid, kRouteThreads, 0, stream>>>(partial, logits, num_slices, b, weights.data_ptr<float>(),
                                                              ids.data_ptr<int64_t>(), num_tokens, num_experts, k,
                                                              static_cast<float>(route_scale));
  } else {
    router_topk_kernel<16><<<grid, kRouteThreads, 0, stream>>>(partial, logits, num_slices, b,
                                                               weights.data_ptr<float>(), ids.data_ptr<int64_t>(),
                                                               num_tokens, num_experts, k,
                                                               static_cast<float>(route_scale));
  }
  DSV4_LAUNCH_CHECK();
}

static void check_bias_topk(const at::Tensor& bias, int64_t num_experts, int64_t topk) {
  check_cuda(bias, "bias");
  check_dtype(bias, at::kFloat, "bias");
  TORCH_CHECK(bias.numel() == num_experts, "bias has ", bias.numel(), " entries for ", num_experts, " experts");
  TORCH_CHECK(topk >= 1 && topk <= kMaxTopk && topk <= num_experts, "top-k must be in [1, min(16, E)], got ", topk);
}

// T <= 8: one fused launch (needs the workspace). 8 < T <= 64: fp64 GEMM tile partials over K slices -> epilogue
// (no fp32 logits round trip). Larger T: cuBLAS fp64 GEMM, then the same epilogue.
std::vector<at::Tensor> dense_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& bias,
                                    int64_t topk, double route_scale, const std::optional<at::Tensor>& workspace) {
  check_router_inputs(x, gate_weight);
  const int64_t num_tokens = x.size(0), dim = x.size(1), num_experts = gate_weight.size(0);
  check_bias_topk(bias, num_experts, topk);
  const c10::cuda::CUDAGuard guard(x.device());
  auto weights = at::empty({num_tokens, topk}, x.options().dtype(at::kFloat));
  auto ids = at::empty({num_tokens, topk}, x.options().dtype(at::kLong));
  if (num_tokens == 0) return {weights, ids};
  auto stream = current_stream();
  auto w = reinterpret_cast<const __nv_bfloat16*>(gate_weight.data_ptr());
  // bf16 x: the certified tensor-core path, except for the smallest batches, where the one-launch fp64 kernel's
  // latency is lower (H100 graph nodes: T = 1 8.9 vs 12.5 us; T = 8 15.8 vs 13.4 us; T = 64 25.6 us vs 56.6 us
  // for the fp64 GEMM tile).
  if (num_tokens > kDecodePreferredTokens &&
      certified_dense_route(x, gate_weight, bias, topk, route_scale, weights, ids))
    return {weights, ids};
  if (num_tokens <= kDecodeMaxTokens) {
    // No workspace given: a zeroed one for this call (one memset more than a caller-held workspace costs).
    const at::Tensor ws = workspace.has_value() && workspace->defined() ? *workspace
                                                                        : at::zeros({1}, x.options().dtype(at::kInt));
    check_cuda(ws, "workspace");
    check_dtype(ws, at::kInt, "workspace");
    TORCH_CHECK(ws.numel() >= 1 && ws.device() == x.device(), "workspace: one int32 on x's device");
    auto scores = at::empty({num_tokens, num_experts}, x.options().dtype(at::kFloat));
    const unsigned grid = static_cast<unsigned>((num_experts + kDecodeExperts - 1) / kDecodeExperts);
    dispatch_x(x, [&](auto xt) {
      using XT = decltype(xt);
      auto run = [&](auto kernel) {
        kernel<<<grid, kRouteThreads, 0, stream>>>(
            reinterpret_cast<const XT*>(x.data_ptr()), w, bias.data_ptr<float>(), scores.data_ptr<float>(),
            reinterpret_cast<unsigned int*>(ws.data_ptr<int>()), weights.data_ptr<float>(), ids.data_ptr<int64_t>(),
            static_cast<int>(num_tokens), static_cast<int>(dim), static_cast<int>(num_experts),
            static_cast<int>(topk), static_cast<float>(route_scale));
      };
      if (num_experts <= 8 * kWarp) run(router_decode_kernel<XT, 8>);
      else run(router_decode_kernel<XT, 16>);
    });
    DSV4_LAUNCH_CHECK();
    return {weights, ids};
  }
  if (num_tokens > kGemmTokens) {
    // Prefill sizes: cuBLAS's fp64 GEMM (DMMA tensor cores) outruns the CUDA-core tile below; same function as
    // the reference's torch.matmul(x.double(), w.double().T).float().
    auto logits = at::matmul(x.to(at::kDouble), gate_weight.to(at::kDouble).t()).to(at::kFloat).contiguous();
    launch_topk(nullptr, logits.data_ptr<float>(), 0, bias, weights, ids, static_cast<int>(num_tokens),
                static_cast<int>(num_experts), static_cast<int>(topk), route_scale, stream);
    return {weights, ids};
  }
  const int64_t sm_count = num_sms();
  // Split K until the grid covers the GPU.
  const int64_t tiles = ((num_experts + kGemmExperts - 1) / kGemmExperts) * ((num_tokens + kGemmTokens - 1) / kGemmTokens);
  int64_t slices = std::max<int64_t>(1, std::min<int64_t>((sm_count + tiles - 1) / tiles, (dim + 127) / 128));
  int64_t k_slice = ((dim + slices - 1) / slices + kGemmK - 1) / kGemmK * kGemmK;
  slices = (dim + k_slice - 1) / k_slice;
  auto partial = at::empty({slices, num_tokens, num_experts}, x.options().dtype(at::kDouble));
  const dim3 grid((num_experts + kGemmExperts - 1) / kGemmExperts, slices, (num_tokens + kGemmTokens - 1) / kGemmTokens);
  dispatch_x(x, [&](auto xt) {
    using XT = decltype(xt);
    router_gemm_f64_kernel<XT><<<grid, 256, 0, stream>>>(reinterpret_cast<const XT*>(x.data_ptr()), w,
                                                         partial.data_ptr<double>(), num_tokens, dim, num_experts,
                                                         k_slice);
  });
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
