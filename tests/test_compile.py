"""torch.compile: sparse layers compile once and stay compiled, and train exactly like eager.

The graphs are captured with Dynamo + AOT autograd (``aot_eager``: the same graph capture and
functionalisation as inductor, without the C++ build, which takes minutes on a 2-core CI machine);
``benchmarks/step_time.py --compile`` runs the same models under inductor.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import bimask_hf as bh
from bimask_hf.layers import PERMUTATION_KEY


class _Net(nn.Module):
    """Dense stem, a conv, a grouped conv, a linear layer and a dense head: every sparse layer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gconv(torch.relu(self.conv(torch.relu(self.stem(x))))))
        return self.head(torch.relu(self.fc(x.mean((2, 3)))))


def _step(model: nn.Module, opt: torch.optim.Optimizer, x, y, mode: str, autocast: bool = False) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("mode", ["bimask", "pre"])
def test_compiled_training_has_no_graph_breaks_no_recompiles_and_matches_eager(mode):
    torch.manual_seed(0)
    model = bh.sparsify(_Net(), bh.BiMaskConfig(mode=mode, decay=0.05, permutation_search="matched"))
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    opts = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (model, ref)]
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 10, (6,))
    mf_start = [layer.compute_masks()[0] for layer in bh.sparse_layers(model).values()]

    def train_step(step: int, autocast: bool = False) -> None:
        for net, opt in ((compiled, opts[0]), (ref, opts[1])):
            _step(net, opt, x, y, mode, autocast)
        if mode == "post":
            bh.project_(model)
            bh.project_(ref)

    # warm-up: one graph for training, one for eval, one under autocast
    train_step(0)
    compiled.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x))
    compiled.train(), ref.train()
    train_step(1, autocast=True)
    warm_graphs = backend.frame_count
    assert warm_graphs == 3

    perms_before = [getattr(layer, PERMUTATION_KEY).clone() for layer in bh.sparse_layers(model).values()]
    for step in range(2, 10):
        if step == 5:  # permutation refresh mid-run: buffers change in place, same for both models
            bh.refresh_permutations(model, step=100)
            for a, b in zip(bh.sparse_layers(model).values(), bh.sparse_layers(ref).values()):
                getattr(b, PERMUTATION_KEY).copy_(getattr(a, PERMUTATION_KEY))
        if step == 7:
            compiled.eval(), ref.eval()
            with torch.no_grad():
                torch.testing.assert_close(compiled(x), ref(x))
            compiled.train(), ref.train()
        train_step(step, autocast=step == 8)

    assert not counters["graph_break"], dict(counters["graph_break"])
    assert backend.frame_count == warm_graphs, "a graph was compiled again after warm-up"
    for (name, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-5, atol=1e-6)
    layers = list(bh.sparse_layers(model).values())
    # the run exercised what it claims: masks moved with the weights, and the refresh changed a permutation
    assert any(not torch.equal(a, layer.compute_masks()[0]) for a, layer in zip(mf_start, layers))
    if mode == "bimask":
        assert any(not torch.equal(p, getattr(layer, PERMUTATION_KEY)) for p, layer in zip(perms_before, layers))


def test_cpu_graph_saves_no_bool_masks_for_backward():
    """A compiled CPU step carries masks as 0/1 floats and leaves no bool tensor for the partitioner to
    save between forward and backward: inductor's CPU kernels store 1-byte masks 10-40x slower than
    floats, and with ``where(Mf != 0, ...)`` in the graph the partitioner saved the bool ``Mf != 0``
    (compiled ResNet-50 b32 1.075x -> 1.022x of compiled dense when it stopped). Inductor's own
    partitioner (min-cut rematerialisation) on the graph Dynamo captures; no C++ build needed."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    saved: list[torch.dtype] = []
    seen = {"bw": 0}

    def forward_compiler(gm, example_inputs):  # type: ignore[no-untyped-def]
        (output,) = [node for node in gm.graph.nodes if node.op == "output"]
        saved.extend(arg.meta["val"].dtype for arg in output.args[0] if hasattr(arg, "meta") and "val" in arg.meta)
        return make_boxed_func(gm.forward)

    def backward_compiler(gm, example_inputs):  # type: ignore[no-untyped-def]
        seen["bw"] += 1
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=forward_compiler, bw_compiler=backward_compiler,
                           partition_fn=min_cut_rematerialization_partition)
    torch.manual_seed(0)
    model = bh.sparsify(_Net(), bh.BiMaskConfig(mode="bimask", decay=0.05))
    bh.refresh_permutations(model, step=100)
    torch._dynamo.reset()
    x = torch.randn(4, 3, 8, 8)
    F.cross_entropy(torch.compile(model, backend=backend)(x), torch.tensor([0, 1, 2, 3])).backward()
    assert seen["bw"] == 1 and saved, "no backward graph was compiled"
    assert torch.bool not in saved, f"tensors saved for backward: {saved}"


def test_input_gradient_uses_the_permutation_set_after_compilation():
    """The compiled graph reads the permutation buffer at run time (no constant baked in at trace time)."""
    torch.manual_seed(0)
    layer = bh.BiMaskLinear(16, 8, decay=0.0).double()
    compiled = torch.compile(layer, backend="aot_eager")
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    compiled(x).sum().backward()
    grad_identity = x.grad.clone()
    getattr(layer, PERMUTATION_KEY).copy_(torch.tensor([7, 2, 5, 0, 3, 6, 1, 4]))
    x.grad = None
    compiled(x).sum().backward()
    w = layer.weight.detach()
    mf = layer.forward_mask_for(w)
    mb = layer.backward_mask_for(w, mf)
    torch.testing.assert_close(x.grad, torch.ones(3, 8, dtype=torch.float64) @ (w * mb))
    assert not torch.equal(x.grad, grad_identity)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BIMASK_TEST_INDUCTOR") != "1",
                    reason="an inductor C++ build takes ~50 s on 2 cores; set BIMASK_TEST_INDUCTOR=1")
def test_inductor_gradients_match_the_formulas():
    """Small inductor builds: the decay term fused behind the weight-gradient matmul stays exact
    (inductor in torch 2.9 miscompiled ``torch.add(mm, t, alpha=decay)`` there), and the float-mask
    kernels (in-place conv ranks, gathered ``Mb``) give the formulas' gradients for a conv too."""
    torch.manual_seed(0)
    layer = bh.BiMaskLinear(8, 16, decay=0.05)
    getattr(layer, PERMUTATION_KEY).copy_(torch.randperm(16))
    x = torch.randn(6, 8, requires_grad=True)
    g = torch.randn(6, 16)
    torch._dynamo.reset()
    torch.compile(layer, backend="inductor")(x).backward(g)
    w = layer.weight.detach()
    mf = layer.forward_mask_for(w)
    mb = layer.backward_mask_for(w, mf)
    torch.testing.assert_close(layer.weight.grad, g.T @ x.detach() + 0.05 * (~mf) * w)
    torch.testing.assert_close(x.grad, g @ (w * mb))

    conv = bh.BiMaskConv2d(8, 16, 3, padding=1, decay=0.05)
    getattr(conv, PERMUTATION_KEY).copy_(torch.randperm(16))
    xc = torch.randn(2, 8, 6, 6, requires_grad=True)
    torch._dynamo.reset()
    out = torch.compile(conv, backend="inductor")(xc)
    gc = torch.randn_like(out)
    out.backward(gc)
    w = conv.weight.detach()
    mf = conv.forward_mask_for(w)
    mb = conv.backward_mask_for(w, mf)
    assert not torch.equal(mf, mb)  # the permutation makes the two masks differ
    torch.testing.assert_close(out, F.conv2d(xc.detach(), w * mf, conv.bias.detach(), padding=1))
    xr = xc.detach().clone().requires_grad_(True)
    F.conv2d(xr, w * mb, None, padding=1).backward(gc)
    torch.testing.assert_close(xc.grad, xr.grad)
    wr = w.clone().requires_grad_(True)
    F.conv2d(xc.detach(), wr, None, padding=1).backward(gc)
    torch.testing.assert_close(conv.weight.grad, wr.grad + 0.05 * (~mf) * w)


def test_trainer_with_torch_compile_trains_like_eager(tmp_path):
    from transformers import set_seed

    from bimask_hf import BiMaskTrainer, BiMaskTrainingArguments, create_model, load_image_classification_data

    data = load_image_classification_data("digits", image_size=16, in_chans=3, seed=0, rank=0, world_size=1,
                                          max_train_samples=64, max_eval_samples=16)

    def train(**kwargs):
        set_seed(0)
        model = create_model("resnet8_cifar", labels=data.labels, model_args={"base_width": 8})
        args = BiMaskTrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=16, learning_rate=0.1,
            report_to="none", use_cpu=True, save_strategy="no", logging_steps=3, disable_tqdm=True, seed=0,
            permutation_search="matched", permutation_interval=2, **kwargs,
        )
        trainer = BiMaskTrainer(model=model, args=args, train_dataset=data.train_dataset,
                                data_collator=data.collate_fn)
        trainer.train()
        return model

    torch._dynamo.reset()
    counters.clear()
    compiled = train(torch_compile=True, torch_compile_backend="aot_eager")
    assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager = train()
    perms = [getattr(layer, PERMUTATION_KEY) for layer in bh.sparse_layers(compiled).values()]
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms)  # refreshes ran
    for (name, a), b in zip(compiled.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name, rtol=1e-4, atol=1e-5)


def test_cli_accepts_torch_compile(tmp_path):
    from bimask_hf.train import parse_args

    _, _, train_args = parse_args(["--model", "resnet8_cifar", "--dataset", "digits", "--output_dir", str(tmp_path),
                                   "--use_cpu", "true", "--report_to", "none", "--torch_compile", "true",
                                   "--torch_compile_backend", "aot_eager"])
    assert train_args.torch_compile and train_args.torch_compile_backend == "aot_eager"
