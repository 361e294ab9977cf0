"""Tests of the DiT (training/networks_dit.py `DiT`; docs/DESIGN.md section 2,
"Transformers"): the global position embedding, crops against the full image,
batch independence, adaLN-Zero, attention, labels, refusals, and training,
resuming, transfer, snapshots and sampling through the command lines.

All networks are tiny (hidden size 32, depth 2, 2 heads): CPU, seconds."""

import glob
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import train
from tests.conftest import REPO_ROOT, demo_zips
from dataset_prep.archive import convert_dataset
from training import architectures, config, networks, networks_dit, patching, runs, snapshots
from training.dataset import open_dataset
from training.denoiser import network_input_multiple

sys.path.insert(0, str(REPO_ROOT / 'benchmarks'))
import bench_common  # noqa: E402

TINY_DIT = dict(precond='edm', model_type='DiT', model_channels=32, num_blocks=2, num_heads=2, token_size=2,
                dropout=0, use_pos=True)
TINY = ['--arch=dit-s', '--cbase=32', '--blocks=2', '--heads=2', '--dropout=0', '--workers=0', '--device=cpu',
        '--augment=0']


def make_dit(resolution=16, channels=3, label_dim=0, seed=0, randomize=True, **kwargs):
    """A tiny preconditioned DiT in eval mode; `randomize`: every parameter random (no zero-initialised layers)."""
    torch.manual_seed(seed)
    net = architectures.build_network({**TINY_DIT, **kwargs}, resolution, channels, label_dim)
    if randomize:
        generator = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return net.eval()


def embedding_of(net, pos):
    """The DiT's position embedding [N, H/p, W/p, D] of coordinate grids pos [N, 2, H, W] (image channels zero)."""
    n, _, height, width = pos.shape
    coordinates = networks._encode_coordinates(pos, net.pos_freqs)
    x_in = torch.cat([torch.zeros(n, net.img_channels, height, width), coordinates], dim=1)
    p = net.model.token_size
    return net.model.position_embedding(x_in).reshape(n, height // p, width // p, -1)


def corners(*pairs):
    """(top, left) long tensors [N] of (top, left) pairs."""
    return torch.tensor([t for t, _ in pairs]), torch.tensor([left for _, left in pairs])


# ----------------------------------------------------------------------------
# The global position embedding.


@pytest.mark.parametrize('pos_freqs', [0, 2])
def test_a_token_gets_the_same_embedding_in_any_crop(pos_freqs):
    """Aligned crops match the full image's tokens; crops off the token grid match each other where their
    tokens coincide; the coordinates are read from the first two coordinate channels, with or without
    --pos-freqs."""
    net = make_dit(resolution=16, pos_freqs=pos_freqs)
    full = embedding_of(net, networks.full_grid(16))[0]                     # [8, 8, D]
    top, left = corners((0, 0), (4, 6), (8, 2))
    crops = embedding_of(net, networks.patch_grid(top, left, 8, 16))       # [3, 4, 4, D]
    for i in range(3):
        t, l_ = int(top[i]) // 2, int(left[i]) // 2
        torch.testing.assert_close(crops[i], full[t: t + 4, l_: l_ + 4], rtol=0, atol=1e-6)
    top, left = corners((1, 3), (3, 5))                                     # off the grid, one token apart
    a, b = embedding_of(net, networks.patch_grid(top, left, 8, 16))
    torch.testing.assert_close(a[1:, 1:], b[:-1, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(a, b)


def test_positions_are_token_indices_of_the_full_image():
    """u = x_t * G/2: neighbouring tokens of the full image are R / (R - 1) apart, centred on the image;
    the embedding is [sin(u w), cos(u w), sin(v w), cos(v w)] with w_i = 10000^(-i / (D/4))."""
    R, p, D = 16, 2, 32
    coords = networks_dit.token_coordinates(networks.full_grid(R), p)            # [1, 64, 2]
    G = R // p
    u = coords[0, :, 0].reshape(G, G) * G / 2
    v = coords[0, :, 1].reshape(G, G) * G / 2
    expected = (torch.arange(G) - (G - 1) / 2) * R / (R - 1)
    torch.testing.assert_close(u[0], expected, rtol=0, atol=1e-6)            # x along a row
    torch.testing.assert_close(v[:, 0], expected, rtol=0, atol=1e-6)         # y down a column
    emb = networks_dit.sincos_position_embedding(coords, D, G / 2)[0]            # [64, D]
    w = 10000 ** (-np.arange(D // 4) / (D // 4))
    token = 8 * 3 + 5                                                        # row 3, column 5
    x_t, y_t = float(u[3, 5]), float(v[3, 5])
    naive = np.concatenate([np.sin(x_t * w), np.cos(x_t * w), np.sin(y_t * w), np.cos(y_t * w)])
    np.testing.assert_allclose(emb[token].numpy(), naive, atol=1e-5)


def test_a_dit_without_coordinates_embeds_its_input_as_a_full_image():
    with_pos, without = make_dit(), make_dit(use_pos=False)
    x = torch.randn(2, 3, 16, 16)
    assert without.model.pos_channels == 0 and with_pos.model.pos_channels == 2
    torch.testing.assert_close(without.model.position_embedding(x),
                               embedding_of(with_pos, networks.full_grid(16, 2)).flatten(1, 2), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# Forward passes.


@pytest.mark.parametrize('shape', [16, (16, 24)], ids=['square', 'rectangle'])
def test_full_image_forward_equals_the_forward_on_the_full_grid(shape):
    net = make_dit(resolution=shape)
    height, width = networks.image_shape(shape)
    x, sigma = torch.randn(2, 3, height, width), torch.tensor([0.3, 7.0])
    assert torch.equal(net(x, sigma), net(x, sigma, pos=networks.full_grid(shape, 2)))
    with pytest.raises(ValueError, match='multiples of 2'):
        net(torch.randn(1, 3, 15, 16), torch.ones(1), pos=networks.full_grid((15, 16)))


def test_a_crops_output_does_not_depend_on_its_batch_but_on_its_place():
    net = make_dit(resolution=16)
    images = torch.randn(3, 3, 16, 16)
    top, left = corners((0, 0), (5, 3), (8, 8))
    crops = patching.crop(images, top, left, 8)
    pos = networks.patch_grid(top, left, 8, 16)
    sigma = torch.tensor([0.5, 2.0, 10.0])
    together = net(crops, sigma, pos)
    for i in range(3):
        alone = net(crops[i: i + 1], sigma[i: i + 1], pos[i: i + 1])
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-6)
    moved = net(crops[1: 2], sigma[1: 2], networks.patch_grid(*corners((1, 3)), 8, 16))
    assert not torch.allclose(moved[0], together[1], atol=1e-3)               # the same pixels elsewhere


def test_initialisation_is_the_dit_codes():
    """As the DiT code initialises: linear layers Xavier-uniform with zero
    biases, the noise embedding's MLP and the label table N(0, 0.02^2), the
    adaLN modulations and the output layer zero."""
    torch.manual_seed(0)
    model = architectures.build_network({**TINY_DIT, 'model_channels': 128}, 16, 3, 100).model
    for layer in (model.map_layer0, model.map_layer1, model.map_label):
        weight = layer.weight.detach()
        assert abs(weight.mean().item()) < 1e-3 and weight.std().item() == pytest.approx(0.02, rel=0.03)
    block = model.blocks[0]
    for layer in (model.patchify, block.qkv, block.proj, block.fc0, block.fc1):
        out_features, in_features = layer.weight.shape
        bound = (6 / (in_features + out_features)) ** 0.5
        weight = layer.weight.detach()
        assert weight.abs().max().item() <= bound and weight.abs().max().item() > 0.99 * bound
        assert weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.03)
    for layer in (block.affine, model.out_affine, model.out_proj):
        assert not layer.weight.any()
    assert not any(layer.bias.any() for layer in model.modules() if getattr(layer, 'bias', None) is not None)


@pytest.mark.parametrize('mlp_ratio, hidden', [(4.0, 128), (2.5, 80), (4, 128)])
def test_mlp_ratio_may_be_a_float(mlp_ratio, hidden):
    """The DiT code's mlp_ratio is a float (4.0); the MLP is int(mlp_ratio * D) wide."""
    net = make_dit(mlp_ratio=mlp_ratio)
    assert net.model.blocks[0].fc0.weight.shape == (hidden, 32) and net.model.blocks[1].fc1.weight.shape == (32, hidden)
    x = torch.randn(2, 3, 16, 16)
    assert torch.isfinite(net(x, torch.tensor([0.5, 2.0]))).all()


def test_dropout_defaults_to_0_for_a_dit(shapes):
    """The DiT paper trains without dropout, EDM's UNets with 0.13; --dropout sets both."""
    dataset = open_dataset(dict(path=shapes[32]))
    dit = dict(data=shapes[32], arch='dit-s', cbase=32, heads=2)
    assert config.build_config(dit, dataset).network_kwargs.dropout == 0
    assert config.build_config(dict(dit, dropout=0.1), dataset).network_kwargs.dropout == 0.1
    assert config.build_config(dict(data=shapes[32]), dataset).network_kwargs.dropout == 0.13
    assert config.build_config(dict(data=shapes[32], dropout=0), dataset).network_kwargs.dropout == 0


@pytest.mark.parametrize('precond', ['edm', 'vp'])
def test_a_fresh_dit_outputs_zero_so_D_is_c_skip_x(precond):
    """adaLN-Zero: the modulation and final layers start at zero, so F = 0 and D(x) = c_skip x."""
    net = make_dit(randomize=False, precond=precond, label_dim=3, augment_dim=9)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 7.0])
    labels = torch.eye(3)[[0, 2]]
    c_skip = net.preconditioning(sigma.reshape(-1, 1, 1, 1))[0]
    assert torch.equal(net(x, sigma, class_labels=labels, augment_labels=torch.randn(2, 9)), c_skip * x)
    x_in = torch.cat([x, networks.full_grid(16, 2)], dim=1)
    assert torch.count_nonzero(net.model(x_in, torch.randn(2), labels)) == 0
    zero_weights = sorted(name for name, p in net.named_parameters() if name.endswith('weight') and not p.any())
    assert zero_weights == ['model.blocks.0.affine.weight', 'model.blocks.1.affine.weight', 'model.map_augment.weight',
                            'model.out_affine.weight', 'model.out_proj.weight']


def test_dit_attention_equals_naive_softmax_attention():
    net = make_dit()
    block = net.model.blocks[0]
    x = torch.randn(2, 10, 32)
    q, k, v = block.qkv(x).double().reshape(2, 10, 3, 2, 16).permute(2, 0, 3, 1, 4)   # [N, heads, T, C_h]
    weights = torch.softmax(q @ k.transpose(-1, -2) / np.sqrt(16), dim=-1)
    naive = block.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32).float())
    torch.testing.assert_close(block._attention(x), naive, rtol=1e-5, atol=1e-5)


def test_all_zero_labels_select_the_null_class():
    """The class table has label_dim + 1 entries; zero labels (unconditional, dropped, the CFG branch) take
    the last; label dropout acts while training only."""
    net = make_dit(label_dim=3, label_dropout=1.0)
    model = net.model
    noise = torch.randn(2)
    plain = model.map_layer1(torch.nn.functional.silu(model.map_layer0(model.map_noise(noise))))
    labels = torch.eye(3)[[1, 2]]
    table = model.map_label.weight                                          # [D, 4]
    torch.testing.assert_close(model._conditioning(noise, labels, None) - plain, table[:, [1, 2]].T)
    torch.testing.assert_close(model._conditioning(noise, torch.zeros(2, 3), None) - plain, table[:, [3, 3]].T)
    model.train()
    torch.testing.assert_close(model._conditioning(noise, labels, None) - plain, table[:, [3, 3]].T)


def test_input_multiple_and_patch_sizes_follow_the_token_size():
    for token_size, sizes in ((2, [8, 16, 32]), (4, [8, 16, 32]), (8, [8, 16, 32])):
        net = make_dit(resolution=32, token_size=token_size, randomize=False)
        assert network_input_multiple(net) == token_size
        assert patching.PatchSchedule(32, 0.5, multiple=token_size).sizes == sizes
    assert patching.PatchSchedule(48, 0.5, multiple=8).sizes == [8, 24, 48]
    with pytest.raises(ValueError, match='at least 32, or --real_p=1'):
        patching.PatchSchedule(16, 0.5, multiple=8)
    with pytest.raises(ValueError, match='not divisible by 3 attention heads'):
        make_dit(num_heads=3)
    with pytest.raises(ValueError, match='implicit_mlp'):
        make_dit(implicit_mlp=True)


def test_no_weight_depends_on_the_token_count():
    """No weight depends on the number of tokens: a 16x16 DiT's weights load into a 32x24 one."""
    small, large = make_dit(resolution=16, seed=0), make_dit(resolution=(32, 24), seed=1, randomize=False)
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in large.state_dict().items()}


@pytest.mark.parametrize('fmt', ['pkl', 'safetensors'])
def test_snapshots_round_trip(tmp_path, fmt):
    net = make_dit(resolution=(16, 24), label_dim=3, pos_freqs=1)
    path = str(tmp_path / 'net.pkl')
    snapshots.save_snapshot(path, net, None, None, dict(resolution=[16, 24]), snapshot_format=fmt)
    loaded, _ = snapshots.load_network(path if fmt == 'pkl' else path[:-4] + '.safetensors')
    assert type(loaded.model).__name__ == 'DiT' and loaded.img_shape == (16, 24)
    x, labels = torch.randn(2, 3, 16, 24), torch.eye(3)[[0, 1]]
    assert torch.equal(loaded(x, torch.tensor([0.5, 3.0]), class_labels=labels),
                       net(x, torch.tensor([0.5, 3.0]), class_labels=labels))
    if fmt == 'pkl':
        converted = snapshots.convert_snapshot(path, str(tmp_path / 'converted.safetensors'))
        assert os.path.exists(converted)


def test_latent_training_in_bf16_takes_every_patch_size():
    """A DiT on 4x16x16 latents (the benchmarks' random latents): latent patch sizes 8 and 16, bf16 autocast."""
    dataset = bench_common.RandomLatentDataset(8, channels=4, resolution=16)
    trainer = bench_common.make_trainer(bench_common.PRESETS['dit-s'], dataset, cbase=32, blocks=2, heads=2,
                                        token_size=2, batch=2, real_p=0.5, bf16=True)
    assert trainer.net.img_channels == 4 and trainer.autocast['enabled'] and network_input_multiple(trainer.net) == 2
    seen = {trainer.step() for _ in range(8)}
    assert seen == {8, 16}
    assert all(torch.isfinite(p).all() for p in trainer.net.parameters())


def test_the_benchmark_preset_is_dit_s_with_4x4_tokens():
    kwargs = bench_common.network_kwargs(bench_common.PRESETS['dit-s'])
    assert (kwargs.model_type, kwargs.model_channels, kwargs.num_blocks, kwargs.num_heads, kwargs.token_size) == \
        ('DiT', 384, 12, 6, 4)


# ----------------------------------------------------------------------------
# Command lines: train (patches, a resume), transfer, generate, refusals.


def invoke(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def latest(run_dir, pattern):
    return sorted(glob.glob(os.path.join(str(run_dir), pattern)))[-1]


def run_dir_of(outdir):
    [run_dir] = glob.glob(os.path.join(str(outdir), '0*'))
    return run_dir


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """Labelled demo shapes: {16: 16x16 zip, 32: 32x32 zip}."""
    return demo_zips(tmp_path_factory.mktemp('dit-data'), (16, 32))


def train_args(outdir, data, duration, *extra):
    return [f'--outdir={outdir}', f'--data={data}', '--batch=4', f'--duration={duration}', '--seed=2',
            '--tick=0.05', '--snap=1', '--dump=1', '--lr-rampup=0.05', *TINY, *extra]


def test_dit_trains_resumes_bit_exact_and_samples(tmp_path, shapes):
    """Patches (real_p 0.5) with labels, label dropout and dropout: 100 images, then the same command for
    200, equals 200 from the start; the snapshot (both formats) samples the full image, with guidance, and a
    region of a larger canvas."""
    extra = ['--real_p=0.5', '--cond=1', '--label-dropout=0.2', '--dropout=0.1', '--samples=4',
             '--snapshot-format=both']
    extended, straight = tmp_path / 'extended', tmp_path / 'straight'
    output = invoke(train.main, train_args(extended, shapes[32], 0.0001, *extra))
    assert '8px' in output and '16px' in output
    output = invoke(train.main, train_args(extended, shapes[32], 0.0002, *extra))
    assert 'Resuming run' in output
    invoke(train.main, train_args(straight, shapes[32], 0.0002, *extra))
    a = runs.load_state(runs.find_latest_state(run_dir_of(extended)))
    b = runs.load_state(runs.find_latest_state(run_dir_of(straight)))
    assert a['nimg'] == b['nimg'] >= 200
    for key in ('net', 'ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in b[key]), key

    run_dir = run_dir_of(extended)
    with PIL.Image.open(latest(run_dir, 'samples-*.png')) as grid:
        assert grid.size == (64, 64)
    pkl, st = latest(run_dir, 'network-snapshot-*.pkl'), latest(run_dir, 'network-snapshot-*.safetensors')
    images = {}
    for name, network in (('pkl', pkl), ('st', st)):
        out = tmp_path / f'out-{name}'
        invoke(generate.cli, [f'--network={network}', f'--outdir={out}', '--seeds=0-1', '--steps=4', '--class=1',
                              '--cfg=2', '--device=cpu'])
        images[name] = [np.asarray(PIL.Image.open(out / f'{seed:06d}.png')) for seed in range(2)]
    assert images['pkl'][0].shape == (32, 32, 3)
    assert all(np.array_equal(p, s) for p, s in zip(images['pkl'], images['st']))
    region = tmp_path / 'region'
    invoke(generate.cli, [f'--network={pkl}', f'--outdir={region}', '--seeds=0', '--steps=4', '--device=cpu',
                          '--image_size=48x32', '--x_start=8'])
    assert PIL.Image.open(region / '000000.png').size == (48, 32)


def test_transfer_between_resolutions_in_bf16(tmp_path, shapes):
    """A 32x32 DiT's snapshot (256 tokens) trains on as a 16x16 one (64 tokens), with bf16 autocast."""
    invoke(train.main, train_args(tmp_path / 'a', shapes[32], 0.00005, '--real_p=0.5', '--samples=0'))
    snapshot = latest(run_dir_of(tmp_path / 'a'), 'network-snapshot-*.pkl')
    output = invoke(train.main, train_args(tmp_path / 'b', shapes[16], 0.00005, '--real_p=1', '--samples=0',
                                           '--bf16=1', f'--transfer={snapshot}'))
    assert 'Transferred' in output and 'kept their initialisation' not in output


@pytest.mark.parametrize('case', ['unet-flag', 'dit-flag', 'no-pos', 'heads', 'implicit-mlp', 'no-crop', 'shape'])
def test_refused_configurations_give_one_line(tmp_path, shapes, case):
    data, extra, fragment = {
        'unet-flag': (32, ['--cres=1,2'], '--cres shapes a UNet'),
        'dit-flag': (32, ['--arch=ddpmpp', '--token-size=4'], '--heads and --token-size shape a DiT'),
        'no-pos': (32, ['--use_pos=0', '--real_p=0.5'], 'cannot tell where a crop lies'),
        'heads': (32, ['--cbase=36', '--heads=8'], 'not divisible by 8 attention heads'),
        'implicit-mlp': (32, ['--implicit_mlp=1'], 'a DiT has none'),
        'no-crop': (16, ['--token-size=8', '--real_p=0.5'], 'at least 32, or --real_p=1'),
        'shape': (None, ['--token-size=8', '--real_p=1'], 'takes sides that are multiples of 8'),
    }[case]
    if data is None:
        data = str(tmp_path / 'shapes-20x20.zip')
        convert_dataset('demo:shapes:4', data, resolution=(20, 20))
    else:
        data = shapes[data]
    outdir = tmp_path / 'runs'
    result = CliRunner().invoke(train.main, train_args(outdir, data, 0.0001, *extra))
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and fragment in errors[0] and 'Traceback' not in result.output, result.output
    assert not outdir.exists()


def test_a_dit_without_coordinates_trains_on_full_images_and_samples(tmp_path, shapes):
    """--use_pos=0 with --real_p=1: a DiT of EDM's call convention, which generate.py samples as EDM's."""
    invoke(train.main, train_args(tmp_path / 'runs', shapes[16], 0.00002, '--use_pos=0', '--real_p=1',
                                  '--samples=0'))
    snapshot = latest(run_dir_of(tmp_path / 'runs'), 'network-snapshot-*.pkl')
    net, _ = snapshots.load_network(snapshot)
    assert not net.use_pos and net.model.pos_channels == 0
    invoke(generate.cli, [f'--network={snapshot}', f'--outdir={tmp_path / "out"}', '--seeds=0', '--steps=2',
                          '--device=cpu'])
    assert PIL.Image.open(tmp_path / 'out' / '000000.png').size == (16, 16)
