"""Latent Patch Diffusion: the VAE wrappers of training/latents.py,
`dataset_tool.py encode`, LatentDataset, the two ways training gets latents,
and generation that decodes latents (with classifier-free guidance). A tiny
AutoencoderKL (2 blocks: 16x16 images -> 4 x 8 x 8 latents) stands in for
the Stable Diffusion VAE; tests that need diffusers skip without it."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
from dataset_prep import demo_data
from dataset_prep.archive import convert_dataset
from training import denoiser, generation, image_io, latents, networks, samplers, snapshots
from training.dataset import ImageFolderDataset, LatentDataset, is_latent_archive

COUNT = 6          # images in the test dataset
RES = 16           # their resolution
LATENT_RES = 8     # the tiny VAE downsamples by 2
SCALE = 0.5        # a scale factor other than the default, to see it carried through


def _tiny_vae(blocks=2, seed=0):
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * blocks,
                                   up_block_types=('UpDecoderBlock2D',) * blocks, block_out_channels=(32,) * blocks,
                                   layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=RES)


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    """A tiny AutoencoderKL saved with save_pretrained."""
    folder = tmp_path_factory.mktemp('vae')
    _tiny_vae().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def vae(vae_dir):
    return latents.load_vae(vae_dir)


@pytest.fixture(scope='module')
def images_zip(tmp_path_factory):
    """COUNT labelled demo:shapes images at RES x RES."""
    path = str(tmp_path_factory.mktemp('data') / f'shapes-{RES}x{RES}.zip')
    convert_dataset(f'demo:shapes:{COUNT}', path, resolution=(RES, RES))
    return path


@pytest.fixture(scope='module')
def latents_zip(tmp_path_factory, images_zip, vae_dir):
    """images_zip encoded with x-flips, 4 images per VAE call (the last batch is partial)."""
    path = str(tmp_path_factory.mktemp('latents') / 'shapes-latents.zip')
    result = _run_tool('encode', f'--source={images_zip}', f'--dest={path}', f'--vae={vae_dir}', '--xflip=1',
                       '--batch=4', f'--scale-factor={SCALE}', '--device=cpu')
    assert result.exit_code == 0, result.output
    return path


def _run_tool(*args):
    return CliRunner().invoke(dataset_tool.cli, [str(a) for a in args])


def _source_images():
    """uint8 [COUNT, 3, RES, RES] and int labels of the demo images."""
    pairs = [demo_data.make_shape_image(i, RES) for i in range(COUNT)]
    return torch.from_numpy(np.stack([image for image, _ in pairs])).permute(0, 3, 1, 2), [l for _, l in pairs]


def _direct_posterior(vae, images):
    """(mean, std) straight from diffusers, for images uint8 [N, 3, H, W]."""
    with torch.no_grad():
        posterior = vae.encode(images.float() / 127.5 - 1).latent_dist
    return posterior.mean, posterior.std


def _assert_one_line_error(result, *needles):
    assert result.exit_code == 1, result.output
    assert 'Traceback' not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]   # after progress bars
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


# ----------------------------------------------------------------------------
# The VAE wrappers.

def test_encode_and_decode_match_the_vae(vae, vae_dir):
    images, _ = _source_images()
    mean, std = latents.encode_images(vae, images)
    assert mean.shape == std.shape == (COUNT, 4, LATENT_RES, LATENT_RES) and mean.dtype == torch.float32
    direct_mean, direct_std = _direct_posterior(vae, images)
    torch.testing.assert_close(mean, direct_mean)
    torch.testing.assert_close(std, direct_std)
    assert (std > 0).all()

    z = torch.randn(2, 4, LATENT_RES, LATENT_RES)
    decoded = latents.decode_latents(vae, z.double(), SCALE)
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 3, RES, RES)
    with torch.no_grad():
        expected = image_io.to_uint8(vae.decode(z / SCALE).sample)
    assert torch.equal(decoded, expected)
    assert latents.load_vae(vae_dir) is latents.load_vae(vae_dir)   # one load per process and device


def test_downsampling_factor_comes_from_the_vae_config():
    vae = _tiny_vae(blocks=3).eval()
    assert latents.downsampling_factor(vae) == 4
    mean, _ = latents.encode_images(vae, torch.zeros(1, 3, RES, RES, dtype=torch.uint8))
    assert mean.shape == (1, 4, RES // 4, RES // 4)
    with pytest.raises(ValueError, match='multiples of 4'):
        latents.encode_images(vae, torch.zeros(1, 3, 18, 18, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r'uint8 images \[N, 3, H, W\]'):
        latents.encode_images(vae, torch.zeros(1, 3, RES, RES))


def test_draw_latents_is_scaled_posterior_sample():
    mean, std = torch.randn(3, 4, 2, 2), torch.rand(3, 4, 2, 2)
    gen = torch.Generator().manual_seed(5)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents.draw_latents(mean, std, SCALE, gen), SCALE * (mean + std * eps))
    torch.manual_seed(7)
    first = latents.draw_latents(mean, std, SCALE)
    torch.manual_seed(7)
    assert torch.equal(latents.draw_latents(mean, std, SCALE), first)


# ----------------------------------------------------------------------------
# dataset_tool.py encode and LatentDataset.

def test_encode_writes_posterior_stats_flips_labels_and_metadata(latents_zip, vae, vae_dir):
    images, labels = _source_images()
    with zipfile.ZipFile(latents_zip) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith('.npy'))
        stats = np.stack([np.load(archive.open(n)) for n in names])
        meta = json.loads(archive.read('latents.json'))
        dataset_json = json.loads(archive.read('dataset.json'))
    assert names == [f'00000/img{i:08d}.npy' for i in range(COUNT)]
    assert stats.dtype == np.float32 and stats.shape == (COUNT, 2, 2, 4, LATENT_RES, LATENT_RES)
    for variant, batch in enumerate([images, images.flip(3)]):
        mean, std = _direct_posterior(vae, batch)
        np.testing.assert_allclose(stats[:, variant, 0], mean.numpy(), atol=1e-5)
        np.testing.assert_allclose(stats[:, variant, 1], std.numpy(), atol=1e-5)
    assert not np.allclose(stats[:, 0], stats[:, 1])   # a flipped image's latent is no flipped latent
    assert dataset_json == {'labels': [[name, label] for name, label in zip(names, labels)]}
    assert meta == dict(format='patch-diffusion-latents-v1', vae=vae_dir, scale_factor=SCALE, latent_channels=4,
                        latent_resolution=LATENT_RES, source_resolution=RES, xflip=True, count=COUNT,
                        latent_shape=[LATENT_RES, LATENT_RES], source_shape=[RES, RES])


def test_encode_without_flips_to_a_folder_and_refuses_an_existing_dest(images_zip, vae_dir, tmp_path):
    dest = tmp_path / 'latents'
    args = ['encode', f'--source={images_zip}', f'--dest={dest}', f'--vae={vae_dir}', '--max-images=3']
    result = _run_tool(*args)
    assert result.exit_code == 0, result.output
    assert np.load(dest / '00000' / 'img00000002.npy').shape == (1, 2, 4, LATENT_RES, LATENT_RES)
    meta = json.loads((dest / 'latents.json').read_text())
    assert meta['xflip'] is False and meta['count'] == 3 and meta['scale_factor'] == latents.DEFAULT_SCALE_FACTOR
    ds = LatentDataset(dest)
    assert len(ds) == 3 and not ds.has_labels
    with pytest.raises(ValueError, match='--xflip=1'):
        LatentDataset(dest, xflip=True)
    _assert_one_line_error(_run_tool(*args), 'already exists')


def test_latent_dataset_items_and_properties(latents_zip, vae_dir, images_zip):
    with zipfile.ZipFile(latents_zip) as archive:
        stats = [np.load(archive.open(f'00000/img{i:08d}.npy')) for i in range(COUNT)]
    ds = LatentDataset(latents_zip, use_labels=True, xflip=True)
    assert len(ds) == 2 * COUNT and ds.is_latent and not ImageFolderDataset(images_zip).is_latent
    assert (ds.resolution, ds.num_channels, ds.image_shape) == (LATENT_RES, 4, [4, LATENT_RES, LATENT_RES])
    assert (ds.vae, ds.scale_factor, ds.image_resolution) == (vae_dir, SCALE, RES)
    assert ds.has_labels and ds.label_dim == len(demo_data.SHAPE_NAMES)
    _, labels = _source_images()
    for idx in (0, 4, COUNT, COUNT + 4):
        item, onehot = ds[idx]
        assert item.dtype == np.float32 and item.shape == (2, 4, LATENT_RES, LATENT_RES)
        assert np.array_equal(item, stats[idx % COUNT][idx // COUNT])
        assert onehot.argmax() == labels[idx % COUNT]
    batch, _ = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert batch.shape == (3, 2, 4, LATENT_RES, LATENT_RES)

    subset = LatentDataset(latents_zip, max_size=4, random_seed=1)
    assert len(subset) == 4 and len(set(subset._raw_idx.tolist())) == 4
    with pytest.raises(ValueError, match='not 16x16'):
        LatentDataset(latents_zip, resolution=16)
    assert is_latent_archive(latents_zip) and not is_latent_archive(images_zip)
    with pytest.raises(ValueError, match='no encoded latents'):
        LatentDataset(images_zip)
    with pytest.raises(ValueError, match='no images found'):
        ImageFolderDataset(latents_zip)


# ----------------------------------------------------------------------------
# Training batches -> latents.

def test_pre_encoded_latents_draw_from_the_archive_stats(latents_zip, vae_dir):
    ds = LatentDataset(latents_zip)
    encoder = latents.latent_encoder(ds, {})
    assert isinstance(encoder, latents.PreEncodedLatents)
    assert encoder.info == dict(vae=vae_dir, scale_factor=SCALE, image_resolution=RES, latent_channels=4,
                                latent_resolution=LATENT_RES)
    json.dumps(encoder.info)   # plain data for the snapshot, no VAE inside
    stats = torch.stack([torch.from_numpy(ds[i][0]) for i in range(3)])
    torch.manual_seed(3)
    drawn = encoder(stats)
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, SCALE * (stats[:, 0] + stats[:, 1] * torch.randn(3, 4, LATENT_RES, LATENT_RES)))
    with pytest.raises(ValueError, match='contradicts the dataset'):
        latents.latent_encoder(ds, dict(vae='other/vae'))


def test_online_encoder_equals_pre_encoded_path(images_zip, latents_zip, vae_dir, capsys):
    pixels = ImageFolderDataset(images_zip)
    assert latents.latent_encoder(pixels) is None
    encoder = latents.latent_encoder(pixels, dict(vae=vae_dir, scale_factor=SCALE))
    assert isinstance(encoder, latents.OnlineEncoder)
    assert 'dataset_tool.py encode' in capsys.readouterr().out
    assert encoder.info == latents.PreEncodedLatents(LatentDataset(latents_zip)).info
    images = torch.from_numpy(np.stack([pixels[i][0] for i in range(4)]))
    stats = torch.stack([torch.from_numpy(LatentDataset(latents_zip)[i][0]) for i in range(4)])
    torch.manual_seed(11)
    online = encoder(images)
    torch.manual_seed(11)
    torch.testing.assert_close(online, latents.PreEncodedLatents(LatentDataset(latents_zip))(stats), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# Generation.

def _latent_net(label_dim=0, seed=0):
    """A tiny EDMPrecond over 4 x 8 x 8 latents with coordinate channels, weights
    randomised (the zero-initialised output layer would make every net alike)."""
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=LATENT_RES, img_channels=4, label_dim=label_dim, use_pos=True,
                              model_type='DhariwalUNet', model_channels=16, channel_mult=[1, 1], num_blocks=1,
                              attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.1)
    return net.eval().requires_grad_(False)


def _write_snapshot(path, net, latent):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, latent=latent,
                         dataset_kwargs=dict(class_name='training.dataset.LatentDataset', path='latents.zip')), f)
    return path


def _expected_images(net, vae, seeds, class_idx=None, cfg=1.0, **sampler_kwargs):
    """generate_images's decoded images, composed by hand from the sampler and the VAE."""
    rnd = generation.StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([len(seeds), 4, LATENT_RES, LATENT_RES])
    labels = generation.random_class_labels(rnd, net.label_dim, len(seeds), class_idx)
    samples = samplers.edm_sampler(denoiser.make_denoiser(net, labels, cfg), noise, rnd.randn_like, **sampler_kwargs)
    return latents.decode_latents(vae, samples, SCALE)


def _pngs(outdir, seeds):
    arrays = []
    for seed in seeds:
        with PIL.Image.open(outdir / f'{seed:06d}.png') as image:
            assert image.mode == 'RGB'
            arrays.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    return torch.stack(arrays)


def test_generate_decodes_a_latent_snapshot(vae, vae_dir, tmp_path):
    net = _latent_net()
    latent = dict(latents.latent_info(vae_dir, SCALE, RES, 4, LATENT_RES))
    snapshot = _write_snapshot(tmp_path / 'latent.pkl', net, latent)
    result = CliRunner().invoke(generate.main, [f'--network={snapshot}', f'--outdir={tmp_path / "out"}',
                                                '--seeds=0-1', '--steps=2', '--device=cpu'])
    assert result.exit_code == 0, result.output
    written = _pngs(tmp_path / 'out', range(2))
    assert written.shape == (2, 3, RES, RES)
    assert torch.equal(written, _expected_images(net, vae, [0, 1], num_steps=2))
    assert not torch.equal(written[0], written[1])


def test_cfg_on_a_conditional_latent_model(vae, vae_dir, tmp_path):
    net = _latent_net(label_dim=3, seed=1)
    latent = latents.latent_info(vae_dir, SCALE, RES, 4, LATENT_RES)
    seeds = [0, 1]

    def images(cfg):
        return torch.cat([batch for _, batch in generation.generate_images(net, seeds, class_idx=2, cfg=cfg,
                                                                         latent=latent, num_steps=2)])
    guided = images(1.5)
    assert guided.shape == (2, 3, RES, RES)
    assert torch.equal(guided, _expected_images(net, vae, seeds, class_idx=2, cfg=1.5, num_steps=2))
    assert not torch.equal(guided, images(1.0))

    snapshot = _write_snapshot(tmp_path / 'cond.pkl', net, dict(latent))
    result = CliRunner().invoke(generate.main, [f'--network={snapshot}', f'--outdir={tmp_path / "out"}',
                                                '--seeds=0-1', '--steps=2', '--class=2', '--cfg=1.5', '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert torch.equal(_pngs(tmp_path / 'out', seeds), guided)


def test_official_latent_pickle_needs_on_latents(vae, vae_dir, tmp_path, repo_root, subprocess_env, python_exe):
    # Written by a subprocess: this process must load it from its embedded source, as other tests check.
    snapshot = tmp_path / 'official.pkl'
    subprocess_env['PYTHONPATH'] += os.pathsep + str(repo_root / 'tests' / 'fixtures')
    write = (f'import official_style_net; official_style_net.write_snapshot({str(snapshot)!r}, '
             f'img_resolution={LATENT_RES}, img_channels=6)')   # 4 latent + 2 coordinate channels
    subprocess.run([python_exe, '-c', write], check=True, env=subprocess_env, cwd=repo_root, timeout=120)
    args = [f'--network={snapshot}', '--seeds=0-1', '--steps=2', '--device=cpu']

    _assert_one_line_error(CliRunner().invoke(generate.main, [*args, f'--outdir={tmp_path / "a"}']),
                           '4-channel samples', '--on_latents=1')
    result = CliRunner().invoke(generate.main, [*args, f'--outdir={tmp_path / "b"}', '--on_latents=1',
                                                f'--vae={vae_dir}', f'--scale_factor={SCALE}'])
    assert result.exit_code == 0, result.output
    net, _ = snapshots.load_network(snapshot)
    assert torch.equal(_pngs(tmp_path / 'b', [0, 1]), _expected_images(net, vae, [0, 1], num_steps=2))


def test_generation_latent_settings():
    recorded = dict(vae='org/vae', scale_factor=0.2, image_resolution=256)
    assert latents.generation_latent(None) is None
    assert latents.generation_latent(recorded) == recorded
    assert latents.generation_latent(recorded, vae='/vaes/local') == dict(recorded, vae='/vaes/local')
    assert latents.generation_latent(None, on_latents=True) == dict(vae=latents.DEFAULT_VAE,
                                                                    scale_factor=latents.DEFAULT_SCALE_FACTOR)
    assert latents.DEFAULT_VAE == 'stabilityai/sd-vae-ft-ema'
    with pytest.raises(ValueError, match='leave --on_latents out'):
        latents.generation_latent(recorded, on_latents=False)
    with pytest.raises(ValueError, match='latent models only'):
        latents.generation_latent(None, vae='org/vae')


# ----------------------------------------------------------------------------
# Errors.

def test_missing_vae_folder_and_mismatched_vae(vae_dir, images_zip, tmp_path):
    missing = tmp_path / 'no-vae'
    with pytest.raises(ValueError, match='VAE folder .* does not exist'):
        latents.load_vae(missing)
    dest = tmp_path / 'out.zip'
    _assert_one_line_error(_run_tool('encode', f'--source={images_zip}', f'--dest={dest}', f'--vae={missing}'),
                           'does not exist')
    assert not dest.exists() and os.listdir(tmp_path) == []
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(ValueError, match='Cannot load the VAE from folder'):
        latents.load_vae(empty)

    snapshot = _write_snapshot(tmp_path / 'latent.pkl', _latent_net(),
                               dict(latents.latent_info(missing, SCALE, RES, 4, LATENT_RES)))
    result = CliRunner().invoke(generate.main, [f'--network={snapshot}', f'--outdir={tmp_path / "gen"}',
                                                '--seeds=0', '--device=cpu'])
    _assert_one_line_error(result, 'does not exist')
    pixel_net = networks.EDMPrecond(img_resolution=LATENT_RES, img_channels=3, model_type='DhariwalUNet',
                                    model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(ValueError, match='3-channel samples'):
        generation.generate_images(pixel_net, [0], latent=dict(vae=vae_dir, scale_factor=SCALE))
    gray = tmp_path / 'gray'
    for i in range(2):
        os.makedirs(gray / '00000', exist_ok=True)
        PIL.Image.fromarray(np.full((RES, RES), 40 * i, np.uint8)).save(gray / '00000' / f'img{i:08d}.png')
    _assert_one_line_error(_run_tool('encode', f'--source={gray}', f'--dest={tmp_path / "g.zip"}', f'--vae={vae_dir}'),
                           '1-channel', 'RGB')


def test_missing_diffusers_says_how_to_install(images_zip, tmp_path, monkeypatch):
    vae_dir = tmp_path / 'vae'   # an existing folder: the import fails first
    vae_dir.mkdir()
    latents._load_vae.cache_clear()
    monkeypatch.setitem(sys.modules, 'diffusers', None)
    with pytest.raises(ValueError, match=r'pip install -e "\.\[latent\]"'):
        latents.load_vae(vae_dir)
    dest = tmp_path / 'x.zip'
    _assert_one_line_error(_run_tool('encode', f'--source={images_zip}', f'--dest={dest}', f'--vae={vae_dir}'),
                           'diffusers', 'pip install -e ".[latent]"')
    assert not dest.exists()
    with pytest.raises(ValueError, match='diffusers'):
        latents.OnlineEncoder(ImageFolderDataset(images_zip), vae=vae_dir)
