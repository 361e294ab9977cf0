"""Preconditioners and the coordinate channels of Patch Diffusion.

Preconditioners (EDM paper, Table 1; docs/DESIGN.md section 1): `VPPrecond`,
`VEPrecond`, `EDMPrecond`, and `EDM2Precond` (EDM's preconditioning with
EDM2's log-variance output and call order). Each computes

    D(x; sigma) = c_skip * x + c_out * F(cat(c_in * x, pos); c_noise)

where `pos` are the optional Patch Diffusion coordinate channels (docs/DESIGN.md
section 2), added after c_in scaling and carrying no noise, and F the
architecture named by `model_type` (training/architectures.py: the UNets of
training/networks_unet.py and training/networks_edm2.py, the DiT of
training/networks_dit.py).

The coordinate grid (image_shape, patch_grid, full_grid, ...) lives here, not
in patching.py, and the architectures are looked up only when a network is
built: a network pickle embeds this module's source (torch_utils.persistence),
so it imports only numpy, torch and torch_utils and its text runs wherever
a pickle is opened, EDM's own repository included (docs/DESIGN.md section 4).
Importing it is light: it pulls in no architecture.

The layers and architectures lived in this module before; `__getattr__`
(end of the module) keeps those names importable from here.

Tensor layout is NCHW throughout.
"""

import importlib

import numpy as np
import torch

from torch_utils import persistence

# ----------------------------------------------------------------------------
# Coordinate channels (docs/DESIGN.md section 2).


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
        from training.architectures import MODELS   # here, not at the top: see the module docstring
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
        return self._denoise(x, sigma, pos, class_labels, force_fp32, augment_labels)[0]

    def _denoise(self, x, sigma, pos, class_labels, force_fp32, augment_labels):
        """(D_x [N, C, H, W] float32, c_noise [N, 1, 1, 1]): the preconditioned network (see `forward`)."""
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
        return c_skip * x + c_out * F_x.to(torch.float32), c_noise

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
                 model_type='SongUNet',          # Key of architectures.MODELS.
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
                 model_type='SongUNet',          # Key of architectures.MODELS.
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
                 model_type='DhariwalUNet',      # Key of architectures.MODELS.
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
        return edm_preconditioning(sigma, self.sigma_data)


@persistence.persistent_class
class EDM2Precond(_Precond):
    """EDM2's preconditioning and uncertainty estimate (EDM2 paper, section 2 and
    eq. 21): EDM's c_skip, c_out, c_in, c_noise around EDM2's UNet
    (training/networks_edm2.py), plus the log-variance u(sigma) of the loss
    weighting, a magnitude-preserving Fourier embedding of c_noise and one
    MPConv (`logvar_fourier`, `logvar_linear`, as EDM2 names them).

    Its call has EDM2's order, net(x, sigma, class_labels), so that EDM2's
    generate_images.py samples it; the coordinates come by keyword (pos=).
    """

    def __init__(self,
                 img_resolution,                 # Side R of the full image (the shorter side if not square).
                 img_channels,                   # Image channels C (without coordinate channels).
                 label_dim=0,                    # Number of class labels, 0 = unconditional.
                 use_fp16=False,                 # Run the UNet in fp16 on CUDA.
                 sigma_data=0.5,                 # Expected standard deviation of the training data.
                 logvar_channels=128,            # Fourier features of the log-variance estimate.
                 model_type='EDM2UNet',          # Key of architectures.MODELS.
                 use_pos=False,                  # Add coordinate channels (Patch Diffusion).
                 pos_freqs=0,                    # Sin/cos frequencies added to the coordinate channels.
                 implicit_mlp=False,             # Passed to the UNet (EDM2's refuses it).
                 img_shape=None,                 # [H, W] of a non-square image (img_resolution = min(H, W)).
                 **model_kwargs,                 # Passed to the UNet.
                 ):
        from training.networks_edm2 import MPConv, MPFourier   # here, not at the top: see the module docstring
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, use_pos, pos_freqs, implicit_mlp,
                         model_type, model_kwargs, img_shape)
        self.sigma_min = 0
        self.sigma_max = float('inf')
        self.sigma_data = sigma_data
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def preconditioning(self, sigma):
        """sigma [N, 1, 1, 1] -> EDM's (c_skip, c_out, c_in, c_noise), each [N, 1, 1, 1]."""
        return edm_preconditioning(sigma, self.sigma_data)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, pos=None,
                augment_labels=None):
        """Denoised image D_x [N, C, H, W] float32, and with return_logvar also
        the log-variance [N, 1, 1, 1] float32 of the loss weighting.

        x: noisy image or patch [N, C, H, W]; sigma: scalar or [N];
        class_labels: [N, label_dim] (None = zeros); pos: coordinates
        [N, 2, H, W] (None = the full image grid) for a use_pos network;
        augment_labels: [N, augment_dim] or None. The UNet runs in fp16 when
        use_fp16, not force_fp32 and x is on CUDA.
        """
        D_x, c_noise = self._denoise(x, sigma, pos, class_labels, force_fp32, augment_labels)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)   # u(sigma), eq. 21
        return D_x, logvar.to(torch.float32)


def edm_preconditioning(sigma, sd):
    """EDM's (c_skip, c_out, c_in, c_noise) of sigma [N, 1, 1, 1] and sigma_data sd (EDM paper, Table 1)."""
    total = sigma ** 2 + sd ** 2                    # sigma^2 + sigma_data^2
    root = total.sqrt()
    return sd ** 2 / total, sigma * sd / root, 1 / root, sigma.log() / 4


PRECONDITIONERS = {'vp': VPPrecond, 've': VEPrecond, 'edm': EDMPrecond, 'edm2': EDM2Precond}


# ----------------------------------------------------------------------------
# Names that moved out of this module, still importable from it (and found by
# pickles that name them here).

_MOVED = {
    **dict.fromkeys(['weight_init', 'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding',
                     'FourierEmbedding', 'ImplicitMLP', 'SongUNet', 'DhariwalUNet'], 'training.networks_unet'),
    **dict.fromkeys(['dit_size_problem', 'token_coordinates', 'sincos_position_embedding', 'DiTBlock', 'DiT'],
                    'training.networks_dit'),
    **dict.fromkeys(['MODELS', 'ARCHITECTURES', 'build_network'], 'training.architectures'),
}


def __getattr__(name):
    """A name of _MOVED, from the module that now defines it (PEP 562: only
    names not defined here come this way; imported on first use)."""
    if name not in _MOVED:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(_MOVED[name]), name)
