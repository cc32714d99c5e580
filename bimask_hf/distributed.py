"""Bi-Mask under several processes: sharded (FSDP2) weights, the shared permutation search, the run header.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what Accelerate's ``fsdp_version: 2`` applies)
every parameter is a ``DTensor`` holding one shard of the weight between forward passes; inside a
forward pass FSDP2 swaps in the gathered full weight. Masks are always computed on the full weight:
in the forward pass on the gathered one, elsewhere (logs, permutation search, ``post``/``pre``
projection, saving) on :func:`full_tensor` of the shards, so they are the masks of an unsharded run.
Every function here that may gather is a collective: all ranks call it in the same order.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import PERMUTATION_KEY
from .progress import progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "PerRankStreamMixin",
    "is_sharded",
    "full_tensor",
    "shard_like",
    "rank_and_world_size",
    "assign_layers",
    "describe_setup",
    "enable_cpu_fsdp",
    "search_permutations_shared",
    "UnsupportedSetupError",
    "unsupported_setup_reason",
    "check_setup",
    "is_split_per_rank",
    "meta_copy",
    "gather_full_model",
]


class UnsupportedSetupError(RuntimeError):
    """A distributed setup Bi-Mask cannot train correctly (names the setup and what to use instead)."""


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 / tensor-parallel shard of a larger tensor).

    Args:
        tensor (`torch.Tensor`): The tensor.

    Returns:
        `bool`: True for a ``DTensor``.
    """
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for a ``DTensor`` (a collective), else ``tensor`` itself.

    Args:
        tensor (`torch.Tensor`): A tensor or a ``DTensor`` shard.

    Returns:
        `torch.Tensor`: The full tensor.
    """
    if is_sharded(tensor):
        return tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard as a ``DTensor`` when ``like`` is one, else ``full``.

    ``full`` must be the same on every rank (it is cut locally, nothing is sent).

    Args:
        full (`torch.Tensor`): The full tensor.
        like (`torch.Tensor`): A tensor or ``DTensor`` whose layout to copy.

    Returns:
        `torch.Tensor`: ``full``, or this rank's shard of it.
    """
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one.

    Returns:
        `tuple[int, int]`: The rank and the world size.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that searches each layer: largest first onto the least-loaded rank (same on every rank).

    Args:
        costs (`Sequence[float]`): Cost of each layer's search (its size).
        world_size (`int`): Number of ranks.

    Returns:
        `list[int]`: The owning rank of each layer, in the order of ``costs``.
    """
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def enable_cpu_fsdp(accelerator: Any) -> bool:
    """Turn a multi-process CPU run launched for FSDP into an FSDP run.

    ``accelerate launch`` with an FSDP config and ``ACCELERATE_USE_CPU=1`` starts the processes with
    ``ACCELERATE_USE_FSDP=true``, but Accelerate only turns FSDP on for accelerator devices and falls
    back to CPU DDP silently. FSDP2's ``fully_shard`` itself trains on CPU over gloo, so the state is
    switched to FSDP with the plugin the launcher's ``FSDP_*`` variables describe.

    Args:
        accelerator (`accelerate.Accelerator`): The run's accelerator.

    Returns:
        `bool`: True if it switched the run to FSDP.

    Raises:
        UnsupportedSetupError: If the launcher asks for an FSDP version other than 2.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, str_to_bool

    state = accelerator.state
    wanted = str_to_bool(os.environ.get("ACCELERATE_USE_FSDP", "false")) == 1
    # A second Trainer in the same process finds PartialState switched already, but no plugin yet.
    on_cpu = state.distributed_type in (DistributedType.MULTI_CPU, DistributedType.FSDP) and state.device.type == "cpu"
    if not wanted or not on_cpu or state.num_processes < 2 or getattr(state, "fsdp_plugin", None) is not None:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise UnsupportedSetupError(
            "FSDP on CPU needs FSDP2 (fsdp_version: 2, see recipes/accelerate/cpu_fsdp_2proc.yaml)."
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    from accelerate.state import PartialState

    # Every new AcceleratorState() copies PartialState's fields over its own, so both are switched.
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    return True


def describe_setup(accelerator: Any = None) -> str:
    """The run's distributed setup in a few words.

    Args:
        accelerator (`accelerate.Accelerator`, *optional*): The run's accelerator; Accelerate's
            ``PartialState`` without one.

    Returns:
        `str`: E.g. ``"single process (cpu)"``, ``"DDP x2 (cpu)"``, ``"FSDP2 x4 on 2 machines (cuda)"``.
    """
    _, world = rank_and_world_size()
    if accelerator is None:
        from accelerate.state import PartialState

        state: Any = PartialState()
        fsdp_version = None
        kind = str(state.distributed_type)
    else:
        state = accelerator.state
        kind = str(state.distributed_type)
        plugin = getattr(state, "fsdp_plugin", None)
        fsdp_version = getattr(plugin, "fsdp_version", 1) if plugin is not None else None
    device = getattr(state.device, "type", str(state.device))
    if world <= 1:
        return f"single process ({device})"
    if "FSDP" in kind or fsdp_version is not None:
        name = "FSDP2" if fsdp_version == 2 else "FSDP1"
    elif "DEEPSPEED" in kind:
        name = "DeepSpeed"
    else:
        name = "DDP"
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    machines = max(1, world // max(1, local))
    where = f" on {machines} machines" if machines > 1 else ""
    return f"{name} x{world}{where} ({device})"


def search_permutations_shared(
    layers: Sequence[Any], generators: Sequence[torch.Generator], method: str, num_candidates: int,
    progress: bool | None = False,
) -> float:
    """Refresh the backward-mask permutations of ``layers``, each rank searching its share of them.

    Layers go to ranks by :func:`assign_layers` (weighted by size); each owner searches with the
    layer's own generator (seeded from the step and the layer's index, not the rank), then broadcasts
    the result, so every rank ends with the permutations a single process would find. A collective:
    all ranks call it with the same layers.

    Args:
        layers (`Sequence[BiMaskLayer]`): The layers.
        generators (`Sequence[torch.Generator]`): One generator per layer.
        method (`str`): The search (one of :data:`bimask_hf.search.METHODS`).
        num_candidates (`int`): Candidates of the random searches.
        progress (`bool`, *optional*, defaults to `False`): A bar over the layers on the main process
            (:func:`bimask_hf.progress.progress_bar`'s ``enabled``).

    Returns:
        `float`: The seconds this rank spent searching.
    """
    rank, world = rank_and_world_size()
    owners = assign_layers([float(layer.weight.numel()) for layer in layers], world)
    seconds = 0.0
    steps = progress_bar(zip(layers, generators, owners), total=len(layers), desc="bimask-hf permutation search",
                         unit="layer", enabled=progress)
    for layer, generator, owner in steps:
        weight = layer.full_weight()  # every rank takes part when the weight is sharded
        if owner == rank:
            seconds += layer.refresh_permutation(method, num_candidates, generator, weight=weight)
    if world > 1:
        works = [
            dist.broadcast(getattr(layer, PERMUTATION_KEY), src=owner, async_op=True)
            for layer, owner in zip(layers, owners)
        ]
        for work in works:
            work.wait()
    return seconds


def unsupported_setup_reason(fsdp_version: int | None = None, zero_stage: int | None = None) -> str | None:
    """Why Bi-Mask training cannot run under this setup, or None if it can.

    FSDP1 flattens parameters into 1-D shards, so outside a forward pass no module holds its weight
    and masks would be taken per shard; DeepSpeed ZeRO-3 partitions parameters the same way. FSDP2
    keeps one ``DTensor`` per parameter, which the layers gather.

    Args:
        fsdp_version: The FSDP version of the run, None without FSDP.
        zero_stage: The DeepSpeed ZeRO stage, None without DeepSpeed.

    Returns:
        The reason with the setup to use instead, or None.
    """
    if fsdp_version is not None and fsdp_version != 2:
        return (
            f"FSDP version {fsdp_version} is not supported by Bi-Mask layers (it flattens weights into 1-D "
            "shards, so N:M masks would be computed per shard). Use FSDP2: fsdp_version: 2 in the accelerate "
            "config (recipes/accelerate/fsdp.yaml), or DDP."
        )
    if zero_stage == 3:
        return (
            "DeepSpeed ZeRO-3 is not supported by Bi-Mask layers (it partitions weights, so N:M masks would be "
            "computed on partitions). Use FSDP2 (recipes/accelerate/fsdp.yaml), which shards parameters and "
            "optimizer state too, or ZeRO-1/2."
        )
    return None


def check_setup(accelerator: Any, fsdp: bool, deepspeed: bool) -> None:
    """Raise :class:`UnsupportedSetupError` when ``accelerator`` runs a setup Bi-Mask cannot train under.

    Args:
        accelerator: The run's ``accelerate.Accelerator``.
        fsdp: Whether the run uses FSDP.
        deepspeed: Whether the run uses DeepSpeed.
    """
    state = accelerator.state
    plugin = getattr(state, "fsdp_plugin", None)
    ds_plugin = getattr(state, "deepspeed_plugin", None)
    reason = unsupported_setup_reason(
        fsdp_version=getattr(plugin, "fsdp_version", 1) if fsdp else None,
        zero_stage=getattr(ds_plugin, "zero_stage", None) if deepspeed else None,
    )
    if reason:
        raise UnsupportedSetupError(reason)


def is_split_per_rank(dataset: Any, world_size: int) -> bool:
    """Whether ``dataset`` is a streamed dataset that ``split_dataset_by_node`` cut for ``world_size`` ranks.

    Such a dataset is read as it is on each rank; Accelerate would otherwise split it a second time.

    Args:
        dataset (`Any`): The training dataset.
        world_size (`int`): Number of ranks.

    Returns:
        `bool`: True for such a dataset (always False on one rank).
    """
    if world_size <= 1:
        return False
    import datasets

    distributed = getattr(dataset, "_distributed", None)  # datasets' record of split_dataset_by_node
    return isinstance(dataset, datasets.IterableDataset) and distributed is not None and (
        distributed.world_size == world_size
    )


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and persistent buffers are on the meta device.

    Non-persistent buffers (not in a state dict) are copied for real, so loading a full state dict
    with ``assign=True`` makes the copy complete. Made before FSDP2 wraps the model, it is the plain
    module :func:`gather_full_model` loads the gathered weights into, at no memory cost.

    Args:
        model (`nn.Module`): The model.

    Returns:
        `nn.Module`: The copy.
    """
    memo: dict[int, Any] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        meta = torch.empty_like(tensor, device="meta")
        if isinstance(tensor, nn.Parameter):
            meta = nn.Parameter(meta, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = meta
    return copy.deepcopy(model, memo)


def gather_full_model(model: nn.Module, template: nn.Module | None, keep: bool) -> nn.Module | None:
    """The model to save: under FSDP2 its gathered full weights in ``template``, else ``model`` itself.

    A collective under FSDP2: every rank calls it.

    Args:
        model: The (possibly FSDP2-sharded) model.
        template: A :func:`meta_copy` of the model made before it was sharded; None when it never is.
        keep: Whether this rank saves (only it receives the full weights).

    Returns:
        A plain module holding the full weights on the saving rank, None on the others under FSDP2.
    """
    if template is None:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in model.modules() if isinstance(module, FSDPModule)]
    if not units:  # not wrapped (yet): a plain module
        return model
    for unit in units:  # an evaluation leaves the root unit gathered; the state dict wants the shards
        unit.reshard()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not keep:
        return None
    template.load_state_dict(state, assign=True)
    return template


def _forward_columns(trainer: Any) -> list[str]:
    """The batch keys the model's ``forward`` takes, plus the label names (what the Trainer keeps)."""
    from accelerate.utils import extract_model_from_parallel

    model = extract_model_from_parallel(trainer.model)
    if hasattr(model, "get_base_model"):  # peft: the base model's forward names the inputs
        model = model.get_base_model()
    return [*inspect.signature(model.forward).parameters, *sorted({"label", "label_ids", *trainer.label_names})]


class PerRankStreamMixin:
    """Data loaders of streamed datasets already split per rank, read as they are on each rank.

    A dataset cut with ``datasets.distributed.split_dataset_by_node`` must be read whole on each rank:
    Accelerate's ``prepare`` would split it a second time. Every other dataset goes to the Trainer's own
    loaders unchanged.
    """

    def get_train_dataloader(self) -> Any:
        """The Trainer's training loader, or this rank's whole share of a per-rank stream.

        Returns:
            A ``DataLoader``.
        """
        dataset = self.train_dataset  # type: ignore[attr-defined]
        if dataset is None or not is_split_per_rank(dataset, self.args.world_size):  # type: ignore[attr-defined]
            return super().get_train_dataloader()  # type: ignore[misc]
        return self._per_rank_loader(dataset, "Training", self.args.train_batch_size)  # type: ignore[attr-defined]

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        """The Trainer's evaluation loader, or this rank's whole share of a per-rank stream.

        Args:
            eval_dataset: A dataset, the name of one of ``eval_dataset``'s, or None for ``eval_dataset``.

        Returns:
            A ``DataLoader``.
        """
        dataset = eval_dataset
        if isinstance(eval_dataset, str):
            dataset = self.eval_dataset[eval_dataset]  # type: ignore[attr-defined]
        elif eval_dataset is None:
            dataset = self.eval_dataset  # type: ignore[attr-defined]
        if dataset is None or not is_split_per_rank(dataset, self.args.world_size):  # type: ignore[attr-defined]
            return super().get_eval_dataloader(eval_dataset)  # type: ignore[misc]
        return self._per_rank_loader(dataset, "Evaluation", self.args.eval_batch_size)  # type: ignore[attr-defined]

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        """The Trainer's test loader, or this rank's whole share of a per-rank stream.

        Args:
            test_dataset: The dataset to predict on.

        Returns:
            A ``DataLoader``.
        """
        if not is_split_per_rank(test_dataset, self.args.world_size):  # type: ignore[attr-defined]
            return super().get_test_dataloader(test_dataset)  # type: ignore[misc]
        return self._per_rank_loader(test_dataset, "test", self.args.eval_batch_size)  # type: ignore[attr-defined]

    def _per_rank_loader(self, dataset: Any, description: str, batch_size: int) -> Any:
        from accelerate.data_loader import prepare_data_loader
        from torch.utils.data import DataLoader
        from transformers.trainer_utils import RemoveColumnsCollator

        args = self.args  # type: ignore[attr-defined]
        collate = self.data_collator  # type: ignore[attr-defined]
        if args.remove_unused_columns:  # as the Trainer does for a dataset without column names
            collate = RemoveColumnsCollator(collate, _forward_columns(self), logger=logger, description=description,
                                            model_name=type(self.model).__name__)  # type: ignore[attr-defined]
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=args.dataloader_num_workers, collate_fn=collate,
            pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
            prefetch_factor=args.dataloader_prefetch_factor,
        )
        # One process's view: no second split, batches put on this rank's device as Accelerate's would be.
        return prepare_data_loader(
            loader, self.accelerator.device, num_processes=1, process_index=0, put_on_device=True,  # type: ignore[attr-defined]
            dispatch_batches=False, non_blocking=self.accelerator.non_blocking,  # type: ignore[attr-defined]
        )
