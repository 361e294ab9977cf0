"""Sample quality vs training wall-clock time: real_p = 1.0 (plain EDM) vs
real_p = 0.5 (Patch Diffusion), trained for equal time, over several seeds.

    python benchmarks/quality_vs_time.py --minutes=3 --seeds=2 --threads=2

The networks are a preset of bench_common (--preset; default cpu-demo, the
`make demo` network), trained by training_loop.Trainer with the given loss noise
levels (--P-mean, --P-std) and memory format (--channels-last). A
configuration is a real_p, optionally with where crops may start:
`0.5:grid` puts every crop's corner on the network's input grid (a DiT's
tokens), `0.5` (or `0.5:pixel`) anywhere, as train.py does.

The metric is NOT Inception-FID. It is the Frechet distance between the
features of generated and dataset images, where the features are the
penultimate layer of a small convolutional classifier trained here, in a
minute, on the dataset's class labels (the 5 shapes of the demo data), with
the colour channels of its training images in random order so that it tells
the shapes apart by outline, not by the demo data's class colours. Such a
network needs no download; it is saved as TorchScript and loaded with
evaluation.metrics.load_detector, so the statistics go through the same code
as `fid.py --detector=PATH`. Its numbers are comparable only with each
other (same detector, same number of images, same sampler settings).

Equal time: per seed, the two trainers alternate in slices of --slice
seconds of their own step time until each has trained --minutes, so a slow
spell of a shared machine slows both. At --checkpoints evenly spaced times
the EMA network is copied; after training each copy generates
--eval-images images (the same seeds for every copy) and is scored.
The JSON (last line on stdout) holds every point; the plot (matplotlib, if
installed) shows the distance against minutes and against counted kimg.
"""

import copy
import os
import tempfile
import time
import warnings

import click
import numpy as np
import torch

import bench_common as common
from bench_common import float_key
from training import patching
from dnnlib.util import atomic_path
from evaluation import metrics
from training import generation
from training.dataset import ImageFolderDataset

METRIC_NAME = 'Frechet distance in shape-classifier features (NOT Inception-FID)'


# ----------------------------------------------------------------------------
# The feature network.


class ShapeClassifier(torch.nn.Module):
    """A small conv classifier whose penultimate layer is the feature space.

    forward(images uint8 [N, C, H, W], return_features=False): logits
    [N, num_classes], or features [N, feature_dim] (non-negative) when
    return_features is True. Any H, W (global average pooling).
    """

    def __init__(self, channels=3, num_classes=5, width=32, feature_dim=64):
        super().__init__()
        layers = []
        for cin, cout, stride in [(channels, width, 1), (width, width, 2), (width, 2 * width, 1),
                                  (2 * width, 2 * width, 2), (2 * width, 4 * width, 1)]:   # R -> R/4
            layers += [torch.nn.Conv2d(cin, cout, 3, padding=1, stride=stride, bias=False),
                       torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]
        self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.features = torch.nn.Sequential(torch.nn.Linear(4 * width, feature_dim), torch.nn.ReLU())
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1
        features = self.features(self.body(x))
        if return_features:
            return features
        return self.head(features)


def load_labelled(dataset):
    """All images and class indices of a labelled dataset: (uint8 [N, C, H, W], int64 [N])."""
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(len(dataset))]))
    labels = torch.from_numpy(np.stack([dataset.get_label(i) for i in range(len(dataset))])).argmax(dim=1)
    return images, labels


def permute_channels(images, generator):
    """Each image with its colour channels in a random order (uint8 [N, C, H, W])."""
    order = torch.argsort(torch.rand(images.shape[:2], generator=generator), dim=1)
    return torch.gather(images, 1, order[:, :, None, None].expand_as(images))


def train_classifier(images, labels, num_classes, epochs=6, batch_size=64, lr=2e-3, holdout=0.1, seed=0):
    """Train a ShapeClassifier; returns (model in eval mode, held-out accuracy in [0, 1]).

    The training images get their colour channels in a random order, so that
    the features must tell shapes apart by their outline: the demo data gives
    each class its own colour, and a classifier that looked at colour alone
    would score a field of red blobs as well as one of red circles. The
    held-out accuracy is measured on permuted images too.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(images), generator=generator)
    num_test = max(int(len(images) * holdout), 1)
    test, train = order[:num_test], order[num_test:]
    model = ShapeClassifier(channels=images.shape[1], num_classes=num_classes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _epoch in range(epochs):
        for batch in train[torch.randperm(len(train), generator=generator)].split(batch_size):
            loss = torch.nn.functional.cross_entropy(model(permute_channels(images[batch], generator)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(permute_channels(images[test], generator)).argmax(dim=1)
        accuracy = float((predicted == labels[test]).float().mean())
    return model, accuracy


def save_detector(model, path):
    """Save `model` as TorchScript (what fid.py --detector and metrics.load_detector take), atomically."""
    with warnings.catch_warnings():   # TorchScript is deprecated, but it is the format fid.py's detectors use
        warnings.simplefilter('ignore', DeprecationWarning)
        scripted = torch.jit.script(model)
        with atomic_path(path) as tmp:
            torch.jit.save(scripted, tmp)


# ----------------------------------------------------------------------------
# Equal-time training.


def train_equal_time(trainers, budget_s, checkpoints, slice_s, clock=time.perf_counter):
    """Alternate the trainers in slices of `slice_s` seconds of their own step
    time until each has trained `budget_s` seconds.

    A checkpoint is taken after the first step that ends past each of the
    times budget_s * i / checkpoints, i = 1 .. checkpoints. Only step() is
    timed. Returns {key: [dict(time_s, kimg, steps, ema)]}, ema a CPU copy.
    """
    marks = [budget_s * (i + 1) / checkpoints for i in range(checkpoints)]
    elapsed = {key: 0.0 for key in trainers}
    points = {key: [] for key in trainers}
    while any(elapsed[key] < budget_s for key in trainers):
        for key, trainer in trainers.items():
            slice_end = min(elapsed[key] + slice_s, budget_s)
            while elapsed[key] < slice_end:
                start = clock()
                trainer.step()
                elapsed[key] += clock() - start
                while len(points[key]) < len(marks) and elapsed[key] >= marks[len(points[key])]:
                    points[key].append(dict(time_s=elapsed[key], kimg=trainer.cur_nimg / 1e3,
                                            steps=trainer.step_count, ema=copy.deepcopy(trainer.ema).cpu()))
    return points


def parse_configs(text):
    """'1,0.5,0.5:grid' -> {key: (real_p, crop_align)}, key '1.0', '0.5', '0.5:grid' (the JSON keys)."""
    configs = {}
    for part in (part.strip() for part in text.split(',') if part.strip()):
        value, _, align = part.partition(':')
        align = align or 'pixel'
        if align not in patching.CROP_ALIGNS:
            raise ValueError(f'{part!r}: after the colon comes one of {", ".join(patching.CROP_ALIGNS)}')
        [real_p] = common.parse_float_list(value)
        configs[float_key(real_p) + ('' if align == 'pixel' else f':{align}')] = (real_p, align)
    if not configs:
        raise ValueError(f'no configuration in {text!r}')
    return configs


def config_label(key):
    """'real_p = 1 (plain EDM)', 'real_p = 0.5', 'real_p = 0.5, crops on the grid' for a JSON key."""
    value, _, align = key.partition(':')
    return (f'real_p = {float(value):g}' + (' (plain EDM)' if float(value) == 1 else '')
            + (f', crops on the {align}' if align else ''))


def make_trainer(dataset, real_p, seed, batch, lr, ema_kimg, device, preset='cpu-demo', P_mean=None, P_std=None,
                 channels_last=False, crop_align='pixel'):
    """A Trainer of a preset's network (default cpu-demo, the `make demo` network) on `dataset`, in rounds
    of the whole batch, with a 1-kimg learning-rate ramp-up. P_mean, P_std: the loss's noise levels
    (None: the preset's, else the loss's defaults, as in train.py); crop_align: patching.PatchSchedule's."""
    noise_levels = {key: value for key, value in (('P_mean', P_mean), ('P_std', P_std)) if value is not None}
    trainer = common.make_trainer(common.PRESETS[preset], dataset, device, real_p=real_p, seed=seed, batch=batch,
                                  batch_gpu=None, lr=lr, ema=ema_kimg / 1000, lr_rampup=1,
                                  channels_last=channels_last, **noise_levels)   # None: the preset's, else the loss's
    trainer.schedule.crop_align = crop_align   # not a train.py option: set on the schedule the Trainer made
    return trainer


# ----------------------------------------------------------------------------
# Scoring.


def sample_stats(net, detector, num, steps, device, batch_size=16):
    """(mu, sigma) of the detector features of `num` images of `net` (seeds 0 .. num-1)."""
    batches = (images for _seeds, images in generation.generate_images(net, range(num), batch_size, device=device,
                                                                       num_steps=steps))
    return metrics.calculate_stats(batches, detector, num_expected=num, device=device)


def image_stats(images, detector, device, batch_size=256):
    """(mu, sigma) of the detector features of uint8 images [N, C, H, W]."""
    return metrics.calculate_stats(images.split(batch_size), detector, num_expected=len(images), device=device)


def mean_curves(runs):
    """{real_p: [dict(time_s, kimg, fd, fd_std)]}: means over seeds, checkpoint by checkpoint."""
    curves = {}
    for key, seed_runs in runs.items():
        curve = []
        for points in zip(*(run['points'] for run in seed_runs)):
            fds = [p['fd'] for p in points]
            curve.append(dict(time_s=float(np.mean([p['time_s'] for p in points])),
                              kimg=float(np.mean([p['kimg'] for p in points])),
                              fd=float(np.mean(fds)), fd_std=float(np.std(fds))))
        curves[key] = curve
    return curves


def plot(summary, path):
    """FD vs minutes and vs kimg, per seed and mean; returns False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for (key, seed_runs), colour in zip(summary['runs'].items(), ['tab:blue', 'tab:orange', 'tab:green', 'tab:red']):
        for run in seed_runs:
            for ax, field, scale in [(axes[0], 'time_s', 1 / 60), (axes[1], 'kimg', 1)]:
                ax.plot([p[field] * scale for p in run['points']], [p['fd'] for p in run['points']],
                        color=colour, alpha=0.3, linewidth=1)
        curve = summary['mean'][key]
        label = config_label(key)
        for ax, field, scale in [(axes[0], 'time_s', 1 / 60), (axes[1], 'kimg', 1)]:
            ax.errorbar([p[field] * scale for p in curve], [p['fd'] for p in curve], yerr=[p['fd_std'] for p in curve],
                        color=colour, marker='o', linewidth=2, capsize=3, label=label)
    for ax in axes:
        ax.axhline(summary['floor_fd'], color='grey', linestyle='--', linewidth=1, label='data vs data (floor)')
        ax.set_yscale('log')
        ax.grid(alpha=0.3, which='both')
    axes[0].set_xlabel('training wall-clock time (minutes, equal for both)')
    axes[1].set_xlabel('images counted (kimg, batch x E[m] per step)')
    axes[0].set_ylabel('Frechet distance (classifier features)')
    axes[0].legend()
    fig.suptitle(f'{METRIC_NAME}; {len(next(iter(summary["runs"].values())))} seeds, '
                 f'{summary["eval_images"]} images, {summary["sample_steps"]} sampler steps', fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format='png')
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------
# Command line.


@click.command()
@click.option('--data', metavar='ZIP|DIR', type=str,
              help='Labelled dataset  [default: 2000 demo shapes at 32x32, made in a temp folder]')
@click.option('--max-size', 'max_size', metavar='INT', type=click.IntRange(min=2), help='Use a subset of the dataset')
@click.option('--minutes', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=3, show_default=True,
              help='Training time per configuration and seed')
@click.option('--seeds', metavar='INT', type=click.IntRange(min=1), default=2, show_default=True, help='Seeds 0 .. N-1')
@click.option('--real-p', '--real_p', 'real_p', metavar='LIST', default='1,0.5', show_default=True,
              help='Configurations to compare: real_p values, each optionally :grid (crop corners on the network\'s '
                   'input grid) or :pixel (anywhere, the default)')
@click.option('--checkpoints', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True,
              help='Evenly spaced evaluation times')
@click.option('--slice', 'slice_s', metavar='SEC', type=click.FloatRange(min=0, min_open=True), default=10,
              show_default=True, help='Alternation slice')
@click.option('--preset', type=click.Choice(['cpu-demo', 'cpu-small', 'dit-tiny', 'dit-s', 'edm2-tiny']),
              default='cpu-demo', show_default=True,
              help='The network (bench_common.PRESETS; cpu-demo is the `make demo` network)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), help='Batch size  [default: the preset\'s]')
@click.option('--P-mean', '--P_mean', 'P_mean', metavar='FLOAT', type=float,
              help='EDM loss: mean of ln(sigma)  [default: the preset\'s, else the loss\'s: -1.2, EDM2 -0.4]')
@click.option('--P-std', '--P_std', 'P_std', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              help='EDM loss: std of ln(sigma)  [default: the preset\'s, else the loss\'s: 1.2, EDM2 1.0]')
@click.option('--channels-last', 'channels_last', is_flag=True, help='Networks in channels-last memory format')
@click.option('--lr', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--ema', 'ema_kimg', metavar='KIMG', type=click.FloatRange(min=0), default=2, show_default=True,
              help='EMA half-life')
@click.option('--eval-images', 'eval_images', metavar='INT', type=click.IntRange(min=2), default=128,
              show_default=True, help='Generated images per evaluation')
@click.option('--sample-steps', 'sample_steps', metavar='INT', type=click.IntRange(min=1), default=8,
              show_default=True, help='EDM sampler steps for the evaluation')
@click.option('--detector', 'detector_path', metavar='PT', type=str,
              help='A feature network saved earlier (--detector-out)  [default: train one]')
@click.option('--detector-out', 'detector_out', metavar='PT', type=str, help='Save the trained feature network here')
@click.option('--detector-epochs', 'detector_epochs', metavar='INT', type=click.IntRange(min=1), default=6,
              show_default=True)
@click.option('--device', 'device_name', metavar='STR', default='cpu', show_default=True, help='cpu, cuda or cuda:N')
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), help='torch CPU threads  [default: torch\'s]')
@click.option('--plot', 'plot_path', metavar='PNG', type=str,
              default=os.path.join(common.REPO_ROOT, 'docs', 'quality_vs_time.png'), show_default=True)
@click.option('--json', 'json_path', metavar='PATH', type=str, help='Also write the JSON summary to this file')
def main(data, max_size, minutes, seeds, real_p, checkpoints, slice_s, preset, batch, P_mean, P_std, channels_last, lr,
         ema_kimg, eval_images, sample_steps, detector_path, detector_out, detector_epochs, device_name, threads,
         plot_path, json_path):
    """Frechet distance (classifier features, NOT Inception-FID) vs equal training time."""
    try:
        configs = parse_configs(real_p)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--real-p') from None
    batch = common.PRESETS[preset].options['batch'] if batch is None else batch
    device = torch.device(device_name)
    common.set_threads(threads)
    info = common.machine_info(device)
    print(f'quality_vs_time: {common.describe_machine(info)}', flush=True)
    start = time.time()

    with tempfile.TemporaryDirectory(prefix='quality-vs-time-') as workdir:
        if data is None:
            data = common.build_demo_dataset(os.path.join(workdir, 'demo-shapes-32.zip'), 32)
        try:
            labelled = ImageFolderDataset(data, use_labels=True, max_size=max_size)
            dataset = ImageFolderDataset(data, max_size=max_size, cache=True)   # unconditional training
        except (OSError, ValueError) as err:
            raise click.ClickException(f'--data={data}: {err}. The feature network is trained on class labels: '
                                       f'give a labelled dataset (labels in its dataset.json)') from None
        if labelled.raw_labels.dtype != np.int64:
            raise click.ClickException(f'--data={data}: the labels are vectors, not class indices; the feature '
                                       f'network needs class labels')
        images, labels = load_labelled(labelled)
        print(f'data: {len(images)} images {list(images.shape[1:])}, {labelled.label_dim} classes', flush=True)

        # The feature network, through the same loader as fid.py --detector.
        accuracy = None
        if detector_path is None:
            model, accuracy = train_classifier(images, labels, labelled.label_dim, epochs=detector_epochs)
            detector_path = detector_out or os.path.join(workdir, 'shape-classifier.pt')
            save_detector(model, detector_path)
            print(f'feature network: held-out accuracy {accuracy:.3f}, saved to {detector_path}', flush=True)
        try:
            detector = metrics.load_detector(detector_path, device)
        except (OSError, ValueError) as err:
            raise click.ClickException(f'--detector={detector_path}: {err}') from None
        mu_ref, sigma_ref = image_stats(images, detector, device)
        subset = torch.from_numpy(np.random.default_rng(0).choice(len(images), min(eval_images, len(images)),
                                                                   replace=False))
        floor_fd = metrics.frechet_distance(*image_stats(images[subset], detector, device), mu_ref, sigma_ref)
        print(f'features: {mu_ref.shape[0]}-d; floor (FD of {len(subset)} dataset images vs all): {floor_fd:.4f}',
              flush=True)

        runs = {key: [] for key in configs}
        for seed in range(seeds):
            trainers = {key: make_trainer(dataset, p, seed, batch, lr, ema_kimg, device, preset, P_mean, P_std,
                                          channels_last, align) for key, (p, align) in configs.items()}
            loss_fn = next(iter(trainers.values())).loss_fn   # its noise levels go into the summary
            points = train_equal_time(trainers, minutes * 60, checkpoints, slice_s)
            for key, seed_points in points.items():
                for point in seed_points:
                    point['fd'] = metrics.frechet_distance(*sample_stats(point.pop('ema'), detector, eval_images,
                                                                         sample_steps, device), mu_ref, sigma_ref)
                    print(f'seed {seed} {config_label(key)}: {point["time_s"] / 60:.2f} min, {point["kimg"]:.2f} kimg, '
                          f'{point["steps"]} steps: FD {point["fd"]:.4f}', flush=True)
                runs[key].append(dict(seed=seed, points=seed_points))

    summary = dict(metric=METRIC_NAME, detector_accuracy=accuracy, feature_dim=int(mu_ref.shape[0]),
                   floor_fd=floor_fd, minutes=minutes, seeds=seeds, checkpoints=checkpoints, slice_s=slice_s,
                   preset=preset, P_mean=loss_fn.P_mean, P_std=loss_fn.P_std, channels_last=channels_last,
                   batch=batch, lr=lr, ema_kimg=ema_kimg, eval_images=eval_images, sample_steps=sample_steps,
                   runs=runs, mean=mean_curves(runs), total_s=time.time() - start)
    summary.update(info, loadavg_end=[round(x, 2) for x in os.getloadavg()])
    for key, curve in summary['mean'].items():
        print(f'mean {config_label(key)}: ' + ', '.join(f'{p["time_s"] / 60:.2f} min {p["fd"]:.3f}+-{p["fd_std"]:.3f}'
                                                          for p in curve))
    if plot_path:
        if plot(summary, plot_path):
            print(f'plot: {plot_path}')
        else:
            print('plot skipped: matplotlib is not installed (pip install matplotlib)')
    common.emit_summary(summary, json_path)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
