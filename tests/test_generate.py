"""Tests of generate.py: output files, subfolders, grid, ablation flags, one
process against two under torchrun, regions of the coordinate frame and the
official --mask_pos/--embed_fq, and one-line errors for bad input."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import fid
import generate
import test_latents
from training import architectures, denoiser, generation, image_io, latents, samplers, snapshots

FIXTURES = 'tests/fixtures'


@pytest.fixture(scope='module')
def foreign_pickles(tmp_path_factory, repo_root):
    """The pickles of tests/fixtures/write_snapshots.py, written by a subprocess."""
    folder = tmp_path_factory.mktemp('snapshots')
    env = dict(PYTHONPATH=f'{repo_root}:{repo_root / FIXTURES}', OMP_NUM_THREADS='1', PATH='/usr/bin:/bin')
    subprocess.run([sys.executable, f'{FIXTURES}/write_snapshots.py', str(folder)], check=True, env=env, cwd=repo_root)
    return folder


def _run(*args):
    return CliRunner().invoke(generate.main, ['--device=cpu', *map(str, args)])


def _pixels(path):
    with PIL.Image.open(path) as image:
        return image.mode, np.asarray(image)


def _outputs(outdir):
    """{relative path: (mode, pixels)} of every PNG under outdir."""
    return {str(p.relative_to(outdir)): _pixels(p) for p in sorted(outdir.rglob('*.png'))}


def test_writes_one_png_per_seed_rgb_and_gray(foreign_pickles, tmp_path):
    for name, mode in (('edm_cond.pkl', 'RGB'), ('edm_gray.pkl', 'L'), ('official.pkl', 'RGB')):
        outdir = tmp_path / name
        result = _run(f'--network={foreign_pickles / name}', f'--outdir={outdir}', '--seeds=3,5-6', '--steps=4')
        assert result.exit_code == 0, result.output
        outputs = _outputs(outdir)
        assert sorted(outputs) == ['000003.png', '000005.png', '000006.png']
        assert {m for m, _ in outputs.values()} == {mode}
        assert all(pixels.shape[:2] == (8, 8) for _, pixels in outputs.values())
        assert not np.array_equal(outputs['000003.png'][1], outputs['000005.png'][1])


def test_images_equal_generate_images(foreign_pickles, tmp_path):
    """The CLI writes what the importable generate_images returns, for EDM's and the ablation sampler."""
    net, _ = snapshots.load_network(foreign_pickles / 'edm_cond.pkl')
    for flags, kwargs in (([], {}), (['--solver=euler', '--disc=vp', '--schedule=vp', '--scaling=vp'],
                                     dict(solver='euler', discretization='vp', schedule='vp', scaling='vp'))):
        outdir = tmp_path / str(len(flags))
        result = _run(f'--network={foreign_pickles / "edm_cond.pkl"}', f'--outdir={outdir}', '--seeds=0-2', '--steps=5',
                      '--class=1', '--cfg=1.5', '--S_churn=5', *flags)
        assert result.exit_code == 0, result.output
        expected = torch.cat([images for _, images in generation.generate_images(
            net, [0, 1, 2], class_idx=1, cfg=1.5, num_steps=5, S_churn=5, **kwargs)])
        for seed in range(3):
            assert np.array_equal(_pixels(outdir / f'{seed:06d}.png')[1], expected[seed].permute(1, 2, 0).numpy())
    assert not np.array_equal(_pixels(tmp_path / '0' / '000000.png')[1], _pixels(tmp_path / '4' / '000000.png')[1])


def test_subdirs_and_grid(foreign_pickles, tmp_path):
    result = _run(f'--network={foreign_pickles / "edm_gray.pkl"}', f'--outdir={tmp_path}', '--seeds=998-1001',
                  '--subdirs', '--grid', '--steps=3', '--batch=3')
    assert result.exit_code == 0, result.output
    outputs = _outputs(tmp_path)
    assert sorted(outputs) == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png']
    images = torch.stack([torch.from_numpy(outputs[name][1].copy())[None] for name in sorted(outputs)])
    grid = f'{tmp_path}-grid.png'   # beside the folder, which keeps one PNG per seed
    assert f'Grid: {grid}' in result.output
    assert np.array_equal(_pixels(grid)[1], image_io.image_grid(images)[0].numpy())


def test_one_process_equals_two_under_torchrun(foreign_pickles, tmp_path, subprocess_env, python_exe, repo_root):
    args = [f'--network={foreign_pickles / "edm_cond.pkl"}', '--seeds=0-4,998-1000', '--batch=2', '--steps=4',
            '--S_churn=10', '--cfg=1.3', '--subdirs', '--grid', '--device=cpu']
    single = _run(*args, f'--outdir={tmp_path / "one"}')
    assert single.exit_code == 0, single.output
    command = [python_exe, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py',
               *args, f'--outdir={tmp_path / "two"}']
    result = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _outputs(tmp_path / 'one'), _outputs(tmp_path / 'two')
    assert len(one) == 8 and sorted(one) == sorted(two)
    for name in one:
        assert one[name][0] == two[name][0] and np.array_equal(one[name][1], two[name][1]), name
    grids = [_pixels(tmp_path / f'{name}-grid.png') for name in ('one', 'two')]
    assert grids[0][0] == grids[1][0] and np.array_equal(grids[0][1], grids[1][1])


def test_region_flags_write_what_generate_images_returns(foreign_pickles, tmp_path):
    """--image_size, --x_start, --y_start, --resolution (underscores or dashes) reach generate_images."""
    net, _ = snapshots.load_network(foreign_pickles / 'official_embed.pkl')
    for flags in (['--image_size=4', '--x_start=10', '--y_start=3', '--resolution=16'],
                  ['--image-size=16', '--x-start=2', '--y-start=5', '--resolution=8']):
        outdir = tmp_path / flags[0]
        result = _run(f'--network={foreign_pickles / "official_embed.pkl"}', f'--outdir={outdir}', '--seeds=0-2',
                      '--steps=3', '--S_churn=5', *flags)
        assert result.exit_code == 0, result.output
        region = {flag.split('=')[0].lstrip('-').replace('-', '_'): int(flag.split('=')[1]) for flag in flags}
        expected = torch.cat([images for _, images in generation.generate_images(
            net, [0, 1, 2], num_steps=3, S_churn=5, **region)])
        assert expected.shape[-1] == region['image_size']
        for seed in range(3):
            assert np.array_equal(_pixels(outdir / f'{seed:06d}.png')[1], expected[seed].permute(1, 2, 0).numpy())


def test_official_flags_are_checked_and_said(foreign_pickles, tmp_path):
    """--mask_pos=1 on a network without coordinates and a matching --embed_fq change nothing, and say so."""
    for name, flags in (('official_nopos.pkl', ['--mask_pos=1', '--embed_fq=0']),
                        ('official_embed.pkl', ['--embed_fq=2']), ('edm_cond.pkl', ['--mask_pos=1'])):
        args = [f'--network={foreign_pickles / name}', '--seeds=0-1', '--steps=3']
        plain = _run(*args, f'--outdir={tmp_path / name / "plain"}')
        flagged = _run(*args, f'--outdir={tmp_path / name / "flagged"}', *flags)
        assert plain.exit_code == 0 and flagged.exit_code == 0, flagged.output
        notes = [line for line in flagged.output.splitlines() if line.startswith('--')]
        assert [note.split(':')[0] for note in notes] == flags, flagged.output
        plain_images, flagged_images = _outputs(tmp_path / name / 'plain'), _outputs(tmp_path / name / 'flagged')
        assert sorted(plain_images) == sorted(flagged_images) == ['000000.png', '000001.png']
        assert all(np.array_equal(plain_images[png][1], flagged_images[png][1]) for png in plain_images)


def test_a_latent_region_is_in_latent_pixels(tmp_path):
    """Region flags count latent pixels; the decoded images are the VAE's factor (2 here) times larger."""
    vae_dir = str(tmp_path / 'vae')
    test_latents._tiny_vae().save_pretrained(vae_dir)
    net = test_latents._latent_net()
    latent = latents.latent_info(vae_dir, test_latents.SCALE, test_latents.RES, 4, test_latents.LATENT_RES)
    snapshot = test_latents._write_snapshot(tmp_path / 'latent.pkl', net, dict(latent))
    vae = latents.load_vae(vae_dir)
    for size, x_start, y_start in ((4, 2, 4), (12, 0, 0)):
        outdir = tmp_path / f'out{size}'
        result = _run(f'--network={snapshot}', f'--outdir={outdir}', '--seeds=0-1', '--steps=2',
                      f'--image_size={size}', f'--x_start={x_start}', f'--y_start={y_start}')
        assert result.exit_code == 0, result.output
        rnd = generation.StackedRandomGenerator('cpu', [0, 1])
        region = dnnlib.EasyDict(top=y_start, left=x_start, frame=test_latents.LATENT_RES)
        samples = samplers.edm_sampler(denoiser.make_denoiser(net, region=region), rnd.randn([2, 4, size, size]),
                                       rnd.randn_like, num_steps=2)
        expected = latents.decode_latents(vae, samples, test_latents.SCALE)
        assert expected.shape == (2, 3, 2 * size, 2 * size)
        assert torch.equal(test_latents._pngs(outdir, [0, 1]), expected)


def _assert_one_line_error(result, match):
    assert result.exit_code == 1, result.output
    assert 'Traceback' not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and match in lines[0], result.stderr


def test_bad_inputs_give_one_line_errors(foreign_pickles, tmp_path, monkeypatch):
    monkeypatch.setattr(dnnlib.util, '_RETRY_DELAY_S', 0)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(b'garbage')
    cond, gray = foreign_pickles / 'edm_cond.pkl', foreign_pickles / 'edm_gray.pkl'
    cases = [
        ((cond, '--seeds=1-x'), '--seeds: Cannot parse'),
        ((cond, '--seeds=9-3'), 'runs backwards'),
        ((cond, '--class=3'), 'out of range'),
        ((gray, '--class=0'), 'unconditional'),
        ((gray, '--cfg=1.5'), 'unconditional'),
        ((gray, '--resolution=16'), 'contradicts'),
        ((tmp_path / 'missing.pkl',), 'Cannot open'),
        (('http://127.0.0.1:9/network.pkl',), 'Cannot open'),
        ((corrupt,), 'not a readable network pickle'),
    ]
    for (network, *flags), match in cases:
        result = _run(f'--network={network}', f'--outdir={tmp_path / "out"}', *flags)
        _assert_one_line_error(result, match)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('network, flags, match', [
    ('official', '--image_size=0', '--image_size=0 must be a positive integer'),
    ('official', '--resolution=8x0', '--resolution=8x0 must be a positive integer'),
    ('unet', '--image_size=8x7', 'the height must be a multiple of 2, such as 6 or 8'),
    ('official', '--x-start=-1', '--x_start=-1 must be a non-negative integer'),
    ('official', '--y_start=-2', '--y_start=-2 must be a non-negative integer'),
    ('official', '--resolution=1', 'needs 2 pixels or more'),
    ('edm_cond', '--x_start=2', 'takes no coordinates'),
    ('edm_cond', '--resolution=16 --image_size=16', 'contradicts'),
    ('unet', '--image_size=7', 'multiple of 2, such as 6 or 8'),
    ('official', '--mask_pos=1', 'without the coordinate channels it takes'),
    ('official_embed', '--embed_fq=1', 'contradicts the network, which takes their sin/cos embedding at 2'),
    ('edm_cond', '--embed_fq=1', 'which takes no coordinates'),
])
def test_bad_regions_and_official_flags_give_one_line_errors(foreign_pickles, tmp_path, network, flags, match):
    if network == 'unet':   # halves its input once: sides must be even
        snapshots.save_snapshot(str(tmp_path / 'unet.pkl'), architectures.build_network(dict(
            precond='edm', model_type='SongUNet', model_channels=8, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[], use_pos=True, dropout=0), 8, 3, 0), None, None, {})
    folder = tmp_path if network == 'unet' else foreign_pickles
    result = _run(f'--network={folder / network}.pkl', f'--outdir={tmp_path / "out"}', *flags.split())
    _assert_one_line_error(result, match)
    assert not (tmp_path / 'out').exists()


def test_error_in_a_real_process_has_no_traceback(tmp_path, subprocess_env, python_exe, repo_root):
    result = subprocess.run([python_exe, 'generate.py', f'--network={tmp_path / "missing.pkl"}',
                             f'--outdir={tmp_path}', '--device=cpu'],
                            cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f'Error: Cannot open the network pickle {tmp_path / "missing.pkl"}: '
                                                  f'No such file: {tmp_path / "missing.pkl"}']


def test_convert_writes_a_safetensors_snapshot_that_samples_the_same_images(tmp_path):
    """`generate.py convert`: a pickle of our network -> .safetensors, refused
    for an existing or wrongly named destination; both sample the same PNGs."""
    net = architectures.build_network(dict(precond='edm', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
                                      num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0), 8, 3, 0)
    pkl = tmp_path / 'net.pkl'
    snapshots.save_snapshot(str(pkl), net, None, None, {})
    dest = tmp_path / 'net.safetensors'
    result = CliRunner().invoke(generate.main, ['convert', f'--network={pkl}', f'--dest={dest}'])
    assert result.exit_code == 0 and dest.is_file(), result.output
    for bad_dest in (dest, tmp_path / 'net.bin'):
        result = CliRunner().invoke(generate.main, ['convert', f'--network={pkl}', f'--dest={bad_dest}'])
        assert result.exit_code == 1 and result.stderr.startswith('Error: --dest=') and 'Traceback' not in result.output
    for network in (pkl, dest):
        assert _run(f'--network={network}', f'--outdir={tmp_path / network.suffix}', '--seeds=0-1',
                    '--steps=3').exit_code == 0
    from_pkl, from_safetensors = _outputs(tmp_path / '.pkl'), _outputs(tmp_path / '.safetensors')
    assert sorted(from_pkl) == sorted(from_safetensors) == ['000000.png', '000001.png']
    assert all(np.array_equal(from_pkl[name][1], from_safetensors[name][1]) for name in from_pkl)


# ----------------------------------------------------------------------------
# generate.py as a new user meets it: --help, and its images scored by fid.py.

class MeanColour(torch.nn.Module):
    """A feature detector for fid.py: uint8 RGB [N, 3, H, W] -> the mean of each channel and of its square [N, 6]."""

    def forward(self, images, return_features: bool = True):
        x = images.to(torch.float32) / 255
        return torch.cat([x.mean(dim=(2, 3)), x.square().mean(dim=(2, 3))], dim=1)


@pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')
def test_fid_py_scores_the_folder_that_grid_wrote(foreign_pickles, tmp_path):
    """generate.py --grid, then fid.py ref and calc on its folder: every image is one seed's
    (the grid, of another size, would fail the calculation and count as an image)."""
    detector = tmp_path / 'mean-colour.pt'
    torch.jit.save(torch.jit.script(MeanColour()), str(detector))
    outdir = tmp_path / 'out'
    result = _run(f'--network={foreign_pickles / "edm_cond.pkl"}', f'--outdir={outdir}', '--seeds=0-5', '--steps=2',
                  '--grid')
    assert result.exit_code == 0, result.output
    assert (tmp_path / 'out-grid.png').is_file()
    common = ['--device=cpu', '--workers=0', f'--detector={detector}']
    ref = CliRunner().invoke(fid.main, ['ref', f'--data={outdir}', f'--dest={tmp_path / "ref.npz"}', *common])
    assert ref.exit_code == 0, ref.output
    calc = CliRunner().invoke(fid.main, ['calc', f'--images={outdir}', f'--ref={tmp_path / "ref.npz"}', '--num=6',
                                         *common])
    assert calc.exit_code == 0, calc.output
    assert abs(float(calc.output.strip().splitlines()[-1])) < 1e-6


def test_help_and_errors_name_the_command_as_typed():
    """`generate.py --help` is the help of generate.py (not of a hidden `generate`
    subcommand) and names convert; `generate.py convert` and `generate.py generate`
    keep working."""
    runner = CliRunner()
    text = runner.invoke(generate.cli, ['--help'], prog_name='generate.py').output
    assert text.startswith('Usage: generate.py [OPTIONS]\n')
    assert 'generate.py generate' not in text
    assert 'generate.py convert --help  Convert a network pickle you trust to a .safetensors snapshot.' in text
    missing = runner.invoke(generate.cli, ['--outdir=out'], prog_name='generate.py')
    assert missing.exit_code == 2
    assert "Try 'generate.py --help' for help." in missing.output and "Missing option '--network'" in missing.output
    convert = runner.invoke(generate.cli, ['convert', '--help'], prog_name='generate.py')
    assert convert.output.startswith('Usage: generate.py convert [OPTIONS]\n')
    explicit = runner.invoke(generate.cli, ['generate', '--help'], prog_name='generate.py')
    assert explicit.exit_code == 0 and '--network' in explicit.output


def test_an_outdir_that_is_a_file_fails_before_sampling(foreign_pickles, tmp_path):
    outdir = tmp_path / 'out'
    outdir.write_text('not a folder')
    result = _run(f'--network={foreign_pickles / "edm_cond.pkl"}', f'--outdir={outdir}', '--seeds=0-1', '--steps=2')
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f'Error: --outdir={outdir} is a file; give a folder for the PNGs']


def test_other_images_in_the_outdir_are_pointed_out(foreign_pickles, tmp_path):
    """A second run into the same folder with fewer seeds: a note that fid.py would count
    the first run's images too; the same seeds again (a rerun): no note."""
    outdir = tmp_path / 'out'
    network = f'--network={foreign_pickles / "edm_cond.pkl"}'
    assert _run(network, f'--outdir={outdir}', '--seeds=0-3', '--steps=2').exit_code == 0
    again = _run(network, f'--outdir={outdir}', '--seeds=0-3', '--steps=2')
    assert again.exit_code == 0 and 'Note: "' not in again.output
    fewer = _run(network, f'--outdir={outdir}', '--seeds=0-1', '--steps=2')
    assert fewer.exit_code == 0, fewer.output
    assert (f'Note: "{outdir}" already holds 2 other images (e.g. {outdir / "000002.png"}), which fid.py calc '
            f'--images={outdir} would count too') in fewer.output
