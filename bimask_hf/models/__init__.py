"""Models registered with timm by bimask-hf."""
