"""Tests of training/sampling.py: the samplers on an analytic Gaussian
denoiser, the discretisations, per-seed determinism, the three network call
conventions, guidance, sampling a region of the coordinate frame (against a
naive re-implementation of the official generate.py), network pickles and
image grids."""

import itertools
import math
import pickle
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from training import denoiser, generation, image_io, samplers, snapshots
from training.patching import full_grid, patch_grid

FIXTURES = 'tests/fixtures'


class GaussianDenoiser:
    """The exact denoiser of data ~ N(mu, s^2 I): D(x; sigma) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2)."""

    def __init__(self, mu=0.3, s=0.5, sigma_min=0, sigma_max=float('inf')):
        self.mu, self.s = mu, s
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.calls = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma):
        self.calls.append((x.dtype, float(sigma)))
        return (self.s ** 2 * x + sigma ** 2 * self.mu) / (self.s ** 2 + sigma ** 2)

    def ode_endpoint(self, z, sigma_0):
        """Exact probability-flow ODE solution at sigma = 0 from x = sigma_0 z."""
        return self.mu + (sigma_0 * z.double() - self.mu) * self.s / math.sqrt(self.s ** 2 + sigma_0 ** 2)


def _normal(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------
# EDM sampler.


def test_edm_sampler_reproduces_gaussian_statistics():
    denoise = GaussianDenoiser(mu=0.3, s=0.5)
    x = samplers.edm_sampler(denoise, _normal([20000, 1, 1, 1]), num_steps=32)
    assert x.dtype == torch.float64
    assert abs(x.mean().item() - 0.3) < 0.015
    assert abs(x.var().item() / 0.25 - 1) < 0.05


def test_heun_beats_euler_and_converges_to_the_exact_ode_solution():
    denoise = GaussianDenoiser()
    z = _normal([512, 1, 1, 1])
    exact = denoise.ode_endpoint(z, 80)
    heun_error = (samplers.edm_sampler(denoise, z, num_steps=18) - exact).abs().max()
    euler_error = (samplers.ablation_sampler(denoise, z, num_steps=18, solver='euler') - exact).abs().max()
    assert heun_error < euler_error / 2
    assert (samplers.edm_sampler(denoise, z, num_steps=128) - exact).abs().max() < 2e-3


def test_edm_sampler_time_steps_and_calls():
    """2N - 1 float64 calls at t_0, t_1, t_1, t_2, t_2, ..., t_{N-1}: Heun without the last
    correction; the steps follow Eq. 5 inside the network's range."""
    num_steps, rho = 6, 7
    denoise = GaussianDenoiser(sigma_min=0.01, sigma_max=50)
    samplers.edm_sampler(denoise, _normal([2, 1, 1, 1]), num_steps=num_steps, sigma_min=0.002, sigma_max=80, rho=rho)
    lo, hi = 0.01, 50   # clamped to the denoiser's range
    t = [(hi ** (1 / rho) + i / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for i in range(num_steps)]
    expected = [t[0]] + [s for s in t[1:] for _ in range(2)]
    assert [dtype for dtype, _ in denoise.calls] == [torch.float64] * (2 * num_steps - 1)
    np.testing.assert_allclose([sigma for _, sigma in denoise.calls], expected, rtol=1e-12)


def test_edm_sampler_uses_round_sigma():
    denoise = GaussianDenoiser()
    denoise.round_sigma = lambda sigma: torch.as_tensor(sigma).round(decimals=1)
    samplers.edm_sampler(denoise, _normal([1, 1, 1, 1]), num_steps=5)
    assert all(abs(sigma * 10 - round(sigma * 10)) < 1e-9 for _, sigma in denoise.calls)


@pytest.mark.parametrize('S_churn, expected_gamma', [(2.0, 0.4), (100.0, math.sqrt(2) - 1)])
def test_churn_raises_the_noise_level_inside_S_min_S_max(S_churn, expected_gamma):
    num_steps = 5
    denoise = GaussianDenoiser()
    samplers.edm_sampler(denoise, _normal([2, 1, 1, 1]), num_steps=num_steps, S_churn=S_churn, S_min=1, S_max=20)
    t = samplers.edm_sigma_steps(num_steps, 0.002, 80).tolist()
    euler_sigmas = [sigma for _, sigma in denoise.calls[0::2]]
    for t_cur, t_hat in zip(t, euler_sigmas):
        gamma = expected_gamma if 1 <= t_cur <= 20 else 0
        assert t_hat == pytest.approx(t_cur * (1 + gamma), rel=1e-12)
    assert any(1 <= s <= 20 for s in t) and any(not 1 <= s <= 20 for s in t)


def test_churn_noise_comes_from_randn_like():
    denoise = GaussianDenoiser()
    z = _normal([4, 1, 2, 2])
    common = dict(num_steps=8, S_churn=20)
    a = samplers.edm_sampler(denoise, z, lambda x: torch.zeros_like(x), **common)
    b = samplers.edm_sampler(denoise, z, lambda x: torch.ones_like(x), **common)
    c = samplers.edm_sampler(denoise, z, lambda x: torch.ones_like(x), **{**common, 'S_churn': 0})
    assert not torch.allclose(a, b)
    assert torch.equal(c, samplers.edm_sampler(denoise, z, lambda x: torch.zeros_like(x), num_steps=8))


def test_single_step_is_one_denoiser_call_at_sigma_max():
    denoise = GaussianDenoiser()
    z = _normal([3, 1, 1, 1])
    x = samplers.edm_sampler(denoise, z, num_steps=1)
    assert [sigma for _, sigma in denoise.calls] == [80]
    torch.testing.assert_close(x, denoise(z.double() * 80, torch.tensor(80.0, dtype=torch.float64)))


@pytest.mark.parametrize('kwargs', [dict(num_steps=0), dict(sigma_min=5, sigma_max=1), dict(rho=0),
                                    dict(sigma_min=100), dict(S_churn=-1)])
def test_bad_sampler_settings_raise(kwargs):
    with pytest.raises(ValueError):
        samplers.edm_sampler(GaussianDenoiser(sigma_max=80), _normal([1, 1, 1, 1]), **kwargs)


# ----------------------------------------------------------------------------
# Ablation sampler.


def test_ablation_defaults_are_the_edm_sampler():
    denoise = GaussianDenoiser()
    z = _normal([64, 1, 2, 2])
    edm = samplers.edm_sampler(denoise, z, num_steps=10, S_churn=5, randn_like=lambda x: torch.ones_like(x))
    ablation = samplers.ablation_sampler(denoise, z, num_steps=10, S_churn=5, randn_like=lambda x: torch.ones_like(x))
    torch.testing.assert_close(edm, ablation, rtol=1e-10, atol=1e-10)


def _iddpm_levels_naive(M=1000, C_1=0.001, C_2=0.008):
    abar = lambda j: math.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    u = [0.0] * (M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = math.sqrt((u[j] ** 2 + 1) / max(abar(j - 1) / abar(j), C_1) - 1)
    return np.array(u)


def test_discretisations_follow_their_formulas():
    n, lo, hi = 12, 0.01, 60.0
    steps = {d: samplers.ablation_sigma_steps(d, n, lo, hi, epsilon_s=1e-3).numpy() for d in samplers.DISCRETIZATIONS}
    for d, sigma in steps.items():
        assert sigma.dtype == np.float64 and sigma.shape == (n,), d
        assert np.all(np.diff(sigma) < 0), d
    i = np.arange(n) / (n - 1)

    np.testing.assert_allclose(steps['edm'], (hi ** (1 / 7) + i * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, rtol=1e-12)
    np.testing.assert_allclose(steps['ve'], hi * (lo / hi) ** i, rtol=1e-12)

    # VP: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) through (eps_s, lo) and (1, hi).
    eps = 1e-3
    beta_d = 2 * (math.log(lo ** 2 + 1) / eps - math.log(hi ** 2 + 1)) / (eps - 1)
    beta_min = math.log(hi ** 2 + 1) - beta_d / 2
    t = 1 + i * (eps - 1)
    np.testing.assert_allclose(steps['vp'], np.sqrt(np.exp(beta_d * t ** 2 / 2 + beta_min * t) - 1), rtol=1e-10)
    np.testing.assert_allclose(steps['vp'][[0, -1]], [hi, lo], rtol=1e-10)

    # iDDPM: levels of the u_j table inside [lo, hi], from the largest to the smallest
    # (EDM's float32 ratios put the table within 1e-4 of the float64 definition).
    u = _iddpm_levels_naive()
    inside = u[(u >= lo) & (u <= hi)]
    np.testing.assert_allclose(steps['iddpm'][[0, -1]], [inside.max(), inside.min()], rtol=1e-3)
    assert all(np.min(np.abs(inside / s - 1)) < 1e-3 for s in steps['iddpm'])


def test_iddpm_table_matches_the_definition():
    table = samplers.iddpm_noise_levels().numpy()
    np.testing.assert_allclose(table[:-1], _iddpm_levels_naive()[:-1], rtol=1e-3)
    assert table[-1] == 0 and np.all(np.diff(table) < 0)


def test_default_noise_ranges_are_edms():
    assert samplers.default_noise_range('edm') == (0.002, 80)
    assert samplers.default_noise_range('ve') == (0.02, 100)
    assert samplers.default_noise_range('iddpm') == (0.002, 81)
    vp = lambda t: math.sqrt(math.exp(0.5 * 19.9 * t ** 2 + 0.1 * t) - 1)   # NVlabs/edm generate.py's VP default (beta_d 19.9)
    np.testing.assert_allclose(samplers.default_noise_range('vp', 1e-3), (vp(1e-3), vp(1)), rtol=1e-12)


@pytest.mark.parametrize('solver, discretization, schedule, scaling',
                         list(itertools.product(samplers.SOLVERS, samplers.DISCRETIZATIONS, samplers.SCHEDULES,
                                                samplers.SCALINGS)))
def test_every_ablation_combination_runs_and_converges(solver, discretization, schedule, scaling):
    denoise = GaussianDenoiser()
    z = _normal([64, 1, 1, 1])
    settings = dict(solver=solver, discretization=discretization, schedule=schedule, scaling=scaling)
    sigma_0 = samplers.ablation_sigma_steps(discretization, 2, *samplers.default_noise_range(discretization))[0]
    exact = denoise.ode_endpoint(z, sigma_0.item())
    coarse = (samplers.ablation_sampler(denoise, z, num_steps=20, **settings) - exact).abs().max()
    fine = (samplers.ablation_sampler(denoise, z, num_steps=80, **settings) - exact).abs().max()
    assert torch.isfinite(fine) and fine < coarse / 2
    churned = samplers.ablation_sampler(denoise, z, num_steps=6, S_churn=10, alpha=0.5, **settings)
    assert torch.isfinite(churned).all()


def test_select_sampler_follows_edm():
    assert samplers.select_sampler(num_steps=5, solver=None)[0] is samplers.edm_sampler
    sampler, kwargs = samplers.select_sampler(num_steps=5, scaling='vp', sigma_min=None)
    assert sampler is samplers.ablation_sampler and kwargs == dict(num_steps=5, scaling='vp')
    for bad in (dict(steps=5), dict(solver='rk4'), dict(alpha=2.0, solver='heun'), dict(sigma_min=100)):
        with pytest.raises(ValueError):
            samplers.select_sampler(**bad)


# ----------------------------------------------------------------------------
# Randomness and seed splitting.


def test_stacked_generator_rows_depend_only_on_their_seed():
    both = generation.StackedRandomGenerator('cpu', [3, 5])
    alone = generation.StackedRandomGenerator('cpu', [5])
    assert torch.equal(both.randn([2, 4])[1], alone.randn([1, 4])[0])
    assert torch.equal(both.randint(10, size=[2, 6])[1], alone.randint(10, size=[1, 6])[0])
    assert torch.equal(generation.StackedRandomGenerator('cpu', [5 + (1 << 32)]).randn([1, 3]),
                       generation.StackedRandomGenerator('cpu', [5]).randn([1, 3]))
    like = both.randn_like(torch.zeros(2, 3, dtype=torch.float64))
    assert like.dtype == torch.float64 and like.shape == (2, 3)


def test_rank_batches_split_as_edm():
    seeds = list(range(10))
    assert generation.rank_batches(seeds, 3, 0, 2) == [[0, 1, 2], [6, 7]]
    assert generation.rank_batches(seeds, 3, 1, 2) == [[3, 4, 5], [8, 9]]
    assert generation.rank_batches(seeds, 4) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert generation.rank_batches([7], 4, 1, 2) == []


def test_parse_int_list():
    """One parser of '1,2,5-10' for --seeds, --cres and --attn ('' and 'none' = no entries, for --attn=none)."""
    assert dnnlib.util.parse_int_list('1,2,5-10') == [1, 2, 5, 6, 7, 8, 9, 10]
    assert dnnlib.util.parse_int_list('0-3') == [0, 1, 2, 3]
    assert dnnlib.util.parse_int_list('') == dnnlib.util.parse_int_list('None') == []
    assert dnnlib.util.parse_int_list([1, 2]) == [1, 2]
    for bad in ('a', '5-3', '1,,2', '-3', '1-2-3', '1.5'):
        with pytest.raises(ValueError):
            dnnlib.util.parse_int_list(bad)


# ----------------------------------------------------------------------------
# Call conventions and guidance, on recording networks.


class _Recorder(torch.nn.Module):
    """Base of the spy networks: D = 0.9 x + 0.1 * (label sum), records its calls."""

    def __init__(self, img_channels, label_dim=0, img_resolution=4):
        super().__init__()
        self.img_channels, self.label_dim, self.img_resolution = img_channels, label_dim, img_resolution
        self.sigma_min, self.sigma_max = 0, float('inf')
        self.calls = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _output(self, x, class_labels):
        labels = 0 if class_labels is None else class_labels.sum(dim=1).reshape(-1, 1, 1, 1)
        return 0.9 * x + 0.1 * labels + 0.01 * torch.arange(x.shape[0]).reshape(-1, 1, 1, 1)


class OursSpy(_Recorder):
    def __init__(self, use_pos, **kwargs):
        super().__init__(**kwargs)
        self.use_pos = use_pos

    def forward(self, x, sigma, pos=None, class_labels=None, force_fp32=False, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, pos=pos, class_labels=class_labels))
        return self._output(x, class_labels)


class OfficialSpy(_Recorder):
    def forward(self, x, sigma, x_pos=None, class_labels=None, force_fp32=False, **model_kwargs):
        self.calls.append(dict(x=x, sigma=sigma, pos=x_pos, class_labels=class_labels))
        return self._output(x, class_labels)


class EDMSpy(_Recorder):
    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        self.calls.append(dict(x=x, sigma=sigma, class_labels=class_labels))
        return self._output(x, class_labels)


@pytest.mark.parametrize('net, convention, channels, coordinates', [
    (OursSpy(use_pos=True, img_channels=3), 'ours', 3, True),
    (OursSpy(use_pos=False, img_channels=1), 'ours', 1, False),
    (OfficialSpy(img_channels=5), 'official', 3, True),
    (EDMSpy(img_channels=3), 'edm', 3, False),
])
def test_denoiser_calls_each_convention_with_its_arguments(net, convention, channels, coordinates):
    info = denoiser.network_info(net)
    assert (info.convention, info.img_channels, info.coordinates) == (convention, channels, coordinates)
    x = _normal([2, channels, 4, 4]).double()
    out = denoiser.make_denoiser(net)(x, torch.tensor(1.5, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape
    (call,) = net.calls
    assert call['x'].dtype == torch.float32 and call['sigma'].dtype == torch.float32
    assert float(call['sigma']) == 1.5
    if convention == 'edm':
        assert 'pos' not in call
    elif coordinates:
        assert torch.equal(call['pos'], full_grid(4, 2))
        torch.testing.assert_close(call['pos'][0, 0, 0], torch.tensor([-1, -1 / 3, 1 / 3, 1]))   # x: along columns
        torch.testing.assert_close(call['pos'][0, 1, :, 0], torch.tensor([-1, -1 / 3, 1 / 3, 1]))  # y: along rows
    else:
        assert call['pos'] is None


def _official_spy(img_channels, out_channels, **kwargs):
    net = OfficialSpy(img_channels=img_channels, **kwargs)
    net.out_channels = out_channels
    return net


def test_official_coordinate_channels_are_detected():
    """img_channels - out_channels: 0 no coordinates, 2 the grid, 4 n the --embed_fq=n embedding; else refused."""
    for extra, coordinates, embed_fq in ((0, False, 0), (2, True, 0), (4, True, 1), (12, True, 3)):
        info = denoiser.network_info(_official_spy(3 + extra, 3))
        assert (info.img_channels, info.coordinates, info.embed_fq) == (3, coordinates, embed_fq)
    for img_channels in (6, 2, 9):
        with pytest.raises(ValueError, match='neither the'):
            denoiser.network_info(_official_spy(img_channels, 3))


def test_unknown_call_convention_is_rejected():
    class Odd(_Recorder):
        def forward(self, x, sigma, labels):
            return x
    with pytest.raises(ValueError, match='Cannot tell how to call'):
        denoiser.network_info(Odd(img_channels=3))


def test_guidance():
    x = _normal([3, 2, 4, 4]).double()
    sigma = torch.tensor(2.0, dtype=torch.float64)
    labels = torch.eye(4)[[0, 2, 3]] * 3
    net = EDMSpy(img_channels=2, label_dim=4)
    conditional = denoiser.make_denoiser(net, labels, guidance=1)(x, sigma)
    assert len(net.calls) == 1 and torch.equal(net.calls[0]['class_labels'], labels)
    net.calls.clear()
    unconditional = denoiser.make_denoiser(net, torch.zeros_like(labels))(x, sigma)
    guided = denoiser.make_denoiser(net, labels, guidance=1.5)(x, sigma)
    assert len(net.calls) == 3 and not net.calls[2]['class_labels'].any()
    torch.testing.assert_close(guided, unconditional + 1.5 * (conditional - unconditional))
    assert not torch.allclose(guided, conditional)
    with pytest.raises(ValueError, match='class-conditional'):
        denoiser.make_denoiser(EDMSpy(img_channels=2), None, guidance=2)


# ----------------------------------------------------------------------------
# Network pickles (module sources embedded, the defining modules never imported here).


@pytest.fixture(scope='module')
def foreign_pickles(tmp_path_factory, repo_root):
    """Snapshot pickles of the test-only networks (tests/fixtures/write_snapshots.py), written
    by a subprocess so that this process loads them from their embedded module sources."""
    folder = tmp_path_factory.mktemp('snapshots')
    env = dict(PYTHONPATH=f'{repo_root}:{repo_root / FIXTURES}', OMP_NUM_THREADS='1', PATH='/usr/bin:/bin')
    subprocess.run([sys.executable, f'{FIXTURES}/write_snapshots.py', str(folder)], check=True, env=env, cwd=repo_root)
    return dict(edm=folder / 'edm_cond.pkl', official=folder / 'official.pkl',
                official_embed=folder / 'official_embed.pkl', official_nopos=folder / 'official_nopos.pkl')


@pytest.mark.parametrize('kind, module, convention, label_dim', [
    ('edm', 'edm_style_net', 'edm', 3), ('official', 'official_style_net', 'official', 0)])
def test_foreign_pickles_load_and_sample(foreign_pickles, kind, module, convention, label_dim):
    net, meta = snapshots.load_network(foreign_pickles[kind])
    assert module not in sys.modules and type(net).__module__ != module
    assert denoiser.network_info(net).convention == convention and net.label_dim == label_dim
    assert meta.dataset_kwargs['resolution'] == 8 and 'ema' not in meta
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    ((seeds, images),) = list(generation.generate_images(net, [0, 1, 2], num_steps=4))
    assert seeds == [0, 1, 2] and images.dtype == torch.uint8 and images.shape == (3, 3, 8, 8)
    assert images.float().std() > 10 and not torch.equal(images[0], images[1])


def test_images_do_not_depend_on_batch_size_or_rank_split(foreign_pickles):
    net, _ = snapshots.load_network(foreign_pickles['edm'])
    seeds = list(range(7))
    settings = dict(num_steps=5, S_churn=10, cfg=1.3)   # random labels, churn noise and guidance all drawn per seed
    reference = {}
    for batch_size in (1, 3, 7):
        for batch_seeds, images in generation.generate_images(net, seeds, batch_size=batch_size, **settings):
            for seed, image in zip(batch_seeds, images):
                reference.setdefault(seed, image)
                assert torch.equal(reference[seed], image), (seed, batch_size)
    split = {seed: image for rank in (0, 1)
             for batch_seeds, images in generation.generate_images(net, seeds, batch_size=2, rank=rank, world_size=2,
                                                                 **settings)
             for seed, image in zip(batch_seeds, images)}
    assert sorted(split) == seeds and all(torch.equal(split[s], reference[s]) for s in seeds)


def test_class_idx_fixes_the_label(foreign_pickles):
    net, _ = snapshots.load_network(foreign_pickles['edm'])
    fixed = [torch.cat([images for _, images in generation.generate_images(net, [0, 1], class_idx=c, num_steps=4)])
             for c in range(3)]
    assert not torch.equal(fixed[0], fixed[1]) and not torch.equal(fixed[1], fixed[2])


@pytest.mark.parametrize('kind, kwargs, match', [
    ('edm', dict(class_idx=3), 'out of range'),
    ('official', dict(class_idx=0), 'unconditional'),
    ('official', dict(cfg=2.0), 'unconditional'),
    ('edm', dict(resolution=16), 'contradicts'),
    ('edm', dict(steps=5), 'Unknown sampler setting'),
    ('edm', dict(num_steps=0), 'num_steps'),
])
def test_generate_images_checks_its_arguments_at_the_call(foreign_pickles, kind, kwargs, match):
    net, _ = snapshots.load_network(foreign_pickles[kind])
    with pytest.raises(ValueError, match=match):
        generation.generate_images(net, [0], **kwargs)


def test_resolution_for_networks_that_do_not_record_it():
    net = EDMSpy(img_channels=1, img_resolution=None)
    with pytest.raises(ValueError, match='--resolution'):
        generation.generate_images(net, [0])
    ((_, images),) = list(generation.generate_images(net, [0, 1], resolution=4, num_steps=2))
    assert images.shape == (2, 1, 4, 4)


def _write(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f)
    return path


def test_load_network_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(dnnlib.util, '_RETRY_DELAY_S', 0)
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    corrupt = tmp_path / 'corrupt.pkl'
    corrupt.write_bytes(b'\x80\x04this is not a pickle')
    cases = {
        str(tmp_path / 'missing.pkl'): 'Cannot open',
        (tmp_path / 'missing.pkl').as_uri(): 'Cannot open',
        'http://127.0.0.1:9/network.pkl': 'Cannot open',
        str(corrupt): 'not a readable network pickle',
        str(_write(tmp_path / 'list.pkl', [1, 2])): 'holds a list',
        str(_write(tmp_path / 'noema.pkl', dict(net=1))): 'no "ema"',
        str(_write(tmp_path / 'notnet.pkl', dict(ema=dnnlib.EasyDict(a=1)))): 'not a denoiser network',
    }
    for path, match in cases.items():
        with pytest.raises(ValueError, match=match) as info:
            snapshots.load_network(path)
        assert '\n' not in str(info.value), path


def test_our_networks_sample_with_the_full_grid():
    networks = pytest.importorskip('training.networks')
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=2, label_dim=2, use_pos=True, model_type='SongUNet',
                              model_channels=16, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[],
                              dropout=0).eval().requires_grad_(False)
    assert denoiser.network_info(net).convention == 'ours'
    x = _normal([2, 2, 8, 8]).double()
    labels = torch.eye(2)
    sigma = torch.tensor(0.7, dtype=torch.float64)
    expected = net(x.float(), sigma.float(), None, labels).double()   # pos=None: the network's own full grid
    torch.testing.assert_close(denoiser.make_denoiser(net, labels)(x, sigma), expected)
    ((_, images),) = list(generation.generate_images(net, [0, 1], num_steps=3, cfg=1.5))
    assert images.shape == (2, 2, 8, 8)


# ----------------------------------------------------------------------------
# Regions of the coordinate frame, and the official --mask_pos, --embed_fq.


def _coordinate_naive(index, resolution):
    """(index / (R - 1) - 0.5) * 2 with each operation in float32, as the official code computes it."""
    f32 = np.float32
    return float((f32(index) / f32(resolution - 1) - f32(0.5)) * f32(2))


def _images(net, seeds, **kwargs):
    return torch.cat([images for _, images in generation.generate_images(net, seeds, **kwargs)])


@pytest.mark.parametrize('net', [OursSpy(use_pos=True, img_channels=3, img_resolution=8),
                                 OfficialSpy(img_channels=5, img_resolution=8)], ids=['ours', 'official'])
def test_a_region_reaches_the_network_as_its_patch_grid(net):
    """Every call gets patch_grid(top=y_start, left=x_start, S, R): x along columns from x_start, y along rows."""
    _images(net, [0, 1, 2], batch_size=2, image_size=4, x_start=3, y_start=6, resolution=10, num_steps=3)
    assert len(net.calls) == 2 * (2 * 3 - 1)
    for call in net.calls:
        n = call['x'].shape[0]
        assert call['x'].shape[1:] == (3, 4, 4)
        assert torch.equal(call['pos'], patch_grid(torch.full([n], 6), torch.full([n], 3), 4, 10))
    pos = net.calls[0]['pos'][0]
    assert pos[0].tolist() == [[_coordinate_naive(3 + col, 10) for col in range(4)]] * 4
    assert pos[1].tolist() == [[_coordinate_naive(6 + row, 10)] * 4 for row in range(4)]


def test_a_canvas_larger_than_the_frame_has_coordinates_past_one():
    torch.manual_seed(0)
    net = OursSpy(use_pos=True, img_channels=1, img_resolution=8)
    images = _images(net, [0, 1], image_size=16, num_steps=2)
    assert images.shape == (2, 1, 16, 16)
    pos = net.calls[0]['pos'][0]
    assert pos[0, 0, 0] == -1 and pos[0, 0, 7] == 1 and pos[0, 0, 15] == pytest.approx(15 / 7 * 2 - 1)
    assert torch.equal(pos[1].T, pos[0])


def _official_embedding_naive(grid, num_freqs):
    """The official embedding: for f = 2^linspace(0, n - 1, n) the channels sin(grid f), cos(grid f)."""
    freqs = 2. ** torch.linspace(0., num_freqs - 1, steps=num_freqs)
    assert freqs.tolist() == [2. ** k for k in range(num_freqs)]
    return torch.cat([fn(grid * freq) for freq in freqs for fn in (torch.sin, torch.cos)], dim=1)


def test_embedded_coordinates_reach_an_official_network():
    net = _official_spy(3 + 8, 3, img_resolution=8)
    _images(net, [0], image_size=4, x_start=2, y_start=1, num_steps=1)
    grid = patch_grid(torch.tensor([1]), torch.tensor([2]), 4, 8)
    (call,) = net.calls
    assert call['pos'].shape == (1, 8, 4, 4) and torch.equal(call['pos'], _official_embedding_naive(grid, 2))
    torch.testing.assert_close(call['pos'][:, 6:], torch.cos(2 * grid))


def _official_images_naive(net, seeds, resolution, image_size, x_start=0, y_start=0, embed_fq=0, num_steps=18,
                           sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """The images the official Patch Diffusion generate.py makes of an unconditional network for one batch of
    seeds: per-seed generators; the grid of the region in float32 integer arithmetic, or its sin/cos embedding;
    noise [N, C, S, S]; EDM's Algorithm 2 in float64; uint8 pixels."""
    assert not net.label_dim
    generators = [torch.Generator().manual_seed(seed % (1 << 32)) for seed in seeds]

    def randn(shape, dtype=torch.float32):
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators])

    columns = torch.arange(x_start, x_start + image_size).view(1, -1).expand(image_size, -1)
    rows = torch.arange(y_start, y_start + image_size).view(-1, 1).expand(-1, image_size)
    grid = torch.stack([(columns / (resolution - 1) - 0.5) * 2., (rows / (resolution - 1) - 0.5) * 2.])
    pos = grid[None].repeat(len(seeds), 1, 1, 1)
    if embed_fq:
        pos = _official_embedding_naive(pos, embed_fq)
    noise = randn([net.out_channels, image_size, image_size])

    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    steps = torch.arange(num_steps, dtype=torch.float64)
    t = (hi ** (1 / rho) + steps / (num_steps - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros(1, dtype=torch.float64)])
    x = noise.to(torch.float64) * t[0]
    for i in range(num_steps):
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t[i] <= S_max else 0
        t_hat = net.round_sigma(t[i] + gamma * t[i])
        x_hat = x + (t_hat ** 2 - t[i] ** 2).sqrt() * S_noise * randn(x.shape[1:], dtype=torch.float64)
        d = (x_hat - net(x_hat, t_hat, pos, None).to(torch.float64)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if i < num_steps - 1:
            d_prime = (x - net(x, t[i + 1], pos, None).to(torch.float64)) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_prime)
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


@pytest.mark.parametrize('kind, region', [
    ('official', dict(resolution=8, image_size=8)),
    ('official', dict(resolution=16, image_size=4, x_start=10, y_start=3)),
    ('official', dict(resolution=8, image_size=16, x_start=2, y_start=5)),          # a canvas past the frame
    ('official_embed', dict(resolution=8, image_size=8)),
    ('official_embed', dict(resolution=32, image_size=8, x_start=20, y_start=7)),
    ('official_embed', dict(resolution=8, image_size=16)),
])
def test_official_networks_give_the_official_generate_images(foreign_pickles, kind, region):
    """Bit for bit what the official generate.py's loop makes of the same pickle, region and seeds."""
    net, _ = snapshots.load_network(foreign_pickles[kind])
    embed_fq = denoiser.network_info(net).embed_fq
    assert embed_fq == (2 if kind == 'official_embed' else 0)
    seeds = [0, 5, 2]
    settings = dict(num_steps=5, S_churn=10)
    ours = _images(net, seeds, batch_size=3, **region, **settings)
    official = _official_images_naive(net, seeds, **region, embed_fq=embed_fq, **settings)
    assert ours.shape == (3, 3, region['image_size'], region['image_size'])
    assert torch.equal(ours, official)


class _FullGridDenoiser:
    """The network called directly with the full grid of its resolution (or no coordinates), float64 out."""

    def __init__(self, net, labels, coordinates):
        self.net, self.labels, self.coordinates = net, labels, coordinates
        self.sigma_min, self.sigma_max, self.round_sigma = net.sigma_min, net.sigma_max, net.round_sigma

    def __call__(self, x, sigma):
        x, sigma = x.to(torch.float32), sigma.to(torch.float32)
        if self.coordinates is None:
            return self.net(x, sigma, self.labels).to(torch.float64)
        return self.net(x, sigma, self.coordinates(x), self.labels).to(torch.float64)


def _our_unet(use_pos=True, label_dim=0, channel_mult=(1, 2), seed=0):
    networks = pytest.importorskip('training.networks')
    torch.manual_seed(seed)
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=label_dim, use_pos=use_pos,
                              model_type='SongUNet', model_channels=16, channel_mult=list(channel_mult), num_blocks=1,
                              attn_resolutions=[], dropout=0)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0, 0.1)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize('kind', ['ours', 'ours_no_pos', 'official', 'edm'])
def test_default_region_gives_the_full_grid_images(foreign_pickles, kind):
    """Without region settings the images are those of the samplers driven by the network with its full grid."""
    if kind.startswith('ours'):
        net = _our_unet(use_pos=kind == 'ours', label_dim=2)
    else:
        net, _ = snapshots.load_network(foreign_pickles[kind])
    coordinates = None
    if kind in ('ours', 'official'):
        coordinates = lambda x: full_grid(8, x.shape[0])
    elif kind == 'ours_no_pos':
        coordinates = lambda x: None
    seeds = [3, 1, 4]
    rnd = generation.StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([3, 3, 8, 8])
    labels = generation.random_class_labels(rnd, net.label_dim, 3)
    expected = samplers.edm_sampler(_FullGridDenoiser(net, labels, coordinates), noise, rnd.randn_like, num_steps=4,
                                    S_churn=5)
    assert torch.equal(_images(net, seeds, num_steps=4, S_churn=5), image_io.to_uint8(expected))


@pytest.mark.parametrize('region', [dict(), dict(image_size=16, x_start=4, y_start=2), dict(image_size=4, x_start=7)])
@pytest.mark.parametrize('kind', ['ours', 'official_embed'])
def test_image_k_depends_only_on_seed_k_at_every_size(foreign_pickles, kind, region):
    net = _our_unet(label_dim=3) if kind == 'ours' else snapshots.load_network(foreign_pickles[kind])[0]
    seeds = [7, 0, 3]
    alone = torch.cat([_images(net, [seed], num_steps=3, S_churn=10, **region) for seed in seeds])
    together = _images(net, seeds, batch_size=3, num_steps=3, S_churn=10, **region)
    assert torch.equal(alone, together) and not torch.equal(together[0], together[1])


def test_our_unet_samples_regions_and_canvases():
    net = _our_unet(channel_mult=(1, 1, 1))
    corner = _images(net, [0, 1], image_size=4, x_start=4, y_start=4, num_steps=3)
    canvas = _images(net, [0, 1], image_size=16, resolution=8, num_steps=3)
    assert corner.shape == (2, 3, 4, 4) and canvas.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match='multiple of 4, such as 4 or 8'):
        generation.generate_images(net, [0], image_size=6)
    with pytest.raises(ValueError, match='multiple of 4, such as 4$'):
        generation.generate_images(net, [0], image_size=2)


def test_input_multiple_reads_the_unet():
    """2^(halvings): ours record num_levels; EDM's and the official UNets have <res>x<res>_down encoder blocks."""
    assert denoiser.network_input_multiple(_our_unet(channel_mult=(1, 1, 1))) == 4
    edm_style = torch.nn.Module()
    edm_style.model = torch.nn.Module()
    edm_style.model.enc = torch.nn.ModuleDict({name: torch.nn.Identity() for name in (
        '64x64_conv', '64x64_block0', '32x32_down', '32x32_aux_down', '32x32_aux_skip', '16x16_down', '8x8_down')})
    assert denoiser.network_input_multiple(edm_style) == 8
    assert denoiser.network_input_multiple(EDMSpy(img_channels=3)) == 1


@pytest.mark.parametrize('kind, kwargs, match', [
    ('official', dict(image_size=0), 'image_size=0 must be a positive integer'),
    ('official', dict(x_start=-1), 'x_start=-1 must be a non-negative integer'),
    ('official', dict(y_start=-3), 'y_start=-3'),
    ('official', dict(resolution=1), 'needs 2 pixels or more'),
    ('official', dict(resolution=0), 'resolution=0 must be a positive integer'),
    ('edm', dict(x_start=2), 'takes no coordinates'),
    ('edm', dict(y_start=2, image_size=4), 'takes no coordinates'),
    ('edm', dict(resolution=16, image_size=16), 'contradicts'),
    ('official_nopos', dict(resolution=16), 'contradicts'),
])
def test_bad_regions_raise_at_the_call(foreign_pickles, kind, kwargs, match):
    net, _ = snapshots.load_network(foreign_pickles[kind])
    with pytest.raises(ValueError, match=match) as info:
        generation.generate_images(net, [0], **kwargs)
    assert '\n' not in str(info.value)


def test_networks_without_coordinates_change_only_their_size(foreign_pickles):
    net, _ = snapshots.load_network(foreign_pickles['edm'])
    assert _images(net, [0], image_size=12, num_steps=2).shape == (1, 3, 12, 12)
    assert torch.equal(_images(net, [0], resolution=8, num_steps=2), _images(net, [0], num_steps=2))
    spy = EDMSpy(img_channels=1, img_resolution=None)
    assert _images(spy, [0], image_size=4, num_steps=1).shape == (1, 1, 4, 4)


@pytest.mark.parametrize('kind, mask_pos, embed_fq, result', [
    ('official_nopos', True, None, 'takes no coordinates'),
    ('official_nopos', True, 0, 'takes no coordinates'),
    ('edm', True, None, 'takes no coordinates'),
    ('official_embed', False, 2, 'sin/cos embedding at 2 frequencies'),
    ('official', False, 0, 'plain [x, y] coordinate grid'),
    ('official', False, None, None),
    ('official', True, None, ValueError('without the coordinate channels it takes')),
    ('official_embed', True, 2, ValueError('without the coordinate channels it takes')),
    ('official_embed', False, 1, ValueError('contradicts the network, which takes their sin/cos embedding at 2')),
    ('official_embed', False, 0, ValueError('contradicts')),
    ('official', False, 2, ValueError('which takes the plain [x, y] coordinate grid (--embed_fq=0)')),
    ('edm', False, 1, ValueError('which takes no coordinates')),
    ('official', False, -1, ValueError('non-negative integer')),
])
def test_official_flags_are_checked_no_ops(foreign_pickles, kind, mask_pos, embed_fq, result):
    net, _ = snapshots.load_network(foreign_pickles[kind])
    if isinstance(result, ValueError):
        with pytest.raises(ValueError, match=re.escape(str(result))):
            denoiser.check_official_flags(net, mask_pos, embed_fq)
        return
    notes = denoiser.check_official_flags(net, mask_pos, embed_fq)
    assert len(notes) == (mask_pos + (embed_fq is not None))
    assert all(result in note for note in notes)


def test_embed_fq_on_our_networks():
    ours = _our_unet()
    assert 'plain [x, y] coordinate grid' in denoiser.check_official_flags(ours, embed_fq=0)[0]
    with pytest.raises(ValueError, match='contradicts'):
        denoiser.check_official_flags(ours, embed_fq=1)
    assert denoiser.check_official_flags(_our_unet(use_pos=False), mask_pos=True)


# ----------------------------------------------------------------------------
# Image output.


def test_to_uint8_matches_edm_rounding():
    images = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], dtype=torch.float64)
    assert image_io.to_uint8(images).tolist() == [0, 0, 128, 191, 255, 255]


@pytest.mark.parametrize('channels, mode', [(1, 'L'), (3, 'RGB')])
def test_save_image_grid(tmp_path, channels, mode):
    images = torch.randint(1, 256, [5, channels, 4, 6], dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    path = image_io.save_image_grid(images, tmp_path / 'grid.png')
    with PIL.Image.open(path) as image:
        assert image.mode == mode and image.size == (3 * 6, 2 * 4)
        grid = np.asarray(image).reshape(8, 18, channels)
    for k in range(5):
        row, col = divmod(k, 3)
        cell = grid[row * 4:(row + 1) * 4, col * 6:(col + 1) * 6]
        assert np.array_equal(cell, images[k].permute(1, 2, 0).numpy())
    assert not grid[4:, 12:].any()   # the empty sixth cell is black
    assert sorted(p.name for p in tmp_path.iterdir()) == ['grid.png']


def test_sample_grid_writes_the_generated_images(foreign_pickles, tmp_path):
    net, _ = snapshots.load_network(foreign_pickles['edm'])
    seeds = [4, 0, 9]
    images = generation.sample_grid(net, tmp_path / 'samples-000000.png', seeds, batch_size=2, grid_width=3, num_steps=3)
    expected = torch.cat([batch for _, batch in generation.generate_images(net, seeds, batch_size=2, num_steps=3)])
    assert torch.equal(images, expected)
    with PIL.Image.open(tmp_path / 'samples-000000.png') as grid:
        assert np.array_equal(np.asarray(grid), image_io.image_grid(images, 3).permute(1, 2, 0).numpy())


def test_save_image_rejects_other_channel_counts(tmp_path):
    with pytest.raises(ValueError, match='1 or 3 channels'):
        image_io.save_image(torch.zeros([4, 2, 2], dtype=torch.uint8), tmp_path / 'x.png')
