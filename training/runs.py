"""Run folders: naming, auto-resume, and the training states inside them
(docs/DESIGN.md section 3).

A run folder `<outdir>/NNNNN-<desc>/` holds training_options.json (the
resolved options), log.txt, stats.jsonl, snapshots and training states
`training-state-NNNNNN.pt`. Running the same command again finds the latest
run folder whose options match and continues from its newest readable state.
"""

import contextlib
import json
import os
import re
import shutil
import zipfile

import torch

import dnnlib

STATE_RE = re.compile(r'^training-state-(\d+)\.pt$')
STATE_FORMAT = 'patch-diffusion-state-v1'
OPTIONS_FILE = 'training_options.json'

# Options that do not change what is learned: a run continues with new values of these
# (raising --duration extends a run). Keys of the resolved options, nested keys with dots.
RUN_ONLY_KEYS = ('run_dir', 'resume_state', 'transfer_pkl', 'total_kimg', 'kimg_per_tick', 'snapshot_ticks',
                 'state_dump_ticks', 'data_loader_kwargs', 'dataset_kwargs.cache', 'sample_count', 'metrics',
                 'metric_kwargs', 'snapshot_format', 'max_bad_steps', 'device', 'cudnn_benchmark', 'max_minutes',
                 'hang_timeout', 'snapshot_on_stop', 'accept_changed_data')

# Keys whose flag has other units than the option: kimg in the options, Mimg on the command line.
FLAG_SCALES = {'total_kimg': 1e-3, 'ema_halflife_kimg': 1e-3}

# The flag behind each key of the resolved options, for messages (others are named by their key).
FLAG_NAMES = {
    'dataset_kwargs.path': '--data', 'dataset_kwargs.use_labels': '--cond', 'dataset_kwargs.xflip': '--xflip',
    'dataset_kwargs.max_size': '--max-size', 'dataset_kwargs.cache': '--cache',
    'data_loader_kwargs.num_workers': '--workers', 'network_kwargs.precond': '--precond',
    'network_kwargs.model_channels': '--cbase', 'network_kwargs.channel_mult': '--cres',
    'network_kwargs.num_blocks': '--blocks', 'network_kwargs.attn_resolutions': '--attn',
    'network_kwargs.num_heads': '--heads', 'network_kwargs.token_size': '--token-size',
    'network_kwargs.dropout': '--dropout', 'network_kwargs.use_fp16': '--fp16', 'network_kwargs.use_pos': '--use_pos',
    'network_kwargs.pos_freqs': '--pos-freqs', 'network_kwargs.implicit_mlp': '--implicit_mlp',
    'network_kwargs.label_dropout': '--label-dropout', 'loss_kwargs.P_mean': '--P_mean', 'loss_kwargs.P_std': '--P_std',
    'optimizer_kwargs.lr': '--lr', 'augment_kwargs.p': '--augment', 'patch_kwargs.real_p': '--real_p',
    'patch_kwargs.progressive': '--progressive', 'latent_kwargs.vae': '--vae',
    'latent_kwargs.scale_factor': '--scale_factor', 'performance_kwargs.precision': '--bf16',
    'performance_kwargs.channels_last': '--channels-last', 'performance_kwargs.compile_kwargs': '--compile',
    'seed': '--seed', 'batch_size': '--batch', 'batch_gpu': '--batch-gpu', 'total_kimg': '--duration',
    'ema_halflife_kimg': '--ema', 'ema_stds': '--ema-std', 'lr_rampup_kimg': '--lr-rampup', 'loss_scaling': '--ls',
    'kimg_per_tick': '--tick', 'snapshot_ticks': '--snap', 'state_dump_ticks': '--dump', 'sample_count': '--samples',
    'metrics': '--metrics', 'metric_kwargs': '--metric-ref/--metric-num', 'snapshot_format': '--snapshot-format',
    'max_bad_steps': '--max-bad-steps', 'device': '--device', 'cudnn_benchmark': '--bench',
    'transfer_pkl': '--transfer', 'max_minutes': '--max-minutes', 'hang_timeout': '--hang-timeout',
    'snapshot_on_stop': '--snapshot-on-stop', 'accept_changed_data': '--accept-changed-data',
}


# ----------------------------------------------------------------------------
# Training states.


@contextlib.contextmanager
def writing(path):
    """Turn an OSError while writing `path` (disk full, no permission) into
    one that names the file and says that the files before it are intact."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, f'Cannot write {path}: {err.strerror or err}. The earlier snapshots and '
                                 f'training states are untouched; free space or fix the folder, then run '
                                 f'the same command again to resume') from err


def save_state(path, state):
    """Write a training state (a dict of plain tensors and numbers, e.g.
    Trainer.state_dict() plus the tick), atomically; loadable with
    weights_only=True."""
    with writing(path), dnnlib.util.atomic_path(path) as tmp:
        torch.save(dict(state, format=STATE_FORMAT), tmp)


def load_state(path, mmap=False):
    """A training state written by save_state, with weights_only=True (no code
    runs). mmap=True maps the tensors instead of reading them: a cheap check
    of a file's structure. ValueError naming the file if it is unreadable."""
    advice = 'The file may be truncated; resume from an earlier training-state-*.pt with --resume'
    if not os.path.isfile(path):
        raise ValueError(f'Cannot read training state {path}: no such file')
    if not zipfile.is_zipfile(path):   # torch.save writes a zip archive; its directory is at the end
        raise ValueError(f'Cannot read training state {path}: not a complete torch.save archive. {advice}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(f'Cannot read training state {path}: {dnnlib.util.one_line(err)}. {advice}') from err
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'{path} is not a training state written by this code')
    return state


def find_latest_state(run_dir):
    """Path of the newest readable training-state-*.pt in run_dir, or None.

    States are named by whole kimg; a newer state of the same kimg replaces
    the older one atomically, so the highest number is the newest. A state
    that cannot be read (truncated by something outside this code: our own
    writes are atomic) is skipped for the previous one, with a note.
    """
    if not os.path.isdir(run_dir):
        return None
    states = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := STATE_RE.match(name)))
    for _, name in reversed(states):
        path = os.path.join(run_dir, name)
        try:
            load_state(path, mmap=True)
        except ValueError as err:
            print(f'Skipping unreadable training state: {err}')
            continue
        return path
    return None


# ----------------------------------------------------------------------------
# Run folders.


def _flatten(options, prefix=''):
    """{dotted key: value} of nested option dicts, through JSON (as training_options.json holds them)."""
    flat = {}
    for key, value in json.loads(json.dumps(options)).items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def _is_run_only(key, options):
    """Whether a dotted key of the resolved options leaves what is learned alone. The duration
    does not, for the progressive schedule: its phases are shares of the whole run."""
    if key == 'total_kimg' and options.get('patch_kwargs.progressive'):
        return False
    return any(key == k or key.startswith(k + '.') for k in RUN_ONLY_KEYS)


def describe_differences(differences):
    """'--lr 0.0002 != 0.0001, ...' of [(key, old, new)]: the flag, then the new and the old value."""
    def show(key, value):
        if isinstance(value, (int, float)) and key in FLAG_SCALES:
            value = value * FLAG_SCALES[key]   # kimg in the options, Mimg on the command line
        return 'unset' if value is None else json.dumps(value)
    return ', '.join(f'{FLAG_NAMES.get(key, key)} {show(key, new)} != {show(key, old)}'
                     for key, old, new in differences)


def compare_options(old, new, seed_given=True):
    """(learned, run_only): the [(dotted key, old value, new value)] that differ between the
    resolved options of a run and of this command, split by whether they change what is
    learned. The seed counts only when the command gives one."""
    old, new = _flatten(old), _flatten(new)
    if not seed_given:
        old.pop('seed', None)
        new.pop('seed', None)
    differences = [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key) and key not in ('run_dir', 'resume_state')]
    learned = [d for d in differences if not _is_run_only(d[0], new)]
    run_only = [d for d in differences if _is_run_only(d[0], new)]
    return learned, run_only


def find_resumable_run(outdir, c, seed_given, nosubdir):
    """The latest run in outdir that this command continues, as (found, note).

    found: EasyDict(run_dir, state (the newest readable training state, or
    None when the run stopped before its first one: it restarts in the same
    folder), seed, changed (the run-only options that differ, e.g. a longer
    --duration, [(key, old, new)])), or None. note: when nothing matches, why
    the latest run folder is not continued ('not resuming 00003-...: --lr
    0.0002 != 0.0001'), else None.
    """
    if not os.path.isdir(outdir):
        return None, None
    candidates = [outdir] if nosubdir else sorted(
        (os.path.join(outdir, d) for d in os.listdir(outdir) if re.match(r'^\d+-', d)), reverse=True)
    note = None
    for run_dir in candidates:
        try:
            with open(os.path.join(run_dir, OPTIONS_FILE)) as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        learned, changed = compare_options(old, c, seed_given)
        if not learned:
            return dnnlib.EasyDict(run_dir=run_dir, state=find_latest_state(run_dir), seed=old.get('seed'),
                                   changed=changed), None
        if note is None:
            note = f'not resuming {os.path.basename(run_dir)}: {describe_differences(learned)}'
    return None, note


def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with NNNNN one above the highest run number in outdir."""
    ids = [int(m.group(1)) for d in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.match(r'^(\d+)', d)) and os.path.isdir(os.path.join(outdir, d))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def prepare_run_dir(c, write_options):
    """Create the run folder, write training_options.json (for a new run, or a
    continued one whose run-only options changed) and start copying the
    console to its log.txt. Returns the Logger."""
    try:
        os.makedirs(c.run_dir, exist_ok=True)
        if write_options:
            options = {key: value for key, value in c.items() if key != 'resume_state'}
            with dnnlib.util.atomic_write(os.path.join(c.run_dir, OPTIONS_FILE), 'w') as f:
                json.dump(options, f, indent=2)
        return dnnlib.util.Logger(os.path.join(c.run_dir, 'log.txt'), 'a')
    except OSError as err:
        raise OSError(err.errno, f'Cannot write the run folder {c.run_dir} ({err.strerror or err}); '
                                 f'choose another --outdir, free space or fix its permissions') from None


def remove_if_nothing_saved(new_folders):
    """Remove the run folder (and --outdir) that this command made if the run
    failed before it saved a snapshot or a training state: a failed start
    leaves nothing behind. new_folders: [run folder, then --outdir if new]."""
    run_dir = new_folders[0]
    if any(name.startswith(('network-snapshot-', 'training-state-')) for name in os.listdir(run_dir)):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in new_folders[1:]:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    print(f'Removed {run_dir}: the run stopped before it saved anything.')
