"""Process helpers shared by the multi-process tests."""

import contextlib
import subprocess

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
    procs = [subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
