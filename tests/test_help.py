"""The command lines as a user reads them: every command's --help against
the code. Each documented default is the value the command gets when the
flag is left out and, where the library has its own default, that one too;
no help line is cut off; every multi-word flag takes dashes and underscores;
the documentation (README.md, docs/) names every flag; fid.py --device takes cuda:N; --dry-run shows
what the real command would do, resume included."""

import inspect
import json
import os
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import dataset_tool
import fid
import generate
import reconstruct_phema
import train
from dataset_prep import demo_data
from dataset_prep.archive import convert_dataset, encode_dataset
from evaluation import dinov2, metrics
from tests.conftest import resolved_options
from training import architectures, config, flags, generation, latents, loss, networks_unet, phema, samplers

SCRIPTS = {'train.py': train.main, 'generate.py': generate.cli, 'fid.py': fid.main, 'dataset_tool.py': dataset_tool.cli,
           'reconstruct_phema.py': reconstruct_phema.main}

# Required flags of each command, so that a context can be made without them being the point.
REQUIRED = {
    'train.py': ['--outdir=o', '--data=d'],
    'generate.py generate': ['--network=n', '--outdir=o'],
    'generate.py convert': ['--network=n', '--dest=d'],
    'fid.py calc': ['--images=i', '--ref=r'],
    'fid.py ref': ['--data=d', '--dest=d'],
    'reconstruct_phema.py': ['--indir=i', '--outdir=o'],
}

DEFAULT_RE = re.compile(r'\[default: ([^\]]*)\]')


def commands():
    """[(path as typed, command)] of every script, group and subcommand."""
    found = []
    for script, command in SCRIPTS.items():
        found.append((script, command))
        if isinstance(command, click.Group):
            found += [(f'{script} {name}', sub) for name, sub in command.commands.items()]
    return found


def options(command):
    return [p for p in command.params if isinstance(p, click.Option)]


def help_text(path):
    """The output of `path --help` (e.g. 'fid.py calc --help')."""
    script, *sub = path.split()
    result = CliRunner().invoke(SCRIPTS[script], [*sub, '--help'], prog_name=script)
    assert result.exit_code == 0, result.output
    return result.output


def param_default(fn, name):
    """The default of argument `name` of a function or class (also under the persistence wrapper)."""
    for target in (fn.__mro__ if isinstance(fn, type) else [fn]):
        parameters = inspect.signature(target.__init__ if isinstance(fn, type) else target).parameters
        if name in parameters:
            return parameters[name].default
    raise KeyError(name)


def arch_default(arch, key):
    """The network's value of `key` when --cbase/--cres/--blocks/--attn are left out."""
    kwargs = architectures.ARCHITECTURES[arch]
    if key in kwargs:
        return kwargs[key]
    model = {'SongUNet': networks_unet.SongUNet, 'DhariwalUNet': networks_unet.DhariwalUNet}[kwargs['model_type']]
    return param_default(model, key)


def arch_text(key):
    """'X; adm: Y', the DDPM++/NCSN++ value and ADM's, as the help texts write them."""
    def fmt(value):
        return ','.join(map(str, value)) if isinstance(value, list) else str(value)
    assert arch_default('ddpmpp', key) == arch_default('ncsnpp', key), key
    return f'{fmt(arch_default("ddpmpp", key))}; adm: {fmt(arch_default("adm", key))}'


DEVICE = 'cuda if available, else cpu'
VE_RANGE = samplers.default_noise_range('ve')

# Defaults written into help texts by hand ([default: ...] of options without
# show_default): (command, parameter) -> the text, built from the code's values.
HAND_WRITTEN = {
    ('train.py', 'vae'): latents.DEFAULT_VAE,
    ('train.py', 'scale_factor'): str(latents.DEFAULT_SCALE_FACTOR),
    ('train.py', 'batch_gpu'): '--batch / processes',
    ('train.py', 'cbase'): arch_text('model_channels'),
    ('train.py', 'cres'): arch_text('channel_mult'),
    ('train.py', 'blocks'): arch_text('num_blocks'),
    ('train.py', 'attn'): arch_text('attn_resolutions'),
    ('train.py', 'P_mean'): f"{param_default(loss.EDMLoss, 'P_mean')}; edm2-*: {flags.EDM2_DEFAULTS['P_mean']}",
    ('train.py', 'P_std'): f"{param_default(loss.EDMLoss, 'P_std')}; edm2-*: {flags.EDM2_DEFAULTS['P_std']}",
    ('train.py', 'lr_decay'): f"0; edm2-*: {flags.EDM2_DEFAULTS['lr_decay']}",
    ('train.py', 'device'): DEVICE,
    ('train.py', 'dropout'): f"{flags.DEFAULT_DROPOUT['unet']}; DiT: {flags.DEFAULT_DROPOUT['dit']}; "
                             f"edm2-*: {flags.DEFAULT_DROPOUT['edm2']}",
    ('train.py', 'seed'): 'random; a resumed run keeps its own',
    ('generate.py generate', 'class_idx'): 'random per seed',
    ('generate.py generate', 'image_size'): '--resolution',
    ('generate.py generate', 'resolution'): "the network's resolution; required if it records none",
    ('generate.py generate', 'embed_fq'): 'detected',
    ('generate.py generate', 'solver'): "EDM's Heun sampler",
    ('generate.py generate', 'device'): DEVICE,
    ('generate.py generate', 'on_latents'): 'as the pickle records; official latent pickles need 1',
    ('generate.py generate', 'vae'): f'as recorded, else {latents.DEFAULT_VAE}',
    ('generate.py generate', 'scale_factor'): f'as recorded, else {latents.DEFAULT_SCALE_FACTOR}',
    ('generate.py generate', 'sigma_min'):
        f"{param_default(samplers.edm_sampler, 'sigma_min')}; ablation sampler: the --disc's, e.g. ve {VE_RANGE[0]}",
    ('generate.py generate', 'sigma_max'):
        f"{param_default(samplers.edm_sampler, 'sigma_max')}; ablation sampler: the --disc's, e.g. ve {VE_RANGE[1]}",
    ('reconstruct_phema.py', 'outkimg'): 'the newest',
    ('fid.py calc', 'detector'): "EDM's Inception-v3, downloaded once into the cache",
    ('fid.py calc', 'device'): DEVICE,
    ('fid.py ref', 'detector'): "EDM's Inception-v3, downloaded once into the cache",
    ('fid.py ref', 'device'): DEVICE,
    ('fid.py calc', 'dinov2_model'): f"{dinov2.DEFAULT_MODEL}, downloaded once into the Hub's cache",
    ('fid.py ref', 'dinov2_model'): f"{dinov2.DEFAULT_MODEL}, downloaded once into the Hub's cache",
    ('train.py', 'metric_dinov2'): dinov2.DEFAULT_MODEL,
    ('train.py', 'metric_detector'): "EDM's Inception-v3, downloaded once into the cache",
    ('dataset_tool.py encode', 'vae'): latents.DEFAULT_VAE,
    ('dataset_tool.py encode', 'scale_factor'): str(latents.DEFAULT_SCALE_FACTOR),
    ('dataset_tool.py encode', 'device'): DEVICE,
}
for _path in ('dataset_tool.py', 'dataset_tool.py convert', 'dataset_tool.py encode'):
    HAND_WRITTEN[(_path, 'max_images')] = 'all'
    HAND_WRITTEN[(_path, 'resolution')] = \
        f'the input size; demo:shapes {demo_data.DEFAULT_RESOLUTION}x{demo_data.DEFAULT_RESOLUTION}'

# Shown defaults that the library has too: (command, parameter) -> the library's value.
LIBRARY = {('train.py', name): value for name, value in config.DEFAULTS.items()}
LIBRARY.update({('generate.py generate', name): param_default(samplers.edm_sampler, name)
                for name in ('num_steps', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise')})
LIBRARY.update({('generate.py generate', flag): param_default(generation.generate_images, name)
                for flag, name in (('max_batch_size', 'batch_size'), ('cfg', 'cfg'), ('guidance', 'guidance'),
                                   ('x_start', 'x_start'), ('y_start', 'y_start'))})
for _path in ('fid.py calc', 'fid.py ref'):
    LIBRARY.update({(_path, flag): param_default(metrics.calculate_metrics, name)
                    for flag, name in (('batch', 'batch_size'), ('workers', 'num_workers'), ('seed', 'seed'))})
for _path in ('dataset_tool.py', 'dataset_tool.py convert', 'dataset_tool.py encode'):
    LIBRARY[(_path, 'channels')] = param_default(convert_dataset, 'channels')
LIBRARY.update({('dataset_tool.py encode', name): param_default(encode_dataset, name) for name in ('xflip', 'batch')})
LIBRARY[('reconstruct_phema.py', 'snapshot_format')] = param_default(phema.reconstruct, 'snapshot_format')

# Shown defaults of the command line only, with no library default to agree with.
CLI_ONLY = {('generate.py generate', 'seeds'),       # EDM's generate.py: 0-63
            ('generate.py generate', 'mask_pos'),    # the official flag, checked only
            ('fid.py calc', 'num_expected'),         # EDM's fid.py: 50,000
            ('fid.py calc', 'metric_names'),         # EDM's fid.py: FID only
            ('fid.py ref', 'metric_names')}


def test_documented_defaults_are_the_code_defaults():
    """Every [default: X] of every option: the value the command gets when the
    flag is left out equals X as a user would type it (shown defaults), and the
    library's default where it has one; hand-written defaults equal the texts
    built from the code's values (HAND_WRITTEN). Options that document none get
    None (the code's own choice, which their help describes)."""
    seen_hand_written = set()
    for path, command in commands():
        # (a group without arguments would print its help and stop)
        ctx = command.make_context(path, list(REQUIRED.get(path, [])),
                                   resilient_parsing=isinstance(command, click.Group))
        for param in options(command):
            if param.name not in ctx.params or param.required:   # --debug, --help; given in REQUIRED
                continue
            key = (path, param.name)
            actual = ctx.params[param.name]
            _opts, text = param.get_help_record(ctx) or ('', '')
            documented = DEFAULT_RE.findall(text)
            assert len(documented) <= 1, (key, text)
            written = DEFAULT_RE.findall(param.help or '')
            if param.show_default and not param.is_flag:
                assert not written, f'{key}: a hand-written default next to the shown one: {text}'
                assert documented, (key, text)
                shown = documented[0].split(';')[0]
                assert param.process_value(ctx, shown) == actual, (key, shown, actual)
                assert key in LIBRARY or key in CLI_ONLY, f'{key}: which library default does {shown} follow?'
                if key in LIBRARY:
                    assert LIBRARY[key] == actual, (key, LIBRARY[key], actual)
            elif written:
                assert key in HAND_WRITTEN, f'{key}: add the hand-written default {written} to HAND_WRITTEN'
                assert written[0] == HAND_WRITTEN[key], (key, written[0], HAND_WRITTEN[key])
                assert actual is None or param.is_flag, (key, actual)
                seen_hand_written.add(key)
            else:
                assert actual in (None, False), f'{key}: default {actual!r} is not documented: {text}'
    assert seen_hand_written == set(HAND_WRITTEN), set(HAND_WRITTEN) - seen_hand_written


def test_library_values_behind_the_descriptions():
    """The facts behind hand-written descriptions that are not values."""
    assert metrics.DEFAULT_DETECTOR_URL.endswith('/inception-2015-12-05.pkl')   # EDM's fid.py detector
    assert f'(default {demo_data.DEFAULT_COUNT})' in help_text('dataset_tool.py convert')   # demo:shapes[:N]
    assert samplers.select_sampler()[0] is samplers.edm_sampler   # no ablation flag: EDM's sampler


@pytest.mark.parametrize('path', [path for path, _ in commands()])
def test_help_is_complete(path):
    """--help works, no line is cut off ('...'), every option says what it does."""
    text = help_text(path)
    cut = [line for line in text.splitlines() if line.rstrip().endswith('...') and not line.startswith('Usage:')]
    assert not cut, cut
    command = dict(commands())[path]
    for param in options(command):
        assert param.help and param.help.strip(), f'{path} {param.opts}: no help text'


@pytest.mark.parametrize('path', [path for path, _ in commands()])
def test_every_multiword_flag_has_both_spellings(path):
    """--a_b and --a-b for every multi-word flag (the official code writes
    underscores, EDM dashes)."""
    command = dict(commands())[path]
    for param in options(command):
        long_names = [name for name in param.opts + param.secondary_opts if name.startswith('--')]
        for name in long_names:
            body = name[2:]
            for other in (body.replace('-', '_'), body.replace('_', '-')):
                assert f'--{other}' in long_names, f'{path}: {name} has no --{other}'


def test_docs_name_every_flag(docs_text):
    """Every flag of every command appears in README.md or docs/*.md (one of its spellings)."""
    missing = []
    for path, command in commands():
        for param in options(command):
            names = [name for name in param.opts + param.secondary_opts if name.startswith('--')]
            if names == ['--help']:
                continue
            if not any(re.search(rf'(?<![\w-]){re.escape(name)}(?![\w-])', docs_text) for name in names):
                missing.append(f'{path} {names[0]}')
    assert not missing, f'not in README.md or docs/: {missing}'


def test_fid_device_takes_cuda_index(tmp_path):
    """fid.py --device is cpu, cuda or cuda:N, checked when the command runs."""
    ctx = fid.calc.make_context('calc', [*REQUIRED['fid.py calc'], '--device=cuda:1'])
    assert ctx.params['device'] == 'cuda:1'
    result = CliRunner().invoke(fid.main, ['calc', f'--images={tmp_path}', f'--ref={tmp_path / "r.npz"}',
                                           '--device=gpu'])
    assert result.exit_code == 1 and 'Traceback' not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and '--device=gpu' in errors[0], result.output


# ----------------------------------------------------------------------------
# --dry-run: what the real command would do.

TINY = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0', '--device=cpu',
        '--batch=8', '--duration=0.00001', '--samples=0', '--seed=3', '--augment=0']


def dry_run(args):
    result = CliRunner().invoke(train.main, [*args, '--dry-run'])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output
    return result.output, resolved_options(result.output)


def test_dry_run_shows_the_run_and_its_resume(tmp_path, no_torchrun_env, subprocess_env):
    """A dry run names the folder the real run then writes, with the options it
    writes; after the run, the same flags' dry run names that folder and says it
    is complete, and writes nothing. With --progressive=1 no random-draw
    probabilities are printed."""
    data = tmp_path / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:8', str(data), resolution=(32, 32))
    outdir = tmp_path / 'runs'
    args = [f'--outdir={outdir}', f'--data={data}', '--progressive=1', *TINY]

    output, planned = dry_run(args)
    assert not outdir.exists()
    assert 'probabilit' not in output.lower()
    proc = subprocess.run([sys.executable, os.path.abspath(train.__file__), *args], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (name,) = os.listdir(outdir)
    run_dir = outdir / name
    assert planned['run_dir'] == str(run_dir)
    written = json.loads((run_dir / 'training_options.json').read_text())
    assert written == planned

    output, planned = dry_run(args)
    assert planned['run_dir'] == str(run_dir)
    assert f'{run_dir} is already complete at' in output   # the run is finished: nothing to resume
    assert 'probabilit' not in output.lower()
    assert os.listdir(outdir) == [name]
