"""Benchmark cases of the fast norms, RoPE, q / KV-entry finishing and window append (`dsv4.kernels.fast.norm`) at
V4-Flash decode shapes (D = 4096, q_lora 1024, 64 heads x 512 = 448 + 64 rope), each checked against the reference
(float64 norms / RoPE, exact quantizers, `cache_ops.window_append`) on the same GPU tensors.

Target (fast numerics issue): each a single graph node of ~2 us or less at decode batch 1..128.

    python benchmarks/fast_cases_norm.py [--only kv_entry]
"""

from __future__ import annotations

import sys

import torch
from harness import DEV, Case, gen, run_cases

from dsv4.kernels import cache_ops, quant, ref_math
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import norm
from dsv4.kernels.kv_format import MainFp8Codec
from dsv4.model.layers import rope_inv_freq

HIDDEN, Q_LORA, HEADS, HEAD, NOPE, WINDOW, EPS = 4096, 1024, 64, 512, 448, 128, 1e-6
TARGET = "<= 2 us graph"


def ulps(got: torch.Tensor, want: torch.Tensor) -> str:
    diff = (got.float() - want.float()).abs()
    worst = float((diff / want.float().abs().clamp(min=2.0 ** -126)).max())
    return f"{float((got != want).float().mean()):.0e} differ, max rel {worst:.1e}"


def exact(got: torch.Tensor, want: torch.Tensor) -> str:
    return "exact" if torch.equal(got, want) else f"MISMATCH ({int((got != want).sum())} elements)"


def ref_rms_norm(x, w):
    return ref_math.rms_norm(x, w, EPS).to(torch.bfloat16)


def decode_cases(b: int) -> list[Case]:
    g = gen(b)
    freq = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)).to(DEV)
    codec = MainFp8Codec(NOPE, HEAD - NOPE)
    pos = torch.randint(0, 1 << 17, (b,), generator=g, device=DEV)
    x = torch.randn(b, HIDDEN, generator=g, device=DEV).bfloat16()
    w = (torch.randn(HIDDEN, generator=g, device=DEV) * 0.1 + 1).bfloat16()
    qr = torch.randn(b, Q_LORA, generator=g, device=DEV).bfloat16()
    wq = w[:Q_LORA].contiguous()
    q = torch.randn(b, HEADS, HEAD, generator=g, device=DEV).bfloat16()
    kv = torch.randn(b, HEAD, generator=g, device=DEV).bfloat16()
    wkv = w[:HEAD].contiguous()
    layout = BatchLayout.from_chunks([(s, 1000 + 13 * s, 1, [s]) for s in range(b)], 256, DEV)
    ring = codec.encode(torch.randn(b * WINDOW, HEAD, generator=g, device=DEV).bfloat16()).view(b, WINDOW, -1)
    ring_ref = ring.clone()
    entry = quant.fake_quant_kv(kv, HEAD - NOPE)

    def q_ref():
        return ref_math.apply_rope(ref_rms_norm(q, None), pos, freq)

    def kv_ref():
        return quant.fake_quant_kv(ref_math.apply_rope(ref_rms_norm(kv, wkv), pos, freq), HEAD - NOPE)

    def append_check() -> str:
        norm.window_append(ring, codec, entry, layout)
        cache_ops.window_append(ring_ref, codec, entry, layout)
        return exact(ring, ring_ref)

    calls = [   # (kernel, shape, run, reference, bytes)
        ("fast rms_norm (attn_norm / ffn_norm)", f"D={HIDDEN}", lambda: norm.rms_norm(x, w, EPS),
         lambda: ref_rms_norm(x, w), 2 * x.numel() * 2 + HIDDEN * 2),
        ("fast rms_norm (q_norm)", f"D={Q_LORA}", lambda: norm.rms_norm(qr, wq, EPS), lambda: ref_rms_norm(qr, wq),
         2 * qr.numel() * 2 + Q_LORA * 2),
        ("fast head_norm_rope (q: per-head RMSNorm + RoPE)", f"{HEADS}x{HEAD}",
         lambda: norm.head_norm_rope(q, pos, freq, EPS), q_ref, 2 * q.numel() * 2),
        ("fast rope inverse (attention output)", f"{HEADS}x{HEAD}", lambda: norm.rope(q, pos, freq, True),
         lambda: ref_math.apply_rope(q, pos, freq, True), 2 * q.numel() * 2),
        ("fast kv_entry (RMSNorm + RoPE + FP8 KV simulation)", f"d={HEAD}",
         lambda: norm.kv_entry(kv, wkv, EPS, pos, freq, NOPE), kv_ref, 2 * kv.numel() * 2),
    ]
    out = [Case(kernel, f"decode B={b}, {shape}", run, ref, lambda run=run, ref=ref: ulps(run(), ref()), moved,
                TARGET, None, 2.0, ref_reps=3) for kernel, shape, run, ref, moved in calls]
    out.append(Case("fast window_append (FP8 encode + ring store)", f"decode B={b}",
                    lambda: norm.window_append(ring, codec, entry, layout),
                    lambda: cache_ops.window_append(ring_ref, codec, entry, layout), append_check,
                    b * (HEAD * 2 + codec.width), TARGET, None, 2.0))
    return out


def cases() -> list[Case]:
    return decode_cases(1) + decode_cases(128)


def main(argv: list[str] | None = None) -> int:
    return run_cases("fast-norm", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
