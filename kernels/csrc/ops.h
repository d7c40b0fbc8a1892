// Host entry points of the dsv4 CUDA kernels (one binding module: bindings.cpp). Shapes, dtypes and byte layouts
// are documented on the Python wrappers in kernels/cuda_ops.py and on the references they match.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace dsv4 {

// routing.cu
std::vector<at::Tensor> hash_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& tid2eid,
                                   const at::Tensor& token_ids, double route_scale);
std::vector<at::Tensor> dense_route(const at::Tensor& x, const at::Tensor& gate_weight, const at::Tensor& bias,
                                    int64_t topk, double route_scale, const std::optional<at::Tensor>& workspace);
std::vector<at::Tensor> router_gate_estimate(const at::Tensor& x, const at::Tensor& gate_weight);   // router_certified.cu
std::vector<at::Tensor> router_topk(const at::Tensor& logits, const at::Tensor& bias, int64_t topk,
                                    double route_scale);

// kv_store.cu
void window_append(at::Tensor& ring, const at::Tensor& values, const at::Tensor& positions,
                   const at::Tensor& token_seq, const at::Tensor& seq_slot, const at::Tensor& seq_start,
                   const at::Tensor& seq_len, int64_t nope, int64_t rope, double inv_fp8_max, double fp8_floor);
std::vector<at::Tensor> window_gather(const at::Tensor& ring, const at::Tensor& chunk, const at::Tensor& positions,
                                      const at::Tensor& token_seq, const at::Tensor& seq_slot,
                                      const at::Tensor& seq_start, const at::Tensor& seq_first_row, int64_t nope,
                                      int64_t rope);
std::vector<at::Tensor> gather_entries(const at::Tensor& pool, const at::Tensor& entries, const at::Tensor& token_seq,
                                       const at::Tensor& block_table, int64_t block_size, int64_t ratio, int64_t nope,
                                       int64_t rope);

// compress.cu
void compress_flush(const at::Tensor& a, const at::Tensor& z, at::Tensor& state_kv, at::Tensor& state_score,
                    const at::Tensor& seq_slot, const at::Tensor& seq_start, const at::Tensor& seq_len,
                    const at::Tensor& seq_first_row, const at::Tensor& block_table, int64_t block_size,
                    int64_t ratio, const at::Tensor& norm_weight, double eps, const at::Tensor& inv_freq,
                    at::Tensor& pool, int64_t nope, int64_t rope, bool index_key, double inv_fp8_max,
                    double fp8_floor, double inv_fp4_max, double fp4_floor, double hadamard_scale);

// indexer.cu
at::Tensor indexer_topk(const at::Tensor& q, const at::Tensor& weights, const at::Tensor& pool,
                        const at::Tensor& positions, const at::Tensor& token_seq, const at::Tensor& block_table,
                        int64_t block_size, int64_t ratio, int64_t topk);

// moe_decode.cu
void moe_decode_gemm(const at::Tensor& act, const at::Tensor& act_scale, const at::Tensor& pair_row,
                     const at::Tensor& pair_weight, const at::Tensor& sorted_pair, const at::Tensor& block_bucket,
                     const at::Tensor& bucket_start, const at::Tensor& bucket_count, const at::Tensor& w,
                     const at::Tensor& s, at::Tensor& out, int64_t block_m, bool gated, double limit, bool wgmma,
                     int64_t stages);

}  // namespace dsv4
