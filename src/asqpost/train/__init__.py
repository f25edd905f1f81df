"""Training: one epoch and evaluation (engine), checkpoints, multi-process setup, whole runs (run)."""
