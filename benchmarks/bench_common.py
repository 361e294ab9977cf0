"""What the benchmarks share: presets, data, the Trainer, the machine
description, peak memory and timing helpers.

A preset is a set of train.py option values (training.config.DEFAULTS
names) for the network, the batch and the learning rate, plus the shape of
its default data; benchmarks resolve the options with training.config, as
train.py does:

    cpu-small   DDPM++ 32x32, cbase 32, cres 1,2,2, 2 blocks, no attention,
                batch 32: seconds per step on 2 cores
    cpu-demo    the `make demo` network: DDPM++ 32x32, cbase 16, cres 1,2,2,
                2 blocks, no attention, batch 16
    gpu-paper   DDPM++ 64x64 with the paper's CelebA settings: cres 1,2,2,2,
                dropout 0.05, batch 256
    gpu-latent  ADM on 32x32x4 latent-shaped data (a 256x256 image through the
                Stable Diffusion VAE), latent patch sizes {16, 32}, batch 256
    dit-s       DiT-S/4 (hidden 384, depth 12, 6 heads, 4x4 tokens) on 32x32 demo
                shapes, batch 16: seconds per step on 2 cores; its patches of 8 and
                16 pixels are 2x2 and 4x4 tokens
    gpu-dit-b   DiT-B/2 on 32x32x4 latent-shaped data (as gpu-latent), batch 256
    gpu-dit-xl  DiT-XL/2 on 32x32x4 latent-shaped data, batch 256
    dit-tiny    a DiT of DiT-S's kind scaled down for CPU quality runs (hidden 128,
                depth 6, 4 heads, 4x4 tokens) on 32x32 demo shapes, batch 16: its
                8-, 16- and 32-pixel crops are 4, 16 and 64 tokens

    edm2-tiny   EDM2's magnitude-preserving UNet scaled down for CPU quality runs
                (cbase 32, cres 1,2,2, 2 blocks, attention at 8 and in the
                decoder's first block as EDM2 has it) on 32x32 demo shapes,
                batch 16, lr 1e-2 with EDM2's decay after 2000 batches, EDM2's
                ImageNet-64 noise levels (P_mean -0.8, P_std 1.6)
    gpu-edm2-s  EDM2-S (cbase 192, cres 1,2,3,4, 3 blocks, attention at 16 and
                8) on 64x64 RGB, batch 256, EDM2's img64-s lr 1e-2
    gpu-edm2-m  EDM2-M (cbase 256) on 64x64 RGB, batch 256, lr 9e-3
    gpu-edm2-s-latent  EDM2-S on 32x32x4 latent-shaped data (as gpu-latent), batch 256

No preset augments (train.py's default --augment is 0.12).
"""

import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import sys
import threading
import time

import numpy as np
import psutil
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from dataset_prep.archive import convert_dataset  # noqa: E402
import dnnlib  # noqa: E402
from dnnlib.util import atomic_write  # noqa: E402
from training import config  # noqa: E402
from training.dataset import dataset_class_name, open_dataset  # noqa: E402
from training.training_loop import Trainer  # noqa: E402

# Training time of a benchmark Trainer (train.py --duration, Mimg): never reached,
# so that the progressive patch schedule stays at the start of a run.
DURATION_MIMG = 1000


@dataclasses.dataclass(frozen=True)
class Preset:
    """A benchmark configuration. `options`: train.py option values
    (training.config.DEFAULTS names); `resolution`, `channels`: the shape of
    its default data; `data`: 'demo' (demo shapes made on the fly) or
    'random' (random latent statistics in memory: RandomLatentDataset)."""
    options: dict
    resolution: int
    channels: int
    data: str = 'demo'


PRESETS = {
    'cpu-small': Preset(dict(arch='ddpmpp', cbase=32, cres=[1, 2, 2], blocks=2, attn=[], dropout=0, augment=0,
                             batch=32, batch_gpu=32, lr=2e-3), resolution=32, channels=3),
    'cpu-demo': Preset(dict(arch='ddpmpp', cbase=16, cres=[1, 2, 2], blocks=2, attn=[], dropout=0, augment=0,
                            batch=16, batch_gpu=16, lr=2e-3), resolution=32, channels=3),
    'gpu-paper': Preset(dict(arch='ddpmpp', cres=[1, 2, 2, 2], dropout=0.05, augment=0, batch=256, batch_gpu=64,
                             lr=2e-4), resolution=64, channels=3),
    'gpu-latent': Preset(dict(arch='adm', dropout=0.1, augment=0, batch=256, batch_gpu=64, lr=1e-4),
                         resolution=32, channels=4, data='random'),
    'dit-s': Preset(dict(arch='dit-s', token_size=4, dropout=0, augment=0, batch=16, batch_gpu=16, lr=1e-4),
                    resolution=32, channels=3),
    'gpu-dit-b': Preset(dict(arch='dit-b', token_size=2, dropout=0, augment=0, batch=256, batch_gpu=256, lr=1e-4),
                        resolution=32, channels=4, data='random'),
    'gpu-dit-xl': Preset(dict(arch='dit-xl', token_size=2, dropout=0, augment=0, batch=256, batch_gpu=256, lr=1e-4),
                         resolution=32, channels=4, data='random'),
    'dit-tiny': Preset(dict(arch='dit-s', cbase=128, blocks=6, heads=4, token_size=4, dropout=0, augment=0,
                            batch=16, batch_gpu=16, lr=1e-3), resolution=32, channels=3),
    'edm2-tiny': Preset(dict(arch='edm2-xs', cbase=32, cres=[1, 2, 2], blocks=2, attn=[8], dropout=0, augment=0,
                             batch=16, batch_gpu=16, lr=1e-2, lr_decay=2000, P_mean=-0.8, P_std=1.6),
                        resolution=32, channels=3),
    'gpu-edm2-s': Preset(dict(arch='edm2-s', dropout=0, augment=0, batch=256, batch_gpu=64, lr=1e-2),
                         resolution=64, channels=3),
    'gpu-edm2-m': Preset(dict(arch='edm2-m', dropout=0.1, augment=0, batch=256, batch_gpu=64, lr=9e-3),
                         resolution=64, channels=3),
    'gpu-edm2-s-latent': Preset(dict(arch='edm2-s', dropout=0, augment=0, batch=256, batch_gpu=64, lr=1e-2),
                                resolution=32, channels=4, data='random'),
}


def network_kwargs(preset):
    """The resolved network options of a preset (training.config.network_kwargs)."""
    return config.network_kwargs(dnnlib.EasyDict(config.DEFAULTS, **preset.options))


def make_trainer(preset, dataset, device='cpu', **options):
    """A training_loop.Trainer on the opened `dataset`, configured by
    training.config.build_config from the preset's options, then `options`
    (train.py option values: real_p, batch, seed, ...). No DataLoader
    workers unless options say so; a --duration that is never reached."""
    options = {**preset.options, 'duration': DURATION_MIMG, 'workers': 0, **options, 'device': str(device)}
    c = config.build_config(options, dataset)
    return Trainer(dataset=dataset, device=c.device, **config.trainer_kwargs(c))


# ----------------------------------------------------------------------------
# Data.


class RandomLatentDataset(torch.utils.data.Dataset):
    """`count` random posterior statistics (mean, std) float32 [2, C, R, R] in
    memory, without labels: a stand-in for a pre-encoded latent archive
    (training.dataset.LatentDataset, same item layout and attributes), so
    throughput runs need neither a VAE nor a download. The values do not
    change the work of a step."""

    is_latent = True

    def __init__(self, count, channels, resolution, seed=0):
        rng = np.random.default_rng(seed)
        mean = rng.standard_normal(size=(count, 1, channels, resolution, resolution), dtype=np.float32) * 5
        std = np.full_like(mean, 0.1)
        self.stats = np.concatenate([mean, std], axis=1)
        self.resolution = resolution
        self.num_channels = channels
        self.image_shape = [channels, resolution, resolution]
        self.label_dim = 0
        self.vae = 'random-latents'
        self.scale_factor = 0.18215
        self.image_resolution = resolution * 8
        self.name = f'random-latents-{channels}x{resolution}x{resolution}'

    def __len__(self):
        return len(self.stats)

    def __getitem__(self, idx):
        return self.stats[idx].copy(), np.zeros([0], dtype=np.float32)


def build_demo_dataset(dest, resolution, count=2000):
    """Write `count` demo shapes at resolution x resolution to the zip `dest`; returns dest."""
    convert_dataset(f'demo:shapes:{count}', dest, resolution=(resolution, resolution))
    return dest


def benchmark_dataset(preset, data, workdir, use_labels=False, max_size=None, demo_count=2000):
    """The benchmark's dataset: `data` (an image or pre-encoded latent zip or
    folder), or the preset's default made in `workdir` (demo shapes, or
    random latent statistics)."""
    if data is None and preset.data == 'random':
        return RandomLatentDataset(max_size or demo_count, preset.channels, preset.resolution)
    if data is None:
        data = build_demo_dataset(os.path.join(workdir, f'demo-shapes-{preset.resolution}.zip'), preset.resolution,
                                  demo_count)
    return open_dataset(dict(class_name=dataset_class_name(data), path=data, use_labels=use_labels,
                             max_size=max_size, cache=True))


# ----------------------------------------------------------------------------
# The machine.


def emit_summary(summary, json_path=None):
    """Print the one-line JSON summary (a benchmark's last line) and, if asked, write it to json_path."""
    line = json.dumps(summary)
    if json_path:
        with atomic_write(json_path, 'w') as f:
            f.write(line + '\n')
    print(line)


def cpu_model():
    """The 'model name' line of /proc/cpuinfo, or platform.processor()."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def machine_info(device):
    """A JSON-able description of where the benchmark ran."""
    device = torch.device(device)
    info = dict(device=str(device), torch=torch.__version__, cpu=cpu_model(), nproc=len(os.sched_getaffinity(0)),
                threads=torch.get_num_threads(), loadavg_start=[round(x, 2) for x in os.getloadavg()])
    if device.type == 'cuda':
        info['device_name'] = torch.cuda.get_device_name(device)
    return info


# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendors' data sheets,
# by a substring of torch.cuda.get_device_name(). fp32 is the non-tensor-core rate
# (training_loop turns TF32 off). The first match wins: specific names first.
PEAK_TFLOPS = (
    ('H100 PCIe', dict(bf16=756.0, fp16=756.0, fp32=51.2)),
    ('H100 NVL', dict(bf16=835.0, fp16=835.0, fp32=60.0)),
    ('H100', dict(bf16=989.4, fp16=989.4, fp32=66.9)),        # SXM5 (e.g. 'NVIDIA H100 80GB HBM3')
    ('H200', dict(bf16=989.4, fp16=989.4, fp32=66.9)),
    ('A100', dict(bf16=312.0, fp16=312.0, fp32=19.5)),
    ('L40S', dict(bf16=362.0, fp16=362.0, fp32=91.6)),
    ('RTX 4090', dict(bf16=165.2, fp16=165.2, fp32=82.6)),
    ('V100', dict(bf16=None, fp16=125.0, fp32=15.7)),
)


def peak_tflops(device_name, precision):
    """The card's peak TFLOP/s for `precision` ('fp32', 'bf16', 'fp16'), or None if unknown."""
    for key, peaks in PEAK_TFLOPS:
        if key in (device_name or ''):
            return peaks.get(precision)
    return None


def describe_machine(info):
    """One line for the log: device, processor, torch, CPUs, threads, load."""
    return (f'{info["device"]} ({info.get("device_name", info["cpu"])}), torch {info["torch"]}, '
            f'{info["nproc"]} CPUs, {info["threads"]} torch threads, load average {info["loadavg_start"]}')


def set_threads(threads):
    """Use `threads` intra-op threads (None: leave torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def synchronize(device):
    """Wait for queued GPU work, so wall-clock times cover it (no-op on CPU)."""
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), wall seconds) with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    value = fn()
    synchronize(device)
    return value, time.perf_counter() - start


# ----------------------------------------------------------------------------
# Peak memory.


def _release_free_heap():
    """Hand freed heap pages back to the OS (glibc), so RSS growth is measured from a low base."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


class PeakMemory:
    """Peak memory of the code run inside `with tracker.measure():` blocks, in bytes.

    CUDA: torch.cuda.max_memory_allocated over the blocks (`peak`), and the
    most it rose above what was allocated when a block began (`growth`: the
    step's own activations and temporaries). CPU: the process RSS, sampled
    every `interval` seconds by a thread; `growth` is the peak above the RSS
    at the start of a block, after freed heap pages are handed back to the
    OS. Blocks of the same tracker keep the maximum.
    """

    def __init__(self, device, interval=0.005):
        self.device = torch.device(device)
        self.interval = interval
        self.peak = 0
        self.growth = 0
        self.kind = 'cuda_max_memory_allocated' if self.device.type == 'cuda' else 'cpu_rss'

    @contextlib.contextmanager
    def measure(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            _release_free_heap()
            process = psutil.Process(os.getpid())
            base = process.memory_info().rss
            samples = [base]
            stop = threading.Event()

            def sample():
                while not stop.wait(self.interval):
                    samples.append(process.memory_info().rss)
            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join()
            peak = max(samples + [process.memory_info().rss])
        self.peak = max(self.peak, peak)
        self.growth = max(self.growth, peak - base)


def gib(nbytes):
    return round(nbytes / 2**30, 3)


def float_key(value):
    """'1.0', '0.5', '0.25': the JSON key of a real_p."""
    return str(float(value))


def parse_float_list(text):
    """'1,0.5,0.25' -> [1.0, 0.5, 0.25]."""
    try:
        values = [float(part) for part in text.split(',') if part.strip()]
    except ValueError:
        raise ValueError(f'{text!r} is not a comma-separated list of numbers, e.g. 1,0.5,0.25') from None
    if not values:
        raise ValueError('the list is empty; give e.g. 1,0.5,0.25')
    return values
