"""Training: one epoch (engine), a whole run (run: fit), what it trains on (loading), evaluation (evaluation),
their typed results (results), checkpoints, devices and precision (accel), multi-process setup (distributed)."""
