"""A straightforward ``unfold``-based Bi-Mask convolution, written only as a speed baseline.

This is how a research implementation typically gets a custom input gradient for a conv: unfold the
input into columns, multiply by the masked weight matrix, and fold the column gradient back. It is
correct (same masks, same gradients as :class:`bimask_hf.BiMaskConv2d`) but materialises the
``(B, C*kh*kw, L)`` column tensor in both passes. ``benchmarks/step_time.py`` compares it with our
layers, which use PyTorch's native convolution kernels.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bimask_hf import BiMaskConv2d, sparse_layers


class _UnfoldConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fwd_mask, bwd_mask, decay, stride, padding, dilation):  # type: ignore[override]
        batch, _, height, width = x.shape
        out_ch, _, kh, kw = weight.shape
        cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # (B, K, L)
        out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
        y = (weight * fwd_mask).reshape(out_ch, -1) @ cols  # (B, O, L)
        if bias is not None:
            y = y + bias.view(1, -1, 1)
        ctx.save_for_backward(cols, weight, fwd_mask, bwd_mask)
        ctx.geometry = (x.shape, stride, padding, dilation, bias is not None, decay)
        return y.reshape(batch, out_ch, out_h, out_w)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        cols, weight, fwd_mask, bwd_mask = ctx.saved_tensors
        x_shape, stride, padding, dilation, has_bias, decay = ctx.geometry
        out_ch, _, kh, kw = weight.shape
        g = grad_out.reshape(grad_out.shape[0], out_ch, -1)  # (B, O, L)
        grad_cols = (weight * bwd_mask).reshape(out_ch, -1).T @ g  # (B, K, L)
        grad_x = F.fold(grad_cols, x_shape[2:], (kh, kw), dilation=dilation, padding=padding, stride=stride)
        grad_w = torch.einsum("bol,bkl->ok", g, cols).reshape(weight.shape)
        grad_w = grad_w + decay * weight * (~fwd_mask)
        grad_b = g.sum((0, 2)) if has_bias else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class UnfoldBiMaskConv2d(BiMaskConv2d):
    """Same masks and gradients as :class:`BiMaskConv2d`, computed through ``unfold``/``fold``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups != 1 or self.padding_mode != "zeros":
            return super().forward(x)
        mf, mb = self.masks()
        return _UnfoldConvFn.apply(
            x, self.weight, self.bias, mf, mb, self.decay, self.stride, self._explicit_padding, self.dilation
        )


def use_unfold_convs(model: nn.Module) -> nn.Module:
    """Switch every :class:`BiMaskConv2d` of a sparsified model to the unfold implementation, in place."""
    for layer in sparse_layers(model).values():
        if type(layer) is BiMaskConv2d:
            layer.__class__ = UnfoldBiMaskConv2d
    return model
