"""Everything about patches: sizes, probabilities, batch multipliers, the
per-step draw, cropping and coordinate grids (docs/DESIGN.md section 2).

Conventions (shapes are (height, width); a square of side R is (R, R))
- An H x W image is trained on h x w patches, the image scaled by a fraction
  f: h = floor(H f) and w = floor(W f), each rounded down to a multiple of
  the network's input multiple q (2^(levels - 1) for a UNet), so a patch has
  the image's aspect up to that rounding.
- Pixel space: f in {1/4, 1/2, 1} with probabilities {(1-p)*2/5, (1-p)*3/5,
  p}; latent space: f in {1/2, 1} with {1-p, p}; p = real_p is the share of
  full-size steps (p = 1 is plain EDM training). A square of side R gets
  the official sizes {R/4, R/2, R}.
- Batch multiplier m = floor(sqrt(H W / (h w))): a step at patch h x w uses
  m times the full-image batch, so its pixels are m h w <= sqrt(H W h w) <=
  H W, at most those of a full step. For squares m = R / P: the official
  table at 64 and 512 px (and for latents of side 32 and 64), not at 128
  and 256 px, where the official code takes 2 R/P at R/4, and at 128 px
  also at R/2 (batch_mult='official' takes its table, OFFICIAL_BATCH_TABLE).
- Image accounting: a step adds the images it used, batch * m, to the
  progress counter (batch * E[m] on average).
- Each side of a patch is at least PATCH_FLOOR pixels; an image too small for
  the requested sizes is an error.
- Coordinates: channel 0 = x (column), channel 1 = y (row) of each patch
  pixel in the FULL image, each axis mapped to [-1, 1] over its own extent:
  x = (column / (W - 1) - 0.5) * 2, y = (row / (H - 1) - 0.5) * 2.
"""

import math

import numpy as np
import torch

from training.networks import coordinate_values, full_grid, image_shape, patch_grid  # noqa: F401 (part of this API)

PATCH_FLOOR = 8

# The official code's batch multipliers: a step at side P of images of side R takes
# OFFICIAL_BATCH_TABLE[P] // OFFICIAL_BATCH_TABLE[R] times the batch (squares of these sides only).
OFFICIAL_BATCH_TABLE = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}
BATCH_MULTS = ('formula', 'official')   # train.py --batch-mult
CROP_ALIGNS = ('pixel', 'grid')       # where a crop's corner may lie: any pixel, or the network's input grid


def patch_sizes(resolution, latent=False, multiple=1):
    """Patch sizes in increasing order, for scale fractions [1/4, 1/2, 1]
    (pixels) or [1/2, 1] (latents) of an image of `resolution`; the sides of
    the smaller patches are rounded down to a multiple of `multiple`, the full
    image is the last one. As `resolution` is given: int sides for a square
    image (an int or (R, R)), (h, w) pairs otherwise."""
    height, width = image_shape(resolution)
    fractions = (2, 1) if latent else (4, 2, 1)
    sizes = [(height // f // multiple * multiple, width // f // multiple * multiple) for f in fractions[:-1]]
    sizes.append((height, width))
    return [h for h, _ in sizes] if height == width else sizes


def patch_probs(real_p, latent=False):
    """Probabilities of `patch_sizes`, in the same order."""
    if latent:
        return [1 - real_p, real_p]
    return [(1 - real_p) * 2 / 5, (1 - real_p) * 3 / 5, real_p]


def batch_multiplier(resolution, patch_size):
    """Images per step at `patch_size`, relative to a full-image step:
    floor(sqrt(H W / (h w))), which is R / P for squares. Both arguments are
    an int side or (height, width)."""
    (height, width), (h, w) = image_shape(resolution), image_shape(patch_size)
    return max(1, math.isqrt(height * width // (h * w)))


def official_batch_multiplier(resolution, patch_size):
    """The official code's multiplier OFFICIAL_BATCH_TABLE[P] // OFFICIAL_BATCH_TABLE[R]
    (e.g. R = 128: 4 at P = 64, 8 at P = 32; R = 256: 2 at 128, 8 at 64).
    ValueError for sides the table lacks, or a rectangle."""
    (height, width), (h, w) = image_shape(resolution), image_shape(patch_size)
    table = OFFICIAL_BATCH_TABLE
    if height != width or h != w or height not in table or h not in table:
        sides = ', '.join(str(side) for side in sorted(table))
        raise ValueError(f'--batch-mult=official: the official code\'s table has multipliers for square images '
                         f'and patches of sides {sides} only, not {size_label((h, w))} px patches of '
                         f'{size_label((height, width))} px images; use --batch-mult=formula (R/P)')
    return table[h] // table[height]


def size_label(size):
    """A patch size for people: '16' for a 16 x 16 square, '24x16' (width x height) otherwise."""
    height, width = image_shape(size)
    return f'{height}' if height == width else f'{width}x{height}'


def check_image_shape(shape, multiple, what='images'):
    """ValueError unless both sides of `shape` (height, width) are multiples of
    the network's input `multiple`; the message names the nearest shapes that work."""
    height, width = image_shape(shape)
    if height % multiple == 0 and width % multiple == 0:
        return

    def nearest(side):
        lower = side // multiple * multiple
        return sorted({s for s in (lower, lower + multiple) if s > 0}, key=lambda s: (abs(s - side), s))

    shapes = sorted({(h, w) for h in nearest(height) for w in nearest(width)},
                    key=lambda s: (abs(s[0] - height) + abs(s[1] - width), s))[:2]
    raise ValueError(f'The {what} are {width}x{height} pixels, but this network takes sides that are multiples of '
                     f'{multiple} (a UNet\'s total downsampling, a DiT\'s token size) in both directions; the nearest '
                     f'shapes that work are {" and ".join(f"{w}x{h}" for h, w in shapes)} (width x height)')


class PatchSchedule:
    """Which patch size each training step uses, and how many images it counts.

    Args:
        resolution:  the training images or latents: an int side R or (H, W).
        real_p:      share of full-size steps, in [0, 1].
        latent:      latent-space size set {1/2, 1} instead of {1/4, 1/2, 1}.
        progressive: train on the sizes in increasing order, switching at the
                     cumulative shares of the distribution, instead of drawing.
        seed:        the draw at step k uses a generator seeded by (seed, k),
                     the same on every rank, so all ranks do equal work.
        multiple:    patch sides are multiples of this (the network's input
                     multiple: 2^(levels - 1) for a UNet).
        batch_mult:  'formula': m = `batch_multiplier` (R/P for squares);
                     'official': the official code's table
                     (`official_batch_multiplier`; ValueError where it has
                     no entry).
        crop_align:  'pixel': a crop's corner is any pixel (the official
                     code's crops); 'grid': a multiple of `multiple` (for a
                     DiT, the token grid that sampling uses; docs/DESIGN.md
                     section 2 has the measurement behind the default).
    `sizes`: see `patch_sizes` (int sides for square images, (h, w) otherwise).
    """

    def __init__(self, resolution, real_p, latent=False, progressive=False, seed=0, multiple=1,
                 batch_mult='formula', crop_align='pixel'):
        if not 0 <= real_p <= 1:
            raise ValueError(f'real_p must be in [0, 1], got {real_p}')
        if crop_align not in CROP_ALIGNS:
            raise ValueError(f'crop_align={crop_align!r}: choose one of {", ".join(CROP_ALIGNS)}')
        self.multiple = int(multiple)
        self.crop_align = crop_align
        self.shape = image_shape(resolution)
        sizes = patch_sizes(self.shape, latent, multiple)
        probs = patch_probs(real_p, latent)
        keep = [i for i, q in enumerate(probs) if q > 0]
        self.sizes = [sizes[i] for i in keep]
        self.probs = [probs[i] for i in keep]
        patches = [image_shape(s) for s in self.sizes if image_shape(s) != self.shape]   # full images need no floor
        if any(min(s) < max(PATCH_FLOOR, multiple) for s in patches):
            smallest = max(PATCH_FLOOR, multiple) * (2 if latent else 4)
            raise ValueError(
                f'Images of {self.shape[1]}x{self.shape[0]} pixels are too small for patch sizes '
                f'{", ".join(size_label(s) for s in sizes)} (every side of a patch must be at least '
                f'{max(PATCH_FLOOR, multiple)} pixels): use images whose shorter side is at least {smallest}, '
                f'or --real_p=1 (full images only)')
        if batch_mult not in BATCH_MULTS:
            raise ValueError(f'batch_mult={batch_mult!r}: choose one of {", ".join(BATCH_MULTS)}')
        self.batch_mult = batch_mult
        self.multipliers = [self.multiplier(s) for s in self.sizes]
        self.expected_multiplier = float(np.dot(self.probs, self.multipliers))
        self.progressive = progressive
        self.seed = int(seed)
        self._cum_probs = np.cumsum(self.probs)

    @property
    def resolution(self):
        """The side of square images; ValueError for non-square ones (use `shape`)."""
        if self.shape[0] != self.shape[1]:
            raise ValueError(f'The images are {size_label(self.shape)}, not square')
        return self.shape[0]

    def draw(self, step, progress=0.0):
        """Patch size of training step `step` (one of `sizes`); `progress` in
        [0, 1] is the share of the training done before the step
        (`training_progress`), used by the progressive schedule: the first
        size whose cumulative share is >= the progress, as the official code
        switches."""
        if self.progressive:
            index = int(np.searchsorted(self._cum_probs, progress, side='left'))
        else:
            u = np.random.default_rng([self.seed, int(step)]).random()
            index = int(np.searchsorted(self._cum_probs, u * self._cum_probs[-1], side='right'))
        return self.sizes[min(index, len(self.sizes) - 1)]

    @property
    def corner_step(self):
        """Crop corners are multiples of this (`random_corners`' step)."""
        return self.multiple if self.crop_align == 'grid' else 1

    def multiplier(self, patch_size):
        """Images per step at `patch_size`, relative to a full-image step."""
        if self.batch_mult == 'official':
            return official_batch_multiplier(self.shape, patch_size)
        return batch_multiplier(self.shape, patch_size)

    def merge_limit(self, patch_size):
        """How many accumulation rounds a step at `patch_size` may merge into
        one without its patches outgrowing a full round's pixels: the most g
        with g m h w <= H W, at most m (= m for the formula's multipliers)."""
        (height, width), (h, w) = self.shape, image_shape(patch_size)
        m = self.multiplier(patch_size)
        return max(1, min(m, height * width // (m * h * w)))

    def describe(self):
        return ', '.join(f'{size_label(s)}px: p={q:.3f} x{m}' for s, q, m in zip(self.sizes, self.probs, self.multipliers))


def training_progress(nimg, total_nimg):
    """The share of the training done before a step, as the official code
    measures it for the progressive schedule: whole kimg over the duration in
    kimg, (nimg // 1000) / (total_nimg / 1000), so a phase ends only at a
    step whose whole kimg exceed its cumulative share (with an integer
    duration in kimg, the same float as the official code's)."""
    return (int(nimg) // 1000) / (total_nimg / 1000)


def random_corners(batch_size, resolution, size, generator=None, device='cpu', step=1):
    """Uniform top-left corners (top, left), top in [0, H - h] and left in
    [0, W - w], each [N] long (resolution, size: int sides or (height, width)),
    drawn among the multiples of `step` (1: every pixel, the same draws as
    ever)."""
    (height, width), (h, w) = image_shape(resolution), image_shape(size)
    rows, cols = (height - h) // step + 1, (width - w) // step + 1   # corner choices per axis
    if rows == cols:   # one draw for both, as for squares
        corners = torch.randint(0, rows, (2, batch_size), generator=generator)
    else:
        corners = torch.stack([torch.randint(0, rows, (batch_size,), generator=generator),
                               torch.randint(0, cols, (batch_size,), generator=generator)])
    if step != 1:
        corners = corners * step
    if torch.device(device).type == 'cuda':
        corners = corners.pin_memory().to(device, non_blocking=True)   # no wait for the device
    return corners[0], corners[1]


def crop(images, top, left, size):
    """Crop an h x w patch (size: int or (h, w)) from each image at its own corner, without a Python loop.

    images [N, C, H, W]; top, left [N] long. Returns [N, C, h, w].
    """
    h, w = image_shape(size)
    rows = (top.to(images.device)[:, None] + torch.arange(h, device=images.device))[:, :, None]    # [N, h, 1]
    cols = (left.to(images.device)[:, None] + torch.arange(w, device=images.device))[:, None, :]   # [N, 1, w]
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images[batch, :, rows, cols].permute(0, 3, 1, 2)              # [N, h, w, C] -> [N, C, h, w]


def random_patches(images, size, generator=None, corner_step=1):
    """Crop one random h x w patch (size: int or (h, w)) per image, its corner
    a multiple of `corner_step`; returns (patches, pos) with pos the
    [N, 2, h, w] coordinate grid. The full size returns the images and the
    full grid."""
    n, _, height, width = images.shape
    size = image_shape(size)
    dtype = images.dtype if images.is_floating_point() else torch.float32
    if size == (height, width):
        return images, full_grid((height, width), n, images.device, dtype)
    top, left = random_corners(n, (height, width), size, generator, images.device, step=corner_step)
    return crop(images, top, left, size), patch_grid(top, left, size, (height, width), dtype)
