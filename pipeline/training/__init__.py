"""Training: the U-Net, losses, augmentation, patch sampling from the store, the per-worker epoch
loop, cross-validation splits, and the Ray Train launch that runs the loop data-parallel."""
