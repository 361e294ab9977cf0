"""Stopping early on shared clusters (training/stopping.py): SIGTERM, SIGINT
or SIGUSR1 on any rank stops all ranks at one step boundary with a training
state and exit status 75, and the same command resumes bit-exact;
--max-minutes does the same; a rank that stops answering ends the job within
--hang-timeout, named; an out-of-memory step says what to change."""

import contextlib
import glob
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from proctools import job_processes, kill_family, start, wait_for_ticks

from dataset_prep.archive import convert_dataset
from training import runs, stopping

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
    """Runs without interruptions: a single-process one ('long') and a
    two-process one with a DataLoader worker per rank ('two')."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    root = tmp_path_factory.mktemp('reference')
    assert run([sys.executable, TRAIN_PY, *args(root / 'long', shapes_zip, '--duration=0.0008')], env)[0] == 0
    code, output = run(torchrun(2, *args(root / 'two', shapes_zip, '--duration=0.002', '--workers=1')), env)
    assert code == 0, output[-3000:]
    return dict(long=latest_state(root / 'long')[0], two=latest_state(root / 'two')[0])


def finish(process, lines, family=(), timeout=120):
    """Wait for the run and its processes (`family`: those started under it,
    which may outlive it), then return its whole output."""
    try:
        process.wait(timeout=timeout)
        psutil.wait_procs(list(family), timeout=timeout)
    finally:
        kill_family(process)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
    time.sleep(0.3)   # the reader thread takes the last lines
    return ''.join(lines)


def ranks(agent_pid):
    """{rank: psutil.Process} of the train.py processes that a torchrun agent runs (its children;
    their DataLoader workers, their children, have the same command line)."""
    found = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(agent_pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if TRAIN_PY in ' '.join(child.cmdline()) and 'RANK' in child.environ():
                    found[int(child.environ()['RANK'])] = child
    return found


def send(processes, signum):
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signum)


def kimg_of(lines):
    """The kimg of the newest tick line, or -1."""
    ticks = [line.split() for line in list(lines) if line.startswith('tick ')]
    return float(ticks[-1][3]) if ticks else -1.0


def stopped_step(output):
    """(step, reason) of the one 'Stopped at kimg ... (step N): REASON' line."""
    found = re.findall(r'^Stopped at kimg [0-9.]+ \(step (\d+)\): (.*)$', output, re.MULTILINE)
    assert len(found) == 1, output[-3000:]
    return int(found[0][0]), found[0][1]


@pytest.mark.parametrize('name', ['SIGTERM', 'SIGINT', 'SIGUSR1'])
def test_a_signal_from_outside_stops_at_a_step_boundary_and_the_same_command_resumes_bit_exact(
        shapes_zip, reference, tmp_path, name):
    """One process, signalled from outside mid-run: one line, exit 75, a state of
    the step it names; the same command continues to the uninterrupted weights."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')
    command = [sys.executable, TRAIN_PY, *args(tmp_path, shapes_zip, '--duration=0.0008')]
    process, lines = start(command, env)
    wait_for_ticks(process, lines, 2)
    process.send_signal(getattr(signal, name))
    output = finish(process, lines)
    assert process.returncode == stopping.EXIT_STOPPED, output[-3000:]
    step, reason = stopped_step(output)
    assert reason.startswith(f'{name} received on rank 0.') and 'run the same command to resume' in reason
    assert 'Traceback' not in output
    state, _ = latest_state(tmp_path)
    assert state['step'] == step and 0 < state['nimg'] < 800
    if name != 'SIGTERM':
        return   # the state is the same whichever signal stopped the run: resume once, for SIGTERM
    code, output = run(command, env)
    assert code == 0 and 'Resuming run' in output, output[-3000:]
    assert_same_training(latest_state(tmp_path)[0], reference['long'])


# How a job's processes get a signal: each a delivery to a running torchrun job.
def to_everyone(job, signum):        # SLURM (--signal, scancel, the time limit): every process of the job
    send(job_processes(job.pid), signum)


def to_everyone_twice(job, signum):   # ... and again, as SLURM and then torchrun's agent both do
    to_everyone(job, signum)
    time.sleep(0.5)
    to_everyone(job, signum)


def to_the_agent(job, signum):       # a container runtime, Kubernetes, Ctrl-C: the first process only
    send(job_processes(job.pid)[:1], signum)


def to_one_rank(job, signum):
    send([ranks(job.pid)[1]], signum)


def to_a_loader_worker(job, signum):   # a DataLoader worker of rank 0 alone
    send(ranks(job.pid)[0].children()[:1], signum)


DELIVERIES = [(to_everyone_twice, signal.SIGTERM), (to_the_agent, signal.SIGTERM), (to_one_rank, signal.SIGTERM),
              (to_a_loader_worker, signal.SIGTERM), (to_the_agent, signal.SIGINT), (to_everyone, signal.SIGUSR1)]


@pytest.mark.slow
def test_every_way_a_scheduler_signals_a_torchrun_job_stops_it_cleanly(shapes_zip, reference, tmp_path):
    """A 2-rank torchrun job with a DataLoader worker per rank, signalled from
    outside in each way schedulers do, one after the other (the same command
    run again in between): each time every rank stops at one step with a
    state, no worker dies, and no error is printed; last, the agent is
    SIGKILLed and the orphaned ranks stop with a state within
    --hang-timeout. The final rerun ends bit-identical to an uninterrupted run."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')
    command = torchrun(2, *args(tmp_path, shapes_zip, '--duration=0.002', '--workers=1', '--hang-timeout=20'))
    done = 0
    for deliver, signum in DELIVERIES + [(None, signal.SIGKILL)]:
        process, lines = start(command, env)
        wait_for_ticks(process, lines, 2)
        family = ranks(process.pid)
        assert len(family) == 2 and all(len(rank.children()) == 1 for rank in family.values())
        if deliver is None:   # the agent dies (the OOM killer, kill -9): its ranks are orphans
            process.kill()
            killed = time.time()
            _, alive = psutil.wait_procs(list(family.values()), timeout=20)
            assert not alive, f'ranks still running {time.time() - killed:.0f} s after the agent died'
        else:
            deliver(process, signum)
        output = finish(process, lines, family.values())
        assert process.returncode != 0, output[-3000:]   # torchrun reports the ranks' status 75 as a failure
        step, reason = stopped_step(output)
        expected = 'its torchrun agent is gone' if deliver is None else f'{signum.name} received on rank'
        assert expected in reason, (deliver, reason)
        assert 'DataLoader worker' not in output and '\nError:' not in output, output[-3000:]
        state, _ = latest_state(tmp_path)
        assert state['step'] == step > done, (deliver, step, done)
        done = step
    code, output = run(command, env)
    assert code == 0, output[-3000:]
    assert_same_training(latest_state(tmp_path)[0], reference['two'])


ORPHAN = """
import time
from training import stopping
with stopping.StopControl(hang_timeout=1):
    print('ready', flush=True)
    time.sleep(60)   # never reaches a step boundary
"""

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, sys.argv[1]])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_an_orphan_that_cannot_reach_a_step_boundary_exits_after_the_hang_timeout(tmp_path):
    """Under torchrun (TORCHELASTIC_RUN_ID set), a rank whose agent (parent)
    dies and that does not reach a step boundary exits after --hang-timeout,
    saying why."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1', TORCHELASTIC_RUN_ID='t')
    (tmp_path / 'orphan.py').write_text(ORPHAN)
    parent = subprocess.Popen([sys.executable, '-c', PARENT, str(tmp_path / 'orphan.py')], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        assert parent.stdout.readline().strip() == 'ready'
        parent.kill()
        parent.wait()
        killed = time.time()
        child.wait(timeout=30)   # its exit status goes to its new parent, not to us
    finally:
        kill_family(parent)
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    output = parent.stdout.read()
    assert time.time() - killed < 10
    assert f'its torchrun agent (pid {parent.pid}) is gone' in output and '--hang-timeout=1 s' in output, output


def test_repeated_sigterms_are_one_request_and_a_second_ctrl_c_forces():
    """In this process: SIGTERM twice and a SIGUSR1 are one request; a second
    SIGINT raises KeyboardInterrupt at once (Python's default Ctrl-C, set here:
    a process started in the background of a shell inherits SIGINT ignored)."""
    before = signal.getsignal(signal.SIGTERM)
    with stopping.StopControl() as stopper:
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGUSR1)
        assert stopper.poll(3) == 'SIGTERM received on rank 0'
    assert signal.getsignal(signal.SIGTERM) is before
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stopping.StopControl() as stopper:
            signal.raise_signal(signal.SIGINT)
            assert stopper.received == signal.SIGINT
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, inherited)


SBATCH = os.path.join(REPO, 'docs', 'train.sbatch')
STAND_INS = {   # SLURM's commands as the batch script uses them, on one machine
    'srun': '#!/bin/sh\nexec "$@"\n',
    'scontrol': '#!/bin/sh\ncase "$1" in\n  show) echo 127.0.0.1 ;;\n  requeue) echo "$2" >> "$REQUEUED" ;;\nesac\n',
    'torchrun': f'#!/bin/sh\nexec {sys.executable} -m torch.distributed.run "$@"\n',
}


@pytest.mark.slow
def test_the_slurm_script_stopped_and_requeued_five_times_ends_bit_identical(shapes_zip, reference, tmp_path):
    """docs/train.sbatch as SLURM runs it, with stand-ins for srun (runs its
    command) and scontrol (names this host; `requeue` leaves a mark): at five
    seeded random moments every process of the job step gets SIGTERM, as
    --signal=TERM@N delivers it; each time the script requeues itself, and the
    requeued job (the same script with the same arguments) resumes. The job
    that finishes ends bit-identical to an uninterrupted run."""
    import numpy as np
    from proctools import free_port
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    requeued = tmp_path / 'requeued'
    env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}', SLURM_NNODES='1', SLURM_JOB_ID='4242',
               SLURM_JOB_NODELIST='node0', GPUS_PER_NODE='2', RDZV_PORT=str(free_port()), REQUEUED=str(requeued),
               OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')
    command = ['bash', SBATCH, *args(tmp_path / 'runs', shapes_zip, '--duration=0.002', '--workers=1')]
    moments = sorted(np.random.default_rng(25).uniform(0.05, 0.8, size=5) * 2.0)   # kimg, of the run's 2
    jobs = 0
    while True:
        jobs += 1
        assert jobs <= 10, f'{jobs} jobs for {len(moments)} signals'
        requeued.unlink(missing_ok=True)
        script, lines = start(command, env, cwd=REPO)
        if moments:
            at = moments.pop(0)
            while script.poll() is None and kimg_of(lines) < at:
                time.sleep(0.05)
            send(job_processes(script.pid, include_root=False), signal.SIGTERM)   # the step, not the batch shell
        output = finish(script, lines, timeout=180)
        assert script.returncode == 0, output[-3000:]   # the script's status is scontrol's
        if not requeued.exists():
            break
        assert requeued.read_text() == '4242\n' and 'received on rank' in output, output[-3000:]
    assert jobs == 6 and not moments, output[-3000:]
    assert 'Resuming run' in output
    assert_same_training(latest_state(tmp_path / 'runs')[0], reference['two'])


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
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO)
    command = torchrun(2, *args(tmp_path, shapes_zip, '--duration=1', '--hang-timeout=10', '--dump=1'))
    process, lines = start(command, env)
    wait_for_ticks(process, lines, 3)
    started = time.time()
    assert _deliver(process, 'SIGSTOP', 1, lines)   # waits for the error line, then kills the stopped rank
    output = finish(process, lines)
    elapsed = time.time() - started
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


def test_a_loader_worker_killed_by_something_else_ends_the_run_with_a_clear_error(shapes_zip, tmp_path):
    """SIGKILL of a DataLoader worker (the OOM killer) is no request to stop:
    the run ends with one error line naming the worker, exit status 1."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=REPO, PYTHONUNBUFFERED='1')
    process, lines = start([sys.executable, TRAIN_PY, *args(tmp_path, shapes_zip, '--duration=0.0008',
                                                            '--workers=1')], env)
    wait_for_ticks(process, lines, 2)
    send(psutil.Process(process.pid).children()[:1], signal.SIGKILL)
    output = finish(process, lines)
    assert process.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1 and 'DataLoader worker (pid' in errors[0] and 'killed by signal' in errors[0], output


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


def _deliver(process, kind, rank, lines):
    """Deliver one fault to `rank` of the running torchrun `process`; returns False if the run ended first."""
    workers = ranks(process.pid)
    if rank not in workers:
        return False
    victim = workers[rank]
    try:
        if kind == 'SIGKILL':
            victim.kill()
        elif kind == 'SIGTERM':
            victim.terminate()
        else:   # SIGSTOP: alive but stuck; the other rank must end the job, then the stopped one is cleaned up
            mark = len(lines)
            victim.suspend()
    except psutil.NoSuchProcess:
        return False
    if kind == 'SIGSTOP':
        # The other rank's HungRank error ("...: no answer for N s (--hang-timeout)", whichever rank it
        # names) ends the job; torchrun may kill the stopped rank itself when it restarts the workers.
        deadline = time.time() + 60
        while (time.time() < deadline and process.poll() is None and _alive(victim)
               and not any('no answer for' in line for line in lines[mark:])):
            time.sleep(0.2)
        with contextlib.suppress(psutil.NoSuchProcess):
            victim.kill()
    return True


def _alive(proc):
    """Whether a process still exists (a zombie, dead but not yet reaped, does not count)."""
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_soak_ten_faults_across_two_ranks_end_bit_identical(shapes_zip, tmp_path):
    """SIGKILL, SIGTERM and SIGSTOP of one of two ranks, ten in all, each once
    the run has passed a seeded random share of its images (so all ten land
    before the end whatever the machine's speed); torchrun --max-restarts
    restarts the workers, and when it gives up the same command is run again."""
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
    survived, invocations = 0, 0
    while True:
        process, lines = start(command, env)
        invocations += 1
        while faults and process.poll() is None:
            kind, rank, at = faults[0]
            while process.poll() is None and kimg_of(lines) < at:
                time.sleep(0.05)
            if process.poll() is None and _deliver(process, kind, rank, lines):
                faults.pop(0)
                survived += 1
                print(f'fault {survived}: {kind} to rank {rank} at kimg {kimg_of(lines):.3f}', flush=True)
                mark = len(lines)   # the next fault waits for a tick line after this one
                while process.poll() is None and not any(line.startswith('tick ') for line in lines[mark:]):
                    time.sleep(0.05)
            else:
                time.sleep(0.05)   # its workers are being restarted: look again
        output = finish(process, lines, timeout=300)
        print(f'invocation {invocations}: exit {process.returncode}, last tick at kimg {kimg_of(lines):.3f}',
              flush=True)
        if process.returncode == 0 and not faults:
            break
        # A run that reached its end before the faults were all delivered is the harness's failure, not a
        # hang to retry: say so with the invocation's own output rather than running the command 20 times.
        assert 'Nothing to do' not in output and kimg_of(lines) < duration * 1000, (
            f'the run ended with {len(faults)} faults not delivered ({faults}); its output:\n{output[-6000:]}')
        assert invocations < 20, output[-3000:]
    print(f'Survived {survived} faults ({invocations} invocations of the same command)')
    assert survived == 10
    assert_same_training(latest_state(tmp_path / 'faults')[0], latest_state(tmp_path / 'straight')[0])
