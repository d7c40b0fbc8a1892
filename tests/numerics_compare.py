"""How close one numerics' logits are to another's: the three numbers the fast path is judged by (relative L2
error of the logits, mean KL divergence, top-1 agreement), shared by the CPU and GPU tolerance tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class Distance:
    rel_l2: float      # ||other - ref|| / ||ref|| over all positions and the vocabulary
    kl: float          # mean over positions of KL(softmax(ref) || softmax(other))
    top1: float        # fraction of positions whose argmax agrees

    def __str__(self) -> str:
        return f"rel L2 {self.rel_l2:.2e}, KL {self.kl:.2e}, top-1 {100 * self.top1:.2f} %"


def logit_distance(ref: torch.Tensor, other: torch.Tensor) -> Distance:
    """ref, other: [N, vocab] logits of the same N positions."""
    ref, other = ref.double(), other.double()
    rel = float((other - ref).norm() / ref.norm())
    log_p, log_q = ref.log_softmax(-1), other.log_softmax(-1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    top1 = float((ref.argmax(-1) == other.argmax(-1)).double().mean())
    return Distance(rel, kl, top1)


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor, max_fraction: float = 0.01,
                      row_ulps: float = 0.0) -> None:
    """bf16 outputs within one bf16 ulp of each reference element, plus `row_ulps` ulps of the largest element of
    its row (the last dim), and unequal in at most `max_fraction` of the elements. row_ulps > 0 where a rounding
    follows a cancellation (a rotation, a mix of streams) and the last fp32 bits are not the reference's (FMA
    contraction and libdevice on the GPU): the error is then relative to the row, not to the element."""
    got = got.cpu()
    assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    if want.numel() == 0:
        return
    diff = (got.float() - want.float()).abs()
    ulp = 2.0 ** -7
    bound = want.float().abs().clamp(min=2.0 ** -126) * ulp
    if row_ulps:
        bound = bound + want.float().abs().amax(-1, keepdim=True) * ulp * row_ulps
    assert bool((diff <= bound).all()), f"max |diff| {float(diff.max()):.3g} beyond the bound"
    fraction = float((got != want).float().mean())
    print(f"bf16 outputs differing: {fraction:.2e}")
    assert fraction <= max_fraction, fraction


class Bf16MatmulsInFp32(torch.overrides.TorchFunctionMode):
    """Run bf16 matrix products as fp32 GEMMs of the bf16 operands, the result rounded to bf16: what a bf16 GEMM
    with fp32 accumulation computes (up to the order of the sums), at fp32 speed on CPUs without bf16 units (an
    AVX2-only host runs PyTorch's bf16 matmul ~50x slower than fp32). For transformers' model in bf16, the
    tolerance tests' yardstick; every other op stays in bf16."""

    PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.mm,
                torch.nn.functional.linear, torch.einsum}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if func in self.PRODUCTS and tensors and all(t.dtype == torch.bfloat16 for t in tensors):
            def up(a):
                return a.float() if isinstance(a, torch.Tensor) else a
            return func(*(up(a) for a in args), **{k: up(v) for k, v in kwargs.items()}).to(torch.bfloat16)
        return func(*args, **kwargs)


def slow_bf16_matmuls() -> bool:
    """Whether this CPU runs bf16 matrix products far slower than fp32 (no bf16 units: AVX2-only hosts measured
    ~50x slower), so that transformers' bf16 yardstick should run under `Bf16MatmulsInFp32`."""
    import time

    a = torch.randn(128, 256, 256)

    def seconds(x: torch.Tensor) -> float:
        x @ x                                        # warm-up
        start = time.perf_counter()
        x @ x
        return time.perf_counter() - start

    return seconds(a.bfloat16()) > 5 * seconds(a)
