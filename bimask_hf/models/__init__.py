"""Models registered with timm by bimask-hf (importing this package registers them), and the image
processor of their 1-channel folders (registered with transformers' ``AutoImageProcessor``)."""

from . import (
    cifar,  # noqa: F401
    image_processor,  # noqa: F401
)
