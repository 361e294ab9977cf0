"""Make dataset archives (a ZIP or a folder of PNGs plus dataset.json) that
train.py and fid.py read.

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
        --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py convert --source=demo:shapes --dest=datasets/shapes-32x32.zip
    python dataset_tool.py encode --source=datasets/imagenet-256x256.zip \\
        --dest=datasets/imagenet-latents.zip --xflip=1

Without a subcommand the tool runs `convert`, so EDM's invocations keep
working. The archive layout (SPEC.md section 3): images 00000/img00000000.png,
1000 per folder, named by output index, all the same square power-of-two size,
1 (L) or 3 (RGB) channels, and dataset.json with
{"labels": [["00000/img00000000.png", 6], ...]} or {"labels": null}.
`encode` writes the VAE posterior statistics of every image instead
(training.dataset.LatentDataset reads them; its docstring has the layout).
"""

import dataclasses
import gzip
import io
import json
import os
import pickle
import re
import tarfile
import zipfile
import zlib
from typing import Callable, Iterator

import click
import numpy as np
import PIL.Image
from tqdm import tqdm

import dnnlib

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.pbm', '.pgm', '.png', '.pnm', '.ppm', '.tif', '.tiff', '.webp')
TRANSFORMS = ('center-crop', 'center-crop-wide')
IMAGES_PER_FOLDER = 1000
MNIST_PAD = 2  # 28x28 digits are padded to 32x32, as in EDM

_GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')

# ----------------------------------------------------------------------------
# Reading sources. Each opener returns an ImageSource whose images are uint8
# arrays [H, W, C] with C = source.channels (1 or 3).


@dataclasses.dataclass
class SourceImage:
    """One input image: `name` says where it came from (for error messages)."""
    name: str
    image: np.ndarray  # uint8 [H, W, C]
    label: object  # int class, list of floats, or None


@dataclasses.dataclass
class ImageSource:
    """An opened source: `count` images of `channels` channels, read by iterate().

    close() releases what the source holds open (e.g. its zip file).
    """
    count: int
    channels: int
    iterate: Callable[[], Iterator[SourceImage]]
    has_labels: bool
    close: Callable[[], None] = lambda: None


def _mode_channels(mode):
    """Output channel count (1 or 3) for a PIL image mode."""
    return 1 if mode in _GRAY_MODES else 3


def _pil_to_array(img, channels):
    """PIL image of any mode -> uint8 [H, W, channels].

    16-bit grayscale is scaled to 8 bits, alpha is dropped, palettes and other
    colour modes become RGB, and grayscale is repeated to RGB if channels == 3.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = PIL.Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8))  # mode L
    target = 'L' if channels == 1 else 'RGB'
    if img.mode != target:
        img = img.convert(target)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, np.newaxis] if array.ndim == 2 else array


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError, zipfile.BadZipFile,
                  zlib.error)   # the last two: a damaged member of a zip source


def _unreadable(name, err):
    """The ClickException for an image file PIL cannot read."""
    reason = 'not a recognised image format' if isinstance(err, PIL.UnidentifiedImageError) else str(err)
    return click.ClickException(f'{name}: cannot read this image ({reason}); remove or replace the file')


def _decode_image(fileobj, name, channels):
    """Decode an image file object to uint8 [H, W, channels]; ClickException if unreadable."""
    try:
        with PIL.Image.open(fileobj) as img:
            img.load()
            return _pil_to_array(img, channels)
    except _DECODE_ERRORS as err:
        raise _unreadable(name, err) from None


def _peek_mode(fileobj, name):
    """PIL mode of an image file, reading only its header."""
    try:
        with PIL.Image.open(fileobj) as img:
            return img.mode
    except _DECODE_ERRORS as err:
        raise _unreadable(name, err) from None


def _is_image_name(relpath):
    """True for image files by extension, skipping hidden files and macOS metadata."""
    parts = relpath.split('/')
    if any(p.startswith('.') or p == '__MACOSX' for p in parts):
        return False
    return os.path.splitext(relpath)[1].lower() in IMAGE_EXTENSIONS


def _parse_labels_json(text, where):
    """Parse dataset.json text -> {relative path: label} or None ("labels": null)."""
    fix = f'{where}: expected {{"labels": [["path/img.png", 0], ...]}} or {{"labels": null}}; fix or remove the file'
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise click.ClickException(f'{where}: not valid JSON ({err}); fix or remove the file') from None
    if not isinstance(data, dict) or 'labels' not in data:
        raise click.ClickException(fix)
    entries = data['labels']
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise click.ClickException(fix)
    labels = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and _is_label(entry[1])):
            raise click.ClickException(f'{where}: bad entry {json.dumps(entry)[:80]}; each entry must be '
                                       f'["path/img.png", class] with an integer class >= 0 or a list of numbers')
        labels[entry[0].replace('\\', '/')] = entry[1]
    return labels


def _is_label(value):
    """A class index (int >= 0) or a label vector (list of numbers)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def _folder_labels(names):
    """EDM's fallback: class = index of the top-level folder, if there are several."""
    tops = [n.split('/')[0] if '/' in n else '' for n in names]
    classes = {t: i for i, t in enumerate(sorted(set(tops)))}
    if len(classes) <= 1:
        return None
    return dict(zip(names, (classes[t] for t in tops)))


def _open_image_collection(names, open_file, labels_text, where, count_limit):
    """Shared logic of folder and zip sources.

    names: sorted relative paths ('/'-separated) of the images; open_file(name)
    -> binary file object; labels_text: dataset.json text or None; where: the
    source path for messages. Reads every image header once to pick the
    output channels: RGB if any image is colour, else grayscale.
    """
    if not names:
        raise click.ClickException(f'{where}: no images found (looked for {", ".join(IMAGE_EXTENSIONS)}); '
                                   f'check the path')
    labels = _parse_labels_json(labels_text, f'{where}/dataset.json') if labels_text is not None else None
    if labels is None and labels_text is None:
        labels = _folder_labels(names)
    if labels is not None:
        missing = [n for n in names if n not in labels]
        if missing:
            raise click.ClickException(f'{where}: {missing[0]} has no label in dataset.json ({len(missing)} images '
                                       f'lack one); add them, or set "labels": null to convert without labels')
    channels = 1
    for name in tqdm(names, desc='Scanning', unit='img', leave=False):
        with open_file(name) as f:
            channels = max(channels, _mode_channels(_peek_mode(f, f'{where}/{name}')))

    def iterate():
        for name in names:
            with open_file(name) as f:
                image = _decode_image(f, f'{where}/{name}', channels)
            yield SourceImage(f'{where}/{name}', image, None if labels is None else labels[name])
    return ImageSource(count=_limit(len(names), count_limit), channels=channels, iterate=iterate,
                       has_labels=labels is not None)


def _limit(count, max_images):
    """Number of images to write: count, capped at --max-images."""
    return count if max_images is None else min(count, max_images)


def open_image_folder(path, max_images=None):
    """All images under `path` (recursive, sorted by relative path), labels from dataset.json."""
    names = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for fname in files:
            rel = os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/')
            if _is_image_name(rel):
                names.append(rel)
    names.sort()
    meta = os.path.join(path, 'dataset.json')
    labels_text = None
    if os.path.isfile(meta):
        with open(meta, 'rb') as f:
            labels_text = f.read()
    return _open_image_collection(names, lambda n: open(os.path.join(path, n), 'rb'), labels_text,
                                  path.rstrip('/'), max_images)


def open_image_zip(path, max_images=None):
    """All images in a zip (sorted by member name), labels from its dataset.json."""
    try:
        with zipfile.ZipFile(path) as z:
            members = set(z.namelist())
            labels_text = z.read('dataset.json') if 'dataset.json' in members else None
    except (zipfile.BadZipFile, OSError) as err:
        raise click.ClickException(f'{path}: cannot read this zip ({err}); check the file') from None
    names = sorted(n for n in members if not n.endswith('/') and _is_image_name(n))
    archive = zipfile.ZipFile(path)
    try:
        source = _open_image_collection(names, archive.open, labels_text, path, max_images)
    except click.ClickException:
        archive.close()
        raise
    source.close = archive.close
    return source


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches: allows only numpy arrays (and the bytes
    encoding of protocol-2 pickles), so a doctored tarball cannot run code."""

    _ALLOWED = {
        ('_codecs', 'encode'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f'unexpected object {module}.{name} in a CIFAR batch')
        return super().find_class(module, name)


def _cifar_field(batch, key):
    """batch[key], whether keys are str (the Python 2 file read as latin1) or bytes."""
    return batch[key] if key in batch else batch[key.encode()]


def open_cifar10(path, max_images=None):
    """The 50,000 training images of cifar-10-python.tar.gz (RGB 32x32), with labels."""
    images, labels = [], []
    try:
        with tarfile.open(path, 'r:gz') as tar:
            for i in range(1, 6):
                member = f'cifar-10-batches-py/data_batch_{i}'
                with tar.extractfile(member) as f:
                    batch = _ArrayUnpickler(f, encoding='latin1').load()
                data = np.asarray(_cifar_field(batch, 'data'), dtype=np.uint8)
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # NCHW -> NHWC
                labels.append(np.asarray(_cifar_field(batch, 'labels'), dtype=np.int64))
    except (tarfile.TarError, OSError, KeyError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise click.ClickException(f'{path}: not a readable CIFAR-10 python tarball ({err!r}); download '
                                   f'cifar-10-python.tar.gz again') from None
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) != len(labels):
        raise click.ClickException(f'{path}: {len(images)} images but {len(labels)} labels; download it again')
    return _array_source(images, labels, path, max_images)


def _array_source(images, labels, where, max_images):
    """ImageSource over in-memory uint8 images [N, H, W, C] and int labels [N]."""
    def iterate():
        for i, (image, label) in enumerate(zip(images, labels)):
            yield SourceImage(f'{where}[{i}]', image, int(label))
    return ImageSource(count=_limit(len(images), max_images), channels=images.shape[3], iterate=iterate,
                       has_labels=True)


def _read_idx(path, magic, ndim):
    """Array from a gzipped IDX file (MNIST format) with the expected magic number."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise click.ClickException(f'{path}: cannot read this gzip file ({err}); download it again') from None
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], 'big') != magic:
        raise click.ClickException(f'{path}: not an MNIST IDX file; download it again')
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    if len(data) - header != int(np.prod(shape)):
        raise click.ClickException(f'{path}: truncated ({len(data) - header} bytes of data for shape {shape}); '
                                   f'download it again')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def open_mnist(images_path, max_images=None):
    """MNIST training digits (1 channel, padded to 32x32 as in EDM) with labels."""
    labels_path = images_path.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    if not os.path.isfile(labels_path):
        raise click.ClickException(f'{labels_path}: missing; MNIST needs the labels file next to the images file')
    images = _read_idx(images_path, 0x00000803, 3)
    labels = _read_idx(labels_path, 0x00000801, 1)
    if len(images) != len(labels):
        raise click.ClickException(f'{images_path}: {len(images)} images but {len(labels)} labels in '
                                   f'{labels_path}; download both again')
    images = np.pad(images, [(0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)])[..., np.newaxis]
    return _array_source(images, labels, images_path, max_images)


def open_lmdb(path, max_images=None):
    """LSUN-style LMDB folder: each value is an encoded image; no labels; always RGB."""
    try:
        import lmdb
    except ImportError:
        raise click.ClickException(f'{path}: reading LMDB folders needs the lmdb package: pip install lmdb') from None
    try:
        with lmdb.open(path, readonly=True, lock=False) as env:
            count = env.stat()['entries']
    except lmdb.Error as err:
        raise click.ClickException(f'{path}: cannot open this LMDB folder ({err}); check the path') from None
    if count == 0:
        raise click.ClickException(f'{path}: the LMDB database is empty; check the path')

    def iterate():
        with lmdb.open(path, readonly=True, lock=False) as env, env.begin(write=False) as txn:
            for key, value in txn.cursor():
                name = f'{path}[{key.decode(errors="replace")}]'
                yield SourceImage(name, _decode_image(io.BytesIO(value), name, 3), None)
    return ImageSource(count=_limit(count, max_images), channels=3, iterate=iterate, has_labels=False)


def open_demo(spec, max_images=None, resolution=None):
    """Built-in 'demo:shapes[:N]': N procedurally drawn images (default 2000), RGB, labelled."""
    from training import demo_data
    match = re.fullmatch(r'demo:shapes(?::(\d+))?', spec)
    if match is None:
        raise click.ClickException(f'--source={spec}: unknown demo source; use demo:shapes or demo:shapes:N')
    count = int(match.group(1)) if match.group(1) else demo_data.DEFAULT_COUNT
    if count < 1:
        raise click.ClickException(f'--source={spec}: the image count must be >= 1')
    size = demo_data.DEFAULT_RESOLUTION if resolution is None else resolution[0]
    try:
        demo_data.check_resolution(size)
    except ValueError as err:
        raise click.ClickException(f'--resolution: {err}') from None

    def iterate():
        for index in range(count):
            image, label = demo_data.make_shape_image(index, size)
            yield SourceImage(f'{spec}[{index}]', image, label)
    return ImageSource(count=_limit(count, max_images), channels=3, iterate=iterate, has_labels=True)


def open_source(source, max_images=None, resolution=None):
    """Open --source by its kind: demo:*, LMDB folder, MNIST, image folder, zip or CIFAR tarball."""
    if source.startswith('demo:'):
        return open_demo(source, max_images, resolution)
    if os.path.isdir(source):
        if source.rstrip('/').endswith('_lmdb') or os.path.isfile(os.path.join(source, 'data.mdb')):
            return open_lmdb(source, max_images)
        mnist = os.path.join(source, 'train-images-idx3-ubyte.gz')
        if os.path.isfile(mnist):
            return open_mnist(mnist, max_images)
        return open_image_folder(source, max_images)
    if os.path.isfile(source):
        base = os.path.basename(source).lower()
        if base.endswith('-images-idx3-ubyte.gz'):
            return open_mnist(source, max_images)
        if base.endswith('.zip'):
            return open_image_zip(source, max_images)
        if base.endswith(('.tar.gz', '.tgz')):
            return open_cifar10(source, max_images)
        raise click.ClickException(f'--source={source}: unknown kind of file; give a folder, a .zip, '
                                   f'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, an LMDB folder or demo:shapes')
    raise click.ClickException(f'--source={source}: no such file or folder')


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
    """EDM's center-crop: the largest centred square, resized to width x height."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return _resize(image[top: top + side, left: left + side], width, height)


def center_crop_wide(image, width, height):
    """Crop the centred region of aspect width:height, resize it to width x height
    and pad it with black rows, centred, to a width x width square.

    Returns None when that region is smaller than width x height (the image
    would have to be upscaled), so the caller skips it, as EDM does.
    """
    h, w = image.shape[:2]
    crop_w, crop_h = min(w, int(round(h * width / height))), min(h, int(round(w * height / width)))
    if crop_w < width or crop_h < height:
        return None
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    resized = _resize(image[top: top + crop_h, left: left + crop_w], width, height)
    canvas = np.zeros([width, width, image.shape[2]], dtype=np.uint8)
    pad = (width - height) // 2
    canvas[pad: pad + height] = resized
    return canvas


def make_transform(transform, resolution):
    """Return f(image uint8 [H, W, C], name) -> uint8 [H', W', C] or None (skip).

    Without a transform, images must be square; they are resized to
    `resolution` if it is given.
    """
    if transform is None:
        def plain(image, name):
            h, w = image.shape[:2]
            if h != w:
                raise click.ClickException(f'{name} is {w}x{h}, not square; pass --transform=center-crop '
                                           f'(or center-crop-wide) with --resolution to crop it')
            return image if resolution is None else _resize(image, *resolution)
        return plain
    crop = {'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]
    return lambda image, name: crop(image, *resolution)


def _is_power_of_two(n):
    """True for 1, 2, 4, 8, ..."""
    return n >= 1 and n & (n - 1) == 0


def _check_options(transform, resolution, max_images):
    """Validate the option combination before reading anything."""
    if max_images is not None and max_images < 1:
        raise click.ClickException(f'--max-images={max_images}: must be >= 1')
    if transform is not None and resolution is None:
        raise click.ClickException(f'--transform={transform} needs --resolution=WxH')
    if resolution is None:
        return
    width, height = resolution
    if transform == 'center-crop-wide':
        if height > width:
            raise click.ClickException(f'--resolution={width}x{height}: center-crop-wide pads to a {width}x{width} '
                                       f'square, so the height must not exceed the width')
    elif width != height:
        raise click.ClickException(f'--resolution={width}x{height}: images must be square; use {width}x{width} '
                                   f'(or --transform=center-crop-wide for a padded wide crop)')
    if not _is_power_of_two(width):
        raise click.ClickException(f'--resolution={width}x{height}: the size must be a power of two, e.g. 32, 64, 256')


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
    """The output image must match the first one's size; the first must be square, power of two."""
    h, w = image.shape[:2]
    if expected is None:
        if h != w or not _is_power_of_two(w):
            raise click.ClickException(f'{name} is {w}x{h}; training needs square power-of-two images: '
                                       f'pass --resolution=RxR, e.g. --resolution=32x32')
        return
    if (w, h) != expected:
        raise click.ClickException(f'{name} is {w}x{h} but earlier images are {expected[0]}x{expected[1]}; '
                                   f'pass --resolution={expected[0]}x{expected[1]} to resize all images')


def _check_dest(dest):
    """--dest without trailing slashes; ClickException if it is empty or exists."""
    dest = dest.rstrip('/' + os.sep) or dest
    if not dest:
        raise click.ClickException('--dest must not be empty')
    if os.path.lexists(dest):
        raise click.ClickException(f'--dest={dest} already exists; remove it or choose another name '
                                   f'(existing datasets are never overwritten)')
    return dest


def convert_dataset(source, dest, max_images=None, transform=None, resolution=None):
    """Convert `source` into a dataset archive at `dest` (a .zip or a new folder).

    resolution: (width, height) or None to keep the input size. Output is
    staged under a temporary name and renamed at the end, so an interrupted or
    failed run leaves nothing that looks complete. Returns the number of
    images written. User errors raise click.ClickException.
    """
    dest = _check_dest(dest)
    _check_options(transform, resolution, max_images)
    src = open_source(source, max_images, resolution)
    try:
        with dnnlib.util.atomic_path(dest) as tmp:
            writer = _ArchiveWriter(tmp, as_zip=dest.lower().endswith('.zip'))
            try:
                labels, skipped = _write_images(src, make_transform(transform, resolution), writer)
                if not labels:
                    raise click.ClickException(f'--source={source}: all {skipped} images are smaller than '
                                               f'--resolution and were skipped; nothing to write')
                writer.write('dataset.json', json.dumps({'labels': labels if src.has_labels else None}).encode('utf-8'))
            finally:
                writer.close()
    finally:
        src.close()
    if skipped:
        click.echo(f'Skipped {skipped} images smaller than {resolution[0]}x{resolution[1]} '
                   f'(center-crop-wide does not upscale).', err=True)
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
    """uint8 images list of [R, R, 3] -> float32 [N, V, 2, C, R/f, R/f]: the
    posterior (mean, std) of each image and, with xflip (V = 2), of its mirror."""
    import torch
    from training import latents
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
    """torch.device for --device (default cuda if available, else cpu); ClickException if unusable."""
    import torch
    try:
        device = torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    except RuntimeError as err:
        raise click.ClickException(f'--device={name}: {err}') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException(f'--device={name}: CUDA is not available here; use --device=cpu')
    return device


def _load_vae_for_encoding(vae, device):
    """(the VAE on device, its input channels, its downsampling factor); ClickException if it cannot be loaded."""
    from training import latents
    try:
        model = latents.load_vae(vae, device)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    return model, model.config.in_channels, latents.downsampling_factor(model)


def encode_dataset(source, dest, vae=None, scale_factor=None, xflip=False, batch=64, device=None,
                   max_images=None, transform=None, resolution=None):
    """Encode every image of `source` once with a VAE into a latent archive at `dest`.

    source, max_images, transform, resolution: as convert_dataset's (usually
    a dataset archive made by convert); vae: hub id or save_pretrained
    folder (default training.latents.DEFAULT_VAE); scale_factor: recorded
    for training (default DEFAULT_SCALE_FACTOR); xflip: also encode each
    mirrored image; batch: images per VAE call; device: default cuda if
    available, else cpu. Staged under a temporary name and renamed at the
    end. Returns the number of images encoded. User errors raise
    click.ClickException.
    """
    from training import dataset, latents
    vae = latents.DEFAULT_VAE if vae is None else os.fspath(vae)
    if os.path.isdir(vae):
        vae = os.path.abspath(vae)   # recorded, so training finds it from any working directory
    scale_factor = latents.DEFAULT_SCALE_FACTOR if scale_factor is None else float(scale_factor)
    dest = _check_dest(dest)
    _check_options(transform, resolution, max_images)
    if batch < 1:
        raise click.ClickException(f'--batch={batch}: must be >= 1')
    if not scale_factor > 0:
        raise click.ClickException(f'--scale-factor={scale_factor}: must be > 0')
    device = _encoding_device(device)
    model, channels, factor = _load_vae_for_encoding(vae, device)
    src = open_source(source, max_images, resolution)
    try:
        if src.channels != channels:
            raise click.ClickException(f'--source={source} has {src.channels}-channel images, but the VAE encodes '
                                       f'{channels}-channel (RGB) images; use an RGB dataset')
        with dnnlib.util.atomic_path(dest) as tmp:
            writer = _ArchiveWriter(tmp, as_zip=dest.lower().endswith('.zip'))
            try:
                transform_image = _divisible(make_transform(transform, resolution), factor)
                labels, skipped, shape = _write_latents(src, transform_image, writer, model, xflip, batch)
                if not labels:
                    raise click.ClickException(f'--source={source}: all {skipped} images are smaller than '
                                               f'--resolution and were skipped; nothing to encode')
                meta = dict(format=dataset.LATENT_FORMAT, vae=vae, scale_factor=scale_factor,
                            latent_channels=shape[2], latent_resolution=shape[3],
                            source_resolution=shape[3] * factor, xflip=bool(xflip), count=len(labels))
                writer.write('dataset.json', json.dumps({'labels': labels if src.has_labels else None}).encode('utf-8'))
                writer.write(dataset.LATENT_METADATA, json.dumps(meta, indent=2).encode('utf-8'))
            finally:
                writer.close()
    finally:
        src.close()
    return len(labels)


def _divisible(transform_image, factor):
    """transform_image, plus a ClickException for images whose side the VAE factor does not divide."""
    def transform(image, name):
        image = transform_image(image, name)
        if image is not None and image.shape[0] % factor:
            raise click.ClickException(f'{name} is {image.shape[1]}x{image.shape[0]}, but the VAE downsamples by '
                                       f'{factor}; pass --resolution with a multiple of {factor}')
        return image
    return transform


# ----------------------------------------------------------------------------
# Command line.


def parse_resolution(ctx, param, value):
    """Click callback: 'WxH' (or 'W,H', or 'N' for NxN) -> (W, H)."""
    if value is None:
        return None
    match = re.fullmatch(r'(\d+)(?:[x,](\d+))?', value.strip())
    if match is None:
        raise click.BadParameter(f'{value!r}: expected WxH, e.g. 64x64')
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    if width < 1 or height < 1:
        raise click.BadParameter(f'{value!r}: width and height must be >= 1')
    return width, height


_CONVERT_OPTIONS = [
    click.option('--source', metavar='PATH', type=str, help='Input: folder, .zip, cifar-10-python.tar.gz, '
                 'train-images-idx3-ubyte.gz (or its folder), *_lmdb folder, or demo:shapes[:N]  [required]'),
    click.option('--dest', metavar='PATH', type=str, help='Output: NAME.zip or a new folder  [required]'),
    click.option('--max-images', metavar='INT', type=int, help='Write at most this many images'),
    click.option('--transform', type=click.Choice(TRANSFORMS), help='Crop mode for non-square inputs'),
    click.option('--resolution', metavar='WxH', callback=parse_resolution,
                 help='Output size, e.g. 64x64 (demo:shapes default 32x32)'),
]


def convert_options(fn):
    """Decorate a click command with the convert options."""
    for option in reversed(_CONVERT_OPTIONS):
        fn = option(fn)
    return fn


def _run_convert(source, dest, max_images, transform, resolution):
    """Shared body of the default command and `convert`."""
    if source is None:
        raise click.UsageError("Missing option '--source'.")
    if dest is None:
        raise click.UsageError("Missing option '--dest'.")
    count = convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution)
    click.echo(f'Wrote {count} images to {dest}')


@click.group(invoke_without_command=True)
@convert_options
@dnnlib.util.debug_option
@click.pass_context
@dnnlib.util.cli_errors
def cli(ctx, **opts):
    """Make dataset archives for train.py and fid.py.

    Without a subcommand, runs `convert` with the options below, e.g.

    \b
    python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip \\
        --resolution=64x64 --transform=center-crop
    python dataset_tool.py --source=demo:shapes --dest=datasets/shapes-32x32.zip
    """
    if ctx.invoked_subcommand is None:
        _run_convert(**opts)
    elif any(v is not None for v in opts.values()):
        raise click.UsageError(f'put the options after the subcommand: dataset_tool.py {ctx.invoked_subcommand} ...')


@cli.command()
@convert_options
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def convert(**opts):
    """Convert images to a ZIP or folder of PNGs plus dataset.json.

    \b
    Sources (--source):
      path/                      all images below path/, sorted; labels from
                                 path/dataset.json, else from top-level folders
      images.zip                 same, inside a zip
      cifar-10-python.tar.gz     CIFAR-10 training set, with labels
      train-images-idx3-ubyte.gz MNIST (or the folder holding it and
                                 train-labels-idx1-ubyte.gz), padded to 32x32
      lsun/church_lmdb/          LSUN LMDB folder (needs: pip install lmdb)
      demo:shapes[:N]            built-in shapes, N images (default 2000)

    Images must end up square with a power-of-two size. Without --transform,
    square images are resized to --resolution; --transform=center-crop cuts
    the largest centred square first; center-crop-wide cuts a centred WxH
    region and pads it to WxW (images smaller than WxH are skipped). Grayscale
    stays 1 channel unless some input is colour; alpha is dropped.
    """
    _run_convert(**opts)


@cli.command()
@convert_options
@click.option('--vae', metavar='ID|DIR', type=str, default=None,
              help='VAE: Hugging Face hub id or AutoencoderKL.save_pretrained folder  '
                   '[default: stabilityai/sd-vae-ft-ema]')
@click.option('--scale-factor', '--scale_factor', 'scale_factor', metavar='FLOAT', type=float, default=None,
              help='Latent scale factor recorded for training  [default: 0.18215]')
@click.option('--xflip', metavar='BOOL', type=bool, default=False, show_default=True,
              help='Also encode the x-flipped images (for training with --xflip=1)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
              help='Images per VAE call')
@click.option('--device', metavar='STR', type=str, default=None,
              help='Device  [default: cuda if available, else cpu]')
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def encode(source, dest, **opts):
    """Encode images once with a VAE for latent training (--train_on_latents).

    Reads any --source that convert reads (usually a dataset archive made by
    convert) and writes, per image, the VAE posterior mean and standard
    deviation as .npy, plus dataset.json (labels) and latents.json (the VAE,
    scale factor and shapes). Training draws a new latent from them each
    time. Needs diffusers: pip install -e ".[latent]".

    \b
    python dataset_tool.py encode --source=datasets/imagenet-256x256.zip \\
        --dest=datasets/imagenet-latents.zip --xflip=1
    """
    if source is None:
        raise click.UsageError("Missing option '--source'.")
    if dest is None:
        raise click.UsageError("Missing option '--dest'.")
    count = encode_dataset(source, dest, **opts)
    click.echo(f'Encoded {count} images to {dest}')


if __name__ == '__main__':
    cli()
