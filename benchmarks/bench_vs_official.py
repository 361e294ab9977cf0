"""Training and sampling speed of this code against the official Patch
Diffusion code, side by side in one process, on the same device, data and
configuration.

    python benchmarks/bench_vs_official.py --official=DIR --preset=gpu-paper
    python benchmarks/bench_vs_official.py --official=DIR --preset=gpu-latent
    python benchmarks/bench_vs_official.py --official=DIR --preset=cpu-small --threads=1

DIR is a checkout of the official repository (github.com/Zhendong-Wang/Patch-Diffusion)
that the user provides: this project contains none of its code and loads
it from DIR at run time.

Loading the official code. The official files import their helpers by the
top-level names this project uses too (`from torch_utils import persistence`,
`import dnnlib`, `training.pos_embedding`). `OfficialCode` imports them once,
in a window (`OfficialCode.active()`) during which our `training`,
`torch_utils` and `dnnlib` modules are taken out of sys.modules and a finder
at the front of sys.meta_path resolves those three names from DIR only
(missing there = an ImportError, never ours); DIR's generate.py is loaded
from its file under the private name `_official_generate`. When the window
closes, the official modules leave sys.modules and ours return, so no later
import by name reaches theirs, nor theirs ours; the harness holds their
classes and functions as objects. Everything that may import or look
modules up by name (building networks, deep copies, pickling) runs inside
the window: a pickle names `torch_utils.persistence`, which must then be the
official one. Packages the official files import at the top for things the
harness never runs (the VAE, the command line, image files, downloads:
OFFICIAL_ONLY_IMPORTS) are stand-in modules inside the window unless this
process has already imported them; `stubbed_imports` in the summary names
them. One process, not a subprocess per side: both sides then alternate
on the same device and data, and the sampling outputs compare directly.

Training. Each side runs optimizer steps of the preset's network, batch and
options (training.config.build_config of the preset's train.py options, as
train.py builds them):
  official                  the official `Patch_EDMPrecond` and `Patch_EDMLoss`, driven by
                            `OfficialTrainer`: our re-implementation of the official
                            training loop's per-step work (see there); fp32, or fp16
                            with --fp16, as its --fp16 flag does
  ours                      training_loop.Trainer with our defaults (bench_common.make_trainer)
  ours_official_precision   the same at the official precision, when our defaults differ

A step's work depends only on its patch size P, so every side times steps
at each P (the official loop draws P per accumulation round; a step whose
rounds all use P costs what its rounds cost, and the expectation over
independent draws per round is the same mixture). After a warm-up, the
(side, P) pairs alternate in blocks of --block steps, the order rotating
from round to round, so a slow spell of the machine hits them alike. Then,
for each real_p with the patch-size probabilities prob(P) of
docs/DESIGN.md section 2 (the official code's too),

    sec_per_step   = sum_P prob(P) * mean step time at P
    nimg_per_step  = batch * sum_P prob(P) * m(P)        images trained on per step
    kimg_per_s     = nimg_per_step / sec_per_step / 1000

with m(P) = R / P for ours and the official loop's table for the official
side (`official_batch_mul`; the same at R = 64 and for latents at 32).

Sampling. The same official-format network pickle (a fresh official
`Patch_EDMPrecond` of the preset with seeded random weights, written by the
official persistence; or --network) is loaded by our generate.py path
(training.snapshots.load_network + training.generation.generate_images)
and as the official generate.py loads it (pickle.load(...)['ema']); the
official side runs the official `edm_sampler` in the loop of the official
generate.py (per-seed generators seeded as EDM's, here
training.generation's; its coordinate grid; its uint8 conversion). Same
seeds, same steps, deterministic sampler; rounds alternate the sides. The
uint8 images of every round are compared, and the float64 samples of one
batch (`sampling_bit_equal`, `sampling_max_abs_diff`).

The last line on stdout is a one-line JSON summary. Its ratio keys:
ours_vs_official_kimg_per_s_realp<p>, ours_at_official_precision_vs_official_kimg_per_s_realp<p>
(p = 1.0, 0.5, ...), ours_vs_official_sampling_images_per_s.
"""

import contextlib
import copy
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types

import click
import numpy as np
import torch

import bench_common as common
from bench_common import float_key, gib
from bench_train import expected_per_step, mean_seconds_by_patch, set_backend_flags
import dnnlib
from torch_utils import misc
from training import config, generation, latents, samplers, snapshots
from training.denoiser import make_denoiser, network_info, sampling_region
from training.patching import PatchSchedule, patch_probs, patch_sizes

# Top-level names that the official files import from their own repository.
OFFICIAL_PACKAGES = ('training', 'torch_utils', 'dnnlib')
GENERATE_MODULE = '_official_generate'
# Imported at the top of official files for what the harness never runs: the
# VAE (diffusers), the command line (click, tqdm), image files (PIL),
# downloads (requests, distutils), memory statistics (psutil).
OFFICIAL_ONLY_IMPORTS = ('diffusers', 'click', 'tqdm', 'PIL', 'requests', 'distutils', 'psutil')
REQUIRED_FILES = ('training/networks.py', 'training/patch_loss.py', 'torch_utils/persistence.py',
                  'torch_utils/training_stats.py', 'generate.py')

# The official training loop's batch multipliers, as facts: a round at patch
# size P loads OFFICIAL_SIZE_WEIGHT[P] // OFFICIAL_SIZE_WEIGHT[R] batches of
# batch_gpu images (R/P at R = 64; not at 128 or 256; no entry for P = 8).
OFFICIAL_SIZE_WEIGHT = {512: 1, 256: 2, 128: 4, 64: 16, 32: 32, 16: 64}
# How often, in weights of the patch-size probabilities, the official loop
# counts each size's images: the counter adds batch * sum(prob * these) per step.
OFFICIAL_COUNT_MULTIPLIERS = {'pixels': (4, 2, 1), 'latents': (2, 1)}

SIDES = ('official', 'ours', 'ours_official_precision')


# ----------------------------------------------------------------------------
# Loading the official code.


class _DirectoryFinder(importlib.abc.MetaPathFinder):
    """Resolves `names` and their submodules from `directory` only."""

    def __init__(self, directory, names):
        self.directory, self.names = directory, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition('.')[0] not in self.names:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, [self.directory] if path is None else path)
        if spec is None:
            raise ModuleNotFoundError(f'The official code imports {fullname}, which is not in {self.directory}',
                                      name=fullname)
        return spec


class _Placeholder:
    """Any attribute of a stand-in module: attributes and calls give placeholders,
    and a call on one function returns it (so decorators pass through)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attr):
        return _Placeholder(f'{self._name}.{attr}')

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]
        return _Placeholder(f'{self._name}()')

    def __repr__(self):
        return f'<not loaded by bench_vs_official: {self._name}>'


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        return _Placeholder(f'{self.__name__}.{attr}')


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-in modules for `names` (and submodules of stand-ins) that this process has not imported."""

    def __init__(self, names):
        self.names = names
        self.created = set()

    def find_spec(self, fullname, path=None, target=None):
        top, _, rest = fullname.partition('.')
        if top in self.names and (not rest or top in self.created):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__, module.__all__ = [], []
        self.created.add(spec.name.partition('.')[0])
        return module

    def exec_module(self, module):
        pass


def _pop_modules(tops):
    """Remove and return the sys.modules entries whose top-level name is in `tops`."""
    return {name: sys.modules.pop(name) for name in list(sys.modules) if name.partition('.')[0] in tops}


def official_commit(directory):
    """The commit of `directory` when it is the top of a git checkout, else None."""
    try:
        result = subprocess.run(['git', '-C', directory, 'rev-parse', '--show-toplevel', 'HEAD'],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = result.stdout.split()
    if result.returncode or len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(directory):
        return None
    return lines[1]


def constructor_parameters(cls):
    """The argument names the constructor of `cls` takes, looking through
    pass-through wrappers such as persistent_class's (*args, **kwargs); None
    when it takes any keyword (or `cls` is None)."""
    for klass in getattr(cls, '__mro__', ()):
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        if all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            continue
        return None if any(p.kind == p.VAR_KEYWORD for p in params) else {p.name for p in params}
    return None


class OfficialCode:
    """The official code of a checkout `directory`, loaded beside ours (see the
    module docstring): `Patch_EDMPrecond`, `Patch_EDMLoss`, `report` (its
    torch_utils.training_stats.report), `edm_sampler` and `networks` (the
    module), and `active()`, the window in which the official modules are
    the ones sys.modules names."""

    def __init__(self, directory, only_imports=OFFICIAL_ONLY_IMPORTS):
        self.directory = os.path.abspath(directory)
        missing = [name for name in REQUIRED_FILES if not os.path.isfile(os.path.join(self.directory, name))]
        if missing:
            raise OSError(f'{directory} does not look like a checkout of the official Patch Diffusion repository: '
                          f'{", ".join(missing)} missing')
        self._modules = {}
        self._stand_ins = _StandInFinder(only_imports)
        self._finders = [_DirectoryFinder(self.directory, OFFICIAL_PACKAGES), self._stand_ins]
        with self.active():
            self.networks = importlib.import_module('training.networks')
            self.Patch_EDMLoss = importlib.import_module('training.patch_loss').Patch_EDMLoss
            self.report = importlib.import_module('torch_utils.training_stats').report
            spec = importlib.util.spec_from_file_location(GENERATE_MODULE, os.path.join(self.directory, 'generate.py'))
            generate = importlib.util.module_from_spec(spec)
            sys.modules[GENERATE_MODULE] = generate
            spec.loader.exec_module(generate)
        self.Patch_EDMPrecond = self.networks.Patch_EDMPrecond
        self.edm_sampler = generate.edm_sampler
        outside = sorted(name for name, module in self._modules.items()
                         if name.partition('.')[0] in OFFICIAL_PACKAGES and getattr(module, '__file__', None)
                         and not os.path.abspath(module.__file__).startswith(self.directory + os.sep))
        assert not outside, f'official modules loaded from outside {self.directory}: {outside}'
        self.commit = official_commit(self.directory)

    @property
    def stubbed_imports(self):
        return sorted(self._stand_ins.created)

    @contextlib.contextmanager
    def active(self):
        """Inside: `training`, `torch_utils`, `dnnlib` (and the stand-in modules) are the official ones."""
        swapped = OFFICIAL_PACKAGES + (GENERATE_MODULE,)
        ours = _pop_modules(swapped + tuple(self._stand_ins.created))
        sys.modules.update(self._modules)
        sys.meta_path[:0] = self._finders
        try:
            yield self
        finally:
            for finder in self._finders:
                sys.meta_path.remove(finder)
            self._modules = _pop_modules(swapped + tuple(self._stand_ins.created))
            sys.modules.update(ours)

    def network_kwargs(self, network_kwargs, resolution, channels, label_dim, fp16):
        """The official Patch_EDMPrecond's arguments for our resolved network options: the
        same UNet, img_channels = C + 2 (its meaning), out_channels = C. Options its UNet
        does not take are dropped (returned second, with their values)."""
        kwargs = dict(network_kwargs)
        if kwargs.pop('precond') != 'edm' or not kwargs.pop('use_pos') or kwargs.pop('pos_freqs'):
            raise ValueError('The official Patch_EDMPrecond is EDM preconditioning with the plain coordinate grid; '
                             'compare with --precond=edm, --use_pos=1 and --pos-freqs=0 (the presets)')
        kwargs.pop('use_fp16', None)
        if not kwargs.get('implicit_mlp'):
            kwargs.pop('implicit_mlp', None)   # the official DhariwalUNet has no such option
        takes = constructor_parameters(getattr(self.networks, kwargs['model_type'], None))
        dropped = {}
        if takes is not None:
            dropped = {key: kwargs.pop(key) for key in list(kwargs) if key != 'model_type' and key not in takes}
        return dict(img_resolution=resolution, img_channels=channels + 2, out_channels=channels,
                    label_dim=label_dim, use_fp16=fp16, **kwargs), dropped


# ----------------------------------------------------------------------------
# The official training step.


def official_batch_mul(resolution, patch_size):
    """(m, note): batches of batch_gpu images in an official round at patch size P.
    Where the official table has no entry (the official loop stops there with a
    KeyError), m = R / P and a note says so."""
    if patch_size in OFFICIAL_SIZE_WEIGHT and resolution in OFFICIAL_SIZE_WEIGHT:
        return OFFICIAL_SIZE_WEIGHT[patch_size] // OFFICIAL_SIZE_WEIGHT[resolution], None
    return resolution // patch_size, (f'the official loop has no batch multiplier for {patch_size}px at '
                                      f'{resolution}px (it stops with a KeyError); timed with R/P = '
                                      f'{resolution // patch_size}')


def official_count_multiplier(real_p, latent):
    """The official loop's counter: it adds int(batch * this) images per step."""
    weights = OFFICIAL_COUNT_MULTIPLIERS['latents' if latent else 'pixels']
    return float(np.dot(patch_probs(real_p, latent), weights))


class OfficialTrainer:
    """The official training loop's work per optimizer step, around the
    official network and loss, on any device.

    This is OUR measurement code, written from the structure of the official
    training/training_loop.py (the official loop hard-codes CUDA and DDP, so
    it cannot be driven as it is): num_rounds = batch / batch_gpu
    accumulation rounds; each round draws its own patch size P (`step(None)`;
    the harness passes the sizes), loads official_batch_mul(R, P) batches of
    batch_gpu images, scales them to [-1, 1] (latents: drawn from the stored
    posterior, as ours; the official loop would run the VAE here), calls the
    official loss with patch_size and resolution, reports the loss and
    backpropagates sum(loss) * ls / (batch_gpu_total * m); then the learning
    rate ramp-up, nan_to_num on every gradient, Adam (torch.optim.Adam, not
    fused), the EMA as a per-parameter loop, and the counter adds
    int(batch * official_count_multiplier). Left out: DDP (the official loop
    wraps even one GPU in it; ours has none with one process) and the VAE.

    code: an OfficialCode; c: resolved options of training.config.build_config
    (the same as ours); fp16: the official network in fp16 (on CUDA).
    """

    def __init__(self, code, c, dataset, device='cpu', fp16=False):
        self.device = device = torch.device(device)
        self.batch_size = c.batch_size
        self.batch_gpu = min(c.batch_gpu or c.batch_size, c.batch_size)
        self.num_rounds = c.batch_size // self.batch_gpu
        self.encoder = latents.latent_encoder(dataset, c.latent_kwargs, device)
        latent = self.encoder is not None
        if latent:
            self.resolution, channels = self.encoder.info.latent_resolution, self.encoder.info.latent_channels
        else:
            self.resolution, channels = dataset.resolution, dataset.num_channels
        schedule = PatchSchedule(self.resolution, c.patch_kwargs.real_p, latent=latent)
        self.sizes, self.probs = schedule.sizes, schedule.probs
        self.count_multiplier = official_count_multiplier(c.patch_kwargs.real_p, latent)
        self.lr, self.lr_rampup_kimg, self.loss_scaling = c.optimizer_kwargs.lr, c.lr_rampup_kimg, c.loss_scaling
        self.ema_halflife_kimg, self.ema_rampup_ratio = c.ema_halflife_kimg, c.ema_rampup_ratio
        self.net_kwargs, self.dropped_options = code.network_kwargs(c.network_kwargs, self.resolution, channels,
                                                                    dataset.label_dim, fp16)
        with code.active():
            torch.manual_seed(c.seed)
            self.net = code.Patch_EDMPrecond(**self.net_kwargs).train().requires_grad_(True).to(device)
            self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
            self.loss_fn = code.Patch_EDMLoss()
        self.report = code.report
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr, betas=(0.9, 0.999), eps=1e-8)
        sampler = misc.InfiniteSampler(dataset, seed=c.seed)
        self._batches = iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=self.batch_gpu,
                                                         **c.data_loader_kwargs))
        self._rng = np.random.default_rng(c.seed)
        self.batch_mul, self.notes = {}, []
        for P in patch_sizes(self.resolution, latent):
            self.batch_mul[P], note = official_batch_mul(self.resolution, P)
            if note:
                self.notes.append(note)
        self.cur_nimg = 0

    def draw_sizes(self):
        """One patch size per round, drawn independently as the official loop does."""
        return [int(P) for P in self._rng.choice(self.sizes, size=self.num_rounds, p=self.probs)]

    def _round(self, P):
        m = self.batch_mul[P]
        parts = [next(self._batches) for _ in range(m)]
        images = torch.cat([part[0] for part in parts]).to(self.device)
        labels = torch.cat([part[1] for part in parts]).to(self.device)
        images = self.encoder(images) if self.encoder is not None else images.to(torch.float32) / 127.5 - 1
        loss = self.loss_fn(net=self.net, images=images, patch_size=P, resolution=self.resolution, labels=labels,
                            augment_pipe=None)
        self.report('Loss/loss', loss)
        loss.sum().mul(self.loss_scaling / self.batch_size / m).backward()
        return images.shape[0]

    def step(self, sizes=None):
        """One optimizer step with these per-round patch sizes (None: drawn).
        Returns the number of images the rounds used."""
        sizes = self.draw_sizes() if sizes is None else list(sizes)
        assert len(sizes) == self.num_rounds, f'{len(sizes)} patch sizes for {self.num_rounds} rounds'
        self.optimizer.zero_grad(set_to_none=True)
        used = sum(self._round(P) for P in sizes)
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr * min(self.cur_nimg / max(self.lr_rampup_kimg * 1000, 1e-8), 1)
        for param in self.net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        self.optimizer.step()
        halflife = self.ema_halflife_kimg * 1000
        if self.ema_rampup_ratio is not None:
            halflife = min(halflife, self.cur_nimg * self.ema_rampup_ratio)
        beta = 0.5 ** (self.batch_size * self.count_multiplier / max(halflife, 1e-8))
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))
        self.cur_nimg += int(self.batch_size * self.count_multiplier)
        return used


# ----------------------------------------------------------------------------
# Timing the training steps.


class PinnedPatchSize:
    """A Trainer's PatchSchedule, except that every step uses `size` (set by the harness)."""

    def __init__(self, schedule):
        self.schedule, self.size = schedule, schedule.resolution

    def draw(self, step, progress=0.0):
        return self.size

    def __getattr__(self, name):
        return getattr(self.schedule, name)


def ours_step_at(trainer):
    """step(P): one step of our Trainer at patch size P (its draw pinned to P)."""
    trainer.schedule = PinnedPatchSize(trainer.schedule)

    def step(P):
        trainer.schedule.size = P
        return trainer.step()
    return step


def official_step_at(trainer):
    """step(P): one official step whose rounds all use patch size P."""
    return lambda P: trainer.step([P] * trainer.num_rounds)


def measure(steps, sizes, rounds, block, warmup, device, clock=time.perf_counter):
    """Time steps of every side at every patch size, alternating.

    steps: {side: step(P)}. After `warmup` untimed steps of each (side, P),
    each of `rounds` rounds runs `block` timed steps of every (side, P), the
    order rotating by one pair per round. Returns (records, memory): records
    is a list of dicts (side, P, round, seconds), one per step; memory maps a
    side to its PeakMemory over its timed steps.
    """
    units = [(side, P) for side in steps for P in sizes]
    for side, P in units:
        for _ in range(warmup):
            steps[side](P)
    common.synchronize(device)
    memory = {side: common.PeakMemory(device) for side in steps}
    records = []
    for round_idx in range(rounds):
        shift = round_idx % len(units)
        for side, P in units[shift:] + units[:shift]:
            with memory[side].measure():
                for _ in range(block):
                    common.synchronize(device)
                    start = clock()
                    steps[side](P)
                    common.synchronize(device)
                    records.append(dict(side=side, P=P, round=round_idx, seconds=clock() - start))
    return records, memory


def side_rates(records, side, batch, multipliers, resolution, latent, real_ps):
    """The numbers of one side (module docstring): step seconds by patch size,
    and per real_p (float_key) sec_per_step, nimg_per_step and kimg_per_s.
    multipliers: {P: images per step / batch} of the side."""
    sec_by_patch, steps_by_patch = mean_seconds_by_patch([r for r in records if r['side'] == side])
    row = dict(sec_per_step_by_patch={str(P): s for P, s in sec_by_patch.items()},
               steps_by_patch={str(P): n for P, n in steps_by_patch.items()},
               multipliers={str(P): m for P, m in sorted(multipliers.items())},
               sec_per_step={}, nimg_per_step={}, kimg_per_s={})
    for real_p in real_ps:
        schedule, key = PatchSchedule(resolution, real_p, latent=latent), float_key(real_p)
        seconds = expected_per_step(schedule, sec_by_patch)
        nimg = batch * expected_per_step(schedule, multipliers)
        row['sec_per_step'][key], row['nimg_per_step'][key] = seconds, nimg
        row['kimg_per_s'][key] = nimg / seconds / 1e3 if seconds else None
    return row


RATIO_NAMES = (('ours', 'ours_vs_official'), ('ours_official_precision', 'ours_at_official_precision_vs_official'))


def ratios(rows, real_ps):
    """{ours_vs_official_kimg_per_s_realp<p>: ours / official, ...} (None where a side has no number)."""
    out = {}
    for real_p in real_ps:
        key = float_key(real_p)
        official = rows['official']['kimg_per_s'][key]
        for side, name in RATIO_NAMES:
            mine = rows[side]['kimg_per_s'][key]
            out[f'{name}_kimg_per_s_realp{key}'] = mine / official if mine and official else None
    return out


def precision_of(trainer):
    """'bf16', 'fp16' or 'fp32': how our Trainer runs its network."""
    if getattr(trainer, 'autocast', {}).get('enabled'):
        return 'bf16'
    return 'fp16' if getattr(trainer.net, 'use_fp16', False) and trainer.device.type == 'cuda' else 'fp32'


# ----------------------------------------------------------------------------
# Timing sampling.


def randomize_weights(net, seed):
    """Move every parameter by seeded noise (10% of its RMS, 0.01 for zero-initialised
    ones), so that a fresh UNet's output depends on its input."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in net.parameters():
            rms = float(param.square().mean().sqrt()) if param.numel() else 0.0
            param.add_(torch.randn(param.shape, generator=generator) * (0.1 * rms if rms > 1e-3 else 1e-2))


def write_official_pickle(code, net_kwargs, path, seed=0):
    """A network pickle of a fresh official Patch_EDMPrecond with random weights,
    written by the official persistence as the official loop writes snapshots."""
    with code.active():
        torch.manual_seed(seed)
        net = code.Patch_EDMPrecond(**net_kwargs)
        randomize_weights(net, seed)
        net.eval().requires_grad_(False)
        with open(path, 'wb') as f:
            pickle.dump(dict(ema=net, loss_fn=code.Patch_EDMLoss(), augment_pipe=None, dataset_kwargs={}), f)


def load_official_pickle(code, path, device):
    """The network of a pickle as the official generate.py loads it."""
    with code.active(), open(path, 'rb') as f:
        return pickle.load(f)['ema'].to(device)


def official_grid(resolution, batch_size, device):
    """The official generate.py's coordinate input [N, 2, R, R]: x then y,
    (index / (R - 1) - 0.5) * 2 computed from int64 indices."""
    values = (torch.arange(resolution) / (resolution - 1) - 0.5) * 2
    grid = torch.stack([values[None, :].expand(resolution, resolution), values[:, None].expand(resolution, resolution)])
    return grid.to(device)[None].repeat(batch_size, 1, 1, 1)


def official_generate(code, net, seeds, batch_size, steps, device):
    """The official generate.py's loop around its edm_sampler, in one process:
    (uint8 images [N, C, R, R] on the CPU, float64 samples of the first batch)."""
    info, resolution = network_info(net), net.img_resolution
    images, first = [], None
    for batch_seeds in generation.rank_batches(list(seeds), batch_size):
        n = len(batch_seeds)
        rnd = generation.StackedRandomGenerator(device, batch_seeds)
        noise = rnd.randn([n, info.img_channels, resolution, resolution], device=device)
        labels = generation.random_class_labels(rnd, info.label_dim, n, device=device)
        x = code.edm_sampler(net, noise, official_grid(resolution, n, device), False, labels, None,
                             randn_like=rnd.randn_like, num_steps=steps)
        first = x if first is None else first
        images.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).cpu())
    return torch.cat(images), first


def ours_generate(net, seeds, batch_size, steps, device):
    """Our generate.py path: uint8 images [N, C, R, R] on the CPU."""
    batches = generation.generate_images(net, list(seeds), batch_size, device=device, num_steps=steps)
    return torch.cat([images.cpu() for _seeds, images in batches])


def ours_float_samples(net, seeds, steps, device):
    """Our float64 samples of one batch of `seeds`: generate_images's sampler before the uint8 conversion."""
    info, region = network_info(net), sampling_region(net)
    rnd = generation.StackedRandomGenerator(device, seeds)
    noise = rnd.randn([len(seeds), info.img_channels, *region.size], device=device)
    labels = generation.random_class_labels(rnd, info.label_dim, len(seeds), device=device)
    sampler, kwargs = samplers.select_sampler(num_steps=steps)
    return sampler(make_denoiser(net, labels, 1.0, region), noise, rnd.randn_like, **kwargs)


def measure_sampling(code, path, num, batch_size, steps, rounds, device, clock=time.perf_counter):
    """Images/s of both sides on the pickle `path`, `rounds` alternating rounds of
    `num` images (seeds round * num ..), and how their outputs compare."""
    ours_net, _meta = snapshots.load_network(path, device=device)
    official_net = load_official_pickle(code, path, device)
    check = list(range(min(batch_size, num)))   # also the warm-up of both sides
    mine = ours_float_samples(ours_net, check, steps, device)
    theirs = official_generate(code, official_net, check, batch_size, steps, device)[1]
    ours_generate(ours_net, check, batch_size, steps, device)
    runs = dict(ours=lambda seeds: ours_generate(ours_net, seeds, batch_size, steps, device),
                official=lambda seeds: official_generate(code, official_net, seeds, batch_size, steps, device)[0])
    seconds = dict(ours=0.0, official=0.0)
    level_diff = 0
    for round_idx in range(rounds):
        seeds = range(round_idx * num, (round_idx + 1) * num)
        images = {}
        for side in (list(runs) if round_idx % 2 == 0 else list(runs)[::-1]):
            common.synchronize(device)
            start = clock()
            images[side] = runs[side](seeds)
            common.synchronize(device)
            seconds[side] += clock() - start
        level_diff = max(level_diff, int((images['ours'].to(torch.int16) - images['official'].to(torch.int16))
                                         .abs().max()))
    return dict(steps=steps, nfe_per_image=2 * steps - 1, num=num, batch=batch_size, rounds=rounds,
                resolution=int(official_net.img_resolution), seconds=seconds,
                images_per_s={side: num * rounds / s if s else None for side, s in seconds.items()},
                bit_equal=bool(torch.equal(mine, theirs)), max_abs_diff=float((mine - theirs).abs().max()),
                uint8_equal=level_diff == 0, uint8_max_level_diff=level_diff)


# ----------------------------------------------------------------------------
# Command line.


def resolved_options(preset, dataset, device, **options):
    """The resolved options (training.config.build_config) of the preset's options, then
    `options`, as bench_common.make_trainer resolves them."""
    options = {**preset.options, 'duration': common.DURATION_MIMG, 'workers': 0, **options, 'device': str(device)}
    return config.build_config(options, dataset)


def train_side_by_side(code, preset, dataset, real_ps, fp16, options, rounds, block, warmup, device):
    """Build the sides, time them (`measure`) and summarize: (rows by side, facts, notes)."""
    base = dict(options, real_p=min(real_ps))
    at_official = dict(base, fp16=fp16, bf16=False)
    same_precision = all(resolved_options(preset, dataset, device, **base)[key] ==
                         resolved_options(preset, dataset, device, **at_official)[key]
                         for key in ('network_kwargs', 'performance_kwargs'))
    official = OfficialTrainer(code, resolved_options(preset, dataset, device, **at_official), dataset, device, fp16)
    trainers = dict(ours=common.make_trainer(preset, dataset, device, **base))
    if not same_precision:
        trainers['ours_official_precision'] = common.make_trainer(preset, dataset, device, **at_official)
    ours = trainers['ours']
    resolution, latent = ours.schedule.resolution, ours.encoder is not None
    sizes = sorted(set().union(*(PatchSchedule(resolution, p, latent=latent).sizes for p in real_ps)))
    steps = dict(official=official_step_at(official), **{side: ours_step_at(t) for side, t in trainers.items()})
    print(f'timing {rounds} rounds x {block} steps of each side at {", ".join(f"{P}px" for P in sizes)}, '
          f'after {warmup} warm-up steps each...', flush=True)
    records, memory = measure(steps, sizes, rounds, block, warmup, device)

    ours_multipliers = {P: ours.schedule.multiplier(P) for P in sizes}
    rows = dict(official=side_rates(records, 'official', official.batch_size, official.batch_mul, resolution,
                                    latent, real_ps))
    rows['official']['precision'] = 'fp16' if fp16 and torch.device(device).type == 'cuda' else 'fp32'
    for side, trainer in trainers.items():
        rows[side] = side_rates(records, side, trainer.batch_size, ours_multipliers, resolution, latent, real_ps)
        rows[side]['precision'] = precision_of(trainer)
    if same_precision:
        rows['ours_official_precision'] = rows['ours']
    for side in steps:
        rows[side].update(peak_mem_gb=gib(memory[side].peak), step_mem_gb=gib(memory[side].growth))
    params = dict(official=sum(p.numel() for p in official.net.parameters()),
                  ours=sum(p.numel() for p in ours.net.parameters()))
    notes = list(official.notes)
    if params['official'] != params['ours']:
        notes.append(f'the networks differ: {params["official"]} official parameters, {params["ours"]} ours')
    if official.dropped_options:
        notes.append(f'options the official UNet does not take, left out there: {official.dropped_options}')
    facts = dict(batch=ours.batch_size, batch_gpu=ours.batch_gpu, resolution=resolution, latent=latent,
                 channels=int(ours.net.img_channels), arch=preset.options['arch'], params=params, sizes=sizes,
                 official_rounds=official.num_rounds, ours_defaults_are_official_precision=same_precision,
                 official_network_kwargs=official.net_kwargs)
    return rows, facts, notes


class RealPList(dnnlib.util.FloatList):
    """Distinct real_p values in [0, 1], given as e.g. 1,0.5."""

    def convert(self, value, param, ctx):
        values = super().convert(value, param, ctx)
        if any(not 0 <= p <= 1 for p in values) or len(set(values)) != len(values):
            self.fail(f'{value!r}: give distinct values in [0, 1]', param, ctx)
        return values


def pick_device(device_name, fp16):
    """The device to run on (default: CUDA if available); ClickException where it cannot work."""
    device = torch.device(device_name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda but CUDA is not available; use --device=cpu')
    if fp16 and device.type != 'cuda':
        raise click.ClickException('--fp16 runs the networks in fp16 on CUDA only; leave it out on CPU')
    return device


def _fmt(value, spec):
    return 'n/a' if value is None else format(value, spec)


def print_training(rows, sizes, real_ps, mem_kind):
    mem_label = 'peak GPU alloc' if mem_kind.startswith('cuda') else 'peak RSS'
    print('training: seconds per step by patch size; kimg/s by real_p')
    for side in SIDES:
        row = rows[side]
        if side == 'ours_official_precision' and row is rows['ours']:
            print(f'  {side:24s} = ours (our defaults are the official precision)')
            continue
        times = ' '.join(f'{P}px {_fmt(row["sec_per_step_by_patch"].get(str(P)), ".4f")}' for P in sizes)
        rates = ' '.join(f'real_p {p:g}: {_fmt(row["kimg_per_s"][float_key(p)], ".4f")}' for p in real_ps)
        print(f'  {side:24s} {row["precision"]:5s} {times} | {rates} | {mem_label} {row["peak_mem_gb"]:.3f} GiB')


def int_option(name, minimum, default, help_text):
    """A click option taking an integer >= minimum (default None: not given)."""
    return click.option(name, metavar='INT', type=click.IntRange(min=minimum), default=default,
                        show_default=default is not None, help=help_text)


@click.command()
@click.option('--official', 'official_dir', metavar='DIR', type=click.Path(file_okay=False), required=True,
              help='A checkout of the official Patch Diffusion repository')
@click.option('--preset', type=click.Choice(sorted(common.PRESETS)), default='cpu-small', show_default=True,
              help='Network, batch and data (bench_common.PRESETS)')
@click.option('--data', metavar='ZIP|DIR', type=str, help='Dataset  [default: the preset\'s demo shapes or random '
              'latents]')
@int_option('--max-size', 1, None, 'Use at most this many images')
@click.option('--real-p', 'real_ps', metavar='LIST', type=RealPList(), default='1,0.5', show_default=True,
              help='real_p values to report, e.g. 1,0.5')
@click.option('--fp16', is_flag=True, help='The official precision is its --fp16=1 (CUDA only)  [default: fp32]')
@int_option('--batch', 1, None, 'Total batch  [default: the preset\'s]')
@int_option('--batch-gpu', 1, None, 'Images per round  [default: the preset\'s]')
@int_option('--rounds', 1, 2, 'Timed rounds')
@int_option('--block', 1, 2, 'Timed steps of each side at each patch size in a round')
@int_option('--warmup', 0, 1, 'Untimed steps of each side at each patch size, first')
@int_option('--sample-steps', 2, 18, 'Sampler steps N (2N - 1 network calls per image)')
@int_option('--sample-batch', 1, 16, 'Sampling batch size')
@int_option('--sample-num', 1, None, 'Images per side in each sampling round  [default: --sample-batch]')
@int_option('--sample-rounds', 0, 2, 'Sampling rounds (0: no sampling)')
@click.option('--network', 'network_path', metavar='PKL', type=str,
              help='Sample this official-format network pickle  [default: a fresh official network of the preset]')
@click.option('--device', 'device_name', metavar='STR', help='cpu, cuda or cuda:N  [default: cuda if available]')
@int_option('--threads', 1, None, 'torch CPU threads  [default: torch\'s]')
@int_option('--workers', 0, 0, 'DataLoader worker processes of each side')
@int_option('--seed', 0, 0, 'Seed of the data order, weights and draws')
@click.option('--json', 'json_path', metavar='PATH', type=str, help='Also write the JSON summary to this file')
def main(official_dir, preset, data, max_size, real_ps, fp16, batch, batch_gpu, rounds, block, warmup, sample_steps,
         sample_batch, sample_num, sample_rounds, network_path, device_name, threads, workers, seed, json_path):
    """Training kimg/s and sampling images/s of this code against the official code in DIR."""
    device = pick_device(device_name, fp16)
    try:
        code = OfficialCode(official_dir)
    except OSError as err:
        raise click.ClickException(str(err)) from None
    common.set_threads(threads)
    set_backend_flags(device)
    info = common.machine_info(device)
    print(f'bench_vs_official {preset}: {common.describe_machine(info)}', flush=True)
    print(f'official code: {code.directory} (commit {code.commit or "unknown"}); stand-in modules for its unused '
          f'imports: {", ".join(code.stubbed_imports) or "none"}', flush=True)
    options = dict(seed=seed, workers=workers)
    options.update({key: value for key, value in (('batch', batch), ('batch_gpu', batch_gpu)) if value})

    chosen = common.PRESETS[preset]
    with tempfile.TemporaryDirectory(prefix='bench-vs-official-') as workdir:
        try:
            dataset = common.benchmark_dataset(chosen, data, workdir, max_size=max_size)
            rows, facts, notes = train_side_by_side(code, chosen, dataset, real_ps, fp16, options, rounds, block,
                                                    warmup, device)
        except (OSError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        mem_kind = common.PeakMemory(device).kind
        print(f'network {facts["arch"]}: {facts["params"]["ours"] / 1e6:.2f}M parameters (official '
              f'{facts["params"]["official"] / 1e6:.2f}M), batch {facts["batch"]} in rounds of {facts["batch_gpu"]}')
        print_training(rows, facts['sizes'], real_ps, mem_kind)
        summary = dict(preset=preset, official_dir=code.directory, official_commit=code.commit,
                       stubbed_imports=code.stubbed_imports, real_p=real_ps, rounds=rounds, block=block,
                       warmup=warmup, seed=seed, workers=workers, **facts)
        training_ratios = ratios(rows, real_ps)
        summary.update(training_ratios, sides=rows, mem_kind=mem_kind)

        if sample_rounds:
            path = network_path or os.path.join(workdir, 'official-network.pkl')
            try:
                if network_path is None:
                    net_kwargs = dict(facts['official_network_kwargs'], use_fp16=fp16)
                    write_official_pickle(code, net_kwargs, path, seed)
                sampling = measure_sampling(code, path, sample_num or sample_batch, sample_batch, sample_steps,
                                            sample_rounds, device)
            except (OSError, ValueError) as err:
                raise click.ClickException(str(err)) from None
            sampling['network'] = network_path or 'fresh official network of the preset, random weights'
            rates = sampling['images_per_s']
            ratio = rates['ours'] / rates['official'] if rates['ours'] and rates['official'] else None
            print(f'sampling {sampling["num"]} x {sample_rounds} images, {sample_steps} steps, batch {sample_batch}: '
                  f'ours {_fmt(rates["ours"], ".3f")} images/s, official {_fmt(rates["official"], ".3f")} images/s '
                  f'({_fmt(ratio, ".2f")}x); float64 samples bit-equal: {sampling["bit_equal"]} (max |difference| '
                  f'{sampling["max_abs_diff"]:.3g}); uint8 images equal: {sampling["uint8_equal"]}')
            summary['sampling'] = sampling
            summary['ours_vs_official_sampling_images_per_s'] = ratio
            summary['sampling_bit_equal'] = sampling['bit_equal']
            summary['sampling_max_abs_diff'] = sampling['max_abs_diff']
    for note in notes:
        print(f'note: {note}')
    for key, value in training_ratios.items():
        print(f'{key}: {_fmt(value, ".2f")}x')
    summary.update(notes=notes, **info, loadavg_end=[round(x, 2) for x in os.getloadavg()])
    common.emit_summary(summary, json_path)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
