// The one binding module of the dsv4 kernels. Python side: kernels/cuda_ops.py (typed wrappers) and
// kernels/build.py (how this is compiled and cached).
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dsv4 CUDA kernels (routing, window/compressed KV stores, indexer top-k, KV gather, decode MoE GEMMs)";
  m.def("hash_route", &dsv4::hash_route, "tid2eid routing with weights from the k chosen experts' scores");
  m.def("dense_route", &dsv4::dense_route, "fp64-accumulated gate GEMM + sqrt-softplus + bias + top-k + renorm");
  m.def("router_gate_estimate", &dsv4::router_gate_estimate, "tensor-core gate logits with their error scale (tests)");
  m.def("router_topk", &dsv4::router_topk, "router epilogue on fp32 logits");
  m.def("window_append", &dsv4::window_append, "FP8 quantize + ring store of window entries");
  m.def("window_gather", &dsv4::window_gather, "window entries (ring + this step) as a dense bf16 tile");
  m.def("gather_entries", &dsv4::gather_entries, "paged FP8 entries to a dense bf16 tile");
  m.def("compress_flush", &dsv4::compress_flush, "CSA/HCA pooling + norm + RoPE (+ Hadamard) + FP8/MXFP4 store");
  m.def("moe_decode_gemm", &dsv4::moe_decode_gemm, "grouped FP4-expert GEMM 1 (SwiGLU) or 2 over decode-sized blocks");
  m.def("indexer_topk", &dsv4::indexer_topk, "MXFP4 indexer score + top-k over paged keys");
}
