"""Networks, losses, patches, data and the training loop of Patch Diffusion."""
