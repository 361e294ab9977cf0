"""The denoiser the samplers call: D(x; sigma) of a network of any of the
call conventions (docs/DESIGN.md section 4), in float64, with the
coordinate channels, class labels, classifier-free guidance and guidance by
a guide network (EDM2's autoguidance) hidden; and the region of the
coordinate frame a sample covers.
"""

import inspect

import torch

import dnnlib
from training.networks import image_shape, patch_grid
from training.patching import size_label

# The name of forward's third parameter tells the convention apart:
#   ours:      net(x, sigma, pos, class_labels)        pos = the region's grid when net.use_pos
#   official:  net(x, sigma, x_pos, class_labels)      img_channels reports C + its coordinate channels
#   edm:       net(x, sigma, class_labels)             no coordinates (EDM's and EDM2's pickles)
# and a `pos` parameter after class_labels tells our EDM2 preconditioner:
#   ours_edm2: net(x, sigma, class_labels, pos=pos)    pos = the region's grid when net.use_pos
CONVENTIONS = {'pos': 'ours', 'x_pos': 'official', 'class_labels': 'edm'}


def network_convention(net):
    """'ours', 'official', 'edm' or 'ours_edm2': how `net` is called (see CONVENTIONS)."""
    parameters = inspect.signature(net.forward).parameters
    params = [p.name for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    third = params[2] if len(params) > 2 else None
    if third not in CONVENTIONS:
        raise ValueError(f'Cannot tell how to call {type(net).__name__}.forward{tuple(params)}: its third '
                         f'parameter should be one of {", ".join(CONVENTIONS)}')
    if third == 'class_labels' and 'pos' in parameters:
        return 'ours_edm2'
    return CONVENTIONS[third]


def network_info(net):
    """What sampling needs to know about `net`.

    Returns EasyDict(convention, family = 'edm2' for EDM2's networks (they
    have no round_sigma: any sigma > 0; churn noise drawn in float32 as
    EDM2's sampler does), else 'edm', img_channels = IMAGE channels C,
    img_resolution (None if the network does not record it; the shorter side
    of a non-square network), img_shape = (height, width) of its images
    (None if unrecorded), label_dim,
    coordinates = whether it takes coordinates, embed_fq = for official
    networks the number of frequencies of its sin/cos-embedded coordinates
    (its training's --embed_fq, 0 = the plain [x, y] grid)). An official
    network's coordinate channels are img_channels - out_channels: 0 (none),
    2 (the grid) or 4 n (the embedding of n frequencies).
    """
    convention = network_convention(net)
    channels, coordinates, embed_fq = net.img_channels, False, 0
    if convention in ('ours', 'ours_edm2'):
        coordinates = bool(getattr(net, 'use_pos', False))
    elif convention == 'official':
        out_channels = getattr(net, 'out_channels', net.img_channels - 2)
        extra = net.img_channels - out_channels
        if extra < 0 or (extra != 2 and extra % 4):
            raise ValueError(f'This official Patch Diffusion network has img_channels={net.img_channels} and '
                             f'out_channels={out_channels}: {extra} coordinate channels, which are neither the '
                             f'[x, y] grid (2) nor its sin/cos embedding (4 per frequency)')
        channels, coordinates, embed_fq = out_channels, extra > 0, (extra // 4 if extra != 2 else 0)
    resolution = getattr(net, 'img_resolution', None)
    shape = getattr(net, 'img_shape', None) or (None if resolution is None else (resolution, resolution))
    family = 'edm' if hasattr(net, 'round_sigma') else 'edm2'
    return dnnlib.EasyDict(convention=convention, family=family, img_channels=int(channels),
                           img_resolution=resolution, img_shape=None if shape is None else image_shape(shape),
                           label_dim=int(net.label_dim or 0), coordinates=coordinates, embed_fq=int(embed_fq))


def _coordinate_input(info):
    """What `net` takes as coordinates, in words, with the official --embed_fq it corresponds to."""
    if not info.coordinates:
        return 'no coordinates'
    if info.embed_fq:
        return f'their sin/cos embedding at {info.embed_fq} frequencies (--embed_fq={info.embed_fq})'
    return 'the plain [x, y] coordinate grid (--embed_fq=0)'


def check_official_flags(net, mask_pos=False, embed_fq=None):
    """Check the official generate.py's --mask_pos and --embed_fq against what
    `net` declares itself, and return the notes to print (a list of str).

    Both only restate what the network's channels tell, so they change
    nothing: mask_pos (call the network without coordinates) fits networks
    that take none; embed_fq = n (coordinates embedded at n sin/cos
    frequencies, 0 = the plain grid; None = not given) must be what the
    network takes. ValueError where they contradict the network.
    """
    info = network_info(net)
    notes = []
    if mask_pos:
        if info.coordinates:
            raise ValueError('--mask_pos=1 would call this network without the coordinate channels it takes (the '
                             'official generate.py fails there too); leave --mask_pos out')
        notes.append('--mask_pos=1: the network takes no coordinates, so it is called without them anyway')
    if embed_fq is not None:
        if int(embed_fq) != embed_fq or embed_fq < 0:
            raise ValueError(f'--embed_fq={embed_fq} must be a non-negative integer')
        if embed_fq != (info.embed_fq if info.coordinates else 0):
            raise ValueError(f'--embed_fq={embed_fq} contradicts the network, which takes {_coordinate_input(info)}; '
                             f'leave --embed_fq out')
        notes.append(f'--embed_fq={embed_fq}: the network takes {_coordinate_input(info)}, as detected from its '
                     f'channels; nothing to change')
    return notes


# ----------------------------------------------------------------------------
# The region a sample covers (docs/DESIGN.md section 2, "Sampling a region").


def network_input_multiple(net):
    """What the sides of `net`'s input must be multiples of: the token side of
    a DiT (`token_size`); 2^(halvings of its UNet), read from the UNet
    (`num_levels`, or EDM's `<res>x<res>_down` encoder blocks); 1 for networks
    of another structure."""
    model = getattr(net, 'model', None)
    token_size = getattr(model, 'token_size', None)
    if token_size is not None:
        return int(token_size)
    levels = getattr(model, 'num_levels', None)
    if levels is not None:
        return 2 ** (int(levels) - 1)
    encoder = getattr(model, 'enc', None)
    if isinstance(encoder, torch.nn.ModuleDict):
        return 2 ** sum(1 for name in encoder if name.endswith('_down') and '_aux_' not in name)
    return 1


def sampling_region(net, resolution=None, image_size=None, x_start=0, y_start=0):
    """The rectangle to sample: EasyDict(size (h, w), top, left, frame (H, W) or None).

    An h x w sample whose top-left pixel sits at column x_start, row y_start
    of an H x W coordinate frame, `resolution` (an int side or (H, W);
    default: the network's image); its coordinates are
    patch_grid(top=y_start, left=x_start, (h, w), (H, W)), past [-1, 1]
    where the sample leaves the frame. `image_size` (an int side or (h, w))
    defaults to the frame. In the network's pixels (latent pixels for a
    latent model). For networks without coordinates only the size may be
    set (the frame is then just the default size, and must agree with a
    recorded one). ValueError for values that cannot work.
    """
    info = network_info(net)
    for name, value in (('--x_start', x_start), ('--y_start', y_start)):
        if int(value) != value or value < 0:
            raise ValueError(f'{name}={value} must be a non-negative integer (a pixel column or row of the frame)')
    image_size, resolution = _size_value('--image_size', image_size), _size_value('--resolution', resolution)
    recorded = info.img_shape
    if info.coordinates:
        frame = resolution if resolution is not None else recorded
        if frame is None:
            raise ValueError('The network does not record its resolution; give its coordinate frame with --resolution')
        if min(frame) < 2:
            raise ValueError(f'--resolution={size_label(frame)}: the coordinate frame needs 2 pixels or more per '
                             f'side (coordinates are (i / (side - 1) - 0.5) * 2)')
    else:
        if x_start or y_start:
            raise ValueError(f'--x_start={x_start} --y_start={y_start}: this network takes no coordinates, so a '
                             f'position has no meaning; leave them out (--image_size sets the size)')
        if resolution is not None and recorded is not None and resolution != recorded:
            raise ValueError(f'--resolution={size_label(resolution)} contradicts the network\'s resolution '
                             f'{size_label(recorded)}: it takes no coordinates, so there is no frame to change; '
                             f'leave --resolution out and set the size with --image_size')
        if image_size is None and resolution is None and recorded is None:
            raise ValueError('The network does not record its resolution; give the size with --resolution '
                             '(or --image_size)')
        frame = resolution if resolution is not None else recorded
    size = image_size if image_size is not None else frame
    multiple = network_input_multiple(net)
    for side, what in ((size[0], 'height'), (size[1], 'width')):
        if side % multiple:
            lower = side // multiple * multiple
            works = ' or '.join(str(s) for s in (lower, lower + multiple) if s)
            raise ValueError(f'--image_size={size_label(size)}: this network takes sides that are multiples of '
                             f'{multiple} (a UNet\'s total downsampling, a DiT\'s token size), so the '
                             f'{what if size[0] != size[1] else "side"} must be a multiple of {multiple}, such as {works}')
    return dnnlib.EasyDict(size=size, top=int(y_start), left=int(x_start), frame=frame)


def _size_value(name, value):
    """(height, width) of a size given as an int side or (height, width); None stays None."""
    if value is None:
        return None
    sides = value if isinstance(value, (tuple, list)) else (value, value)
    if len(sides) != 2 or any(int(side) != side or side < 1 for side in sides):
        shown = size_label(sides) if len(sides) == 2 else value
        raise ValueError(f'{name}={shown} must be a positive integer (a square\'s side) or WxH of positive integers')
    return int(sides[0]), int(sides[1])


# ----------------------------------------------------------------------------
# The denoiser.


def official_pos_embedding(grid, num_freqs):
    """The official code's sin/cos embedding of coordinates (its --embed_fq):
    grid [N, 2, H, W] -> [N, 4 num_freqs, H, W], for f = 2^0 .. 2^(num_freqs - 1)
    the channels sin(f grid), cos(f grid) (2 each); no raw grid, no pi.
    Multiplying by a power of two is exact, so the float32 values are the
    official code's."""
    features = []
    for k in range(num_freqs):
        scaled = grid * float(2 ** k)
        features += [scaled.sin(), scaled.cos()]
    return torch.cat(features, dim=1)


def check_guidance(net, cfg=1.0, gnet=None, guidance=1.0):
    """Check a guidance setting: classifier-free guidance of weight `cfg`, or
    guidance by the guide network `gnet` of weight `guidance` (EDM2's
    --gnet, --guidance; 1 = off). ValueError, one line each, for a weight
    without its guide, both kinds at once, and a guide that does not make
    the main network's images."""
    if guidance != 1 and gnet is None:
        raise ValueError(f'--guidance={guidance} needs a guide network: give it with --gnet=PKL (EDM2\'s '
                         f'autoguidance), or use --cfg for classifier-free guidance')
    if gnet is None:
        return
    if cfg != 1:
        raise ValueError(f'--gnet and --cfg={cfg} are two kinds of guidance; use one: --gnet with --guidance, '
                         f'or --cfg without --gnet')
    main, guide = network_info(net), network_info(gnet)
    if guide.img_channels != main.img_channels:
        raise ValueError(f'The guide network makes {guide.img_channels}-channel images, the main network '
                         f'{main.img_channels}-channel ones; give a --gnet trained on the same data')
    if None not in (guide.img_shape, main.img_shape) and guide.img_shape != main.img_shape:
        raise ValueError(f'The guide network makes {size_label(guide.img_shape)} images, the main network '
                         f'{size_label(main.img_shape)} ones; give a --gnet of the same resolution')
    if guide.label_dim and guide.label_dim != main.label_dim:
        raise ValueError(f'The guide network has {guide.label_dim} classes, the main network {main.label_dim}; '
                         f'give an unconditional --gnet or one of the same classes')


class Denoiser:
    """denoise(x, sigma) -> float64 D(x; sigma) of a network, for the samplers.

    Calls the network in float32 with its convention's arguments: for
    coordinate networks the coordinates of `region` (EasyDict(top, left,
    frame), see `sampling_region`; None: the full grid of the input), the
    official networks' embedded ones as their generate.py embeds them;
    `class_labels` [N, label_dim] (None: the network's default). Guidance,
    one kind at a time (see `check_guidance`):

        classifier-free (cfg = w)          D = D_uncond + w (D - D_uncond), D_uncond with all-zero labels
        by a guide network (gnet, g)       D = D_ref + g (D - D_ref), D_ref = gnet's D(x; sigma)

    The guide gets the same labels (none when it is unconditional) and
    coordinates of the same region where it takes them. A weight of 1 makes
    the network's call only. Networks without sigma_min, sigma_max and
    round_sigma (EDM2's) take any sigma > 0, unrounded.
    """

    def __init__(self, net, class_labels=None, guidance=1.0, region=None, gnet=None, gnet_guidance=1.0):
        info = network_info(net)
        if guidance != 1 and not info.label_dim:
            raise ValueError(f'Guidance (cfg={guidance}) needs a class-conditional network; this one has '
                             f'label_dim=0, so use cfg=1')
        if guidance != 1 and class_labels is None:
            raise ValueError('Guidance (cfg != 1) needs the class labels of the conditional branch')
        check_guidance(net, guidance, gnet, gnet_guidance)
        self.net = net
        self.info = info
        self.class_labels = class_labels
        self.guidance = float(guidance)
        self.gnet = gnet if gnet_guidance != 1 else None
        self.gnet_info = None if self.gnet is None else network_info(self.gnet)
        self.gnet_guidance = float(gnet_guidance)
        self.region = region
        self.draws_only_when_churning = info.family == 'edm2'   # as EDM2's sampler (samplers.edm_sampler)
        self.sigma_min = getattr(net, 'sigma_min', 0)
        self.sigma_max = getattr(net, 'sigma_max', float('inf'))
        self._pos = {}

    def round_sigma(self, sigma):
        if not hasattr(self.net, 'round_sigma'):
            return torch.as_tensor(sigma)
        return self.net.round_sigma(sigma)

    def _coordinates(self, x, info):
        """The coordinate input [N, 2 or 4 embed_fq, h, w] float32 of a network with `info` for
        x [N, C, h, w], or None."""
        if not info.coordinates:
            return None
        n, _, height, width = x.shape
        key = (n, height, width, x.device, info.embed_fq)
        if key not in self._pos:
            top, left, frame = (0, 0, (height, width)) if self.region is None else (
                self.region.top, self.region.left, self.region.frame)
            corner = torch.zeros(1, dtype=torch.long, device=x.device)
            pos = patch_grid(corner + top, corner + left, (height, width), frame)       # [1, 2, h, w]
            if info.embed_fq:
                pos = official_pos_embedding(pos, info.embed_fq)
            # One image's input, repeated: image k's input never depends on the batch (docs/DESIGN.md section 1).
            self._pos[key] = pos.repeat(n, 1, 1, 1)
        return self._pos[key]

    def _call_net(self, net, info, x, sigma, class_labels):
        if info.convention == 'edm':
            return net(x, sigma, class_labels)
        if info.convention == 'ours_edm2':
            return net(x, sigma, class_labels, pos=self._coordinates(x, info))
        return net(x, sigma, self._coordinates(x, info), class_labels)

    def __call__(self, x, sigma):
        """x [N, C, h, w], sigma scalar or [N] -> D(x; sigma) float64 [N, C, h, w]."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        with torch.no_grad():
            D_x = self._call_net(self.net, self.info, x, sigma, self.class_labels).to(torch.float64)
            if self.gnet is not None:
                labels = self.class_labels if self.gnet_info.label_dim else None
                D_ref = self._call_net(self.gnet, self.gnet_info, x, sigma, labels).to(torch.float64)
                return D_ref + self.gnet_guidance * (D_x - D_ref)
            if self.guidance == 1:
                return D_x
            D_uncond = self._call_net(self.net, self.info, x, sigma,
                                      torch.zeros_like(self.class_labels)).to(torch.float64)
        return D_uncond + self.guidance * (D_x - D_uncond)


def make_denoiser(net, class_labels=None, guidance=1.0, region=None, gnet=None, gnet_guidance=1.0):
    """The `Denoiser` of `net` with these labels [N, label_dim], classifier-free guidance weight w,
    region, and guide network with its weight."""
    return Denoiser(net, class_labels, guidance, region, gnet, gnet_guidance)
