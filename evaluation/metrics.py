"""Frechet distances of image features, as EDM and EDM2 report them
(docs/DESIGN.md section 4): FID in Inception-v3 features and FD-DINOv2 in
DINOv2 ViT-L/14 features.

Features are the [N, D] outputs of a detector, called as
`detector(images, return_features=True)` on uint8 RGB images [N, 3, H, W] in
[0, 255]: for FID by default the Inception-v3 2015-12-05 network of the EDM
and StyleGAN metrics (D = 2048), for FD-DINOv2 evaluation.dinov2's (D = 1024).
The statistics of a set of images are the mean mu [D] and the unbiased
covariance sigma [D, D] (divided by N - 1) of its features, both float64, and

    FD = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

Several detectors see the same images in one pass. Under torchrun each rank
feeds its own share of the images; sums are reduced over ranks, so the
statistics do not depend on the number of processes (up to float64
rounding). Reference statistics are .npz files with 'mu' and 'sigma', one
per metric: FID's are interchangeable with EDM's; FD-DINOv2's also hold
'detector' = 'dinov2'; those made with another than the metric's default
detector also hold 'detector_source', its path, URL or Hub id, so that a
calculation with a different one says so.
"""

import contextlib
import functools
import io
import os
import urllib.parse
import warnings
import zipfile

import numpy as np
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence
from evaluation import dinov2
from training import generation
from training.dataset import ImageFolderDataset

DEFAULT_DETECTOR_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                        'metrics/inception-2015-12-05.pkl')
DEFAULT_WORKERS = dnnlib.util.default_workers()   # data loading processes per process: 3, fewer on small machines
_ZIP_MAGIC = b'PK\x03\x04'   # .npz and TorchScript files are zip archives; pickles are not

# The metrics (fid.py and train.py --metrics): name -> what messages call it and the detector whose
# features it compares, as its reference files record it (key 'detector'; EDM's FID files have none).
METRICS = {
    'fid': dnnlib.EasyDict(label='FID', detector='inception-v3'),
    'fd_dinov2': dnnlib.EasyDict(label='FD-DINOv2', detector='dinov2'),
}


def check_metric_names(names):
    """ValueError unless `names` is a non-empty list of known metrics, each once."""
    unknown = [str(name) for name in names if name not in METRICS]
    if unknown or not names:
        what = f'Unknown metric {", ".join(unknown)}' if unknown else 'No metric given'
        raise ValueError(f'{what}; the metrics are: {", ".join(METRICS)}')
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ValueError(f'Metric {", ".join(repeated)} given more than once')


def per_metric(names, text, flag):
    """{metric: item} of a comma-separated list `text` with one item per metric, in the order of `names`."""
    items = [item.strip() for item in str(text).split(',')]
    if len(items) != len(names) or not all(items):
        raise ValueError(f'--metrics={",".join(names)} takes one {flag} per metric, comma-separated in the same '
                         f'order; got {flag}={text}')
    return dict(zip(names, items))

# ----------------------------------------------------------------------------
# The feature detectors.


def load_metric_detector(metric, location=None, device='cpu'):
    """The feature detector of `metric` on `device`, in eval mode; every rank must call this.

    'fid': a detector file or URL (load_detector; None = EDM's Inception-v3);
    'fd_dinov2': a Hugging Face Hub id or save_pretrained folder
    (evaluation.dinov2; None = facebook/dinov2-large). Rank 0 loads first, so
    only it downloads.
    """
    if metric == 'fd_dinov2':
        return dist.rank0_first(lambda: dinov2.load_dinov2(location or dinov2.DEFAULT_MODEL, device))
    return load_detector(location, device)


def load_detector(path_or_url=None, device='cpu'):
    """Load a feature detector (default: EDM's Inception-v3) onto `device`, in eval mode.

    A zip archive (a TorchScript `.pt`, as StyleGAN2-ADA ships its Inception)
    is loaded with torch.jit.load; anything else is unpickled with the
    persistence loader (a network pickle `.pkl`, as EDM's), which runs the
    code embedded in the file. URLs go through the download cache of
    `dnnlib.util.open_url`. Under torchrun rank 0 loads first, so only it
    downloads, and every rank must call this. ValueError for a file that is
    not a detector.
    """
    path_or_url = path_or_url or DEFAULT_DETECTOR_URL
    device = torch.device(device)
    return dist.rank0_first(lambda: _load_detector(path_or_url, device))


def _load_detector(path_or_url, device):
    try:
        with dnnlib.util.open_url(path_or_url, verbose=dist.get_rank() == 0) as f:
            data = f.read()
    except dnnlib.util.DownloadError as err:
        if path_or_url != DEFAULT_DETECTOR_URL:
            raise
        raise dnnlib.util.DownloadError(f'{err} Or pass a local copy of the detector (fid.py --detector PATH).') from None
    name = _display_name(path_or_url)
    if data.startswith(_ZIP_MAGIC):
        try:
            with warnings.catch_warnings():   # TorchScript is deprecated, but it is the format of these files
                warnings.simplefilter('ignore', DeprecationWarning)
                detector = torch.jit.load(io.BytesIO(data), map_location=device)
        except RuntimeError as err:
            raise ValueError(f'{name} is a zip archive but not a TorchScript module ({_first_line(err)}); '
                             f'save the detector with torch.jit.save, or as a network pickle') from None
    else:
        try:
            detector = persistence.load_network_pickle(io.BytesIO(data))
        except Exception as err:   # unpickling runs the file's own code: any error means "not loadable"
            raise ValueError(f'{name} could not be unpickled as a detector ({type(err).__name__}: '
                             f'{_first_line(err)}); pass a TorchScript .pt or a network pickle .pkl') from None
    if not (callable(detector) and hasattr(detector, 'to')):   # a module, or any network with .to(device)
        raise ValueError(f'{name} holds a {type(detector).__name__}, not a detector network; pass a file that '
                         f'holds one module called as detector(images, return_features=True)')
    if hasattr(detector, 'eval'):
        detector = detector.eval()
    return detector.to(device)


def _display_name(path_or_url):
    return os.path.basename(urllib.parse.urlparse(path_or_url).path) if dnnlib.util.is_url(path_or_url) else path_or_url


def _first_line(err):
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def detector_features(detector, images):
    """Features [N, D] float64 of uint8 images [N, C, H, W] (C = 1 or 3) on the detector's device.

    One-channel images are repeated to RGB. ValueError for other inputs and
    for a detector whose output is not [N, D].
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'The detector takes uint8 images [N, C, H, W] with C = 1 or 3, '
                         f'got {images.dtype} {list(images.shape)}')
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    with torch.no_grad():
        features = detector(images, return_features=True)
    if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
        shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f'The detector returned {shape} for {images.shape[0]} images; a feature detector must '
                         f'return [N, D] features when called with return_features=True')
    return features.to(torch.float64)


# ----------------------------------------------------------------------------
# Statistics.


def calculate_stats(image_batches, detector, num_expected=None, device=None):
    """Mean and unbiased covariance of the features of all ranks' images.

    image_batches: iterable of uint8 tensors [n, C, H, W], this rank's share;
    detector: a module on `device` (default: torch_utils.distributed's);
    num_expected: if given, the total number of images over all ranks must
    be this (ValueError otherwise). Every rank must call this (collective).

    Returns (mu float64 [D], sigma float64 [D, D]) as numpy arrays, the same
    on every rank. An error on one rank is raised on all of them, so none
    waits for the others forever.
    """
    return calculate_stats_of_detectors(image_batches, {'features': detector}, num_expected, device)['features']


def calculate_stats_of_detectors(image_batches, detectors, num_expected=None, device=None):
    """{name: (mu, sigma)} of the features of each of `detectors` ({name: module}), from one pass over the images.

    As calculate_stats, which is this with one detector: every detector sees
    every batch, and one reduction over ranks carries all the sums.
    """
    device = dist.get_device() if device is None else torch.device(device)
    sums = {name: None for name in detectors}     # name -> (sum f [D], sum f f^T [D, D]), float64
    count, failure = 0, None
    try:
        for images in image_batches:
            if images.shape[0] == 0:
                continue
            images = images.to(device)
            for name, detector in detectors.items():
                features = detector_features(detector, images)
                if sums[name] is None:
                    sums[name] = _zero_sums(features.shape[1], device)
                sums[name][0].add_(features.sum(dim=0))
                sums[name][1].add_(features.T @ features)
            count += images.shape[0]
    except Exception as err:   # re-raised below, after the other ranks have been told
        failure = err

    local_dims = [0 if sums[name] is None else sums[name][0].shape[0] for name in detectors]
    status = _all_reduce_max(torch.tensor([failure is not None, *local_dims], dtype=torch.int64, device=device))
    if failure is not None:
        raise failure
    if status[0]:
        raise ValueError('Another rank failed while computing the feature statistics; see its error message')
    dims = [int(dim) for dim in status[1:]]
    packed = [torch.tensor([count], dtype=torch.float64, device=device)]
    for name, local_dim, dim in zip(detectors, local_dims, dims):
        if sums[name] is None:
            sums[name] = _zero_sums(dim, device)
        elif local_dim != dim:
            raise ValueError(f'Ranks disagree on the feature size ({local_dim} here, {dim} elsewhere)')
        packed += [sums[name][0], sums[name][1].flatten()]
    packed = torch.cat(packed)
    dist.all_reduce_sum(packed)
    total = int(packed[0].item())
    if num_expected is not None and total != num_expected:
        raise ValueError(f'Got {total} images for the statistics, expected {num_expected}')
    if total < 2:
        raise ValueError(f'Got {total} images; the covariance needs at least 2')
    stats, at = {}, 1
    for name, dim in zip(detectors, dims):
        feature_sum, feature_outer = packed[at:at + dim], packed[at + dim:at + dim + dim * dim].reshape(dim, dim)
        stats[name] = _mean_and_covariance(feature_sum.cpu().numpy(), feature_outer.cpu().numpy(), total)
        at += dim + dim * dim
    return stats


def _zero_sums(dim, device):
    """(sum f [D], sum f f^T [D, D]) of no features: float64 zeros on `device`."""
    zeros = functools.partial(torch.zeros, dtype=torch.float64, device=device)
    return zeros(dim), zeros([dim, dim])


def _mean_and_covariance(feature_sum, feature_outer, n):
    """mu = sum / n, sigma = (sum x x^T - n mu mu^T) / (n - 1), from float64 sums over n samples."""
    mu = feature_sum / n
    sigma = (feature_outer - n * np.outer(mu, mu)) / (n - 1)
    return mu, sigma


def _all_reduce_max(tensor):
    """Elementwise maximum of `tensor` over ranks, in place (no-op in a single process)."""
    if dist.get_world_size() > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return tensor


# ----------------------------------------------------------------------------
# Frechet distance.


def trace_sqrt_product(sigma1, sigma2):
    """Tr sqrtm(sigma1 sigma2) of two symmetric PSD matrices [D, D], exactly and fast.

    With sigma1 = F F^T (Cholesky, or an eigendecomposition when sigma1 is
    singular), sigma1 sigma2 = F (F^T sigma2) has the eigenvalues of the
    symmetric PSD F^T sigma2 F, so the trace of the principal square root is
    the sum of their square roots. Eigenvalues below zero (rounding) count as
    zero, which is the real part that sqrtm would give. Float64 throughout.
    """
    sigma1 = torch.as_tensor(np.asarray(sigma1), dtype=torch.float64)
    sigma2 = torch.as_tensor(np.asarray(sigma2), dtype=torch.float64)
    factor = _psd_factor(sigma1)
    product = factor.T @ sigma2 @ factor
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2)
    return float(eigenvalues.clamp(min=0).sqrt().sum())


def _psd_factor(sigma):
    """F [D, D] with sigma = F F^T for a symmetric PSD sigma [D, D]."""
    sigma = (sigma + sigma.T) / 2
    lower, info = torch.linalg.cholesky_ex(sigma)
    if info == 0:
        return lower
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    return eigenvectors * eigenvalues.clamp(min=0).sqrt()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)), a float.

    mu [D], sigma [D, D] (numpy arrays or anything np.asarray takes).
    ValueError when the shapes do not match.
    """
    mu1, sigma1 = _check_stats(mu1, sigma1, 'first')
    mu2, sigma2 = _check_stats(mu2, sigma2, 'second')
    if mu1.shape != mu2.shape:
        raise ValueError(f'The statistics have {mu1.shape[0]} and {mu2.shape[0]} features: they come from different '
                         f'detectors; compute both with the same one')
    mean_term = np.square(mu1 - mu2).sum()
    return float(mean_term + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def _check_stats(mu, sigma, what):
    """(mu [D], sigma [D, D]) as float64 arrays; ValueError naming `what` otherwise."""
    mu = np.asarray(mu, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'The {what} statistics have mu {list(mu.shape)} and sigma {list(sigma.shape)}; '
                         f'expected mu [D] and sigma [D, D]')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'The {what} statistics contain NaN or infinite values')
    return mu, sigma


# ----------------------------------------------------------------------------
# Reference statistics files.


def load_ref(path_or_url, metric='fid'):
    """(mu float64 [D], sigma float64 [D, D]) of `metric` from an .npz with keys 'mu' and 'sigma'.

    Local path or URL (through the download cache; under torchrun rank 0
    loads first and every rank must call this). ValueError for a file that
    is not such an .npz, or whose recorded detector ('detector'; none, as in
    EDM's files, is Inception-v3) is not the metric's.
    """
    return load_ref_and_detector(path_or_url, metric)[:2]


def load_ref_and_detector(path_or_url, metric='fid'):
    """(mu, sigma, detector) of load_ref, detector the location of the network the
    statistics were made with as the file records it ('detector_source'), or None
    for the metric's default (also for EDM's files, which record none)."""
    return dist.rank0_first(lambda: _load_ref(path_or_url, metric))


def _load_ref(path_or_url, metric):
    name, label = _display_name(path_or_url), METRICS[metric].label
    with dnnlib.util.open_url(path_or_url, verbose=dist.get_rank() == 0) as f:
        data = f.read()
    if not data.startswith(_ZIP_MAGIC):
        raise ValueError(f'{name} is not an .npz file; make reference statistics with fid.py ref')
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        missing = [key for key in ('mu', 'sigma') if key not in npz.files]
        if missing:
            raise ValueError(f'no {" or ".join(repr(k) for k in missing)} array; it has {_entries(npz.files)}')
        mu, sigma = npz['mu'], npz['sigma']
        detector = str(npz['detector']) if 'detector' in npz.files else METRICS['fid'].detector
        source = str(npz['detector_source']) if 'detector_source' in npz.files else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f'{name} is not {label} reference statistics ({err}); make them with fid.py ref') from None
    expected = METRICS[metric].detector
    if detector != expected:
        owner = next((key for key, spec in METRICS.items() if spec.detector == detector), None)
        holds = f'{METRICS[owner].label} statistics' if owner else 'the statistics of another detector'
        made_with = detector_name(owner, source) if owner else repr(detector)
        hint = f'use it as the {owner} reference, or ' if owner else ''
        raise ValueError(f'{name} holds {holds} (detector {made_with}), not {label} statistics ({expected}); '
                         f'{hint}make {label} statistics with fid.py ref --metrics={metric}')
    try:
        return (*_check_stats(mu, sigma, f'reference ({name})'), source)
    except ValueError as err:
        raise ValueError(f'{err}; make the reference with fid.py ref') from None


def detector_source(metric, location):
    """What a reference file records as the detector at `location` (see save_refs):
    None for the metric's default, the absolute path of a local file or folder,
    else the URL or Hub id as given."""
    if location is None:
        return None
    location = os.fspath(location)
    if location == (DEFAULT_DETECTOR_URL if metric == 'fid' else dinov2.DEFAULT_MODEL):
        return None
    return os.path.abspath(location) if os.path.exists(location) else location


def detector_name(metric, source):
    """A detector as messages name it: its recorded source, or the metric's default."""
    if source is not None:
        return repr(source)
    return repr(METRICS[metric].detector) if metric == 'fid' else repr(dinov2.DEFAULT_MODEL)


def detector_note(metric, ref_name, ref_source, location):
    """A note when reference statistics were made with another detector than
    `location` (a path, URL or id; None: the default), else None. Files may
    hold the same network under two names, so this is a note, not an error."""
    source = detector_source(metric, location)
    if source == ref_source:
        return None
    return (f'Note: {ref_name} holds {METRICS[metric].label} statistics of the detector '
            f'{detector_name(metric, ref_source)}, but this calculation uses {detector_name(metric, source)}; '
            f'the value compares two networks\' features unless both are the same network')


def _entries(names, shown=5):
    """The entries of an archive for a message: all of a few, else a count and the first
    ones; saying so when it holds images (a dataset given where statistics belong)."""
    listing = names if len(names) <= shown else [*names[:shown], f'... ({len(names)} in all)']
    images = any(os.path.splitext(name)[1].lower() in ('.png', '.jpg', '.jpeg') for name in names)
    hint = ', images: a dataset? Make its statistics with fid.py ref --data=DATASET --dest=REF.npz' if images else ''
    return f'[{", ".join(listing)}]{hint}'


def save_ref(path, mu, sigma, metric='fid', detector=None):
    """Write mu [D], sigma [D, D] of `metric` as float64 to the .npz `path`, atomically (see save_refs)."""
    save_refs({metric: path}, {metric: (mu, sigma)}, {metric: detector})


def save_refs(paths, stats, detectors=None):
    """Write each metric's statistics to its .npz: paths {metric: path}, stats {metric: (mu, sigma)},
    detectors {metric: where its detector came from, None (or left out) for the default}.

    Float64 'mu' and 'sigma'; 'detector' (the metric's detector family) for
    every metric but FID, whose files keep EDM's layout; 'detector_source'
    (see detector_source) for a detector that is not the metric's default.
    EDM's fid.py reads 'mu' and 'sigma' only. All files are written
    completely under temporary names before any is renamed to its final
    name; on an error none is.
    """
    arrays = {metric: dict(zip(('mu', 'sigma'), _check_stats(*stats[metric], 'reference'))) for metric in paths}
    for metric, content in arrays.items():
        if metric != 'fid':
            content['detector'] = np.array(METRICS[metric].detector)
        source = detector_source(metric, (detectors or {}).get(metric))
        if source is not None:
            content['detector_source'] = np.array(source)
    with contextlib.ExitStack() as stack:
        for metric, path in paths.items():
            tmp = stack.enter_context(dnnlib.util.atomic_path(path))
            with open(tmp, 'wb') as f:
                np.savez(f, **arrays[metric])


# ----------------------------------------------------------------------------
# Image sources.


def open_image_folder(path, num=None, seed=0, allow_small=False):
    """The dataset of a folder or zip of images, reduced to `num` of them.

    num: None = all; fewer than found = a subset chosen by `seed` (as EDM);
    more than found = ValueError unless allow_small, which takes all found.
    """
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    if num is not None and len(dataset) < num and not allow_small:
        raise ValueError(f'Found {len(dataset)} images in {path}, but expected at least {num}; generate more, '
                         f'or pass --num={len(dataset)} (or --allow-small for a quick, biased check)')
    if len(dataset) < 2:
        raise ValueError(f'Found {len(dataset)} image in {path}; the statistics need at least 2')
    return dataset


def folder_batches(dataset, batch_size=64, num_workers=DEFAULT_WORKERS, rank=None, world_size=None):
    """This rank's images of `dataset` (items rank, rank + world_size, ...) as uint8 [n, C, H, W] batches."""
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    subset = torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers,
                                         prefetch_factor=2 if num_workers else None)
    try:
        for images, _labels in loader:
            yield images
    except ValueError as err:
        raise ValueError(_worker_message(err)) from None


def _worker_message(err):
    """The original message of an error that a DataLoader worker wrapped with its traceback."""
    text = str(err)
    if 'DataLoader worker' not in text:
        return text
    prefix = f'{type(err).__name__}: '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return lines[-1][len(prefix):] if lines else text


def calculate_stats_for_folder(path, detectors, num=None, seed=0, allow_small=False, batch_size=64,
                               num_workers=DEFAULT_WORKERS, device=None, progress=False):
    """{name: (mu, sigma)} of the images in a folder or zip (see `open_image_folder`) for each of
    `detectors` ({name: module}), from one pass over the images of all ranks."""
    dataset = open_image_folder(path, num=num, seed=seed, allow_small=allow_small)
    batches = folder_batches(dataset, batch_size=batch_size, num_workers=num_workers)
    if progress:
        batches = _progress(batches, -(-len(dataset) // (batch_size * dist.get_world_size())))
    return calculate_stats_of_detectors(batches, detectors, num_expected=len(dataset), device=device)


def _progress(batches, total):
    """A tqdm progress bar on rank 0 (stderr); the batches unchanged elsewhere."""
    if dist.get_rank() != 0:
        return batches
    return tqdm.tqdm(batches, total=total, unit='batch')


# ----------------------------------------------------------------------------
# The metrics of a folder of images and of a network.


def calculate_metrics(image_path, refs, detectors=None, num=None, seed=0, allow_small=False, batch_size=64,
                      num_workers=DEFAULT_WORKERS, device=None, progress=False):
    """{metric: value} of the images in a folder or zip against reference statistics, on every rank (fid.py calc).

    refs: {metric: (mu, sigma) or an .npz path or URL}; detectors: {metric:
    a module, or its location for load_metric_detector (None or left out:
    the default)}; num, seed, allow_small: as `open_image_folder`; progress:
    a progress bar and status lines on rank 0. The images are read once for
    all metrics. Every rank must call this (collective).
    """
    check_metric_names(list(refs))
    device = dist.get_device() if device is None else torch.device(device)
    refs, detectors = dict(refs), dict(detectors or {})
    for metric, ref in refs.items():
        if isinstance(ref, (tuple, list)):
            continue
        mu, sigma, source = load_ref_and_detector(ref, metric)
        refs[metric] = (mu, sigma)
        note = None if _is_module(detectors.get(metric)) else detector_note(metric, _display_name(ref), source,
                                                                             detectors.get(metric))
        if note:
            dist.print0(note)
    detectors = {metric: _as_detector(metric, detectors.get(metric), device) for metric in refs}
    stats = calculate_stats_for_folder(image_path, detectors, num=num, seed=seed, allow_small=allow_small,
                                       batch_size=batch_size, num_workers=num_workers, device=device,
                                       progress=progress)
    if progress:
        dist.print0(f'Calculating {", ".join(METRICS[metric].label for metric in refs)}...')
    return {metric: frechet_distance(*stats[metric], *refs[metric]) for metric in refs}


def _is_module(detector):
    """True for a detector given as a network rather than its location (None: the default location)."""
    return not (detector is None or isinstance(detector, (str, os.PathLike)))


def _as_detector(metric, detector, device):
    """`detector` if it is a module (anything but a location), else the metric's detector loaded from there."""
    return detector if _is_module(detector) else load_metric_detector(metric, detector, device)


def calculate_fid(image_path, ref, detector=None, **kwargs):
    """FID of the images in a folder or zip against reference statistics, on every rank.

    ref: (mu, sigma) or an .npz path or URL; detector: a module, a path or
    URL, or None for the default Inception-v3; the other arguments as
    calculate_metrics's. Every rank must call this (collective).
    """
    return calculate_metrics(image_path, {'fid': ref}, {'fid': detector}, **kwargs)['fid']


@functools.lru_cache(maxsize=4)
def _cached_detector(metric, location, device):
    return load_metric_detector(metric, location, device)


def metric_detector(metric, location=None, device='cpu'):
    """load_metric_detector's detector, loaded once per process (metric, location, device) and then shared."""
    return _cached_detector(metric, location and os.fspath(location), str(torch.device(device)))


@functools.lru_cache(maxsize=4)
def _cached_ref(path_or_url, metric, location):
    """load_ref's statistics, loaded once per process, with detector_note's note (once) on rank 0."""
    mu, sigma, source = load_ref_and_detector(path_or_url, metric)
    note = detector_note(metric, _display_name(path_or_url), source, location)
    if note:
        dist.print0(note)
    return mu, sigma


def calc_metrics_for_network(metric_names, net, ref, num=50000, detector=None, dinov2=None, batch_size=64,
                             device=None, latent=None):
    """{metric: value} of a network during training, from one set of `num` images, seeds 0 .. num - 1.

    ref: {metric: .npz path or URL}, or one path when one metric is asked
    for; detector: FID's detector (None: Inception-v3); dinov2: FD-DINOv2's
    model (None: facebook/dinov2-large). Each rank generates its share of
    the images (training.generation with the default sampler) and every
    detector sees them. Detectors and references are loaded once per
    process. `latent`: the snapshot's latent record, to decode latent
    models' samples to pixels. Returns floats, the same on every rank.
    """
    metric_names = list(metric_names)
    check_metric_names(metric_names)
    refs = ref if isinstance(ref, dict) else {metric_names[0]: ref} if len(metric_names) == 1 else {}
    missing = [metric for metric in metric_names if metric not in refs]
    if missing:
        raise ValueError(f'No reference statistics for {", ".join(missing)}: give ref={{metric: npz}}')
    device = dist.get_device() if device is None else torch.device(device)
    locations = {'fid': detector, 'fd_dinov2': dinov2}
    detectors = {metric: metric_detector(metric, locations[metric], device) for metric in metric_names}
    refs = {metric: _cached_ref(refs[metric], metric, locations[metric] and os.fspath(locations[metric]))
            for metric in metric_names}
    batches = (images for _seeds, images in generation.generate_images(net, range(num), batch_size, device=device,
                                                                                 latent=latent))
    stats = calculate_stats_of_detectors(batches, detectors, num_expected=num, device=device)
    return {metric: frechet_distance(*stats[metric], *refs[metric]) for metric in metric_names}


def calc_metric_for_network(metric, net, ref, **kwargs):
    """One metric of calc_metrics_for_network (a float); its other arguments as there."""
    return calc_metrics_for_network([metric], net, ref, **kwargs)[metric]
