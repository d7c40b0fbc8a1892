// Routed FP4 experts for decode-sized expert blocks of 8 rows (spec §5.2-5.3; the math and the reference are in
// kernels/fast/moe.py, the Triton kernels for larger blocks in kernels/fast/_moe_triton.py).
//
//   moe_decode_gemm_kernel<kGated, kTiles>   one grouped GEMM over expert blocks of 8 * kTiles rows (tokens):
//       gated (GEMM 1): w13 rows (gate n, up I + n) against the block's FP8 x rows -> h = bf16(w * silu(min(g, L))
//                       * clamp(v, -L, L)) rows [block rows, I], bf16;
//       else (GEMM 2):  w2 rows against h, quantized to FP8 per 128 as the CTA stages it -> y rows of the pairs.
//
// Why a CUDA kernel: at decode each expert block holds a few tokens, so the GEMM is a stream of FP4 weights with
// one 32-column UE8M0 scale per row each. Triton's wgmma path waits on every 32-deep MMA before applying its
// scale (the A operand comes from registers) and ran at 3.6x the HBM floor at 1 token; this kernel at 2.9x. Here each warp streams 16
// weight rows along K with 8 spans of 64 columns in flight per thread (two 8-byte loads per span), turns each
// 32-bit word of nibbles into two e4m3 words in registers, and issues mma.sync m16n8k32 e4m3 with the tokens on
// the N side (swap-AB); each MMA's scale FMA waits only on its own MMA, so the scoreboard overlaps them.
//
// Fragments (PTX m16n8k32, 8-bit A row-major 16x32, B column-major 32x8; g = lane / 4, c = lane % 4):
//   a0 = A[g][4c..4c+3], a1 = A[g+8][4c..], a2 = A[g][16+4c..], a3 = A[g+8][16+4c..]; b0 = B[4c..4c+3][g],
//   b1 = B[16+4c..][g]; d0, d1 = D[g][2c, 2c+1], d2, d3 = D[g+8][2c, 2c+1].
// The dot product does not care how the 32 k of one MMA are numbered as long as A and B agree, so lane c takes
// the 8 physical columns 8c..8c+7 of a 32-column group as its logical k 4c..4c+3 (a0/a1, b0) and 16+4c..16+4c+3
// (a2/a3, b1). Split nibble order (kernels/quant.py): in each span of 64 columns, byte j holds column j (low
// nibble) and 32 + j (high), so the 8 bytes 8c..8c+7 of a row are both groups' columns for lane c: one 8-byte
// load per row per span, no shuffles. B is the matching 8 bytes of an FP8 row staged in shared memory.
//
// Numerics (as the Triton kernel): e2m1 s|ee|m -> e4m3 s|0ee|m00 is the value times 2^-6 (exact), each 32-deep
// MMA starts from zero and is promoted into a 128-block sum with its FP4 scale (2^6 folded in), each 128-block
// sum into the fp32 accumulator with the activation's scale.
#include "common.cuh"
#include "ops.h"

namespace dsv4 {
namespace {

constexpr int kWarps = 4;               // warps per CTA, each 16 weight rows over all of K
constexpr int kThreads = kWarps * kWarp;
constexpr int kSpanCols = 64;           // FP4 columns per span (32 bytes per row)
constexpr int kSpans = 8;               // spans per pipeline step (512 columns): loads in flight per thread
constexpr int kStepCols = kSpans * kSpanCols;
constexpr int kQBlock = 128;            // activation quantization block
constexpr int kSmemPad = 32;            // bytes after each staged FP8 row: 8-byte B loads hit 2 wavefronts, no more

struct Args {
  const uint8_t* act;            // gated: FP8 x [R, K]; else bf16 h [blocks * BM, K] (as bytes)
  const float* act_scale;        // gated: fp32 [R, K / 128]
  const int32_t* pair_row;       // [P] row of x of each pair
  const float* pair_weight;      // [P]
  const int32_t* sorted_pair;    // [blocks * BM] row -> pair
  const int32_t* block_bucket;   // [blocks] bucket (expert; E = off-rank; -1 = unused)
  const int32_t* bucket_start;   // [E + 1] first row
  const int32_t* bucket_count;   // [E + 1] pairs
  const uint8_t* w;              // [E, rows, K / 2] FP4 bytes in split nibble order
  const uint8_t* s;              // [E, rows, K / 32] UE8M0
  __nv_bfloat16* out;            // gated: h [blocks * BM, I]; else y [P, N]
  int num_experts, k, n;         // n: I (gated) or the output width D
  int64_t w_expert_stride, s_expert_stride;
  float limit;
};

struct Step {                     // one pipeline step's loads: 8 spans of rows g and g + 8, and their scales
  uint2 wg[kSpans], w8[kSpans];
  uint4 sg, s8;
};

__device__ __forceinline__ void fp4_to_e4m3(uint32_t w, uint32_t& lo, uint32_t& hi) {
  lo = ((w << 4) & 0x80808080u) | ((w << 2) & 0x1C1C1C1Cu);   // low nibbles: columns j .. j+3 of the span
  hi = (w & 0x80808080u) | ((w >> 2) & 0x1C1C1C1Cu);          // high nibbles: columns 32+j .. 32+j+3
}

__device__ __forceinline__ void mma_e4m3(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint2 b) {
  asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b.x), "r"(b.y), "f"(0.0f));
}

// UE8M0 byte `byte` of a word -> 2^(b - 127) as fp32 (byte 0 reads as 0, as quant.ue8m0_values): the byte moved
// to bits 24..31, then down one bit into the exponent field. The unpacking's 2^-6 is undone in the activation
// scales instead (`stage_rows`), so this is two integer ops per scale.
template <int kByte>
__device__ __forceinline__ float fp4_scale(uint32_t word) {
  return __uint_as_float(__byte_perm(word, 0u, (kByte << 12) | 0x444) >> 1);
}
__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

__device__ __forceinline__ void load_step(Step& st, const uint8_t* wg, const uint8_t* w8, const uint8_t* sg,
                                          const uint8_t* s8, int step) {
  const uint8_t* base_g = wg + step * (kStepCols / 2);
  const uint8_t* base_8 = w8 + step * (kStepCols / 2);
#pragma unroll
  for (int i = 0; i < kSpans; ++i) {
    st.wg[i] = __ldg(reinterpret_cast<const uint2*>(base_g + i * (kSpanCols / 2)));
    st.w8[i] = __ldg(reinterpret_cast<const uint2*>(base_8 + i * (kSpanCols / 2)));
  }
  st.sg = __ldg(reinterpret_cast<const uint4*>(sg + step * (kStepCols / 32)));
  st.s8 = __ldg(reinterpret_cast<const uint4*>(s8 + step * (kStepCols / 32)));
}

// The block's activation rows into shared memory as FP8, with their fp32 scales per 128 times 2^6 (the FP4
// unpacking's 2^-6, exact): gated copies the gathered x rows; else h (bf16) is quantized per 128 exactly as
// act_quant_fp8 does. Rows past the block's pairs are left unwritten: they only reach D columns that are never
// stored. act_row[m]: the activation row of block row m.
template <bool kGated, int kRows>
__device__ void stage_rows(const Args& a, uint8_t* xs, float* ss, const int* act_row, int rows_ok, int row_bytes) {
  const int tid = threadIdx.x, kb_count = a.k / kQBlock;
  if constexpr (kGated) {
    const int chunks = a.k / 16;
    for (int i = tid; i < rows_ok * chunks; i += kThreads) {
      const int m = i / chunks, j = i % chunks;
      *reinterpret_cast<uint4*>(xs + m * row_bytes + 16 * j) =
          __ldg(reinterpret_cast<const uint4*>(a.act + (int64_t)act_row[m] * a.k) + j);
    }
    for (int i = tid; i < rows_ok * kb_count; i += kThreads)
      ss[i] = 64.0f * a.act_scale[(int64_t)act_row[i / kb_count] * kb_count + i % kb_count];
  } else {      // one warp per (row, 128-block): 4 bf16 per lane, the block's amax, its UE8M0 scale, e4m3 bytes
    const int warp = tid / kWarp, lane = tid % kWarp;
    const auto* h = reinterpret_cast<const __nv_bfloat16*>(a.act);
    for (int i = warp; i < rows_ok * kb_count; i += kWarps) {
      const int m = i / kb_count, kb = i % kb_count;
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(h + (int64_t)act_row[m] * a.k + kb * kQBlock) + lane);
      const float v[4] = {bf16_bits_to_float(raw.x & 0xFFFFu), bf16_bits_to_float(raw.x >> 16),
                          bf16_bits_to_float(raw.y & 0xFFFFu), bf16_bits_to_float(raw.y >> 16)};
      const float amax = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
      const float scale = ue8m0_value(ue8m0_code(amax, 1e-4f, 1.0f / 448.0f));
      uint32_t packed = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) packed |= static_cast<uint32_t>(e4m3_encode(v[j], scale)) << (8 * j);
      *reinterpret_cast<uint32_t*>(xs + m * row_bytes + kb * kQBlock + 4 * lane) = packed;
      if (lane == 0) ss[i] = 64.0f * scale;
    }
  }
}

// One pipeline step (8 spans = four 128-blocks) of a warp's 16 weight rows against the staged rows.
template <int kTiles>
__device__ __forceinline__ void mma_step(float (&acc)[kTiles][4], const Step& st, const uint8_t* xs,
                                         const float* ss, int step, int row_bytes, int kb_count, int g, int c) {
#pragma unroll
  for (int kb = 0; kb < kStepCols / kQBlock; ++kb) {
    float blk[kTiles][4] = {};
    // the scale bytes of this 128-block: groups 4kb .. 4kb+3 of the step's 16 (word kb), rows g and g + 8
    const uint32_t sgw = word_of(st.sg, kb), s8w = word_of(st.s8, kb);
#pragma unroll
    for (int half = 0; half < 2; ++half) {                        // two spans per 128-block
      const int i = 2 * kb + half;
      uint32_t lo_g0, hi_g0, lo_g1, hi_g1, lo_80, hi_80, lo_81, hi_81;
      fp4_to_e4m3(st.wg[i].x, lo_g0, hi_g0);
      fp4_to_e4m3(st.wg[i].y, lo_g1, hi_g1);
      fp4_to_e4m3(st.w8[i].x, lo_80, hi_80);
      fp4_to_e4m3(st.w8[i].y, lo_81, hi_81);
      const float sg_lo = half ? fp4_scale<2>(sgw) : fp4_scale<0>(sgw);
      const float sg_hi = half ? fp4_scale<3>(sgw) : fp4_scale<1>(sgw);
      const float s8_lo = half ? fp4_scale<2>(s8w) : fp4_scale<0>(s8w);
      const float s8_hi = half ? fp4_scale<3>(s8w) : fp4_scale<1>(s8w);
      const int col = step * kStepCols + i * kSpanCols + 8 * c;
#pragma unroll
      for (int t = 0; t < kTiles; ++t) {
        const uint8_t* xrow = xs + (8 * t + g) * row_bytes + col;
        const uint2 b_lo = *reinterpret_cast<const uint2*>(xrow);
        const uint2 b_hi = *reinterpret_cast<const uint2*>(xrow + 32);
        float p[4], q[4];
        mma_e4m3(p, lo_g0, lo_80, lo_g1, lo_81, b_lo);
        mma_e4m3(q, hi_g0, hi_80, hi_g1, hi_81, b_hi);
        blk[t][0] = fmaf(q[0], sg_hi, fmaf(p[0], sg_lo, blk[t][0]));
        blk[t][1] = fmaf(q[1], sg_hi, fmaf(p[1], sg_lo, blk[t][1]));
        blk[t][2] = fmaf(q[2], s8_hi, fmaf(p[2], s8_lo, blk[t][2]));
        blk[t][3] = fmaf(q[3], s8_hi, fmaf(p[3], s8_lo, blk[t][3]));
      }
    }
    const int kb_abs = step * (kStepCols / kQBlock) + kb;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      const float sa0 = ss[(8 * t + 2 * c) * kb_count + kb_abs], sa1 = ss[(8 * t + 2 * c + 1) * kb_count + kb_abs];
      acc[t][0] = fmaf(blk[t][0], sa0, acc[t][0]);
      acc[t][1] = fmaf(blk[t][1], sa1, acc[t][1]);
      acc[t][2] = fmaf(blk[t][2], sa0, acc[t][2]);
      acc[t][3] = fmaf(blk[t][3], sa1, acc[t][3]);
    }
  }
}

template <bool kGated, int kTiles>
__global__ void __launch_bounds__(kThreads) moe_decode_gemm_kernel(const Args a) {
  constexpr int kRows = 8 * kTiles;                // tokens per expert block
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int act_row[kRows], pair_of[kRows];
  const int b = blockIdx.x;
  const int bucket = a.block_bucket[b];
  if (bucket < 0) return;
  const int rows_ok = min(kRows, a.bucket_start[bucket] + a.bucket_count[bucket] - b * kRows);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
  // weight rows of this warp's lanes: gated -> gate n0+g and up I+n0+g (h columns n0..n0+7); else n0+g, n0+g+8
  const int n0 = kGated ? (blockIdx.y * kWarps + warp) * 8 : (blockIdx.y * kWarps + warp) * 16;
  if (bucket == a.num_experts) {                   // off-rank pairs: zero y rows (GEMM 1 leaves their h unused)
    if constexpr (!kGated) {
      for (int m = 0; m < rows_ok; ++m) {
        const int64_t pair = a.sorted_pair[b * kRows + m];
        if (lane < 16) a.out[pair * a.n + n0 + lane] = __float2bfloat16_rn(0.0f);
      }
    }
    return;
  }
  // the first step's weights are in flight while the activation rows are staged
  const int row_g = n0 + g, row_8 = kGated ? a.n + n0 + g : n0 + g + 8;
  const uint8_t* w = a.w + bucket * a.w_expert_stride + 8 * c;
  const uint8_t* s = a.s + bucket * a.s_expert_stride;
  const uint8_t* wg = w + (int64_t)row_g * (a.k / 2);
  const uint8_t* w8 = w + (int64_t)row_8 * (a.k / 2);
  const uint8_t* sg = s + (int64_t)row_g * (a.k / 32);
  const uint8_t* s8 = s + (int64_t)row_8 * (a.k / 32);
  Step even, odd;
  load_step(even, wg, w8, sg, s8, 0);

  if (threadIdx.x < rows_ok) {
    const int pair = a.sorted_pair[b * kRows + threadIdx.x];
    pair_of[threadIdx.x] = pair;
    act_row[threadIdx.x] = kGated ? a.pair_row[pair] : b * kRows + threadIdx.x;
  }
  __syncthreads();
  const int row_bytes = a.k + kSmemPad, kb_count = a.k / kQBlock;
  uint8_t* xs = smem;
  float* ss = reinterpret_cast<float*>(smem + kRows * row_bytes);
  stage_rows<kGated, kRows>(a, xs, ss, act_row, rows_ok, row_bytes);
  __syncthreads();

  float acc[kTiles][4] = {};
  const int steps = a.k / kStepCols;               // even (K % 1024 == 0): the two buffers alternate
  for (int step = 0; step < steps; step += 2) {
    load_step(odd, wg, w8, sg, s8, step + 1);
    mma_step<kTiles>(acc, even, xs, ss, step, row_bytes, kb_count, g, c);
    if (step + 2 < steps) load_step(even, wg, w8, sg, s8, step + 2);
    mma_step<kTiles>(acc, odd, xs, ss, step + 1, row_bytes, kb_count, g, c);
  }

#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {                  // tokens 8t + 2c + j: d[j] is row g, d[2 + j] row g + 8
      const int m = 8 * t + 2 * c + j;
      if (m >= rows_ok) continue;
      const int64_t pair = pair_of[m];
      if constexpr (kGated) {  // the reference order: bf16 GEMM outputs, clamps, silu * v in fp32, weight, bf16
        const float gate = fminf(bf16_round(acc[t][j]), a.limit);
        const float up = fminf(fmaxf(bf16_round(acc[t][2 + j]), -a.limit), a.limit);
        const float silu = gate / (1.0f + expf(-gate));
        a.out[(int64_t)(b * kRows + m) * a.n + n0 + g] = __float2bfloat16_rn(a.pair_weight[pair] * (silu * up));
      } else {
        a.out[pair * a.n + n0 + g] = __float2bfloat16_rn(acc[t][j]);
        a.out[pair * a.n + n0 + g + 8] = __float2bfloat16_rn(acc[t][2 + j]);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------- wgmma path
// moe_wgmma_kernel<kGated, kN, kSpans>: the same grouped GEMMs over expert blocks of kN = 8 or 16 rows (tokens),
// one warpgroup per CTA streaming 64 weight rows, on Hopper's asynchronous warpgroup MMA: the FP4 weights are
// unpacked to e4m3 in registers (the A operand: `wgmma ... m64nNk32.e4m3` reads A from registers, so no F2FP
// conversions and no emulated HMMA as with mma.sync e4m3), the block's FP8 token rows are B, staged once in
// shared memory. Each 128-block of K is four 32-deep MMAs into four zeroed accumulator sets (one per FP4 scale),
// issued together; the next block's nibbles are unpacked while they run; then each set is promoted into the
// fp32 sums with its FP4 scale and the 128-block with the activation scale (the numerics of the mma.sync path).
//
// Fragments (PTX wgmma, per warp w of the warpgroup; g = lane / 4, c = lane % 4): A rows 16w + g and 16w + g + 8
// as in mma.m16n8k32 (a0 = row g, k 4c..4c+3; a1 = row g+8; a2 = row g, k 16+4c..; a3 = row g+8, k 16+4c..); D
// d[4t + j] = (row g, token 8t + 2c + j), d[4t + 2 + j] = (row g + 8, same token). Lane c holds physical columns
// 8c..8c+7 of a 32-column group as logical k 4c..4c+3 and 16+4c..16+4c+3 (module doc), so B is staged with the
// same permutation: logical 16-byte chunk 0 of a group = physical 4-byte words 0, 2, 4, 6, chunk 1 = words 1, 3,
// 5, 7. B layout (K-major, no swizzle, core matrices of 8 rows x 16 bytes): byte (n, logical k) at
// (k / 16) * kN * 16 + n * 16 + k % 16, so the descriptor's leading byte offset (between the two 16-byte chunks
// of a 32-deep MMA) is kN * 16 and its stride byte offset (between 8-row groups) 128.
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t smem_addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((smem_addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFFu) >> 4) << 16) |
         (static_cast<uint64_t>((sbo & 0x3FFFFu) >> 4) << 32);   // base offset 0, no swizzle (bits 62-63 = 0)
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Keeps the compiler from reading an accumulator before the wait that completes it.
__device__ __forceinline__ void fence_operand(float& r) { asm volatile("" : "+f"(r)::"memory"); }

template <int kN>
__device__ __forceinline__ void wgmma_e4m3(float (&d)[kN / 2], const uint32_t (&a)[4], uint64_t desc);

template <>
__device__ __forceinline__ void wgmma_e4m3<8>(float (&d)[4], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n8k32.f32.e4m3.e4m3 {%0, %1, %2, %3}, {%4, %5, %6, %7}, %8, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(0));
}

template <>
__device__ __forceinline__ void wgmma_e4m3<16>(float (&d)[8], const uint32_t (&a)[4], uint64_t desc) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3 {%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, "
      "%12, p, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(0));
}

template <int kSpans>
struct WStep {                    // one pipeline step's loads: kSpans spans of rows lo and hi, and their scale bytes
  uint2 lo[kSpans], hi[kSpans];
  uint32_t slo[kSpans / 2], shi[kSpans / 2];      // one 32-bit word (four 32-column scales) per 128-block
};

template <int kSpans>
__device__ __forceinline__ void load_wstep(WStep<kSpans>& st, const uint8_t* wlo, const uint8_t* whi,
                                           const uint8_t* slo, const uint8_t* shi, int step) {
  constexpr int kCols = kSpans * kSpanCols;
#pragma unroll
  for (int i = 0; i < kSpans; ++i) {
    st.lo[i] = __ldg(reinterpret_cast<const uint2*>(wlo + step * (kCols / 2) + i * (kSpanCols / 2)));
    st.hi[i] = __ldg(reinterpret_cast<const uint2*>(whi + step * (kCols / 2) + i * (kSpanCols / 2)));
  }
#pragma unroll
  for (int b = 0; b < kSpans / 2; ++b) {
    st.slo[b] = __ldg(reinterpret_cast<const uint32_t*>(slo + step * (kCols / 32)) + b);
    st.shi[b] = __ldg(reinterpret_cast<const uint32_t*>(shi + step * (kCols / 32)) + b);
  }
}

// The A fragments of 128-block b of a step: groups 0..3 = (span 2b low nibbles, span 2b high, span 2b+1 low,
// span 2b+1 high), each {row lo k 4c.., row hi k 4c.., row lo k 16+4c.., row hi k 16+4c..}.
template <int kSpans>
__device__ __forceinline__ void unpack_block(uint32_t (&a)[4][4], const WStep<kSpans>& st, int b) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = 2 * b + half;
    fp4_to_e4m3(st.lo[i].x, a[2 * half][0], a[2 * half + 1][0]);
    fp4_to_e4m3(st.hi[i].x, a[2 * half][1], a[2 * half + 1][1]);
    fp4_to_e4m3(st.lo[i].y, a[2 * half][2], a[2 * half + 1][2]);
    fp4_to_e4m3(st.hi[i].y, a[2 * half][3], a[2 * half + 1][3]);
  }
}

// 128-block kb of K: four MMAs from fa[kCur] into zeroed accumulators, the next block unpacked into fa[kCur ^ 1]
// while they run (if has_next), then each 32-deep sum promoted with its FP4 scale and the block with the
// activation scales (ss: [kN, K / 128], 2^6 folded in).
template <int kN, int kSpans, int kCur>
__device__ __forceinline__ void wgmma_block(float (&acc)[kN / 8][4], uint32_t (&fa)[2][4][4], const WStep<kSpans>& st,
                                            int bi, const WStep<kSpans>& next, int next_bi, bool has_next,
                                            const float* ss, uint64_t desc0, int kb, int kb_count, int c) {
  float p[4][kN / 2];
  wgmma_fence();
#pragma unroll
  for (int q = 0; q < 4; ++q) wgmma_e4m3<kN>(p[q], fa[kCur][q], desc0 + ((kb * 8 + 2 * q) * kN * 16 >> 4));
  wgmma_commit();
  if (has_next) unpack_block(fa[kCur ^ 1], next, next_bi);
  wgmma_wait_all();
#pragma unroll
  for (int q = 0; q < 4; ++q) {
#pragma unroll
    for (int r = 0; r < kN / 2; ++r) fence_operand(p[q][r]);
  }
  const uint32_t wl = st.slo[bi], wh = st.shi[bi];
  const float sl[4] = {fp4_scale<0>(wl), fp4_scale<1>(wl), fp4_scale<2>(wl), fp4_scale<3>(wl)};
  const float sh[4] = {fp4_scale<0>(wh), fp4_scale<1>(wh), fp4_scale<2>(wh), fp4_scale<3>(wh)};
#pragma unroll
  for (int t = 0; t < kN / 8; ++t) {
    const float sa0 = ss[(8 * t + 2 * c) * kb_count + kb], sa1 = ss[(8 * t + 2 * c + 1) * kb_count + kb];
    float blk[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {               // d[4t + j]: row lo for j < 2, row hi otherwise
      blk[j] = p[0][4 * t + j] * (j < 2 ? sl[0] : sh[0]);
#pragma unroll
      for (int q = 1; q < 4; ++q) blk[j] = fmaf(p[q][4 * t + j], j < 2 ? sl[q] : sh[q], blk[j]);
    }
    acc[t][0] = fmaf(blk[0], sa0, acc[t][0]);
    acc[t][1] = fmaf(blk[1], sa1, acc[t][1]);
    acc[t][2] = fmaf(blk[2], sa0, acc[t][2]);
    acc[t][3] = fmaf(blk[3], sa1, acc[t][3]);
  }
}

// The kSpans / 2 128-blocks of one pipeline step (kb0 = the first one's index), the last one unpacking block 0
// of `next` (the other register buffer) if next_ok.
template <int kN, int kSpans>
__device__ __forceinline__ void wgmma_half(float (&acc)[kN / 8][4], uint32_t (&fa)[2][4][4], const WStep<kSpans>& st,
                                           const WStep<kSpans>& next, bool next_ok, const float* ss, uint64_t desc0,
                                           int kb0, int kb_count, int c) {
  static_assert(kSpans == 4, "two 128-blocks per step: fa[0] holds each step's first block");
  wgmma_block<kN, kSpans, 0>(acc, fa, st, 0, st, 1, true, ss, desc0, kb0, kb_count, c);
  wgmma_block<kN, kSpans, 1>(acc, fa, st, 1, next, 0, next_ok, ss, desc0, kb0 + 1, kb_count, c);
}

// The shared-memory ring of the cp.async pipeline: each thread copies its own 8-byte pieces (row lo and row hi of
// each span, then both rows' scale words) and reads them back itself, so no barrier is needed. Layout per stage:
// [span][thread][lo 8 B | hi 8 B], then [thread][scales lo 8 B | hi 8 B] (16-byte thread stride: no bank
// conflicts on the 16-byte reads).
template <int kSpans>
constexpr int kRingStageBytes = (kSpans + 1) * kThreads * 16;

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory"); }

template <int kSpans>
__device__ __forceinline__ void ring_issue(uint8_t* ring, int slot, const uint8_t* wlo, const uint8_t* whi,
                                           const uint8_t* slo, const uint8_t* shi, int step) {
  constexpr int kCols = kSpans * kSpanCols;
  uint8_t* base = ring + slot * kRingStageBytes<kSpans> + threadIdx.x * 16;
#pragma unroll
  for (int i = 0; i < kSpans; ++i) {
    cp_async8(base + i * kThreads * 16, wlo + step * (kCols / 2) + i * (kSpanCols / 2));
    cp_async8(base + i * kThreads * 16 + 8, whi + step * (kCols / 2) + i * (kSpanCols / 2));
  }
  static_assert(kCols / 32 == 8, "one 8-byte scale piece per row per step");
  cp_async8(base + kSpans * kThreads * 16, slo + step * (kCols / 32));
  cp_async8(base + kSpans * kThreads * 16 + 8, shi + step * (kCols / 32));
}

template <int kSpans>
__device__ __forceinline__ void ring_read(WStep<kSpans>& st, const uint8_t* ring, int slot) {
  const uint8_t* base = ring + slot * kRingStageBytes<kSpans> + threadIdx.x * 16;
#pragma unroll
  for (int i = 0; i < kSpans; ++i) {
    const uint4 v = *reinterpret_cast<const uint4*>(base + i * kThreads * 16);
    st.lo[i] = make_uint2(v.x, v.y);
    st.hi[i] = make_uint2(v.z, v.w);
  }
  const uint4 v = *reinterpret_cast<const uint4*>(base + kSpans * kThreads * 16);
  st.slo[0] = v.x;
  st.slo[1] = v.y;
  st.shi[0] = v.z;
  st.shi[1] = v.w;
}

// Stages the block's activation rows as B (layout above) and their fp32 scales per 128 times 2^6 (the FP4
// unpacking's 2^-6): gated gathers the FP8 x rows; else h (bf16) is quantized per 128 exactly as act_quant_fp8.
// Rows past the block's pairs are zero.
template <bool kGated, int kN>
__device__ void stage_b(const Args& a, uint8_t* bs, float* ss, const int* act_row, int rows_ok) {
  const int tid = threadIdx.x, kb_count = a.k / kQBlock;
  if constexpr (kGated) {
    const int groups = a.k / 32;
    for (int i = tid; i < kN * groups; i += kThreads) {
      const int n = i % kN, grp = i / kN;
      uint4 w0 = make_uint4(0, 0, 0, 0), w1 = w0;
      if (n < rows_ok) {
        const uint4* src = reinterpret_cast<const uint4*>(a.act + (int64_t)act_row[n] * a.k + 32 * grp);
        w0 = __ldg(src);
        w1 = __ldg(src + 1);
      }
      *reinterpret_cast<uint4*>(bs + ((2 * grp) * kN + n) * 16) = make_uint4(w0.x, w0.z, w1.x, w1.z);
      *reinterpret_cast<uint4*>(bs + ((2 * grp + 1) * kN + n) * 16) = make_uint4(w0.y, w0.w, w1.y, w1.w);
    }
    for (int i = tid; i < kN * kb_count; i += kThreads) {
      const int n = i / kb_count;
      ss[i] = n < rows_ok ? 64.0f * a.act_scale[(int64_t)act_row[n] * kb_count + i % kb_count] : 0.0f;
    }
  } else {      // one warp per (row, 128-block): 4 bf16 per lane, the block's amax, its UE8M0 scale, e4m3 bytes
    const int warp = tid / kWarp, lane = tid % kWarp;
    const auto* h = reinterpret_cast<const __nv_bfloat16*>(a.act);
    const int q = lane / 8, wi = lane % 8;        // the lane's 4 bytes: word wi of 32-column group q of the block
    for (int i = warp; i < kN * kb_count; i += kWarps) {
      const int n = i / kb_count, kb = i % kb_count;
      uint32_t packed = 0;
      float scale = 0.0f;
      if (n < rows_ok) {
        const uint2 raw = __ldg(reinterpret_cast<const uint2*>(h + (int64_t)act_row[n] * a.k + kb * kQBlock) + lane);
        const float v[4] = {bf16_bits_to_float(raw.x & 0xFFFFu), bf16_bits_to_float(raw.x >> 16),
                            bf16_bits_to_float(raw.y & 0xFFFFu), bf16_bits_to_float(raw.y >> 16)};
        const float amax = warp_max(fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3]))));
        scale = ue8m0_value(ue8m0_code(amax, 1e-4f, 1.0f / 448.0f));
#pragma unroll
        for (int j = 0; j < 4; ++j) packed |= static_cast<uint32_t>(e4m3_encode(v[j], scale)) << (8 * j);
      }
      const int chunk = kb * 8 + 2 * q + (wi & 1);
      *reinterpret_cast<uint32_t*>(bs + (chunk * kN + n) * 16 + (wi >> 1) * 4) = packed;
      if (lane == 0) ss[i] = 64.0f * scale;
    }
  }
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // B is read by the tensor cores (async proxy)
}

template <bool kGated, int kN, int kStages>
__global__ void __launch_bounds__(kThreads, kStages > 0 ? 2 : (kN == 8 ? 4 : 3)) moe_wgmma_kernel(const Args a) {
  constexpr int kSpans = 4;                      // 256 columns (two 128-blocks) per pipeline step
  constexpr int kTiles = kN / 8;
  constexpr int kBlocks = kSpans / 2;
  constexpr int kCols = kSpans * kSpanCols;
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ int act_row[kN], pair_of[kN];
  const int b = blockIdx.x;
  const int bucket = a.block_bucket[b];
  if (bucket < 0) return;
  const int rows_ok = min(kN, a.bucket_start[bucket] + a.bucket_count[bucket] - b * kN);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, g = lane / 4, c = lane % 4;
  // A rows 16w + g (lo) and 16w + g + 8 (hi): gated -> gate row n0+8w+g and up row I+n0+8w+g (h column n0+8w+g);
  // else output columns n0 + 16w + g and n0 + 16w + g + 8
  const int n0 = blockIdx.y * (kGated ? 32 : 64);
  const int row_lo = kGated ? n0 + 8 * warp + g : n0 + 16 * warp + g;
  const int row_hi = kGated ? a.n + row_lo : row_lo + 8;
  if (bucket == a.num_experts) {                   // off-rank pairs: zero y rows (GEMM 1 leaves their h unused)
    if constexpr (!kGated) {
      for (int m = 0; m < rows_ok; ++m) {
        const int64_t pair = a.sorted_pair[b * kN + m];
        if (threadIdx.x < 64) a.out[pair * a.n + n0 + threadIdx.x] = __float2bfloat16_rn(0.0f);
      }
    }
    return;
  }
  const uint8_t* w = a.w + bucket * a.w_expert_stride + 8 * c;
  const uint8_t* s = a.s + bucket * a.s_expert_stride;
  const uint8_t* wlo = w + (int64_t)row_lo * (a.k / 2);
  const uint8_t* whi = w + (int64_t)row_hi * (a.k / 2);
  const uint8_t* slo = s + (int64_t)row_lo * (a.k / 32);
  const uint8_t* shi = s + (int64_t)row_hi * (a.k / 32);
  const int steps = a.k / kCols;
  uint8_t* ring = smem + kN * a.k + kN * (a.k / kQBlock) * sizeof(float);
  WStep<kSpans> even, odd;
  if constexpr (kStages == 0) {
    load_wstep(even, wlo, whi, slo, shi, 0);       // in flight while B is staged
  } else {
#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {     // the first stages in flight while B is staged
      if (st < steps) ring_issue<kSpans>(ring, st, wlo, whi, slo, shi, st);
      cp_async_commit();
    }
  }

  if (threadIdx.x < rows_ok) {
    const int pair = a.sorted_pair[b * kN + threadIdx.x];
    pair_of[threadIdx.x] = pair;
    act_row[threadIdx.x] = kGated ? a.pair_row[pair] : b * kN + threadIdx.x;
  }
  __syncthreads();
  const int kb_count = a.k / kQBlock;
  uint8_t* bs = smem;
  float* ss = reinterpret_cast<float*>(smem + kN * a.k);
  stage_b<kGated, kN>(a, bs, ss, act_row, rows_ok);
  __syncthreads();

  const uint64_t desc0 = wgmma_desc(static_cast<uint32_t>(__cvta_generic_to_shared(bs)), kN * 16, 128);
  float acc[kTiles][4] = {};
  uint32_t fa[2][4][4];                            // A fragments of the current and the next 128-block
  if constexpr (kStages == 0) {                    // registers: two steps, one in flight while one computes
    unpack_block(fa[0], even, 0);
    for (int step = 0; step < steps; step += 2) {  // steps is even (K % 512 == 0)
      load_wstep(odd, wlo, whi, slo, shi, step + 1);
      wgmma_half<kN, kSpans>(acc, fa, even, odd, true, ss, desc0, step * kBlocks, kb_count, c);
      if (step + 2 < steps) load_wstep(even, wlo, whi, slo, shi, step + 2);
      wgmma_half<kN, kSpans>(acc, fa, odd, even, step + 2 < steps, ss, desc0, (step + 1) * kBlocks, kb_count, c);
    }
  } else {                                         // shared-memory ring: kStages - 1 steps in flight per thread
    for (int step = 0; step < steps; ++step) {
      cp_async_wait<kStages - 2>();                // this thread's copies of `step` have landed
      ring_read<kSpans>(even, ring, step % kStages);
      if (step + kStages - 1 < steps)
        ring_issue<kSpans>(ring, (step + kStages - 1) % kStages, wlo, whi, slo, shi, step + kStages - 1);
      cp_async_commit();
      unpack_block(fa[0], even, 0);
      wgmma_half<kN, kSpans>(acc, fa, even, even, false, ss, desc0, step * kBlocks, kb_count, c);
    }
  }

#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {                  // tokens 8t + 2c + j: acc[t][j] is row lo, acc[t][2 + j] row hi
      const int m = 8 * t + 2 * c + j;
      if (m >= rows_ok) continue;
      const int64_t pair = pair_of[m];
      if constexpr (kGated) {  // the reference order: bf16 GEMM outputs, clamps, silu * v in fp32, weight, bf16
        const float gate = fminf(bf16_round(acc[t][j]), a.limit);
        const float up = fminf(fmaxf(bf16_round(acc[t][2 + j]), -a.limit), a.limit);
        const float silu = gate / (1.0f + expf(-gate));
        a.out[(int64_t)(b * kN + m) * a.n + row_lo] = __float2bfloat16_rn(a.pair_weight[pair] * (silu * up));
      } else {
        a.out[pair * a.n + row_lo] = __float2bfloat16_rn(acc[t][j]);
        a.out[pair * a.n + row_hi] = __float2bfloat16_rn(acc[t][2 + j]);
      }
    }
  }
}

template <bool kGated, int kN, int kStages>
void launch_wgmma(const Args& a, int num_blocks, cudaStream_t stream) {
  const size_t smem = kN * a.k + kN * (a.k / kQBlock) * sizeof(float) + kStages * kRingStageBytes<4>;
  auto kernel = moe_wgmma_kernel<kGated, kN, kStages>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const dim3 grid(num_blocks, a.n / (kGated ? 32 : 64));
  kernel<<<grid, kThreads, smem, stream>>>(a);
  DSV4_LAUNCH_CHECK();
}

template <bool kGated, int kTiles>
void launch(const Args& a, int num_blocks, cudaStream_t stream) {
  constexpr int kRows = 8 * kTiles;
  const size_t smem = kRows * (a.k + kSmemPad) + kRows * (a.k / kQBlock) * sizeof(float);
  auto kernel = moe_decode_gemm_kernel<kGated, kTiles>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const int rows_per_cta = kWarps * (kGated ? 8 : 16);
  const dim3 grid(num_blocks, a.n / rows_per_cta);
  kernel<<<grid, kThreads, smem, stream>>>(a);
  DSV4_LAUNCH_CHECK();
}

}  // namespace

void moe_decode_gemm(const at::Tensor& act, const at::Tensor& act_scale, const at::Tensor& pair_row,
                     const at::Tensor& pair_weight, const at::Tensor& sorted_pair, const at::Tensor& block_bucket,
                     const at::Tensor& bucket_start, const at::Tensor& bucket_count, const at::Tensor& w,
                     const at::Tensor& s, at::Tensor& out, int64_t block_m, bool gated, double limit, bool wgmma, int64_t stages) {
  for (const at::Tensor* t : TensorList{&act, &pair_row, &pair_weight, &sorted_pair, &block_bucket, &bucket_start,
                                         &bucket_count, &w, &s, &out})
    check_cuda(*t, "moe_decode_gemm operand");
  check_dtype(pair_row, at::kInt, "pair_row");
  check_dtype(pair_weight, at::kFloat, "pair_weight");
  check_dtype(sorted_pair, at::kInt, "sorted_pair");
  check_dtype(block_bucket, at::kInt, "block_bucket");
  check_dtype(out, at::kBFloat16, "out");
  check_dim(w, 3, "w");
  check_dim(s, 3, "s");
  // 8-row blocks only: with 16 (two n8 tiles) the kernel lost to the Triton wgmma path already at 6 pairs per
  // expert on the H200 (673 vs 445 us), so the template's kTiles = 2 is not instantiated
  TORCH_CHECK(block_m == 8 || ((wgmma || stages > 0) && block_m == 16), "moe_decode_gemm: block_m must be 8 (or 16 on the wgmma "
              "path), got ", block_m);
  const int64_t num_experts = w.size(0), rows = w.size(1), k = 2 * w.size(2);
  TORCH_CHECK(k % (2 * kStepCols) == 0, "moe_decode_gemm: K must be a multiple of ", 2 * kStepCols, ", got ", k);
  TORCH_CHECK(s.size(0) == num_experts && s.size(1) == rows && s.size(2) == k / 32, "moe_decode_gemm: scale shape ",
              s.sizes(), " does not fit the weight ", w.sizes());
  const int64_t n = gated ? rows / 2 : rows;
  TORCH_CHECK(n % (kWarps * (gated ? 8 : 16)) == 0, "moe_decode_gemm: ", n, " output rows per expert");
  const int64_t num_blocks = block_bucket.size(0);
  TORCH_CHECK(sorted_pair.size(0) == num_blocks * block_m, "moe_decode_gemm: sorted_pair has ", sorted_pair.size(0),
              " rows, expected ", num_blocks * block_m);
  TORCH_CHECK(act.size(-1) == k, "moe_decode_gemm: the activation has ", act.size(-1), " features, K is ", k);
  if (gated) {
    check_cuda(act_scale, "act_scale");
    TORCH_CHECK(act.scalar_type() == at::kFloat8_e4m3fn, "moe_decode_gemm: gated activation must be FP8");
    check_dtype(act_scale, at::kFloat, "act_scale");
    TORCH_CHECK(out.size(0) == num_blocks * block_m && out.size(1) == n, "moe_decode_gemm: h has shape ",
                out.sizes());
  } else {
    check_dtype(act, at::kBFloat16, "h");
    TORCH_CHECK(act.size(0) == num_blocks * block_m, "moe_decode_gemm: h has ", act.size(0), " rows");
    TORCH_CHECK(out.size(0) == pair_row.size(0) && out.size(1) == n, "moe_decode_gemm: y has shape ", out.sizes());
  }
  if (num_blocks == 0) return;
  const c10::cuda::CUDAGuard guard(act.device());
  Args a{};
  a.act = reinterpret_cast<const uint8_t*>(act.data_ptr());
  a.act_scale = gated ? act_scale.data_ptr<float>() : nullptr;
  a.pair_row = pair_row.data_ptr<int32_t>();
  a.pair_weight = pair_weight.data_ptr<float>();
  a.sorted_pair = sorted_pair.data_ptr<int32_t>();
  a.block_bucket = block_bucket.data_ptr<int32_t>();
  a.bucket_start = bucket_start.data_ptr<int32_t>();
  a.bucket_count = bucket_count.data_ptr<int32_t>();
  a.w = reinterpret_cast<const uint8_t*>(w.data_ptr());
  a.s = reinterpret_cast<const uint8_t*>(s.data_ptr());
  a.out = reinterpret_cast<__nv_bfloat16*>(out.data_ptr());
  a.num_experts = static_cast<int>(num_experts);
  a.k = static_cast<int>(k);
  a.n = static_cast<int>(n);
  a.w_expert_stride = w.stride(0);
  a.s_expert_stride = s.stride(0);
  a.limit = static_cast<float>(limit);
  const cudaStream_t stream = current_stream();
  if (stages > 0) {
    TORCH_CHECK(stages == 6, "moe_decode_gemm: the cp.async ring is built with 6 stages, got ", stages);
    if (block_m == 8)
      gated ? launch_wgmma<true, 8, 6>(a, num_blocks, stream) : launch_wgmma<false, 8, 6>(a, num_blocks, stream);
    else
      gated ? launch_wgmma<true, 16, 6>(a, num_blocks, stream) : launch_wgmma<false, 16, 6>(a, num_blocks, stream);
  } else if (wgmma) {
    if (block_m == 8)
      gated ? launch_wgmma<true, 8, 0>(a, num_blocks, stream) : launch_wgmma<false, 8, 0>(a, num_blocks, stream);
    else
      gated ? launch_wgmma<true, 16, 0>(a, num_blocks, stream) : launch_wgmma<false, 16, 0>(a, num_blocks, stream);
  } else if (gated) {
    launch<true, 1>(a, num_blocks, stream);
  } else {
    launch<false, 1>(a, num_blocks, stream);
  }
}

}  // namespace dsv4
