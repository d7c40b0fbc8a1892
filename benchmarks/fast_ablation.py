"""Which fast-numerics op family moves the GPU's logits away from the reference: a per-family ablation.

The `fast` families run Triton kernels on CUDA tensors and PyTorch twins of the same structure on CPU tensors.
This runs the teacher-forced comparison of `tests/gpu/test_model_fast_gpu.py` (small preset, 4096 positions) once
with every family on the GPU, then once per family with that family's calls routed through its CPU twin (inputs
copied to the host, outputs and in-place updates copied back), and once with every family on the twins. A family
whose twin brings the distance down is one whose kernel departs from its twin by more than rounding.

    python benchmarks/fast_ablation.py [--preset small] [--positions 4096] [--families linear,experts]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import sys
import tempfile
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from numerics_compare import logit_distance  # noqa: E402

from dsv4.model.checkpoint import load_model  # noqa: E402
from dsv4.model.compressor import Compressor  # noqa: E402
from dsv4.model.config import preset  # noqa: E402
from dsv4.model.generate import forward_logits  # noqa: E402
from dsv4.model.layers import Linear  # noqa: E402
from dsv4.model.numerics import Numerics  # noqa: E402
from dsv4.model.synthetic import write_checkpoint  # noqa: E402

FAMILIES = ("math", "linear", "attention", "indexer", "compressor", "router", "experts", "mhc")


class OnHost:
    """A family whose every call runs on CPU copies of its arguments: tensors (also inside dataclasses, dicts,
    lists) are copied to the host and copied back after the call (the in-place stores: rings, pools, states);
    modules become host proxies holding what the fast families read (cached: weights do not change)."""

    def __init__(self, family: object):
        self.family = family
        self.modules: dict[int, object] = {}

    def __call__(self, *args, **kwargs):          # the linear family is called as well as having methods
        return self.__getattr__("__call__")(*args, **kwargs)

    def __getattr__(self, name: str):
        method = getattr(self.family, name)
        if not callable(method) or name == "prepare":
            return method

        def call(*args, **kwargs):
            copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}     # id -> (device tensor, host copy)

            def tensor(t: torch.Tensor) -> torch.Tensor:
                if not t.is_cuda:
                    return t
                if id(t) not in copies:        # a tensor passed twice is copied once
                    copies[id(t)] = (t, t.cpu().clone())
                return copies[id(t)][1]

            out = method(*_to_host(args, tensor, self._module), **_to_host(kwargs, tensor, self._module))
            for device_t, host_t in copies.values():       # the in-place stores back to the device
                device_t.copy_(host_t)
            return _to_device(out)

        return call

    def _module(self, module: torch.nn.Module):
        if id(module) not in self.modules:
            self.modules[id(module)] = _module_proxy(module)
        return self.modules[id(module)]


def _to_host(obj, tensor, module):
    """obj with its tensors replaced by tensor(t) and its modules by module(m), through dataclasses (their init
    fields), dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return tensor(obj)
    if isinstance(obj, torch.nn.Module):
        return module(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _to_host(getattr(obj, f.name), tensor, module)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, dict):
        return {k: _to_host(v, tensor, module) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_host(v, tensor, module) for v in obj)
    return obj


def _weights_on_host(obj):
    return _to_host(obj, torch.Tensor.cpu, _module_proxy)


def _module_proxy(module: torch.nn.Module):
    if isinstance(module, Linear):
        return types.SimpleNamespace(compute=module.compute, fmt=module.fmt, weight=module.weight.cpu(),
                                     scale=None if getattr(module, "scale", None) is None else module.scale.cpu(),
                                     extra_repr=module.extra_repr)
    if hasattr(module, "fast_shared"):        # a MoE layer: the stacked experts and their SwiGLU limits
        return types.SimpleNamespace(fast_shared=_weights_on_host(module.fast_shared),
                                     fast_experts=_weights_on_host(getattr(module, "fast_experts", None)),
                                     fast_shared_linears=_weights_on_host(getattr(module, "fast_shared_linears",
                                                                                  None)),
                                     local_expert=module.local_expert, shared_experts=module.shared_experts)
    if hasattr(module, "wgate"):              # a compressor: its two projections (unstacked on the host) and bias
        proxy = types.SimpleNamespace(wkv=_module_proxy(module.wkv), wgate=_module_proxy(module.wgate),
                                      ape=module.ape.cpu(), geometry=module.geometry)
        proxy.projections = functools.partial(Compressor.projections, proxy)
        return proxy
    raise TypeError(f"no host proxy for {type(module).__name__}")


def _to_device(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cuda() if torch.cuda.is_available() else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v) for v in obj)
    return obj


@contextlib.contextmanager
def variant(name: str):
    """Precision variants of the GPU kernels, all families on the GPU (patches undone on exit)."""
    from dsv4.kernels.fast import _moe_triton
    from dsv4.kernels.fast import linear as fast_linear

    patches: list[tuple[object, str, object]] = []

    def patch(owner, attr, value):
        patches.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    if "no-cublas" in name:        # prefill-sized FP8 linears on the Triton kernel instead of cuBLAS's blockwise
        patch(fast_linear, "fp8_linear", functools.partial(fast_linear.fp8_linear, use_cublas=False))
    if "acc32-linear" in name:     # FP8 linears on Triton (no cuBLAS), the MMA's sums promoted every 32 of K
        patch(fast_linear, "fp8_linear", functools.partial(fast_linear.fp8_linear, use_cublas=False, acc_depth=32))
    if "bf16-mma-linear" in name:  # FP8 linears with both operands widened to bf16 (exact; fp32 accumulation)
        patch(fast_linear, "fp8_linear", functools.partial(fast_linear.fp8_linear, mma_fp8=False))
    if "bf16-mma-experts" in name:
        patch(_moe_triton, "expert_forward", functools.partial(_moe_triton.expert_forward, mma_fp8=False))
    reduced = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    if "fp32-reduction" in name:   # cuBLAS bf16 GEMMs without reduced-precision split-K reductions
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced
        for owner, attr, value in reversed(patches):
            setattr(owner, attr, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=3, help="checkpoint seed (the GPU test's)")
    parser.add_argument("--ids-seed", type=int, default=9)
    parser.add_argument("--families", default=",".join(FAMILIES), help="families to ablate one at a time ('' = none)")
    parser.add_argument("--variants", default="", help="comma-separated precision variants ('+' joins patches): "
                        "no-cublas, acc32-linear, bf16-mma-linear, bf16-mma-experts, fp32-reduction")
    parser.add_argument("--device", default="cuda", help="cpu only checks this script's plumbing")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    positions, chunks = args.positions, [args.chunk] * (args.positions // args.chunk)
    with tempfile.TemporaryDirectory() as tmp:
        config = preset(args.preset).replace(max_position_embeddings=positions + 1)
        checkpoint = write_checkpoint(config, Path(tmp), seed=args.seed, progress=None)
        model = load_model(checkpoint, progress=None, device=args.device)
    ids = torch.randint(0, model.config.vocab_size, (positions,),
                        generator=torch.Generator().manual_seed(args.ids_seed))
    fast = Numerics.parse("fast")
    with torch.inference_mode():
        ref = forward_logits(model, ids, Numerics.parse("reference"), chunks).cpu()
        fast.prepare(model)
        runs = [("all on the GPU", fast)]
        runs += [(f"{name} on its CPU twin", dataclasses.replace(fast, **{name: OnHost(getattr(fast, name))}))
                 for name in filter(None, args.families.split(","))]
        if args.families:
            runs.append(("all on the CPU twins", dataclasses.replace(
                fast, **{name: OnHost(getattr(fast, name)) for name in FAMILIES})))
        print(f"{args.preset} preset, {positions} positions, checkpoint seed {args.seed}: fast vs reference",
              flush=True)
        for label, numerics in runs:
            start = time.perf_counter()
            logits = forward_logits(model, ids, numerics, chunks).cpu()
            print(f"  {label:28s} {logit_distance(ref, logits)}   ({time.perf_counter() - start:.0f} s)", flush=True)
        for name in filter(None, args.variants.split(",")):
            start = time.perf_counter()
            with variant(name):
                logits = forward_logits(model, ids, fast, chunks).cpu()
            print(f"  variant {name:20s} {logit_distance(ref, logits)}   ({time.perf_counter() - start:.0f} s)",
                  flush=True)


if __name__ == "__main__":
    main()
