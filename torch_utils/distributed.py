"""torch.distributed set-up from torchrun's environment, or a single process.

NCCL on CUDA, gloo on CPU. Collectives time out (default 10 minutes, env
PD_DIST_TIMEOUT_S) so a dead peer cannot hang the others forever.
"""

import datetime
import os

import torch

import dnnlib

_device = None


def _env_int(name, default):
    return int(os.environ.get(name, default))


def init(device=None, timeout_s=None):
    """Initialise the process group if launched by torchrun; pick the device.

    `device`: None (CUDA if available, else CPU), 'cpu', 'cuda', or 'cuda:N'.
    Under torchrun on CUDA each process takes GPU LOCAL_RANK. Returns the
    torch.device this process uses.
    """
    global _device
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    device = torch.device(device)
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise RuntimeError('CUDA was requested but is not available; use --device=cpu')
        if device.index is None:
            device = torch.device('cuda', _env_int('LOCAL_RANK', 0) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    _device = device

    if 'WORLD_SIZE' in os.environ and not torch.distributed.is_initialized():
        if timeout_s is None:
            timeout_s = float(os.environ.get('PD_DIST_TIMEOUT_S', 600))
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        kwargs = dict(backend=backend, init_method='env://', timeout=datetime.timedelta(seconds=timeout_s))
        if device.type == 'cuda':
            kwargs['device_id'] = device
        restart = os.environ.get('TORCHELASTIC_RESTART_COUNT')
        if restart is not None:
            # torchrun keeps one store across restarts: keys of the attempt before would be read as this one's.
            store, rank, world_size = next(torch.distributed.rendezvous('env://', timeout=kwargs['timeout']))
            kwargs.update(store=torch.distributed.PrefixStore(f'attempt{restart}/', store), rank=rank,
                          world_size=world_size)
            del kwargs['init_method']
        torch.distributed.init_process_group(**kwargs)
    return device


def get_device():
    """The device chosen by `init` (CPU before it is called)."""
    return _device if _device is not None else torch.device('cpu')


def is_initialized():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def get_rank():
    return torch.distributed.get_rank() if is_initialized() else 0


def get_world_size():
    return torch.distributed.get_world_size() if is_initialized() else 1


def get_local_rank():
    return _env_int('LOCAL_RANK', 0)


def barrier():
    if is_initialized():
        torch.distributed.barrier()


def shutdown():
    if is_initialized():
        torch.distributed.destroy_process_group()


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if get_rank() == 0:
        print(*args, **kwargs)


def all_reduce_sum(tensor):
    """Sum `tensor` over ranks in place (no-op in a single process); returns it."""
    if get_world_size() > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def broadcast_object(obj, src=0):
    """Rank `src`'s Python object, on every rank."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=src)
    return holder[0]


def run_on_rank0(fn):
    """fn() on rank 0 alone, then a barrier. Returns its result on rank 0 and
    None elsewhere. An error on rank 0 is raised on every rank, so that no
    rank waits forever: on the others as a ValueError with the same message
    for a user error (ValueError, OSError), else a RuntimeError naming it."""
    result, failure = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as err:   # raised again below, after the other ranks have been told
            failure = err
    report = None if failure is None else (isinstance(failure, (ValueError, OSError)), dnnlib.util.one_line(failure))
    report = broadcast_object(report)
    if failure is not None:
        raise failure
    if report is not None:
        user_error, message = report
        raise ValueError(message) if user_error else RuntimeError(f'Rank 0 failed: {message}')
    return result


def rank0_first(fn):
    """fn() on rank 0, then on the other ranks, so that only rank 0 downloads
    (the others find the file in the cache). Returns fn()'s result on every
    rank; an error on rank 0 is raised on every rank."""
    result = run_on_rank0(fn)
    return result if get_rank() == 0 else fn()
