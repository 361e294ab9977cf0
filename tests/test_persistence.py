"""Tests of torch_utils.persistence: the EDM network-pickle format (docs/DESIGN.md section 4)."""

import copy
import importlib.util
import io
import json
import pickle
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import persistence

# A module that exists only as text: the classes are defined by it and must be
# rebuilt from the source embedded in the pickle once the module is gone.
NET_SRC = '''
"""A tiny network defined in a throw-away module."""
import numpy as np
import torch
from torch_utils import misc
from torch_utils import persistence

FACTOR = {factor}


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self, channels, hidden=4, scale=1.0):
        super().__init__()
        self.scale = scale
        self.conv = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.out = torch.nn.Conv2d(hidden, channels, 1)
        self.register_buffer('offset', torch.arange(channels, dtype=torch.float32))

    def forward(self, x):
        shift = misc.constant(np.float32(0.5), shape=[1, x.shape[1], 1, 1], dtype=x.dtype, device=x.device)
        y = self.out(torch.relu(self.conv(x))) * self.scale
        return FACTOR * y + shift + self.offset.reshape(1, -1, 1, 1)


@persistence.persistent_class
class TinyLoss:
    def __init__(self, P_mean=-1.2, P_std=1.2):
        self.P_mean = P_mean
        self.P_std = P_std
'''


@pytest.fixture
def make_module(tmp_path):
    """Factory: write NET_SRC (with a given FACTOR) to a .py file and import it
    under a unique name. Returns (module, name, path); modules are dropped at the end."""
    names = []

    def make(factor=1.0):
        name = 'tiny_net_' + uuid.uuid4().hex[:12]
        path = tmp_path / f'{name}.py'
        path.write_text(NET_SRC.format(factor=factor))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        names.append(name)
        return module, name, path

    yield make
    for name in names:
        sys.modules.pop(name, None)


def _drop(name, path):
    """Remove a module from sys.modules and its file from disk."""
    del sys.modules[name]
    path.unlink()


def _tiny_net(module, seed=0):
    torch.manual_seed(seed)
    return module.TinyNet(3, hidden=5, scale=0.5).eval()


def _input():
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))


class _RecordingUnpickler(pickle.Unpickler):
    """Unpickler that records the meta of every persistent object instead of
    rebuilding it (returns the meta dict in its place)."""

    def __init__(self, f):
        super().__init__(f)
        self.metas = []

    def find_class(self, module, name):
        if (module, name) == ('torch_utils.persistence', '_reconstruct_persistent_obj'):
            return self._record
        return super().find_class(module, name)

    def _record(self, meta):
        self.metas.append(meta)
        return meta


def test_round_trip_after_module_is_gone(make_module):
    module, name, path = make_module()
    net = _tiny_net(module)
    x = _input()
    with torch.no_grad():
        expected = net(x)
    data = pickle.dumps(net)
    del module
    _drop(name, path)

    net2 = pickle.loads(data)
    with torch.no_grad():
        assert torch.equal(net2(x), expected)
    assert type(net2).__name__ == 'TinyNet' and persistence.is_persistent(net2)
    assert net2.init_args == (3,)
    assert net2.init_kwargs == dict(hidden=5, scale=0.5) and isinstance(net2.init_kwargs, dnnlib.EasyDict)
    assert torch.equal(net2.offset, torch.arange(3.0))


def test_pickle_bytes_hold_reconstruct_call_and_meta(make_module):
    module, _, path = make_module()
    net = _tiny_net(module)
    data = pickle.dumps(net)
    assert b'_reconstruct_persistent_obj' in data and b'torch_utils.persistence' in data

    unpickler = _RecordingUnpickler(io.BytesIO(data))
    meta = unpickler.load()
    assert unpickler.metas == [meta]
    assert meta['type'] == 'class' and meta['version'] == 6
    assert meta['class_name'] == 'TinyNet'
    assert meta['module_src'] == path.read_text()
    state = meta['state']
    assert set(state['_modules']) == {'conv', 'out'}
    assert state['scale'] == 0.5
    assert torch.equal(state['_modules']['conv'].weight, net.conv.weight)


def test_network_pickle_dict_round_trip(make_module, tmp_path):
    module, name, path = make_module()
    net = _tiny_net(module)
    x = _input()
    with torch.no_grad():
        expected = net(x)
    dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='data.zip',
                                     resolution=6, use_labels=False)
    snapshot = dict(ema=net, loss_fn=module.TinyLoss(P_mean=-1.0), augment_pipe=None, dataset_kwargs=dataset_kwargs)
    pkl = tmp_path / 'network-snapshot-000000.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(snapshot, f)

    with open(pkl, 'rb') as f:
        metas = _RecordingUnpickler(f).load()
    assert metas['ema']['class_name'] == 'TinyNet' and metas['loss_fn']['class_name'] == 'TinyLoss'
    del module
    _drop(name, path)

    with open(pkl, 'rb') as f:
        loaded = persistence.load_network_pickle(f)
    assert set(loaded) == {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs'}
    with torch.no_grad():
        assert torch.equal(loaded['ema'](x), expected)
    assert loaded['loss_fn'].P_mean == -1.0 and loaded['loss_fn'].P_std == 1.2
    assert loaded['loss_fn'].init_kwargs == dict(P_mean=-1.0)
    assert loaded['augment_pipe'] is None
    assert isinstance(loaded['dataset_kwargs'], dnnlib.EasyDict)
    assert loaded['dataset_kwargs'].path == 'data.zip' and loaded['dataset_kwargs'] == dataset_kwargs


LOAD_SCRIPT = '''
import pickle, sys, torch
with open(sys.argv[1], 'rb') as f:
    net = pickle.load(f)
x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    torch.save(dict(y=net(x), module=type(net).__module__, kwargs=dict(net.init_kwargs)), sys.argv[2])
'''


def test_fresh_process_rebuilds_from_embedded_source(make_module, tmp_path, subprocess_env, python_exe):
    """A process that never saw the module runs the embedded source (incl. misc.constant)."""
    module, name, path = make_module(factor=2.0)
    net = _tiny_net(module)
    with torch.no_grad():
        expected = net(_input())
    pkl = tmp_path / 'net.pkl'
    pkl.write_bytes(pickle.dumps(net))
    _drop(name, path)

    script = tmp_path / 'load.py'
    script.write_text(LOAD_SCRIPT)
    out = tmp_path / 'out.pt'
    subprocess.run([python_exe, str(script), str(pkl), str(out)], env=subprocess_env, cwd=tmp_path,
                   check=True, timeout=120)
    result = torch.load(out)
    torch.testing.assert_close(result['y'], expected, rtol=1e-5, atol=1e-6)   # thread counts differ
    assert result['module'].startswith('_imported_module_')
    assert result['kwargs'] == dict(hidden=5, scale=0.5)


def test_deepcopy_of_persistent_module(make_module):
    module, _, _ = make_module()
    net = _tiny_net(module)
    twin = copy.deepcopy(net)
    x = _input()
    with torch.no_grad():
        assert torch.equal(twin(x), net(x))
        twin.conv.weight.add_(1.0)
        assert not torch.equal(twin(x), net(x))
    assert twin.conv.weight.data_ptr() != net.conv.weight.data_ptr()
    assert type(twin).__name__ == 'TinyNet' and persistence.is_persistent(twin)
    assert twin.init_kwargs == net.init_kwargs
    assert pickle.loads(pickle.dumps(twin)).init_args == (3,)


def test_two_sources_for_the_same_class_name_coexist(make_module):
    module_a, name_a, path_a = make_module(factor=1.0)
    module_b, name_b, path_b = make_module(factor=3.0)
    net_a, net_b = _tiny_net(module_a), _tiny_net(module_b)
    x = _input()
    with torch.no_grad():
        expected_a, expected_b = net_a(x), net_b(x)
    assert not torch.allclose(expected_a, expected_b)
    data = pickle.dumps(dict(a=net_a, b=net_b))
    del module_a, module_b
    _drop(name_a, path_a)
    _drop(name_b, path_b)

    loaded = pickle.loads(data)
    assert type(loaded['a']) is not type(loaded['b'])
    with torch.no_grad():
        assert torch.equal(loaded['a'](x), expected_a)
        assert torch.equal(loaded['b'](x), expected_b)


class _ForgedMeta:
    """Pickles as a persistent object with a meta that this test chooses."""

    def __init__(self, **meta):
        self.meta = meta

    def __reduce__(self):
        return persistence._reconstruct_persistent_obj, (self.meta,)


def test_wrong_version_or_class_is_a_value_error(make_module):
    _, _, path = make_module()
    meta = dict(type='class', version=6, module_src=path.read_text(), class_name='TinyLoss',
                state=dict(P_mean=0.0, P_std=1.0, _init_args=(), _init_kwargs={}))
    assert pickle.loads(pickle.dumps(_ForgedMeta(**meta))).P_std == 1.0
    with pytest.raises(ValueError, match='version 5'):
        pickle.loads(pickle.dumps(_ForgedMeta(**dict(meta, version=5))))
    with pytest.raises(ValueError, match='NoSuchClass'):
        pickle.loads(pickle.dumps(_ForgedMeta(**dict(meta, class_name='NoSuchClass'))))
    with pytest.raises(ValueError, match='type'):
        pickle.loads(pickle.dumps(_ForgedMeta(**dict(meta, type='function'))))


def test_init_args_are_copies(make_module):
    module, _, _ = make_module()
    options = dict(levels=[1, 2])
    loss = module.TinyLoss(P_mean=options)
    options['levels'].append(3)
    assert loss.init_kwargs == dict(P_mean=dict(levels=[1, 2]))
    loss.init_kwargs.P_mean['levels'].append(4)
    assert loss.init_kwargs.P_mean == dict(levels=[1, 2])
    assert json.dumps(loss.init_kwargs) == '{"P_mean": {"levels": [1, 2]}}'
    assert not persistence.is_persistent(np.zeros(1)) and persistence.is_persistent(module.TinyNet)
