"""Tests of generate.py: output files, subfolders, grid, ablation flags, one
process against two under torchrun, and one-line errors for bad input."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
from training import generation, image_io, networks, snapshots

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
    assert sorted(outputs) == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png',
                               'grid.png']
    images = torch.stack([torch.from_numpy(outputs[name][1].copy())[None] for name in sorted(outputs)[:4]])
    assert np.array_equal(outputs['grid.png'][1], image_io.image_grid(images)[0].numpy())


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
    assert len(one) == 9 and sorted(one) == sorted(two)
    for name in one:
        assert one[name][0] == two[name][0] and np.array_equal(one[name][1], two[name][1]), name


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
    net = networks.build_network(dict(precond='edm', model_type='SongUNet', model_channels=8, channel_mult=[1, 2],
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
