"""Tests of training/augment.py: EDM's non-leaking augmentation pipeline."""

import math
import pickle

import numpy as np
import pytest
import torch

from training import augment
from training.augment import EDM_AUGMENT_KWARGS, LABEL_WIDTHS, AugmentPipe

ALL_ON = {name: 1 for name in LABEL_WIDTHS}


def _images(n, c, res, seed=0, dtype=torch.float32):
    """Random images [n, c, res, res] from a private generator."""
    return torch.randn([n, c, res, res], generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _blob(n, res, centre, sigma=1.5):
    """n copies of a Gaussian blob [n, 1, res, res] at `centre` (x, y), pixels from the image centre."""
    y, x = torch.meshgrid(torch.arange(res, dtype=torch.float64), torch.arange(res, dtype=torch.float64),
                          indexing='ij')
    c = (res - 1) / 2
    blob = torch.exp(-((x - c - centre[0]) ** 2 + (y - c - centre[1]) ** 2) / (2 * sigma ** 2))
    return blob.to(torch.float32).expand(n, 1, res, res).clone()


def _centroids(images):
    """Intensity centroids [n, 2] (x, y) of images [n, 1, H, W], pixels from the image centre."""
    _, _, H, W = images.shape
    w = images[:, 0].clamp(min=0).double()
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float64) - (H - 1) / 2,
                          torch.arange(W, dtype=torch.float64) - (W - 1) / 2, indexing='ij')
    total = w.sum(dim=(1, 2))
    return torch.stack([(w * x).sum(dim=(1, 2)) / total, (w * y).sum(dim=(1, 2)) / total], dim=1)


@pytest.mark.parametrize('kwargs, label_dim', [(EDM_AUGMENT_KWARGS, 9), (ALL_ON, 19), ({}, 0)])
@pytest.mark.parametrize('channels, res, dtype', [(3, 8, torch.float32), (1, 8, torch.float32),
                                                  (3, 12, torch.float64), (1, 16, torch.float32)])
def test_shapes_dtypes_and_label_dim(kwargs, label_dim, channels, res, dtype):
    pipe = AugmentPipe(p=1, **kwargs)
    images = _images(5, channels, res, dtype=dtype)
    out, labels = pipe(images)
    assert pipe.label_dim == label_dim
    assert out.shape == images.shape and out.dtype == dtype
    assert labels.shape == (5, label_dim) and labels.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(labels).all()


def test_p0_is_identity_with_zero_labels():
    pipe = AugmentPipe(p=0, **ALL_ON)
    images = _images(6, 3, 16)
    out, labels = pipe(images)
    assert torch.equal(out, images)
    assert labels.shape == (6, 19) and not labels.any()


def test_xflip_flips_exactly_where_the_label_says():
    torch.manual_seed(1)
    images = _images(32, 3, 8)
    out, labels = AugmentPipe(p=1, xflip=1)(images)
    flipped = labels[:, 0] == 1
    assert labels.shape == (32, 1) and set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(out[flipped], images[flipped].flip(3))
    assert torch.equal(out[~flipped], images[~flipped])


def test_rotate_int_is_exact_and_labelled():
    torch.manual_seed(2)
    images = torch.arange(64 * 3 * 8 * 8, dtype=torch.float32).reshape(64, 3, 8, 8)
    out, labels = AugmentPipe(p=1, rotate_int=1)(images)
    # EDM's encoding: (x flipped, y flipped) before the transpose of k quarter turns.
    k = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}
    turns = torch.tensor([k[tuple(int(v) for v in row)] for row in labels])
    assert set(turns.tolist()) == {0, 1, 2, 3}
    for n in range(64):
        assert torch.equal(out[n], torch.rot90(images[n], int(turns[n]), dims=(1, 2)))
    one = turns == 1
    assert torch.equal(out[one, :, 0, 0], images[one, :, 0, 7])   # top-right pixel moves to the top-left
    assert torch.equal(out[one, :, 7, 0], images[one, :, 0, 0])   # top-left moves to the bottom-left


def test_translate_int_matches_a_naive_loop():
    torch.manual_seed(3)
    N, C, R = 6, 2, 8
    images = _images(N, C, R)
    pipe = AugmentPipe(p=1, translate_int=1, translate_int_max=0.5)
    out, labels = pipe(images)
    shifts = (labels * R * 0.5).round().to(torch.int64)
    assert shifts.abs().max() > 0

    def reflect(i):
        i = i % (2 * R - 2)
        return i if i < R else 2 * R - 2 - i

    expected = torch.empty_like(images)
    for n in range(N):
        tx, ty = shifts[n].tolist()
        for y in range(R):
            for x in range(R):
                expected[n, :, y, x] = images[n, :, reflect(y + ty), reflect(x - tx)]
    assert torch.equal(out, expected)


def test_resample_identity_integer_shift_and_quarter_turn():
    H = 32
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(H, dtype=torch.float32), indexing='ij')
    smooth = (torch.sin(2 * math.pi * (x + 0.5 * y) / H))[None, None].repeat(2, 3, 1, 1)
    noise = _images(2, 3, H)
    assert torch.allclose(augment.resample(noise, torch.eye(3).repeat(2, 1, 1)), noise, atol=1e-4)
    shifted = augment.resample(noise, augment.translate2d(torch.ones(2), torch.zeros(2)))  # samples x + 1
    assert torch.allclose(shifted[..., :-1], noise[..., 1:], atol=1e-4)
    turned = augment.resample(smooth, augment.rotate2d(torch.full([2], math.pi / 2)))     # samples R(90) p
    assert (turned - torch.rot90(smooth, 1, dims=(2, 3))).abs().max() < 0.05
    constant = torch.full([2, 1, 16, 16], 0.7)
    zoomed_out = augment.resample(constant, augment.scale2d(torch.full([2], 1.5), torch.full([2], 1.5)))
    assert torch.allclose(zoomed_out, constant, atol=1e-3)   # reflect padding, unit DC gain


def _expected_scale(labels, p, pipe):
    s = 2 ** (labels[:, 0] * pipe.scale_std)
    return p * s[:, None]


def _expected_rotate(labels, p, pipe):
    w = torch.atan2(labels[:, 1], labels[:, 0] + 1)
    c, s = torch.cos(-w), torch.sin(-w)                          # the image turns by -w
    return torch.stack([c * p[0] - s * p[1], s * p[0] + c * p[1]], dim=1)


def _expected_translate(labels, p, pipe):
    return p + labels * 32 * pipe.translate_frac_std


@pytest.mark.parametrize('name, expected', [('scale', _expected_scale), ('rotate_frac', _expected_rotate),
                                            ('translate_frac', _expected_translate)])
def test_geometric_labels_describe_the_motion(name, expected):
    torch.manual_seed(4)
    start = torch.tensor([6.0, -3.0], dtype=torch.float64)
    pipe = AugmentPipe(p=1, translate_frac_std=0.05, **{name: 1})
    out, labels = pipe(_blob(8, 32, start.tolist()))
    assert labels.abs().min() > 0
    predicted = expected(labels.double(), start, pipe)
    assert (_centroids(out) - predicted).abs().max() < 0.3


def test_brightness_shifts_and_keeps_geometry():
    torch.manual_seed(5)
    images = _images(16, 3, 8)
    out, labels = AugmentPipe(p=1, brightness=1, brightness_std=0.2)(images)
    shift = out - images
    assert torch.allclose(shift, (labels[:, 0] * 0.2)[:, None, None, None].expand_as(shift), atol=1e-6)
    assert labels[:, 0].abs().min() > 0


@pytest.mark.parametrize('channels', [1, 3])
def test_brightness_then_contrast(channels):
    torch.manual_seed(6)
    images = _images(8, channels, 8)
    out, labels = AugmentPipe(p=1, brightness=1, contrast=1)(images)
    b = (labels[:, 0] * 0.2)[:, None, None, None]
    c = (2 ** (labels[:, 1] * 0.5))[:, None, None, None]
    assert torch.allclose(out, c * (images + b), atol=1e-5)


def test_hue_and_saturation_keep_luma_and_lumaflip_negates_it():
    torch.manual_seed(7)
    images = _images(8, 3, 8)
    out, _ = AugmentPipe(p=1, hue=1, saturation=1)(images)
    assert torch.allclose(out.mean(dim=1), images.mean(dim=1), atol=1e-5)
    assert not torch.allclose(out, images, atol=1e-2)
    out, labels = AugmentPipe(p=1, lumaflip=1)(images)
    sign = 1 - 2 * labels[:, 0]
    assert set(sign.tolist()) == {-1.0, 1.0}
    assert torch.allclose(out.mean(dim=1), sign[:, None, None] * images.mean(dim=1), atol=1e-5)


def test_grey_images_are_unchanged_by_hue_and_saturation():
    torch.manual_seed(8)
    images = _images(8, 1, 8)
    out, labels = AugmentPipe(p=1, hue=1, saturation=1)(images)
    assert labels.abs().min() > 0
    assert torch.allclose(out, images, atol=1e-5)


def test_deterministic_under_manual_seed():
    pipe = AugmentPipe(p=0.5, **ALL_ON)
    images = _images(8, 3, 16)
    torch.manual_seed(9)
    out_a, labels_a = pipe(images)
    torch.manual_seed(9)
    out_b, labels_b = pipe(images)
    torch.manual_seed(10)
    out_c, labels_c = pipe(images)
    assert torch.equal(out_a, out_b) and torch.equal(labels_a, labels_b)
    assert not torch.equal(labels_a, labels_c) and not torch.equal(out_a, out_c)


def test_labels_are_zero_exactly_where_nothing_was_applied():
    torch.manual_seed(11)
    images = _images(64, 3, 8)
    out, labels = AugmentPipe(p=0.05, **ALL_ON)(images)
    untouched = (labels == 0).all(dim=1)
    assert 0 < untouched.sum() < 64
    assert torch.equal(out[untouched], images[untouched])
    changed = (out != images).flatten(1).any(dim=1)
    assert changed[~untouched].all()


@pytest.mark.parametrize('name', ['scale', 'rotate_frac', 'aniso', 'translate_frac', 'brightness', 'hue'])
def test_per_transform_labels_zero_where_it_did_not_fire(name):
    torch.manual_seed(12)
    images = _images(32, 3, 8)
    out, labels = AugmentPipe(p=0.5, **{name: 1})(images)
    fired = (labels != 0).any(dim=1)
    assert 0 < fired.sum() < 32
    assert torch.equal(out[~fired], images[~fired])
    assert (out[fired] != images[fired]).flatten(1).any(dim=1).all()


def test_pickle_round_trip_keeps_configuration_and_behaviour():
    pipe = AugmentPipe(p=0.3, **EDM_AUGMENT_KWARGS)
    clone = pickle.loads(pickle.dumps(pipe))
    assert clone.init_kwargs == pipe.init_kwargs and clone.label_dim == 9
    images = _images(4, 3, 8)
    torch.manual_seed(13)
    expected = pipe(images)
    torch.manual_seed(13)
    got = clone(images)
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_geometric_only_accepts_any_channel_count():
    out, labels = AugmentPipe(p=1, **EDM_AUGMENT_KWARGS)(_images(2, 4, 8))
    assert out.shape == (2, 4, 8, 8) and labels.shape == (2, 9)


@pytest.mark.parametrize('kwargs, images, message', [
    (dict(rotate_int=1), torch.zeros(1, 3, 8, 16), 'square'),
    (dict(hue=1), torch.zeros(1, 4, 8, 8), '1 or 3 channels'),
    (dict(xflip=1), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 'float images'),
    (dict(xflip=1), torch.zeros(3, 8, 8), 'float images'),
])
def test_unsupported_inputs_raise_value_error(kwargs, images, message):
    with pytest.raises(ValueError, match=message):
        AugmentPipe(**kwargs)(images)


def test_negative_settings_raise_value_error():
    with pytest.raises(ValueError, match='p=-0.1'):
        AugmentPipe(p=-0.1)


def test_sym6_is_an_orthonormal_lowpass():
    h = np.asarray(augment.SYM6)
    assert len(h) == 12 and h.sum() == pytest.approx(math.sqrt(2), abs=1e-12)
    autocorrelation = [np.dot(h[:len(h) - 2 * m], h[2 * m:]) for m in range(6)]
    assert autocorrelation == pytest.approx([1, 0, 0, 0, 0, 0], abs=1e-9)
