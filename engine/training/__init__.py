"""Training: pairs, augmented photo views, losses, the trainer and the `ecsearch train` job."""
