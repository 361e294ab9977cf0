"""Reconstruct an EMA of any width after training, from the power-function
EMAs that `train.py --ema-std=...` saved with each snapshot (EDM2's post-hoc
EMA; docs/DESIGN.md section 7). Each result is a normal network snapshot
that generate.py samples and fid.py scores.

    python reconstruct_phema.py --indir=training-runs/00000-demo --outdir=phema --outstd=0.05,0.075,0.1

A thin command line around training.phema.reconstruct.
"""

import click

import dnnlib
from training import phema, snapshots


@click.command(context_settings=dict(max_content_width=110))
@click.option('--indir', help='Run folder of a training with --ema-std (its network-snapshot-NNNNNN-STD.pkl files)', metavar='DIR', type=str, required=True)
@click.option('--outdir', help='Where to write the reconstructed snapshots (phema-NNNNNN-STD.pkl)', metavar='DIR', type=str, required=True)
@click.option('--outstd', help='Relative widths of power-function EMAs to reconstruct, e.g. 0.05,0.075,0.1', metavar='LIST', type=dnnlib.util.FloatList())
@click.option('--outema', help='Half-lives of classic EMAs to reconstruct, with the run\'s ramp-up (as train.py --ema), e.g. 0.5', metavar='MIMG', type=dnnlib.util.FloatList())
@click.option('--outkimg', help='Reconstruct at the newest snapshot at or before this many kimg  [default: the newest]', metavar='KIMG', type=click.IntRange(min=0))
@click.option('--snapshot-format', '--snapshot_format', 'snapshot_format', help='Files to write: EDM\'s pickles, .safetensors (no code inside) or both', type=click.Choice(list(snapshots.SNAPSHOT_FORMATS)), default='pkl', show_default=True)
@dnnlib.util.debug_option
@dnnlib.util.cli_errors
def main(indir, outdir, outstd, outema, outkimg, snapshot_format):
    """Reconstruct EMAs from a run's power-EMA snapshots (post-hoc EMA).

    Training with --ema-std=0.05,0.10 saves, besides each
    network-snapshot-NNNNNN.pkl, one snapshot per width. This finds the
    combination of them whose averaging profile is nearest (least squares)
    to the profile of the EMA you ask for, and writes it as a snapshot. The
    relative error of that profile fit is printed: 0 for a width that was
    tracked, about 1e-3 to 1e-2 for widths between and near the tracked ones
    (docs/DESIGN.md section 7).

    \b
    # Three widths and the classic 0.5-Mimg half-life, at the end of training
    python reconstruct_phema.py --indir=training-runs/00000-demo --outdir=phema \\
        --outstd=0.05,0.075,0.1 --outema=0.5
    python generate.py --network=phema/phema-000200-0.075.pkl --outdir=out --seeds=0-63
    """
    paths = phema.reconstruct(indir, outdir, stds=outstd or (), halflives_kimg=[v * 1000 for v in outema or ()],
                              kimg=outkimg, snapshot_format=snapshot_format)
    for path in paths:
        click.echo(f'Wrote {path}')


if __name__ == '__main__':
    main()
