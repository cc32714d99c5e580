"""Models registered with timm by bimask-hf (importing this package registers them)."""

from . import cifar  # noqa: F401
