"""Fixtures shared by the test modules: small real datasets and tiny models."""

from __future__ import annotations

import pytest


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
