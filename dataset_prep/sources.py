"""Image sources that dataset archives are made from: a folder or zip of
image files, the CIFAR-10 python tarball, MNIST's gzipped IDX files, an LSUN
LMDB folder and the built-in `demo:shapes[:N]`.

open_source(spec) picks the reader by the kind of `spec` and returns an
ImageSource: how many images it gives, their channel count (1 or 3), and an
iterator of SourceImage (uint8 [H, W, C], a label and a name for messages).
Any PIL mode is decoded to grayscale or RGB (16-bit grayscale scaled to 8
bits, alpha dropped, palettes looked up). A folder or zip is RGB when any
of its images is colour, MNIST grayscale, the others RGB, unless the caller
asks for 1 or 3 channels: then grayscale is repeated to RGB, or colour
reduced to PIL's luma. Labels come from the source's dataset.json, from the
classes of CIFAR-10, MNIST and the demo, or else from the top-level folder
names.
Unusable input raises ValueError or OSError with a message saying what to do.
dataset_prep.archive writes the sources into archives.
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

import numpy as np
import PIL.Image
from tqdm import tqdm

from dataset_prep import demo_data
from training.dataset import IMAGE_EXTENSIONS

MNIST_PAD = 2  # 28x28 digits are padded to 32x32, as in EDM

_GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')


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
    colour modes become RGB, and grayscale is repeated to RGB if channels == 3;
    colour becomes PIL's luma (L = R * 299/1000 + G * 587/1000 + B * 114/1000)
    if channels == 1.
    """
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img, dtype=np.float64)
        img = PIL.Image.fromarray(np.rint(np.clip(wide, 0, 65535) / 257).astype(np.uint8))  # mode L
    target = 'L' if channels == 1 else 'RGB'
    if img.mode != target:
        img = img.convert(target)
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, np.newaxis] if array.ndim == 2 else array


def _to_channels(image, channels):
    """uint8 [H, W, C] (C = 1 or 3) -> uint8 [H, W, channels] by _pil_to_array's rules;
    channels=None keeps the image as it is."""
    if channels is None or image.shape[2] == channels:
        return image
    return _pil_to_array(PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image), channels)


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, PIL.Image.DecompressionBombError, zipfile.BadZipFile,
                  zlib.error)   # the last two: a damaged member of a zip source


def _unreadable(name, err):
    """The ValueError for an image file PIL cannot read."""
    reason = 'not a recognised image format' if isinstance(err, PIL.UnidentifiedImageError) else str(err)
    return ValueError(f'{name}: cannot read this image ({reason}); remove or replace the file')


def _decode_image(fileobj, name, channels):
    """Decode an image file object to uint8 [H, W, channels]; ValueError if unreadable."""
    try:
        with PIL.Image.open(fileobj) as img:
            img.load()
            return _pil_to_array(img, channels)
    except _DECODE_ERRORS as err:
        raise _unreadable(name, err) from err


def _peek_mode(fileobj, name):
    """PIL mode of an image file, reading only its header."""
    try:
        with PIL.Image.open(fileobj) as img:
            return img.mode
    except _DECODE_ERRORS as err:
        raise _unreadable(name, err) from err


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
        raise ValueError(f'{where}: not valid JSON ({err}); fix or remove the file') from err
    if not isinstance(data, dict) or 'labels' not in data:
        raise ValueError(fix)
    entries = data['labels']
    if entries is None:
        return None
    if not isinstance(entries, list):
        raise ValueError(fix)
    labels = {}
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and _is_label(entry[1])):
            raise ValueError(f'{where}: bad entry {json.dumps(entry)[:80]}; each entry must be '
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


def _open_image_collection(names, open_file, labels_text, where, count_limit, channels):
    """Shared logic of folder and zip sources.

    names: sorted relative paths ('/'-separated) of the images; open_file(name)
    -> binary file object; labels_text: dataset.json text or None; where: the
    source path for messages; channels: 1 or 3 to decode every image so, or
    None to read every image header once and pick RGB if any image is
    colour, else grayscale.
    """
    if not names:
        raise ValueError(f'{where}: no images found (looked for {", ".join(IMAGE_EXTENSIONS)}); '
                         f'check the path')
    labels = _parse_labels_json(labels_text, f'{where}/dataset.json') if labels_text is not None else None
    if labels is None and labels_text is None:
        labels = _folder_labels(names)
    if labels is not None:
        missing = [n for n in names if n not in labels]
        if missing:
            raise ValueError(f'{where}: {missing[0]} has no label in dataset.json ({len(missing)} images '
                             f'lack one); add them, or set "labels": null to convert without labels')
    if channels is None:
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


def open_image_folder(path, max_images=None, channels=None):
    """All images under `path` (recursive, sorted by path components as EDM's tool sorts them: a/b.png
    before a-c.png), labels from dataset.json."""
    names = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for fname in files:
            rel = os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/')
            if _is_image_name(rel):
                names.append(rel)
    names.sort(key=lambda name: name.split('/'))
    meta = os.path.join(path, 'dataset.json')
    labels_text = None
    if os.path.isfile(meta):
        with open(meta, 'rb') as f:
            labels_text = f.read()
    return _open_image_collection(names, lambda n: open(os.path.join(path, n), 'rb'), labels_text,
                                  path.rstrip('/'), max_images, channels)


def open_image_zip(path, max_images=None, channels=None):
    """All images in a zip (sorted by member name), labels from its dataset.json."""
    try:
        with zipfile.ZipFile(path) as z:
            members = set(z.namelist())
            labels_text = z.read('dataset.json') if 'dataset.json' in members else None
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f'{path}: cannot read this zip ({err}); check the file') from err
    names = sorted(n for n in members if not n.endswith('/') and _is_image_name(n))
    archive = zipfile.ZipFile(path)
    try:
        source = _open_image_collection(names, archive.open, labels_text, path, max_images, channels)
    except BaseException:
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


def open_cifar10(path, max_images=None, channels=None):
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
        raise ValueError(f'{path}: not a readable CIFAR-10 python tarball ({err!r}); download '
                         f'cifar-10-python.tar.gz again') from err
    images, labels = np.concatenate(images), np.concatenate(labels)
    if len(images) != len(labels):
        raise ValueError(f'{path}: {len(images)} images but {len(labels)} labels; download it again')
    return _array_source(images, labels, path, max_images, channels)


def _array_source(images, labels, where, max_images, channels):
    """ImageSource over in-memory uint8 images [N, H, W, C] and int labels [N],
    converted to `channels` (None: keep C)."""
    def iterate():
        for i, (image, label) in enumerate(zip(images, labels)):
            yield SourceImage(f'{where}[{i}]', _to_channels(image, channels), int(label))
    return ImageSource(count=_limit(len(images), max_images), channels=channels or images.shape[3],
                       iterate=iterate, has_labels=True)


def _read_idx(path, magic, ndim):
    """Array from a gzipped IDX file (MNIST format) with the expected magic number."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f'{path}: cannot read this gzip file ({err}); download it again') from err
    header = 4 + 4 * ndim
    if len(data) < header or int.from_bytes(data[:4], 'big') != magic:
        raise ValueError(f'{path}: not an MNIST IDX file; download it again')
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim)]
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f'{path}: truncated ({len(data) - header} bytes of data for shape {shape}); '
                         f'download it again')
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def open_mnist(images_path, max_images=None, channels=None):
    """MNIST training digits (1 channel, padded to 32x32 as in EDM) with labels."""
    labels_path = images_path.replace('-images-idx3-ubyte.gz', '-labels-idx1-ubyte.gz')
    if not os.path.isfile(labels_path):
        raise FileNotFoundError(f'{labels_path}: missing; MNIST needs the labels file next to the images file')
    images = _read_idx(images_path, 0x00000803, 3)
    labels = _read_idx(labels_path, 0x00000801, 1)
    if len(images) != len(labels):
        raise ValueError(f'{images_path}: {len(images)} images but {len(labels)} labels in '
                         f'{labels_path}; download both again')
    images = np.pad(images, [(0, 0), (MNIST_PAD, MNIST_PAD), (MNIST_PAD, MNIST_PAD)])[..., np.newaxis]
    return _array_source(images, labels, images_path, max_images, channels)


def open_lmdb(path, max_images=None, channels=None):
    """LSUN-style LMDB folder: each value is an encoded image; no labels; RGB unless channels=1."""
    try:
        import lmdb
    except ImportError as err:
        raise ValueError(f'{path}: reading LMDB folders needs the lmdb package: pip install lmdb') from err
    try:
        with lmdb.open(path, readonly=True, lock=False) as env:
            count = env.stat()['entries']
    except lmdb.Error as err:
        raise ValueError(f'{path}: cannot open this LMDB folder ({err}); check the path') from err
    if count == 0:
        raise ValueError(f'{path}: the LMDB database is empty; check the path')

    def iterate():
        with lmdb.open(path, readonly=True, lock=False) as env, env.begin(write=False) as txn:
            for key, value in txn.cursor():
                name = f'{path}[{key.decode(errors="replace")}]'
                yield SourceImage(name, _decode_image(io.BytesIO(value), name, channels or 3), None)
    return ImageSource(count=_limit(count, max_images), channels=channels or 3, iterate=iterate, has_labels=False)


def open_demo(spec, max_images=None, resolution=None, channels=None):
    """Built-in 'demo:shapes[:N]': N procedurally drawn images (default 2000), RGB unless channels=1, labelled."""
    match = re.fullmatch(r'demo:shapes(?::(\d+))?', spec)
    if match is None:
        raise ValueError(f'--source={spec}: unknown demo source; use demo:shapes or demo:shapes:N')
    count = int(match.group(1)) if match.group(1) else demo_data.DEFAULT_COUNT
    if count < 1:
        raise ValueError(f'--source={spec}: the image count must be >= 1')
    size = demo_data.DEFAULT_RESOLUTION if resolution is None else tuple(resolution)   # (width, height)
    try:
        demo_data.check_resolution(size)
    except ValueError as err:
        raise ValueError(f'--resolution: {err}') from err

    def iterate():
        for index in range(count):
            image, label = demo_data.make_shape_image(index, size)
            yield SourceImage(f'{spec}[{index}]', _to_channels(image, channels), label)
    return ImageSource(count=_limit(count, max_images), channels=channels or 3, iterate=iterate, has_labels=True)


def open_source(source, max_images=None, resolution=None, channels=None):
    """Open --source by its kind: demo:*, LMDB folder, MNIST, image folder, zip or CIFAR tarball.

    channels: 1 or 3 to convert every image to grayscale or RGB, None for the
    source's own (see the module docstring).
    """
    if channels not in (None, 1, 3):
        raise ValueError(f'--channels={channels}: must be 1, 3 or auto')
    if source.startswith('demo:'):
        return open_demo(source, max_images, resolution, channels)
    if os.path.isdir(source):
        if source.rstrip('/').endswith('_lmdb') or os.path.isfile(os.path.join(source, 'data.mdb')):
            return open_lmdb(source, max_images, channels)
        mnist = os.path.join(source, 'train-images-idx3-ubyte.gz')
        if os.path.isfile(mnist):
            return open_mnist(mnist, max_images, channels)
        return open_image_folder(source, max_images, channels)
    if os.path.isfile(source):
        base = os.path.basename(source).lower()
        if base.endswith('-images-idx3-ubyte.gz'):
            return open_mnist(source, max_images, channels)
        if base.endswith('.zip'):
            return open_image_zip(source, max_images, channels)
        if base.endswith(('.tar.gz', '.tgz')):
            return open_cifar10(source, max_images, channels)
        raise ValueError(f'--source={source}: unknown kind of file; give a folder, a .zip, '
                         f'cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, an LMDB folder or demo:shapes')
    raise FileNotFoundError(f'--source={source}: no such file or folder')
