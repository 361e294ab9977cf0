"""This code's EDM2 network, loss, training step and sampling against EDM2's
own code (github.com/NVlabs/edm2), which the user provides:

    python benchmarks/check_vs_edm2.py --edm2=DIR

DIR is a checkout of EDM2; this project contains none of its code. EDM2's
side runs in processes of its own with DIR as their import path
(benchmarks/edm2_side.py, ours, calls EDM2's functions), so EDM2's
`training`, `torch_utils` and `dnnlib` never meet ours. On the CPU, tiny
sizes (a 16x16 RGB network of 5 classes, cbase 16, 2 levels, attention at 8):

1. network    EDM2's Precond with seeded weights (its zero-initialised gains
              set to random values, so every layer counts) and our
              EDM2Precond with the same weights (EDM2's `unet.` is our
              `model.`): D(x; sigma) and the log-variance on fixed inputs;
2. training   ten steps from those weights on the same batches and noise
              draws: EDM2's EDM2Loss, loss.sum() / batch, its learning-rate
              schedule, zeroed non-finite gradients, Adam (0.9, 0.99); ours:
              training.loss.EDM2Loss and Trainer.learning_rate: the losses
              and the weights after each step;
3. sampling   EDM2's generate_images() on an EDM2 snapshot (float16 ema,
              StandardRGBEncoder), plain, with a guide network (--guidance
              1.5) and with churn (S_churn 10), against our generate.py on the same files:
              the largest difference of the PNGs in levels (1 LSB = 1);
4. our files  snapshots of our EDM2Precond (no coordinates), written by
              training.snapshots.save_snapshot, sampled by EDM2's
              generate_images() and by our generate.py: the pixel network of
              1., and an 8x8x4 latent network decoded by its encoder entry
              with a tiny randomly initialised VAE (no download).

Prints one line per check and the JSON summary last (--json also writes it).
Exit status 1 if a check exceeds its limit (network and training: 1e-5
relative; sampling: 1 level).
"""

import json
import os
import subprocess
import sys
import tempfile
import types

import click
import numpy as np
import PIL.Image
import torch

import bench_common as common
from training import latents, snapshots
from training.architectures import build_network
from training.loss import EDM2Loss
from training.training_loop import Trainer

SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'edm2_side.py')
REQUIRED_FILES = ('generate_images.py', 'training/networks_edm2.py', 'training/encoders.py',
                  'training/training_loop.py', 'torch_utils/persistence.py')
CONFIG = dict(resolution=16, channels=3, label_dim=5,
              unet=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8]),
              sigmas=[0.002, 0.05, 0.3, 2.0, 15.0, 80.0], batch=4, steps=10, P_mean=-0.4, P_std=1.0, lr=1e-2,
              decay=5, rampup_Mimg=2e-5, seeds=list(range(8)), num_steps=12)
RELATIVE_LIMIT = 1e-5


def edm2_side(edm2_dir, workdir, *args):
    """Run benchmarks/edm2_side.py with EDM2's checkout as the only import path of the project's names."""
    env = dict(os.environ, PYTHONPATH=edm2_dir, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'))
    result = subprocess.run([sys.executable, SIDE, workdir, json.dumps(CONFIG), *args], cwd=edm2_dir, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise click.ClickException(f'EDM2\'s side failed ({" ".join(args[:1])}):\n{result.stderr[-3000:]}')


def our_generate(network, outdir, gnet=None, guidance=1, S_churn=0):
    command = [sys.executable, os.path.join(common.REPO_ROOT, 'generate.py'), f'--network={network}',
               f'--outdir={outdir}', f'--seeds=0-{len(CONFIG["seeds"]) - 1}', f'--steps={CONFIG["num_steps"]}',
               f'--S_churn={S_churn}', '--device=cpu']
    if gnet is not None:
        command += [f'--gnet={gnet}', f'--guidance={guidance}']
    result = subprocess.run(command, cwd=common.REPO_ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=common.REPO_ROOT))
    if result.returncode:
        raise click.ClickException(f'our generate.py failed:\n{result.stdout[-2000:]}{result.stderr[-2000:]}')


def tiny_vae():
    """A randomly initialised AutoencoderKL (2x downsampling, 4 latent channels) built from a config."""
    import diffusers
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 2,
                                   up_block_types=('UpDecoderBlock2D',) * 2, block_out_channels=(32, 32),
                                   layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=16)


def png_difference(dir_a, dir_b):
    """(largest difference in levels, pixels that differ) over the seeds' PNGs of two folders."""
    worst, differing = 0, 0
    for seed in CONFIG['seeds']:
        a, b = (np.asarray(PIL.Image.open(os.path.join(d, f'{seed:06d}.png')), dtype=np.int16) for d in (dir_a, dir_b))
        worst, differing = max(worst, int(np.abs(a - b).max())), differing + int((a != b).sum())
    return worst, differing


def relative(ours, theirs):
    return float((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1e-12))


def ours_from(state):
    """Our EDM2Precond of CONFIG with EDM2's weights `state` (EDM2's `unet.` -> our `model.`)."""
    kwargs = dict(precond='edm2', model_type='EDM2UNet', use_pos=False, use_fp16=False, dropout=0, **CONFIG['unet'])
    net = build_network(kwargs, CONFIG['resolution'], CONFIG['channels'], CONFIG['label_dim'])
    missing, unexpected = net.load_state_dict(ours_names(state), strict=False)
    if missing or unexpected:
        raise click.ClickException(f'EDM2\'s weights do not map onto ours: missing {missing}, unexpected {unexpected}')
    return net


def ours_names(state):
    return {('model.' + name[len('unet.'):] if name.startswith('unet.') else name): value
            for name, value in state.items()}


def check_training(net, reference):
    """Our loss and learning rate, ten steps, the draws of EDM2's side: (worst loss, worst weight) relative."""
    loss_fn = EDM2Loss(P_mean=CONFIG['P_mean'], P_std=CONFIG['P_std'])
    optimizer = torch.optim.Adam(net.parameters(), betas=(0.9, 0.99), eps=1e-8)
    schedule = types.SimpleNamespace(base_lr=CONFIG['lr'], lr_decay_batches=CONFIG['decay'],
                                     batch_size=CONFIG['batch'], lr_rampup_kimg=CONFIG['rampup_Mimg'] * 1000)
    worst_loss, worst_weight = 0.0, 0.0
    net.train()
    for step, (images, labels) in enumerate(reference['batches']):
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(1000 + step)
        loss = loss_fn(net, images, labels=labels)
        loss.sum().mul(1 / CONFIG['batch']).backward()
        for group in optimizer.param_groups:
            group['lr'] = Trainer.learning_rate(schedule, step * CONFIG['batch'])
        optimizer.step()
        worst_loss = max(worst_loss, relative(loss.detach(), reference['losses'][step]))
        theirs = ours_names(reference['weights'][step])
        ours = net.state_dict()
        worst_weight = max(worst_weight, max(relative(ours[name], value) for name, value in theirs.items()))
    return worst_loss, worst_weight


@click.command()
@click.option('--edm2', 'edm2_dir', metavar='DIR', required=True, help='A checkout of github.com/NVlabs/edm2')
@click.option('--json', 'json_path', metavar='PATH', type=str, help='Also write the JSON summary to this file')
def main(edm2_dir, json_path):
    """This code's EDM2 network, training step and sampling against EDM2's own code."""
    edm2_dir = os.path.abspath(edm2_dir)
    missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(edm2_dir, name))]
    if missing:
        raise click.ClickException(f'--edm2={edm2_dir} does not look like a checkout of EDM2 '
                                   f'(github.com/NVlabs/edm2): {", ".join(missing)} missing')
    torch.set_num_threads(1)
    summary = dict(machine=common.describe_machine(common.machine_info(torch.device('cpu'))), config=CONFIG)
    with tempfile.TemporaryDirectory(prefix='check-vs-edm2-') as work:
        edm2_side(edm2_dir, work, 'build')
        reference = torch.load(os.path.join(work, 'edm2-reference.pt'), weights_only=False)
        net = ours_from(torch.load(os.path.join(work, 'edm2-state.pt'))).eval()
        with torch.no_grad():
            D, logvar = net(reference['x'], reference['sigma'], reference['labels'], return_logvar=True)
        summary['network'] = dict(D=relative(D, reference['D']), logvar=relative(logvar, reference['logvar']))
        print(f'network: D relative difference {summary["network"]["D"]:.3g}, log-variance '
              f'{summary["network"]["logvar"]:.3g}', flush=True)
        worst_loss, worst_weight = check_training(net, reference)
        summary['training'] = dict(loss=worst_loss, weights=worst_weight)
        print(f'training: {CONFIG["steps"]} steps, losses within {worst_loss:.3g}, weights within '
              f'{worst_weight:.3g} (relative)', flush=True)

        # Sampling EDM2's files, and ours, with both codes.
        ours_pkl = os.path.join(work, 'ours-net.pkl')
        snapshots.save_snapshot(ours_pkl, ours_from(torch.load(os.path.join(work, 'edm2-state.pt'))).eval(),
                                loss_fn=None, augment_pipe=None, dataset_kwargs={})
        # Our latent snapshot: its LatentVAEEncoder decodes with a tiny VAE made here (no download).
        vae_dir = os.path.join(work, 'vae')
        tiny_vae().save_pretrained(vae_dir)
        torch.manual_seed(2)
        latent_net = build_network(dict(precond='edm2', model_type='EDM2UNet', use_pos=False, use_fp16=False,
                                        dropout=0, **CONFIG['unet']), 8, 4, 0).eval()
        with torch.no_grad():
            for param in latent_net.parameters():
                if param.ndim == 0:
                    param.copy_(torch.rand([]) + 0.3)
        snapshots.save_snapshot(os.path.join(work, 'ours-latent.pkl'), latent_net, loss_fn=None, augment_pipe=None,
                                dataset_kwargs={}, extra=dict(latent=latents.latent_info(vae_dir, 0.5, 16, 4, 8)))
        cases = [('edm2 pickle', 'edm2-net.pkl', None, 1, 0),
                 ('edm2 pickle, guided', 'edm2-net.pkl', 'edm2-gnet.pkl', 1.5, 0),
                 ('edm2 pickle, S_churn 10', 'edm2-net.pkl', None, 1, 10),
                 ('our pickle', 'ours-net.pkl', None, 1, 0),
                 ('our latent pickle (tiny VAE)', 'ours-latent.pkl', None, 1, 0)]
        summary['sampling'] = {}
        for label, net_name, gnet_name, guidance, S_churn in cases:
            case = len(summary['sampling'])
            theirs_dir, ours_dir = (os.path.join(work, f'{side}-{case}') for side in ('edm2', 'ours'))
            gnet = None if gnet_name is None else os.path.join(work, gnet_name)
            edm2_side(edm2_dir, work, 'generate', os.path.join(work, net_name), gnet or '-', str(guidance), theirs_dir,
                      str(S_churn))
            our_generate(os.path.join(work, net_name), ours_dir, gnet, guidance, S_churn)
            worst, differing = png_difference(theirs_dir, ours_dir)
            summary['sampling'][label] = dict(levels=worst, pixels_differing=differing)
            print(f'sampling, {label}: {len(CONFIG["seeds"])} images of {CONFIG["num_steps"]} steps, largest '
                  f'difference {worst} level(s), {differing} pixel values differ', flush=True)
    summary['pass'] = bool(max(summary['network'].values()) <= RELATIVE_LIMIT
                           and max(summary['training'].values()) <= RELATIVE_LIMIT
                           and all(case['levels'] <= 1 for case in summary['sampling'].values()))
    common.emit_summary(summary, json_path)
    sys.exit(0 if summary['pass'] else 1)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
