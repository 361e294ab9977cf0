"""Image files: uint8 conversion, PNG writing (atomic), grids and the file
names of generated images."""

import math
import os

import numpy as np
import PIL.Image
import torch

import dnnlib
from training.dataset import IMAGE_EXTENSIONS   # what fid.py and train.py read from a folder


def to_uint8(images):
    """[-1, 1] float images -> uint8 [0, 255], rounded as EDM (x * 127.5 + 128, truncated)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)



def image_path(outdir, seed, subdirs=False):
    """outdir/{seed:06d}.png, or outdir/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def other_images(outdir, paths):
    """The image files under the folder `outdir` (sorted, subfolders included) other than `paths`."""
    if not os.path.isdir(outdir):
        return []
    expected = {os.path.normpath(path) for path in paths}
    found = (os.path.normpath(os.path.join(root, name)) for root, _dirs, names in os.walk(outdir) for name in names
             if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS)
    return sorted(path for path in found if path not in expected)


def grid_path(outdir):
    """Where generate.py --grid writes its grid: OUTDIR-grid.png, beside the
    image folder rather than in it, so that the folder holds one PNG per seed,
    which is what fid.py calc (and every other FID tool) reads."""
    folder = os.path.normpath(outdir)
    if os.path.basename(folder) in ('', '.', '..'):   # '.', '..', '/': name the grid after the folder itself
        folder = os.path.abspath(folder)
    return f'{folder}-grid.png'


def _to_pil(image):
    """uint8 [C, H, W] tensor (C = 1 or 3) -> PIL image (L or RGB)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f'Expected a uint8 image [C, H, W] with 1 or 3 channels, got {image.dtype} {list(image.shape)}')
    array = image.permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else PIL.Image.fromarray(array, 'RGB')


def save_image(image, path):
    """Write one uint8 image [C, H, W] (C = 1 or 3) as a PNG, atomically."""
    pil_image = _to_pil(image)
    with dnnlib.util.atomic_path(path) as tmp:
        pil_image.save(tmp, format='PNG')


def image_grid(images, grid_width=None):
    """Tile uint8 images [N, C, H, W] row by row into one [C, rows H, grid_width W] image.

    grid_width defaults to ceil(sqrt(N)); cells after the last image are black.
    """
    n, channels, height, width = images.shape
    grid_width = grid_width or math.ceil(math.sqrt(n))
    rows = math.ceil(n / grid_width)
    cells = torch.zeros([rows * grid_width, channels, height, width], dtype=images.dtype, device=images.device)
    cells[:n] = images
    cells = cells.reshape(rows, grid_width, channels, height, width)
    return cells.permute(2, 0, 3, 1, 4).reshape(channels, rows * height, grid_width * width)


def save_image_grid(images, path, grid_width=None):
    """Write uint8 images [N, C, H, W] as one grid PNG (see `image_grid`), atomically."""
    if len(images) == 0:
        raise ValueError('No images to put in the grid')
    save_image(image_grid(images, grid_width), path)
    return path


def load_image(path):
    """A PNG -> uint8 [C, H, W] tensor (C = 1 or 3)."""
    array = np.asarray(PIL.Image.open(path))
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)
