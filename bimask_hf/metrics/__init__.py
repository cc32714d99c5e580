"""Metric modules shipped with bimask-hf (loadable with evaluate.load by path)."""
