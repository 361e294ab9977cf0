"""Generate images with a trained network: ours, EDM's or the official Patch
Diffusion's network pickles (SPEC.md sections 1 and 3). Samples of latent
models are decoded to pixels with their VAE (SPEC.md section 2).

A thin command line around training.sampling.generate_images. Runs alone or
under torchrun, the ranks splitting the seeds; image k depends only on seed k.
"""

import os

import click
import numpy as np
import PIL.Image
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import latents, sampling


def _load_image(path):
    """A PNG -> uint8 [C, H, W] tensor (C = 1 or 3)."""
    array = np.asarray(PIL.Image.open(path))
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _write_grid(outdir, seeds, subdirs):
    """outdir/grid.png from the PNGs of `seeds` (written by all ranks)."""
    images = torch.stack([_load_image(sampling.image_path(outdir, seed, subdirs)) for seed in seeds])
    return sampling.save_image_grid(images, os.path.join(outdir, 'grid.png'))


def _init_device(device):
    try:
        return dist.init(device)
    except RuntimeError as err:
        raise click.ClickException(str(err)) from err


@click.command()
@click.option('--network', 'network_pkl', help='Network snapshot (network-snapshot-*.pkl or .safetensors; ours, EDM or official)', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Folder for the PNGs', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Seeds, one image each (e.g. 0-49999 or 1,2,5-10)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs', help='Put each 1000 seeds in a subfolder', is_flag=True)
@click.option('--class', 'class_idx', help='Class index for every image  [default: random per seed]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Most images per batch (per process)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--cfg', help='Classifier-free guidance weight (1 = off)', metavar='FLOAT', type=click.FloatRange(min=0), default=1, show_default=True)
@click.option('--resolution', help='Resolution, for pickles that do not record it', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--grid', help='Also write all images as one grid, outdir/grid.png', is_flag=True)
@click.option('--device', help='Device  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--on_latents', help='The network makes VAE latents  [default: as the pickle records; official latent pickles need 1]', metavar='BOOL', type=bool, default=None)
@click.option('--vae', help=f'VAE to decode latents with: hub id or save_pretrained folder  [default: as recorded, else {latents.DEFAULT_VAE}]', metavar='ID|DIR', type=str, default=None)
@click.option('--scale_factor', help=f'Latent scale factor  [default: as recorded, else {latents.DEFAULT_SCALE_FACTOR}]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)

@click.option('--steps', 'num_steps', help='Sampling steps N', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--sigma_min', help='Smallest noise level of the steps  [default: the sampler\'s]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', help='Largest noise level of the steps  [default: the sampler\'s]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho', help='Exponent rho of the EDM time steps', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--S_churn', 'S_churn', help='Churn: noise added back per step (0 = deterministic)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', 'S_min', help='Churn only at noise levels >= S_min', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', 'S_max', help='Churn only at noise levels <= S_max', metavar='FLOAT', type=click.FloatRange(min=0), default='inf', show_default=True)
@click.option('--S_noise', 'S_noise', help='Scale of the churn noise', metavar='FLOAT', type=float, default=1, show_default=True)

@click.option('--solver', help='Ablation: ODE solver', metavar='euler|heun', type=click.Choice(sampling.SOLVERS))
@click.option('--disc', 'discretization', help='Ablation: time step discretization', metavar='vp|ve|iddpm|edm', type=click.Choice(sampling.DISCRETIZATIONS))
@click.option('--schedule', help='Ablation: noise schedule sigma(t)', metavar='vp|ve|linear', type=click.Choice(sampling.SCHEDULES))
@click.option('--scaling', help='Ablation: signal scaling s(t)', metavar='vp|none', type=click.Choice(sampling.SCALINGS))
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def main(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, cfg, resolution, grid, device, on_latents, vae,
         scale_factor, **sampler_kwargs):
    """Generate images with the EDM sampler, or the ablation sampler when any
    of --solver, --disc, --schedule, --scaling is given.

    Examples:

    \b
    # 64 images as out/*.png
    python generate.py --outdir=out --seeds=0-63 --network=training-runs/00000-demo/network-snapshot-000100.pkl

    \b
    # 50,000 images on 2 GPUs, 1000 per folder
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-49999 --subdirs --network=net.pkl

    \b
    # An official Patch Diffusion latent model (ours record their VAE in the pickle)
    python generate.py --outdir=out --seeds=0-63 --on_latents=1 --cfg=1.3 --network=imagenet-latent.pkl
    """
    device = _init_device(device)
    try:
        seeds = sampling.parse_seeds(seeds)
    except ValueError as err:
        raise click.ClickException(str(err)) from err

    # Rank 0 loads first (and fills the download cache), the other ranks after it.
    if dist.get_rank() != 0:
        dist.barrier()
    dist.print0(f'Loading network from "{network_pkl}"...')
    try:
        net, meta = sampling.load_network(network_pkl, device, verbose=(dist.get_rank() == 0))
        latent = latents.generation_latent(meta.get('latent'), on_latents, vae, scale_factor)
        channels = sampling.network_info(net).img_channels
        if latent is None and channels not in (1, 3):
            raise ValueError(f'The network makes {channels}-channel samples, not images; if it was trained on '
                             f'VAE latents, add --on_latents=1 (and --vae)')
        batches = sampling.generate_images(net, seeds, batch_size=max_batch_size, class_idx=class_idx, cfg=cfg,
                                           device=device, resolution=resolution, latent=latent, **sampler_kwargs)
    except ValueError as err:
        raise click.ClickException(str(err)) from err
    if dist.get_rank() == 0:
        dist.barrier()

    dist.print0(f'Generating {len(seeds)} images to "{outdir}"...')
    num_batches = len(sampling.rank_batches(seeds, max_batch_size, dist.get_rank(), dist.get_world_size()))
    for batch_seeds, images in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(dist.get_rank() != 0)):
        for seed, image in zip(batch_seeds, images.cpu()):
            sampling.save_image(image, sampling.image_path(outdir, seed, subdirs))

    dist.barrier()
    if grid and dist.get_rank() == 0:
        dist.print0(f'Grid: {_write_grid(outdir, seeds, subdirs)}')
    dist.print0('Done.')
    dist.shutdown()


if __name__ == '__main__':
    main()
