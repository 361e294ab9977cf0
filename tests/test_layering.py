"""The module layout (docs/DESIGN.md section 5): the import layers, no import
cycles, network pickles whose embedded sources run without this code, and
the old module paths that still import.

Layers, lowest first; a module imports ours only from its own layer or below:

    0  dnnlib, torch_utils                      (EDM's helpers; also inside functions)
    1  training, dataset_prep, evaluation       (the library)
    2  the scripts (train.py, ...), benchmarks/, tests/

The rules are checked by parsing every .py file of the repository (ast), not
by importing it; tests/fixtures (stand-ins for foreign code) are left out.
"""

import ast
import os
import pathlib
import pickle

import pytest
import torch

from conftest import REPO_ROOT

LAYERS = {'dnnlib': 0, 'torch_utils': 0, 'training': 1, 'dataset_prep': 1, 'evaluation': 1}
CLIENT_LAYER = 2
SKIPPED = ('.venv', '.git', 'build', 'tests/fixtures')


# ----------------------------------------------------------------------------
# Reading the imports.


def module_name(relpath):
    """'training/networks.py' -> 'training.networks'; 'training/__init__.py' -> 'training';
    a file of benchmarks/ or tests/ (imported by its stem there) -> its stem."""
    parts = list(pathlib.PurePosixPath(relpath).with_suffix('').parts)
    if parts[0] in ('benchmarks', 'tests'):
        return parts[-1]
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


def layer_of(relpath):
    top = pathlib.PurePosixPath(relpath).parts[0]
    return LAYERS.get(top, CLIENT_LAYER) if '/' in relpath else CLIENT_LAYER


def _imports(nodes, module, is_package, deep):
    """(imported name, line) of the import statements among `nodes`: all of
    them (deep) or those run when the module is imported (not in functions).
    `from P import N` gives 'P.N' and 'P'; relative imports are resolved."""
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                package = module.split('.') if is_package else module.split('.')[:-1]
                base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
            found += [(base, node.lineno)] + [(f'{base}.{alias.name}', node.lineno) for alias in node.names]
        if deep or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            found += _imports(list(ast.iter_child_nodes(node)), module, is_package, deep)
    return found


def read_modules(sources):
    """{module: dict(path, layer, all_imports, top_imports, persistent)} of
    {relative path: source text}. Imports keep only the names of modules in
    `sources` (a package's submodule, else the package itself)."""
    info = {}
    for relpath, text in sources.items():
        tree = ast.parse(text, filename=relpath)
        module = module_name(relpath)
        is_package = relpath.endswith('__init__.py')
        info[module] = dict(path=relpath, layer=layer_of(relpath), tree=tree, is_package=is_package,
                            persistent='persistent_class' in text)
    for module, entry in info.items():
        for key, deep in (('all_imports', True), ('top_imports', False)):
            names = _imports(entry['tree'].body, module, entry['is_package'], deep)
            entry[key] = sorted({(name, line) for name, line in names
                                 if name in info and name != module and not module.startswith(name + '.')})
    return info


def repository_sources(root=REPO_ROOT):
    """{relative path: text} of the repository's .py files, less SKIPPED."""
    sources = {}
    for path in sorted(root.rglob('*.py')):
        relpath = path.relative_to(root).as_posix()
        if not any(relpath == skip or relpath.startswith(skip + '/') for skip in SKIPPED) \
                and '.egg-info/' not in relpath:
            sources[relpath] = path.read_text()
    return sources


# ----------------------------------------------------------------------------
# The rules.


def layer_violations(info):
    """Lines 'path:line imports module (layer a above b)' for imports of a higher layer,
    at any depth (inside functions too)."""
    return [f'{entry["path"]}:{line} imports {name} (layer {info[name]["layer"]} above {entry["layer"]})'
            for entry in info.values() for name, line in entry['all_imports']
            if info[name]['layer'] > entry['layer']]


def import_cycles(info):
    """The cycles of module-level imports, each a list of modules [a, b, ..., a]."""
    graph = {module: sorted({name for name, _ in entry['top_imports']}) for module, entry in info.items()}
    cycles, state = [], {}          # state: 1 on the current path, 2 done

    def visit(module, path):
        state[module] = 1
        for name in graph[module]:
            if state.get(name) == 1:
                cycles.append(path[path.index(name):] + [name])
            elif name not in state:
                visit(name, path + [name])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def embedded_dependencies(info):
    """Lines 'module imports name' for library modules with persistent classes
    (their source is embedded in network pickles) whose module-level imports
    reach this code beyond torch_utils and dnnlib."""
    return [f'{module} imports {name} at line {line}' for module, entry in info.items()
            if entry['persistent'] and entry['layer'] == 1
            for name, line in entry['top_imports'] if info[name]['layer'] != 0]


@pytest.fixture(scope='module')
def repository():
    return read_modules(repository_sources())


def test_every_module_stays_in_its_layer(repository):
    assert {'dnnlib.util', 'torch_utils.persistence', 'training.networks', 'evaluation.metrics',
            'dataset_prep.archive', 'train'} <= set(repository)
    assert layer_violations(repository) == []


def test_no_import_cycles(repository):
    assert import_cycles(repository) == []


def test_pickled_modules_run_without_this_code(repository):
    assert {'training.networks', 'training.networks_unet', 'training.loss', 'training.augment'} <= {
        module for module, entry in repository.items() if entry['persistent']}
    assert embedded_dependencies(repository) == []


def test_the_rules_catch_violations():
    """The same functions on made-up trees: each rule fails where it should."""
    info = read_modules({
        'dnnlib/__init__.py': 'from . import util\n',
        'dnnlib/util.py': 'import os\n\ndef open_url(url):\n    from training import hub\n    return hub\n',
        'torch_utils/persistence.py': 'import dnnlib\n',
        'training/__init__.py': '',
        'training/hub.py': 'import dnnlib\nfrom training import nets\n',
        'training/nets.py': ('from torch_utils import persistence\n'
                             '@persistence.persistent_class\nclass Net:\n    from training.hub import parse\n'),
        'evaluation/metrics.py': 'import train\n',
        'train.py': 'from training import hub\n',
    })
    assert layer_violations(info) == ['dnnlib/util.py:4 imports training (layer 1 above 0)',
                                      'dnnlib/util.py:4 imports training.hub (layer 1 above 0)',
                                      'evaluation/metrics.py:1 imports train (layer 2 above 1)']
    assert import_cycles(info) == [['training.hub', 'training.nets', 'training.hub']]
    assert embedded_dependencies(info) == ['training.nets imports training.hub at line 4']
    # Imports inside functions do not make cycles; a package's own modules do not import it.
    info = read_modules({'training/__init__.py': 'from training import a\n',
                         'training/a.py': 'import training\n\ndef f():\n    from training import b\n',
                         'training/b.py': 'from training import a\n'})
    assert import_cycles(info) == []


# ----------------------------------------------------------------------------
# Old module paths.


def test_old_network_names_import_from_training_networks():
    from training import architectures, networks, networks_dit, networks_unet
    from training.networks import DiT, SongUNet, build_network   # as before the split
    assert DiT is networks_dit.DiT and SongUNet is networks_unet.SongUNet
    assert build_network is architectures.build_network and networks.ARCHITECTURES is architectures.ARCHITECTURES
    # A pickle that names a class by its old module path (pickle's GLOBAL) finds it.
    assert pickle.loads(b'ctraining.networks\nDiT\n.') is networks_dit.DiT
    assert pickle.loads(b'ctraining.networks\nUNetBlock\n.') is networks_unet.UNetBlock
    with pytest.raises(AttributeError, match='no_such_name'):
        networks.no_such_name


def test_moved_modules_are_the_same_modules_at_the_old_paths():
    import dataset_prep.archive
    import dataset_prep.demo_data
    import dataset_prep.sources
    import dnnlib
    import evaluation.dinov2
    import evaluation.metrics
    import training.archive
    import training.demo_data
    import training.dinov2
    import training.hub
    import training.metrics
    import training.sources
    from training import metrics
    assert training.metrics is metrics is evaluation.metrics and training.dinov2 is evaluation.dinov2
    assert training.archive is dataset_prep.archive and training.sources is dataset_prep.sources
    assert training.demo_data is dataset_prep.demo_data
    assert training.hub.parse is dnnlib.util.parse_hf_url and training.hub.download is dnnlib.util.download_hf


def test_a_pickle_written_before_the_split_loads_and_computes_the_same():
    """tests/fixtures/dit_before_split.pkl: a tiny DiT (EDMPrecond, coordinates), pickled by
    the code in which training/networks.py held every architecture, with an input and its output."""
    from training import snapshots
    net, meta = snapshots.load_network(REPO_ROOT / 'tests' / 'fixtures' / 'dit_before_split.pkl')
    assert type(net).__name__ == 'EDMPrecond' and type(net.model).__name__ == 'DiT'
    with torch.no_grad():
        assert torch.equal(net(meta.x, meta.sigma, meta.pos), meta.D_x)


def test_todays_dit_computes_what_the_fixture_computed():
    """The DiT of today's code, given the fixture's weights, gives its output bit for bit
    (training/networks_dit.py has layers of its own now; their values are the same)."""
    from training import networks, snapshots
    old, meta = snapshots.load_network(REPO_ROOT / 'tests' / 'fixtures' / 'dit_before_split.pkl')
    net = networks.EDMPrecond(**old.init_kwargs).eval()
    assert type(net.model).__module__ == 'training.networks_dit'
    net.load_state_dict(old.state_dict())
    with torch.no_grad():
        assert torch.equal(net(meta.x, meta.sigma, meta.pos), meta.D_x)


OPEN_WITHOUT_THIS_CODE = """
import pickle, sys, torch
net = pickle.load(open(sys.argv[1], 'rb'))
x, sigma, pos, expected = torch.load(sys.argv[2])
assert not [name for name in sys.modules if name.split('.')[0] in ('training', 'dataset_prep', 'evaluation')]
with torch.no_grad():
    print(torch.equal(net(x, sigma, pos), expected))
"""


@pytest.mark.parametrize('model_type', ['SongUNet', 'DiT'])
def test_a_network_pickle_opens_where_only_torch_utils_and_dnnlib_are(tmp_path, model_type):
    """A pickle of today's network, opened in a process that can import torch_utils and
    dnnlib (copied alone) but none of training/, computes what it computed here."""
    import shutil
    import subprocess
    import sys
    from training import architectures
    from training.networks import full_grid
    options = dict(precond='edm', model_type=model_type, model_channels=32, num_blocks=1, num_heads=2, token_size=2,
                   dropout=0, use_pos=True)
    if model_type == 'SongUNet':
        options = dict(precond='edm', model_type=model_type, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                       attn_resolutions=[], dropout=0, use_pos=True)
    torch.manual_seed(0)
    net = architectures.build_network(options, 8, 3, 0).eval()
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 2.0])
    pos = full_grid(8, 2)
    with torch.no_grad():
        expected = net(x, sigma, pos)
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(net, f)
    torch.save((x, sigma, pos, expected), tmp_path / 'io.pt')
    for package in ('torch_utils', 'dnnlib'):
        shutil.copytree(REPO_ROOT / package, tmp_path / 'lib' / package, ignore=shutil.ignore_patterns('__pycache__'))
    env = dict(os.environ, PYTHONPATH=str(tmp_path / 'lib'))
    result = subprocess.run([sys.executable, '-c', OPEN_WITHOUT_THIS_CODE, str(tmp_path / 'net.pkl'),
                             str(tmp_path / 'io.pt')], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == 'True', result.stderr[-3000:]
