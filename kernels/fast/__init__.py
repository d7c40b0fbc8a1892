"""The `fast` numerics' ops: what a GPU serves with (spec: the official kernels' precision).

FP8 e4m3 activations quantized per 1x128 with UE8M0 scales, FP8 128x128 / FP4 1x32 weights read in their
checkpoint formats, fp32 accumulation on tensor cores, bf16 between ops, fp32 where the official code is fp32,
no float64. Judged by tolerance against the `reference` oracle, not bit for bit, and not batch-invariant.

One module per op family; each public function runs a Triton kernel (`_<family>_triton.py`, imported on first
use) for CUDA tensors and a PyTorch twin of the same structure (fp32/bf16 torch ops) for CPU tensors, so CI
covers the logic. The Triton kernels also run on the CPU under Triton's interpreter in the tests
(`tests/triton_interpreter.py`). Every CUDA path is graph-capturable: launch geometry from shapes only, lengths
and masks read on the device, no host synchronisation.

- `linear`: FP8 block-scaled linears (fused activation quantization), the grouped `wo_a`, bf16 and fp32 linears.
- `moe`: expert weights stacked per layer, dispatch -> grouped FP4/FP8 GEMMs (SwiGLU fused) -> combine.
- `attention`: sparse attention with sink reading window ring and compressed pools in place (FP8 entries).
- `indexer`: indexer query preparation (RoPE, Hadamard, MXFP4) and score + top-k over the paged MXFP4 keys.
- `compressor`: the compressor flush (pooling, RMSNorm, RoPE, quantized store, state rotation).
- `mhc`, `router`, `norm`: hyper-connection mixes, routers, RMSNorm / RoPE / KV-entry finishing, window append.
"""
