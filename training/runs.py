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

# Options that may differ between a run and the command that resumes it.
RESUME_FREE_KEYS = ('run_dir', 'resume_state', 'transfer_pkl', 'snapshot_format')


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


def _comparable(c):
    return {k: v for k, v in json.loads(json.dumps(c)).items() if k not in RESUME_FREE_KEYS}


def find_resumable_run(outdir, c, seed_given, nosubdir):
    """(run_dir, state_path, seed) of the latest run in outdir with the same
    options, or None. state_path is None when that run has no training state
    yet (it was stopped before its first one): it restarts in the same folder
    with the same seed."""
    if not os.path.isdir(outdir):
        return None
    candidates = [outdir] if nosubdir else sorted(
        (os.path.join(outdir, d) for d in os.listdir(outdir) if re.match(r'^\d+-', d)), reverse=True)
    for run_dir in candidates:
        try:
            with open(os.path.join(run_dir, OPTIONS_FILE)) as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        mine, theirs = _comparable(c), _comparable(old)
        if not seed_given:
            mine.pop('seed', None)
            theirs.pop('seed', None)
        if mine == theirs:
            return run_dir, find_latest_state(run_dir), old.get('seed')
    return None


def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with NNNNN one above the highest run number in outdir."""
    ids = [int(m.group(1)) for d in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.match(r'^(\d+)', d)) and os.path.isdir(os.path.join(outdir, d))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def prepare_run_dir(c, write_options):
    """Create the run folder with training_options.json (for a new run) and
    start copying the console to its log.txt. Returns the Logger."""
    try:
        os.makedirs(c.run_dir, exist_ok=True)
        if write_options:
            with dnnlib.util.atomic_write(os.path.join(c.run_dir, OPTIONS_FILE), 'w') as f:
                json.dump(c, f, indent=2)
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
