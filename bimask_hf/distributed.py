"""Bi-Mask under several processes: sharded (FSDP2) weights, the shared permutation search, the run header.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, what Accelerate's ``fsdp_version: 2`` applies)
every parameter is a ``DTensor`` holding one shard of the weight between forward passes; inside a
forward pass FSDP2 swaps in the gathered full weight. Masks are always computed on the full weight:
in the forward pass on the gathered one, elsewhere (logs, permutation search, ``post``/``pre``
projection, saving) on :func:`full_tensor` of the shards, so they are the masks of an unsharded run.
Every function here that may gather is a collective: all ranks call it in the same order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = [
    "is_sharded",
    "full_tensor",
    "shard_like",
    "rank_and_world_size",
    "assign_layers",
    "describe_setup",
    "enable_cpu_fsdp",
    "search_permutations_shared",
    "UnsupportedSetupError",
]


class UnsupportedSetupError(RuntimeError):
    """A distributed setup Bi-Mask cannot train correctly (names the setup and what to use instead)."""


def _dtensor_type() -> type | None:
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 / tensor-parallel shard of a larger tensor)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from all ranks for a ``DTensor`` (a collective), else ``tensor`` itself."""
    if is_sharded(tensor):
        return tensor.full_tensor()  # type: ignore[attr-defined]
    return tensor


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: this rank's shard as a ``DTensor`` when ``like`` is one, else ``full``.

    ``full`` must be the same on every rank (it is cut locally, nothing is sent).
    """
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)  # type: ignore[attr-defined]


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that searches each layer: largest first onto the least-loaded rank (same on every rank)."""
    loads = [0.0] * world_size
    owners = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[index] = rank
        loads[rank] += costs[index]
    return owners


def enable_cpu_fsdp(accelerator: Any) -> bool:
    """Turn a multi-process CPU run launched for FSDP into an FSDP run; True if it did.

    ``accelerate launch`` with an FSDP config and ``ACCELERATE_USE_CPU=1`` starts the processes with
    ``ACCELERATE_USE_FSDP=true``, but Accelerate only turns FSDP on for accelerator devices and falls
    back to CPU DDP silently. FSDP2's ``fully_shard`` itself trains on CPU over gloo, so the state is
    switched to FSDP with the plugin the launcher's ``FSDP_*`` variables describe.
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
    """The run's distributed setup in a few words, e.g. ``"DDP x2 (cpu)"``, ``"FSDP2 x4 on 2 machines (cuda)"``."""
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
    all ranks call it with the same layers. Returns the seconds this rank spent searching. ``progress``:
    a bar over the layers on the main process (:func:`bimask_hf.progress.progress_bar`'s ``enabled``).
    """
    from .layers import PERMUTATION_KEY
    from .progress import progress_bar

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
