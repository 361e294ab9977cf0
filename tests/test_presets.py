"""Tests of the paper presets (training/presets.py, train.py --preset): every
preset resolves; --dry-run shows its values; typed flags win over it; an
unknown name fails as the command is parsed; the official README's training
commands resolve to the same options as their presets; the documentation's
table (docs/PRESETS_AND_HUB.md) lists each preset's flags; a rerun of a
--preset command resumes its run."""

import json
import pathlib
import shlex
import types

import click
import pytest
from click.testing import CliRunner

import train
from dataset_prep.archive import convert_dataset
from training import config, presets

from conftest import documentation_files, resolved_options

# The official README's training commands (github.com/Zhendong-Wang/Patch-Diffusion), as typed there
# apart from --outdir and --data, with the preset each one is.
OFFICIAL_COMMANDS = {
    'celeba-64': '--cond=0 --arch=ddpmpp --batch=256 --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5',
    'lsun-bedroom-256': '--cond=0 --arch=adm --train_on_latents=1 --duration=200 --batch-gpu=32 --batch=1024 '
                        '--lr=1e-4 --ema=50 --dropout=0.10 --fp16=1 --ls=100 --augment=0 --real_p=0.5',
    'imagenet-256': '--cond=1 --arch=adm --train_on_latents=1 --duration=2500 --batch-gpu=32 --batch=4096 '
                    '--lr=1e-4 --ema=50 --dropout=0.10 --fp16=1 --ls=100 --augment=0 --real_p=0.5 --tick=200',
}
# What a preset adds to its official command (the official train.py has no --label-dropout).
ADDED_TO_OFFICIAL = {'imagenet-256': ['--label-dropout=0.1']}

OPTIONS = {param.name: param for param in train.main.params if isinstance(param, click.Option)}


def typed_out(options):
    """The flags a user types for {flag name: value}, e.g. ['--cres=1,2,2,2', '--fp16=1']."""
    def text(value):
        if isinstance(value, bool):
            return str(int(value))
        if isinstance(value, list):
            return ','.join(map(str, value))
        return str(value)
    return [f'{OPTIONS[name].opts[0]}={text(value)}' for name, value in options.items()]


def parse_flags(flags):
    """({flag name: value}, typed names) of train.py's command line `flags`, as click parses them."""
    ctx = train.main.make_context('train.py', ['--outdir=o', '--data=d', *flags])
    typed = {name for name in ctx.params
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    return ctx.params, typed - {'outdir', 'data'}


def stand_in(kind):
    """A dataset as build_config sees it: 64x64 images, 256x256 images, or an encoded archive of 4x32x32 latents."""
    shape = {'pixels-64': [3, 64, 64], 'pixels-256': [3, 256, 256], 'latents': [4, 32, 32]}[kind]
    return types.SimpleNamespace(is_latent=kind == 'latents', resolution=shape[-1], image_shape=shape,
                                 vae='stabilityai/sd-vae-ft-ema', scale_factor=0.18215)


# ----------------------------------------------------------------------------
# The registry and the merge.

def test_registry_holds_train_options():
    """Every preset sets train.py flags (names of config.DEFAULTS), says in one
    line what it trains, and has an FID with its source or says why it has none."""
    assert list(presets.PRESETS)[:6] == ['celeba-64', 'ffhq-64', 'afhqv2-64', 'lsun-bedroom-256', 'lsun-church-256',
                                         'imagenet-256']
    assert [name for name in presets.PRESETS if name.startswith('edm2-')] == [
        f'edm2-{data}-{size}{patch}' for data, sizes in (('img512', ('xs', 's', 'm', 'l', 'xl', 'xxl')),
                                                        ('img64', ('s', 'm', 'l', 'xl')))
        for size in sizes for patch in ('', '-patch')]
    for name, preset in presets.PRESETS.items():
        assert set(preset.options) <= set(config.DEFAULTS) & set(OPTIONS), name
        assert {'outdir', 'data'}.isdisjoint(preset.options), name   # a preset never picks the data
        assert {'duration', 'real_p'} <= set(preset.options), name
        assert preset.description and '\n' not in preset.description, name
        assert preset.fid_source
        assert preset.fid is not None or preset.fid_source.startswith('not verified'), name


@pytest.mark.parametrize('name', list(presets.PRESETS))
def test_every_preset_resolves(name):
    """build_config takes every preset: pixel presets on 64x64 images, latent
    ones on raw 256x256 images and on an encoded archive alike."""
    preset = presets.PRESETS[name]
    kinds = ['pixels-256', 'latents'] if preset.options.get('train_on_latents') else ['pixels-64']
    for kind in kinds:
        c = config.build_config(presets.apply_preset(name, {}, set()), stand_in(kind))
        assert c.batch_size == preset.options['batch']
        assert c.optimizer_kwargs.lr == preset.options['lr']
        assert c.network_kwargs.dropout == preset.options['dropout']
        assert c.patch_kwargs.real_p == preset.options['real_p']
        assert c.total_kimg == preset.options['duration'] * 1000
        assert (c.latent_kwargs is not None) == (kind != 'pixels-64')


def test_apply_preset_fills_in_what_was_not_typed():
    """Flags left at their defaults take the preset's values; typed flags keep
    theirs, also when a typed value equals the default; no preset changes nothing."""
    values = dict(config.DEFAULTS, lr=0.13, dropout=0.13, batch=64)
    merged = presets.apply_preset('celeba-64', values, typed={'dropout', 'batch'})
    assert merged['lr'] == 2e-4 and merged['cres'] == [1, 2, 2, 2] and merged['augment'] == 0
    assert merged['dropout'] == 0.13 and merged['batch'] == 64
    assert values['lr'] == 0.13   # a new dict
    assert presets.apply_preset(None, values, typed={'dropout'}) == values
    assert presets.apply_preset('ffhq-64', {}, set()) == presets.PRESETS['ffhq-64'].options


def test_preset_values_give_way_to_contradicting_flags():
    """--bf16=1 over a preset's --fp16=1, --cond=0 over its label dropout: the
    result resolves."""
    cases = [('lsun-bedroom-256', dict(bf16=True), 'fp16', 'pixels-256'),
             ('imagenet-256', dict(cond=False), 'label_dropout', 'latents')]
    for name, typed_values, yielding, kind in cases:
        values = dict(config.DEFAULTS, **typed_values)
        merged = presets.apply_preset(name, values, typed=set(typed_values))
        assert merged[yielding] == config.DEFAULTS[yielding], name
        config.build_config(merged, stand_in(kind))
        assert presets.apply_preset(name, config.DEFAULTS, set())[yielding] == presets.PRESETS[name].options[yielding]


def test_unknown_preset_name():
    with pytest.raises(ValueError, match='--preset=celeba64 is unknown; choose one of celeba-64, ffhq-64'):
        presets.apply_preset('celeba64', {}, set())


# ----------------------------------------------------------------------------
# train.py --preset (in-process through click).

@pytest.fixture(scope='module')
def shapes_64(tmp_path_factory):
    """8 demo images at 64x64 with class labels."""
    path = tmp_path_factory.mktemp('data') / 'shapes-64x64.zip'
    convert_dataset('demo:shapes:8', str(path), resolution=(64, 64))
    return str(path)


def dry_run(args):
    """(output, resolved options) of train.py ARGS --dry-run --device=cpu --seed=0."""
    result = CliRunner().invoke(train.main, [*args, '--device=cpu', '--seed=0', '--dry-run'])
    assert result.exit_code == 0, result.output
    return result.output, resolved_options(result.output)


@pytest.mark.parametrize('name', list(presets.PRESETS))
def test_dry_run_shows_the_preset(name, shapes_64, tmp_path, no_torchrun_env):
    """--preset=X --dry-run prints the options of the preset's flags typed out,
    which differ from those of no preset."""
    base = [f'--outdir={tmp_path / "runs"}', f'--data={shapes_64}']
    _, with_preset = dry_run([*base, f'--preset={name}'])
    _, typed = dry_run([*base, *typed_out(presets.PRESETS[name].options)])
    _, plain = dry_run(base)
    assert with_preset == typed
    assert with_preset != plain


def test_dry_run_of_celeba_64(shapes_64, tmp_path, no_torchrun_env):
    output, c = dry_run([f'--outdir={tmp_path / "runs"}', f'--data={shapes_64}', '--preset=celeba-64'])
    assert c['network_kwargs']['channel_mult'] == [1, 2, 2, 2] and c['network_kwargs']['dropout'] == 0.05
    assert c['optimizer_kwargs']['lr'] == 2e-4 and c['batch_size'] == 256 and c['augment_kwargs'] is None
    assert c['patch_kwargs']['real_p'] == 0.5 and c['total_kimg'] == 200000
    assert 'Network architecture:    ddpmpp' in output and 'Batch size:              256' in output


def test_typed_flags_override_the_preset(shapes_64, tmp_path, no_torchrun_env):
    """A typed flag wins, also when it types the default value (--dropout=0.13);
    the preset's other values stay."""
    _, c = dry_run([f'--outdir={tmp_path / "runs"}', f'--data={shapes_64}', '--preset=celeba-64', '--lr=1e-4',
                    '--dropout=0.13', '--batch=64'])   # a UNet's default
    assert c['optimizer_kwargs']['lr'] == 1e-4 and c['network_kwargs']['dropout'] == 0.13
    assert c['batch_size'] == 64
    assert c['network_kwargs']['channel_mult'] == [1, 2, 2, 2] and c['augment_kwargs'] is None
    _, c = dry_run([f'--outdir={tmp_path / "runs"}', f'--data={shapes_64}', '--preset=lsun-bedroom-256', '--bf16=1'])
    assert c['performance_kwargs']['precision'] == 'bf16' and c['network_kwargs']['use_fp16'] is False


def test_unknown_preset_fails_as_the_command_is_parsed(shapes_64, tmp_path, no_torchrun_env):
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes_64}', '--preset=celeba64',
                                             '--device=cpu'])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)   # click's usage error
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and "'--preset'" in errors[0] and 'celeba-64' in errors[0], result.output
    assert 'Traceback' not in result.output and not outdir.exists()


@pytest.mark.parametrize('name', list(OFFICIAL_COMMANDS))
def test_official_commands_resolve_as_their_presets(name, shapes_64, tmp_path, no_torchrun_env):
    """The official README's commands, typed as written, give the options of
    their presets (with what a preset adds to its command), so neither can drift."""
    base = [f'--outdir={tmp_path / "runs"}', f'--data={shapes_64}']
    _, official = dry_run([*base, *shlex.split(OFFICIAL_COMMANDS[name]), *ADDED_TO_OFFICIAL.get(name, [])])
    _, preset = dry_run([*base, f'--preset={name}'])
    assert official == preset
    values, typed = parse_flags(shlex.split(OFFICIAL_COMMANDS[name]))
    options = presets.PRESETS[name].options
    assert {key: values[key] for key in typed} == {key: options[key] for key in typed}


def test_rerun_with_the_preset_resumes(shapes_64, tmp_path, no_torchrun_env):
    """A run folder written by a --preset command is the one the same command,
    and the preset's flags typed out, continue; a changed flag starts a new run."""
    outdir = tmp_path / 'runs'
    args = [f'--outdir={outdir}', f'--data={shapes_64}', '--preset=ffhq-64']
    _, planned = dry_run(args)
    run_dir = outdir / '00000-shapes-64x64'
    run_dir.mkdir(parents=True)
    (run_dir / 'training_options.json').write_text(json.dumps(dict(planned, run_dir=str(run_dir))))
    for command in (args, [*args[:2], *typed_out(presets.PRESETS['ffhq-64'].options)]):
        output, c = dry_run(command)
        assert f'Restarting run {run_dir} from the beginning' in output and c['run_dir'] == str(run_dir)
    output, c = dry_run([*args, '--lr=1e-4'])
    assert 'Note: not resuming 00000-shapes-64x64: --lr 0.0001 != 0.0002' in output and c['run_dir'] != str(run_dir)


# ----------------------------------------------------------------------------
# The documentation's table.

def docs_rows():
    """{preset name: the cells of its row} of the table in the documentation's
    "Paper presets" section (in README.md or one of docs/*.md)."""
    (text,) = [text for text in map(pathlib.Path.read_text, documentation_files()) if '\n## Paper presets\n' in text]
    section = text[text.index('\n## Paper presets\n') + 1:]
    section = section[:section.index('\n## ') if '\n## ' in section else None]
    rows = [line.strip().strip('|').split('|') for line in section.splitlines() if line.startswith('| `')]
    return {cells[0].strip().strip('`'): [cell.strip() for cell in cells] for cells in rows}


def test_docs_table_lists_each_preset():
    """One row per preset, in the registry's order, whose flags are exactly the
    preset's values and whose FID cell has the preset's FID or says "not verified"."""
    rows = docs_rows()
    assert list(rows) == list(presets.PRESETS)
    for name, preset in presets.PRESETS.items():
        _name, _data, flags, fid, source = rows[name]
        values, typed = parse_flags(shlex.split(flags.strip('`')))
        assert typed == set(preset.options), name
        assert {key: values[key] for key in typed} == preset.options, name
        if preset.fid is None:
            assert fid == 'not verified' and 'could not be checked' in source, name
        else:
            assert fid.startswith(f'{preset.fid:g}') and ('abstract' in source or 'EDM2' in source), name
