"""Tests of dnnlib.util: EasyDict, atomic writes and open_url with its cache."""

import http.server
import os
import socket
import threading

import pytest

from dnnlib import util

PAYLOAD = b'network weights \x00\x01\x02' * 100


# ----------------------------------------------------------------------------
# EasyDict.

def test_easydict_attribute_access():
    d = util.EasyDict(a=1, b=dict(c=2))
    assert d.a == 1 and d['b'] == dict(c=2)
    d.x = 'new'
    assert d['x'] == 'new'
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.a
    with pytest.raises(AttributeError):
        del d.missing
    assert isinstance(d, dict) and not hasattr(d, 'missing')


# ----------------------------------------------------------------------------
# Atomic writes.

def _leftovers(folder, final_names):
    """Files in `folder` other than the expected final ones (temporaries)."""
    return sorted(set(os.listdir(folder)) - set(final_names))


def test_atomic_write_complete_file_on_success(tmp_path):
    target = tmp_path / 'sub' / 'out.bin'
    with util.atomic_write(target) as f:
        f.write(b'part one, ')
        assert not target.exists()   # nothing under the final name while writing
        f.write(b'part two')
    assert target.read_bytes() == b'part one, part two'
    assert _leftovers(target.parent, ['out.bin']) == []

    with util.atomic_write(target, 'w') as f:
        f.write('text replaces it')
    assert target.read_text() == 'text replaces it'


def test_atomic_write_exception_leaves_target_untouched(tmp_path):
    target = tmp_path / 'out.txt'
    target.write_text('old content')
    with pytest.raises(RuntimeError, match='writer failed'):
        with util.atomic_write(target, 'w') as f:
            f.write('half of the new con')
            raise RuntimeError('writer failed')
    assert target.read_text() == 'old content'
    assert _leftovers(tmp_path, ['out.txt']) == []


def test_atomic_path_file_and_folder(tmp_path):
    target = tmp_path / 'archive.dat'
    with util.atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp != str(target)
        with open(tmp, 'wb') as f:
            f.write(b'by name')
    assert target.read_bytes() == b'by name'

    folder_target = tmp_path / 'folder'
    with util.atomic_path(folder_target) as tmp:
        os.makedirs(os.path.join(tmp, 'inner'))
        with open(os.path.join(tmp, 'inner', 'a.txt'), 'w') as f:
            f.write('a')
    assert (folder_target / 'inner' / 'a.txt').read_text() == 'a'
    assert _leftovers(tmp_path, ['archive.dat', 'folder']) == []


def test_atomic_path_exception_removes_temporary(tmp_path):
    target = tmp_path / 'archive.dat'
    target.write_bytes(b'previous')
    for make_folder in (False, True):
        with pytest.raises(KeyboardInterrupt):
            with util.atomic_path(target) as tmp:
                if make_folder:
                    os.makedirs(os.path.join(tmp, 'x'))
                else:
                    with open(tmp, 'wb') as f:
                        f.write(b'partial')
                raise KeyboardInterrupt
        assert target.read_bytes() == b'previous'
        assert _leftovers(tmp_path, ['archive.dat']) == []


# ----------------------------------------------------------------------------
# open_url: local files.

def test_open_url_local_path_and_file_url(tmp_path):
    path = tmp_path / 'my file.bin'
    path.write_bytes(PAYLOAD)
    with util.open_url(str(path)) as f:
        assert f.read() == PAYLOAD
    with util.open_url(path) as f:   # os.PathLike
        assert f.read() == PAYLOAD
    with util.open_url(path.as_uri()) as f:   # file:// with a quoted space
        assert f.read() == PAYLOAD
    with pytest.raises(FileNotFoundError, match='nope.bin'):
        util.open_url(str(tmp_path / 'nope.bin'))
    with pytest.raises(FileNotFoundError, match='nope.bin'):
        util.open_url((tmp_path / 'nope.bin').as_uri())


# ----------------------------------------------------------------------------
# open_url: http through a local server.

class _Server:
    """A local HTTP server on 127.0.0.1 in a thread, counting requests per path.

    /data.bin serves PAYLOAD; /flaky.bin fails with 503 `fail_first` times,
    then serves PAYLOAD; every other path is a 404.
    """

    def __init__(self, fail_first=2):
        self.counts = {}
        self.fail_first = fail_first
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                count = server.counts[self.path] = server.counts.get(self.path, 0) + 1
                if self.path == '/data.bin' or (self.path == '/flaky.bin' and count > server.fail_first):
                    self.send_response(200)
                    self.send_header('Content-Length', str(len(PAYLOAD)))
                    self.end_headers()
                    self.wfile.write(PAYLOAD)
                else:
                    self.send_error(503 if self.path == '/flaky.bin' else 404)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.base = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    monkeypatch.setattr(util, '_RETRY_DELAY_S', 0.0)
    srv = _Server()
    yield srv
    srv.stop()


def test_open_url_http_downloads_then_serves_from_cache(server, tmp_path):
    url = server.base + '/data.bin'
    cache_dir = tmp_path / 'cache'
    with util.open_url(url, cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == PAYLOAD
    cache_path = util.url_cache_path(url, str(cache_dir))
    assert cache_path.startswith(str(cache_dir)) and cache_path.endswith('data.bin')
    with open(cache_path, 'rb') as f:
        assert f.read() == PAYLOAD
    assert server.counts == {'/data.bin': 1}

    server.stop()   # offline now: the cache must serve the second open
    with util.open_url(url, cache_dir=str(cache_dir), verbose=False) as f:
        assert f.read() == PAYLOAD
    assert server.counts == {'/data.bin': 1}


def test_open_url_honours_dnnlib_cache_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'env-cache'))
    url = server.base + '/data.bin'
    assert util.default_cache_dir() == str(tmp_path / 'env-cache')
    with util.open_url(url, verbose=False) as f:
        assert f.read() == PAYLOAD
    cached = util.url_cache_path(url)
    assert cached.startswith(str(tmp_path / 'env-cache')) and os.path.isfile(cached)


def test_open_url_without_cache_always_downloads(server, tmp_path):
    url = server.base + '/data.bin'
    for _ in range(2):
        with util.open_url(url, cache=False, cache_dir=str(tmp_path), verbose=False) as f:
            assert f.read() == PAYLOAD
    assert server.counts == {'/data.bin': 2}
    assert not os.path.exists(util.url_cache_path(url, str(tmp_path)))


def test_open_url_retries_transient_errors(server, tmp_path):
    url = server.base + '/flaky.bin'
    with util.open_url(url, cache_dir=str(tmp_path), num_attempts=3, verbose=False) as f:
        assert f.read() == PAYLOAD
    assert server.counts == {'/flaky.bin': 3}


def test_open_url_404_raises_download_error_naming_url_and_cache(server, tmp_path):
    url = server.base + '/missing.pkl'
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=3, verbose=False)
    message = str(info.value)
    assert url in message and util.url_cache_path(url, str(tmp_path)) in message
    assert server.counts == {'/missing.pkl': 3}
    assert not os.path.exists(util.url_cache_path(url, str(tmp_path)))


def test_open_url_closed_port_raises_download_error(tmp_path, monkeypatch):
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
    monkeypatch.setattr(util, '_RETRY_DELAY_S', 0.0)
    with socket.socket() as sock:   # a port that nothing listens on once closed
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    url = f'http://127.0.0.1:{port}/net.pkl'
    with pytest.raises(util.DownloadError) as info:
        util.open_url(url, cache_dir=str(tmp_path), num_attempts=2, timeout=5, verbose=False)
    assert url in str(info.value) and util.url_cache_path(url, str(tmp_path)) in str(info.value)
    assert isinstance(info.value, OSError)


def test_is_url_and_cache_path_are_distinct_per_url(tmp_path):
    assert util.is_url('https://example.org/a.pkl') and util.is_url('file:///tmp/a')
    assert not util.is_url('/tmp/a.pkl') and not util.is_url('ftp-like/http://x')
    a = util.url_cache_path('http://host/a/net.pkl', str(tmp_path))
    b = util.url_cache_path('http://host/b/net.pkl', str(tmp_path))
    assert a != b and os.path.basename(a).endswith('_net.pkl')
