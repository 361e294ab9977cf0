"""EDM2's snapshots in generate.py: pickles in EDM2's layout
(tests/fixtures/edm2_layout.py: float16 networks with EDM2's call and an
`encoder`) sample to EDM2's images within 1 LSB, plain, with --class, with a
guide network (--gnet/--guidance, EDM2's autoguidance) and with churn; the
latent ones decode through our VAE path; our solvers run on them; bad
guidance settings are one-line errors. Also: our EDM2 preconditioner's call
convention (coordinates through `pos=`), and the `encoder` entry of its
snapshots.

The reference is EDM2's sampling as its generate_images.py does it, written
here from its description (docs/GENERATING.md): float32 throughout, Heun
steps on float32 rho time steps, no clamping or rounding of sigma, the guide
extrapolated as D_ref.lerp(D, g), churn noise only on churned steps, noise
then labels per seed, and the snapshot's own encoder.decode.
"""

import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from torch_utils import persistence
from training import denoiser, encoders, generation, image_io, latents, networks, samplers, snapshots

pytestmark = pytest.mark.usefixtures('one_thread')

FIXTURE = 'tests/fixtures/edm2_layout.py'
SEEDS = [0, 1, 2, 7]


@pytest.fixture(scope='module')
def edm2_pickles(tmp_path_factory, repo_root):
    """The pickles of tests/fixtures/edm2_layout.py, written by a subprocess."""
    folder = tmp_path_factory.mktemp('edm2')
    env = dict(PYTHONPATH=str(repo_root), OMP_NUM_THREADS='1', PATH='/usr/bin:/bin')
    subprocess.run([sys.executable, FIXTURE, str(folder)], check=True, env=env, cwd=repo_root)
    return folder


def _unpickle(path):
    with open(path, 'rb') as f:
        return persistence.load_network_pickle(f)


# ----------------------------------------------------------------------------
# The reference: EDM2's sampling, in float32.


def reference_sampler(net, noise, labels, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                      guidance=1, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, randn_like=torch.randn_like):
    def denoise(x, t):
        D_x = net(x, t, labels).to(torch.float32)
        if guidance == 1:
            return D_x
        return gnet(x, t, labels).to(torch.float32).lerp(D_x, guidance)

    i = torch.arange(num_steps, dtype=torch.float32)
    t_steps = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t_steps = torch.cat([t_steps, torch.zeros_like(t_steps[:1])])
    x_next = noise.to(torch.float32) * t_steps[0]
    for step, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        if S_churn > 0 and S_min <= t_cur <= S_max:
            t_hat = t_cur + min(S_churn / num_steps, np.sqrt(2) - 1) * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if step < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def reference_images(path, seeds, gnet_path=None, class_idx=None, decode=True, **sampler_kwargs):
    """EDM2's images (uint8 [N, C, H, W]) of the pickle at `path`, or with decode=False its float32 samples."""
    data = _unpickle(path)
    net = data['ema']
    gnet = _unpickle(gnet_path)['ema'] if gnet_path is not None else net
    rnd = generation.StackedRandomGenerator('cpu', seeds)
    noise = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution])
    labels = None
    if net.label_dim > 0:
        labels = torch.eye(net.label_dim)[rnd.randint(net.label_dim, size=[len(seeds)])]
        if class_idx is not None:
            labels[:, :] = 0
            labels[:, class_idx] = 1
    with torch.no_grad():
        samples = reference_sampler(net, noise, labels, gnet, randn_like=rnd.randn_like, **sampler_kwargs)
    if not decode:
        return samples
    data['encoder'].init('cpu')
    return data['encoder'].decode(samples)


def _run(*args):
    return CliRunner().invoke(generate.main, ['--device=cpu', *map(str, args)])


def _written(outdir, seeds):
    """The PNGs of `seeds` in outdir as uint8 [N, C, H, W]."""
    def load(seed):
        with PIL.Image.open(outdir / f'{seed:06d}.png') as image:
            pixels = np.asarray(image)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)
    return torch.stack([load(seed) for seed in seeds])


def _assert_one_line_error(result, match):
    assert result.exit_code == 1 and 'Traceback' not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('Error: ') and match in lines[0], result.stderr


def _max_lsb(a, b):
    return int((a.to(torch.int16) - b.to(torch.int16)).abs().max())


# ----------------------------------------------------------------------------
# Loading and sampling EDM2's pickles.


def test_edm2_pickle_loads_in_float16_with_its_encoder(edm2_pickles):
    net, meta = snapshots.load_network(edm2_pickles / 'cond.pkl')
    assert type(net).__name__ == 'Precond' and not hasattr(net, 'sigma_min')
    assert {p.dtype for p in net.parameters()} == {torch.float16}
    assert type(meta.encoder).__name__ == 'StandardRGBEncoder'
    info = denoiser.network_info(net)
    assert (info.convention, info.coordinates, info.img_channels, info.label_dim) == ('edm', False, 3, 4)
    denoise = denoiser.make_denoiser(net, torch.eye(4)[:2])
    assert (denoise.sigma_min, denoise.sigma_max) == (0, float('inf'))
    sigmas = torch.tensor([80.0, 1.23456789], dtype=torch.float64)
    assert torch.equal(denoise.round_sigma(sigmas), sigmas)


def test_float64_sampler_is_edm2s_float32_one_within_a_bit(edm2_pickles):
    """Our sampler runs in float64, EDM2's in float32: on these networks the
    samples differ by about 1e-6 (docs/GENERATING.md), far below one 8-bit
    level (2 / 255), so the images agree within 1 LSB."""
    net, _ = snapshots.load_network(edm2_pickles / 'cond.pkl')
    rnd = generation.StackedRandomGenerator('cpu', SEEDS)
    noise = rnd.randn([len(SEEDS), 3, 8, 8])
    labels = generation.random_class_labels(rnd, net.label_dim, len(SEEDS))
    ours = samplers.edm_sampler(denoiser.make_denoiser(net, labels), noise, rnd.randn_like, num_steps=32)
    reference = reference_images(edm2_pickles / 'cond.pkl', SEEDS, decode=False, num_steps=32)
    assert (ours - reference.double()).abs().max() < 1e-4
    assert _max_lsb(image_io.to_uint8(ours), image_io.to_uint8(reference)) <= 1


@pytest.mark.parametrize('flags, reference_kwargs', [
    ([], {}),
    (['--class=2'], dict(class_idx=2)),
    (['--gnet={guide_uncond}', '--guidance=1.7'], dict(gnet='guide_uncond', guidance=1.7)),
    (['--gnet={guide_cond}', '--guidance=2.2', '--class=3'], dict(gnet='guide_cond', guidance=2.2, class_idx=3)),
    (['--S_churn=10', '--S_noise=1.003'], dict(S_churn=10, S_noise=1.003)),
    (['--S_churn=30', '--S_min=0.05', '--S_max=5'], dict(S_churn=30, S_min=0.05, S_max=5)),
], ids=['plain', 'class', 'autoguidance', 'conditional-guide', 'churn', 'churn-window'])
def test_generate_equals_edm2_within_one_level(edm2_pickles, tmp_path, flags, reference_kwargs):
    guides = {name: edm2_pickles / f'{name}.pkl' for name in ('guide_uncond', 'guide_cond')}
    gnet = reference_kwargs.pop('gnet', None)
    result = _run(f'--net={edm2_pickles / "cond.pkl"}', f'--outdir={tmp_path}', '--seeds=0-2,7', '--steps=12',
                  '--batch=3', *[flag.format(**guides) for flag in flags])
    assert result.exit_code == 0, result.output
    expected = reference_images(edm2_pickles / 'cond.pkl', SEEDS, None if gnet is None else guides[gnet],
                                num_steps=12, **reference_kwargs)
    assert _max_lsb(_written(tmp_path, SEEDS), expected) <= 1


def test_guide_changes_the_images(edm2_pickles, tmp_path):
    """--guidance=1 drops the guide (EDM2 does too); another weight changes the images."""
    images = {}
    for guidance in (1, 1.5):
        outdir = tmp_path / str(guidance)
        result = _run(f'--network={edm2_pickles / "cond.pkl"}', f'--gnet={edm2_pickles / "guide_uncond.pkl"}',
                      f'--guidance={guidance}', f'--outdir={outdir}', '--seeds=0-1', '--steps=6')
        assert result.exit_code == 0, result.output
        images[guidance] = _written(outdir, [0, 1])
    plain = reference_images(edm2_pickles / 'cond.pkl', [0, 1], num_steps=6)
    assert _max_lsb(images[1], plain) <= 1 and _max_lsb(images[1.5], plain) > 1


def test_latent_pickle_decodes_through_our_vae(edm2_pickles, tmp_path):
    if not (edm2_pickles / 'latent.pkl').exists():
        pytest.skip('diffusers is not installed')
    result = _run(f'--network={edm2_pickles / "latent.pkl"}', f'--outdir={tmp_path}', '--seeds=0-2,7', '--steps=8')
    assert result.exit_code == 0, result.output
    written = _written(tmp_path, SEEDS)
    assert written.shape == (4, 3, 16, 16)
    expected = reference_images(edm2_pickles / 'latent.pkl', SEEDS, num_steps=8)
    assert _max_lsb(written, expected) <= 1
    # Our decoder alone, on EDM2's float32 samples: EDM2's encoder.decode within a level.
    samples = reference_images(edm2_pickles / 'latent.pkl', SEEDS, decode=False, num_steps=8)
    encoder = _unpickle(edm2_pickles / 'latent.pkl')['encoder']
    latent = latents.generation_latent(None, encoder=encoder)
    assert latent.vae == str(edm2_pickles / 'vae') and len(latent.scale) == len(latent.bias) == 4
    decode = latents.pixel_decoder(latent, 4, 'cpu')
    assert _max_lsb(decode(samples), expected) <= 1


def test_our_solvers_and_churn_run_on_edm2_pickles(edm2_pickles, tmp_path):
    runs = {'dpmpp': ['--solver=dpmpp-2m'], 'sde': ['--solver=dpmpp-2m-sde'],
            'churn': ['--S_churn=20', '--S_min=0.05', '--S_max=10'],
            'guided-dpmpp': ['--solver=dpmpp-2m', f'--gnet={edm2_pickles / "guide_uncond.pkl"}', '--guidance=1.5']}
    for name, flags in runs.items():
        result = _run(f'--network={edm2_pickles / "cond.pkl"}', f'--outdir={tmp_path / name}', '--seeds=0-1',
                      '--steps=6', *flags)
        assert result.exit_code == 0, (name, result.output)
        assert _written(tmp_path / name, [0, 1]).shape == (2, 3, 8, 8)
    if (edm2_pickles / 'latent.pkl').exists():
        result = _run(f'--network={edm2_pickles / "latent.pkl"}', f'--outdir={tmp_path / "latent"}', '--seeds=0',
                      '--steps=5', '--solver=dpmpp-2m')
        assert result.exit_code == 0, result.output


@pytest.mark.parametrize('flags, message', [
    (['--guidance=2'], '--guidance=2.0 needs a guide network'),
    (['--gnet={guide_uncond}', '--guidance=2', '--cfg=1.5'], 'two kinds of guidance'),
    (['--gnet={guide_gray}', '--guidance=2'], '1-channel images'),
    (['--gnet={guide_small}', '--guidance=2'], 'same resolution'),
    (['--on_latents=1'], 'leave --on_latents out'),
    (['--scale_factor=0.5', '--on_latents=1'], 'leave --on_latents out'),
], ids=['guidance-without-gnet', 'gnet-and-cfg', 'guide-channels', 'guide-resolution', 'pixels-as-latents',
        'scale-factor'])
def test_bad_guidance_is_one_line_error(edm2_pickles, tmp_path, flags, message):
    guides = {name: edm2_pickles / f'{name}.pkl' for name in ('guide_uncond', 'guide_gray', 'guide_small')}
    result = _run(f'--network={edm2_pickles / "cond.pkl"}', f'--outdir={tmp_path}', '--seeds=0', '--steps=2',
                  *[flag.format(**guides) for flag in flags])
    _assert_one_line_error(result, message)


def test_unknown_encoder_and_latent_flags_are_one_line_errors(edm2_pickles, tmp_path):
    result = _run(f'--network={edm2_pickles / "odd_encoder.pkl"}', f'--outdir={tmp_path}', '--seeds=0', '--steps=2')
    _assert_one_line_error(result, 'OddEncoder')
    if (edm2_pickles / 'latent.pkl').exists():
        for flag, message in (('--scale_factor=0.5', 'per latent channel'), ('--on_latents=0', 'must be decoded')):
            result = _run(f'--network={edm2_pickles / "latent.pkl"}', f'--outdir={tmp_path}', '--seeds=0',
                          '--steps=2', flag)
            _assert_one_line_error(result, message)


def test_library_refuses_guidance_without_guide(edm2_pickles):
    net, _ = snapshots.load_network(edm2_pickles / 'cond.pkl')
    with pytest.raises(ValueError, match='needs a guide network'):
        generation.generate_images(net, [0], guidance=2)


# ----------------------------------------------------------------------------
# Our EDM2 preconditioner's convention, and its snapshots' encoder.


class EDM2PosSpy(torch.nn.Module):
    """Stands in for networks.EDM2Precond: its signature and attributes; records its calls."""

    def __init__(self, use_pos, label_dim=0, img_channels=3, img_resolution=4):
        super().__init__()
        self.use_pos, self.pos_freqs = use_pos, 0
        self.label_dim, self.img_channels, self.img_resolution = label_dim, img_channels, img_resolution
        self.sigma_min, self.sigma_max = 0, float('inf')
        self.calls = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, pos=None,
                augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, class_labels=class_labels, pos=pos))
        return x * 0.5


@pytest.mark.parametrize('use_pos', [True, False])
def test_edm2_precond_convention_passes_coordinates_as_pos(use_pos):
    net = EDM2PosSpy(use_pos, label_dim=2)
    info = denoiser.network_info(net)
    assert (info.convention, info.coordinates) == ('ours_edm2', use_pos)
    labels = torch.eye(2)[[0, 1]]
    region = denoiser.sampling_region(net, resolution=8, image_size=4, x_start=4, y_start=2) if use_pos else None
    x = torch.randn([2, 3, 4, 4], dtype=torch.float64)
    denoiser.make_denoiser(net, labels, region=region)(x, 1.5)
    (call,) = net.calls
    assert torch.equal(call['class_labels'], labels)
    if use_pos:
        corner = torch.zeros(1, dtype=torch.long)
        expected = networks.patch_grid(corner + 2, corner + 4, (4, 4), (8, 8)).repeat(2, 1, 1, 1)
        assert torch.equal(call['pos'], expected)
    else:
        assert call['pos'] is None


def test_guide_with_coordinates_gets_them_and_labels_only_when_conditional():
    net, guide = EDM2PosSpy(True, label_dim=2), EDM2PosSpy(True, label_dim=0)
    labels = torch.eye(2)[[1, 0]]
    x = torch.randn([2, 3, 4, 4], dtype=torch.float64)
    out = denoiser.make_denoiser(net, labels, gnet=guide, gnet_guidance=2.0)(x, 0.7)
    torch.testing.assert_close(out, x * 0.5)
    (call,) = guide.calls
    assert call['class_labels'] is None and torch.equal(call['pos'], net.calls[0]['pos'])


def test_edm2_precond_snapshot_carries_edm2s_pixel_encoder(tmp_path):
    """Our EDM2Precond: called with pos=, and its snapshots hold EDM2's 'encoder' entry."""
    torch.manual_seed(0)
    net = networks.EDM2Precond(img_resolution=8, img_channels=3, label_dim=0, use_pos=True, model_channels=8,
                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    assert denoiser.network_info(net).convention == 'ours_edm2'
    (path,) = snapshots.save_snapshot(str(tmp_path / 'net.pkl'), net, None, None, dict(resolution=8))
    _check_standard_rgb(_unpickle(path)['encoder'])
    loaded, meta = snapshots.load_network(path)
    assert latents.generation_latent(meta.get('latent'), encoder=meta.encoder) is None
    (_, images), = generation.generate_images(loaded, [0, 1], num_steps=3, image_size=4, x_start=4, y_start=2)
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8


def test_edm2_precond_latent_snapshot_carries_an_encoder_that_decodes_as_ours(tmp_path):
    """A latent EDM2Precond snapshot's 'encoder' (for EDM2's generate_images.py) decodes our latents as
    training.latents.decode_latents does, with the run's VAE and scale factor; our loader keeps using
    the recorded 'latent' entry."""
    diffusers = pytest.importorskip('diffusers')
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                            up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(32, 32),
                            layers_per_block=1, latent_channels=4, norm_num_groups=32,
                            sample_size=16).save_pretrained(tmp_path / 'vae')
    latent = latents.latent_info(str(tmp_path / 'vae'), 0.5, 16, 4, 8)
    net = networks.EDM2Precond(img_resolution=8, img_channels=4, label_dim=0, use_pos=True, model_channels=8,
                               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])
    (path,) = snapshots.save_snapshot(str(tmp_path / 'net.pkl'), net, None, None, dict(resolution=8),
                                      extra=dict(latent=latent))
    encoder = _unpickle(path)['encoder']
    assert type(encoder).__name__ == 'LatentVAEEncoder' and encoder._vae is None
    samples = torch.randn([3, 4, 8, 8], generator=torch.Generator().manual_seed(1))
    expected = latents.decode_latents(latents.load_vae(str(tmp_path / 'vae')), samples, 0.5)
    decoded = encoder.decode(samples)
    assert decoded.shape == (3, 3, 16, 16) and torch.equal(decoded, expected)
    assert pickle.loads(pickle.dumps(encoder))._vae is None   # the loaded VAE is never pickled
    _, meta = snapshots.load_network(path)
    assert latents.generation_latent(meta.get('latent'), encoder=meta.encoder).scale_factor == 0.5


def test_our_encoder_decodes_as_edm2s_standard_rgb_encoder():
    encoder = pickle.loads(pickle.dumps(encoders.StandardRGBEncoder()))
    _check_standard_rgb(encoder)
    latent = latents.generation_latent(None, encoder=encoder)
    assert latent is None


def test_other_snapshots_carry_no_encoder(tmp_path):
    net = networks.EDMPrecond(img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=8,
                              channel_mult=[1], num_blocks=1, attn_resolutions=[])
    (path,) = snapshots.save_snapshot(str(tmp_path / 'net.pkl'), net, None, None, dict(resolution=8))
    assert 'encoder' not in _unpickle(path)


def _check_standard_rgb(encoder):
    assert type(encoder).__name__ == 'StandardRGBEncoder'
    encoder.init('cpu')
    x = torch.linspace(-1.2, 1.2, 301, dtype=torch.float64).reshape(1, 1, 7, 43)
    expected = (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    assert torch.equal(encoder.decode(x), expected)
    assert torch.equal(encoder.decode(x), image_io.to_uint8(x.to(torch.float32)))
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(encoder.encode_latents(pixels), pixels.to(torch.float32) / 127.5 - 1)
