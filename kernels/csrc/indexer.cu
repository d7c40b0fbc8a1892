// Lightning indexer over paged MXFP4 keys: score, then top-k (spec §4; reference: kernels/cache_ops.py
// indexer_topk, index_scores, select_topk).
//
//   indexer_score_mxfp4_kernel<NT>  grid (key chunk, token). Scores I(t, s) = sum_h w_h ReLU(q_h . k_s) for the
//                                   token's visible keys, written as 16-bit order-preserving keys of the bf16 score.
//   indexer_select_cluster_kernel   grid (8, token), one 8-CTA cluster per token, CTA r owns segment r of the row:
//                                   radix select over the 16-bit keys (12 + 4 bits) with the histograms merged
//                                   through DSMEM, ties to the lower entry index; the chosen keys above the
//                                   threshold are ranked by counting (no sort), the tied ones placed by index order.
//   indexer_select_kernel           the same selection in one CTA per token, bitonic sort of the chosen <= 1024;
//                                   faster once 8 CTAs per token exceed one wave (B > 16 on H100).
// The two run back to back in one op; the intermediate is 2 bytes per (token, entry), read from L2.
//
// Exactness. In reference numerics q and k are MXFP4 values (e2m1 x 2^e per 32-block), so q_h . k is a sum of
// four integer dot products times powers of two. Each 32-block of q is decomposed here as int * 2^(E_b - 3) with
// |int| <= 15 (checked), each key block as int * 2^(e_b - 128) (e2m1 * 2 is an integer <= 12). Shifting every
// block's integers by its exponent above the vector's smallest nonzero block exponent (<= 3 bits on each side,
// checked) folds the four blocks into ONE int8 x int8 tensor-core dot over K = 128 whose int32 sum is exact
// (<= 2^21). The exact dot is then acc * 2^(qmin - 3) (exact, via the 1.5 * 2^23 magic add) * 2^(kmin - 128):
// one fp32 rounding, identical to the reference's fp64 sum rounded to fp32. Then bf16, ReLU, times the bf16
// head weight (exact in fp32), bf16, exactly as the reference's bf16 tensors. The 64-head sum is taken in fp64,
// like the reference's: it is exact whenever the 64 bf16 terms span fewer than 39 binades (then both sums are
// exact, in any order); beyond that both round an fp64 sum, and their fp32 results could differ only if the sum
// lay within 2^-47 of an fp32 rounding boundary. Keys or heads outside the int8 fold (nonzero blocks 16x apart,
// q not on the MXFP4 grid) take a per-key fp64 path. The bf16 score, and so the selection, is the reference's.
//
// int8 mma.sync m16n8k32 fragments (PTX ISA): A (16 keys x 32) a0:(g, 4t..4t+3) a1:(g+8, ..) a2:(g, 16+4t..)
// a3:(g+8, 16+4t..); B (32 x 8 heads) b0:(4t..4t+3, g) b1:(16+4t.., g); C c0,c1:(g, 2t..2t+1) c2,c3:(g+8, ..),
// g = lane / 4, t = lane % 4. K is permuted consistently on both sides so that lane t owns 32-block t: MMA
// k-step s, slots 4t..4t+3 <-> block t elements 8s..8s+3 and slots 16+4t.. <-> elements 8s+4..8s+7. A key's
// block t is then one contiguous 16-byte run of its packed bytes.
//
// Mask rule: an entry on a missing block (-1, out of range, past the block table) gets key 0 and is never
// selected (the reference would index garbage there).
#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "ops.h"

namespace dsv4 {

constexpr int kIdxDim = 128;       // index_head_dim of every V4 model
constexpr int kIdxBlocks = kIdxDim / 32;
constexpr int kKeyBytes = kIdxDim / 2 + kIdxBlocks;   // 68
constexpr int kIdxWarps = 4;
constexpr int kIdxThreads = kIdxWarps * kWarp;
constexpr int kKeysPerWarpIter = 64;   // 4 m-tiles of 16 keys
constexpr int kSelectThreads = 512;
constexpr int kMaxTopkSel = 1024;

struct IndexerParams {
  const __nv_bfloat16* q;        // [T, H, 128] MXFP4-representable bf16
  const __nv_bfloat16* w;        // [T, H] bf16
  const uint8_t* pool;           // [num_blocks, epb, 68]
  const int64_t* positions;      // [T]
  const int64_t* token_seq;      // [T]
  const int64_t* block_table;    // [S, max_blocks]
  uint16_t* keys;                // [T, row_stride] order-preserving 16-bit keys
  int heads, ratio, epb, max_blocks, num_blocks, row_stride, iters;
};

// ------------------------------------------------------------------------------------------- helpers
__device__ __forceinline__ void mma_s8(int (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four e2m1 nibbles (low nibble first) -> four int8 = 2 * e2m1 value << shift, via byte-permute lookups.
__device__ __forceinline__ uint32_t nibbles_to_s8(uint32_t v16, uint32_t tlo, uint32_t thi) {
  const uint32_t mag = __byte_perm(tlo, thi, v16 & 0x7777u);
  const uint32_t neg_mask = __byte_perm(0x0000FF00u, 0u, (v16 >> 3) & 0x1111u);
  const uint32_t neg = __vsub4(0u, mag);
  return (mag & ~neg_mask) | (neg & neg_mask);
}

// (lo, hi) -> bf16x2 bits, round to nearest even; the relu form clamps negatives (and -0) to +0 first.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ uint32_t pack_bf16x2_relu(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.relu.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// bf16 score -> 16-bit key whose unsigned order is the float order; -0 == +0 (they tie in the reference's sort).
// Key 0 is never produced by a score (the lowest, -NaN, maps to 0x003F): it marks masked entries.
__device__ __forceinline__ uint16_t score_key(uint32_t bits16) {
  if (bits16 == 0x8000u) bits16 = 0;
  return static_cast<uint16_t>((bits16 & 0x8000u) ? (~bits16 & 0xFFFFu) : (bits16 | 0x8000u));
}

__device__ __forceinline__ float e2m1_value(uint32_t code) {
  const float v = 0.5f * static_cast<float>(__byte_perm(0x03020100u, 0x0C080604u, code & 7u) & 0xFFu);   // 2x table
  return (code & 8u) ? -v : v;
}

// Slow exact path for one key, warp-cooperative: decode, fp64 dots (exact products), then the reference's
// roundings. Used for keys outside the int8 fold and for sums the fp32 proof cannot certify.
__device__ float slow_key_score(const uint8_t* __restrict__ entry, const __nv_bfloat16* __restrict__ q_bf,
                                const float* __restrict__ w_s, float* __restrict__ kbuf, int heads, int lane) {
  {
    const uint32_t packed = entry[2 * lane] | (static_cast<uint32_t>(entry[2 * lane + 1]) << 8);
    const float s = ue8m0_value(entry[kIdxDim / 2 + lane / 8]);
#pragma unroll
    for (int i = 0; i < 4; ++i) kbuf[4 * lane + i] = __fmul_rn(e2m1_value((packed >> (4 * i)) & 0xFu), s);
  }
  __syncwarp();
  double total = 0.0;
  for (int h = lane; h < heads; h += kWarp) {
    double dot = 0.0;
    for (int i = 0; i < kIdxDim; ++i)
      dot = fma(static_cast<double>(__bfloat162float(q_bf[h * kIdxDim + i])), static_cast<double>(kbuf[i]), dot);
    const float r = bf16_round(fmaxf(bf16_round(static_cast<float>(dot)), 0.0f));
    total += static_cast<double>(bf16_round(__fmul_rn(r, w_s[h])));
  }
  total = warp_sum(total);
  __syncwarp();
  return bf16_round(static_cast<float>(total));
}

// ------------------------------------------------------------------------------------------- score kernel
template <int NT>
__global__ void __launch_bounds__(kIdxThreads) indexer_score_mxfp4_kernel(const IndexerParams p) {
  constexpr int H = NT * 8;
  __shared__ __align__(16) int8_t q_i8[H][kIdxDim];
  __shared__ __align__(16) __nv_bfloat16 q_bf[H][kIdxDim];
  __shared__ float w_s[H], qs_s[H], nqc_s[H];
  __shared__ int blk_exp[H][kIdxBlocks];
  __shared__ float kbuf[kIdxWarps][kIdxDim];
  __shared__ int q_slow;

  const int t = blockIdx.y, tid = threadIdx.x, warp = tid / kWarp, lane = tid % kWarp;
  const int64_t vq = (p.positions[t] + 1) / p.ratio;   // visible entries of this token
  const int64_t cta_k0 = static_cast<int64_t>(blockIdx.x) * kIdxWarps * kKeysPerWarpIter * p.iters;
  if (cta_k0 >= vq) return;
  const int64_t s = p.token_seq[t];

  // ---- q: stage, decompose every 32-block into int * 2^(E - 3), fold block exponents per head
  if (tid == 0) q_slow = 0;
  {
    const uint4* src = reinterpret_cast<const uint4*>(p.q + static_cast<int64_t>(t) * H * kIdxDim);
    uint4* dst = reinterpret_cast<uint4*>(&q_bf[0][0]);
    for (int i = tid; i < H * kIdxDim / 8; i += kIdxThreads) dst[i] = src[i];
    for (int h = tid; h < H; h += kIdxThreads) w_s[h] = __bfloat162float(p.w[static_cast<int64_t>(t) * H + h]);
  }
  __syncthreads();
  for (int pair = tid; pair < H * kIdxBlocks; pair += kIdxThreads) {
    const int h = pair / kIdxBlocks, b = pair % kIdxBlocks;
    const __nv_bfloat16* v = &q_bf[h][32 * b];
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = fmaxf(amax, fabsf(__bfloat162float(v[i])));
    int e = INT_MIN;   // zero block: its scale is irrelevant
    bool bad = false;
    if (amax > 0.0f) {
      const int field = (__float_as_uint(amax) >> 23) & 0xFF;
      bad = field == 0 || field == 0xFF;   // subnormal or non-finite: leave it to the fp64 path
      e = field - 127;
    }
    for (int i = 0; i < 32; ++i) {
      const float r = e == INT_MIN || bad ? 0.0f : ldexpf(__bfloat162float(v[i]), 3 - e);   // exact scaling
      bad |= r != rintf(r) || fabsf(r) > 15.0f;   // not on the (shifted) MXFP4 grid
      q_i8[h][32 * b + i] = static_cast<int8_t>(bad ? 0 : static_cast<int>(r));
    }
    blk_exp[h][b] = e;
    if (bad) q_slow = 1;
  }
  __syncthreads();
  for (int h = tid; h < H; h += kIdxThreads) {
    int emin = INT_MAX, emax = INT_MIN;
    for (int b = 0; b < kIdxBlocks; ++b) {
      if (blk_exp[h][b] == INT_MIN) continue;
      emin = min(emin, blk_exp[h][b]);
      emax = max(emax, blk_exp[h][b]);
    }
    float qs = 1.0f;
    if (emin != INT_MAX) {
      if (emax - emin > 3 || emin - 3 < -100 || emin - 3 > 100) q_slow = 1;   // outside the exact int8 fold
      qs = ldexpf(1.0f, emin - 3);
    }
    qs_s[h] = qs;
    nqc_s[h] = -12582912.0f * qs;
    for (int b = 0; b < kIdxBlocks; ++b) blk_exp[h][b] = blk_exp[h][b] == INT_MIN ? 0 : blk_exp[h][b] - emin;
  }
  __syncthreads();
  for (int i = tid; i < H * kIdxDim; i += kIdxThreads) {
    const int h = i / kIdxDim, b = (i % kIdxDim) / 32;
    const int shift = min(blk_exp[h][b], 3);
    q_i8[h][i % kIdxDim] = static_cast<int8_t>(static_cast<int>(q_i8[h][i % kIdxDim]) * (1 << shift));
  }
  __syncthreads();
  const bool query_slow = q_slow != 0;

  // ---- B fragments (q) for all heads, kept in registers for the whole key loop
  const int g = lane / 4, tq = lane % 4;
  uint32_t bq[NT][4][2];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int st = 0; st < 4; ++st) {
      bq[nt][st][0] = *reinterpret_cast<const uint32_t*>(&q_i8[nt * 8 + g][32 * tq + 8 * st]);
      bq[nt][st][1] = *reinterpret_cast<const uint32_t*>(&q_i8[nt * 8 + g][32 * tq + 8 * st + 4]);
    }

  uint16_t* key_row = p.keys + static_cast<int64_t>(t) * p.row_stride;
  const int64_t warp_k0 = cta_k0 + static_cast<int64_t>(warp) * kKeysPerWarpIter * p.iters;
  for (int mt = 0; mt < 4 * p.iters; ++mt) {
    const int64_t kb = warp_k0 + 16 * mt;
    if (kb >= vq) break;
    const int64_t logical = kb / p.epb;   // the 16 keys share a block (epb % 16 == 0)
    const int64_t blk = logical < p.max_blocks ? p.block_table[s * p.max_blocks + logical] : -1;
    const bool blk_ok = blk >= 0 && blk < p.num_blocks;
    // ---- load block tq of keys g and g + 8
    uint32_t words[2][4], scw[2];
    bool in_range[2];
#pragma unroll
    for (int hk = 0; hk < 2; ++hk) {
      const int64_t key = kb + g + 8 * hk;
      in_range[hk] = key < vq;
      const bool ok = in_range[hk] && blk_ok;
      const uint8_t* e = p.pool + (blk * p.epb + key % p.epb) * kKeyBytes;
#pragma unroll
      for (int i = 0; i < 4; ++i) words[hk][i] = ok ? *reinterpret_cast<const uint32_t*>(e + 16 * tq + 4 * i) : 0u;
      scw[hk] = ok ? *reinterpret_cast<const uint32_t*>(e + kIdxDim / 2) : 0x7F7F7F7Fu;
    }
    // ---- per key: nonzero blocks (shared across the quad), smallest exponent, shifts, scale
    uint32_t nzq = 0;
#pragma unroll
    for (int hk = 0; hk < 2; ++hk) {
      const bool nz = ((words[hk][0] | words[hk][1] | words[hk][2] | words[hk][3]) & 0x77777777u) != 0u;
      nzq |= (nz ? 1u : 0u) << (tq + 4 * hk);
    }
    nzq |= __shfl_xor_sync(0xffffffffu, nzq, 1);
    nzq |= __shfl_xor_sync(0xffffffffu, nzq, 2);
    uint32_t a[4][4];
    float kscale[2];
    bool wide[2];
#pragma unroll
    for (int hk = 0; hk < 2; ++hk) {
      const uint32_t nzm = (nzq >> (4 * hk)) & 0xFu;
      int emin = 255, emax = 0;
#pragma unroll
      for (int b = 0; b < kIdxBlocks; ++b) {
        const int code = (scw[hk] >> (8 * b)) & 0xFF;
        if (nzm >> b & 1u) {
          emin = min(emin, code);
          emax = max(emax, code);
        }
      }
      if (nzm == 0u) emin = emax = 128;
      wide[hk] = emax - emin > 3;
      kscale[hk] = ldexpf(1.0f, emin - 128);
      const int my_code = (scw[hk] >> (8 * tq)) & 0xFF;
      const int shift = (nzm >> tq & 1u) ? min(my_code - emin, 3) : 0;
      const uint32_t tlo = 0x03020100u << shift, thi = 0x0C080604u << shift;
#pragma unroll
      for (int st = 0; st < 4; ++st) {
        a[st][hk] = nibbles_to_s8(words[hk][st] & 0xFFFFu, tlo, thi);        // elements 8st..8st+3
        a[st][2 + hk] = nibbles_to_s8(words[hk][st] >> 16, tlo, thi);        // elements 8st+4..8st+7
      }
    }
    // ---- int8 tensor-core dots: 16 keys x H heads x 128
    int acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
#pragma unroll
    for (int st = 0; st < 4; ++st)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_s8(acc[nt], a[st], bq[nt][st][0], bq[nt][st][1]);
    // ---- epilogue: the reference's roundings; head sum in fp64 on values pre-scaled by 2^-896 (built from the
    //      bf16 bits with integer ops instead of conversions; exact for bf16 subnormals too)
    double hsum[2] = {0.0, 0.0};
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int h0 = nt * 8 + 2 * tq;
      const float qs0 = qs_s[h0], qs1 = qs_s[h0 + 1], nq0 = nqc_s[h0], nq1 = nqc_s[h0 + 1];
      const float w0 = w_s[h0], w1 = w_s[h0 + 1];
#pragma unroll
      for (int hk = 0; hk < 2; ++hk) {
        const float f0 = __fmul_rn(fmaf(__int_as_float(acc[nt][2 * hk] + 0x4B400000), qs0, nq0), kscale[hk]);
        const float f1 = __fmul_rn(fmaf(__int_as_float(acc[nt][2 * hk + 1] + 0x4B400000), qs1, nq1), kscale[hk]);
        const uint32_t d2 = pack_bf16x2_relu(f0, f1);                    // bf16(dot), ReLU
        const uint32_t t2 = pack_bf16x2(__fmul_rn(bf16_bits_to_float(d2 & 0xFFFFu), w0),
                                        __fmul_rn(__uint_as_float(d2 & 0xFFFF0000u), w1));   // bf16(relu * w)
        hsum[hk] += __hiloint2double(static_cast<int>(((t2 & 0x7FFFu) << 13) | ((t2 & 0x8000u) << 16)), 0);
        hsum[hk] += __hiloint2double(static_cast<int>(((t2 >> 3) & 0x0FFFE000u) | (t2 & 0x80000000u)), 0);
      }
    }
#pragma unroll
    for (int hk = 0; hk < 2; ++hk) {
      hsum[hk] += __shfl_xor_sync(0xffffffffu, hsum[hk], 1);
      hsum[hk] += __shfl_xor_sync(0xffffffffu, hsum[hk], 2);
    }
    // ---- write; keys outside the int8 fold (or a query outside it) go to the per-key fp64 path
    bool my_slow = false;
#pragma unroll
    for (int hk = 0; hk < 2; ++hk) {
      const int64_t key = kb + g + 8 * hk;
      const bool slow = in_range[hk] && blk_ok && (query_slow || wide[hk]);
      if (tq == hk && in_range[hk]) {
        if (!blk_ok) key_row[key] = 0;
        else if (!slow) key_row[key] = score_key(bf16_bits(static_cast<float>(hsum[hk] * 0x1p896)));
        my_slow = slow;
      }
    }
    uint32_t slow_lanes = __ballot_sync(0xffffffffu, my_slow);
    while (slow_lanes) {
      const int l = __ffs(slow_lanes) - 1;
      slow_lanes &= slow_lanes - 1;
      const int64_t key = kb + l / 4 + 8 * (l % 4);
      const uint8_t* e = p.pool + (blk * p.epb + key % p.epb) * kKeyBytes;
      const float score = slow_key_score(e, &q_bf[0][0], w_s, kbuf[warp], H, lane);
      if (lane == 0) key_row[key] = score_key(bf16_bits(score));
    }
  }
}

// ------------------------------------------------------------------------------------------- select kernel
// Radix select on the 16-bit keys: a 4096-bin histogram of the high 12 bits (bf16 scores cluster in a few
// binades, so 8-bit bins would funnel most keys through a handful of shared-memory atomics), then 16 bins of the
// low 4 bits inside the threshold bin.
constexpr int kHiBins = 4096;
constexpr int kLoBins = 16;

// Block-wide: the bin holding the need-th largest key among hist[0..4096) (counts above it < need <= counts above
// + its count); thread i scans bins 4095 - 8i - j. Writes (bin, keys above it).
template <typename Scan>
__device__ __forceinline__ void find_hi_bin(const uint32_t* hist, uint32_t need, typename Scan::TempStorage& tmp,
                                            int* bin_out, uint32_t* above_out) {
  constexpr int kPer = kHiBins / kSelectThreads;
  uint32_t local[kPer], sum = 0;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    local[j] = hist[kHiBins - 1 - kPer * threadIdx.x - j];
    sum += local[j];
  }
  uint32_t before, total;
  Scan(tmp).ExclusiveSum(sum, before, total);
  if (before < need && need <= before + sum) {
    uint32_t acc = before;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (acc + local[j] >= need) {
        *bin_out = kHiBins - 1 - kPer * threadIdx.x - j;
        *above_out = acc;
        break;
      }
      acc += local[j];
    }
  }
}

__global__ void __launch_bounds__(kSelectThreads) indexer_select_kernel(const uint16_t* __restrict__ keys,
                                                                        const int64_t* __restrict__ positions,
                                                                        int64_t* __restrict__ out, int row_stride,
                                                                        int64_t max_entries, int ratio, int topk) {
  using Scan = cub::BlockScan<uint32_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ uint32_t hist[kHiBins];
  __shared__ unsigned long long cand[kMaxTopkSel];
  __shared__ uint32_t cand_count, total_valid, above1, above2;
  __shared__ int bin1, bin2;
  const int t = blockIdx.x, tid = threadIdx.x, lane = tid % kWarp;
  const int64_t visible = (positions[t] + 1) / ratio;
  const int64_t n = visible < max_entries ? visible : max_entries;   // entries past the block table: masked
  const uint16_t* row = keys + static_cast<int64_t>(t) * row_stride;
  constexpr int kPer = 8;   // keys per thread per step (one 16-byte load)
  constexpr int kStep = kSelectThreads * kPer;

  auto load8 = [&](int64_t i0, uint16_t (&k8)[kPer]) {
    if (i0 + kPer <= n) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + i0);
      const uint32_t w4[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int j = 0; j < kPer; ++j) k8[j] = static_cast<uint16_t>(w4[j / 2] >> (16 * (j % 2)));
    } else {
#pragma unroll
      for (int j = 0; j < kPer; ++j) k8[j] = i0 + j < n ? row[i0 + j] : 0;
    }
  };

  // ---- pass 1: histogram of the high 12 bits of valid (nonzero) keys
  for (int i = tid; i < kHiBins; i += kSelectThreads) hist[i] = 0;
  if (tid == 0) { cand_count = 0; bin1 = -1; bin2 = -1; above1 = above2 = 0; }
  __syncthreads();
  uint32_t my_valid = 0;
  for (int64_t i0 = static_cast<int64_t>(tid) * kPer; i0 < n; i0 += kStep) {
    uint16_t k8[kPer];
    load8(i0, k8);
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (k8[j] != 0) {
        atomicAdd(&hist[k8[j] >> 4], 1u);
        ++my_valid;
      }
    }
  }
  uint32_t ignore;
  Scan(scan_tmp).ExclusiveSum(my_valid, ignore, my_valid);   // my_valid := block total
  if (tid == 0) total_valid = my_valid;
  __syncthreads();
  const bool take_all = total_valid <= static_cast<uint32_t>(topk);
  uint32_t thr = 1, need_eq = 0;   // take_all: every key >= 1
  if (!take_all) {
    find_hi_bin<Scan>(hist, topk, scan_tmp, &bin1, &above1);
    __syncthreads();
    // ---- pass 2: the low 4 bits inside the threshold bin
    if (tid < kLoBins) hist[tid] = 0;
    __syncthreads();
    for (int64_t i0 = static_cast<int64_t>(tid) * kPer; i0 < n; i0 += kStep) {
      uint16_t k8[kPer];
      load8(i0, k8);
#pragma unroll
      for (int j = 0; j < kPer; ++j)
        if (k8[j] != 0 && (k8[j] >> 4) == bin1) atomicAdd(&hist[k8[j] & 0xF], 1u);
    }
    __syncthreads();
    if (tid < kWarp) {   // warp 0: 16 bins, highest first
      const uint32_t need = topk - above1;
      const uint32_t cnt = lane < kLoBins ? hist[kLoBins - 1 - lane] : 0u;
      uint32_t incl = cnt;
#pragma unroll
      for (int o = 1; o < kWarp; o <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      if (lane < kLoBins && incl - cnt < need && need <= incl) {
        bin2 = kLoBins - 1 - lane;
        above2 = incl - cnt;
      }
    }
    __syncthreads();
    thr = (static_cast<uint32_t>(bin1) << 4) | static_cast<uint32_t>(bin2);
    need_eq = topk - above1 - above2;
  }
  const uint32_t k_eff = take_all ? total_valid : static_cast<uint32_t>(topk);

  // ---- pass 3: keys above the threshold, plus the first need_eq keys equal to it in index order
  uint32_t eq_base = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kStep) {
    const int64_t i0 = c0 + static_cast<int64_t>(tid) * kPer;
    uint16_t k8[kPer];
    load8(i0, k8);
    uint32_t my_eq = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) my_eq += (!take_all && k8[j] == thr) ? 1u : 0u;
    uint32_t rank, chunk_eq;
    Scan(scan_tmp).ExclusiveSum(my_eq, rank, chunk_eq);
    rank += eq_base;
    uint32_t take_mask = 0;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const uint32_t kv = k8[j];
      bool take = false;
      if (take_all) {
        take = kv != 0;
      } else if (kv > thr) {
        take = true;
      } else if (kv == thr) {
        take = rank < need_eq;
        ++rank;
      }
      take_mask |= (take ? 1u : 0u) << j;
    }
    // one shared-memory atomic per warp: lanes' slots by a warp prefix of their counts
    const uint32_t my_take = __popc(take_mask);
    uint32_t incl = my_take;
#pragma unroll
    for (int o = 1; o < kWarp; o <<= 1) {
      const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    uint32_t base = 0;
    if (lane == kWarp - 1 && incl) base = atomicAdd(&cand_count, incl);
    base = __shfl_sync(0xffffffffu, base, kWarp - 1) + incl - my_take;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      if (take_mask >> j & 1u) {
        const uint32_t idx = static_cast<uint32_t>(i0 + j);
        cand[base++] = (static_cast<unsigned long long>(k8[j]) << 32) | (0xFFFFFFFFu - idx);
      }
    }
    eq_base += chunk_eq;
    __syncthreads();
  }
  // ---- sort descending by (key, lower index first); pad to a power of two with 0 (sorts last)
  uint32_t size = 1;
  while (size < k_eff) size <<= 1;
  for (uint32_t i = k_eff + tid; i < size; i += kSelectThreads) cand[i] = 0ull;
  __syncthreads();
  bitonic_sort_desc<kSelectThreads>(cand, size, tid);
  for (int r = tid; r < topk; r += kSelectThreads) {
    out[static_cast<int64_t>(t) * topk + r] =
        static_cast<uint32_t>(r) < k_eff ? static_cast<int64_t>(0xFFFFFFFFu - static_cast<uint32_t>(cand[r])) : -1;
  }
}

// ------------------------------------------------------------------------------------------- cluster select
// One token's row over a cluster of kSelCluster CTAs: CTA r scans only segment r (a multiple of 8 entries, so the
// 16-byte loads stay aligned), 4096 keys per step, so at 32K entries each pass is one load per thread. Peers'
// shared memory is only pushed into (stores, adds), never read; each exchange is followed by one cluster barrier
// (arrive releases the pushes, wait acquires them), the first one split around pass 1 so that its latency hides
// behind the loads. Nothing is pushed after the last barrier, so a CTA may exit once its own writes are done.
//   pass 1: local 4096-bin histogram of key >> 4; its nonzero bins (bf16 scores fill a few binades, so a segment
//           touches ~100 bins) are added into EVERY CTA's merged copy, with the segment's valid count, so that each
//           CTA finds the threshold bin itself (find_hi_bin) instead of waiting on a leader's broadcast.
//   pass 2: per segment, the 16 low-bit counts inside that bin and the count of keys above it, pushed to every
//           CTA: each then knows the threshold key, need_eq, and every segment's counts above / equal to it, so
//           pass 3 needs no further count exchange.
//   pass 3: ordered compaction (one block scan per step): the keys above the threshold take consecutive slots in
//           entry order across the cluster and go, packed, to every CTA; the first need_eq keys equal to it go
//           straight to out[num_gt + their rank among the equal keys] (they follow every key above it).
//   rank:   CTA r takes slots [r * m, (r + 1) * m), m = ceil(num_gt / 8), and writes each slot's entry to
//           out[number of packed keys greater than its own]. Slots are in entry order, so (key << 10 | 1023 - slot)
//           orders as (key desc, entry asc), distinct and in 32 bits: ranks by counting, no sort.
constexpr int kSelCluster = 8;                           // portable cluster size
constexpr int kSelChunk = kSelectThreads * 8;            // keys per CTA step: one 16-byte load per thread
constexpr int kRankSlots = kMaxTopkSel / kSelCluster;    // slots one CTA ranks, at most
constexpr int kLoExch = kLoBins + 1;                     // pushed per segment: 16 low-bit counts, keys above bin1
static_assert(kHiBins == 8 * kSelectThreads, "pass-1 push: 8 bins per thread");
static_assert(kRankSlots <= 4 * kWarp, "ranking: at most 4 blocks of 32 slots");

// The address of shared variable `p` in CTA `rank` of this cluster; stores and adds through it.
__device__ __forceinline__ uint32_t dsmem_addr(const void* p, uint32_t rank) {
  uint32_t a;
  asm("mapa.shared::cluster.u32 %0, %1, %2;"
      : "=r"(a)
      : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(p))), "r"(rank));
  return a;
}
__device__ __forceinline__ void dsmem_store(uint32_t addr, uint32_t v) {
  asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
__device__ __forceinline__ void dsmem_add(uint32_t addr, uint32_t v) {
  asm volatile("red.shared::cluster.add.u32 [%0], %1;" ::"r"(addr), "r"(v) : "memory");
}
// barrier.cluster halves with their default semantics: arrive releases this thread's writes, wait acquires all.
__device__ __forceinline__ void select_cluster_arrive() {
  asm volatile("barrier.cluster.arrive.aligned;" ::: "memory");
}
__device__ __forceinline__ void select_cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }
__device__ __forceinline__ void select_cluster_sync() {
  select_cluster_arrive();
  select_cluster_wait();
}

// Key j of 8 held as 4 words, low half first.
__device__ __forceinline__ uint32_t key_of(const uint32_t (&w)[4], int j) {
  return (w[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
}

__global__ void __launch_bounds__(kSelectThreads)
    indexer_select_cluster_kernel(const uint16_t* __restrict__ keys, const int64_t* __restrict__ positions,
                                  int64_t* __restrict__ out, int row_stride, int64_t max_entries, int ratio, int topk) {
  using Scan = cub::BlockScan<uint32_t, kSelectThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ __align__(16) uint32_t hist[kHiBins];       // this segment
  __shared__ uint32_t merged[kHiBins];                   // the whole row: every CTA adds its bins in
  __shared__ __align__(16) uint32_t cand[kMaxTopkSel];   // packed keys above the threshold by slot (pushed); 0 past
  __shared__ uint32_t cand_idx[kRankSlots];              // entry index of each slot this CTA ranks (pushed)
  __shared__ uint32_t rank_acc[kRankSlots];
  __shared__ uint32_t seg_valid[kSelCluster];            // valid keys per segment (pushed)
  __shared__ uint32_t lo_exch[kSelCluster][kLoExch];     // per segment: low-bit counts in bin1, keys above it (pushed)
  __shared__ uint32_t lo_hist[kLoBins], my_valid, my_above, above1;
  __shared__ uint32_t sh_thr, sh_need_eq, sh_num_gt, sh_gt_before, sh_eq_before;
  __shared__ int bin1;
  const uint32_t rank = blockIdx.x;   // grid.x is the cluster
  const int t = blockIdx.y, tid = threadIdx.x, lane = tid % kWarp, warp = tid / kWarp;
  const int64_t visible = (positions[t] + 1) / ratio;
  const int64_t n = visible < max_entries ? visible : max_entries;   // entries past the block table: masked
  const int64_t seg_len = (n + 8 * kSelCluster - 1) / (8 * kSelCluster) * 8;
  const int64_t seg0 = rank * seg_len < n ? rank * seg_len : n;
  const int64_t seg1 = seg0 + seg_len < n ? seg0 + seg_len : n;
  const uint16_t* row = keys + static_cast<int64_t>(t) * row_stride;
  int64_t* out_row = out + static_cast<int64_t>(t) * topk;

  // 8 keys from i0 as 4 words (low half first), zeros at and past the segment end
  auto load8 = [&](int64_t i0, uint32_t (&w)[4]) {
    if (i0 + 8 <= seg1) {
      const uint4 v = *reinterpret_cast<const uint4*>(row + i0);
      w[0] = v.x;
      w[1] = v.y;
      w[2] = v.z;
      w[3] = v.w;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t lo = i0 + 2 * j < seg1 ? row[i0 + 2 * j] : 0u;
        const uint32_t hi = i0 + 2 * j + 1 < seg1 ? row[i0 + 2 * j + 1] : 0u;
        w[j] = lo | (hi << 16);
      }
    }
  };

  for (int i = tid; i < kHiBins; i += kSelectThreads) hist[i] = merged[i] = 0;
  for (int i = tid; i < kMaxTopkSel; i += kSelectThreads) cand[i] = 0;   // never greater than a chosen key
  if (tid < kRankSlots) rank_acc[tid] = 0;
  if (tid < kLoBins) lo_hist[tid] = 0;
  if (tid == 0) my_valid = my_above = 0;
  select_cluster_arrive();   // peers push into this CTA only after every CTA has zeroed (and started)
  __syncthreads();

  // ---- pass 1: histogram of the high 12 bits of this segment's valid keys; the first step stays in registers
  uint32_t first[4] = {0u, 0u, 0u, 0u};
  uint32_t valid = 0;
  for (int64_t c0 = seg0; c0 < seg1; c0 += kSelChunk) {
    uint32_t w[4];
    load8(c0 + tid * 8, w);
    if (c0 == seg0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) first[j] = w[j];
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t k = key_of(w, j);
      if (k != 0) {
        atomicAdd(&hist[k >> 4], 1u);
        ++valid;
      }
    }
  }
  valid = __reduce_add_sync(0xffffffffu, valid);
  if (lane == 0 && valid) atomicAdd(&my_valid, valid);
  __syncthreads();
  select_cluster_wait();
  {
    const uint4 a = reinterpret_cast<const uint4*>(hist)[2 * tid];
    const uint4 b = reinterpret_cast<const uint4*>(hist)[2 * tid + 1];
    const uint32_t v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
    if ((a.x | a.y | a.z | a.w | b.x | b.y | b.z | b.w) != 0) {   // most threads' 8 bins are all empty
      for (uint32_t q = 0; q < kSelCluster; ++q) {   // peers in a rotated order: not all on CTA 0 at once
        const uint32_t dst = dsmem_addr(&merged[8 * tid], (rank + q) % kSelCluster);
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if (v[j] != 0) dsmem_add(dst + 4 * j, v[j]);
      }
    }
    if (tid < kSelCluster) dsmem_store(dsmem_addr(&seg_valid[rank], tid), my_valid);
  }
  select_cluster_sync();

  uint32_t total_valid = 0, valid_before = 0;
#pragma unroll
  for (int q = 0; q < kSelCluster; ++q) {
    total_valid += seg_valid[q];
    if (q < static_cast<int>(rank)) valid_before += seg_valid[q];
  }
  const bool take_all = total_valid <= static_cast<uint32_t>(topk);   // the same in every CTA
  // take_all: every valid key is "above" threshold 0, and none is taken as equal to it
  uint32_t thr = 0, need_eq = 0, num_gt = total_valid, gt_before = valid_before, eq_before = 0;
  if (!take_all) {
    find_hi_bin<Scan>(merged, topk, scan_tmp, &bin1, &above1);
    __syncthreads();
    const uint32_t b1 = static_cast<uint32_t>(bin1);
    // ---- pass 2: the low 4 bits inside bin1, and the keys above it, in this segment
    uint32_t above = 0;
    for (int64_t c0 = seg0; c0 < seg1; c0 += kSelChunk) {
      uint32_t w[4];
      if (c0 == seg0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) w[j] = first[j];
      } else {
        load8(c0 + tid * 8, w);
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const uint32_t k = key_of(w, j);
        if ((k >> 4) > b1) ++above;
        else if (k != 0 && (k >> 4) == b1) atomicAdd(&lo_hist[k & 0xFu], 1u);
      }
    }
    above = __reduce_add_sync(0xffffffffu, above);
    if (lane == 0 && above) atomicAdd(&my_above, above);
    __syncthreads();
    if (tid < kSelCluster * kLoExch) {
      const int q = tid / kLoExch, j = tid % kLoExch;
      dsmem_store(dsmem_addr(&lo_exch[rank][j], q), j < kLoBins ? lo_hist[j] : my_above);
    }
    select_cluster_sync();
    if (warp == 0) {   // the 16 merged low bins, highest first; then each segment's counts above / at the threshold
      const uint32_t need = topk - above1;
      uint32_t cnt = 0;
      if (lane < kLoBins) {
#pragma unroll
        for (int q = 0; q < kSelCluster; ++q) cnt += lo_exch[q][kLoBins - 1 - lane];
      }
      uint32_t incl = cnt;
#pragma unroll
      for (int o = 1; o < kWarp; o <<= 1) {
        const uint32_t v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      const uint32_t hit = __ballot_sync(0xffffffffu, lane < kLoBins && incl - cnt < need && need <= incl);
      const int src = __ffs(hit) - 1;
      const uint32_t above2 = __shfl_sync(0xffffffffu, incl - cnt, src);
      const int b2 = kLoBins - 1 - src;
      uint32_t gt = 0, eq = 0;
      if (lane < kSelCluster) {
        gt = lo_exch[lane][kLoBins];
        for (int b = b2 + 1; b < kLoBins; ++b) gt += lo_exch[lane][b];
        eq = lo_exch[lane][b2];
      }
      const bool before = lane < static_cast<int>(rank);
      const uint32_t gt_b = __reduce_add_sync(0xffffffffu, before ? gt : 0u);
      const uint32_t eq_b = __reduce_add_sync(0xffffffffu, before ? eq : 0u);
      if (lane == 0) {
        sh_thr = (b1 << 4) | static_cast<uint32_t>(b2);
        sh_need_eq = need - above2;
        sh_num_gt = above1 + above2;
        sh_gt_before = gt_b;
        sh_eq_before = eq_b;
      }
    }
    __syncthreads();
    thr = sh_thr;
    need_eq = sh_need_eq;
    num_gt = sh_num_gt;
    gt_before = sh_gt_before;
    eq_before = sh_eq_before;
  }
  const uint32_t k_eff = take_all ? total_valid : static_cast<uint32_t>(topk);
  for (int i = static_cast<int>(k_eff + rank * kSelectThreads) + tid; i < topk; i += kSelCluster * kSelectThreads)
    out_row[i] = -1;

  // ---- pass 3: keys above thr to their slots in every CTA, the first need_eq keys equal to it to out
  const uint32_t slots_per_cta = (num_gt + kSelCluster - 1) / kSelCluster;
  uint32_t gt_run = gt_before, eq_run = eq_before;
  for (int64_t c0 = seg0; c0 < seg1; c0 += kSelChunk) {
    const int64_t i0 = c0 + tid * 8;
    uint32_t w[4];
    if (c0 == seg0) {
#pragma unroll
      for (int j = 0; j < 4; ++j) w[j] = first[j];
    } else {
      load8(i0, w);
    }
    uint32_t counts = 0;   // (above << 16) | equal; a step's totals are <= 4096
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t k = key_of(w, j);
      counts += k > thr ? 1u << 16 : (k == thr ? 1u : 0u);
    }
    uint32_t before, total;
    Scan(scan_tmp).ExclusiveSum(counts, before, total);
    uint32_t slot = gt_run + (before >> 16), eq_rank = eq_run + (before & 0xFFFFu);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const uint32_t k = key_of(w, j), idx = static_cast<uint32_t>(i0 + j);
      if (k > thr) {
        const uint32_t packed = (k << 10) | (kMaxTopkSel - 1 - slot);
        for (uint32_t q = 0; q < kSelCluster; ++q)
          dsmem_store(dsmem_addr(&cand[slot], (rank + q) % kSelCluster), packed);
        const uint32_t owner = slot / slots_per_cta;
        dsmem_store(dsmem_addr(&cand_idx[slot - owner * slots_per_cta], owner), idx);
        ++slot;
      } else if (k == thr) {
        if (eq_rank < need_eq) out_row[num_gt + eq_rank] = idx;
        ++eq_rank;
      }
    }
    gt_run += total >> 16;
    eq_run += total & 0xFFFFu;
    __syncthreads();   // scan_tmp is reused by the next step
  }
  select_cluster_sync();   // every CTA holds every slot

  // ---- rank this CTA's m slots: lane l of warp w counts the slots greater than slot 32 * (w % blocks) + l in
  //      share w / blocks of all slots (16 / blocks shares); the shares add up in rank_acc
  const uint32_t r0 = rank * slots_per_cta;
  const uint32_t m = num_gt > r0 ? min(slots_per_cta, num_gt - r0) : 0u;
  const uint32_t blocks = m > 2 * kWarp ? 4u : (m > kWarp ? 2u : 1u);
  const uint32_t item = (warp % blocks) * kWarp + lane;
  if (item < m) {
    const uint32_t mine = cand[r0 + item];
    const uint32_t slices = kSelectThreads / kWarp / blocks, units = (num_gt + 3) / 4;
    const uint32_t per_slice = (units + slices - 1) / slices, u0 = (warp / blocks) * per_slice;
    const uint32_t u1 = min(units, u0 + per_slice);
    uint32_t greater = 0;
    for (uint32_t u = u0; u < u1; ++u) {   // the whole warp reads the same 16 bytes: a broadcast
      const uint4 x = reinterpret_cast<const uint4*>(cand)[u];
      greater += (x.x > mine ? 1u : 0u) + (x.y > mine ? 1u : 0u) + (x.z > mine ? 1u : 0u) + (x.w > mine ? 1u : 0u);
    }
    if (greater != 0) atomicAdd(&rank_acc[item], greater);
  }
  __syncthreads();
  if (static_cast<uint32_t>(tid) < m) out_row[rank_acc[tid]] = cand_idx[tid];
}

// ------------------------------------------------------------------------------------------- host
at::Tensor indexer_topk(const at::Tensor& q, const at::Tensor& weights, const at::Tensor& pool,
                        const at::Tensor& positions, const at::Tensor& token_seq, const at::Tensor& block_table,
                        int64_t block_size, int64_t ratio, int64_t topk) {
  for (const at::Tensor* x : TensorList{&q, &weights, &pool, &positions, &token_seq, &block_table}) check_cuda(*x, "indexer tensor");
  check_dtype(q, at::kBFloat16, "q");
  check_dtype(weights, at::kBFloat16, "weights");
  check_dtype(pool, at::kByte, "pool");
  for (const at::Tensor* x : TensorList{&positions, &token_seq, &block_table}) check_dtype(*x, at::kLong, "layout tensor");
  check_dim(q, 3, "q");
  check_dim(pool, 3, "pool");
  check_dim(block_table, 2, "block_table");
  const int64_t num_tokens = q.size(0), heads = q.size(1);
  TORCH_CHECK(q.size(2) == kIdxDim, "index_head_dim must be ", kIdxDim, ", got ", q.size(2));
  TORCH_CHECK(heads == 16 || heads == 32 || heads == 64, "index heads must be 16, 32 or 64, got ", heads);
  TORCH_CHECK(weights.dim() == 2 && weights.size(0) == num_tokens && weights.size(1) == heads, "weights must be [T, H]");
  TORCH_CHECK(pool.size(2) == kKeyBytes, "indexer keys must be ", kKeyBytes, " bytes");
  TORCH_CHECK(ratio > 0 && block_size % ratio == 0 && pool.size(1) == block_size / ratio, "pool geometry");
  TORCH_CHECK(pool.size(1) % 16 == 0, "entries per block must be a multiple of 16, got ", pool.size(1));
  TORCH_CHECK(topk >= 1 && topk <= kMaxTopkSel, "topk must be in [1, ", kMaxTopkSel, "], got ", topk);
  TORCH_CHECK(positions.numel() == num_tokens && token_seq.numel() == num_tokens, "layout/q token mismatch");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({num_tokens, topk}, positions.options());
  if (num_tokens == 0) return out;
  const int64_t max_entries = block_table.size(1) * pool.size(1);
  const int64_t row_stride = std::max<int64_t>((max_entries + 7) / 8 * 8, 8);
  auto keys = at::empty({num_tokens, row_stride}, positions.options().dtype(at::kShort));
  const int64_t sm_count = num_sms();
  const int64_t per_cta = kIdxWarps * kKeysPerWarpIter;
  const int64_t ctas1 = (max_entries + per_cta - 1) / per_cta * num_tokens;
  const int iters = static_cast<int>(std::clamp<int64_t>(ctas1 / (4 * sm_count), 1, 8));   // amortize the q prep
  IndexerParams p{};
  p.q = reinterpret_cast<const __nv_bfloat16*>(q.data_ptr());
  p.w = reinterpret_cast<const __nv_bfloat16*>(weights.data_ptr());
  p.pool = pool.data_ptr<uint8_t>();
  p.positions = positions.data_ptr<int64_t>();
  p.token_seq = token_seq.data_ptr<int64_t>();
  p.block_table = block_table.data_ptr<int64_t>();
  p.keys = reinterpret_cast<uint16_t*>(keys.data_ptr());
  p.heads = static_cast<int>(heads);
  p.ratio = static_cast<int>(ratio);
  p.epb = static_cast<int>(pool.size(1));
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.num_blocks = static_cast<int>(pool.size(0));
  p.row_stride = static_cast<int>(row_stride);
  p.iters = iters;
  auto stream = current_stream();
  const dim3 grid1((max_entries + per_cta * iters - 1) / (per_cta * iters), num_tokens);
  if (max_entries > 0) {
    if (heads == 64) indexer_score_mxfp4_kernel<8><<<grid1, kIdxThreads, 0, stream>>>(p);
    else if (heads == 32) indexer_score_mxfp4_kernel<4><<<grid1, kIdxThreads, 0, stream>>>(p);
    else indexer_score_mxfp4_kernel<2><<<grid1, kIdxThreads, 0, stream>>>(p);
    DSV4_LAUNCH_CHECK();
  }
  // Temporary A/B switch (removed after measurement): DSV4_INDEXER_SELECT=single picks the one-CTA select.
  // Small batches: a cluster per token (8x the CTAs on one row). Once the clusters would exceed one wave, the
  // one-CTA select is faster (B = 64: 334 vs 358 us on H100, B = 1: 43.2 vs 30.3 us).
  if (num_tokens * kSelCluster <= sm_count) {
    launch_clustered(indexer_select_cluster_kernel, dim3(kSelCluster, static_cast<unsigned>(num_tokens)),
                     dim3(kSelectThreads), kSelCluster, stream, p.keys, p.positions, out.data_ptr<int64_t>(),
                     static_cast<int>(row_stride), max_entries, static_cast<int>(ratio), static_cast<int>(topk));
  } else {
    indexer_select_kernel<<<num_tokens, kSelectThreads, 0, stream>>>(
        p.keys, p.positions, out.data_ptr<int64_t>(), static_cast<int>(row_stride), max_entries,
        static_cast<int>(ratio), static_cast<int>(topk));
    DSV4_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace dsv4
