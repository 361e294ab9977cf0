"""Latent space (docs/DESIGN.md section 2, --train_on_latents): the VAE that maps
images to latents and back, and how training turns dataset batches into
latents.

The network models scale_factor * z, where z ~ N(mean, std^2) is a draw from
the VAE posterior of an image (diffusers' AutoencoderKL; the official Patch
Diffusion code uses stabilityai/sd-vae-ft-ema with scale factor 0.18215).
A VAE with k encoder blocks downsamples by f = 2^(k - 1): 8 for the Stable
Diffusion VAE, so 256x256 images become 4 x 32 x 32 latents.

Training gets latents in one of two ways, both behind `latent_encoder`:

    pre-encoded archive (dataset_tool.py encode, training.dataset.LatentDataset):
        batches of posterior statistics [N, 2, C, h, w] = (mean, std)
        -> PreEncodedLatents draws z (fast: no VAE in training)
    raw image archive (training.dataset.ImageFolderDataset):
        batches of uint8 images [N, 3, H, W]
        -> OnlineEncoder runs the VAE encoder on every batch, then draws z

Both draw eps ~ N(0, I) from torch's global generator on the batch's
device; the trainer seeds it at every step with (seed, rank, step), so a
step's latents are the same in a resumed run and do not depend on
DataLoader workers. diffusers is imported only when a VAE is loaded.
"""

import functools
import os
import re
import warnings

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from training.image_io import to_uint8
from training.networks import image_shape, resolution_value

DEFAULT_VAE = 'stabilityai/sd-vae-ft-ema'   # the official Patch Diffusion code's VAE
DEFAULT_SCALE_FACTOR = 0.18215              # Stable Diffusion's latent scale factor
INSTALL_HINT = 'pip install -e ".[latent]"'

_HUB_ID = re.compile(r'[A-Za-z0-9][\w.-]*/[\w.-]+')

# ----------------------------------------------------------------------------
# The VAE.


def _autoencoder_class():
    """diffusers.AutoencoderKL; ValueError saying how to install diffusers when it is missing."""
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ValueError(f'Latent diffusion needs the diffusers package ({err}); install it with: '
                         f'{INSTALL_HINT}') from None
    return AutoencoderKL


def _check_vae_location(id_or_dir):
    """Raise ValueError unless id_or_dir is an existing folder or looks like a hub id 'owner/name'."""
    if os.path.isdir(id_or_dir):
        return
    fix = (f'give a folder written by AutoencoderKL.save_pretrained or a Hugging Face hub id such as '
           f'{DEFAULT_VAE}')
    if os.path.exists(id_or_dir):
        raise ValueError(f'VAE {id_or_dir} is a file, not a VAE folder; {fix}')
    if not _HUB_ID.fullmatch(id_or_dir):
        raise ValueError(f'VAE folder {id_or_dir} does not exist; {fix}')


@functools.lru_cache(maxsize=4)
def _load_vae(id_or_dir, device):
    _check_vae_location(id_or_dir)
    autoencoder_class = _autoencoder_class()
    is_folder = os.path.isdir(id_or_dir)

    def load(**kwargs):
        with warnings.catch_warnings():   # diffusers passes huggingface_hub an argument it deprecated
            warnings.filterwarnings('ignore', message='The `local_dir_use_symlinks` argument is deprecated')
            return autoencoder_class.from_pretrained(id_or_dir, low_cpu_mem_usage=False, **kwargs)
    fix = ('check the folder' if is_folder else
           'check the id and the connection to the Hugging Face hub, or give a save_pretrained folder')
    save_hint = (f'on a machine that has a network save it with AutoencoderKL.from_pretrained("{id_or_dir}")'
                 f'.save_pretrained(DIR) and give that folder (--vae=DIR)')
    vae = dnnlib.util.load_pretrained(load, 'the VAE', f'{"folder" if is_folder else "hub id"} {id_or_dir}',
                                      not is_folder, save_hint, fix)
    return vae.eval().requires_grad_(False).to(device)


def load_vae(id_or_dir=DEFAULT_VAE, device='cpu'):
    """The diffusers AutoencoderKL at a hub id or in a local folder (written by
    save_pretrained), in eval mode without gradients, on `device`.

    Loaded once per process and device; callers share the object, so they
    must not change it. ValueError (one line, saying what to do) for a
    missing diffusers, a missing folder or a VAE that cannot be loaded.
    """
    return _load_vae(os.fspath(id_or_dir), str(torch.device(device)))


def downsampling_factor(vae):
    """f = H / h of the VAE: 2^(encoder blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _vae_device(vae):
    return next(vae.parameters()).device


def _check_images(vae, images):
    """Raise ValueError unless images are uint8 [N, in_channels, H, W] with H, W divisible by f."""
    channels, factor = vae.config.in_channels, downsampling_factor(vae)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f'The VAE encodes uint8 images [N, {channels}, H, W]; got {images.dtype} '
                         f'{list(images.shape)}')
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f'The VAE downsamples by {factor}: image sizes must be multiples of {factor}, '
                         f'not {images.shape[3]}x{images.shape[2]}')


def encode_images(vae, images):
    """uint8 images [N, 3, H, W] in [0, 255] -> the posterior (mean, std), each
    float32 [N, C, H/f, W/f] in latent units (before the scale factor), on
    the VAE's device. The VAE sees the images mapped to [-1, 1]."""
    _check_images(vae, images)
    x = images.to(_vae_device(vae), torch.float32) / 127.5 - 1
    with torch.no_grad():
        posterior = vae.encode(x.to(vae.dtype)).latent_dist
    return posterior.mean.to(torch.float32), posterior.std.to(torch.float32)


def draw_latents(mean, std, scale_factor, generator=None):
    """scale_factor * (mean + std * eps), eps ~ N(0, I): one posterior draw in
    the units the network models. mean, std: [N, C, h, w]; generator: None
    for torch's global generator of mean's device."""
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return scale_factor * (mean + std * eps)


def decode_latents(vae, latents, scale_factor):
    """Latents [N, C, h, w] in network units (scaled) -> uint8 images
    [N, 3, h f, w f] on the VAE's device, rounded as image_io.to_uint8."""
    z = latents.to(_vae_device(vae), vae.dtype) / scale_factor
    with torch.no_grad():
        images = vae.decode(z).sample
    return to_uint8(images.to(torch.float32))


def decode_edm2_latents(vae, latents, scale, bias):
    """Latents [N, C, h, w] in EDM2's units, scale * z + bias per channel
    (scale, bias: C floats) -> uint8 images [N, 3, h f, w f] on the VAE's
    device, in EDM2's convention: its VAE sees [0, 1] images, so the decoded
    ones are clamped to [0, 1] and scaled by 255, truncated."""
    x = latents.to(_vae_device(vae), torch.float32)
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    bias = torch.as_tensor(bias, dtype=torch.float32, device=x.device).reshape(1, -1, 1, 1)
    z = (x - bias) / scale
    with torch.no_grad():
        images = vae.decode(z.to(vae.dtype)).sample
    return (images.to(torch.float32).clamp(0, 1) * 255).to(torch.uint8)


# ----------------------------------------------------------------------------
# Latent metadata: what a snapshot records under 'latent', or EDM2's 'encoder'.

# EDM2's encoders, by class name (the classes of a pickle come from its embedded source, so only names
# and attributes tell them): pixels in [-1, 1], or latents of a Stability VAE with per-channel scale and bias.
EDM2_PIXEL_ENCODER = 'StandardRGBEncoder'
EDM2_VAE_ENCODER = 'StabilityVAEEncoder'
_EDM2_VAE_ATTRIBUTES = ('vae_name', 'scale', 'bias')


def encoder_latent(encoder):
    """The latent metadata of an EDM2 snapshot's 'encoder' entry: None for
    its StandardRGBEncoder (a pixel model), EasyDict(vae = its vae_name,
    scale, bias = per-channel lists of floats) for its StabilityVAEEncoder.
    ValueError naming any other encoder."""
    name = type(encoder).__name__
    if name == EDM2_PIXEL_ENCODER:
        return None
    if name == EDM2_VAE_ENCODER and all(hasattr(encoder, attr) for attr in _EDM2_VAE_ATTRIBUTES):
        scale, bias = (np.asarray(value, dtype=np.float32).ravel().tolist() for value in (encoder.scale, encoder.bias))
        return dnnlib.EasyDict(vae=str(encoder.vae_name), scale=scale, bias=bias)
    raise ValueError(f'The snapshot\'s encoder is a {name}, which this code cannot decode: it knows EDM2\'s '
                     f'{EDM2_PIXEL_ENCODER} and {EDM2_VAE_ENCODER} (with {", ".join(_EDM2_VAE_ATTRIBUTES)})')


def latent_info(vae, scale_factor, image_resolution, latent_channels, latent_resolution):
    """EasyDict(vae: hub id or folder, scale_factor, image_resolution: the
    pixels, latent_channels: C, latent_resolution: the latents = pixels / f)
    of a latent model; resolutions are an int side for squares and
    [height, width] otherwise. Training stores it as dict(...) under the
    snapshot key 'latent'."""
    return dnnlib.EasyDict(vae=str(vae), scale_factor=float(scale_factor),
                           image_resolution=resolution_value(image_resolution),
                           latent_channels=int(latent_channels), latent_resolution=resolution_value(latent_resolution))


def generation_latent(recorded=None, on_latents=None, vae=None, scale_factor=None, encoder=None):
    """The latent metadata to decode with at generation, or None for a pixel model.

    recorded: the snapshot's 'latent' entry (None for pixel models and for
    official latent pickles, which record nothing); on_latents: None = as
    recorded, True = a latent model (needed for official pickles), False = a
    pixel model; vae, scale_factor: override the recorded ones (defaults
    DEFAULT_VAE, DEFAULT_SCALE_FACTOR when nothing is recorded); encoder: an
    EDM2 snapshot's 'encoder' entry, used when nothing is recorded under
    'latent' (see `encoder_latent`; --vae overrides its VAE). ValueError
    for contradicting settings.
    """
    if recorded is None and encoder is not None:
        edm2_latent = encoder_latent(encoder)
        if edm2_latent is not None:
            return _edm2_generation_latent(edm2_latent, on_latents, vae, scale_factor)
        if on_latents:
            raise ValueError(f'This EDM2 snapshot\'s encoder is a {EDM2_PIXEL_ENCODER}: the network makes pixels, '
                             f'so leave --on_latents out')
    if on_latents is False and recorded is not None:
        raise ValueError(f'This network was trained on latents of the VAE {recorded["vae"]}; its samples must be '
                         f'decoded, so leave --on_latents out')
    if recorded is None and not on_latents:
        if vae is not None or scale_factor is not None:
            raise ValueError('--vae and --scale_factor apply to latent models only; add --on_latents=1 if this '
                             'network was trained on latents')
        return None
    latent = dnnlib.EasyDict(recorded or dict(vae=DEFAULT_VAE, scale_factor=DEFAULT_SCALE_FACTOR))
    if vae is not None:
        latent.vae = os.fspath(vae)
    if scale_factor is not None:
        latent.scale_factor = float(scale_factor)
    return latent


def _edm2_generation_latent(latent, on_latents, vae, scale_factor):
    """`encoder_latent`'s metadata of an EDM2 latent model, checked against the flags."""
    if on_latents is False:
        raise ValueError(f'This EDM2 snapshot\'s encoder is a {EDM2_VAE_ENCODER} (VAE {latent.vae}): its samples '
                         f'must be decoded, so leave --on_latents out')
    if scale_factor is not None:
        raise ValueError(f'--scale_factor={scale_factor}: this EDM2 snapshot\'s encoder records a scale and bias '
                         f'per latent channel; leave --scale_factor out')
    if vae is not None:
        latent.vae = os.fspath(vae)
    return latent


def pixel_decoder(latent, img_channels, device):
    """decode(latents float [N, C, h, w]) -> uint8 images [N, 3, H, W] for a
    latent model with metadata `latent` (see `generation_latent`) whose
    network makes `img_channels`-channel samples; EDM2's per-channel scale
    and bias where `latent` has them (`decode_edm2_latents`). Loads the VAE
    now, so a bad setting fails here; ValueError when the VAE does not fit
    the network or, at decoding, the images do not have the recorded
    resolution."""
    vae = load_vae(latent['vae'], device)
    if img_channels != vae.config.latent_channels:
        raise ValueError(f'The network makes {img_channels}-channel samples, but the VAE {latent["vae"]} decodes '
                         f'{vae.config.latent_channels}-channel latents; is this a latent model, and the VAE '
                         f'it was trained with?')
    if 'bias' in latent:
        if not len(latent['scale']) == len(latent['bias']) == img_channels:
            raise ValueError(f'The encoder has {len(latent["scale"])} scales and {len(latent["bias"])} biases for '
                             f'the network\'s {img_channels} latent channels; is it this network\'s snapshot?')
        return functools.partial(decode_edm2_latents, vae, scale=latent['scale'], bias=latent['bias'])
    expected = latent.get('image_resolution')
    expected = None if expected is None else image_shape(expected)

    def decode(latents):
        images = decode_latents(vae, latents, latent['scale_factor'])
        if expected is not None and tuple(images.shape[-2:]) != expected:
            raise ValueError(f'The VAE {latent["vae"]} decodes {images.shape[-1]}x{images.shape[-2]} images, but '
                             f'the network was trained on {expected[1]}x{expected[0]} images; give its VAE with --vae')
        return images
    return decode


# ----------------------------------------------------------------------------
# Training batches -> latents.


class PreEncodedLatents:
    """Latents from a pre-encoded archive (training.dataset.LatentDataset).

    __call__(stats [N, 2, C, h, w] float32 = (mean, std), on the device)
    -> scaled latents [N, C, h, w]; `info` is the `latent_info`.
    """

    def __init__(self, dataset):
        self.info = latent_info(dataset.vae, dataset.scale_factor, dataset.image_resolution, dataset.num_channels,
                                dataset.image_shape[1:])

    def __call__(self, stats):
        return draw_latents(stats[:, 0], stats[:, 1], self.info.scale_factor)


class OnlineEncoder:
    """Latents of a raw image dataset, encoding every batch with the VAE.

    Slower than pre-encoding the archive once with dataset_tool.py encode,
    and says so on the console. __call__(images uint8 [N, 3, H, W] on the
    device) -> scaled latents [N, C, H/f, W/f]; `info` is the `latent_info`.
    """

    def __init__(self, dataset, vae=DEFAULT_VAE, scale_factor=DEFAULT_SCALE_FACTOR, device='cpu'):
        self.vae = load_vae(vae, device)
        factor, channels = downsampling_factor(self.vae), self.vae.config.in_channels
        if dataset.num_channels != channels:
            raise ValueError(f'The VAE {vae} encodes {channels}-channel images, but the dataset has '
                             f'{dataset.num_channels}; use an RGB dataset')
        height, width = dataset.image_shape[1:]
        if height % factor or width % factor:
            raise ValueError(f'The VAE {vae} downsamples by {factor}, which does not divide the dataset\'s '
                             f'{width}x{height} images; use a dataset whose sides are multiples of {factor}')
        self.info = latent_info(vae, scale_factor, (height, width), self.vae.config.latent_channels,
                                (height // factor, width // factor))
        dist.print0(f'Note: encoding every training batch with the VAE {vae}. Encoding the dataset once is faster: '
                    f'python dataset_tool.py encode --source=DATASET --dest=LATENTS.zip --vae={vae}, '
                    f'then train with --data=LATENTS.zip')

    def __call__(self, images):
        mean, std = encode_images(self.vae, images)
        return draw_latents(mean, std, self.info.scale_factor)


def latent_encoder(dataset, latent_kwargs=None, device='cpu'):
    """How training turns `dataset` batches into network inputs in latent space.

    PreEncodedLatents for a pre-encoded dataset (dataset.is_latent; the vae
    and scale_factor of latent_kwargs, if given, must match the archive's),
    OnlineEncoder for a raw image dataset with latent_kwargs = {vae,
    scale_factor} (None values: DEFAULT_VAE, DEFAULT_SCALE_FACTOR), None for
    pixel-space training (latent_kwargs None). The network is then built for
    info.latent_resolution, info.latent_channels.
    """
    vae, scale_factor = (latent_kwargs or {}).get('vae'), (latent_kwargs or {}).get('scale_factor')
    if getattr(dataset, 'is_latent', False):   # any map-style dataset of images counts as pixels
        for name, value in (('vae', vae), ('scale_factor', scale_factor)):
            if value is not None and value != getattr(dataset, name):
                raise ValueError(f'--{name}={value} contradicts the dataset, which was encoded with '
                                 f'{name}={getattr(dataset, name)}; leave --{name} out')
        return PreEncodedLatents(dataset)
    if latent_kwargs is None:
        return None
    return OnlineEncoder(dataset, DEFAULT_VAE if vae is None else vae,
                         DEFAULT_SCALE_FACTOR if scale_factor is None else scale_factor, device)
