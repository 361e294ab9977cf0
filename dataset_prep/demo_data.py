"""A built-in, labelled image set that needs no download: one coloured shape,
near the centre, on a plain dark background.

Every image is a pure function of (seed, index), so a dataset made from it is
the same on every machine. The data is kept simple on purpose, for `make
demo`, which trains a tiny model for a few CPU minutes: the shapes fill
50-70% of the image side, their centres stay within 6% of the image centre
(so where a patch lies in the image tells a lot about what it shows), the
background is one flat dark colour, and each class has its own bright colour
(red circles, green squares, blue triangles, yellow crosses, magenta rings;
jittered a little per image). The colour is what a short training learns
first, at high noise levels; when it goes with the class, the outline the
model draws next follows one class instead of a blend of all five. Drawing
is done with numpy at 4x the output resolution and box-filtered down, which
anti-aliases the edges.
"""

import numpy as np

SHAPE_NAMES = ('circle', 'square', 'triangle', 'cross', 'ring')
DEFAULT_COUNT = 2000
DEFAULT_RESOLUTION = 32

_SUPERSAMPLE = 4
_MIN_EXTENT, _MAX_EXTENT = 0.50, 0.70  # shape diameter as a share of the image side
_MAX_OFFSET = 0.06                      # largest offset of the shape centre from the image centre
# Per class (SHAPE_NAMES order), RGB in [0, 1]: each has a channel >= 0.85.
CLASS_COLOURS = ((0.95, 0.25, 0.20), (0.25, 0.85, 0.30), (0.25, 0.45, 1.00), (1.00, 0.85, 0.20), (0.85, 0.30, 0.95))
_COLOUR_JITTER = 0.08                   # largest change per channel of a shape's colour
_MAX_BACKGROUND = 0.18                  # background channels are uniform in [0, this]


def check_resolution(resolution):
    """(width, height) of `resolution`, an int side or (width, height); ValueError
    unless both are integers >= 8."""
    width, height = resolution if isinstance(resolution, (tuple, list)) else (resolution, resolution)
    if not all(isinstance(side, (int, np.integer)) and side >= 8 for side in (width, height)):
        raise ValueError(f'demo shapes need a width and height of at least 8 pixels, got {resolution!r}')
    return int(width), int(height)


def _shape_mask(label, dx, dy, r):
    """Coverage of shape `label` (bool [H, W]) centred at the origin.

    dx, dy: [H, W] offsets from the shape centre, in units of the shorter image side;
    r: the shape's radius (half its diameter), same units.
    """
    name = SHAPE_NAMES[label]
    if name == 'circle':
        return dx ** 2 + dy ** 2 <= r ** 2
    if name == 'square':
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if name == 'triangle':
        # Equilateral, apex up, circumradius R = 1.15 r, moved down by R/4 so that
        # its bounding box (2 r wide, 1.5 R tall) is centred: inside all three
        # edges, each at the inradius R/2 from the centroid.
        big_r = 1.15 * r
        dy = dy - 0.25 * big_r
        inside = np.ones(dx.shape, dtype=bool)
        for phi in (0.0, 2 * np.pi / 3, 4 * np.pi / 3):
            inside &= dx * np.sin(phi) + dy * np.cos(phi) <= 0.5 * big_r
        return inside
    if name == 'cross':
        w = 0.3 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= w) & (ay <= r)) | ((ay <= w) & (ax <= r))
    assert name == 'ring'
    d2 = dx ** 2 + dy ** 2
    return (d2 <= r ** 2) & (d2 >= (0.55 * r) ** 2)


def _random_colours(rng, label):
    """A dark background colour and the class's bright colour, jittered: RGB floats in [0, 1]."""
    foreground = np.clip(np.array(CLASS_COLOURS[label]) + rng.uniform(-_COLOUR_JITTER, _COLOUR_JITTER, size=(3,)), 0, 1)
    background = rng.uniform(0.0, _MAX_BACKGROUND, size=(3,))
    return background, foreground


def make_shape_image(index, resolution=DEFAULT_RESOLUTION, seed=0):
    """Draw demo image number `index`.

    resolution: an int side, or (width, height). Returns (image, label):
    image is uint8 [height, width, 3] (HWC, RGB), label an int in
    [0, len(SHAPE_NAMES)), the index into SHAPE_NAMES. Classes are balanced:
    label = index mod the number of classes. Everything else (size,
    position, colour jitter, background) comes from a generator seeded with
    (seed, index), so the image depends on nothing else. Sizes and offsets
    are shares of the shorter side, so shapes keep their form in any aspect.
    """
    width, height = check_resolution(resolution)
    if index < 0:
        raise ValueError(f'demo image index must be >= 0, got {index}')
    rng = np.random.default_rng([seed, index])
    label = index % len(SHAPE_NAMES)
    r = 0.5 * rng.uniform(_MIN_EXTENT, _MAX_EXTENT)
    offset_x, offset_y = rng.uniform(-_MAX_OFFSET, _MAX_OFFSET, size=2)
    background, foreground = _random_colours(rng, label)

    side = min(width, height) * _SUPERSAMPLE   # the unit of lengths, in supersampled pixels
    x = (np.arange(width * _SUPERSAMPLE) + 0.5) / side    # pixel centres; the image spans [0, width / min side]
    y = (np.arange(height * _SUPERSAMPLE) + 0.5) / side
    cx, cy = width / min(width, height) / 2 + offset_x, height / min(width, height) / 2 + offset_y
    x, y = np.meshgrid(x, y, indexing='xy')  # [H, W] each; x = column, y = row
    canvas = np.empty(x.shape + (3,))
    canvas[...] = background
    canvas[_shape_mask(label, x - cx, y - cy, r)] = foreground

    canvas = canvas.reshape(height, _SUPERSAMPLE, width, _SUPERSAMPLE, 3).mean(axis=(1, 3))
    image = np.clip(np.rint(canvas * 255), 0, 255).astype(np.uint8)
    return image, label


def iterate_shapes(count=DEFAULT_COUNT, resolution=DEFAULT_RESOLUTION, seed=0):
    """Yield (image uint8 [H, W, 3], label int) for indices 0 .. count-1 (resolution as make_shape_image's)."""
    check_resolution(resolution)
    for index in range(count):
        yield make_shape_image(index, resolution, seed)
