"""Training: the SVI loop, step strategies (eager, replayed CPU graph, CUDA graph), checkpoints, DDP."""
