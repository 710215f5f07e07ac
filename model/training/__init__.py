"""Training: the loop with exact resume, checkpoints, torch.distributed plumbing, pretraining objectives and pretraining."""
