"""The diffusion transformer `DiT` (Peebles & Xie, "Scalable Diffusion Models
with Transformers") whose tokens carry the sin/cos embedding of their
position in the full image, read from the coordinate channels
(docs/DESIGN.md section 2, "Transformers").

A DiT is the F of a preconditioner (training/networks.py), as a UNet is.
This module is embedded in network pickles (torch_utils.persistence) and
imports only numpy, torch and torch_utils, so that a DiT pickle is
self-contained: it has layers of its own (`Dense`, `NoiseEmbedding`) rather
than the UNets' (training/networks_unet.py).
"""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

# ----------------------------------------------------------------------------
# Layers.


@persistence.persistent_class
class Dense(torch.nn.Module):
    """A fully connected layer, [..., in_features] -> [..., out_features] in
    x.dtype, with torch.nn.Linear's parameters (weight [out, in], bias [out]).

    Drawn from the global torch RNG, the weight then the (zeroed) bias as
    EDM's layers draw them: the weight uniform in +-sqrt(6 / (in + out))
    (Xavier, as the DiT paper) times `gain` (0 for adaLN-Zero's zero
    layers), or N(0, normal_std^2) when normal_std is given; the bias zero.
    """

    def __init__(self, in_features, out_features, bias=True, gain=1, normal_std=None):
        super().__init__()
        if normal_std is None:
            bound = np.sqrt(6 / (in_features + out_features))
            weight = bound * (torch.rand(out_features, in_features) * 2 - 1) * gain
            draw_bias = lambda: bound * (torch.rand(out_features) * 2 - 1)   # noqa: E731
        else:
            scale = np.sqrt(1 / in_features)
            weight = scale * torch.randn(out_features, in_features) * (normal_std * np.sqrt(in_features))
            draw_bias = lambda: scale * torch.randn(out_features)   # noqa: E731
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(draw_bias() * 0) if bias else None

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


@persistence.persistent_class
class NoiseEmbedding(torch.nn.Module):
    """The sin/cos embedding of the noise label, [N] -> [N, num_channels]:
    [cos(x f_i), sin(x f_i)] with f_i = 10000^(-i / (num_channels / 2)) (the DiT
    paper's timestep embedding; float32 frequencies as in EDM's UNets)."""

    def __init__(self, num_channels):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=x.device) / half)
        angles = x.ger(freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


def image_grid(batch_size, height, width, device):
    """[N, 2, H, W]: the (x, y) coordinates of each pixel of an H x W image, each
    axis mapped to [-1, 1] by (i / (R - 1) - 0.5) * 2 (docs/DESIGN.md section 2;
    the same float32 values as training/networks.py's full_grid)."""
    rows = (torch.arange(height, device=device) / (height - 1) - 0.5) * 2
    cols = (torch.arange(width, device=device) / (width - 1) - 0.5) * 2
    grid = torch.stack([cols[None, :].expand(height, -1), rows[:, None].expand(-1, width)])
    return grid[None].expand(batch_size, -1, -1, -1)


# ----------------------------------------------------------------------------
# The transformer.


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
    D -> int(mlp_ratio D) -> D with tanh-approximated GELU (mlp_ratio an int
    or a float, as the DiT code's 4.0). `dropout` drops elements of each
    branch's output while training.
    """

    def __init__(self, channels, num_heads, mlp_ratio=4, dropout=0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.affine = Dense(channels, 6 * channels, gain=0)
        self.qkv = Dense(channels, 3 * channels)
        self.proj = Dense(channels, channels)
        hidden = int(channels * mlp_ratio)
        self.fc0 = Dense(channels, hidden)
        self.fc1 = Dense(hidden, channels)

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
                 mlp_ratio=4,                    # MLP width = int(mlp_ratio * D) (an int or a float).
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
        # Tokens, and the conditioning c [N, D].
        self.patchify = Dense(in_channels * token_size ** 2, model_channels)
        self.map_noise = NoiseEmbedding(noise_channels)   # its MLP's weights ~ N(0, 0.02^2), as the DiT code's
        self.map_layer0 = Dense(noise_channels, model_channels, normal_std=0.02)
        self.map_layer1 = Dense(model_channels, model_channels, normal_std=0.02)
        self.map_label = None
        if label_dim:   # the table's entries ~ N(0, 0.02^2)
            self.map_label = Dense(label_dim + 1, model_channels, bias=False, normal_std=0.02)
        self.map_augment = None
        if augment_dim:
            self.map_augment = Dense(augment_dim, model_channels, bias=False, gain=0)

        self.blocks = torch.nn.ModuleList([DiTBlock(model_channels, num_heads, mlp_ratio, dropout)
                                           for _ in range(num_blocks)])
        self.out_affine = Dense(model_channels, 2 * model_channels, gain=0)
        self.out_proj = Dense(model_channels, token_size ** 2 * out_channels, gain=0)

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
            pos = image_grid(n, height, width, x.device)
        coords = token_coordinates(pos, self.token_size)
        return sincos_position_embedding(coords, self.model_channels, self.img_resolution / self.token_size / 2)

    def _conditioning(self, noise_labels, class_labels, augment_labels):
        """c [N, D]: MLP(sin/cos(noise label)) + class embedding (+ augmentation labels)."""
        c = self.map_layer1(silu(self.map_layer0(self.map_noise(noise_labels))))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:   # zero a label row with probability label_dropout
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            null = 1 - labels.sum(dim=1, keepdim=True)            # all-zero labels select the null class
            c = c + self.map_label(torch.cat([labels, null], dim=1).to(c.dtype))
        if self.map_augment is not None and augment_labels is not None:
            c = c + self.map_augment(augment_labels.to(c.dtype))
        return c
