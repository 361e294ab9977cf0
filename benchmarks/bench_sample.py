"""Sampling throughput: images/s of training.generation.generate_images (the
code behind generate.py), for a network pickle or a freshly built network.

    python benchmarks/bench_sample.py --preset=cpu-small --steps=18 --batch=8,32 --threads=2
    python benchmarks/bench_sample.py --network=run/network-snapshot-000050.pkl --steps=50 --batch=64

Each round times one block of --num images per batch size; the order of the
batch sizes rotates from round to round, so machine noise hits them alike.
The deterministic EDM sampler (Heun, no churn) calls the network
2 * steps - 1 times per image. The last line on stdout is a one-line JSON
summary.
"""

import os

import click
import torch

import bench_common as common
import dnnlib
from training import denoiser, generation, snapshots
from training.architectures import build_network
from training.networks import resolution_value


def fresh_network(preset, device):
    """The preset's network with its initial weights, in eval mode on `device`."""
    net = build_network(common.network_kwargs(preset), preset.resolution, preset.channels, label_dim=0)
    return net.eval().requires_grad_(False).to(device)


def network_evaluations(steps):
    """Network calls per image of the EDM sampler: 2N - 1 (no correction on the last step)."""
    return 2 * steps - 1


def time_generation(net, num, batch_size, steps, device, first_seed=0):
    """Wall seconds to generate `num` images (seeds first_seed ..) in batches of `batch_size`."""
    def run():
        for _seeds, images in generation.generate_images(net, range(first_seed, first_seed + num), batch_size,
                                                         device=device, num_steps=steps):
            images.cpu()
    return common.timed(run, device)[1]


def measure(net, batch_sizes, num, steps, rounds, warmup, device):
    """{batch size: [seconds per block]} over `rounds` rotating rounds, after
    `warmup` untimed blocks per batch size."""
    for batch_size in batch_sizes:
        for _ in range(warmup):
            time_generation(net, min(num, batch_size), batch_size, steps, device)
    times = {batch_size: [] for batch_size in batch_sizes}
    for round_idx in range(rounds):
        shift = round_idx % len(batch_sizes)
        for batch_size in batch_sizes[shift:] + batch_sizes[:shift]:
            times[batch_size].append(time_generation(net, num, batch_size, steps, device, first_seed=round_idx * num))
    return times


@click.command()
@click.option('--network', 'network_path', metavar='PKL|URL', type=str,
              help='Network pickle  [default: a fresh network of --preset]')
@click.option('--preset', type=click.Choice(sorted(common.PRESETS)), default='cpu-small', show_default=True,
              help='Network to build when no --network is given')
@click.option('--steps', metavar='INT', type=click.IntRange(min=1), default=18, show_default=True,
              help='Sampler steps N')
@click.option('--batch', 'batch_sizes', metavar='LIST', type=dnnlib.util.IntList(), default='16', show_default=True,
              help='Batch sizes to compare, e.g. 8,32')
@click.option('--num', metavar='INT', type=click.IntRange(min=1),
              help='Images per timed block  [default: the largest batch size]')
@click.option('--rounds', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--warmup', metavar='INT', type=click.IntRange(min=0), default=1, show_default=True,
              help='Untimed batches per batch size')
@click.option('--device', 'device_name', metavar='STR', help='cpu, cuda or cuda:N  [default: cuda if available]')
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), help='torch CPU threads  [default: torch\'s]')
@click.option('--json', 'json_path', metavar='PATH', type=str, help='Also write the JSON summary to this file')
def main(network_path, preset, steps, batch_sizes, num, rounds, warmup, device_name, threads, json_path):
    """Images per second of the EDM sampler."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise click.BadParameter('give positive batch sizes, e.g. 8,32', param_hint='--batch')
    device = torch.device(device_name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda but CUDA is not available; use --device=cpu')
    common.set_threads(threads)
    num = num or max(batch_sizes)
    info = common.machine_info(device)
    print(f'bench_sample: {common.describe_machine(info)}', flush=True)

    if network_path is not None:
        try:
            net, _meta = snapshots.load_network(network_path, device=device)
        except ValueError as err:
            raise click.ClickException(str(err)) from None
        source = network_path
    else:
        net = fresh_network(common.PRESETS[preset], device)
        source = f'fresh {preset} network'
    height, width = denoiser.sampling_region(net).size
    params = sum(p.numel() for p in net.parameters())
    nfe = network_evaluations(steps)
    print(f'{source}: {params / 1e6:.2f}M parameters, {width}x{height}; {steps} steps = {nfe} network '
          f'calls per image; {rounds} rounds of {num} images per batch size', flush=True)

    times = measure(net, batch_sizes, num, steps, rounds, warmup, device)
    images_per_s = {}
    for batch_size, seconds in times.items():
        images_per_s[str(batch_size)] = rate = num * len(seconds) / sum(seconds)
        print(f'  batch {batch_size:4d}: {rate:9.3f} images/s, {rate * nfe:9.1f} image-evaluations/s '
              f'(blocks {", ".join(f"{s:.2f}" for s in seconds)} s)')

    summary = dict(network=source, steps=steps, nfe_per_image=nfe, num=num, rounds=rounds,
                   resolution=resolution_value((height, width)),
                   params=params, images_per_s=images_per_s,
                   block_seconds={str(b): s for b, s in times.items()})
    summary.update(info, loadavg_end=[round(x, 2) for x in os.getloadavg()])
    common.emit_summary(summary, json_path)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
