"""The denoiser the samplers call: D(x; sigma) of a network of any of the
three call conventions (docs/DESIGN.md section 4), in float64, with the
coordinate channels, class labels and classifier-free guidance hidden.
"""

import inspect

import torch

import dnnlib
from training.networks import full_grid

# The name of forward's third parameter tells the convention apart:
#   ours:     net(x, sigma, pos, class_labels)    pos = full grid when net.use_pos
#   official: net(x, sigma, x_pos, class_labels)  img_channels reports C + 2
#   edm:      net(x, sigma, class_labels)         no coordinates
CONVENTIONS = {'pos': 'ours', 'x_pos': 'official', 'class_labels': 'edm'}


def network_convention(net):
    """'ours', 'official' or 'edm': how `net` is called (see CONVENTIONS)."""
    params = [p.name for p in inspect.signature(net.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    third = params[2] if len(params) > 2 else None
    if third not in CONVENTIONS:
        raise ValueError(f'Cannot tell how to call {type(net).__name__}.forward{tuple(params)}: its third '
                         f'parameter should be one of {", ".join(CONVENTIONS)}')
    return CONVENTIONS[third]


def network_info(net):
    """What sampling needs to know about `net`.

    Returns EasyDict(convention, img_channels = IMAGE channels C,
    img_resolution (None if the network does not record it), label_dim,
    coordinates = whether it takes the [N, 2, R, R] coordinate grid).
    """
    convention = network_convention(net)
    channels, coordinates = net.img_channels, False
    if convention == 'ours':
        coordinates = bool(getattr(net, 'use_pos', False))
    elif convention == 'official':
        out_channels = getattr(net, 'out_channels', net.img_channels - 2)
        if net.img_channels - out_channels not in (0, 2):
            raise ValueError(f'This official Patch Diffusion network has img_channels={net.img_channels} and '
                             f'out_channels={out_channels}: it embeds its coordinates (--embed_fq), which is not '
                             f'supported; only plain [x, y] coordinate channels are')
        channels, coordinates = out_channels, net.img_channels - out_channels == 2
    return dnnlib.EasyDict(convention=convention, img_channels=int(channels),
                           img_resolution=getattr(net, 'img_resolution', None),
                           label_dim=int(net.label_dim or 0), coordinates=coordinates)


def sampling_resolution(net, resolution=None):
    """The resolution to sample at: the network's, or `resolution` for a network
    that does not record one. ValueError when they contradict or both are missing."""
    recorded = getattr(net, 'img_resolution', None)
    if recorded is None and resolution is None:
        raise ValueError('The network does not record its resolution; give it with --resolution')
    if recorded is not None and resolution is not None and int(resolution) != int(recorded):
        raise ValueError(f'--resolution={resolution} contradicts the network\'s resolution {recorded}; '
                         f'leave --resolution out')
    return int(recorded if recorded is not None else resolution)


class Denoiser:
    """denoise(x, sigma) -> float64 D(x; sigma) of a network, for the samplers.

    Calls the network in float32 with its convention's arguments: the full
    coordinate grid for coordinate networks, `class_labels` [N, label_dim]
    (None: the network's default) and classifier-free guidance
    D = D_uncond + w (D_cond - D_uncond), the unconditional branch with
    all-zero labels; w = 1 makes the conditional call only.
    """

    def __init__(self, net, class_labels=None, guidance=1.0):
        info = network_info(net)
        if guidance != 1 and not info.label_dim:
            raise ValueError(f'Guidance (cfg={guidance}) needs a class-conditional network; this one has '
                             f'label_dim=0, so use cfg=1')
        if guidance != 1 and class_labels is None:
            raise ValueError('Guidance (cfg != 1) needs the class labels of the conditional branch')
        self.net = net
        self.info = info
        self.class_labels = class_labels
        self.guidance = float(guidance)
        self.sigma_min = net.sigma_min
        self.sigma_max = net.sigma_max
        self._grid = None

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def _coordinates(self, x):
        """The full grid [N, 2, R, R] float32 for x [N, C, R, R], or None."""
        if not self.info.coordinates:
            return None
        n, _, height, width = x.shape
        assert height == width, 'coordinate networks sample square images'
        key = (n, height, x.device)
        if self._grid is None or self._grid[0] != key:
            self._grid = (key, full_grid(height, n, x.device, torch.float32))
        return self._grid[1]

    def _call_net(self, x, sigma, class_labels):
        if self.info.convention == 'edm':
            return self.net(x, sigma, class_labels)
        return self.net(x, sigma, self._coordinates(x), class_labels)

    def __call__(self, x, sigma):
        """x [N, C, R, R], sigma scalar or [N] -> D(x; sigma) float64 [N, C, R, R]."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        with torch.no_grad():
            D_cond = self._call_net(x, sigma, self.class_labels).to(torch.float64)
            if self.guidance == 1:
                return D_cond
            D_uncond = self._call_net(x, sigma, torch.zeros_like(self.class_labels)).to(torch.float64)
        return D_uncond + self.guidance * (D_cond - D_uncond)


def make_denoiser(net, class_labels=None, guidance=1.0):
    """The `Denoiser` of `net` with these labels [N, label_dim] and guidance weight w."""
    return Denoiser(net, class_labels, guidance)
