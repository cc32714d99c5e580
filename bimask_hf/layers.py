"""`BiMaskLinear` and `BiMaskConv2d`: drop-in sparse layers for every mode of the method.

They subclass ``nn.Linear`` / ``nn.Conv2d`` and keep the parameter names ``weight`` and ``bias``, so a
patched model's state dict has the plain model's keys plus one buffer per layer,
``bimask_permutation`` (the backward mask's row permutation, saved so a resumed run continues with it).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import GROUP_LAYOUTS, MODES, PERMUTATION_KEY, BiMaskConfig
from .distributed import full_tensor, shard_like
from .functional import mask_work, masked_conv2d, masked_linear
from .masks import (
    _as_dtype,
    _check_permutation,
    backward_mask_for_weight,
    check_nm_pattern,
    matrix_to_weight,
    nm_mask_for_weight,
    retention,
    search_permutation,
    step_mask_dtype,
    ties_high,
    transposable_mask,
    unstructured_mask,
    weight_to_matrix,
)
from .modes import MODE_TABLE, ModeSpec

__all__ = ["BiMaskLinear", "BiMaskConv2d", "BiMaskLayer", "PERMUTATION_KEY"]



class BiMaskLayer:
    """Behaviour shared by :class:`BiMaskLinear` and :class:`BiMaskConv2d` (a mixin over nn.Module)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    training: bool

    def _init_bimask(
        self,
        n: int = 2,
        m: int = 4,
        mode: str = "bimask",
        decay: float = 2e-4,
        density: float | None = None,
        group_layout: str = "channels_last",
        tie_break: str = "low",
        decay_per_sample: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if group_layout not in GROUP_LAYOUTS:
            raise ValueError(f"group_layout must be one of {GROUP_LAYOUTS}, got {group_layout!r}.")
        check_nm_pattern(n, m)
        ties_high(tie_break)  # a valid name
        self.n, self.m, self.mode, self.decay = n, m, mode, float(decay)
        self.density = density
        self.group_layout = group_layout
        self.tie_break = tie_break
        self.decay_per_sample = bool(decay_per_sample)
        rows = self.weight.shape[0]
        row_groups = self._row_groups()
        # Backward masks need whole groups of M rows inside every conv group; otherwise uni-directional.
        self.bidirectional = density is None and (rows // row_groups) % m == 0
        perm = torch.arange(rows, device=self.weight.device)
        self.register_buffer(PERMUTATION_KEY, perm, persistent=True)

    # ---- configuration -------------------------------------------------------------------------
    def _row_groups(self) -> int:
        return getattr(self, "groups", 1) if isinstance(self, nn.Conv2d) else 1

    @property
    def spec(self) -> ModeSpec:
        """What this layer's mode does (:data:`~bimask_hf.modes.MODE_TABLE`)."""
        return MODE_TABLE[self.mode]

    @property
    def effective_mode(self) -> str:
        """The mode actually run: ``bimask`` falls back to ``srste`` when rows do not form groups of M."""
        spec = self.spec
        if spec.backward_mask and not self.bidirectional:
            return spec.fallback or self.mode
        return self.mode

    @property
    def uses_backward_mask(self) -> bool:
        """Whether the input gradient goes through the permuted backward mask ``Mb`` (bi-directional N:M)."""
        return MODE_TABLE[self.effective_mode].backward_mask and self.density is None

    @property
    def pattern(self) -> str:
        """``"2:4"`` or ``"50% unstructured"``."""
        return f"{self.density:.0%} unstructured" if self.density is not None else f"{self.n}:{self.m}"

    def bimask_extra_repr(self) -> str:
        """The Bi-Mask part of the layer's ``repr``: pattern, effective mode, decay and layout.

        Returns:
            `str`: E.g. ``"pattern=2:4, mode=bimask, decay=0.0002, layout=channels_last"``; the tie order and
            per-sample decay are added when not the defaults.
        """
        text = f"pattern={self.pattern}, mode={self.effective_mode}, decay={self.decay}, layout={self.group_layout}"
        if self.tie_break != "low":
            text += f", tie_break={self.tie_break}"
        return text + (", decay_per_sample=True" if self.decay_per_sample else "")

    # ---- masks ---------------------------------------------------------------------------------
    # Masks are recomputed from the weights at every use, never cached: a cache keyed on the weight's
    # storage and version goes stale under fused optimizers (``AdamW(fused=True)``, the Trainer's CPU/GPU
    # default, updates parameters without bumping ``_version``), and Dynamo cannot trace such a key.
    # Under torch.compile the masks are thus part of the graph, fused with the masked weight and the
    # decay term; Mb is only built in the backward pass, when the input gradient is needed.
    def full_weight(self) -> torch.Tensor:
        """The whole weight, detached; gathered from all ranks when it is an FSDP2 shard (a collective).

        Returns:
            `torch.Tensor`: The full weight.
        """
        return full_tensor(self.weight.detach())

    def forward_mask_for(self, weight: torch.Tensor, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """``Mf`` of ``weight``, shaped like it.

        Args:
            weight (`torch.Tensor`): A (full) weight of this layer's shape.
            dtype (`torch.dtype`, *optional*, defaults to `torch.bool`): ``bool``, or the 0/1 values of the
                training step's :func:`~bimask_hf.masks.step_mask_dtype`.

        Returns:
            `torch.Tensor`: The forward mask (all ones in a mode that does not mask).
        """
        weight = weight.detach()
        if not self.spec.masked:
            return torch.ones_like(weight, dtype=dtype)
        if self.density is not None:
            return _as_dtype(unstructured_mask(weight, self.density), dtype)
        if self.spec.transposable:
            mf_m = transposable_mask(weight_to_matrix(weight, self.group_layout), self.n, self.m)
            return _as_dtype(matrix_to_weight(mf_m, weight.shape, self.group_layout), dtype)
        return nm_mask_for_weight(weight, self.n, self.m, self.group_layout, dtype=dtype, tie_break=self.tie_break)

    def backward_mask_for(self, weight: torch.Tensor, forward_mask: torch.Tensor) -> torch.Tensor:
        """``Mb`` of ``weight`` given its ``Mf`` (``Mf`` itself outside bi-directional ``bimask``).

        Args:
            weight (`torch.Tensor`): A (full) weight of this layer's shape.
            forward_mask (`torch.Tensor`): Its forward mask.

        Returns:
            `torch.Tensor`: The backward mask, built with the layer's current row permutation.
        """
        if not self.uses_backward_mask:
            return forward_mask
        return backward_mask_for_weight(
            weight.detach(), forward_mask, getattr(self, PERMUTATION_KEY), self.n, self.m, tie_break=self.tie_break
        )

    def compute_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The masks of the current (full) weights.

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: (forward mask, backward mask), both boolean and shaped like
            ``weight``.
        """
        weight = self.full_weight()
        mf = self.forward_mask_for(weight)
        return mf, self.backward_mask_for(weight, mf)

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(``Mf``, ``Mb``) of the current weights and permutation (same as :meth:`compute_masks`).

        Returns:
            `tuple[torch.Tensor, torch.Tensor]`: The boolean forward and backward masks.
        """
        return self.compute_masks()

    @property
    def forward_mask(self) -> torch.Tensor:
        """``Mf`` of the current (full) weights."""
        return self.forward_mask_for(self.full_weight())

    @property
    def backward_mask(self) -> torch.Tensor:
        """``Mb`` of the current weights and permutation."""
        return self.compute_masks()[1]

    def retention(self) -> float:
        """``|Mb| / |Mf|`` of the current masks (1.0 outside ``bimask`` mode).

        Returns:
            `float`: The retention.
        """
        mf, mb = self.masks()
        return retention(mf, mb)

    def sparse_weight(self) -> torch.Tensor:
        """The weight the forward pass uses, ``W * Mf`` (pruned entries exactly zero).

        Returns:
            `torch.Tensor`: The masked full weight.
        """
        weight = self.full_weight()
        return weight * self.forward_mask_for(weight)

    @torch.no_grad()
    def project_(self) -> torch.Tensor:
        """Prune the parameter in place, ``W <- W * Mf`` (modes ``pre`` and ``post``).

        Returns:
            `torch.Tensor`: The forward mask ``Mf`` the weight was multiplied by.
        """
        mf = self.forward_mask_for(self.full_weight())
        self.weight.mul_(shard_like(mf, self.weight))
        return mf

    @torch.no_grad()
    def refresh_permutation(
        self,
        method: str = "matched",
        num_candidates: int = 100,
        generator: torch.Generator | None = None,
        weight: torch.Tensor | None = None,
    ) -> float:
        """Search a new row permutation for the backward mask.

        The search starts from the current permutation, so retention never drops at a refresh (except
        with ``"random_fresh"``, the paper's search, whose candidates are all new). In a
        grouped conv each conv group is searched on its own rows, as its input gradient only reduces
        over them.

        Args:
            method (`str`, *optional*, defaults to `"matched"`): One of :data:`~bimask_hf.search.METHODS`.
            num_candidates (`int`, *optional*, defaults to 100): Candidates of the random searches.
            generator (`torch.Generator`, *optional*): Source of randomness of the search.
            weight (`torch.Tensor`, *optional*): The full weight, if the caller has gathered it already.

        Returns:
            `float`: The seconds spent (0.0 when the layer's mode has no backward mask).
        """
        if not MODE_TABLE[self.effective_mode].backward_mask:
            return 0.0
        start = time.perf_counter()
        weight = self.full_weight() if weight is None else weight
        perm = getattr(self, PERMUTATION_KEY)
        # A small layer's search runs on one thread when waking sleeping threads costs more than it saves
        # (measured in docs/benchmarks.md, section 2b, round 4).
        perm.copy_(mask_work(self._search_permutation, weight, weight, perm, method, num_candidates, generator))
        return time.perf_counter() - start

    def _search_permutation(
        self, weight: torch.Tensor, perm: torch.Tensor, method: str, num_candidates: int,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        # The search only counts Mf's ones per row group and column, so the column order does not
        # matter: Mf in the weight's own layout (the forward's function, no layout copies) will do.
        mf = self.forward_mask_for(weight).reshape(weight.shape[0], -1)
        groups = self._row_groups()
        rows = weight.shape[0] // groups
        parts = []
        for g in range(groups):
            lo = g * rows
            init = perm[lo : lo + rows] - lo
            part = search_permutation(
                mf[lo : lo + rows], self.n, self.m, method=method, num_candidates=num_candidates,
                generator=generator, init=init,
            )
            parts.append(part + lo)
        return torch.cat(parts)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        # A plain (unpatched) checkpoint has no permutation: keep the current one instead of failing.
        key = prefix + PERMUTATION_KEY
        if key not in state_dict:
            state_dict = dict(state_dict)
            state_dict[key] = getattr(self, PERMUTATION_KEY)
        elif state_dict[key].shape == (self.weight.shape[0],) and state_dict[key].device.type != "meta":
            # (a wrong shape is load_state_dict's own error)
            try:  # a non-permutation would leave rows of the backward mask unset
                _check_permutation(state_dict[key], self.weight.shape[0], key)
            except ValueError as err:
                raise ValueError(f"Cannot load the state dict: {err}") from None
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _masked_call(self, x: torch.Tensor, fn: Any, **kwargs: Any) -> torch.Tensor:
        spec = self.spec
        if spec.projects_before and self.training:
            mf = self.project_()  # pruning keeps the N largest of every group: Mf is unchanged
        else:
            mf = mask_work(self.forward_mask_for, self.weight, self.weight, step_mask_dtype(self.weight))
        decay = self.decay if spec.decays else 0.0
        if self.decay_per_sample and isinstance(self, nn.Linear) and x.dim() > 2:
            # The paper's DeiT code adds the decay to each sample's weight gradient of a batched matmul
            # before the batch is summed: once per entry of the leading dimensions (docs/method.md, 5).
            decay *= math.prod(x.shape[:-2])
        if self.uses_backward_mask:  # Mb is built in backward, if needed
            return fn(x, self.weight, self.bias, mf, None, decay, permutation=getattr(self, PERMUTATION_KEY),
                      n=self.n, m=self.m, tie_break=self.tie_break, **kwargs)
        return fn(x, self.weight, self.bias, mf, None, decay, **kwargs)

    def _adopt(self, module: nn.Module, config: BiMaskConfig) -> Any:
        """Share ``module``'s parameters and apply ``config`` (``self`` was built on the meta device)."""
        self.weight = module.weight  # type: ignore[assignment]
        self.bias = module.bias  # type: ignore[assignment]
        self._init_bimask(  # once, after the parameters: the permutation buffer lives on their device
            n=config.n, m=config.m, mode=config.mode, decay=config.decay, density=config.density,
            group_layout=config.group_layout, tie_break=config.tie_break, decay_per_sample=config.decay_per_sample,
        )
        self.train(module.training)
        return self


class BiMaskLinear(BiMaskLayer, nn.Linear):
    """``nn.Linear`` with an N:M (or unstructured) forward mask and a Bi-Mask backward mask.

    Args:
        in_features (`int`): As in ``nn.Linear``.
        out_features (`int`): As in ``nn.Linear``.
        bias (`bool`, *optional*, defaults to `True`): As in ``nn.Linear``.
        device (*optional*): As in ``nn.Linear``.
        dtype (*optional*): As in ``nn.Linear``.
        n (`int`, *optional*, defaults to 2): Weights kept in every group of ``m`` (the N of N:M).
        m (`int`, *optional*, defaults to 4): Group size (the M of N:M).
        mode (`str`, *optional*, defaults to `"bimask"`): One of :data:`~bimask_hf.modes.MODES`
            (:data:`~bimask_hf.modes.MODE_TABLE` says what each does).
        decay (`float`, *optional*, defaults to 2e-4): SR-STE decay: adds ``decay * (1 - Mf) * W`` to the
            weight gradient in the modes that decay.
        density (`float`, *optional*): If set, an unstructured top-``|W|`` mask keeping this share of the
            weights instead of N:M (uni-directional).
        group_layout (`str`, *optional*, defaults to `"channels_last"`): Column order of the N:M groups,
            ``"channels_last"`` or ``"flat"`` (see :func:`~bimask_hf.masks.weight_to_matrix`).
        tie_break (`str`, *optional*, defaults to `"low"`): Which of equal ``|W|`` a mask keeps, ``"low"`` or
            ``"high"`` (the paper's).
        decay_per_sample (`bool`, *optional*, defaults to `False`): Add the decay once per entry of the
            leading dimensions of a batched input, as the paper's DeiT code (``docs/method.md``, 5).

    Raises:
        ValueError: If ``mode``, ``group_layout``, ``tie_break`` or the N:M pattern is invalid.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        n: int = 2,
        m: int = 4,
        mode: str = "bimask",
        decay: float = 2e-4,
        density: float | None = None,
        group_layout: str = "channels_last",
        tie_break: str = "low",
        decay_per_sample: bool = False,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_bimask(n, m, mode, decay, density, group_layout, tie_break, decay_per_sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer: ``x @ (W * Mf).T + b``, with the gradients of the layer's mode.

        Args:
            x (`torch.Tensor`): Input of shape ``(..., in_features)``.

        Returns:
            `torch.Tensor`: Output of shape ``(..., out_features)``.
        """
        if not self.spec.masked:
            return F.linear(x, self.weight, self.bias)
        return self._masked_call(x, masked_linear)

    def extra_repr(self) -> str:
        """``nn.Linear``'s ``extra_repr`` followed by :meth:`bimask_extra_repr`.

        Returns:
            `str`: The text inside the layer's ``repr``.
        """
        return f"{nn.Linear.extra_repr(self)}, {self.bimask_extra_repr()}"

    @classmethod
    def from_dense(cls, module: nn.Linear, config: BiMaskConfig) -> BiMaskLinear:
        """Wrap an existing ``nn.Linear``, sharing its parameters (no copy).

        Args:
            module (`nn.Linear`): The layer to wrap.
            config (`BiMaskConfig`): The pattern, mode and mask settings to apply.

        Returns:
            `BiMaskLinear`: The sparse layer, in ``module``'s training mode.
        """
        with torch.device("meta"):
            new = cls(module.in_features, module.out_features, bias=module.bias is not None)
        return new._adopt(module, config)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W * Mf`` (pruned weights exactly zero) and the same bias.

        Returns:
            `nn.Linear`: The plain layer (a new weight, the same bias parameter).
        """
        with torch.device("meta"):
            plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        plain.weight = nn.Parameter(self.sparse_weight().clone(), requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        plain.train(self.training)
        return plain


def conv_padding(module: nn.Conv2d) -> tuple[int, int] | None:
    """Explicit symmetric padding of a conv, or None if it cannot be expressed so (e.g. odd 'same').

    Args:
        module (`nn.Conv2d`): The conv.

    Returns:
        `tuple[int, int]` or `None`: The padding per spatial dimension.
    """
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0)
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in totals):
            return None
        return (totals[0] // 2, totals[1] // 2)
    return tuple(module.padding)  # type: ignore[return-value]


class BiMaskConv2d(BiMaskLayer, nn.Conv2d):
    """``nn.Conv2d`` (any stride, padding, dilation, groups, bias, padding mode) with Bi-Mask masks.

    Args:
        in_channels (`int`): As in ``nn.Conv2d``.
        out_channels (`int`): As in ``nn.Conv2d``.
        kernel_size (`int` or `tuple[int, int]`): As in ``nn.Conv2d``.
        stride (`int` or `tuple[int, int]`, *optional*, defaults to 1): As in ``nn.Conv2d``.
        padding (`int`, `tuple[int, int]` or `str`, *optional*, defaults to 0): As in ``nn.Conv2d``; a string
            padding must be expressible symmetrically.
        dilation (`int` or `tuple[int, int]`, *optional*, defaults to 1): As in ``nn.Conv2d``.
        groups (`int`, *optional*, defaults to 1): As in ``nn.Conv2d``; each conv group's rows form their own
            backward-mask groups.
        bias (`bool`, *optional*, defaults to `True`): As in ``nn.Conv2d``.
        padding_mode (`str`, *optional*, defaults to `"zeros"`): As in ``nn.Conv2d``.
        device (*optional*): As in ``nn.Conv2d``.
        dtype (*optional*): As in ``nn.Conv2d``.
        n (`int`, *optional*, defaults to 2): Weights kept in every group of ``m`` (the N of N:M).
        m (`int`, *optional*, defaults to 4): Group size (the M of N:M).
        mode (`str`, *optional*, defaults to `"bimask"`): One of :data:`~bimask_hf.modes.MODES`
            (:data:`~bimask_hf.modes.MODE_TABLE` says what each does).
        decay (`float`, *optional*, defaults to 2e-4): SR-STE decay: adds ``decay * (1 - Mf) * W`` to the
            weight gradient in the modes that decay.
        density (`float`, *optional*): If set, an unstructured top-``|W|`` mask keeping this share of the
            weights instead of N:M (uni-directional).
        group_layout (`str`, *optional*, defaults to `"channels_last"`): Column order of the N:M groups,
            ``"channels_last"`` or ``"flat"`` (see :func:`~bimask_hf.masks.weight_to_matrix`).
        tie_break (`str`, *optional*, defaults to `"low"`): Which of equal ``|W|`` a mask keeps, ``"low"`` or
            ``"high"`` (the paper's).
        decay_per_sample (`bool`, *optional*, defaults to `False`): Add the decay once per entry of the
            leading dimensions of a batched input, as the paper's DeiT code (``docs/method.md``, 5).

    Raises:
        ValueError: If the padding cannot be made symmetric, or ``mode``, ``group_layout``, ``tie_break``
            or the N:M pattern is invalid.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
        *,
        n: int = 2,
        m: int = 4,
        mode: str = "bimask",
        decay: float = 2e-4,
        density: float | None = None,
        group_layout: str = "channels_last",
        tie_break: str = "low",
        decay_per_sample: bool = False,
    ) -> None:
        nn.Conv2d.__init__(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
            device=device, dtype=dtype,
        )
        self._explicit_padding = conv_padding(self)
        if self._explicit_padding is None:
            raise ValueError(
                f"BiMaskConv2d cannot express padding={self.padding!r} with kernel {self.kernel_size} and "
                f"dilation {self.dilation} symmetrically; use explicit integer padding."
            )
        self._init_bimask(n, m, mode, decay, density, group_layout, tie_break, decay_per_sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the conv with ``W * Mf``, with the gradients of the layer's mode.

        Args:
            x (`torch.Tensor`): Input of shape ``(B, C, H, W)``.

        Returns:
            `torch.Tensor`: The conv output.
        """
        if not self.spec.masked:
            return self._conv_forward(x, self.weight, self.bias)
        padding = self._explicit_padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        return self._masked_call(
            x, masked_conv2d, stride=self.stride, padding=padding, dilation=self.dilation, groups=self.groups
        )

    def extra_repr(self) -> str:
        """``nn.Conv2d``'s ``extra_repr`` followed by :meth:`bimask_extra_repr`.

        Returns:
            `str`: The text inside the layer's ``repr``.
        """
        return f"{nn.Conv2d.extra_repr(self)}, {self.bimask_extra_repr()}"

    @classmethod
    def from_dense(cls, module: nn.Conv2d, config: BiMaskConfig) -> BiMaskConv2d:
        """Wrap an existing ``nn.Conv2d``, sharing its parameters (no copy).

        Args:
            module (`nn.Conv2d`): The conv to wrap.
            config (`BiMaskConfig`): The pattern, mode and mask settings to apply.

        Returns:
            `BiMaskConv2d`: The sparse conv, in ``module``'s training mode.

        Raises:
            ValueError: If ``module``'s padding cannot be expressed symmetrically.
        """
        with torch.device("meta"):
            new = cls(
                module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                module.dilation, module.groups, module.bias is not None, module.padding_mode,
            )
        return new._adopt(module, config)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding ``W * Mf`` and the same bias.

        Returns:
            `nn.Conv2d`: The plain conv (a new weight, the same bias parameter).
        """
        with torch.device("meta"):
            plain = nn.Conv2d(
                self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, self.dilation,
                self.groups, self.bias is not None, self.padding_mode,
            )
        plain.weight = nn.Parameter(self.sparse_weight().clone(), requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        plain.train(self.training)
        return plain
