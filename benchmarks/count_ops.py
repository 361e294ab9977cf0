"""Count the operators one forward + backward of a preset's network dispatches
(each is at least one kernel launch on a GPU, and host time in Python and the
dispatcher): the fixed host cost of an accumulation round.

    python benchmarks/count_ops.py --preset=gpu-paper --precision=bf16

Runs on CPU with a batch of 2; bf16 counts under CPU autocast. A CUDA step
differs in known places (docs/PERFORMANCE.md, "Operators per step"): on CUDA
the network adds each convolution's bias inside the convolution (4 operators
fewer per biased convolution), dropout is one fused operator (four on CPU),
and autocast runs group_norm in float32 where CPU autocast takes a bfloat16
input with float32 parameters (4 casts more per GroupNorm: its input to
float32 and the next convolution's input back, forward and backward). The
last line on stdout is a one-line JSON summary.
"""

import collections

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import bench_common as common
from training import patching
from training.architectures import build_network


class OperatorCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside `with OperatorCounter() as c:`."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_operators(preset, precision='fp32', batch=2):
    """Counter of operators in one forward + backward of `preset`'s network on full-size inputs."""
    net = build_network(common.network_kwargs(preset), preset.resolution, preset.channels, 0)
    x = torch.randn(batch, preset.channels, preset.resolution, preset.resolution)
    pos = patching.full_grid(preset.resolution, batch)
    with OperatorCounter() as counter:
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=(precision == 'bf16')):
            out = net(x, torch.ones(batch), pos=pos)
        out.float().square().mean().backward()
    return counter.counts


@click.command()
@click.option('--preset', type=click.Choice(sorted(common.PRESETS)), default='gpu-paper', show_default=True)
@click.option('--precision', type=click.Choice(['fp32', 'bf16']), default='fp32', show_default=True)
@click.option('--top', metavar='INT', type=click.IntRange(min=1), default=10, show_default=True)
def main(preset, precision, top):
    """Operators per forward + backward of a preset's network."""
    counts = count_operators(common.PRESETS[preset], precision)
    total = sum(counts.values())
    print(f'{preset}, {precision}: {total} operators per forward + backward')
    for name, n in counts.most_common(top):
        print(f'  {name:<32s} {n}')
    common.emit_summary(dict(preset=preset, precision=precision, operators=total, top=dict(counts.most_common(top))))


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
