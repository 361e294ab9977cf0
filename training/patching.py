"""Everything about patches: sizes, probabilities, batch multipliers, the
per-step draw, cropping and coordinate grids (docs/DESIGN.md section 2).

Conventions
- A square image of resolution R is trained on square patches of size P.
- Pixel space: P in {R/4, R/2, R} with probabilities
  {(1-p)*2/5, (1-p)*3/5, p}; latent space: P in {R/2, R} with {1-p, p};
  p = real_p is the share of full-size steps (p = 1 is plain EDM training).
- Batch multiplier m(P) = R / P: a step at patch size P uses m(P) times the
  full-image batch, so the pixels per step are (R/P) * P^2 = R * P, at most
  those of a full step. This reproduces the official table at R = 64
  (32 -> 2x, 16 -> 4x) and holds at every power-of-two resolution.
- Image accounting: a step adds the images it used, batch * m(P), to the
  progress counter (batch * E[m] on average).
- The smallest patch is never below PATCH_FLOOR pixels; a resolution too
  small for the requested sizes is an error.
- Coordinates: channel 0 = x (column), channel 1 = y (row) of each patch
  pixel in the FULL image, mapped to [-1, 1] by (index / (R - 1) - 0.5) * 2.
"""

import numpy as np
import torch

from training.networks import coordinate_values, full_grid, patch_grid  # noqa: F401 (the grid is part of this API)

PATCH_FLOOR = 8


def patch_sizes(resolution, latent=False):
    """Patch sizes in increasing order: [R/4, R/2, R] (pixels) or [R/2, R] (latents)."""
    fractions = (2, 1) if latent else (4, 2, 1)
    return [resolution // f for f in fractions]


def patch_probs(real_p, latent=False):
    """Probabilities of `patch_sizes`, in the same order."""
    if latent:
        return [1 - real_p, real_p]
    return [(1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, real_p]


def batch_multiplier(resolution, patch_size):
    """Images per step at `patch_size`, relative to a full-image step: R / P."""
    return resolution // patch_size


class PatchSchedule:
    """Which patch size each training step uses, and how many images it counts.

    Args:
        resolution:  R, the side of the (square) training images or latents.
        real_p:      share of full-size steps, in [0, 1].
        latent:      latent-space size set {R/2, R} instead of {R/4, R/2, R}.
        progressive: train on the sizes in increasing order, switching at the
                     cumulative shares of the distribution, instead of drawing.
        seed:        the draw at step k uses a generator seeded by (seed, k),
                     the same on every rank, so all ranks do equal work.
    """

    def __init__(self, resolution, real_p, latent=False, progressive=False, seed=0):
        if not 0 <= real_p <= 1:
            raise ValueError(f'real_p must be in [0, 1], got {real_p}')
        sizes = patch_sizes(resolution, latent)
        probs = patch_probs(real_p, latent)
        keep = [i for i, q in enumerate(probs) if q > 0]
        self.resolution = int(resolution)
        self.sizes = [sizes[i] for i in keep]
        self.probs = [probs[i] for i in keep]
        patches = [s for s in self.sizes if s < resolution]   # full images need no floor
        if any(s < PATCH_FLOOR or resolution % s for s in patches):
            raise ValueError(
                f'Resolution {resolution} is too small for patch sizes {sizes} (the smallest patch must be '
                f'at least {PATCH_FLOOR} pixels and divide the resolution): use a resolution of at least '
                f'{PATCH_FLOOR * (2 if latent else 4)} or --real_p=1 (full images only)')
        self.multipliers = [batch_multiplier(resolution, s) for s in self.sizes]
        self.expected_multiplier = float(np.dot(self.probs, self.multipliers))
        self.progressive = progressive
        self.seed = int(seed)
        self._cum_probs = np.cumsum(self.probs)

    def draw(self, step, progress=0.0):
        """Patch size of training step `step`; `progress` in [0, 1] is the
        fraction of the training images seen before the step (used by the
        progressive schedule: the first size whose cumulative share is >= the
        progress, as the official code switches)."""
        if self.progressive:
            index = int(np.searchsorted(self._cum_probs, progress, side='left'))
        else:
            u = np.random.default_rng([self.seed, int(step)]).random()
            index = int(np.searchsorted(self._cum_probs, u * self._cum_probs[-1], side='right'))
        return self.sizes[min(index, len(self.sizes) - 1)]

    def multiplier(self, patch_size):
        return batch_multiplier(self.resolution, patch_size)

    def describe(self):
        return ', '.join(f'{s}px: p={q:.3f} x{m}' for s, q, m in zip(self.sizes, self.probs, self.multipliers))


def random_corners(batch_size, resolution, size, generator=None, device='cpu'):
    """Uniform top-left corners (top, left) in [0, R - P], each [N] long."""
    corners = torch.randint(0, resolution - size + 1, (2, batch_size), generator=generator)
    if torch.device(device).type == 'cuda':
        corners = corners.pin_memory().to(device, non_blocking=True)   # no wait for the device
    return corners[0], corners[1]


def crop(images, top, left, size):
    """Crop a P x P patch from each image at its own corner, without a Python loop.

    images [N, C, R, R]; top, left [N] long. Returns [N, C, P, P].
    """
    offsets = torch.arange(size, device=images.device)
    rows = (top.to(images.device)[:, None] + offsets)[:, :, None]         # [N, P, 1]
    cols = (left.to(images.device)[:, None] + offsets)[:, None, :]        # [N, 1, P]
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[batch, :, rows, cols].permute(0, 3, 1, 2)              # [N, P, P, C] -> [N, C, P, P]


def random_patches(images, size, generator=None):
    """Crop one random P x P patch per image; returns (patches, pos) with pos
    the [N, 2, P, P] coordinate grid. P == R returns the images and full grid."""
    n, _, height, width = images.shape
    assert height == width, 'images must be square'
    if size == height:
        return images, full_grid(height, n, images.device, images.dtype if images.is_floating_point() else torch.float32)
    top, left = random_corners(n, height, size, generator, images.device)
    dtype = images.dtype if images.is_floating_point() else torch.float32
    return crop(images, top, left, size), patch_grid(top, left, size, height, dtype)
