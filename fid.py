"""Frechet Inception Distance (FID) of generated images, as EDM's fid.py, and
FD-DINOv2 (the Frechet distance in DINOv2 ViT-L/14 features), as EDM2 reports it.

    # Reference statistics of a dataset:
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    # FID of 50,000 generated images, on 8 GPUs:
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz

    # Both metrics, one reference file per metric in the order of --metrics:
    python fid.py ref --data=datasets/x.zip --metrics=fid,fd_dinov2 --dest=refs/x.npz,refs/x-dinov2.npz
    python fid.py calc --images=out --metrics=fid,fd_dinov2 --ref=refs/x.npz,refs/x-dinov2.npz

The computation is in evaluation/metrics.py; this script parses flags.
"""

import os

import click

import dnnlib
from evaluation import dinov2, metrics
from torch_utils import distributed as dist


def _run(fn, **kwargs):
    """Set up the processes, run fn, and turn user errors into one-line click errors."""
    device = kwargs.pop('device')
    try:
        try:
            dist.init(device)
        except RuntimeError as err:
            raise ValueError(f'--device={device}: {dnnlib.util.one_line(err)}') from None
        fn(**kwargs)
    except (ValueError, OSError, RuntimeError) as err:
        raise click.ClickException(dnnlib.util.one_line(err)) from None
    finally:
        dist.shutdown()


def _common_options(fn):
    options = [
        click.option('--metrics', 'metric_names', help='Metrics, comma-separated: fid (Inception-v3 features), fd_dinov2 (DINOv2 ViT-L/14 features, EDM2\'s FD-DINOv2)', metavar='LIST', type=dnnlib.util.ChoiceList(metrics.METRICS), default='fid', show_default=True),
        click.option('--batch', help='Images per batch and process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True),
        click.option('--detector', help='FID\'s feature detector, a TorchScript .pt or a network pickle .pkl  [default: EDM\'s Inception-v3, downloaded once into the cache]', metavar='PATH|URL', type=str),
        click.option('--dinov2', 'dinov2_model', help=f'FD-DINOv2\'s model: a Hugging Face Hub id or a folder written by save_pretrained (offline machines)  [default: {dinov2.DEFAULT_MODEL}, downloaded once into the Hub\'s cache]', metavar='ID|DIR', type=str),
        click.option('--device', help='cpu, cuda or cuda:N (under torchrun, cuda is each process\'s LOCAL_RANK GPU)  [default: cuda if available, else cpu]', metavar='STR', type=str),
        click.option('--workers', help='Data loading processes per process: 3, or fewer to leave each process one of this machine\'s CPUs', metavar='INT', type=click.IntRange(min=0), default=metrics.DEFAULT_WORKERS, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _detector_locations(metric_names, detector, dinov2_model):
    """{metric: the location of its detector} for the metrics asked for; ValueError for a flag of another metric."""
    locations = {'fid': detector, 'fd_dinov2': dinov2_model}
    for metric, flag in (('fid', '--detector'), ('fd_dinov2', '--dinov2')):
        if locations[metric] is not None and metric not in metric_names:
            raise ValueError(f'{flag} is the detector of --metrics={metric}; add {metric} to --metrics or leave '
                             f'{flag} out')
    return {metric: locations[metric] for metric in metric_names}


@click.group()
@dnnlib.util.debug_option
def main():
    """Calculate the Frechet Inception Distance (FID) and FD-DINOv2.

    \b
    Examples:
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of generated images (any number of processes)
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    \b
    # FID and FD-DINOv2: one reference file per metric, in the order of --metrics
    python fid.py ref --data=datasets/x.zip --metrics=fid,fd_dinov2 --dest=refs/x.npz,refs/x-dinov2.npz
    python fid.py calc --images=out --metrics=fid,fd_dinov2 --ref=refs/x.npz,refs/x-dinov2.npz
    """


@main.command()
@click.option('--images', 'image_path', help='Folder or zip of generated images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (from fid.py ref), one per metric, comma-separated in the order of --metrics', metavar='NPZ|URL[,...]', type=str, required=True)
@click.option('--num', 'num_expected', help='Images to use: a random subset (--seed) when more are found; fewer is an error unless --allow-small', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Seed of the random subset when more than --num images are found', metavar='INT', type=int, default=0, show_default=True)
@click.option('--allow-small', '--allow_small', 'allow_small', help='Use all images found if fewer than --num (quick checks; FID is biased upward)', is_flag=True)
@_common_options
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def calc(**kwargs):
    """Calculate FID or FD-DINOv2 of images against reference statistics.

    With one metric the last line is its value; with several, one line
    'NAME VALUE' per metric.
    """
    _run(_calc, **kwargs)


def _calc(image_path, ref_path, metric_names, num_expected, seed, allow_small, batch, detector, dinov2_model,
          workers):
    refs = metrics.per_metric(metric_names, ref_path, '--ref')
    locations = _detector_locations(metric_names, detector, dinov2_model)
    labels = ' and '.join(metrics.METRICS[metric].label for metric in metric_names)
    dist.print0(f'Calculating {labels} of "{image_path}" against "{ref_path}"...')
    values = metrics.calculate_metrics(image_path, refs, locations, num=num_expected, seed=seed,
                                       allow_small=allow_small, batch_size=batch, num_workers=workers, progress=True)
    for metric, value in values.items():
        dist.print0(f'{value:g}' if len(values) == 1 else f'{metric} {value:g}')


@main.command()
@click.option('--data', 'dataset_path', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to save the statistics: one .npz per metric, comma-separated in the order of --metrics', metavar='NPZ[,...]', type=str, required=True)
@_common_options
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def ref(**kwargs):
    """Calculate reference statistics of a dataset for 'calc'."""
    _run(_ref, **kwargs)


def _ref(dataset_path, dest_path, metric_names, batch, detector, dinov2_model, workers):
    dests = metrics.per_metric(metric_names, dest_path, '--dest')
    if len({os.path.abspath(path) for path in dests.values()}) < len(dests):
        raise ValueError(f'--dest={dest_path} names one file twice; give each metric its own file')
    locations = _detector_locations(metric_names, detector, dinov2_model)
    dist.print0('Loading the feature detectors...' if len(dests) > 1 else 'Loading the feature detector...')
    detectors = {metric: metrics.load_metric_detector(metric, location, dist.get_device())
                 for metric, location in locations.items()}
    dist.print0(f'Loading dataset from "{dataset_path}"...')
    stats = metrics.calculate_stats_for_folder(dataset_path, detectors, batch_size=batch, num_workers=workers,
                                               progress=True)
    if dist.get_rank() == 0:
        names = ', '.join(f'"{path}"' for path in dests.values())
        print(f'Saving reference statistics to {names}...')
        metrics.save_refs(dests, stats, locations)
    dist.barrier()
    dist.print0('Done.')


if __name__ == '__main__':
    main()
