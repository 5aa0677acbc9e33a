"""Depthwise 2-D convolution with a faster CPU backward (used by PPEG).

oneDNN's backward of a depthwise convolution (``groups == channels``) is slow on CPU: measured on
PPEG's 7×7 kernel over a ``[1, 768, 46, 46]`` grid (2 threads, channels_last), forward 2.0 ms
vs forward + backward 38.6 ms in fp32, 3.1 ms vs 188 ms in bf16. Both gradients are convolutions oneDNN does run fast as *forward* passes:

* ``grad_input`` is the forward convolution of the output gradient with the kernel flipped in
  both spatial axes (stride 1, "same" padding of an odd kernel);
* ``grad_weight[c, 0, i, j] = Σ_{b,y,x} grad_out[b, c, y, x] · x_pad[b, c, y + i, x + j]`` is a
  depthwise *correlation* of the padded input with the output gradient as the kernel: one
  depthwise forward call per sample (the gradient is ``[C, 1, H, W]``, the result ``[C, 1, k, k]``),
  summed over the batch in float32 (float64 for float64 input).

The function is the same as ``F.conv2d(x, weight, bias, padding=..., groups=C)``; tests compare
outputs and both gradients with it. Under autocast it computes in the autocast dtype like
``F.conv2d`` does, unless ``compute_dtype`` says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["depthwise_conv2d"]


def _compute_dtype(x: Tensor, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _DepthwiseConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, padding, dtype):  # type: ignore[override]
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            bc = None if bias is None else bias.to(dtype)
            out = F.conv2d(xc, wc, bc, padding=padding, groups=xc.shape[1])
        ctx.save_for_backward(xc, wc)
        ctx.padding = padding
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xc, wc = ctx.saved_tensors
        ph, pw = ctx.padding
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        channels = xc.shape[1]
        acc_dtype = torch.promote_types(xc.dtype, torch.float32)  # sums over the batch
        grad_x = grad_w = grad_b = None
        with torch.autocast(device_type=xc.device.type, enabled=False):
            go = grad_out.to(xc.dtype)
            if ctx.needs_input_grad[0]:
                grad_x = F.conv2d(go, wc.flip(-1, -2), padding=(ph, pw), groups=channels)
                grad_x = grad_x.to(x_dtype)
            if ctx.needs_input_grad[1]:
                acc = None
                for b in range(xc.shape[0]):  # one depthwise correlation per sample
                    xp = F.pad(xc[b : b + 1], (pw, pw, ph, ph))
                    part = F.conv2d(xp, go[b : b + 1].transpose(0, 1), groups=channels)
                    part = part.to(acc_dtype)
                    acc = part if acc is None else acc.add_(part)
                assert acc is not None
                grad_w = acc.transpose(0, 1).to(w_dtype)  # [1, C, kh, kw] -> [C, 1, kh, kw]
            if ctx.has_bias and ctx.needs_input_grad[2]:
                grad_b = go.sum(dim=(0, 2, 3), dtype=acc_dtype).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: tuple[int, int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """``F.conv2d(x, weight, bias, padding, groups=C)`` for ``x [B, C, H, W]``, ``weight [C, 1, kh, kw]``.

    Stride 1, odd kernel, "same" padding (``padding`` defaults to ``(kh // 2, kw // 2)``).
    ``compute_dtype`` overrides the dtype of the convolution (default: the autocast dtype under
    autocast, else the input's; the weight and bias are cast to it). The CPU backward uses the
    two forward convolutions described in the module docstring; elsewhere (CUDA) and without
    gradients this is ``F.conv2d``.
    """
    kh, kw = weight.shape[-2:]
    pad = (kh // 2, kw // 2) if padding is None else (int(padding[0]), int(padding[1]))
    dtype = _compute_dtype(x, compute_dtype)
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not needs_grad or x.device.type != "cpu":
        if compute_dtype is None and torch.is_autocast_enabled(x.device.type):
            return F.conv2d(x, weight, bias, padding=pad, groups=x.shape[1])
        with torch.autocast(device_type=x.device.type, enabled=False):
            b = None if bias is None else bias.to(dtype)
            return F.conv2d(x.to(dtype), weight.to(dtype), b, padding=pad, groups=x.shape[1])
    return _DepthwiseConv2d.apply(x, weight, bias, pad, dtype)
