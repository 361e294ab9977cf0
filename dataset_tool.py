"""Make dataset archives (a ZIP or a folder of PNGs plus dataset.json) that
train.py and fid.py read.

    python dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz \\
        --dest=datasets/cifar10-32x32.zip
    python dataset_tool.py convert --source=demo:shapes --dest=datasets/shapes-32x32.zip
    python dataset_tool.py encode --source=datasets/imagenet-256x256.zip \\
        --dest=datasets/imagenet-latents.zip --xflip=1

Without a subcommand the tool runs `convert`, so EDM's invocations keep
working. This file is the command line only: dataset_prep.sources reads the
inputs, dataset_prep.archive writes the archives (their layout: docs/DESIGN.md,
"File formats").
"""


import click

from dataset_prep import demo_data
from dataset_prep.archive import CHANNELS, TRANSFORMS, convert_dataset, encode_dataset
import dnnlib
from training import latents


def parse_resolution(ctx, param, value):
    """Click callback: 'WxH' (or 'W,H', or 'N' for NxN) -> (W, H)."""
    if value is None:
        return None
    try:
        return dnnlib.util.parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from None


def parse_channels(ctx, param, value):
    """Click callback: 'auto' -> None, '1' -> 1, '3' -> 3."""
    return None if value == 'auto' else int(value)


_CONVERT_OPTIONS = [
    click.option('--source', metavar='PATH', type=str, help='Input: folder, .zip, cifar-10-python.tar.gz, '
                 'train-images-idx3-ubyte.gz (or its folder), *_lmdb folder, or demo:shapes[:N]  [required]'),
    click.option('--dest', metavar='PATH', type=str, help='Output: NAME.zip or a new folder  [required]'),
    click.option('--max-images', '--max_images', 'max_images', metavar='INT', type=int,
                 help='Write at most this many images  [default: all]'),
    click.option('--transform', type=click.Choice(TRANSFORMS), help='Crop mode for non-square inputs'),
    click.option('--resolution', metavar='WxH', callback=parse_resolution,
                 help=f'Output size WxH (width x height), e.g. 64x64 or 96x64  [default: the input size; demo:shapes {demo_data.DEFAULT_RESOLUTION}x{demo_data.DEFAULT_RESOLUTION}]'),
    click.option('--channels', type=click.Choice(CHANNELS), default='auto', show_default=True,
                 callback=parse_channels, help='Output channels: 3 = RGB, 1 = grayscale, auto = RGB under '
                 '--transform (as EDM), else grayscale only if every input is'),
]


def convert_options(fn):
    """Decorate a click command with the convert options."""
    for option in reversed(_CONVERT_OPTIONS):
        fn = option(fn)
    return fn


def _run_convert(source, dest, max_images, transform, resolution, channels):
    """Shared body of the default command and `convert`."""
    if source is None:
        raise click.UsageError("Missing option '--source'.")
    if dest is None:
        raise click.UsageError("Missing option '--dest'.")
    count = convert_dataset(source, dest, max_images=max_images, transform=transform, resolution=resolution,
                            channels=channels)
    click.echo(f'Wrote {count} images to {dest}')


@click.group(invoke_without_command=True)
@convert_options
@dnnlib.util.debug_option
@click.pass_context
@dnnlib.util.cli_errors
def cli(ctx, **opts):
    """Make dataset archives for train.py and fid.py.

    Without a subcommand, runs `convert` with the options below, e.g.

    \b
    python dataset_tool.py --source=downloads/afhqv2 --dest=datasets/afhqv2-64x64.zip \\
        --resolution=64x64 --transform=center-crop
    python dataset_tool.py --source=demo:shapes --dest=datasets/shapes-32x32.zip
    """
    if ctx.invoked_subcommand is None:
        _run_convert(**opts)
    elif any(v is not None for v in opts.values()):
        raise click.UsageError(f'put the options after the subcommand: dataset_tool.py {ctx.invoked_subcommand} ...')


@cli.command()
@convert_options
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def convert(**opts):
    """Convert images to a ZIP or folder of PNGs plus dataset.json.

    \b
    Sources (--source):
      path/                      all images below path/, sorted; labels from
                                 path/dataset.json, else from top-level folders
      images.zip                 same, inside a zip
      cifar-10-python.tar.gz     CIFAR-10 training set, with labels
      train-images-idx3-ubyte.gz MNIST (or the folder holding it and
                                 train-labels-idx1-ubyte.gz), padded to 32x32
      lsun/church_lmdb/          LSUN LMDB folder (needs: pip install lmdb)
      demo:shapes[:N]            built-in shapes, N images (default 2000)

    All images must end up the same size, any width and height (train.py
    says which sizes its network can take). Without --transform, images
    are resized to --resolution, which must have their aspect ratio.
    --transform=center-crop cuts the largest centred region of aspect W:H
    and resizes it to WxH (for W = H the largest centred square: EDM's
    pixels); center-crop-wide (EDM's pixels) keeps an input's full width w, cuts
    its centred band of round(W * h / w) of its h rows, resizes that to WxH
    and pads it with black rows to WxW, which distorts: an input of aspect
    W:H and k times that size comes out squeezed k times horizontally.
    Inputs with w < W or wider than about W:H are skipped.

    \b
    Channels (--channels):
      auto  under --transform RGB, as in EDM; without it, grayscale stays
            1 channel unless some input is colour
      3     RGB: grayscale is repeated
      1     grayscale: colour becomes PIL's luma (299 R + 587 G + 114 B) / 1000
    Alpha is dropped and palette images are looked up (EDM fails on RGBA
    and keeps palette indices as gray levels).
    """
    _run_convert(**opts)


@cli.command(short_help='Encode images once with a VAE for latent training.')
@convert_options
@click.option('--vae', metavar='ID|DIR', type=str, default=None,
              help='VAE: Hugging Face hub id or AutoencoderKL.save_pretrained folder  '
                   f'[default: {latents.DEFAULT_VAE}]')
@click.option('--scale-factor', '--scale_factor', 'scale_factor', metavar='FLOAT', type=float, default=None,
              help=f'Latent scale factor recorded for training  [default: {latents.DEFAULT_SCALE_FACTOR}]')
@click.option('--xflip', metavar='BOOL', type=bool, default=False, show_default=True,
              help='Also encode the x-flipped images (for training with --xflip=1)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True,
              help='Images per VAE call')
@click.option('--device', metavar='STR', type=str, default=None,
              help='cpu, cuda or cuda:N  [default: cuda if available, else cpu]')
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def encode(source, dest, **opts):
    """Encode images once with a VAE for latent training (--train_on_latents).

    Reads any --source that convert reads (usually a dataset archive made by
    convert) and writes, per image, the VAE posterior mean and standard
    deviation as .npy, plus dataset.json (labels) and latents.json (the VAE,
    scale factor and shapes). Training draws a new latent from them each
    time. Needs diffusers: pip install -e ".[latent]".

    \b
    python dataset_tool.py encode --source=datasets/imagenet-256x256.zip \\
        --dest=datasets/imagenet-latents.zip --xflip=1
    """
    if source is None:
        raise click.UsageError("Missing option '--source'.")
    if dest is None:
        raise click.UsageError("Missing option '--dest'.")
    count = encode_dataset(source, dest, **opts)
    click.echo(f'Encoded {count} images to {dest}')


if __name__ == '__main__':
    cli()
