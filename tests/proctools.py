"""Process helpers shared by the multi-process tests."""

import contextlib
import subprocess
import threading
import time

import psutil
import pytest


def kill_family(proc):
    """SIGKILL a process and all its descendants (torchrun workers may sit in their own sessions)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for torch.distributed rendezvous)."""
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_all(commands, env, timeout):
    """Run `commands` at the same time; returns [(returncode, output)]. On a
    timeout every process tree is killed and the test fails (a hang)."""
    procs = [subprocess.Popen(cmd, env=env, text=True, errors='replace', stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
             for cmd in commands]
    results = []
    try:
        for proc in procs:
            output, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, output))
    except subprocess.TimeoutExpired:
        for proc in procs:
            kill_family(proc)
            proc.communicate()
        pytest.fail(f'{commands[0][:5]} did not finish within {timeout} s (hang)')
    return results


def start(command, env, **popen_kwargs):
    """(process, lines): Popen of `command` in a session of its own, its output
    (stdout and stderr) collected line by line into `lines` by a thread, as a
    log file fills."""
    # errors='replace': bytes that are not UTF-8 (a process killed mid-character) must not end the reader,
    # or the test goes on waiting for lines that never come while the job runs to its end.
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors='replace', start_new_session=True, **popen_kwargs)
    lines = []

    def read():
        try:
            for line in process.stdout:
                lines.append(line)
        except Exception as error:   # noqa: BLE001 -- said in the output the test shows, not lost in a thread
            lines.append(f'[test harness: reading the output stopped: {error!r}]\n')

    threading.Thread(target=read, daemon=True).start()
    return process, lines


def wait_for_ticks(process, lines, count, timeout=120):
    """Wait until the run has printed `count` more tick lines than it had."""
    have = sum(line.startswith('tick ') for line in list(lines))
    deadline = time.time() + timeout
    while sum(line.startswith('tick ') for line in list(lines)) < have + count:
        assert process.poll() is None and time.time() < deadline, ''.join(lines)[-3000:]
        time.sleep(0.05)


def job_processes(pid, include_root=True):
    """A process and all its live descendants (a torchrun agent, its ranks, their DataLoader workers)."""
    try:
        root = psutil.Process(pid)
        return ([root] if include_root else []) + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
