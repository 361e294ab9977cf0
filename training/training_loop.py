"""The training loop: patch-wise EDM training (SPEC.md sections 1 and 2).

One step:
  1. Every rank draws the SAME patch size P for the step (seeded by seed and
     step), so ranks do equal work; the batch multiplier m = R / P.
  2. Each accumulation round loads m * batch_gpu full images, augments them
     (before cropping, so coordinates stay true), crops one random P x P
     patch per image with its coordinate grid, and backpropagates the loss,
     normalised per image. --batch-gpu bounds the pixels of a round, not its
     images: a patch step packs up to m of the batch_gpu rounds into one
     (`round_plan`), so its rounds, and their fixed per-round cost of
     launching the network's kernels, shrink with its work.
  3. Non-finite gradients skip the optimizer step and are counted (never
     zeroed silently); too many stop the run.
  4. Adam with learning-rate ramp-up, then an EMA update with a half-life in
     images and ramp-up.
The progress counter adds batch * E[m] images per step. All randomness of a
step comes from generators seeded by (seed, rank, step), so a resumed run
continues exactly as if it had never stopped.
"""

import contextlib
import copy
import json
import os
import pickle
import re
import time
import zipfile

import numpy as np
import psutil
import torch

import dnnlib
from dnnlib.util import atomic_path, atomic_write
from torch_utils import distributed as dist
from torch_utils import misc, training_stats
from training import networks, patching
from training.loss import LOSSES

STATE_RE = re.compile(r'^training-state-(\d+)\.pt$')


# ----------------------------------------------------------------------------
# Construction from the resolved options (the dicts in training_options.json).

def dataset_classes():
    """Explicit registry of dataset classes by the name stored in snapshots."""
    from training import dataset
    return {'training.dataset.ImageFolderDataset': dataset.ImageFolderDataset,
            'training.dataset.LatentDataset': dataset.LatentDataset}


def build_dataset(dataset_kwargs):
    kwargs = dict(dataset_kwargs)
    name = kwargs.pop('class_name', 'training.dataset.ImageFolderDataset')
    classes = dataset_classes()
    if name not in classes:
        raise ValueError(f'Unknown dataset class {name!r}; known: {", ".join(classes)}')
    return classes[name](**kwargs)


def build_network(network_kwargs, img_resolution, img_channels, label_dim):
    kwargs = dict(network_kwargs)
    precond = kwargs.pop('precond')
    return networks.PRECONDITIONERS[precond](img_resolution=img_resolution, img_channels=img_channels,
                                             label_dim=label_dim, **kwargs)


def build_loss(loss_kwargs):
    kwargs = dict(loss_kwargs)
    return LOSSES[kwargs.pop('loss')](**kwargs)


def build_augment_pipe(augment_kwargs):
    if not augment_kwargs:
        return None
    from training.augment import AugmentPipe
    return AugmentPipe(**augment_kwargs)


def step_seed(seed, rank, step):
    """A 63-bit seed for the randomness of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]) >> 1


# ----------------------------------------------------------------------------
# Files.

SNAPSHOT_FORMATS = ('pkl', 'safetensors', 'both')


def find_latest_state(run_dir):
    """Path of the newest readable training-state-*.pt in run_dir, or None.

    States are named by whole kimg; a newer state of the same kimg replaces
    the older one atomically, so the highest number is the newest. A state
    that cannot be read (truncated by something outside this code: our own
    writes are atomic) is skipped for the previous one, with a note.
    """
    if not os.path.isdir(run_dir):
        return None
    states = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := STATE_RE.match(name)))
    for _, name in reversed(states):
        path = os.path.join(run_dir, name)
        try:
            load_state(path, mmap=True)
        except ValueError as err:
            print(f'Skipping unreadable training state: {err}')
            continue
        return path
    return None


@contextlib.contextmanager
def _writing(path):
    """Turn an OSError while writing `path` (disk full, no permission) into
    one that names the file and says that the files before it are intact."""
    try:
        yield
    except OSError as err:
        raise OSError(err.errno, f'Cannot write {path}: {err.strerror or err}. The earlier snapshots and '
                                 f'training states are untouched; free space or fix the folder, then run '
                                 f'the same command again to resume') from err


def save_snapshot(path, ema, loss_fn, augment_pipe, dataset_kwargs, extra=None, snapshot_format='pkl'):
    """Write a network snapshot, atomically: `path` (a .pkl in EDM's layout,
    plus our extra keys) and/or, with snapshot_format 'safetensors' or
    'both', the same name with .safetensors (loadable without unpickling).
    Returns the paths written."""
    if snapshot_format not in SNAPSHOT_FORMATS:
        raise ValueError(f'snapshot_format={snapshot_format!r}; choose one of {", ".join(SNAPSHOT_FORMATS)}')
    from training import sampling
    ema = copy.deepcopy(ema).eval().requires_grad_(False).cpu().to(memory_format=torch.contiguous_format)
    data = dict(ema=ema, loss_fn=loss_fn,
                augment_pipe=augment_pipe, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
    data.update(extra or {})
    paths = []
    if snapshot_format in ('pkl', 'both'):
        with _writing(path), atomic_write(path) as f:
            pickle.dump(data, f)
        paths.append(path)
    if snapshot_format in ('safetensors', 'both'):
        st_path = os.path.splitext(path)[0] + '.safetensors'
        with _writing(st_path):
            sampling.save_network_safetensors(st_path, data['ema'], data)
        paths.append(st_path)
    return paths


def save_state(path, trainer, cur_tick):
    """Write a training state of plain tensors (loadable with weights_only=True).

    No RNG state is needed: every random draw of step k is seeded by
    (seed, rank, k), and `consumed` positions the data sampler.
    """
    state = dict(trainer.state_dict(), cur_tick=cur_tick, format='patch-diffusion-state-v1')
    with _writing(path), atomic_path(path) as tmp:
        torch.save(state, tmp)


def transfer_weights(path_or_url, net):
    """Copy the weights of the network of a snapshot into `net` by name.

    Works with our .pkl and .safetensors snapshots and EDM's and the
    official Patch Diffusion pickles (same parameter names). Returns
    (copied, missing) names. ValueError naming the file if it is not a
    readable snapshot.
    """
    from training import sampling
    source, _ = sampling.load_network(path_or_url)
    return misc.copy_params_and_buffers(source, net)


def load_state(path, mmap=False):
    """A training state written by save_state, with weights_only=True (no code
    runs). mmap=True maps the tensors instead of reading them: a cheap check
    of a file's structure. ValueError naming the file if it is unreadable."""
    advice = 'The file may be truncated; resume from an earlier training-state-*.pt with --resume'
    if not os.path.isfile(path):
        raise ValueError(f'Cannot read training state {path}: no such file')
    if not zipfile.is_zipfile(path):   # torch.save writes a zip archive; its directory is at the end
        raise ValueError(f'Cannot read training state {path}: not a complete torch.save archive. {advice}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(f'Cannot read training state {path}: {" ".join(str(err).split())}. {advice}') from err
    if not isinstance(state, dict) or state.get('format') != 'patch-diffusion-state-v1':
        raise ValueError(f'{path} is not a training state written by this code')
    return state


def run_on_rank0(fn):
    """fn() on rank 0 alone, also a barrier. Returns its result on rank 0 and
    None elsewhere. An error on rank 0 is raised on every rank (as a
    RuntimeError on the others), so that no rank waits for it forever."""
    result, failure = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:   # raised again below, after the other ranks have been told
            failure = err
    message = dist.broadcast_object(None if failure is None else ' '.join(str(failure).split()))
    if failure is not None:
        raise failure
    if message is not None:
        raise RuntimeError(f'Rank 0 failed: {message}')
    return result


def _test_exit_step(rank):
    """TEST HOOK, inert unless PD_TEST_EXIT_AT='RANK:STEP' is set: the step
    before which process RANK exits abruptly (os._exit(1)), as if killed, on
    torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT unset or 0).
    Returns that step for this rank, or None."""
    spec = os.environ.get('PD_TEST_EXIT_AT')
    if not spec or os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0':
        return None
    exit_rank, exit_step = (int(v) for v in spec.split(':'))
    return exit_step if exit_rank == rank else None


# ----------------------------------------------------------------------------

class _Batches:
    """Full-image batches of `batch_gpu` images from an infinite, resumable sampler.

    `consumed` counts the images this rank has taken; a new _Batches with the
    same `consumed` continues the same sequence.
    """

    def __init__(self, dataset, batch_gpu, seed, consumed, data_loader_kwargs):
        self.batch_gpu = batch_gpu
        self.consumed = consumed
        sampler = misc.InfiniteSampler(dataset, rank=dist.get_rank(), num_replicas=dist.get_world_size(),
                                       seed=seed, start=consumed)
        self._iter = iter(torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_gpu,
                                                      **data_loader_kwargs))

    def take(self, count, device=torch.device('cpu')):
        """`count` batches concatenated on `device`: (images uint8 [count*b, C, H, W], labels).

        Each batch is copied on its own, so that batches the loader pinned
        travel to a GPU without the host waiting, and are joined there.
        """
        parts = [next(self._iter) for _ in range(count)]
        self.consumed += count * self.batch_gpu
        images = [p[0].to(device, non_blocking=True) for p in parts]
        labels = [p[1].to(device, non_blocking=True) for p in parts]
        return torch.cat(images), torch.cat(labels)


def _tensorboard_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(run_dir)


class Trainer:
    """Everything a training step needs, and the step itself.

    Built from the resolved options; `step()` runs one optimizer step (all
    accumulation rounds) and returns its patch size. The training loop, the
    tests and benchmarks/bench_train.py all drive this same code path.
    """

    def __init__(self, dataset_kwargs=None, data_loader_kwargs=None, network_kwargs=None, loss_kwargs=None,
                 optimizer_kwargs=None, augment_kwargs=None, patch_kwargs=None, seed=0, batch_size=512,
                 batch_gpu=None, total_kimg=200000, ema_halflife_kimg=500, ema_rampup_ratio=0.05,
                 lr_rampup_kimg=10000, loss_scaling=1, precision='fp32', device=torch.device('cpu'),
                 latent_kwargs=None, dataset=None, channels_last=False, compile_kwargs=None):
        self.device = device = torch.device(device)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.seed, self.rank = seed, rank
        patch_kwargs = dict(patch_kwargs or {})
        optimizer_kwargs = dict(optimizer_kwargs or dict(lr=10e-4, betas=(0.9, 0.999), eps=1e-8))

        # Batch geometry: each rank runs num_rounds rounds of batch_gpu full images (x m for patches).
        if batch_size % world:
            raise ValueError(f'--batch={batch_size} is not divisible by the number of processes ({world})')
        self.batch_gpu_total = batch_size // world
        self.batch_gpu = min(batch_gpu or self.batch_gpu_total, self.batch_gpu_total)
        if self.batch_gpu_total % self.batch_gpu:
            raise ValueError(f'The batch per process ({self.batch_gpu_total}) is not divisible by '
                             f'--batch-gpu={self.batch_gpu}')
        self.num_rounds = self.batch_gpu_total // self.batch_gpu   # rounds of a full-image step

        self.dataset = dataset if dataset is not None else build_dataset(dataset_kwargs)
        # Latent space: a pre-encoded archive, or raw images encoded on the fly (SPEC section 2).
        from training import latents
        self.encoder = latents.latent_encoder(self.dataset, patch_kwargs.get('latent', False), device=device,
                                              **(latent_kwargs or {}))
        if self.encoder is not None:
            resolution, channels = self.encoder.info.latent_resolution, self.encoder.info.latent_channels
            if augment_kwargs:
                raise ValueError('Augmentation (--augment) works on pixels; use --augment=0 in latent space')
        else:
            resolution, channels = self.dataset.resolution, self.dataset.num_channels
        self.schedule = patching.PatchSchedule(resolution, patch_kwargs.get('real_p', 1.0),
                                               latent=self.encoder is not None,
                                               progressive=patch_kwargs.get('progressive', False), seed=seed)
        self.nimg_per_step = batch_size * self.schedule.expected_multiplier   # image accounting, SPEC section 2
        self.total_nimg = max(int(total_kimg * 1000), 1)

        torch.manual_seed(seed)   # the same initial weights on every rank and in every run with this seed
        self.net = build_network(network_kwargs, resolution, channels, self.dataset.label_dim)
        # Inputs stay as they are (the noise drawn for them keeps its values): a convolution
        # with channels-last weights returns channels-last activations from the first layer on.
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.train().requires_grad_(True).to(device, memory_format=memory_format)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.loss_fn = build_loss(loss_kwargs)
        self.augment_pipe = build_augment_pipe(augment_kwargs)
        # Fused Adam skips a step with non-finite gradients on the device (found_inf) and
        # undoes the loss scaling (grad_scale) in its kernel: the step never waits for the device.
        self.optimizer = torch.optim.Adam(self.net.parameters(), fused=True, **optimizer_kwargs)
        self.optimizer.grad_scale = torch.full((), float(loss_scaling), device=device) if loss_scaling != 1 else None
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._last_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.base_lr = optimizer_kwargs['lr']
        self.ema_halflife_kimg, self.ema_rampup_ratio = ema_halflife_kimg, ema_rampup_ratio
        self.lr_rampup_kimg, self.loss_scaling = lr_rampup_kimg, loss_scaling
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=(precision == 'bf16'))
        self.ddp = self.net
        if world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)
        if compile_kwargs is not None:   # one graph per patch shape; the parameters stay those of self.net
            self.ddp = torch.compile(self.ddp, **compile_kwargs)
        self.data_loader_kwargs = data_loader_kwargs or dict(num_workers=0)
        self.step_count = 0
        self.batches = None

    @property
    def bad_steps(self):
        """Steps whose gradients were not finite (skipped). Reads the device: call at ticks."""
        return int(self._bad_steps.item())

    @property
    def last_bad_step(self):
        """0-based index of the newest step with non-finite gradients, or None."""
        value = int(self._last_bad_step.item())
        return None if value < 0 else value

    def round_plan(self, m):
        """(rounds, loader batches per round) of a step with multiplier m.

        A full-image round holds batch_gpu images of R x R pixels. A patch
        round may hold m times as many P x P patches in the same pixels
        (m P^2 = R P <= R^2), so g = the largest divisor of num_rounds that is
        <= m rounds are merged into one: fewer, fuller rounds, same images,
        same loss. E.g. 4 rounds at P = R: 4; at R/2: 2; at R/4: 1.
        """
        group = max(g for g in range(1, min(m, self.num_rounds) + 1) if self.num_rounds % g == 0)
        return self.num_rounds // group, m * group

    def nimg_at(self, step):
        """Images counted after `step` steps: step * batch * E[m]."""
        return int(round(step * self.nimg_per_step))

    @property
    def cur_nimg(self):
        return self.nimg_at(self.step_count)

    def start_data(self, consumed=0):
        """(Re)start the data stream after `consumed` images of this rank."""
        self.batches = _Batches(self.dataset, self.batch_gpu, self.seed, consumed, self.data_loader_kwargs)

    def state_dict(self):
        return dict(net=self.net.state_dict(), ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                    step=self.step_count, consumed=self.batches.consumed if self.batches else 0, seed=self.seed)

    def load_state_dict(self, state):
        self.net.load_state_dict(state['net'])
        self.ema.load_state_dict(state['ema'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.step_count = int(state['step'])
        self.start_data(int(state['consumed']))

    def step(self):
        """One optimizer step. Returns the patch size it used."""
        if self.batches is None:
            self.start_data()
        step, device = self.step_count, self.device
        torch.manual_seed(step_seed(self.seed, self.rank, step))
        corner_gen = torch.Generator().manual_seed(step_seed(self.seed + 1, self.rank, step))
        P = self.schedule.draw(step, self.cur_nimg / self.total_nimg)   # the same on every rank
        m = self.schedule.multiplier(P)
        self.optimizer.zero_grad(set_to_none=True)
        rounds, batches_per_round = self.round_plan(m)
        for round_idx in range(rounds):
            with misc.ddp_sync(self.ddp, round_idx == rounds - 1):
                images, labels = self.batches.take(batches_per_round, device)
                if self.encoder is not None:
                    images = self.encoder(images)      # scaled latents, drawn with the step's seed
                else:
                    images = images.to(torch.float32) / 127.5 - 1
                augment_labels = None
                if self.augment_pipe is not None:
                    images, augment_labels = self.augment_pipe(images)   # full images, before cropping
                y, pos = patching.random_patches(images, P, corner_gen)
                with torch.autocast(**self.autocast):
                    loss = self.loss_fn(net=self.ddp, y=y, pos=pos if self.net.use_pos else None, labels=labels,
                                        augment_labels=augment_labels)
                training_stats.report('Loss/loss', loss)
                # Mean over the m * batch images of each image's summed pixel loss.
                loss.sum().mul(self.loss_scaling / (self.batch_gpu_total * m)).backward()

        # Non-finite gradients skip the update (counted on the device, never zeroed).
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if grads:
            found_inf = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all().logical_not()
            lr = self.base_lr
            if self.lr_rampup_kimg:
                lr *= min(self.nimg_at(step) / (self.lr_rampup_kimg * 1000), 1)
            for group in self.optimizer.param_groups:
                group['lr'] = lr
            self.optimizer.found_inf = found_inf.to(torch.float32)
            self.optimizer.step()
        else:
            found_inf = torch.ones((), dtype=torch.bool, device=device)
        self._bad_steps += found_inf
        self._last_bad_step = torch.where(found_inf, step, self._last_bad_step)
        self.step_count += 1

        # EMA with a half-life in images and ramp-up.
        halflife_nimg = self.ema_halflife_kimg * 1000
        if self.ema_rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, self.cur_nimg * self.ema_rampup_ratio)
        ema_beta = 0.5 ** (self.nimg_per_step / max(halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - ema_beta)
            for b_ema, b_net in zip(self.ema.buffers(), self.net.buffers()):
                b_ema.copy_(b_net)
        return P


def training_loop(
    run_dir='.',
    kimg_per_tick=50,
    snapshot_ticks=50,           # None = no snapshots
    state_dump_ticks=500,        # None = no training states
    transfer_pkl=None,           # copy weights by name from this network snapshot (.pkl or .safetensors)
    resume_state=None,           # training-state-*.pt to resume from
    cudnn_benchmark=True,
    max_bad_steps=20,            # steps with non-finite gradients tolerated before stopping
    sample_count=16,             # images in samples-NNNNNN.png at each snapshot (0 = none)
    metrics=(),                  # e.g. ('fid',)
    metric_kwargs=None,          # ref, num, detector for the metrics
    device=torch.device('cpu'),
    tensorboard=True,
    snapshot_format='pkl',       # 'pkl' (EDM's), 'safetensors' or 'both'
    **trainer_kwargs,            # see Trainer
):
    """Train; write snapshots, states and logs to `run_dir`. Returns the EMA network."""
    start_time = time.time()
    device = torch.device(device)
    rank = dist.get_rank()
    if snapshot_format not in SNAPSHOT_FORMATS:
        raise ValueError(f'snapshot_format={snapshot_format!r}; choose one of {", ".join(SNAPSHOT_FORMATS)}')
    if rank == 0:
        stale = dnnlib.util.remove_stale_temp_files(run_dir)
        if stale:
            print(f'Removed {len(stale)} unfinished temporary files of an interrupted run: {", ".join(stale)}')
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    dist.print0('Loading dataset and constructing network...')
    trainer = Trainer(device=device, **trainer_kwargs)
    dist.print0(f'Patch sizes: {trainer.schedule.describe()}; images counted per step {trainer.nimg_per_step:g}')
    if rank == 0:
        _print_network_summary(trainer)
    cur_tick = 0
    if transfer_pkl is not None:
        copied, missing = transfer_weights(transfer_pkl, trainer.net)
        misc.copy_params_and_buffers(trainer.net, trainer.ema)
        dist.print0(f'Transferred {len(copied)} tensors from "{transfer_pkl}"'
                    + (f'; {len(missing)} not in the source kept their initialisation' if missing else ''))
    if resume_state is not None:
        dist.print0(f'Resuming from "{resume_state}"...')
        state = load_state(resume_state)
        trainer.load_state_dict(state)
        cur_tick = int(state['cur_tick'])
        del state
    else:
        trainer.start_data()

    # Logs.
    stats_jsonl = os.path.join(run_dir, 'stats.jsonl') if rank == 0 else None
    writer = _tensorboard_writer(run_dir) if (rank == 0 and tensorboard) else None
    collector = training_stats.Collector(regex='.*', device=device)
    tick_start_nimg, tick_start_time = trainer.cur_nimg, time.time()
    maintenance_time = tick_start_time - start_time
    patch_counts = {}
    dist.print0(f'Training for {trainer.total_nimg / 1000:g} kimg...')
    dist.print0()
    exit_step = _test_exit_step(rank)

    while True:
        done = trainer.cur_nimg >= trainer.total_nimg
        if not done:
            if trainer.step_count == exit_step:
                os._exit(1)
            P = trainer.step()
            patch_counts[P] = patch_counts.get(P, 0) + 1
            done = trainer.cur_nimg >= trainer.total_nimg
        cur_nimg = trainer.cur_nimg
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue

        # Tick: statistics, console line, logs.
        tick_end_time = time.time()
        bad_steps = int(dist.all_reduce_sum(torch.tensor([float(trainer.bad_steps)], device=device)).item())
        training_stats.report0('Progress/tick', cur_tick)
        training_stats.report0('Progress/kimg', cur_nimg / 1e3)
        training_stats.report0('Progress/bad_steps', bad_steps)
        training_stats.report0('Timing/total_sec', tick_end_time - start_time)
        training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time)
        training_stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3)
        training_stats.report0('Timing/maintenance_sec', maintenance_time)
        cpu_mem_gb = psutil.Process(os.getpid()).memory_info().rss / 2**30
        training_stats.report0('Resources/cpu_mem_gb', cpu_mem_gb)
        if device.type == 'cuda':
            training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats()
        for P in trainer.schedule.sizes:
            training_stats.report0(f'Patches/steps_{P}px', patch_counts.get(P, 0))
        collector.update()
        stats = collector.as_dict()
        fields = [f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1e3:<9.3f}', f'loss {collector.mean("Loss/loss"):<8.4f}',
                  f'time {dnnlib.util.format_time(tick_end_time - start_time):<9s}',
                  f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
                  f'sec/kimg {collector.mean("Timing/sec_per_kimg"):<8.2f}',
                  f'maintenance {maintenance_time:<6.1f}', f'cpumem {cpu_mem_gb:<6.2f}']
        if device.type == 'cuda':
            fields.append(f'gpumem {collector.mean("Resources/peak_gpu_mem_gb"):<6.2f}')
        fields.append('patches ' + ' '.join(f'{P}:{patch_counts.get(P, 0)}' for P in trainer.schedule.sizes))
        if bad_steps:
            fields.append(f'bad_steps {bad_steps}')
        dist.print0('  '.join(fields))
        patch_counts = {}
        if stats_jsonl is not None:
            with _writing(stats_jsonl):
                dnnlib.util.append_line(stats_jsonl, json.dumps(dict(stats, timestamp=time.time())))
        if writer is not None:
            for name, value in stats.items():
                writer.add_scalar(name, value['mean'], global_step=int(cur_nimg / 1e3))
            writer.flush()
        if bad_steps > max_bad_steps:
            raise FloatingPointError(
                f'{bad_steps} training steps had non-finite gradients (limit --max-bad-steps={max_bad_steps}), '
                f'the last at step {trainer.last_bad_step}, tick {cur_tick}. The newest training state in {run_dir} '
                f'is from before: lower --lr, use --ls with --fp16, and resume from it')

        # Snapshots, sample grids, metrics, training states.
        kimg_tag = f'{cur_nimg // 1000:06d}'
        latent = dict(trainer.encoder.info) if trainer.encoder is not None else None   # plain data, never the VAE
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            def write_snapshot():
                save_snapshot(os.path.join(run_dir, f'network-snapshot-{kimg_tag}.pkl'), trainer.ema,
                              trainer.loss_fn, trainer.augment_pipe, trainer_kwargs.get('dataset_kwargs') or {},
                              extra=dict(patch_kwargs=dict(trainer_kwargs.get('patch_kwargs') or {}),
                                         **({'latent': latent} if latent else {})),
                              snapshot_format=snapshot_format)
                if sample_count:
                    _write_samples(trainer.ema, os.path.join(run_dir, f'samples-{kimg_tag}.png'), sample_count,
                                   device, latent)
            run_on_rank0(write_snapshot)
            if metrics:
                _run_metrics(trainer.ema, metrics, dict(metric_kwargs or {}, latent=latent), run_dir, kimg_tag, device)
                dist.barrier()
        if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and trainer.step_count > 0:
            run_on_rank0(lambda: save_state(os.path.join(run_dir, f'training-state-{kimg_tag}.pt'), trainer,
                                         cur_tick + 1))

        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if writer is not None:
        writer.close()
    dist.print0()
    dist.print0('Exiting...')
    return trainer.ema


def _print_network_summary(trainer):
    """EDM's table of the network's modules, parameters and output shapes (one full-size forward pass)."""
    net, n = trainer.net, min(trainer.batch_gpu, 4)
    R = trainer.schedule.resolution
    x = torch.zeros([n, net.img_channels, R, R], device=trainer.device)
    sigma = torch.ones([n], device=trainer.device)
    labels = torch.zeros([n, net.label_dim], device=trainer.device)
    with torch.no_grad():
        misc.print_module_summary(net, [x, sigma, None, labels], max_nesting=2)


def _write_samples(ema, path, count, device, latent=None):
    from training import sampling
    with _writing(path):
        sampling.sample_grid(ema, path, seeds=list(range(count)), device=device, latent=latent)


def _run_metrics(ema, metrics, metric_kwargs, run_dir, kimg_tag, device):
    from training import metrics as metrics_lib
    for metric in metrics:
        result = metrics_lib.calc_metric_for_network(metric, ema, device=device, **metric_kwargs)
        if dist.get_rank() == 0:
            line = json.dumps(dict(metric=metric, results=result, snapshot_kimg=int(kimg_tag), timestamp=time.time()))
            path = os.path.join(run_dir, f'metric-{metric}.jsonl')
            with _writing(path):
                dnnlib.util.append_line(path, line)
            dist.print0(f'{metric}: {result}')
