"""Frechet Inception Distance (FID) of generated images, as EDM's fid.py.

    # Reference statistics of a dataset:
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz

    # FID of 50,000 generated images, on 8 GPUs:
    torchrun --standalone --nproc_per_node=8 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz

The computation is in training/metrics.py; this script parses flags.
"""

import click

import dnnlib
from torch_utils import distributed as dist
from training import metrics


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
        click.option('--batch', help='Images per batch and process', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True),
        click.option('--detector', help='Feature detector, a TorchScript .pt or a network pickle .pkl  [default: EDM\'s Inception-v3, downloaded once into the cache]', metavar='PATH|URL', type=str),
        click.option('--device', help='cpu, cuda or cuda:N (under torchrun, cuda is each process\'s LOCAL_RANK GPU)  [default: cuda if available, else cpu]', metavar='STR', type=str),
        click.option('--workers', help='Data loading processes per process', metavar='INT', type=click.IntRange(min=0), default=3, show_default=True),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group()
@dnnlib.util.debug_option
def main():
    """Calculate the Frechet Inception Distance (FID).

    \b
    Examples:
    # Reference statistics of a dataset
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    \b
    # FID of generated images (any number of processes)
    torchrun --standalone --nproc_per_node=1 fid.py calc --images=out --ref=fid-refs/cifar10-32x32.npz
    """


@main.command()
@click.option('--images', 'image_path', help='Folder or zip of generated images', metavar='PATH|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path', help='Reference statistics (from fid.py ref)', metavar='NPZ|URL', type=str, required=True)
@click.option('--num', 'num_expected', help='Images to use: a random subset (--seed) when more are found; fewer is an error unless --allow-small', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed', help='Seed of the random subset when more than --num images are found', metavar='INT', type=int, default=0, show_default=True)
@click.option('--allow-small', '--allow_small', 'allow_small', help='Use all images found if fewer than --num (quick checks; FID is biased upward)', is_flag=True)
@_common_options
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def calc(**kwargs):
    """Calculate FID of a set of images against reference statistics."""
    _run(_calc, **kwargs)


def _calc(image_path, ref_path, num_expected, seed, allow_small, batch, detector, workers):
    dist.print0(f'Calculating FID of "{image_path}" against "{ref_path}"...')
    fid = metrics.calculate_fid(image_path, ref_path, detector=detector, num=num_expected, seed=seed,
                                allow_small=allow_small, batch_size=batch, num_workers=workers, progress=True)
    dist.print0(f'{fid:g}')


@main.command()
@click.option('--data', 'dataset_path', help='Dataset folder or zip', metavar='PATH|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to save the statistics', metavar='NPZ', type=str, required=True)
@_common_options
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def ref(**kwargs):
    """Calculate reference statistics of a dataset for 'calc'."""
    _run(_ref, **kwargs)


def _ref(dataset_path, dest_path, batch, detector, workers):
    dist.print0('Loading the feature detector...')
    detector_net = metrics.load_detector(detector, dist.get_device())
    dist.print0(f'Loading dataset from "{dataset_path}"...')
    mu, sigma = metrics.calculate_stats_for_folder(dataset_path, detector_net, batch_size=batch, num_workers=workers,
                                                   progress=True)
    if dist.get_rank() == 0:
        print(f'Saving reference statistics to "{dest_path}"...')
        metrics.save_ref(dest_path, mu, sigma)
    dist.barrier()
    dist.print0('Done.')


if __name__ == '__main__':
    main()
