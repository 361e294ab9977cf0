"""The four command-line tools (dataset_tool.py, train.py, generate.py,
fid.py) against malformed inputs: corrupt and truncated images, zips,
pickles, training states, .safetensors and .npz files, wrong dataset.json,
mismatched sizes and channel counts, empty inputs, bad flag values, files of
the wrong kind, unreachable URLs (a closed port on 127.0.0.1).

For every case: a non-zero exit status, exactly one 'Error:' line on stderr
that says what is wrong, no traceback, and no new file anywhere (the output
location included). Most cases run in-process through click's CliRunner;
a few run as real processes, for the exit status, the stderr text and the
--debug / PD_DEBUG=1 switch that asks for the traceback.
"""

import io
import os
import pickle
import socket
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import dataset_tool
import dnnlib
import fid
import generate
import train
from dataset_prep.archive import archive_name, convert_dataset
from training import architectures, snapshots

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')

CLIS = {'dataset_tool': dataset_tool.cli, 'train': train.main, 'generate': generate.main, 'fid': fid.main}
TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0)
TRAIN_FLAGS = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0',
               '--device=cpu', '--batch=8', '--duration=0.0001', '--samples=0', '--augment=0', '--seed=0']


class TinyDetector(torch.nn.Module):
    """A stand-in for Inception: uint8 RGB [N, 3, H, W] -> the 2x2 cell means, [N, 12]."""

    def forward(self, images, return_features: bool = False):
        return torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 2).flatten(1)


def rgb(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def png_bytes(array):
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format='png')
    return buffer.getvalue()


def write_zip(path, members):
    """A zip with {name: bytes}."""
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in members.items():
            z.writestr(name, data)
    return str(path)


def write_folder(path, members):
    """A folder with {relative name: bytes}."""
    os.makedirs(path, exist_ok=True)
    for name, data in members.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), 'wb') as f:
            f.write(data)
    return str(path)


def write_file(path, data):
    with open(path, 'wb') as f:
        f.write(data)
    return str(path)


def truncated_copy(src, dest, keep=0.5):
    """dest = the first `keep` share of the bytes of src."""
    with open(src, 'rb') as f:
        data = f.read()
    with open(dest, 'wb') as f:
        f.write(data[:int(len(data) * keep)])
    return str(dest)


def closed_port_url(name):
    """An http URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    return f'http://127.0.0.1:{port}/{name}'


@pytest.fixture(scope='module')
def good(tmp_path_factory):
    """Valid inputs that the cases break: a 32x32 dataset zip, a network
    snapshot (.pkl and .safetensors), a training state, a detector and
    reference statistics of its 12 features."""
    root = tmp_path_factory.mktemp('good')
    files = dnnlib.EasyDict(root=root)
    files.dataset = str(root / 'shapes-32x32.zip')
    convert_dataset('demo:shapes:8', files.dataset, resolution=(32, 32))
    torch.manual_seed(0)
    net = architectures.build_network(TINY_NET, 16, 3, 0)
    files.pkl = str(root / 'net.pkl')
    snapshots.save_snapshot(files.pkl, net, None, None, {}, snapshot_format='both')
    files.safetensors = str(root / 'net.safetensors')
    files.state = str(root / 'state.pt')
    torch.save(dict(net=net.state_dict(), format='patch-diffusion-state-v1', step=1), files.state)
    files.detector = str(root / 'detector.pt')
    torch.jit.save(torch.jit.script(TinyDetector()), files.detector)
    files.ref = str(root / 'ref.npz')
    np.savez(files.ref, mu=np.zeros(12), sigma=np.eye(12))
    files.images = write_folder(root / 'images', {f'{i}.png': png_bytes(rgb(i)) for i in range(4)})
    return files


# ----------------------------------------------------------------------------
# The cases: name -> make(tmp, good) -> (tool, arguments, part of the error line).

def dt(tmp, *args):
    """dataset_tool.py arguments writing to tmp/out/x.zip."""
    return 'dataset_tool', [*args, f'--dest={tmp / "out" / "x.zip"}']


def dt_case(members, *extra, zipped=False):
    def make(tmp, good):
        src = write_zip(tmp / 'src.zip', members) if zipped else write_folder(tmp / 'src', members)
        return dt(tmp, f'--source={src}', *extra)
    return make


def tr(tmp, data, *extra):
    """train.py arguments writing to tmp/runs."""
    return 'train', [f'--outdir={tmp / "runs"}', f'--data={data}', *TRAIN_FLAGS, *extra]


def dataset_zip(tmp, images, labels_json=None):
    """A dataset zip of uint8 arrays [H, W, C] named as dataset_tool names them."""
    members = {archive_name(i): png_bytes(image.squeeze(2) if image.shape[2] == 1 else image)
               for i, image in enumerate(images)}
    if labels_json is not None:
        members['dataset.json'] = labels_json
    return write_zip(tmp / 'data.zip', members)


def gen(tmp, network, *extra):
    """generate.py arguments writing to tmp/gen."""
    return 'generate', [f'--network={network}', f'--outdir={tmp / "gen"}', '--device=cpu', '--seeds=0-1',
                        '--steps=2', *extra]


def fid_calc(good, images=None, ref=None, detector=None, num=4):
    return 'fid', ['calc', f'--images={images or good.images}', f'--ref={ref or good.ref}',
                   f'--detector={detector or good.detector}', f'--num={num}', '--device=cpu', '--workers=0']


def fid_ref(tmp, good, data, detector=None):
    return 'fid', ['ref', f'--data={data}', f'--dest={tmp / "refs" / "ref.npz"}',
                   f'--detector={detector or good.detector}', '--device=cpu', '--workers=0']


def pickle_file(tmp, obj, name='wrong.pkl'):
    with open(tmp / name, 'wb') as f:
        pickle.dump(obj, f)
    return str(tmp / name)


def safetensors_file(tmp, tensors, metadata, name='net.safetensors'):
    safetensors.torch.save_file(tensors, str(tmp / name), metadata=metadata)
    return str(tmp / name)


def edited_safetensors(good, tmp, **metadata):
    """The good .safetensors snapshot with some metadata entries replaced."""
    tensors = safetensors.torch.load_file(good.safetensors)
    with safetensors.safe_open(good.safetensors, 'pt') as f:
        meta = dict(f.metadata(), **metadata)
    return safetensors_file(tmp, tensors, meta)


class _CreatesFileWhenUnpickled:
    """Unpickling this runs open(path, 'w'): evidence that a file was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, 'w')


BAD = 'this is not what the tool expects'.encode()
GRAY = np.full((32, 32, 1), 100, dtype=np.uint8)

CASES = {
    # dataset_tool.py
    'dt-corrupt-image': (dt_case({'a.png': png_bytes(rgb(0)), 'b.png': BAD}), 'b.png: cannot read'),
    'dt-truncated-image': (dt_case({'a.png': png_bytes(rgb(0)), 'b.png': png_bytes(rgb(1))[:-60]}), 'b.png: cannot read'),
    'dt-truncated-zip': (lambda tmp, good: dt(tmp, f'--source={truncated_copy(good.dataset, tmp / "t.zip")}'),
                         'cannot read this zip'),
    'dt-damaged-zip-member': (lambda tmp, good: dt(tmp, f'--source={damaged_member_zip(tmp)}'), 'cannot read'),
    'dt-json-syntax': (dt_case({'a.png': png_bytes(rgb(0)), 'dataset.json': b'{"labels": [['}), 'not valid JSON'),
    'dt-json-structure': (dt_case({'a.png': png_bytes(rgb(0)), 'dataset.json': b'{"labels": {"a.png": 1}}'}),
                          'dataset.json: expected'),
    'dt-mismatched-sizes': (dt_case({'a.png': png_bytes(rgb(0)), 'b.png': png_bytes(rgb(1, 16))}),
                            'earlier images are 8x8'),
    'dt-empty-folder': (lambda tmp, good: dt(tmp, f'--source={write_folder(tmp / "empty", {})}'), 'no images found'),
    'dt-empty-zip': (dt_case({}, zipped=True), 'no images found'),
    'dt-bad-resolution-flag': (dt_case({'a.png': png_bytes(rgb(0))}, '--resolution=big'), 'expected WxH'),
    'dt-max-images-0': (dt_case({'a.png': png_bytes(rgb(0))}, '--max-images=0'), 'must be >= 1'),
    'dt-corrupt-cifar': (lambda tmp, good: dt(tmp, f'--source={write_file(tmp / "c.tar.gz", BAD)}'),
                         'not a readable CIFAR-10'),
    # train.py
    'tr-missing-data': (lambda tmp, good: tr(tmp, tmp / 'missing.zip'), 'missing.zip'),
    'tr-truncated-dataset': (lambda tmp, good: tr(tmp, truncated_copy(good.dataset, tmp / 't.zip')), 'not a readable zip'),
    'tr-wrong-dataset-json': (lambda tmp, good: tr(tmp, dataset_zip(tmp, [rgb(0, 32)], b'{"labels": 3}'), '--cond=1'),
                              'dataset.json'),
    'tr-mismatched-sizes': (lambda tmp, good: tr(tmp, dataset_zip(tmp, [rgb(0, 32), rgb(1, 16)] * 4)), 'differs from the first'),
    'tr-wrong-channels': (lambda tmp, good: tr(tmp, dataset_zip(tmp, [rgb(0, 32), GRAY] * 4)), 'differs from the first'),
    'tr-unlabelled-cond': (lambda tmp, good: tr(tmp, dataset_zip(tmp, [rgb(0, 32)]), '--cond=1'), 'no labels'),
    'tr-bad-cres': (lambda tmp, good: tr(tmp, good.dataset, '--cres=1,two'), 'Cannot parse'),
    'tr-vae-without-latents': (lambda tmp, good: tr(tmp, good.dataset, '--vae=some/vae'), 'apply to latent training'),
    'tr-pos-freqs-without-pos': (lambda tmp, good: tr(tmp, good.dataset, '--use_pos=0', '--pos-freqs=2'), '--use_pos=0'),
    'tr-batch-gpu': (lambda tmp, good: tr(tmp, good.dataset, '--batch-gpu=3'), 'divisible by --batch-gpu=3'),
    'tr-truncated-resume': (lambda tmp, good: tr(tmp, good.dataset, f'--resume={truncated_copy(good.state, tmp / "s.pt")}'),
                            'not a complete torch.save archive'),
    'tr-resume-not-a-state': (lambda tmp, good: tr(tmp, good.dataset, f'--resume={torch_file(tmp)}'),
                              'not a training state'),
    'tr-truncated-transfer': (lambda tmp, good: tr(tmp, good.dataset, f'--transfer={truncated_copy(good.pkl, tmp / "n.pkl")}'),
                              'not a readable network pickle'),
    'tr-transfer-wrong-kind': (lambda tmp, good: tr(tmp, good.dataset, f'--transfer={pickle_file(tmp, [1, 2])}'),
                               'holds a list'),
    'tr-transfer-unreachable': (lambda tmp, good: tr(tmp, good.dataset, f'--transfer={closed_port_url("n.pkl")}'),
                                'Could not download'),
    'tr-metric-ref-keys': (lambda tmp, good: tr(tmp, good.dataset, '--metrics=fid', f'--metric-ref={npz(tmp, mean=[0])}'),
                           "no 'mu'"),
    'tr-bad-device': (lambda tmp, good: tr(tmp, good.dataset, '--device=abacus'), '--device=abacus'),
    'tr-outdir-under-a-file': (lambda tmp, good: ('train', [f'--outdir={write_file(tmp / "f", b"")}/runs',
                                                           f'--data={good.dataset}', *TRAIN_FLAGS]),
                               'Cannot write the run folder'),
    # generate.py
    'gen-truncated-pickle': (lambda tmp, good: gen(tmp, truncated_copy(good.pkl, tmp / 'n.pkl')),
                             'not a readable network pickle'),
    'gen-pickle-without-ema': (lambda tmp, good: gen(tmp, pickle_file(tmp, dict(net=1))), 'has no "ema" network'),
    'gen-unreachable-url': (lambda tmp, good: gen(tmp, closed_port_url('n.pkl')), 'Could not download'),
    'gen-bad-seeds': (lambda tmp, good: gen(tmp, good.pkl, '--seeds=a-b'), 'seeds'),
    'gen-cfg-unconditional': (lambda tmp, good: gen(tmp, good.pkl, '--cfg=2'), 'unconditional'),
    'gen-truncated-safetensors': (lambda tmp, good: gen(tmp, truncated_copy(good.safetensors, tmp / 'n.safetensors')),
                                  'not a readable .safetensors'),
    'gen-safetensors-of-something-else': (
        lambda tmp, good: gen(tmp, safetensors_file(tmp, dict(w=torch.zeros(2)), dict(format='other'))),
        'not a network snapshot of this code'),
    'gen-safetensors-wrong-shapes': (
        lambda tmp, good: gen(tmp, edited_safetensors(good, tmp, architecture=wider_architecture(good))),
        'do not fit the recorded architecture'),
    'gen-safetensors-unknown-class': (
        lambda tmp, good: gen(tmp, edited_safetensors(good, tmp, architecture='{"class_name": "os.system"}')),
        "class 'os.system'"),
    # fid.py
    'fid-ref-keys': (lambda tmp, good: fid_calc(good, ref=npz(tmp, mean=np.zeros(12))), "no 'mu'"),
    'fid-ref-truncated': (lambda tmp, good: fid_calc(good, ref=truncated_copy(good.ref, tmp / 'r.npz', 0.9)),
                          'not FID reference statistics'),
    'fid-ref-unreachable': (lambda tmp, good: fid_calc(good, ref=closed_port_url('ref.npz')), 'Could not download'),
    'fid-detector-truncated': (lambda tmp, good: fid_calc(good, detector=truncated_copy(good.detector, tmp / 'd.pt')),
                               'not a TorchScript module'),
    'fid-detector-wrong-kind': (lambda tmp, good: fid_calc(good, detector=pickle_file(tmp, dict(a=1))), 'not a detector'),
    'fid-no-images': (lambda tmp, good: fid_calc(good, images=write_folder(tmp / 'empty', {})), 'no images'),
    'fid-two-channel-images': (
        lambda tmp, good: fid_calc(good, images=write_folder(tmp / 'la', {f'{i}.png': la_png(i) for i in range(4)})),
        'expected L or RGB'),
    'fid-num-1': (lambda tmp, good: fid_calc(good, num=1), '--num'),
    'fid-ref-of-truncated-dataset': (lambda tmp, good: fid_ref(tmp, good, truncated_copy(good.dataset, tmp / 't.zip')),
                                     'not a readable zip'),
}


def damaged_member_zip(tmp):
    """A zip whose second image has flipped bytes (its CRC no longer matches)."""
    path = write_zip(tmp / 'damaged.zip', {'a.png': png_bytes(rgb(0)), 'b.png': png_bytes(rgb(1))})
    with open(path, 'rb') as f:
        data = bytearray(f.read())
    at = data.index(b'b.png') + len(b'b.png') + 100   # inside the stored image data
    data[at:at + 20] = bytes(20)
    with open(path, 'wb') as f:
        f.write(data)
    return path


def torch_file(tmp):
    """A torch.save file that is not a training state."""
    torch.save(dict(weights=torch.zeros(3)), tmp / 'other.pt')
    return str(tmp / 'other.pt')


def npz(tmp, **arrays):
    np.savez(tmp / 'arrays.npz', **arrays)
    return str(tmp / 'arrays.npz')


def la_png(seed):
    """A two-channel (gray + alpha) PNG."""
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (8, 8, 2), dtype=np.uint8))


def wider_architecture(good):
    """The good snapshot's architecture JSON with twice the channels."""
    import json
    with safetensors.safe_open(good.safetensors, 'pt') as f:
        architecture = json.loads(f.metadata()['architecture'])
    architecture['init_kwargs']['model_channels'] = 16
    return json.dumps(architecture)


def files_under(root):
    """Every file and folder below root (relative paths), to see what a command wrote."""
    found = set()
    for folder, dirs, names in os.walk(root):
        found.update(os.path.relpath(os.path.join(folder, n), root) for n in dirs + names)
    return found


def assert_one_error_line(result, needle):
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert 'Traceback' not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1, result.stderr
    assert needle in errors[0], errors[0]
    assert '(unexpected;' not in errors[0], errors[0]   # an error the tool anticipated, with its own message


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No download cache outside tmp_path, no retry delays, no torchrun variables."""
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(dnnlib.util, '_RETRY_DELAY_S', 0)
    monkeypatch.delenv('PD_DEBUG', raising=False)
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)


def test_there_are_at_least_30_cases_covering_every_tool():
    tools = [name.split('-')[0] for name in CASES]
    assert len(CASES) >= 30
    assert all(tools.count(tool) >= 5 for tool in ('dt', 'tr', 'gen', 'fid')), tools


@pytest.mark.parametrize('name', list(CASES))
def test_bad_input_is_one_error_line_and_writes_nothing(name, good, tmp_path, offline):
    make, needle = CASES[name]
    tool, args = make(tmp_path, good)
    before = files_under(tmp_path)
    result = CliRunner().invoke(CLIS[tool], [str(a) for a in args])
    assert_one_error_line(result, needle)
    assert files_under(tmp_path) == before


def test_a_safetensors_name_is_never_unpickled(good, tmp_path, offline):
    """A pickle renamed to .safetensors is refused without running it."""
    marker = tmp_path / 'ran.txt'
    network = pickle_file(tmp_path, dict(ema=_CreatesFileWhenUnpickled(str(marker))), name='net.safetensors')
    result = CliRunner().invoke(generate.main, [f'--network={network}', f'--outdir={tmp_path / "gen"}', '--device=cpu'])
    assert_one_error_line(result, 'not a readable .safetensors')
    assert not marker.exists()
    with pytest.raises(ValueError, match='not a readable .safetensors'):
        snapshots.load_network(network)
    assert not marker.exists()


def test_debug_flag_raises_the_original_exception(good, tmp_path, offline):
    """--debug: CliRunner sees the exception itself (a real process prints its traceback)."""
    network = truncated_copy(good.pkl, tmp_path / 'n.pkl')
    for tool, args in (gen(tmp_path, network, '--debug'),
                       ('fid', ['--debug', 'calc', f'--images={good.images}', f'--ref={npz(tmp_path, mean=[0])}',
                                f'--detector={good.detector}', '--device=cpu']),
                       tr(tmp_path, good.dataset, f'--resume={torch_file(tmp_path)}', '--debug'),
                       dt(tmp_path, f'--source={write_folder(tmp_path / "src", {"a.png": BAD})}', '--debug')):
        result = CliRunner().invoke(CLIS[tool], [str(a) for a in args])
        assert result.exit_code != 0
        if tool == 'train':   # prints the traceback itself, after shutting the processes down
            assert 'Traceback' in result.stderr and 'not a training state' in result.stderr
        else:
            assert isinstance(result.exception, (ValueError, OSError)), (tool, repr(result.exception))


# ----------------------------------------------------------------------------
# Real processes: exit status, stderr, PD_DEBUG.

SUBPROCESS_CASES = ['dt-truncated-zip', 'tr-truncated-resume', 'gen-truncated-pickle', 'fid-ref-keys']


def run_tool(repo_root, env, tool, args):
    return subprocess.run([sys.executable, f'{tool}.py', *map(str, args)], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('name', SUBPROCESS_CASES)
def test_real_process_exits_1_with_one_line(name, good, tmp_path, repo_root, subprocess_env):
    make, needle = CASES[name]
    tool, args = make(tmp_path, good)
    before = files_under(tmp_path)
    proc = run_tool(repo_root, dict(subprocess_env, DNNLIB_CACHE_DIR=str(tmp_path / 'cache')), tool, args)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert 'Traceback' not in proc.stderr
    assert files_under(tmp_path) == before


def test_pd_debug_shows_the_traceback(good, tmp_path, repo_root, subprocess_env):
    tool, args = CASES['gen-truncated-pickle'][0](tmp_path, good)
    proc = run_tool(repo_root, dict(subprocess_env, PD_DEBUG='1'), tool, args)
    assert proc.returncode == 1
    assert 'Traceback (most recent call last)' in proc.stderr and 'not a readable network pickle' in proc.stderr
