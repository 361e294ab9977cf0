"""Train a Patch Diffusion model (EDM's train.py flags plus the official
Patch Diffusion ones).

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/celeba-64x64.zip --cond=0 --arch=ddpmpp --batch=256 \\
        --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5

Running the same command again with the same --outdir resumes the newest
training state of the latest run folder with the same options. The options
are resolved by training.config, the run folder by training.runs, and the
training itself is training.training_loop.
"""

import gc
import json
import os
import sys
import traceback

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import config, dinov2, latents, metrics, networks, presets, runs, snapshots, stopping
from training.dataset import dataset_class_name, open_dataset
from training.training_loop import training_loop

D = config.DEFAULTS
# Flags of this script that are not training options.
_CLI_ONLY = ('outdir', 'desc', 'nosubdir', 'resume', 'dry_run')


@click.command(context_settings=dict(max_content_width=110))
# Main options.
@click.option('--outdir', help='Where to save the results', metavar='DIR', type=str, required=True)
@click.option('--data', help='Path to the dataset (zip or folder from dataset_tool.py)', metavar='ZIP|DIR', type=str, required=True)
@click.option('--preset', help='Settings of one of the paper\'s experiments (README: "Paper presets"); flags you give override them', type=click.Choice(list(presets.PRESETS)))
@click.option('--cond', help='Train a class-conditional model', metavar='BOOL', type=bool, default=D.cond, show_default=True)
@click.option('--arch', help='Network architecture: a UNet (ddpmpp, ncsnpp, adm) or a DiT of size S, B, L or XL, whose --cbase is the hidden size and --blocks the depth (README: "Transformers (DiT)")', type=click.Choice(sorted(networks.ARCHITECTURES)), default=D.arch, show_default=True)
@click.option('--precond', help='Preconditioning and loss (pedm, the official default, is edm with coordinates: the same here)', type=click.Choice(list(config.PRECONDS)), default=D.precond, show_default=True)
@click.option('--use_pos', '--use-pos', 'use_pos', help='Coordinate channels (0: a network shaped as EDM\'s; with --real_p=1, plain EDM training)', metavar='BOOL', type=bool, default=D.use_pos, show_default=True)
# Patch options.
@click.option('--real_p', '--real-p', 'real_p', help='Share of full-size steps (1 = plain EDM)', metavar='FLOAT', type=click.FloatRange(0, 1), default=D.real_p, show_default=True)
@click.option('--train_on_latents', '--train-on-latents', 'train_on_latents', help='Train on Stable Diffusion VAE latents', metavar='BOOL', type=bool, default=D.train_on_latents, show_default=True)
@click.option('--vae', help='VAE for --train_on_latents on raw images  [default: stabilityai/sd-vae-ft-ema]', metavar='ID|DIR', type=str)
@click.option('--scale_factor', '--scale-factor', 'scale_factor', help=f'Latent scale factor for --train_on_latents on raw images  [default: {latents.DEFAULT_SCALE_FACTOR}]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--progressive', help='Patch sizes in increasing order instead of random', metavar='BOOL', type=bool, default=D.progressive, show_default=True)
@click.option('--implicit_mlp', '--implicit-mlp', 'implicit_mlp', help='1x1-conv MLP on the input and coordinates', metavar='BOOL', type=bool, default=D.implicit_mlp, show_default=True)
@click.option('--pos_freqs', '--pos-freqs', 'pos_freqs', help='Sin/cos frequencies added to the coordinate channels', metavar='INT', type=click.IntRange(min=0), default=D.pos_freqs, show_default=True)
# Hyperparameters.
@click.option('--duration', help='Training duration', metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=D.duration, show_default=True)
@click.option('--batch', help='Total batch size (full images per step)', metavar='INT', type=click.IntRange(min=1), default=D.batch, show_default=True)
@click.option('--batch-gpu', '--batch_gpu', 'batch_gpu', help='Full images per accumulation round and process (a patch step packs up to R/P rounds into one)  [default: --batch / processes]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase', help='Channels of the first resolution (the base the --cres multipliers scale)  [default: 128; adm: 192]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channel multiplier per resolution, e.g. 1,2,2,2  [default: 2,2,2; adm: 1,2,3,4]', metavar='LIST', type=dnnlib.util.IntList())
@click.option('--blocks', help='Residual blocks per resolution  [default: 4; adm: 3]', metavar='INT', type=click.IntRange(min=1))
@click.option('--attn', help='Resolutions with self-attention, e.g. 16 or 32,16 or none  [default: 16; adm: 32,16,8]', metavar='LIST', type=dnnlib.util.IntList())
@click.option('--heads', help='Attention heads of a DiT (dit-s: 6, dit-b: 12, dit-l and dit-xl: 16 when left out)', metavar='INT', type=click.IntRange(min=1))
@click.option('--token-size', '--token_size', 'token_size', help='Side of a DiT\'s tokens in the network\'s pixels (latent pixels for latents; 2 when left out), not the training crop, whose sizes follow --real_p', type=click.Choice(['2', '4', '8']))
@click.option('--lr', help='Learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=D.lr, show_default=True)
@click.option('--P_mean', '--P-mean', 'P_mean', help='EDM loss: mean of ln(sigma)  [default: -1.2]', metavar='FLOAT', type=float)
@click.option('--P_std', '--P-std', 'P_std', help='EDM loss: std of ln(sigma)  [default: 1.2]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--lr-rampup', '--lr_rampup', 'lr_rampup', help='Learning-rate ramp-up', metavar='KIMG', type=click.FloatRange(min=0), default=D.lr_rampup, show_default=True)
@click.option('--ema', help='EMA half-life', metavar='MIMG', type=click.FloatRange(min=0), default=D.ema, show_default=True)
@click.option('--ema-std', '--ema_std', 'ema_std', help='Also keep power-function EMAs of these relative widths, saved with each snapshot, for reconstruct_phema.py (EDM2\'s post-hoc EMA; README: "Post-hoc EMA")', metavar='LIST', type=dnnlib.util.FloatList())
@click.option('--dropout', help='Dropout probability', metavar='FLOAT', type=click.FloatRange(0, 1), default=D.dropout, show_default=True)
@click.option('--augment', help='Augment probability', metavar='FLOAT', type=click.FloatRange(0, 1), default=D.augment, show_default=True)
@click.option('--xflip', help='Enable dataset x-flips', metavar='BOOL', type=bool, default=D.xflip, show_default=True)
@click.option('--label-dropout', '--label_dropout', 'label_dropout', help='Drop class labels with this probability (for --cfg at sampling)', metavar='FLOAT', type=click.FloatRange(0, 1), default=D.label_dropout, show_default=True)
@click.option('--max-size', '--max_size', 'max_size', help='Train on a random subset of N images', metavar='INT', type=click.IntRange(min=1))
# Performance-related.
@click.option('--fp16', help='Run the network in fp16 (CUDA; on CPU it runs in fp32 and says so)', metavar='BOOL', type=bool, default=D.fp16, show_default=True)
@click.option('--bf16', help='bf16 autocast (CUDA and CPU)', metavar='BOOL', type=bool, default=D.bf16, show_default=True)
@click.option('--channels-last', '--channels_last', 'channels_last', help='Network weights and activations in channels-last memory format (measured faster on CPU for the demo network; see docs/PERFORMANCE.md)', metavar='BOOL', type=bool, default=D.channels_last, show_default=True)
@click.option('--compile', help='torch.compile the network: one graph per patch shape, compiled at its first step (CUDA; minutes per shape on CPU)', metavar='BOOL', type=bool, default=D.compile, show_default=True)
@click.option('--ls', help='Loss scaling', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=D.ls, show_default=True)
@click.option('--bench', help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=D.bench, show_default=True)
@click.option('--cache', help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=D.cache, show_default=True)
@click.option('--workers', help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=D.workers, show_default=True)
@click.option('--device', help='cpu, cuda or cuda:N (under torchrun, cuda is each process\'s LOCAL_RANK GPU)  [default: cuda if available, else cpu]', metavar='STR', type=str)
@click.option('--max-minutes', '--max_minutes', 'max_minutes', help='Stop at a step boundary after this many minutes, with a training state, exit status 75 (as on SIGTERM, SIGINT, SIGUSR1); the same command resumes', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--hang-timeout', '--hang_timeout', 'hang_timeout', help='Seconds a rank may wait for the others in a collective before the job ends naming the rank that stopped', metavar='SECONDS', type=click.FloatRange(min=1), default=D.hang_timeout, show_default=True)
@click.option('--snapshot-on-stop', '--snapshot_on_stop', 'snapshot_on_stop', help='Also write a network snapshot (with samples and metrics) when stopped early', metavar='BOOL', type=bool, default=D.snapshot_on_stop, show_default=True)
@click.option('--accept-changed-data', '--accept_changed_data', 'accept_changed_data', help='Resume even if the dataset\'s files changed since the training state was written', metavar='BOOL', type=bool, default=D.accept_changed_data, show_default=True)
@click.option('--max-bad-steps', '--max_bad_steps', 'max_bad_steps', help='Stop at the end of a tick once more than N steps had non-finite gradients (they are skipped)', metavar='INT', type=click.IntRange(min=0), default=D.max_bad_steps, show_default=True)
# I/O-related.
@click.option('--desc', help='String to include in result dir name', metavar='STR', type=str)
@click.option('--nosubdir', help='Do not create a subdirectory for results', is_flag=True)
@click.option('--tick', help='How often to print progress', metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=D.tick, show_default=True)
@click.option('--snap', help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=D.snap, show_default=True)
@click.option('--dump', help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=D.dump, show_default=True)
@click.option('--snapshot-format', '--snapshot_format', 'snapshot_format', help='Snapshot files: EDM\'s pickles, .safetensors (no code inside) or both', type=click.Choice(['pkl', 'safetensors', 'both']), default=D.snapshot_format, show_default=True)
@click.option('--samples', help='Images in the samples-NNNNNN.png grid at each snapshot (0 = off)', metavar='INT', type=click.IntRange(min=0), default=D.samples, show_default=True)
@click.option('--metrics', help='Metrics to compute at each snapshot, comma-separated: fid, fd_dinov2 (README: "FD-DINOv2")', metavar='LIST', type=dnnlib.util.ChoiceList(metrics.METRICS))
@click.option('--metric-ref', '--metric_ref', 'metric_ref', help='Reference statistics for --metrics (from fid.py ref), one per metric, comma-separated in the same order', metavar='NPZ|URL[,...]', type=str)
@click.option('--metric-dinov2', '--metric_dinov2', 'metric_dinov2', help=f'DINOv2 model of --metrics=fd_dinov2: a Hugging Face Hub id or a folder written by save_pretrained (offline machines)  [default: {dinov2.DEFAULT_MODEL}]', metavar='ID|DIR', type=str)
@click.option('--metric-num', '--metric_num', 'metric_num', help='Images generated for --metrics', metavar='INT', type=click.IntRange(min=2), default=D.metric_num, show_default=True)
@click.option('--seed', help='Random seed  [default: random; a resumed run keeps its own]', metavar='INT', type=click.IntRange(min=0))
@click.option('--transfer', help='Transfer learning from a network snapshot: a path, an http(s) URL or a Hugging Face Hub file hf://OWNER/REPO/FILE', metavar='PKL|SAFETENSORS|URL', type=str)
@click.option('--resume', help='Resume from this training state (training-state-*.pt) in a new run folder; without it, the same command resumes its own run', metavar='PT', type=str)
@click.option('-n', '--dry-run', '--dry_run', 'dry_run', help='Print the resolved options and the run folder, and whether the run would resume, then exit', is_flag=True)
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
    ctx = click.get_current_context()
    typed = {name for name in kwargs if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    opts = dnnlib.EasyDict(presets.apply_preset(kwargs.pop('preset'), kwargs, typed))
    try:
        device = dist.init(opts.device)
    except RuntimeError as err:
        raise ValueError(f'--device={opts.device}: {err}') from None
    failure, trace, stopped = None, None, False
    try:
        train(opts, device)
    except stopping.Stopped:
        stopped = True
    except Exception as err:   # reported after shutdown: a live traceback would keep DDP alive past it
        failure = click.ClickException(failure_message(err))
        trace = traceback.format_exc() if dnnlib.util.debug_requested() else None
    gc.collect()   # free DDP (its reference cycles hold the process group) before the group goes
    dist.shutdown()
    if stopped:
        sys.exit(stopping.EXIT_STOPPED)
    if failure is not None:
        if trace:
            sys.stderr.write(trace)
        raise failure


def failure_message(err):
    """The one-line message of an error that stopped training."""
    if isinstance(err, click.ClickException):
        return err.format_message()
    if isinstance(err, stopping.HungRank):
        return dnnlib.util.one_line(err)
    if isinstance(err, RuntimeError) and dist.get_world_size() > 1:
        return (f'{dnnlib.util.one_line(err)} -- with several processes this usually means that another process '
                f'of the run failed or was killed (its output says why); torchrun --max-restarts, or running the '
                f'same command again, resumes from the newest training state')
    return dnnlib.util.error_line(err)


def train(opts, device):
    """Everything of main() after the process group is up: resolve the
    options, pick or resume the run folder, check the input files, train."""
    cli = dnnlib.EasyDict({key: opts.pop(key) for key in _CLI_ONLY})
    opts.device = str(device)
    try:
        dataset = open_dataset(dict(class_name=dataset_class_name(opts.data), path=opts.data, use_labels=opts.cond,
                                    max_size=opts.max_size, xflip=opts.xflip, cache=False))
    except (OSError, ValueError) as err:
        raise ValueError(f'--data={opts.data}: {err}') from None
    seed_given = opts.seed is not None
    if not seed_given:
        opts.seed = dist.broadcast_object(int(torch.randint(1 << 31, size=[]).item()))
    c = config.build_config(opts, dataset)

    # Where to write, and whether to resume.
    resumed, note = None, None
    if cli.resume:
        if not os.path.isfile(cli.resume):
            raise ValueError(f'--resume: no such file {cli.resume}')
        c.resume_state = cli.resume
    else:   # a dry run looks too: it shows what the command would do
        resumed, note = dist.broadcast_object(runs.find_resumable_run(cli.outdir, c, seed_given, cli.nosubdir)
                                              if dist.get_rank() == 0 else None)
    if resumed is not None:
        c.run_dir, c.resume_state, c.seed = resumed.run_dir, resumed.state, resumed.seed
    elif cli.nosubdir:
        c.run_dir = cli.outdir
    else:
        desc = config.run_description(dict(opts, desc=cli.desc), dataset, dist.get_world_size())
        c.run_dir = dist.broadcast_object(runs.next_run_dir(cli.outdir, desc) if dist.get_rank() == 0 else None)

    print_options(c, opts, device)
    if note is not None:
        dist.print0(f'Note: {note}; starting a new run.')
    if resumed is not None and resumed.state is not None:
        dist.print0(f'Resuming run {c.run_dir} from {c.resume_state} (same command, same --outdir).')
    elif resumed is not None:
        dist.print0(f'Restarting run {c.run_dir} from the beginning: it has no training state yet.')
    if resumed is not None and resumed.changed:
        dist.print0(f'Continuing with changed options: {runs.describe_differences(resumed.changed)}.')
    fp16_note = None
    if opts.fp16 and not config.fp16_applies(device):
        fp16_note = (f'Note: --fp16=1 has no effect on {device}: the network runs in fp32 there (--bf16=1 is '
                     f'reduced precision on CPU too).')
        dist.print0(fp16_note)
    if cli.dry_run:
        dist.print0('Dry run; exiting.')
        return

    check_input_files(opts, cli.resume)
    new_folders = [d for d in dict.fromkeys([c.run_dir, cli.outdir]) if not os.path.isdir(d)]
    write_options = resumed is None or bool(resumed.changed)
    logger = dist.run_on_rank0(lambda: runs.prepare_run_dir(c, write_options))
    if fp16_note is not None:
        dist.print0(fp16_note)   # again, now that the console goes to log.txt too
    failed = True
    try:
        training_loop(**c)
        failed = False
    except stopping.Stopped as stop:   # a signal or --max-minutes: the state is saved
        failed = False
        dist.print0(str(stop))   # before the log closes
        raise
    finally:
        if logger is not None:
            logger.close()
            if failed and new_folders:
                runs.remove_if_nothing_saved(new_folders)


def print_options(c, opts, device):
    """The resolved options and a summary, as EDM prints them (rank 0)."""
    dist.print0()
    dist.print0('Training options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Output directory:        {c.run_dir}')
    dist.print0(f'Dataset path:            {c.dataset_kwargs.path}')
    dist.print0(f'Class-conditional:       {c.dataset_kwargs.use_labels}')
    dist.print0(f'Network architecture:    {opts.arch}')
    dist.print0(f'Preconditioning & loss:  {opts.precond}')
    dist.print0(f'Patch share (real_p):    {opts.real_p:g}{", progressive" if opts.progressive else ""}')
    dist.print0(f'Number of processes:     {dist.get_world_size()} on {device}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0()


def check_input_files(opts, resume):
    """Read --metric-ref, --metric-dinov2, --resume and --transfer once before
    anything is written: a truncated or wrong file is an error now, not after
    the run folder exists. (--transfer is loaded again by the training loop.)"""
    for metric, ref in (config.metric_refs(opts) if opts.metrics else {}).items():
        try:
            metrics.load_ref(ref, metric)
        except (ValueError, OSError) as err:
            raise ValueError(f'--metric-ref: {err}') from None
    if 'fd_dinov2' in (opts.metrics or ()):   # loaded once per process: the training loop uses this one
        try:
            metrics.metric_detector('fd_dinov2', opts.metric_dinov2, opts.device)
        except ValueError as err:
            raise ValueError(f'--metric-dinov2: {err}') from None

    def check():
        for flag, value, load in (('--resume', resume, lambda path: runs.load_state(path, mmap=True)),
                                  ('--transfer', opts.transfer, snapshots.load_network)):
            if value:
                try:
                    load(value)
                except ValueError as err:
                    raise ValueError(f'{flag}: {err}') from None
    dist.run_on_rank0(check)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
