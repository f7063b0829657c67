"""Plain PyTorch example models (no fraccompile import in model files)."""
