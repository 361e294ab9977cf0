"""Tests of torch_utils.distributed (and the collective parts of misc and
training_stats): a single process, and two gloo processes under torchrun."""

import json
import sys
import time

import numpy as np
import pytest
from proctools import run_all
import torch

from torch_utils import distributed as dist

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


def test_single_process_defaults(no_torchrun_env, capsys):
    assert dist.init('cpu') == torch.device('cpu')
    assert not dist.is_initialized()
    assert dist.get_rank() == 0 and dist.get_world_size() == 1 and dist.get_local_rank() == 0
    assert dist.get_device() == torch.device('cpu')
    dist.print0('hello', 42)
    assert capsys.readouterr().out == 'hello 42\n'
    t = torch.tensor([1.5, -2.0])
    assert dist.all_reduce_sum(t) is t and torch.equal(t, torch.tensor([1.5, -2.0]))
    assert dist.broadcast_object({'a': 1}) == {'a': 1}
    dist.barrier()
    dist.shutdown()


def test_cuda_request_without_cuda_is_an_error(no_torchrun_env):
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    with pytest.raises(RuntimeError, match='cpu'):
        dist.init('cuda')


# ----------------------------------------------------------------------------
# Two processes.

WORKER = '''
import contextlib, io, json, os, sys
import torch
from torch_utils import distributed as dist, misc, training_stats

device = dist.init('cpu')
rank, world = dist.get_rank(), dist.get_world_size()
out = dict(rank=rank, world=world, env_rank=int(os.environ['RANK']), device=str(device))

t = torch.tensor([float(rank + 1), 10.0 * rank], dtype=torch.float64)
out['all_reduce'] = dist.all_reduce_sum(t).tolist()
out['broadcast'] = dist.broadcast_object(dict(seed=1000 + rank, name=f'rank{rank}'), src=0)
out['broadcast_from_1'] = dist.broadcast_object(f'from{rank}', src=1)

buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    dist.print0('only rank 0')
out['printed'] = buf.getvalue()

training_stats.report('Loss/a', torch.arange(4, dtype=torch.float32) + 10 * rank)
if rank == 1:
    training_stats.report('Only/rank1', 5.0)
training_stats.report0('Timing/sec', 2.0 + rank)
collector = training_stats.Collector(regex='.*')
collector.update()
out['stats'] = collector.as_dict()
collector.update()
out['stats_after_reset'] = collector.as_dict()

torch.manual_seed(0)
same = torch.nn.Linear(3, 2)
misc.check_ddp_consistency(same)
differs = torch.nn.Linear(3, 2)
with torch.no_grad():
    differs.weight.copy_(same.weight)
    differs.bias.fill_(float(rank))        # only the last tensor differs, so all ranks run every broadcast
try:
    misc.check_ddp_consistency(differs)
    out['mismatch_error'] = None
except RuntimeError as err:
    out['mismatch_error'] = str(err)
misc.check_ddp_consistency(differs, ignore_regex=r'.*\\.bias')

with open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w') as f:
    json.dump(out, f)
dist.shutdown()
'''


def _torchrun(script, args, env, timeout):
    """Run `script` under torchrun with 2 CPU processes; returns (returncode, output).

    On a timeout torchrun and all its descendants are killed
    and the test fails: a hang must not leave processes behind.
    """
    return run_all([TORCHRUN + [str(script)] + [str(a) for a in args]], env, timeout)[0]


@pytest.mark.slow
def test_two_processes_agree(tmp_path, subprocess_env):
    script = tmp_path / 'worker.py'
    script.write_text(WORKER)
    returncode, output = _torchrun(script, [tmp_path], subprocess_env, timeout=120)
    assert returncode == 0, output[-5000:]
    r0, r1 = (json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2))

    for r, out in enumerate((r0, r1)):
        assert out['rank'] == out['env_rank'] == r and out['world'] == 2 and out['device'] == 'cpu'
        assert out['all_reduce'] == [3.0, 10.0]
        assert out['broadcast'] == dict(seed=1000, name='rank0')
        assert out['broadcast_from_1'] == 'from1'
        assert out['stats_after_reset'] == {}
    assert r0['printed'] == 'only rank 0\n' and r1['printed'] == ''

    assert r0['stats'] == r1['stats']
    values = np.concatenate([np.arange(4) + 10 * r for r in range(2)])
    loss = r0['stats']['Loss/a']
    assert loss['num'] == 8
    assert loss['mean'] == pytest.approx(values.mean()) and loss['std'] == pytest.approx(values.std())
    assert r0['stats']['Only/rank1'] == dict(num=1, mean=5.0, std=0.0)
    assert r0['stats']['Timing/sec'] == dict(num=1, mean=2.0, std=0.0)   # report0: rank 0 only

    assert r0['mismatch_error'] is None   # rank 0 compares with itself
    assert 'bias' in r1['mismatch_error'] and 'differs' in r1['mismatch_error']


STRAGGLER = '''
import os, sys, time
import torch
from torch_utils import distributed as dist

dist.init('cpu')
rank = dist.get_rank()
if rank == 1:
    if sys.argv[2] == 'exit':
        sys.exit(0)
    time.sleep(300)                     # alive but never joins the collective
start = time.time()
try:
    dist.all_reduce_sum(torch.ones(4))
    result = 'no error'
except Exception as err:
    result = f'{type(err).__name__}: {err}'
with open(os.path.join(sys.argv[1], 'rank0.txt'), 'w') as f:
    f.write(f'{time.time() - start:.1f}\\n{result}')
sys.exit(1)
'''


@pytest.mark.slow
@pytest.mark.parametrize('straggler', ['exit', 'hang'])
def test_dead_or_stuck_peer_ends_with_an_error(tmp_path, subprocess_env, straggler):
    """Rank 0 waits in a collective that rank 1 never joins (it exited, or it
    is stuck): with PD_DIST_TIMEOUT_S=5 the run ends with an error, not a hang."""
    script = tmp_path / 'straggler.py'
    script.write_text(STRAGGLER)
    env = dict(subprocess_env, PD_DIST_TIMEOUT_S='5')
    start = time.time()
    returncode, _ = _torchrun(script, [tmp_path, straggler], env, timeout=90)
    elapsed = time.time() - start
    assert returncode != 0
    assert elapsed < 60, f'took {elapsed:.0f} s'
    waited, result = (tmp_path / 'rank0.txt').read_text().split('\n', 1)
    assert result != 'no error' and float(waited) < 30, result
    if straggler == 'hang':   # only the timeout can end this wait (a dead peer closes its sockets)
        assert float(waited) >= 4, result


def test_shutdown_stops_the_sign_of_life_thread_before_the_groups_end():
    """dist.shutdown ends the thread that writes this rank's signs of life, so no thread is left
    inside a store call while the process exits."""
    import threading

    class Store:
        def __init__(self):
            self.sets = []

        def set(self, key, value):
            self.sets.append(key)

    store = Store()
    dist._alive_stop.clear()
    thread = threading.Thread(target=dist._signs_of_life, args=(store, 3), daemon=True)
    dist._alive_thread[:] = [thread]
    thread.start()
    dist.shutdown()
    assert not thread.is_alive() and dist._alive_thread == []
    assert store.sets and set(store.sets) == {'pd-alive/3'}
