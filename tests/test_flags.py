"""Tests of training/flags.py, the one table of train.py's flags: train.py's
click options, config.DEFAULTS and the resume comparison are made from it,
and adding a flag is one entry (plus its use)."""

import json
import subprocess
import sys

import click

import train
from dataset_prep.archive import convert_dataset
from training import config, flags, runs


def test_train_py_options_are_the_table():
    """train.py has one option per entry, in the table's order, as spelled
    there (--debug, the one option of every script, aside)."""
    params = [p for p in train.main.params if isinstance(p, click.Option) and p.name != 'debug']
    assert [p.name for p in params] == [flag.name for flag in flags.FLAGS]
    for param, flag in zip(params, flags.FLAGS):
        assert tuple(param.opts + param.secondary_opts) == flag.spellings, flag.name


def test_table_entries_are_consistent():
    """config.DEFAULTS holds every training option's default; a key of the
    options belongs to one flag; a copied flag's key is a top-level option;
    every flag that sets keys has a long spelling first, for messages."""
    assert dict(config.DEFAULTS) == {f.name: f.default for f in flags.FLAGS if not f.cli_only}
    keys = [key for flag in flags.FLAGS for key in flag.keys]
    assert len(keys) == len(set(keys))
    for flag in flags.FLAGS:
        assert not (flag.cli_only and flag.keys), flag.name
        assert not flag.copied or (len(flag.keys) == 1 and '.' not in flag.keys[0]), flag.name
        assert not flag.keys or flag.spellings[0].startswith('--'), flag.name
        assert flag.shown or flag.default is not None, flag.name   # shown=False only hides a default


def test_resume_comparison_names_and_splits_by_the_table():
    """Each key names its flag in the note of a new run (nested keys: the flag
    of the key above), in the flag's units; run-only flags continue a run."""
    assert runs.describe_differences([('optimizer_kwargs.lr', 1e-4, 2e-4), ('total_kimg', 100, 200),
                                      ('metric_kwargs.ref.fid', 'a.npz', 'b.npz'), ('network_kwargs.foo', 1, 2)]) == \
        '--lr 0.0002 != 0.0001, --duration 0.2 != 0.1, --metric-ref "b.npz" != "a.npz", network_kwargs.foo 2 != 1'
    old = dict(optimizer_kwargs=dict(lr=1e-4), kimg_per_tick=50, data_loader_kwargs=dict(num_workers=1))
    new = dict(optimizer_kwargs=dict(lr=2e-4), kimg_per_tick=10, data_loader_kwargs=dict(num_workers=4))
    learned, run_only = runs.compare_options(old, new)
    assert [key for key, _, _ in learned] == ['optimizer_kwargs.lr']
    assert [key for key, _, _ in run_only] == ['data_loader_kwargs.num_workers', 'kimg_per_tick']


# Two flags made up for the test: a run-only one and one that changes what is learned.
NEW_FLAGS = '''
import json, sys
import click
from click.testing import CliRunner
from training import flags

flags.FLAGS += (
    flags.Flag('tick_seconds', ('--tick-seconds', '--tick_seconds'), metavar='SECONDS', type=click.FloatRange(min=0),
               default=7.5, keys=('tick_seconds',), copied=True, run_only=True, help='A run-only flag of the test'),
    flags.Flag('warmup_images', ('--warmup-images', '--warmup_images'), metavar='INT', type=click.IntRange(min=0),
               default=0, keys=('warmup_images',), copied=True, help='A learned flag of the test'),
)
import train   # noqa: E402 (after the new entries, as if they had been in the table)
from training import config, runs   # noqa: E402

dry = CliRunner().invoke(train.main, sys.argv[1:] + ['--tick-seconds=9', '--warmup_images=64', '--dry-run'])
old = dict(tick_seconds=7.5, warmup_images=0)
learned, run_only = runs.compare_options(old, dict(tick_seconds=9, warmup_images=64))
print(json.dumps(dict(help=CliRunner().invoke(train.main, ['--help']).output, dry=dry.output,
                      defaults={name: config.DEFAULTS.get(name) for name in old},
                      learned=runs.describe_differences(learned), run_only=runs.describe_differences(run_only))))
'''


def test_a_new_flag_is_one_entry(tmp_path, subprocess_env):
    """Entries appended to FLAGS before train.py is imported are flags of
    train.py (--help, both spellings, the shown default), have their defaults
    in config.DEFAULTS, go into the options that the dry run prints, and are
    named and split into run-only and learned by the resume comparison."""
    data = tmp_path / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:8', str(data), resolution=(32, 32))
    (tmp_path / 'new_flags.py').write_text(NEW_FLAGS)
    args = [f'--outdir={tmp_path / "runs"}', f'--data={data}', '--arch=ddpmpp', '--cbase=8', '--cres=1,2',
            '--blocks=1', '--attn=none', '--workers=0', '--device=cpu', '--batch=8', '--seed=3']
    proc = subprocess.run([sys.executable, str(tmp_path / 'new_flags.py'), *args], env=subprocess_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    help_text = ' '.join(out['help'].split())
    assert '--tick-seconds, --tick_seconds SECONDS A run-only flag of the test [default: 7.5;' in help_text
    assert '--warmup-images, --warmup_images INT A learned flag of the test [default: 0;' in help_text
    assert out['defaults'] == dict(tick_seconds=7.5, warmup_images=0)
    assert 'Dry run; exiting.' in out['dry'], out['dry']
    start = out['dry'].index('Training options:') + len('Training options:')
    options = json.loads(out['dry'][start:out['dry'].index('Output directory:')])
    assert (options['tick_seconds'], options['warmup_images']) == (9, 64)
    assert (out['learned'], out['run_only']) == ('--warmup-images 64 != 0', '--tick-seconds 9 != 7.5')
