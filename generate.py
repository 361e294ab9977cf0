"""Generate images with a trained network: ours, EDM's, EDM2's or the
official Patch Diffusion's network pickles, or our .safetensors snapshots
(docs/DESIGN.md sections 1 and 4), optionally guided by a second network
(EDM2's autoguidance). Samples of latent models are decoded to
pixels with their VAE. A sample can cover any square of the network's
coordinate frame, or a canvas larger than it (section 2).

    python generate.py --outdir=out --seeds=0-63 --network=network-snapshot-000100.pkl
    python generate.py convert --network=net.pkl --dest=net.safetensors

A thin command line around training.generation.generate_images. Runs alone
or under torchrun, the ranks splitting the seeds; image k depends only on
seed k.
"""

import os

import click
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import denoiser, generation, image_io, latents, samplers, snapshots


@click.group(cls=dnnlib.util.DefaultGroup, default='generate')
def cli():
    """Generate images (the default command), or convert a pickle to .safetensors."""


@cli.command('generate')
@click.option('--network', '--net', 'network_pkl', help='Network snapshot (network-snapshot-*.pkl or .safetensors; ours, EDM, EDM2 or official): a path, an http(s) URL or a Hugging Face Hub file hf://OWNER/REPO/FILE', metavar='PATH|URL', type=str, required=True)
@click.option('--outdir', help='Folder for the PNGs', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Seeds, one image each (e.g. 0-49999 or 1,2,5-10)', metavar='LIST', type=str, default='0-63', show_default=True)
@click.option('--subdirs', help='Put each 1000 seeds in a subfolder', is_flag=True)
@click.option('--class', 'class_idx', help='Class index for every image  [default: random per seed]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'max_batch_size', help='Most images per batch (per process)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--cfg', help='Classifier-free guidance weight (1 = off)', metavar='FLOAT', type=click.FloatRange(min=0), default=1, show_default=True)
@click.option('--gnet', 'gnet_pkl', help='Guide network for --guidance (EDM2\'s autoguidance: a smaller or less trained network of the same data), as --network', metavar='PATH|URL', type=str, default=None)
@click.option('--guidance', help='Weight g of the --gnet guide: D = D_gnet + g (D - D_gnet) (1 = off)', metavar='FLOAT', type=float, default=1, show_default=True)
@click.option('--image_size', '--image-size', 'image_size', help='Size of the image to sample: S (a square) or WxH, in the network\'s pixels (for latent models latent pixels: the decoded images are 8 times larger with the usual VAE)  [default: --resolution]', metavar='S|WxH', type=dnnlib.util.Size(), default=None)
@click.option('--x_start', '--x-start', 'x_start', help='Frame column of the image\'s left edge: its columns x_start .. x_start+w-1 get x = (column / (W - 1) - 0.5) * 2, past 1 beyond the frame', metavar='INT', type=int, default=0, show_default=True)
@click.option('--y_start', '--y-start', 'y_start', help='Frame row of the image\'s top edge: its rows y_start .. y_start+h-1 get y = (row / (H - 1) - 0.5) * 2', metavar='INT', type=int, default=0, show_default=True)
@click.option('--resolution', help='Size of the coordinate frame the columns and rows count in, R (a square) or WxH (x = -1 at column 0, 1 at column W-1; y likewise over H); a network without coordinates takes only its own  [default: the network\'s resolution; required if it records none]', metavar='R|WxH', type=dnnlib.util.Size(), default=None)
@click.option('--mask_pos', '--mask-pos', 'mask_pos', help='Official flag, checked: call the network without coordinates; allowed only for networks that take none, so it changes nothing', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--embed_fq', '--embed-fq', 'embed_fq', help='Official flag, checked: coordinates embedded as sin/cos at this many frequencies (0 = the plain grid); must match the network\'s channels, which tell it already  [default: detected]', metavar='INT', type=int, default=None)
@click.option('--grid', help='Also write all images as one grid, OUTDIR-grid.png beside the folder (the folder keeps one PNG per seed, for fid.py calc)', is_flag=True)
@click.option('--device', help='cpu, cuda or cuda:N (under torchrun, cuda is each process\'s LOCAL_RANK GPU)  [default: cuda if available, else cpu]', metavar='STR', type=str, default=None)
@click.option('--on_latents', '--on-latents', 'on_latents', help='The network makes VAE latents  [default: as the pickle records; official latent pickles need 1]', metavar='BOOL', type=bool, default=None)
@click.option('--vae', help=f'VAE to decode latents with: hub id or save_pretrained folder  [default: as recorded, else {latents.DEFAULT_VAE}]', metavar='ID|DIR', type=str, default=None)
@click.option('--scale_factor', '--scale-factor', 'scale_factor', help=f'Latent scale factor  [default: as recorded, else {latents.DEFAULT_SCALE_FACTOR}]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=None)

@click.option('--steps', 'num_steps', help='Sampling steps N', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True)
@click.option('--sigma_min', '--sigma-min', 'sigma_min', help='Smallest noise level of the steps, clamped to the network\'s range  [default: 0.002; ablation sampler: the --disc\'s, e.g. ve 0.02]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--sigma_max', '--sigma-max', 'sigma_max', help='Largest noise level of the steps, clamped to the network\'s range  [default: 80; ablation sampler: the --disc\'s, e.g. ve 100]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--rho', help='Exponent rho of the EDM time steps', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--S_churn', '--S-churn', 'S_churn', help='Churn: noise added back per step (0 = deterministic)', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_min', '--S-min', 'S_min', help='Churn only at noise levels >= S_min', metavar='FLOAT', type=click.FloatRange(min=0), default=0, show_default=True)
@click.option('--S_max', '--S-max', 'S_max', help='Churn only at noise levels <= S_max', metavar='FLOAT', type=click.FloatRange(min=0), default='inf', show_default=True)
@click.option('--S_noise', '--S-noise', 'S_noise', help='Scale of the churn noise', metavar='FLOAT', type=float, default=1, show_default=True)

@click.option('--solver', help='Solver: euler|heun (EDM\'s ablation sampler), dpmpp-2m (DPM-Solver++(2M): one network evaluation per step, N in all, where Heun takes 2N-1), dpmpp-2m-sde (its stochastic form); the multistep ones run on EDM\'s time steps  [default: EDM\'s Heun sampler]', metavar='NAME', type=click.Choice(samplers.SOLVERS + samplers.MULTISTEP_SOLVERS))
@click.option('--disc', 'discretization', help='Ablation: time step discretization', metavar='vp|ve|iddpm|edm', type=click.Choice(samplers.DISCRETIZATIONS))
@click.option('--schedule', help='Ablation: noise schedule sigma(t)', metavar='vp|ve|linear', type=click.Choice(samplers.SCHEDULES))
@click.option('--scaling', help='Ablation: signal scaling s(t)', metavar='vp|none', type=click.Choice(samplers.SCALINGS))
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def generate(network_pkl, outdir, seeds, subdirs, class_idx, max_batch_size, cfg, gnet_pkl, guidance, image_size,
             x_start, y_start, resolution, mask_pos, embed_fq, grid, device, on_latents, vae, scale_factor,
             **sampler_kwargs):
    """Generate images with the EDM sampler; with --solver=dpmpp-2m or
    dpmpp-2m-sde a multistep solver on the same time steps; the ablation
    sampler when --solver=euler|heun, --disc, --schedule or --scaling is given.

    Examples:

    \b
    # 64 images as out/*.png
    python generate.py --outdir=out --seeds=0-63 --network=training-runs/00000-demo/network-snapshot-000100.pkl

    \b
    # 50,000 images on 2 GPUs, 1000 per folder
    torchrun --standalone --nproc_per_node=2 generate.py --outdir=out --seeds=0-49999 --subdirs --network=net.pkl

    \b
    # DPM-Solver++(2M): one network evaluation per step (18 here; EDM's 18 Heun steps take 35)
    python generate.py --outdir=out --seeds=0-63 --solver=dpmpp-2m --steps=18 --network=net.pkl

    \b
    # The 48x48 bottom-right corner of a 64x64 model's images, and a 128x128 canvas beyond them
    python generate.py --outdir=out --seeds=0-63 --image_size=48 --x_start=16 --y_start=16 --network=net.pkl
    python generate.py --outdir=out --seeds=0-63 --image_size=128 --resolution=64 --network=net.pkl

    \b
    # A 96x64 (width x height) model: its images, and their 192x64 extension to the right
    python generate.py --outdir=out --seeds=0-63 --network=wide.pkl
    python generate.py --outdir=out --seeds=0-63 --image_size=192x64 --network=wide.pkl

    \b
    # An EDM2 network guided by a smaller one (autoguidance), with EDM2's 32 steps
    python generate.py --outdir=out --seeds=0-63 --steps=32 --net=edm2-img512-s.pkl --gnet=edm2-img512-xs.pkl --guidance=2.1

    \b
    # An official Patch Diffusion latent model (ours record their VAE in the pickle)
    python generate.py --outdir=out --seeds=0-63 --on_latents=1 --cfg=1.3 --network=imagenet-latent.pkl

    \b
    # A pickle you trust as a .safetensors snapshot (no code inside): see
    python generate.py convert --help
    """
    try:
        device = dist.init(device)
    except RuntimeError as err:
        raise ValueError(f'--device={device}: {err}') from None
    try:
        seeds = dnnlib.util.parse_int_list(seeds)
    except ValueError as err:
        raise ValueError(f'--seeds: {err}') from None
    if not seeds:
        raise ValueError('--seeds is empty; give seeds such as 0-63')
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ValueError(f'--outdir={outdir} is a file; give a folder for the PNGs')
    others = [] if dist.get_rank() else image_io.other_images(outdir, [image_io.image_path(outdir, seed, subdirs)
                                                                        for seed in seeds])
    if others:
        dist.print0(f'Note: "{outdir}" already holds {len(others)} other images (e.g. {others[0]}), which '
                    f'fid.py calc --images={outdir} would count too; choose a new --outdir to keep them apart')

    # Rank 0 loads first (and fills the download cache), the other ranks after it.
    dist.print0(f'Loading network from "{network_pkl}"...')
    net, latent = dist.rank0_first(lambda: load(network_pkl, device, on_latents, vae, scale_factor))
    gnet = None
    if gnet_pkl is not None:
        dist.print0(f'Loading guide network from "{gnet_pkl}"...')
        gnet = dist.rank0_first(lambda: snapshots.load_network(gnet_pkl, device, verbose=(dist.get_rank() == 0))[0])
    for note in denoiser.check_official_flags(net, mask_pos, embed_fq):
        dist.print0(note)
    batches = generation.generate_images(net, seeds, batch_size=max_batch_size, class_idx=class_idx, cfg=cfg,
                                         gnet=gnet, guidance=guidance, device=device, resolution=resolution,
                                         image_size=image_size, x_start=x_start, y_start=y_start, latent=latent,
                                         **sampler_kwargs)

    sampler, chosen = samplers.select_sampler(**sampler_kwargs)
    evaluations = samplers.network_evaluations(sampler, chosen)
    dist.print0(f'Sampler: {samplers.describe(sampler, chosen)}, {chosen.get("num_steps", 18)} steps: {evaluations} '
                f'network evaluations per image, {evaluations * len(seeds)} in all'
                + (' (each two network passes with --cfg)' if cfg != 1 else '')
                + (' (each two network passes with --gnet)' if gnet is not None and guidance != 1 else ''))
    dist.print0(f'Generating {len(seeds)} images to "{outdir}"...')
    num_batches = len(generation.rank_batches(seeds, max_batch_size, dist.get_rank(), dist.get_world_size()))
    for batch_seeds, images in tqdm.tqdm(batches, total=num_batches, unit='batch', disable=(dist.get_rank() != 0)):
        for seed, image in zip(batch_seeds, images.cpu()):
            image_io.save_image(image, image_io.image_path(outdir, seed, subdirs))

    dist.barrier()
    if grid and dist.get_rank() == 0:
        images = torch.stack([image_io.load_image(image_io.image_path(outdir, seed, subdirs)) for seed in seeds])
        dist.print0(f'Grid: {image_io.save_image_grid(images, image_io.grid_path(outdir))}')
    dist.print0('Done.')
    dist.shutdown()


def load(network_pkl, device, on_latents, vae, scale_factor):
    """(net, latent metadata or None) of a snapshot, checked for sampling images."""
    net, meta = snapshots.load_network(network_pkl, device, verbose=(dist.get_rank() == 0))
    latent = latents.generation_latent(meta.get('latent'), on_latents, vae, scale_factor, meta.get('encoder'))
    channels = denoiser.network_info(net).img_channels
    if latent is None and channels not in (1, 3):
        raise ValueError(f'The network makes {channels}-channel samples, not images; if it was trained on '
                         f'VAE latents, add --on_latents=1 (and --vae)')
    return net, latent


@cli.command()
@click.option('--network', 'network_pkl', help='Network pickle to convert (ours; EDM\'s where our classes rebuild it)', metavar='PKL|URL', type=str, required=True)
@click.option('--dest', help='The .safetensors file to write', metavar='PATH', type=str, required=True)
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def convert(network_pkl, dest):
    """Convert a network pickle you trust to a .safetensors snapshot.

    The .safetensors file holds the weights and JSON metadata, no code: it
    loads without unpickling anything (generate.py --network, train.py
    --transfer). The conversion is refused unless the rebuilt network
    computes exactly what the pickled one does.

    \b
    python generate.py convert --network=network-snapshot-000100.pkl --dest=network-snapshot-000100.safetensors
    """
    if not dest.lower().endswith('.safetensors'):
        raise ValueError(f'--dest={dest} must end with .safetensors')
    if os.path.exists(dest):
        raise ValueError(f'--dest={dest} exists; choose a new name')
    snapshots.convert_snapshot(network_pkl, dest)
    click.echo(f'Wrote {dest}')


main = cli

if __name__ == '__main__':
    cli()
