"""Tests of training/networks.py, networks_unet.py and architectures.py:
preconditioning identities (EDM paper, Table 1), coordinate channels,
EDM-compatible parameter names and shapes, weight transfer by name,
persistence, fp16 flag, input validation.

All networks are tiny (CPU, seconds)."""

import pickle

import numpy as np
import pytest
import torch

from training import architectures, networks, networks_unet

R = 8            # image resolution of the tiny networks
C = 3            # image channels
TINY_SONG = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0)
DDPMPP = dict(TINY_SONG, model_type='SongUNet', embedding_type='positional', channel_mult_noise=1,
              encoder_type='standard', decoder_type='standard', resample_filter=[1, 1])
NCSNPP = dict(TINY_SONG, model_type='SongUNet', embedding_type='fourier', channel_mult_noise=2,
              encoder_type='residual', decoder_type='standard', resample_filter=[1, 3, 3, 1])
ADM = dict(model_type='DhariwalUNet', model_channels=64, channel_mult=[1, 1], num_blocks=1, attn_resolutions=[4], dropout=0)
ARCHS = {'ddpmpp': DDPMPP, 'ncsnpp': NCSNPP, 'adm': ADM}


def make_net(precond='edm', arch='ddpmpp', seed=0, **kwargs):
    """A tiny preconditioned network with all parameters randomized (no zero-init outputs)."""
    torch.manual_seed(seed)
    net = networks.PRECONDITIONERS[precond](img_resolution=R, img_channels=C, **{**ARCHS[arch], **kwargs})
    generator = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return net.eval()


def inputs(n=2, size=R, seed=0):
    """Noisy images [n, C, size, size] and noise levels [n]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn([n, C, size, size], generator=generator)
    sigma = torch.tensor([0.3, 7.0, 0.05, 60.0][:n])
    return x, sigma


def coordinate_naive(index, resolution):
    """(index / (R - 1) - 0.5) * 2, each operation in float32 as the official Patch Diffusion code computes it."""
    f32 = np.float32
    return (f32(index) / f32(resolution - 1) - f32(0.5)) * f32(2)


def full_grid_naive(resolution):
    """[1, 2, R, R] coordinate grid from docs/DESIGN.md section 2, by a loop over pixels."""
    grid = torch.zeros([1, 2, resolution, resolution])
    for row in range(resolution):
        for col in range(resolution):
            grid[0, 0, row, col] = float(coordinate_naive(col, resolution))
            grid[0, 1, row, col] = float(coordinate_naive(row, resolution))
    return grid


def test_grid_uses_the_official_float32_arithmetic():
    """Bit for bit the official code's (idx / (R - 1) - 0.5) * 2 in float32 (not float64 rounded once:
    at R = 64 half the values would differ in the last bit)."""
    for resolution in (16, 63, 64, 256):
        idx = torch.arange(resolution)
        official = (idx / (resolution - 1) - 0.5) * 2.
        assert torch.equal(networks.full_grid(resolution)[0, 0, 0], official)
        assert torch.equal(networks.full_grid(resolution)[0, 1, :, 0], official)
    assert torch.equal(networks.full_grid(64), full_grid_naive(64))


class RecordingUNet(torch.nn.Module):
    """Stand-in UNet: records its inputs and returns F = tanh of the image channels + noise label."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.x, self.noise_labels, self.class_labels = x, noise_labels, class_labels
        return torch.tanh(x[:, :C]) + noise_labels.reshape(-1, 1, 1, 1)


# ----------------------------------------------------------------------------
# Preconditioning identities.


def expected_coefficients(precond, sigma):
    """(c_skip, c_out, c_in) per EDM Table 1 in float64, sigma [N] -> each [N, 1, 1, 1]."""
    s = sigma.double().reshape(-1, 1, 1, 1)
    if precond == 'edm':
        sd = 0.5
        return sd ** 2 / (s ** 2 + sd ** 2), s * sd / (s ** 2 + sd ** 2).sqrt(), 1 / (s ** 2 + sd ** 2).sqrt()
    if precond == 'vp':
        return torch.ones_like(s), -s, 1 / (s ** 2 + 1).sqrt()
    return torch.ones_like(s), s, torch.ones_like(s)


@pytest.mark.parametrize('precond', ['edm', 'vp', 've'])
def test_denoiser_follows_preconditioning_formula(precond):
    net = make_net(precond)
    net.model = RecordingUNet()
    x, sigma = inputs(n=4)
    D_x = net(x, sigma)
    c_skip, c_out, c_in = expected_coefficients(precond, sigma)
    F_x = torch.tanh(c_in * x.double()) + net.model.noise_labels.double().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(D_x.double(), c_skip * x.double() + c_out * F_x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.model.x.double(), c_in * x.double(), rtol=1e-6, atol=1e-6)
    assert D_x.dtype == torch.float32 and D_x.shape == x.shape


def test_noise_conditioning_per_formulation():
    sigma = torch.tensor([0.01, 0.5, 20.0])
    x = torch.zeros([3, C, R, R])
    labels = {}
    for precond in ['edm', 'vp', 've']:
        net = make_net(precond)
        net.model = RecordingUNet()
        net(x, sigma)
        labels[precond] = net.model.noise_labels.double()
    torch.testing.assert_close(labels['edm'], sigma.double().log() / 4)
    torch.testing.assert_close(labels['ve'], (sigma.double() / 2).log())
    vp = make_net('vp')
    t = labels['vp'] / (vp.M - 1)  # c_noise = (M - 1) t with sigma(t) = sigma
    sigma_of_t = ((0.5 * 19.9 * t ** 2 + 0.1 * t).exp() - 1).sqrt()
    torch.testing.assert_close(sigma_of_t, sigma.double(), rtol=1e-4, atol=1e-6)


def test_noise_level_ranges():
    vp, ve, edm = make_net('vp'), make_net('ve'), make_net('edm')
    assert vp.sigma_min == pytest.approx(np.sqrt(np.exp(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5) - 1), rel=1e-4)
    assert vp.sigma_max == pytest.approx(np.sqrt(np.exp(0.5 * 19.9 + 0.1) - 1), rel=1e-5)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float('inf'), 0.5)
    assert torch.equal(edm.round_sigma(torch.tensor([0.3, 2.0])), torch.tensor([0.3, 2.0]))


def test_scalar_sigma_equals_per_image_sigma():
    net = make_net('edm')
    x, _ = inputs(n=2)
    torch.testing.assert_close(net(x, 1.5), net(x, torch.tensor([1.5, 1.5])))
    with pytest.raises(ValueError, match='one per image'):
        net(x, torch.tensor([1.0, 2.0, 3.0]))


# ----------------------------------------------------------------------------
# Coordinate channels.


def test_coordinates_are_concatenated_after_scaling_without_noise():
    net = make_net('edm', use_pos=True)
    net.model = RecordingUNet()
    x, sigma = inputs(n=2, size=4)
    pos = full_grid_naive(R)[:, :, 2:6, 4:8].expand(2, -1, -1, -1)
    net(x, sigma, pos=pos)
    c_in = 1 / (sigma.reshape(-1, 1, 1, 1) ** 2 + 0.25).sqrt()
    torch.testing.assert_close(net.model.x, torch.cat([c_in * x, pos], dim=1))


def test_default_pos_is_full_image_grid():
    net = make_net('edm', use_pos=True)
    x, sigma = inputs()
    grid = full_grid_naive(R).expand(2, -1, -1, -1)
    torch.testing.assert_close(net(x, sigma), net(x, sigma, pos=grid), rtol=0, atol=0)
    assert not torch.allclose(net(x, sigma), net(x, sigma, pos=-grid))
    torch.testing.assert_close(networks.full_grid(R, 2), grid, rtol=0, atol=0)


def test_pos_errors():
    plain, with_pos = make_net('edm'), make_net('edm', use_pos=True)
    x, sigma = inputs()
    grid = full_grid_naive(R).expand(2, -1, -1, -1)
    with pytest.raises(ValueError, match='use_pos=False'):
        plain(x, sigma, pos=grid)
    with pytest.raises(ValueError, match='full image grid'):
        with_pos(x[:, :, :4, :4], sigma)
    with pytest.raises(ValueError, match=r'expected \[N, 2, H, W\]'):
        with_pos(x, sigma, pos=grid[:, :, :4, :4])
    with pytest.raises(ValueError, match='use_pos=True'):
        make_net('edm', pos_freqs=2)


def test_pos_freqs_adds_sin_cos_channels():
    freqs = 2
    net = make_net('edm', use_pos=True, pos_freqs=freqs)
    assert net.pos_channels == 2 + 4 * freqs
    assert net.model.enc['8x8_conv'].weight.shape[1] == C + 2 + 4 * freqs
    net.model = RecordingUNet()
    x, sigma = inputs()
    net(x, sigma)
    grid = full_grid_naive(R).expand(2, -1, -1, -1)
    expected = [grid] + [f(2 ** k * np.pi * grid) for k in range(freqs) for f in (torch.sin, torch.cos)]
    torch.testing.assert_close(net.model.x[:, C:], torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# Architectures: shapes, names, weight transfer.


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp', 'adm'])
@pytest.mark.parametrize('use_pos', [False, True])
@pytest.mark.parametrize('size', [R, R // 2])
def test_forward_shapes(arch, use_pos, size):
    net = make_net('edm', arch, use_pos=use_pos, label_dim=5)
    x, sigma = inputs(size=size)
    pos = full_grid_naive(R)[:, :, :size, R - size:].expand(2, -1, -1, -1) if use_pos else None
    labels = torch.eye(5)[[1, 3]]
    D_x = net(x, sigma, pos=pos, class_labels=labels)
    assert D_x.shape == (2, C, size, size) and D_x.dtype == torch.float32
    assert torch.isfinite(D_x).all()
    assert net.model.enc[f'{R}x{R}_conv'].weight.shape[1] == C + (2 if use_pos else 0)


def test_patch_size_must_survive_downsampling():
    net = make_net('edm', 'ddpmpp', channel_mult=[1, 2, 2])
    x, sigma = inputs(size=6)
    with pytest.raises(ValueError, match='multiples of 4'):
        net(x, sigma)


def module_names(module_dict):
    return list(module_dict.keys())


def test_ddpmpp_names_and_shapes():
    net = make_net('edm', 'ddpmpp', use_pos=True, label_dim=10, augment_dim=9)
    unet = net.model
    assert module_names(unet.enc) == ['8x8_conv', '8x8_block0', '4x4_down', '4x4_block0']
    assert module_names(unet.dec) == ['4x4_in0', '4x4_in1', '4x4_block0', '4x4_block1',
                                      '8x8_up', '8x8_block0', '8x8_block1', '8x8_aux_norm', '8x8_aux_conv']
    keys = set(net.state_dict())
    for name in ['map_label.weight', 'map_label.bias', 'map_augment.weight', 'map_layer0.weight', 'map_layer0.bias',
                 'map_layer1.weight', 'map_layer1.bias', 'enc.8x8_conv.weight', 'enc.8x8_conv.bias']:
        assert 'model.' + name in keys
    assert 'model.map_augment.bias' not in keys
    block = {k[len('model.dec.4x4_block1.'):] for k in keys if k.startswith('model.dec.4x4_block1.')}
    assert block == {f'{m}.{p}' for m in ['norm0', 'conv0', 'affine', 'norm1', 'conv1', 'skip', 'norm2', 'qkv', 'proj']
                     for p in ['weight', 'bias']}
    down = {k[len('model.enc.4x4_down.'):] for k in keys if k.startswith('model.enc.4x4_down.')}
    assert {'conv0.resample_filter', 'skip.resample_filter', 'skip.weight'} <= down and 'qkv.weight' not in down
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes['model.enc.8x8_conv.weight'] == (16, C + 2, 3, 3)
    assert shapes['model.map_label.weight'] == (16, 10)
    assert shapes['model.map_layer0.weight'] == (64, 16)
    assert shapes['model.enc.8x8_block0.affine.weight'] == (16, 64)  # no adaptive scale in DDPM++
    assert shapes['model.dec.4x4_block0.conv0.weight'] == (32, 64, 3, 3)
    assert shapes['model.dec.4x4_block1.qkv.weight'] == (96, 32, 1, 1)
    assert shapes['model.dec.8x8_aux_conv.weight'] == (C, 16, 3, 3)
    torch.testing.assert_close(unet.enc['4x4_down'].conv0.resample_filter, torch.full([1, 1, 2, 2], 0.25))


def test_ncsnpp_names_and_filter():
    net = make_net('edm', 'ncsnpp')
    unet = net.model
    assert '4x4_aux_residual' in unet.enc and unet.enc['4x4_aux_residual'].fused_resample
    assert unet.map_noise.freqs.shape == (16,)  # noise channels 16 * 2, half of them frequencies
    f = torch.tensor([1.0, 3, 3, 1])
    torch.testing.assert_close(unet.enc['4x4_down'].conv0.resample_filter[0, 0], f.outer(f) / 64)


def test_adm_names_and_shapes():
    net = make_net('edm', 'adm', label_dim=10, augment_dim=9)
    unet = net.model
    assert module_names(unet.enc) == ['8x8_conv', '8x8_block0', '4x4_down', '4x4_block0']
    assert module_names(unet.dec) == ['4x4_in0', '4x4_in1', '4x4_block0', '4x4_block1', '8x8_up', '8x8_block0', '8x8_block1']
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert shapes['model.out_norm.weight'] == (64,)
    assert shapes['model.out_conv.weight'] == (C, 64, 3, 3)
    assert shapes['model.map_label.weight'] == (256, 10) and 'model.map_label.bias' not in shapes
    assert shapes['model.map_augment.weight'] == (64, 9)
    assert shapes['model.enc.8x8_block0.affine.weight'] == (128, 256)  # adaptive scale: scale and shift
    assert shapes['model.enc.4x4_block0.qkv.weight'] == (192, 64, 1, 1)
    assert unet.enc['4x4_block0'].num_heads == 1 and unet.enc['8x8_block0'].num_heads == 0
    assert unet.enc['4x4_down'].skip.weight is None  # pure resampling skip
    assert 'model.enc.4x4_down.skip.resample_filter' in shapes


@pytest.mark.parametrize('arch', ['ddpmpp', 'ncsnpp', 'adm'])
def test_copying_weights_by_name_gives_identical_outputs(arch):
    src = make_net('edm', arch, seed=1, use_pos=True, label_dim=4)
    dst = make_net('edm', arch, seed=2, use_pos=True, label_dim=4)
    x, sigma = inputs(size=4)
    pos = full_grid_naive(R)[:, :, 4:, :4].expand(2, -1, -1, -1)
    assert not torch.allclose(src(x, sigma, pos), dst(x, sigma, pos))
    src_params = dict(src.named_parameters())
    src_buffers = dict(src.named_buffers())
    with torch.no_grad():
        for name, tensor in list(dst.named_parameters()) + list(dst.named_buffers()):
            tensor.copy_((src_params if name in src_params else src_buffers)[name])
    torch.testing.assert_close(src(x, sigma, pos), dst(x, sigma, pos), rtol=0, atol=0)


def test_same_seed_gives_same_initialization():
    torch.manual_seed(3)
    a = networks.EDMPrecond(img_resolution=R, img_channels=C, **NCSNPP)
    torch.manual_seed(3)
    b = networks.EDMPrecond(img_resolution=R, img_channels=C, **NCSNPP)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_zero_initialized_output_layers():
    torch.manual_seed(0)
    adm = networks.EDMPrecond(img_resolution=R, img_channels=C, **ADM)
    assert adm.model.out_conv.weight.abs().max() == 0 and adm.model.out_conv.bias.abs().max() == 0
    song = networks.EDMPrecond(img_resolution=R, img_channels=C, **DDPMPP)
    conv1 = song.model.enc['8x8_block0'].conv1.weight
    assert 0 < conv1.abs().max() < 1e-4  # init_weight 1e-5


# ----------------------------------------------------------------------------
# Implicit MLP, labels, fp16, registries, persistence, attention.


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_implicit_mlp(arch):
    net = make_net('edm', arch, use_pos=True, implicit_mlp=True)
    first = net.model.enc['8x8_conv']
    width = ARCHS[arch]['model_channels']
    assert isinstance(first, torch.nn.Sequential) and first.out_channels == width
    shapes = {k: tuple(v.shape) for k, v in first.state_dict().items()}
    assert shapes == {'0.weight': (width, C + 2, 1, 1), '0.bias': (width,), '2.weight': (width, width, 1, 1),
                      '2.bias': (width,), '4.weight': (width, width, 1, 1), '4.bias': (width,),
                      '6.weight': (width, width, 3, 3), '6.bias': (width,)}
    x, sigma = inputs(size=4)
    pos = full_grid_naive(R)[:, :, :4, :4].expand(2, -1, -1, -1)
    net(x, sigma, pos).square().sum().backward()
    assert first[0].weight.grad.abs().sum() > 0


def test_missing_class_labels_mean_zeros():
    net = make_net('edm', label_dim=5)
    x, sigma = inputs()
    torch.testing.assert_close(net(x, sigma), net(x, sigma, class_labels=torch.zeros([2, 5])), rtol=0, atol=0)
    assert not torch.allclose(net(x, sigma), net(x, sigma, class_labels=torch.eye(5)[[0, 1]]))


def test_label_dropout_only_while_training():
    net = make_net('edm', label_dim=5, label_dropout=1.0)
    x, sigma = inputs()
    labels = torch.eye(5)[[0, 1]]
    unconditional = net(x, sigma, class_labels=torch.zeros([2, 5]))
    assert not torch.allclose(net(x, sigma, class_labels=labels), unconditional)
    net.train()
    torch.testing.assert_close(net(x, sigma, class_labels=labels), unconditional)


def test_augment_labels_condition_the_network():
    net = make_net('edm', 'ddpmpp', augment_dim=9)
    x, sigma = inputs()
    assert not torch.allclose(net(x, sigma), net(x, sigma, augment_labels=torch.ones([2, 9])))


def test_fp16_flag_is_a_no_op_on_cpu():
    fp32 = make_net('edm', seed=4)
    fp16 = make_net('edm', seed=4, use_fp16=True)
    x, sigma = inputs()
    out = fp16(x, sigma)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fp32(x, sigma), rtol=0, atol=0)


def test_registries_and_unknown_model_type():
    assert set(architectures.MODELS) == {'SongUNet', 'DhariwalUNet', 'DiT', 'EDM2UNet'}
    assert networks.PRECONDITIONERS == {'vp': networks.VPPrecond, 've': networks.VEPrecond, 'edm': networks.EDMPrecond,
                                        'edm2': networks.EDM2Precond}
    with pytest.raises(ValueError, match="'SongUNet', 'DhariwalUNet'"):
        networks.EDMPrecond(img_resolution=R, img_channels=C, model_type='UNet')
    with pytest.raises(ValueError, match='embedding_type'):
        networks.EDMPrecond(img_resolution=R, img_channels=C, **dict(DDPMPP, embedding_type='sinusoid'))


def test_pickle_round_trip_keeps_outputs_and_config():
    net = make_net('vp', 'ncsnpp', use_pos=True, pos_freqs=1, implicit_mlp=True, label_dim=3)
    copy = pickle.loads(pickle.dumps(net))
    x, sigma = inputs()
    torch.testing.assert_close(copy(x, sigma), net(x, sigma), rtol=0, atol=0)
    assert copy.init_kwargs.pos_freqs == 1 and copy.img_channels == C and copy.use_pos


def naive_attention(block, x):
    """EDM's attention of a UNetBlock, written out: per head softmax_k(q^T k / sqrt(C_h)) v in float64,
    with EDM's qkv channel layout [heads, C_h, 3], then proj, the residual and skip_scale."""
    n, c, h, w = x.shape
    heads = block.num_heads
    qkv = block.qkv(block.norm2(x)).double().reshape(n * heads, c // heads, 3, h * w)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]                          # [N*heads, C_h, HW]
    weights = torch.softmax(torch.einsum('ncq,nck->nqk', q, k) / np.sqrt(c // heads), dim=2)
    a = torch.einsum('nqk,nck->ncq', weights, v).reshape(n, c, h, w).float()
    return (block.proj(a) + x) * block.skip_scale


@pytest.mark.parametrize('heads', [1, 2])
def test_attention_equals_naive_softmax_attention(heads):
    """scaled_dot_product_attention in UNetBlock._attention: the same values and gradients as the naive
    softmax(q^T k / sqrt(C_h)) v on EDM's channel layout, for one and several heads."""
    torch.manual_seed(0)
    block = networks_unet.UNetBlock(16, 16, 8, attention=True, num_heads=heads, skip_scale=np.sqrt(0.5), eps=1e-6,
                               init_zero=dict(init_weight=1))
    x = torch.randn([2, 16, 4, 4], generator=torch.Generator().manual_seed(1), requires_grad=True)
    upstream = torch.randn([2, 16, 4, 4], generator=torch.Generator().manual_seed(2))
    out = block._attention(x)
    grads = torch.autograd.grad((out * upstream).sum(), [x, block.qkv.weight, block.norm2.weight])
    ref = naive_attention(block, x)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), [x, block.qkv.weight, block.norm2.weight])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, (block.proj(block.norm2(x)) + x) * block.skip_scale)   # attention did something


@pytest.mark.parametrize('heads', [1, 2])
def test_attention_keeps_the_memory_format(heads):
    """A block's output has its input's memory format (contiguous, or channels-last with --channels-last),
    so the layers after an attention block, and their dropout masks, see the layout they saw before it."""
    torch.manual_seed(0)
    block = networks_unet.UNetBlock(16, 16, 8, attention=True, num_heads=heads)
    x, emb = torch.randn([2, 16, 4, 4]), torch.randn([2, 8])
    assert block(x, emb).is_contiguous()
    block = block.to(memory_format=torch.channels_last)
    out = block(x.to(memory_format=torch.channels_last), emb)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_conv_bias_is_added_once_on_every_path():
    """Conv2d's output is the convolution plus the bias, for the plain, the upsampling and the downsampling
    layers (fused or not) and both resampling filters. (On CUDA the bias goes inside the convolution;
    tests/test_cuda.py compares CUDA gradients with these CPU ones.)"""
    x = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    for resample_filter in ([1, 1], [1, 3, 3, 1]):
        for kwargs in [dict(), dict(up=True), dict(down=True), dict(up=True, fused_resample=True),
                       dict(down=True, fused_resample=True)]:
            torch.manual_seed(0)
            conv = networks_unet.Conv2d(3, 5, kernel=3, resample_filter=resample_filter, init_bias=1, **kwargs)
            assert conv.bias.abs().min() > 0
            out = conv(x)
            with torch.no_grad():
                bias, conv.bias = conv.bias, None
                without_bias = conv(x)
            torch.testing.assert_close(out, without_bias + bias.reshape(1, -1, 1, 1), rtol=1e-6, atol=1e-6)


def fir_resample(x, f, up):
    """EDM's FIR resampling by a depthwise (transposed) convolution with f [1, 1, K, K], padding (K - 1) // 2."""
    channels, pad = x.shape[1], (f.shape[-1] - 1) // 2
    if up:
        return torch.nn.functional.conv_transpose2d(x, (f * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2,
                                                    padding=pad)
    return torch.nn.functional.conv2d(x, f.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=pad)


@pytest.mark.parametrize('up', [False, True])
def test_box_filter_resampling_equals_the_fir_filter(up):
    """With the [1, 1] filter (DDPM++, ADM) Conv2d resamples by average pooling / nearest-neighbour
    upsampling: the same values and gradients as EDM's FIR filter pass; [1, 3, 3, 1] keeps the FIR pass."""
    for resample_filter, box in (([1, 1], True), ([2, 2], True), ([1, 3, 3, 1], False), ([1, 2], False)):
        layer = networks_unet.Conv2d(3, 3, kernel=0, up=up, down=not up, resample_filter=resample_filter)
        assert layer.box_resample == box
        x = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = layer(x)
        ref = fir_resample(x, layer.resample_filter, up)
        assert out.shape == ref.shape == (2, 3, 16, 16) if up else (2, 3, 4, 4)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        grad, = torch.autograd.grad((out * upstream).sum(), [x])
        ref_grad, = torch.autograd.grad((ref * upstream).sum(), [x])
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('arch', ['ddpmpp', 'adm'])
def test_affine_outputs_equal_each_blocks_affine_layer(arch):
    """The UNet computes all blocks' affine(emb) in one product; each equals the block's own Linear,
    values and gradients (of the weights and of emb)."""
    unet = make_net('edm', arch).model
    blocks = networks_unet._unet_blocks(unet)
    assert len(blocks) == sum(isinstance(m, networks_unet.UNetBlock) for m in unet.modules())
    emb = torch.randn([2, blocks[0].emb_channels], generator=torch.Generator().manual_seed(0), requires_grad=True)
    together = networks_unet._affine_outputs(blocks, emb)
    separate = [block.affine(emb).reshape(2, -1, 1, 1) for block in blocks]
    assert [t.shape for t in together] == [s.shape for s in separate]
    for t, s in zip(together, separate):
        torch.testing.assert_close(t, s, rtol=1e-6, atol=1e-6)
    weights = [emb, blocks[0].affine.weight, blocks[-1].affine.bias]
    loss = lambda outputs: sum((o * (i + 1)).sum() for i, o in enumerate(outputs))
    for grad, ref_grad in zip(torch.autograd.grad(loss(together), weights), torch.autograd.grad(loss(separate), weights)):
        # emb's gradient sums every block's contribution, in another order: float32 rounding of the largest terms
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max().item())


def test_block_with_given_affine_output_equals_block_alone():
    """UNetBlock.forward(x, emb, params) with params = affine(emb) is the block's own forward(x, emb)."""
    torch.manual_seed(0)
    for adaptive_scale in (False, True):
        block = networks_unet.UNetBlock(8, 16, 12, attention=True, num_heads=2, adaptive_scale=adaptive_scale,
                                   init_zero=dict(init_weight=1))
        x, emb = torch.randn([2, 8, 4, 4]), torch.randn([2, 12])
        params = networks_unet._affine_outputs([block], emb)[0]
        torch.testing.assert_close(block(x, emb, params), block(x, emb), rtol=1e-6, atol=1e-6)


def test_group_norm_keeps_float32_parameters_under_autocast():
    """Under autocast GroupNorm passes its float32 weight and bias as they are (EDM cast them to the input's
    dtype, bfloat16, and CUDA autocast then casts them back to float32): the output is autocast's group_norm
    of the float32 parameters, not of the rounded ones. Without autocast they take the input's dtype."""
    norm = networks_unet.GroupNorm(num_channels=32)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(32, generator=torch.Generator().manual_seed(0)) / 3)
        norm.bias.copy_(torch.randn(32, generator=torch.Generator().manual_seed(1)) / 3)
    x = torch.randn([2, 32, 4, 4], generator=torch.Generator().manual_seed(2)).bfloat16()
    group_norm = lambda weight, bias: torch.nn.functional.group_norm(x, norm.num_groups, weight, bias, norm.eps)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = norm(x)
        assert torch.equal(out, group_norm(norm.weight, norm.bias))
        assert not torch.equal(out, group_norm(norm.weight.bfloat16(), norm.bias.bfloat16()))
    assert torch.equal(norm(x), group_norm(norm.weight.bfloat16(), norm.bias.bfloat16()))


# Outputs of the EDM reference implementation (NVlabs/edm training/networks.py)
# for make_net(precond, arch, label_dim=5, augment_dim=9) on inputs(): every
# 41st value of D_x and the sum. A change in the computation (order of
# operations, embeddings, scalings) shows here.
EDM_REFERENCE_OUTPUTS = {
    ('edm', 'ddpmpp'): ([-0.90457, 0.546, -0.61732, -0.33305, 0.64421, -0.04985, -0.09694, 0.1121, -0.13963, -0.03658], -21.0657),
    ('vp', 'ncsnpp'): ([-0.95387, 1.01672, -0.73162, -0.38181, 1.03137, 3.04271, 2.97547, -0.12939, 1.81695, 7.34614], 653.5031),
    ('ve', 'adm'): ([-0.86404, 1.24177, -0.46004, 0.02842, 1.35685, 8.97754, 1.99595, 0.66234, 8.26229, 10.88514], 1094.3905),
}


@pytest.mark.parametrize('precond, arch', list(EDM_REFERENCE_OUTPUTS))
def test_outputs_match_edm_reference(precond, arch):
    net = make_net(precond, arch, label_dim=5, augment_dim=9)
    x, sigma = inputs()
    labels = torch.eye(5)[[1, 3]]
    augment_labels = torch.linspace(-1, 1, 18).reshape(2, 9)
    with torch.no_grad():
        D_x = net(x, sigma, class_labels=labels, augment_labels=augment_labels)
    samples, total = EDM_REFERENCE_OUTPUTS[(precond, arch)]
    torch.testing.assert_close(D_x.flatten()[::41], torch.tensor(samples), rtol=0, atol=2e-4)
    assert D_x.double().sum().item() == pytest.approx(total, rel=1e-4, abs=1e-3)


def test_fused_upsampling_keeps_the_size_and_equals_the_separate_passes():
    """Conv2d(up=True, fused_resample=True): 8 -> 16 for a 3x3 kernel with the
    [1, 1] and the [1, 3, 3, 1] filters (EDM's padding split), and away from the
    border the values of upsampling, then convolving (the border pads differently)."""
    x = torch.randn([2, 3, 8, 8], generator=torch.Generator().manual_seed(0))
    for resample_filter in ([1, 1], [1, 3, 3, 1]):
        torch.manual_seed(0)
        fused = networks_unet.Conv2d(3, 5, kernel=3, up=True, resample_filter=resample_filter, fused_resample=True)
        torch.manual_seed(0)
        separate = networks_unet.Conv2d(3, 5, kernel=3, up=True, resample_filter=resample_filter)
        out = fused(x)
        assert out.shape == (2, 5, 16, 16), (resample_filter, out.shape)
        torch.testing.assert_close(out[..., 2:-2, 2:-2], separate(x)[..., 2:-2, 2:-2], rtol=1e-5, atol=1e-5)


def test_a_network_without_coordinates_takes_edms_call():
    """use_pos=False: EDM's generate.py calls net(x, sigma, class_labels); the labels must reach the network."""
    net = make_net('edm', use_pos=False, label_dim=3)
    x, sigma = inputs()
    labels = torch.eye(3)[[0, 2]]
    assert torch.equal(net(x, sigma, labels), net(x, sigma, class_labels=labels))
    assert not torch.equal(net(x, sigma, labels), net(x, sigma, class_labels=torch.eye(3)[[1, 1]]))
    assert net.model.enc['8x8_conv'].weight.shape[1] == C   # no coordinate channels: EDM's shapes
