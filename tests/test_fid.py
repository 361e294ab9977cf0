"""evaluation/metrics.py and fid.py: the Frechet distance against closed forms and
scipy, feature statistics, reference files, detector files (TorchScript and
network pickle), the CLI end to end, one vs two processes, and bad inputs.

No download: a tiny feature network (average-pool to 4x4, fixed random
projection to 8 features) stands in for Inception-v3.
"""

import importlib.util
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from click.testing import CliRunner

import dnnlib
import fid
from evaluation import metrics
from training.dataset import ImageFolderDataset

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning')

FEATURES = 8

DETECTOR_SRC = '''
import torch
from torch_utils import persistence


class TinyDetector(torch.nn.Module):
    """uint8 RGB [N, 3, H, W] -> [N, dim]: mean over 4x4 cells, then a fixed random projection.
    With flatten=False it returns the pooled [N, 3, 4, 4] instead (not a valid detector)."""

    def __init__(self, dim=8, flatten=True):
        super().__init__()
        self.flatten = flatten
        generator = torch.Generator().manual_seed(0)
        self.register_buffer('weight', torch.randn(48, dim, generator=generator))

    def forward(self, images, return_features: bool = False):
        assert images.dtype == torch.uint8 and images.shape[1] == 3
        assert return_features
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 4)
        if not self.flatten:
            return pooled
        return pooled.flatten(1) @ self.weight


PersistentTinyDetector = persistence.persistent_class(TinyDetector)
'''


def import_source(path, src, name):
    """Write `src` to `path` and import it as module `name` (a file, so persistence can read its source)."""
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def detectors(tmp_path_factory):
    """EasyDict(module, pt, pkl, not_2d): the tiny detector and its files."""
    root = tmp_path_factory.mktemp('detectors')
    tiny = import_source(root / 'tiny_detector.py', DETECTOR_SRC, 'tiny_detector_for_test_fid')
    files = dnnlib.EasyDict(module=tiny.TinyDetector(FEATURES).eval())
    files.pt = str(root / 'tiny.pt')
    torch.jit.save(torch.jit.script(tiny.TinyDetector(FEATURES)), files.pt)
    files.pkl = str(root / 'tiny.pkl')
    with open(files.pkl, 'wb') as f:
        pickle.dump(tiny.PersistentTinyDetector(FEATURES), f)
    files.not_2d = str(root / 'not_2d.pt')
    torch.jit.save(torch.jit.script(tiny.TinyDetector(FEATURES, flatten=False)), files.not_2d)
    return files


def random_images(n, seed, channels=3, size=16, brightness=0):
    """uint8 [n, channels, size, size] with smooth random content (so 4x4 means vary)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256 - brightness, size=(n, channels, 4, 4)) + brightness
    fine = rng.integers(-20, 21, size=(n, channels, size, size))
    images = np.repeat(np.repeat(coarse, size // 4, axis=2), size // 4, axis=3) + fine
    return images.clip(0, 255).astype(np.uint8)


def write_folder(root, images):
    """A dataset folder of uint8 [N, C, H, W] images, named as dataset_tool names them."""
    os.makedirs(root, exist_ok=True)
    for i, image in enumerate(images):
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        os.makedirs(os.path.join(root, f'{i // 1000:05d}'), exist_ok=True)
        PIL.Image.fromarray(array).save(os.path.join(root, f'{i // 1000:05d}', f'img{i:08d}.png'))
    return str(root)


def numpy_stats(detector, images):
    """Reference mean and unbiased covariance of the features of uint8 images [N, 3, H, W]."""
    with torch.no_grad():
        features = detector(torch.as_tensor(images), return_features=True).double().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


def scipy_fid(mu1, sigma1, mu2, sigma2):
    """The FID as EDM computes it, with scipy.linalg.sqrtm."""
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root)))


def random_spd(dim, rng, rank=None, spread=1.0):
    """A random symmetric PSD [dim, dim] of the given rank, eigenvalues over `spread` decades."""
    rank = dim if rank is None else rank
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    eigenvalues = np.zeros(dim)
    eigenvalues[:rank] = 10.0 ** rng.uniform(-spread, 0, size=rank)
    return (basis * eigenvalues) @ basis.T


def run_cli(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args])


def last_line(result):
    return result.output.strip().splitlines()[-1]


# ----------------------------------------------------------------------------
# Frechet distance.

@pytest.mark.parametrize('case', ['full rank', 'ill-conditioned', 'first singular', 'both singular'])
def test_trace_sqrt_product_matches_scipy(case):
    rng = np.random.default_rng(['full rank', 'ill-conditioned', 'first singular', 'both singular'].index(case))
    dim = 48
    spread = 8.0 if case == 'ill-conditioned' else 2.0
    rank1 = 30 if case in ('first singular', 'both singular') else None
    rank2 = 40 if case == 'both singular' else None
    sigma1, sigma2 = random_spd(dim, rng, rank1, spread), random_spd(dim, rng, rank2, spread)
    expected = float(np.trace(scipy.linalg.sqrtm(sigma1 @ sigma2)).real)
    assert metrics.trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-6)

    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(scipy_fid(mu1, sigma1, mu2, sigma2),
                                                                               rel=1e-6)


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # For diagonal covariances FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 2.0])
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    assert metrics.frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-12)


def test_frechet_distance_rejects_mismatched_or_broken_statistics():
    eye = np.eye(3)
    with pytest.raises(ValueError, match='different detectors'):
        metrics.frechet_distance(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r'expected mu \[D\] and sigma \[D, D\]'):
        metrics.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), eye)
    with pytest.raises(ValueError, match='NaN'):
        metrics.frechet_distance(np.array([0, np.nan, 0]), eye, np.zeros(3), eye)


# ----------------------------------------------------------------------------
# Statistics.

def test_calculate_stats_matches_numpy_whatever_the_batching(detectors):
    images = random_images(24, seed=1)
    mu_ref, sigma_ref = numpy_stats(detectors.module, images)
    batches = [torch.as_tensor(images[i:j]) for i, j in [(0, 5), (5, 12), (12, 12), (12, 24)]]
    mu, sigma = metrics.calculate_stats(batches, detectors.module, num_expected=24, device='cpu')
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (FEATURES,) and sigma.shape == (FEATURES,) * 2
    np.testing.assert_allclose(mu, mu_ref, rtol=1e-10)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=1e-8, atol=1e-10)
    mu1, sigma1 = metrics.calculate_stats([torch.as_tensor(images)], detectors.module, device='cpu')
    np.testing.assert_allclose(mu1, mu, rtol=1e-12)
    np.testing.assert_allclose(sigma1, sigma, rtol=1e-10, atol=1e-12)
    assert metrics.frechet_distance(mu, sigma, mu1, sigma1) == pytest.approx(0, abs=1e-9)


def test_one_channel_images_are_repeated_to_rgb(detectors):
    gray = random_images(10, seed=2, channels=1)
    stats_gray = metrics.calculate_stats([torch.as_tensor(gray)], detectors.module, device='cpu')
    stats_rgb = metrics.calculate_stats([torch.as_tensor(gray).repeat(1, 3, 1, 1)], detectors.module, device='cpu')
    np.testing.assert_array_equal(stats_gray[0], stats_rgb[0])
    np.testing.assert_array_equal(stats_gray[1], stats_rgb[1])


def test_calculate_stats_errors(detectors):
    images = torch.as_tensor(random_images(6, seed=3))
    flat = detectors.module
    with pytest.raises(ValueError, match=r'must return \[N, D\]'):
        metrics.calculate_stats([images], metrics.load_detector(detectors.not_2d), device='cpu')
    with pytest.raises(ValueError, match='expected 7'):
        metrics.calculate_stats([images], flat, num_expected=7, device='cpu')
    with pytest.raises(ValueError, match='at least 2'):
        metrics.calculate_stats([images[:1]], flat, device='cpu')
    with pytest.raises(ValueError, match='uint8'):
        metrics.calculate_stats([images.float()], flat, device='cpu')


def test_calculate_fid_of_a_folder_takes_statistics_or_files(tmp_path, detectors):
    real, fake = random_images(12, seed=6), random_images(10, seed=7, brightness=40)
    ref = numpy_stats(detectors.module, real)
    metrics.save_ref(tmp_path / 'ref.npz', *ref)
    expected = scipy_fid(*numpy_stats(detectors.module, fake), *ref)
    write_folder(tmp_path / 'fake', fake)
    kwargs = dict(batch_size=4, num_workers=0, device='cpu')
    from_files = metrics.calculate_fid(str(tmp_path / 'fake'), str(tmp_path / 'ref.npz'), detectors.pkl, num=10,
                                       **kwargs)
    from_objects = metrics.calculate_fid(str(tmp_path / 'fake'), ref, detectors.module, **kwargs)
    assert from_files == pytest.approx(expected, rel=1e-8) and from_objects == pytest.approx(expected, rel=1e-8)


# ----------------------------------------------------------------------------
# Reference files and detector files.

def test_ref_round_trip_is_float64_and_atomic(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(5).astype(np.float32), random_spd(5, rng)
    path = tmp_path / 'refs' / 'x.npz'
    metrics.save_ref(path, mu, sigma)
    assert os.listdir(tmp_path / 'refs') == ['x.npz']
    with np.load(path) as npz:
        assert sorted(npz.files) == ['mu', 'sigma'] and npz['mu'].dtype == npz['sigma'].dtype == np.float64
    mu2, sigma2 = metrics.load_ref(str(path))
    np.testing.assert_array_equal(mu2, mu.astype(np.float64))
    np.testing.assert_array_equal(sigma2, sigma)
    assert metrics.load_ref(path.as_uri())[0].shape == (5,)
    with pytest.raises(ValueError):
        metrics.save_ref(path, mu, sigma[:4])
    np.testing.assert_array_equal(metrics.load_ref(str(path))[1], sigma)   # a failed save leaves the file alone


@pytest.mark.parametrize('content, message', [
    (dict(mean=np.zeros(3), sigma=np.eye(3)), "no 'mu' array"),
    (dict(mu=np.zeros(3), cov=np.eye(3)), "no 'sigma' array"),
    (dict(mu=np.zeros(3), sigma=np.eye(4)), r'expected mu \[D\] and sigma \[D, D\]'),
    (dict(mu=np.zeros((3, 1)), sigma=np.eye(3)), r'expected mu \[D\] and sigma \[D, D\]'),
    (None, 'not an .npz file'),
])
def test_load_ref_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / 'bad.npz'
    if content is None:
        path.write_bytes(b'not an archive')
    else:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=message):
        metrics.load_ref(str(path))


@pytest.mark.parametrize('kind', ['pt', 'pkl'])
def test_load_detector_reads_torchscript_and_network_pickles(detectors, kind):
    detector = metrics.load_detector(detectors[kind], 'cpu')
    assert not detector.training
    images = torch.as_tensor(random_images(4, seed=5))
    expected = detectors.module(images, return_features=True).double()
    torch.testing.assert_close(metrics.detector_features(detector, images), expected, rtol=0, atol=0)


def test_load_detector_rejects_files_that_are_not_detectors(tmp_path):
    state_dict = tmp_path / 'weights.pt'
    torch.save({'weight': torch.zeros(2)}, state_dict)
    with pytest.raises(ValueError, match='not a TorchScript module'):
        metrics.load_detector(str(state_dict))
    not_module = tmp_path / 'dict.pkl'
    not_module.write_bytes(pickle.dumps({'ema': None}))
    with pytest.raises(ValueError, match='not a detector network'):
        metrics.load_detector(str(not_module))
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'\x00 not a pickle')
    with pytest.raises(ValueError, match='could not be unpickled'):
        metrics.load_detector(str(garbage))
    with pytest.raises(FileNotFoundError):
        metrics.load_detector(str(tmp_path / 'missing.pt'))


def test_unreachable_default_detector_says_how_to_supply_it(monkeypatch):
    requested = []

    def offline(url, **_kwargs):
        requested.append(url)
        raise dnnlib.util.DownloadError(f'Could not download {url}; copy it to {dnnlib.util.url_cache_path(url)}')
    monkeypatch.setattr(dnnlib.util, 'open_url', offline)
    with pytest.raises(dnnlib.util.DownloadError, match='--detector PATH') as info:
        metrics.load_detector()
    assert requested == [metrics.DEFAULT_DETECTOR_URL]
    assert dnnlib.util.url_cache_path(metrics.DEFAULT_DETECTOR_URL) in str(info.value)


# ----------------------------------------------------------------------------
# The CLI.

@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    """EasyDict(real, fake): folders of 24 and 20 16x16 RGB PNGs from different distributions."""
    root = tmp_path_factory.mktemp('images')
    return dnnlib.EasyDict(real=write_folder(root / 'real', random_images(24, seed=10)),
                           fake=write_folder(root / 'fake', random_images(20, seed=11, brightness=60)))


def folder_images(path, num=None, seed=0):
    dataset = ImageFolderDataset(path, max_size=num, random_seed=seed)
    return np.stack([dataset[i][0] for i in range(len(dataset))])


@pytest.mark.parametrize('kind', ['pt', 'pkl'])
def test_cli_ref_then_calc(tmp_path, detectors, folders, kind):
    dest = tmp_path / 'refs' / 'real.npz'
    result = run_cli('ref', f'--data={folders.real}', f'--dest={dest}', f'--detector={detectors[kind]}',
                     '--device=cpu', '--batch=7', '--workers=0')
    assert result.exit_code == 0, result.output
    mu_real, sigma_real = numpy_stats(detectors.module, folder_images(folders.real))
    mu, sigma = metrics.load_ref(str(dest))
    np.testing.assert_allclose(mu, mu_real, rtol=1e-10)
    np.testing.assert_allclose(sigma, sigma_real, rtol=1e-8, atol=1e-10)

    common = [f'--ref={dest}', f'--detector={detectors[kind]}', '--device=cpu', '--batch=8', '--workers=0']
    result = run_cli('calc', f'--images={folders.real}', '--num=24', *common)
    assert result.exit_code == 0, result.output
    assert abs(float(last_line(result))) < 1e-6

    result = run_cli('calc', f'--images={folders.fake}', '--num=20', *common)
    assert result.exit_code == 0, result.output
    expected = scipy_fid(*numpy_stats(detectors.module, folder_images(folders.fake)), mu_real, sigma_real)
    assert expected > 1
    assert float(last_line(result)) == pytest.approx(expected, rel=1e-5)


def test_cli_num_picks_a_seeded_subset_and_checks_the_count(tmp_path, detectors, folders):
    dest = tmp_path / 'real.npz'
    assert run_cli('ref', f'--data={folders.real}', f'--dest={dest}', f'--detector={detectors.pt}',
                   '--device=cpu', '--workers=0').exit_code == 0
    ref = metrics.load_ref(str(dest))
    common = [f'--images={folders.fake}', f'--ref={dest}', f'--detector={detectors.pt}', '--device=cpu', '--workers=2']
    fids = {}
    for seed in (1, 2):
        result = run_cli('calc', '--num=12', f'--seed={seed}', *common)
        assert result.exit_code == 0, result.output
        subset = folder_images(folders.fake, num=12, seed=seed)
        assert len(subset) == 12
        fids[seed] = float(last_line(result))
        assert fids[seed] == pytest.approx(scipy_fid(*numpy_stats(detectors.module, subset), *ref), rel=1e-5)
    assert fids[1] != fids[2]

    result = run_cli('calc', '--num=50', *common)
    assert result.exit_code == 1
    assert 'Found 20 images' in result.output and '--allow-small' in result.output
    result = run_cli('calc', '--num=50', '--allow-small', *common)
    assert result.exit_code == 0, result.output
    all_fake = scipy_fid(*numpy_stats(detectors.module, folder_images(folders.fake)), *ref)
    assert float(last_line(result)) == pytest.approx(all_fake, rel=1e-5)


def bad_input_case(name, tmp_path, detectors, folders):
    """The calc arguments of one bad-input case, and a part of the expected message."""
    good_ref = tmp_path / 'good.npz'
    metrics.save_ref(good_ref, np.zeros(FEATURES), np.eye(FEATURES))
    args = dict(images=folders.fake, ref=good_ref, detector=detectors.pt, num=20)
    if name == 'ref keys':
        np.savez(tmp_path / 'keys.npz', mean=np.zeros(FEATURES), sigma=np.eye(FEATURES))
        return dict(args, ref=tmp_path / 'keys.npz'), "no 'mu' array"
    if name == 'ref shapes':
        np.savez(tmp_path / 'shapes.npz', mu=np.zeros(FEATURES), sigma=np.eye(FEATURES + 1))
        return dict(args, ref=tmp_path / 'shapes.npz'), 'expected mu [D] and sigma [D, D]'
    if name == 'ref of another detector':
        metrics.save_ref(tmp_path / 'other.npz', np.zeros(FEATURES + 2), np.eye(FEATURES + 2))
        return dict(args, ref=tmp_path / 'other.npz'), 'different detectors'
    if name == 'mixed sizes':
        folder = write_folder(tmp_path / 'mixed', random_images(4, seed=12))
        PIL.Image.fromarray(random_images(1, seed=13, size=8)[0].transpose(1, 2, 0)).save(
            os.path.join(folder, '00000', 'img00000004.png'))
        return dict(args, images=folder, num=5), 'all images must have the same size'
    if name == 'no images':
        os.makedirs(tmp_path / 'empty')
        return dict(args, images=tmp_path / 'empty'), 'no images found'
    if name == 'detector not 2-D':
        return dict(args, detector=detectors.not_2d), 'must return [N, D] features'
    if name == 'unreachable ref URL':
        return dict(args, ref='http://127.0.0.1:9/ref.npz'), 'Could not download'
    raise AssertionError(name)


BAD_INPUTS = ['ref keys', 'ref shapes', 'ref of another detector', 'mixed sizes', 'no images', 'detector not 2-D',
              'unreachable ref URL']


@pytest.mark.parametrize('name', BAD_INPUTS)
def test_cli_bad_input_is_one_clear_error_line(tmp_path, detectors, folders, monkeypatch, name):
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.setattr(dnnlib.util, '_RETRY_DELAY_S', 0)
    args, message = bad_input_case(name, tmp_path, detectors, folders)
    result = run_cli('calc', *[f'--{key}={value}' for key, value in args.items()], '--device=cpu', '--workers=0')
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert 'Traceback' not in result.output


def test_cli_bad_input_in_a_subprocess_exits_nonzero_without_traceback(tmp_path, detectors, folders, repo_root,
                                                                      subprocess_env):
    # The bad image is read in a DataLoader worker (default --workers), which wraps errors with its traceback.
    args, message = bad_input_case('mixed sizes', tmp_path, detectors, folders)
    command = [sys.executable, 'fid.py', 'calc', *[f'--{key}={value}' for key, value in args.items()], '--device=cpu']
    proc = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.count('Error:') == 1 and message in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.slow
def test_two_processes_give_the_statistics_of_one(tmp_path, detectors, folders, repo_root, subprocess_env):
    one, two = tmp_path / 'one.npz', tmp_path / 'two.npz'
    result = run_cli('ref', f'--data={folders.fake}', f'--dest={one}', f'--detector={detectors.pkl}',
                     '--device=cpu', '--batch=3', '--workers=0')
    assert result.exit_code == 0, result.output
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'fid.py',
               'ref', f'--data={folders.fake}', f'--dest={two}', f'--detector={detectors.pkl}', '--device=cpu',
               '--batch=3', '--workers=0']
    proc = subprocess.run(command, cwd=repo_root, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count('Saving reference statistics') == 1
    mu1, sigma1 = metrics.load_ref(str(one))
    mu2, sigma2 = metrics.load_ref(str(two))
    np.testing.assert_allclose(mu2, mu1, rtol=1e-12)
    np.testing.assert_allclose(sigma2, sigma1, rtol=1e-10, atol=1e-12)


WORKER = """
import json, sys
import numpy as np
import torch
from evaluation import metrics
from torch_utils import distributed as dist

detector_path, images_path, out_dir = sys.argv[1:]
dist.init('cpu')
rank = dist.get_rank()
detector = metrics.load_detector(detector_path, 'cpu')
images = torch.as_tensor(np.load(images_path))
out = {}

# Rank 1 has no images at all: it learns the feature size from rank 0.
mu, sigma = metrics.calculate_stats([images] if rank == 0 else [], detector, num_expected=len(images))
out['mu'], out['sigma'] = mu.tolist(), sigma.tolist()

def failing_on_rank1():
    yield images[:3]
    if rank == 1:
        raise ValueError('broken image on rank 1')
    yield images[3:]

for name, call in [('stats_error', lambda: metrics.calculate_stats(failing_on_rank1(), detector)),
                   ('ref_error', lambda: metrics.load_ref(out_dir + '/missing.npz'))]:
    try:
        call()
    except (ValueError, OSError) as err:
        out[name] = str(err)
with open(f'{out_dir}/rank{rank}.json', 'w') as f:
    json.dump(out, f)
dist.barrier()
dist.shutdown()   # tear gloo down before exit (exiting with it alive can abort the process)
"""


@pytest.mark.slow
def test_two_processes_share_the_feature_size_and_the_errors(tmp_path, detectors, repo_root, subprocess_env):
    images = random_images(9, seed=15)
    np.save(tmp_path / 'images.npy', images)
    (tmp_path / 'worker.py').write_text(WORKER)
    env = dict(subprocess_env, PD_DIST_TIMEOUT_S='60')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(tmp_path / 'worker.py'), detectors.pt, str(tmp_path / 'images.npy'), str(tmp_path)]
    proc = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mu, sigma = numpy_stats(detectors.module, images)
    ranks = [json.loads((tmp_path / f'rank{rank}.json').read_text()) for rank in range(2)]
    for out in ranks:
        np.testing.assert_allclose(out['mu'], mu, rtol=1e-10)
        np.testing.assert_allclose(out['sigma'], sigma, rtol=1e-8, atol=1e-10)
        assert 'missing.npz' in out['ref_error']
    assert ranks[1]['stats_error'] == 'broken image on rank 1'
    assert 'Another rank failed' in ranks[0]['stats_error']


# ----------------------------------------------------------------------------
# The training loop's entry point.

class GaussianDenoiser(torch.nn.Module):
    """EDM-convention network whose D(x; sigma) is the ideal denoiser of N(0.2, 0.3^2 I) data."""

    img_resolution, img_channels, label_dim = 8, 3, 0
    sigma_min, sigma_max = 0.002, 80

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones([]))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1, 1, 1)
        return 0.2 + (x - 0.2) * 0.09 / (0.09 + sigma ** 2) * self.scale


def test_calc_metric_for_network_is_fid_of_seeds_0_to_num(tmp_path, detectors):
    from training import generation
    net = GaussianDenoiser()
    real = random_images(16, seed=14, size=8)
    ref_path = tmp_path / 'ref.npz'
    metrics.save_ref(ref_path, *numpy_stats(detectors.module, real))
    result = metrics.calc_metric_for_network('fid', net, ref=str(ref_path), num=10, detector=detectors.pt,
                                             batch_size=4, device='cpu')
    generated = torch.cat([images for _, images in generation.generate_images(net, range(10), 10, device='cpu')])
    expected = scipy_fid(*numpy_stats(detectors.module, generated.numpy()), *metrics.load_ref(str(ref_path)))
    assert isinstance(result, float) and result == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match='Unknown metric'):
        metrics.calc_metric_for_network('kid', net, ref=str(ref_path))


# ----------------------------------------------------------------------------
# Which detector a reference was made with, and the default number of workers.

def test_ref_records_a_custom_detector_and_calc_notes_another(tmp_path, detectors, folders):
    dest = tmp_path / 'real.npz'
    result = run_cli('ref', f'--data={folders.real}', f'--dest={dest}', f'--detector={detectors.pt}', '--device=cpu',
                     '--workers=0')
    assert result.exit_code == 0, result.output
    with np.load(dest) as npz:   # EDM's fid.py reads 'mu' and 'sigma' and ignores the rest
        assert sorted(npz.files) == ['detector_source', 'mu', 'sigma']
        assert str(npz['detector_source']) == os.path.abspath(detectors.pt)

    common = [f'--images={folders.fake}', f'--ref={dest}', '--device=cpu', '--workers=0', '--num=20']
    same = run_cli('calc', *common, f'--detector={detectors.pt}')
    assert same.exit_code == 0, same.output
    assert 'Note:' not in same.output
    other = run_cli('calc', *common, f'--detector={detectors.pkl}')   # the same features from another file
    assert other.exit_code == 0, other.output
    assert (f"Note: {dest} holds FID statistics of the detector '{os.path.abspath(detectors.pt)}', but this "
            f"calculation uses '{os.path.abspath(detectors.pkl)}'") in other.output
    assert float(last_line(other)) == pytest.approx(float(last_line(same)), rel=1e-6)
    assert "but this calculation uses 'inception-v3'" in metrics.detector_note('fid', 'x', str(dest), None)

    with pytest.raises(ValueError, match=f"holds FID statistics \\(detector '{os.path.abspath(detectors.pt)}'\\), "
                                         f"not FD-DINOv2 statistics"):
        metrics.load_ref(str(dest), 'fd_dinov2')


def test_a_reference_of_the_default_detector_keeps_edms_layout(tmp_path):
    path = tmp_path / 'ref.npz'
    metrics.save_ref(path, np.zeros(3), np.eye(3), detector=metrics.DEFAULT_DETECTOR_URL)
    with np.load(path) as npz:
        assert sorted(npz.files) == ['mu', 'sigma']
    assert metrics.load_ref_and_detector(str(path))[2] is None


@pytest.mark.parametrize('cpus, processes, workers', [(1, None, 0), (2, None, 1), (4, None, 3), (64, '8', 3),
                                                       (16, '8', 1), (8, '8', 0)])
def test_default_workers_fit_the_machine(monkeypatch, cpus, processes, workers):
    """3 data loading processes, but no more than the CPUs of each process less one:
    a 2-core machine gets 1 (DataLoader warns above its CPU count), an 8-GPU node
    with 16 cores 1 per process."""
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(cpus)))
    if processes is None:
        monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    else:
        monkeypatch.setenv('LOCAL_WORLD_SIZE', processes)
    assert dnnlib.util.default_workers() == workers


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason='needs 2 CPUs')
def test_fid_py_on_two_cpus_takes_one_worker_without_warnings(tmp_path, detectors, folders, repo_root,
                                                             subprocess_env):
    """fid.py in a process allowed on 2 CPUs: the help shows 1 worker, and a
    calculation with the default writes no DataLoader warning."""
    two_cpus = sorted(os.sched_getaffinity(0))[:2]

    def run(*args):
        return subprocess.run([sys.executable, 'fid.py', *args], cwd=repo_root, env=subprocess_env, text=True,
                              capture_output=True, timeout=120, preexec_fn=lambda: os.sched_setaffinity(0, two_cpus))
    assert '[default: 1; x>=0]' in ' '.join(run('calc', '--help').stdout.split())
    ref = tmp_path / 'real.npz'
    assert run('ref', f'--data={folders.real}', f'--dest={ref}', f'--detector={detectors.pt}',
               '--device=cpu').returncode == 0
    proc = run('calc', f'--images={folders.fake}', f'--ref={ref}', f'--detector={detectors.pt}', '--device=cpu',
               '--num=20')
    assert proc.returncode == 0, proc.stderr
    assert 'worker' not in proc.stderr, proc.stderr
