"""FID during training: the training loop computes it at each snapshot and
appends it to metric-fid.jsonl (with a tiny feature network, no download)."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

import fid
from dataset_prep.archive import convert_dataset
from training.training_loop import training_loop


pytestmark = pytest.mark.usefixtures('one_thread')   # a tiny network: two contending threads run it far slower


class PooledFeatures(torch.nn.Module):
    """uint8 RGB [N, 3, H, W] -> [N, 12]: the mean colour of each 2x2 cell, in [0, 1]."""

    def forward(self, images, return_features: bool = False):
        return torch.nn.functional.adaptive_avg_pool2d(images.to(torch.float32) / 255, 2).flatten(1)


def test_fid_at_each_snapshot_is_written_to_metric_jsonl(tmp_path):
    data = str(tmp_path / 'shapes.zip')
    convert_dataset('demo:shapes:32', data, resolution=(32, 32))
    detector = str(tmp_path / 'features.pt')
    torch.jit.save(torch.jit.script(PooledFeatures()), detector)
    ref = str(tmp_path / 'ref.npz')
    result = CliRunner().invoke(fid.main, ['ref', f'--data={data}', f'--dest={ref}', f'--detector={detector}',
                                          '--device=cpu', '--workers=0'])
    assert result.exit_code == 0, result.output

    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    network_kwargs = dict(precond='edm', model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                          decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[], use_pos=True, dropout=0)
    training_loop(run_dir=str(run_dir), dataset_kwargs=dict(path=data), network_kwargs=network_kwargs,
                  loss_kwargs=dict(loss='edm'), patch_kwargs=dict(real_p=0.5), batch_size=4, total_kimg=0.02,
                  kimg_per_tick=0.01, snapshot_ticks=1, state_dump_ticks=None, sample_count=0,
                  metrics=('fid',), metric_kwargs=dict(ref=ref, num=6, detector=detector, batch_size=3),
                  device='cpu', tensorboard=False)

    lines = [json.loads(line) for line in (run_dir / 'metric-fid.jsonl').read_text().splitlines()]
    snapshots = sorted(run_dir.glob('network-snapshot-*.pkl'))
    assert len(lines) >= 2 and snapshots                   # tick 0 and the final tick, at least
    for line in lines:
        assert line['metric'] == 'fid' and math.isfinite(line['results']) and line['results'] > 0
        assert isinstance(line['snapshot_kimg'], int)
    assert 'fid' in (run_dir / 'metric-fid.jsonl').read_text()
