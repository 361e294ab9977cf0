"""Shared fixtures: the repository root, an environment for subprocesses that
import the project, and few CPU threads so tests run alike on small machines."""

import json
import os
import pathlib
import sys

import pytest
import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:   # `pytest` run without an installed package
    sys.path.insert(0, str(REPO_ROOT))

torch.set_num_threads(2)


def makefile_demo_flags(variable='DEMO_TRAIN_FLAGS'):
    """A flags variable of the Makefile (continuation lines joined), as a list."""
    import shlex
    lines = (REPO_ROOT / 'Makefile').read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f'{variable} ?='))
    text = lines[start].split('?=', 1)[1]
    index = start
    while text.endswith('\\'):
        index += 1
        text = text[:-1] + ' ' + lines[index].strip()
    return shlex.split(text)


def resolved_options(output):
    """The resolved options train.py prints: the JSON between 'Training options:' and 'Output directory:'."""
    start = output.index('Training options:') + len('Training options:')
    return json.loads(output[start:output.index('Output directory:')])


def demo_zips(folder, sides, count=8):
    """{side: a zip of `count` labelled demo shapes of side x side pixels in `folder`}."""
    from dataset_prep.archive import convert_dataset
    paths = {side: str(folder / f'shapes-{side}x{side}.zip') for side in sides}
    for side, path in paths.items():
        convert_dataset(f'demo:shapes:{count}', path, resolution=(side, side))
    return paths


@pytest.fixture(scope='module')
def one_thread():
    """One intra-op thread for a module (use with pytest.mark.usefixtures):
    tiny networks on a busy 2-core machine run several times faster than with
    two contending threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def repo_root():
    """Path of the repository root (the folder holding dnnlib/, torch_utils/, training/)."""
    return REPO_ROOT


def documentation_files():
    """The user documentation: README.md, then docs/*.md in name order."""
    return [REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md'))]


@pytest.fixture(scope='session')
def docs_text():
    """The text of all the user documentation (README.md and docs/*.md), joined."""
    return '\n'.join(path.read_text() for path in documentation_files())


@pytest.fixture
def no_torchrun_env(monkeypatch):
    """No torchrun variables: train.py and the library run as one process."""
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def subprocess_env():
    """os.environ for a child process: PYTHONPATH = repo root, no torchrun
    variables inherited, one thread per process, unbuffered output."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env['PYTHONPATH'] = os.pathsep.join([str(REPO_ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHONUNBUFFERED'] = '1'
    return env


@pytest.fixture
def python_exe():
    """The interpreter running the tests (the project's virtual environment)."""
    return sys.executable


@pytest.fixture
def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for torch.distributed rendezvous)."""
    from proctools import free_port as pick
    return pick()
