"""Masked linear and conv2d with Bi-Mask gradients, as private autograd Functions.

For ``y = x (W*Mf)^T + b`` the backward pass returns

* ``dL/dx = g (W*Mb)``                      (the input gradient through the backward mask),
* ``dL/dW = g^T x + decay * (1 - Mf) * W``  (dense straight-through gradient plus SR-STE decay),
* ``dL/db = sum(g)``.

Convolutions use PyTorch's native ops (``conv2d`` forward, one ``convolution_backward`` call for the
input and weight gradients): the weight gradient does not depend on the weight, so passing ``W*Mb``
gives the Bi-Mask input gradient and the dense weight gradient at once. Under ``torch.autocast`` the
matmuls run in the autocast dtype and the weight gradient is returned in the parameter's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import backward_mask_for_weight, graph_mask_dtype

__all__ = ["masked_linear", "masked_conv2d"]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _masked(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``W * mask`` with pruned entries exactly zero: a select for bool masks (eager), a product for the
    0/1 float masks of compiled graphs (:func:`~bimask_hf.masks.graph_mask_dtype`), so the graph holds no
    bool tensor that AOT autograd could choose to save (inductor's CPU kernels store those slowly)."""
    return torch.where(mask, weight, 0.0) if mask.dtype == torch.bool else weight * mask


def _pruned(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * W`` (see :func:`_masked`)."""
    return torch.where(mask, 0.0, weight) if mask.dtype == torch.bool else weight - weight * mask


def _weight_grad_extra(grad_w: torch.Tensor, weight: torch.Tensor, fwd_mask: torch.Tensor, decay: float) -> torch.Tensor:
    grad_w = grad_w.to(weight.dtype)
    if decay:
        # ``(1 - Mf) * W`` (a select, or a product for float masks), scaled in place. Not ``torch.add(..., alpha=)``:
        # inductor (torch 2.9, CPU) miscompiles ``add(mm, t, alpha=a)`` fused behind a matmul.
        grad_w = grad_w + _pruned(weight.detach(), fwd_mask).mul_(decay)
    return grad_w


def _input_grad_weight(
    weight: torch.Tensor, fwd_mask: torch.Tensor, bwd: torch.Tensor | None, n: int, m: int, dtype: torch.dtype
) -> torch.Tensor:
    """``W * Mb`` in ``dtype``; ``bwd`` is ``Mb`` itself (a mask), the row permutation it is built from
    (integers), or None when ``Mb`` is ``Mf``."""
    if bwd is None:
        bwd = fwd_mask
    elif bwd.dtype in (torch.int64, torch.int32):
        bwd = backward_mask_for_weight(weight, fwd_mask, bwd, n, m, dtype=graph_mask_dtype(weight))
    return _masked(weight, bwd).to(dtype)


def _backward_arg(
    bwd_mask: torch.Tensor | None, permutation: torch.Tensor | None, fwd_mask: torch.Tensor
) -> torch.Tensor | None:
    # None stands for "Mb is Mf": Dynamo cannot trace an autograd.Function given one tensor twice.
    if bwd_mask is not None and bwd_mask is not fwd_mask:
        return bwd_mask
    return permutation


class _MaskedLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fwd_mask, bwd, n, m, decay):  # type: ignore[override]
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = _cast(x, dtype)
            out = F.linear(xc, _cast(_masked(weight, fwd_mask), dtype), _cast(bias, dtype))
        ctx.save_for_backward(xc, weight, fwd_mask, bwd)
        ctx.nm = (n, m)
        ctx.decay = decay
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xc, weight, fwd_mask, bwd = ctx.saved_tensors
        grad_out = grad_out.to(xc.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # Mb is only built when the input gradient is needed
            grad_x = (grad_out @ _input_grad_weight(weight, fwd_mask, bwd, *ctx.nm, xc.dtype)).to(ctx.x_dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad_extra(g2.T @ xc.reshape(-1, xc.shape[-1]), weight, fwd_mask, ctx.decay)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class _MaskedConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fwd_mask, bwd, n, m, decay, stride, padding, dilation, groups):  # type: ignore[override]
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = _cast(x, dtype)
            w = _cast(_masked(weight, fwd_mask), dtype)
            out = F.conv2d(xc, w, _cast(bias, dtype), stride, padding, dilation, groups)
        ctx.save_for_backward(xc, weight, fwd_mask, bwd)
        ctx.nm = (n, m)
        ctx.decay = decay
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xc, weight, fwd_mask, bwd = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv_args
        grad_out = grad_out.to(xc.dtype)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = bool(need_b and ctx.has_bias)
        # The weight gradient does not depend on the weight passed here, so without an input gradient
        # the (cheaper) forward-masked weight does, and Mb is never built.
        w_in = _input_grad_weight(weight, fwd_mask, bwd, *ctx.nm, xc.dtype) if need_x else weight.to(xc.dtype)
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out,
            xc,
            w_in,
            [weight.shape[0]] if ctx.has_bias else None,
            list(stride),
            list(padding),
            list(dilation),
            False,
            [0, 0],
            groups,
            [need_x, need_w, need_b],
        )
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = _weight_grad_extra(grad_w, weight, fwd_mask, ctx.decay)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def masked_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fwd_mask: torch.Tensor,
    bwd_mask: torch.Tensor | None,
    decay: float = 0.0,
    *,
    permutation: torch.Tensor | None = None,
    n: int = 2,
    m: int = 4,
) -> torch.Tensor:
    """``F.linear(x, W*Mf, b)`` whose input gradient goes through ``W*Mb`` and whose weight gradient is
    the dense straight-through ``g^T x`` plus ``decay * (1 - Mf) * W``.

    Pass ``bwd_mask=None`` with the backward mask's row ``permutation`` and ``n``, ``m`` to build ``Mb``
    in the backward pass, only when the input gradient is needed (``bwd_mask=None`` without a
    permutation uses ``Mf``).
    """
    return _MaskedLinearFn.apply(x, weight, bias, fwd_mask, _backward_arg(bwd_mask, permutation, fwd_mask), n, m,
                                 float(decay))


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    fwd_mask: torch.Tensor,
    bwd_mask: torch.Tensor | None,
    decay: float = 0.0,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    *,
    permutation: torch.Tensor | None = None,
    n: int = 2,
    m: int = 4,
) -> torch.Tensor:
    """``F.conv2d`` with the masks of :func:`masked_linear`; ``padding`` must be explicit integers."""
    return _MaskedConv2dFn.apply(
        x, weight, bias, fwd_mask, _backward_arg(bwd_mask, permutation, fwd_mask), n, m, float(decay),
        tuple(stride), tuple(padding), tuple(dilation), groups,
    )
