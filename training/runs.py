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
from training import flags, snapshots

STATE_RE = re.compile(r'^training-state-(\d+)\.pt$')
STATE_FORMAT = snapshots.TRAINING_STATE_FORMAT
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
    with open(path, 'rb') as f:
        head = f.read(9)
    if snapshots.is_network_file_head(head):
        raise ValueError(f'{path} is a network snapshot, not a training state: pass it to --transfer or generate.py '
                         f'--network; --resume takes a training-state-*.pt')
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


def describe_differences(differences, limit=None):
    """'--lr 0.0002 != 0.0001, ...' of [(key, old, new)]: the flag, then the new and the old value
    (with `limit`, the first `limit` of them and how many more)."""
    def show(flag, value):
        if flag is not None and flag.scale != 1 and isinstance(value, (int, float)):
            value = value * flag.scale   # e.g. kimg in the options, Mimg on the command line
        return 'unset' if value is None else json.dumps(value)
    named = [(flags.flag_of_key(key), key, old, new) for key, old, new in differences]
    shown = ', '.join(f'{flag.spellings[0] if flag else key} {show(flag, new)} != {show(flag, old)}'
                      for flag, key, old, new in named[:limit])
    more = len(named) - len(named[:limit])
    return f'{shown} and {more} more' if more else shown


def compare_options(old, new, seed_given=True):
    """(learned, run_only): the [(dotted key, old value, new value)] that differ between the
    resolved options of a run and of this command, split by whether they change what is
    learned. The seed counts only when the command gives one. A key 'desc' (the run's
    --desc, recorded beside the options) counts as learned: a different --desc is a
    different run."""
    old, new = _flatten(old), _flatten(new)
    if not seed_given:
        old.pop('seed', None)
        new.pop('seed', None)
    differences = [(key, old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key) and key not in ('run_dir', 'resume_state')]
    learned = [d for d in differences if not _is_run_only(d[0], new)]
    run_only = [d for d in differences if _is_run_only(d[0], new)]
    return learned, run_only


def read_options(run_dir, with_desc=False):
    """The options recorded in run_dir's training_options.json (with the run's --desc
    under 'desc', None if none, when with_desc), or None if it has none readable."""
    try:
        with open(os.path.join(run_dir, OPTIONS_FILE)) as f:
            options = json.load(f)
    except (OSError, ValueError):
        return None
    desc = options.pop('desc', None)
    return dict(options, desc=desc) if with_desc else options


def find_resumable_run(outdir, c, seed_given, nosubdir, desc=None):
    """The latest run in outdir that this command continues, as (found, note).

    A run is continued when its options differ from `c` only in run-only
    flags and it was named by the same --desc (`desc`, None when not given;
    ignored with nosubdir). found: EasyDict(run_dir, state (the newest
    readable training state, or None when the run stopped before its first
    one: it restarts in the same folder), seed, changed (the run-only options
    that differ, e.g. a longer --duration, [(key, old, new)])), or None.
    note: when nothing matches, why the latest run folder is not continued
    ('not resuming 00003-...: --lr 0.0002 != 0.0001'), else None.
    """
    if not os.path.isdir(outdir):
        return None, None
    candidates = [outdir] if nosubdir else sorted(
        (os.path.join(outdir, d) for d in os.listdir(outdir) if re.match(r'^\d+-', d)), reverse=True)
    mine = dict(c) if nosubdir else dict(c, desc=desc)
    note = None
    for run_dir in candidates:
        old = read_options(run_dir, with_desc=not nosubdir)
        if old is None:
            continue
        learned, changed = compare_options(old, mine, seed_given)
        if not learned:
            return dnnlib.EasyDict(run_dir=run_dir, state=find_latest_state(run_dir), seed=old.get('seed'),
                                   changed=changed), None
        if note is None:
            note = f'not resuming {os.path.basename(run_dir)}: {describe_differences(learned)}'
    return None, note


def choose_run(outdir, c, desc, resume=None, nosubdir=False, seed_given=True, user_desc=None):
    """Which run this command continues, and from which state: the one place
    that decides it (train.py calls it on rank 0 and hands the answer to every
    rank). A dry run calls it too, to show what the command would do.

    outdir, resume, nosubdir: train.py's --outdir, --resume, --nosubdir; c:
    the resolved options of this command; desc: the <desc> of a new run
    folder NNNNN-<desc>; seed_given: whether the command gives --seed;
    user_desc: its --desc (a different --desc is a different run).
    Returns EasyDict(run_dir, resume_state (None: from the beginning), seed
    (a continued run, or a --resume without --seed, keeps its own),
    continues (True: the same command again continues a run folder of
    outdir), changed (its run-only options that differ: [(key, old, new)]),
    note (why the latest run folder is not continued, or None), complete_kimg
    (the kimg of the resumed state when it already reached --duration: there
    is nothing to do; else None), resume_differences (the options of the run
    that wrote --resume's state that this command changes, [(key, old, new)]).
    ValueError if --resume names no training state, --nosubdir's folder
    holds a run with other options, or --nosubdir comes with --desc.
    """
    found, note, seed, differences, state = None, None, c['seed'], [], None
    if nosubdir and user_desc:
        raise ValueError('--desc names a new run folder NNNNN-<desc>, which --nosubdir does not make; leave one '
                         'of them out')
    if resume:
        try:
            state = load_state(resume, mmap=True)
        except ValueError as err:
            raise ValueError(f'--resume: {err}') from None
        if not seed_given and state.get('seed') is not None:   # the state's run continues with its own seed
            seed = int(state['seed'])
        old = read_options(os.path.dirname(os.path.abspath(resume)))
        if old is not None:
            differences = compare_options(old, dict(c, seed=seed))[0]
    else:
        found, note = find_resumable_run(outdir, c, seed_given, nosubdir, user_desc)
    if found is not None:
        run = dnnlib.EasyDict(run_dir=found.run_dir, resume_state=found.state, seed=found.seed, continues=True,
                              changed=found.changed, note=None)
    elif nosubdir and note is not None:
        raise ValueError(f'--nosubdir: {outdir} holds a run with other options ({note.split(": ", 1)[1]}); '
                         f'choose another --outdir, or leave --nosubdir out for a new run folder in it')
    else:
        run = dnnlib.EasyDict(run_dir=outdir if nosubdir else next_run_dir(outdir, desc),
                              resume_state=resume or None, seed=seed, continues=False, changed=[], note=note)
    run.resume_differences = differences
    run.complete_kimg = None
    if run.resume_state is not None:
        state = state if resume else load_state(run.resume_state, mmap=True)   # --resume's was read above
        nimg = state.get('nimg')
        if nimg is not None and int(nimg) >= max(int(c['total_kimg'] * 1000), 1):   # as the Trainer counts
            run.complete_kimg = int(nimg) / 1000
    return run


def describe_run(run):
    """The lines that say what choose_run chose: why the latest run is not
    continued, or that the run resumes or restarts and with which changes,
    or that it is already complete."""
    lines = []
    if run.note is not None:
        lines.append(f'Note: {run.note}; starting a new run.')
    if run.resume_differences:
        lines.append(f'Note: the run of {run.resume_state} had other options: '
                     f'{describe_differences(run.resume_differences, limit=8)}.')
    if run.complete_kimg is not None:
        where = run.run_dir if run.continues else run.resume_state
        lines.append(f'{where} is already complete at {run.complete_kimg:g} kimg; raise --duration to continue. '
                     f'Nothing to do.')
    elif run.continues and run.resume_state is not None:
        lines.append(f'Resuming run {run.run_dir} from {run.resume_state} (same command, same --outdir).')
    elif run.continues:
        lines.append(f'Restarting run {run.run_dir} from the beginning: it has no training state yet.')
    if run.changed and run.complete_kimg is None:
        lines.append(f'Continuing with changed options: {describe_differences(run.changed)}.')
    return lines


# Options that shape the network's tensors (the rest, e.g. --lr or --data, leave them as they are).
_SHAPING_KEYS = ('network_kwargs.', 'dataset_kwargs.resolution', 'dataset_kwargs.use_labels', 'latent_kwargs')


def check_state_fits(state, net, path, run_dir):
    """ValueError unless the network of training state `state` (read from
    `path`) has the tensors of `net`: the message names the options in which
    the run that wrote it (its folder's training_options.json) differs from
    this run (run_dir's), those that shape the network if any differ, or
    else how many tensors differ and the first."""
    mine = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    theirs = {name: tuple(t.shape) for name, t in state['net'].items()}
    misfits = sorted(name for name in set(mine) | set(theirs) if mine.get(name) != theirs.get(name))
    if not misfits:
        return
    old, new = read_options(os.path.dirname(os.path.abspath(path))), read_options(run_dir)
    learned = compare_options(old, new, seed_given=False)[0] if old is not None and new is not None else []
    shaping = [d for d in learned if d[0].startswith(_SHAPING_KEYS)]
    learned = shaping or learned
    if learned:
        raise ValueError(f'{path} does not fit this network: its run had other options '
                         f'({describe_differences(learned, limit=8)}); give that run\'s flags to resume it')
    first = misfits[0]
    shapes = ', '.join(f'{where} {list(shapes[first]) if first in shapes else "absent"}'
                       for where, shapes in (('in the state', theirs), ('here', mine)))
    raise ValueError(f'{path} does not fit this network: {len(misfits)} of {len(mine)} tensors differ, the first '
                     f'{first} ({shapes}); give the flags of the run that wrote it')


def next_run_dir(outdir, desc):
    """outdir/NNNNN-desc with NNNNN one above the highest run number in outdir."""
    ids = [int(m.group(1)) for d in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.match(r'^(\d+)', d)) and os.path.isdir(os.path.join(outdir, d))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


def prepare_run_dir(c, write_options, desc=None):
    """Create the run folder, write training_options.json (for a new run, or a
    continued one whose run-only options changed; with the run's --desc
    `desc` when given) and start copying the console to its log.txt.
    Returns the Logger."""
    try:
        os.makedirs(c.run_dir, exist_ok=True)
        if write_options:
            options = {key: value for key, value in c.items() if key != 'resume_state'}
            if desc:
                options['desc'] = desc
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
