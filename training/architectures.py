"""The registries of network architectures and the one builder of networks
from resolved options.

    MODELS          model_type -> architecture class (the F of a preconditioner)
    ARCHITECTURES   train.py --arch -> preconditioner keyword arguments
    build_network   resolved network options -> a preconditioned network

The preconditioners (training/networks.py) look `MODELS` up when they are
built; this module is not embedded in network pickles.
"""

from training.networks import PRECONDITIONERS, image_shape
from training.networks_dit import DiT
from training.networks_edm2 import EDM2UNet
from training.networks_unet import DhariwalUNet, SongUNet

MODELS = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'DiT': DiT, 'EDM2UNet': EDM2UNet}

# EDM2's sizes (EDM2 paper, Table 2: XS .. XXL) by their --cbase; the rest of the UNet as EDM2's.
EDM2_SIZES = dict(xs=128, s=192, m=256, l=320, xl=384, xxl=448)

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
    # EDM2's magnitude-preserving UNet, trained with its preconditioning and loss (--precond is edm2's).
    **{f'edm2-{size}': dict(model_type='EDM2UNet', model_channels=channels, channel_mult=[1, 2, 3, 4], num_blocks=3,
                            attn_resolutions=[16, 8])
       for size, channels in EDM2_SIZES.items()},
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
