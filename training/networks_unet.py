"""EDM's layers and its UNets (parameter names and shapes follow EDM's
reference networks, so weights copied by name from an EDM or official Patch
Diffusion pickle give the same outputs):

- `SongUNet`: DDPM++ and NCSN++ (Song et al., "Score-Based Generative Modeling
  through Stochastic Differential Equations"), as re-implemented by EDM.
- `DhariwalUNet`: ADM (Dhariwal & Nichol, "Diffusion Models Beat GANs on
  Image Synthesis"), as re-implemented by EDM.

A UNet is the F of a preconditioner (training/networks.py): input
[N, in_channels, H, W] (image channels, then any coordinate channels), output
[N, out_channels, H, W]. The layers `Linear`, `PositionalEmbedding` and
`drop_labels` serve the transformer (training/networks_dit.py) too.

Tensor layout is NCHW throughout. This module is embedded in network pickles
(torch_utils.persistence), so it imports only numpy, torch and torch_utils:
its text runs wherever a pickle is opened, EDM's own repository included
(docs/DESIGN.md section 4).
"""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

# ----------------------------------------------------------------------------
# Weight initialization.


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor of `shape` drawn from the global torch RNG.

    mode: 'xavier_uniform' | 'xavier_normal' | 'kaiming_uniform' |
    'kaiming_normal', with the variances 2/(fan_in+fan_out) (xavier) and
    1/fan_in (kaiming), as in EDM.
    """
    if mode == 'xavier_uniform':
        return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Unknown init_mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal')


# ----------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer: [N, in_features] -> [N, out_features].

    weight [out_features, in_features] is weight_init(init_mode) * init_weight;
    bias [out_features] is weight_init(init_mode) * init_bias.
    """

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        """x: [N, in_features] -> [N, out_features] in x.dtype."""
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)  # one addmm: bias + x @ weight^T


def _resample_kernel(resample_filter):
    """Separable FIR filter [1, 1, K, K] = outer(f, f) / sum(f)^2."""
    f = torch.as_tensor(resample_filter, dtype=torch.float32)
    return f.ger(f).unsqueeze(0).unsqueeze(1) / f.sum().square()


@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x up- or downsampling by an FIR filter.

    kernel: size of the square kernel, 0 for a pure resampling layer (no
    weight, no bias). weight [out_channels, in_channels, kernel, kernel],
    bias [out_channels]. With `up` or `down` the layer holds the buffer
    `resample_filter` [1, 1, K, K]; `fused_resample` applies the filter and
    the kernel in one padded pass (NCSN++'s residual encoder uses it).
    Input [N, in_channels, H, W] -> [N, out_channels, H', W'] with H' = 2H
    (up), H/2 (down) or H. With a two-tap box filter ([1, 1]: DDPM++, ADM)
    the resampling is a 2x2 average pool (down) or a nearest-neighbour 2x
    upsampling (up), equal to the FIR filter's pass without building a
    per-channel filter on every call.

    On CUDA the bias goes inside the convolution (one operator; cuDNN's path
    still takes its gradient as torch's sum over N, H, W), except after a
    fused downsampling. On CPU it is a separate add: oneDNN would take the
    bias gradient by its own float32 reduction, 10-100x less accurate than
    torch's sum (docs/PERFORMANCE.md, "Operators per step").
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.box_resample = len(resample_filter) == 2 and resample_filter[0] == resample_filter[1]
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = None
        self.bias = None
        if kernel:
            self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
            if bias:
                self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
        self.register_buffer('resample_filter', _resample_kernel(resample_filter) if up or down else None)

    def forward(self, x):
        """x: [N, in_channels, H, W] -> [N, out_channels, H', W'] in x.dtype."""
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        fuse_bias = x.device.type == 'cuda' and not (self.fused_resample and self.down)
        if self.fused_resample and w is not None and self.up:
            # The padding is shared out between the two passes so that H' = 2H, as EDM does.
            x = self._upsample(x, padding=max(f_pad - w_pad, 0))
            x = torch.nn.functional.conv2d(x, w, b if fuse_bias else None, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = self._downsample(torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad), padding=0)
        else:
            if self.up:
                x = self._upsample(x, padding=f_pad)
            if self.down:
                x = self._downsample(x, padding=f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, b if fuse_bias else None, padding=w_pad)
        if b is not None and not fuse_bias:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

    def _upsample(self, x, padding):
        """2x upsampling of each channel by the transposed FIR filter (gain 4): [N, C, H, W] -> [N, C, 2H, 2W]."""
        if self.box_resample:   # [1, 1] filter, no padding: every pixel becomes a 2x2 block
            return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
        channels = x.shape[1]
        f = self.resample_filter.to(x.dtype).mul(4).tile([channels, 1, 1, 1])
        return torch.nn.functional.conv_transpose2d(x, f, groups=channels, stride=2, padding=padding)

    def _downsample(self, x, padding):
        """2x downsampling of each channel by the FIR filter: [N, C, H, W] -> [N, C, H/2, W/2]."""
        if self.box_resample:   # [1, 1] filter, no padding: the mean of each 2x2 block
            return torch.nn.functional.avg_pool2d(x, 2)
        channels = x.shape[1]
        f = self.resample_filter.to(x.dtype).tile([channels, 1, 1, 1])
        return torch.nn.functional.conv2d(x, f, groups=channels, stride=2, padding=padding)


@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalization with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        """x: [N, C, H, W] -> same shape, in x.dtype (under autocast: in the dtype autocast picks).

        Under autocast the float32 weight and bias go in as they are: CUDA
        autocast runs group_norm in float32, CPU autocast takes a bfloat16
        input with float32 parameters. Casting them to x.dtype first would
        round them to bfloat16 and add casts (forward and backward).
        """
        weight, bias = self.weight, self.bias
        if not torch.is_autocast_enabled(x.device.type):
            weight, bias = weight.to(x.dtype), bias.to(x.dtype)
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=weight, bias=bias, eps=self.eps)


@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual block with optional 2x up/downsampling and self-attention.

    The union of the DDPM++, NCSN++ and ADM blocks (EDM). Submodules: norm0,
    conv0, affine (embedding -> per-channel bias, or scale and shift when
    `adaptive_scale`), norm1, conv1, `skip` (only when the shape changes),
    and with attention norm2, qkv, proj. forward: x [N, in_channels, H, W],
    emb [N, emb_channels] -> [N, out_channels, H', W'].
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb, params=None):
        """x: [N, in_channels, H, W], emb: [N, emb_channels] -> [N, out_channels, H', W'].

        params: affine(emb) as [N, C', 1, 1] when the UNet has computed it
        together with its other blocks' (`_affine_outputs`); None computes it here.
        """
        orig = x
        x = self.conv0(silu(self.norm0(x)))
        if params is None:
            params = self.affine(emb).reshape(emb.shape[0], -1, 1, 1)
        params = params.to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))
        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = self._scale_skip(x.add_(self.skip(orig) if self.skip is not None else orig))
        if self.num_heads:
            x = self._attention(x)
        return x

    def _scale_skip(self, x):
        """x * skip_scale, in place (x is a fresh sum); nothing to do when skip_scale is 1 (ADM)."""
        return x if self.skip_scale == 1 else x.mul_(self.skip_scale)

    def _attention(self, x):
        """Multi-head self-attention over the H*W positions, with residual and skip_scale.

        softmax(q^T k / sqrt(C_h)) v per head (C_h channels per head), by
        torch's scaled_dot_product_attention: one fused operator forward and
        one backward, without the [HW, HW] weights in memory on its fused
        paths. The qkv channels are laid out as EDM's ([heads, C_h, 3]), so
        EDM's weights give the same attention. EDM computes the logits and
        the softmax in float32 whatever the input dtype; the fused kernels
        keep float32 accumulators and softmax statistics too
        (docs/PERFORMANCE.md, "Operators per step").
        """
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm2(x)).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)   # each [N, heads, HW, C_h], C_h contiguous
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)   # [N, heads, HW, C_h]
        a = a.permute(0, 1, 3, 2).reshape(n, c, h, w).contiguous(memory_format=_memory_format(x))
        return self._scale_skip(self.proj(a).add_(x))


def _memory_format(x):
    """torch.channels_last for a channels-last x [N, C, H, W] (--channels-last), else torch.contiguous_format."""
    return torch.channels_last if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last) \
        else torch.contiguous_format


def _unet_blocks(unet):
    """The UNetBlocks of a SongUNet or DhariwalUNet in the order its forward runs them (encoder, then decoder)."""
    return [block for block in [*unet.enc.values(), *unet.dec.values()] if isinstance(block, UNetBlock)]


def _affine_outputs(blocks, emb):
    """block.affine(emb) of each UNetBlock in `blocks`, all in one matrix product.

    emb [N, emb_channels] -> one [N, C'_i, 1, 1] per block, as block.affine(emb)
    reshaped (each output is the same dot product plus bias). One product
    over the concatenated weights replaces a Linear per block, forward and
    backward, and the sum of the blocks' gradients with respect to emb.
    """
    weight = torch.cat([block.affine.weight for block in blocks])   # [sum C'_i, emb_channels]
    bias = torch.cat([block.affine.bias for block in blocks])
    out = torch.nn.functional.linear(emb, weight.to(emb.dtype), bias.to(emb.dtype))
    return out.reshape(emb.shape[0], -1, 1, 1).split([block.affine.out_features for block in blocks], dim=1)


# ----------------------------------------------------------------------------
# Noise-level embeddings.


@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding (DDPM++, ADM): [N] -> [N, num_channels].

    Frequencies (1 / max_positions) ** (i / D), i = 0 .. num_channels/2 - 1,
    D = num_channels/2 (- 1 with `endpoint`); output [cos, sin].
    """

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        """x: [N] noise labels -> [N, num_channels]."""
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features (NCSN++): [N] -> [N, num_channels], output [cos, sin].

    Buffer `freqs` [num_channels/2] ~ Normal(0, scale^2).
    """

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        """x: [N] noise labels -> [N, num_channels]."""
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------
# Input layer variants.


@persistence.persistent_class
class ImplicitMLP(torch.nn.Sequential):
    """The official Patch Diffusion "implicit MLP" input layer.

    Three 1x1 convolutions with SiLU, then a 3x3 convolution, replacing the
    first 3x3 convolution of the UNet: [N, in_channels, H, W] ->
    [N, out_channels, H, W]. Its parameters are named 0.*, 2.*, 4.*, 6.* as in
    the official code, so its weights transfer by name.
    """

    def __init__(self, in_channels, out_channels, init):
        super().__init__(
            Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=1, **init),
            torch.nn.SiLU(),
            Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init),
            torch.nn.SiLU(),
            Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init),
            torch.nn.SiLU(),
            Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init),
        )
        self.in_channels = in_channels
        self.out_channels = out_channels


def _input_layer(in_channels, out_channels, implicit_mlp, init):
    """First layer of a UNet: a 3x3 Conv2d, or an ImplicitMLP."""
    if implicit_mlp:
        return ImplicitMLP(in_channels=in_channels, out_channels=out_channels, init=init)
    return Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, **init)


def _check_input_size(x, num_levels):
    """Raise ValueError unless H and W of x [N, C, H, W] survive num_levels - 1 halvings."""
    multiple = 2 ** (num_levels - 1)
    height, width = x.shape[-2:]
    if height % multiple or width % multiple:
        raise ValueError(f'Input of {height}x{width} pixels: this UNet halves the resolution {num_levels - 1} times, '
                         f'so height and width must be multiples of {multiple}; use such a patch size')


def drop_labels(class_labels, label_dropout, training):
    """Zero the label rows [N, label_dim] with probability label_dropout while training."""
    if not (training and label_dropout):
        return class_labels
    keep = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
    return class_labels * keep.to(class_labels.dtype)


# ----------------------------------------------------------------------------
# Architectures.


@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ UNet (EDM's SongUNet).

    DDPM++: embedding_type='positional', channel_mult_noise=1,
    encoder_type='standard', resample_filter=[1,1]. NCSN++:
    embedding_type='fourier', channel_mult_noise=2, encoder_type='residual',
    resample_filter=[1,3,3,1]. Both use decoder_type='standard'.
    `implicit_mlp` replaces the first convolution by an ImplicitMLP.
    forward: x [N, in_channels, H, W] (H, W multiples of
    2 ** (len(channel_mult) - 1), may be smaller than img_resolution),
    noise_labels [N], class_labels [N, label_dim] or None,
    augment_labels [N, augment_dim] or None -> [N, out_channels, H, W].
    """

    def __init__(self,
                 img_resolution,                 # Full image side (shorter if not square): layer names, attention.
                 in_channels,                    # Input channels (image + coordinate channels).
                 out_channels,                   # Output channels.
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 augment_dim=0,                  # Augmentation label dimensionality, 0 = no augmentation.
                 model_channels=128,             # Base channel count.
                 channel_mult=[1, 2, 2, 2],      # Channel multiplier per resolution level.
                 channel_mult_emb=4,             # Embedding width = model_channels * channel_mult_emb.
                 num_blocks=4,                   # Residual blocks per resolution level.
                 attn_resolutions=[16],          # Resolutions with self-attention.
                 dropout=0.10,                   # Dropout probability inside the blocks.
                 label_dropout=0,                # Probability of dropping class labels (classifier-free guidance).
                 embedding_type='positional',    # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
                 channel_mult_noise=1,           # Noise embedding width multiplier: 1 (DDPM++), 2 (NCSN++).
                 encoder_type='standard',        # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
                 decoder_type='standard',        # 'standard' or 'skip'.
                 resample_filter=[1, 1],         # FIR resampling filter: [1,1] (DDPM++), [1,3,3,1] (NCSN++).
                 implicit_mlp=False,             # First layer is an ImplicitMLP instead of a 3x3 conv.
                 ):
        for name, value, choices in (('embedding_type', embedding_type, ('fourier', 'positional')),
                                     ('encoder_type', encoder_type, ('standard', 'skip', 'residual')),
                                     ('decoder_type', decoder_type, ('standard', 'skip'))):
            if value not in choices:
                raise ValueError(f'{name}={value!r} is not supported; choose one of {", ".join(choices)}')
        super().__init__()
        self.label_dropout = label_dropout
        self.num_levels = len(channel_mult)
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
                            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping: noise level (+ class, + augmentation) -> embedding [N, emb_channels].
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = None
        if augment_dim:
            self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = _input_layer(cin, cout, implicit_mlp, init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attention = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attention,
                                                                **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0,
                                                             up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        """x [N, in_channels, H, W], noise_labels [N] -> [N, out_channels, H, W]."""
        _check_input_size(x, self.num_levels)
        emb = self._embedding(noise_labels, class_labels, augment_labels)
        params = iter(_affine_outputs(_unet_blocks(self), emb))   # in the order the blocks run

        # Encoder; skip connections are the outputs of the non-aux layers.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb, next(params)) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder; the output is the sum of the aux_conv outputs.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb, next(params))
        return aux

    def _embedding(self, noise_labels, class_labels, augment_labels):
        """[N] noise labels (+ [N, label_dim], + [N, augment_dim]) -> [N, emb_channels]."""
        emb = self.map_noise(noise_labels)
        emb = emb.roll(emb.shape[1] // 2, dims=1)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        return silu(self.map_layer1(emb))


@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM UNet (EDM's DhariwalUNet).

    `implicit_mlp` replaces the first convolution by an ImplicitMLP (the
    official code offers it for DDPM++/NCSN++ only; here ADM has it too).
    forward: x [N, in_channels, H, W] (H, W multiples of
    2 ** (len(channel_mult) - 1)), noise_labels [N], class_labels
    [N, label_dim] or None, augment_labels [N, augment_dim] or None ->
    [N, out_channels, H, W].
    """

    def __init__(self,
                 img_resolution,                 # Full image side (shorter if not square): layer names, attention.
                 in_channels,                    # Input channels (image + coordinate channels).
                 out_channels,                   # Output channels.
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 augment_dim=0,                  # Augmentation label dimensionality, 0 = no augmentation.
                 model_channels=192,             # Base channel count.
                 channel_mult=[1, 2, 3, 4],      # Channel multiplier per resolution level.
                 channel_mult_emb=4,             # Embedding width = model_channels * channel_mult_emb.
                 num_blocks=3,                   # Residual blocks per resolution level.
                 attn_resolutions=[32, 16, 8],   # Resolutions with self-attention.
                 dropout=0.10,                   # Dropout probability inside the blocks.
                 label_dropout=0,                # Probability of dropping class labels (classifier-free guidance).
                 implicit_mlp=False,             # First layer is an ImplicitMLP instead of a 3x3 conv.
                 ):
        super().__init__()
        self.label_dropout = label_dropout
        self.num_levels = len(channel_mult)
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1 / 3), init_bias=np.sqrt(1 / 3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping: noise level (+ augmentation, + class) -> embedding [N, emb_channels].
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = None
        if augment_dim:
            self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = None
        if label_dim:
            self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False,
                                    init_mode='kaiming_normal', init_weight=np.sqrt(label_dim))

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = _input_layer(cin, cout, implicit_mlp, init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout,
                                                                attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        """x [N, in_channels, H, W], noise_labels [N] -> [N, out_channels, H, W]."""
        _check_input_size(x, self.num_levels)
        emb = self._embedding(noise_labels, class_labels, augment_labels)
        params = iter(_affine_outputs(_unet_blocks(self), emb))   # in the order the blocks run
        skips = []
        for block in self.enc.values():
            x = block(x, emb, next(params)) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb, next(params))
        return self.out_conv(silu(self.out_norm(x)))

    def _embedding(self, noise_labels, class_labels, augment_labels):
        """[N] noise labels (+ [N, augment_dim], + [N, label_dim]) -> [N, emb_channels]."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training))
        return silu(emb)
