"""Training: the loop (single process or DDP under torchrun) and its distributed helpers."""
