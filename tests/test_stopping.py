"""Stopping early on shared clusters (training/stopping.py): SIGTERM, SIGINT
or SIGUSR1 on any rank stops all ranks at one step boundary with a training
state and exit status 75, and the same command resumes bit-exact;
--max-minutes does the same; a rank that stops answering ends the job within
--hang-timeout, named; an out-of-memory step says what to change."""

import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from training import runs, stopping
from training.archive import convert_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_PY = os.path.join(REPO, 'train.py')
TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0', '--device=cpu',
        '--augment=0', '--dropout=0']


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('data') / 'shapes-32x32.zip')
    convert_dataset('demo:shapes:16', path, resolution=(32, 32))
    return path


def args(outdir, data, *extra):
    return [f'--outdir={outdir}', f'--data={data}', '--batch=4', '--real_p=0.5', '--seed=5', '--duration=0.0002',
            '--tick=0.05', '--snap=100', '--dump=100', '--samples=0', '--lr-rampup=0.05', *TINY, *extra]


def run(command, env, timeout=300):
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stdout + result.stderr


def torchrun(nproc, *rest):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', TRAIN_PY,
            *rest]


def latest_state(outdir):
    [run_dir] = glob.glob(os.path.join(outdir, '0*'))
    return runs.load_state(runs.find_latest_state(run_dir)), run_dir


def assert_same_training(a, b):
    assert (a['step'], a['nimg']) == (b['step'], b['nimg'])
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key
    for x, y in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(x[k], y[k]) for k in y)


@pytest.fixture(scope='module')
def reference(shapes_zip, tmp_path_factory):
    """A single-process run without interruptions, and a two-process one."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    root = tmp_path_factory.mktemp('reference')
    assert run([sys.executable, TRAIN_PY, *args(root / 'one', shapes_zip)], env)[0] == 0
    code, output = run(torchrun(2, *args(root / 'two', shapes_zip)), env)
    assert code == 0, output[-3000:]
    return dict(one=latest_state(root / 'one')[0], two=latest_state(root / 'two')[0])


@pytest.mark.parametrize('name', ['SIGTERM', 'SIGINT', 'SIGUSR1'])
def test_a_signal_stops_at_a_step_boundary_and_the_same_command_resumes_bit_exact(
        shapes_zip, reference, tmp_path, name):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    command = [sys.executable, TRAIN_PY, *args(tmp_path, shapes_zip)]
    code, output = run(command, dict(env, PD_TEST_SIGNAL_AT=f'0:7:{name}'))
    assert code == stopping.EXIT_STOPPED, output[-3000:]
    assert f'Stopped at kimg 0.' in output and f'(step 8): {name} received on rank 0' in output
    assert 'run the same command to resume' in output and 'Traceback' not in output
    state, _ = latest_state(tmp_path)
    assert state['step'] == 8
    if name != 'SIGTERM':
        return   # the state is the same whichever signal stopped the run: resume once, for SIGTERM
    code, output = run(command, env)
    assert code == 0 and 'Resuming run' in output, output[-3000:]
    assert_same_training(latest_state(tmp_path)[0], reference['one'])


def test_a_signal_to_one_rank_stops_both_at_the_same_step(shapes_zip, reference, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    command = torchrun(2, *args(tmp_path, shapes_zip))
    code, output = run(command, dict(env, PD_TEST_SIGNAL_AT='1:5:SIGTERM'))
    assert code != 0, output[-3000:]   # torchrun reports the workers' status 75 as its own failure
    assert '(step 6): SIGTERM received on rank 1' in output
    assert latest_state(tmp_path)[0]['step'] == 6
    code, output = run(command, env)
    assert code == 0, output[-3000:]
    assert_same_training(latest_state(tmp_path)[0], reference['two'])


def test_an_external_sigterm_mid_run_resumes_bit_exact(shapes_zip, reference, tmp_path):
    """A real SIGTERM from outside, at whatever step the run is at."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    command = [sys.executable, TRAIN_PY, *args(tmp_path, shapes_zip, '--duration=0.0008')]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith('tick 1 '):   # training for a while
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=120)[0]
    assert process.returncode == stopping.EXIT_STOPPED, output[-3000:]
    stopped, _ = latest_state(tmp_path)
    assert 0 < stopped['nimg'] < 800
    code, output = run(command, env)
    assert code == 0, output[-3000:]
    longer = tmp_path / 'straight'
    assert run([sys.executable, TRAIN_PY, *args(longer, shapes_zip, '--duration=0.0008')], env)[0] == 0
    assert_same_training(latest_state(tmp_path)[0], latest_state(longer)[0])


def test_max_minutes_stops_with_a_state(shapes_zip, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    code, output = run([sys.executable, TRAIN_PY, *args(tmp_path, shapes_zip, '--duration=1', '--max-minutes=0.05',
                                                        '--snapshot-on-stop=1')], env)
    assert code == stopping.EXIT_STOPPED, output[-3000:]
    assert 'the --max-minutes limit was reached' in output
    state, run_dir = latest_state(tmp_path)
    assert state['step'] > 0 and glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl'))


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_within_the_hang_timeout_naming_it(shapes_zip, tmp_path):
    """SIGSTOP of rank 1 mid-run: rank 0 ends the job after --hang-timeout, naming rank 1 (the stopped
    process is then killed, as a scheduler cleans up, so that torchrun need not wait for it)."""
    import threading
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    command = torchrun(2, *args(tmp_path, shapes_zip, '--duration=1', '--hang-timeout=10', '--dump=1'))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        while process.poll() is None and sum(line.startswith('tick ') for line in list(lines)) < 3:
            time.sleep(0.1)
        start = time.time()
        assert _deliver(process, 'SIGSTOP', 1, lines)   # waits for the error line, then kills the stopped rank
        process.wait(timeout=120)
        elapsed = time.time() - start
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    output = ''.join(lines)
    assert process.returncode != 0
    assert elapsed < 120, f'took {elapsed:.0f} s'
    assert 'rank 1 (at step' in output and 'stopped making progress' in output and '--hang-timeout' in output
    state, _ = latest_state(tmp_path)   # the last complete state is readable
    assert state['step'] > 0


# ----------------------------------------------------------------------------
# Out of memory, bad data.


def test_out_of_memory_names_the_round_and_the_batch_gpu_that_fits(shapes_zip, monkeypatch):
    from training.config import build_config, trainer_kwargs
    from training.dataset import open_dataset
    from training.training_loop import StepOutOfMemory, Trainer
    options = dict(data=shapes_zip, arch='ddpmpp', cbase=8, cres=[1, 2], blocks=1, attn=[], batch=8, batch_gpu=4,
                   real_p=1.0, augment=0, dropout=0, workers=0)
    dataset = open_dataset(dict(path=shapes_zip))
    trainer = Trainer(**trainer_kwargs(build_config(options, dataset)))

    def no_memory(**kwargs):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(trainer, 'loss_fn', no_memory)
    with pytest.raises(StepOutOfMemory, match=r'Out of memory in step 0 at patch size 32, round 1 of 2 \(4 patches '
                                              r'per round\): use --batch-gpu=2 \(now 4'):
        trainer.step()
    trainer.batch_gpu = 1
    with pytest.raises(StepOutOfMemory, match='even one image per round does not fit'):
        trainer.step()


@pytest.mark.parametrize('workers', [0, 1])
def test_a_corrupt_image_met_during_training_is_named(shapes_zip, tmp_path, workers):
    import zipfile
    broken = tmp_path / 'broken.zip'
    with zipfile.ZipFile(shapes_zip) as src, zipfile.ZipFile(broken, 'w') as dst:
        for name in src.namelist():
            data = src.read(name)
            dst.writestr(name, data[:len(data) // 2] if name == '00000/img00000011.png' else data)
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    code, output = run([sys.executable, TRAIN_PY, *args(tmp_path / 'runs', broken, f'--workers={workers}',
                                                        '--cache=0')], env)
    assert code == 1
    lines = [line for line in output.splitlines() if line.startswith('Error: ')]
    assert len(lines) == 1 and 'broken.zip/00000/img00000011.png: cannot read the image' in lines[0], output[-2000:]
    assert 'Traceback' not in output


def test_a_changed_dataset_is_refused_on_resume_unless_accepted(tmp_path):
    data = str(tmp_path / 'shapes.zip')
    convert_dataset('demo:shapes:16', data, resolution=(32, 32))
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    command = [sys.executable, TRAIN_PY, *args(tmp_path / 'runs', data, '--duration=0.0001')]
    assert run(command, env)[0] == 0
    import zipfile
    with zipfile.ZipFile(data) as src:   # while the run is paused, image 3 becomes a copy of image 4
        files = {name: src.read(name) for name in src.namelist()}
    files['00000/img00000003.png'] = files['00000/img00000004.png']
    os.remove(data)
    with zipfile.ZipFile(data, 'w') as dst:
        for name, content in files.items():
            dst.writestr(name, content)
    longer = [a if not a.startswith('--duration') else '--duration=0.0002' for a in command]
    code, output = run(longer, env)
    assert code == 1 and 'The dataset changed since the training state was written: 16 files now, 16 then' in output
    assert '--accept-changed-data=1' in output and 'Traceback' not in output
    code, output = run(longer + ['--accept-changed-data=1'], env)
    assert code == 0 and 'Resuming run' in output, output[-3000:]


# ----------------------------------------------------------------------------
# Soak test: ten faults at seeded random moments, rerun as a user would.


def _workers(process):
    """The train.py processes under a torchrun process, by rank."""
    found = {}
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if TRAIN_PY in ' '.join(child.cmdline()):
                found[int(child.environ().get('RANK', -1))] = child
        except psutil.NoSuchProcess:
            continue
    return found


def _deliver(process, kind, rank, lines):
    """Deliver one fault to `rank` of the running torchrun `process`; returns False if the run ended first."""
    workers = _workers(process)
    if rank not in workers:
        return False
    victim = workers[rank]
    try:
        if kind == 'SIGKILL':
            victim.kill()
        elif kind == 'SIGTERM':
            victim.terminate()
        else:   # SIGSTOP: alive but stuck; the other rank must end the job, then the stopped one is cleaned up
            victim.suspend()
            deadline = time.time() + 60
            while time.time() < deadline and not any('stopped making progress' in line for line in lines):
                time.sleep(0.5)
            victim.kill()
    except psutil.NoSuchProcess:
        return False
    return True


def _kimg(lines):
    """The kimg of the newest tick line, or -1."""
    ticks = [line.split() for line in list(lines) if line.startswith('tick ')]
    return float(ticks[-1][3]) if ticks else -1.0


@pytest.mark.slow
def test_soak_ten_faults_across_two_ranks_end_bit_identical(shapes_zip, tmp_path):
    """SIGKILL, SIGTERM and SIGSTOP of one of two ranks, ten in all, each once
    the run has passed a seeded random share of its images (so all ten land
    before the end whatever the machine's speed); torchrun --max-restarts
    restarts the workers, and when it gives up the same command is run again."""
    import threading
    import numpy as np
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    duration = 0.001
    common = [f'--duration={duration}', '--tick=0.01', '--dump=1']
    code, output = run(torchrun(2, *args(tmp_path / 'straight', shapes_zip, *common)), env)
    assert code == 0, output[-3000:]

    rng = np.random.default_rng(2024)
    kinds = ['SIGKILL', 'SIGTERM', 'SIGSTOP'] * 3 + ['SIGKILL']
    moments = np.sort(rng.uniform(0.05, 0.9, size=len(kinds))) * duration * 1000   # kimg
    faults = [(str(kind), int(rng.integers(2)), float(at)) for kind, at in zip(rng.permutation(kinds), moments)]
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               '--max-restarts=3', TRAIN_PY, *args(tmp_path / 'faults', shapes_zip, *common, '--hang-timeout=5')]
    survived, invocations, lines = 0, 0, []
    while True:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        invocations += 1
        lines.clear()
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        while faults and process.poll() is None:
            kind, rank, at = faults[0]
            while process.poll() is None and _kimg(lines) < at:
                time.sleep(0.05)
            if process.poll() is None and _deliver(process, kind, rank, lines):
                faults.pop(0)
                survived += 1
                print(f'fault {survived}: {kind} to rank {rank} at kimg {_kimg(lines):.3f}', flush=True)
                mark = len(lines)   # the next fault waits for a tick line after this one
                while process.poll() is None and not any(line.startswith('tick ') for line in lines[mark:]):
                    time.sleep(0.05)
        process.wait(timeout=300)
        reader.join(timeout=10)
        if process.returncode == 0 and not faults:
            break
        assert invocations < 20, ''.join(lines)[-3000:]
    print(f'Survived {survived} faults ({invocations} invocations of the same command)')
    assert survived == 10
    assert_same_training(latest_state(tmp_path / 'faults')[0], latest_state(tmp_path / 'straight')[0])
