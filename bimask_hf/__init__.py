"""bimask-hf: N:M sparse training with Bi-directional Masks for timm and transformers models."""

__version__ = "0.1.0"
