"""Per-channel statistics of datasets that timm does not ship (it has the ImageNet ones), in [0, 1] pixel units.

A leaf module: the CIFAR models' ``pretrained_cfg`` and the data recipes both read these numbers.
"""

from __future__ import annotations

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

# Means and standard deviations over the training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
