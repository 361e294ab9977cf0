"""Statistics gathered during training and reduced across ranks.

`report(name, value)` adds scalars or tensor elements to running sums
(the count on the host; sum and sum of squares in float64 on the value's
device: no host-device sync).
A `Collector` turns the sums accumulated since its last `update()` into
mean/std per name, summed over all ranks, at tick boundaries.
"""

import re

import numpy as np
import torch

from . import distributed as dist

_sums = {}   # name -> [count (int, host), tensor [2] float64 (sum, sum of squares) on the value's device]


def report(name, value):
    """Accumulate `value` (number or tensor, every element counts) under `name`.

    The element count stays on the host and the sums on the value's device,
    so a report never waits for the device. Returns `value` unchanged.
    """
    elems = torch.as_tensor(value).detach().flatten().to(torch.float64)
    if elems.numel():
        sums = torch.stack([elems.sum(), elems.square().sum()])
        prev = _sums.get(name)
        if prev is None:
            _sums[name] = [elems.numel(), sums]
        else:
            prev[0] += elems.numel()
            prev[1] = prev[1] + sums.to(prev[1].device)
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
        rows = []
        for name in names:
            count, sums = _sums.pop(name, (0, None))
            count = torch.tensor([float(count)], dtype=torch.float64, device=device)
            sums = sums.to(device) if sums is not None else torch.zeros(2, dtype=torch.float64, device=device)
            rows.append(torch.cat([count, sums]))
        stacked = torch.stack(rows)
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
