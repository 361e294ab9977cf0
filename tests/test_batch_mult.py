"""train.py --batch-mult=official (training/patching.py OFFICIAL_BATCH_TABLE,
docs/DESIGN.md section 2): the official code's multipliers at 128 px through
the Trainer (images counted, rounds packed within a full round's pixels,
bit-exact resume), the flag in the resolved options, and the one-line refusal
of sizes the table lacks."""


import pytest
import torch
from click.testing import CliRunner

import train
from tests.conftest import demo_zips, resolved_options
from training import runs
from training import training_loop as tl

TINY_NET = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0)
TINY_FLAGS = ['--cbase=8', '--cres=1,2', '--blocks=1', '--attn=', '--workers=0', '--device=cpu', '--seed=0']

pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """{side: a zip of 8 demo images of side x side pixels} for 32 and 128."""
    return demo_zips(tmp_path_factory.mktemp('data'), (32, 128))


def make_trainer(data, **overrides):
    kwargs = dict(dataset_kwargs=dict(path=data, use_labels=False), network_kwargs=dict(TINY_NET),
                  loss_kwargs=dict(loss='edm'), optimizer_kwargs=dict(lr=2e-3, betas=[0.9, 0.999], eps=1e-8),
                  patch_kwargs=dict(real_p=0.2, batch_mult='official'), batch_size=4, batch_gpu=1,
                  lr_rampup_kimg=0, ema_halflife_kimg=0.5, seed=1)
    return tl.Trainer(**dict(kwargs, **overrides))


def test_trainer_takes_the_official_multipliers_at_128px(shapes):
    """x8 at 32 px, x4 at 64 px: each step counts batch * m images, and
    its rounds hold at most a full round's pixels (batch_gpu 128 x 128 images)."""
    trainer = make_trainer(shapes[128])
    assert trainer.schedule.sizes == [32, 64, 128] and trainer.schedule.multipliers == [8, 4, 1]
    rounds = []
    inner = trainer.loss_fn
    trainer.loss_fn = lambda **kw: rounds.append(tuple(kw['y'].shape)) or inner(**kw)
    seen = set()
    for _ in range(10):
        rounds.clear()
        before = trainer.cur_nimg
        P = trainer.step()
        m = {32: 8, 64: 4, 128: 1}[P]
        assert trainer.cur_nimg - before == 4 * m
        assert sum(shape[0] for shape in rounds) == 4 * m and all(shape[2:] == (P, P) for shape in rounds)
        assert all(shape[0] * P * P <= 1 * 128 * 128 for shape in rounds)
        assert len(rounds) == {32: 2, 64: 4, 128: 4}[P]   # 8 patches of 32 px fill a round: 2 rounds merge
        seen.add(P)
        if seen == {32, 64}:
            break
    assert seen >= {32, 64}


def test_resume_with_official_multipliers_is_bit_exact(shapes, tmp_path):
    straight = make_trainer(shapes[128], batch_size=2)
    sizes = [straight.step() for _ in range(4)]
    first = make_trainer(shapes[128], batch_size=2)
    for _ in range(2):
        first.step()
    path = str(tmp_path / 'training-state-000000.pt')
    runs.save_state(path, dict(first.state_dict(), cur_tick=1))
    second = make_trainer(shapes[128], batch_size=2)
    second.load_state_dict(runs.load_state(path))
    assert sizes[2:] == [second.step() for _ in range(2)]
    assert second.cur_nimg == straight.cur_nimg
    for a, b in zip(straight.net.state_dict().values(), second.net.state_dict().values()):
        assert torch.equal(a, b)


def test_flag_sets_the_options_and_refuses_in_one_line(shapes, tmp_path, no_torchrun_env):
    base = [f'--outdir={tmp_path / "runs"}', '--dry-run', *TINY_FLAGS]
    result = CliRunner().invoke(train.main, [*base, f'--data={shapes[128]}', '--batch-mult=official'])
    assert result.exit_code == 0, result.output
    assert resolved_options(result.output)['patch_kwargs'] == dict(real_p=0.5, progressive=False,
                                                                    batch_mult='official')
    result = CliRunner().invoke(train.main, [*base, f'--data={shapes[128]}'])
    assert result.exit_code == 0, result.output
    assert resolved_options(result.output)['patch_kwargs'] == dict(real_p=0.5, progressive=False)   # as before
    result = CliRunner().invoke(train.main, [*base, f'--data={shapes[32]}', '--batch-mult=official'])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert 'not 8 px patches of 32 px images; use --batch-mult=formula (R/P)' in result.output
    result = CliRunner().invoke(train.main, [*base, f'--data={shapes[32]}', '--batch-mult=official', '--real_p=1'])
    assert result.exit_code == 0, result.output
