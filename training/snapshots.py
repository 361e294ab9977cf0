"""Network files: every read, write and conversion of network snapshots
(docs/DESIGN.md section 4).

    load_network        a .pkl (ours, EDM's, the official Patch Diffusion code's)
                        or a .safetensors snapshot -> (net, meta)
    save_snapshot       a training snapshot as EDM's pickle and/or .safetensors
    convert_snapshot    a trusted pickle -> .safetensors (generate.py convert)
    transfer_weights    copy a snapshot's weights into a network by name

Unpickling runs the code embedded in the file: only load pickles you trust.
A file named .safetensors is never unpickled.
"""

import copy
import json
import os
import pickle
import zipfile

import safetensors.torch
import torch

import dnnlib
from torch_utils import misc, persistence
from training import encoders, networks
from training.denoiser import make_denoiser, network_info

# Networks without sigma_min, sigma_max and round_sigma (EDM2's) take any sigma > 0, unrounded.
_REQUIRED_ATTRIBUTES = ('img_channels', 'label_dim')
# Our preconditioner whose snapshots also carry EDM2's 'encoder' entry, for EDM2's generate_images.py.
_EDM2_LAYOUT_CLASS = 'EDM2Precond'
SNAPSHOT_FORMATS = ('pkl', 'safetensors', 'both')
# The 'format' entry of a training state (training.runs.save_state): a torch.save archive, never a network file.
TRAINING_STATE_FORMAT = 'patch-diffusion-state-v1'
_ZIP_MAGIC = b'PK\x03\x04'

# ----------------------------------------------------------------------------
# Reading.


def load_network(path_or_url, device='cpu', verbose=False):
    """Load the network of a snapshot: a .safetensors snapshot (see
    `save_network_safetensors`; nothing is unpickled), or a pickle (ours,
    EDM's, EDM2's or the official one's) with the network under 'ema'.

    Returns (net, meta): net in eval mode on `device`, gradients off, its
    weights in the precision stored (EDM2's float16 ones stay so); meta =
    EasyDict of the snapshot's other entries (dataset_kwargs, EDM2's
    encoder, ...). Raises
    ValueError with a one-line message that names the file for a missing,
    unfetchable, truncated or unreadable file and for contents that are not
    a network snapshot. A path or URL ending in .safetensors is never
    unpickled. Unpickling runs the code embedded in the file: only load
    pickles you trust.
    """
    by_name = _is_safetensors_name(path_or_url)
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            head = f.read(9)
            f.seek(0)
            if head.startswith(_ZIP_MAGIC) and _is_training_state(f):
                raise ValueError(f'{path_or_url} is a training state, not a network snapshot: pass it to train.py '
                                 f'--resume; a network is a network-snapshot-*.pkl or .safetensors')
            f.seek(0)
            if by_name or _looks_like_safetensors(head):
                net, meta = _network_from_safetensors(f.read(), path_or_url)
            else:
                net, meta = _network_from_pickle(f, path_or_url)
    except OSError as err:
        kind = '.safetensors snapshot' if by_name else 'network pickle'
        raise ValueError(dnnlib.util.one_line(f'Cannot open the {kind} {path_or_url}: {err}')) from err
    return net.eval().requires_grad_(False).to(device), meta


def is_network_file_head(head):
    """Whether a file starting with the bytes `head` (at least 9) is a network
    snapshot's kind of file: a pickle or a .safetensors file (a training
    state is a torch.save zip archive)."""
    return head[:1] == b'\x80' or _looks_like_safetensors(head)


def _is_training_state(f):
    """Whether the open zip file `f` is a training state: its pickle (tensors
    aside, small) records TRAINING_STATE_FORMAT."""
    try:
        with zipfile.ZipFile(f) as archive:
            pickles = [name for name in archive.namelist() if name.endswith('/data.pkl')]
            return any(TRAINING_STATE_FORMAT.encode() in archive.read(name) for name in pickles[:1])
    except (zipfile.BadZipFile, OSError):
        return False


def _network_from_pickle(f, name):
    """(net, meta) of a network pickle, from an open binary file."""
    try:
        snapshot = persistence.load_network_pickle(f)
    except Exception as err:   # whatever unpickling untrusted bytes raises
        raise ValueError(dnnlib.util.one_line(f'{name} is not a readable network pickle; it may be truncated '
                                   f'({type(err).__name__}: {err})')) from err
    if not isinstance(snapshot, dict):
        raise ValueError(f'{name} holds a {type(snapshot).__name__}, not a snapshot dict with the network '
                         f'under "ema"')
    if 'ema' not in snapshot:
        raise ValueError(f'{name} has no "ema" network (keys: {", ".join(map(str, snapshot))}); '
                         f'give a network-snapshot-*.pkl')
    net = snapshot['ema']
    missing = [attr for attr in _REQUIRED_ATTRIBUTES if not hasattr(net, attr)]
    if not isinstance(net, torch.nn.Module) or missing:
        raise ValueError(f'The "ema" entry of {name} is not a denoiser network '
                         f'({type(net).__name__}; missing: {", ".join(missing) or "nn.Module"})')
    return net, dnnlib.EasyDict({key: value for key, value in snapshot.items() if key != 'ema'})


# ----------------------------------------------------------------------------
# Snapshots as .safetensors: weights plus JSON metadata, loadable without unpickling.
#
# Tensors: the network's state_dict. Metadata (safetensors' string map):
#   format          'patch-diffusion-snapshot'
#   format_version  '1'
#   architecture    JSON {"class_name": preconditioner class (EDMPrecond, VPPrecond, VEPrecond),
#                         "init_args": [...], "init_kwargs": {...}}  (the constructor call)
#   dataset_kwargs, patch_kwargs, latent, phema   JSON of the snapshot entries of these names (absent or null:
#                   none; phema: a power EMA's width and time, training.phema)

SAFETENSORS_FORMAT = 'patch-diffusion-snapshot'
SAFETENSORS_VERSION = 1
_SAFETENSORS_META_KEYS = ('dataset_kwargs', 'patch_kwargs', 'latent', 'phema')


def network_classes():
    """The classes a .safetensors snapshot may name: our preconditioners, by class name."""
    return {cls.__name__: cls for cls in networks.PRECONDITIONERS.values()}


def _is_safetensors_name(path_or_url):
    return str(path_or_url).lower().split('?')[0].endswith('.safetensors')


def _looks_like_safetensors(head):
    """Whether a file starting with `head` is a safetensors file: an 8-byte
    little-endian header size, then a JSON object (a pickle starts with 0x80)."""
    return len(head) >= 9 and head[8:9] == b'{' and head[:1] != b'\x80'


def save_network_safetensors(path, net, meta=None):
    """Write `net` (a preconditioner of this code) and the JSON-able entries
    of `meta` (see the format above) as a .safetensors file, atomically."""
    class_name = type(net).__name__
    if class_name not in network_classes() or not hasattr(net, 'init_kwargs'):
        raise ValueError(f'Only this code\'s preconditioners ({", ".join(network_classes())}) can be saved as '
                         f'.safetensors, not {class_name}')
    architecture = dict(class_name=class_name, init_args=list(net.init_args), init_kwargs=dict(net.init_kwargs))
    metadata = dict(format=SAFETENSORS_FORMAT, format_version=str(SAFETENSORS_VERSION))
    try:
        metadata['architecture'] = json.dumps(architecture)
        for key in _SAFETENSORS_META_KEYS:
            if (meta or {}).get(key) is not None:
                metadata[key] = json.dumps(meta[key])
    except TypeError as err:
        raise ValueError(f'The snapshot cannot be described in JSON ({err})') from err
    tensors = {name: tensor.detach().to('cpu', copy=True).contiguous() for name, tensor in net.state_dict().items()}
    data = safetensors.torch.save(tensors, metadata=metadata)
    with dnnlib.util.atomic_write(path) as f:
        f.write(data)


def _safetensors_metadata(data, name):
    """The string map in the header of safetensors bytes; ValueError naming `name` if unreadable."""
    size = int.from_bytes(data[:8], 'little') if len(data) >= 8 else -1
    try:
        if size < 2 or 8 + size > len(data):
            raise ValueError(f'its header says {size} bytes but the file has {len(data)}')
        header = json.loads(data[8: 8 + size])
        return dict(header.get('__metadata__') or {})
    except (ValueError, AttributeError) as err:
        raise ValueError(f'{name} is not a readable .safetensors file; it may be truncated ({err})') from None


def _checked_metadata(data, name):
    """The header's string map of a .safetensors snapshot (`data`: the file's
    bytes, or at least its header), checked to be this code's format and version."""
    metadata = _safetensors_metadata(data, name)
    if metadata.get('format') != SAFETENSORS_FORMAT:
        raise ValueError(f'{name} is a .safetensors file but not a network snapshot of this code '
                         f'(metadata "format" is {metadata.get("format")!r}, expected {SAFETENSORS_FORMAT!r})')
    if metadata.get('format_version') != str(SAFETENSORS_VERSION):
        raise ValueError(f'{name} is snapshot format version {metadata.get("format_version")}; this code reads '
                         f'version {SAFETENSORS_VERSION}')
    return metadata


def _meta_of(metadata):
    """The snapshot entries (dataset_kwargs, ...) of a checked header map, as load_network's meta."""
    meta = dnnlib.EasyDict({key: json.loads(metadata[key]) for key in _SAFETENSORS_META_KEYS if key in metadata})
    if meta.get('latent') is None:
        meta.pop('latent', None)
    return meta


def _unreadable(name, err):
    return ValueError(dnnlib.util.one_line(f'{name} is not a readable .safetensors snapshot; it may be truncated '
                                           f'({type(err).__name__}: {err})'))


def _network_from_safetensors(data, name):
    """(net, meta) of the bytes of a .safetensors snapshot. Builds the network
    from the named class of this code and loads the tensors: nothing is unpickled."""
    metadata = _checked_metadata(data, name)
    try:
        tensors = safetensors.torch.load(data)
        architecture = json.loads(metadata['architecture'])
        meta = _meta_of(metadata)
    except Exception as err:   # safetensors' own errors have no common base class
        raise _unreadable(name, err) from None
    cls = network_classes().get(architecture.get('class_name'))
    if cls is None:
        raise ValueError(f'{name} names the network class {architecture.get("class_name")!r}; this code knows '
                         f'{", ".join(network_classes())}')
    try:
        with torch.random.fork_rng(devices=[]):   # the initial weights are overwritten: keep the global RNG as it was
            net = cls(*architecture.get('init_args', []), **architecture.get('init_kwargs', {}))
        net.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(dnnlib.util.one_line(f'{name}: the weights do not fit the recorded architecture '
                                   f'{architecture.get("class_name")} ({err})')) from None
    return net, meta


def load_snapshot_meta(path):
    """The meta of load_network(path) without its network where the format
    allows: of a local .safetensors snapshot only the header is read (a
    pickle is loaded whole). ValueError naming the file, as load_network."""
    if not _is_safetensors_name(path) or not os.path.isfile(path):
        return load_network(path)[1]
    with open(path, 'rb') as f:
        head = f.read(8)
        size = int.from_bytes(head, 'little') if len(head) == 8 else 0
        data = head + f.read(size)
    metadata = _checked_metadata(data, path)
    try:
        return _meta_of(metadata)
    except ValueError as err:   # a JSON entry that does not parse
        raise _unreadable(path, err) from None


def convert_snapshot(src, dest):
    """Convert a network snapshot (a pickle you trust) to a .safetensors snapshot at `dest`.

        python generate.py convert --network=net.pkl --dest=net.safetensors

    Refuses networks it cannot rebuild exactly: the converted network must
    give the same output as the original on a test input. Returns dest.
    """
    net, meta = load_network(src)
    save_network_safetensors(dest, net, meta)
    try:
        rebuilt, _ = load_network(dest)
        same = _same_output(net, rebuilt)
    except (ValueError, RuntimeError, TypeError):
        same = False
    if not same:
        os.remove(dest)
        raise ValueError(f'{src}: the network rebuilt from .safetensors does not compute the same as the '
                         f'pickled one; only snapshots of this code\'s networks can be converted')
    return dest


def _same_output(net_a, net_b):
    """Whether two networks give bit-identical D(x; sigma) on one random full-size input."""
    info = network_info(net_a)
    x = torch.randn([1, info.img_channels, *info.img_shape], generator=torch.Generator().manual_seed(0))
    labels = torch.zeros([1, info.label_dim]) if info.label_dim else None
    out_a = make_denoiser(net_a, labels)(x, 1.0)
    out_b = make_denoiser(net_b, labels)(x, 1.0)
    return out_a.shape == out_b.shape and torch.equal(out_a, out_b)


# ----------------------------------------------------------------------------
# Writing and weight transfer.


def save_snapshot(path, ema, loss_fn, augment_pipe, dataset_kwargs, extra=None, snapshot_format='pkl'):
    """Write a network snapshot, atomically: `path` (a .pkl in EDM's layout,
    plus the entries of `extra`) and/or, with snapshot_format 'safetensors'
    or 'both', the same name with .safetensors (loadable without
    unpickling). The pickle of an EDM2Precond also holds EDM2's 'encoder'
    entry (training.encoders: StandardRGBEncoder for pixels, LatentVAEEncoder
    with the run's VAE for latents), so that EDM2's generate_images.py
    samples it. Returns the paths written."""
    if snapshot_format not in SNAPSHOT_FORMATS:
        raise ValueError(f'snapshot_format={snapshot_format!r}; choose one of {", ".join(SNAPSHOT_FORMATS)}')
    ema = copy.deepcopy(ema).eval().requires_grad_(False).cpu().to(memory_format=torch.contiguous_format)
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
    data.update(extra or {})
    if type(ema).__name__ == _EDM2_LAYOUT_CLASS:
        latent = data.get('latent')
        data.setdefault('encoder', encoders.StandardRGBEncoder() if latent is None else
                        encoders.LatentVAEEncoder(latent['vae'], latent['scale_factor']))
    paths = []
    if snapshot_format in ('pkl', 'both'):
        with dnnlib.util.atomic_write(path) as f:
            pickle.dump(data, f)
        paths.append(path)
    if snapshot_format in ('safetensors', 'both'):
        st_path = os.path.splitext(path)[0] + '.safetensors'
        save_network_safetensors(st_path, data['ema'], data)
        paths.append(st_path)
    return paths


def transfer_weights(path_or_url, net):
    """Copy the weights of the network of a snapshot into `net` by name.

    Works with our .pkl and .safetensors snapshots and EDM's and the
    official Patch Diffusion pickles (same parameter names). Returns
    (copied, missing) names. ValueError naming the file if it is not a
    readable snapshot.
    """
    source, _ = load_network(path_or_url)
    return misc.copy_params_and_buffers(source, net)
