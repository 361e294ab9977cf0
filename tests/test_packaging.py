"""pyproject.toml, environment.yml, the Dockerfile, the Makefile and the
requirements table of the documentation (docs/INSTALL.md) state the same
supported ranges, extras and versions. Docker and conda do not run on this
project's machines, so their files are checked as text; the Makefile through
`make -n`."""

import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:   # Python 3.10
    import tomli as tomllib

TESTED_PYTHON = '3.11'   # the version of environment.yml and the Docker image (docs/INSTALL.md, "Requirements")


@pytest.fixture(scope='module')
def project(repo_root):
    return tomllib.loads((repo_root / 'pyproject.toml').read_text())['project']


def requirement_key(text):
    """A requirement as a comparable (name, specifiers, marker)."""
    req = Requirement(text)
    return req.name.lower(), SpecifierSet(str(req.specifier)), str(req.marker or '')


def all_requirements(project):
    """{name: (name, specifiers, marker)} of the dependencies and every extra's (an extra may repeat one)."""
    found = {}
    for text in project['dependencies'] + [t for extra in project['optional-dependencies'].values() for t in extra]:
        key = requirement_key(text)
        assert found.setdefault(key[0], key) == key, f'{key[0]} is stated twice, differently'
    return found


def makefile_variable(repo_root, name):
    match = re.search(rf'^{name} \?= (.*)$', (repo_root / 'Makefile').read_text(), re.M)
    assert match, name
    return match.group(1).strip()


def dockerfile(repo_root):
    return (repo_root / 'Dockerfile').read_text()


def make_commands(repo_root, target, **variables):
    """The commands `make -n TARGET` would run, as one text."""
    if shutil.which('make') is None:
        pytest.skip('make is not installed')
    args = ['make', '-n', target] + [f'{key}={value}' for key, value in variables.items()]
    proc = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def pip_install_extras(text):
    """The extras of every `pip install ... -e ".[a,b]"` (or -e .) in `text`, in order."""
    return [tuple(sorted(filter(None, (m.group(1) or '').split(','))))
            for m in re.finditer(r'pip install [^\n]*?-e "?\.(?:\[([\w,]*)\])?"?', text)]


def test_environment_yml_states_the_pyproject_requirements(repo_root, project):
    text = (repo_root / 'environment.yml').read_text()
    lines = [line.split('#')[0].rstrip() for line in text.splitlines()]
    pip_start = lines.index('  - pip:')
    pip_items = [line.strip()[2:] for line in lines[pip_start + 1:] if line.strip().startswith('- ')]
    assert pip_items[-1] == '-e .'
    stated = {}
    for item in pip_items[:-1]:
        key = requirement_key(item)
        stated[key[0]] = key
    assert stated == all_requirements(project)
    conda_items = [line.strip()[2:] for line in lines[lines.index('dependencies:'):pip_start] if line.startswith('  - ')]
    assert conda_items == [f'python={TESTED_PYTHON}', 'pip']
    assert Version(TESTED_PYTHON) in SpecifierSet(project['requires-python'])


def test_dockerfile_matches_pyproject_and_makefile(repo_root, project):
    text = dockerfile(repo_root)
    assert re.search(rf'^FROM python:{re.escape(TESTED_PYTHON)}-slim$', text, re.M), 'the tested Python'
    torch_arg = re.search(r'^ARG TORCH_SPEC="([^"]+)"$', text, re.M)
    assert torch_arg and torch_arg.group(1) == makefile_variable(repo_root, 'TORCH_SPEC')
    assert 'pip install --no-cache-dir "$TORCH_SPEC"' in text
    # The project with the extras `make test` installs, after torch.
    assert pip_install_extras(text) == [('dev', 'latent')]
    assert text.index('"$TORCH_SPEC"') < text.index('-e ".[dev,latent]"')
    assert set(pip_install_extras(text)[0]) <= set(project['optional-dependencies'])
    # A bind-mounted checkout's `make test` uses the image's environment.
    assert re.search(r'^ENV VENV=none PYTHON=python$', text, re.M)
    assert re.search(r'^CMD \["make", "test"\]$', text, re.M)
    # The repository: what the package, the tests and the Makefile need.
    copied = set()
    for line in re.findall(r'^COPY (.+)$', text, re.M):
        *sources, _dest = line.split()
        copied.update(sources)
    setuptools = tomllib.loads((repo_root / 'pyproject.toml').read_text())['tool']['setuptools']
    needed = ({'pyproject.toml', 'README.md', 'LICENSE', 'Makefile', 'tests', 'benchmarks', 'docs', '.ci'}
              | set(setuptools['packages']) | {f'{name}.py' for name in setuptools['py-modules']})
    assert needed <= copied, needed - copied
    assert all((repo_root / path).exists() for path in copied), copied


def test_makefile_torch_and_python_match_pyproject(repo_root, project):
    torch_spec = Requirement(makefile_variable(repo_root, 'TORCH_SPEC'))
    (pin,) = torch_spec.specifier
    assert torch_spec.name == 'torch' and pin.operator == '=='
    assert Version(pin.version) in all_requirements(project)['torch'][1]
    floor = re.fullmatch(r'>=(\d+\.\d+)', project['requires-python']).group(1)
    assert f'Python {floor} or newer' in (repo_root / 'Makefile').read_text()
    assert f'Python {floor} or newer' in (repo_root / 'README.md').read_text()


def test_make_demo_installs_only_the_project_and_test_the_extras(repo_root, tmp_path):
    venv = tmp_path / 'venv'   # does not exist: make -n shows every set-up step
    demo = make_commands(repo_root, 'demo', VENV=venv)
    assert f'-m venv {venv}' in demo
    assert pip_install_extras(demo) == [()]
    test = make_commands(repo_root, 'test', VENV=venv)
    assert pip_install_extras(test) == [(), ('dev', 'latent')]
    assert f'{venv}/bin/python -m pytest' in test
    # VENV=none: no environment is built, nothing installed.
    for target in ('demo', 'test'):
        commands = make_commands(repo_root, target, VENV='none', PYTHON='python3')
        assert 'pip install' not in commands and '-m venv' not in commands, commands


def test_docs_table_states_the_ranges(docs_text, project):
    """The documentation's requirements table gives every package its pyproject range."""
    rows = {}
    for line in docs_text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip('|').split('|')]
        if line.startswith('| ') and len(cells) == 4 and re.fullmatch(r'[<>=!~][\d.,<>=!~]*', cells[1]):
            rows[cells[0].split(' (')[0].lower()] = SpecifierSet(cells[1])
    assert rows.pop('python') == SpecifierSet(project['requires-python'])
    assert rows == {name: key[1] for name, key in all_requirements(project).items()}
