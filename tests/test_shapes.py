"""Any image shape: non-square and non-power-of-two images end to end
(docs/DESIGN.md section 2, "Any image shape"): the patch rule, coordinates per
axis, networks, refusals, dataset_tool -> train (real_p 0.5, a resume) ->
generate -> fid, latents, and --transfer between square and rectangular runs."""

import glob
import json
import math
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import fid
import generate
import train
from training import architectures, networks, patching, runs, snapshots
from training.augment import EDM_AUGMENT_KWARGS, AugmentPipe
from training.dataset import ImageFolderDataset

TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2,2', '--blocks=1', '--attn=none', '--dropout=0', '--workers=0',
        '--device=cpu']
TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8], use_pos=True, dropout=0)


# ----------------------------------------------------------------------------
# The patch rule (the table of docs/DESIGN.md section 2).


@pytest.mark.parametrize('shape, multiple, sizes, multipliers', [
    ((32, 48), 4, [(8, 12), (16, 24), (32, 48)], [4, 2, 1]),       # 48x32
    ((40, 40), 4, [8, 20, 40], [5, 2, 1]),                          # 40x40: 10 rounds down to 8
    ((64, 96), 8, [(16, 24), (32, 48), (64, 96)], [4, 2, 1]),       # 96x64
    ((48, 80), 4, [(12, 20), (24, 40), (48, 80)], [4, 2, 1]),       # 80x48
    ((48, 48), 8, [8, 24, 48], [6, 2, 1]),                          # 48x48 on a 4-level UNet
    ((64, 64), 4, [16, 32, 64], [4, 2, 1]),                         # the official square table
    ((144, 256), 16, [(32, 64), (64, 128), (144, 256)], [4, 2, 1]),  # 16:9 on a 5-level UNet
])
def test_patch_sizes_and_multipliers_follow_the_stated_rule(shape, multiple, sizes, multipliers):
    schedule = patching.PatchSchedule(shape, 0.5, multiple=multiple)
    assert schedule.sizes == sizes
    assert schedule.multipliers == multipliers
    height, width = shape
    for size, m in zip(schedule.sizes, schedule.multipliers):
        h, w = networks.image_shape(size)
        assert h % multiple == 0 and w % multiple == 0 or (h, w) == shape
        assert m * h * w <= height * width                   # a patch step's pixels are at most a full step's
        assert (m + 1) ** 2 * h * w > height * width          # ... and m is the largest such square-root ratio


def test_latent_sizes_and_rounding():
    assert patching.patch_sizes((16, 32), latent=True) == [(8, 16), (16, 32)]
    assert patching.patch_sizes((20, 36), latent=True, multiple=4) == [(8, 16), (20, 36)]
    assert patching.patch_sizes(32, latent=True) == [16, 32]   # squares keep int sides


def test_multiplier_keeps_pixels_per_step_for_many_shapes():
    for height in range(16, 130, 4):
        for width in range(16, 130, 12):
            for multiple in (1, 2, 4):
                if min(height, width) < 4 * max(8, multiple):
                    continue
                schedule = patching.PatchSchedule((height, width), 0.25, multiple=multiple)
                for size, m in zip(schedule.sizes, schedule.multipliers):
                    h, w = networks.image_shape(size)
                    assert 1 <= m and m * h * w <= height * width


def test_a_shape_the_network_cannot_take_names_the_nearest_that_work():
    with pytest.raises(ValueError, match=r'80x50 pixels.*multiples of 4.*80x48 and 80x52'):
        patching.check_image_shape((50, 80), 4)
    patching.check_image_shape((48, 80), 4)   # fine: no error
    with pytest.raises(ValueError, match=r'too small.*every side of a patch must be at least 8'):
        patching.PatchSchedule((24, 64), 0.5)


def test_size_labels():
    assert patching.size_label(16) == '16' and patching.size_label((16, 24)) == '24x16'


# ----------------------------------------------------------------------------
# Coordinates and cropping.


def test_rectangular_grid_maps_each_axis_to_minus_one_one():
    grid = networks.full_grid((4, 6))        # H = 4, W = 6
    assert grid.shape == (1, 2, 4, 6)
    x = torch.tensor([(c / 5 - 0.5) * 2 for c in range(6)], dtype=torch.float32)
    y = torch.tensor([(r / 3 - 0.5) * 2 for r in range(4)], dtype=torch.float32)
    assert torch.allclose(grid[0, 0], x.expand(4, 6)) and torch.allclose(grid[0, 1], y[:, None].expand(4, 6))
    assert grid[0, 0, 0, 0] == -1 and grid[0, 0, 0, -1] == 1 and grid[0, 1, -1, 0] == 1


def test_rectangular_patches_carry_their_place_in_the_full_grid():
    images = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).reshape(2, 3, 32, 48)
    full = networks.full_grid((32, 48), 2)
    patches, pos = patching.random_patches(images, (8, 12), generator=torch.Generator().manual_seed(1))
    assert patches.shape == (2, 3, 8, 12) and pos.shape == (2, 2, 8, 12)
    for i in range(2):
        first = int(patches[i, 0, 0, 0]) - i * 3 * 32 * 48   # the flat index of the corner in image i, channel 0
        top, left = first // 48, first % 48
        assert torch.equal(patches[i], images[i, :, top: top + 8, left: left + 12])
        assert torch.equal(pos[i], full[i, :, top: top + 8, left: left + 12])
    same, _ = patching.random_patches(images, (32, 48))
    assert same is images


def test_corners_cover_both_ranges():
    top, left = patching.random_corners(4000, (16, 40), (8, 8), generator=torch.Generator().manual_seed(0))
    assert int(top.min()) == 0 and int(top.max()) == 8 and int(left.min()) == 0 and int(left.max()) == 32


def test_augmentation_keeps_rectangles():
    pipe = AugmentPipe(p=1, **EDM_AUGMENT_KWARGS)
    images = torch.rand(3, 3, 16, 40) * 2 - 1
    out, labels = pipe(images)
    assert out.shape == images.shape and labels.shape == (3, pipe.label_dim)


# ----------------------------------------------------------------------------
# Networks.


def test_a_rectangular_network_shares_the_square_networks_weight_names(tmp_path):
    torch.manual_seed(0)
    square = architectures.build_network(TINY_NET, 32, 3, 0)
    torch.manual_seed(1)
    wide = architectures.build_network(TINY_NET, (32, 48), 3, 0)
    assert (wide.img_resolution, wide.img_shape, square.img_shape) == (32, (32, 48), (32, 32))
    assert {k: v.shape for k, v in square.state_dict().items()} == {k: v.shape for k, v in wide.state_dict().items()}
    path = str(tmp_path / 'square.pkl')
    snapshots.save_snapshot(path, square, None, None, dict(resolution=32))
    copied, missing = snapshots.transfer_weights(path, wide)
    assert not missing and len(copied) == len(wide.state_dict())
    x = torch.randn(2, 3, 32, 48)
    pos = networks.full_grid((32, 48), 2)
    assert torch.equal(wide(x, torch.ones(2), pos), square(x, torch.ones(2), pos))   # the same function of the grid
    assert torch.equal(wide(x, torch.ones(2)), wide(x, torch.ones(2), pos))          # default: the full grid
    with pytest.raises(ValueError, match='only fits 48x32 inputs'):
        wide(torch.randn(1, 3, 32, 32), torch.ones(1))


@pytest.mark.parametrize('fmt', ['pkl', 'safetensors'])
def test_rectangular_snapshots_load_with_their_shape(tmp_path, fmt):
    net = architectures.build_network(TINY_NET, (16, 40), 1, 0)
    path = str(tmp_path / 'net.pkl')
    snapshots.save_snapshot(path, net, None, None, dict(resolution=[16, 40]), snapshot_format=fmt)
    loaded, _ = snapshots.load_network(path if fmt == 'pkl' else path[:-4] + '.safetensors')
    assert loaded.img_shape == (16, 40)
    x = torch.randn(1, 1, 16, 40)
    assert torch.equal(loaded(x, torch.ones(1)), net.eval()(x, torch.ones(1)))


# ----------------------------------------------------------------------------
# End to end: dataset_tool -> train (real_p 0.5, a resume) -> generate -> fid.


class PooledFeatures(torch.nn.Module):
    """uint8 [N, 3, H, W] of any shape -> [N, 12]: mean colour of each 2x2 cell (a tiny stand-in detector)."""

    def forward(self, images, return_features: bool = False):
        return torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 2).flatten(1)


def invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def latest(run_dir, pattern):
    return sorted(glob.glob(os.path.join(run_dir, pattern)))[-1]


def train_args(outdir, data, duration, *extra):
    return [f'--outdir={outdir}', f'--data={data}', '--cond=0', '--batch=4', '--real_p=0.5', '--seed=2',
            f'--duration={duration}', '--tick=0.05', '--snap=1', '--dump=1', '--samples=4', '--lr-rampup=0.05',
            *TINY, *extra]


@pytest.fixture(scope='module')
def detector(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('detector') / 'features.pt')
    torch.jit.save(torch.jit.script(PooledFeatures()), path)
    return path


@pytest.mark.parametrize('size, channels, extra', [
    ('48x32', 3, ['--augment=0.5', '--xflip=1']),     # RGB, wider than high, with augmentation and x-flips
    ('40x40', 1, ['--augment=0']),                    # grey, square but not a power of two
], ids=['48x32-rgb', '40x40-grey'])
def test_any_shape_end_to_end(tmp_path, detector, size, channels, extra):
    width, height = map(int, size.split('x'))
    data = tmp_path / f'shapes-{size}.zip'
    invoke(dataset_tool.cli, ['--source=demo:shapes:12', f'--dest={data}', f'--resolution={size}',
                              f'--channels={channels}'])
    dataset = ImageFolderDataset(str(data))
    assert dataset.image_shape == [channels, height, width]

    # Train 100 images, then the same command for 200: the run continues, bit-exact with 200 from the start.
    extended, straight = tmp_path / 'extended', tmp_path / 'straight'
    output = invoke(train.main, train_args(extended, data, 0.0001, *extra))
    assert 'patches' in output
    output = invoke(train.main, train_args(extended, data, 0.0002, *extra))
    assert 'Resuming run' in output and '--duration 0.0002 != 0.0001' in output
    invoke(train.main, train_args(straight, data, 0.0002, *extra))
    [run_dir] = glob.glob(str(extended / '0*'))
    a = runs.load_state(runs.find_latest_state(run_dir))
    b = runs.load_state(runs.find_latest_state(glob.glob(str(straight / '0*'))[0]))
    assert a['nimg'] == b['nimg'] >= 200
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    options = json.loads(open(os.path.join(run_dir, 'training_options.json')).read())
    assert options['dataset_kwargs']['resolution'] == (height if height == width else [height, width])
    with PIL.Image.open(latest(run_dir, 'samples-*.png')) as grid:
        assert grid.size == (2 * width, 2 * height)

    # Generate: the training shape by default, per-seed determinism, a rectangular region.
    snapshot = latest(run_dir, 'network-snapshot-*.pkl')
    out = tmp_path / 'out'
    invoke(generate.cli, [f'--network={snapshot}', f'--outdir={out}', '--seeds=0-3', '--steps=4', '--device=cpu'])
    images = [PIL.Image.open(out / f'{seed:06d}.png') for seed in range(4)]
    assert all(image.size == (width, height) for image in images)
    assert images[0].mode == ('RGB' if channels == 3 else 'L')
    alone = tmp_path / 'alone'
    invoke(generate.cli, [f'--network={snapshot}', f'--outdir={alone}', '--seeds=2', '--batch=1', '--steps=4',
                          '--device=cpu'])
    assert np.array_equal(np.asarray(images[2]), np.asarray(PIL.Image.open(alone / '000002.png')))
    region = tmp_path / 'region'
    invoke(generate.cli, [f'--network={snapshot}', f'--outdir={region}', '--seeds=0', '--steps=4', '--device=cpu',
                          f'--image_size={width + 16}x{height}', '--x_start=8'])
    assert PIL.Image.open(region / '000000.png').size == (width + 16, height)

    # FID of the generated images against the dataset (the detector takes any shape, as EDM's resizes).
    ref = tmp_path / 'ref.npz'
    invoke(fid.main, ['ref', f'--data={data}', f'--dest={ref}', f'--detector={detector}', '--device=cpu',
                      '--workers=0'])
    output = invoke(fid.main, ['calc', f'--images={out}', f'--ref={ref}', f'--detector={detector}', '--num=4',
                               '--device=cpu', '--workers=0'])
    assert math.isfinite(float(output.strip().splitlines()[-1].split()[-1]))


def test_progressive_and_label_dropout_on_rectangles(tmp_path):
    data = tmp_path / 'shapes.zip'
    invoke(dataset_tool.cli, ['--source=demo:shapes:8', f'--dest={data}', '--resolution=64x32'])
    output = invoke(train.main, train_args(tmp_path / 'runs', data, 0.0001, '--progressive=1', '--cond=1',
                                           '--label-dropout=0.1', '--augment=0'))
    assert '64x32:' in output and '32x16:' in output   # the tick line counts rectangles by WxH


def test_transfer_between_square_and_rectangular_runs(tmp_path):
    square, wide = tmp_path / 'square.zip', tmp_path / 'wide.zip'
    invoke(dataset_tool.cli, ['--source=demo:shapes:8', f'--dest={square}', '--resolution=32x32'])
    invoke(dataset_tool.cli, ['--source=demo:shapes:8', f'--dest={wide}', '--resolution=48x32'])
    invoke(train.main, train_args(tmp_path / 'a', square, 0.00005, '--augment=0', '--samples=0'))
    snapshot = latest(glob.glob(str(tmp_path / 'a' / '0*'))[0], 'network-snapshot-*.pkl')
    output = invoke(train.main, train_args(tmp_path / 'b', wide, 0.00005, '--augment=0', '--samples=0',
                                           f'--transfer={snapshot}'))
    assert 'Transferred' in output and 'kept their initialisation' not in output
    back = latest(glob.glob(str(tmp_path / 'b' / '0*'))[0], 'network-snapshot-*.pkl')
    output = invoke(train.main, train_args(tmp_path / 'c', square, 0.00005, '--augment=0', '--samples=0',
                                           f'--transfer={back}'))
    assert 'Transferred' in output and 'kept their initialisation' not in output


def test_train_refuses_a_shape_the_network_cannot_take(tmp_path):
    data = tmp_path / 'odd.zip'
    invoke(dataset_tool.cli, ['--source=demo:shapes:4', f'--dest={data}', '--resolution=50x40'])
    result = CliRunner().invoke(train.main, train_args(tmp_path / 'runs', data, 0.0001, '--augment=0'))
    assert result.exit_code != 0
    assert '50x40 pixels' in result.output and '48x40 and 52x40' in result.output
    assert 'Traceback' not in result.output
    assert not glob.glob(str(tmp_path / 'runs' / '0*'))   # refused before a run folder exists


# ----------------------------------------------------------------------------
# dataset_tool.


def test_dataset_tool_crops_to_the_aspect_and_refuses_a_mismatch(tmp_path):
    source = tmp_path / 'src'
    source.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((60, 100, 3), 40 * i, dtype=np.uint8)).save(source / f'{i}.png')
    cropped = tmp_path / 'cropped.zip'
    invoke(dataset_tool.cli, [f'--source={source}', f'--dest={cropped}', '--resolution=48x32',
                              '--transform=center-crop'])
    assert ImageFolderDataset(str(cropped)).image_shape == [3, 32, 48]
    result = CliRunner().invoke(dataset_tool.cli, [f'--source={source}', f'--dest={tmp_path / "bad.zip"}',
                                                   '--resolution=48x32'])
    assert result.exit_code != 0 and 'not of the aspect of --resolution=48x32' in result.output
    assert not os.path.exists(tmp_path / 'bad.zip')
    kept = tmp_path / 'kept.zip'
    invoke(dataset_tool.cli, [f'--source={source}', f'--dest={kept}'])   # no --resolution: the input size
    assert ImageFolderDataset(str(kept)).image_shape == [3, 60, 100]


def test_center_crop_cuts_the_largest_centred_region_of_the_aspect():
    from dataset_prep.archive import center_crop
    image = np.zeros((60, 100, 3), dtype=np.uint8)
    image[:, 10:90] = 255                       # the centred 80 columns are white
    out = center_crop(image, 48, 36)            # aspect 4:3 of a 100x60 source: 80x60, columns 10..89
    assert out.shape == (36, 48, 3) and out.min() == 255
    tall = np.zeros((100, 60, 3), dtype=np.uint8)
    tall[20:80] = 255                           # a 1:1 crop keeps rows 20..79 (EDM's centred square)
    assert center_crop(tall, 32, 32).min() == 255


# ----------------------------------------------------------------------------
# Latent space: 64x32 pixels -> 32x16 latents with a tiny VAE (factor 2).


def test_latent_training_on_rectangles(tmp_path):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                                  up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(32, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32)
    vae_dir = str(tmp_path / 'vae')
    vae.save_pretrained(vae_dir)
    images, encoded = tmp_path / 'wide.zip', tmp_path / 'wide-latents.zip'
    invoke(dataset_tool.cli, ['--source=demo:shapes:6', f'--dest={images}', '--resolution=64x32'])
    invoke(dataset_tool.cli, ['encode', f'--source={images}', f'--dest={encoded}', f'--vae={vae_dir}',
                              '--device=cpu'])
    from training.dataset import LatentDataset
    latents = LatentDataset(str(encoded))
    assert latents.image_shape == [4, 16, 32] and latents.image_resolution == [32, 64]

    outdir = tmp_path / 'runs'
    tiny_adm = ['--arch=adm', '--cbase=16', '--cres=1,2', '--blocks=1', '--attn=8', '--workers=0', '--device=cpu']
    args = [f'--outdir={outdir}', f'--data={encoded}', '--batch=4', '--duration=0.00005', '--tick=0.05',
            '--real_p=0.5', '--samples=2', '--augment=0', '--seed=0', *tiny_adm]
    output = invoke(train.main, args)
    assert '16x8:' in output                         # latent patches of half the size
    snapshot = latest(glob.glob(str(outdir / '0*'))[0], 'network-snapshot-*.pkl')
    with open(snapshot, 'rb') as f:
        data = pickle.load(f)
    assert data['ema'].img_shape == (16, 32) and data['latent']['image_resolution'] == [32, 64]
    out = tmp_path / 'out'
    invoke(generate.cli, [f'--network={snapshot}', f'--outdir={out}', '--seeds=0-1', '--steps=2', '--device=cpu'])
    assert PIL.Image.open(out / '000000.png').size == (64, 32)

    # On the fly from the pixels: the same latent shape.
    output = invoke(train.main, [f'--outdir={tmp_path / "online"}', f'--data={images}', '--train_on_latents=1',
                                 f'--vae={vae_dir}', '--batch=4', '--duration=0.00002', '--tick=0.05',
                                 '--real_p=0.5', '--samples=0', '--augment=0', *tiny_adm])
    assert '16x8:' in output


def test_sizes_are_written_width_first():
    from dnnlib.util import Size, parse_size
    assert parse_size('96x64') == (96, 64) and parse_size('48') == (48, 48) and parse_size(' 8 , 4 ') == (8, 4)
    for bad in ('96x', 'x64', '-4', 'ax4', '0x4'):
        with pytest.raises(ValueError, match='width'):
            parse_size(bad)
    assert Size().convert('96x64', None, None) == (64, 96)   # tensors' order: (height, width)
