"""Generation: the images of a list of seeds, split over ranks as EDM's
generate.py does, each image from its own per-seed generator
(docs/DESIGN.md section 1), decoded to pixels for latent models.
"""

import torch

from torch_utils import distributed as dist
from training import image_io, latents, samplers
from training.denoiser import check_guidance, make_denoiser, network_info, sampling_region
from training.networks import image_shape, resolution_value

# ----------------------------------------------------------------------------
# Per-seed random numbers.


class StackedRandomGenerator:
    """One torch.Generator per image of a batch, seeded with that image's seed
    (modulo 2^32, as EDM), so image k draws the same numbers in any batch.
    `randn_like` draws in `noise_dtype` (None: the input's dtype), returned in
    the input's dtype: EDM's sampler draws its churn noise in float64, EDM2's
    in float32."""

    def __init__(self, device, seeds, noise_dtype=None):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]
        self.noise_dtype = noise_dtype

    def _check_batch(self, size):
        assert size[0] == len(self.generators), f'batch of {size[0]} for {len(self.generators)} seeds'

    def randn(self, size, **kwargs):
        """Standard normal samples of shape `size` = [N, ...]; row k from generator k."""
        self._check_batch(size)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        """`randn` with the shape, dtype, layout and device of `input`."""
        dtype = input.dtype if self.noise_dtype is None else self.noise_dtype
        return self.randn(input.shape, dtype=dtype, layout=input.layout, device=input.device).to(input.dtype)

    def randint(self, *args, size, **kwargs):
        """torch.randint(*args) of shape `size` = [N, ...]; row k from generator k."""
        self._check_batch(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


# ----------------------------------------------------------------------------
# Generation.


def rank_batches(seeds, max_batch_size, rank=0, world_size=1):
    """The batches of `seeds` this rank samples, split as EDM's generate.py does.

    All seeds are cut into ceil(len / (max_batch_size * world_size)) * world_size
    consecutive, near-equal batches; rank r takes batches r, r + world_size, ...
    Empty batches are dropped. Returns a list of lists of ints.
    """
    if len(seeds) == 0:
        raise ValueError('No seeds given')
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size={max_batch_size} must be at least 1')
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    all_batches = torch.as_tensor(seeds).tensor_split(num_batches)
    return [batch.tolist() for batch in all_batches[rank::world_size] if len(batch)]


def random_class_labels(rnd, label_dim, batch_size, class_idx=None, device='cpu'):
    """One-hot labels [N, label_dim] drawn per seed as EDM does (None if label_dim = 0).

    The draw happens even when class_idx fixes the class, so the random
    stream, and the churn noise after it, stay those of EDM.
    """
    if not label_dim:
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[batch_size], device=device)]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


def _module_device(net):
    for tensor in list(net.parameters()) + list(net.buffers()):
        return tensor.device
    return torch.device('cpu')


def _check_labels(label_dim, class_idx, cfg):
    if class_idx is not None and not label_dim:
        raise ValueError(f'Class {class_idx} was requested, but the network is unconditional (label_dim=0); '
                         f'leave the class out')
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f'Class {class_idx} is out of range: the network has {label_dim} classes, 0-{label_dim - 1}')
    if cfg != 1 and not label_dim:
        raise ValueError(f'Guidance cfg={cfg} needs a class-conditional network; this one is unconditional, use cfg=1')


def generate_images(net, seeds, batch_size=64, class_idx=None, cfg=1.0, device=None, resolution=None,
                    image_size=None, x_start=0, y_start=0, rank=None, world_size=None, latent=None,
                    gnet=None, guidance=1.0, **sampler_kwargs):
    """Sample the images of `seeds` that fall to this rank, batch by batch.

    net: a network of any convention, on `device` (default: the network's
    device); batch_size: the most images per batch; class_idx: fixed class
    (None: random per seed, for conditional networks); cfg: classifier-free
    guidance weight w (1 = off); gnet, guidance: a guide network on the same
    device and its weight g, D = D_gnet + g (D - D_gnet) (EDM2's
    autoguidance; 1 = off; see `denoiser.check_guidance`); resolution,
    image_size, x_start, y_start: the region, an image_size rectangle (an
    int side or (height, width)) at column x_start, row y_start of a
    coordinate frame of `resolution` (an int side or (height, width);
    default: the network's whole image; see `denoiser.sampling_region`), in
    the network's pixels (for a latent model, latent pixels); rank,
    world_size: default torch_utils.distributed's; latent: for a latent
    model, the metadata {vae, scale_factor, image_resolution (optional)} of
    its VAE (a snapshot's 'latent' entry), or {vae, scale, bias} for EDM2's
    per-channel convention (see training.latents.generation_latent): samples are decoded to pixels with
    that VAE, loaded now; sampler_kwargs: see `samplers.select_sampler`.
    Arguments are checked at the call (ValueError).

    Returns an iterator of (batch_seeds list[int], images uint8 [n, C, h, w]
    on device), decoded images [n, 3, f h, f w] for latent models (f: the
    VAE's downsampling factor); image k depends only on seeds[k] and the
    settings.
    """
    info = network_info(net)
    region = sampling_region(net, resolution, image_size, x_start, y_start)
    _check_labels(info.label_dim, class_idx, cfg)
    check_guidance(net, cfg, gnet, guidance)
    sampler, sampler_kwargs = samplers.select_sampler(**sampler_kwargs)
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    batches = rank_batches(list(seeds), batch_size, rank, world_size)
    device = _module_device(net) if device is None else torch.device(device)
    shape = [info.img_channels, *region.size]
    decode = image_io.to_uint8
    if latent is not None:
        latent = _latent_of_size(latent, region.size, info.img_shape)
        decode = latents.pixel_decoder(latent, info.img_channels, device)
    guide = dict(guidance=cfg, region=region, gnet=gnet, gnet_guidance=guidance)
    return _generate_batches(net, info, batches, shape, class_idx, guide, device, sampler, sampler_kwargs, decode)


def _latent_of_size(latent, size, latent_shape):
    """`latent` with its recorded image_resolution scaled from the network's
    latent_shape (height, width) to a sample of `size` (height, width);
    dropped if not a whole number of pixels."""
    recorded = latent.get('image_resolution')
    if recorded is None or latent_shape is None or tuple(size) == tuple(latent_shape):
        return latent
    scaled = {key: value for key, value in latent.items() if key != 'image_resolution'}
    pixels = image_shape(recorded)
    if all(p * s % l == 0 for p, s, l in zip(pixels, size, latent_shape)):
        scaled['image_resolution'] = resolution_value([p * s // l for p, s, l in zip(pixels, size, latent_shape)])
    return scaled


def _generate_batches(net, info, batches, shape, class_idx, guide, device, sampler, sampler_kwargs, decode):
    for batch_seeds in batches:
        rnd = StackedRandomGenerator(device, batch_seeds, torch.float32 if info.family == 'edm2' else None)
        noise = rnd.randn([len(batch_seeds), *shape], device=device)
        class_labels = random_class_labels(rnd, info.label_dim, len(batch_seeds), class_idx, device)
        denoise = make_denoiser(net, class_labels, **guide)
        samples = sampler(denoise, noise, rnd.randn_like, **sampler_kwargs)
        yield batch_seeds, decode(samples)


def sample_grid(net, path, seeds, batch_size=64, class_idx=None, cfg=1.0, device=None, grid_width=None,
                latent=None, **sampler_kwargs):
    """Sample `seeds` in this process alone and write them as one grid PNG at `path`.

    For the training loop's samples-NNNNNN.png (call it on one rank); latent:
    as generate_images's. Returns the images, uint8 [N, C, H, W] on the CPU,
    in the order of `seeds`.
    """
    batches = generate_images(net, seeds, batch_size=batch_size, class_idx=class_idx, cfg=cfg, device=device,
                              rank=0, world_size=1, latent=latent, **sampler_kwargs)
    images = torch.cat([batch_images.cpu() for _, batch_images in batches])
    image_io.save_image_grid(images, path, grid_width)
    return images
