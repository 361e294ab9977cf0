"""The benchmark scripts: their arithmetic, their alternation, and short end-to-end runs on tiny data."""

import itertools
import json
import subprocess
import sys
import time

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from tests.conftest import REPO_ROOT, makefile_demo_flags
from evaluation import metrics
from training import config
from training.dataset import ImageFolderDataset
from training.patching import PatchSchedule

sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
import bench_common  # noqa: E402
import bench_sample  # noqa: E402
import bench_train  # noqa: E402
import count_ops  # noqa: E402
import quality_vs_time  # noqa: E402
import check_vs_edm2  # noqa: E402


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    """12 demo shapes at 32x32, with labels."""
    return bench_common.build_demo_dataset(str(tmp_path_factory.mktemp('data') / 'shapes.zip'), 32, count=12)


def last_json_line(output):
    return json.loads(output.strip().splitlines()[-1])


# ----------------------------------------------------------------------------
# bench_train arithmetic.


@pytest.mark.parametrize('resolution', [32, 64])
def test_ideal_ratio_is_images_over_pixels(resolution):
    # real_p = 0.5: E[m] = 0.5 + 0.3 * 2 + 0.2 * 4 = 1.9; E[P/R] = 0.5 + 0.3 / 2 + 0.2 / 4 = 0.7.
    assert bench_train.ideal_ratio(PatchSchedule(resolution, 0.5)) == pytest.approx(1.9 / 0.7)
    assert bench_train.ideal_ratio(PatchSchedule(resolution, 1.0)) == pytest.approx(1.0)


def test_expected_step_time_proportional_to_pixels_gives_the_ideal_ratio():
    schedule, plain = PatchSchedule(64, 0.25), PatchSchedule(64, 1.0)
    sec = {16: 0.25, 32: 0.5, 64: 1.0}
    ratio = (schedule.expected_multiplier / bench_train.expected_per_step(schedule, sec)) / \
        (plain.expected_multiplier / bench_train.expected_per_step(plain, sec))
    assert ratio == pytest.approx(bench_train.ideal_ratio(schedule))
    assert bench_train.expected_per_step(schedule, {64: 1.0}) is None   # a size never timed


class FakeTrainer:
    """Steps of known patch sizes; appends (name, P) to a shared log."""

    def __init__(self, name, real_p, log, sizes):
        self.name, self.log, self.sizes = name, log, sizes
        self.schedule = PatchSchedule(32, real_p)
        self.nimg_per_step = 8 * self.schedule.expected_multiplier
        self.count = 0

    def step(self):
        P = self.sizes[self.count % len(self.sizes)]
        self.count += 1
        self.log.append((self.name, P))
        return P


def test_measure_alternates_blocks_in_rotating_order():
    log = []
    trainers = {1.0: FakeTrainer('a', 1.0, log, [32]), 0.5: FakeTrainer('b', 0.5, log, [8, 16, 32])}
    records, memory = bench_train.measure(trainers, rounds=3, block=2, device='cpu')
    assert [name for name, _ in log] == list('aabb' 'bbaa' 'aabb')
    assert len(records) == 12 and set(memory) == {1.0, 0.5}
    assert [r['P'] for r in records if r['real_p'] == 0.5] == [8, 16, 32, 8, 16, 32]


def test_measure_adds_rounds_until_each_patch_size_was_timed():
    log = []
    trainers = {1.0: FakeTrainer('a', 1.0, log, [32]), 0.5: FakeTrainer('b', 0.5, log, [32, 32, 16, 8])}
    records, _ = bench_train.measure(trainers, rounds=1, block=1, device='cpu', max_extra_rounds=5)
    assert [r['round'] for r in records if r['real_p'] == 0.5] == [0, 1, 2, 3]   # 8px first timed in round 3
    log.clear()
    trainers = {0.5: FakeTrainer('c', 0.5, log, [32])}   # never draws 8 or 16: stops at the cap
    records, _ = bench_train.measure(trainers, rounds=1, block=1, device='cpu', max_extra_rounds=2)
    assert len(records) == 3


def test_summarize_uses_the_image_accounting():
    log = []
    trainers = {1.0: FakeTrainer('a', 1.0, log, [32]), 0.5: FakeTrainer('b', 0.5, log, [8, 16, 32])}
    records = [dict(real_p=1.0, round=0, P=32, seconds=1.0), dict(real_p=0.5, round=0, P=32, seconds=3.0),
               dict(real_p=0.5, round=0, P=16, seconds=1.0), dict(real_p=0.5, round=0, P=8, seconds=0.5)]
    memory = {key: bench_common.PeakMemory('cpu') for key in trainers}
    rows, sec_by_patch, steps_by_patch = bench_train.summarize(trainers, records, memory)
    assert sec_by_patch == {8: 0.5, 16: 1.0, 32: 2.0} and steps_by_patch == {8: 1, 16: 1, 32: 2}
    expected = 0.5 * 2.0 + 0.3 * 1.0 + 0.2 * 0.5                     # pooled by patch size
    assert rows[0.5]['sec_per_step'] == pytest.approx(expected)
    assert rows[0.5]['kimg_per_s'] == pytest.approx(8 * 1.9 / expected / 1e3)
    assert rows[0.5]['sec_per_step_drawn'] == pytest.approx(4.5 / 3)
    assert rows[0.5]['ratio'] == pytest.approx((1.9 / expected) / (1 / 2.0))
    assert rows[1.0]['ratio'] == pytest.approx(1.0)


def test_peak_memory_sees_a_large_allocation_on_cpu():
    tracker = bench_common.PeakMemory('cpu', interval=0.001)
    with tracker.measure():
        block = torch.ones(64 * 2**20 // 4)   # 64 MiB, written
        time.sleep(0.05)
        del block
    assert tracker.growth > 32 * 2**20 and tracker.peak > tracker.growth


# ----------------------------------------------------------------------------
# End to end, tiny.


def test_bench_train_cli_prints_a_json_summary(shapes_zip):
    result = CliRunner().invoke(bench_train.main, ['--data', shapes_zip, '--batch', '2', '--real-p', '1,0.5',
                                                   '--rounds', '1', '--block', '1', '--warmup', '0',
                                                   '--threads', '1', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    summary = last_json_line(result.output)
    assert summary['preset'] == 'cpu-small' and summary['device'] == 'cpu' and summary['batch'] == 2
    assert set(summary['kimg_per_s']) == {'1.0', '0.5'} and 'ratio_0.5' in summary
    sec = summary['sec_per_step']['1.0']
    assert summary['kimg_per_s']['1.0'] == pytest.approx(2 / sec / 1e3)
    assert summary['mem_kind'] == 'cpu_rss'


def test_step_flops_follow_the_patch_work(shapes_zip):
    """A patch step of m = R/P batches of P x P patches does P/R of the convolution
    work of a full-image step (the per-image embedding layers add a little)."""
    dataset = bench_common.benchmark_dataset(bench_common.PRESETS['cpu-small'], shapes_zip, None)
    trainers = bench_train.make_trainers(bench_common.PRESETS['cpu-small'], dataset, [0.5], batch=2)
    trainer = trainers[0.5]
    flops = {P: bench_train.step_flops(trainer, P) for P in trainer.schedule.sizes}
    assert flops[32] > 1e9   # a 1.7M-parameter DDPM++ at 32x32: about 1.2 GFLOP per image, x3 with backward
    assert flops[16] / flops[32] == pytest.approx(0.5, rel=0.05)
    assert flops[8] / flops[32] == pytest.approx(0.25, rel=0.05)
    assert all(p.grad is None for p in trainer.net.parameters())   # counting leaves no gradients behind
    rows = {0.5: dict(sec_per_step=2.0)}
    bench_train.add_flops(rows, trainers, 'bf16', 'NVIDIA H100 80GB HBM3')
    expected = sum(q * flops[P] for P, q in zip(trainer.schedule.sizes, trainer.schedule.probs))
    assert rows[0.5]['tflop_per_step'] == pytest.approx(expected / 1e12)
    assert rows[0.5]['peak_fraction'] == pytest.approx(expected / 2.0 / 989.4e12)


def test_count_ops_sees_the_autocast_casts():
    """bf16 autocast adds dtype casts to the same convolutions; the backward pass is counted."""
    fp32 = count_ops.count_operators(bench_common.PRESETS['cpu-demo'], 'fp32')
    bf16 = count_ops.count_operators(bench_common.PRESETS['cpu-demo'], 'bf16')
    assert fp32['convolution'] == bf16['convolution'] == fp32['convolution_backward'] > 0
    assert bf16['_to_copy'] > fp32['_to_copy'] and sum(bf16.values()) > sum(fp32.values())


def test_peak_table_matches_specific_names_first():
    assert bench_common.peak_tflops('NVIDIA H100 PCIe', 'bf16') == 756.0
    assert bench_common.peak_tflops('NVIDIA H100 80GB HBM3', 'bf16') == 989.4
    assert bench_common.peak_tflops('NVIDIA H200', 'fp32') == 66.9
    assert bench_common.peak_tflops('Some New Card', 'bf16') is None
    assert bench_common.peak_tflops(None, 'bf16') is None


def test_cpu_demo_preset_is_the_make_demo_network():
    """cpu-demo's options are those of `make demo`, as train.py parses them, so both build the same network."""
    demo = train.main.make_context('train.py', makefile_demo_flags() + ['--outdir=unused', '--data=unused']).params
    preset = bench_common.PRESETS['cpu-demo']
    given = {key: value for key, value in preset.options.items() if key != 'batch_gpu'}
    assert {key: demo[key] for key in given} == given
    assert demo['batch_gpu'] is None and preset.options['batch_gpu'] == preset.options['batch']   # one round
    demo_options = dnnlib.EasyDict(config.DEFAULTS, **{k: v for k, v in demo.items() if k in config.DEFAULTS})
    assert bench_common.network_kwargs(preset) == config.network_kwargs(demo_options)
    net = bench_sample.fresh_network(preset, 'cpu')
    assert sum(p.numel() for p in net.parameters()) == 429299   # pinned: the presets keep their networks


def test_presets_are_train_py_options_without_augmentation():
    for name, preset in bench_common.PRESETS.items():
        assert set(preset.options) <= set(config.DEFAULTS), name
        assert preset.options['augment'] == 0, name


def test_trainer_on_random_latents_takes_the_latent_path():
    """A RandomLatentDataset goes through training.config like a pre-encoded archive: latent patch sizes,
    a network of the latents' channels, and the preset's precision option."""
    dataset = bench_common.RandomLatentDataset(4, channels=4, resolution=16)
    trainers = bench_train.make_trainers(bench_common.PRESETS['cpu-small'], dataset, [0.5], precision='bf16', batch=2)
    trainer = trainers[0.5]
    assert trainer.encoder is not None and trainer.encoder.info.vae == 'random-latents'
    assert trainer.schedule.sizes == PatchSchedule(16, 0.5, latent=True).sizes
    assert trainer.net.img_channels == 4 and trainer.autocast['enabled'] and trainer.augment_pipe is None
    assert trainer.step() in trainer.schedule.sizes


def test_bench_train_rejects_fp16_on_cpu(shapes_zip):
    result = CliRunner().invoke(bench_train.main, ['--data', shapes_zip, '--precision', 'fp16', '--device', 'cpu'])
    assert result.exit_code != 0 and 'CUDA only' in result.output


def test_bench_sample_cli_times_each_batch_size():
    result = CliRunner().invoke(bench_sample.main, ['--batch', '1,2', '--num', '2', '--steps', '2', '--rounds', '1',
                                                    '--warmup', '0', '--threads', '1', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    summary = last_json_line(result.output)
    assert summary['nfe_per_image'] == 3 and set(summary['images_per_s']) == {'1', '2'}
    for key, seconds in summary['block_seconds'].items():
        assert summary['images_per_s'][key] == pytest.approx(2 / seconds[0])


# ----------------------------------------------------------------------------
# quality_vs_time.


def test_quality_configurations_name_real_p_and_where_crops_start(shapes_zip):
    configs = quality_vs_time.parse_configs('1, 0.5,0.5:grid,0.25:pixel')
    assert configs == {'1.0': (1.0, 'pixel'), '0.5': (0.5, 'pixel'), '0.5:grid': (0.5, 'grid'),
                       '0.25': (0.25, 'pixel')}
    assert quality_vs_time.config_label('1.0') == 'real_p = 1 (plain EDM)'
    assert quality_vs_time.config_label('0.5:grid') == 'real_p = 0.5, crops on the grid'
    with pytest.raises(ValueError, match="after the colon comes one of pixel, grid"):
        quality_vs_time.parse_configs('0.5:tokens')
    with pytest.raises(ValueError, match='no configuration'):
        quality_vs_time.parse_configs(' , ')
    dataset = ImageFolderDataset(shapes_zip, cache=True)
    trainer = quality_vs_time.make_trainer(dataset, 0.5, 0, 4, 1e-3, 0.5, 'cpu', crop_align='grid')
    assert trainer.schedule.crop_align == 'grid' and trainer.schedule.corner_step == trainer.schedule.multiple > 1


def test_quality_noise_levels_are_the_presets_unless_given(shapes_zip):
    dataset = ImageFolderDataset(shapes_zip, cache=True)
    preset = quality_vs_time.make_trainer(dataset, 1.0, 0, 4, 1e-2, 0.5, 'cpu', preset='edm2-tiny')
    assert (preset.loss_fn.P_mean, preset.loss_fn.P_std) == (-0.8, 1.6)   # bench_common's edm2-tiny
    typed = quality_vs_time.make_trainer(dataset, 1.0, 0, 4, 1e-2, 0.5, 'cpu', preset='edm2-tiny', P_mean=-1.0)
    assert (typed.loss_fn.P_mean, typed.loss_fn.P_std) == (-1.0, 1.6)
    plain = quality_vs_time.make_trainer(dataset, 1.0, 0, 4, 1e-3, 0.5, 'cpu')
    assert (plain.loss_fn.P_mean, plain.loss_fn.P_std) == (-1.2, 1.2)   # cpu-demo: the EDM loss's defaults


def test_check_vs_edm2_refuses_a_folder_that_is_not_edm2_and_maps_its_names(tmp_path):
    result = CliRunner().invoke(check_vs_edm2.main, [f'--edm2={tmp_path}'])
    assert result.exit_code == 1 and 'does not look like a checkout of EDM2' in result.output
    assert 'generate_images.py' in result.output
    mapped = check_vs_edm2.ours_names({'unet.enc.16x16_conv.weight': 1, 'logvar_linear.weight': 2})
    assert mapped == {'model.enc.16x16_conv.weight': 1, 'logvar_linear.weight': 2}
    # Weights under EDM2's names load into our network of the check's size, every name used; a name
    # that does not map is refused.
    torch.manual_seed(0)
    source = check_vs_edm2.build_network(dict(precond='edm2', model_type='EDM2UNet', use_pos=False, dropout=0,
                                              **check_vs_edm2.CONFIG['unet']), 16, 3, 5)
    edm2_state = {('unet.' + name[len('model.'):] if name.startswith('model.') else name): value
                  for name, value in source.state_dict().items()}
    loaded = check_vs_edm2.ours_from(edm2_state)
    assert all(torch.equal(loaded.state_dict()[name], value) for name, value in source.state_dict().items())
    with pytest.raises(click.ClickException, match='do not map onto ours'):
        check_vs_edm2.ours_from(dict(edm2_state, **{'unet.extra.weight': torch.zeros(1)}))


class ClockedTrainer:
    """A trainer whose steps advance a fake clock by `cost` seconds."""

    def __init__(self, clock, cost, log, name):
        self.clock, self.cost, self.log, self.name = clock, cost, log, name
        self.step_count = 0
        self.cur_nimg = 0
        self.ema = torch.nn.Linear(1, 1)

    def step(self):
        self.clock[0] += self.cost
        self.step_count += 1
        self.cur_nimg += 10
        self.log.append(self.name)


def test_train_equal_time_alternates_and_checkpoints_on_time():
    clock, log = [0.0], []
    trainers = {1.0: ClockedTrainer(clock, 1.0, log, 'a'), 0.5: ClockedTrainer(clock, 0.25, log, 'b')}
    points = quality_vs_time.train_equal_time(trainers, budget_s=10, checkpoints=2, slice_s=3, clock=lambda: clock[0])
    assert log[:3] == ['a'] * 3 and log[3] == 'b'   # slices of 3 s, not one trainer then the other
    assert trainers[1.0].step_count == 10 and trainers[0.5].step_count == 40
    for key, cost in [(1.0, 1.0), (0.5, 0.25)]:
        assert [p['time_s'] >= mark for p, mark in zip(points[key], [5, 10])] == [True, True]
        assert all(p['time_s'] < mark + cost + 1e-9 for p, mark in zip(points[key], [5, 10]))
        assert points[key][-1]['steps'] == trainers[key].step_count
        assert points[key][0]['ema'] is not trainers[key].ema


def test_feature_network_loads_like_fid_detector(tmp_path):
    model = quality_vs_time.ShapeClassifier(channels=3, num_classes=5, width=8, feature_dim=16).eval()
    path = str(tmp_path / 'detector.pt')
    quality_vs_time.save_detector(model, path)
    detector = metrics.load_detector(path, 'cpu')
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    features = metrics.detector_features(detector, images)
    assert features.shape == (4, 16)
    with torch.no_grad():
        assert torch.allclose(features.float(), model(images, return_features=True))


def test_classifier_learns_the_demo_shapes(shapes_zip):
    images, labels = quality_vs_time.load_labelled(ImageFolderDataset(shapes_zip, use_labels=True))
    assert images.dtype == torch.uint8 and labels.tolist() == [i % 5 for i in range(12)]
    torch.manual_seed(0)
    model, accuracy = quality_vs_time.train_classifier(images, labels, 5, epochs=1, holdout=0.25)
    assert 0 <= accuracy <= 1 and not model.training


def test_permute_channels_reorders_each_images_channels():
    images = torch.arange(40 * 3, dtype=torch.uint8).reshape(40, 3, 1, 1).expand(40, 3, 2, 2).contiguous()
    out = quality_vs_time.permute_channels(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    for original, permuted in zip(images, out):
        assert sorted(permuted[:, 0, 0].tolist()) == original[:, 0, 0].tolist()
        assert (permuted == permuted[:, :1, :1]).all()   # a whole plane moves, not single pixels
    assert not torch.equal(out, images)   # 40 images: some orders are not the identity


def test_classifier_is_trained_on_permuted_colours(shapes_zip, monkeypatch):
    images, labels = quality_vs_time.load_labelled(ImageFolderDataset(shapes_zip, use_labels=True))
    seen = []
    forward = quality_vs_time.ShapeClassifier.forward
    monkeypatch.setattr(quality_vs_time.ShapeClassifier, 'forward',
                        lambda self, x, return_features=False: seen.append(x) or forward(self, x, return_features))
    quality_vs_time.train_classifier(images, labels, 5, epochs=1, batch_size=100, holdout=0.25)
    batch = seen[0]   # the first training batch: all 9 training images, at batch_size 100
    assert len(batch) == 9
    orders = list(itertools.permutations(range(3)))
    reordered = 0
    for image in batch:
        matches = [order for original in images for order in orders if torch.equal(image, original[list(order)])]
        assert matches, 'every training image is a dataset image with its channels reordered'
        reordered += (0, 1, 2) not in matches
    assert reordered > 0


def test_make_trainer_uses_the_preset_and_noise_levels(shapes_zip):
    dataset = ImageFolderDataset(shapes_zip, cache=True)
    trainer = quality_vs_time.make_trainer(dataset, 0.5, 0, 4, 2e-3, 2, 'cpu', preset='cpu-demo', P_mean=-0.4,
                                           P_std=1.4, channels_last=True)
    assert sum(p.numel() for p in trainer.net.parameters()) < 0.6e6   # cpu-demo: 0.45M; cpu-small: 1.7M
    assert (trainer.loss_fn.P_mean, trainer.loss_fn.P_std) == (-0.4, 1.4)
    assert (trainer.batch_gpu, trainer.num_rounds, trainer.base_lr) == (4, 1, 2e-3)
    assert (trainer.ema_halflife_kimg, trainer.lr_rampup_kimg) == pytest.approx((2, 1)) and trainer.augment_pipe is None
    conv = next(p for p in trainer.net.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    default = quality_vs_time.make_trainer(dataset, 1.0, 0, 4, 2e-3, 2, 'cpu')   # noise levels left to the loss
    assert (default.loss_fn.P_mean, default.loss_fn.P_std) == (-1.2, 1.2)


def test_mean_curves_average_over_seeds():
    runs = {'1.0': [dict(seed=0, points=[dict(time_s=60, kimg=1, fd=2.0)]),
                    dict(seed=1, points=[dict(time_s=62, kimg=1.2, fd=4.0)])]}
    curve = quality_vs_time.mean_curves(runs)['1.0']
    assert curve == [dict(time_s=61, kimg=pytest.approx(1.1), fd=3.0, fd_std=1.0)]


def test_quality_vs_time_cli_scores_every_checkpoint(shapes_zip):
    result = CliRunner().invoke(quality_vs_time.main, [
        '--data', shapes_zip, '--minutes', '0.02', '--seeds', '1', '--checkpoints', '2', '--slice', '0.5',
        '--batch', '4', '--eval-images', '4', '--sample-steps', '1', '--detector-epochs', '1', '--threads', '1',
        '--plot', ''])
    assert result.exit_code == 0, result.output
    summary = last_json_line(result.output)
    assert 'NOT Inception-FID' in summary['metric'] and summary['feature_dim'] == 64
    assert (summary['P_mean'], summary['P_std'], summary['preset']) == (-1.2, 1.2, 'cpu-demo')
    for key in ('1.0', '0.5'):
        points = summary['runs'][key][0]['points']
        assert [p['time_s'] >= mark for p, mark in zip(points, [0.6, 1.2])] == [True, True]
        assert all(np.isfinite(p['fd']) and p['fd'] >= -1e-9 for p in points)
        assert len(summary['mean'][key]) == 2


def test_gpu_check_script_parses():
    assert subprocess.run(['bash', '-n', str(REPO_ROOT / 'benchmarks' / 'gpu_check.sh')]).returncode == 0


def test_list_parsers_say_what_is_wrong():
    assert bench_common.parse_float_list('1,0.5,0.25') == [1.0, 0.5, 0.25]
    with pytest.raises(ValueError, match='list of numbers'):
        bench_common.parse_float_list('1,half')
    assert np.isclose(float(bench_common.float_key(0.25)), 0.25)


@pytest.mark.parametrize('batch, message', [('0', 'positive'), ('none', 'positive'), ('8,x', 'Cannot parse')])
def test_bench_sample_rejects_bad_batch_lists(batch, message):
    result = CliRunner().invoke(bench_sample.main, ['--batch', batch, '--device', 'cpu'])
    assert result.exit_code == 2 and message in result.output and '--batch' in result.output


def test_bench_preemption_cpu_demo_is_the_make_demo_network():
    import bench_preemption
    flags, side = bench_preemption.PRESETS['cpu-demo']
    ours = dict(flag.split('=', 1) for flag in flags)
    demo = dict(flag.split('=', 1) for flag in makefile_demo_flags() if '=' in flag)
    for name in ('--arch', '--cbase', '--cres', '--blocks', '--attn', '--batch', '--real_p', '--channels-last'):
        assert ours[name] == demo[name], name
    assert side == 32


def test_bench_preemption_times_a_stop_delivered_from_outside(tmp_path, subprocess_env):
    """One process, one SIGTERM from outside: a state written, and the times of the stop."""
    result = subprocess.run([sys.executable, str(REPO_ROOT / 'benchmarks' / 'bench_preemption.py'),
                             '--preset=cpu-demo', '--nproc=1', '--repeat=1', '--after-ticks=1', f'--workdir={tmp_path}'],
                            capture_output=True, text=True, timeout=300, env=subprocess_env)
    assert result.returncode == 0, result.stderr[-3000:]
    stop, summary = (json.loads(line) for line in result.stdout.strip().splitlines()[-2:])
    assert stop['returncode'] == 75 and 'SIGTERM received on rank 0' in stop['stopped']
    assert summary['states_written'] == 1 and 0 < summary['signal_to_state_s_max'] <= stop['signal_to_exit_s'] < 30


@pytest.mark.parametrize('solver, nfe, settings', [
    ('heun', 11, dict(num_steps=6)), ('heun', 10, None), ('euler', 10, dict(num_steps=10, solver='euler')),
    ('dpmpp-2m', 7, dict(num_steps=7, solver='dpmpp-2m'))])
def test_bench_solvers_spends_the_asked_evaluations(solver, nfe, settings):
    import bench_solvers
    from training import samplers
    assert bench_solvers.sampler_settings(solver, nfe) == settings
    if settings is not None:
        assert samplers.network_evaluations(*samplers.select_sampler(**settings)) == nfe


def test_bench_solvers_cli_scores_each_solver(shapes_zip, tmp_path):
    import pickle
    import bench_solvers
    from training import architectures
    torch.manual_seed(0)
    net = architectures.build_network(dict(precond='edm', model_type='SongUNet', model_channels=8, channel_mult=[1],
                                           num_blocks=1, attn_resolutions=[], dropout=0, use_pos=True), 32, 3, 0)
    with open(tmp_path / 'net.pkl', 'wb') as f:
        pickle.dump(dict(ema=net), f)
    detector = tmp_path / 'classifier.pt'
    quality_vs_time.save_detector(quality_vs_time.ShapeClassifier(channels=3, num_classes=5), str(detector))
    result = CliRunner().invoke(bench_solvers.main, [
        f'--network={tmp_path / "net.pkl"}', f'--data={shapes_zip}', '--seeds=3', '--nfe=3', '--ref-steps=3',
        '--solvers=heun,dpmpp-2m,dpmpp-2m-sde', f'--detector={detector}', '--threads=1'])
    assert result.exit_code == 0, result.output
    points = {p['solver']: p for p in last_json_line(result.output)['points']}
    assert sorted(points) == ['dpmpp-2m', 'dpmpp-2m-sde', 'heun']
    assert points['heun']['steps'] == 2 and points['dpmpp-2m']['steps'] == 3
    assert all(np.isfinite(p['fd']) and p['rmse'] >= 0 for p in points.values())
