"""Routed experts of the fast numerics (spec §5.2-5.3): one MoE layer's local experts stacked in their checkpoint
formats, run on (row, expert, weight) pairs as grouped GEMMs with the clamped SwiGLU fused, then combined.

Formats (`ExpertWeights`, `dsv4.kernels.quant`): "fp4" (instruct checkpoints) int8 bytes holding two e2m1 codes
with one UE8M0 scale per row per 32 columns, the bytes stacked in split nibble order (`quant.split_fp4_nibbles`:
per 64 columns, byte j holds columns j and 32 + j, so the kernels read each 32-column scale group as one
natural-order operand, with no register shuffles); "fp8" float8_e4m3fn with one UE8M0 scale per 128x128 tile;
"bf16". w13 stacks w1 (gate, rows 0..I-1) over w3 (up, rows I..2I-1).

Math per pair p (expert e = pair_expert[p], routing weight w = pair_weight[p], row u = x[pair_row[p]]), the
reference `Expert` in reference numerics:
  u^ = fake_quant_fp8(u, 128); g = bf16(W1 u^), v = bf16(W3 u^)
  h = w * (silu(min(g, L)) * clamp(v, -L, L))              (fp32)
  h^ = fake_quant_fp8(bf16(h), 128); y_p = bf16(W2 h^)
(fmt "bf16": no activation quantization.) Every product of a fake-quantized activation and a dequantized weight
is exact (few significant bits each): the kernels multiply e4m3 activations by e4m3-exact weights (FP4 unpacked
to e4m3 in registers) on tensor cores, one 32-deep dot per FP4 scale, promoted into fp32 accumulators with the
scales. Differences from the reference: summation order (fp32 vs float64), Hopper's FP8 MMA accumulation inside
32-deep dots (~2^-14 relative), silu in fp32; then an occasional bf16 / e4m3 rounding flip of g, v or h.

Dispatch, GEMMs and combine run on the device with shapes fixed by (P, E, BLOCK_M): see `_moe_triton`. CPU tensors
run a PyTorch twin of the same structure (dispatch into padded per-expert blocks, per-expert GEMMs of the exact
quantized values in fp32, scatter back), so CI covers the logic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.kernels import quant
from dsv4.kernels.fast import linear

FORMATS = ("fp4", "fp8", "bf16")
QBLOCK = 128
DECODE_KERNEL = "wgmma"         # the CUDA decode kernel (`_moe_cuda.KERNELS`) of the production path
# Up to how many expected pairs per expert each CUDA decode kernel beats the Triton path (`decode_block_m`).
DECODE_MAX_PAIRS_PER_EXPERT = {"mma": 2, "wgmma": 3, "wgmma-ring": 3}


@dataclass(frozen=True)
class ExpertWeights:
    """One MoE layer's local routed experts, stacked, in checkpoint formats.

    fp4:  w13 int8 [E, 2I, D/2], s13 float8_e8m0fnu [E, 2I, D/32], w2 int8 [E, D, I/2], s2 e8m0 [E, D, I/32];
          the bytes in split nibble order (module doc), the scales as in the checkpoint
    fp8:  w13 float8_e4m3fn [E, 2I, D], s13 e8m0 [E, 2I/128, D/128], w2 [E, D, I], s2 [E, D/128, I/128]
    bf16: w13 bf16 [E, 2I, D], w2 bf16 [E, D, I], no scales.
    """
    fmt: str
    w13: torch.Tensor
    s13: torch.Tensor | None
    w2: torch.Tensor
    s2: torch.Tensor | None

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w2.shape[1]

    @property
    def inter_size(self) -> int:
        return self.w13.shape[1] // 2

    def dense(self, name: str, expert: int) -> torch.Tensor:
        """Expert `expert`'s "w13" [2I, D] or "w2" [D, I] as exact fp32 values."""
        w, s = getattr(self, name)[expert], getattr(self, "s" + name[1:])
        s = None if s is None else s[expert]
        if self.fmt == "fp4":
            return quant.dequantize_weight_fp4(w, s, split=True)
        if self.fmt == "fp8":
            return quant.dequantize_weight_fp8(w, s)
        return w.float()


def stack_experts(per_expert: Sequence[tuple], fmt: str) -> ExpertWeights:
    """[(w1, s1, w3, s3, w2, s2), ...] in checkpoint layout -> freshly allocated stacked tensors on the inputs'
    device (scales None for bf16; FP4 bytes in split nibble order)."""
    if fmt not in FORMATS:
        raise ValueError(f"expert format must be one of {FORMATS}, got {fmt!r}")
    if not per_expert:
        raise ValueError("stack_experts needs at least one expert")
    w1, s1, _, _, w2, s2 = per_expert[0]
    num, inter = len(per_expert), w1.shape[0]
    _check_widths(w2.shape[0], inter)
    w13 = torch.empty(num, 2 * inter, *w1.shape[1:], dtype=w1.dtype, device=w1.device)
    w2s = torch.empty(num, *w2.shape, dtype=w2.dtype, device=w2.device)
    quantized = fmt != "bf16"
    if quantized:
        s13 = torch.empty(num, 2 * s1.shape[0], s1.shape[1], dtype=torch.uint8, device=w1.device)
        s2s = torch.empty(num, *s2.shape, dtype=torch.uint8, device=w1.device)
    order = quant.split_fp4_nibbles if fmt == "fp4" else (lambda w: w)
    for i, (a1, b1, a3, b3, a2, b2) in enumerate(per_expert):
        if a1.shape != w1.shape or a3.shape != w1.shape or a2.shape != w2.shape:
            raise ValueError(f"expert {i}: shapes {tuple(a1.shape)}, {tuple(a3.shape)}, {tuple(a2.shape)} differ "
                             f"from expert 0's {tuple(w1.shape)}, {tuple(w2.shape)}")
        w13[i, :inter].copy_(order(a1))
        w13[i, inter:].copy_(order(a3))
        w2s[i].copy_(order(a2))
        if quantized:   # scales copied as bytes (e8m0 has few kernels); fp32 powers of two re-encoded exactly
            rows = s1.shape[0]
            s13[i, :rows].copy_(_e8m0_bytes(b1))
            s13[i, rows:].copy_(_e8m0_bytes(b3))
            s2s[i].copy_(_e8m0_bytes(b2))
    weights = ExpertWeights(fmt, w13, s13.view(torch.float8_e8m0fnu) if quantized else None, w2s,
                            s2s.view(torch.float8_e8m0fnu) if quantized else None)
    _check(weights)
    return weights


def _e8m0_bytes(scale: torch.Tensor) -> torch.Tensor:
    if scale.dtype == torch.float32:
        return quant.ue8m0_codes(scale)
    return scale.view(torch.uint8)


def _check_widths(d: int, inter: int) -> None:
    if d % QBLOCK or inter % QBLOCK:
        raise ValueError(f"experts need hidden and intermediate sizes that are multiples of 128, got {d}, {inter}")


def _check(w: ExpertWeights) -> None:
    d, inter = w.hidden_size, w.inter_size
    _check_widths(d, inter)
    packed = 2 if w.fmt == "fp4" else 1
    want = {"w13": (2 * inter, d // packed), "w2": (d, inter // packed)}
    if w.fmt == "fp4":
        want.update(s13=(2 * inter, d // 32), s2=(d, inter // 32))
    elif w.fmt == "fp8":
        want.update(s13=(2 * inter // QBLOCK, d // QBLOCK), s2=(d // QBLOCK, inter // QBLOCK))
    for name, shape in want.items():
        got = tuple(getattr(w, name).shape[1:])
        if got != shape:
            raise ValueError(f"{w.fmt} experts: {name} has per-expert shape {got}, expected {shape}")


# ---------------------------------------------------------------------------------------------- public API
def expert_forward(x: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor, pair_weight: torch.Tensor,
                   experts: ExpertWeights, swiglu_limit: float, decode_kernel: bool = True) -> torch.Tensor:
    """Routed experts on pairs: x [R, D] bf16; pair_row int [P] (rows of x); pair_expert int32 [P] (local expert
    0..E-1; -1 or any other value = not on this rank: its y row is 0); pair_weight fp32 [P] -> y bf16 [P, D] in
    pair order (math in the module docstring). P may be 0; any routing (one hot expert, empty experts) is fine.

    On CUDA, FP4 experts with <= 2 expected pairs per expert (small decode batches) run the CUDA decode GEMMs
    (`_moe_cuda`, mma.sync over blocks of 8 rows) unless decode_kernel is False; the rest the Triton grouped GEMMs."""
    if x.shape[-1] != experts.hidden_size:
        raise ValueError(f"x has {x.shape[-1]} features, the experts {experts.hidden_size}")
    if not pair_row.shape == pair_expert.shape == pair_weight.shape:
        raise ValueError(f"pair arrays differ in shape: {tuple(pair_row.shape)}, {tuple(pair_expert.shape)}, "
                         f"{tuple(pair_weight.shape)}")
    x = x.to(torch.bfloat16).contiguous()
    num_pairs, num_experts = pair_expert.shape[0], experts.num_experts
    if not x.is_cuda:
        return _twin_expert_forward(x, pair_row, pair_expert, pair_weight.float(), experts, swiglu_limit,
                                    block_m_for(num_pairs, num_experts))
    from dsv4.kernels.fast import _moe_cuda, _moe_triton

    args = (x, pair_row, pair_expert.to(torch.int32), pair_weight.float(), experts, swiglu_limit)
    decode_m = decode_block_m(num_pairs, num_experts)
    if decode_kernel and _moe_cuda.supports(experts, decode_m, DECODE_KERNEL):
        return _moe_cuda.expert_forward(*args, decode_m, DECODE_KERNEL)
    return _moe_triton.expert_forward(*args, block_m=block_m_for(num_pairs, num_experts))


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per expert block: the expected pairs per expert under uniform routing, as a power of two in 16..64."""
    per_expert = max(1, -(-num_pairs // max(num_experts, 1)))
    return min(64, max(16, 1 << (per_expert - 1).bit_length()))


def shared_expert_forward(x: torch.Tensor, w13: linear.Fp8Weight, w2: linear.Fp8Weight, swiglu_limit: float
                          ) -> torch.Tensor:
    """The shared expert (FP8) as two FP8 linears around a fused clamped SwiGLU: x [T, D] bf16, w13 the gate rows
    over the up rows [2I, D], w2 [D, I] -> y bf16 [T, D]. The math of `expert_forward` for one expert of weight 1
    (g, v bf16 from the linears; h = bf16(silu(min(g, L)) * clamp(v, -L, L)), FP8-quantized by the second linear);
    on the GPU the linears' decode kernel streams the weights faster than the grouped GEMM with E = 1."""
    gu = linear.fp8_linear(x.to(torch.bfloat16), w13)                                # [T, 2I] bf16
    if gu.is_cuda:
        from dsv4.kernels.fast import _moe_triton

        h = _moe_triton.swiglu(gu.contiguous(), swiglu_limit)
    else:
        inter = gu.shape[-1] // 2
        g, v = gu[:, :inter].float().clamp(max=swiglu_limit), gu[:, inter:].float().clamp(-swiglu_limit, swiglu_limit)
        h = (torch.nn.functional.silu(g) * v).to(torch.bfloat16)
    return linear.fp8_linear(h, w2)


def decode_block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per expert block of the CUDA decode kernels, 0 where the Triton kernels take over: 8 up to 3 expected
    pairs per expert. H100, graph nodes, one 64-expert rank at 1 / 8 / 21 / 32 / 64 tokens: wgmma 53.5 / 236 / 356
    / 408 / 508 us, mma.sync 60.0 / 252 / 394 / - / -, Triton 71.8 / 300 / - / 460 / 496 (16-row wgmma blocks and
    the cp.async ring lose everywhere). mma.sync alone stays at 2 (on the H200: 55 vs 68 us, 230 vs 273 us)."""
    per_expert = -(-num_pairs // max(num_experts, 1))
    return 8 if per_expert <= DECODE_MAX_PAIRS_PER_EXPERT[DECODE_KERNEL] else 0


def combine_pairs(y: torch.Tensor, k: int) -> torch.Tensor:
    """y [T*k, D] bf16 (token t's slots at rows t*k .. t*k+k-1) -> [T, D] fp32, summed in fp32 in slot order."""
    if y.shape[0] % k:
        raise ValueError(f"{y.shape[0]} pair rows are not a multiple of k={k}")
    if y.is_cuda:
        from dsv4.kernels.fast import _moe_triton

        return _moe_triton.combine_pairs(y.contiguous(), k)
    slots = y.view(-1, k, y.shape[-1]).float()
    total = torch.zeros_like(slots[:, 0])
    for j in range(k):
        total = total + slots[:, j]
    return total


# ---------------------------------------------------------------------------------------------- CPU twin
@dataclass(frozen=True)
class Dispatch:
    """Pairs grouped into per-bucket blocks of `block_m` rows (bucket E = off-rank pairs), as the kernels lay
    them out: sorted_pair [num_blocks * block_m] (row -> pair, -1 for padding), block_bucket [num_blocks] (-1 =
    unused), bucket_start / bucket_count [E + 1] (first row, pairs)."""
    block_m: int
    sorted_pair: torch.Tensor
    block_bucket: torch.Tensor
    bucket_start: torch.Tensor
    bucket_count: torch.Tensor


def dispatch_pairs(pair_expert: torch.Tensor, num_experts: int, block_m: int) -> Dispatch:
    """The dispatch in torch ops (the twin's, and the oracle of the kernels' dispatch in the tests)."""
    num_pairs = pair_expert.shape[0]
    e = pair_expert.long()
    bucket = torch.where((e >= 0) & (e < num_experts), e, num_experts)
    nb = num_experts + 1
    count = torch.zeros(nb, dtype=torch.long, device=e.device).scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (count + block_m - 1) // block_m * block_m
    start = padded.cumsum(0) - padded
    num_blocks = num_pairs // block_m + min(nb, num_pairs)
    order = torch.argsort(bucket, stable=True)
    first = count.cumsum(0) - count                                     # first position of each bucket in `order`
    sorted_bucket = bucket[order]
    dest = start[sorted_bucket] + torch.arange(num_pairs, device=e.device) - first[sorted_bucket]
    sorted_pair = torch.full((num_blocks * block_m,), -1, dtype=torch.int32, device=e.device)
    sorted_pair[dest] = order.to(torch.int32)
    row0 = torch.arange(num_blocks, device=e.device) * block_m
    block = ((start + padded)[None, :] <= row0[:, None]).sum(1)
    block_bucket = torch.where(block < nb, block, -1).to(torch.int32)
    return Dispatch(block_m, sorted_pair, block_bucket, start.to(torch.int32), count.to(torch.int32))


def _act(a: torch.Tensor, fmt: str) -> torch.Tensor:
    """The exact fake-quantized activation values in fp32 (bf16 values as is for fmt bf16)."""
    a = a.to(torch.bfloat16)
    return a.float() if fmt == "bf16" else quant.fake_quant_fp8(a.float(), QBLOCK)


def _twin_expert_forward(x: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
                         pair_weight: torch.Tensor, experts: ExpertWeights, limit: float, block_m: int
                         ) -> torch.Tensor:
    """dispatch -> per-expert GEMM 1 + SwiGLU -> GEMM 2 -> y rows in pair order; fp32 GEMMs of exact values."""
    num_pairs, inter, fmt = pair_expert.shape[0], experts.inter_size, experts.fmt
    y = torch.zeros(num_pairs, experts.hidden_size, dtype=torch.bfloat16, device=x.device)
    if num_pairs == 0:
        return y
    plan = dispatch_pairs(pair_expert, experts.num_experts, block_m)
    for e in range(experts.num_experts):
        start, count = int(plan.bucket_start[e]), int(plan.bucket_count[e])
        if count == 0:
            continue
        pairs = plan.sorted_pair[start:start + count].long()
        w13 = experts.dense("w13", e)
        gu = (_act(x[pair_row[pairs].long()], fmt) @ w13.t()).to(torch.bfloat16).float()
        g, v = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        h = pair_weight[pairs, None] * (torch.nn.functional.silu(g) * v)
        w2 = experts.dense("w2", e)
        y[pairs] = (_act(h, fmt) @ w2.t()).to(torch.bfloat16)
    return y
