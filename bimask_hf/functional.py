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

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from . import kernels
from .masks import backward_mask_for_weight, step_mask_dtype, ties_high

__all__ = ["masked_linear", "masked_conv2d"]

_T = TypeVar("_T")

# Below this many weights a layer's mask kernels run on one thread when idle OpenMP threads sleep.
SERIAL_MASK_NUMEL = 1 << 18


@functools.lru_cache(maxsize=1)
def _threads_sleep() -> bool:
    """Whether PyTorch's OpenMP pool puts idle threads to sleep (``OMP_WAIT_POLICY=passive``, read once
    at start-up by the OpenMP runtime), so that every parallel region pays for waking them."""
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() != "passive":
        return False
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def mask_work(fn: Callable[..., _T], weight: torch.Tensor, *args: Any, **kwargs: Any) -> _T:
    """``fn(*args, **kwargs)``: a layer's mask work (``Mf``, ``Mb``, ``W * M``, the decay term, the
    permutation search), on one thread where that is faster.

    ATen splits an elementwise kernel over threads above 32768 entries. With sleeping idle threads
    (``OMP_WAIT_POLICY=passive``, which ``scripts/main_job.sh`` sets: spinning threads slow a busy
    2-core machine down) each such kernel first wakes the others, which costs more than the kernel on
    a small layer (``docs/benchmarks.md``, section 2b, round 3). Eager CPU steps with
    more than one thread therefore run the mask work of layers under :data:`SERIAL_MASK_NUMEL` weights
    on one thread; the convolutions and matmuls around it keep all threads. The thread count is set
    process-wide for that moment: two Python threads running models at once under a passive policy may
    interleave these changes (each restores the count it saw).
    """
    if torch.compiler.is_compiling() or weight.device.type != "cpu" or weight.numel() >= SERIAL_MASK_NUMEL:
        return fn(*args, **kwargs)
    threads = torch.get_num_threads()
    if threads == 1 or not _threads_sleep():
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


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
    """``W * mask`` with pruned entries exactly zero: a select for bool masks (GPUs), a product for the
    0/1 ``uint8`` or float masks of CPU training steps (:func:`~bimask_hf.masks.step_mask_dtype`): ATen's
    CPU kernels read bool tensors slowly, and a compiled graph then holds no bool tensor that AOT
    autograd could choose to save (inductor's CPU kernels store those slowly too)."""
    return torch.where(mask, weight, 0.0) if mask.dtype == torch.bool else weight * mask


def _pruned(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * W`` (see :func:`_masked`)."""
    return torch.where(mask, 0.0, weight) if mask.dtype == torch.bool else weight - weight * mask


def _weight_grad_extra(grad_w: torch.Tensor, weight: torch.Tensor, fwd_mask: torch.Tensor, decay: float) -> torch.Tensor:
    grad_w = grad_w.to(weight.dtype)
    if decay and not kernels.add_decay_(grad_w, weight, fwd_mask, decay):  # in place, one pass in C
        # ``(1 - Mf) * W`` (a select, or a product for float masks), scaled in place. Not ``torch.add(..., alpha=)``:
        # inductor (torch 2.9, CPU) miscompiles ``add(mm, t, alpha=a)`` fused behind a matmul.
        grad_w = grad_w + _pruned(weight.detach(), fwd_mask).mul_(decay)
    return grad_w


def _input_grad_weight(
    weight: torch.Tensor, fwd_mask: torch.Tensor, bwd: torch.Tensor | None, n: int, m: int, high: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``W * Mb`` in ``dtype``; ``bwd`` is ``Mb`` itself (a mask), the row permutation it is built from
    (integers; ``high``: with the paper's tie order), or None when ``Mb`` is ``Mf``."""
    if bwd is None:
        bwd = fwd_mask
    elif bwd.dtype in (torch.int64, torch.int32):
        bwd = backward_mask_for_weight(weight, fwd_mask, bwd, n, m, dtype=step_mask_dtype(weight),
                                       tie_break="high" if high else "low")
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
    def forward(ctx, x, weight, bias, fwd_mask, bwd, n, m, high, decay):  # type: ignore[override]
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = _cast(x, dtype)
            out = F.linear(xc, _cast(mask_work(_masked, weight, weight, fwd_mask), dtype), _cast(bias, dtype))
        ctx.save_for_backward(xc, weight, fwd_mask, bwd)
        ctx.nm = (n, m, high)
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
            grad_x = (grad_out @ mask_work(_input_grad_weight, weight, weight, fwd_mask, bwd, *ctx.nm, xc.dtype)).to(
                ctx.x_dtype)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = mask_work(_weight_grad_extra, weight, g2.T @ xc.reshape(-1, xc.shape[-1]), weight, fwd_mask, ctx.decay)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _MaskedConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fwd_mask, bwd, n, m, high, decay, stride, padding, dilation, groups):  # type: ignore[override]
        dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            xc = _cast(x, dtype)
            w = _cast(mask_work(_masked, weight, weight, fwd_mask), dtype)
            out = F.conv2d(xc, w, _cast(bias, dtype), stride, padding, dilation, groups)
        ctx.save_for_backward(xc, weight, fwd_mask, bwd)
        ctx.nm = (n, m, high)
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
        if need_x:
            w_in = mask_work(_input_grad_weight, weight, weight, fwd_mask, bwd, *ctx.nm, xc.dtype)
        else:
            w_in = weight.to(xc.dtype)
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
            grad_w = mask_work(_weight_grad_extra, weight, grad_w, weight, fwd_mask, ctx.decay)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


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
    tie_break: str = "low",
) -> torch.Tensor:
    """``F.linear(x, W*Mf, b)`` with the Bi-Mask gradients.

    The input gradient goes through ``W*Mb``; the weight gradient is the dense straight-through ``g^T x``
    plus ``decay * (1 - Mf) * W``. Pass ``bwd_mask=None`` with the backward mask's row ``permutation`` and
    ``n``, ``m`` (and ``tie_break``) to build ``Mb`` in the backward pass, only when the input gradient is
    needed (``bwd_mask=None`` without a permutation uses ``Mf``).

    Args:
        x (`torch.Tensor`): The input.
        weight (`torch.Tensor`): The dense weight ``W`` (the parameter).
        bias (`torch.Tensor`, *optional*): The bias, or None.
        fwd_mask (`torch.Tensor`): The forward mask ``Mf`` (bool or 0/1 values, ``weight``'s shape).
        bwd_mask (`torch.Tensor`, *optional*): The backward mask ``Mb``; None to build it in the backward pass
            from ``permutation`` (or to use ``Mf`` when no permutation is given).
        decay (`float`, *optional*, defaults to 0.0): SR-STE decay added to the weight gradient on pruned
            weights.
        permutation (`torch.Tensor`, *optional*): The backward mask's row permutation, used when
            ``bwd_mask`` is None.
        n (`int`, *optional*, defaults to 2): N of the backward mask built from ``permutation``.
        m (`int`, *optional*, defaults to 4): M of the backward mask built from ``permutation``.
        tie_break (`str`, *optional*, defaults to `"low"`): Tie order of that backward mask (see
            :func:`bimask_hf.masks.backward_mask`).

    Returns:
        `torch.Tensor`: ``x (W*Mf)^T + b``.
    """
    return _MaskedLinearFn.apply(x, weight, bias, fwd_mask, _backward_arg(bwd_mask, permutation, fwd_mask), n, m,
                                 ties_high(tie_break), float(decay))


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
    tie_break: str = "low",
) -> torch.Tensor:
    """``F.conv2d`` with the masks and gradients of :func:`masked_linear`.

    Args:
        x (`torch.Tensor`): The input.
        weight (`torch.Tensor`): The dense weight ``W`` (the parameter).
        bias (`torch.Tensor`, *optional*): The bias, or None.
        fwd_mask (`torch.Tensor`): The forward mask ``Mf`` (bool or 0/1 values, ``weight``'s shape).
        bwd_mask (`torch.Tensor`, *optional*): The backward mask ``Mb``; None to build it in the backward pass
            from ``permutation`` (or to use ``Mf`` when no permutation is given).
        decay (`float`, *optional*, defaults to 0.0): SR-STE decay added to the weight gradient on pruned
            weights.
        stride (`tuple[int, int]`, *optional*, defaults to `(1, 1)`): As in ``F.conv2d``.
        padding (`tuple[int, int]`, *optional*, defaults to `(0, 0)`): Explicit integers (no string padding).
        dilation (`tuple[int, int]`, *optional*, defaults to `(1, 1)`): As in ``F.conv2d``.
        groups (`int`, *optional*, defaults to 1): As in ``F.conv2d``.
        permutation (`torch.Tensor`, *optional*): The backward mask's row permutation, used when
            ``bwd_mask`` is None.
        n (`int`, *optional*, defaults to 2): N of the backward mask built from ``permutation``.
        m (`int`, *optional*, defaults to 4): M of the backward mask built from ``permutation``.
        tie_break (`str`, *optional*, defaults to `"low"`): Tie order of that backward mask (see
            :func:`bimask_hf.masks.backward_mask`).

    Returns:
        `torch.Tensor`: The convolution of ``x`` with ``W*Mf``, plus the bias.
    """
    return _MaskedConv2dFn.apply(
        x, weight, bias, fwd_mask, _backward_arg(bwd_mask, permutation, fwd_mask), n, m, ties_high(tie_break),
        float(decay),
        tuple(stride), tuple(padding), tuple(dilation), groups,
    )
