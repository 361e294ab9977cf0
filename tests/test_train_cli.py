"""Tests of train.py (flags, run folders, auto-resume, --transfer, --dry-run,
errors) and of multi-process training: two gloo ranks under torchrun, and
two one-process "nodes" on 127.0.0.1. All on CPU with tiny networks."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
import proctools
from proctools import run_all
import torch
from click.testing import CliRunner

import train
from tests.conftest import makefile_demo_flags, resolved_options
from dataset_prep.archive import convert_dataset
from torch_utils import misc
from training import config, runs, snapshots

TRAIN_PY = os.path.abspath(train.__file__)
TINY_FLAGS = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0',
              '--device=cpu']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def shapes_zip(data_dir):
    """32x32 RGB demo images with 5 class labels."""
    path = data_dir / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:16', str(path), resolution=(32, 32))
    return str(path)


def unlabelled_zip(data_dir, resolution):
    """A dataset of 8 random RGB images without labels, from a folder of PNGs."""
    folder = data_dir / f'pngs-{resolution}'
    folder.mkdir()
    rng = np.random.default_rng(resolution)
    for i in range(8):
        PIL.Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f'{i}.png')
    path = data_dir / f'plain-{resolution}x{resolution}.zip'
    convert_dataset(str(folder), str(path))
    return str(path)


def run_train(args, env, timeout=120):
    """python train.py ARGS; returns (returncode, output)."""
    return run_all([[sys.executable, TRAIN_PY] + args], env, timeout)[0]


def run_dirs(outdir):
    return sorted(d for d in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, d)))


def load_ema(path):
    with open(path, 'rb') as f:
        return pickle.load(f)['ema']


def tensors_equal(module_a, module_b):
    a, b = dict(misc.named_params_and_buffers(module_a)), dict(misc.named_params_and_buffers(module_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------
# The README's DDPM++ command, scaled down.

@pytest.fixture(scope='module')
def readme_run(shapes_zip, tmp_path_factory, repo_root):
    """train.py with the official README's DDPM++ flags, as written, plus tiny sizes.
    (Module-scoped, so it builds the subprocess environment of conftest's
    function-scoped `subprocess_env` itself.)"""
    outdir = tmp_path_factory.mktemp('readme')
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    args = [f'--outdir={outdir}', f'--data={shapes_zip}', '--cond=0', '--arch=ddpmpp', '--batch=8',
            '--cres=1,2,2,2', '--lr=2e-4', '--dropout=0.05', '--augment=0', '--real_p=0.5',
            '--cbase=8', '--blocks=1', '--attn=none', '--duration=0.0002', '--tick=0.05', '--samples=0',
            '--workers=0', '--device=cpu']
    returncode, output = run_train(args, env)
    assert returncode == 0, output[-5000:]
    (name,) = run_dirs(outdir)
    return outdir / name, output


def test_readme_command_runs(readme_run):
    run_dir, output = readme_run
    assert 'gpus1-batch8' in run_dir.name and 'realp0.5' in run_dir.name
    names = os.listdir(run_dir)
    for expected in ('training_options.json', 'log.txt', 'stats.jsonl'):
        assert expected in names
    assert any(n.startswith('network-snapshot-') and n.endswith('.pkl') for n in names)
    assert any(n.startswith('training-state-') and n.endswith('.pt') for n in names)
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['network_kwargs']['channel_mult'] == [1, 2, 2, 2]
    assert options['network_kwargs']['dropout'] == 0.05 and options['optimizer_kwargs']['lr'] == 2e-4
    assert options['augment_kwargs'] is None and options['patch_kwargs']['real_p'] == 0.5
    assert options['batch_size'] == 8 and options['dataset_kwargs']['use_labels'] is False
    ticks = [line for line in (run_dir / 'log.txt').read_text().splitlines() if line.startswith('tick ')]
    assert len(ticks) >= 2 and all('patches 8:' in line for line in ticks)
    summary = [line.split() for line in (run_dir / 'log.txt').read_text().splitlines()
               if line.startswith(('model.enc.32x32_conv', 'Total'))]
    assert summary[0][2:4] == ['-', '[4,'] and int(summary[1][1]) > 0     # EDM's network summary table
    assert 'Traceback' not in output


def test_readme_run_progress_is_image_accounting(readme_run):
    """--duration=0.0002 is 200 images; each step adds the images it used,
    batch * m(P) = 8 * 32 / P, so the run stops at the first count >= 200."""
    run_dir, _ = readme_run
    stats = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    counts = {}
    for tick in stats:
        for key, value in tick.items():
            if key.startswith('Patches/steps_'):
                P = int(key[len('Patches/steps_'):-len('px')])
                counts[P] = counts.get(P, 0) + value['mean']
    images = sum(8 * (32 // P) * n for P, n in counts.items())
    assert stats[-1]['Progress/kimg']['mean'] * 1000 == pytest.approx(images)
    assert 200 <= images < 200 + 8 * 4 and set(counts) == {8, 16, 32}


@pytest.mark.slow
def test_make_demo_commands_run(shapes_zip, tmp_path, subprocess_env, repo_root):
    """The Makefile's demo: train.py with DEMO_TRAIN_FLAGS (only shortened:
    later flags win in click) and generate.py's grid with DEMO_SAMPLE_FLAGS,
    as `make demo` runs them."""
    flags = makefile_demo_flags()
    assert '--real_p=0.5' in flags and '--device=cpu' in flags
    outdir = tmp_path / 'demo-run'
    code, output = run_train([f'--outdir={outdir}', f'--data={shapes_zip}'] + flags +
                             ['--duration=0.0002', '--tick=0.0001', '--snap=1', '--dump=1', '--samples=4',
                              '--workers=0'], subprocess_env)
    assert code == 0, output
    snapshots = sorted(outdir.glob('*/network-snapshot-*.pkl'))
    assert snapshots, output
    assert load_ema(snapshots[-1]).model.enc['32x32_conv'].weight.shape[0] == 16   # --cbase=16 reached the net
    sample_flags = makefile_demo_flags('DEMO_SAMPLE_FLAGS')
    assert '--S_churn=20' in sample_flags and '$(DEMO_SAMPLE_FLAGS)' in (repo_root / 'Makefile').read_text()
    generate = [sys.executable, str(repo_root / 'generate.py'), '--device=cpu', '--seeds=0-3', '--grid',
                f'--outdir={outdir / "samples"}', f'--network={snapshots[-1]}'] + sample_flags + ['--steps=4']
    (code, output), = run_all([generate], subprocess_env, 120)
    assert code == 0, output
    assert (outdir / 'samples-grid.png').is_file()


def test_transfer_starts_from_the_snapshot(readme_run, shapes_zip, tmp_path, subprocess_env):
    """--transfer copies every weight: with the default lr ramp-up the first
    step has lr = 0, so the tick-0 snapshot equals the source bit for bit."""
    run_dir, _ = readme_run
    (source_name,) = [n for n in os.listdir(run_dir) if n.startswith('network-snapshot-')]
    net, _ = snapshots.load_network(str(run_dir / source_name))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():   # weights no fresh initialisation could have
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    source = tmp_path / 'source.pkl'
    snapshots.save_snapshot(str(source), net, None, None, {})

    outdir = tmp_path / 'runs'
    args = [f'--outdir={outdir}', f'--data={shapes_zip}', '--cond=0', '--arch=ddpmpp', '--batch=8',
            '--cres=1,2,2,2', '--lr=2e-4', '--dropout=0.05', '--augment=0', '--real_p=0.5', '--cbase=8',
            '--blocks=1', '--attn=none', '--duration=0.00001', '--samples=0', '--workers=0', '--device=cpu',
            '--seed=5', f'--transfer={source}']
    returncode, output = run_train(args, subprocess_env)
    assert returncode == 0, output[-5000:]
    count = len(misc.named_params_and_buffers(net))
    assert f'Transferred {count} tensors from "{source}"' in output
    assert 'not in the source' not in output
    (name,) = run_dirs(outdir)
    assert tensors_equal(load_ema(outdir / name / 'network-snapshot-000000.pkl'), net)


# ----------------------------------------------------------------------------
# Auto-resume: the same command with the same --outdir.

def test_same_command_resumes_bit_exact(shapes_zip, tmp_path, subprocess_env):
    """Run to the end (2 kimg, ticks of 1 kimg, a state each tick; states are
    named by whole kimg, hence kimg-sized ticks), delete the
    newest state and snapshot, run the same command again (no --seed: the
    run's seed is reused): it resumes in the same folder and ends with the
    same EMA weights."""
    outdir = tmp_path / 'runs'
    args = [f'--outdir={outdir}', f'--data={shapes_zip}', '--cond=0', '--batch=64', '--real_p=0.2',
            '--lr-rampup=0', '--augment=0', '--duration=0.002', '--tick=1', '--dump=1', '--samples=4'] + TINY_FLAGS
    returncode, output = run_train(args, subprocess_env)
    assert returncode == 0, output[-5000:]
    (name,) = run_dirs(outdir)
    run_dir = outdir / name
    assert os.path.isfile(run_dir / 'samples-000000.png')   # the grid at the first tick
    assert sorted(n for n in os.listdir(run_dir) if n.startswith('training-state-')) == \
        [f'training-state-00000{k}.pt' for k in range(3)]
    final = run_dir / 'network-snapshot-000002.pkl'
    first_ema = load_ema(final)
    os.remove(final)
    os.remove(run_dir / 'training-state-000002.pt')

    returncode, output = run_train(args, subprocess_env)
    assert returncode == 0, output[-5000:]
    assert f'Resuming run {run_dir} from {run_dir / "training-state-000001.pt"}' in output
    assert run_dirs(outdir) == [name]
    assert tensors_equal(load_ema(final), first_ema)
    assert (run_dir / 'log.txt').read_text().count('Resuming from') == 1


def test_raising_the_duration_continues_the_run_bit_exact(shapes_zip, tmp_path, subprocess_env):
    """The same command with a longer --duration (and other --tick, --dump,
    --samples) continues the finished run in its own folder, says so, and
    ends with the weights of a run given the longer duration from the start
    (random patch draws, lr ramp-up by images: exact). A changed --lr starts
    a new run and names the difference."""
    def args(outdir, *extra):
        return [f'--outdir={outdir}', f'--data={shapes_zip}', '--cond=0', '--batch=8', '--real_p=0.5', '--seed=3',
                '--lr-rampup=0.05', '--augment=0', '--tick=0.05', '--samples=0'] + TINY_FLAGS + list(extra)
    short, longer = tmp_path / 'extended', tmp_path / 'longer'
    assert run_train(args(short, '--duration=0.0001'), subprocess_env)[0] == 0
    returncode, output = run_train(args(short, '--duration=0.0002', '--tick=0.1', '--dump=2'), subprocess_env)
    assert returncode == 0, output[-5000:]
    (name,) = run_dirs(short)
    assert 'Resuming run' in output and 'Continuing with changed options: ' in output
    assert '--duration 0.0002 != 0.0001' in output and '--dump 2 != 500' in output
    options = json.loads((short / name / 'training_options.json').read_text())
    assert options['total_kimg'] == 0.2 and options['state_dump_ticks'] == 2   # the run records its new options
    assert run_train(args(longer, '--duration=0.0002'), subprocess_env)[0] == 0
    (other,) = run_dirs(longer)
    a = runs.load_state(runs.find_latest_state(str(short / name)))
    b = runs.load_state(runs.find_latest_state(str(longer / other)))
    assert a['step'] == b['step'] and a['nimg'] == b['nimg'] >= 200
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key

    returncode, output = run_train(args(short, '--duration=0.0002', '--lr=2e-3'), subprocess_env)
    assert returncode == 0, output[-5000:]
    assert f'Note: not resuming {name}: --lr 0.002 != 0.001; starting a new run.' in output
    assert len(run_dirs(short)) == 2


def test_only_the_same_options_resume(readme_run):
    """find_resumable_run matches a run by the options that change what is
    learned (not the seed, which was random): a changed --lr is a new run,
    and the note names it; a longer --duration, other --tick/--snap/--dump/
    --workers/--samples/--snapshot-format/--device continue the run."""
    run_dir, _ = readme_run
    options = json.loads((run_dir / 'training_options.json').read_text())
    mine = dict(options, seed=12345)
    del mine['run_dir']
    found, note = runs.find_resumable_run(str(run_dir.parent), mine, seed_given=False, nosubdir=False)
    assert (found.run_dir, found.state, found.seed, found.changed, note) == \
        (str(run_dir), runs.find_latest_state(str(run_dir)), options['seed'], [], None)
    found, note = runs.find_resumable_run(str(run_dir.parent), mine, seed_given=True, nosubdir=False)
    assert found is None and note == f'not resuming {run_dir.name}: --seed 12345 != {options["seed"]}'

    longer = dict(mine, total_kimg=options['total_kimg'] * 2, kimg_per_tick=1, snapshot_ticks=7, state_dump_ticks=9,
                  sample_count=5, snapshot_format='both', device='cuda:3', max_bad_steps=5,
                  data_loader_kwargs=dict(options['data_loader_kwargs'], num_workers=4))
    found, note = runs.find_resumable_run(str(run_dir.parent), longer, seed_given=False, nosubdir=False)
    assert found.run_dir == str(run_dir) and note is None
    assert ('total_kimg', options['total_kimg'], options['total_kimg'] * 2) in found.changed
    assert '--duration 0.0004 != 0.0002' in runs.describe_differences(found.changed) and len(found.changed) == 9

    mine['optimizer_kwargs'] = dict(mine['optimizer_kwargs'], lr=3e-4)
    found, note = runs.find_resumable_run(str(run_dir.parent), mine, seed_given=False, nosubdir=False)
    assert found is None and note == f'not resuming {run_dir.name}: --lr 0.0003 != 0.0002'
    progressive = dict(longer, patch_kwargs=dict(options['patch_kwargs'], progressive=True))
    found, note = runs.find_resumable_run(str(run_dir.parent), progressive, seed_given=False, nosubdir=False)
    assert found is None and '--progressive' in note and '--duration' in note   # phases are shares of the run


# ----------------------------------------------------------------------------
# --dry-run and errors (in-process through click).

def test_dry_run_prints_options_and_writes_nothing(shapes_zip, tmp_path, no_torchrun_env):
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_zip}', '--batch=8',
                                             '--real_p=0.25', '--seed=3', '--dry-run'] + TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    c = resolved_options(result.output)
    assert c['network_kwargs']['model_channels'] == 8 and c['network_kwargs']['channel_mult'] == [1, 2]
    assert c['network_kwargs']['num_blocks'] == 1 and c['network_kwargs']['attn_resolutions'] == []
    assert c['network_kwargs']['use_pos'] is True and c['patch_kwargs']['real_p'] == 0.25
    assert c['batch_size'] == 8 and c['seed'] == 3 and c['dataset_kwargs']['path'] == shapes_zip
    assert c['run_dir'] == str(outdir / '00000-shapes-32x32-uncond-ddpmpp-edm-gpus1-batch8-fp32-realp0.25')
    assert not outdir.exists()
    fp16 = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_zip}', '--batch=8', '--fp16=1',
                                           '--dry-run'] + TINY_FLAGS)
    assert 'Note: --fp16=1 has no effect on cpu' in fp16.output and '-fp32-' in resolved_options(fp16.output)['run_dir']


def test_edm_noise_level_distribution_flags(shapes_zip, tmp_path, no_torchrun_env):
    base = [f'--outdir={tmp_path / "runs"}', f'--data={shapes_zip}', '--batch=8', '--dry-run'] + TINY_FLAGS
    result = CliRunner().invoke(train.main, base + ['--P_mean=-0.4', '--P_std=1.4'])
    assert result.exit_code == 0, result.output
    assert resolved_options(result.output)['loss_kwargs'] == dict(loss='edm', P_mean=-0.4, P_std=1.4)
    result = CliRunner().invoke(train.main, base + ['--precond=vp', '--P_mean=-0.4'])
    assert_one_error_line(result, '--P_mean')


def assert_one_error_line(result, *fragments):
    """Failed with a single 'Error:' line (no traceback) that contains `fragments`."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)   # no uncaught exception
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, result.output
    assert 'Traceback' not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize('case', ['missing-data', 'cond-unlabelled', 'real-p', 'too-small', 'fp16-bf16'])
def test_clear_errors(case, data_dir, tmp_path, no_torchrun_env):
    outdir = tmp_path / 'runs'
    data, extra, fragments = {
        'missing-data': (str(tmp_path / 'nope.zip'), [], ['--data', 'nope.zip']),
        'cond-unlabelled': (None, ['--cond=1'], ['no labels', '--cond=0']),
        'real-p': (None, ['--real_p=1.5'], ['real_p', '1.5']),
        'too-small': ('16', ['--real_p=0.5'], ['16', 'real_p=1']),
        'fp16-bf16': (None, ['--fp16=1', '--bf16=1'], ['--fp16', '--bf16']),
    }[case]
    if data is None or data == '16':
        resolution = 16 if data == '16' else 32
        path = data_dir / f'plain-{resolution}x{resolution}.zip'
        data = str(path) if path.exists() else unlabelled_zip(data_dir, resolution)
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={data}', '--batch=8'] + TINY_FLAGS + extra)
    assert_one_error_line(result, *fragments)
    assert not outdir.exists()


def test_error_in_a_subprocess_has_no_traceback(tmp_path, subprocess_env):
    returncode, output = run_train([f'--outdir={tmp_path / "runs"}', f'--data={tmp_path / "missing"}'] + TINY_FLAGS,
                                   subprocess_env)
    assert returncode != 0
    assert 'Traceback' not in output
    assert [line for line in output.splitlines() if line.startswith('Error:')] != []


# ----------------------------------------------------------------------------
# Several processes (gloo on CPU).

TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0.1, augment_dim=9)

DDP_WORKER = '''
import gc, json, os, sys
import torch
from torch_utils import distributed as dist, misc
from training.training_loop import Trainer

device = dist.init('cpu')
trainer = Trainer(device=device, **json.loads(sys.argv[2]))
sizes = [trainer.step() for _ in range(int(sys.argv[3]))]
misc.check_ddp_consistency(trainer.net)
misc.check_ddp_consistency(trainer.ema)
rank = dist.get_rank()
with open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w') as f:
    json.dump(dict(rank=rank, world=dist.get_world_size(), sizes=sizes, consumed=trainer.batches.consumed,
                   batch_gpu_total=trainer.batch_gpu_total, bad_steps=trainer.bad_steps), f)
del trainer   # free DDP (it holds the process group) before shutdown; else gloo may abort at exit
gc.collect()
dist.shutdown()
'''


@pytest.mark.slow
def test_two_ranks_draw_the_same_patch_sizes(shapes_zip, tmp_path, subprocess_env):
    """Every rank trains on the same patch size in every step (equal work),
    with different images, and the weights stay equal on both ranks."""
    script = tmp_path / 'ddp_worker.py'
    script.write_text(DDP_WORKER)
    kwargs = dict(dataset_kwargs=dict(path=shapes_zip), network_kwargs=TINY_NET, loss_kwargs=dict(loss='edm'),
                  augment_kwargs=dict(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1),
                  patch_kwargs=dict(real_p=0.5), batch_size=8, lr_rampup_kimg=0, seed=1)
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(script), str(tmp_path), json.dumps(kwargs), '10']
    ((returncode, output),) = run_all([command], subprocess_env, timeout=150)
    assert returncode == 0, output[-5000:]   # includes check_ddp_consistency of net and EMA
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2))
    assert (r0['rank'], r1['rank'], r0['world']) == (0, 1, 2)
    assert r0['sizes'] == r1['sizes'] and len(set(r0['sizes'])) > 1, (r0['sizes'], r1['sizes'])
    assert r0['batch_gpu_total'] == r1['batch_gpu_total'] == 4
    assert r0['consumed'] == r1['consumed'] == sum(4 * (32 // P) for P in r0['sizes'])
    assert r0['bad_steps'] == r1['bad_steps'] == 0


@pytest.mark.slow
def test_two_nodes_on_localhost(shapes_zip, tmp_path, subprocess_env, free_port):
    """Two torchrun 'nodes' of one process each train together; rank 0 writes,
    also the power EMA that only it keeps."""
    # One retry in a fresh folder on a fresh port: once in ~5 full-suite runs this hung (both processes past
    # the rendezvous, no collective timing out), and once it failed, never when run alone: possibly another test's
    # process can take the free port between its pick and the rendezvous. Not yet understood further (see
    # issue 3's note). A broken launch fails both attempts.
    failures = []
    for attempt, port in enumerate([free_port, proctools.free_port()]):
        outdir = tmp_path / f'runs{attempt}'
        commands = [[sys.executable, '-m', 'torch.distributed.run', '--nnodes=2', f'--node_rank={node}',
                     '--nproc_per_node=1', '--master_addr=127.0.0.1', f'--master_port={port}',
                     TRAIN_PY,
                     f'--outdir={outdir}', f'--data={shapes_zip}', '--batch=8', '--duration=0.0001', '--samples=0',
                     '--ema-std=0.1']
                    + TINY_FLAGS for node in (0, 1)]
        try:
            results = run_all(commands, dict(subprocess_env, PD_DIST_TIMEOUT_S='60'), timeout=90)
        except pytest.fail.Exception as err:
            failures.append(str(err)[-3000:])
            continue
        if all(returncode == 0 for returncode, _output in results):
            break
        failures.append('\n'.join(output[-3000:] for returncode, output in results if returncode != 0))
    assert len(failures) == attempt <= 1, '\n----\n'.join(failures)   # at most the first attempt failed
    (name,) = run_dirs(outdir)
    assert '-gpus2-batch8-' in name
    assert os.path.isfile(outdir / name / 'network-snapshot-000000.pkl')
    assert os.path.isfile(outdir / name / 'network-snapshot-000000-0.100.pkl')
    assert 'phema' in torch.load(outdir / name / 'training-state-000000.pt', weights_only=True)


EDM_STYLE_LOAD = '''
import pickle, sys
import torch
with open(sys.argv[1], 'rb') as f:
    net = pickle.load(f)['ema']
assert not any(name.startswith('training') for name in sys.modules), sorted(sys.modules)
x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=torch.Generator().manual_seed(0))
labels = torch.eye(net.label_dim)[[0, 3]]
out = net(x, torch.tensor([1.0, 2.0]), labels)    # EDM generate.py's call
print(net.img_channels, tuple(out.shape), float(out.abs().sum()))
'''


def test_use_pos_0_trains_plain_edm_loadable_by_edm_code(shapes_zip, tmp_path, subprocess_env, repo_root):
    """--use_pos=0 --real_p=1 is plain EDM training: a network without
    coordinate channels whose pickle loads where only torch_utils and dnnlib
    exist (as in EDM's repository) and takes EDM's call net(x, sigma, labels)."""
    outdir = tmp_path / 'runs'
    returncode, output = run_train([f'--outdir={outdir}', f'--data={shapes_zip}', '--cond=1', '--batch=4',
                                    '--use_pos=0', '--real_p=1', '--precond=edm', '--duration=0.00001',
                                    '--samples=0', '--augment=0'] + TINY_FLAGS, subprocess_env)
    assert returncode == 0, output[-5000:]
    (name,) = run_dirs(outdir)
    options = json.loads((outdir / name / 'training_options.json').read_text())
    assert options['network_kwargs']['use_pos'] is False and 'patches 32:' in output
    edm_like = tmp_path / 'edm_like'
    for package in ('torch_utils', 'dnnlib'):
        shutil.copytree(repo_root / package, edm_like / package)
    (tmp_path / 'load.py').write_text(EDM_STYLE_LOAD)
    env = dict(subprocess_env, PYTHONPATH=str(edm_like))
    result = subprocess.run([sys.executable, str(tmp_path / 'load.py'), str(outdir / name / 'network-snapshot-000000.pkl')],
                            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith('3 (2, 3, 32, 32)')


def test_precond_names_of_the_official_code():
    """--precond=pedm (the official default) is EDM's preconditioning with coordinates, as our edm."""
    dataset = types.SimpleNamespace(is_latent=False, resolution=32, image_shape=[3, 32, 32])
    pedm, edm = (config.build_config(dict(precond=name), dataset) for name in ('pedm', 'edm'))
    assert pedm.network_kwargs == edm.network_kwargs and pedm.loss_kwargs == edm.loss_kwargs == dict(loss='edm')
    assert edm.network_kwargs.use_pos is True
    plain = config.build_config(dict(precond='vp', use_pos=False), dataset)
    assert (plain.network_kwargs.precond, plain.network_kwargs.use_pos, plain.loss_kwargs.loss) == ('vp', False, 'vp')
