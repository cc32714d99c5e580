"""Under ``accelerate launch`` with the CPU FSDP2 config and ``--mixed_precision``: switch the run to FSDP2
as BiMaskTrainer does, prepare a sparsified model, and print (rank 0) the dtype its Bi-Mask layer computes
with and the plugin's policy."""

from __future__ import annotations

import torch
import torch.nn as nn
from accelerate import Accelerator

import bimask_hf as bh
from bimask_hf.distributed import enable_cpu_fsdp, is_sharded

accelerator = Accelerator()
assert enable_cpu_fsdp(accelerator), "not switched to FSDP2"
model = bh.sparsify(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)), bh.BiMaskConfig(target_modules=["0"]))
seen = []
model[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.dtype))
model = accelerator.prepare(model)
out = model(torch.randn(4, 16))
out.float().sum().backward()
if accelerator.is_main_process:
    print(f"sharded={is_sharded(model[0].weight)} weight_in_forward={seen[0]} output={out.dtype}")
