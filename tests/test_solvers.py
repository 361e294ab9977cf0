"""The multistep solvers of training/samplers.py (DPM-Solver++(2M) and 2M SDE
on EDM's time steps): against diffusers' implementation of the same method
on the same denoiser, against the exact solution of a Gaussian's
probability-flow ODE (second order, far ahead of Euler and Heun at the same
number of network evaluations), per-seed determinism, step accounting, and
the settings they refuse."""

import pytest
import torch

from tests.test_sampling import GaussianDenoiser, _normal
from training import generation, samplers


class RandomNetDenoiser:
    """A denoiser with a nonlinear D (a fixed random two-layer map of x and
    sigma), so that the solvers' steps are not exact."""

    sigma_min, sigma_max = 0.002, 80

    def __init__(self, channels=3):
        g = torch.Generator().manual_seed(7)
        self.w1 = torch.randn(channels + 1, 16, generator=g, dtype=torch.float64) / 2
        self.w2 = torch.randn(16, channels, generator=g, dtype=torch.float64) / 4

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def __call__(self, x, sigma):
        c_in = 1 / (sigma ** 2 + 0.25).sqrt()
        flat = (x * c_in).movedim(1, -1)
        features = torch.cat([flat, torch.log(sigma).expand(*flat.shape[:-1], 1) / 4], dim=-1)
        out = torch.tanh(features @ self.w1) @ self.w2
        return 0.25 / (sigma ** 2 + 0.25) * x + sigma * 0.5 * c_in * out.movedim(-1, 1)


def _diffusers_sample(denoise, z, num_steps, algorithm, generator=None):
    """The same sampling through diffusers' EDMDPMSolverMultistepScheduler: our
    time steps (float64) replace its float32 ones, and the network output it
    expects is the one whose EDM preconditioning gives our D."""
    diffusers = pytest.importorskip('diffusers')
    sigma_min, sigma_max = samplers._noise_range(denoise, 0.002, 80)
    scheduler = diffusers.EDMDPMSolverMultistepScheduler(
        sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=0.5, rho=7, solver_order=2,
        algorithm_type=algorithm, solver_type='midpoint', lower_order_final=False, final_sigmas_type='zero')
    scheduler.set_timesteps(num_steps)
    scheduler.sigmas = samplers._edm_time_steps(denoise, num_steps, 0.002, 80, 7, 'cpu')
    x = z.to(torch.float64) * scheduler.sigmas[0]
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        D_x = denoise(x, sigma)
        c_skip, c_out = 0.25 / (sigma ** 2 + 0.25), sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
        x = scheduler.step((D_x - c_skip * x) / c_out, timestep, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize('num_steps', [2, 5, 12])
def test_dpmpp_2m_equals_diffusers(num_steps):
    denoise, z = RandomNetDenoiser(), _normal([4, 3, 5, 5])
    ours = samplers.dpm_solver_sampler(denoise, z, num_steps=num_steps, solver='dpmpp-2m')
    theirs = _diffusers_sample(denoise, z, num_steps, 'dpmsolver++')
    assert (ours - theirs).abs().max() < 1e-5 * ours.abs().max()


@pytest.mark.parametrize('solver, algorithm', [('dpmpp-2m', 'dpmsolver++'), ('dpmpp-2m-sde', 'sde-dpmsolver++')])
def test_on_a_real_network_equals_diffusers(solver, algorithm):
    """The same comparison through a network's Denoiser (a tiny DDPM++ with coordinates)."""
    from training import architectures, denoiser
    torch.manual_seed(0)
    net = architectures.build_network(dict(precond='edm', model_type='SongUNet', model_channels=8, channel_mult=[1],
                                           num_blocks=1, attn_resolutions=[], dropout=0, use_pos=True), 8, 3, 0)
    with torch.no_grad():
        for p in net.parameters():   # no zero-initialised layers: D depends on the network
            p.add_(torch.randn_like(p) * 0.1)
    denoise = denoiser.make_denoiser(net.eval(), region=denoiser.sampling_region(net))
    z = _normal([2, 3, 8, 8])
    ours_noise = torch.Generator().manual_seed(4)
    ours = samplers.dpm_solver_sampler(denoise, z, lambda x: torch.randn(x.shape, generator=ours_noise, dtype=x.dtype),
                                       num_steps=6, solver=solver)
    theirs = _diffusers_sample(denoise, z, 6, algorithm, torch.Generator().manual_seed(4))
    assert (ours - theirs).abs().max() < 1e-5 * ours.abs().max()


@pytest.mark.parametrize('num_steps', [3, 10])
def test_dpmpp_2m_sde_equals_diffusers_with_the_same_noise(num_steps):
    denoise, z = RandomNetDenoiser(), _normal([4, 3, 5, 5])
    ours_noise = torch.Generator().manual_seed(11)
    ours = samplers.dpm_solver_sampler(
        denoise, z, lambda x: torch.randn(x.shape, generator=ours_noise, dtype=x.dtype), num_steps=num_steps,
        solver='dpmpp-2m-sde')
    theirs = _diffusers_sample(denoise, z, num_steps, 'sde-dpmsolver++', torch.Generator().manual_seed(11))
    assert (ours - theirs).abs().max() < 1e-5 * ours.abs().max()


def test_dpmpp_2m_is_second_order_and_beats_heun_and_euler_at_equal_evaluations():
    """The Gaussian's exact ODE solution: at 11 evaluations per image, DPM-Solver++(2M)
    (11 steps) is ahead of Heun (6 steps: 4.8x the error here) and Euler (11 steps:
    1.7x); doubling its steps cuts its error about fourfold (4.7x from 20 to 40)."""
    denoise = GaussianDenoiser(mu=0.3, s=0.5)
    z = _normal([256, 1, 1, 1])
    exact = denoise.ode_endpoint(z, 80)

    def error(sampler, **kwargs):
        return (sampler(denoise, z, **kwargs) - exact).abs().max().item()
    dpm = error(samplers.dpm_solver_sampler, num_steps=11)
    heun = error(samplers.edm_sampler, num_steps=6)
    euler = error(samplers.ablation_sampler, num_steps=11, solver='euler')
    assert dpm < heun / 3 and dpm < euler / 1.5, (dpm, heun, euler)
    coarse, fine = error(samplers.dpm_solver_sampler, num_steps=20), error(samplers.dpm_solver_sampler, num_steps=40)
    assert 3.5 < coarse / fine < 6, (coarse, fine)


def test_dpmpp_2m_sde_reproduces_gaussian_statistics():
    """The SDE converges more slowly than the ODE in steps: its variance is 1.32x the
    data's at 16 steps, 1.10x at 32, 1.02x at 64."""
    denoise = GaussianDenoiser(mu=0.3, s=0.5)
    rnd = torch.Generator().manual_seed(3)
    x = samplers.dpm_solver_sampler(denoise, _normal([20000, 1, 1, 1]),
                                    lambda x: torch.randn(x.shape, generator=rnd, dtype=x.dtype),
                                    num_steps=64, solver='dpmpp-2m-sde')
    assert abs(x.mean().item() - 0.3) < 0.015 and abs(x.var().item() / 0.25 - 1) < 0.05


def test_one_evaluation_per_step_at_edm_time_steps():
    denoise = GaussianDenoiser(sigma_min=0.01, sigma_max=50)
    samplers.dpm_solver_sampler(denoise, _normal([2, 1, 1, 1]), num_steps=6, solver='dpmpp-2m')
    expected = samplers._edm_time_steps(denoise, 6, 0.002, 80, 7, 'cpu')[:-1]
    assert [sigma for _, sigma in denoise.calls] == pytest.approx(expected.tolist(), rel=1e-12)
    assert all(dtype == torch.float64 for dtype, _ in denoise.calls)


def test_sde_images_depend_on_their_seed_alone():
    """Per-seed noise (generation.StackedRandomGenerator): seed 5's image is the same
    alone and beside seed 3."""
    denoise = RandomNetDenoiser()

    def sample(seeds):
        rnd = generation.StackedRandomGenerator('cpu', seeds)
        return samplers.dpm_solver_sampler(denoise, rnd.randn([len(seeds), 3, 4, 4]), rnd.randn_like, num_steps=7,
                                           solver='dpmpp-2m-sde')
    assert torch.equal(sample([3, 5])[1], sample([5])[0])


@pytest.mark.parametrize('kwargs, evaluations', [
    (dict(), 35), (dict(num_steps=10), 19), (dict(num_steps=10, solver='euler'), 10),
    (dict(num_steps=10, solver='heun'), 19), (dict(num_steps=10, solver='dpmpp-2m'), 10),
    (dict(num_steps=9, solver='dpmpp-2m-sde'), 9)])
def test_network_evaluations_per_image(kwargs, evaluations):
    sampler, kwargs = samplers.select_sampler(**kwargs)
    assert samplers.network_evaluations(sampler, kwargs) == evaluations
    denoise = GaussianDenoiser()
    sampler(denoise, _normal([1, 1, 1, 1]), **kwargs)
    assert len(denoise.calls) == evaluations


@pytest.mark.parametrize('kwargs, message', [
    (dict(solver='dpmpp-2m', S_churn=40), r'--solver=dpmpp-2m .* cannot take --S_churn: .*dpmpp-2m-sde'),
    (dict(solver='dpmpp-2m', S_noise=1.003), r'cannot take --S_noise'),
    (dict(solver='dpmpp-2m-sde', discretization='vp'), r'cannot take --discretization'),
    (dict(solver='dpmpp-3m'), r"solver='dpmpp-3m' is not supported; choose one of euler, heun, dpmpp-2m, dpmpp-2m-sde"),
    (dict(solver='dpmpp-2m', num_steps=0), r'num_steps=0 must be a positive integer'),
])
def test_settings_a_solver_cannot_honour_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        samplers.select_sampler(**kwargs)


def test_default_sampler_is_still_edms_heun():
    sampler, kwargs = samplers.select_sampler(num_steps=18, S_churn=None)
    assert sampler is samplers.edm_sampler and kwargs == dict(num_steps=18)


# ----------------------------------------------------------------------------
# Through generate.py, on every kind of network we load.


@pytest.fixture(scope='module')
def foreign_pickles(tmp_path_factory, repo_root):
    """EDM's and the official code's network layouts (tests/fixtures/write_snapshots.py)."""
    import subprocess
    import sys
    folder = tmp_path_factory.mktemp('snapshots')
    env = dict(PYTHONPATH=f'{repo_root}:{repo_root / "tests/fixtures"}', OMP_NUM_THREADS='1', PATH='/usr/bin:/bin')
    subprocess.run([sys.executable, 'tests/fixtures/write_snapshots.py', str(folder)], check=True, env=env,
                   cwd=repo_root)
    return folder


@pytest.mark.parametrize('kind, extra', [('edm_cond.pkl', ['--class=1', '--cfg=2']), ('official.pkl', []),
                                         ('official_embed.pkl', []), ('ours-dit', ['--image_size=4'])])
@pytest.mark.parametrize('solver', ['dpmpp-2m', 'dpmpp-2m-sde'])
def test_generate_py_runs_the_multistep_solvers_on_every_network_kind(foreign_pickles, tmp_path, kind, extra,
                                                                      solver):
    """EDM's conditional network with guidance, the official code's (grid and
    embedded coordinates), our DiT on a region: images of one seed do not
    depend on the batch, and the console states the evaluations."""
    import pickle
    from click.testing import CliRunner
    import generate
    from training import architectures
    from tests.test_dit import TINY_DIT
    if kind == 'ours-dit':
        torch.manual_seed(0)
        path = tmp_path / 'dit.pkl'
        with open(path, 'wb') as f:
            pickle.dump(dict(ema=architectures.build_network(TINY_DIT, 8, 3, 0).eval()), f)
    else:
        path = foreign_pickles / kind
    outputs = {}
    for batch in (1, 3):
        out = tmp_path / f'out{batch}'
        result = CliRunner().invoke(generate.cli, [f'--network={path}', f'--outdir={out}', '--seeds=0-2',
                                                   f'--batch={batch}', f'--solver={solver}', '--steps=5',
                                                   '--device=cpu', *extra])
        assert result.exit_code == 0, result.output
        assert 'network evaluations per image, 15 in all' in result.output and ' 5 network evaluations' in result.output
        outputs[batch] = [(out / f'{seed:06d}.png').read_bytes() for seed in range(3)]
    assert outputs[1] == outputs[3]


def test_generate_py_refuses_churn_with_the_ode_solver(foreign_pickles, tmp_path):
    from click.testing import CliRunner
    import generate
    result = CliRunner().invoke(generate.cli, [f'--network={foreign_pickles / "official.pkl"}', f'--outdir={tmp_path}',
                                               '--seeds=0', '--solver=dpmpp-2m', '--S_churn=40', '--device=cpu'])
    assert result.exit_code != 0
    assert 'Error: --solver=dpmpp-2m runs on EDM\'s time steps and cannot take --S_churn' in result.output
    assert not list(tmp_path.glob('*.png'))


def test_generate_py_states_heuns_evaluations(foreign_pickles, tmp_path):
    from click.testing import CliRunner
    import generate
    result = CliRunner().invoke(generate.cli, [f'--network={foreign_pickles / "official.pkl"}', f'--outdir={tmp_path}',
                                               '--seeds=0-1', '--steps=4', '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert "Sampler: EDM's Heun sampler, 4 steps: 7 network evaluations per image, 14 in all" in result.output
