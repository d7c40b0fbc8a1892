// Shared device helpers of the dsv4 kernels: bit-exact quantizers (the CUDA twins of kernels/quant.py), bf16
// rounding, warp reductions, and host-side argument checks.
//
// Numerics contract: every helper here reproduces the PyTorch reference's rounding points exactly. fp32
// arithmetic that the reference does op by op (x * cos - y * sin, w * (x * r)) uses the __f*_rn intrinsics so the
// compiler cannot contract it into an FMA, and denormals are kept (the extension is never built with fast math).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#define DSV4_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

namespace dsv4 {
// Host-side argument checks (shapes, dtypes, placement): these never need a device sync.
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}
inline void check_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
}
inline void check_dim(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.dim() == n, name, " must have ", n, " dims, got ", t.dim());
}
using TensorList = std::initializer_list<const at::Tensor*>;

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Launches `kernel` in thread-block clusters of cluster_x CTAs along x (grid.x a multiple of it), and checks it.
template <typename... Params, typename... Args>
inline void launch_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned cluster_x,
                             cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster_x;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
inline int num_sms() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}
}  // namespace dsv4

namespace dsv4 {

constexpr int kWarp = 32;

// ------------------------------------------------------------------------------------------- warp reductions
// Sorts keys[0, size) in shared memory into descending order with a bitonic network; size is a power of two.
// Every one of the block's kThreads threads calls it (tid = threadIdx.x); it ends on a barrier. Callers pack
// (orderable score << 32 | ~index) into each key, so equal scores order by the lower index first.
template <int kThreads>
__device__ __forceinline__ void bitonic_sort_desc(unsigned long long* keys, uint32_t size, uint32_t tid) {
  for (uint32_t len = 2; len <= size; len <<= 1) {
    for (uint32_t j = len >> 1; j > 0; j >>= 1) {
      for (uint32_t i = tid; i < size; i += kThreads) {
        const uint32_t l = i ^ j;
        if (l > i) {
          const unsigned long long a = keys[i], b = keys[l];
          if ((i & len) == 0 ? a < b : a > b) {
            keys[i] = b;
            keys[l] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ------------------------------------------------------------------------------------------- bf16
__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

__device__ __forceinline__ uint16_t bf16_bits(float x) {
  __nv_bfloat16 b = __float2bfloat16_rn(x);
  return *reinterpret_cast<uint16_t*>(&b);
}

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) { return __uint_as_float(bits16 << 16); }

// ------------------------------------------------------------------------------------------- UE8M0 scales
// quant.ue8m0_scale: s = 2^ceil(log2(max(amax, floor) * fl32(1/fmt_max))), ceil(log2) read off the fp32 bits
// (biased exponent, +1 if any mantissa bit is set). Returns the UE8M0 byte = the biased exponent of s. `inv_max`
// and `amax_floor` arrive from Python as the exact fp32 values the reference uses.
__device__ __forceinline__ uint32_t ue8m0_code(float amax, float amax_floor, float inv_max) {
  const float y = __fmul_rn(fmaxf(amax, amax_floor), inv_max);
  const uint32_t bits = __float_as_uint(y);
  return ((bits >> 23) & 0xFFu) + ((bits & 0x7FFFFFu) != 0u);
}

__device__ __forceinline__ float ue8m0_value(uint32_t code) { return __uint_as_float(code << 23); }

// x / s for a UE8M0 scale s = 2^(code - 127), code in [1, 254]. 1/s is exact in fp32 (a subnormal for code 254),
// so one multiply rounds the same real number x * 2^(127 - code) once, exactly as IEEE division does (underflow
// and overflow included) at a fraction of the instructions. The out-of-range codes keep the real division.
__device__ __forceinline__ float div_by_scale(float x, float scale) {
  const uint32_t code = __float_as_uint(scale) >> 23;
  if (code == 0u || code >= 254u) return __fdiv_rn(x, scale);
  return __fmul_rn(x, __uint_as_float((254u - code) << 23));
}

// ------------------------------------------------------------------------------------------- e4m3
// quant.round_e4m3 + e4m3_codes: x / s (exact for a power-of-two s; see div_by_scale for underflow), clamp to
// +-448, round to nearest even. cvt.rn.satfinite gives exactly that byte, -0 -> 0x80.
__device__ __forceinline__ uint8_t e4m3_encode(float x, float scale) {
  const float y = fminf(fmaxf(div_by_scale(x, scale), -448.0f), 448.0f);
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3));
}

__device__ __forceinline__ float e4m3_decode(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3)));
}

// ------------------------------------------------------------------------------------------- e2m1
// quant.round_e2m1 + e2m1_codes, in software (sm_90 has no e2m1 cvt): step 0.5 below 2, 1 below 4, 2 above;
// rintf is round-half-even like torch.round; the sign bit is kept for -0 (code 8), as the reference does.
__device__ __forceinline__ uint32_t e2m1_encode(float x, float scale) {
  const float y = fminf(fmaxf(div_by_scale(x, scale), -6.0f), 6.0f);
  const float a = fabsf(y);
  const float step = a < 2.0f ? 0.5f : (a < 4.0f ? 1.0f : 2.0f);
  const float inv_step = a < 2.0f ? 2.0f : (a < 4.0f ? 1.0f : 0.5f);   // a / step, exactly (powers of two)
  const float q = fminf(rintf(__fmul_rn(a, inv_step)) * step, 6.0f);
  // grid index of q in {0, .5, 1, 1.5, 2, 3, 4, 6}
  const uint32_t idx = q < 2.0f ? static_cast<uint32_t>(q * 2.0f)
                                : (q < 4.0f ? static_cast<uint32_t>(q) + 2u : static_cast<uint32_t>(q * 0.5f) + 4u);
  return (signbit(y) ? 8u : 0u) | idx;
}

}  // namespace dsv4
