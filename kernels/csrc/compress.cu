// Compressor flush (spec §3.4-3.5; reference: kernels/cache_ops.py pool_chunk + finish_entries + compress_flush).
//
//   compress_flush_kernel<M, OVERLAP, INDEX>
//     one thread-block cluster per work item, one CTA per 64-channel slab of the entry (cluster = d / 64 CTAs).
//     A work item is (sequence, i): item 0 pools the sequence's windows 0 and 1 (the only ones that can read the
//     compressor state) and then advances the state; item i >= 1 pools window i + 1 from this step's rows only.
//     Per window: gated softmax pooling over the slots (CSA: A-halves of window w-1 + B-halves of window w; HCA:
//     the window's 128 slots), bf16 round, RMSNorm (sum of squares reduced across the cluster through DSMEM),
//     RoPE at position w * ratio, then either the FP8 main entry (584 B) or, for the indexer, Hadamard (all d
//     channels exchanged through DSMEM) + MXFP4 key (68 B), stored into the paged pool.
//
// Races avoided: only item 0 of a sequence reads or writes that sequence's state, and each CTA touches only its
// own slab's columns (channel c of the pooled entry reads columns c and d + c of the state), so the state update
// needs no grid-wide ordering: a __syncthreads after the CTA's own reads suffices.
//
// Numerics (why fp64): the reference computes softmax and the weighted sum in float64 and rounds to fp32, then
// bf16. fp32 math here would move the pooled fp32 value by an ulp in ~1e-3 of channels, which flips a stored FP8
// byte once per few thousand entries. In fp64 the only differences left are the last bits of exp/sum order,
// which survive the fp32 and bf16 roundings with probability ~1e-12 per value. RMSNorm: sum of squares of bf16
// values in fp64 (exact), mean rounded to fp32, + eps in fp32, 1/sqrt in fp64 rounded to fp32, then the two fp32
// multiplies of the reference in their order. RoPE: fp32 angle, cos/sin in fp64 rounded to fp32, then fp32
// x*cos - y*sin with separate roundings (no FMA). Hadamard: exact fp64 sums, times the fp64 n^-0.5, to fp32, to bf16.
//
// Mask rule: an entry whose block is missing (-1, out of range, or past the block table) is not stored.
#include <cooperative_groups.h>

#include <cub/block/block_scan.cuh>

#include "common.cuh"
#include "ops.h"

namespace cg = cooperative_groups;

namespace dsv4 {

constexpr int kSlab = 64;         // channels per CTA; also the FP8 block
constexpr int kMaxSlabs = 8;      // d <= 512 (portable cluster size)
// Threads per channel ("slot groups"): CSA pools 8 slots, so one thread per channel (64-thread CTAs: a decode
// batch fits in one wave and no cross-group reduction is needed); HCA pools 128, split over 4 groups.
template <int M>
constexpr int kGroupsFor = M == 4 ? 1 : 4;

struct FlushParams {
  const float* a;            // [T, coff*d]
  const float* z;            // [T, coff*d], ape included
  float* state_kv;           // [num_slots, coff*m, coff*d]
  float* state_score;
  const int64_t* seq_slot;
  const int64_t* seq_start;
  const int64_t* seq_len;
  const int64_t* seq_first_row;
  const int64_t* block_table;  // [S, max_blocks]
  const void* norm_weight;     // [d] bf16 or fp32
  const float* inv_freq;       // [rope / 2]
  uint8_t* pool;               // [num_blocks, entries_per_block, width]
  int num_seqs, num_slots, max_blocks, num_blocks, entries_per_block, width;
  int d, nope, rope;
  bool weight_bf16;
  bool one_item_per_seq;       // T == S: every chunk is one decode token, so item i is sequence i (no scan)
  float eps;
  float inv_fp8_max, fp8_floor, inv_fp4_max, fp4_floor;
  double hadamard_scale;
};

struct Item {
  int seq, index;   // index < 0: no work
};

template <int M>
__device__ __forceinline__ int items_of(const FlushParams& p, int s) {
  const int64_t held = p.seq_start[s] % M;
  const int64_t nw = (held + p.seq_len[s]) / M;
  return nw > 2 ? static_cast<int>(nw - 1) : 1;
}

// Which (sequence, item) this cluster owns: an in-CTA exclusive scan of the per-sequence item counts.
template <int M>
__device__ Item find_item(const FlushParams& p, int item) {
  constexpr int kFlushThreads = kSlab * kGroupsFor<M>;
  using Scan = cub::BlockScan<int, kFlushThreads>;
  __shared__ typename Scan::TempStorage scan_tmp;
  __shared__ Item found;
  if (threadIdx.x == 0) found = Item{-1, -1};
  __syncthreads();
  int running = 0;
  for (int base = 0; base < p.num_seqs; base += kFlushThreads) {
    const int s = base + threadIdx.x;
    const int count = s < p.num_seqs ? items_of<M>(p, s) : 0;
    int prefix, total;
    Scan(scan_tmp).ExclusiveSum(count, prefix, total);
    prefix += running;
    if (s < p.num_seqs && item >= prefix && item < prefix + count) found = Item{s, item - prefix};
    running += total;
    __syncthreads();
  }
  return found;
}

// float(e / total) (torch softmax in fp64, then .float()), returned as the exact double of that float, from
// q = e * rinv (rinv = 1 / total correctly rounded): q is within a few fp64 ulps of the correctly rounded
// quotient, so both round to the same fp32 value unless q lies within 64 ulps of an fp32 rounding boundary (a
// midpoint: low 29 mantissa bits near 2^28) or below the fp32 normal range; there (~1e-7 of values) the real
// division decides. The fp32 rounding is done on the bits (add half, truncate): ties cannot reach it.
__device__ __forceinline__ double softmax_prob(double e, double rinv, double total) {
  const double q = e * rinv;
  const unsigned long long bits = static_cast<unsigned long long>(__double_as_longlong(q));
  const uint32_t low = static_cast<uint32_t>(bits) & 0x1FFFFFFFu;
  if (q == 0.0) return 0.0;
  if (!(q >= 0x1p-126) || low - (0x10000000u - 64u) <= 128u)
    return static_cast<double>(static_cast<float>(e / total));
  return __longlong_as_double(static_cast<long long>((bits + 0x10000000ull) & ~0x1FFFFFFFull));
}

// One channel's value combined over the kGroups threads that share it (group g contributes red[g][ch]); every
// group gets the result, combined in group order. Callers keep a barrier between this read and the next write
// of `red`. A no-op for one group.
template <int kGroups, typename T, typename Op>
__device__ __forceinline__ T combine_groups(T v, T (&red)[kGroups][kSlab], int grp, int ch, Op op) {
  if constexpr (kGroups > 1) {
    red[grp][ch] = v;
    __syncthreads();
    v = red[0][ch];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) v = op(v, red[g][ch]);
  }
  return v;
}
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ double operator()(double a, double b) const { return a + b; }
};

// RMSNorm's 1/rms as the reference rounds it: mean of squares to fp32, + eps in fp32, 1/sqrt in fp64 to fp32.
__device__ __forceinline__ float rms_rinv(double total_sq, int d, float eps) {
  const float mean = static_cast<float>(total_sq / static_cast<double>(d));
  return static_cast<float>(1.0 / sqrt(static_cast<double>(__fadd_rn(mean, eps))));
}

// RoPE on interleaved pairs: the partner channel c ^ 1 is the neighbouring lane (every lane must call), fp32
// products and sums rounded one by one (no FMA) as the reference's, then bf16.
__device__ __forceinline__ float rope_pair(float x, int c, float cs, float sn) {
  const float other = __shfl_xor_sync(0xffffffffu, x, 1);
  const float ev = (c % 2 == 0) ? x : other, od = (c % 2 == 0) ? other : x;
  return (c % 2 == 0) ? bf16_round(__fsub_rn(__fmul_rn(ev, cs), __fmul_rn(od, sn)))
                      : bf16_round(__fadd_rn(__fmul_rn(ev, sn), __fmul_rn(od, cs)));
}

// Group grp's share of Hadamard output channel c: sum_j (-1)^popcount(c & j) v_j over its 1/kGroups of the d
// inputs. Exact in fp64 (bf16 inputs), so any summation order gives the reference's value; four interleaved
// accumulators for ILP.
template <int kGroups, typename V>
__device__ __forceinline__ double hadamard_share(const V* vals, int d, int c, int grp) {
  double h4[4] = {0.0, 0.0, 0.0, 0.0};
  const int share = d / kGroups;
  for (int jj = grp * share; jj < (grp + 1) * share; jj += 4) {
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const double v = static_cast<double>(vals[jj + u]);
      h4[u] += (__popc(c & (jj + u)) & 1) ? -v : v;
    }
  }
  return (h4[0] + h4[1]) + (h4[2] + h4[3]);
}

// One channel's gated softmax pooling over this thread's kPer slots (kGroups threads share a channel and meet in
// red_sum): fp64 exp against the channel max, fp64 sum, probabilities rounded to fp32 as the reference's
// softmax(...).float(), exact products, fp64 sum. Returns this thread's partial of the pooled value.
template <int kPer, int kGroups>
__device__ __forceinline__ double softmax_pool(const float (&zs)[kPer], const float (&as)[kPer], float mx,
                                               double (&red_sum)[kGroups][kSlab], int grp, int ch) {
  const double mxd = static_cast<double>(mx);
  double e[kPer];
  double sum = 0.0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    e[q] = exp(static_cast<double>(zs[q]) - mxd);
    sum += e[q];
  }
  const double total = combine_groups<kGroups>(sum, red_sum, grp, ch, SumOp{});
  const double rinv = 1.0 / total;
  double acc = 0.0;
#pragma unroll
  for (int q = 0; q < kPer; ++q) acc = fma(static_cast<double>(as[q]), softmax_prob(e[q], rinv, total), acc);
  return acc;
}

// Row r of the sequence's "current" series: the state's current slots first (held of them), then this step's rows.
struct RowSource {
  const float* state_kv;     // this slot's state
  const float* state_score;
  int64_t first_row;
  int held, state_row0;      // state row of current-series row 0 (m for CSA, 0 for HCA)
  int row_width;             // coff * d
};

__device__ __forceinline__ void load_row_value(const FlushParams& p, const RowSource& rs, int r, int col,
                                               float& kv, float& score) {
  if (r < rs.held) {
    const int64_t off = static_cast<int64_t>(rs.state_row0 + r) * rs.row_width + col;
    kv = rs.state_kv[off];
    score = rs.state_score[off];
  } else {
    const int64_t off = (rs.first_row + r - rs.held) * rs.row_width + col;
    kv = p.a[off];
    score = p.z[off];
  }
}

template <int M, bool OVERLAP, bool INDEX>
__device__ void pool_window(const FlushParams& p, const RowSource& rs, int seq, int64_t window_abs, int j, int slab,
                            cg::cluster_group& cluster) {
  constexpr int kGroups = kGroupsFor<M>;
  constexpr int kFlushThreads = kSlab * kGroups;
  constexpr int kSlots = OVERLAP ? 2 * M : M;
  constexpr int kPerGroup = kSlots / kGroups;
  __shared__ float red_max[kGroups][kSlab];
  __shared__ double red_sum[kGroups][kSlab];
  __shared__ double red_acc[kGroups][kSlab];
  __shared__ float red_amax[2];
  __shared__ double norm_part[2];
  __shared__ double cluster_sq;             // this CTA's sum of squares, read by the cluster
  __shared__ float slab_vals[kSlab];        // this CTA's roped bf16 values, read by the cluster (indexer)
  __shared__ float full_vals[kMaxSlabs * kSlab];
  const int ch = threadIdx.x % kSlab, grp = threadIdx.x / kSlab;
  const int c = slab * kSlab + ch;
  const int d = p.d;
  // Loads that do not depend on the pooling, issued up front so their latency overlaps it.
  const float wgt = p.weight_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.norm_weight)[c])
                                  : reinterpret_cast<const float*>(p.norm_weight)[c];
  const float inv_f = c >= p.nope ? p.inv_freq[(c - p.nope) / 2] : 0.0f;
  const int64_t logical = window_abs / p.entries_per_block;
  const int64_t block = logical < p.max_blocks ? p.block_table[static_cast<int64_t>(seq) * p.max_blocks + logical] : -1;

  // ---- gated pooling: slot q of this group is q * kGroups + grp
  float zs[kPerGroup], as[kPerGroup];
#pragma unroll
  for (int q = 0; q < kPerGroup; ++q) {
    const int slot = q * kGroups + grp;
    if (OVERLAP && slot < M) {   // A-half of window j-1 (the state's previous window for j == 0)
      if (j == 0) {
        const int64_t off = static_cast<int64_t>(slot) * rs.row_width + c;
        as[q] = rs.state_kv[off];
        zs[q] = rs.state_score[off];
      } else {
        load_row_value(p, rs, (j - 1) * M + slot, c, as[q], zs[q]);
      }
    } else {                     // B-half (CSA) or the whole row (HCA) of window j
      const int i = OVERLAP ? slot - M : slot;
      load_row_value(p, rs, j * M + i, OVERLAP ? d + c : c, as[q], zs[q]);
    }
  }
  float mx = -INFINITY;
#pragma unroll
  for (int q = 0; q < kPerGroup; ++q) mx = fmaxf(mx, zs[q]);
  mx = combine_groups<kGroups>(mx, red_max, grp, ch, MaxOp{});
  const double pooled_d = combine_groups<kGroups>(softmax_pool<kPerGroup, kGroups>(zs, as, mx, red_sum, grp, ch),
                                                  red_acc, grp, ch, SumOp{});

  // ---- finish: bf16 round, RMSNorm across the cluster, RoPE; group 0 (warps 0 and 1) holds the slab
  float x = 0.0f;
  if (grp == 0) {
    x = bf16_round(static_cast<float>(pooled_d));
    const double sq = warp_sum(static_cast<double>(x) * static_cast<double>(x));
    if (ch % kWarp == 0) norm_part[ch / kWarp] = sq;
  }
  __syncthreads();
  if (threadIdx.x == 0) cluster_sq = norm_part[0] + norm_part[1];
  cluster.sync();
  if (grp == 0) {
    double part[kMaxSlabs];   // all peers' partials requested at once, summed in rank order
    const int peers = static_cast<int>(cluster.num_blocks());
#pragma unroll
    for (int r = 0; r < kMaxSlabs; ++r) part[r] = r < peers ? *cluster.map_shared_rank(&cluster_sq, r) : 0.0;
    double total_sq = 0.0;
#pragma unroll
    for (int r = 0; r < kMaxSlabs; ++r) total_sq += part[r];
    x = bf16_round(__fmul_rn(wgt, __fmul_rn(x, rms_rinv(total_sq, d, p.eps))));
    if (c >= p.nope) {   // RoPE on interleaved pairs; the partner channel is the neighbouring lane
      const float angle = __fmul_rn(static_cast<float>(window_abs * M), inv_f);
      double sd, cd;
      sincos(static_cast<double>(angle), &sd, &cd);
      x = rope_pair(x, c, static_cast<float>(cd), static_cast<float>(sd));
    }   // (c >= nope) is uniform per CTA: nope is a multiple of the 64-channel slab
  }

  // ---- store
  const bool store = block >= 0 && block < p.num_blocks;
  uint8_t* entry = store ? p.pool + (block * p.entries_per_block + window_abs % p.entries_per_block) * p.width : nullptr;

  if constexpr (!INDEX) {
    if (c < p.nope) {   // whole slab is one FP8 block (nope % 64 == 0)
      if (grp == 0) {
        const float wmax = warp_max(fabsf(x));
        if (ch % kWarp == 0) red_amax[ch / kWarp] = wmax;
      }
      __syncthreads();
      if (grp == 0) {
        const uint32_t code = ue8m0_code(fmaxf(red_amax[0], red_amax[1]), p.fp8_floor, p.inv_fp8_max);
        if (store) {
          entry[c] = e4m3_encode(x, ue8m0_value(code));
          if (ch == 0) entry[p.nope + 2 * p.rope + slab] = static_cast<uint8_t>(code);
        }
      }
    } else if (grp == 0 && store) {
      *reinterpret_cast<uint16_t*>(entry + p.nope + 2 * (c - p.nope)) = bf16_bits(x);
      const int pad0 = p.nope + 2 * p.rope + p.nope / kSlab;
      if (c == d - 1)
        for (int b = pad0; b < p.width; ++b) entry[b] = 0;
    }
    cluster.sync();   // the next window / exit must not overwrite cluster_sq while a peer reads it
  } else {
    // Hadamard needs every channel: exchange the roped bf16 values through DSMEM.
    if (grp == 0) slab_vals[ch] = x;
    cluster.sync();
    for (int i = threadIdx.x; i < d; i += kFlushThreads)
      full_vals[i] = *cluster.map_shared_rank(&slab_vals[i % kSlab], i / kSlab);
    __syncthreads();
    const double hs = combine_groups<kGroups>(hadamard_share<kGroups>(full_vals, d, c, grp), red_acc, grp, ch,
                                              SumOp{});
    if (grp == 0) {
      const float y = bf16_round(static_cast<float>(hs * p.hadamard_scale));
      // MXFP4: one 32-block per warp (channels 0..31, 32..63 of the slab)
      const uint32_t code = ue8m0_code(warp_max(fabsf(y)), p.fp4_floor, p.inv_fp4_max);
      const uint32_t nib = e2m1_encode(y, ue8m0_value(code));
      const uint32_t hi = __shfl_down_sync(0xffffffffu, nib, 1);
      if (store) {
        if (c % 2 == 0) entry[c / 2] = static_cast<uint8_t>(nib | (hi << 4));
        if (ch % kWarp == 0) entry[d / 2 + c / 32] = static_cast<uint8_t>(code);
      }
    }
    cluster.sync();   // peers may still be reading slab_vals / cluster_sq
  }
  __syncthreads();
}

// Advance the state (item 0 only), this CTA's columns: CSA keeps the last complete window in rows 0..m-1,
// the current (incomplete) window's rows in m..; HCA only the current rows.
template <int M, bool OVERLAP>
__device__ void update_state(const FlushParams& p, const RowSource& rs, float* skv, float* ssc, int n, int slab) {
  constexpr int kFlushThreads = kSlab * kGroupsFor<M>;
  const int held = rs.held, nw = (held + n) / M, tail = held + n - nw * M;
  constexpr int kHalves = OVERLAP ? 2 : 1;
  const int cols = kSlab * kHalves;
  if (OVERLAP && nw >= 1) {
    for (int i = threadIdx.x; i < M * cols; i += kFlushThreads) {
      const int r = i / cols, cc = i % cols;
      const int col = (cc / kSlab) * p.d + slab * kSlab + cc % kSlab;
      float kv, sc;
      load_row_value(p, rs, (nw - 1) * M + r, col, kv, sc);
      const int64_t off = static_cast<int64_t>(r) * rs.row_width + col;
      skv[off] = kv;
      ssc[off] = sc;
    }
    __syncthreads();   // rows m.. are read above when nw == 1 and rewritten below
  }
  const int lo = nw == 0 ? held : 0;
  for (int i = threadIdx.x; i < (tail - lo) * cols; i += kFlushThreads) {
    const int r = lo + i / cols, cc = i % cols;
    const int col = (cc / kSlab) * p.d + slab * kSlab + cc % kSlab;
    const int64_t src = (rs.first_row + nw * M + r - held) * rs.row_width + col;
    const int64_t off = static_cast<int64_t>(rs.state_row0 + r) * rs.row_width + col;
    skv[off] = p.a[src];
    ssc[off] = p.z[src];
  }
}

template <int M, bool OVERLAP, bool INDEX>
__global__ void __launch_bounds__(kSlab * kGroupsFor<M>) compress_flush_kernel(const FlushParams p) {
  cg::cluster_group cluster = cg::this_cluster();
  const int slab = static_cast<int>(cluster.block_rank());
  const int item_id = blockIdx.x / static_cast<int>(cluster.num_blocks());
  const Item it = p.one_item_per_seq ? Item{item_id < p.num_seqs ? item_id : -1, 0} : find_item<M>(p, item_id);
  if (it.seq < 0) return;   // the whole cluster agrees: same item id
  const int s = it.seq;
  const int64_t start = p.seq_start[s];
  const int n = static_cast<int>(p.seq_len[s]);
  const int64_t slot = p.seq_slot[s];
  if (slot < 0 || slot >= p.num_slots) return;   // mask rule: no state, nothing stored
  constexpr int kCoff = OVERLAP ? 2 : 1;
  const int row_width = kCoff * p.d;
  float* skv = p.state_kv + slot * static_cast<int64_t>(kCoff * M) * row_width;
  float* ssc = p.state_score + slot * static_cast<int64_t>(kCoff * M) * row_width;
  const int held = static_cast<int>(start % M);
  const RowSource rs{skv, ssc, p.seq_first_row[s], held, OVERLAP ? M : 0, row_width};
  const int nw = (held + n) / M;
  const int64_t first_window = (start - held) / M;
  if (it.index == 0) {
    for (int j = 0; j < 2 && j < nw; ++j)
      pool_window<M, OVERLAP, INDEX>(p, rs, s, first_window + j, j, slab, cluster);
    __syncthreads();   // every read of this CTA's state columns is done
    update_state<M, OVERLAP>(p, rs, skv, ssc, n, slab);
  } else {
    const int j = it.index + 1;
    pool_window<M, OVERLAP, INDEX>(p, rs, s, first_window + j, j, slab, cluster);
  }
}

// ------------------------------------------------------------------------------------------- decode path
// T == S (one token per sequence). Two independent kinds of work, in one launch:
//   append: a sequence whose token does not complete a window only writes its row into the state (row held of
//     the current series): a grid-stride loop of 16-byte copies over (sequence, kv/score, float4) by every
//     thread of the grid; no cluster work, no barrier.
//   pool: the k-th completing sequence (ordinal among the sequences whose token completes a window, found by a
//     per-warp ballot over the sequences; every warp computes it, so no barrier) goes to cluster k % G.
//     Exactly one window (held = M - 1, so window j = 0), the state rows come straight from the state.
//     CSA: 64-thread CTAs, one thread per channel owns its 8 slots and also rotates its own state columns c and
//     d + c (rows 0..3 := rows 4..6 and this row) after reading them: no barrier, no second pass.
//     HCA: 512-thread CTAs, 8 slot groups x 16 slots per channel; completing HCA sequences write no state.
//   Cluster traffic is pushed: each CTA writes its sum-of-squares partials (and for the indexer its roped
//   values) into every peer's shared memory before one cluster barrier, then reads locally; one barrier for the
//   RMSNorm (+ one for the indexer's Hadamard exchange), and one between two windows of the same cluster.
// Grid: G = S clusters for CSA (one window each at most); G = min(S, 16) for HCA (one 512-thread CTA per SM,
// 128 CTAs), a cluster pooling windows k, k + G, ... in turn.
template <int M>
constexpr int kDecGroups = M == 4 ? 1 : 8;
template <int M>
constexpr int kDecThreads = kSlab * kDecGroups<M>;
constexpr int kHcaDecodeClusters = 16;

template <int M>
__device__ __forceinline__ bool decode_completes(const FlushParams& p, int s) {
  if (s >= p.num_seqs) return false;
  const int64_t slot = p.seq_slot[s];
  const int64_t start = p.seq_start[s];
  return (slot >= 0) & (slot < p.num_slots) & (start % M == M - 1);
}

struct AppendTask {
  float4* dst;   // nullptr: nothing to store
  float4 value;
};

template <int M, bool OVERLAP>
__device__ __forceinline__ AppendTask decode_append_load(const FlushParams& p, int t) {
  constexpr int kCoff = OVERLAP ? 2 : 1;
  const int n4 = kCoff * p.d / 4, per_seq = 2 * n4;
  AppendTask task{nullptr, make_float4(0.f, 0.f, 0.f, 0.f)};
  if (t >= p.num_seqs * per_seq) return task;
  const int s = t / per_seq, rem = t - s * per_seq;
  const bool score = rem >= n4;
  const int i4 = score ? rem - n4 : rem;
  const int64_t slot = p.seq_slot[s], start = p.seq_start[s], row = p.seq_first_row[s];
  const int held = static_cast<int>(start % M);
  if (slot < 0 || slot >= p.num_slots || held == M - 1) return task;   // masked, or completing (pool path)
  const int64_t row_width = kCoff * p.d;
  task.value = __ldg(reinterpret_cast<const float4*>((score ? p.z : p.a) + row * row_width) + i4);
  task.dst = reinterpret_cast<float4*>((score ? p.state_score : p.state_kv) +
                                       (slot * (kCoff * M) + (OVERLAP ? M : 0) + held) * row_width) + i4;
  return task;
}

// Split cluster barrier: every thread arrives at kernel start and waits before its first DSMEM access, so the
// peers are known to be running (the programming guide's rule) without a full barrier on the path.
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;" ::: "memory"); }

// 64-thread barrier of warps 0 and 1 (the group that holds the slab's finished values).
__device__ __forceinline__ void slab_bar() { asm volatile("bar.sync 1, 64;" ::: "memory"); }

template <int M, bool OVERLAP, bool INDEX>
__device__ void decode_window(const FlushParams& p, int s, int slab, int peers, cg::cluster_group& cluster) {
  constexpr int kGroups = kDecGroups<M>;
  constexpr int kSlots = OVERLAP ? 2 * M : M;
  constexpr int kPer = kSlots / kGroups;
  constexpr int kCoff = OVERLAP ? 2 : 1;
  constexpr int kHeld = M - 1;
  static_assert(!OVERLAP || kGroups == 1, "CSA: one thread owns a channel's slots and its state columns");
  __shared__ float red_max[kGroups][kSlab];
  __shared__ double red_sum[kGroups][kSlab];
  __shared__ double red_acc[kGroups][kSlab];
  __shared__ double sq_parts[2 * kMaxSlabs];           // [rank * 2 + warp], pushed by every peer
  __shared__ float amax2[2];
  __shared__ double hvals[INDEX ? kMaxSlabs * kSlab : 1];   // roped values of all d channels, pushed (indexer)
  const int tid = static_cast<int>(threadIdx.x);
  const int ch = tid % kSlab, grp = tid / kSlab, lane = tid % kWarp;
  const int c = slab * kSlab + ch, d = p.d;
  const int row_width = kCoff * d;
  const int64_t slot = p.seq_slot[s], start = p.seq_start[s], first_row = p.seq_first_row[s];
  const int64_t window_abs = start / M;
  float* skv = p.state_kv + slot * static_cast<int64_t>(kCoff * M) * row_width;
  float* ssc = p.state_score + slot * static_cast<int64_t>(kCoff * M) * row_width;
  const float* arow = p.a + first_row * row_width;
  const float* zrow = p.z + first_row * row_width;
  constexpr int kRow0 = OVERLAP ? M : 0;   // state row of current-series row 0

  // ---- every load up front: pooling slots, CSA rotation rows, norm weight, block, rope angle
  float zs[kPer], as[kPer];
#pragma unroll
  for (int q = 0; q < kPer; ++q) {
    const int sl = q * kGroups + grp;
    if (OVERLAP && sl < M) {   // A-half of the previous window: state rows 0..m-1
      as[q] = skv[static_cast<int64_t>(sl) * row_width + c];
      zs[q] = ssc[static_cast<int64_t>(sl) * row_width + c];
    } else {                   // B-half (CSA) or whole row (HCA) of current-series row r
      const int r = OVERLAP ? sl - M : sl;
      const int col = OVERLAP ? d + c : c;
      if (r < kHeld) {
        as[q] = skv[static_cast<int64_t>(kRow0 + r) * row_width + col];
        zs[q] = ssc[static_cast<int64_t>(kRow0 + r) * row_width + col];
      } else {
        as[q] = __ldg(arow + col);
        zs[q] = __ldg(zrow + col);
      }
    }
  }
  float rot_kv[OVERLAP ? M : 1], rot_sc[OVERLAP ? M : 1];   // column c of the window's rows (CSA rotation)
  if constexpr (OVERLAP) {
#pragma unroll
    for (int i = 0; i < kHeld; ++i) {
      rot_kv[i] = skv[static_cast<int64_t>(M + i) * row_width + c];
      rot_sc[i] = ssc[static_cast<int64_t>(M + i) * row_width + c];
    }
    rot_kv[kHeld] = __ldg(arow + c);
    rot_sc[kHeld] = __ldg(zrow + c);
  }
  const float wgt = p.weight_bf16 ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.norm_weight)[c])
                                  : reinterpret_cast<const float*>(p.norm_weight)[c];
  const int64_t logical = window_abs / p.entries_per_block;
  const int64_t block = logical < p.max_blocks ? p.block_table[static_cast<int64_t>(s) * p.max_blocks + logical] : -1;
  const bool roped = c >= p.nope;   // uniform per CTA (nope % 64 == 0)
  const float inv_f = roped ? p.inv_freq[(c - p.nope) / 2] : 0.0f;

  // ---- gated softmax pooling
  float mx = -INFINITY;
#pragma unroll
  for (int q = 0; q < kPer; ++q) mx = fmaxf(mx, zs[q]);
  mx = combine_groups<kGroups>(mx, red_max, grp, ch, MaxOp{});
  if constexpr (OVERLAP) {   // state rows 0..m-1 := the window's rows; this thread read rows 0..m-1 of column c
#pragma unroll
    for (int i = 0; i < M; ++i) {
      const int64_t off = static_cast<int64_t>(i) * row_width;
      skv[off + c] = rot_kv[i];
      ssc[off + c] = rot_sc[i];
      skv[off + d + c] = as[M + i];
      ssc[off + d + c] = zs[M + i];
    }
  }
  double acc = softmax_pool<kPer, kGroups>(zs, as, mx, red_sum, grp, ch);

  // RoPE angle: after the pooling (its registers are free again), before the barriers it overlaps
  float cs = 1.0f, sn = 0.0f;
  if (roped && grp == 0) {
    const float angle = __fmul_rn(static_cast<float>(window_abs * M), inv_f);
    double sd, cd;
    sincos(static_cast<double>(angle), &sd, &cd);
    cs = static_cast<float>(cd);
    sn = static_cast<float>(sd);
  }
  const double pooled_d = combine_groups<kGroups>(acc, red_acc, grp, ch, SumOp{});

  // ---- bf16 round, RMSNorm (partials pushed to every peer, one cluster barrier), RoPE
  float x = 0.0f;
  if (grp == 0) {
    x = bf16_round(static_cast<float>(pooled_d));
    const double sq = warp_sum(static_cast<double>(x) * static_cast<double>(x));
    if (lane < peers) *cluster.map_shared_rank(&sq_parts[slab * 2 + ch / kWarp], lane) = sq;
  }
  cluster.sync();
  if (grp == 0) {
    double total_sq = 0.0;
#pragma unroll
    for (int i = 0; i < 2 * kMaxSlabs; ++i)
      if (i < 2 * peers) total_sq += sq_parts[i];
    x = bf16_round(__fmul_rn(wgt, __fmul_rn(x, rms_rinv(total_sq, d, p.eps))));
    if (roped) x = rope_pair(x, c, cs, sn);
  }

  // ---- store
  const bool store = block >= 0 && block < p.num_blocks;
  uint8_t* entry = store ? p.pool + (block * p.entries_per_block + window_abs % p.entries_per_block) * p.width : nullptr;
  if constexpr (!INDEX) {
    if (grp == 0) {
      if (!roped) {   // the slab is one FP8 block
        const float wmax = warp_max(fabsf(x));
        if (lane == 0) amax2[ch / kWarp] = wmax;
        slab_bar();
        const uint32_t code = ue8m0_code(fmaxf(amax2[0], amax2[1]), p.fp8_floor, p.inv_fp8_max);
        if (store) {
          entry[c] = e4m3_encode(x, ue8m0_value(code));
          if (ch == 0) entry[p.nope + 2 * p.rope + slab] = static_cast<uint8_t>(code);
        }
      } else if (store) {
        *reinterpret_cast<uint16_t*>(entry + p.nope + 2 * (c - p.nope)) = bf16_bits(x);
        const int pad0 = p.nope + 2 * p.rope + p.nope / kSlab;
        if (c == d - 1)
          for (int b = pad0; b < p.width; ++b) entry[b] = 0;
      }
    }
  } else {
    // Hadamard needs every channel: push this channel's value to every peer, one barrier, then exact fp64 sums.
    if (grp == 0)
      for (int r = 0; r < peers; ++r) *cluster.map_shared_rank(&hvals[c], r) = static_cast<double>(x);
    cluster.sync();
    const double hs = combine_groups<kGroups>(hadamard_share<kGroups>(hvals, d, c, grp), red_acc, grp, ch,
                                              SumOp{});
    if (grp == 0) {
      const float y = bf16_round(static_cast<float>(hs * p.hadamard_scale));
      const uint32_t code = ue8m0_code(warp_max(fabsf(y)), p.fp4_floor, p.inv_fp4_max);   // one 32-block per warp
      const uint32_t nib = e2m1_encode(y, ue8m0_value(code));
      const uint32_t hi = __shfl_down_sync(0xffffffffu, nib, 1);
      if (store) {
        if (c % 2 == 0) entry[c / 2] = static_cast<uint8_t>(nib | (hi << 4));
        if (ch % kWarp == 0) entry[d / 2 + c / 32] = static_cast<uint8_t>(code);
      }
    }
  }
}

template <int M, bool OVERLAP, bool INDEX>
__global__ void __launch_bounds__(kDecThreads<M>, M == 4 && !INDEX ? 6 : 1) compress_decode_kernel(const FlushParams p) {
  cg::cluster_group cluster = cg::this_cluster();
  const int peers = static_cast<int>(cluster.num_blocks());
  const int slab = static_cast<int>(cluster.block_rank());
  const int cluster_id = static_cast<int>(blockIdx.x) / peers;
  const int num_clusters = static_cast<int>(gridDim.x) / peers;
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int gthreads = static_cast<int>(gridDim.x * blockDim.x);
  const int gt = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  constexpr int kChunk = 4 * kWarp;   // sequences whose flags one warp loads at once
  cluster_arrive_relaxed();
  // Appends: this thread's first task and the first flags are loaded together, then stored.
  const AppendTask first = decode_append_load<M, OVERLAP>(p, gt);
  bool f[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) f[u] = decode_completes<M>(p, u * kWarp + lane);
  if (first.dst != nullptr) *first.dst = first.value;
  const int tasks = p.num_seqs * 2 * ((OVERLAP ? 2 : 1) * p.d / 4);
  for (int t = gt + gthreads; t < tasks; t += gthreads) {
    const AppendTask task = decode_append_load<M, OVERLAP>(p, t);
    if (task.dst != nullptr) *task.dst = task.value;
  }
  // Windows: ordinal k of the completing sequences goes to cluster k % G (cluster-uniform: same flags everywhere).
  int seen = 0;
  bool any = false;
  for (int base = 0; base < p.num_seqs; base += kChunk) {
    unsigned mask[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) mask[u] = __ballot_sync(0xffffffffu, f[u]);
    if (base + kChunk < p.num_seqs) {
#pragma unroll
      for (int u = 0; u < 4; ++u) f[u] = decode_completes<M>(p, base + kChunk + u * kWarp + lane);
    }
#pragma unroll 1
    for (int u = 0; u < 4; ++u) {
      const unsigned mu = u == 0 ? mask[0] : u == 1 ? mask[1] : u == 2 ? mask[2] : mask[3];   // no local array
      const int cnt = __popc(mu);
      int o = seen + ((cluster_id - seen) % num_clusters + num_clusters) % num_clusters;
      for (; o < seen + cnt; o += num_clusters) {
        unsigned m = mu;
        for (int i = 0; i < o - seen; ++i) m &= m - 1;   // drop the lower set bits: the (o - seen)-th remains lowest
        if (any) cluster.sync();   // peers finished reading what the previous window pushed
        else cluster_wait();       // peers are running
        any = true;
        decode_window<M, OVERLAP, INDEX>(p, base + u * kWarp + __ffs(m) - 1, slab, peers, cluster);
      }
      seen += cnt;
    }
  }
  if (!any) cluster_wait();
}

// ------------------------------------------------------------------------------------------- host
void compress_flush(const at::Tensor& a, const at::Tensor& z, at::Tensor& state_kv, at::Tensor& state_score,
                    const at::Tensor& seq_slot, const at::Tensor& seq_start, const at::Tensor& seq_len,
                    const at::Tensor& seq_first_row, const at::Tensor& block_table, int64_t block_size,
                    int64_t ratio, const at::Tensor& norm_weight, double eps, const at::Tensor& inv_freq,
                    at::Tensor& pool, int64_t nope, int64_t rope, bool index_key, double inv_fp8_max,
                    double fp8_floor, double inv_fp4_max, double fp4_floor, double hadamard_scale) {
  for (const at::Tensor* t : TensorList{&a, &z, &state_kv, &state_score, &seq_slot, &seq_start, &seq_len, &seq_first_row, &block_table,
                  &norm_weight, &inv_freq, &pool})
    check_cuda(*t, "compress_flush tensor");
  for (const at::Tensor* t : TensorList{&a, &z, &state_kv, &state_score, &inv_freq}) check_dtype(*t, at::kFloat, "a/z/state/inv_freq");
  for (const at::Tensor* t : TensorList{&seq_slot, &seq_start, &seq_len, &seq_first_row, &block_table})
    check_dtype(*t, at::kLong, "layout tensor");
  check_dtype(pool, at::kByte, "pool");
  TORCH_CHECK(norm_weight.scalar_type() == at::kBFloat16 || norm_weight.scalar_type() == at::kFloat,
              "norm_weight: bf16 or fp32");
  const int64_t d = norm_weight.numel();
  const bool overlap = ratio == 4;
  TORCH_CHECK(ratio == 4 || ratio == 128, "compress_flush kernel supports ratios 4 (CSA) and 128 (HCA), got ", ratio);
  TORCH_CHECK(d % kSlab == 0 && d / kSlab <= kMaxSlabs, "head_dim must be a multiple of 64 up to 512, got ", d);
  const int64_t coff = overlap ? 2 : 1;
  TORCH_CHECK(a.dim() == 2 && a.size(1) == coff * d && z.sizes() == a.sizes(), "a, z must be [T, ", coff * d, "]");
  TORCH_CHECK(state_kv.dim() == 3 && state_kv.size(1) == coff * ratio && state_kv.size(2) == coff * d &&
                  state_score.sizes() == state_kv.sizes(),
              "states must be [slots, ", coff * ratio, ", ", coff * d, "]");
  TORCH_CHECK(pool.dim() == 3 && block_size % ratio == 0 && pool.size(1) == block_size / ratio, "pool geometry");
  if (index_key) {
    TORCH_CHECK(overlap, "indexer keys come from the CSA compressor");
    TORCH_CHECK((d & (d - 1)) == 0 && pool.size(2) == d / 2 + d / 32, "indexer pool width must be d/2 + d/32");
  } else {
    TORCH_CHECK(nope + rope == d && nope % kSlab == 0 && rope % kSlab == 0, "nope/rope must be multiples of 64");
    TORCH_CHECK(pool.size(2) == ((nope + 2 * rope + nope / 64) + 7) / 8 * 8, "main pool width mismatch");
  }
  TORCH_CHECK(inv_freq.numel() * 2 == rope, "inv_freq must have rope/2 entries");
  const int64_t num_tokens = a.size(0), num_seqs = seq_slot.numel();
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == num_seqs, "block_table must be [S, max_blocks]");
  if (num_tokens == 0 || num_seqs == 0) return;
  // Work items: sum over sequences of max(windows - 1, 1) <= S + (T - S) / ratio (each chunk has >= 1 token).
  const bool one_item_per_seq = num_tokens == num_seqs;
  const int64_t max_items =
      one_item_per_seq ? num_seqs : num_seqs + std::max<int64_t>(num_tokens - num_seqs, 0) / ratio + 1;
  const int slabs = static_cast<int>(d / kSlab);

  FlushParams p{};
  p.a = a.data_ptr<float>();
  p.z = z.data_ptr<float>();
  p.state_kv = state_kv.data_ptr<float>();
  p.state_score = state_score.data_ptr<float>();
  p.seq_slot = seq_slot.data_ptr<int64_t>();
  p.seq_start = seq_start.data_ptr<int64_t>();
  p.seq_len = seq_len.data_ptr<int64_t>();
  p.seq_first_row = seq_first_row.data_ptr<int64_t>();
  p.block_table = block_table.data_ptr<int64_t>();
  p.norm_weight = norm_weight.data_ptr();
  p.inv_freq = inv_freq.data_ptr<float>();
  p.pool = pool.data_ptr<uint8_t>();
  p.num_seqs = static_cast<int>(num_seqs);
  p.num_slots = static_cast<int>(state_kv.size(0));
  p.max_blocks = static_cast<int>(block_table.size(1));
  p.num_blocks = static_cast<int>(pool.size(0));
  p.entries_per_block = static_cast<int>(pool.size(1));
  p.width = static_cast<int>(pool.size(2));
  p.d = static_cast<int>(d);
  p.nope = index_key ? static_cast<int>(d - rope) : static_cast<int>(nope);
  p.rope = static_cast<int>(rope);
  p.weight_bf16 = norm_weight.scalar_type() == at::kBFloat16;
  p.one_item_per_seq = one_item_per_seq;
  p.eps = static_cast<float>(eps);
  p.inv_fp8_max = static_cast<float>(inv_fp8_max);
  p.fp8_floor = static_cast<float>(fp8_floor);
  p.inv_fp4_max = static_cast<float>(inv_fp4_max);
  p.fp4_floor = static_cast<float>(fp4_floor);
  p.hadamard_scale = hadamard_scale;

  const c10::cuda::CUDAGuard guard(a.device());
  // Decode (T == S, one token per sequence): the append / pool kernel; needs 16-byte aligned a, z and states.
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  const bool decode = one_item_per_seq && aligned(p.a) && aligned(p.z) && aligned(p.state_kv) &&
                      aligned(p.state_score);
  const int64_t decode_clusters = overlap ? num_seqs : std::min<int64_t>(num_seqs, kHcaDecodeClusters);
  const dim3 grid(static_cast<unsigned>((decode ? decode_clusters : max_items) * slabs));
  const dim3 block(decode ? (overlap ? kDecThreads<4> : kDecThreads<128>)
                          : kSlab * (overlap ? kGroupsFor<4> : kGroupsFor<128>));
  const auto launch = [&](auto kernel) {
    launch_clustered(kernel, grid, block, static_cast<unsigned>(slabs), current_stream(), p);
  };
  if (decode) {
    if (!overlap) launch(compress_decode_kernel<128, false, false>);
    else if (index_key) launch(compress_decode_kernel<4, true, true>);
    else launch(compress_decode_kernel<4, true, false>);
  } else if (!overlap) launch(compress_flush_kernel<128, false, false>);
  else if (index_key) launch(compress_flush_kernel<4, true, true>);
  else launch(compress_flush_kernel<4, true, false>);
}

}  // namespace dsv4
