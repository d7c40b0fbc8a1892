"""Makes Triton's CPU interpreter (TRITON_INTERPRET=1) compute what the GPU computes, for the CPU tests of the
fast-path Triton kernels.

Triton 3.6's interpreter (`triton.runtime.interpreter`) emulates float conversions bit by bit with numpy and gets
two things wrong that our kernels rely on:
- downcasts (fp32 -> bf16 / e4m3 / e5m2) add the first dropped bit instead of rounding to nearest even, and a
  carry out of the mantissa is lost (1.9777 -> e4m3 gives 1.0 instead of 2.0);
- `tl.dot` on bf16 operands multiplies their raw uint16 storage as integers.
And with numpy >= 2.4 a third: scalars are 1-element arrays whose `__index__` calls int(array), which numpy
rejects, so loops with bounds computed at run time (`range(lo, hi)` on tensors) fail.
`patch()` replaces the converter with torch's (round-to-nearest-even, which is what the GPU's cvt.rn does; fp8
targets saturate to the format's finite range like cvt.rn.satfinite), upcasts bf16/fp8 dot operands to fp32
exactly, and makes `__index__` take the element. All are fixes of the simulator only: kernels run unchanged on
the GPU.
"""

from __future__ import annotations

import numpy as np
import torch

_TORCH_OF = {}   # tl dtype name -> (torch dtype, numpy storage dtype)


def _tables():
    import triton.language as tl

    if not _TORCH_OF:
        _TORCH_OF.update({
            tl.float32: (torch.float32, np.float32), tl.float64: (torch.float64, np.float64),
            tl.float16: (torch.float16, np.float16), tl.bfloat16: (torch.bfloat16, np.uint16),
            tl.float8e4nv: (torch.float8_e4m3fn, np.uint8), tl.float8e5: (torch.float8_e5m2, np.uint8),
        })
    return _TORCH_OF


_STORAGE_INT = {np.dtype(np.uint16): torch.int16, np.dtype(np.uint8): torch.uint8}


def _to_torch(data: np.ndarray, tl_dtype) -> torch.Tensor:
    torch_dtype, storage = _tables()[tl_dtype]
    arr = np.ascontiguousarray(data).view(storage)
    if storage in (np.uint16, np.uint8):
        raw = torch.from_numpy(arr.view(np.int16) if storage is np.uint16 else arr)
        return raw.view(torch_dtype)
    return torch.from_numpy(arr).to(torch_dtype)


def _from_torch(t: torch.Tensor, tl_dtype) -> np.ndarray:
    torch_dtype, storage = _tables()[tl_dtype]
    t = t.to(torch_dtype).contiguous()
    if storage is np.uint16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if storage is np.uint8:
        return t.view(torch.uint8).numpy()
    return t.numpy()


def _convert_float(input, input_dtype, output_dtype, rounding_mode):
    tables = _tables()
    if input_dtype not in tables or output_dtype not in tables:
        return _ORIGINAL["convert"](input, input_dtype, output_dtype, rounding_mode)
    x = _to_torch(input, input_dtype)
    target = tables[output_dtype][0]
    if target in (torch.float8_e4m3fn, torch.float8_e5m2):
        finite = torch.finfo(target).max
        x = torch.where(torch.isnan(x.float()), x.float(), x.float().clamp(-finite, finite))
    return _from_torch(x, output_dtype).reshape(np.shape(input))


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    from triton.runtime.interpreter import TensorHandle

    def as_f32(h):
        if h.dtype.scalar in _tables() and h.dtype.scalar.primitive_bitwidth < 32 and h.dtype.scalar.is_floating():
            return _to_torch(h.data, h.dtype.scalar).float().numpy().reshape(np.shape(h.data))
        return h.data

    out = np.matmul(as_f32(a).astype(np.float32), as_f32(b).astype(np.float32)).astype(d.data.dtype)
    return TensorHandle(out + d.data, d.dtype.scalar)


_ORIGINAL: dict = {}


def patch() -> None:
    """Idempotent: install the fixes into triton.runtime.interpreter."""
    import triton.runtime.interpreter as interp

    if _ORIGINAL:
        return
    _ORIGINAL["convert"] = interp._convert_float
    interp._convert_float = _convert_float
    interp.InterpreterBuilder.create_dot = _create_dot
    patch_tensor = _ORIGINAL["patch_tensor"] = interp._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
