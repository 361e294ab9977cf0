"""Process helpers shared by the multi-process tests."""

import contextlib

import psutil


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
