// Window ring append/gather and paged entry gather (references: kernels/cache_ops.py window_append,
// window_gather, gather_entries; byte format: kernels/kv_format.py MainFp8Codec).
//
//   window_append_fp8_kernel       one warp per token: FP8 quantize the nope dims in 64-blocks (UE8M0 scale),
//                                  bf16 rope dims, store the entry bytes into ring[slot, pos % W].
//   window_gather_fp8_bf16_kernel  one warp per (token, window position): decode ring entries / copy this step's
//                                  bf16 rows into a dense [T, W, d] bf16 tile.
//   gather_entries_fp8_bf16_kernel one warp per (token, selected entry): paged lookup + FP8 dequant to bf16.
//
// Entry bytes (nope + rope = d): [nope e4m3][rope bf16][nope/64 UE8M0][zero pad to a multiple of 8].
// Decoding is exact: an e4m3 value times a power-of-two scale is exact in fp32, then rounded once to bf16
// (exactly what MainFp8Codec.decode does). Mask rules (no host sync): a slot outside [0, num_slots), or an entry
// whose block is missing (-1, out of range, or past the block table) is treated as invalid: nothing is stored,
// gathers return zeros and valid = false. The Python validation path raises on these instead.
#include "common.cuh"
#include "ops.h"

namespace dsv4 {

constexpr int kKvWarps = 8;

struct EntryGeometry {
  int nope, rope, width;
  __host__ __device__ int scale_offset() const { return nope + 2 * rope; }
};

// ------------------------------------------------------------------------------------------- encode
template <typename VT>
__device__ __forceinline__ float load_value(const VT* p);
template <>
__device__ __forceinline__ float load_value<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_value<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(*p); }

template <typename VT>
__device__ __forceinline__ uint16_t load_bf16_bits(const VT* p);
template <>
__device__ __forceinline__ uint16_t load_bf16_bits<float>(const float* p) { return bf16_bits(*p); }
template <>
__device__ __forceinline__ uint16_t load_bf16_bits<__nv_bfloat16>(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint16_t*>(p);
}

// One warp encodes one entry (MainFp8Codec.encode): lane l quantizes elements 2l, 2l+1 of each 64-block. All
// loads are issued first and the (up to 8) block maxima reduce together, so the shuffles of different blocks
// overlap instead of forming one long dependent chain.
constexpr int kMaxFp8Blocks = 8;   // nope <= 512

template <typename VT>
__device__ __forceinline__ void load_pair(const VT* p, float& a, float& b);
template <>
__device__ __forceinline__ void load_pair<float>(const float* p, float& a, float& b) {
  const float2 v = *reinterpret_cast<const float2*>(p);
  a = v.x;
  b = v.y;
}
template <>
__device__ __forceinline__ void load_pair<__nv_bfloat16>(const __nv_bfloat16* p, float& a, float& b) {
  const uint32_t v = *reinterpret_cast<const uint32_t*>(p);
  a = bf16_bits_to_float(v & 0xFFFFu);
  b = bf16_bits_to_float(v >> 16);
}

// One entry's values as a warp holds them: lane l has elements 2l, 2l+1 of each 64-block, and rope pairs
// l, l + 32, ... as bf16 bit pairs. Loaded apart from the encode so callers can issue it before other loads.
struct MainValues {
  float x0[kMaxFp8Blocks], x1[kMaxFp8Blocks];
  uint32_t rope_words[4];   // rope <= 256
};

template <typename VT>
__device__ __forceinline__ void load_main_values(const VT* __restrict__ src, const EntryGeometry g, int lane,
                                                 MainValues& v) {
  const int nb = g.nope / 64;
#pragma unroll
  for (int b = 0; b < kMaxFp8Blocks; ++b) {
    v.x0[b] = v.x1[b] = 0.0f;
    if (b < nb) load_pair(src + 64 * b + 2 * lane, v.x0[b], v.x1[b]);
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = lane + r * kWarp;
    v.rope_words[r] = 0;
    if (i < g.rope / 2)
      v.rope_words[r] = static_cast<uint32_t>(load_bf16_bits(src + g.nope + 2 * i)) |
                        (static_cast<uint32_t>(load_bf16_bits(src + g.nope + 2 * i + 1)) << 16);
  }
}

__device__ __forceinline__ void encode_main_entry(const MainValues& v, uint8_t* __restrict__ dst,
                                                  const EntryGeometry g, float inv_fp8_max, float fp8_floor,
                                                  int lane) {
  const int nb = g.nope / 64;
  const float (&x0)[kMaxFp8Blocks] = v.x0;
  const float (&x1)[kMaxFp8Blocks] = v.x1;
  const uint32_t (&rope_words)[4] = v.rope_words;
  float amax[kMaxFp8Blocks];
#pragma unroll
  for (int b = 0; b < kMaxFp8Blocks; ++b) amax[b] = fmaxf(fabsf(x0[b]), fabsf(x1[b]));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
#pragma unroll
    for (int b = 0; b < kMaxFp8Blocks; ++b) amax[b] = fmaxf(amax[b], __shfl_xor_sync(0xffffffffu, amax[b], o));
#pragma unroll
  for (int b = 0; b < kMaxFp8Blocks; ++b) {
    if (b < nb) {
      const uint32_t code = ue8m0_code(amax[b], fp8_floor, inv_fp8_max);
      const float scale = ue8m0_value(code);
      const uint16_t pair = static_cast<uint16_t>(e4m3_encode(x0[b], scale)) |
                            static_cast<uint16_t>(static_cast<uint16_t>(e4m3_encode(x1[b], scale)) << 8);
      *reinterpret_cast<uint16_t*>(dst + 64 * b + 2 * lane) = pair;
      if (lane == b) dst[g.scale_offset() + b] = static_cast<uint8_t>(code);
    }
  }
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = lane + r * kWarp;
    if (i < g.rope / 2) *reinterpret_cast<uint32_t*>(dst + g.nope + 4 * i) = rope_words[r];
  }
  for (int i = g.scale_offset() + nb + lane; i < g.width; i += kWarp) dst[i] = 0;
}

// ------------------------------------------------------------------------------------------- decode
// A warp decodes kRowsPerWarp entries into d bf16 values each: every load of all its rows is issued before the
// first use (8-byte loads: entries are 8-byte aligned), then 8 e4m3 bytes become one 16-byte store.
constexpr int kRowsPerWarp = 2;
constexpr int kMaxNopeChunks = 2;   // nope / 8 <= 64 chunks over 32 lanes
constexpr int kMaxRopeChunks = 1;   // rope / 4 <= 32

struct EntryRegs {
  uint2 nope[kMaxNopeChunks];
  uint2 rope[kMaxRopeChunks];
  uint2 scales;   // up to 8 UE8M0 bytes
};

__device__ __forceinline__ void load_main_entry(const uint8_t* __restrict__ src, const EntryGeometry g, int lane,
                                                EntryRegs& r) {
#pragma unroll
  for (int i = 0; i < kMaxNopeChunks; ++i) {
    const int c = lane + i * kWarp;
    r.nope[i] = c < g.nope / 8 ? *reinterpret_cast<const uint2*>(src + 8 * c) : make_uint2(0, 0);
  }
#pragma unroll
  for (int i = 0; i < kMaxRopeChunks; ++i) {
    const int c = lane + i * kWarp;
    r.rope[i] = c < g.rope / 4 ? *reinterpret_cast<const uint2*>(src + g.nope + 8 * c) : make_uint2(0, 0);
  }
  r.scales = *reinterpret_cast<const uint2*>(src + g.scale_offset());   // scale_offset % 8 == 0, width >= +8
}

__device__ __forceinline__ void store_main_entry(const EntryRegs& r, __nv_bfloat16* __restrict__ dst,
                                                 const EntryGeometry g, int lane) {
#pragma unroll
  for (int i = 0; i < kMaxNopeChunks; ++i) {
    const int c = lane + i * kWarp;
    if (c >= g.nope / 8) continue;
    const uint32_t sw = (c / 8) < 4 ? r.scales.x : r.scales.y;
    const float s = ue8m0_value((sw >> (8 * ((c / 8) % 4))) & 0xFFu);
    const uint32_t words[2] = {r.nope[i].x, r.nope[i].y};
    uint32_t out[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint32_t wv = words[q / 2] >> (16 * (q % 2));
      const float lo = __fmul_rn(e4m3_decode(wv & 0xFF), s), hi = __fmul_rn(e4m3_decode((wv >> 8) & 0xFF), s);
      __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
      out[q] = *reinterpret_cast<uint32_t*>(&p);
    }
    *reinterpret_cast<uint4*>(dst + 8 * c) = make_uint4(out[0], out[1], out[2], out[3]);
  }
#pragma unroll
  for (int i = 0; i < kMaxRopeChunks; ++i) {
    const int c = lane + i * kWarp;
    if (c < g.rope / 4) *reinterpret_cast<uint2*>(dst + g.nope + 4 * c) = r.rope[i];
  }
}

__device__ __forceinline__ void zero_row(__nv_bfloat16* __restrict__ dst, int d, int lane) {
  for (int c = lane; c < d / 8; c += kWarp) *reinterpret_cast<uint4*>(dst + 8 * c) = make_uint4(0, 0, 0, 0);
}

__device__ __forceinline__ void copy_row(const __nv_bfloat16* __restrict__ src, __nv_bfloat16* __restrict__ dst,
                                         int d, int lane) {
  for (int c = lane; c < d / 8; c += kWarp)
    *reinterpret_cast<uint4*>(dst + 8 * c) = *reinterpret_cast<const uint4*>(src + 8 * c);
}

// ------------------------------------------------------------------------------------------- kernels
// 2 warps (tokens) per CTA: a decode batch of 128 spreads over 64 SMs instead of 16.
constexpr int kWindowAppendWarps = 2;

template <typename VT>
__global__ void __launch_bounds__(kWindowAppendWarps * kWarp) window_append_fp8_kernel(
    uint8_t* __restrict__ ring, const VT* __restrict__ values, const int64_t* __restrict__ positions,
    const int64_t* __restrict__ token_seq, const int64_t* __restrict__ seq_slot,
    const int64_t* __restrict__ seq_start, const int64_t* __restrict__ seq_len, int num_tokens, int num_slots,
    int window, int d, EntryGeometry g, float inv_fp8_max, float fp8_floor) {
  const int t = blockIdx.x * kWindowAppendWarps + threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (t >= num_tokens) return;
  // Two memory round trips: the row's values with the token's layout entries, then its sequence's entries.
  MainValues v;
  load_main_values(values + static_cast<int64_t>(t) * d, g, lane, v);
  const int64_t s = token_seq[t], pos = positions[t];
  const int64_t start = seq_start[s], len = seq_len[s], slot = seq_slot[s];
  // Only a chunk's last W tokens are stored: earlier ones would be overwritten in the same step (and two
  // writers of one ring row would race).
  if (pos < start + len - window) return;
  if (slot < 0 || slot >= num_slots) return;
  uint8_t* dst = ring + (slot * window + pos % window) * g.width;
  encode_main_entry(v, dst, g, inv_fp8_max, fp8_floor, lane);
}

__global__ void __launch_bounds__(kKvWarps * kWarp) window_gather_fp8_bf16_kernel(
    const uint8_t* __restrict__ ring, const __nv_bfloat16* __restrict__ chunk, const int64_t* __restrict__ positions,
    const int64_t* __restrict__ token_seq, const int64_t* __restrict__ seq_slot,
    const int64_t* __restrict__ seq_start, const int64_t* __restrict__ seq_first_row,
    __nv_bfloat16* __restrict__ keys, bool* __restrict__ valid, int num_tokens, int num_slots, int window, int d,
    EntryGeometry g) {
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kKvWarps + threadIdx.x / kWarp) * kRowsPerWarp;
  const int lane = threadIdx.x % kWarp;
  const int64_t rows = static_cast<int64_t>(num_tokens) * window;
  int kind[kRowsPerWarp];   // 0 invalid, 1 this step's row, 2 ring entry
  const uint8_t* src[kRowsPerWarp];
  const __nv_bfloat16* csrc[kRowsPerWarp];
  EntryRegs regs[kRowsPerWarp];
#pragma unroll
  for (int h = 0; h < kRowsPerWarp; ++h) {
    const int64_t row = row0 + h;
    kind[h] = 0;
    if (row >= rows) continue;
    const int64_t t = row / window, w = row % window;
    const int64_t s = token_seq[t], pos = positions[t] - (window - 1) + w, start = seq_start[s], slot = seq_slot[s];
    if (pos >= 0 && pos >= start) {
      kind[h] = 1;
      csrc[h] = chunk + (seq_first_row[s] + pos - start) * d;
    } else if (pos >= 0 && slot >= 0 && slot < num_slots) {
      kind[h] = 2;
      src[h] = ring + (slot * window + pos % window) * g.width;
      load_main_entry(src[h], g, lane, regs[h]);
    }
  }
#pragma unroll
  for (int h = 0; h < kRowsPerWarp; ++h) {
    const int64_t row = row0 + h;
    if (row >= rows) continue;
    __nv_bfloat16* dst = keys + row * d;
    if (kind[h] == 1) copy_row(csrc[h], dst, d, lane);
    else if (kind[h] == 2) store_main_entry(regs[h], dst, g, lane);
    else zero_row(dst, d, lane);
    if (lane == 0) valid[row] = kind[h] != 0;
  }
}

__global__ void __launch_bounds__(kKvWarps * kWarp) gather_entries_fp8_bf16_kernel(
    const uint8_t* __restrict__ pool, const int64_t* __restrict__ entries, const int64_t* __restrict__ token_seq,
    const int64_t* __restrict__ block_table, __nv_bfloat16* __restrict__ tile, bool* __restrict__ valid,
    int64_t num_rows, int num_selected, int max_blocks, int num_blocks, int entries_per_block, int d,
    EntryGeometry g) {
  const int64_t row0 = (static_cast<int64_t>(blockIdx.x) * kKvWarps + threadIdx.x / kWarp) * kRowsPerWarp;
  const int lane = threadIdx.x % kWarp;
  bool ok[kRowsPerWarp];
  EntryRegs regs[kRowsPerWarp];
#pragma unroll
  for (int h = 0; h < kRowsPerWarp; ++h) {
    const int64_t row = row0 + h;
    ok[h] = false;
    if (row >= num_rows) continue;
    const int64_t entry = entries[row];
    if (entry < 0) continue;
    const int64_t logical = entry / entries_per_block;
    const int64_t s = token_seq[row / num_selected];
    const int64_t block = logical < max_blocks ? block_table[s * max_blocks + logical] : -1;
    if (block < 0 || block >= num_blocks) continue;
    ok[h] = true;
    load_main_entry(pool + (block * entries_per_block + entry % entries_per_block) * g.width, g, lane, regs[h]);
  }
#pragma unroll
  for (int h = 0; h < kRowsPerWarp; ++h) {
    const int64_t row = row0 + h;
    if (row >= num_rows) continue;
    __nv_bfloat16* dst = tile + row * d;
    if (ok[h]) store_main_entry(regs[h], dst, g, lane);
    else zero_row(dst, d, lane);
    if (lane == 0) valid[row] = ok[h];
  }
}

// ------------------------------------------------------------------------------------------- host
static EntryGeometry check_main_geometry(const at::Tensor& storage, int64_t nope, int64_t rope) {
  TORCH_CHECK(nope > 0 && nope % 64 == 0 && nope <= 512, "nope_dim must be a multiple of 64 up to 512, got ", nope);
  TORCH_CHECK(rope > 0 && rope % 8 == 0 && rope <= 128, "rope_dim must be a multiple of 8 up to 128, got ", rope);
  const int64_t width = storage.size(-1);
  const int64_t need = ((nope + 2 * rope + nope / 64) + 7) / 8 * 8;
  TORCH_CHECK(width == need, "entry width ", width, " does not match nope ", nope, " + rope ", rope, " (", need, ")");
  check_dtype(storage, at::kByte, "entry storage");
  return EntryGeometry{static_cast<int>(nope), static_cast<int>(rope), static_cast<int>(width)};
}

static void check_layout_vec(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  check_dtype(t, at::kLong, name);
  check_dim(t, 1, name);
}

void window_append(at::Tensor& ring, const at::Tensor& values, const at::Tensor& positions,
                   const at::Tensor& token_seq, const at::Tensor& seq_slot, const at::Tensor& seq_start,
                   const at::Tensor& seq_len, int64_t nope, int64_t rope, double inv_fp8_max, double fp8_floor) {
  check_cuda(ring, "ring");
  check_cuda(values, "values");
  check_dim(ring, 3, "ring");
  check_dim(values, 2, "values");
  for (const at::Tensor* p : TensorList{&positions, &token_seq, &seq_slot, &seq_start, &seq_len}) check_layout_vec(*p, "layout vector");
  const EntryGeometry g = check_main_geometry(ring, nope, rope);
  TORCH_CHECK(values.size(1) == nope + rope, "values have ", values.size(1), " dims, expected ", nope + rope);
  TORCH_CHECK(values.scalar_type() == at::kBFloat16 || values.scalar_type() == at::kFloat, "values: bf16 or fp32");
  const int64_t num_tokens = values.size(0);
  TORCH_CHECK(positions.numel() == num_tokens && token_seq.numel() == num_tokens, "layout/values token mismatch");
  if (num_tokens == 0) return;
  const c10::cuda::CUDAGuard guard(ring.device());
  const dim3 grid((num_tokens + kWindowAppendWarps - 1) / kWindowAppendWarps);
  auto stream = current_stream();
  const int d = static_cast<int>(nope + rope), window = static_cast<int>(ring.size(1));
  const int num_slots = static_cast<int>(ring.size(0));
  if (values.scalar_type() == at::kBFloat16) {
    window_append_fp8_kernel<__nv_bfloat16><<<grid, kWindowAppendWarps * kWarp, 0, stream>>>(
        ring.data_ptr<uint8_t>(), reinterpret_cast<const __nv_bfloat16*>(values.data_ptr()),
        positions.data_ptr<int64_t>(), token_seq.data_ptr<int64_t>(), seq_slot.data_ptr<int64_t>(),
        seq_start.data_ptr<int64_t>(), seq_len.data_ptr<int64_t>(), static_cast<int>(num_tokens), num_slots, window,
        d, g, static_cast<float>(inv_fp8_max), static_cast<float>(fp8_floor));
  } else {
    window_append_fp8_kernel<float><<<grid, kWindowAppendWarps * kWarp, 0, stream>>>(
        ring.data_ptr<uint8_t>(), values.data_ptr<float>(), positions.data_ptr<int64_t>(),
        token_seq.data_ptr<int64_t>(), seq_slot.data_ptr<int64_t>(), seq_start.data_ptr<int64_t>(),
        seq_len.data_ptr<int64_t>(), static_cast<int>(num_tokens), num_slots, window, d, g,
        static_cast<float>(inv_fp8_max), static_cast<float>(fp8_floor));
  }
  DSV4_LAUNCH_CHECK();
}

std::vector<at::Tensor> window_gather(const at::Tensor& ring, const at::Tensor& chunk, const at::Tensor& positions,
                                      const at::Tensor& token_seq, const at::Tensor& seq_slot,
                                      const at::Tensor& seq_start, const at::Tensor& seq_first_row, int64_t nope,
                                      int64_t rope) {
  check_cuda(ring, "ring");
  check_cuda(chunk, "chunk_values");
  check_dim(ring, 3, "ring");
  check_dim(chunk, 2, "chunk_values");
  check_dtype(chunk, at::kBFloat16, "chunk_values");
  for (const at::Tensor* p : TensorList{&positions, &token_seq, &seq_slot, &seq_start, &seq_first_row}) check_layout_vec(*p, "layout vector");
  const EntryGeometry g = check_main_geometry(ring, nope, rope);
  const int64_t d = nope + rope, num_tokens = chunk.size(0), window = ring.size(1);
  TORCH_CHECK(chunk.size(1) == d && d % 8 == 0, "chunk_values must be [T, ", d, "]");
  TORCH_CHECK(positions.numel() == num_tokens, "layout/values token mismatch");
  const c10::cuda::CUDAGuard guard(ring.device());
  auto keys = at::empty({num_tokens, window, d}, chunk.options());
  auto valid = at::empty({num_tokens, window}, chunk.options().dtype(at::kBool));
  if (num_tokens == 0) return {keys, valid};
  const int64_t rows = num_tokens * window;
  const int64_t per_cta = kKvWarps * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((rows + per_cta - 1) / per_cta));
  window_gather_fp8_bf16_kernel<<<grid, kKvWarps * kWarp, 0, current_stream()>>>(
      ring.data_ptr<uint8_t>(), reinterpret_cast<const __nv_bfloat16*>(chunk.data_ptr()),
      positions.data_ptr<int64_t>(), token_seq.data_ptr<int64_t>(), seq_slot.data_ptr<int64_t>(),
      seq_start.data_ptr<int64_t>(), seq_first_row.data_ptr<int64_t>(),
      reinterpret_cast<__nv_bfloat16*>(keys.data_ptr()), valid.data_ptr<bool>(), static_cast<int>(num_tokens),
      static_cast<int>(ring.size(0)), static_cast<int>(window), static_cast<int>(d), g);
  DSV4_LAUNCH_CHECK();
  return {keys, valid};
}

std::vector<at::Tensor> gather_entries(const at::Tensor& pool, const at::Tensor& entries, const at::Tensor& token_seq,
                                       const at::Tensor& block_table, int64_t block_size, int64_t ratio, int64_t nope,
                                       int64_t rope) {
  check_cuda(pool, "pool");
  check_cuda(entries, "entries");
  check_cuda(block_table, "block_table");
  check_dim(pool, 3, "pool");
  check_dim(entries, 2, "entries");
  check_dim(block_table, 2, "block_table");
  check_dtype(entries, at::kLong, "entries");
  check_dtype(block_table, at::kLong, "block_table");
  check_layout_vec(token_seq, "token_seq");
  const EntryGeometry g = check_main_geometry(pool, nope, rope);
  TORCH_CHECK(ratio > 0 && block_size % ratio == 0 && pool.size(1) == block_size / ratio,
              "pool has ", pool.size(1), " entries per block; block_size ", block_size, " / ratio ", ratio);
  const int64_t d = nope + rope, num_tokens = entries.size(0), k = entries.size(1);
  TORCH_CHECK(token_seq.numel() == num_tokens, "entries and token_seq disagree on T");
  const c10::cuda::CUDAGuard guard(pool.device());
  auto tile = at::empty({num_tokens, k, d}, pool.options().dtype(at::kBFloat16));
  auto valid = at::empty({num_tokens, k}, pool.options().dtype(at::kBool));
  const int64_t rows = num_tokens * k;
  if (rows == 0) return {tile, valid};
  const int64_t per_cta = kKvWarps * kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((rows + per_cta - 1) / per_cta));
  gather_entries_fp8_bf16_kernel<<<grid, kKvWarps * kWarp, 0, current_stream()>>>(
      pool.data_ptr<uint8_t>(), entries.data_ptr<int64_t>(), token_seq.data_ptr<int64_t>(),
      block_table.data_ptr<int64_t>(), reinterpret_cast<__nv_bfloat16*>(tile.data_ptr()), valid.data_ptr<bool>(),
      rows, static_cast<int>(k), static_cast<int>(block_table.size(1)), static_cast<int>(pool.size(0)),
      static_cast<int>(pool.size(1)), static_cast<int>(d), g);
  DSV4_LAUNCH_CHECK();
  return {tile, valid};
}

}  // namespace dsv4
