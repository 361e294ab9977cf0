"""A new user's afternoon with train.py (issue 27): the seed a dry run shows,
its patch plan, rerunning a finished run, a second run by --desc, --resume
with other options or the wrong kind of file, FID on an offline machine,
EDM's timing statistics and the TensorBoard notice, and flags that would
otherwise do what was not asked. In-process through click, tiny networks on
CPU; one finished run is shared by the module."""

import contextlib
import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import train
from dataset_prep.archive import convert_dataset
from tests.conftest import resolved_options
from training import snapshots

pytestmark = pytest.mark.usefixtures('one_thread')   # tiny networks: two contending threads run them far slower

TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0', '--device=cpu',
        '--batch=8', '--augment=0', '--lr-rampup=0', '--duration=0.00002', '--tick=0.00001', '--samples=4']


def invoke(args):
    """train.py ARGS in this process: (exit code, output)."""
    result = CliRunner().invoke(train.main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def error_line(output):
    (line,) = [line for line in output.splitlines() if line.startswith('Error:')]
    assert 'Traceback' not in output
    return line


def only_dir(outdir):
    (name,) = sorted(os.listdir(outdir))
    return outdir / name


def tree(folder):
    """{relative path: (size, mtime_ns, sha1)} of every file below `folder`."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, 'rb') as f:
                digest = hashlib.sha1(f.read()).hexdigest()
            found[os.path.relpath(path, folder)] = (os.path.getsize(path), os.stat(path).st_mtime_ns, digest)
    return found


@contextlib.contextmanager
def no_tensorboard():
    """Imports of torch.utils.tensorboard fail, as where the tensorboard package is not installed."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, 'torch.utils.tensorboard', None)
        yield


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
    """A finished run without --seed on 16 demo images: dict(args, outdir, run_dir, dry (the output of
    its dry run before it), output)."""
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        assert name not in os.environ
    root = tmp_path_factory.mktemp('finished')
    convert_dataset('demo:shapes:16', str(root / 'shapes-32x32.zip'), resolution=(32, 32))
    outdir = root / 'runs'
    args = [f'--outdir={outdir}', f'--data={root / "shapes-32x32.zip"}', *TINY]
    code, dry = invoke([*args, '--dry-run'])
    assert code == 0, dry
    with no_tensorboard():
        code, output = invoke(args)
    assert code == 0, output
    return dict(args=args, outdir=outdir, run_dir=only_dir(outdir), dry=dry, output=output)


def test_the_dry_run_does_not_show_a_seed_the_run_will_not_use(finished, tmp_path):
    """Without --seed the dry run says the seed is drawn at start; the run
    records the seed it used, the same command's dry run then shows it, and
    a run given that --seed trains the same weights."""
    assert resolved_options(finished['dry'])['seed'] is None
    assert 'Seed: drawn at start (no --seed)' in finished['dry']
    seed = json.loads((finished['run_dir'] / 'training_options.json').read_text())['seed']
    assert isinstance(seed, int) and resolved_options(finished['output'])['seed'] == seed
    code, dry = invoke([*finished['args'], '--dry-run'])
    assert code == 0 and resolved_options(dry)['seed'] == seed and 'drawn at start' not in dry

    outdir = tmp_path / 'again'
    code, output = invoke([f'--outdir={outdir}', *finished['args'][1:], f'--seed={seed}'])
    assert code == 0, output
    a = torch.load(only_dir(outdir) / 'training-state-000000.pt', weights_only=True)
    b = torch.load(finished['run_dir'] / 'training-state-000000.pt', weights_only=True)
    assert a['step'] == b['step'] and all(torch.equal(a['ema'][k], b['ema'][k]) for k in b['ema'])


def test_the_dry_run_shows_the_patch_plan_the_run_prints(finished, tmp_path):
    """The dry run prints the run's 'Patch sizes: ...' line, also for
    non-square images (sides width x height), without training."""
    dry = [line for line in finished['dry'].splitlines() if line.startswith('Patch sizes:')]
    real = [line for line in finished['output'].splitlines() if line.startswith('Patch sizes:')]
    assert dry == real and len(real) == 1 and '8px: p=0.200 x4' in real[0]

    wide = tmp_path / 'wide-64x32.zip'
    convert_dataset('demo:shapes:4', str(wide), resolution=(64, 32))
    code, output = invoke([f'--outdir={tmp_path / "runs"}', f'--data={wide}', *TINY, '--dry-run'])
    assert code == 0, output
    (line,) = [line for line in output.splitlines() if line.startswith('Patch sizes:')]
    assert line.startswith('Patch sizes: 16x8px: p=0.200 x4, 32x16px: p=0.300 x2, 64x32px: p=0.500 x1;'), line
    assert not (tmp_path / 'runs').exists()


def test_rerunning_a_finished_run_writes_nothing(finished, tmp_path):
    """The same command again, and --resume of its last state into a new
    folder: 'already complete', exit 0, no tick, no file touched or made."""
    before = tree(finished['outdir'])
    code, output = invoke(finished['args'])
    assert code == 0, output
    assert 'is already complete at 0.0' in output and 'kimg; raise --duration to continue' in output
    assert 'Training for' not in output and not any(line.startswith('tick ') for line in output.splitlines())
    assert tree(finished['outdir']) == before

    state = finished['run_dir'] / 'training-state-000000.pt'
    outdir = tmp_path / 'resumed'
    code, output = invoke([f'--outdir={outdir}', *finished['args'][1:], f'--resume={state}'])
    assert code == 0, output
    assert f'{state} is already complete at 0.0' in output and 'raise --duration to continue' in output
    assert 'Training for' not in output and not outdir.exists()
    assert tree(finished['outdir']) == before


def test_another_desc_is_another_run(finished):
    """--desc names a run: the same options with a new --desc start a new
    numbered folder (the note names --desc), and that --desc again continues
    it, not the first run."""
    args = [*finished['args'], '--desc=second']
    code, output = invoke(args)
    assert code == 0, output
    first = finished['run_dir'].name
    second = sorted(os.listdir(finished['outdir']))[-1]
    assert second.startswith('00001-') and second.endswith('-second')
    assert f'Note: not resuming {first}: --desc "second" != unset; starting a new run.' in output
    code, output = invoke([*args, '--duration=0.001', '--dry-run'])
    assert code == 0 and resolved_options(output)['run_dir'] == str(finished['outdir'] / second)
    assert f'Resuming run {finished["outdir"] / second}' in output
    assert json.loads((finished['outdir'] / second / 'training_options.json').read_text())['desc'] == 'second'
    shutil.rmtree(finished['outdir'] / second)   # the module's finished run stays the only one


def test_resume_with_other_options_names_them(finished, tmp_path):
    """--resume of a state whose network other flags shaped: one short line
    naming the flags (from the state's training_options.json), or, without
    that file, the count and the first tensor that differ; nothing left
    behind. The dry run names the differences before."""
    state = finished['run_dir'] / 'training-state-000000.pt'
    outdir = tmp_path / 'runs'
    other = [f'--outdir={outdir}', *finished['args'][1:], '--cbase=16', '--duration=0.0001', f'--resume={state}']
    code, output = invoke([*other, '--dry-run'])
    assert code == 0 and f'Note: the run of {state} had other options: --cbase 16 != 8' in output, output
    code, output = invoke(other)
    line = error_line(output)
    assert code == 1 and 'does not fit this network' in line and '--cbase 16 != 8' in line and len(line) < 400
    assert not outdir.exists()

    alone = tmp_path / 'alone'
    alone.mkdir()
    shutil.copy(state, alone / state.name)
    code, output = invoke([*other[:-1], f'--resume={alone / state.name}'])
    line = error_line(output)
    assert code == 1 and 'tensors differ, the first' in line and 'in the state [' in line and len(line) < 400
    assert not outdir.exists()


def test_wrong_kinds_of_files_say_what_they_are(finished, tmp_path):
    """A network snapshot given to --resume (the dry run checks it too) and a
    training state given to the network loader name the kind they got."""
    snapshot = finished['run_dir'] / 'network-snapshot-000000.pkl'
    for extra in (['--dry-run'], []):
        code, output = invoke([f'--outdir={tmp_path / "runs"}', *finished['args'][1:], f'--resume={snapshot}',
                               *extra])
        line = error_line(output)
        assert code == 1 and 'is a network snapshot, not a training state' in line and '--transfer' in line, line
        assert 'truncated' not in line and not (tmp_path / 'runs').exists()
    with pytest.raises(ValueError, match='is a training state, not a network snapshot: pass it to train.py --resume'):
        snapshots.load_network(str(finished['run_dir'] / 'training-state-000000.pt'))


def test_fid_detector_is_loaded_before_training(finished, tmp_path, monkeypatch):
    """--metrics=fid on a machine that cannot download Inception-v3 fails at
    once, naming --metric-detector, with nothing written; --metric-detector
    takes a local detector (here a tiny TorchScript one) and the run computes
    FID with it."""
    ref = tmp_path / 'ref.npz'
    np.savez(ref, mu=np.zeros(12), sigma=np.eye(12))
    base = [f'--outdir={tmp_path / "runs"}', *finished['args'][1:], '--metrics=fid', f'--metric-ref={ref}',
            '--metric-num=6', '--seed=1']
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'empty-cache'))
    for name in ('HTTPS_PROXY', 'https_proxy', 'HTTP_PROXY', 'http_proxy'):
        monkeypatch.setenv(name, 'http://127.0.0.1:9')   # nothing listens there: offline
    monkeypatch.delenv('NO_PROXY', raising=False)
    monkeypatch.delenv('no_proxy', raising=False)
    code, output = invoke(base)
    line = error_line(output)
    assert code == 1 and '--metric-detector' in line and 'Training for' not in output, output
    assert not (tmp_path / 'runs').exists()

    detector = tmp_path / 'features.pt'
    torch.jit.save(torch.jit.script(PooledFeatures()), str(detector))
    code, output = invoke([*base, f'--metric-detector={detector}'])
    assert code == 0, output
    lines = (only_dir(tmp_path / 'runs') / 'metric-fid.jsonl').read_text().splitlines()
    assert lines and all(json.loads(line)['metric'] == 'fid' for line in lines)
    code, output = invoke([*finished['args'], f'--metric-detector={detector}', '--dry-run'])
    assert code == 1 and '--metric-detector is the detector of --metrics=fid' in error_line(output)


class PooledFeatures(torch.nn.Module):
    """uint8 RGB [N, 3, H, W] -> [N, 12]: the mean colour of each 2x2 cell, in [0, 1]."""

    def forward(self, images, return_features: bool = False):
        return torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 2).flatten(1)


def test_stats_have_edm_timing_and_a_missing_tensorboard_is_said(finished):
    stats = [json.loads(line) for line in (finished['run_dir'] / 'stats.jsonl').read_text().splitlines()]
    for tick in stats:
        seconds = tick['Timing/total_sec']['mean']
        assert tick['Timing/total_hours']['mean'] == pytest.approx(seconds / 3600)
        assert tick['Timing/total_days']['mean'] == pytest.approx(seconds / 86400)
    notice = 'Note: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)'
    assert finished['output'].count(notice) == 1


def test_flags_that_would_do_what_was_not_asked(finished, tmp_path):
    """--nosubdir into a folder that holds another run (it would mix the two
    runs' files), --nosubdir with --desc (no folder to name), --transfer with
    --resume (the state's weights would win silently), --metric-ref without
    --metrics (ignored): one error line, nothing written."""
    before = tree(finished['outdir'])
    run_dir = finished['run_dir']
    code, output = invoke([f'--outdir={run_dir}', *finished['args'][1:], '--nosubdir', '--lr=2e-3'])
    line = error_line(output)
    assert code == 1 and '--nosubdir' in line and '--lr 0.002 != 0.001' in line
    code, output = invoke([f'--outdir={tmp_path / "runs"}', *finished['args'][1:], '--nosubdir', '--desc=x'])
    assert code == 1 and '--desc names a new run folder' in error_line(output)
    state, snapshot = run_dir / 'training-state-000000.pt', run_dir / 'network-snapshot-000000.pkl'
    code, output = invoke([f'--outdir={tmp_path / "runs"}', *finished['args'][1:], f'--resume={state}',
                           f'--transfer={snapshot}'])
    assert code == 1 and '--transfer and --resume are exclusive' in error_line(output)
    code, output = invoke([f'--outdir={tmp_path / "runs"}', *finished['args'][1:], f'--metric-ref={state}'])
    assert code == 1 and '--metric-ref is the reference of --metrics' in error_line(output)
    assert tree(finished['outdir']) == before and not (tmp_path / 'runs').exists()
