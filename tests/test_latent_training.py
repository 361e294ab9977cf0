"""Latent Patch Diffusion end to end: encode once, train on latents (pre-encoded
and on the fly), generate decoded images, with a tiny VAE built from a config."""

import glob
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
import train
from dataset_prep.archive import convert_dataset

diffusers = pytest.importorskip('diffusers')

RES = 32            # images; the tiny VAE halves it: latents are 4 x 16 x 16, patches {8, 16}
TINY_ADM = ['--arch=adm', '--cbase=16', '--cres=1,2', '--blocks=1', '--attn=8']


@pytest.fixture(scope='module')
def vae_dir(tmp_path_factory):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                                  up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(32, 32),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=RES)
    folder = tmp_path_factory.mktemp('vae')
    vae.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope='module')
def images_zip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'shapes-32x32.zip')
    convert_dataset('demo:shapes:8', path, resolution=(RES, RES))
    return path


@pytest.fixture(scope='module')
def latents_zip(tmp_path_factory, images_zip, vae_dir):
    path = str(tmp_path_factory.mktemp('latents') / 'shapes-latents.zip')
    result = CliRunner().invoke(dataset_tool.cli, ['encode', f'--source={images_zip}', f'--dest={path}',
                                                   f'--vae={vae_dir}', '--device=cpu'])
    assert result.exit_code == 0, result.output
    return path


def _train(outdir, data, *flags):
    args = [f'--outdir={outdir}', f'--data={data}', '--duration=0.0001', '--tick=0.05', '--batch=4',
            '--workers=0', '--device=cpu', '--seed=0', '--samples=4', *flags]
    result = CliRunner().invoke(train.main, args)
    assert result.exit_code == 0, result.output
    [run_dir] = glob.glob(os.path.join(outdir, '0*'))
    return run_dir


def _snapshot(run_dir):
    path = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')))[-1]
    with open(path, 'rb') as f:
        return path, pickle.load(f)


def test_official_lsun_command_scaled_down_on_a_pre_encoded_dataset(tmp_path, latents_zip, vae_dir):
    # The official README's LSUN command, flags as written, scaled down (+ a tiny ADM).
    run_dir = _train(tmp_path / 'runs', latents_zip, '--cond=0', '--train_on_latents=1', '--batch-gpu=2',
                     '--lr=1e-4', '--ema=50', '--dropout=0.10', '--fp16=1', '--ls=100', '--augment=0',
                     '--real_p=0.5', *TINY_ADM)
    options = json.load(open(os.path.join(run_dir, 'training_options.json')))
    assert options['dataset_kwargs']['class_name'] == 'training.dataset.LatentDataset'
    assert options['latent_kwargs'] is not None
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'patches 8:' in log and '16:' in log          # latent sizes {R/2, R} at R = 16
    assert 'Note: --fp16=1 has no effect on cpu' in log and '-fp32-' in os.path.basename(run_dir)   # says what ran
    path, data = _snapshot(run_dir)
    assert data['latent']['vae'] == vae_dir and data['latent']['latent_resolution'] == 16
    assert data['ema'].img_channels == 4 and data['ema'].img_resolution == 16
    assert not any(isinstance(v, torch.nn.Module) and v is not data['ema'] for v in data.values())  # no VAE inside
    samples = sorted(glob.glob(os.path.join(run_dir, 'samples-*.png')))
    assert samples and PIL.Image.open(samples[-1]).size == (2 * RES, 2 * RES)   # 2x2 decoded RGB images

    # generate.py decodes with the VAE the snapshot names: no extra flag.
    out = tmp_path / 'out'
    result = CliRunner().invoke(generate.main, [f'--network={path}', f'--outdir={out}', '--seeds=0-1',
                                                '--steps=4', '--device=cpu'])
    assert result.exit_code == 0, result.output
    image = np.asarray(PIL.Image.open(out / '000000.png'))
    assert image.shape == (RES, RES, 3)


def test_on_the_fly_encoding_of_raw_images_with_cfg(tmp_path, images_zip, vae_dir):
    # The official ImageNet command's shape: conditional, latents, label dropout for --cfg.
    run_dir = _train(tmp_path / 'runs', images_zip, '--cond=1', '--train_on_latents=1', f'--vae={vae_dir}',
                     '--label-dropout=0.1', '--augment=0', '--real_p=0.5', *TINY_ADM)
    log = open(os.path.join(run_dir, 'log.txt')).read()
    assert 'Encoding the dataset once is faster' in log
    path, data = _snapshot(run_dir)
    assert data['ema'].label_dim == 5 and data['latent']['image_resolution'] == RES
    out = tmp_path / 'out'
    result = CliRunner().invoke(generate.main, [f'--network={path}', f'--outdir={out}', '--seeds=0-1', '--steps=3',
                                                '--class=2', '--cfg=1.5', '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert np.asarray(PIL.Image.open(out / '000001.png')).shape == (RES, RES, 3)


def test_latent_errors_are_clear(tmp_path, latents_zip, vae_dir):
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={latents_zip}', '--augment=0.12',
                                             '--device=cpu', '--dry-run'])
    assert result.exit_code != 0 and 'augment' in result.output and 'Traceback' not in result.output
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={latents_zip}', '--augment=0',
                                             f'--vae={vae_dir}', '--device=cpu', '--dry-run'])
    assert result.exit_code != 0 and '--vae' in result.output
