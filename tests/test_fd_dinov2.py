"""FD-DINOv2 (evaluation/dinov2.py, evaluation/metrics.py, fid.py, train.py
--metrics=fd_dinov2): the preprocessing against PIL and a naive bicubic,
the features of a tiny DINOv2, reference files of both detectors (written
together, refused for the other metric), one pass over the images for both
metrics, bad inputs, and FD-DINOv2 during training.

No download: a tiny randomly initialised transformers Dinov2Model (saved with
save_pretrained, the offline path) stands in for DINOv2 ViT-L/14, and the
tiny network of test_fid_training for Inception-v3.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import fid
import train
from tests.test_bad_inputs import assert_one_error_line, files_under
from tests.test_fid import GaussianDenoiser, random_images, scipy_fid, write_folder
from tests.test_fid_training import PooledFeatures
from dataset_prep.archive import convert_dataset
from evaluation import dinov2, metrics
from training import generation
from training.dataset import ImageFolderDataset

transformers = pytest.importorskip('transformers')

pytestmark = [pytest.mark.filterwarnings('ignore:`torch.jit:DeprecationWarning'), pytest.mark.usefixtures('one_thread')]

HIDDEN = 16   # the tiny DINOv2's feature size
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_dinov2(seed=0):
    """A randomly initialised Dinov2Model: 1 layer, 16 features, 14-pixel patches, a 2 x 2 position grid."""
    config = transformers.Dinov2Config(hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=14)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.Dinov2Model(config).eval()


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The tiny DINOv2 folder, a tiny Inception stand-in (.pt), and real and fake image folders."""
    root = tmp_path_factory.mktemp('fd_dinov2')
    tiny = tiny_dinov2()
    tiny.save_pretrained(str(root / 'dinov2'))
    torch.jit.save(torch.jit.script(PooledFeatures()), str(root / 'inception.pt'))
    return dict(root=root, dinov2=str(root / 'dinov2'), inception=str(root / 'inception.pt'),
                real=write_folder(root / 'real', random_images(16, seed=20)),
                fake=write_folder(root / 'fake', random_images(12, seed=21, brightness=80)),
                gray=write_folder(root / 'gray', random_images(6, seed=22, channels=1)))


def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(a) for a in args])


def folder_images(path):
    dataset = ImageFolderDataset(path)
    return torch.as_tensor(np.stack([dataset[i][0] for i in range(len(dataset))]))


def numpy_stats(features):
    features = features.double().numpy()
    return features.mean(axis=0), np.cov(features, rowvar=False, ddof=1)


# ----------------------------------------------------------------------------
# Preprocessing and position embeddings.

def pil_preprocess(images):
    """dgm-eval's reference: PIL bicubic resize of the uint8 image to 224 x 224, / 255, ImageNet normalisation."""
    resized = [np.asarray(PIL.Image.fromarray(image.transpose(1, 2, 0)).resize((224, 224), PIL.Image.BICUBIC))
               for image in images.numpy()]
    x = torch.as_tensor(np.stack(resized)).permute(0, 3, 1, 2).to(torch.float32) / 255
    return (x - torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)


@pytest.mark.parametrize('size', [32, 448])
def test_preprocessing_is_pils_bicubic_resize_then_imagenet_normalisation(size):
    # Noise images: bilinear, or bicubic without antialiasing, differ from PIL's bicubic by over 0.07 on average.
    images = torch.as_tensor(np.random.default_rng(size).integers(0, 256, (3, 3, size, size), dtype=np.uint8))
    x = dinov2.preprocess(images)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    assert (x - pil_preprocess(images)).abs().mean() < 0.01   # PIL rounds to uint8: ~0.005 apart
    per_image = torch.cat([dinov2.preprocess(image[None]) for image in images])
    torch.testing.assert_close(x, per_image, rtol=0, atol=1e-5)


def test_preprocessing_of_a_constant_image_is_the_normalised_constant():
    images = torch.tensor([10, 128, 250], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(2, 3, 64, 48)
    expected = (torch.tensor([10, 128, 250]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(dinov2.preprocess(images), expected.reshape(1, 3, 1, 1).expand(2, 3, 224, 224))


def keys_cubic(x, a=-0.75):
    """The bicubic convolution kernel (Keys, a = -0.75 as torch's 'bicubic')."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0


def naive_resample(grid, side, out, scale):
    """grid [side, side, D] -> [out, out, D]: output i samples the source at (i + 0.5) / scale - 0.5, edges clamped."""
    weights = np.zeros((out, side))
    for i in range(out):
        source = (i + 0.5) / scale - 0.5
        base = math.floor(source)
        for k in range(base - 1, base + 3):
            weights[i, min(max(k, 0), side - 1)] += keys_cubic(source - k)
    return np.einsum('ij,jkd,lk->ild', weights, grid, weights)


@pytest.mark.parametrize('side', [37, 2])   # ViT-L/14's 518-pixel grid, the tiny model's
def test_position_embeddings_are_resampled_as_the_reference_code_does(side):
    embeddings = torch.randn(1, 1 + side * side, 5, generator=torch.Generator().manual_seed(side))
    resampled = dinov2.resample_position_embeddings(embeddings, 16)
    assert resampled.shape == (1, 1 + 16 * 16, 5)
    torch.testing.assert_close(resampled[:, 0], embeddings[:, 0], rtol=0, atol=0)
    grid = embeddings[0, 1:].reshape(side, side, 5).double().numpy()
    expected = naive_resample(grid, side, 16, (16 + 0.1) / side)   # DINOv2's scale factor (16 + 0.1) / M
    np.testing.assert_allclose(resampled[0, 1:].reshape(16, 16, 5).numpy(), expected, rtol=1e-4, atol=1e-5)
    to_size = naive_resample(grid, side, 16, 16 / side)   # transformers' own (size=16) is another grid
    assert np.abs(to_size - expected).max() > 1e-3
    assert dinov2.resample_position_embeddings(resampled, 16) is resampled


def test_the_model_uses_the_resampled_embeddings_at_224_pixels():
    model = tiny_dinov2()
    expected = dinov2.resample_position_embeddings(model.embeddings.position_embeddings.detach(), 16)
    detector = dinov2.DINOv2Features(model)
    tokens = torch.zeros(1, 1 + 16 * 16, HIDDEN)
    used = detector.model.embeddings.interpolate_pos_encoding(tokens, 224, 224)
    torch.testing.assert_close(used, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in detector.parameters()) and not detector.training


# ----------------------------------------------------------------------------
# The detector and its files.

def test_tiny_dinov2_gives_the_layer_normed_class_token(files):
    detector = dinov2.load_dinov2(files['dinov2'], 'cpu')
    images = folder_images(files['real'])[:4]
    features = detector(images, return_features=True)
    assert features.shape == (4, HIDDEN) and features.dtype == torch.float32
    model = detector.model
    with torch.no_grad():
        last_block = model(pixel_values=dinov2.preprocess(images), output_hidden_states=True).hidden_states[-1]
        expected = torch.nn.functional.layer_norm(last_block[:, 0], [HIDDEN], model.layernorm.weight,
                                                  model.layernorm.bias, model.config.layer_norm_eps)
    torch.testing.assert_close(features, expected)
    assert features.std(dim=0).min() > 1e-3   # the features depend on the image
    gray = folder_images(files['gray'])
    torch.testing.assert_close(metrics.detector_features(detector, gray),
                               detector(gray.repeat(1, 3, 1, 1)).double(), rtol=0, atol=0)


def test_load_dinov2_errors(tmp_path, files, monkeypatch):
    with pytest.raises(ValueError, match='no such folder'):
        dinov2.load_dinov2(str(tmp_path / 'missing'))
    (tmp_path / 'file.txt').write_text('not a model folder')
    with pytest.raises(ValueError, match='no such folder'):
        dinov2.load_dinov2(str(tmp_path / 'file.txt'))
    incomplete, model = tmp_path / 'incomplete', tiny_dinov2()
    model.config.save_pretrained(str(incomplete))   # a save_pretrained folder without one tensor
    tensors = {name: tensor for name, tensor in model.state_dict().items() if name != 'layernorm.bias'}
    safetensors.torch.save_file(tensors, str(incomplete / 'model.safetensors'), metadata={'format': 'pt'})
    with pytest.raises(ValueError, match='has no weights for 1 parameters'):
        dinov2.load_dinov2(str(incomplete))
    os.remove(incomplete / 'model.safetensors')
    with pytest.raises(ValueError, match='Cannot load the DINOv2 model from folder'):
        dinov2.load_dinov2(str(incomplete))
    monkeypatch.setitem(sys.modules, 'transformers', None)   # as if it were not installed
    with pytest.raises(ValueError, match=r'install it with: pip install -e "\.\[dinov2\]"'):
        dinov2.load_dinov2(files['dinov2'])


def test_refs_of_both_detectors_are_written_together_and_kept_apart(tmp_path, files):
    dest = [tmp_path / 'refs' / 'inception.npz', tmp_path / 'refs' / 'dinov2.npz']
    result = run_fid('ref', f'--data={files["real"]}', '--metrics=fid,fd_dinov2', f'--dest={dest[0]},{dest[1]}',
                     f'--detector={files["inception"]}', f'--dinov2={files["dinov2"]}', '--device=cpu',
                     '--batch=5', '--workers=0')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'refs')) == ['dinov2.npz', 'inception.npz']   # no temporary file left
    with np.load(dest[0]) as inception, np.load(dest[1]) as dino:
        # EDM's layout, plus the custom detectors each was made with (EDM's fid.py reads 'mu' and 'sigma' only)
        assert sorted(inception.files) == ['detector_source', 'mu', 'sigma']
        assert str(inception['detector_source']) == os.path.abspath(files['inception'])
        assert sorted(dino.files) == ['detector', 'detector_source', 'mu', 'sigma'] and str(dino['detector']) == 'dinov2'
        assert str(dino['detector_source']) == os.path.abspath(files['dinov2'])
        assert dino['mu'].shape == (HIDDEN,) and dino['sigma'].dtype == np.float64
    images = folder_images(files['real'])
    mu, sigma = numpy_stats(dinov2.load_dinov2(files['dinov2'])(images))
    np.testing.assert_allclose(metrics.load_ref(str(dest[1]), 'fd_dinov2')[0], mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics.load_ref(str(dest[1]), 'fd_dinov2')[1], sigma, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="holds FD-DINOv2 statistics .* use it as the fd_dinov2 reference"):
        metrics.load_ref(str(dest[1]), 'fid')
    with pytest.raises(ValueError, match=f"holds FID statistics \\(detector '{os.path.abspath(files['inception'])}'\\), "
                                         f"not FD-DINOv2 statistics"):
        metrics.load_ref(str(dest[0]), 'fd_dinov2')

    # A failed write of the second file leaves neither.
    blocked = tmp_path / 'blocked'
    blocked.write_text('a file where a folder should be')
    stats = {'fid': (np.zeros(2), np.eye(2)), 'fd_dinov2': (np.zeros(3), np.eye(3))}
    with pytest.raises(OSError):
        metrics.save_refs({'fid': tmp_path / 'out' / 'a.npz', 'fd_dinov2': blocked / 'b.npz'}, stats)
    assert not (tmp_path / 'out').exists()


@pytest.fixture(scope='module')
def refs(files):
    """Both references of the real images, from one `fid.py ref --metrics=fid,fd_dinov2`."""
    paths = [str(files['root'] / 'refs' / name) for name in ('inception.npz', 'dinov2.npz')]
    result = run_fid('ref', f'--data={files["real"]}', '--metrics=fid,fd_dinov2', f'--dest={",".join(paths)}',
                     f'--detector={files["inception"]}', f'--dinov2={files["dinov2"]}', '--device=cpu',
                     '--workers=0')
    assert result.exit_code == 0, result.output
    return dict(fid=paths[0], fd_dinov2=paths[1])


def test_calc_of_both_metrics_is_zero_for_the_reference_images_and_grows_with_a_shift(files, refs):
    common = ['--metrics=fid,fd_dinov2', f'--ref={refs["fid"]},{refs["fd_dinov2"]}', f'--detector={files["inception"]}',
              f'--dinov2={files["dinov2"]}', '--device=cpu', '--workers=0', '--batch=7']
    same = run_fid('calc', f'--images={files["real"]}', '--num=16', *common)
    assert same.exit_code == 0, same.output
    values = dict(line.split() for line in same.output.strip().splitlines()[-2:])
    assert list(values) == ['fid', 'fd_dinov2'] and all(abs(float(v)) < 1e-6 for v in values.values())

    shifted = run_fid('calc', f'--images={files["fake"]}', '--num=12', *common)
    assert shifted.exit_code == 0, shifted.output
    values = {name: float(value) for name, value in (line.split() for line in shifted.output.strip().splitlines()[-2:])}
    features = dinov2.load_dinov2(files['dinov2'])(folder_images(files['fake']))
    expected = scipy_fid(*numpy_stats(features), *metrics.load_ref(refs['fd_dinov2'], 'fd_dinov2'))
    assert expected > 0.1 and values['fd_dinov2'] == pytest.approx(expected, rel=1e-4)
    assert values['fid'] > 0.1

    alone = run_fid('calc', f'--images={files["fake"]}', '--num=12', '--metrics=fd_dinov2',
                    f'--ref={refs["fd_dinov2"]}', f'--dinov2={files["dinov2"]}', '--device=cpu', '--workers=0')
    assert alone.exit_code == 0, alone.output
    assert float(alone.output.strip().splitlines()[-1]) == pytest.approx(values['fd_dinov2'], rel=1e-6)


class CountingDetector(torch.nn.Module):
    """A detector that counts the images it sees."""

    def __init__(self, detector):
        super().__init__()
        self.detector, self.seen = detector, 0

    def forward(self, images, return_features=True):
        self.seen += images.shape[0]
        return self.detector(images, return_features=True)


def test_both_metrics_read_the_images_once(files, refs, monkeypatch):
    opened = []
    open_folder = metrics.open_image_folder
    monkeypatch.setattr(metrics, 'open_image_folder', lambda *a, **k: opened.append(a) or open_folder(*a, **k))
    detectors = {'fid': CountingDetector(metrics.load_detector(files['inception'])),
                 'fd_dinov2': CountingDetector(dinov2.load_dinov2(files['dinov2']))}
    values = metrics.calculate_metrics(files['fake'], refs, detectors, batch_size=5, num_workers=0, device='cpu')
    assert len(opened) == 1 and detectors['fid'].seen == detectors['fd_dinov2'].seen == 12
    alone = metrics.calculate_metrics(files['fake'], {'fd_dinov2': refs['fd_dinov2']}, {'fd_dinov2': files['dinov2']},
                                      batch_size=12, num_workers=0, device='cpu')
    assert values['fd_dinov2'] == pytest.approx(alone['fd_dinov2'], rel=1e-6)


def test_calc_metrics_for_network_generates_the_images_once(files, refs, monkeypatch):
    calls = []
    generate = generation.generate_images
    monkeypatch.setattr(generation, 'generate_images', lambda *a, **k: calls.append(a) or generate(*a, **k))
    kwargs = dict(num=6, detector=files['inception'], dinov2=files['dinov2'], batch_size=4, device='cpu')
    both = metrics.calc_metrics_for_network(['fid', 'fd_dinov2'], GaussianDenoiser(), refs, **kwargs)
    assert len(calls) == 1 and list(both) == ['fid', 'fd_dinov2']
    one = metrics.calc_metric_for_network('fd_dinov2', GaussianDenoiser(), refs['fd_dinov2'], **kwargs)
    assert one == pytest.approx(both['fd_dinov2'], rel=1e-6) and one > 0
    with pytest.raises(ValueError, match='No reference statistics for fd_dinov2'):
        metrics.calc_metrics_for_network(['fid', 'fd_dinov2'], GaussianDenoiser(), {'fid': refs['fid']}, **kwargs)


# ----------------------------------------------------------------------------
# Bad inputs: one error line, non-zero exit, nothing written.

def fid_case(name, tmp, files, refs):
    """fid.py arguments of one bad-input case, and a part of the expected error line."""
    def calc(metric_names, ref, **flags):
        return ['calc', f'--images={files["fake"]}', '--num=12', '--device=cpu', '--workers=0',
                f'--metrics={metric_names}', f'--ref={ref}', *[f'--{key}={value}' for key, value in flags.items()]]

    def ref(metric_names, dest, **flags):
        return ['ref', f'--data={files["real"]}', '--device=cpu', '--workers=0', f'--metrics={metric_names}',
                f'--dest={dest}', *[f'--{key}={value}' for key, value in flags.items()]]

    out = tmp / 'out' / 'a.npz'
    return {
        'unknown metric': (calc('kid', refs['fid']), 'choose from fid, fd_dinov2'),
        'metric twice': (calc('fid,fid', f'{refs["fid"]},{refs["fid"]}'), 'more than once'),
        'one ref for two metrics': (calc('fid,fd_dinov2', refs['fid']), 'takes one --ref per metric'),
        'dinov2 ref for fid': (calc('fid', refs['fd_dinov2'], detector=files['inception']),
                               'holds FD-DINOv2 statistics'),
        'inception ref for fd_dinov2': (calc('fd_dinov2', refs['fid'], dinov2=files['dinov2']), 'holds FID statistics'),
        'refs swapped': (calc('fid,fd_dinov2', f'{refs["fd_dinov2"]},{refs["fid"]}'), 'holds FD-DINOv2 statistics'),
        'missing model folder': (calc('fd_dinov2', refs['fd_dinov2'], dinov2=tmp / 'no-model'), 'no such folder'),
        'dinov2 without fd_dinov2': (calc('fid', refs['fid'], dinov2=files['dinov2']),
                                     '--dinov2 is the detector of --metrics=fd_dinov2'),
        'detector without fid': (calc('fd_dinov2', refs['fd_dinov2'], detector=files['inception']),
                                 '--detector is the detector of'),
        'one dest for two metrics': (ref('fid,fd_dinov2', out), 'takes one --dest per metric'),
        'same dest twice': (ref('fid,fd_dinov2', f'{out},{out}'), 'names one file twice'),
        'no transformers': (ref('fd_dinov2', out, dinov2=files['dinov2']), 'pip install -e ".[dinov2]"'),
    }[name]


FID_CASES = ['unknown metric', 'metric twice', 'one ref for two metrics', 'dinov2 ref for fid',
             'inception ref for fd_dinov2', 'refs swapped', 'missing model folder', 'dinov2 without fd_dinov2',
             'detector without fid', 'one dest for two metrics', 'same dest twice', 'no transformers']


@pytest.mark.parametrize('name', FID_CASES)
def test_fid_py_bad_input_is_one_error_line_and_writes_nothing(name, tmp_path, files, refs, monkeypatch):
    args, needle = fid_case(name, tmp_path, files, refs)
    if name == 'no transformers':
        monkeypatch.setitem(sys.modules, 'transformers', None)
    before = files_under(tmp_path)
    assert_one_error_line(run_fid(*args), needle)
    assert files_under(tmp_path) == before


def test_an_id_missing_from_the_offline_hub_cache_is_one_line(tmp_path, files, refs, repo_root, subprocess_env):
    env = dict(subprocess_env, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'))
    command = [sys.executable, 'fid.py', 'calc', f'--images={files["fake"]}', '--num=12', '--metrics=fd_dinov2',
               f'--ref={refs["fd_dinov2"]}', '--device=cpu', '--workers=0']   # the default facebook/dinov2-large
    proc = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and 'Cannot load the DINOv2 model from Hub id facebook/dinov2-large' in errors[0]
    assert '--dinov2=DIR' in errors[0] and 'Traceback' not in proc.stderr


# ----------------------------------------------------------------------------
# During training.

TRAIN_FLAGS = ['--arch=ddpmpp', '--cbase=8', '--cres=1,2', '--blocks=1', '--attn=none', '--workers=0', '--device=cpu',
               '--batch=4', '--duration=0.00002', '--tick=0.01', '--snap=1', '--samples=0', '--augment=0', '--seed=0',
               '--metric-num=6']


@pytest.fixture(scope='module')
def shapes(files):
    path = str(files['root'] / 'shapes-32x32.zip')
    convert_dataset('demo:shapes:8', path, resolution=(32, 32))
    return path


@pytest.fixture
def tiny_inception(files, monkeypatch):
    """train.py has no flag for FID's detector: the default becomes the tiny stand-in."""
    monkeypatch.setattr(metrics, 'DEFAULT_DETECTOR_URL', files['inception'])
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    yield
    metrics._cached_detector.cache_clear()   # no later test gets the stand-in as the default


def test_train_py_writes_fid_and_fd_dinov2_at_each_snapshot(tmp_path, files, refs, shapes, tiny_inception,
                                                            monkeypatch):
    """Both metrics at every snapshot, from one set of generated images."""
    calls = []
    real_generate = generation.generate_images
    monkeypatch.setattr(generation, 'generate_images', lambda *args, **kwargs: calls.append(1) or
                        real_generate(*args, **kwargs))
    metric_flags = ['--metrics=fid,fd_dinov2', f'--metric-ref={refs["fid"]},{refs["fd_dinov2"]}',
                    f'--metric-dinov2={files["dinov2"]}']
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path}', f'--data={shapes}', '--nosubdir', *TRAIN_FLAGS,
                                             *metric_flags])
    assert result.exit_code == 0, result.output
    options = json.loads((tmp_path / 'training_options.json').read_text())
    assert options['metrics'] == ['fid', 'fd_dinov2']
    assert options['metric_kwargs'] == dict(ref=refs, num=6, dinov2=files['dinov2'])
    assert list(tmp_path.glob('network-snapshot-*.pkl'))
    for metric in ('fid', 'fd_dinov2'):
        lines = [json.loads(line) for line in (tmp_path / f'metric-{metric}.jsonl').read_text().splitlines()]
        assert len(lines) >= 2   # tick 0 and the final tick, at least
        for line in lines:
            assert line['metric'] == metric and math.isfinite(line['results']) and line['results'] > 0
    snapshots_written = len(lines)
    assert len(calls) == snapshots_written   # one pass of generation per snapshot, not one per metric


def train_case(name, tmp, files, refs, shapes):
    """train.py arguments of one bad-input case, and a part of the expected error line."""
    base = [f'--outdir={tmp / "runs"}', f'--data={shapes}', *TRAIN_FLAGS]
    return {
        'unknown metric': (base + ['--metrics=fid,kid', f'--metric-ref={refs["fid"]},{refs["fid"]}'], 'kid'),
        'no metric ref': (base + ['--metrics=fd_dinov2'], '--metrics=fd_dinov2 needs --metric-ref'),
        'one ref for two metrics': (base + ['--metrics=fid,fd_dinov2', f'--metric-ref={refs["fid"]}'],
                                    'takes one --metric-ref per metric'),
        'refs swapped': (base + ['--metrics=fid,fd_dinov2', f'--metric-ref={refs["fd_dinov2"]},{refs["fid"]}'],
                         '--metric-ref: '),
        'dinov2 without fd_dinov2': (base + [f'--metric-dinov2={files["dinov2"]}'], '--metric-dinov2 is the model'),
        'missing model folder': (base + ['--metrics=fd_dinov2', f'--metric-ref={refs["fd_dinov2"]}',
                                         f'--metric-dinov2={tmp / "no-model"}'], '--metric-dinov2: DINOv2 model'),
    }[name]


@pytest.mark.parametrize('name', ['unknown metric', 'no metric ref', 'one ref for two metrics', 'refs swapped',
                                  'dinov2 without fd_dinov2', 'missing model folder'])
def test_train_py_bad_metric_flags_are_one_error_line_and_write_nothing(name, tmp_path, files, refs, shapes,
                                                                        tiny_inception):
    args, needle = train_case(name, tmp_path, files, refs, shapes)
    before = files_under(tmp_path)
    assert_one_error_line(CliRunner().invoke(train.main, args), needle)
    assert files_under(tmp_path) == before
