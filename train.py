"""Train a Patch Diffusion model (EDM's train.py flags plus the official
Patch Diffusion ones).

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/celeba-64x64.zip --cond=0 --arch=ddpmpp --batch=256 \\
        --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5

Running the same command again with the same --outdir resumes the newest
training state of the latest run folder with the same options.
"""

import contextlib
import json
import os
import re
import shutil
import sys
import traceback

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import patching

ARCHITECTURES = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1],
                   model_channels=128, channel_mult=[2, 2, 2]),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                   model_channels=128, channel_mult=[2, 2, 2]),
    'adm': dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1, 2, 3, 4]),
}

# Options that may differ between a run and the command that resumes it.
_RESUME_KEYS = ('run_dir', 'resume_state', 'transfer_pkl', 'snapshot_format')


def parse_int_list(s):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]."""
    if isinstance(s, list):
        return s
    if s.strip().lower() in ('', 'none'):
        return []
    values = []
    for part in s.split(','):
        m = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', part)
        try:
            values.extend(range(int(m.group(1)), int(m.group(2)) + 1) if m else [int(part)])
        except ValueError:
            raise click.BadParameter(f'{s!r} is not a list of integers like 1,2,2,2') from None
    return values


def build_config(opts, dataset):
    """The fully resolved options (what training_options.json holds)."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name=dataset_class_name(opts.data), path=opts.data,
                                       use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache,
                                       resolution=dataset.resolution, max_size=len(dataset) // (2 if opts.xflip else 1),
                                       random_seed=0)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=torch.cuda.is_available(), num_workers=opts.workers,
                                           prefetch_factor=2 if opts.workers > 0 else None,
                                           persistent_workers=opts.workers > 0)
    c.network_kwargs = dnnlib.EasyDict(precond=opts.precond, **ARCHITECTURES[opts.arch])
    if opts.cbase is not None:
        c.network_kwargs.model_channels = opts.cbase
    if opts.cres is not None:
        c.network_kwargs.channel_mult = opts.cres
    if opts.blocks is not None:
        c.network_kwargs.num_blocks = opts.blocks
    if opts.attn is not None:
        c.network_kwargs.attn_resolutions = opts.attn
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16, use_pos=True,
                            pos_freqs=opts.pos_freqs, implicit_mlp=opts.implicit_mlp)
    if opts.label_dropout:
        c.network_kwargs.label_dropout = opts.label_dropout
    c.loss_kwargs = dnnlib.EasyDict(loss=opts.precond)
    if opts.P_mean is not None or opts.P_std is not None:
        if opts.precond != 'edm':
            raise click.ClickException('--P_mean and --P_std set the noise levels of --precond=edm only')
        c.loss_kwargs.update({k: v for k, v in (('P_mean', opts.P_mean), ('P_std', opts.P_std)) if v is not None})
    c.optimizer_kwargs = dnnlib.EasyDict(lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)
    c.augment_kwargs = None
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(p=opts.augment, xflip=1e8, yflip=1, scale=1, rotate_frac=1,
                                           aniso=1, translate_frac=1)
        c.network_kwargs.augment_dim = 9
    c.patch_kwargs = dnnlib.EasyDict(real_p=opts.real_p, progressive=opts.progressive,
                                     latent=bool(opts.train_on_latents or dataset.is_latent))
    if opts.train_on_latents and not dataset.is_latent:
        c.latent_kwargs = dnnlib.EasyDict(vae=opts.vae, scale_factor=opts.scale_factor)
    c.update(seed=opts.seed, batch_size=opts.batch, batch_gpu=opts.batch_gpu,
             total_kimg=max(opts.duration * 1000, 1e-3), ema_halflife_kimg=opts.ema * 1000,
             lr_rampup_kimg=opts.lr_rampup,
             loss_scaling=opts.ls, cudnn_benchmark=opts.bench, kimg_per_tick=opts.tick,
             snapshot_ticks=opts.snap, state_dump_ticks=opts.dump,
             precision='bf16' if opts.bf16 else 'fp32', max_bad_steps=opts.max_bad_steps,
             sample_count=opts.samples, device=opts.device_name, snapshot_format=opts.snapshot_format,
             channels_last=opts.channels_last, compile_kwargs=dnnlib.EasyDict(dynamic=False) if opts.compile_net else None)
    if opts.metrics:
        c.metrics = [opts.metrics]
        c.metric_kwargs = dnnlib.EasyDict(ref=opts.metric_ref, num=opts.metric_num)
    if opts.transfer:
        c.transfer_pkl = opts.transfer
        c.ema_rampup_ratio = None
    return c


def dataset_class_name(path):
    """The dataset class for --data: latents from `dataset_tool.py encode`, or images."""
    from training.dataset import is_latent_archive
    return 'training.dataset.LatentDataset' if is_latent_archive(path) else 'training.dataset.ImageFolderDataset'


def latent_resolution(opts, dataset):
    """Side of what the network sees: the dataset's, or the VAE latents' of raw images."""
    if not opts.train_on_latents or dataset.is_latent:
        return dataset.resolution
    from training import latents
    vae = latents.load_vae(opts.vae or latents.DEFAULT_VAE)
    return dataset.resolution // latents.downsampling_factor(vae)


def _comparable(c):
    return {k: v for k, v in json.loads(json.dumps(c)).items() if k not in _RESUME_KEYS}


def find_resumable_run(outdir, c, seed_given, nosubdir):
    """(run_dir, state_path, seed) of the latest run in outdir with the same
    options, or None. state_path is None when that run has no training state
    yet (it was stopped before its first one): it restarts in the same folder
    with the same seed."""
    if not os.path.isdir(outdir):
        return None
    candidates = [outdir] if nosubdir else sorted(
        (os.path.join(outdir, d) for d in os.listdir(outdir) if re.match(r'^\d+-', d)), reverse=True)
    from training.training_loop import find_latest_state
    for run_dir in candidates:
        try:
            with open(os.path.join(run_dir, 'training_options.json')) as f:
                old = json.load(f)
        except (OSError, ValueError):
            continue
        mine, theirs = _comparable(c), _comparable(old)
        if not seed_given:
            mine.pop('seed', None)
            theirs.pop('seed', None)
        if mine == theirs:
            return run_dir, find_latest_state(run_dir), old.get('seed')
    return None


def next_run_dir(outdir, desc):
    ids = [int(m.group(1)) for d in (os.listdir(outdir) if os.path.isdir(outdir) else [])
           if (m := re.match(r'^(\d+)', d)) and os.path.isdir(os.path.join(outdir, d))]
    return os.path.join(outdir, f'{max(ids, default=-1) + 1:05d}-{desc}')


@click.command(context_settings=dict(max_content_width=110))
# Main options.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset (zip or folder from dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--cond', help='Train a class-conditional model', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--arch', help='Network architecture', type=click.Choice(sorted(ARCHITECTURES)), default='ddpmpp', show_default=True)
@click.option('--precond', help='Preconditioning and loss', type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)
# Patch options.
@click.option('--real_p', '--real-p', 'real_p', help='Share of full-size steps (1 = plain EDM)', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option('--train_on_latents', '--train-on-latents', 'train_on_latents', help='Train on Stable Diffusion VAE latents', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--vae', help='VAE for --train_on_latents on raw images  [default: stabilityai/sd-vae-ft-ema]', metavar='ID|DIR', type=str)
@click.option('--scale_factor', '--scale-factor', 'scale_factor', help='Latent scale factor for --train_on_latents on raw images  [default: 0.18215]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--progressive', help='Patch sizes in increasing order instead of random', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--implicit_mlp', '--implicit-mlp', 'implicit_mlp', help='1x1-conv MLP on the input and coordinates', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--pos_freqs', '--pos-freqs', 'pos_freqs', help='Sin/cos frequencies added to the coordinate channels', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch', help='Total batch size (full images per step)', metavar='INT', type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu', '--batch_gpu', 'batch_gpu', help='Limit batch size per GPU', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channel multiplier  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channels per resolution  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--blocks', help='Residual blocks per resolution  [default: varies]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention, e.g. 16 or 32,16 or none  [default: varies]', metavar='LIST', type=parse_int_list)
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--P_mean', 'P_mean', help='EDM loss: mean of ln(sigma)  [default: -1.2]', metavar='FLOAT', type=float)
@click.option('--P_std', 'P_std', help='EDM loss: std of ln(sigma)  [default: 1.2]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--lr-rampup', '--lr_rampup', 'lr_rampup', help='Learning-rate ramp-up', metavar='KIMG', type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.13, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=click.FloatRange(0, 1), default=0.12, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--label-dropout', '--label_dropout', 'label_dropout', help='Drop class labels with this probability (for --cfg at sampling)', metavar='FLOAT', type=click.FloatRange(0, 1), default=0, show_default=True)
@click.option('--max-size', '--max_size', 'max_size', help='Train on a random subset of N images', metavar='INT', type=click.IntRange(min=1))
# Performance-related.
@click.option('--fp16', help='Run the network in fp16 (CUDA)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--bf16', help='bf16 autocast (CUDA)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--channels-last', '--channels_last', 'channels_last', help='Network weights and inputs in channels-last memory format (faster convolutions on recent GPUs)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--compile', 'compile_net', help='torch.compile the network: one graph per patch shape, compiled at its first step (CUDA; minutes per shape on CPU)', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True, show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', 'device_name', help='cuda, cuda:N or cpu  [default: cuda if available]', metavar='STR', type=str)
@click.option('--max-bad-steps', 'max_bad_steps', help='Stop after this many steps with non-finite gradients', metavar='INT', type=click.IntRange(min=0), default=20, show_default=True)
# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=50, show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--snapshot-format', '--snapshot_format', 'snapshot_format', help='Snapshot files: EDM\'s pickles, .safetensors (no code inside) or both', type=click.Choice(['pkl', 'safetensors', 'both']), default='pkl', show_default=True)
@click.option('--samples', help='Images in the samples-NNNNNN.png grid at each snapshot (0 = off)', metavar='INT', type=click.IntRange(min=0), default=16, show_default=True)
@click.option('--metrics', help='Metric to compute at each snapshot', type=click.Choice(['fid']))
@click.option('--metric-ref', '--metric_ref', 'metric_ref', help='FID reference statistics for --metrics', metavar='NPZ|URL', type=str)
@click.option('--metric-num', '--metric_num', 'metric_num', help='Images generated for --metrics', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Random seed  [default: random]', metavar='INT', type=click.IntRange(min=0))
@click.option('--transfer', help='Transfer learning from a network snapshot', metavar='PKL|SAFETENSORS|URL', type=str)
@click.option('--resume', help='Resume from previous training state', metavar='PT', type=str)
@click.option('-n', '--dry-run', help='Print training options and exit', is_flag=True)
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def main(**kwargs):
    """Train a diffusion model on image patches (Patch Diffusion on EDM).

    \b
    # DDPM++ on CelebA-64 with 8 GPUs, half of the steps on patches
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/celeba-64x64.zip --cond=0 --arch=ddpmpp --batch=256 \\
        --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5
    """
    opts = dnnlib.EasyDict(kwargs)
    if opts.fp16 and opts.bf16:
        raise click.ClickException('--fp16 and --bf16 are exclusive: pick one')
    if opts.metrics and not opts.metric_ref:
        raise click.ClickException('--metrics=fid needs --metric-ref=NPZ|URL (reference statistics from fid.py ref)')
    if opts.label_dropout and not opts.cond:
        raise click.ClickException('--label-dropout needs a conditional model (--cond=1)')
    try:
        device = dist.init(opts.device_name)
    except RuntimeError as err:
        raise click.ClickException(f'--device={opts.device_name}: {err}') from None
    opts.device_name = str(device)
    failure, trace = None, None
    try:
        train(opts, device)
    except Exception as err:   # reported after shutdown: a live traceback would keep DDP alive past it
        failure = click.ClickException(failure_message(err))
        trace = traceback.format_exc() if dnnlib.util.debug_requested() else None
    dist.shutdown()
    if failure is not None:
        if trace:
            sys.stderr.write(trace)
        raise failure


def failure_message(err):
    """The one-line message of an error that stopped training."""
    if isinstance(err, click.ClickException):
        return err.format_message()
    if isinstance(err, RuntimeError) and dist.get_world_size() > 1:
        return (f'{" ".join(str(err).split())} -- with several processes this usually means that another process '
                f'of the run failed or was killed (its output says why); torchrun --max-restarts, or running the '
                f'same command again, resumes from the newest training state')
    return dnnlib.util.error_line(err)


def train(opts, device):
    """Everything of main() after the process group is up: resolve the
    options, pick or resume the run folder, check the input files, train."""
    # Dataset: validate it and be explicit about its size and resolution.
    from training.training_loop import build_dataset, training_loop
    try:
        dataset = build_dataset(dict(class_name=dataset_class_name(opts.data), path=opts.data,
                                     use_labels=opts.cond, max_size=opts.max_size, xflip=opts.xflip, cache=False))
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data={opts.data}: {err}') from None
    try:
        if dataset.is_latent and (opts.vae or opts.scale_factor):
            raise ValueError(f'--vae and --scale_factor are for raw images; {opts.data} was encoded with '
                             f'{dataset.vae} (scale factor {dataset.scale_factor})')
        schedule = patching.PatchSchedule(latent_resolution(opts, dataset), opts.real_p,
                                          latent=bool(opts.train_on_latents or dataset.is_latent))
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    if dataset.is_latent and opts.augment:
        raise click.ClickException('--augment works on pixels; use --augment=0 with a latent dataset')

    seed_given = opts.seed is not None
    if not seed_given:
        opts.seed = dist.broadcast_object(int(torch.randint(1 << 31, size=[]).item()))
    c = build_config(opts, dataset)
    world = dist.get_world_size()
    if opts.batch % world:
        raise click.ClickException(f'--batch={opts.batch} must be divisible by the number of processes ({world})')
    if opts.batch_gpu is not None and (opts.batch // world) % min(opts.batch_gpu, opts.batch // world):
        raise click.ClickException(f'--batch / processes = {opts.batch // world} must be divisible by --batch-gpu={opts.batch_gpu}')

    # Where to write, and whether to resume.
    resumed = None
    if opts.resume:
        if not os.path.isfile(opts.resume):
            raise click.ClickException(f'--resume: no such file {opts.resume}')
        c.resume_state = opts.resume
    elif not opts.dry_run:
        resumed = dist.broadcast_object(find_resumable_run(opts.outdir, c, seed_given, opts.nosubdir)
                                        if dist.get_rank() == 0 else None)
    if resumed is not None:
        c.run_dir, c.resume_state, c.seed = resumed
    elif opts.nosubdir:
        c.run_dir = opts.outdir
    else:
        precision = 'fp16' if opts.fp16 else 'bf16' if opts.bf16 else 'fp32'
        desc = (f'{dataset.name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{opts.precond}-gpus{world}'
                f'-batch{opts.batch}-{precision}-realp{opts.real_p:g}')
        if opts.desc:
            desc += f'-{opts.desc}'
        c.run_dir = dist.broadcast_object(next_run_dir(opts.outdir, desc) if dist.get_rank() == 0 else None)

    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    dist.print0(f'Network architecture:    {opts.arch}')
    dist.print0(f'Preconditioning & loss:  {opts.precond}')
    dist.print0(f'Patch sizes:             {schedule.describe()}')
    dist.print0(f'Number of processes:     {world} on {device}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0()
    if opts.dry_run:
        dist.print0('Dry run; exiting.')
        return
    if resumed is not None and c.resume_state is not None:
        dist.print0(f'Resuming run {c.run_dir} from {c.resume_state} (same command, same --outdir).')
    elif resumed is not None:
        dist.print0(f'Restarting run {c.run_dir} from the beginning: it has no training state yet.')

    check_input_files(opts)
    from training import training_loop as tl
    new_folders = [d for d in dict.fromkeys([c.run_dir, opts.outdir]) if not os.path.isdir(d)]
    logger = tl.run_on_rank0(lambda: prepare_run_dir(c, write_options=resumed is None))
    failed = True
    try:
        training_loop(**c)
        failed = False
    finally:
        if logger is not None:
            logger.close()
            if failed and new_folders:
                remove_if_nothing_saved(new_folders)


def check_input_files(opts):
    """Read --metric-ref, --resume and --transfer once before anything is
    written: a truncated or wrong file is an error now, not after the run
    folder exists. (--transfer is loaded again by the training loop.)"""
    from training import metrics, sampling
    from training import training_loop as tl
    if opts.metric_ref:
        try:
            metrics.load_ref(opts.metric_ref)
        except (ValueError, OSError) as err:
            raise click.ClickException(f'--metric-ref: {err}') from None

    def check():
        for flag, value, load in (('--resume', opts.resume, lambda path: tl.load_state(path, mmap=True)),
                                  ('--transfer', opts.transfer, sampling.load_network)):
            if value:
                try:
                    load(value)
                except ValueError as err:
                    raise click.ClickException(f'{flag}: {err}') from None
    tl.run_on_rank0(check)


def prepare_run_dir(c, write_options):
    """Create the run folder with training_options.json (for a new run) and
    start copying the console to its log.txt. Returns the Logger."""
    try:
        os.makedirs(c.run_dir, exist_ok=True)
        if write_options:
            with dnnlib.util.atomic_write(os.path.join(c.run_dir, 'training_options.json'), 'w') as f:
                json.dump(c, f, indent=2)
        return dnnlib.util.Logger(os.path.join(c.run_dir, 'log.txt'), 'a')
    except OSError as err:
        raise click.ClickException(f'Cannot write the run folder {c.run_dir} ({err.strerror or err}); '
                                   f'choose another --outdir, free space or fix its permissions') from None


def remove_if_nothing_saved(new_folders):
    """Remove the run folder (and --outdir) that this command made if the run
    failed before it saved a snapshot or a training state: a failed start
    leaves nothing behind. new_folders: [run folder, then --outdir if new]."""
    run_dir = new_folders[0]
    if any(name.startswith(('network-snapshot-', 'training-state-')) for name in os.listdir(run_dir)):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    for folder in new_folders[1:]:
        with contextlib.suppress(OSError):
            os.rmdir(folder)
    print(f'Removed {run_dir}: the run stopped before it saved anything.')


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
