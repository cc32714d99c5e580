"""Models registered with timm by bimask-hf (``bimask_hf.models.cifar``), and the image processor of their
1-channel folders, registered with transformers' ``AutoImageProcessor`` (``bimask_hf.models.image_processor``).

``import bimask_hf`` registers both as soon as timm / transformers are imported (``bimask_hf.registration``).
"""
