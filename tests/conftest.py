"""Fixtures shared by the test modules: small real datasets and tiny models."""

from __future__ import annotations

import pytest
import torch


def _digits(max_train_samples: int, max_eval_samples: int):
    from bimask_hf import load_image_classification_data

    return load_image_classification_data("digits", image_size=16, in_chans=3, seed=0, rank=0, world_size=1,
                                          max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)


@pytest.fixture(scope="session")
def digits():
    """sklearn's 8x8 digits at 16x16 RGB: 256 training and 64 evaluation examples (augmented training set)."""
    return _digits(256, 64)


@pytest.fixture(scope="session")
def small_digits():
    """The digits with 64 training and 32 evaluation examples (the evaluation set is not augmented)."""
    return _digits(64, 32)


@pytest.fixture
def mask_path(monkeypatch):
    """Route the layers' masks through one path: ``select("kernels")`` (the C kernels, their calls recorded in
    the list it returns; skipped without a C compiler), ``"tensor-ops"`` (kernels switched off) or ``"graph"``
    (what runs under torch.compile)."""
    from bimask_hf import kernels

    def select(path: str) -> list[str]:
        calls: list[str] = []
        if path == "kernels":
            if not kernels.available():
                pytest.skip("no C compiler: the C kernels are not built here")
            for name in ("forward_mask", "backward_mask"):
                real = getattr(kernels, name)
                monkeypatch.setattr(kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
        if path == "tensor-ops":
            monkeypatch.setattr(kernels, "_switched_off", True)  # what kernels.disabled() sets
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: path == "graph")
        return calls

    return select
