"""torch.distributed set-up from torchrun's environment, or a single process.

NCCL on CUDA, gloo on CPU. Collectives time out (default 10 minutes, env
PD_DIST_TIMEOUT_S) so a dead or stuck peer cannot hang the others forever;
the training steps use groups of their own with a shorter timeout
(`make_step_groups`, train.py's --hang-timeout), including a gloo group for
small host-side messages (`gather_ints`) that never waits for the GPU. Each
rank's heartbeat (its step, in the job's key-value store) tells which rank
fell behind.
"""

import datetime
import os
import threading
import time

import torch

import dnnlib

_device = None
_step_groups = {}   # make_step_groups: 'ddp' (the main backend) and 'control' (gloo), with the hang timeout
_HEARTBEAT_KEY = 'pd-heartbeat/'
_ALIVE_KEY = 'pd-alive/'
ALIVE_INTERVAL_S = 2
_beats = dict(count=0, step=0)   # this rank's waits in the step groups so far, and its last step
_store_lost = threading.Event()   # set once the job's key-value store stopped answering
_alive_stop = threading.Event()   # set by shutdown: the sign-of-life thread ends
_alive_thread = []                 # that thread, while it runs


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


def make_step_groups(timeout_s):
    """Process groups for training steps, both timing out after `timeout_s`
    seconds (the hang timeout): one of the main backend for DDP's gradients
    (`step_group`), and a gloo one for `gather_ints`. Every rank calls this,
    in the same order; the default group keeps its longer timeout for the
    rest (rank 0 writing snapshots, downloads). No-op in a single process."""
    if get_world_size() == 1:
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    _step_groups['ddp'] = torch.distributed.new_group(backend=torch.distributed.get_backend(), timeout=timeout)
    _step_groups['control'] = torch.distributed.new_group(backend='gloo', timeout=timeout)
    store = _store()
    if store is not None:   # a sign of life while this process runs at all (a stopped process's threads stop too)
        _alive_stop.clear()
        _alive_thread[:] = [threading.Thread(target=_signs_of_life, args=(store, get_rank()), daemon=True)]
        _alive_thread[0].start()


def _signs_of_life(store, rank):
    """Write the time into the store every ALIVE_INTERVAL_S seconds, until `shutdown` (or the process ends)."""
    while not _alive_stop.is_set():
        try:
            store.set(f'{_ALIVE_KEY}{rank}', repr(time.time()))
        except RuntimeError:   # the store's host (torchrun's agent) is gone
            _store_lost.set()
            return
        _alive_stop.wait(ALIVE_INTERVAL_S)


def store_lost():
    """Whether the job's key-value store stopped answering (its host, torchrun's
    agent, is gone): the ranks then run without a supervisor."""
    return _store_lost.is_set()


def step_group():
    """The group for DDP made by `make_step_groups` (None: the default group)."""
    return _step_groups.get('ddp')


def step_control_group():
    """The gloo group of `make_step_groups`, for the waits of a training loop
    (None: the default group)."""
    return _step_groups.get('control')


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
    """Stop the sign-of-life thread (a thread left inside a store call while the process
    exits can abort it: "terminate called without an active exception"), then end the
    process groups."""
    _alive_stop.set()
    for thread in _alive_thread:
        thread.join(timeout=10)
    _alive_thread.clear()
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


def gather_ints(value):
    """Every rank's int `value`, as a list indexed by rank, through the gloo group
    of `make_step_groups` (or the default group, if gloo): no GPU
    synchronisation. [value] in a single process."""
    if get_world_size() == 1:
        return [int(value)]
    values = torch.zeros(get_world_size(), dtype=torch.int64)
    values[get_rank()] = int(value)
    _beat()
    torch.distributed.all_reduce(values, group=_step_groups.get('control'))
    return values.tolist()


def _store():
    """The job's key-value store (torchrun's), or None."""
    try:
        return torch.distributed.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


def heartbeat(step):
    """Note that this rank has done `step` steps; the next wait in a step group records it."""
    _beats['step'] = int(step)


def _beat():
    """Record in the job's store, before a wait in a step group, how many such
    waits this rank has entered and its last step (no-op in a single process)."""
    _beats['count'] += 1
    store = _store() if get_world_size() > 1 and not _store_lost.is_set() else None
    if store is not None:
        try:
            store.set(f'{_HEARTBEAT_KEY}{get_rank()}', f'{_beats["count"]}:{_beats["step"]}')
        except RuntimeError:   # the store's host is gone; the collectives between ranks may still work
            _store_lost.set()


def read_heartbeats():
    """{rank: (waits entered, last step, seconds since its last sign of life)}
    (entries None where a rank recorded nothing), or {} if the store cannot be
    read (e.g. its host is gone)."""
    store = _store()
    if store is None or get_world_size() == 1:
        return {}
    beats = {}
    try:
        for rank in range(get_world_size()):
            key, alive = f'{_HEARTBEAT_KEY}{rank}', f'{_ALIVE_KEY}{rank}'
            count, step = (int(v) for v in store.get(key).decode().split(':')) if store.check([key]) else (None, None)
            silent = time.time() - float(store.get(alive).decode()) if store.check([alive]) else None
            beats[rank] = (count, step, silent)
    except (RuntimeError, ValueError):
        return {}
    return beats


def broadcast_object(obj, src=0, group=None):
    """Rank `src`'s Python object, on every rank (group: a gloo group, or None for the default one)."""
    if get_world_size() == 1:
        return obj
    holder = [obj]
    device = None
    if group is not None:
        device = torch.device('cpu')
        _beat()
    torch.distributed.broadcast_object_list(holder, src=src, group=group, device=device)
    return holder[0]


def run_on_rank0(fn, group=None):
    """fn() on rank 0 alone, then a barrier (in `group`, a gloo group, or the
    default one). Returns its result on rank 0 and None elsewhere. An error
    on rank 0 is raised on every rank, so that no rank waits forever: on the
    others as a ValueError with the same message for a user error
    (ValueError, OSError), else a RuntimeError naming it."""
    result, failure = None, None
    if get_rank() == 0:
        try:
            result = fn()
        except Exception as err:   # raised again below, after the other ranks have been told
            failure = err
    report = None if failure is None else (isinstance(failure, (ValueError, OSError)), dnnlib.util.one_line(failure))
    report = broadcast_object(report, group=group)
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
