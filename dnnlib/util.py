"""EasyDict, atomic file writes, `open_url` with a download cache (and
hf:// Hugging Face Hub addresses), and the error handling shared by the
command-line tools. This package and torch_utils import nothing of the
packages above them (training, evaluation, dataset_prep)."""

import contextlib
import copy
import functools
import hashlib
import io
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

import click
import numpy as np
import requests

_RETRIES = 3
_RETRY_DELAY_S = 1.0


class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------
# Atomic writes: the file appears under its final name complete, or not at all.

@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it to `path` on success.

    For writers that take a file name (zipfile, torch.save, np.savez, PIL).
    On an exception the temporary file or folder is removed and `path` is
    left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    new_folders = _missing_folders(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        base = os.path.basename(path)
        fd, tmp = tempfile.mkstemp(prefix=f'.{base}.', suffix='.tmp', dir=folder)
        os.close(fd)
        os.remove(tmp)  # the writer creates it (a file or a folder)
    except BaseException:
        _remove_empty_folders(new_folders)
        raise
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        _remove_empty_folders(new_folders)
        raise
    _fsync_path(folder)   # the rename itself survives a power cut


@contextlib.contextmanager
def atomic_write(path, mode='wb'):
    """Yield an open file at a temporary name; rename it to `path` on success."""
    assert mode in ('wb', 'w')
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def _fsync_path(path):
    """fsync a file or a folder (best effort for folders: not every filesystem allows it)."""
    if os.path.isfile(path):
        with open(path, 'rb') as f:
            os.fsync(f.fileno())
    elif os.path.isdir(path):
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# Names of atomic_path's temporaries: '.' + final name + '.' + 8 random characters of mkstemp + '.tmp'.
_TEMP_RE = re.compile(r'^\..+\.[a-z0-9_]{8}\.tmp$')


def remove_stale_temp_files(folder):
    """Remove the temporaries that a killed atomic_path left in `folder`.

    Call it only where no other process is writing into `folder` (e.g. a run
    folder when its training starts). Returns the removed names.
    """
    if not os.path.isdir(folder):
        return []
    stale = sorted(name for name in os.listdir(folder) if _TEMP_RE.match(name))
    for name in stale:
        _remove_quietly(os.path.join(folder, name))
    return stale


def append_line(path, line):
    """Append `line` + newline to a text file (e.g. .jsonl) in one write call.

    A line that a kill cut short at the end of the file is dropped first, so
    the file only ever holds whole lines.
    """
    data = (line.rstrip('\n') + '\n').encode('utf-8')
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        _drop_partial_last_line(fd)
        os.write(fd, data)
    finally:
        os.close(fd)


def _drop_partial_last_line(fd):
    """Truncate the file `fd` after its last newline if it does not end with one."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b'\n':
        return
    end, chunk = size, 1 << 16
    while end > 0:
        start = max(end - chunk, 0)
        newline = os.pread(fd, end - start, start).rfind(b'\n')
        if newline >= 0:
            os.ftruncate(fd, start + newline + 1)
            return
        end = start
    os.ftruncate(fd, 0)


def _missing_folders(folder):
    """The folders that os.makedirs(folder) would create, deepest first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return missing


def _remove_empty_folders(folders):
    """Remove the given folders, deepest first, while they are empty."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            return


def _remove_quietly(path):
    try:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------
# open_url

def default_cache_dir():
    """$DNNLIB_CACHE_DIR, else ~/.cache/dnnlib (or $XDG_CACHE_HOME/dnnlib)."""
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.environ['DNNLIB_CACHE_DIR']
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'dnnlib')


def is_url(obj):
    """True for http(s)://, file:// and hf:// (Hugging Face Hub) strings."""
    return isinstance(obj, str) and re.match(r'^(https?|file|hf)://', obj) is not None


def url_cache_path(url, cache_dir=None):
    """Where `open_url` keeps the download of `url`: <cache>/downloads/<md5>_<name>."""
    cache_dir = cache_dir or default_cache_dir()
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    name = re.sub(r'[^0-9A-Za-z._-]', '_', os.path.basename(urllib.parse.urlparse(url).path)) or 'file'
    return os.path.join(cache_dir, 'downloads', f'{digest}_{name}')


class DownloadError(OSError):
    """A URL could not be fetched; the message says how to supply the file instead."""


def open_url(path_or_url, cache=True, cache_dir=None, num_attempts=_RETRIES, timeout=60, verbose=True):
    """Open a local path, a file:// URL, an http(s):// URL or a Hugging Face
    Hub address hf://OWNER/REPO/FILE for binary reading.

    http(s) downloads go through a cache (`$DNNLIB_CACHE_DIR`, else
    ~/.cache/dnnlib), written atomically, so a second call reads the local
    copy and works offline. hf:// addresses go through huggingface_hub and
    its own cache (download_hf); `cache`, `cache_dir`, `num_attempts`,
    `timeout` and `verbose` apply to http(s) only. Returns a binary file object.
    """
    path_or_url = os.fspath(path_or_url)
    if path_or_url.startswith('hf://'):
        return open(download_hf(path_or_url), 'rb')
    if not is_url(path_or_url):
        if not os.path.isfile(path_or_url):
            raise FileNotFoundError(f'No such file: {path_or_url}')
        return open(path_or_url, 'rb')
    if path_or_url.startswith('file://'):
        path = urllib.parse.unquote(urllib.parse.urlparse(path_or_url).path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'No such file: {path} (from {path_or_url})')
        return open(path, 'rb')

    cache_path = url_cache_path(path_or_url, cache_dir)
    if cache and os.path.isfile(cache_path):
        return open(cache_path, 'rb')
    data = _download(path_or_url, cache_path, num_attempts, timeout, verbose)
    if cache:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        with atomic_write(cache_path) as f:
            f.write(data)
    return io.BytesIO(data)


def _download(url, cache_path, num_attempts, timeout, verbose):
    last_error = None
    for attempt in range(num_attempts):
        try:
            if verbose:
                print(f'Downloading {url} ...', flush=True)
            with requests.get(url, timeout=timeout) as res:
                res.raise_for_status()
                if len(res.content) == 0:
                    raise OSError('empty response')
                return res.content
        except (requests.RequestException, OSError) as err:
            last_error = err
            if attempt + 1 < num_attempts:
                time.sleep(_RETRY_DELAY_S * (attempt + 1))
    raise DownloadError(
        f'Could not download {url} after {num_attempts} attempts ({last_error}). '
        f'To work offline, download the file elsewhere and either pass its local path instead of the URL, '
        f'or copy it to {cache_path} (the download cache; set DNNLIB_CACHE_DIR to move it).')


# ----------------------------------------------------------------------------
# Files on the Hugging Face Hub, addressed as hf://OWNER/REPO/FILE (or
# hf://OWNER/REPO@REVISION/FILE, REVISION a branch, tag or commit hash).
# `open_url` opens such addresses through `download_hf`, so every
# option that names a network or statistics file (generate.py --network,
# train.py --transfer, fid.py --ref and --detector) takes one.
#
# huggingface_hub does the fetching, as the well-kept implementation of the
# Hub's cache: downloads go to its cache (HF_HUB_CACHE, else HF_HOME/hub,
# else ~/.cache/huggingface/hub) and land there only when complete, with a
# progress bar on a terminal and a cut transfer resumed; with
# HF_HUB_OFFLINE=1 only the cache is read. It is an optional dependency
# (pip install -e ".[hub]"), imported when an hf:// address is opened.

HF_EXAMPLE = 'hf://zhendongw/patch-diffusion/patch_diffusion_imagenet_1k_ckpt.pkl'   # the official ImageNet checkpoint
HF_INSTALL_HINT = 'pip install huggingface_hub (or pip install -e ".[hub]")'

_HF_ADDRESS = re.compile(r'hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<revision>[^/]+))?/(?P<file>.+)')
_HF_FORM = f'write hf://OWNER/REPO/FILE or hf://OWNER/REPO@REVISION/FILE, e.g. {HF_EXAMPLE}'


def parse_hf_url(url):
    """Split a Hub address: 'hf://OWNER/REPO[@REVISION]/FILE' -> (repo_id
    'OWNER/REPO', filename 'FILE' (may contain folders, not . or ..),
    revision or None). ValueError that shows the form for anything else."""
    match = _HF_ADDRESS.fullmatch(url)
    if match is None or any(part in ('', '.', '..') for part in match['file'].split('/')):
        raise ValueError(f'{url} is not a Hugging Face Hub address: {_HF_FORM}')
    return match['repo'], match['file'], match['revision']


def hub_settings():
    """(endpoint, cache folder, offline) as huggingface_hub read them from the environment
    (HF_ENDPOINT, HF_HUB_CACHE or HF_HOME, HF_HUB_OFFLINE). Needs huggingface_hub."""
    from huggingface_hub import constants
    return constants.ENDPOINT, constants.HF_HUB_CACHE, bool(constants.HF_HUB_OFFLINE)


HUB_PROBE_TIMEOUT_S = 5.0   # how long hub_unavailable waits for a connection to the Hub


def hub_unavailable():
    """None if the Hugging Face Hub may be asked for files; else why not, as a
    phrase: 'HF_HUB_OFFLINE is set' or 'the Hugging Face Hub (ENDPOINT) does
    not answer (no network?)'.

    huggingface_hub retries a Hub it cannot reach for about half a minute
    before it gives up; one TCP connection to the Hub's host (or to the proxy
    that requests to it go through), name lookup included, bounded by
    HUB_PROBE_TIMEOUT_S, tells the same in seconds. Callers then read the
    Hugging Face cache only (local_files_only=True), as huggingface_hub itself
    falls back to the cache when the Hub does not answer."""
    endpoint, _cache, offline = hub_settings()
    if offline:
        return 'HF_HUB_OFFLINE is set'
    if not _can_connect(endpoint, HUB_PROBE_TIMEOUT_S):
        return f'the Hugging Face Hub ({endpoint}) does not answer (no network?)'
    return None


def _can_connect(url, timeout):
    """True if a TCP connection to the host of `url`, or to the proxy the
    environment names for it (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), opens
    within `timeout` seconds in all (name lookup and every address tried)."""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == 'https' else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy and host and not urllib.request.proxy_bypass(host):
        proxy = urllib.parse.urlparse(proxy if '://' in proxy else f'http://{proxy}')
        host, port = proxy.hostname, proxy.port or (443 if proxy.scheme == 'https' else 80)
    if not host:
        return False
    connected = []

    def connect():   # in a thread: a stuck name lookup has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            connected.append(True)
        except OSError:
            pass
    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(connected)


def hub_model_missing(what, reason, save_hint):
    """The one-line message for a model from the Hub, `what` (e.g. 'the VAE from
    hub id OWNER/NAME'), that is not in the Hugging Face cache while the Hub
    may not be asked (`reason` from hub_unavailable); `save_hint` says how to
    save a copy to a folder and where to give it."""
    _endpoint, cache, offline = hub_settings()
    fix = 'unset HF_HUB_OFFLINE to download it' if offline else 'connect this machine to the network'
    return f'Cannot load {what}: it is not in the Hugging Face cache ({cache}) and {reason}; {fix}, or {save_hint}'


def load_pretrained(load, what, where, from_hub, save_hint, fix):
    """`load(local_files_only)`, a diffusers or transformers `from_pretrained`
    of `what` (e.g. 'the VAE') at `where` ('folder PATH' or 'Hub id
    OWNER/NAME'). From the Hub (`from_hub`), the Hub is probed first
    (hub_unavailable: seconds, not half a minute of retries) and, when it may
    not be asked, only the cache is read. Any failure is one ValueError line:
    with `save_hint` (how to save a copy to a folder, and where to give it)
    when the Hub could not be asked, else with `fix`."""
    unavailable = hub_unavailable() if from_hub else None
    try:
        return load(local_files_only=unavailable is not None)
    except Exception as err:   # whatever the library or the Hub client raise for a bad folder or id
        if unavailable:
            raise ValueError(hub_model_missing(f'{what} from {where}', unavailable, save_hint)) from err
        raise ValueError(' '.join(f'Cannot load {what} from {where} ({type(err).__name__}: {err}); {fix}'.split())) \
            from err


def download_hf(url):
    """The local path of the file at Hub address `url` in the Hugging Face
    cache, downloaded first unless it is there (see the comment above).

    Raises ValueError for a malformed address and when huggingface_hub is not
    installed, and DownloadError (an OSError) when the file
    cannot be had: not cached while HF_HUB_OFFLINE is set or the Hub is
    unreachable (found out within seconds, see hub_unavailable), no such
    repository, revision or file, a failed transfer.
    Each message is one line that says what to do.
    """
    repo_id, filename, revision = parse_hf_url(url)
    try:
        from huggingface_hub import hf_hub_download, utils as hub_utils
    except ImportError as err:
        raise ValueError(f'{url}: files from the Hugging Face Hub need the huggingface_hub package ({err}); '
                         f'install it with: {HF_INSTALL_HINT}') from None
    where = f'{filename} of {repo_id}' + (f' at revision {revision}' if revision else '')
    # The settings huggingface_hub read from the environment, passed on explicitly, so that the messages
    # below name what was used.
    endpoint, cache, offline = hub_settings()
    cache_only = hub_unavailable() is not None
    try:
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=cache_only,
                               endpoint=endpoint)
    except hub_utils.LocalEntryNotFoundError as err:   # not cached, and the Hub not asked or not reached
        if offline:
            raise DownloadError(
                f'{where} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: '
                f'unset HF_HUB_OFFLINE to download it, or set HF_HUB_CACHE to a cache that holds it') from err
        raise DownloadError(
            f'Cannot reach the Hugging Face Hub ({endpoint}) to download {where}, and it is not in the '
            f'cache ({cache}): check the network connection, or download the file elsewhere '
            f'and pass its local path') from err
    except hub_utils.RepositoryNotFoundError as err:   # also private and gated repositories without a token
        raise DownloadError(
            f'The Hugging Face Hub has no repository {repo_id} that this machine may read: check {url}; '
            f'for a private or gated repository set HF_TOKEN to a token with access') from err
    except hub_utils.RevisionNotFoundError as err:
        raise DownloadError(
            f'{repo_id} on the Hugging Face Hub has no revision {revision}: check {url}') from err
    except hub_utils.EntryNotFoundError as err:
        raise DownloadError(
            f'The Hugging Face Hub has no file {where}: check {url} against the files listed at '
            f'{endpoint}/{repo_id}/tree/{revision or "main"}') from err
    except ValueError as err:   # huggingface_hub's checks of the repository id and the file name
        raise ValueError(f'{url} is not a valid Hugging Face Hub address ({one_line(err)}); '
                         f'{_HF_FORM}') from err
    except Exception as err:   # a failed transfer: HTTP errors (requests' or httpx's types, by version), a full disk
        raise DownloadError(
            f'Cannot download {where} from the Hugging Face Hub ({type(err).__name__}: '
            f'{one_line(err)}); try again, or download the file elsewhere and pass its local path') from err


def one_line(text):
    """`text` (or an exception's message) with all whitespace runs folded to single spaces."""
    return ' '.join(str(text).split())


def parse_int_list(text):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]; '' or 'none' -> []; a list is returned as it is.

    ValueError for anything else (negative numbers, backward ranges, words).
    """
    if isinstance(text, (list, tuple)):
        return list(text)
    if str(text).strip().lower() in ('', 'none'):
        return []
    values = []
    for part in str(text).split(','):
        match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if match is None:
            raise ValueError(f'Cannot parse {text!r}: use non-negative integers and ranges, e.g. 1,2,5-10')
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f'The range {part.strip()!r} runs backwards; write it as {last}-{first}')
        values.extend(range(first, last + 1))
    return values


def parse_size(text, minimum=1):
    """'WxH' (or 'W,H') -> (width, height); 'N' -> (N, N). ValueError for
    anything else and for sides below `minimum`."""
    match = re.fullmatch(r'\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?', str(text))
    if match is None:
        raise ValueError(f'{text!r}: expected WxH (width x height), e.g. 64x64 or 96x64, or one number for a square')
    width = int(match.group(1))
    height = int(match.group(2)) if match.group(2) else width
    if width < minimum or height < minimum:
        raise ValueError(f'{text!r}: width and height must be >= {minimum}')
    return width, height


def default_workers(most=3):
    """Data loading processes per process that fit this machine: `most`, but
    at most the CPUs this process may run on (its affinity, as DataLoader
    counts them), shared by the processes torchrun started here
    (LOCAL_WORLD_SIZE), less one for the process itself; 0 on one CPU."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    try:
        local_processes = max(int(os.environ.get('LOCAL_WORLD_SIZE', '1')), 1)
    except ValueError:
        local_processes = 1
    return max(0, min(most, cpus // local_processes - 1))


def format_time(seconds):
    """Seconds as a short human-readable string: '45s', '3m 05s', '2h 07m', '1d 03h'."""
    s = int(np.rint(seconds))
    if s < 60:
        return f'{s}s'
    if s < 60 * 60:
        return f'{s // 60}m {s % 60:02d}s'
    if s < 24 * 60 * 60:
        return f'{s // (60 * 60)}h {(s // 60) % 60:02d}m'
    return f'{s // (24 * 60 * 60)}d {(s // (60 * 60)) % 24:02d}h'


class Logger:
    """Copy everything written to stdout and stderr into a log file (append)."""

    def __init__(self, file_name, file_mode='a'):
        self.file = open(file_name, file_mode)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self, self

    def write(self, text):
        if text:
            self.file.write(text)
            self.stdout.write(text)
            self.flush()

    def flush(self):
        self.file.flush()
        self.stdout.flush()

    def isatty(self):
        return False

    def close(self):
        if sys.stdout is self:
            sys.stdout = self.stdout
        if sys.stderr is self:
            sys.stderr = self.stderr
        self.file.close()


# ----------------------------------------------------------------------------
# Errors of the command-line tools: one line on stderr, a traceback only on request.

_DEBUG_KEY = 'patch_diffusion.debug'
_EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, MemoryError)


def debug_option(fn):
    """Click decorator: --debug, show the traceback of an error (as PD_DEBUG=1 does)."""
    def remember(ctx, _param, value):
        if value:
            ctx.meta[_DEBUG_KEY] = True   # meta is shared with the subcommands' contexts
    return click.option('--debug', help='Show the traceback of an error (or set PD_DEBUG=1)', is_flag=True,
                        expose_value=False, is_eager=True, callback=remember)(fn)


def debug_requested():
    """True if --debug was given or the environment variable PD_DEBUG is set (not 0)."""
    if os.environ.get('PD_DEBUG', '0') not in ('', '0'):
        return True
    ctx = click.get_current_context(silent=True)
    return bool(ctx is not None and ctx.meta.get(_DEBUG_KEY))


def error_line(err):
    """One line that says what went wrong: the message of an expected error (a
    user error: ValueError, OSError, FloatingPointError, MemoryError), else its type and
    message with a hint to get the traceback."""
    text = str(err)
    if 'Original Traceback' in text:   # re-raised from a DataLoader worker: the worker's error is the last line
        text = text.strip().splitlines()[-1].split(': ', 1)[-1]
    text = one_line(text)
    if isinstance(err, _EXPECTED_ERRORS) and text:
        return text
    return f'{type(err).__name__}: {text or "(no message)"} (unexpected; --debug or PD_DEBUG=1 shows the traceback)'


class DefaultGroup(click.Group):
    """A click group that runs its command `default` when the first argument
    names no subcommand, so `tool.py --flag=...` keeps working next to
    `tool.py sub --flag=...`.

    The default command then runs as the tool itself: its help and errors say
    `Usage: tool.py [OPTIONS]` and `Try 'tool.py --help'`, and its help ends
    with the other commands."""

    def __init__(self, *args, default=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.default = default

    def main(self, args=None, prog_name=None, **extra):
        args = list(sys.argv[1:] if args is None else args)
        if args and args[0] in self.commands:
            return super().main(args, prog_name, **extra)
        command = copy.copy(self.commands[self.default])   # a view with the other commands in its epilog
        tool = prog_name or os.path.basename(sys.argv[0])
        others = [f'  {tool} {name} --help  {sub.get_short_help_str(limit=200)}'
                  for name, sub in self.commands.items() if name != self.default]
        epilog = '\b\nOther commands:\n' + '\n'.join(others)
        command.epilog = f'{command.epilog}\n\n{epilog}' if command.epilog else epilog
        return command.main(args, prog_name, **extra)


class IntList(click.ParamType):
    """Click type of a list of integers: '1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10] (see parse_int_list)."""
    name = 'list'

    def convert(self, value, param, ctx):
        try:
            return parse_int_list(value)
        except ValueError as err:
            self.fail(str(err), param, ctx)


class FloatList(click.ParamType):
    """Click type of a comma-separated list of numbers: '0.05,0.1' -> [0.05, 0.1]."""
    name = 'list'

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [float(item) for item in str(value).split(',')]
        except ValueError:
            self.fail(f'{value!r} is not a comma-separated list of numbers, e.g. 0.05,0.10', param, ctx)


class ChoiceList(click.ParamType):
    """Click type of a comma-separated list of names from `choices`, each at most once:
    'fid,fd_dinov2' -> ['fid', 'fd_dinov2']."""
    name = 'list'

    def __init__(self, choices):
        self.choices = list(choices)

    def convert(self, value, param, ctx):
        names = list(value) if isinstance(value, (list, tuple)) else [name.strip() for name in str(value).split(',')]
        unknown = [name for name in names if name not in self.choices]
        if unknown or not names:
            self.fail(f'{",".join(unknown) or repr(value)}: choose from {", ".join(self.choices)} '
                      f'(comma-separated)', param, ctx)
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            self.fail(f'{", ".join(repeated)} given more than once', param, ctx)
        return names


class Size(click.ParamType):
    """Click type of an image size: 'WxH' or 'N' (a square) -> (height, width), the
    order of tensors. Sides of 0 pass, for the command to refuse with its own words."""
    name = 'size'

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            width, height = parse_size(value, minimum=0)
        except ValueError as err:
            self.fail(str(err), param, ctx)
        return height, width


def cli_errors(fn):
    """Decorator of a click command's function: every error becomes one line
    'Error: ...' on stderr and exit status 1, without a traceback unless
    debug_requested(). With debug, the exception a ClickException was made
    from is raised again, so its traceback shows."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException as err:
            cause = err.__cause__ or err.__context__
            if debug_requested() and isinstance(cause, Exception):
                raise cause from None
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as err:   # the last line of defence of a command-line tool
            if debug_requested():
                raise
            raise click.ClickException(error_line(err)) from None
    return wrapper

