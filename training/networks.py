"""Network architectures and preconditioners.

Architectures (parameter names and shapes follow EDM's reference networks, so
weights copied by name from an EDM or official Patch Diffusion pickle give the
same outputs):

- `SongUNet`: DDPM++ and NCSN++ (Song et al., "Score-Based Generative Modeling
  through Stochastic Differential Equations"), as re-implemented by EDM.
- `DhariwalUNet`: ADM (Dhariwal & Nichol, "Diffusion Models Beat GANs on
  Image Synthesis"), as re-implemented by EDM.
- `DiT`: a diffusion transformer (Peebles & Xie, "Scalable Diffusion Models
  with Transformers") whose tokens carry the sin/cos embedding of their
  position in the full image, read from the coordinate channels
  (docs/DESIGN.md section 2, "Transformers").

Preconditioners (EDM paper, Table 1; docs/DESIGN.md section 1): `VPPrecond`,
`VEPrecond`, `EDMPrecond`. Each computes

    D(x; sigma) = c_skip * x + c_out * F(cat(c_in * x, pos); c_noise)

where `pos` are the optional Patch Diffusion coordinate channels (docs/DESIGN.md
section 2), added after c_in scaling and carrying no noise.

Tensor layout is NCHW throughout. This module is embedded in network pickles
(torch_utils.persistence), so it imports only numpy, torch and torch_utils.
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


def _drop_labels(class_labels, label_dropout, training):
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
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
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
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        return silu(emb)


# ----------------------------------------------------------------------------
# Transformer: DiT (Peebles & Xie, "Scalable Diffusion Models with
# Transformers"), with the global position embedding of docs/DESIGN.md
# section 2 ("Transformers").


def dit_size_problem(model_channels, num_heads, token_size):
    """Why a DiT of this hidden size, head count and token side cannot be
    built (a sentence), or None when it can."""
    if token_size < 1 or int(token_size) != token_size:
        return f'token_size={token_size!r} must be a positive integer (the side of a token in pixels)'
    if num_heads < 1 or model_channels % num_heads:
        return f'the hidden size {model_channels} is not divisible by {num_heads} attention heads'
    if model_channels % 4:
        return (f'the hidden size {model_channels} is not a multiple of 4 (the 2-D sin/cos position embedding '
                f'gives each axis half of the channels, as sin and cos pairs)')
    return None


def token_coordinates(pos, token_size):
    """pos [N, 2, H, W] (x, y of each pixel) -> [N, T, 2]: the mean (x, y) of
    each token's p x p pixels, T = (H/p) (W/p) tokens in row-major order.

    The p^2 values are summed one by one in a fixed order (then divided by
    p^2, a power of two for p = 2, 4, 8: exact), so a token gets the same
    coordinates whatever the crop or batch it comes from.
    """
    n, _, height, width = pos.shape
    p = token_size
    cells = pos.reshape(n, 2, height // p, p, width // p, p)
    total = cells[:, :, :, 0, :, 0]
    for index in range(1, p * p):
        total = total + cells[:, :, :, index // p, :, index % p]
    return (total / (p * p)).flatten(2).transpose(1, 2)                  # [N, T, 2]


def sincos_position_embedding(coords, num_channels, scale):
    """coords [N, T, 2] -> [N, T, num_channels] float32: the 2-D sin/cos embedding.

    With u = scale * x and v = scale * y, the channels are [sin(u w), cos(u w),
    sin(v w), cos(v w)], w_i = 10000^(-i / (num_channels / 4)),
    i = 0 .. num_channels/4 - 1 (the transformer's 1/10000^(2i/d) frequencies
    with d = num_channels/2 per axis).
    """
    quarter = num_channels // 4
    freqs = 10000 ** (-torch.arange(quarter, dtype=torch.float32, device=coords.device) / quarter)
    angles = (coords.to(torch.float32) * scale)[..., None] * freqs                 # [N, T, 2, quarter]
    return torch.cat([angles[:, :, 0].sin(), angles[:, :, 0].cos(),
                      angles[:, :, 1].sin(), angles[:, :, 1].cos()], dim=2)


def _to_tokens(x, p):
    """[N, C, H, W] -> [N, T, C p p]: the pixels of each p x p token, channel-major; tokens row-major."""
    n, c, height, width = x.shape
    x = x.reshape(n, c, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)     # [N, H/p, W/p, C, p, p]
    return x.reshape(n, (height // p) * (width // p), c * p * p)


def _from_tokens(tokens, height, width, p):
    """[N, T, C p p] -> [N, C, H, W]: the inverse of _to_tokens."""
    n, _, features = tokens.shape
    c = features // (p * p)
    x = tokens.reshape(n, height // p, width // p, c, p, p).permute(0, 3, 1, 4, 2, 5)   # [N, C, H/p, p, W/p, p]
    return x.reshape(n, c, height, width)


def _layer_norm(x):
    """LayerNorm over the last dimension without learned scale and shift (adaLN supplies them), eps 1e-6."""
    return torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)


def _modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift; x [N, T, D], shift and scale [N, 1, D]."""
    return torch.addcmul(shift, x, scale + 1)


@persistence.persistent_class
class DiTBlock(torch.nn.Module):
    """A DiT block with adaLN-Zero conditioning: [N, T, D] -> [N, T, D].

    From the conditioning c, `affine` gives shift, scale and gate of the
    attention branch and of the MLP branch; it starts at zero (adaLN-Zero),
    so a fresh block is the identity:

        x = x + gate_a * Attention(LN(x) * (1 + scale_a) + shift_a)
        x = x + gate_m * MLP(LN(x) * (1 + scale_m) + shift_m)

    Attention: multi-head self-attention over the T tokens (qkv, proj); MLP:
    D -> mlp_ratio D -> D with tanh-approximated GELU. `dropout` drops
    elements of each branch's output while training.
    """

    def __init__(self, channels, num_heads, mlp_ratio=4, dropout=0, init=dict(), init_zero=dict(init_weight=0)):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.affine = Linear(in_features=channels, out_features=6 * channels, **init_zero)
        self.qkv = Linear(in_features=channels, out_features=3 * channels, **init)
        self.proj = Linear(in_features=channels, out_features=channels, **init)
        self.fc0 = Linear(in_features=channels, out_features=mlp_ratio * channels, **init)
        self.fc1 = Linear(in_features=mlp_ratio * channels, out_features=channels, **init)

    def forward(self, x, emb):
        """x [N, T, D] tokens, emb [N, D] = SiLU(c) -> [N, T, D]."""
        params = self.affine(emb)[:, None, :].to(x.dtype)                   # [N, 1, 6D]
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = params.chunk(6, dim=2)
        y = self._attention(_modulate(_layer_norm(x), shift_a, scale_a))
        x = x + gate_a * torch.nn.functional.dropout(y, p=self.dropout, training=self.training)
        y = self.fc0(_modulate(_layer_norm(x), shift_m, scale_m))
        y = self.fc1(torch.nn.functional.gelu(y, approximate='tanh'))
        return x + gate_m * torch.nn.functional.dropout(y, p=self.dropout, training=self.training)

    def _attention(self, x):
        """softmax(q k^T / sqrt(C_h)) v per head over the tokens, by torch's
        scaled_dot_product_attention (fused: no [T, T] weights in memory on its
        memory-efficient paths), then proj: [N, T, D] -> [N, T, D]."""
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                      # each [N, heads, T, C_h]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)       # [N, heads, T, C_h]
        return self.proj(a.transpose(1, 2).reshape(n, t, d))


@persistence.persistent_class
class DiT(torch.nn.Module):
    """Diffusion transformer (DiT) for Patch Diffusion.

    The image is cut into p x p tokens (p = token_size; the paper's
    "patch size", not the training crop) by a linear map of each token's
    pixels and channels (the paper's p x p, stride-p convolution), each
    token gets the sin/cos embedding of its GLOBAL position (below), the
    tokens go through `num_blocks` adaLN-Zero blocks conditioned on
    c = MLP(sin/cos(noise label)) + class embedding (+ augmentation labels),
    and a final adaLN layer and a linear map give each token's p x p pixels
    of output. The modulation layers and the final layers start at zero, so
    a fresh DiT outputs F = 0.

    Position: the last in_channels - out_channels input channels are the
    coordinate channels of docs/DESIGN.md section 2 (the first two: x and y
    of each pixel in the full image, in [-1, 1]). A token's position is the
    mean (x, y) of its pixels, scaled by G/2 with G = img_resolution / p
    tokens along the (shorter) side, so neighbouring tokens of the full image
    are about 1 apart; a token at the same place of the full image gets the
    same embedding in every crop, and the full image needs no special case.
    Without coordinate channels the input is taken as the whole image (its
    own full grid): such a DiT cannot place crops (train it on full images).

    Class labels: an embedding table of label_dim + 1 vectors (the columns
    of `map_label.weight`), the last one the null class that all-zero labels
    (unconditional, label dropout, classifier-free guidance) select.
    forward: x [N, in_channels, H, W] (H, W multiples of p), noise_labels [N],
    class_labels [N, label_dim] or None, augment_labels [N, augment_dim] or
    None -> [N, out_channels, H, W]. No weight depends on the token count.
    """

    def __init__(self,
                 img_resolution,                 # Full image side (shorter if not square): scale of the positions.
                 in_channels,                    # Input channels (image + coordinate channels).
                 out_channels,                   # Output channels (image channels).
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 augment_dim=0,                  # Augmentation label dimensionality, 0 = no augmentation.
                 model_channels=384,             # Hidden size D (the paper's S: 384, B: 768, L: 1024, XL: 1152).
                 num_blocks=12,                  # DiT blocks, the depth (S, B: 12, L: 24, XL: 28).
                 num_heads=6,                    # Attention heads (S: 6, B: 12, L, XL: 16).
                 token_size=2,                   # Side p of a token in pixels (the paper's patch size 2, 4, 8).
                 mlp_ratio=4,                    # MLP width = mlp_ratio * D.
                 noise_channels=256,             # Width of the sin/cos noise-level embedding.
                 dropout=0,                      # Dropout probability of the blocks' branches.
                 label_dropout=0,                # Probability of dropping class labels (classifier-free guidance).
                 implicit_mlp=False,             # A UNet input layer: refused here.
                 ):
        problem = dit_size_problem(model_channels, num_heads, token_size)
        if problem is not None:
            raise ValueError(f'Cannot build this DiT: {problem}')
        if implicit_mlp:
            raise ValueError('implicit_mlp replaces the first convolution of a UNet; a DiT has none: '
                             'use implicit_mlp=False')
        if in_channels - out_channels == 1 or in_channels < out_channels:
            raise ValueError(f'in_channels={in_channels}, out_channels={out_channels}: the coordinate channels '
                             f'after the image channels must be none or at least [x, y]')
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.pos_channels = in_channels - out_channels
        self.model_channels = model_channels
        self.token_size = token_size
        self.label_dropout = label_dropout
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=0)

        # Tokens, and the conditioning c [N, D].
        self.patchify = Linear(in_features=in_channels * token_size ** 2, out_features=model_channels, **init)
        self.map_noise = PositionalEmbedding(num_channels=noise_channels)
        self.map_layer0 = Linear(in_features=noise_channels, out_features=model_channels, **init)
        self.map_layer1 = Linear(in_features=model_channels, out_features=model_channels, **init)
        self.map_label = None
        if label_dim:   # the table's entries ~ N(0, 0.02^2)
            self.map_label = Linear(in_features=label_dim + 1, out_features=model_channels, bias=False,
                                    init_mode='kaiming_normal', init_weight=0.02 * np.sqrt(label_dim + 1))
        self.map_augment = None
        if augment_dim:
            self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero)

        self.blocks = torch.nn.ModuleList([DiTBlock(model_channels, num_heads, mlp_ratio, dropout, init, init_zero)
                                           for _ in range(num_blocks)])
        self.out_affine = Linear(in_features=model_channels, out_features=2 * model_channels, **init_zero)
        self.out_proj = Linear(in_features=model_channels, out_features=token_size ** 2 * out_channels, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        """x [N, in_channels, H, W], noise_labels [N] -> [N, out_channels, H, W]."""
        n, _, height, width = x.shape
        p = self.token_size
        if height % p or width % p:
            raise ValueError(f'Input of {height}x{width} pixels: this DiT cuts it into {p}x{p} tokens, so height '
                             f'and width must be multiples of {p}; use such a patch size')
        tokens = self.patchify(_to_tokens(x, p))                                    # [N, T, D]
        tokens = tokens + self.position_embedding(x).to(tokens.dtype)
        emb = silu(self._conditioning(noise_labels, class_labels, augment_labels))  # [N, D]
        for block in self.blocks:
            tokens = block(tokens, emb)
        shift, scale = self.out_affine(emb)[:, None, :].to(tokens.dtype).chunk(2, dim=2)
        out = self.out_proj(_modulate(_layer_norm(tokens), shift, scale))          # [N, T, C_out p p]
        return _from_tokens(out, height, width, p)

    def position_embedding(self, x):
        """The global position embedding of x's tokens, [N, T, D] float32
        (docs/DESIGN.md section 2, "Transformers"); x [N, in_channels, H, W]."""
        n, _, height, width = x.shape
        if self.pos_channels:
            first = self.in_channels - self.pos_channels
            pos = x[:, first: first + 2].to(torch.float32)
        else:
            pos = full_grid((height, width), n, x.device)
        coords = token_coordinates(pos, self.token_size)
        return sincos_position_embedding(coords, self.model_channels, self.img_resolution / self.token_size / 2)

    def _conditioning(self, noise_labels, class_labels, augment_labels):
        """c [N, D]: MLP(sin/cos(noise label)) + class embedding (+ augmentation labels)."""
        c = self.map_layer1(silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            null = 1 - labels.sum(dim=1, keepdim=True)            # all-zero labels select the null class
            c = c + self.map_label(torch.cat([labels, null], dim=1).to(c.dtype))
        if self.map_augment is not None and augment_labels is not None:
            c = c + self.map_augment(augment_labels.to(c.dtype))
        return c


MODELS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'DiT': DiT}

# ----------------------------------------------------------------------------
# Coordinate channels (docs/DESIGN.md section 2). Their one home is here, not in
# patching.py, because a network pickle embeds this module's source alone.


def image_shape(size):
    """(height, width) of a size given as an int (a square's side) or a pair (height, width)."""
    if isinstance(size, (tuple, list)):
        height, width = size
        return int(height), int(width)
    return int(size), int(size)


def resolution_value(size):
    """The inverse of `image_shape`: an int side for a square (as recorded
    before non-square images), [height, width] otherwise."""
    height, width = image_shape(size)
    return height if height == width else [height, width]


def coordinate_values(index, resolution):
    """Pixel indices of one axis of the full image mapped to [-1, 1]: (index / (R - 1) - 0.5) * 2,
    R = the image's extent along that axis."""
    return (index / (resolution - 1) - 0.5) * 2


def patch_grid(top, left, size, resolution, dtype=torch.float32):
    """Coordinate grids of h x w patches whose top-left corners are (top, left).

    top, left: integer tensors [N]; size: the patch, an int (square) or
    (h, w); resolution: the full image, an int (square) or (H, W). Returns
    [N, 2, h, w]: channel 0 is x (column), channel 1 is y (row), in
    full-image coordinates, each axis mapped to [-1, 1] over its own extent
    (inside the H x W frame; docs/DESIGN.md section 2). The integer indices go
    through the formula in float32 arithmetic, exactly as the official Patch
    Diffusion code computes them, so its networks see the same bits here.
    """
    (height, width), (frame_h, frame_w) = image_shape(size), image_shape(resolution)
    rows = coordinate_values(top[:, None] + torch.arange(height, device=top.device), frame_h).to(dtype)   # [N, h]
    cols = coordinate_values(left[:, None] + torch.arange(width, device=top.device), frame_w).to(dtype)   # [N, w]
    x = cols[:, None, :].expand(-1, height, -1)
    y = rows[:, :, None].expand(-1, -1, width)
    return torch.stack([x, y], dim=1)


def full_grid(resolution, batch_size=1, device='cpu', dtype=torch.float32):
    """The coordinate grid of the whole image (an int side or (H, W)), [N, 2, H, W]
    (training at full size, and sampling)."""
    zeros = torch.zeros(batch_size, dtype=torch.long, device=device)
    return patch_grid(zeros, zeros, resolution, resolution, dtype=dtype)


def _encode_coordinates(pos, pos_freqs):
    """pos [N, 2, H, W] -> [N, 2 + 4 * pos_freqs, H, W].

    Channels: pos itself, then for k = 0 .. pos_freqs - 1 the pair
    sin(2^k * pi * pos), cos(2^k * pi * pos) (2 channels each).
    """
    features = [pos]
    for k in range(pos_freqs):
        angle = (2 ** k * np.pi) * pos
        features += [angle.sin(), angle.cos()]
    return torch.cat(features, dim=1)


# ----------------------------------------------------------------------------
# Preconditioners.


class _Precond(torch.nn.Module):
    """What VP, VE and EDM preconditioning share: the UNet, labels, coordinates, dtype.

    Subclasses set sigma_min and sigma_max and implement
    `preconditioning(sigma) -> (c_skip, c_out, c_in, c_noise)`.
    """

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, use_pos, pos_freqs, implicit_mlp,
                 model_type, model_kwargs, img_shape=None):
        super().__init__()
        if model_type not in MODELS:
            raise ValueError(f'model_type={model_type!r} is unknown; choose one of {", ".join(map(repr, MODELS))}')
        if pos_freqs < 0 or int(pos_freqs) != pos_freqs:
            raise ValueError(f'pos_freqs={pos_freqs!r} must be a non-negative integer')
        if pos_freqs and not use_pos:
            raise ValueError(f'pos_freqs={pos_freqs} needs coordinate channels; set use_pos=True or pos_freqs=0')
        self.img_shape = image_shape(img_shape if img_shape is not None else img_resolution)
        if img_resolution != min(self.img_shape):
            raise ValueError(f'img_resolution={img_resolution} must be the shorter side of img_shape={img_shape}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.use_pos = use_pos
        self.pos_freqs = int(pos_freqs)
        self.pos_channels = 2 + 4 * self.pos_freqs if use_pos else 0
        self.implicit_mlp = implicit_mlp
        self.model = MODELS[model_type](img_resolution=img_resolution, in_channels=img_channels + self.pos_channels,
                                        out_channels=img_channels, label_dim=label_dim, implicit_mlp=implicit_mlp,
                                        **model_kwargs)

    def forward(self, x, sigma, pos=None, class_labels=None, force_fp32=False, augment_labels=None):
        """Denoised image D_x [N, C, H, W] float32.

        x: noisy image or patch [N, C, H, W]; sigma: noise level, scalar or
        [N]; pos: coordinates [N, 2, H, W] in [-1, 1] (None = full image grid)
        for a use_pos model; class_labels: [N, label_dim] (None = zeros, i.e.
        unconditional; ignored when label_dim == 0); augment_labels:
        [N, augment_dim] or None. The UNet runs in fp16 when use_fp16, not
        force_fp32 and x is on CUDA. A network without coordinates
        (use_pos=False) also takes EDM's call net(x, sigma, class_labels),
        so EDM's own generate.py samples it.
        """
        if not self.use_pos and pos is not None and pos.ndim == 2 and class_labels is None:
            class_labels, pos = pos, None   # EDM's call net(x, sigma, class_labels) of a network without coordinates
        x = x.to(torch.float32)
        sigma = self._sigma_column(sigma, x)
        class_labels = self._class_labels(class_labels, x)
        coords = self._coordinate_channels(pos, x)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        x_in = c_in * x
        if coords is not None:
            x_in = torch.cat([x_in, coords], dim=1)
        F_x = self.model(x_in.to(dtype), c_noise.flatten(), class_labels=class_labels, augment_labels=augment_labels)
        assert F_x.dtype == dtype or torch.is_autocast_enabled(x.device.type)   # autocast (bf16) picks its own
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        """Noise levels the network supports: all of them (identity)."""
        return torch.as_tensor(sigma)

    def _sigma_column(self, sigma, x):
        """sigma (scalar or [N]) -> [N, 1, 1, 1] float32 on x.device."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f'sigma has {sigma.shape[0]} values for a batch of {x.shape[0]}; give one per image or a scalar')
        return sigma.expand(x.shape[0], 1, 1, 1)

    def _class_labels(self, class_labels, x):
        """class_labels -> [N, label_dim] float32 (zeros when None), or None when unconditional."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([x.shape[0], self.label_dim], device=x.device)
        return class_labels.to(device=x.device, dtype=torch.float32).reshape(-1, self.label_dim)

    def _coordinate_channels(self, pos, x):
        """Encoded coordinate channels [N, pos_channels, H, W] float32, or None without use_pos."""
        if not self.use_pos:
            if pos is not None:
                raise ValueError('pos was given, but this network was built with use_pos=False; '
                                 'call it without pos, or build it with use_pos=True')
            return None
        n, _, height, width = x.shape
        if pos is None:
            if (height, width) != self.img_shape:
                raise ValueError(f'pos is needed for a {width}x{height} patch; the default (the full image grid) '
                                 f'only fits {self.img_shape[1]}x{self.img_shape[0]} inputs')
            pos = full_grid(self.img_shape, n, x.device)
        if tuple(pos.shape) != (n, 2, height, width):
            raise ValueError(f'pos has shape {list(pos.shape)}; expected [N, 2, H, W] = {[n, 2, height, width]}')
        return _encode_coordinates(pos.to(device=x.device, dtype=torch.float32), self.pos_freqs)


@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance preserving preconditioning (EDM paper, Table 1).

    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1);
    c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1),
    c_noise = (M - 1) * sigma^-1(sigma).
    """

    def __init__(self,
                 img_resolution,                 # Side R of the full image (the shorter side if not square).
                 img_channels,                   # Image channels C (without coordinate channels).
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 use_fp16=False,                 # Run the UNet in fp16 on CUDA.
                 beta_d=19.9,                    # Extent of the noise level schedule.
                 beta_min=0.1,                   # Initial slope of the noise level schedule.
                 M=1000,                         # Number of time steps of the original DDPM formulation.
                 epsilon_t=1e-5,                 # Smallest t used in training.
                 model_type='SongUNet',          # Key of MODELS.
                 use_pos=False,                  # Add coordinate channels (Patch Diffusion).
                 pos_freqs=0,                    # Sin/cos frequencies added to the coordinate channels.
                 implicit_mlp=False,             # ImplicitMLP as the UNet's first layer.
                 img_shape=None,                 # [H, W] of a non-square image (img_resolution = min(H, W)).
                 **model_kwargs,                 # Passed to the UNet.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_pos, pos_freqs, implicit_mlp,
                         model_type, model_kwargs, img_shape)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, dtype=torch.float64)))  # float64: EDM's float32 gives 2% less
        self.sigma_max = float(self.sigma(torch.tensor(1.0, dtype=torch.float64)))

    def preconditioning(self, sigma):
        """sigma [N, 1, 1, 1] -> (c_skip, c_out, c_in, c_noise), each broadcastable to [N, 1, 1, 1]."""
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t):
        """Noise level at time t in [epsilon_t, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Time t of noise level sigma (inverse of `sigma`)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d


@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance exploding preconditioning (EDM paper, Table 1).

    c_skip = 1, c_out = sigma, c_in = 1, c_noise = ln(sigma / 2).
    """

    def __init__(self,
                 img_resolution,                 # Side R of the full image (the shorter side if not square).
                 img_channels,                   # Image channels C (without coordinate channels).
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 use_fp16=False,                 # Run the UNet in fp16 on CUDA.
                 sigma_min=0.02,                 # Smallest supported noise level.
                 sigma_max=100,                  # Largest supported noise level.
                 model_type='SongUNet',          # Key of MODELS.
                 use_pos=False,                  # Add coordinate channels (Patch Diffusion).
                 pos_freqs=0,                    # Sin/cos frequencies added to the coordinate channels.
                 implicit_mlp=False,             # ImplicitMLP as the UNet's first layer.
                 img_shape=None,                 # [H, W] of a non-square image (img_resolution = min(H, W)).
                 **model_kwargs,                 # Passed to the UNet.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_pos, pos_freqs, implicit_mlp,
                         model_type, model_kwargs, img_shape)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def preconditioning(self, sigma):
        """sigma [N, 1, 1, 1] -> (c_skip, c_out, c_in, c_noise), each broadcastable to [N, 1, 1, 1]."""
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM preconditioning (EDM paper, Table 1; docs/DESIGN.md section 1).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma * sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4, sd = sigma_data.
    """

    def __init__(self,
                 img_resolution,                 # Side R of the full image (the shorter side if not square).
                 img_channels,                   # Image channels C (without coordinate channels).
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 use_fp16=False,                 # Run the UNet in fp16 on CUDA.
                 sigma_min=0,                    # Smallest supported noise level.
                 sigma_max=float('inf'),         # Largest supported noise level.
                 sigma_data=0.5,                 # Expected standard deviation of the training data.
                 model_type='DhariwalUNet',      # Key of MODELS.
                 use_pos=False,                  # Add coordinate channels (Patch Diffusion).
                 pos_freqs=0,                    # Sin/cos frequencies added to the coordinate channels.
                 implicit_mlp=False,             # ImplicitMLP as the UNet's first layer.
                 img_shape=None,                 # [H, W] of a non-square image (img_resolution = min(H, W)).
                 **model_kwargs,                 # Passed to the UNet.
                 ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_pos, pos_freqs, implicit_mlp,
                         model_type, model_kwargs, img_shape)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def preconditioning(self, sigma):
        """sigma [N, 1, 1, 1] -> (c_skip, c_out, c_in, c_noise), each [N, 1, 1, 1]."""
        sd = self.sigma_data
        total = sigma ** 2 + sd ** 2                    # sigma^2 + sigma_data^2
        root = total.sqrt()
        c_skip = sd ** 2 / total
        c_out = sigma * sd / root
        c_in = 1 / root
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


PRECONDITIONERS = {'vp': VPPrecond, 've': VEPrecond, 'edm': EDMPrecond}

# Architectures by the name of train.py --arch: the UNet and its EDM defaults, or the DiT and its size
# (preconditioner keyword arguments; --cbase, --cres, ... override them).
ARCHITECTURES = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                   model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
    # DiT sizes of the paper's Table 1 (--cbase: hidden size, --blocks: depth, --heads, --token-size).
    'dit-s': dict(model_type='DiT', model_channels=384, num_blocks=12, num_heads=6, token_size=2),
    'dit-b': dict(model_type='DiT', model_channels=768, num_blocks=12, num_heads=12, token_size=2),
    'dit-l': dict(model_type='DiT', model_channels=1024, num_blocks=24, num_heads=16, token_size=2),
    'dit-xl': dict(model_type='DiT', model_channels=1152, num_blocks=28, num_heads=16, token_size=2),
}


def build_network(network_kwargs, img_resolution, img_channels, label_dim):
    """The preconditioned network of resolved options {precond, model_type, ...}
    for images of `img_resolution`: an int (square) or (height, width). A
    non-square network names its layers and places attention by its shorter
    side (docs/DESIGN.md section 2), so it shares its weights' names with the
    square network of that side."""
    kwargs = dict(network_kwargs)
    height, width = image_shape(img_resolution)
    if height != width:
        kwargs['img_shape'] = [height, width]
    return PRECONDITIONERS[kwargs.pop('precond')](img_resolution=min(height, width), img_channels=img_channels,
                                                  label_dim=label_dim, **kwargs)
