"""Tests of the training code in one process (training/training_loop.py,
training/loss.py): a few steps of a tiny network on CPU, resume
equivalence, snapshots and training states, gradient accumulation,
non-finite losses, image accounting. train.py and multi-process runs are
in test_train_cli.py."""

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from dataset_prep.archive import convert_dataset
from torch_utils import misc, training_stats
from training import loss as loss_lib
from training import patching, runs, snapshots
from training import training_loop as tl

RESOLUTION = 32
TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0)
AUGMENT = dict(p=0.5, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
E_M_PIXEL_HALF = 0.2 * 4 + 0.3 * 2 + 0.5 * 1   # E[m] at real_p = 0.5 in pixel space: 1.9


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    """A labelled 32x32 RGB dataset of 16 demo images (5 classes)."""
    path = tmp_path_factory.mktemp('data') / 'shapes-32x32.zip'
    convert_dataset('demo:shapes:16', str(path), resolution=(RESOLUTION, RESOLUTION))
    return str(path)


def trainer_kwargs(data, **overrides):
    """Resolved options of a tiny run (what train.py would pass to Trainer)."""
    kwargs = dict(dataset_kwargs=dict(path=data, use_labels=False), network_kwargs=dict(TINY_NET),
                  loss_kwargs=dict(loss='edm'), optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
                  patch_kwargs=dict(real_p=0.5), batch_size=8, lr_rampup_kimg=0, ema_halflife_kimg=0.5, seed=1)
    performance = {key: overrides.pop(key) for key in ('precision', 'channels_last', 'compile_kwargs') if key in overrides}
    if performance:
        overrides['performance_kwargs'] = performance
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(kwargs.get(key), dict):
            value = dict(kwargs[key], **value)
        kwargs[key] = value
    return kwargs


def make_trainer(data, **overrides):
    return tl.Trainer(**trainer_kwargs(data, **overrides))


def clean_images(dataset, count):
    """The first `count` dataset images as float32 [count, C, R, R] in [-1, 1]."""
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(count)]).to(torch.float32) / 127.5 - 1


def fixed_noise_loss(net, y):
    """EDM loss of `net` on full images `y` with noise levels and noise from a fixed generator."""
    gen = torch.Generator().manual_seed(0)
    sigma = (torch.randn([y.shape[0], 1, 1, 1], generator=gen) * 1.2 - 1.2).exp()
    n = torch.randn(y.shape, generator=gen) * sigma
    with torch.no_grad():
        D_yn = net(y + n, sigma.flatten())
    weight = (sigma ** 2 + 0.5 ** 2) / (sigma * 0.5) ** 2
    return float((weight * (D_yn - y) ** 2).mean())


def assert_same_tensors(a, b):
    """Bit-exact equality of two state dicts."""
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def tensors_equal(module_a, module_b):
    a, b = dict(misc.named_params_and_buffers(module_a)), dict(misc.named_params_and_buffers(module_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------
# Steps of the Trainer.

def test_loss_finite_and_decreasing(shapes_zip):
    trainer = make_trainer(shapes_zip)
    y = clean_images(trainer.dataset, 16)
    before = fixed_noise_loss(trainer.net, y)
    collector = training_stats.Collector(regex='Loss/loss')
    collector.update()   # drop what earlier tests reported
    losses, sizes = [], []
    for _ in range(30):
        sizes.append(trainer.step())
        collector.update()
        losses.append(collector.mean('Loss/loss'))
    assert np.isfinite(losses).all(), losses
    assert len(set(sizes)) > 1, sizes   # real_p = 0.5: patches and full images
    assert np.mean(losses[-10:]) < np.mean(losses[:10]), losses
    assert fixed_noise_loss(trainer.net, y) < 0.9 * before
    assert fixed_noise_loss(trainer.ema, y) < before
    assert trainer.bad_steps == 0


def test_resume_is_bit_exact(shapes_zip, tmp_path):
    """N steps == N/2 steps, save_state, load_state into a NEW Trainer, N/2 steps:
    patch draws, crops, augmentation, dropout and data order all continue."""
    options = dict(augment_kwargs=AUGMENT, network_kwargs=dict(augment_dim=9, dropout=0.1),
                   lr_rampup_kimg=0.05, ema_rampup_ratio=0.05)
    straight = make_trainer(shapes_zip, **options)
    sizes = [straight.step() for _ in range(8)]
    assert len(set(sizes)) > 1, sizes

    first = make_trainer(shapes_zip, **options)
    assert [first.step() for _ in range(4)] == sizes[:4]
    path = tmp_path / 'training-state-000000.pt'
    runs.save_state(str(path), dict(first.state_dict(), cur_tick=3))
    raw = torch.load(path, map_location='cpu', weights_only=True)   # plain tensors and numbers only
    assert raw['step'] == 4 and raw['cur_tick'] == 3
    del first

    second = make_trainer(shapes_zip, **options)
    second.load_state_dict(runs.load_state(str(path)))
    assert second.step_count == 4 and second.cur_nimg == sum(8 * (RESOLUTION // P) for P in sizes[:4])
    assert [second.step() for _ in range(4)] == sizes[4:]
    assert_same_tensors(straight.net.state_dict(), second.net.state_dict())
    assert_same_tensors(straight.ema.state_dict(), second.ema.state_dict())
    assert straight.batches.consumed == second.batches.consumed
    adam_a, adam_b = straight.optimizer.state_dict()['state'], second.optimizer.state_dict()['state']
    assert adam_a.keys() == adam_b.keys()
    for key in adam_a:
        assert_same_tensors(adam_a[key], adam_b[key])


def test_resume_differs_without_state(shapes_zip):
    """The resume test above can fail: a fresh Trainer with the same seed that
    skips the first steps ends elsewhere."""
    straight = make_trainer(shapes_zip)
    for _ in range(4):
        straight.step()
    other = make_trainer(shapes_zip)
    other.step_count = 2
    for _ in range(2):
        other.step()
    assert not tensors_equal(straight.net, other.net)


def test_same_seed_same_initial_weights(shapes_zip):
    assert tensors_equal(make_trainer(shapes_zip).net, make_trainer(shapes_zip).net)
    assert not tensors_equal(make_trainer(shapes_zip).net, make_trainer(shapes_zip, seed=2).net)


def test_image_accounting(shapes_zip):
    trainer = make_trainer(shapes_zip, batch_size=4)
    assert trainer.schedule.expected_multiplier == pytest.approx(E_M_PIXEL_HALF)
    taken = 0
    for k in range(1, 11):
        P = trainer.step()
        taken += 4 * (RESOLUTION // P)
        assert trainer.cur_nimg == taken           # each step counts the images it used, batch * m(P)
        assert trainer.batches.consumed == taken   # m = R / P full images per patch step
    assert trainer.nimg_per_step == pytest.approx(4 * E_M_PIXEL_HALF)   # on average
    plain = make_trainer(shapes_zip, batch_size=4, patch_kwargs=dict(real_p=1.0))
    plain.step()
    assert plain.cur_nimg == 4 and plain.batches.consumed == 4


def deterministic_loss(net, y, pos=None, labels=None, augment_labels=None):
    """A noise-free loss: the network at sigma = 1 on the clean image, [N, C, H, W]."""
    return (net(y, torch.ones([y.shape[0]]), pos=pos, class_labels=labels) - y) ** 2


def test_gradient_accumulation_matches_one_round(shapes_zip):
    """batch 4 as 2 rounds of 2 equals one round of 4 (real_p = 1, no noise)."""
    trainers = [make_trainer(shapes_zip, batch_size=4, batch_gpu=b, patch_kwargs=dict(real_p=1.0))
                for b in (2, 4)]
    assert [t.num_rounds for t in trainers] == [2, 1]
    for t in trainers:
        t.loss_fn = deterministic_loss
        assert t.step() == RESOLUTION
    for (name, p), q in zip(trainers[0].net.named_parameters(), trainers[1].net.parameters()):
        # Summation order differs: compare per tensor, relative to its norm.
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), name
        # Adam's first step is lr * g / (|g| + eps): ill-conditioned where |g| ~ eps, hence atol = lr / 1000.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6)
    # The gradient is that of the mean over the 4 images of each image's summed pixel loss.
    ref = make_trainer(shapes_zip, batch_size=4, patch_kwargs=dict(real_p=1.0))
    ref.start_data()
    images, _ = ref.batches.take(1)
    y = images.to(torch.float32) / 127.5 - 1
    deterministic_loss(ref.net, y, pos=patching.full_grid(RESOLUTION, 4)).sum().div(4).backward()
    for (name, p), q in zip(ref.net.named_parameters(), trainers[1].net.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-5 * p.grad.norm(), name


def test_patch_steps_pack_rounds_by_pixels(shapes_zip):
    """--batch-gpu bounds a round's pixels: a step at P = R/m merges up to m
    rounds, so batch 8 in rounds of 2 runs 4, 2, 1 rounds at P = 32, 16, 8."""
    trainer = make_trainer(shapes_zip, batch_size=8, batch_gpu=2)
    assert trainer.round_plan(1) == (4, 1) and trainer.round_plan(2) == (2, 4) and trainer.round_plan(4) == (1, 16)
    odd = make_trainer(shapes_zip, batch_size=6, batch_gpu=2)   # 3 rounds: only divisors of 3 merge
    assert odd.round_plan(2) == (3, 2) and odd.round_plan(4) == (1, 12)
    shapes = []
    inner = trainer.loss_fn
    trainer.loss_fn = lambda **kw: shapes.append(tuple(kw['y'].shape)) or inner(**kw)
    seen = set()
    for _ in range(12):
        shapes.clear()
        P = trainer.step()
        m = RESOLUTION // P
        seen.add(P)
        assert shapes == [(8 * m // len(shapes), 3, P, P)] * {1: 4, 2: 2, 4: 1}[m], (P, shapes)
    assert seen == {8, 16, 32}


def test_merged_patch_round_equals_one_big_round(shapes_zip):
    """The loss normalisation holds when rounds merge: an 8 px step (m = 4) of
    batch 8 in rounds of 2 (merged into one round of 32 patches) gives the
    gradient of the same step run as one round of batch 8."""
    trainers = [make_trainer(shapes_zip, batch_size=8, batch_gpu=b) for b in (2, 8)]
    step = next(k for k in range(100) if trainers[0].schedule.draw(k, 0.0) == 8)
    for t in trainers:
        t.loss_fn = deterministic_loss
        t.step_count = step
        assert t.step() == 8
    for (name, p), q in zip(trainers[0].net.named_parameters(), trainers[1].net.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-5 * q.grad.norm(), name
    assert trainers[0].batches.consumed == trainers[1].batches.consumed == 32


def test_loss_scaling_divides_adams_epsilon_as_in_edm(shapes_zip):
    """--ls scales the loss and, as in EDM, Adam sees the scaled gradients:
    the update of (ls = L, eps = e) is that of (ls = 1, eps = e / L). Adam's
    eps = 1 makes the update depend on the gradient's scale (lr * g for small
    g), so the two differ from (ls = 1, eps = 1)."""
    def run(ls, eps):
        t = make_trainer(shapes_zip, batch_size=4, loss_scaling=ls, patch_kwargs=dict(real_p=1.0),
                         optimizer_kwargs=dict(eps=eps))
        t.loss_fn = deterministic_loss
        t.step()
        t.step()
        return t
    scaled, small_eps, plain = run(256, 1.0), run(1, 1.0 / 256), run(1, 1.0)
    for (name, p), q in zip(small_eps.net.named_parameters(), scaled.net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    moved = [(p - q).abs().max() for p, q in zip(plain.net.parameters(), scaled.net.parameters())]
    assert max(moved) > 1e-4


def test_channels_last_trains_the_same(shapes_zip, tmp_path):
    """channels_last changes the memory layout only: same steps, same weights
    (to float rounding), and snapshots are written in the standard layout."""
    plain = make_trainer(shapes_zip, patch_kwargs=dict(real_p=0.5))
    fast = make_trainer(shapes_zip, patch_kwargs=dict(real_p=0.5), channels_last=True)
    conv = fast.net.model.enc['32x32_conv'].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    sizes = []
    for _ in range(4):
        sizes.append((plain.step(), fast.step()))
        # Same data, noise and patches: the gradients agree to float rounding (per tensor, relative
        # to its norm; Adam's sign-like first steps amplify rounding in the weights themselves).
        for (name, p), q in zip(plain.net.named_parameters(), fast.net.parameters()):
            assert (p.grad - q.grad).norm() <= 1e-3 * p.grad.norm(), name
    assert all(a == b for a, b in sizes) and len({a for a, _ in sizes}) > 1, sizes
    path = tmp_path / 'network-snapshot-000000.pkl'
    snapshots.save_snapshot(str(path), fast.ema, fast.loss_fn, None, {})
    with open(path, 'rb') as f:
        saved = pickle.load(f)['ema']
    assert all(p.is_contiguous() for p in saved.parameters())
    torch.testing.assert_close(dict(saved.named_parameters())['model.enc.32x32_conv.weight'],
                               fast.ema.model.enc['32x32_conv'].weight)


def test_bf16_autocast_steps_track_fp32(shapes_zip):
    """precision='bf16' (--bf16=1) runs the steps under bf16 autocast, here
    on CPU: the first step's loss is the fp32 one to bf16 accuracy, and the
    weights stay float32."""
    def first_loss(precision):
        trainer = make_trainer(shapes_zip, precision=precision, patch_kwargs=dict(real_p=1.0))
        collector = training_stats.Collector(regex='Loss/loss')
        collector.update()
        trainer.step()
        collector.update()
        assert all(p.dtype == torch.float32 for p in trainer.net.parameters())
        return collector.mean('Loss/loss'), trainer
    fp32, _ = first_loss('fp32')
    bf16, trainer = first_loss('bf16')
    assert trainer.autocast['enabled'] and trainer.autocast['dtype'] == torch.bfloat16
    assert np.isfinite(bf16) and bf16 != fp32
    assert abs(bf16 - fp32) <= 0.03 * fp32


def test_compiled_network_trains_the_same(shapes_zip):
    """compile_kwargs wraps the network in torch.compile (here with the 'eager'
    backend: the graph capture without code generation, seconds on CPU);
    the parameters trained are those of trainer.net, and the steps equal the
    uncompiled ones."""
    plain = make_trainer(shapes_zip, batch_size=4)
    compiled = make_trainer(shapes_zip, batch_size=4, compile_kwargs=dict(backend='eager', dynamic=False))
    assert isinstance(compiled.ddp, torch._dynamo.eval_frame.OptimizedModule)
    sizes = [(plain.step(), compiled.step()) for _ in range(4)]
    assert all(a == b for a, b in sizes), sizes
    for (name, p), q in zip(plain.net.named_parameters(), compiled.net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert not tensors_equal(compiled.net, make_trainer(shapes_zip, batch_size=4).net)   # it did train


class NaNAt:
    """Wraps a loss; returns NaN on the given (0-based) steps of `trainer`."""

    def __init__(self, trainer, bad_steps):
        self.trainer, self.bad_steps, self.inner = trainer, bad_steps, trainer.loss_fn

    def __call__(self, **kwargs):
        loss = self.inner(**kwargs)
        return loss * float('nan') if self.trainer.step_count in self.bad_steps else loss


def test_nan_step_is_skipped_and_counted(shapes_zip):
    trainer = make_trainer(shapes_zip)
    trainer.loss_fn = NaNAt(trainer, {2})
    trainer.step()
    trainer.step()
    assert trainer.bad_steps == 0 and trainer.last_bad_step is None
    before = {k: v.clone() for k, v in trainer.net.state_dict().items()}
    moments = {k: {n: t.clone() for n, t in v.items()} for k, v in trainer.optimizer.state_dict()['state'].items()}
    trainer.step()
    assert trainer.bad_steps == 1 and trainer.step_count == 3 and trainer.last_bad_step == 2
    assert_same_tensors(before, trainer.net.state_dict())
    assert all(s['step'] == 2 for s in trainer.optimizer.state_dict()['state'].values())   # Adam skipped
    for key, value in moments.items():   # its moments untouched
        assert_same_tensors(value, trainer.optimizer.state_dict()['state'][key])
    assert all(torch.isfinite(p).all() for p in trainer.ema.parameters())
    trainer.step()
    assert trainer.bad_steps == 1
    assert not torch.equal(before['model.map_layer0.weight'], trainer.net.state_dict()['model.map_layer0.weight'])


class AlwaysNaNLoss(loss_lib.EDMLoss):
    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        return super().__call__(net, y, pos, labels, augment_labels) * float('nan')


class NaNFromStepLoss(loss_lib.EDMLoss):
    """NaN from call number `first_bad` (0-based) on; one call per step when batch_gpu = batch."""

    def __init__(self, first_bad):
        super().__init__()
        self.first_bad, self.calls = first_bad, 0

    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        loss = super().__call__(net, y, pos, labels, augment_labels)
        self.calls += 1
        return loss * float('nan') if self.calls > self.first_bad else loss


def steps_until(total_nimg, batch=8, seed=1):
    """Steps of the loop_kwargs run: each adds batch * m(P) images, P drawn by the step's seed."""
    schedule, nimg, steps = patching.PatchSchedule(RESOLUTION, 0.5, seed=seed), 0, 0
    while nimg < int(total_nimg):
        nimg += batch * schedule.multiplier(schedule.draw(steps))
        steps += 1
    return steps


def loop_kwargs(data, run_dir, **overrides):
    """training_loop options of a tiny run: one step per tick (kimg_per_tick tiny)."""
    loop = dict(run_dir=str(run_dir), kimg_per_tick=1e-6, snapshot_ticks=1, state_dump_ticks=1, sample_count=0,
                tensorboard=False)
    loop.update((k, overrides.pop(k)) for k in list(overrides) if k in loop or k == 'max_bad_steps')
    return dict(trainer_kwargs(data, total_kimg=8 * 8 * E_M_PIXEL_HALF / 1000, **overrides), **loop)


def test_training_loop_stops_on_nan(shapes_zip, tmp_path, monkeypatch):
    monkeypatch.setitem(loss_lib.LOSSES, 'nan', AlwaysNaNLoss)
    with pytest.raises(FloatingPointError, match=r'step 0\b.*tick 0\b'):
        tl.training_loop(**loop_kwargs(shapes_zip, tmp_path, loss_kwargs=dict(loss='nan'), max_bad_steps=0))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(('training-state', 'network-snapshot'))]


def test_training_loop_keeps_states_from_before_the_bad_step(shapes_zip, tmp_path, monkeypatch):
    """NaN from step 3 (0-based) on, one step per tick: the error names step 3
    and tick 3, and the newest training state holds 3 steps (steps 0 to 2)."""
    monkeypatch.setitem(loss_lib.LOSSES, 'nan3', lambda: NaNFromStepLoss(3))
    with pytest.raises(FloatingPointError, match=r'step 3\b.*tick 3\b'):
        tl.training_loop(**loop_kwargs(shapes_zip, tmp_path, loss_kwargs=dict(loss='nan3'), max_bad_steps=0))
    states = [name for name in os.listdir(tmp_path) if name.startswith('training-state')]
    assert states == ['training-state-000000.pt']   # one per tick, the same kimg name
    state = runs.load_state(str(tmp_path / states[0]))
    assert state['step'] == 3 and state['cur_tick'] == 3
    assert all(torch.isfinite(v).all() for v in state['net'].values())


class NaNOnceLoss(loss_lib.EDMLoss):
    """NaN on call number `bad` (0-based) only."""

    def __init__(self, bad):
        super().__init__()
        self.bad, self.calls = bad, 0

    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        loss = super().__call__(net, y, pos, labels, augment_labels)
        self.calls += 1
        return loss * float('nan') if self.calls - 1 == self.bad else loss


def test_bad_step_message_names_the_bad_step(shapes_zip, tmp_path, monkeypatch):
    """A bad step inside a long tick: the message names that step, not the tick's last."""
    monkeypatch.setitem(loss_lib.LOSSES, 'nan1once', lambda: NaNOnceLoss(1))
    kwargs = loop_kwargs(shapes_zip, tmp_path, loss_kwargs=dict(loss='nan1once'), max_bad_steps=0)
    kwargs['kimg_per_tick'] = 4 * 8 * 4 / 1000   # tick 1 = steps 1 to 4 at least (4 images per step at most)
    with pytest.raises(FloatingPointError, match=r'1 training steps .*step 1\b.*tick 1\b'):
        tl.training_loop(**kwargs)


# ----------------------------------------------------------------------------
# A whole (tiny) training_loop: snapshots, states, stats, sample grid.

@pytest.fixture(scope='module')
def loop_run(shapes_zip, tmp_path_factory):
    """training_loop for 8 steps at batch 8, real_p 0.5, one step per tick,
    a 4-image sample grid; returns (run_dir, ema, kwargs)."""
    run_dir = tmp_path_factory.mktemp('run')
    kwargs = loop_kwargs(shapes_zip, run_dir, sample_count=4, state_dump_ticks=3)
    ema = tl.training_loop(**kwargs)
    return run_dir, ema, kwargs


def test_snapshot_reloads_with_same_outputs(loop_run):
    run_dir, ema, kwargs = loop_run
    path = run_dir / 'network-snapshot-000000.pkl'
    with open(path, 'rb') as f:
        data = pickle.load(f)
    assert {'ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs', 'patch_kwargs'} <= set(data)
    assert data['patch_kwargs']['real_p'] == 0.5
    assert data['dataset_kwargs']['path'] == kwargs['dataset_kwargs']['path']
    assert isinstance(data['loss_fn'], loss_lib.EDMLoss)

    net, meta = snapshots.load_network(str(path))
    assert tensors_equal(net, ema)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn([3, 3, RESOLUTION, RESOLUTION], generator=gen)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    with torch.no_grad():
        assert torch.equal(net(x, sigma), ema(x, sigma))
        patch = x[:, :, :16, 8:24]
        pos = patching.patch_grid(torch.zeros(3, dtype=torch.long), torch.full([3], 8), 16, RESOLUTION)
        assert torch.equal(net(patch, sigma, pos=pos), ema(patch, sigma, pos=pos))
    assert meta.patch_kwargs['real_p'] == 0.5


def test_training_state_loads_weights_only(loop_run):
    run_dir, ema, _ = loop_run
    path = runs.find_latest_state(str(run_dir))
    assert path == str(run_dir / 'training-state-000000.pt')
    state = torch.load(path, map_location='cpu', weights_only=True)
    assert state['step'] == steps_until(8 * 8 * E_M_PIXEL_HALF) and state['format'] == 'patch-diffusion-state-v1'
    assert_same_tensors(state['ema'], ema.state_dict())
    assert set(state) >= {'net', 'ema', 'optimizer', 'step', 'consumed', 'seed', 'cur_tick'}


def test_stats_progress_matches_image_accounting(loop_run):
    run_dir, _, _ = loop_run
    lines = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    assert len(lines) == steps_until(8 * 8 * E_M_PIXEL_HALF)   # one step per tick
    steps, images = 0, 0
    for tick, stats in enumerate(lines):
        assert stats['Progress/tick']['mean'] == tick
        counts = {int(m.group(1)): v['mean'] for k, v in stats.items() if (m := re.fullmatch(r'Patches/steps_(\d+)px', k))}
        steps += sum(counts.values())
        images += sum(8 * (RESOLUTION // P) * n for P, n in counts.items())   # batch * m(P) per step
        assert stats['Progress/kimg']['mean'] * 1000 == pytest.approx(images)
        assert np.isfinite(stats['Loss/loss']['mean'])
        assert stats['Progress/bad_steps']['mean'] == 0
    assert steps == len(lines)


def test_sample_grid_written(loop_run):
    import PIL.Image
    run_dir, _, _ = loop_run
    with PIL.Image.open(run_dir / 'samples-000000.png') as image:
        assert image.size[0] >= 2 * RESOLUTION and image.size[1] >= RESOLUTION


# ----------------------------------------------------------------------------
# Transfer of weights between snapshots.

def test_transfer_weights_copies_everything(loop_run, shapes_zip):
    run_dir, ema, _ = loop_run
    fresh = make_trainer(shapes_zip, seed=7)
    assert not tensors_equal(fresh.net, ema)
    copied, missing = snapshots.transfer_weights(str(run_dir / 'network-snapshot-000000.pkl'), fresh.net)
    assert sorted(copied) == sorted(name for name, _ in misc.named_params_and_buffers(fresh.net))
    assert missing == []
    assert tensors_equal(fresh.net, ema)


def test_transfer_weights_rejects_other_pickles(tmp_path):
    path = tmp_path / 'not-a-snapshot.pkl'
    path.write_bytes(pickle.dumps(dict(weights=[1, 2])))
    with pytest.raises(ValueError, match='ema'):
        snapshots.transfer_weights(str(path), torch.nn.Linear(2, 2))


def test_ema_ramp_up_counts_the_images_before_the_step(shapes_zip):
    """As EDM: the first step has seen no image before it, so its ramped-up
    half-life is 0 and the EMA equals the network after it (a ramp-up ratio
    of 10 keeps the second step's EMA clearly behind)."""
    trainer = make_trainer(shapes_zip, ema_rampup_ratio=10)
    trainer.step()
    assert tensors_equal(trainer.ema, trainer.net)
    trainer.step()
    assert not tensors_equal(trainer.ema, trainer.net)


def test_progressive_phases_are_shares_of_the_images(shapes_zip):
    """--progressive=1: the sizes come in increasing order, a step at size P
    counts batch * m(P) images, and it trains on the first size whose
    cumulative share is >= the whole kimg seen before the step over the
    duration in kimg (the official code's switch points: here R/4 until
    1 kimg, not until 0.2 of the run; tests/test_patching.py has longer runs)."""
    trainer = make_trainer(shapes_zip, batch_size=32, total_kimg=2, patch_kwargs=dict(progressive=True))
    cum = np.cumsum(trainer.schedule.probs)
    sizes = []
    while trainer.cur_nimg < trainer.total_nimg:
        before = trainer.cur_nimg
        P = trainer.step()
        sizes.append(P)
        assert trainer.cur_nimg - before == 32 * (RESOLUTION // P)
        assert trainer.schedule.sizes.index(P) == int(np.argmax(before // 1000 / 2 <= cum))
    assert sizes == [8] * 8 + [16] * 16   # 8 steps of 128 images, then 16 of 64


def test_loop_disables_reduced_precision_fp16_reductions(loop_run):
    """As EDM's training loop (it matters for --fp16 on CUDA)."""
    assert torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction is False


def test_trainer_crops_on_the_input_grid_when_asked(shapes_zip):
    """patch_kwargs crop_align='grid': every crop a training step takes starts on a multiple of the
    network's input multiple (2 for this two-level UNet); the default starts anywhere."""
    full = patching.full_grid(RESOLUTION, 1)[0, 0, 0]   # x of each column of the full image
    for align, on_grid in [('grid', True), ('pixel', False)]:
        trainer = make_trainer(shapes_zip, patch_kwargs=dict(real_p=0, crop_align=align))
        assert trainer.schedule.corner_step == (2 if on_grid else 1)
        corners = []
        inner = trainer.loss_fn
        trainer.loss_fn = lambda **kw: corners.extend(kw['pos'][:, :, 0, 0].flatten().tolist()) or inner(**kw)
        for _ in range(6):
            trainer.step()
        columns = [int((full - value).abs().argmin()) for value in corners]   # pixel index of each corner
        assert len(columns) >= 6 * 8 * 2
        assert all(column % 2 == 0 for column in columns) == on_grid
