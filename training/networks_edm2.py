"""EDM2's magnitude-preserving UNet (Karras et al., CVPR 2024, arXiv:2312.02696),
as a model F of training/networks.py's preconditioners (EDM2Precond).

Every layer keeps activations at unit magnitude (RMS 1) when its inputs have
it: MPConv (eq. 47) with forced weight normalisation (eq. 66), mp_silu
(eq. 81), mp_sum (eq. 88), mp_cat (eq. 103), MPFourier (eq. 75). The
parameter names are EDM2's (`enc.64x64_block0.conv_res0.weight`, ...), so
EDM2's weights map onto these by name. What differs from EDM2's UNet:

- the input holds the image and the Patch Diffusion coordinate channels
  (in_channels = image + coordinate channels, out_channels = image): the
  constant channel of ones is appended after them, so a network without
  coordinates sees EDM2's [x, ones];
- optional augmentation labels (`augment_dim`, EDM's augmentation pipe):
  `emb_augment`, whose contribution to the embedding is scaled by the
  learned `augment_gain`, zero at initialisation (EDM2 has no augmentation);
- optional label dropout for classifier-free guidance (`label_dropout`);
- a non-square image names its layers and places attention by its shorter
  side (docs/DESIGN.md section 2), as the other UNets do.

Like training/networks_unet.py this module imports only numpy, torch and
torch_utils: its source is embedded in network pickles.
"""

import numpy as np
import torch

from torch_utils import persistence

# ----------------------------------------------------------------------------
# Magnitude-preserving operations.


def normalize(x, dim=None, eps=1e-4):
    """x divided by (its RMS over `dim` + eps): unit magnitude (EDM2's weight
    and pixel normalisation). dim: an int or a list of ints; None: all but
    the first dimension."""
    dims = list(range(1, x.ndim)) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    count = int(np.prod([x.shape[d] for d in dims]))   # elements each norm is taken over
    rms = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32) / np.sqrt(count)
    return x / (rms + eps).to(x.dtype)


def resample(x, f=(1, 1), mode='keep'):
    """x [N, C, H, W] as it is ('keep'), at half the resolution ('down') or at
    twice it ('up'): each channel filtered with the outer product of the 1-D
    FIR filter f (even length, normalised to sum 1; x4 for 'up', which
    spreads each pixel over four)."""
    if mode == 'keep':
        return x
    taps = torch.as_tensor(f, dtype=torch.float32)
    if taps.ndim != 1 or len(taps) % 2:
        raise ValueError(f'resample_filter={list(f)} must be a 1-D filter of even length, such as [1, 1]')
    taps = taps / taps.sum()
    channels, padding = x.shape[1], (len(taps) - 1) // 2
    kernel = (taps[:, None] * taps[None, :]).to(x.device, x.dtype).expand(channels, 1, -1, -1)
    if mode == 'down':
        return torch.nn.functional.conv2d(x, kernel, stride=2, padding=padding, groups=channels)
    if mode != 'up':
        raise ValueError(f'resample mode={mode!r}: keep, down or up')
    return torch.nn.functional.conv_transpose2d(x, kernel * 4, stride=2, padding=padding, groups=channels)


def mp_silu(x):
    """SiLU scaled back to unit magnitude: E[silu(z)^2] = 0.596^2 for z ~ N(0, 1) (eq. 81)."""
    return torch.nn.functional.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """The blend (1 - t) a + t b of two independent unit-magnitude inputs,
    divided by its magnitude sqrt((1 - t)^2 + t^2) (eq. 88)."""
    return (a + t * (b - a)) / float(np.hypot(1 - t, t))


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenation of a and b along `dim` with the shares (1 - t) : t of
    the result's magnitude, scaled so that unit inputs give a unit output
    (eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    total = np.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (total * (1 - t) / np.sqrt(n_a)), b * (total * t / np.sqrt(n_b))], dim=dim)


def drop_labels(class_labels, label_dropout, training):
    """The label rows [N, label_dim], each zeroed with probability label_dropout while training."""
    if not training or not label_dropout:
        return class_labels
    kept = torch.rand([class_labels.shape[0], 1], device=class_labels.device) >= label_dropout
    return class_labels * kept.to(class_labels.dtype)


# ----------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Fourier features of unit magnitude (eq. 75): a scalar per sample [N]
    -> [N, num_channels], sqrt(2) cos(freqs x + phases) with fixed random
    freqs = 2 pi N(0, bandwidth^2) and phases = 2 pi U(0, 1) (buffers)."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        angles = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (np.sqrt(2) * angles.cos()).to(x.dtype)


@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution (kernel [k, k]) or fully connected
    layer (kernel []), without bias (eq. 47): the weight of each output
    channel is used at unit RMS, times gain / sqrt(fan_in).

    Training mode also writes the unit-RMS weight back into the parameter
    before it is used (forced weight normalisation, eq. 66), so the stored
    weights never grow; the weight used is normalised again, so the
    gradient is that of a normalised weight.
    """

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        weight = self.weight.to(torch.float32)
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(weight))   # eq. 66
        fan_in = weight[0].numel()
        weight = (normalize(weight) * (gain / np.sqrt(fan_in))).to(x.dtype)   # eq. 47
        if weight.ndim == 2:
            return torch.nn.functional.linear(x, weight)
        return torch.nn.functional.conv2d(x, weight, padding=weight.shape[-1] // 2)


def _attention(x, qkv, num_heads):
    """Self-attention over the pixels of x [N, C, H, W], given qkv [N, 3C, H, W]
    whose channels hold, per head, its channels each as a (q, k, v) triple:
    q, k and v normalised per pixel and head, softmax(q k / sqrt(c)) v ->
    [N, C, H, W]."""
    n, channels, height, width = x.shape
    qkv = normalize(qkv.reshape(n, num_heads, channels // num_heads, 3, height * width), dim=2)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]              # each [N, heads, c, HW]
    logits = q.transpose(2, 3) @ (k / np.sqrt(q.shape[2]))                   # [N, heads, HW (query), HW (key)]
    out = v @ logits.softmax(dim=3).transpose(2, 3)                           # [N, heads, c, HW (query)]
    return out.reshape(n, channels, height, width)


@persistence.persistent_class
class Block(torch.nn.Module):
    """EDM2's encoder ('enc') or decoder ('dec') block, optionally resampling
    and with self-attention (EDM2 paper, Figure 21).

    forward: x [N, in_channels, H, W], emb [N, emb_channels] -> [N, out_channels, H', W'].
    """

    def __init__(self,
                 in_channels,                    # Input channels.
                 out_channels,                   # Output channels.
                 emb_channels,                   # Embedding channels.
                 flavor='enc',                   # 'enc' or 'dec'.
                 resample_mode='keep',           # 'keep', 'up' or 'down'.
                 resample_filter=[1, 1],         # FIR filter of the resampling.
                 attention=False,                # Self-attention after the residual branch.
                 channels_per_head=64,           # Channels per attention head.
                 dropout=0,                      # Dropout probability in the residual branch.
                 res_balance=0.3,                # Weight t of the residual branch in mp_sum.
                 attn_balance=0.3,               # Weight t of the attention in mp_sum.
                 clip_act=256,                   # Clip the output to [-clip_act, clip_act]; None: no clipping.
                 ):
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        # An encoder block maps its input to out_channels first (conv_skip); a decoder block at the end.
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            x = normalize(x if self.conv_skip is None else self.conv_skip(x), dim=1)   # pixel norm

        # Residual branch, its features scaled per channel by 1 + (the embedding through a zero-gain layer).
        y = self.conv_res0(mp_silu(x))
        modulation = 1 + self.emb_linear(emb, gain=self.emb_gain)          # [N, out_channels]
        y = mp_silu(y * modulation.to(y.dtype)[..., None, None])
        if self.training and self.dropout:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads:
            y = self.attn_proj(_attention(x, self.attn_qkv(x), self.num_heads))
            x = mp_sum(x, y, t=self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)


# ----------------------------------------------------------------------------
# The UNet.


@persistence.persistent_class
class EDM2UNet(torch.nn.Module):
    """EDM2's UNet (EDM2 paper, Figure 21) with Patch Diffusion's input.

    forward: x [N, in_channels, H, W] (c_in-scaled image, then coordinate
    channels; H, W multiples of 2 ** (len(channel_mult) - 1), may be smaller
    than img_resolution), noise_labels [N], class_labels [N, label_dim] or
    None, augment_labels [N, augment_dim] or None -> [N, out_channels, H, W].
    """

    def __init__(self,
                 img_resolution,                 # Full image side (shorter if not square): layer names, attention.
                 in_channels,                    # Input channels (image + coordinate channels), without the ones.
                 out_channels,                   # Output channels.
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 augment_dim=0,                  # Augmentation label dimensionality, 0 = no augmentation.
                 implicit_mlp=False,             # Not available: EDM2's first layer is one MPConv.
                 model_channels=192,             # Base channel count.
                 channel_mult=[1, 2, 3, 4],      # Channel multiplier per resolution level.
                 channel_mult_noise=None,        # Noise embedding width / model_channels; None: channel_mult[0].
                 channel_mult_emb=None,          # Embedding width / model_channels; None: max(channel_mult).
                 num_blocks=3,                   # Blocks per resolution level.
                 attn_resolutions=[16, 8],       # Resolutions with self-attention.
                 label_balance=0.5,              # Weight t of the class embedding against the noise embedding.
                 concat_balance=0.5,             # Weight t of the main path against the skip connection.
                 label_dropout=0,                # Probability of dropping class labels (classifier-free guidance).
                 **block_kwargs,                 # Passed to Block: dropout, res_balance, ...
                 ):
        if implicit_mlp:
            raise ValueError('implicit_mlp replaces the first convolution of SongUNet or DhariwalUNet; EDM2\'s UNet '
                             'has no such option: leave it out')
        super().__init__()
        widths = [model_channels * mult for mult in channel_mult]                 # channels per level
        noise_width = model_channels * (channel_mult_noise or channel_mult[0])
        emb_width = model_channels * (channel_mult_emb or max(channel_mult))
        self.num_levels = len(channel_mult)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.label_dropout = label_dropout
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding: noise level (+ class, + augmentation) -> [N, emb_width].
        self.emb_fourier = MPFourier(noise_width)
        self.emb_noise = MPConv(noise_width, emb_width, kernel=[])
        self.emb_label = MPConv(label_dim, emb_width, kernel=[]) if label_dim else None
        self.emb_augment = MPConv(augment_dim, emb_width, kernel=[]) if augment_dim else None
        self.augment_gain = torch.nn.Parameter(torch.zeros([])) if augment_dim else None

        def block(name, width_in, width_out, **kwargs):
            resolution = int(name.partition('x')[0])
            attention = kwargs.pop('attention', resolution in attn_resolutions)
            return Block(width_in, width_out, emb_width, attention=attention, **kwargs, **block_kwargs)

        # Encoder: per level a first layer (the input convolution, then downsampling blocks) and
        # num_blocks blocks; every layer's output is a skip connection of the decoder.
        self.enc = torch.nn.ModuleDict()
        width = in_channels + 1   # + the constant channel of ones
        for level, level_width in enumerate(widths):
            side = img_resolution >> level
            if level == 0:
                self.enc[f'{side}x{side}_conv'] = MPConv(width, level_width, kernel=[3, 3])
            else:
                self.enc[f'{side}x{side}_down'] = block(f'{side}x{side}', width, width, flavor='enc',
                                                        resample_mode='down', attention=False)
            width = level_width if level == 0 else width
            for index in range(num_blocks):
                self.enc[f'{side}x{side}_block{index}'] = block(f'{side}x{side}', width, level_width, flavor='enc')
                width = level_width
        skip_widths = [layer.out_channels for layer in self.enc.values()]

        # Decoder: from the coarsest level up, two blocks (the first with attention) or an upsampling
        # block, then num_blocks + 1 blocks, each taking a skip connection.
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(widths))):
            side = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f'{side}x{side}_in0'] = block(f'{side}x{side}', width, width, flavor='dec', attention=True)
                self.dec[f'{side}x{side}_in1'] = block(f'{side}x{side}', width, width, flavor='dec', attention=False)
            else:
                self.dec[f'{side}x{side}_up'] = block(f'{side}x{side}', width, width, flavor='dec', resample_mode='up',
                                                      attention=False)
            for index in range(num_blocks + 1):
                self.dec[f'{side}x{side}_block{index}'] = block(f'{side}x{side}', width + skip_widths.pop(),
                                                                widths[level], flavor='dec')
                width = widths[level]
        self.out_conv = MPConv(width, out_channels, kernel=[3, 3])

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        """x [N, in_channels, H, W], noise_labels [N] -> [N, out_channels, H, W]."""
        multiple = 2 ** (self.num_levels - 1)
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(f'Input of {x.shape[-2]}x{x.shape[-1]} pixels: this UNet halves the resolution '
                             f'{self.num_levels - 1} times, so height and width must be multiples of {multiple}; '
                             f'use such a patch size')
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            labels = drop_labels(class_labels, self.label_dropout, self.training)
            emb = mp_sum(emb, self.emb_label(labels * np.sqrt(labels.shape[1])), t=self.label_balance)
        if self.emb_augment is not None and augment_labels is not None:
            emb = emb + self.emb_augment(augment_labels.to(emb.dtype), gain=self.augment_gain)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for layer in self.enc.values():
            x = layer(x) if isinstance(layer, MPConv) else layer(x, emb)
            skips.append(x)
        for name, layer in self.dec.items():
            if '_block' in name:   # the blocks after _in1 / _up take the next skip connection
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = layer(x, emb)
        return self.out_conv(x, gain=self.out_gain)
