"""dataset_tool.py: every source kind round-trips, transforms move the right
pixels, labels are carried through, and bad input fails with one clear error
and leaves nothing behind."""

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from dataset_prep import demo_data
from dataset_prep.archive import TRANSFORMS, archive_name, center_crop, center_crop_wide, convert_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------
# Helpers.

def run_tool(*args):
    """Run the CLI in-process; returns click's Result."""
    return CliRunner().invoke(dataset_tool.cli, [str(a) for a in args])


def read_archive(path):
    """{name: bytes} of a dataset zip or folder."""
    if str(path).endswith('.zip'):
        with zipfile.ZipFile(path) as z:
            return {n: z.read(n) for n in z.namelist()}
    files = {}
    for root, _dirs, names in os.walk(path):
        for n in names:
            full = os.path.join(root, n)
            with open(full, 'rb') as f:
                files[os.path.relpath(full, path).replace(os.sep, '/')] = f.read()
    return files


def read_dataset(path):
    """(images list of uint8 arrays [H, W] or [H, W, C] in name order, labels json) of an output archive."""
    files = read_archive(path)
    names = sorted(n for n in files if n.endswith('.png'))
    images = [np.asarray(PIL.Image.open(io.BytesIO(files[n]))) for n in names]
    return names, images, json.loads(files['dataset.json'])['labels']


def save_image(path, array):
    """Save uint8 [H, W] (L), [H, W, 3] (RGB) or [H, W, 4] (RGBA) as an image file, making folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(array).save(path)


def random_rgb(rng, h, w):
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def assert_user_error(result, dest, *needles):
    """Non-zero exit, one 'Error:' line naming `needles`, no traceback, no output left."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception
    assert 'Traceback' not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not os.path.exists(dest)
    parent = os.path.dirname(dest)
    if os.path.isdir(parent):
        assert not [n for n in os.listdir(parent) if n.startswith('.' + os.path.basename(dest))]
    return errors[0]


# ----------------------------------------------------------------------------
# Demo source and the command line.

def test_demo_default_command_writes_labelled_deterministic_zip(tmp_path):
    dest1, dest2 = tmp_path / 'a.zip', tmp_path / 'b.zip'
    assert run_tool('--source=demo:shapes:12', f'--dest={dest1}').exit_code == 0
    result = run_tool('convert', '--source=demo:shapes', '--max-images=12', f'--dest={dest2}')
    assert result.exit_code == 0, result.output
    assert read_archive(dest1) == read_archive(dest2)
    names, images, labels = read_dataset(dest1)
    assert names == [f'00000/img{i:08d}.png' for i in range(12)]
    for i, image in enumerate(images):
        expected, label = demo_data.make_shape_image(i, 32)
        np.testing.assert_array_equal(image, expected)
        assert labels[i] == [names[i], label]
    assert sorted({label for _name, label in labels}) == list(range(len(demo_data.SHAPE_NAMES)))


def test_demo_resolution_and_folder_output(tmp_path):
    dest = tmp_path / 'shapes'
    assert run_tool('--source=demo:shapes:3', f'--dest={dest}', '--resolution=16x16').exit_code == 0
    _names, images, labels = read_dataset(dest)
    assert [im.shape for im in images] == [(16, 16, 3)] * 3
    np.testing.assert_array_equal(images[2], demo_data.make_shape_image(2, 16)[0])
    assert [label for _n, label in labels] == [0, 1, 2]


def test_folder_names_every_1000_images_by_output_index():
    assert archive_name(0) == '00000/img00000000.png'
    assert archive_name(999) == '00000/img00000999.png'
    assert archive_name(1000) == '00001/img00001000.png'
    assert archive_name(49999) == '00049/img00049999.png'


def test_readme_invocation_verbatim_in_a_subprocess(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / 'downloads' / 'faces'
    save_image(str(src / 'a.png'), random_rgb(rng, 80, 100))
    save_image(str(src / 'b.png'), random_rgb(rng, 120, 90))
    dest = tmp_path / 'datasets' / 'faces-64x64.zip'
    proc = subprocess.run([sys.executable, 'dataset_tool.py', f'--source={src}', f'--dest={dest}',
                           '--resolution=64x64', '--transform=center-crop'],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    _names, images, labels = read_dataset(dest)
    assert [im.shape for im in images] == [(64, 64, 3)] * 2
    assert labels is None


def test_help_lists_convert_options():
    result = run_tool('--help')
    assert result.exit_code == 0
    for option in ('--source', '--dest', '--resolution', '--transform', '--max-images', 'convert'):
        assert option in result.output


def test_missing_source_is_a_usage_error(tmp_path):
    result = run_tool(f'--dest={tmp_path / "x.zip"}')
    assert result.exit_code == 2
    assert "Missing option '--source'" in result.stderr


# ----------------------------------------------------------------------------
# Folder and zip sources.

def make_image_folder(root, rng):
    """Three 8x8 RGB images in nested folders with labels; returns {relpath: array}."""
    images = {'b/x.png': random_rgb(rng, 8, 8), 'a/z.bmp': random_rgb(rng, 8, 8), 'a/y.png': random_rgb(rng, 8, 8)}
    for rel, array in images.items():
        save_image(os.path.join(root, rel), array)
    with open(os.path.join(root, 'dataset.json'), 'w') as f:
        json.dump({'labels': [['a/y.png', 3], ['a/z.bmp', 1], ['b/x.png', 0]]}, f)
    with open(os.path.join(root, 'notes.txt'), 'w') as f:
        f.write('not an image')
    save_image(os.path.join(root, '.hidden', 'skip.png'), random_rgb(rng, 3, 5))
    return images


def test_folder_source_round_trip_sorted_with_labels(tmp_path):
    images = make_image_folder(tmp_path / 'src', np.random.default_rng(1))
    dest = tmp_path / 'out.zip'
    assert run_tool(f'--source={tmp_path / "src"}', f'--dest={dest}').exit_code == 0
    _names, out, labels = read_dataset(dest)
    order = ['a/y.png', 'a/z.bmp', 'b/x.png']
    for image, rel in zip(out, order, strict=True):
        np.testing.assert_array_equal(image, images[rel])
    assert [label for _n, label in labels] == [3, 1, 0]


def test_zip_source_round_trip_with_max_images(tmp_path):
    images = make_image_folder(tmp_path / 'src', np.random.default_rng(2))
    src_zip = tmp_path / 'src.zip'
    with zipfile.ZipFile(src_zip, 'w') as z:
        for rel in list(images) + ['dataset.json']:
            z.write(tmp_path / 'src' / rel, rel)
    dest = tmp_path / 'out'
    assert run_tool(f'--source={src_zip}', f'--dest={dest}', '--max-images=2').exit_code == 0
    _names, out, labels = read_dataset(dest)
    assert len(out) == 2
    np.testing.assert_array_equal(out[1], images['a/z.bmp'])
    assert labels == [['00000/img00000000.png', 3], ['00000/img00000001.png', 1]]


def test_labels_from_top_level_folders_without_dataset_json(tmp_path):
    rng = np.random.default_rng(3)
    for rel in ('cat/1.png', 'dog/1.png', 'cat/2.png'):
        save_image(str(tmp_path / 'src' / rel), random_rgb(rng, 4, 4))
    dest = tmp_path / 'out.zip'
    assert run_tool(f'--source={tmp_path / "src"}', f'--dest={dest}').exit_code == 0
    assert [label for _n, label in read_dataset(dest)[2]] == [0, 0, 1]


def test_image_modes_are_normalised(tmp_path):
    rng = np.random.default_rng(4)
    gray16 = rng.integers(0, 65536, size=(4, 4)).astype(np.uint16)
    rgba = rng.integers(0, 256, size=(4, 4, 4), dtype=np.uint8)
    src = tmp_path / 'src'
    src.mkdir()
    PIL.Image.fromarray(gray16).save(src / 'a16.png')
    with PIL.Image.open(src / 'a16.png') as img:
        assert img.mode.startswith('I')
    save_image(str(src / 'b.png'), rgba)
    dest = tmp_path / 'gray.zip'
    assert run_tool(f'--source={src}', f'--dest={dest}').exit_code == 0
    _names, out, _labels = read_dataset(dest)
    # One RGBA image makes the dataset RGB: gray is repeated, alpha dropped.
    np.testing.assert_array_equal(out[0], np.repeat(np.rint(gray16 / 257).astype(np.uint8)[..., None], 3, axis=2))
    np.testing.assert_array_equal(out[1], rgba[..., :3])


def test_grayscale_and_palette_sources(tmp_path):
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 256, size=(4, 4), dtype=np.uint8)
    save_image(str(tmp_path / 'gray' / 'a.png'), gray)
    dest = tmp_path / 'gray.zip'
    assert run_tool(f'--source={tmp_path / "gray"}', f'--dest={dest}').exit_code == 0
    np.testing.assert_array_equal(read_dataset(dest)[1][0], gray)  # stays 1 channel

    rgb = random_rgb(rng, 4, 4)
    palette = PIL.Image.fromarray(rgb).quantize(colors=16)
    os.makedirs(tmp_path / 'pal')
    palette.save(tmp_path / 'pal' / 'a.png')
    dest = tmp_path / 'pal.zip'
    assert run_tool(f'--source={tmp_path / "pal"}', f'--dest={dest}').exit_code == 0
    np.testing.assert_array_equal(read_dataset(dest)[1][0], np.asarray(palette.convert('RGB')))


# ----------------------------------------------------------------------------
# Transforms on known pixels.

def test_center_crop_takes_the_centred_square():
    image = np.arange(4 * 8 * 3, dtype=np.uint8).reshape(4, 8, 3)
    np.testing.assert_array_equal(center_crop(image, 4, 4), image[:, 2:6])
    tall = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4, 1)
    np.testing.assert_array_equal(center_crop(tall, 4, 4), tall[3:7])


def test_center_crop_wide_keeps_the_full_width_and_a_band_of_rows():
    # Rows constant along x: the 16 -> 8 column resize keeps each row's value exactly.
    image = np.repeat((np.arange(8, dtype=np.uint8) * 10 + 1)[:, None, None], 16, axis=1).repeat(3, axis=2)
    out = center_crop_wide(image, 8, 4)
    assert out.shape == (8, 8, 3)
    # The band has round(8 * 8 / 16) = 4 rows from row (8 - 4) // 2 = 2, placed at row (8 - 4) // 2 = 2.
    np.testing.assert_array_equal(out[2:6], image[2:6, ::2])
    assert not out[:2].any() and not out[6:].any()
    assert center_crop_wide(image[:, :6], 8, 4) is None  # narrower than 8: skipped
    assert center_crop_wide(image[:4], 8, 4) is None  # 16x4 is wider than 8:4 (band of 2 rows): skipped


def test_plain_resize_keeps_a_constant_image_constant(tmp_path):
    save_image(str(tmp_path / 'src' / 'a.png'), np.full((16, 16, 3), 77, np.uint8))
    dest = tmp_path / 'out.zip'
    assert run_tool(f'--source={tmp_path / "src"}', f'--dest={dest}', '--resolution=4x4').exit_code == 0
    np.testing.assert_array_equal(read_dataset(dest)[1][0], np.full((4, 4, 3), 77, np.uint8))


def test_center_crop_wide_skips_small_images_through_cli(tmp_path):
    rng = np.random.default_rng(6)
    save_image(str(tmp_path / 'src' / 'a.png'), random_rgb(rng, 8, 16))
    save_image(str(tmp_path / 'src' / 'b.png'), random_rgb(rng, 2, 4))
    dest = tmp_path / 'out.zip'
    result = run_tool(f'--source={tmp_path / "src"}', f'--dest={dest}', '--transform=center-crop-wide',
                      '--resolution=8x4')
    assert result.exit_code == 0, result.output
    assert 'Skipped 1 images' in result.stderr
    _names, out, _labels = read_dataset(dest)
    assert [im.shape for im in out] == [(8, 8, 3)]


# ----------------------------------------------------------------------------
# Same pixels as EDM's dataset_tool.py on odd shapes and modes.

def pattern(h, w, channels):
    """A deterministic uint8 [h, w, channels] image with detail at every scale."""
    y, x, c = np.meshgrid(np.arange(h), np.arange(w), np.arange(channels), indexing='ij')
    return ((x * 37 + y * 91 + c * 53) ^ (x * y * 7)).astype(np.uint8)


def palette_image(h, w):
    """A mode P image whose colours are not its indices."""
    img = PIL.Image.frombytes('P', (w, h), pattern(h, w, 1).tobytes())
    img.putpalette([v for i in range(256) for v in ((i * 73) % 256, (i * 151) % 256, 255 - i)])
    return img


def odd_sources():
    """{file name: PIL image}: landscape, portrait, grey, RGBA and palette
    sources of odd sizes, one whose band height round(16 * 25 / 32) = 12.5
    is a tie (half to even: 12), and two that center-crop-wide skips at
    16x12 and 16x9 (too narrow; too wide)."""
    return {
        'a-landscape.png': PIL.Image.fromarray(pattern(29, 37, 3)),
        'b-portrait.png': PIL.Image.fromarray(pattern(41, 23, 3)),
        'c-tie.png': PIL.Image.fromarray(pattern(25, 32, 3)),
        'd-grey.png': PIL.Image.fromarray(pattern(27, 35, 1)[..., 0]),
        'e-rgba.png': PIL.Image.fromarray(pattern(39, 29, 4)),
        'f-palette.png': palette_image(31, 33),
        'g-narrow.png': PIL.Image.fromarray(pattern(40, 12, 3)),
        'h-panorama.png': PIL.Image.fromarray(pattern(11, 45, 3)),
    }


def naive_edm(img, transform, width, height, mode='RGB'):
    """EDM's crop transforms on a PIL image, step by step with PIL's own crop
    and paste: uint8 [width, width, C] (or [width, width] for mode L), or
    None where EDM skips the image. The image is first converted to `mode`
    (EDM writes RGB: grey repeated; our RGBA and palette decoding: alpha
    dropped, palette looked up)."""
    img = img.convert(mode)
    w, h = img.size
    lanczos = PIL.Image.Resampling.LANCZOS
    if transform == 'center-crop':
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return np.asarray(img.crop((left, top, left + side, top + side)).resize((width, height), lanczos))
    band = round(width * h / w)  # rows; Python's round() is half to even, as np.round
    if w < width or band < height:
        return None
    top = (h - band) // 2
    strip = img.crop((0, top, w, top + band)).resize((width, height), lanczos)
    canvas = PIL.Image.new(mode, (width, width))  # black
    canvas.paste(strip, (0, (width - height) // 2))
    return np.asarray(canvas)


def write_sources(folder, sources):
    """Save {file name: PIL image} as PNGs in a new folder."""
    os.makedirs(folder)
    for name, img in sources.items():
        img.save(os.path.join(folder, name))


def digest(arrays):
    """Short checksum of a list of uint8 arrays (shapes and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(repr(a.shape).encode() + a.tobytes())
    return h.hexdigest()[:16]


# digest() of the outputs in file order: the same as of what EDM's dataset_tool.py
# (NVlabs/edm 008a4e5, run with Pillow 13.0.0) writes from these files, whose PNGs
# were byte for byte ours. EDM fails on RGBA and reads palette images as their
# indices, so it was given those two converted to RGB; it skips the same two files.
EDM_DIGESTS = {
    ('center-crop', (16, 16)): 'b69167d9de021d22',
    ('center-crop-wide', (16, 12)): '68fd98e69567668e',
    ('center-crop-wide', (16, 9)): '80b5c99933989f2b',
}


@pytest.mark.parametrize('transform, resolution', list(EDM_DIGESTS))
def test_crop_transforms_give_edms_pixels_on_odd_sources(tmp_path, transform, resolution):
    sources = odd_sources()
    write_sources(tmp_path / 'src', sources)
    dest = tmp_path / 'out.zip'
    result = run_tool(f'--source={tmp_path / "src"}', f'--dest={dest}', f'--transform={transform}',
                      f'--resolution={resolution[0]}x{resolution[1]}')
    assert result.exit_code == 0, result.output
    expected = [naive_edm(img, transform, *resolution) for _name, img in sorted(sources.items())]
    skipped = sum(e is None for e in expected)
    assert skipped == (0 if transform == 'center-crop' else 2)
    if skipped:
        assert f'Skipped {skipped} images' in result.stderr
    _names, out, _labels = read_dataset(dest)
    expected = [e for e in expected if e is not None]
    assert len(out) == len(expected)
    for image, e in zip(out, expected):
        assert image.shape == (resolution[0], resolution[0], 3)
        np.testing.assert_array_equal(image, e)
    assert digest(out) == EDM_DIGESTS[transform, resolution]


def test_center_crop_wide_pixels_checked_against_edm():
    image = center_crop_wide(np.asarray(odd_sources()['a-landscape.png']), 16, 12)
    # The black rows, and pixels EDM's dataset_tool.py wrote for this source at 16x12.
    assert not image[:2].any() and not image[14:].any()
    assert image[2, 0].tolist() == [170, 22, 125]
    assert image[8, 7].tolist() == [139, 58, 111]
    assert image[13, 15].tolist() == [128, 84, 123]


@pytest.mark.parametrize('transform', TRANSFORMS)
def test_grey_sources_become_rgb_under_crop_transforms_unless_channels_1(tmp_path, transform):
    grey = PIL.Image.fromarray(pattern(27, 35, 1)[..., 0])
    write_sources(tmp_path / 'src', {'a.png': grey, 'b.png': grey.transpose(PIL.Image.Transpose.TRANSPOSE)})
    resolution = (16, 16) if transform == 'center-crop' else (16, 12)
    for channels, mode in (('auto', 'RGB'), ('3', 'RGB'), ('1', 'L')):
        dest = tmp_path / f'out-{channels}.zip'
        result = run_tool(f'--source={tmp_path / "src"}', f'--dest={dest}', f'--transform={transform}',
                          f'--resolution={resolution[0]}x{resolution[1]}', f'--channels={channels}')
        assert result.exit_code == 0, result.output
        out = read_dataset(dest)[1]
        assert len(out) == 2
        for image, src in zip(out, (grey, grey.transpose(PIL.Image.Transpose.TRANSPOSE))):
            np.testing.assert_array_equal(image, naive_edm(src, transform, *resolution, mode=mode))


def test_channels_option_without_transform(tmp_path):
    gray = pattern(8, 8, 1)[..., 0]
    rgb = pattern(8, 8, 3)
    save_image(str(tmp_path / 'gray' / 'a.png'), gray)
    save_image(str(tmp_path / 'rgb' / 'a.png'), rgb)
    for folder, channels, expected in (
            ('gray', 'auto', gray), ('gray', '3', np.repeat(gray[..., None], 3, axis=2)),
            ('rgb', 'auto', rgb), ('rgb', '1', np.asarray(PIL.Image.fromarray(rgb).convert('L')))):
        dest = tmp_path / f'{folder}-{channels}.zip'
        result = run_tool(f'--source={tmp_path / folder}', f'--dest={dest}', f'--channels={channels}')
        assert result.exit_code == 0, result.output
        np.testing.assert_array_equal(read_dataset(dest)[1][0], expected)
    assert run_tool('--source=demo:shapes:2', f'--dest={tmp_path / "x.zip"}', '--channels=2').exit_code == 2


# ----------------------------------------------------------------------------
# CIFAR-10, MNIST and LMDB.

def make_cifar_tarball(path, per_batch=2):
    """A cifar-10-python.tar.gz in the real layout; returns (images NHWC, labels)."""
    rng = np.random.default_rng(7)
    images, labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        for i in range(1, 6):
            data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
            batch_labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
            blob = pickle.dumps({b'data': data, b'labels': batch_labels, b'batch_label': b'x'}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/data_batch_{i}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels += batch_labels
    return np.concatenate(images), labels


def test_cifar10_round_trip(tmp_path):
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    images, labels = make_cifar_tarball(tarball)
    dest = tmp_path / 'cifar.zip'
    assert run_tool(f'--source={tarball}', f'--dest={dest}').exit_code == 0
    _names, out, out_labels = read_dataset(dest)
    np.testing.assert_array_equal(np.stack(out), images)
    assert [label for _n, label in out_labels] == labels


def test_cifar_tarball_with_code_in_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.getpid, ())
    blob = pickle.dumps({b'data': Evil()}, protocol=2)
    tarball = tmp_path / 'cifar-10-python.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tar:
        info = tarfile.TarInfo('cifar-10-batches-py/data_batch_1')
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    dest = tmp_path / 'out.zip'
    assert_user_error(run_tool(f'--source={tarball}', f'--dest={dest}'), str(dest), 'cifar-10-python.tar.gz')


def write_idx(path, array, magic):
    header = magic.to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize('point_at_file', [False, True])
def test_mnist_round_trip_padded_gray(tmp_path, point_at_file):
    rng = np.random.default_rng(8)
    digits = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    write_idx(tmp_path / 'train-images-idx3-ubyte.gz', digits, 0x803)
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', labels, 0x801)
    source = tmp_path / 'train-images-idx3-ubyte.gz' if point_at_file else tmp_path
    dest = tmp_path / 'mnist.zip'
    assert run_tool(f'--source={source}', f'--dest={dest}').exit_code == 0
    _names, out, out_labels = read_dataset(dest)
    assert out[0].shape == (32, 32)  # 1 channel
    np.testing.assert_array_equal(np.stack(out)[:, 2:30, 2:30], digits)
    assert not np.stack(out)[:, :2].any()
    assert [label for _n, label in out_labels] == [7, 0, 9]


def test_truncated_mnist_is_a_clear_error(tmp_path):
    write_idx(tmp_path / 'train-labels-idx1-ubyte.gz', np.zeros(3, np.uint8), 0x801)
    with gzip.open(tmp_path / 'train-images-idx3-ubyte.gz', 'wb') as f:
        f.write((0x803).to_bytes(4, 'big') + b''.join(d.to_bytes(4, 'big') for d in (3, 28, 28)) + b'\0' * 100)
    dest = tmp_path / 'out.zip'
    assert_user_error(run_tool(f'--source={tmp_path}', f'--dest={dest}'), str(dest), 'truncated')


def test_lmdb_round_trip(tmp_path):
    lmdb = pytest.importorskip('lmdb')
    rng = np.random.default_rng(9)
    rgb, gray = random_rgb(rng, 8, 8), rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    path = str(tmp_path / 'church_lmdb')
    with lmdb.open(path, map_size=1 << 24) as env, env.begin(write=True) as txn:
        for key, array in ((b'a', rgb), (b'b', gray)):
            buffer = io.BytesIO()
            PIL.Image.fromarray(array).save(buffer, format='png')
            txn.put(key, buffer.getvalue())
    dest = tmp_path / 'out.zip'
    assert run_tool(f'--source={path}', f'--dest={dest}').exit_code == 0
    _names, out, labels = read_dataset(dest)
    np.testing.assert_array_equal(out[0], rgb)
    np.testing.assert_array_equal(out[1], np.repeat(gray[..., None], 3, axis=2))
    assert labels is None


def test_lmdb_without_package_says_pip_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'lmdb', None)
    os.makedirs(tmp_path / 'bed_lmdb')
    dest = tmp_path / 'out.zip'
    assert_user_error(run_tool(f'--source={tmp_path / "bed_lmdb"}', f'--dest={dest}'), str(dest), 'pip install lmdb')


# ----------------------------------------------------------------------------
# Bad input: one clear error, nothing left behind.

def folder_with(tmp_path, files):
    """Make tmp_path/src with {relpath: array or bytes}; returns its path."""
    src = tmp_path / 'src'
    src.mkdir()
    for rel, content in files.items():
        if isinstance(content, bytes):
            (src / rel).write_bytes(content)
        else:
            save_image(str(src / rel), content)
    return src


def png_bytes(array):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='png')
    return buffer.getvalue()


RNG = np.random.default_rng(10)
GOOD = random_rgb(RNG, 8, 8)


@pytest.mark.parametrize('files, extra, needle', [
    ({}, [], 'no images found'),
    ({'a.png': GOOD, 'b.png': random_rgb(RNG, 16, 16)}, [], 'b.png is 16x16 but earlier images are 8x8'),
    ({'a.png': random_rgb(RNG, 8, 16)}, ['--resolution=32x32'], 'a.png is 16x8, not of the aspect of --resolution=32x32'),
    ({'a.png': GOOD, 'b.png': GOOD, 'c.png': png_bytes(GOOD)[:-60]}, [], 'c.png: cannot read'),
    ({'a.png': GOOD, 'z.png': b'this is text, not a picture'}, [], 'z.png: cannot read'),
    ({'a.png': GOOD, 'dataset.json': b'{"labels": [["a.png", 1]'}, [], 'dataset.json: not valid JSON'),
    ({'a.png': GOOD, 'dataset.json': b'{"labels": [["a.png", "cat"]]}'}, [], 'dataset.json: bad entry'),
    ({'a.png': GOOD, 'b.png': GOOD, 'dataset.json': b'{"labels": [["a.png", 1]]}'}, [], 'b.png has no label'),
    ({'a.png': GOOD}, ['--transform=center-crop'], '--transform=center-crop needs --resolution'),
    ({'a.png': GOOD}, ['--resolution=64x0'], 'width and height must be >= 1'),
    ({'a.png': GOOD}, ['--resolution=32x64', '--transform=center-crop-wide'], 'the height must not exceed the width'),
], ids=['empty', 'mixed-sizes', 'aspect-mismatch', 'truncated', 'not-an-image', 'json-syntax',
        'json-structure', 'missing-label', 'transform-without-resolution', 'zero-side', 'wide-crop-taller-than-wide'])
def test_bad_input_fails_cleanly(tmp_path, files, extra, needle):
    src = folder_with(tmp_path, files)
    for dest in (tmp_path / 'out' / 'x.zip', tmp_path / 'out' / 'x'):
        assert_user_error(run_tool(f'--source={src}', f'--dest={dest}', *extra), str(dest), needle)


def test_existing_destination_is_never_touched(tmp_path):
    dest = tmp_path / 'x.zip'
    dest.write_bytes(b'precious')
    result = run_tool('--source=demo:shapes:2', f'--dest={dest}')
    assert result.exit_code != 0 and 'already exists' in result.stderr and 'Traceback' not in result.output
    assert dest.read_bytes() == b'precious'
    (tmp_path / 'folder').mkdir()
    assert run_tool('--source=demo:shapes:2', f'--dest={tmp_path / "folder"}').exit_code != 0
    assert os.listdir(tmp_path / 'folder') == []


def test_unknown_sources_are_clear_errors(tmp_path):
    dest = tmp_path / 'x.zip'
    assert_user_error(run_tool(f'--source={tmp_path / "nope"}', f'--dest={dest}'), str(dest), 'no such file')
    assert_user_error(run_tool('--source=demo:faces', f'--dest={dest}'), str(dest), 'unknown demo source')
    (tmp_path / 'a.csv').write_text('1,2')
    assert_user_error(run_tool(f'--source={tmp_path / "a.csv"}', f'--dest={dest}'), str(dest), 'unknown kind')


def test_folder_order_is_edms(tmp_path):
    """A folder's images are numbered in EDM's order (path components compared one by one)."""
    src = tmp_path / 'src'
    for name, value in (('a/b.png', 10), ('a-c.png', 20), ('a.png', 30)):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(np.full([8, 8], value, dtype=np.uint8)).save(src / name)
    dest = tmp_path / 'out.zip'
    convert_dataset(str(src), str(dest))
    with zipfile.ZipFile(dest) as z:
        firsts = [int(np.asarray(PIL.Image.open(z.open(archive_name(i))))[0, 0]) for i in range(3)]
    assert firsts == [10, 20, 30]
