"""Reliability and safety of training and of the files the project writes.

- Kill anywhere: a tiny train.py run killed (SIGKILL, or an abrupt exit
  halfway through writing a training state or a snapshot) and restarted
  with the same command ends bit-identical to a run never interrupted; stale
  temporaries are removed; a corrupt newest state is skipped, with a note.
- Disk full (ENOSPC, simulated) while writing a state or a snapshot: one
  clear error, the files written before untouched, no temporaries.
- NaN: the run stops, naming step and tick, and the same command resumes
  from the last good state to the weights of a run that never saw a NaN.
- Safe formats: .safetensors snapshots (train.py --snapshot-format, the
  converter, generate.py, --transfer) without unpickling; the one-line trust
  note when a pickle is loaded; whole lines in .jsonl files.
- Distributed (slow): a rank that dies makes the other exit with an error
  within seconds, and torchrun --max-restarts=1 resumes to the weights of an
  uninterrupted 2-process run.
"""

import errno
import glob
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
from proctools import kill_family, run_all, start, wait_for_ticks
import torch
from click.testing import CliRunner

import dnnlib
import generate
import train
from dataset_prep.archive import convert_dataset
from torch_utils import misc, persistence
from training import architectures, patching, runs, snapshots
from training import loss as loss_lib

TRAIN_PY = os.path.abspath(train.__file__)
# About 20 steps of one tick each (8 * m(P) images per step, 15.2 on average; ticks of 10 images); a state and
# a snapshot every tick.
RUN_FLAGS = ['--batch=8', '--real_p=0.5', '--augment=0', '--lr-rampup=0', '--duration=0.0003', '--tick=0.01',
             '--dump=1', '--snap=1', '--samples=0', '--seed=1', '--arch=ddpmpp', '--cbase=8', '--cres=1,2',
             '--blocks=1', '--attn=none', '--workers=0', '--device=cpu']


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:16', str(path), resolution=(32, 32))
    return str(path)


@pytest.fixture(scope='module')
def module_env(repo_root):
    """The environment of conftest's subprocess_env, for module-scoped fixtures."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    return env


def run_steps(total_nimg=300, batch=8, seed=1):
    """The steps of a RUN_FLAGS run: each adds batch * m(P) images, P drawn from (seed, step)."""
    return run_progress(total_nimg, batch, seed)[0]


def run_progress(total_nimg=300, batch=8, seed=1):
    """(steps, images counted) of a RUN_FLAGS run."""
    schedule, nimg, steps = patching.PatchSchedule(32, 0.5, seed=seed), 0, 0
    while nimg < total_nimg:
        nimg += batch * schedule.multiplier(schedule.draw(steps))
        steps += 1
    return steps, nimg


def train_args(outdir, data, *extra):
    return [f'--outdir={outdir}', f'--data={data}', *RUN_FLAGS, *extra]


def run_dir_of(outdir):
    (name,) = [d for d in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, d))]
    return os.path.join(outdir, name)


def run(command, env, timeout=180):
    """(returncode, output) of a command; fails the test on a timeout (a hang)."""
    return run_all([command], env, timeout)[0]


def final_weights(run_dir):
    """{name: tensor} of the final snapshot's EMA (.pkl and .safetensors) and the final state's net and EMA."""
    state = runs.load_state(os.path.join(run_dir, 'training-state-000000.pt'))
    weights = {f'state.net.{k}': v for k, v in state['net'].items()}
    weights.update({f'state.ema.{k}': v for k, v in state['ema'].items()})
    for ext in ('pkl', 'safetensors'):
        net, _ = snapshots.load_network(os.path.join(run_dir, f'network-snapshot-000000.{ext}'))
        weights.update({f'{ext}.{k}': v for k, v in misc.named_params_and_buffers(net)})
    return weights, state['step']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope='module')
def reference_run(shapes_zip, module_env, tmp_path_factory):
    """The uninterrupted run: (run_dir, final weights)."""
    outdir = tmp_path_factory.mktemp('reference')
    returncode, output = run([sys.executable, TRAIN_PY] + train_args(outdir, shapes_zip, '--snapshot-format=both'),
                             module_env)
    assert returncode == 0, output[-3000:]
    run_dir = run_dir_of(outdir)
    weights, steps = final_weights(run_dir)
    assert steps == run_steps()
    return run_dir, weights


# ----------------------------------------------------------------------------
# Kill anywhere.

DIE_WHILE_WRITING = '''
"""Run train.py, but exit abruptly (as if killed) halfway through writing the
N-th training state (WHAT=state) or snapshot pickle (WHAT=snapshot) of this process."""
import os, pickle, sys
import torch

what, count = sys.argv[1], int(sys.argv[2])
sys.argv = [sys.argv[0]] + sys.argv[3:]
calls = 0
real_save, real_dump = torch.save, pickle.dump


def save(obj, f, *args, **kwargs):
    global calls
    real_save(obj, f, *args, **kwargs)
    calls += isinstance(f, str) and 'training-state-' in f
    if calls == count:
        os.truncate(f, os.path.getsize(f) // 2)
        os._exit(137)


def dump(obj, f, *args, **kwargs):
    global calls
    calls += 'network-snapshot-' in getattr(f, 'name', '')
    if calls == count:
        data = pickle.dumps(obj, *args, **kwargs)
        f.write(data[:len(data) // 2])
        f.flush()
        os._exit(137)
    real_dump(obj, f, *args, **kwargs)


if what == 'state':
    torch.save = save
else:
    pickle.dump = dump
import train
train.main()
'''


def tick_lines(log):
    if not os.path.isfile(log):
        return 0
    with open(log, errors='replace') as f:
        return sum(line.startswith('tick ') for line in f)


def kill_after_ticks(command, env, outdir, ticks, delay):
    """Start command; SIGKILL it `delay` seconds after `ticks` more tick lines
    reached the log (or let it finish first). Returns its return code."""
    log_glob = os.path.join(outdir, '*', 'log.txt')
    before = sum(tick_lines(p) for p in glob.glob(log_glob))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if sum(tick_lines(p) for p in glob.glob(log_glob)) >= before + ticks:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=60)


def temporaries(run_dir):
    return [n for n in os.listdir(run_dir) if n.startswith('.') and n.endswith('.tmp')]


def test_killed_anywhere_resumes_bit_exact(shapes_zip, reference_run, tmp_path, module_env):
    """Die halfway through the 3rd state write, then halfway through a snapshot
    write, then SIGKILL twice at seeded random moments, with a corrupt newer
    state planted on the way: the same command each time, and the end equals
    the uninterrupted run bit for bit."""
    outdir = tmp_path / 'runs'
    args = train_args(outdir, shapes_zip, '--snapshot-format=both')
    driver = tmp_path / 'die_while_writing.py'
    driver.write_text(DIE_WHILE_WRITING)

    returncode, _ = run([sys.executable, str(driver), 'state', '3', *args], module_env)
    assert returncode == 137
    run_dir = run_dir_of(outdir)
    assert len(temporaries(run_dir)) == 1   # the half-written state, under its temporary name
    assert runs.load_state(os.path.join(run_dir, 'training-state-000000.pt'))['step'] == 2   # the complete one before

    truncated = os.path.join(run_dir, 'training-state-000009.pt')   # newest by name, unreadable
    with open(os.path.join(run_dir, 'training-state-000000.pt'), 'rb') as src, open(truncated, 'wb') as dst:
        dst.write(src.read()[:1000])
    returncode, output = run([sys.executable, str(driver), 'snapshot', '2', *args], module_env)
    assert returncode == 137
    assert f'Skipping unreadable training state: Cannot read training state {truncated}' in output
    assert f'from {os.path.join(run_dir, "training-state-000000.pt")}' in output
    assert 'Removed 1 unfinished temporary files of an interrupted run' in output
    assert len(temporaries(run_dir)) == 1   # now the half-written snapshot

    rng = random.Random(2024)
    for _ in range(2):
        returncode = kill_after_ticks([sys.executable, TRAIN_PY, *args], module_env, outdir, ticks=rng.randint(1, 4),
                                      delay=rng.uniform(0, 0.25))
        assert returncode == -signal.SIGKILL   # killed before the end
    returncode, output = run([sys.executable, TRAIN_PY, *args], module_env)
    assert returncode == 0, output[-3000:]

    weights, steps = final_weights(run_dir)
    assert steps == run_steps()
    assert_same_weights(weights, reference_run[1])
    assert temporaries(run_dir) == []
    with open(os.path.join(run_dir, 'log.txt')) as f:
        assert f.read().count('Resuming from') >= 3
    with open(os.path.join(run_dir, 'stats.jsonl')) as f:
        records = [json.loads(line) for line in f]   # whole lines only
    assert records[-1]['Progress/kimg']['mean'] == pytest.approx(run_progress()[1] / 1000)


def test_newest_readable_state_is_found(tmp_path, capsys):
    """By kimg number, newest first; an unreadable one is skipped with a note."""
    for kimg in (1, 2, 3):
        torch.save(dict(format='patch-diffusion-state-v1', step=kimg), tmp_path / f'training-state-{kimg:06d}.pt')
    assert runs.find_latest_state(str(tmp_path)) == str(tmp_path / 'training-state-000003.pt')
    data = (tmp_path / 'training-state-000003.pt').read_bytes()
    (tmp_path / 'training-state-000003.pt').write_bytes(data[:len(data) - 30])
    (tmp_path / '.training-state-000004.pt.abcd1234.tmp').write_bytes(data)   # a temporary is never a state
    assert runs.find_latest_state(str(tmp_path)) == str(tmp_path / 'training-state-000002.pt')
    assert 'Skipping unreadable training state: Cannot read training state' in capsys.readouterr().out


def test_stale_temporaries_are_removed_and_only_they(tmp_path):
    names = ['.training-state-000001.pt.k2j4_x9a.tmp', '.network-snapshot-000001.pkl.abcdefgh.tmp']
    keep = ['training-state-000001.pt', '.hidden', 'notes.tmp', '.x.tmp']
    for name in names + keep:
        (tmp_path / name).write_bytes(b'x')
    (tmp_path / '.dataset.zip.a1b2c3d4.tmp').mkdir()   # atomic_path also stages folders
    assert dnnlib.util.remove_stale_temp_files(str(tmp_path)) == sorted(names + ['.dataset.zip.a1b2c3d4.tmp'])
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_failed_atomic_write_leaves_no_new_folder(tmp_path):
    """Nothing half-written, not even the folders made for the file."""
    target = tmp_path / 'a' / 'b' / 'out.bin'
    with pytest.raises(OSError, match='No space left'):
        with dnnlib.util.atomic_write(target) as f:
            f.write(b'half')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path) == []
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'keep.txt').write_text('x')
    with pytest.raises(OSError):
        with dnnlib.util.atomic_write(target) as f:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert os.listdir(tmp_path / 'a') == ['keep.txt']


def test_append_line_writes_whole_lines(tmp_path):
    """A line cut short by a kill is dropped before the next one is appended."""
    path = tmp_path / 'stats.jsonl'
    dnnlib.util.append_line(path, '{"a": 1}')
    with open(path, 'ab') as f:
        f.write(b'{"a": 2, "b"')   # what a kill in the middle of a write would leave
    dnnlib.util.append_line(path, '{"a": 3}')
    assert path.read_text() == '{"a": 1}\n{"a": 3}\n'
    path.write_bytes(b'no newline at all')
    dnnlib.util.append_line(path, 'x')
    assert path.read_text() == 'x\n'


# ----------------------------------------------------------------------------
# Disk full, NaN (in-process, through the command line).

SHORT_FLAGS = [f for f in RUN_FLAGS if not f.startswith('--duration')] + ['--duration=0.00006']   # 4 steps


@pytest.fixture
def in_process(monkeypatch):
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'PD_DEBUG'):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_in_process(outdir, data):
    return CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={data}', *SHORT_FLAGS])


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith('Error:')]


@pytest.mark.parametrize('what', ['state', 'snapshot'])
def test_disk_full_is_a_clear_error_and_keeps_the_files_before(what, shapes_zip, tmp_path, monkeypatch, in_process):
    """ENOSPC halfway through the 3rd write of a state (torch.save) or a snapshot
    (pickle.dump): one error line naming the file; the file of the tick before
    is untouched and readable; no temporaries."""
    outdir = tmp_path / 'runs'
    name = 'training-state-000000.pt' if what == 'state' else 'network-snapshot-000000.pkl'
    seen = dict(calls=0, before=None)
    real = torch.save if what == 'state' else pickle.dump

    def full_disk(obj, f, *args, **kwargs):
        target = 'training-state-' in f if isinstance(f, str) else 'network-snapshot-' in getattr(f, 'name', '')
        seen['calls'] += target   # (pickling a tensor calls torch.save on a BytesIO)
        if seen['calls'] < 3 or not target:
            return real(obj, f, *args, **kwargs)
        seen['before'] = open(os.path.join(run_dir_of(outdir), name), 'rb').read()
        if hasattr(f, 'write'):
            f.write(b'half of it')
        else:
            open(f, 'wb').write(b'half of it')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch if what == 'state' else pickle, 'save' if what == 'state' else 'dump', full_disk)

    result = run_in_process(outdir, shapes_zip)
    assert result.exit_code == 1
    (line,) = error_lines(result)
    run_dir = run_dir_of(outdir)
    assert f'Cannot write {os.path.join(run_dir, name)}: No space left on device' in line
    assert 'untouched' in line and 'Traceback' not in result.output
    with open(os.path.join(run_dir, name), 'rb') as f:
        assert f.read() == seen['before']
    if what == 'state':
        assert runs.load_state(os.path.join(run_dir, name))['step'] == 2
    else:
        snapshots.load_network(os.path.join(run_dir, name))
    assert temporaries(run_dir) == []


class NaNFromCall(loss_lib.EDMLoss):
    """The EDM loss, times NaN from call `first_bad` (0-based) on: one call per step here."""

    def __init__(self, first_bad):
        super().__init__()
        self.first_bad, self.calls = first_bad, 0

    def __call__(self, *args, **kwargs):
        loss = super().__call__(*args, **kwargs)
        self.calls += 1
        return loss * float('nan') if self.calls > self.first_bad else loss


def test_nan_stop_then_resume_equals_a_run_without_nan(shapes_zip, tmp_path, monkeypatch, in_process):
    reference = run_in_process(tmp_path / 'reference', shapes_zip)
    assert reference.exit_code == 0, reference.output

    outdir = tmp_path / 'runs'
    with monkeypatch.context() as patch:
        patch.setitem(loss_lib.LOSSES, 'edm', lambda: NaNFromCall(2))
        result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_zip}', *SHORT_FLAGS,
                                                 '--max-bad-steps=0'])
    assert result.exit_code == 1
    (line,) = error_lines(result)
    assert 'non-finite gradients' in line and 'step 2,' in line and 'tick 2.' in line
    run_dir = run_dir_of(outdir)
    assert runs.load_state(os.path.join(run_dir, 'training-state-000000.pt'))['step'] == 2

    resumed = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_zip}', *SHORT_FLAGS,
                                              '--max-bad-steps=0'])
    assert resumed.exit_code == 0, resumed.output
    assert f'Resuming run {run_dir}' in resumed.output
    a = runs.load_state(os.path.join(run_dir, 'training-state-000000.pt'))
    b = runs.load_state(os.path.join(run_dir_of(tmp_path / 'reference'), 'training-state-000000.pt'))
    assert a['step'] == b['step'] == 4
    assert_same_weights(a['net'], b['net'])
    assert_same_weights(a['ema'], b['ema'])


# ----------------------------------------------------------------------------
# Safe formats.

def test_safetensors_snapshot_generates_the_same_images_as_the_pickle(reference_run, tmp_path, in_process):
    run_dir, _ = reference_run
    images = {}
    for ext in ('pkl', 'safetensors'):
        outdir = tmp_path / ext
        result = CliRunner().invoke(generate.main, [f'--network={run_dir}/network-snapshot-000000.{ext}',
                                                    f'--outdir={outdir}', '--seeds=0-1', '--steps=3', '--device=cpu'])
        assert result.exit_code == 0, result.output
        images[ext] = {n: (outdir / n).read_bytes() for n in sorted(os.listdir(outdir))}
    assert list(images['pkl']) == ['000000.png', '000001.png'] and images['pkl'] == images['safetensors']


class NotOurs(torch.nn.Linear):
    """A module with a denoiser's attributes that is none of our preconditioners."""
    img_channels, label_dim, sigma_min, sigma_max = 3, 0, 0, 80

    def round_sigma(self, sigma):
        return sigma


def test_converter_round_trip_and_refusal(reference_run, tmp_path):
    run_dir, weights = reference_run
    dest = snapshots.convert_snapshot(os.path.join(run_dir, 'network-snapshot-000000.pkl'),
                                     str(tmp_path / 'net.safetensors'))
    net, meta = snapshots.load_network(dest)
    assert all(torch.equal(v, weights[f'pkl.{k}']) for k, v in misc.named_params_and_buffers(net))
    assert meta.dataset_kwargs['resolution'] == 32 and meta.patch_kwargs['real_p'] == 0.5

    other = tmp_path / 'other.pkl'
    with open(other, 'wb') as f:
        pickle.dump(dict(ema=NotOurs(2, 2)), f)
    with pytest.raises(ValueError, match="Only this code's preconditioners"):
        snapshots.convert_snapshot(str(other), str(tmp_path / 'other.safetensors'))
    assert not (tmp_path / 'other.safetensors').exists()


def test_transfer_from_safetensors_copies_every_tensor(reference_run):
    run_dir, weights = reference_run
    net, _ = snapshots.load_network(os.path.join(run_dir, 'network-snapshot-000000.pkl'))
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        fresh = architectures.build_network(json.load(f)['network_kwargs'], 32, 3, 0)
    assert not torch.equal(next(fresh.parameters()), next(net.parameters()))
    copied, missing = snapshots.transfer_weights(os.path.join(run_dir, 'network-snapshot-000000.safetensors'), fresh)
    assert missing == [] and len(copied) == len(misc.named_params_and_buffers(net))
    assert all(torch.equal(v, weights[f'pkl.{k}']) for k, v in misc.named_params_and_buffers(fresh))


def test_pickle_trust_note_once_per_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(persistence, '_trust_note_shown', False)
    path = tmp_path / 'x.pkl'
    path.write_bytes(pickle.dumps(dict(a=1)))
    for _ in range(2):
        with open(path, 'rb') as f:
            assert persistence.load_network_pickle(f) == dict(a=1)
    out = capsys.readouterr().out
    assert out.count(persistence.TRUST_NOTE) == 1 and 'trust' in persistence.TRUST_NOTE


# ----------------------------------------------------------------------------
# Several processes (gloo on CPU).

@pytest.mark.slow
def test_a_dead_rank_makes_the_other_exit_quickly(shapes_zip, tmp_path, module_env, free_port):
    """Two processes without torchrun's agent; rank 1 is SIGKILLed from outside
    mid-run: rank 0 stops with one error line instead of waiting for it."""
    args = [sys.executable, TRAIN_PY] + train_args(tmp_path / 'runs', shapes_zip)
    procs = [start(args, dict(module_env, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port), WORLD_SIZE='2',
                              RANK=str(rank), LOCAL_RANK=str(rank))) for rank in (0, 1)]
    (rank0, lines), (rank1, _) = procs
    try:
        wait_for_ticks(rank0, lines, 3)
        rank1.kill()
        died = time.time()
        rank0.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail('rank 0 kept waiting for the dead rank 1')
    finally:
        for proc, _ in procs:
            kill_family(proc)
    assert time.time() - died < 60
    assert rank0.returncode == 1
    time.sleep(0.3)   # the reader thread takes the last lines
    output = ''.join(lines)
    errors = [line for line in output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'another process of the run failed or was killed' in errors[0], output[-3000:]
    assert 'Traceback' not in output


@pytest.mark.slow
def test_torchrun_restart_after_a_dead_rank_is_bit_exact(shapes_zip, tmp_path, module_env):
    """torchrun --max-restarts=1; rank 1 is SIGKILLed from outside mid-run: the
    restart resumes (same command, same --outdir) and ends with the weights
    of an uninterrupted 2-process run."""
    final = {}
    for name in ('plain', 'killed'):
        command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                   '--max-restarts=1', TRAIN_PY] + train_args(tmp_path / name, shapes_zip)
        process, lines = start(command, module_env)
        try:
            if name == 'killed':
                wait_for_ticks(process, lines, 3)
                [rank1] = [p for p in psutil.Process(process.pid).children() if p.environ().get('RANK') == '1']
                rank1.kill()
            process.wait(timeout=240)
        finally:
            kill_family(process)
        time.sleep(0.3)
        output = ''.join(lines)
        assert process.returncode == 0, output[-5000:]
        run_dir = run_dir_of(tmp_path / name)
        final[name] = runs.load_state(os.path.join(run_dir, 'training-state-000000.pt'))
        if name == 'killed':
            assert 'Resuming run' in output
    assert final['plain']['step'] == final['killed']['step'] == run_steps()
    assert_same_weights(final['plain']['net'], final['killed']['net'])
    assert_same_weights(final['plain']['ema'], final['killed']['ema'])
