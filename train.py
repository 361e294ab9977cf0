"""Train a Patch Diffusion model (EDM's train.py flags plus the official
Patch Diffusion ones).

    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/celeba-64x64.zip --cond=0 --arch=ddpmpp --batch=256 \\
        --cres=1,2,2,2 --lr=2e-4 --dropout=0.05 --augment=0 --real_p=0.5

Running the same command again with the same --outdir resumes the newest
training state of the latest run folder with the same options and --desc. The flags
are the table training.flags.FLAGS, the options are resolved by
training.config, the run folder and what it resumes are chosen by
training.runs.choose_run, and the training itself is training.training_loop.
"""

import gc
import json
import os
import sys
import traceback

import click
import torch

import dnnlib
from evaluation import metrics
from torch_utils import distributed as dist
from training import config, flags, presets, runs, snapshots, stopping
from training.dataset import dataset_class_name, open_dataset
from training.training_loop import training_loop


@click.command(context_settings=dict(max_content_width=110))
@flags.click_options   # every flag: training.flags.FLAGS
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
    cli = dnnlib.EasyDict({flag.name: kwargs.pop(flag.name) for flag in flags.FLAGS if flag.cli_only})
    opts = dnnlib.EasyDict(presets.apply_preset(cli.preset, kwargs, typed))
    try:
        device = dist.init(opts.device)
    except RuntimeError as err:
        raise ValueError(f'--device={opts.device}: {err}') from None
    failure, trace, stopped = None, None, False
    try:
        train(opts, cli, device)
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


def train(opts, cli, device):
    """Everything of main() after the process group is up: resolve the
    options, pick or resume the run folder, check the input files, train.
    opts: the training options' values; cli: those of the other flags."""
    opts.device = str(device)
    try:
        dataset = open_dataset(dict(class_name=dataset_class_name(opts.data), path=opts.data, use_labels=opts.cond,
                                    max_size=opts.max_size, xflip=opts.xflip, cache=False))
    except (OSError, ValueError) as err:
        raise ValueError(f'--data={opts.data}: {err}') from None
    if cli.resume and opts.transfer:
        raise ValueError('--transfer and --resume are exclusive: a training state holds its own weights')
    seed_given = opts.seed is not None
    if not seed_given and not cli.dry_run:   # a dry run leaves it to the run, which records it
        opts.seed = dist.broadcast_object(int(torch.randint(1 << 31, size=[]).item()))
    c = config.build_config(opts, dataset)

    # Where to write, and whether to resume (a dry run looks too: it shows what the command would do).
    desc = config.run_description(dict(opts, desc=cli.desc), dataset, dist.get_world_size())
    run = dist.broadcast_object(dist.run_on_rank0(
        lambda: runs.choose_run(cli.outdir, c, desc, cli.resume, cli.nosubdir, seed_given, cli.desc)))
    c.run_dir, c.seed = run.run_dir, run.seed
    if run.resume_state is not None:
        c.resume_state = run.resume_state

    print_options(c, opts, device)
    for line in runs.describe_run(run):
        dist.print0(line)
    fp16_note = None
    if opts.fp16 and not config.fp16_applies(device):
        fp16_note = (f'Note: --fp16=1 has no effect on {device}: the network runs in fp32 there (--bf16=1 is '
                     f'reduced precision on CPU too).')
        dist.print0(fp16_note)
    if cli.dry_run:
        print_plan(c, dataset)
        dist.print0('Dry run; exiting.')
        return
    if run.complete_kimg is not None:
        return

    check_input_files(opts)
    new_folders = [d for d in dict.fromkeys([c.run_dir, cli.outdir]) if not os.path.isdir(d)]
    write_options = not run.continues or bool(run.changed)
    logger = dist.run_on_rank0(lambda: runs.prepare_run_dir(c, write_options, None if cli.nosubdir else cli.desc))
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
    precond = c.network_kwargs.precond
    dist.print0(f'Preconditioning & loss:  {precond}' + (' (learned loss weighting)' if precond == 'edm2' else ''))
    dist.print0(f'Patch share (real_p):    {opts.real_p:g}{", progressive" if opts.progressive else ""}')
    dist.print0(f'Number of processes:     {dist.get_world_size()} on {device}')
    dist.print0(f'Batch size:              {c.batch_size}')
    dist.print0()


def print_plan(c, dataset):
    """The dry run's patch plan: the line the training loop prints when it starts."""
    schedule = config.patch_schedule(c, dataset)
    if schedule is None:
        dist.print0('Patch sizes: set once the VAE is loaded (the latents\' side is the images\' over its factor)')
    else:
        dist.print0(f'Patch sizes: {schedule.describe()}; images per step '
                    f'{c.batch_size * schedule.expected_multiplier:g} on average')
    if c.seed is None:
        dist.print0('Seed: drawn at start (no --seed); the run folder\'s training_options.json records it')


def check_input_files(opts):
    """Read --metric-ref, load the metrics' detectors (--metric-detector,
    --metric-dinov2) and read --transfer once before anything is written: a
    truncated or wrong file, or a detector an offline machine cannot
    download, is an error now, not after the run folder exists. (--transfer
    is loaded again by the training loop; choose_run reads --resume.)"""
    for metric, ref in (config.metric_refs(opts) if opts.metrics else {}).items():
        try:
            metrics.load_ref(ref, metric)
        except (ValueError, OSError) as err:
            raise ValueError(f'--metric-ref: {err}') from None
    for metric, flag, location in (('fid', '--metric-detector', opts.metric_detector),
                                   ('fd_dinov2', '--metric-dinov2', opts.metric_dinov2)):
        if metric in (opts.metrics or ()):   # loaded once per process: the training loop uses this one
            try:
                metrics.metric_detector(metric, location, opts.device)
            except (ValueError, OSError) as err:
                advice = f'cannot load the default; pass a local copy with {flag}=PATH. ' if location is None else ''
                raise ValueError(f'{flag}: {advice}{dnnlib.util.one_line(err)}') from None

    def check():
        if opts.transfer:
            try:
                snapshots.load_network(opts.transfer)
            except ValueError as err:
                raise ValueError(f'--transfer: {err}') from None
    dist.run_on_rank0(check)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
