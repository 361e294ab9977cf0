"""Dataset archives in EDM's layout (docs/DESIGN.md, "File formats"): a ZIP
or a folder with one PNG per image, 00000/img00000000.png, 1000 per folder
and named by output index, all of the same width x height with 1 (L)
or 3 (RGB) channels, plus dataset.json holding
{"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}.

convert_dataset() writes an archive from any source that dataset_prep.sources
reads, after an optional crop and resize (center_crop, center_crop_wide,
make_transform) that gives, for the same source, EDM's pixels: the same
crop boxes and Lanczos resize, and RGB output under a crop transform unless
1 channel is asked for (output_channels). encode_dataset() writes a latent
archive instead: per image, the VAE posterior (mean, std) as .npy, plus
latents.json (training.dataset.LatentDataset reads it; its docstring gives
the layout). Both stage the output under a temporary name and rename it at
the end, and never overwrite an existing destination. User errors raise
ValueError or OSError; their messages name the dataset_tool.py flag to
change.
"""

import io
import json
import os
import sys
import zipfile

import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dnnlib
from training import dataset, latents
from dataset_prep.sources import open_source

TRANSFORMS = ('center-crop', 'center-crop-wide')
CHANNELS = ('auto', '1', '3')  # --channels; 'auto' is channels=None in the functions below
IMAGES_PER_FOLDER = 1000

# ----------------------------------------------------------------------------
# Crop and resize.


def _resize(image, width, height):
    """uint8 [H, W, C] -> uint8 [height, width, C] with a Lanczos filter (no-op if same size)."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    img = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
    array = np.asarray(img.resize((width, height), PIL.Image.Resampling.LANCZOS))
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def center_crop(image, width, height):
    """The largest centred region of aspect width:height, resized to width x height.

    For a square output this is EDM's center-crop (top (H - S) // 2, left
    (W - S) // 2, side S = min(H, W)); otherwise the region is w' x h' with
    w' = min(W, H width / height) and h' = min(H, W height / width), rounded
    to the nearest pixel, placed the same way.
    """
    h, w = image.shape[:2]
    if width == height:
        crop_h = crop_w = min(h, w)
    elif w * height >= h * width:   # the source is wider than the output: keep all rows
        crop_h, crop_w = h, min(w, int(round(h * width / height)))
    else:
        crop_h, crop_w = min(h, int(round(w * height / width))), w
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    return _resize(image[top: top + crop_h, left: left + crop_w], width, height)


def center_crop_wide(image, width, height):
    """EDM's center-crop-wide, pixel for pixel: uint8 [H, W, C] -> [width, width, C] or None.

    Takes the centred band of all W columns and B = round(width * H / W)
    rows (half to even; the row count the source would have at `width`
    columns), top row (H - B) // 2, resizes that W x B band to width x
    height, and puts it on a black width x width canvas from row
    (width - height) // 2. The band keeps its aspect ratio only when
    H / height = (W / width)^2, e.g. for a source of exactly width x height;
    a source of aspect width:height k times that size comes out squeezed k
    times horizontally. Returns None (skip) when W < width or B < height
    (a source wider than about width:height).
    """
    h, w = image.shape[:2]
    band = int(round(width * h / w))
    if w < width or band < height:
        return None
    top = (h - band) // 2
    resized = _resize(image[top: top + band], width, height)
    canvas = np.zeros([width, width, image.shape[2]], dtype=np.uint8)
    pad = (width - height) // 2
    canvas[pad: pad + height] = resized
    return canvas


def output_channels(transform, channels):
    """The channel count to decode every image to: 1, 3, or None for the source's own.

    channels=None ('auto') gives 3 (RGB, grayscale repeated) under a crop
    transform, as EDM writes, and otherwise lets the source decide
    (grayscale only when every input is).
    """
    if channels is None and transform is not None:
        return 3
    return channels


def make_transform(transform, resolution):
    """Return f(image uint8 [H, W, C], name) -> uint8 [H', W', C] or None (skip).

    Without a transform, images are resized to `resolution` (width, height)
    if it is given, which needs the images to have its aspect ratio.
    """
    if transform is None:
        def plain(image, name):
            h, w = image.shape[:2]
            if resolution is not None and w * resolution[1] != h * resolution[0]:
                raise ValueError(f'{name} is {w}x{h}, not of the aspect of --resolution={resolution[0]}x{resolution[1]}; '
                                 f'pass --transform=center-crop to crop it to that aspect')
            return image if resolution is None else _resize(image, *resolution)
        return plain
    crop = {'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]
    return lambda image, name: crop(image, *resolution)


def _check_options(transform, resolution, max_images, channels):
    """Validate the option combination before reading anything."""
    if channels not in (None, 1, 3):
        raise ValueError(f'--channels={channels}: must be 1, 3 or auto')
    if max_images is not None and max_images < 1:
        raise ValueError(f'--max-images={max_images}: must be >= 1')
    if transform is not None and resolution is None:
        raise ValueError(f'--transform={transform} needs --resolution=WxH')
    if resolution is None:
        return
    width, height = resolution
    if width < 1 or height < 1:
        raise ValueError(f'--resolution={width}x{height}: both sides must be at least 1 pixel')
    if transform == 'center-crop-wide' and height > width:
        raise ValueError(f'--resolution={width}x{height}: center-crop-wide pads to a {width}x{width} '
                         f'square, so the height must not exceed the width')


# ----------------------------------------------------------------------------
# Writing.


def archive_name(index, ext='png'):
    """Archive path of output item `index`: 00000/img00000000.png (or .ext)."""
    return f'{index // IMAGES_PER_FOLDER:05d}/img{index:08d}.{ext}'


def _encode_png(image):
    """uint8 [H, W, C] (C = 1 or 3) -> uncompressed PNG bytes."""
    img = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)  # mode L or RGB
    buffer = io.BytesIO()
    img.save(buffer, format='png', compress_level=0, optimize=False)
    return buffer.getvalue()


class _ArchiveWriter:
    """Writes named byte strings into a new zip or a new folder at `path`."""

    def __init__(self, path, as_zip):
        self._zip = zipfile.ZipFile(path, 'w', compression=zipfile.ZIP_STORED) if as_zip else None
        self._root = path
        if not as_zip:
            os.makedirs(path)

    def write(self, name, data):
        if self._zip is not None:
            self._zip.writestr(name, data)
            return
        full = os.path.join(self._root, name)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, 'wb') as f:
            f.write(data)

    def close(self):
        if self._zip is not None:
            self._zip.close()


def _check_size(image, name, expected):
    """The output image must match the first one's size (expected: (width, height), None for the first)."""
    h, w = image.shape[:2]
    if expected is None:
        return
    if (w, h) != expected:
        raise ValueError(f'{name} is {w}x{h} but earlier images are {expected[0]}x{expected[1]}; '
                         f'pass --resolution={expected[0]}x{expected[1]} to resize all images')


def _check_dest(dest):
    """--dest without trailing slashes; ValueError if it is empty, FileExistsError if it exists."""
    dest = dest.rstrip('/' + os.sep) or dest
    if not dest:
        raise ValueError('--dest must not be empty')
    if os.path.lexists(dest):
        raise FileExistsError(f'--dest={dest} already exists; remove it or choose another name '
                              f'(existing datasets are never overwritten)')
    return dest


def _skipped_images(resolution):
    """What center_crop_wide skips, for messages."""
    width, height = resolution
    return f'narrower than {width} pixels or wider than about {width}:{height}'


def convert_dataset(source, dest, max_images=None, transform=None, resolution=None, channels=None):
    """Convert `source` into a dataset archive at `dest` (a .zip or a new folder).

    resolution: (width, height) or None to keep the input size; channels: 1
    (grayscale), 3 (RGB) or None (auto: see output_channels). Output is
    staged under a temporary name and renamed at the end, so an interrupted or
    failed run leaves nothing that looks complete. Returns the number of
    images written. User errors raise ValueError or OSError.
    """
    dest = _check_dest(dest)
    _check_options(transform, resolution, max_images, channels)
    src = open_source(source, max_images, resolution, output_channels(transform, channels))
    try:
        with dnnlib.util.atomic_path(dest) as tmp:
            writer = _ArchiveWriter(tmp, as_zip=dest.lower().endswith('.zip'))
            try:
                labels, skipped = _write_images(src, make_transform(transform, resolution), writer)
                if not labels:
                    raise ValueError(f'--source={source}: all {skipped} images are {_skipped_images(resolution)}, '
                                     f'which --transform={transform} skips; nothing to write')
                writer.write('dataset.json', json.dumps({'labels': labels if src.has_labels else None}).encode('utf-8'))
            finally:
                writer.close()
    finally:
        src.close()
    if skipped:
        print(f'Skipped {skipped} images {_skipped_images(resolution)}, as EDM\'s {transform} does.',
              file=sys.stderr)
    return len(labels)


def _transformed(src, transform_image):
    """Yield (image, label) for the images of src: image uint8 [H, W, C] after
    the transform and the size check, or None when the transform skipped it.
    Stops after src.count images that were not skipped."""
    size, count = None, 0
    for item in src.iterate():
        image = transform_image(item.image, item.name)
        if image is not None:
            _check_size(image, item.name, size)
            size = (image.shape[1], image.shape[0])
            count += 1
        yield image, item.label
        if count >= src.count:
            return


def _write_images(src, transform_image, writer):
    """Transform, check and write up to src.count images.

    Returns (labels, skipped): labels is [[archive name, label], ...] for the
    written images, skipped the number the transform rejected.
    """
    labels, skipped = [], 0
    with tqdm(total=src.count, unit='img') as progress:
        for image, label in _transformed(src, transform_image):
            if image is None:
                skipped += 1
                continue
            name = archive_name(len(labels))
            writer.write(name, _encode_png(image))
            labels.append([name, label])
            progress.update(1)
    return labels, skipped


# ----------------------------------------------------------------------------
# Encoding to latents.


def _npy_bytes(array):
    """The .npy file of an array, as bytes."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _encode_batch(vae, images, xflip):
    """uint8 images list of [H, W, 3] -> float32 [N, V, 2, C, H/f, W/f]: the
    posterior (mean, std) of each image and, with xflip (V = 2), of its mirror."""
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)  # NHWC -> NCHW
    variants = [batch, batch.flip(3)] if xflip else [batch]
    stats = [torch.stack(latents.encode_images(vae, v), dim=1) for v in variants]
    return torch.stack(stats, dim=1).cpu().numpy()


def _write_latents(src, transform_image, writer, vae, xflip, batch_size):
    """Transform, check, encode and write up to src.count images, batch_size at a time.

    Returns (labels, skipped, shape): labels as _write_images's, shape the
    [V, 2, C, h, w] of every written .npy (None if nothing was written).
    """
    labels, skipped, pending, shape = [], 0, [], None

    def flush():
        nonlocal shape
        stats = _encode_batch(vae, [image for image, _ in pending], xflip)
        for item_stats, (_, label) in zip(stats, pending):
            name = archive_name(len(labels), ext='npy')
            writer.write(name, _npy_bytes(item_stats))
            labels.append([name, label])
        shape = list(stats.shape[1:])
        progress.update(len(pending))
        pending.clear()

    with tqdm(total=src.count, unit='img', desc='Encoding') as progress:
        for image, label in _transformed(src, transform_image):
            if image is None:
                skipped += 1
                continue
            pending.append((image, label))
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    return labels, skipped, shape


def _encoding_device(name):
    """torch.device for --device (default cuda if available, else cpu); ValueError if unusable."""
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as err:
        raise ValueError(f'--device={name}: {err}') from err
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device={name}: CUDA is not available here; use --device=cpu')
    return device


def encode_dataset(source, dest, vae=None, scale_factor=None, xflip=False, batch=64, device=None,
                   max_images=None, transform=None, resolution=None, channels=None):
    """Encode every image of `source` once with a VAE into a latent archive at `dest`.

    source, max_images, transform, resolution, channels: as convert_dataset's (usually
    a dataset archive made by convert); vae: hub id or save_pretrained
    folder (default training.latents.DEFAULT_VAE); scale_factor: recorded
    for training (default DEFAULT_SCALE_FACTOR); xflip: also encode each
    mirrored image; batch: images per VAE call; device: default cuda if
    available, else cpu. Staged under a temporary name and renamed at the
    end. Returns the number of images encoded. User errors raise
    ValueError or OSError.
    """
    vae = latents.DEFAULT_VAE if vae is None else os.fspath(vae)
    if os.path.isdir(vae):
        vae = os.path.abspath(vae)   # recorded, so training finds it from any working directory
    scale_factor = latents.DEFAULT_SCALE_FACTOR if scale_factor is None else float(scale_factor)
    dest = _check_dest(dest)
    _check_options(transform, resolution, max_images, channels)
    if batch < 1:
        raise ValueError(f'--batch={batch}: must be >= 1')
    if not scale_factor > 0:
        raise ValueError(f'--scale-factor={scale_factor}: must be > 0')
    device = _encoding_device(device)
    model = latents.load_vae(vae, device)
    vae_channels, factor = model.config.in_channels, latents.downsampling_factor(model)
    src = open_source(source, max_images, resolution, output_channels(transform, channels))
    try:
        if src.channels != vae_channels:
            raise ValueError(f'--source={source} gives {src.channels}-channel images, but the VAE encodes '
                             f'{vae_channels}-channel images; use an RGB dataset or --channels={vae_channels}')
        with dnnlib.util.atomic_path(dest) as tmp:
            writer = _ArchiveWriter(tmp, as_zip=dest.lower().endswith('.zip'))
            try:
                transform_image = _divisible(make_transform(transform, resolution), factor)
                labels, skipped, shape = _write_latents(src, transform_image, writer, model, xflip, batch)
                if not labels:
                    raise ValueError(f'--source={source}: all {skipped} images are {_skipped_images(resolution)}, '
                                     f'which --transform={transform} skips; nothing to encode')
                meta = dict(format=dataset.LATENT_FORMAT, vae=vae, scale_factor=scale_factor,
                            latent_channels=shape[2], **_shape_entries('latent', shape[3], shape[4]),
                            **_shape_entries('source', shape[3] * factor, shape[4] * factor),
                            xflip=bool(xflip), count=len(labels))
                writer.write('dataset.json', json.dumps({'labels': labels if src.has_labels else None}).encode('utf-8'))
                writer.write(dataset.LATENT_METADATA, json.dumps(meta, indent=2).encode('utf-8'))
            finally:
                writer.close()
    finally:
        src.close()
    return len(labels)


def _shape_entries(kind, height, width):
    """latents.json's size entries of kind 'latent' or 'source': {kind}_shape
    [height, width] always, {kind}_resolution the side of squares (null
    otherwise; older readers know squares only)."""
    return {f'{kind}_resolution': height if height == width else None, f'{kind}_shape': [height, width]}


def _divisible(transform_image, factor):
    """transform_image, plus a ValueError for images whose sides the VAE factor does not divide."""
    def transform(image, name):
        image = transform_image(image, name)
        if image is not None and (image.shape[0] % factor or image.shape[1] % factor):
            raise ValueError(f'{name} is {image.shape[1]}x{image.shape[0]}, but the VAE downsamples by '
                             f'{factor}; pass --resolution=WxH with multiples of {factor}')
        return image
    return transform
