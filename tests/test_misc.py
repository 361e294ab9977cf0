"""Tests of torch_utils.misc and torch_utils.training_stats (single process;
the multi-process parts are in test_distributed.py)."""

import itertools

import numpy as np
import pytest
import torch

from torch_utils import misc
from torch_utils import training_stats


# ----------------------------------------------------------------------------
# constant.

def test_constant_values_and_cache():
    a = misc.constant([1.0, 2.0, 3.0])
    assert a.dtype == torch.get_default_dtype() and a.device == torch.device('cpu')
    assert torch.equal(a, torch.tensor([1.0, 2.0, 3.0]))
    assert misc.constant([1.0, 2.0, 3.0]) is a
    assert misc.constant([1.0, 2.0, 4.0]) is not a

    b = misc.constant(0.5, shape=[2, 3], dtype=torch.float64)
    assert b.shape == (2, 3) and b.dtype == torch.float64 and bool((b == 0.5).all())
    assert misc.constant(0.5, shape=(2, 3), dtype=torch.float64) is b
    assert misc.constant(0.5, shape=[2, 3], dtype=torch.float32) is not b
    assert b.is_contiguous()

    c = misc.constant(np.arange(3), shape=[2, 3], dtype=torch.int64)
    assert c.tolist() == [[0, 1, 2], [0, 1, 2]]

    ref = torch.zeros(1, dtype=torch.float16)
    d = misc.const_like(ref, 7)
    assert d.dtype == torch.float16 and d.item() == 7


def test_constant_does_not_alias_the_input():
    value = np.array([1.0, 2.0], dtype=np.float32)
    tensor = misc.constant(value)
    value[0] = 99.0
    assert tensor.tolist() == [1.0, 2.0]


# ----------------------------------------------------------------------------
# InfiniteSampler.

def _take(sampler, n):
    return [int(i) for i in itertools.islice(iter(sampler), n)]


@pytest.mark.parametrize('size,replicas', [(10, 1), (12, 3), (10, 4)])
def test_infinite_sampler_shards_cover_each_epoch(size, replicas):
    dataset = range(size)
    epochs = 3
    per_rank = epochs * size // replicas + 1
    streams = [_take(misc.InfiniteSampler(dataset, rank=r, num_replicas=replicas, seed=5), per_rank)
               for r in range(replicas)]
    merged = [streams[k % replicas][k // replicas] for k in range(epochs * size)]   # the global stream
    for e in range(epochs):
        epoch = merged[e * size:(e + 1) * size]
        assert sorted(epoch) == list(range(size))
    assert merged[:size] != merged[size:2 * size]   # reshuffled per epoch
    if size % replicas == 0:   # ranks take disjoint index sets within an epoch
        shards = [set(s[:size // replicas]) for s in streams]
        assert sum(len(s) for s in shards) == size and set().union(*shards) == set(range(size))


def test_infinite_sampler_is_deterministic_per_seed():
    dataset = range(50)
    a = _take(misc.InfiniteSampler(dataset, seed=1), 120)
    assert a == _take(misc.InfiniteSampler(dataset, seed=1), 120)
    assert a != _take(misc.InfiniteSampler(dataset, seed=2), 120)
    assert _take(misc.InfiniteSampler(dataset, shuffle=False), 60) == list(range(50)) + list(range(10))


@pytest.mark.parametrize('rank,replicas,k', [(0, 1, 7), (1, 3, 17), (2, 3, 40)])
def test_infinite_sampler_start_resumes_the_stream(rank, replicas, k):
    dataset = range(13)
    full = _take(misc.InfiniteSampler(dataset, rank=rank, num_replicas=replicas, seed=3), k + 30)
    resumed = _take(misc.InfiniteSampler(dataset, rank=rank, num_replicas=replicas, seed=3, start=k), 30)
    assert resumed == full[k:]


def test_infinite_sampler_rejects_empty_dataset():
    with pytest.raises(ValueError, match='empty'):
        misc.InfiniteSampler([])


# ----------------------------------------------------------------------------
# Parameters.

class _Net(torch.nn.Module):
    def __init__(self, width=4, extra=False):
        super().__init__()
        self.fc = torch.nn.Linear(3, width)
        self.norm = torch.nn.BatchNorm1d(width)
        if extra:
            self.head = torch.nn.Linear(width, 1)


def test_copy_params_and_buffers_by_name():
    torch.manual_seed(0)
    src = _Net(extra=False)
    src.norm.running_mean.fill_(0.25)
    dst = _Net(extra=True)
    head_before = dst.head.weight.clone()
    copied, missing = misc.copy_params_and_buffers(src, dst)
    assert sorted(missing) == ['head.bias', 'head.weight']
    assert set(copied) == {'fc.weight', 'fc.bias', 'norm.weight', 'norm.bias', 'norm.running_mean',
                           'norm.running_var', 'norm.num_batches_tracked'}
    for name, tensor in misc.named_params_and_buffers(src):
        assert torch.equal(dict(misc.named_params_and_buffers(dst))[name], tensor)
    assert torch.equal(dst.head.weight, head_before)
    assert dst.fc.weight.data_ptr() != src.fc.weight.data_ptr()

    with pytest.raises(ValueError, match='head'):
        misc.copy_params_and_buffers(src, _Net(extra=True), require_all=True)


def test_copy_params_and_buffers_shape_mismatch():
    with pytest.raises(ValueError, match=r"fc\.weight.*\(4, 3\).*\(5, 3\)"):
        misc.copy_params_and_buffers(_Net(width=4), _Net(width=5))


def test_check_ddp_consistency_single_process_is_a_no_op():
    """Without a process group (one process) there is nothing to compare."""
    net = torch.nn.Linear(2, 2)
    before = net.weight.clone()
    assert misc.check_ddp_consistency(net) is None
    assert torch.equal(net.weight, before)


def test_print_module_summary_returns_outputs(capsys):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(5, 3)
    out = misc.print_module_summary(net, (x,))
    assert torch.equal(out, net(x))
    text = capsys.readouterr().out
    assert '[5, 4]' in text and '[5, 2]' in text
    total = [line for line in text.splitlines() if line.startswith('Total')]
    assert len(total) == 1 and total[0].split()[1] == str(3 * 4 + 4 + 4 * 2 + 2)


# ----------------------------------------------------------------------------
# training_stats (single process).

@pytest.fixture
def drained_stats():
    """Start with no pending statistics."""
    training_stats.Collector('.*').update()


def test_training_stats_mean_std_num(drained_stats):
    rng = np.random.default_rng(0)
    values = rng.normal(3.0, 2.0, size=50).astype(np.float32)
    assert training_stats.report('Loss/x', torch.from_numpy(values[:20])) is not None
    training_stats.report('Loss/x', torch.from_numpy(values[20:]).reshape(5, 6))
    training_stats.report('Loss/scalar', 4.0)
    training_stats.report('Loss/scalar', 6.0)
    training_stats.report('Loss/empty', torch.zeros(0))
    collector = training_stats.Collector('Loss/.*')
    collector.update()
    assert collector.num('Loss/x') == 50
    assert collector.mean('Loss/x') == pytest.approx(values.astype(np.float64).mean(), rel=1e-9)
    assert collector.std('Loss/x') == pytest.approx(values.astype(np.float64).std(), rel=1e-6)
    assert (collector.num('Loss/scalar'), collector.mean('Loss/scalar'), collector.std('Loss/scalar')) == (2, 5.0, 1.0)
    assert collector.names() == ['Loss/scalar', 'Loss/x']
    assert collector.as_dict()['Loss/scalar'] == dict(num=2, mean=5.0, std=1.0)


def test_training_stats_regex_filter_and_reset(drained_stats):
    training_stats.report('Loss/a', 1.0)
    training_stats.report('Timing/b', 2.0)
    training_stats.report0('Timing/c', 3.0)   # single process: rank 0
    losses = training_stats.Collector(r'Loss/.*')
    losses.update()
    assert losses.names() == ['Loss/a']
    assert losses.num('Timing/b') == 0 and np.isnan(losses.mean('Timing/b'))

    timings = training_stats.Collector(r'Timing/.*')   # not consumed by the other collector
    timings.update()
    assert timings.names() == ['Timing/b', 'Timing/c'] and timings.mean('Timing/c') == 3.0

    losses.update()   # nothing reported since the last update
    assert losses.names() == [] and losses.num('Loss/a') == 0 and np.isnan(losses.std('Loss/a'))
    training_stats.report('Loss/a', 7.0)
    losses.update()
    assert (losses.num('Loss/a'), losses.mean('Loss/a')) == (1, 7.0)
