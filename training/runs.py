"""Run folders: naming, auto-resume, and the training states inside them
(docs/DESIGN.md section 3).

A run folder `<outdir>/NNNNN-<desc>/` holds training_options.json (the
resolved options), log.txt, stats.jsonl, snapshots and training states
`training-state-NNNNNN.pt`. Running the same command again finds the latest
run folder whose options match and continues from its newest readable state
(choose_run); options may differ where their flag is run-only (training.flags).
"""

import contextlib
import json
import os
import re
import shutil
import zipfile

import torch

import dnnlib
from training import flags

STATE_RE = re.compile(r'^training-state-(\d+)\.pt$')
STATE_FORMAT = 'patch-diffusion-state-v1'
OPTIONS_FILE = 'training_options.json'

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
    """Whether a dotted key of the resolved options leaves what is learned alone (its flag's
    run_only in training.flags). The duration does not, for the progressive schedule: its
    phases are shares of the whole run."""
    if key == 'total_kimg' and options.get('patch_kwargs.progressive'):
        return False
    flag = flags.flag_of_key(key)
    return flag is not None and flag.run_only


def describe_differences(differences):
    """'--lr 0.0002 != 0.0001, ...' of [(key, old, new)]: the flag, then the new and the old value."""
    def show(flag, value):
        if flag is not None and flag.scale != 1 and isinstance(value, (int, float)):
            value = value * flag.scale   # e.g. kimg in the options, Mimg on the command line
        return 'unset' if value is None else json.dumps(value)
    named = [(flags.flag_of_key(key), key, old, new) for key, old, new in differences]
    return ', '.join(f'{flag.spellings[0] if flag else key} {show(flag, new)} != {show(flag, old)}'
                     for flag, key, old, new in named)


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


def choose_run(outdir, c, desc, resume=None, nosubdir=False, seed_given=True):
    """Which run this command continues, and from which state: the one place
    that decides it (train.py calls it on rank 0 and hands the answer to every
    rank). A dry run calls it too, to show what the command would do.

    outdir, resume, nosubdir: train.py's --outdir, --resume, --nosubdir; c:
    the resolved options of this command; desc: the <desc> of a new run
    folder NNNNN-<desc>; seed_given: whether the command gives --seed.
    Returns EasyDict(run_dir, resume_state (None: from the beginning), seed
    (a continued run keeps its own), continues (True: the same command again
    continues a run folder of outdir), changed (its run-only options that
    differ: [(key, old, new)]), note (why the latest run folder is not
    continued, or None)). ValueError if --resume names no file.
    """
    found, note = None, None
    if resume:
        if not os.path.isfile(resume):
            raise ValueError(f'--resume: no such file {resume}')
    else:
        found, note = find_resumable_run(outdir, c, seed_given, nosubdir)
    if found is not None:
        return dnnlib.EasyDict(run_dir=found.run_dir, resume_state=found.state, seed=found.seed, continues=True,
                               changed=found.changed, note=None)
    return dnnlib.EasyDict(run_dir=outdir if nosubdir else next_run_dir(outdir, desc), resume_state=resume or None,
                           seed=c['seed'], continues=False, changed=[], note=note)


def describe_run(run):
    """The lines that say what choose_run chose: why the latest run is not
    continued, or that the run resumes or restarts and with which changes."""
    lines = []
    if run.note is not None:
        lines.append(f'Note: {run.note}; starting a new run.')
    if run.continues and run.resume_state is not None:
        lines.append(f'Resuming run {run.run_dir} from {run.resume_state} (same command, same --outdir).')
    elif run.continues:
        lines.append(f'Restarting run {run.run_dir} from the beginning: it has no training state yet.')
    if run.changed:
        lines.append(f'Continuing with changed options: {describe_differences(run.changed)}.')
    return lines


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
