"""Images and labels from dataset archives made by dataset_tool.py (a ZIP or a
folder of PNGs plus dataset.json; docs/DESIGN.md section 4), and the VAE latents of
archives made by `dataset_tool.py encode` (LatentDataset).

The constructor keywords are EDM's, so the `dataset_kwargs` stored in EDM and
Patch Diffusion snapshots (class_name='training.dataset.ImageFolderDataset',
path, use_labels, xflip, cache, max_size, random_seed, resolution) construct
ImageFolderDataset unchanged.

Encoded latent archive (a ZIP or a folder):
    00000/img00000000.npy   float32 [V, 2, C, h, w] per image: the VAE
                            posterior (mean, std) in latent units (before the
                            scale factor) of the image (v = 0) and, when
                            encoded with x-flips, of its mirror image (v = 1)
    dataset.json            {"labels": [["00000/img00000000.npy", 6], ...]} or {"labels": null}
    latents.json            {"format": LATENT_FORMAT, "vae", "scale_factor",
                             "latent_channels", "latent_resolution",
                             "source_resolution", "xflip", "count",
                             "latent_shape", "source_shape"}
                            *_resolution: the side of square items (null otherwise);
                            *_shape: [height, width] (may be absent for squares)
"""

import hashlib
import json
import os
import zipfile

import numpy as np
import PIL.Image
import torch

import dnnlib
from training.networks import resolution_value

IMAGE_EXTENSIONS = ('.bmp', '.gif', '.jpeg', '.jpg', '.pbm', '.pgm', '.png', '.pnm', '.ppm', '.tif', '.tiff', '.webp')
LATENT_METADATA = 'latents.json'
LATENT_FORMAT = 'patch-diffusion-latents-v1'


class Dataset(torch.utils.data.Dataset):
    """Subset selection, x-flips, labels and caching over raw items.

    Subclasses implement _load_raw_image(raw_idx) -> ndarray [C, H, W] and
    _load_raw_labels() -> int64 [N] (class indices), float32 [N, D] (label
    vectors) or None (no labels).

    Item idx maps to raw item _raw_idx[idx]; with xflip the dataset is
    doubled and items n .. 2n-1 are the mirrored copies of items 0 .. n-1.
    is_latent: items are VAE latent statistics (LatentDataset), not images.
    """

    is_latent = False

    def __init__(self, name, raw_shape, use_labels=False, xflip=False, max_size=None, random_seed=0, cache=False):
        """name: str; raw_shape: [N, C, H, W] of all raw items; max_size: keep a
        random subset of at most this many raw items (applied before xflip),
        chosen by a permutation from np.random.RandomState(random_seed) as in
        EDM; cache: keep loaded items in memory (per process)."""
        self._name = name
        self._raw_shape = list(raw_shape)
        self._use_labels = bool(use_labels)
        self._cache = bool(cache)
        self._cached_images = {}
        self._label_shape = None

        self._raw_labels = self._load_raw_labels() if self._use_labels else None
        if self._use_labels and self._raw_labels is None:
            raise ValueError(f'dataset {name} has no labels (dataset.json is missing or has "labels": null); '
                             f'train without labels (--cond=0) or make the dataset with labels')
        if self._raw_labels is None:
            self._raw_labels = np.zeros([self._raw_shape[0], 0], dtype=np.float32)
        assert self._raw_labels.shape[0] == self._raw_shape[0]

        self._raw_idx = np.arange(self._raw_shape[0], dtype=np.int64)
        if max_size is not None and self._raw_idx.size > max_size:
            permutation = np.random.RandomState(random_seed % (1 << 31)).permutation(self._raw_idx.size)
            self._raw_idx = np.sort(permutation[:max_size])
        self._xflip = np.zeros(self._raw_idx.size, dtype=bool)
        if xflip:
            self._raw_idx = np.tile(self._raw_idx, 2)
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])

    def _load_raw_image(self, raw_idx):
        raise NotImplementedError

    def _load_raw_labels(self):
        raise NotImplementedError

    def close(self):
        """Release open files; the dataset reopens them when read again."""

    def __len__(self):
        return self._raw_idx.size

    def _raw_item(self, idx):
        """The raw item of item idx, loaded once per process when caching."""
        raw_idx = int(self._raw_idx[idx])
        item = self._cached_images.get(raw_idx)
        if item is None:
            item = self._load_raw_image(raw_idx)
            if self._cache:
                self._cached_images[raw_idx] = item
        return item

    def __getitem__(self, idx):
        """Return (image uint8 [C, H, W], label float32 [label_dim])."""
        image = self._raw_item(idx)
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return image.copy(), self.get_label(idx)

    def get_label(self, idx):
        """Label of item idx: one-hot float32 [label_dim] for class indices,
        the float32 vector for vector labels, shape [0] without labels."""
        label = self._raw_labels[self._raw_idx[idx]]
        if self._raw_labels.dtype == np.int64:
            onehot = np.zeros(self.label_shape, dtype=np.float32)
            onehot[label] = 1
            return onehot
        return label.astype(np.float32)

    def __repr__(self):
        c, h, w = self.image_shape
        labels = f'{self.label_dim} label dims' if self.has_labels else 'no labels'
        return f'{type(self).__name__}({self._name!r}: {len(self)} items, {c} channels, {w}x{h}, {labels})'

    @property
    def name(self):
        return self._name

    @property
    def raw_labels(self):
        """Labels of all raw items: int64 [N], float32 [N, D], or float32 [N, 0] without labels."""
        return self._raw_labels

    @property
    def image_shape(self):
        """[C, H, W]."""
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        """What the `resolution` keyword takes to check this dataset's size: the
        side of square images (EDM's int), [height, width] otherwise."""
        return resolution_value(self.image_shape[1:])

    @property
    def label_shape(self):
        """[label_dim]: number of classes (max class + 1) or the label vector length; [0] without labels."""
        if self._label_shape is None:
            if self._raw_labels.dtype == np.int64:
                self._label_shape = [int(self._raw_labels.max()) + 1]
            else:
                self._label_shape = list(self._raw_labels.shape[1:])
        return list(self._label_shape)

    @property
    def label_dim(self):
        assert len(self.label_shape) == 1
        return self.label_shape[0]

    @property
    def has_labels(self):
        return self.label_dim != 0


class _ArchiveDataset(Dataset):
    """Items stored one per file in a ZIP or a folder, sorted by relative path,
    with labels from dataset.json.

    A zip is opened lazily in each process (DataLoader workers, forked or
    spawned, open their own handle). Subclasses call _open_archive() first.
    """

    def _open_archive(self, path, extensions, what):
        """Open path (a .zip or a folder) and list its items: the files ending
        in one of `extensions` (what: their name in error messages)."""
        self._path = os.fspath(path)
        self._zipfile = None
        self._zip_pid = None
        if os.path.isdir(self._path):
            self._type = 'dir'
            self._all_fnames = self._list_folder(self._path)
        elif os.path.isfile(self._path) and self._path.lower().endswith('.zip'):
            self._type = 'zip'
            try:
                self._all_fnames = set(self._get_zipfile().namelist())
            except zipfile.BadZipFile as err:
                raise ValueError(f'{self._path}: not a readable zip ({err}); make it again with dataset_tool.py') from None
        elif os.path.exists(self._path):
            raise ValueError(f'{self._path}: a dataset must be a .zip or a folder; make one with dataset_tool.py')
        else:
            raise FileNotFoundError(f'{self._path}: no such dataset; make one with dataset_tool.py')
        self._item_fnames = sorted(f for f in self._all_fnames if os.path.splitext(f)[1].lower() in extensions)
        if not self._item_fnames:
            raise ValueError(f'{self._path}: no {what} found; make the dataset with dataset_tool.py')

    def fingerprint(self):
        """What a training state records of the data to notice a change on
        resume, without reading the images: {'items': the number of item
        files, 'digest': SHA-1 over the item files and dataset.json of their
        names with their CRC-32 and size (a zip's directory has both) or, in
        a folder, their size and modification time}."""
        names = self._item_fnames + (['dataset.json'] if 'dataset.json' in self._all_fnames else [])
        digest = hashlib.sha1()
        if self._type == 'zip':
            infos = {info.filename: info for info in self._get_zipfile().infolist()}
            entries = (f'{name}:{infos[name].CRC}:{infos[name].file_size}' for name in names)
        else:
            stats = ((name, os.stat(os.path.join(self._path, name))) for name in names)
            entries = (f'{name}:{st.st_size}:{st.st_mtime_ns}' for name, st in stats)
        for entry in entries:
            digest.update(entry.encode('utf-8') + b'\n')
        return dict(items=len(self._item_fnames), digest=digest.hexdigest())

    def _default_name(self):
        """The file or folder name without extension."""
        return os.path.splitext(os.path.basename(self._path.rstrip('/\\')))[0]

    @staticmethod
    def _list_folder(path):
        """Relative '/'-separated names of all files below path."""
        names = set()
        for root, _dirs, files in os.walk(path):
            for fname in files:
                names.add(os.path.relpath(os.path.join(root, fname), path).replace(os.sep, '/'))
        return names

    def _get_zipfile(self):
        """The zip handle of this process (reopened after a fork)."""
        if self._zipfile is None or self._zip_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, fname):
        if self._type == 'dir':
            return open(os.path.join(self._path, fname), 'rb')
        return self._get_zipfile().open(fname, 'r')

    def close(self):
        if self._zipfile is not None and self._zip_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None
        self._zip_pid = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None, _zip_pid=None)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _load_raw_labels(self):
        """Labels from dataset.json in item order, or None if there are none."""
        if 'dataset.json' not in self._all_fnames:
            return None
        where = f'{self._path}/dataset.json'
        with self._open_file('dataset.json') as f:
            try:
                entries = json.load(f)['labels']
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f'{where}: malformed ({err!r}); expected {{"labels": [[name, label], ...]}}') from None
        if entries is None:
            return None
        try:
            labels = {str(k).replace('\\', '/'): v for k, v in entries}
        except (ValueError, TypeError):
            raise ValueError(f'{where}: "labels" must be a list of [name, label] pairs') from None
        missing = [f for f in self._item_fnames if f not in labels]
        if missing:
            raise ValueError(f'{where}: no label for {missing[0]} ({len(missing)} items lack one); '
                             f'make the dataset again with dataset_tool.py')
        labels = np.array([labels[f] for f in self._item_fnames])
        if labels.ndim == 1 and labels.dtype.kind in 'iu' and labels.min() >= 0:
            return labels.astype(np.int64)
        if labels.ndim == 2 and labels.dtype.kind in 'iuf':
            return labels.astype(np.float32)
        raise ValueError(f'{where}: labels must be class indices >= 0 or equal-length lists of numbers')


class ImageFolderDataset(_ArchiveDataset):
    """Images of a dataset ZIP or folder, sorted by relative path.

    All images must have the same size and channel count (1 or 3); labels come
    from dataset.json.
    """

    def __init__(self, path, resolution=None, use_labels=False, xflip=False, max_size=None, random_seed=0,
                 cache=False, name=None):
        """path: a .zip or a folder; resolution: if given, the images must be
        resolution x resolution (an int) or height x width ([height, width]);
        ValueError otherwise; name: defaults to the file or folder name
        without extension."""
        self._open_archive(path, IMAGE_EXTENSIONS, 'images')
        first = self._load_raw_image(0, check=False)
        raw_shape = [len(self._item_fnames)] + list(first.shape)
        _check_resolution(self._path, 'images', raw_shape[2:], resolution)
        super().__init__(name=name or self._default_name(), raw_shape=raw_shape, use_labels=use_labels, xflip=xflip,
                         max_size=max_size, random_seed=random_seed, cache=cache)

    def _load_raw_image(self, raw_idx, check=True):
        """Image raw_idx as uint8 [C, H, W]; ValueError if it is not L/RGB or not the dataset's shape."""
        fname = self._item_fnames[raw_idx]
        try:
            with self._open_file(fname) as f, PIL.Image.open(f) as img:
                if img.mode not in ('L', 'RGB'):
                    raise ValueError(f'{self._path}/{fname}: mode {img.mode}, expected L or RGB; '
                                     f'make the dataset with dataset_tool.py')
                image = np.asarray(img, dtype=np.uint8)
        except FileNotFoundError:
            raise   # names the file; not a corrupt image
        except (OSError, SyntaxError, zipfile.BadZipFile, EOFError) as err:   # what PIL and zipfile raise for bad bytes
            raise ValueError(f'{self._path}/{fname}: cannot read the image ({dnnlib.util.one_line(err)}); the file is '
                             f'corrupt or truncated: replace it or make the dataset again with dataset_tool.py') from None
        image = image[np.newaxis] if image.ndim == 2 else image.transpose(2, 0, 1)  # HW / HWC -> CHW
        if check and list(image.shape) != self.image_shape:
            raise ValueError(f'{self._path}/{fname}: shape {list(image.shape)} (CHW) differs from the first '
                             f'image\'s {self.image_shape}; all images must have the same size and channels')
        return image


def is_latent_archive(path):
    """True when path is a ZIP or folder made by `dataset_tool.py encode` (it holds latents.json)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.isfile(os.path.join(path, LATENT_METADATA))
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return LATENT_METADATA in archive.namelist()
    return False


class LatentDataset(_ArchiveDataset):
    """VAE latents of an archive made by `dataset_tool.py encode` (see the module docstring).

    Item: (stats float32 [2, C, h, w] = the posterior (mean, std) in latent
    units, label float32 [label_dim]); training draws the latent
    scale_factor * (mean + std * eps) from it (training.latents.PreEncodedLatents),
    with the trainer's per-step seeded generator. x-flipped items (xflip=True)
    are the statistics of the mirrored image, encoded by dataset_tool, not
    mirrored latents; they need an archive encoded with --xflip=1.

    resolution, num_channels and image_shape describe a latent [C, h, w];
    vae, scale_factor and image_resolution (the pixels: an int side R for
    squares, [H, W] otherwise) name the VAE and the images the latents came
    from.
    """

    is_latent = True

    def __init__(self, path, resolution=None, use_labels=False, xflip=False, max_size=None, random_seed=0,
                 cache=False, name=None):
        """path: a .zip or a folder; resolution: if given, the latents must be
        resolution x resolution (ValueError otherwise); other arguments as
        ImageFolderDataset's."""
        self._open_archive(path, ('.npy',), 'encoded latents (.npy)')
        meta = self._load_metadata()
        self.vae = meta['vae']
        self.scale_factor = float(meta['scale_factor'])
        self.image_resolution = resolution_value(_recorded_shape(meta, 'source'))
        height, width = _recorded_shape(meta, 'latent')
        channels = int(meta['latent_channels'])
        self._variants = 2 if meta['xflip'] else 1
        if xflip and not meta['xflip']:
            raise ValueError(f'{self._path} was encoded without x-flips; encode it again with '
                             f'dataset_tool.py encode --xflip=1, or train with --xflip=0')
        _check_resolution(self._path, 'latents', [height, width], resolution)
        super().__init__(name=name or self._default_name(), raw_shape=[len(self._item_fnames), channels, height, width],
                         use_labels=use_labels, xflip=xflip, max_size=max_size, random_seed=random_seed, cache=cache)

    def _load_metadata(self):
        """latents.json as a dict; ValueError when it is missing, of another format or incomplete."""
        if LATENT_METADATA not in self._all_fnames:
            raise ValueError(f'{self._path}: no {LATENT_METADATA}, so not an encoded latent archive; make one with '
                             f'dataset_tool.py encode')
        with self._open_file(LATENT_METADATA) as f:
            try:
                meta = json.load(f)
            except ValueError as err:
                raise ValueError(f'{self._path}/{LATENT_METADATA}: not valid JSON ({err}); encode the dataset '
                                 f'again') from None
        keys = ('vae', 'scale_factor', 'latent_channels', 'latent_resolution', 'source_resolution', 'xflip')
        if not isinstance(meta, dict) or meta.get('format') != LATENT_FORMAT or any(k not in meta for k in keys) \
                or any(meta[f'{k}_resolution'] is None and meta.get(f'{k}_shape') is None for k in ('latent', 'source')):
            raise ValueError(f'{self._path}/{LATENT_METADATA}: not a {LATENT_FORMAT} description with '
                             f'{", ".join(keys)}; encode the dataset again with this version of dataset_tool.py')
        return meta

    @property
    def stats_shape(self):
        """Shape of the stored statistics of one item: [2, C, h, w]."""
        return [2] + self.image_shape

    def _load_raw_image(self, raw_idx):
        """Statistics of raw item raw_idx, float32 [V, 2, C, h, w] (V = 2 with x-flips)."""
        fname = self._item_fnames[raw_idx]
        with self._open_file(fname) as f:
            try:
                stats = np.load(f, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f'{self._path}/{fname}: not a readable .npy ({err}); '
                                 f'encode the dataset again') from None
        expected = [self._variants] + self.stats_shape
        if list(stats.shape) != expected or stats.dtype != np.float32:
            raise ValueError(f'{self._path}/{fname}: {stats.dtype} {list(stats.shape)}, expected float32 {expected} '
                             f'as latents.json says; encode the dataset again')
        return stats

    def __getitem__(self, idx):
        """Return (stats float32 [2, C, h, w] = (mean, std), label float32 [label_dim])."""
        stats = self._raw_item(idx)[1 if self._xflip[idx] else 0]
        return stats.copy(), self.get_label(idx)


def _check_resolution(path, what, shape, resolution):
    """ValueError unless items of [height, width] `shape` have the expected
    `resolution` (None: any; an int side; or [height, width])."""
    if resolution is None:
        return
    expected = [resolution, resolution] if isinstance(resolution, int) else [int(r) for r in resolution]
    if list(shape) != expected:
        raise ValueError(f'{path}: {what} are {shape[1]}x{shape[0]}, not {expected[1]}x{expected[0]} (width x height); '
                         f'use a dataset of that size')


def _recorded_shape(meta, kind):
    """[height, width] that latents.json records for kind 'latent' or 'source':
    {kind}_shape for any shape, {kind}_resolution (an int side) for squares."""
    if meta.get(f'{kind}_shape') is not None:
        return [int(side) for side in meta[f'{kind}_shape']]
    return [int(meta[f'{kind}_resolution'])] * 2


# ----------------------------------------------------------------------------
# The registry of dataset classes, by the name that training options and snapshots record.

DATASET_CLASSES = {'training.dataset.ImageFolderDataset': ImageFolderDataset,
                   'training.dataset.LatentDataset': LatentDataset}


def dataset_class_name(path):
    """The dataset class for a path: latents from `dataset_tool.py encode`, or images."""
    return 'training.dataset.LatentDataset' if is_latent_archive(path) else 'training.dataset.ImageFolderDataset'


def open_dataset(dataset_kwargs):
    """The dataset of resolved options {class_name, path, ...} (class_name default: images)."""
    kwargs = dict(dataset_kwargs)
    name = kwargs.pop('class_name', 'training.dataset.ImageFolderDataset')
    if name not in DATASET_CLASSES:
        raise ValueError(f'Unknown dataset class {name!r}; known: {", ".join(DATASET_CLASSES)}')
    return DATASET_CLASSES[name](**kwargs)
