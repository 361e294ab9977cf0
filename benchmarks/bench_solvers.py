"""Sample quality against network evaluations (NFE) for each solver of
generate.py, on a trained network.

For each solver and NFE it samples the same seeds and measures (a) the RMSE,
in 8-bit levels, of the images against those of a high-step reference (EDM's
Heun sampler with --ref-steps steps, the same seeds: the ODE's solution up to
rounding), and (b) the Frechet distance of the images to the dataset in the
features of a small shape classifier (quality_vs_time.py's, NOT
Inception-FID; --detector reuses a saved one). Steps per NFE: Heun takes
2N - 1 evaluations for N steps (odd NFEs only), Euler and the multistep
solvers N.

    python benchmarks/bench_solvers.py --network=demo-run/00000-.../network-snapshot-000070.pkl \\
        --data=datasets/demo-shapes-32x32.zip --seeds=256 --nfe=5,7,9,11,15,19,25,35

The SDE solver's error against the ODE reference measures its noise as much
as its accuracy; its FD is the comparable number. Prints a line per point
and a JSON summary last.
"""

import os
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as common  # noqa: E402
import quality_vs_time as qvt  # noqa: E402
from evaluation import metrics  # noqa: E402
from training import generation, samplers, snapshots  # noqa: E402
from training.dataset import ImageFolderDataset  # noqa: E402

SOLVERS = ('heun', 'euler') + samplers.MULTISTEP_SOLVERS


def sampler_settings(solver, nfe):
    """generate.py's settings for `solver` at `nfe` evaluations per image, or None
    where the solver cannot spend exactly that many (Heun: odd NFE only)."""
    if solver == 'heun':
        return None if nfe % 2 == 0 else dict(num_steps=(nfe + 1) // 2)   # EDM's sampler, the default
    return dict(num_steps=nfe, solver=solver)


def sample(net, seeds, batch, **settings):
    """uint8 [N, C, H, W] of `seeds`, on the CPU."""
    return torch.cat([images.cpu() for _, images in generation.generate_images(net, seeds, batch, device='cpu',
                                                                                **settings)])


@click.command()
@click.option('--network', 'network_path', required=True, metavar='PKL', help='A trained network snapshot')
@click.option('--data', required=True, metavar='ZIP', help='Its labelled dataset (the FD reference)')
@click.option('--seeds', type=click.IntRange(min=2), default=256, show_default=True, help='Images per point')
@click.option('--nfe', default='5,7,9,11,15,19,25,35', show_default=True, help='Evaluations per image')
@click.option('--solvers', default=','.join(SOLVERS), show_default=True)
@click.option('--ref-steps', type=click.IntRange(min=2), default=256, show_default=True,
              help='Steps of the Heun reference')
@click.option('--batch', type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--detector', 'detector_path', metavar='PT', help='A saved shape classifier  [default: train one]')
@click.option('--threads', type=click.IntRange(min=1), default=2, show_default=True)
@click.option('--json', 'json_path', metavar='PATH', help='Also write the summary here')
def main(network_path, data, seeds, nfe, solvers, ref_steps, batch, detector_path, threads, json_path):
    """Image error and FD against NFE for each solver."""
    common.set_threads(threads)
    start = time.time()
    nfes = [int(v) for v in nfe.split(',')]
    solvers = solvers.split(',')
    unknown = sorted(set(solvers) - set(SOLVERS))
    if unknown:
        raise click.BadParameter(f'unknown solver(s) {", ".join(unknown)}; choose from {", ".join(SOLVERS)}',
                                 param_hint='--solvers')
    net, _ = snapshots.load_network(network_path)
    net = net.eval().requires_grad_(False)
    labelled = ImageFolderDataset(data, use_labels=True)
    images, labels = qvt.load_labelled(labelled)
    with tempfile.TemporaryDirectory(prefix='bench-solvers-') as workdir:
        accuracy = None
        if detector_path is None:
            model, accuracy = qvt.train_classifier(images, labels, labelled.label_dim)
            detector_path = os.path.join(workdir, 'shape-classifier.pt')
            qvt.save_detector(model, detector_path)
        detector = metrics.load_detector(detector_path, 'cpu')
        mu_ref, sigma_ref = qvt.image_stats(images, detector, 'cpu')

        def fd(samples):
            return float(metrics.frechet_distance(*qvt.image_stats(samples, detector, 'cpu'), mu_ref, sigma_ref))

        seed_list = list(range(seeds))
        reference = sample(net, seed_list, batch, num_steps=ref_steps)
        ref_fd = fd(reference)
        print(f'reference: Heun, {ref_steps} steps ({2 * ref_steps - 1} NFE): FD {ref_fd:.4f}', flush=True)
        points = []
        for solver in solvers:
            for n in nfes:
                settings = sampler_settings(solver, n)
                if settings is None:
                    continue
                t0 = time.time()
                images_n = sample(net, seed_list, batch, **settings)
                rmse = float((images_n.double() - reference.double()).square().mean().sqrt())
                point = dict(solver=solver, nfe=n, steps=settings['num_steps'], rmse=rmse, fd=fd(images_n),
                             seconds=round(time.time() - t0, 1))
                points.append(point)
                print(f'{solver:>12s} NFE {n:3d} ({point["steps"]} steps): RMSE {rmse:6.2f} levels, '
                      f'FD {point["fd"]:.4f}', flush=True)
    summary = dict(network=network_path, seeds=seeds, ref_steps=ref_steps, ref_fd=ref_fd,
                   detector_accuracy=accuracy, points=points, total_s=round(time.time() - start, 1),
                   metric='Frechet distance in the features of a small shape classifier (not Inception-FID)')
    summary.update(common.machine_info(torch.device('cpu')))
    common.emit_summary(summary, json_path)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
