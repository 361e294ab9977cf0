"""Non-leaking data augmentation of EDM (Karras et al. 2022, "augmentation regularization").

Every transform fires per image with probability `p * multiplier` and writes
its parameters into an augmentation label, which the network receives as a
condition (`augment_dim`); at sampling time the label is zero, i.e. "no
augmentation", so the augmentations do not leak into the generated images.

Label layout (the one of EDM's networks): the entries of the ENABLED
transforms (multiplier > 0), concatenated in this fixed order, each zero
when its transform did not fire for that image:

    xflip          1   w in {0, 1}
    yflip          1   w in {0, 1}
    rotate_int     2   (x flipped, y flipped) before the transpose of a
                       k * 90 degree rotation: k=0 (0,0), 1 (1,0), 2 (1,1), 3 (0,1)
    translate_int  2   tx / (W * translate_int_max), ty / (H * translate_int_max)
    scale          1   w, the scale being 2^(w * scale_std)
    rotate_frac    2   cos(w) - 1, sin(w), w the angle in radians
    aniso          2   w * cos(r), w * sin(r), 2^(w * aniso_std) the stretch along r
                       (as in EDM, (w, r) and (-w, r + pi) share a label)
    translate_frac 2   wx, wy, the shift being (wx * W, wy * H) * translate_frac_std
    brightness     1   w, the offset being w * brightness_std
    contrast       1   w, the gain being 2^(w * contrast_std)
    lumaflip       1   w in {0, 1}
    hue            2   cos(w) - 1, sin(w), w the angle around the luma axis
    saturation     1   w, the chroma gain being 2^(w * saturation_std)

EDM's training configuration (`EDM_AUGMENT_KWARGS` with p = --augment,
0.12 by default) enables xflip, yflip, scale, rotate_frac, aniso and
translate_frac: 9 entries, hence EDM's `augment_dim=9`. `AugmentPipe.label_dim`
gives the width for any configuration.

Image coordinates: x is the column, y the row (pointing down), in pixels.
Geometric transforms resample with reflect padding, 2x upsampling with the
symlet-6 low-pass filter, bilinear `grid_sample`, and filtered 2x
downsampling. Colour transforms are a 4x4 matrix acting on homogeneous RGB;
1-channel images are treated as grey RGB. Random numbers come from torch's
global generator of the images' device.
"""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import persistence

# Low-pass decomposition filter of the Daubechies symlet-6 wavelet (12 taps,
# orthonormal: sum = sqrt(2), sum_k h[k] h[k + 2m] = delta(m)).
SYM6 = [
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
]
_FILTER_PAD = len(SYM6) // 4     # extra border, in output pixels, kept around the resampled image
_FILTER_CONV_PAD = len(SYM6) // 2 - 1

# EDM's train.py with --augment=P: AugmentPipe(p=P, **EDM_AUGMENT_KWARGS), augment_dim=9.
# xflip=1e8 makes p * xflip >= 1: every image gets a fresh 50/50 x-flip.
EDM_AUGMENT_KWARGS = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

# Label entries per transform, in label order.
LABEL_WIDTHS = dict(
    xflip=1, yflip=1, rotate_int=2, translate_int=2,
    scale=1, rotate_frac=2, aniso=2, translate_frac=2,
    brightness=1, contrast=1, lumaflip=1, hue=2, saturation=1,
)
_GEOMETRIC = ('scale', 'rotate_frac', 'aniso', 'translate_frac')
_COLOUR = ('brightness', 'contrast', 'lumaflip', 'hue', 'saturation')

# ----------------------------------------------------------------------------
# Batched homogeneous matrices. Every entry is a [N] tensor or a number.


def _batch_matrix(rows, ref):
    """[N, R, K] float32 matrices from R rows of K entries (tensors [N] or numbers)."""
    entries = [e.to(torch.float32) if torch.is_tensor(e) else torch.full_like(ref, float(e), dtype=torch.float32)
               for row in rows for e in row]
    return torch.stack(entries, dim=-1).reshape(ref.shape[0], len(rows), len(rows[0]))


def translate2d(tx, ty):
    """[N, 3, 3]: (x, y) -> (x + tx, y + ty)."""
    return _batch_matrix([[1, 0, tx], [0, 1, ty], [0, 0, 1]], tx)


def scale2d(sx, sy):
    """[N, 3, 3]: (x, y) -> (sx * x, sy * y)."""
    return _batch_matrix([[sx, 0, 0], [0, sy, 0], [0, 0, 1]], sx)


def rotate2d(theta):
    """[N, 3, 3]: rotation by `theta` radians, from +x towards +y."""
    c, s = theta.cos(), theta.sin()
    return _batch_matrix([[c, -s, 0], [s, c, 0], [0, 0, 1]], theta)


def translate3d(t):
    """[N, 4, 4]: adds t to all three colour channels."""
    return _batch_matrix([[1, 0, 0, t], [0, 1, 0, t], [0, 0, 1, t], [0, 0, 0, 1]], t)


def scale3d(s):
    """[N, 4, 4]: multiplies all three colour channels by s."""
    return _batch_matrix([[s, 0, 0, 0], [0, s, 0, 0], [0, 0, s, 0], [0, 0, 0, 1]], s)


def rotate3d(axis, theta):
    """[N, 4, 4]: rotation by `theta` [N] radians around the unit 3-vector `axis`
    (Rodrigues: cos * I + sin * [axis]_x + (1 - cos) * axis axis^T)."""
    vx, vy, vz = (float(v) for v in axis)
    c, s = theta.cos(), theta.sin()
    cc = 1 - c
    return _batch_matrix([
        [vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
        [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
        [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
        [0, 0, 0, 1],
    ], theta)


# ----------------------------------------------------------------------------
# Executing the transforms.


def _where_batch(mask, a, b):
    """Per image: `a` where mask [N] is True, else `b` ([N, ...] tensors)."""
    return torch.where(mask.reshape([-1] + [1] * (a.ndim - 1)), a, b)


def rotate90(images, k):
    """Rotate image n by k[n] * 90 degrees (k [N] int in 0..3), as torch.rot90
    on dims (2, 3): k=1 moves the top-right pixel to the top-left. Square images."""
    out = images
    for quarter in (1, 2, 3):
        out = _where_batch(k == quarter, torch.rot90(images, quarter, dims=(2, 3)), out)
    return out


def _reflect_index(i, n):
    """Map integer indices onto 0..n-1 by mirroring at the edges (no repeated edge)."""
    period = 2 * n - 2
    return (n - 1) - ((n - 1) - i.remainder(period)).abs()


def translate_integer(images, tx, ty):
    """Shift by whole pixels with reflection at the borders:
    out[n, :, y, x] = in[n, :, y + ty[n], x - tx[n]] (tx, ty [N] int64; EDM's signs)."""
    N, C, H, W = images.shape
    x = _reflect_index(torch.arange(W, device=images.device)[None, :] - tx[:, None], W)  # [N, W]
    y = _reflect_index(torch.arange(H, device=images.device)[None, :] + ty[:, None], H)  # [N, H]
    images = images.gather(3, x[:, None, None, :].expand(N, C, H, W))
    return images.gather(2, y[:, None, :, None].expand(N, C, H, W))


def _filter_kernels(channels, dtype, device):
    """Depthwise SYM6 kernels for the x and y directions: [C, 1, 1, K] and [C, 1, K, 1]."""
    h = misc.constant(SYM6, dtype=dtype, device=device)
    return h.reshape(1, 1, 1, -1).repeat(channels, 1, 1, 1), h.reshape(1, 1, -1, 1).repeat(channels, 1, 1, 1)


def _affine(sx, sy, tx, ty, device):
    """[3, 3] float32 matrix: (x, y) -> (sx * x + tx, sy * y + ty)."""
    return misc.constant([[sx, 0, tx], [0, sy, ty], [0, 0, 1]], dtype=torch.float32, device=device)


def _input_margins(G_inv, H, W):
    """Reflect padding [left, right, top, bottom] (ints) that covers every input
    position the output corners map to, plus the filter support; at most the
    image size - 1 (the most reflect padding can give)."""
    device = G_inv.device
    cx, cy = (W - 1) / 2, (H - 1) / 2
    corners = misc.constant([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]],
                            dtype=torch.float32, device=device)                               # [xyz, 4]
    reach = (G_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)                            # [xy, N * 4]
    centre = misc.constant([cx, cy], dtype=torch.float32, device=device)
    low = (-reach).amax(dim=1) - centre + 2 * _FILTER_PAD                                       # [left, top]
    high = reach.amax(dim=1) - centre + 2 * _FILTER_PAD                                         # [right, bottom]
    limit = misc.constant([W - 1, H - 1], dtype=torch.float32, device=device)
    left, top = low.clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist()
    right, bottom = high.clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist()
    return left, right, top, bottom


def resample(images, G_inv):
    """Geometric transform with anti-aliasing.

    images: [N, C, H, W] float. G_inv: [N, 3, 3] inverse transforms that map
    each output pixel position to the input position it samples; positions in
    pixels, origin at the image centre, x along columns, y along rows.
    Steps: reflect-pad, upsample 2x (SYM6), bilinear grid_sample, SYM6
    low-pass and 2x downsample, crop to [N, C, H, W].
    """
    N, C, H, W = images.shape
    device = images.device
    G_inv = G_inv.to(torch.float32)
    kx, ky = _filter_kernels(C, images.dtype, device)
    conv_pad = _FILTER_CONV_PAD

    left, right, top, bottom = _input_margins(G_inv, H, W)
    images = torch.nn.functional.pad(images, [left, right, top, bottom], mode='reflect')
    G_inv = _affine(1, 1, (left - right) / 2, (top - bottom) / 2, device) @ G_inv  # centre of the padded image

    # Upsample 2x: zero insertion + SYM6 convolution, as transposed convolutions.
    images = torch.nn.functional.conv_transpose2d(images, kx, stride=(1, 2), padding=(0, conv_pad), groups=C)
    images = torch.nn.functional.conv_transpose2d(images, ky, stride=(2, 1), padding=(conv_pad, 0), groups=C)
    # Upsampled pixel u sits at original position (u + 1/2) / 2.
    G_inv = _affine(2, 2, -0.5, -0.5, device) @ G_inv @ _affine(0.5, 0.5, 0.25, 0.25, device)

    # Sample an output canvas of 2x the size plus a border for the downsampling filter.
    out_h, out_w = (H + 2 * _FILTER_PAD) * 2, (W + 2 * _FILTER_PAD) * 2
    in_h, in_w = images.shape[2], images.shape[3]
    theta = _affine(2 / in_w, 2 / in_h, 0, 0, device) @ G_inv @ _affine(out_w / 2, out_h / 2, 0, 0, device)
    grid = torch.nn.functional.affine_grid(theta[:, :2, :].to(images.dtype), [N, C, out_h, out_w], align_corners=False)
    images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

    # Low-pass, downsample 2x, crop the border.
    p = _FILTER_PAD
    images = torch.nn.functional.conv2d(images, kx, stride=(1, 2), padding=(0, conv_pad), groups=C)[:, :, :, p:-p]
    images = torch.nn.functional.conv2d(images, ky, stride=(2, 1), padding=(conv_pad, 0), groups=C)[:, :, p:-p, :]
    return images


def apply_colour(images, M):
    """Colour transform of images [N, C, H, W] by M [N, 4, 4] acting on
    homogeneous RGB. C = 3: RGB. C = 1: the image is taken as grey RGB and the
    mean of the three output channels is kept."""
    N, C, H, W = images.shape
    M = M.to(images.dtype)
    x = images.reshape(N, C, H * W)
    if C == 3:
        x = M[:, :3, :3] @ x + M[:, :3, 3:]
    else:
        m = M[:, :3, :].mean(dim=1)                                  # [N, 4]
        x = x * m[:, :3].sum(dim=1)[:, None, None] + m[:, 3, None, None]
    return x.reshape(N, C, H, W)


# ----------------------------------------------------------------------------
# The pipeline.


def _gated(w, fires):
    """w where the transform fires, else 0 (fires [N] broadcasts over w's last dim)."""
    return torch.where(fires, w, torch.zeros_like(w))


@persistence.persistent_class
class AugmentPipe:
    """EDM's augmentation pipeline; all transforms are off by default.

    A transform fires for each image independently with probability
    `p * multiplier` (its multiplier is the keyword of its name; values >= 1/p
    make it fire always). Call it on images [N, C, H, W] in any value range;
    it returns the augmented images and the labels [N, label_dim] (layout in
    the module docstring).
    """

    def __init__(self, p=1,
                 xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
                 scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1,
                 aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0,
                 brightness_std=0.2, contrast_std=0.5, hue_max=1, saturation_std=1):
        settings = dict(
            p=p, xflip=xflip, yflip=yflip, rotate_int=rotate_int, translate_int=translate_int,
            translate_int_max=translate_int_max, scale=scale, rotate_frac=rotate_frac, aniso=aniso,
            translate_frac=translate_frac, scale_std=scale_std, rotate_frac_max=rotate_frac_max,
            aniso_std=aniso_std, aniso_rotate_prob=aniso_rotate_prob, translate_frac_std=translate_frac_std,
            brightness=brightness, contrast=contrast, lumaflip=lumaflip, hue=hue, saturation=saturation,
            brightness_std=brightness_std, contrast_std=contrast_std, hue_max=hue_max,
            saturation_std=saturation_std,
        )
        for name, value in settings.items():
            value = float(value)
            if not (value >= 0 and np.isfinite(value)):
                raise ValueError(f'AugmentPipe: {name}={value} must be a finite number >= 0')
            setattr(self, name, value)

    @property
    def label_dim(self):
        """Width of the labels: the network's `augment_dim` for this configuration."""
        return sum(width for name, width in LABEL_WIDTHS.items() if getattr(self, name) > 0)

    def __call__(self, images):
        """images [N, C, H, W] float -> (images [N, C, H, W], labels [N, label_dim] float32)."""
        self._check(images)
        labels = []                                   # [N] tensors, in label order
        images = self._blit(images, labels)
        images = self._geometric(images, labels)
        images = self._colour(images, labels)
        N = images.shape[0]
        if not labels:
            return images, torch.zeros([N, 0], device=images.device)
        return images, torch.stack([label.to(torch.float32) for label in labels], dim=1)

    def _check(self, images):
        """Raise ValueError for inputs this configuration cannot augment."""
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f'AugmentPipe expects float images [N, C, H, W], got {images.dtype} '
                             f'{list(images.shape)}; convert them with .to(torch.float32)')
        _, C, H, W = images.shape
        if self.rotate_int > 0 and H != W:
            raise ValueError(f'rotate_int needs square images, got {H}x{W}; set rotate_int=0')
        if any(getattr(self, name) > 0 for name in _COLOUR) and C not in (1, 3):
            raise ValueError(f'Colour augmentations need 1 or 3 channels, got {C}; '
                             f'set brightness, contrast, lumaflip, hue and saturation to 0')

    def _fires(self, multiplier, N, device):
        """[N] bool: where a transform with this multiplier fires."""
        return torch.rand([N], device=device) < multiplier * self.p

    def _blit(self, images, labels):
        """Flips, quarter turns and integer shifts (exact, no resampling)."""
        N, _, H, W = images.shape
        device = images.device
        if self.xflip > 0:
            w = _gated(torch.randint(2, [N], device=device), self._fires(self.xflip, N, device))
            images = _where_batch(w == 1, images.flip(3), images)
            labels += [w]
        if self.yflip > 0:
            w = _gated(torch.randint(2, [N], device=device), self._fires(self.yflip, N, device))
            images = _where_batch(w == 1, images.flip(2), images)
            labels += [w]
        if self.rotate_int > 0:
            k = _gated(torch.randint(4, [N], device=device), self._fires(self.rotate_int, N, device))
            images = rotate90(images, k)
            labels += [(k == 1) | (k == 2), (k == 2) | (k == 3)]
        if self.translate_int > 0:
            w = _gated(torch.rand([2, N], device=device) * 2 - 1, self._fires(self.translate_int, N, device))
            tx = (w[0] * (W * self.translate_int_max)).round().to(torch.int64)
            ty = (w[1] * (H * self.translate_int_max)).round().to(torch.int64)
            images = translate_integer(images, tx, ty)
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]
        return images

    def _geometric(self, images, labels):
        """Scaling, rotation, anisotropic scaling and fractional shifts, composed
        into one inverse matrix per image and resampled once."""
        if not any(getattr(self, name) > 0 for name in _GEOMETRIC):
            return images
        N, _, H, W = images.shape
        device = images.device
        G_inv = torch.eye(3, device=device).repeat(N, 1, 1)
        applied = torch.zeros([N], dtype=torch.bool, device=device)
        if self.scale > 0:
            w = torch.randn([N], device=device)
            fires = self._fires(self.scale, N, device)
            w = _gated(w, fires)
            s = (w * self.scale_std).exp2()
            G_inv = G_inv @ scale2d(1 / s, 1 / s)
            labels += [w]
            applied |= fires
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            fires = self._fires(self.rotate_frac, N, device)
            w = _gated(w, fires)
            G_inv = G_inv @ rotate2d(w)
            labels += [w.cos() - 1, w.sin()]
            applied |= fires
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            fires = self._fires(self.aniso, N, device)
            w = _gated(w, fires)
            r = _gated(r, torch.rand([N], device=device) < self.aniso_rotate_prob)
            s = (w * self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d(-r) @ scale2d(1 / s, s) @ rotate2d(r)
            labels += [w * r.cos(), w * r.sin()]
            applied |= fires
        if self.translate_frac > 0:
            w = torch.randn([2, N], device=device)
            fires = self._fires(self.translate_frac, N, device)
            w = _gated(w, fires)
            G_inv = G_inv @ translate2d(-w[0] * (W * self.translate_frac_std), -w[1] * (H * self.translate_frac_std))
            labels += [w[0], w[1]]
            applied |= fires
        return _where_batch(applied, resample(images, G_inv), images)

    def _colour(self, images, labels):
        """Brightness, contrast, luma flip, hue and saturation, composed into one
        4x4 matrix per image acting on homogeneous RGB."""
        if not any(getattr(self, name) > 0 for name in _COLOUR):
            return images
        N = images.shape[0]
        device = images.device
        I_4 = torch.eye(4, device=device)
        luma = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), dtype=torch.float32, device=device)
        L = torch.outer(luma, luma)                    # projection onto the luma axis
        M = I_4.repeat(N, 1, 1)
        applied = torch.zeros([N], dtype=torch.bool, device=device)
        if self.brightness > 0:
            w = torch.randn([N], device=device)
            fires = self._fires(self.brightness, N, device)
            w = _gated(w, fires)
            M = translate3d(w * self.brightness_std) @ M
            labels += [w]
            applied |= fires
        if self.contrast > 0:
            w = torch.randn([N], device=device)
            fires = self._fires(self.contrast, N, device)
            w = _gated(w, fires)
            M = scale3d((w * self.contrast_std).exp2()) @ M
            labels += [w]
            applied |= fires
        if self.lumaflip > 0:
            w = torch.randint(2, [N], device=device)
            fires = self._fires(self.lumaflip, N, device)
            w = _gated(w, fires)
            M = (I_4 - 2 * L * w[:, None, None]) @ M
            labels += [w]
            applied |= fires
        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            fires = self._fires(self.hue, N, device)
            w = _gated(w, fires)
            M = rotate3d(np.ones(3) / np.sqrt(3), w) @ M
            labels += [w.cos() - 1, w.sin()]
            applied |= fires
        if self.saturation > 0:
            w = torch.randn([N], device=device)
            fires = self._fires(self.saturation, N, device)
            w = _gated(w, fires)
            M = (L + (I_4 - L) * (w * self.saturation_std).exp2()[:, None, None]) @ M
            labels += [w]
            applied |= fires
        return _where_batch(applied, apply_colour(images, M), images)
