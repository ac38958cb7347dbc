"""Training: data loading and the multitask training loop."""
