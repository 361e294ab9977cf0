"""training/dataset.py and dataset_prep/demo_data.py: items, labels, x-flips,
subsets, caching, DataLoader workers, and the demo shapes."""

import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from dataset_prep import demo_data
from dataset_prep.archive import archive_name, convert_dataset
import dnnlib
from training.dataset import ImageFolderDataset


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    """A 20-image labelled demo:shapes zip at 16x16."""
    path = str(tmp_path_factory.mktemp('data') / 'shapes-16x16.zip')
    convert_dataset('demo:shapes:20', path, resolution=(16, 16))
    return path


def expected_item(index):
    """(image uint8 [3, 16, 16], one-hot label [5]) of demo image `index`."""
    image, label = demo_data.make_shape_image(index, 16)
    onehot = np.zeros(len(demo_data.SHAPE_NAMES), np.float32)
    onehot[label] = 1
    return image.transpose(2, 0, 1), onehot


def write_folder(root, images, labels=None):
    """Dataset folder of uint8 [H, W] / [H, W, 3] images named like dataset_tool's; optional dataset.json."""
    names = []
    for i, image in enumerate(images):
        name = archive_name(i)
        os.makedirs(os.path.join(root, os.path.dirname(name)), exist_ok=True)
        PIL.Image.fromarray(image).save(os.path.join(root, name))
        names.append(name)
    if labels is not None:
        with open(os.path.join(root, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, label] for n, label in zip(names, labels)]}, f)
    return str(root)


# ----------------------------------------------------------------------------
# ImageFolderDataset.

@pytest.mark.parametrize('as_folder', [False, True])
def test_items_labels_and_properties(shapes_zip, tmp_path, as_folder):
    path = shapes_zip
    if as_folder:
        path = str(tmp_path / 'shapes')
        convert_dataset('demo:shapes:20', path, resolution=(16, 16))
    ds = ImageFolderDataset(path, use_labels=True)
    assert len(ds) == 20
    assert ds.name == 'shapes-16x16' if not as_folder else ds.name == 'shapes'
    assert (ds.image_shape, ds.num_channels, ds.resolution) == ([3, 16, 16], 3, 16)
    assert (ds.label_shape, ds.label_dim, ds.has_labels) == ([5], 5, True)
    assert ds.raw_labels.tolist() == [i % 5 for i in range(20)]
    assert '20 items, 3 channels, 16x16, 5 label dims' in repr(ds)
    for index in (0, 7, 19):
        image, label = ds[index]
        want_image, want_label = expected_item(index)
        assert image.dtype == np.uint8 and label.dtype == np.float32
        np.testing.assert_array_equal(image, want_image)
        np.testing.assert_array_equal(label, want_label)
        np.testing.assert_array_equal(ds.get_label(index), want_label)


def test_without_labels_label_has_shape_zero(shapes_zip):
    ds = ImageFolderDataset(shapes_zip)
    assert ds[3][1].shape == (0,)
    assert (ds.label_dim, ds.has_labels) == (0, False)


def test_xflip_doubles_with_mirrored_copies(shapes_zip):
    ds = ImageFolderDataset(shapes_zip, xflip=True, use_labels=True)
    assert len(ds) == 40
    for index in (0, 13):
        image, label = ds[index]
        flipped, flipped_label = ds[20 + index]
        np.testing.assert_array_equal(flipped, image[:, :, ::-1])
        np.testing.assert_array_equal(flipped_label, label)
        assert flipped.flags['C_CONTIGUOUS']


def test_max_size_picks_a_deterministic_seeded_subset(shapes_zip):
    a = ImageFolderDataset(shapes_zip, max_size=5, random_seed=3)
    b = ImageFolderDataset(shapes_zip, max_size=5, random_seed=3)
    c = ImageFolderDataset(shapes_zip, max_size=5, random_seed=4)
    assert len(a) == 5
    chosen = np.sort(np.random.RandomState(3).permutation(20)[:5])  # EDM's recipe
    np.testing.assert_array_equal(a._raw_idx, chosen)
    np.testing.assert_array_equal(b._raw_idx, chosen)
    assert not np.array_equal(c._raw_idx, chosen)
    np.testing.assert_array_equal(a[2][0], expected_item(int(chosen[2]))[0])
    assert len(ImageFolderDataset(shapes_zip, max_size=5, xflip=True)) == 10
    assert len(ImageFolderDataset(shapes_zip, max_size=50)) == 20


def test_edm_snapshot_dataset_kwargs_construct(shapes_zip):
    kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=shapes_zip, use_labels=True,
                             xflip=False, cache=True, max_size=20, random_seed=0, resolution=16)
    ds = ImageFolderDataset(**{k: v for k, v in kwargs.items() if k != 'class_name'})
    assert (len(ds), ds.resolution, ds.label_dim) == (20, 16, 5)


def test_use_labels_without_labels_is_a_clear_error(tmp_path):
    path = write_folder(tmp_path / 'ds', [np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match='has no labels.*--cond=0'):
        ImageFolderDataset(path, use_labels=True)


def test_wrong_resolution_and_bad_paths_are_clear_errors(shapes_zip, tmp_path):
    with pytest.raises(ValueError, match='images are 16x16, not 32x32'):
        ImageFolderDataset(shapes_zip, resolution=32)
    with pytest.raises(FileNotFoundError, match='no such dataset'):
        ImageFolderDataset(str(tmp_path / 'missing.zip'))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no images found'):
        ImageFolderDataset(str(tmp_path / 'empty'))


def test_bad_files_in_a_folder_are_clear_errors(tmp_path):
    rgba = write_folder(tmp_path / 'rgba', [np.zeros((8, 8, 4), np.uint8)])
    with pytest.raises(ValueError, match='mode RGBA'):
        ImageFolderDataset(rgba)
    mixed = write_folder(tmp_path / 'mixed', [np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)])
    with pytest.raises(ValueError, match='img00000001.png: shape'):
        ImageFolderDataset(mixed)[1]
    partial = write_folder(tmp_path / 'partial', [np.zeros((8, 8), np.uint8)] * 2, labels=[1, 2])
    with open(os.path.join(partial, 'dataset.json'), 'w') as f:
        json.dump({'labels': [['00000/img00000000.png', 1]]}, f)
    with pytest.raises(ValueError, match='no label for 00000/img00000001.png'):
        ImageFolderDataset(partial, use_labels=True)


def test_grayscale_and_vector_labels(tmp_path):
    images = [np.full((8, 8), v, np.uint8) for v in (10, 20, 30)]
    path = write_folder(tmp_path / 'ds', images, labels=[[0.5, 1.0], [0.0, 0.0], [2.0, -1.0]])
    ds = ImageFolderDataset(path, use_labels=True)
    assert (ds.num_channels, ds.label_shape) == (1, [2])
    image, label = ds[2]
    np.testing.assert_array_equal(image, np.full((1, 8, 8), 30, np.uint8))
    np.testing.assert_array_equal(label, np.array([2.0, -1.0], np.float32))


def test_cache_keeps_images_after_the_file_is_gone(tmp_path):
    path = write_folder(tmp_path / 'ds', [np.full((8, 8, 3), 99, np.uint8), np.zeros((8, 8, 3), np.uint8)])
    ds = ImageFolderDataset(path, cache=True)
    first = ds[1][0]
    os.remove(os.path.join(path, '00000', 'img00000001.png'))
    np.testing.assert_array_equal(ds[1][0], first)
    uncached = ImageFolderDataset(write_folder(tmp_path / 'ds2', [np.zeros((8, 8, 3), np.uint8)] * 2))
    os.remove(os.path.join(str(tmp_path / 'ds2'), '00000', 'img00000001.png'))
    with pytest.raises(FileNotFoundError):
        uncached[1]


def test_pickle_drops_the_open_zip(shapes_zip):
    ds = ImageFolderDataset(shapes_zip, use_labels=True)
    ds[0]
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._zipfile is None
    np.testing.assert_array_equal(copy[5][0], ds[5][0])
    ds.close()
    np.testing.assert_array_equal(ds[5][0], expected_item(5)[0])  # reopens after close


def test_zip_is_reopened_in_a_new_process(shapes_zip, monkeypatch):
    ds = ImageFolderDataset(shapes_zip)
    parent_handle = ds._get_zipfile()
    assert ds._get_zipfile() is parent_handle
    monkeypatch.setattr(os, 'getpid', lambda: -1)  # as seen from a forked worker
    assert ds._get_zipfile() is not parent_handle
    np.testing.assert_array_equal(ds[4][0], expected_item(4)[0])


def test_dataloader_with_two_workers_reads_every_item(shapes_zip):
    ds = ImageFolderDataset(shapes_zip, use_labels=True, xflip=True)
    ds[0]  # the parent holds an open zip handle before the workers fork
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2, shuffle=False)
    images, labels = zip(*loader)
    images, labels = torch.cat(images).numpy(), torch.cat(labels).numpy()
    assert images.shape == (40, 3, 16, 16) and labels.shape == (40, 5)
    for index in range(40):
        want_image, want_label = expected_item(index % 20)
        np.testing.assert_array_equal(images[index], want_image if index < 20 else want_image[:, :, ::-1])
        np.testing.assert_array_equal(labels[index], want_label)


# ----------------------------------------------------------------------------
# Demo shapes.

def test_demo_images_are_deterministic_per_index():
    a, label_a = demo_data.make_shape_image(11, 32)
    b, label_b = demo_data.make_shape_image(11, 32)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8 and label_a == label_b == 11 % 5
    assert not np.array_equal(a, demo_data.make_shape_image(12, 32)[0])
    assert not np.array_equal(a, demo_data.make_shape_image(11, 32, seed=1)[0])
    streamed = list(demo_data.iterate_shapes(6, 8))
    assert [label for _im, label in streamed] == [0, 1, 2, 3, 4, 0]
    np.testing.assert_array_equal(streamed[4][0], demo_data.make_shape_image(4, 8)[0])


def test_demo_shapes_are_large_centred_bright_on_dark_and_coloured_by_class():
    palette = np.array(demo_data.CLASS_COLOURS) * 255
    for index in range(25):
        image, label = demo_data.make_shape_image(index, 64)
        image = image.astype(np.float64)
        # Background channels are all <= 46 and the shape has one >= 196, so
        # the brightest channel at mid-grey separates them; a corner is background.
        shape = image.max(axis=2) > 127.5
        rows, cols = np.nonzero(shape)
        extent = max(np.ptp(rows), np.ptp(cols)) + 1
        assert 0.38 * 64 <= extent <= 0.75 * 64, (index, extent)
        centre = np.array([rows.min() + rows.max() + 1, cols.min() + cols.max() + 1]) / 2
        assert np.abs(centre - 32).max() <= 0.1 * 64, (index, centre)
        assert not shape[[0, 0, -1, -1], [0, -1, 0, -1]].any()
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners == corners[0]).all(), index   # one flat background colour
        assert corners.max() <= 0.18 * 255 + 0.5
        # The colour tells the class: the shape's own colour (its commonest, the
        # edges being blends with the background) is nearest to its class colour.
        colours, counts = np.unique(image[shape], axis=0, return_counts=True)
        colour = colours[np.argmax(counts)]
        assert np.abs(colour - palette[label]).max() <= 0.08 * 255 + 1, (index, colour)
        assert np.argmin(np.linalg.norm(palette - colour, axis=1)) == label


@pytest.mark.parametrize('resolution', [4, 7.0, (16, 6), (8.5, 8)])
def test_demo_rejects_bad_resolutions(resolution):
    with pytest.raises(ValueError, match='at least 8 pixels'):
        demo_data.make_shape_image(0, resolution)


def test_demo_draws_any_size_and_keeps_squares_as_they_were():
    image, label = demo_data.make_shape_image(3, (48, 32))
    assert image.shape == (32, 48, 3) and label == 3
    wide = image.astype(int)
    assert (wide[:, :8] == wide[0, 0]).all() and (wide[:, -8:] == wide[0, 0]).all()   # the shape stays central
    square, _ = demo_data.make_shape_image(3, 32)
    assert np.array_equal(square, demo_data.make_shape_image(3, (32, 32))[0])
