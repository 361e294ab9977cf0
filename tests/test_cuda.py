"""CUDA checks: skipped without a GPU (CI has none; benchmarks/gpu_check.sh
runs them on a GPU machine). They cover what CPU tests cannot: a training
step that never waits for the device, fused Adam's on-device skip of a
non-finite step, fp32/bf16/fp16 and channels-last on CUDA, torch.compile,
sampling and feature statistics on CUDA against CPU, and train.py under
torchrun with NCCL followed by generate.py on the GPU."""

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from proctools import run_all
from dataset_prep.archive import convert_dataset
from evaluation import metrics
from training import architectures, denoiser, generation, image_io, samplers
from training import training_loop as tl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')

CUDA = torch.device('cuda')
TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], use_pos=True, dropout=0)


@pytest.fixture(scope='module', autouse=True)
def exact_fp32():
    """As training_loop: no TF32, so fp32 on CUDA is comparable with CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:64', str(path), resolution=(32, 32))
    return str(path)


def make_trainer(data, device=None, precision='fp32', use_fp16=False, real_p=0.5, **overrides):
    device = device or CUDA
    kwargs = dict(dataset_kwargs=dict(path=data, use_labels=False), network_kwargs=dict(TINY_NET, use_fp16=use_fp16),
                  loss_kwargs=dict(loss='edm'), optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
                  patch_kwargs=dict(real_p=real_p), batch_size=16, lr_rampup_kimg=0, ema_halflife_kimg=0.5, seed=1,
                  data_loader_kwargs=dict(num_workers=0, pin_memory=device.type == 'cuda'), device=device,
                  performance_kwargs=dict(precision=precision))
    for key in ('channels_last', 'compile_kwargs'):
        if key in overrides:
            kwargs['performance_kwargs'][key] = overrides.pop(key)
    kwargs.update(overrides)
    return tl.Trainer(**kwargs)


def deterministic_loss(net, y, pos=None, labels=None, augment_labels=None):
    """The network at sigma = 1 on the clean patches: no random draws, so CPU and CUDA see the same inputs."""
    return (net(y, torch.ones([y.shape[0]], device=y.device), pos=pos, class_labels=labels) - y) ** 2


def steps_until_every_size(trainer, limit=40):
    seen = set()
    for _ in range(limit):
        seen.add(trainer.step())
        if seen >= set(trainer.schedule.sizes):
            return seen
    raise AssertionError(f'patch sizes {sorted(seen)} after {limit} steps')


# ----------------------------------------------------------------------------
# Training steps.

@pytest.mark.parametrize('precision,channels_last', [('fp32', False), ('bf16', True)])
def test_training_step_never_waits_for_the_device(shapes_zip, precision, channels_last):
    """After the first step of each patch size (cuDNN autotuning, optimizer
    state), steps make no synchronising CUDA call: no .item(), no blocking
    copies. torch's sync debug mode turns any such call into an error."""
    trainer = make_trainer(shapes_zip, precision=precision, channels_last=channels_last)
    steps_until_every_size(trainer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        sizes = {trainer.step() for _ in range(12)}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(sizes) > 1
    assert trainer.bad_steps == 0 and all(torch.isfinite(p).all() for p in trainer.net.parameters())


def test_cuda_gradients_match_cpu(shapes_zip):
    """fp32 (TF32 off): the same step on CUDA and on CPU gives the same gradients, to float rounding."""
    trainers = [make_trainer(shapes_zip, device=torch.device(d), real_p=1.0) for d in ('cpu', 'cuda')]
    for t in trainers:
        t.loss_fn = deterministic_loss
        t.step()
    for (name, p), q in zip(trainers[0].net.named_parameters(), trainers[1].net.parameters()):
        assert (p.grad - q.grad.cpu()).norm() <= 1e-4 * p.grad.norm() + 1e-12, name


def test_non_finite_step_is_skipped_on_the_device(shapes_zip):
    trainer = make_trainer(shapes_zip)
    trainer.step()
    inner = trainer.loss_fn
    trainer.loss_fn = lambda **kw: inner(**kw) * float('nan')
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    trainer.step()
    assert trainer.bad_steps == 1 and trainer.last_bad_step == 1
    for name, value in trainer.net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert all(int(s['step']) == 1 for s in trainer.optimizer.state_dict()['state'].values())
    trainer.loss_fn = inner
    trainer.step()
    assert trainer.bad_steps == 1
    assert not torch.equal(before['model.map_layer0.weight'], trainer.net.state_dict()['model.map_layer0.weight'])


@pytest.mark.parametrize('precision,use_fp16,ls', [('bf16', False, 1), ('fp32', True, 100)])
def test_low_precision_steps_track_fp32(shapes_zip, precision, use_fp16, ls):
    """bf16 autocast and the fp16 network (with loss scaling) give the fp32
    loss of the same step to a few percent, and train."""
    def first_losses(trainer, steps=8):
        from torch_utils import training_stats
        collector = training_stats.Collector(regex='Loss/loss')
        collector.update()
        out = []
        for _ in range(steps):
            trainer.step()
            collector.update()
            out.append(collector.mean('Loss/loss'))
        return np.array(out)
    reference = first_losses(make_trainer(shapes_zip))
    low = first_losses(make_trainer(shapes_zip, precision=precision, use_fp16=use_fp16, loss_scaling=ls))
    assert np.isfinite(low).all(), low
    assert abs(low[0] - reference[0]) <= 0.05 * reference[0], (low, reference)
    assert np.abs(low - reference).mean() <= 0.1 * reference.mean(), (low, reference)


@pytest.mark.timeout(600)
def test_compiled_training_matches_eager(shapes_zip):
    """torch.compile (inductor, one graph per patch shape) trains like eager
    mode: the first step's gradients agree to rounding (inductor reorders
    sums; later steps also inherit Adam's amplification of rounding), and
    the compiled run keeps training to nearly the same weights."""
    eager = make_trainer(shapes_zip, real_p=1.0)
    compiled = make_trainer(shapes_zip, real_p=1.0, compile_kwargs=dict(dynamic=False))
    for t in (eager, compiled):
        t.loss_fn = deterministic_loss
        t.step()
    total = torch.stack([p.grad.norm() for p in eager.net.parameters()]).norm()
    for (name, p), q in zip(eager.net.named_parameters(), compiled.net.parameters()):
        # Relative per tensor, with a floor for tensors whose gradient is ~0 (rounding dominates there).
        assert (p.grad - q.grad).norm() <= 2e-3 * p.grad.norm() + 1e-5 * total, name
    for _ in range(2):
        eager.step()
        compiled.step()
    a = torch.cat([p.flatten() for p in eager.net.parameters()])
    b = torch.cat([p.flatten() for p in compiled.net.parameters()])
    assert (a - b).norm() <= 1e-2 * a.norm()


# ----------------------------------------------------------------------------
# Sampling and statistics.

def tiny_network(seed=0):
    torch.manual_seed(seed)
    return architectures.build_network(dict(TINY_NET), 32, 3, 0).eval().requires_grad_(False)


def test_sampling_on_cuda_matches_cpu_and_ignores_the_batch_size():
    """The sampler on CUDA: the deterministic EDM sampler from the same initial
    noise gives the CPU's images; with generate_images' per-seed noise
    (drawn by the device's generator, as EDM does) image k does not depend
    on the batch size."""
    net = tiny_network()
    noise = torch.randn([4, 3, 32, 32], generator=torch.Generator().manual_seed(0))

    def deterministic(device):
        out = samplers.edm_sampler(denoiser.make_denoiser(net.to(device)), noise.to(device), num_steps=6)
        return image_io.to_uint8(out).cpu().to(torch.int32)
    cpu, cuda = deterministic('cpu'), deterministic('cuda')
    assert cpu.float().std() > 10                          # real images, not a constant
    assert (cuda - cpu).abs().float().mean() < 0.05 and (cuda - cpu).abs().max() <= 2

    def generated(batch):
        out = generation.generate_images(net.to(CUDA), list(range(6)), batch_size=batch, device=CUDA, num_steps=6,
                                       rank=0, world_size=1)
        return torch.cat([images.cpu() for _, images in out]).to(torch.int32)
    assert (generated(6) - generated(2)).abs().max() <= 1   # batching changes rounding only


class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2)

    def forward(self, images, return_features=False):
        return self.conv(images.to(torch.float32) / 255).mean(dim=(2, 3))


def test_feature_statistics_on_cuda_match_cpu():
    torch.manual_seed(0)
    detector = TinyDetector()
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    batches = list(images.split(16))
    mu_cpu, sigma_cpu = metrics.calculate_stats(batches, detector, device='cpu')
    mu_gpu, sigma_gpu = metrics.calculate_stats(batches, detector.to(CUDA), device=CUDA)
    np.testing.assert_allclose(mu_gpu, mu_cpu, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma_gpu, sigma_cpu, rtol=1e-4, atol=1e-8)


# ----------------------------------------------------------------------------
# The command lines on the GPU.

@pytest.mark.timeout(600)
def test_torchrun_nccl_training_then_generate_on_cuda(shapes_zip, tmp_path, subprocess_env, repo_root, free_port):
    outdir = tmp_path / 'runs'
    train = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=1', '--master_addr=127.0.0.1',
             f'--master_port={free_port}', str(repo_root / 'train.py'), f'--outdir={outdir}', f'--data={shapes_zip}',
             '--arch=ddpmpp', '--cbase=16', '--cres=1,2', '--blocks=1', '--attn=none', '--batch=16',
             '--duration=0.0005', '--tick=0.00025', '--snap=1', '--dump=1', '--bf16=1', '--channels-last=1',
             '--real_p=0.5', '--samples=4', '--seed=0', '--workers=1', '--device=cuda']
    (code, output), = run_all([train], subprocess_env, timeout=300)
    assert code == 0, output
    run_dir = outdir / os.listdir(outdir)[0]
    with open(run_dir / 'training_options.json') as f:
        assert json.load(f)['device'].startswith('cuda')
    snapshots = sorted(run_dir.glob('network-snapshot-*.pkl'))
    assert snapshots and sorted(run_dir.glob('samples-*.png'))
    with open(snapshots[-1], 'rb') as f:
        ema = pickle.load(f)['ema']
    assert next(ema.parameters()).device.type == 'cpu'
    generate = [sys.executable, str(repo_root / 'generate.py'), f'--network={snapshots[-1]}',
                f'--outdir={tmp_path / "images"}', '--seeds=0-3', '--batch=2', '--steps=4', '--device=cuda']
    (code, output), = run_all([generate], subprocess_env, timeout=300)
    assert code == 0, output
    assert sorted(os.listdir(tmp_path / 'images')) == [f'{s:06d}.png' for s in range(4)]
