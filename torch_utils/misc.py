"""Small PyTorch helpers for the training loop and the network code.

`constant` is also called by the source code embedded in EDM-style network
pickles (docs/DESIGN.md section 4), so its name and signature are part of the format.
"""

import contextlib
import re

import numpy as np
import torch

_constant_cache = {}


def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A cached tensor holding `value` (broadcast to `shape` when given)."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor


def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    """`constant` with dtype and device taken from the tensor `ref`."""
    return constant(value, shape=shape, dtype=dtype or ref.dtype, device=device or ref.device,
                    memory_format=memory_format)


# ----------------------------------------------------------------------------
# Data.

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, sharded over ranks, resumable.

    The global stream is the concatenation of per-epoch permutations (epoch e
    shuffled by a generator seeded with (seed, e)); rank r takes every
    `num_replicas`-th element starting at r. `start` skips that many of this
    rank's elements, so a resumed run continues the same sequence.
    """

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0, start=0):
        if len(dataset) == 0:
            raise ValueError('The dataset is empty')
        assert num_replicas > 0 and 0 <= rank < num_replicas
        self.dataset_size = len(dataset)
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start = int(start)

    def _epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)

    def __iter__(self):
        pos = self.rank + self.start * self.num_replicas   # position in the global stream
        epoch, order = None, None
        while True:
            e, i = divmod(pos, self.dataset_size)
            if e != epoch:
                epoch, order = e, self._epoch_order(e)
            yield int(order[i])
            pos += self.num_replicas


# ----------------------------------------------------------------------------
# Parameters.

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())


@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy parameters and buffers from `src_module` to `dst_module` by name.

    Returns (copied, missing): names copied, and names of `dst_module` that
    `src_module` lacks. Shapes must agree for every shared name.
    """
    assert isinstance(src_module, torch.nn.Module) and isinstance(dst_module, torch.nn.Module)
    src = dict(named_params_and_buffers(src_module))
    copied, missing = [], []
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src:
            if require_all:
                raise ValueError(f'Source network has no parameter or buffer named {name!r}')
            missing.append(name)
            continue
        if src[name].shape != tensor.shape:
            raise ValueError(f'Shape mismatch for {name!r}: source {tuple(src[name].shape)}, '
                             f'destination {tuple(tensor.shape)}')
        tensor.copy_(src[name].detach())
        copied.append(name)
    return copied, missing


@contextlib.contextmanager
def ddp_sync(module, sync):
    """Skip DDP's gradient all-reduce inside the context when `sync` is False."""
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield


def check_ddp_consistency(module, ignore_regex=None):
    """Assert that every parameter and buffer is the same on all ranks
    (trivially true, and no collective, in a single process)."""
    assert isinstance(module, torch.nn.Module)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            raise RuntimeError(f'{fullname} differs between ranks')


def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Print a table of submodules with parameter counts and output shapes.

    Runs one forward pass with `inputs` (a tuple) and returns its outputs.
    """
    assert isinstance(module, torch.nn.Module) and isinstance(inputs, (tuple, list))
    entries = []
    nesting = [0]

    def pre_hook(_mod, _inputs):
        nesting[0] += 1

    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append((mod, [t for t in outputs if isinstance(t, torch.Tensor)]))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    hooks += [m.register_forward_hook(post_hook) for m in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    names = {mod: name for name, mod in module.named_modules()}
    seen = set()
    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype']]
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        seen.update(id(t) for t in params + buffers)
        if skip_redundant and not params and not buffers and mod is not module:
            continue
        shapes = [str(list(t.shape)) for t in outs] or ['-']
        dtypes = [str(t.dtype).split('.')[-1] for t in outs] or ['-']
        rows.append([names.get(mod, '?') or '<top-level>', str(sum(t.numel() for t in params)) if params else '-',
                     str(sum(t.numel() for t in buffers)) if buffers else '-', shapes[0], dtypes[0]])
    rows.append(['Total', str(sum(t.numel() for t in module.parameters())),
                 str(sum(t.numel() for t in module.buffers())), '', ''])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for i, row in enumerate(rows):
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
        if i == 0 or i == len(rows) - 2:
            print('  '.join('-' * width for width in widths))
    print()
    return outputs
