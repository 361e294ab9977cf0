"""EDM2's network and recipe trained on patches (training/networks_edm2.py,
EDM2Precond, EDM2Loss, --arch=edm2-*, --lr-decay, the edm2 presets): the
magnitude-preserving layers, forced weight normalisation, shapes and EDM2's
parameter names, a training step equal to one of EDM2's training loop (the
reference written below from its facts), a train.py run on patches, resume,
and the resolved options."""

import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from tests.conftest import demo_zips, resolved_options
from training import augment, config, flags, networks_edm2, presets, runs
from training import training_loop as tl
from training.architectures import build_network
from training.networks import full_grid, patch_grid

TINY_NET = dict(precond='edm2', model_type='EDM2UNet', model_channels=8, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], dropout=0)
TINY_FLAGS = ['--cbase=8', '--cres=1,2', '--blocks=1', '--attn=8', '--workers=0', '--device=cpu', '--seed=0']

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """{side: a zip of 8 labelled demo images} for 16 and 32."""
    return demo_zips(tmp_path_factory.mktemp('data'), (16, 32))


def rms(x):
    return float(x.double().square().mean().sqrt())


def mp_convs(net):
    return [m for m in net.modules() if isinstance(m, networks_edm2.MPConv)]


# ----------------------------------------------------------------------------
# Layers.

def test_mp_operations_keep_unit_magnitude():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn([64, 3, 64, 64], generator=gen), torch.randn([64, 5, 64, 64], generator=gen)
    assert abs(rms(networks_edm2.mp_silu(a)) - 1) < 0.01
    for t in (0.3, 0.5, 0.8):
        assert abs(rms(networks_edm2.mp_sum(a, b[:, :3], t=t)) - 1) < 0.01
        assert abs(rms(networks_edm2.mp_cat(a, b, t=t)) - 1) < 0.01
    fourier = networks_edm2.MPFourier(4096)
    assert abs(rms(fourier(torch.randn([256], generator=gen))) - 1) < 0.02
    plain = torch.cat([a, b], dim=1) / np.sqrt(2)   # not magnitude preserving at t != 0.5 without the weights
    assert abs(rms(networks_edm2.mp_cat(a, b, t=0.5)) - rms(plain) * np.sqrt(2)) < 0.01


def test_forced_weight_normalisation_in_training_mode_only():
    """A forward in training mode leaves every MPConv weight with rows of norm
    sqrt(fan_in) (unit RMS); in eval mode the weights stay as they are."""
    torch.manual_seed(0)
    net = build_network(dict(TINY_NET, use_pos=True), 16, 3, 4)
    x, sigma = torch.randn([2, 3, 16, 16]), torch.ones([2])
    with torch.no_grad():
        for conv in mp_convs(net):
            conv.weight.mul_(3)
    before = copy.deepcopy(net.state_dict())
    net.eval()
    net(x, sigma, torch.eye(4)[:2], return_logvar=True)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    net.train()
    net(x, sigma, torch.eye(4)[:2], return_logvar=True)
    convs = mp_convs(net)
    assert len(convs) > 10
    for conv in convs:
        rows = conv.weight.detach().flatten(1)
        torch.testing.assert_close(rows.norm(dim=1), torch.full([rows.shape[0]], np.sqrt(rows.shape[1])),
                                   rtol=2e-4, atol=0)


# ----------------------------------------------------------------------------
# Shapes and names.

def test_precond_shapes_on_patches():
    torch.manual_seed(0)
    with_pos = build_network(dict(TINY_NET, use_pos=True), 32, 3, 10)
    without = build_network(dict(TINY_NET, use_pos=False), 32, 3, 0)
    assert with_pos.model.enc['32x32_conv'].weight.shape[1] == 3 + 2 + 1   # image, coordinates, ones
    assert without.model.enc['32x32_conv'].weight.shape[1] == 3 + 1        # EDM2's [x, ones]
    assert with_pos.sigma_data == 0.5 and with_pos.sigma_min == 0 and with_pos.sigma_max == float('inf')
    assert torch.equal(with_pos.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))
    labels = torch.eye(10)[[1, 7, 3]]
    for size in (16, 32):
        x, sigma = torch.randn([3, 3, size, size]), torch.rand([3]) + 0.1
        pos = patch_grid(torch.tensor([0, 16 - size // 2, 32 - size]), torch.tensor([3, 0, 32 - size]), size, 32)
        if size == 32:
            pos = full_grid(32, 3)
        D = with_pos(x, sigma, labels, pos=pos)
        D2, logvar = with_pos(x, sigma, labels, pos=pos, return_logvar=True)
        assert D.shape == (3, 3, size, size) and D.dtype == torch.float32 and torch.equal(D, D2)
        assert logvar.shape == (3, 1, 1, 1) and logvar.dtype == torch.float32
        D, logvar = without(x, sigma, None, return_logvar=True)   # EDM2's positional call
        assert D.shape == (3, 3, size, size) and logvar.shape == (3, 1, 1, 1)
    with pytest.raises(ValueError, match='pos is needed for a 16x16 patch'):
        with_pos(torch.randn([1, 3, 16, 16]), torch.ones([1]), labels[:1])


def test_edm2_s_has_edm2s_shapes():
    """train.py --arch=edm2-s on 64x64x4 latents with 1000 classes, without
    coordinates: EDM2-S of ImageNet-512, 280M parameters (EDM2 paper, Table 2)
    under EDM2's names."""
    opts = dict(config.DEFAULTS, arch='edm2-s', use_pos=False)
    kwargs = config.network_kwargs(dnnlib.EasyDict(opts))
    assert kwargs.precond == 'edm2' and kwargs.dropout == 0 and kwargs.model_channels == 192
    with torch.device('meta'):
        net = build_network(kwargs, 64, 4, 1000)
    shapes = {name: tuple(p.shape) for name, p in net.named_parameters()}
    expected = {
        'model.emb_noise.weight': (768, 192), 'model.emb_label.weight': (768, 1000),
        'model.enc.64x64_conv.weight': (192, 5, 3, 3),
        'model.enc.64x64_block0.conv_res0.weight': (192, 192, 3, 3),
        'model.enc.32x32_down.conv_res0.weight': (192, 192, 3, 3),
        'model.enc.32x32_block0.conv_skip.weight': (384, 192, 1, 1),
        'model.enc.16x16_block2.attn_qkv.weight': (1728, 576, 1, 1),
        'model.enc.8x8_block0.emb_linear.weight': (768, 768),
        'model.dec.8x8_in0.attn_proj.weight': (768, 768, 1, 1),
        'model.dec.8x8_block0.conv_res0.weight': (768, 1536, 3, 3),
        'model.dec.16x16_up.conv_res1.weight': (768, 768, 3, 3),
        'model.dec.64x64_block3.conv_skip.weight': (192, 384, 1, 1),
        'model.out_conv.weight': (4, 192, 3, 3), 'model.out_gain': (), 'model.enc.64x64_block0.emb_gain': (),
        'logvar_linear.weight': (1, 128),
    }
    for name, shape in expected.items():
        assert shapes[name] == shape, name
    assert 'model.enc.32x32_block0.attn_qkv.weight' not in shapes   # attention at 16 and 8 only
    assert abs(sum(p.numel() for p in net.parameters()) / 280e6 - 1) < 0.01
    assert {name for name, _ in net.named_buffers()} == {'model.emb_fourier.freqs', 'model.emb_fourier.phases',
                                                        'logvar_fourier.freqs', 'logvar_fourier.phases'}


# ----------------------------------------------------------------------------
# A training step equals EDM2's.

def reference_loss(net, images, labels, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
    """EDM2Loss written from its formula: sigma = exp(N(P_mean, P_std^2)), weight
    lambda(sigma) / exp(logvar), plus logvar; EDM2's call net(x, sigma, labels)."""
    rnd_normal = torch.randn([images.shape[0], 1, 1, 1])
    sigma = (rnd_normal * P_std + P_mean).exp()
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    noise = torch.randn_like(images) * sigma
    denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
    return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar


def reference_lr(cur_nimg, batch_size, ref_lr, ref_batches, rampup_Mimg):
    """EDM2's learning-rate schedule: inverse square root decay after ref_batches, linear ramp-up."""
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return lr


def make_trainer(data, **overrides):
    kwargs = dict(dataset_kwargs=dict(path=data, use_labels=True), network_kwargs=dict(TINY_NET, use_pos=False),
                  loss_kwargs=dict(loss='edm2', P_mean=-0.4, P_std=1.0),
                  optimizer_kwargs=dict(lr=0.01, betas=[0.9, 0.99], eps=1e-8), patch_kwargs=dict(real_p=1.0),
                  batch_size=4, batch_gpu=2, lr_rampup_kimg=0.016, lr_decay_batches=2, ema_halflife_kimg=0.5, seed=1)
    return tl.Trainer(**dict(kwargs, **overrides))


@pytest.mark.parametrize('side', [16, 32])
def test_step_equals_edm2s_training_step(shapes, side):
    """--use_pos=0 --real_p=1: weights after 1 and after 10 steps equal those of
    EDM2's loop on the same batches and draws: loss.sum() * ls / batch_gpu_total
    per round, backward, lr from decay and ramp-up, nan_to_num, Adam (0.9, 0.99)."""
    trainer = make_trainer(shapes[side])
    reference = copy.deepcopy(trainer.net)   # the same initial weights, in training mode
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    calls = []
    inner = trainer.loss_fn

    def record(**kwargs):
        assert kwargs['pos'] is None
        calls.append((kwargs['y'].clone(), kwargs['labels'].clone(), torch.get_rng_state()))
        return inner(**kwargs)
    trainer.loss_fn = record

    for step in range(10):
        calls.clear()
        trainer.step()
        assert len(calls) == 2   # 2 rounds of batch_gpu images
        optimizer.zero_grad(set_to_none=True)
        for images, labels, rng in calls:
            torch.set_rng_state(rng)
            loss = reference_loss(reference, images, labels)
            loss.sum().mul(1 / 4).backward()
        lr = reference_lr(step * 4, 4, ref_lr=0.01, ref_batches=2, rampup_Mimg=0.016e-3)
        for group in optimizer.param_groups:
            group['lr'] = lr
        for param in reference.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=0, neginf=0, out=param.grad)
        optimizer.step()
        if step in (0, 9):
            for (name, ours), theirs in zip(trainer.net.named_parameters(), reference.parameters()):
                torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=f'{name} after {step + 1} steps')
    assert trainer.bad_steps == 0
    moved = [name for name, p in trainer.net.named_parameters() if p.ndim == 0 and p.item() != 0]
    assert 'model.out_gain' in moved   # the gains learned: the step did train


def test_learning_rate_schedule(shapes):
    trainer = make_trainer(shapes[16], lr_rampup_kimg=0.016, lr_decay_batches=2)
    for nimg in (0, 4, 8, 12, 16, 20, 40, 400, 4e6):
        assert trainer.learning_rate(nimg) == pytest.approx(reference_lr(nimg, 4, 0.01, 2, 0.016e-3), rel=1e-12)
    assert trainer.learning_rate(400) == pytest.approx(0.01 / np.sqrt(400 / 8))
    assert type(trainer.learning_rate(400)) is float   # in the optimizer's state, which loads weights-only
    off = make_trainer(shapes[16], lr_rampup_kimg=0, lr_decay_batches=0)
    assert off.learning_rate(4e6) == 0.01


def test_resume_is_bit_exact_on_patches(shapes, tmp_path):
    """With coordinates, augmentation and patches: N steps == N/2, a saved state, N/2."""
    options = dict(network_kwargs=dict(TINY_NET, use_pos=True, augment_dim=9, dropout=0.1),
                   augment_kwargs=dict(p=0.5, **augment.EDM_AUGMENT_KWARGS),
                   patch_kwargs=dict(real_p=0.5))
    straight = make_trainer(shapes[32], **options)
    sizes = [straight.step() for _ in range(6)]
    assert len(set(sizes)) > 1, sizes
    first = make_trainer(shapes[32], **options)
    for _ in range(3):
        first.step()
    path = str(tmp_path / 'training-state-000000.pt')
    runs.save_state(path, dict(first.state_dict(), cur_tick=1))
    second = make_trainer(shapes[32], **options)
    second.load_state_dict(runs.load_state(path))
    assert [second.step() for _ in range(3)] == sizes[3:]
    for (name, a), b in zip(straight.net.state_dict().items(), second.net.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.state_dict().values(), second.ema.state_dict().values()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------
# train.py.

def test_resolved_options(shapes, tmp_path, no_torchrun_env):
    """edm2 archs: EDM2's loss, betas, decay, dropout and noise levels unless
    typed; other archs' options as before (no decay key)."""
    base = [f'--outdir={tmp_path / "runs"}', '--dry-run', f'--data={shapes[32]}', *TINY_FLAGS]
    result = CliRunner().invoke(train.main, [*base, '--arch=edm2-xs'])
    assert result.exit_code == 0, result.output
    c = resolved_options(result.output)
    assert c['network_kwargs']['precond'] == 'edm2' and c['network_kwargs']['model_type'] == 'EDM2UNet'
    assert c['network_kwargs']['dropout'] == 0 and c['network_kwargs']['attn_resolutions'] == [8]
    assert c['loss_kwargs'] == dict(loss='edm2', P_mean=-0.4, P_std=1.0)
    assert c['optimizer_kwargs']['betas'] == [0.9, 0.99] and c['optimizer_kwargs']['eps'] == 1e-8
    assert c['lr_decay_batches'] == 70000
    result = CliRunner().invoke(train.main, [*base, '--arch=edm2-xs', '--lr-decay=0', '--P_mean=-1.2',
                                             '--dropout=0.1'])
    c = resolved_options(result.output)
    assert 'lr_decay_batches' not in c and c['loss_kwargs'] == dict(loss='edm2', P_mean=-1.2, P_std=1.0)
    assert c['network_kwargs']['dropout'] == 0.1
    result = CliRunner().invoke(train.main, base)
    c = resolved_options(result.output)
    assert 'lr_decay_batches' not in c and c['loss_kwargs'] == dict(loss='edm')
    assert c['optimizer_kwargs']['betas'] == [0.9, 0.999] and c['network_kwargs']['precond'] == 'edm'
    result = CliRunner().invoke(train.main, [*base, '--lr-decay=35000'])
    assert resolved_options(result.output)['lr_decay_batches'] == 35000
    for extra, message in ((['--precond=vp'], 'leave --precond=vp out'),
                           (['--implicit_mlp=1'], 'has no such option')):
        result = CliRunner().invoke(train.main, [*base, '--arch=edm2-xs', *extra])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
        assert message in result.output


def test_presets_carry_edm2s_values():
    s512, s64, patch = (presets.PRESETS[name] for name in ('edm2-img512-s', 'edm2-img64-s', 'edm2-img64-xl-patch'))
    assert s512.options['lr'] == 0.0100 and s512.options['lr_decay'] == 70000 and s512.options['batch'] == 2048
    assert s512.options['train_on_latents'] and s512.fid == 2.56 and s512.fd_dinov2 == 68.64
    assert s512.options['real_p'] == 1 and s512.options['use_pos'] is False
    assert (s64.options['P_mean'], s64.options['P_std'], s64.options['lr_decay']) == (-0.8, 1.6, 35000)
    assert s64.fid == 1.58 and 'not reproduced' in s64.fid_source
    assert patch.options['real_p'] == 0.5 and patch.options['use_pos'] and patch.options['dropout'] == 0.1
    assert patch.fid is None and patch.options['duration'] == 640 * 2 ** 20 / 1e6
    assert flags.DEFAULT_DROPOUT['edm2'] == 0


def test_train_py_on_patches_writes_a_snapshot(shapes, tmp_path, no_torchrun_env):
    """A tiny edm2 network with coordinates on patches of 32x32 images trains
    through train.py and writes a network snapshot and a training state."""
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, [f'--outdir={outdir}', f'--data={shapes[32]}', '--arch=edm2-xs',
                                             '--cond=1', '--real_p=0.5', '--use_pos=1', '--batch=4',
                                             '--duration=0.00004', '--tick=0.02', '--snap=1', '--dump=1',
                                             '--samples=0', '--lr=0.01', '--lr-rampup=0', *TINY_FLAGS])
    assert result.exit_code == 0, result.output
    (run_dir,) = outdir.iterdir()
    assert sorted(p.name for p in run_dir.glob('network-snapshot-*.pkl'))
    assert sorted(p.name for p in run_dir.glob('training-state-*.pt'))
    options = json.loads((run_dir / 'training_options.json').read_text())
    assert options['network_kwargs']['precond'] == 'edm2' and options['patch_kwargs']['real_p'] == 0.5
    assert 'edm2-xs-edm2' in run_dir.name
    state = torch.load(sorted(run_dir.glob('training-state-*.pt'))[-1], map_location='cpu', weights_only=True)
    assert all(torch.isfinite(v).all() for v in state['net'].values())
