"""Statistics gathered during training and reduced across ranks.

`report(name, value)` adds scalars or tensor elements to running sums
(count, sum, sum of squares, in float64 on the value's device: no host sync).
A `Collector` turns the sums accumulated since its last `update()` into
mean/std per name, summed over all ranks, at tick boundaries.
"""

import re

import numpy as np
import torch

from . import distributed as dist

_sums = {}   # name -> tensor [3] float64: count, sum, sum of squares


def report(name, value):
    """Accumulate `value` (number or tensor, every element counts) under `name`.

    Returns `value` unchanged so it can be used inline.
    """
    elems = torch.as_tensor(value).detach().flatten().to(torch.float64)
    if elems.numel():
        moments = torch.stack([elems.new_tensor(float(elems.numel())), elems.sum(), elems.square().sum()])
        prev = _sums.get(name)
        _sums[name] = moments if prev is None else prev.to(moments.device) + moments
    return value


def report0(name, value):
    """`report` on rank 0 only (for values that are the same on every rank)."""
    if dist.get_rank() == 0:
        report(name, value)
    return value


class Collector:
    """Reads the statistics whose names match `regex`, summed over ranks."""

    def __init__(self, regex='.*', device=None):
        self._regex = re.compile(regex)
        self._device = device
        self._moments = {}

    def names(self):
        return sorted(self._moments.keys())

    def update(self):
        """Take the sums reported since the last update (on every rank: collective)."""
        names = sorted(name for name in _sums if self._regex.fullmatch(name))
        if dist.get_world_size() > 1:
            names = sorted(set().union(*_all_gather_objects(names)))
        device = self._device or dist.get_device()
        if not names:
            self._moments = {}
            return
        stacked = torch.stack([_sums.pop(name).to(device) if name in _sums else torch.zeros(3, dtype=torch.float64, device=device)
                               for name in names])
        dist.all_reduce_sum(stacked)
        values = stacked.cpu().numpy()
        self._moments = {name: values[i] for i, name in enumerate(names)}

    def num(self, name):
        return int(self._moments[name][0]) if name in self._moments else 0

    def mean(self, name):
        count, total, _ = self._moments.get(name, (0, 0, 0))
        return float(total / count) if count else float('nan')

    def std(self, name):
        count, total, squares = self._moments.get(name, (0, 0, 0))
        if not count:
            return float('nan')
        mean = total / count
        return float(np.sqrt(max(squares / count - mean * mean, 0.0)))

    def as_dict(self):
        """{name: {num, mean, std}} for every collected statistic."""
        return {name: dict(num=self.num(name), mean=self.mean(name), std=self.std(name)) for name in self.names()}


def _all_gather_objects(obj):
    out = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out
