"""Post-hoc EMA (training/phema.py, reconstruct_phema.py): the width <->
exponent relation, the power-EMA update against its closed-form profile,
least-squares reconstruction on a synthetic weight trajectory (tracked
widths back exactly, untracked widths and the classic EMA close), power
EMAs in training (snapshots, bit-exact resume, refused changes of widths),
and the command end to end with its bad inputs."""

import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import reconstruct_phema
import train
from dataset_prep.archive import convert_dataset
from training import config, phema, runs, snapshots
from training import training_loop as tl

TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0)

# On the synthetic trajectory below, reconstructions of widths between and around the tracked
# 0.05 and 0.10 (and of a classic EMA) came within 2e-4 of the exact EMA, relative to how far that EMA
# is from the final weights; the tests allow 2e-3, and check that the tracked EMAs themselves are
# more than 10 times that far from the wanted one (a test that could not fail would pass them too).
RECONSTRUCTION_TOLERANCE = 2e-3


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:16', str(path), resolution=(32, 32))
    return str(path)


# ----------------------------------------------------------------------------
# Widths, exponents, the update.

@pytest.mark.parametrize('std', [0.01, 0.05, 0.1, 0.2, phema.MAX_STD])
def test_std_and_gamma_are_inverse(std):
    gamma = phema.std_to_gamma(std)
    assert gamma >= 0 and phema.gamma_to_std(gamma) == pytest.approx(std, rel=1e-12)


def test_known_exponents():
    """EDM2's widths 0.05 and 0.10 are exponents of about 16.97 and 6.94; the widest, a plain average, 0."""
    assert phema.std_to_gamma(0.05) == pytest.approx(16.9722, abs=1e-4)
    assert phema.std_to_gamma(0.10) == pytest.approx(6.9372, abs=1e-4)
    assert phema.std_to_gamma(phema.MAX_STD) == pytest.approx(0, abs=1e-9)


@pytest.mark.parametrize('stds', [[0], [-0.1], [0.3], [0.05, 0.0501]])
def test_bad_widths_are_refused(stds):
    with pytest.raises(ValueError, match='--ema-std'):
        phema.check_stds(stds)


def step_times(count, seed=0):
    """Image counts after each of `count` steps of variable size (batch 8 times a patch multiplier)."""
    rng = np.random.default_rng(seed)
    return np.cumsum(8 * rng.choice([1, 2, 4], size=count, p=[0.5, 0.3, 0.2]))


def test_update_follows_the_profile_exactly():
    """After steps ending at t_1 < ... < t_K, the weights after step k carry
    (t_k^(g+1) - t_(k-1)^(g+1)) / t_K^(g+1): the profile's mass over the step."""
    times = step_times(50)
    values = torch.randn(50, dtype=torch.float64)
    net = torch.nn.Linear(1, 1, bias=False).double()
    emas = phema.PowerEMAs(net, [0.05, 0.2])
    before = 0
    for t, value in zip(times, values):
        net.weight.data.fill_(value)
        emas.update(net, before, t)
        before = t
    edges = np.concatenate([[0], times]).astype(np.float64)
    for gamma, ema in zip(emas.gammas, emas.nets):
        mass = (edges[1:] ** (gamma + 1) - edges[:-1] ** (gamma + 1)) / edges[-1] ** (gamma + 1)
        assert ema.weight.item() == pytest.approx(float(mass @ values.numpy()), rel=1e-10)


def test_profiles_are_densities():
    t = 5000.0
    for profile in (phema.PowerProfile(t, 6.94), phema.HalfLifeProfile(t, 400.0, 0.05),
                    phema.HalfLifeProfile(t, 20000.0, 0.05)):
        assert phema._integrate(profile.density, t, profile.kinks()) == pytest.approx(1, abs=1e-9)
    # Without ramp-up the initial weights keep 2^(-t/h) of the weight; the profile is the rest, as a density.
    plain = phema.HalfLifeProfile(t, 1000.0, None)
    assert phema._integrate(plain.density, t) == pytest.approx(1, abs=1e-9)
    assert plain.density(t) / plain.density(t - 1000) == pytest.approx(2, rel=1e-12)
    # The closed-form inner product of two power profiles is the integral.
    a, b = phema.PowerProfile(t, 6.94), phema.PowerProfile(0.6 * t, 16.97)
    assert phema.inner(a, b) == pytest.approx(phema._integrate(lambda x: a.density(x) * b.density(x), 0.6 * t),
                                              rel=1e-9)


# ----------------------------------------------------------------------------
# Reconstruction on a synthetic weight trajectory.

def synthetic_run(steps=3000, dims=64, snap_every=100, stds=(0.05, 0.10)):
    """A drifting random walk of weights over steps of variable size, with
    power EMAs of `stds` snapshotted every `snap_every` steps.
    Returns (times, weights [steps, dims], [(profile, snapshot values)])."""
    rng = np.random.default_rng(1)
    times = step_times(steps, seed=1).astype(np.float64)
    weights = np.cumsum(rng.normal(size=(steps, dims)) * 0.05, axis=0) + np.outer(np.log1p(times / 1000),
                                                                                 rng.normal(size=dims))
    gammas = [phema.std_to_gamma(std) for std in stds]
    emas, before, snaps = np.zeros((len(stds), dims)), 0.0, []
    for k, t in enumerate(times):
        for j, gamma in enumerate(gammas):
            beta = (before / t) ** (gamma + 1)
            emas[j] = beta * emas[j] + (1 - beta) * weights[k]
        before = t
        if (k + 1) % snap_every == 0:
            snaps += [(phema.PowerProfile(t, gamma), emas[j].copy()) for j, gamma in enumerate(gammas)]
    return times, weights, snaps


def exact_ema(times, weights, gamma=None, halflife=None, rampup=None):
    """The EMA the Trainer would keep: power-function (gamma) or classic (half-life, ramp-up)."""
    ema, before = np.zeros(weights.shape[1]), 0.0
    for t, w in zip(times, weights):
        if gamma is not None:
            beta = (before / t) ** (gamma + 1)
        else:
            beta = 0.5 ** ((t - before) / max(min(halflife, before * rampup) if rampup else halflife, 1e-8))
        ema = beta * ema + (1 - beta) * w
        before = t
    return ema


@pytest.fixture(scope='module')
def synthetic():
    return synthetic_run()


def reconstruct_synthetic(snaps, target):
    weights, error = phema.solve_weights([p for p, _ in snaps], target)
    return weights @ np.array([v for _, v in snaps]), weights, error


def test_tracked_width_comes_back(synthetic):
    times, weights, snaps = synthetic
    target = phema.PowerProfile(times[-1], phema.std_to_gamma(0.10))
    result, x, error = reconstruct_synthetic(snaps, target)
    assert error < 1e-6
    assert np.abs(x).argmax() == len(snaps) - 1 and x[-1] == pytest.approx(1, abs=1e-6)
    np.testing.assert_allclose(result, snaps[-1][1], rtol=0, atol=1e-8)


@pytest.mark.parametrize('target_std', [0.075, 0.15])
def test_untracked_width_is_close_to_the_exact_ema(synthetic, target_std):
    times, weights, snaps = synthetic
    gamma = phema.std_to_gamma(target_std)
    exact = exact_ema(times, weights, gamma=gamma)
    result, _, error = reconstruct_synthetic(snaps, phema.PowerProfile(times[-1], gamma))
    scale = np.abs(exact - weights[-1]).mean()
    assert error < 1e-2
    assert np.abs(result - exact).mean() / scale < RECONSTRUCTION_TOLERANCE
    nearest_tracked = min(np.abs(v - exact).mean() for _, v in snaps[-2:])
    assert nearest_tracked / scale > 10 * RECONSTRUCTION_TOLERANCE


@pytest.mark.parametrize('rampup', [0.05, None])
def test_classic_ema_is_close(synthetic, rampup):
    """With EDM's ramp-up; and without (after --transfer), where the EMA kept
    from zero initial weights is renormalised to the training's part."""
    times, weights, snaps = synthetic
    halflife = 0.05 * times[-1] if rampup else 0.1 * times[-1]
    exact = exact_ema(times, weights, halflife=halflife, rampup=rampup)
    if rampup is None:
        exact /= 1 - 2 ** (-times[-1] / halflife)
    result, _, _ = reconstruct_synthetic(snaps, phema.HalfLifeProfile(times[-1], halflife, rampup))
    scale = np.abs(exact - weights[-1]).mean()
    assert np.abs(result - exact).mean() / scale < RECONSTRUCTION_TOLERANCE
    assert min(np.abs(v - exact).mean() for _, v in snaps[-2:]) / scale > 10 * RECONSTRUCTION_TOLERANCE


def test_earlier_time(synthetic):
    """At the time of an earlier snapshot, only the snapshots until then count."""
    times, weights, snaps = synthetic
    k = 1499   # the 15th snapshot
    gamma = phema.std_to_gamma(0.075)
    exact = exact_ema(times[:k + 1], weights[:k + 1], gamma=gamma)
    early = [(p, v) for p, v in snaps if p.t <= times[k]]
    result, _, _ = reconstruct_synthetic(early, phema.PowerProfile(times[k], gamma))
    assert np.abs(result - exact).mean() / np.abs(exact - weights[k]).mean() < RECONSTRUCTION_TOLERANCE


def edm2_coefficients(in_t, in_gamma, out_t, out_gamma):
    """EDM2's reconstruction coefficients, computed here from the paper's
    maths alone: the Gram matrix of power-function profiles
    p(tau) = (g + 1) tau^g / t^(g + 1) on [0, t], whose inner products are
    int_0^min(t_a, t_b) p_a p_b = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1)
    / ((g_a + g_b + 1) t_a^(g_a + 1) t_b^(g_b + 1)) (in logarithms, against
    overflow), the solve of A x = b, then x divided by its sum. [in, out]."""
    def gram(t_a, g_a, t_b, g_b):
        t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in np.broadcast_arrays(t_a, g_a, t_b, g_b))
        log = (np.log(g_a + 1) + np.log(g_b + 1) + (g_a + g_b + 1) * np.log(np.minimum(t_a, t_b))
               - np.log(g_a + g_b + 1) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
        return np.exp(log)
    col, row = (lambda v: np.float64(v).reshape(-1, 1)), (lambda v: np.float64(v).reshape(1, -1))
    A = gram(col(in_t), col(in_gamma), row(in_t), row(in_gamma))
    B = gram(col(in_t), col(in_gamma), row(out_t), row(out_gamma))
    X = np.linalg.solve(A, B)
    return X / X.sum(axis=0)


@pytest.mark.parametrize('times, stds', [(np.arange(1, 11) * 1000.0, (0.05, 0.10)),
                                         (np.arange(1, 31) * 3217.0, (0.05, 0.10)),
                                         (np.array([8.0, 1000, 2008, 3016]), (0.05, 0.10)),
                                         (np.arange(1, 11) * 1e6, (0.03, 0.08, 0.15))])
def test_coefficients_are_edm2s(times, stds):
    """Every width, at the newest and at an earlier time, gets EDM2's
    coefficients (they sum to 1); the error is that of their profile."""
    sources = [phema.PowerProfile(t, phema.std_to_gamma(std)) for t in times for std in stds]
    in_t, in_gamma = [p.t for p in sources], [p.gamma for p in sources]
    for t_out in (times[-1], times[len(times) // 2]):
        used = [i for i, p in enumerate(sources) if p.t <= t_out]
        out_stds = (0.02, 0.07, 0.10, 0.15, 0.20, 0.25, 0.28)
        reference = edm2_coefficients([in_t[i] for i in used], [in_gamma[i] for i in used], t_out,
                                      [phema.std_to_gamma(std) for std in out_stds])
        for j, std in enumerate(out_stds):
            target = phema.PowerProfile(t_out, phema.std_to_gamma(std))
            x, error = phema.solve_weights([sources[i] for i in used], target)
            np.testing.assert_allclose(x, reference[:, j], rtol=1e-8, atol=1e-10 * np.abs(reference[:, j]).max())
            assert x.sum() == pytest.approx(1, abs=1e-12)
            def combined(tau):   # a profile is 0 after its time
                return sum(w * np.where(tau <= sources[i].t, sources[i].density(tau), 0)
                           for w, i in zip(x, used)) - target.density(tau)
            kinks = sorted({sources[i].t for i in used})
            expected = math.sqrt(phema._integrate(lambda tau: combined(tau) ** 2, t_out, kinks)
                                 / phema.inner(target, target))
            assert error == pytest.approx(expected, rel=1e-5, abs=1e-9)


def test_a_constant_added_to_the_weights_comes_back(synthetic):
    """The coefficients sum to 1, so every reconstruction (widths, classic
    EMAs with and without ramp-up) of weights + c is the reconstruction of
    the weights + c: large weights that drift a little lose nothing to a
    scale (without the division by the sum, a width of 0.25 would be off by
    0.7% of the weights)."""
    times, weights, snaps = synthetic
    offset = np.random.default_rng(5).normal(size=weights.shape[1]) * 100
    shifted = [(p, v + offset) for p, v in snaps]
    for target in (phema.PowerProfile(times[-1], phema.std_to_gamma(0.25)),
                   phema.PowerProfile(times[-1], phema.std_to_gamma(0.075)),
                   phema.HalfLifeProfile(times[-1], 0.05 * times[-1], 0.05),
                   phema.HalfLifeProfile(times[-1], 0.2 * times[-1], None)):
        result, x, _ = reconstruct_synthetic(snaps, target)
        moved, _, _ = reconstruct_synthetic(shifted, target)
        assert x.sum() == pytest.approx(1, abs=1e-12)
        np.testing.assert_allclose(moved - offset, result, rtol=0, atol=1e-9 * np.abs(offset).max())


# ----------------------------------------------------------------------------
# In training.

def make_trainer(data, **overrides):
    kwargs = dict(dataset_kwargs=dict(path=data, use_labels=False), network_kwargs=dict(TINY_NET),
                  loss_kwargs=dict(loss='edm'), optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
                  patch_kwargs=dict(real_p=0.5), batch_size=8, lr_rampup_kimg=0, ema_halflife_kimg=0.5, seed=1,
                  ema_stds=[0.05, 0.1])
    return tl.Trainer(**dict(kwargs, **overrides))


def test_trainer_keeps_power_emas(shapes_zip):
    trainer = make_trainer(shapes_zip)
    trainer.step()   # the first step copies the weights (beta = 0)
    for ema in trainer.phema.nets:
        assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), trainer.net.parameters()))
    for _ in range(3):
        trainer.step()
    narrow, wide = trainer.phema.nets
    assert not all(torch.equal(a, b) for a, b in zip(narrow.parameters(), wide.parameters()))


def test_resume_with_power_emas_is_bit_exact(shapes_zip, tmp_path):
    straight = make_trainer(shapes_zip)
    for _ in range(6):
        straight.step()
    first = make_trainer(shapes_zip)
    for _ in range(3):
        first.step()
    path = str(tmp_path / 'training-state-000000.pt')
    runs.save_state(path, dict(first.state_dict(), cur_tick=1))
    second = make_trainer(shapes_zip)
    second.load_state_dict(runs.load_state(path))
    for _ in range(3):
        second.step()
    for a, b in zip(straight.phema.nets, second.phema.nets):
        for x, y in zip(a.state_dict().values(), b.state_dict().values()):
            assert torch.equal(x, y)
    assert not torch.equal(next(straight.phema.nets[0].parameters()), next(first.phema.nets[0].parameters()))


@pytest.mark.parametrize('saved, resumed, match', [([0.05, 0.1], [0.05], 'resume with --ema-std=0.050,0.100'),
                                                   ([0.05, 0.1], [], 'resume with --ema-std=0.050,0.100'),
                                                   ([], [0.05], 'keeps no power EMAs')])
def test_resume_with_other_widths_is_refused(shapes_zip, tmp_path, saved, resumed, match):
    first = make_trainer(shapes_zip, ema_stds=saved)
    first.step()
    path = str(tmp_path / 'training-state-000000.pt')
    runs.save_state(path, dict(first.state_dict(), cur_tick=1))
    with pytest.raises(ValueError, match=match):
        make_trainer(shapes_zip, ema_stds=resumed).load_state_dict(runs.load_state(path))


def test_config_and_flags(shapes_zip):
    from training.dataset import open_dataset
    dataset = open_dataset(dict(path=shapes_zip))
    c = config.build_config(dict(data=shapes_zip, ema_std=[0.05, 0.1]), dataset)
    assert c.ema_stds == [0.05, 0.1]
    assert 'ema_stds' not in config.build_config(dict(data=shapes_zip), dataset)   # old runs' options unchanged
    result = CliRunner().invoke(train.main, ['--outdir=o', f'--data={shapes_zip}', '--ema-std=0.05,0.5'])
    assert result.exit_code == 1 and 'outside (0, 0.2887]' in result.output
    result = CliRunner().invoke(train.main, ['--outdir=o', f'--data={shapes_zip}', '--ema-std=0.05,x'])
    assert result.exit_code == 2 and 'comma-separated list of numbers' in result.output


@pytest.fixture(scope='module')
def phema_run(shapes_zip, tmp_path_factory):
    """A 3-kimg tiny run with power EMAs of widths 0.05 and 0.10, a snapshot
    every kimg, as .pkl and .safetensors."""
    run_dir = str(tmp_path_factory.mktemp('run'))
    kwargs = dict(dataset_kwargs=dict(path=shapes_zip, use_labels=False), network_kwargs=dict(TINY_NET),
                  loss_kwargs=dict(loss='edm'), optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
                  patch_kwargs=dict(real_p=0.25), batch_size=8, lr_rampup_kimg=0, ema_halflife_kimg=0.5,
                  seed=1, total_kimg=3, ema_stds=[0.05, 0.1])
    tl.training_loop(run_dir=run_dir, kimg_per_tick=1, snapshot_ticks=1, state_dump_ticks=None, sample_count=0,
                     tensorboard=False, snapshot_format='both', **kwargs)
    return run_dir


def test_training_writes_power_ema_snapshots(phema_run):
    names = sorted(os.listdir(phema_run))
    for kimg in ('000000', '000001', '000002', '000003'):
        for std in ('0.050', '0.100'):
            assert f'network-snapshot-{kimg}-{std}.pkl' in names and f'network-snapshot-{kimg}-{std}.safetensors' in names
    net, meta = snapshots.load_network(os.path.join(phema_run, 'network-snapshot-000003-0.100.safetensors'))
    assert meta.phema['std'] == 0.1 and meta.phema['gamma'] == pytest.approx(6.9372, abs=1e-4)
    assert 3000 <= meta.phema['nimg'] < 3100 and meta.phema['ema_rampup_ratio'] == 0.05
    sources = phema.find_sources(phema_run)
    assert len(sources) == 8 and all(s.path.endswith('.safetensors') for s in sources)


def test_snapshot_meta_from_the_header_alone(phema_run, tmp_path):
    """find_sources reads a .safetensors snapshot's header only: the same meta
    as load_network's; a cut header is an error naming the file."""
    path = os.path.join(phema_run, 'network-snapshot-000002-0.050.safetensors')
    assert snapshots.load_snapshot_meta(path) == snapshots.load_network(path)[1]
    data = open(path, 'rb').read()
    cut = tmp_path / 'cut.safetensors'
    cut.write_bytes(data[:100])
    with pytest.raises(ValueError, match='cut.safetensors is not a readable .safetensors file'):
        snapshots.load_snapshot_meta(str(cut))


def test_command_reconstructs_a_tracked_width_and_generate_samples_it(phema_run, tmp_path):
    outdir = tmp_path / 'out'
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={phema_run}', f'--outdir={outdir}',
                                                         '--outstd=0.1,0.075', '--outema=0.0005'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(outdir)) == ['phema-000003-0.075.pkl', 'phema-000003-0.100.pkl',
                                          'phema-000003-ema0.0005.pkl']
    rebuilt, meta = snapshots.load_network(str(outdir / 'phema-000003-0.100.pkl'))
    tracked, _ = snapshots.load_network(os.path.join(phema_run, 'network-snapshot-000003-0.100.pkl'))
    for a, b in zip(rebuilt.parameters(), tracked.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert meta.phema['reconstructed'] and meta.phema['sources'] == 8 and meta.patch_kwargs['real_p'] == 0.25
    between, _ = snapshots.load_network(str(outdir / 'phema-000003-0.075.pkl'))
    assert not all(torch.allclose(a, b, atol=1e-6) for a, b in zip(between.parameters(), tracked.parameters()))
    result = CliRunner().invoke(generate.cli, [f'--network={outdir / "phema-000003-0.075.pkl"}',
                                               f'--outdir={tmp_path / "images"}', '--seeds=0-1', '--steps=4',
                                               '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(tmp_path / 'images')) == ['000000.png', '000001.png']


def test_command_at_an_earlier_kimg(phema_run, tmp_path):
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={phema_run}', f'--outdir={tmp_path}',
                                                         '--outstd=0.05', '--outkimg=1', '--snapshot-format=safetensors'])
    assert result.exit_code == 0, result.output
    rebuilt, _ = snapshots.load_network(str(tmp_path / 'phema-000001-0.050.safetensors'))
    tracked, _ = snapshots.load_network(os.path.join(phema_run, 'network-snapshot-000001-0.050.pkl'))
    for a, b in zip(rebuilt.parameters(), tracked.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_command_writes_edm2s_combination_of_the_snapshots(phema_run, tmp_path):
    """The reconstructed weights are the snapshots' weights times EDM2's
    coefficients (widths), or the normalised least-squares ones (a classic
    EMA), summed: the same to float32 rounding."""
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={phema_run}', f'--outdir={tmp_path}',
                                                         '--outstd=0.075,0.2', '--outema=0.0005'])
    assert result.exit_code == 0, result.output
    names = sorted(name for name in os.listdir(phema_run) if name.count('-') == 3 and name.endswith('.pkl'))
    loaded = [snapshots.load_network(os.path.join(phema_run, name)) for name in names]
    assert len(loaded) == 8
    in_t = [meta.phema['nimg'] for _, meta in loaded]
    in_gamma = [meta.phema['gamma'] for _, meta in loaded]
    t = max(in_t)
    halflife = phema.HalfLifeProfile(t, 500.0, loaded[0][1].phema['ema_rampup_ratio'])
    classic, _ = phema.solve_weights([phema.PowerProfile(a, g) for a, g in zip(in_t, in_gamma)], halflife)
    assert classic.sum() == pytest.approx(1, abs=1e-12)
    widths = edm2_coefficients(in_t, in_gamma, t, [phema.std_to_gamma(0.075), phema.std_to_gamma(0.2)])
    for name, x in (('phema-000003-0.075.pkl', widths[:, 0]), ('phema-000003-0.200.pkl', widths[:, 1]),
                    ('phema-000003-ema0.0005.pkl', classic)):
        rebuilt, _ = snapshots.load_network(str(tmp_path / name))
        for key, param in rebuilt.named_parameters():
            expected = sum(float(w) * dict(net.named_parameters())[key].double() for w, (net, _) in zip(x, loaded))
            torch.testing.assert_close(param, expected.float(), rtol=3e-7, atol=1e-9)


@pytest.mark.parametrize('args, message', [
    (['--outstd=0.5'], '--outstd: An EMA width (std) of 0.5 is outside'),
    ([], 'Nothing to reconstruct'),
    (['--outema=0'], 'is not positive'),
    (['--outstd=0.1', '--outkimg=0'], None),   # kimg 0 has a snapshot: fine
])
def test_command_bad_arguments(phema_run, tmp_path, args, message):
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={phema_run}', f'--outdir={tmp_path / "o"}', *args])
    if message is None:
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 1 and message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / 'o').exists()


def test_command_without_power_emas(tmp_path):
    (tmp_path / 'run').mkdir()
    (tmp_path / 'run' / 'network-snapshot-000001.pkl').write_bytes(b'not used')
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={tmp_path / "run"}', f'--outdir={tmp_path / "o"}',
                                                         '--outstd=0.1'])
    assert result.exit_code == 1 and 'train with --ema-std=0.05,0.10' in result.output
    result = CliRunner().invoke(reconstruct_phema.main, [f'--indir={tmp_path / "missing"}',
                                                         f'--outdir={tmp_path / "o"}', '--outstd=0.1'])
    assert result.exit_code == 1 and 'is not a folder' in result.output
    assert not (tmp_path / 'o').exists()
