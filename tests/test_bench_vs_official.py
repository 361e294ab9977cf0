"""benchmarks/bench_vs_official.py: loading the official code beside ours, the
official loop's image accounting, the timing arithmetic, and a whole run
against the stand-in of the official repository (tests/fixtures/official_standin:
CI has no copy of the official code)."""

import importlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import torch_utils.persistence
import training.networks
from tests.conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
import bench_common  # noqa: E402
import bench_vs_official as vs  # noqa: E402

STANDIN = REPO_ROOT / 'tests' / 'fixtures' / 'official_standin'
PRESET = bench_common.PRESETS['cpu-small']


@pytest.fixture(scope='module')
def code():
    return vs.OfficialCode(str(STANDIN))


@pytest.fixture(scope='module')
def shapes_zip(tmp_path_factory):
    """12 demo shapes at 32x32."""
    return bench_common.build_demo_dataset(str(tmp_path_factory.mktemp('data') / 'shapes.zip'), 32, count=12)


@pytest.fixture(scope='module')
def dataset(shapes_zip):
    return bench_common.benchmark_dataset(PRESET, shapes_zip, None)


def is_inside(path, folder):
    return str(path).startswith(str(folder) + '/')


# ----------------------------------------------------------------------------
# Loading the official code.


def test_official_modules_come_from_dir_and_ours_stay(code):
    assert is_inside(code.networks.__file__, STANDIN)
    assert code.Patch_EDMPrecond.__module__ == 'training.networks'   # its own name, as in its repository
    assert sys.modules['training.networks'] is training.networks
    assert sys.modules['torch_utils.persistence'] is torch_utils.persistence
    assert sys.modules['dnnlib'] is dnnlib and vs.GENERATE_MODULE not in sys.modules
    with code.active():
        assert is_inside(sys.modules['torch_utils.persistence'].__file__, STANDIN)
        assert is_inside(sys.modules[vs.GENERATE_MODULE].__file__, STANDIN)
        for missing in ('dnnlib', 'training.dataset'):   # not in the stand-in: never ours instead
            with pytest.raises(ImportError, match='not in'):
                importlib.import_module(missing)
    assert sys.modules['torch_utils.persistence'] is torch_utils.persistence and sys.modules['dnnlib'] is dnnlib


def test_unused_imports_of_the_official_files_get_stand_in_modules(tmp_path):
    """What the official files import for work the harness never runs (the VAE, the command line)
    works without the package, inside the window only."""
    official = tmp_path / 'official'
    shutil.copytree(STANDIN, official)
    with open(official / 'generate.py', 'a') as f:
        f.write('\nfrom not_installed_pkg.models import AutoencoderKL\nimport not_installed_pkg.cli as cli\n\n\n'
                '@cli.command()\n@cli.option("--x", default=1)\ndef main(x):\n    return x\n')
    code = vs.OfficialCode(str(official), only_imports=('not_installed_pkg',))
    assert code.stubbed_imports == ['not_installed_pkg'] and 'not_installed_pkg' not in sys.modules
    with code.active():
        generate = sys.modules[vs.GENERATE_MODULE]
        assert 'not_installed_pkg' in sys.modules
    assert generate.main(3) == 3 and 'not loaded' in repr(generate.AutoencoderKL)
    assert 'not_installed_pkg.models' not in sys.modules


def test_a_folder_that_is_not_the_official_repository_is_named(tmp_path):
    with pytest.raises(OSError, match='training/patch_loss.py'):
        vs.OfficialCode(str(tmp_path))


def test_official_network_gets_our_unet_options(code):
    kwargs, dropped = code.network_kwargs(bench_common.network_kwargs(PRESET), 32, 3, 0, fp16=False)
    assert (kwargs['img_channels'], kwargs['out_channels'], kwargs['model_type']) == (5, 3, 'SongUNet')
    assert kwargs['channel_mult'] == [1, 2, 2] and not dropped   # the stand-in takes any UNet option
    with pytest.raises(ValueError, match='pos-freqs'):
        code.network_kwargs(dict(bench_common.network_kwargs(PRESET), pos_freqs=2), 32, 3, 0, fp16=False)


def test_constructor_parameters_look_through_persistent_class():
    class UNet:
        def __init__(self, img_resolution, model_channels=128):
            pass

    wrapped = torch_utils.persistence.persistent_class(type('UNet', (UNet, torch.nn.Module), {}))
    assert vs.constructor_parameters(wrapped) == {'img_resolution', 'model_channels'}
    assert vs.constructor_parameters(None) is None


# ----------------------------------------------------------------------------
# The official loop's accounting.


def test_official_batch_multipliers_follow_its_table():
    assert [vs.official_batch_mul(64, P)[0] for P in (16, 32, 64)] == [4, 2, 1]
    assert vs.official_batch_mul(32, 16) == (2, None)                        # latents of 256x256 images
    assert [vs.official_batch_mul(128, P)[0] for P in (32, 64)] == [8, 4]    # its table, not R/P
    multiplier, note = vs.official_batch_mul(32, 8)
    assert multiplier == 4 and 'KeyError' in note


def test_official_counter_adds_batch_times_expected_multiplier():
    assert vs.official_count_multiplier(0.5, latent=False) == pytest.approx(0.2 * 4 + 0.3 * 2 + 0.5)
    assert vs.official_count_multiplier(0.5, latent=True) == pytest.approx(1.5)
    assert vs.official_count_multiplier(1.0, latent=False) == pytest.approx(1.0)


def test_official_step_loads_each_rounds_images_and_counts_the_expectation(code, dataset):
    c = vs.resolved_options(PRESET, dataset, 'cpu', batch=4, batch_gpu=2, real_p=0.5)
    trainer = vs.OfficialTrainer(code, c, dataset)
    assert trainer.num_rounds == 2 and trainer.batch_mul == {8: 4, 16: 2, 32: 1}
    seen, loss_fn = [], trainer.loss_fn
    trainer.loss_fn = lambda net, images, patch_size, **kwargs: (
        seen.append((patch_size, images.shape[0])) or loss_fn(net=net, images=images, patch_size=patch_size, **kwargs))
    before = [p.detach().clone() for p in trainer.net.parameters()]
    assert trainer.step([8, 32]) == 2 * 4 + 2 * 1
    assert seen == [(8, 8), (32, 2)]                                 # batch_gpu x m(P) images per round
    assert trainer.cur_nimg == int(4 * 1.9)                          # the counter: int(batch * E[m]) per step
    assert trainer.step() in (4, 6, 8, 10, 12, 16) and trainer.cur_nimg == 2 * int(4 * 1.9)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.net.parameters()))
    # Sizes drawn per round, as the official loop draws them: on average batch * E[m] images per step.
    draws = np.array([trainer.draw_sizes() for _ in range(4000)])
    used = (2 * (32 // draws)).sum(axis=1)
    assert draws.shape == (4000, 2) and used.mean() == pytest.approx(4 * 1.9, rel=0.03)
    assert [np.mean(draws == P) for P in (8, 16, 32)] == pytest.approx([0.2, 0.3, 0.5], abs=0.02)


def test_our_trainer_steps_at_the_pinned_patch_size(dataset):
    trainer = bench_common.make_trainer(PRESET, dataset, 'cpu', batch=2, real_p=1.0)
    step = vs.ours_step_at(trainer)
    assert step(8) == 8 and trainer.cur_nimg == 2 * 4
    assert step(32) == 32 and trainer.cur_nimg == 2 * 4 + 2
    assert trainer.schedule.sizes == [32]   # the rest of the schedule is the Trainer's


# ----------------------------------------------------------------------------
# Timing arithmetic.


def test_measure_alternates_and_rates_follow_the_patch_probabilities():
    clock, log = [0.0], []
    costs = {'official': {8: 0.5, 16: 1.0, 32: 2.0}, 'ours': {8: 0.1, 16: 0.2, 32: 0.8}}

    def stepper(side):
        def step(P):
            log.append((side, P))
            clock[0] += costs[side][P]
        return step

    steps = {side: stepper(side) for side in costs}
    records, memory = vs.measure(steps, [8, 16, 32], rounds=2, block=2, warmup=1, device='cpu',
                                 clock=lambda: clock[0])
    units = [(side, P) for side in costs for P in (8, 16, 32)]
    assert log[:6] == units                                                   # warm-up: one step each
    assert log[6:18:2] == units and log[18::2] == units[1:] + units[:1]      # blocks of 2, rotating
    assert len(records) == 24 and set(memory) == set(costs)
    assert all(r['seconds'] == pytest.approx(costs[r['side']][r['P']]) for r in records)

    multipliers = {8: 4, 16: 2, 32: 1}
    rows = {side: vs.side_rates(records, side, 8, multipliers, 32, False, [1.0, 0.5]) for side in costs}
    assert rows['official']['sec_per_step']['0.5'] == pytest.approx(0.5 * 2.0 + 0.3 * 1.0 + 0.2 * 0.5)
    assert rows['official']['nimg_per_step'] == pytest.approx({'1.0': 8, '0.5': 8 * 1.9})
    assert rows['ours']['kimg_per_s']['0.5'] == pytest.approx(8 * 1.9 / (0.5 * 0.8 + 0.3 * 0.2 + 0.2 * 0.1) / 1e3)
    rows['ours_official_precision'] = rows['ours']
    ratios = vs.ratios(rows, [1.0, 0.5])
    assert ratios['ours_vs_official_kimg_per_s_realp1.0'] == pytest.approx(2.0 / 0.8)
    assert ratios['ours_vs_official_kimg_per_s_realp0.5'] == pytest.approx(1.4 / 0.48)
    assert ratios['ours_at_official_precision_vs_official_kimg_per_s_realp0.5'] == pytest.approx(1.4 / 0.48)


def test_official_grid_is_our_full_grid():
    grid = vs.official_grid(8, 2, 'cpu')
    assert torch.equal(grid, training.networks.full_grid(8, 2, 'cpu'))


# ----------------------------------------------------------------------------
# End to end, on the stand-in.


def test_cli_against_the_standin(shapes_zip):
    result = CliRunner().invoke(vs.main, [
        '--official', str(STANDIN), '--data', shapes_zip, '--batch', '2', '--rounds', '1', '--block', '1',
        '--warmup', '0', '--threads', '1', '--device', 'cpu', '--sample-steps', '2', '--sample-batch', '2',
        '--sample-rounds', '1'])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    for p in ('1.0', '0.5'):
        for name in ('ours_vs_official', 'ours_at_official_precision_vs_official'):
            assert summary[f'{name}_kimg_per_s_realp{p}'] > 0
        sides = summary['sides']
        assert summary[f'ours_vs_official_kimg_per_s_realp{p}'] == pytest.approx(
            sides['ours']['kimg_per_s'][p] / sides['official']['kimg_per_s'][p])
    assert sides['official']['nimg_per_step']['0.5'] == pytest.approx(2 * 1.9)
    assert summary['ours_defaults_are_official_precision'] and sides['official']['precision'] == 'fp32'
    assert summary['official_commit'] is None   # the stand-in is a folder of this repository, not a checkout
    assert summary['ours_vs_official_sampling_images_per_s'] > 0
    assert summary['sampling_bit_equal'] and summary['sampling']['uint8_equal']
    assert 'KeyError' in ' '.join(summary['notes'])   # cpu-small's 8px patches: no official multiplier
    assert sys.modules['training.networks'] is training.networks


def test_cli_names_what_dir_lacks(tmp_path):
    result = CliRunner().invoke(vs.main, ['--official', str(tmp_path), '--device', 'cpu'])
    assert result.exit_code == 1 and 'generate.py' in result.output
