"""Tests of hf://OWNER/REPO/FILE addresses (dnnlib/util.py, through
dnnlib.util.open_url): generate.py --network and train.py --transfer read
them from a Hugging Face cache folder laid out as the Hub's, offline; a
local stand-in for the Hub serves downloads, a cut transfer and the Hub's
errors; every failure is one line that says what to do. Nothing here
reaches the network.

huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment
once, at import, so the in-process tests set both the environment (for
child processes) and huggingface_hub.constants; the subprocess tests check
that the environment alone is enough."""

import hashlib
import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import constants, file_download

import dataset_tool
import dnnlib
import fid
import generate
import train
from dataset_prep.archive import convert_dataset
from torch_utils import misc
from training import architectures, snapshots

COMMIT = '0123456789abcdef0123456789abcdef01234567'   # the commit the cached files belong to
REPO = 'owner/repo'
TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0)
TRAIN_FLAGS = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0',
               '--device=cpu', '--batch=4', '--cond=0', '--augment=0', '--samples=0', '--seed=0']


# ----------------------------------------------------------------------------
# Helpers: a snapshot, a cache laid out as the Hub's, a local stand-in for the Hub.

def tiny_snapshot(path, resolution, seed=0):
    """A network snapshot of TINY_NET with random (not freshly initialised) weights; returns the network."""
    net = architectures.build_network(TINY_NET, resolution, 3, 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    snapshots.save_snapshot(str(path), net, None, None, {})
    return net


def put_in_cache(cache, repo_id, filename, source):
    """Place `source` in a Hugging Face cache as FILE of repo_id at COMMIT,
    the commit its branch main points to."""
    folder = cache / f'models--{repo_id.replace("/", "--")}'
    (folder / 'refs').mkdir(parents=True, exist_ok=True)
    (folder / 'refs' / 'main').write_text(COMMIT)
    dest = folder / 'snapshots' / COMMIT / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)


def cached_files(cache):
    """The files a cache holds, whole or in part: its blobs and snapshots (not its refs and locks)."""
    return sorted(str(p.relative_to(cache)) for pattern in ('models--*/blobs/*', 'models--*/snapshots/**/*')
                  for p in cache.glob(pattern) if p.is_file())


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache folder, offline (HF_HUB_OFFLINE=1)."""
    cache = tmp_path / 'hf-cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf-home'))
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    return cache


@pytest.fixture(scope='module')
def cached_net(tmp_path_factory):
    """(path, net) of an 8x8 snapshot, to be put in a cache."""
    path = tmp_path_factory.mktemp('net') / 'net.pkl'
    return path, tiny_snapshot(path, 8)


class FakeHub(http.server.ThreadingHTTPServer):
    """The Hub's file endpoint, /OWNER/REPO/resolve/REVISION/FILE, on
    127.0.0.1: the files of REPO at revisions main and COMMIT, the Hub's
    error headers for a missing repository, revision or file. `cut`: how
    many GETs to cut off after 10.5 MB (more than huggingface_hub's
    download chunk), or half the file if it is smaller."""

    def __init__(self, files):
        super().__init__(('127.0.0.1', 0), FakeHubHandler)
        self.files, self.cut, self.requests = files, 0, []
        self.endpoint = f'http://127.0.0.1:{self.server_port}'


class FakeHubHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(body=False)

    def do_GET(self):
        self._answer(body=True)

    def _answer(self, body):
        self.server.requests.append((self.command, self.path, self.headers.get('Range')))
        owner, name, resolve, revision, filename = (self.path.lstrip('/').split('/', 4) + [''] * 5)[:5]
        error = ('RepoNotFound' if f'{owner}/{name}' != REPO or resolve != 'resolve' else
                 'RevisionNotFound' if revision not in ('main', COMMIT) else
                 'EntryNotFound' if filename not in self.server.files else None)
        if error:
            self.send_response(404)
            self.send_header('X-Error-Code', error)
            self.send_header('Content-Length', '0')
            self.end_headers()
            return
        data = self.server.files[filename]
        start = int(self.headers['Range'].split('=')[1].split('-')[0]) if self.headers.get('Range') else 0
        self.send_response(206 if start else 200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header('Content-Length', str(len(data) - start))
        if start:
            self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        if not body:
            return
        if self.server.cut > 0:
            self.server.cut -= 1
            self.wfile.write(data[start:start + (10_500_000 if len(data) > 10_500_000 else len(data) // 2)])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A FakeHub serving nothing yet, online, with its own cache folder (its .cache)."""
    server = FakeHub({})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    cache = tmp_path / 'hf-cache'
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'ENDPOINT', server.endpoint)
    template = server.endpoint + '/{repo_id}/resolve/{revision}/{filename}'
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', template)
    monkeypatch.setattr(file_download, 'HUGGINGFACE_CO_URL_TEMPLATE', template, raising=False)   # 0.2x/0.3x's copy
    monkeypatch.setattr(time, 'sleep', lambda seconds: None)   # huggingface_hub's waits between retries
    server.cache = cache
    yield server
    server.shutdown()
    server.server_close()


def same_tensors(net_a, net_b):
    a, b = dict(misc.named_params_and_buffers(net_a)), dict(misc.named_params_and_buffers(net_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def offline_env(subprocess_env, cache):
    """The environment of a child process that reads the Hub only from `cache`."""
    return dict(subprocess_env, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(cache.parent / 'hf-home'))


def read(url):
    with dnnlib.util.open_url(url) as f:
        return f.read()


def pngs(folder):
    """{name: pixels} of the PNGs in a folder."""
    return {p.name: np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob('*.png'))}


def one_error_line(result):
    """The single 'Error: ...' line a failed in-process command wrote to stderr (and no traceback)."""
    assert result.exit_code == 1, result.output
    assert 'Traceback' not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: '), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------
# Addresses.

def test_parse_splits_repository_file_and_revision():
    assert dnnlib.util.parse_hf_url('hf://owner/repo/net.pkl') == ('owner/repo', 'net.pkl', None)
    assert dnnlib.util.parse_hf_url('hf://owner/repo/sub/dir/net.pkl') == ('owner/repo', 'sub/dir/net.pkl', None)
    assert dnnlib.util.parse_hf_url(f'hf://owner/repo@{COMMIT}/net.pkl') == ('owner/repo', 'net.pkl', COMMIT)
    assert dnnlib.util.parse_hf_url('hf://owner/repo@v1.0/net.pkl') == ('owner/repo', 'net.pkl', 'v1.0')
    assert dnnlib.util.is_url('hf://owner/repo/net.pkl')


@pytest.mark.parametrize('url', ['hf://onlyowner', 'hf://owner/repo', 'hf://owner/repo/', 'hf:///repo/net.pkl',
                                 'hf://owner/repo@/net.pkl', 'hf://owner/repo/dir/', 'hf://owner/repo/../net.pkl',
                                 'hf://owner/repo/dir//net.pkl', 'hf://owner/repo/./net.pkl'])
def test_malformed_address_says_the_form(url, hub_cache):
    with pytest.raises(ValueError, match='is not a Hugging Face Hub address: write hf://OWNER/REPO/FILE'):
        dnnlib.util.open_url(url)


def test_address_huggingface_hub_rejects_says_the_form(hub_cache):
    with pytest.raises(ValueError, match=r'^hf://own er/repo/net.pkl is not a valid Hugging Face Hub address '
                                         r'\(.+\); write hf://OWNER'):
        dnnlib.util.open_url('hf://own er/repo/net.pkl')


def test_malformed_address_on_the_command_line(hub_cache, tmp_path):
    result = CliRunner().invoke(generate.main, ['--network=hf://onlyowner', f'--outdir={tmp_path / "out"}',
                                                '--device=cpu'])
    assert one_error_line(result).startswith('Error: hf://onlyowner is not a Hugging Face Hub address: write ')
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------
# Offline, from the cache.

def test_open_url_reads_the_cached_file_at_main_or_a_pinned_commit(hub_cache, cached_net):
    path, _ = cached_net
    put_in_cache(hub_cache, REPO, 'nets/net.pkl', path)
    expected = path.read_bytes()
    assert read('hf://owner/repo/nets/net.pkl') == expected
    assert read(f'hf://owner/repo@{COMMIT}/nets/net.pkl') == expected
    net, _ = snapshots.load_network('hf://owner/repo/nets/net.pkl')
    assert same_tensors(net, cached_net[1])


@pytest.mark.parametrize('url, where', [('hf://owner/repo/missing.pkl', 'missing.pkl of owner/repo'),
                                        ('hf://owner/repo@v2/net.pkl', 'net.pkl of owner/repo at revision v2'),
                                        ('hf://other/repo/net.pkl', 'net.pkl of other/repo')])
def test_file_not_cached_while_offline(hub_cache, cached_net, url, where):
    put_in_cache(hub_cache, REPO, 'net.pkl', cached_net[0])
    before = cached_files(hub_cache)
    with pytest.raises(dnnlib.util.DownloadError) as info:
        dnnlib.util.open_url(url)
    assert str(info.value) == (f'{where} is not in the Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE is '
                               f'set: unset HF_HUB_OFFLINE to download it, or set HF_HUB_CACHE to a cache that '
                               f'holds it')
    assert cached_files(hub_cache) == before


def test_generate_samples_the_same_images_from_the_hub(hub_cache, cached_net, tmp_path, subprocess_env, repo_root):
    """generate.py --network=hf://... in a child process whose environment
    alone (HF_HUB_OFFLINE=1, HF_HUB_CACHE) points it at the cache: the same
    PNGs as from the local path."""
    path, _ = cached_net
    put_in_cache(hub_cache, REPO, 'net.pkl', path)
    flags = ['--seeds=0-1', '--steps=3', '--device=cpu']
    result = CliRunner().invoke(generate.main, [f'--network={path}', f'--outdir={tmp_path / "local"}', *flags])
    assert result.exit_code == 0, result.output
    proc = subprocess.run([sys.executable, 'generate.py', '--network=hf://owner/repo/net.pkl',
                           f'--outdir={tmp_path / "hub"}', *flags], cwd=repo_root,
                          env=offline_env(subprocess_env, hub_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    local, from_hub = pngs(tmp_path / 'local'), pngs(tmp_path / 'hub')
    assert sorted(local) == sorted(from_hub) == ['000000.png', '000001.png']
    assert all(np.array_equal(local[name], from_hub[name]) for name in local)


def test_generate_missing_file_is_one_line_in_a_real_process(hub_cache, cached_net, tmp_path, subprocess_env,
                                                              repo_root):
    put_in_cache(hub_cache, REPO, 'net.pkl', cached_net[0])
    proc = subprocess.run([sys.executable, 'generate.py', '--network=hf://owner/repo/missing.pkl',
                           f'--outdir={tmp_path / "out"}', '--device=cpu'], cwd=repo_root,
                          env=offline_env(subprocess_env, hub_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f'Error: Cannot open the network pickle hf://owner/repo/missing.pkl: missing.pkl of owner/repo is not in '
        f'the Hugging Face cache ({hub_cache}) and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it, '
        f'or set HF_HUB_CACHE to a cache that holds it']
    assert not (tmp_path / 'out').exists()


@pytest.fixture
def shapes_zip(tmp_path):
    """A dataset of 8 demo images, 32x32."""
    path = tmp_path / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:8', str(path), resolution=(32, 32))
    return path


def test_train_transfers_from_the_hub(hub_cache, shapes_zip, tmp_path, no_torchrun_env):
    """train.py --transfer=hf://...: the run starts from the cached
    snapshot's weights (a run of one step, which has lr 0, ends with the
    source's weights bit for bit)."""
    source = tiny_snapshot(tmp_path / 'source.pkl', 32, seed=1)
    put_in_cache(hub_cache, REPO, 'source.pkl', tmp_path / 'source.pkl')
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_zip}', '--duration=0.000004',
                                             '--transfer=hf://owner/repo/source.pkl', *TRAIN_FLAGS])
    assert result.exit_code == 0, result.output
    count = len(misc.named_params_and_buffers(source))
    assert f'Transferred {count} tensors from "hf://owner/repo/source.pkl"' in result.output
    assert 'not in the source' not in result.output
    (first,) = outdir.glob('*/network-snapshot-000000.pkl')
    net, _ = snapshots.load_network(first)
    assert same_tensors(net, source)


def test_train_missing_transfer_file_stops_before_the_run(hub_cache, shapes_zip, tmp_path, no_torchrun_env):
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_zip}', '--duration=0.00005',
                                             '--transfer=hf://owner/repo/missing.pkl', *TRAIN_FLAGS])
    line = one_error_line(result)
    assert line.startswith('Error: --transfer: Cannot open the network pickle hf://owner/repo/missing.pkl: '
                           'missing.pkl of owner/repo is not in the Hugging Face cache')
    assert 'HF_HUB_OFFLINE is set' in line
    assert not outdir.exists()


def test_without_huggingface_hub_says_how_to_install_it(hub_cache, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, 'huggingface_hub', None)   # `import huggingface_hub` raises ImportError
    with pytest.raises(ValueError, match=r'need the huggingface_hub package .*install it with: pip install '
                                         r'huggingface_hub \(or pip install -e "\.\[hub\]"\)$'):
        dnnlib.util.open_url('hf://owner/repo/net.pkl')
    result = CliRunner().invoke(generate.main, ['--network=hf://owner/repo/net.pkl', f'--outdir={tmp_path / "out"}',
                                                '--device=cpu'])
    assert 'pip install huggingface_hub' in one_error_line(result)


# ----------------------------------------------------------------------------
# Online, against the stand-in for the Hub.

def test_downloads_into_the_cache_once_then_works_offline(fake_hub, monkeypatch):
    data = os.urandom(100_000)
    fake_hub.files['sub/net.pkl'] = data
    assert read('hf://owner/repo/sub/net.pkl') == data
    snapshot = fake_hub.cache / 'models--owner--repo' / 'snapshots' / COMMIT / 'sub' / 'net.pkl'
    assert snapshot.read_bytes() == data
    assert [(method, path) for method, path, _ in fake_hub.requests if 'resolve' in path] == [
        ('HEAD', '/owner/repo/resolve/main/sub/net.pkl'), ('GET', '/owner/repo/resolve/main/sub/net.pkl')]
    fake_hub.requests.clear()
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
    assert read('hf://owner/repo/sub/net.pkl') == data and fake_hub.requests == []


def test_cut_download_resumes(fake_hub):
    """A transfer cut off after 10.5 MB goes on from where it stopped (a
    Range request): in the same call (huggingface_hub 1.0 and later), or in
    the next from the partial blob it keeps (0.23 to 0.x)."""
    data = os.urandom(12_000_000)
    fake_hub.files['net.pkl'] = data
    fake_hub.cut = 1
    try:
        got = read('hf://owner/repo/net.pkl')
    except dnnlib.util.DownloadError:
        got = read('hf://owner/repo/net.pkl')
    assert got == data
    gets = [rng for method, path, rng in fake_hub.requests if method == 'GET' and 'resolve' in path]
    assert gets[0] is None and len(gets) == 2 and gets[1].startswith('bytes=10') and gets[1].endswith('-')


def test_failed_download_leaves_no_file_in_the_cache(fake_hub):
    """Every attempt cut off: an error, no file in the cache (at most a
    partial *.incomplete blob, which the next download resumes)."""
    data = os.urandom(100_000)
    fake_hub.files['net.pkl'] = data
    fake_hub.cut = 100
    with pytest.raises(dnnlib.util.DownloadError, match=r'^Cannot download net\.pkl of owner/repo from the Hugging '
                                                        r'Face Hub \(.+\); try again, or download the file'):
        dnnlib.util.open_url('hf://owner/repo/net.pkl')
    assert [name for name in cached_files(fake_hub.cache) if not name.endswith('.incomplete')] == []
    fake_hub.cut = 0
    assert read('hf://owner/repo/net.pkl') == data


@pytest.mark.parametrize('url, message', [
    ('hf://owner/nothing/net.pkl', 'The Hugging Face Hub has no repository owner/nothing that this machine may '
                                   'read: check hf://owner/nothing/net.pkl; for a private or gated repository set '
                                   'HF_TOKEN to a token with access'),
    ('hf://owner/repo@v9/net.pkl', 'owner/repo on the Hugging Face Hub has no revision v9: check '
                                   'hf://owner/repo@v9/net.pkl'),
    ('hf://owner/repo/missing.pkl', 'The Hugging Face Hub has no file missing.pkl of owner/repo: check '
                                    'hf://owner/repo/missing.pkl against the files listed at {endpoint}/owner/repo/'
                                    'tree/main'),
])
def test_missing_repository_revision_or_file(fake_hub, url, message):
    fake_hub.files['net.pkl'] = b'data'
    with pytest.raises(dnnlib.util.DownloadError) as info:
        dnnlib.util.open_url(url)
    assert str(info.value) == message.format(endpoint=fake_hub.endpoint)


def test_no_network_says_so(fake_hub, tmp_path):
    fake_hub.shutdown()
    fake_hub.server_close()   # nothing listens at the endpoint any more
    result = CliRunner().invoke(generate.main, ['--network=hf://owner/repo/net.pkl', f'--outdir={tmp_path / "out"}',
                                                '--device=cpu'])
    assert one_error_line(result) == (
        f'Error: Cannot open the network pickle hf://owner/repo/net.pkl: Cannot reach the Hugging Face Hub '
        f'({fake_hub.endpoint}) to download net.pkl of owner/repo, and it is not in the cache ({fake_hub.cache}): '
        f'check the network connection, or download the file elsewhere and pass its local path')


# ----------------------------------------------------------------------------
# No network: the Hub's address is a closed or silent port on 127.0.0.1. Nothing
# patches time.sleep here, so huggingface_hub's retries (about half a minute
# for a Hub that does not answer) would show in the time taken.

NO_NETWORK_S = 10   # the most a command may take to say that there is no network


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch, free_port):
    """An empty cache, HF_HUB_OFFLINE unset, and a Hub endpoint where nothing listens; returns (endpoint, cache)."""
    endpoint, cache = f'http://127.0.0.1:{free_port}', tmp_path / 'hf-cache'
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    template = endpoint + '/{repo_id}/resolve/{revision}/{filename}'
    monkeypatch.setattr(constants, 'HUGGINGFACE_CO_URL_TEMPLATE', template)
    monkeypatch.setattr(file_download, 'HUGGINGFACE_CO_URL_TEMPLATE', template, raising=False)
    return endpoint, cache


def timed(fn, *args):
    start = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - start


def test_no_network_fails_fast_for_hub_files(unreachable_hub, tmp_path):
    endpoint, cache = unreachable_hub
    result, seconds = timed(CliRunner().invoke, generate.main, ['--network=hf://owner/repo/net.pkl',
                                                                f'--outdir={tmp_path / "out"}', '--device=cpu'])
    assert one_error_line(result) == (
        f'Error: Cannot open the network pickle hf://owner/repo/net.pkl: Cannot reach the Hugging Face Hub '
        f'({endpoint}) to download net.pkl of owner/repo, and it is not in the cache ({cache}): '
        f'check the network connection, or download the file elsewhere and pass its local path')
    assert seconds < NO_NETWORK_S


def test_no_network_reads_the_cached_file_at_once(unreachable_hub, cached_net):
    _endpoint, cache = unreachable_hub
    put_in_cache(cache, REPO, 'net.pkl', cached_net[0])
    data, seconds = timed(read, 'hf://owner/repo/net.pkl')
    assert data == cached_net[0].read_bytes() and seconds < NO_NETWORK_S


def test_no_network_fails_fast_for_the_vae(unreachable_hub, tmp_path):
    """dataset_tool.py encode with the default VAE (a Hub id, through diffusers)."""
    pytest.importorskip('diffusers')
    endpoint, cache = unreachable_hub
    dest = tmp_path / 'latents.zip'
    result, seconds = timed(CliRunner().invoke, dataset_tool.cli, ['encode', '--source=demo:shapes:2',
                                                                   f'--dest={dest}', '--device=cpu'])
    assert one_error_line(result) == (
        f'Error: Cannot load the VAE from hub id stabilityai/sd-vae-ft-ema: it is not in the Hugging Face cache ({cache}) and '
        f'the Hugging Face Hub ({endpoint}) does not answer (no network?); connect this machine to the network, '
        f'or on a machine that has a network save it with AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema")'
        f'.save_pretrained(DIR) and give that folder (--vae=DIR)')
    assert seconds < NO_NETWORK_S and not dest.exists()


def test_no_network_fails_fast_for_dinov2(unreachable_hub, tmp_path):
    """fid.py ref --metrics=fd_dinov2 with the default model (a Hub id, through transformers)."""
    pytest.importorskip('transformers')
    _endpoint, cache = unreachable_hub
    folder = tmp_path / 'images'
    convert_dataset('demo:shapes:2', str(folder), resolution=(16, 16))
    dest = tmp_path / 'ref.npz'
    result, seconds = timed(CliRunner().invoke, fid.main, ['ref', f'--data={folder}', f'--dest={dest}',
                                                           '--metrics=fd_dinov2', '--device=cpu', '--workers=0'])
    line = one_error_line(result)
    assert line.startswith(f'Error: Cannot load the DINOv2 model from Hub id facebook/dinov2-large: it is not in the Hugging '
                           f'Face cache ({cache}) and the Hugging Face Hub')
    assert '(no network?)' in line and 'fid.py --dinov2=DIR' in line
    assert seconds < NO_NETWORK_S and not dest.exists()


def test_a_silent_hub_is_given_up_after_the_probe_timeout(unreachable_hub, monkeypatch):
    """A Hub whose connections hang (a listening socket with a full queue: the
    kernel drops further connection requests) counts as unreachable after
    HUB_PROBE_TIMEOUT_S."""
    server = socket.socket()
    server.bind(('127.0.0.1', 0))
    server.listen(0)
    waiting = []
    for _ in range(4):   # fill the queue; these are never accepted
        client = socket.socket()
        client.setblocking(False)
        client.connect_ex(server.getsockname())
        waiting.append(client)
    endpoint = f'http://127.0.0.1:{server.getsockname()[1]}'
    monkeypatch.setattr(constants, 'ENDPOINT', endpoint)
    monkeypatch.setattr(dnnlib.util, 'HUB_PROBE_TIMEOUT_S', 0.5)
    try:
        reason, seconds = timed(dnnlib.util.hub_unavailable)
    finally:
        for sock in [*waiting, server]:
            sock.close()
    assert reason == f'the Hugging Face Hub ({endpoint}) does not answer (no network?)'
    assert 0.4 < seconds < 2
