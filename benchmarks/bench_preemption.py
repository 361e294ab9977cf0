"""Time from a scheduler's SIGTERM to the training state on disk, and to exit.

torchrun's agent gives its workers a grace period between the SIGTERM it
forwards and SIGKILL (30 s by default: `--shutdown-timeout` /
TORCH_ELASTIC_SHUTDOWN_TIMEOUT in torch 2.13, fixed at 30 s in older
releases); a stop must write its training state within it. This runs
train.py as a user would (torchrun for --nproc > 1), waits for some ticks,
delivers the signal from outside as a scheduler does, and measures, per
stop, the seconds until a new training-state-*.pt is in place and until
every process of the job has exited. Each repeat resumes the run of the one
before (the same command), so the times include what a resumed run adds.

    python benchmarks/bench_preemption.py --preset=cpu-demo --nproc=2 --repeat=3
    python benchmarks/bench_preemption.py --preset=gpu-paper --nproc=1 --device=cuda

Deliveries: 'everyone' (every process of the job: SLURM's --signal, scancel)
or 'agent' (the first process only: a container runtime, Kubernetes).
Prints one JSON line per stop and a summary line.
"""

import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import click
import psutil
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from dataset_prep.archive import convert_dataset  # noqa: E402

COMMON = ['--duration=1000', '--snap=1000000', '--dump=1000000', '--samples=0', '--seed=0', '--workers=1']
PRESETS = {   # (train.py flags, image side of the demo data)
    'cpu-demo': (['--arch=ddpmpp', '--cbase=16', '--cres=1,2,2', '--blocks=2', '--attn=none', '--batch=16',
                  '--real_p=0.5', '--channels-last=1', '--dropout=0', '--augment=0', '--tick=0.1'], 32),
    'gpu-paper': (['--preset=celeba-64', '--tick=5'], 64),
}


def _job(pid):
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _newest_state_mtime(outdir):
    mtimes = [os.stat(path).st_mtime for path in glob.glob(os.path.join(outdir, '*', 'training-state-*.pt'))]
    return max(mtimes, default=0.0)


def stop_once(command, env, outdir, after_ticks, delivery, signum):
    """Run `command` until `after_ticks` tick lines, signal it, and time the stop."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    while sum(line.startswith('tick ') for line in list(lines)) < after_ticks:
        if process.poll() is not None:
            raise RuntimeError('train.py ended before it was signalled:\n' + ''.join(lines)[-3000:])
        time.sleep(0.01)
    job = _job(process.pid)
    before = _newest_state_mtime(outdir)
    signalled = time.time()
    for member in (job if delivery == 'everyone' else job[:1]):
        try:
            member.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    state_at = None
    while _running(job):
        if state_at is None and _newest_state_mtime(outdir) > before:
            state_at = time.time()
        time.sleep(0.005)
    process.wait()
    exited = time.time()
    if state_at is None and _newest_state_mtime(outdir) > before:
        state_at = exited
    ticks = [line.split() for line in lines if line.startswith('tick ')]
    stopped = [line.strip() for line in lines if line.startswith('Stopped at kimg')]
    return dict(signal_to_state_s=None if state_at is None else round(state_at - signalled, 3),
                signal_to_exit_s=round(exited - signalled, 3), sec_per_kimg=float(ticks[-1][11]) if ticks else None,
                stopped=stopped[0] if stopped else None, returncode=process.returncode)


def _running(processes):
    """How many of `processes` still run (exited ones may linger as zombies)."""
    count = 0
    for member in processes:
        try:
            count += member.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            continue
    return count


@click.command()
@click.option('--preset', type=click.Choice(sorted(PRESETS)), default='cpu-demo', show_default=True)
@click.option('--nproc', type=click.IntRange(min=1), default=2, show_default=True, help='Processes (torchrun if > 1)')
@click.option('--device', type=str, default='cpu', show_default=True)
@click.option('--delivery', type=click.Choice(['everyone', 'agent']), default='everyone', show_default=True)
@click.option('--signal', 'signame', type=click.Choice(['SIGTERM', 'SIGUSR1', 'SIGINT']), default='SIGTERM',
              show_default=True)
@click.option('--after-ticks', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--repeat', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--workdir', type=str, help='Where the data and the run go  [default: a temporary folder]')
@click.option('--json', 'json_path', type=str, help='Also write the summary to this file')
def main(preset, nproc, device, delivery, signame, after_ticks, repeat, workdir, json_path):
    """Time a preemption stop of train.py, as a scheduler delivers it."""
    flags, side = PRESETS[preset]
    workdir = workdir or tempfile.mkdtemp(prefix='bench-preemption-')
    data = os.path.join(workdir, f'shapes-{side}x{side}.zip')
    if not os.path.exists(data):
        convert_dataset('demo:shapes:256', data, resolution=(side, side))
    outdir = os.path.join(workdir, 'runs')
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
                if nproc > 1 else [sys.executable])
    command = [*launcher, os.path.join(REPO_ROOT, 'train.py'), f'--outdir={outdir}', f'--data={data}',
               f'--device={device}', *COMMON, *flags]
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    results = []
    for _ in range(repeat):
        result = stop_once(command, env, outdir, after_ticks, delivery, getattr(signal, signame))
        results.append(result)
        print(json.dumps(result), flush=True)
    state_files = glob.glob(os.path.join(outdir, '*', 'training-state-*.pt'))
    times = [r['signal_to_state_s'] for r in results if r['signal_to_state_s'] is not None]
    summary = dict(
        preset=preset, nproc=nproc, device=device, delivery=delivery, signal=signame, torch=torch.__version__,
        stops=len(results), states_written=len(times),
        signal_to_state_s_median=statistics.median(times) if times else None,
        signal_to_state_s_max=max(times, default=None),
        signal_to_exit_s_median=statistics.median(r['signal_to_exit_s'] for r in results),
        state_mb=round(max(os.path.getsize(p) for p in state_files) / 2**20, 1) if state_files else None,
        command=' '.join(command))
    if json_path:
        with open(json_path, 'w') as f:
            json.dump(summary, f)
    print(json.dumps(summary))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
