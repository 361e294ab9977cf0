"""The training loop: patch-wise EDM training (docs/DESIGN.md sections 2 and 3).

One step (`Trainer.step`):
  1. Every rank draws the SAME patch size P for the step (seeded by seed and
     step), so ranks do equal work; the batch multiplier m = R / P.
  2. Each accumulation round loads its share of the step's m * batch images, augments them
     (before cropping, so coordinates stay true), crops one random P x P
     patch per image with its coordinate grid, and backpropagates the loss,
     normalised per image. --batch-gpu bounds the pixels of a round, not its
     images: a patch step packs up to m of the batch_gpu rounds into one
     (`Trainer.round_plan`), so its rounds, and their fixed per-round cost
     of launching the network's kernels, shrink with its work.
  3. Non-finite gradients skip the optimizer step and are counted (never
     zeroed silently); too many stop the run.
  4. Adam with learning-rate ramp-up (and EDM2's inverse-square-root decay
     with --lr-decay), then an EMA update with a half-life in
     images and ramp-up.
The progress counter adds the images each step used, batch * m(P). All randomness of a
step comes from generators seeded by (seed, rank, step), so a resumed run
continues exactly as if it had never stopped.

`training_loop` runs steps in ticks; at the end of each tick training.outputs
reports (console, stats.jsonl, TensorBoard) and saves what is due
(snapshots, sample grids, metrics, training states). At every step boundary
all ranks ask training.stopping whether to stop (a signal, --max-minutes, a
lost torchrun agent); if so they write a training state and raise
`stopping.Stopped`.
"""

import contextlib
import copy
import functools
import os
import time

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc, training_stats
from training import latents, outputs, patching, phema, runs, snapshots, stopping
from training.architectures import build_network
from training.augment import AugmentPipe
from training.dataset import open_dataset
from training.denoiser import network_input_multiple
from training.loss import build_loss
from training.networks import image_shape


class StepOutOfMemory(MemoryError):
    """A training step ran out of device memory; the message says what to change."""


def step_seed(seed, rank, step):
    """A 63-bit seed for the randomness of (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]) >> 1


# ----------------------------------------------------------------------------
# One step.


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
        if data_loader_kwargs.get('num_workers'):   # workers leave SIGTERM etc. to the rank (training.stopping)
            data_loader_kwargs = dict(data_loader_kwargs, worker_init_fn=stopping.ForwardSignals(
                os.getpid(), data_loader_kwargs.get('worker_init_fn')))
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

    def close(self):
        """Stop the DataLoader's workers now rather than whenever the iterator is
        collected (an error's traceback may hold it): the training loop calls
        this while its signal handlers are still in place, so that a SIGTERM a
        worker passes on while being stopped finds one (training.stopping)."""
        shutdown = getattr(self._iter, '_shutdown_workers', None)   # absent without worker processes
        if shutdown is not None:
            shutdown()


class Trainer:
    """Everything a training step needs, and the step itself.

    Built from the resolved options; `step()` runs one optimizer step (all
    accumulation rounds) and returns its patch size. The training loop, the
    tests and benchmarks/bench_train.py all drive this same code path.
    """

    def __init__(self, dataset_kwargs=None, data_loader_kwargs=None, network_kwargs=None, loss_kwargs=None,
                 optimizer_kwargs=None, augment_kwargs=None, patch_kwargs=None, latent_kwargs=None,
                 performance_kwargs=None, seed=0, batch_size=512, batch_gpu=None, total_kimg=200000,
                 ema_halflife_kimg=500, ema_rampup_ratio=0.05, ema_stds=(), lr_rampup_kimg=10000, lr_decay_batches=0,
                 loss_scaling=1, device='cpu', dataset=None):
        """The resolved options of training.config.build_config (see there),
        on `device`; `dataset`: an opened dataset instead of dataset_kwargs.
        performance_kwargs: precision ('fp32' | 'bf16' autocast),
        channels_last, compile_kwargs (None: eager; else torch.compile's).
        ema_stds: relative widths of power-function EMAs kept besides the
        classic one (training.phema), on rank 0 only: they are only saved.
        lr_decay_batches: EDM2's decay (`learning_rate`), 0 = none."""
        self.device = device = torch.device(device)
        rank, world = dist.get_rank(), dist.get_world_size()
        self.seed, self.rank = seed, rank
        patch_kwargs = dict(patch_kwargs or {})
        optimizer_kwargs = dict(optimizer_kwargs or dict(lr=10e-4, betas=(0.9, 0.999), eps=1e-8))
        performance = {**dict(precision='fp32', channels_last=False, compile_kwargs=None), **(performance_kwargs or {})}

        # Batch geometry: each rank runs num_rounds rounds of batch_gpu full images (x m for patches).
        if batch_size % world:
            raise ValueError(f'--batch={batch_size} is not divisible by the number of processes ({world})')
        self.batch_gpu_total = batch_size // world
        self.batch_gpu = min(batch_gpu or self.batch_gpu_total, self.batch_gpu_total)
        if self.batch_gpu_total % self.batch_gpu:
            raise ValueError(f'The batch per process ({self.batch_gpu_total}) is not divisible by '
                             f'--batch-gpu={self.batch_gpu}')
        self.num_rounds = self.batch_gpu_total // self.batch_gpu   # rounds of a full-image step

        self.dataset = dataset if dataset is not None else open_dataset(dataset_kwargs)
        # Latent space: a pre-encoded archive, or raw images encoded on the fly (docs/DESIGN.md section 2).
        self.encoder = latents.latent_encoder(self.dataset, latent_kwargs, device)
        if self.encoder is not None:
            shape, channels = image_shape(self.encoder.info.latent_resolution), self.encoder.info.latent_channels
        else:
            shape, channels = tuple(self.dataset.image_shape[1:]), self.dataset.num_channels
        torch.manual_seed(seed)   # the same initial weights on every rank and in every run with this seed
        self.net = build_network(network_kwargs, shape, channels, self.dataset.label_dim)
        multiple = network_input_multiple(self.net)
        patching.check_image_shape(shape, multiple, 'latents' if self.encoder is not None else 'images')
        self.schedule = patching.PatchSchedule(shape, latent=self.encoder is not None, seed=seed, multiple=multiple,
                                               **dict(dict(real_p=1.0), **patch_kwargs))   # as config.patch_schedule
        self.batch_size = batch_size
        self.nimg_per_step = batch_size * self.schedule.expected_multiplier   # images per step on average
        self.total_nimg = max(int(total_kimg * 1000), 1)
        self.cur_nimg = 0   # images trained on: each step adds batch * m(P) (docs/DESIGN.md section 2)

        # Inputs stay as they are (the noise drawn for them keeps its values): a convolution
        # with channels-last weights returns channels-last activations from the first layer on.
        memory_format = torch.channels_last if performance['channels_last'] else torch.contiguous_format
        self.net.train().requires_grad_(True).to(device, memory_format=memory_format)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.ema_stds = phema.check_stds(ema_stds)
        self.phema = phema.PowerEMAs(self.net, self.ema_stds) if self.ema_stds and rank == 0 else None
        self.loss_fn = build_loss(loss_kwargs)
        self.augment_pipe = AugmentPipe(**augment_kwargs) if augment_kwargs else None
        # Fused Adam skips a step with non-finite gradients on the device (found_inf): the step never
        # waits for the device. As in EDM, Adam sees the gradients of the scaled loss (--ls), which
        # leaves the update as it is but divides the effective epsilon by the loss scale.
        self.optimizer = torch.optim.Adam(self.net.parameters(), fused=True, **optimizer_kwargs)
        self._bad_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._last_bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.base_lr = optimizer_kwargs['lr']
        self.ema_halflife_kimg, self.ema_rampup_ratio = ema_halflife_kimg, ema_rampup_ratio
        self.lr_rampup_kimg, self.lr_decay_batches, self.loss_scaling = lr_rampup_kimg, lr_decay_batches, loss_scaling
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=(performance['precision'] == 'bf16'))
        self.ddp = self.net
        if world > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False,
                process_group=dist.step_group())
        if performance['compile_kwargs'] is not None:   # one graph per patch shape; the parameters stay self.net's
            self.ddp = torch.compile(self.ddp, **performance['compile_kwargs'])
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

    def learning_rate(self, nimg):
        """The learning rate of a step after `nimg` images: --lr, divided by
        sqrt(max(nimg / (lr_decay_batches * batch), 1)) (EDM2's inverse
        square root decay; 0 = none), times the ramp-up min(nimg / lr_rampup, 1)."""
        lr = self.base_lr
        if self.lr_decay_batches:
            lr /= float(np.sqrt(max(nimg / (self.lr_decay_batches * self.batch_size), 1)))   # a float: states load weights-only
        if self.lr_rampup_kimg:
            lr *= min(nimg / (self.lr_rampup_kimg * 1000), 1)
        return lr

    def round_plan(self, m, merge=None):
        """(rounds, loader batches per round) of a step with multiplier m.

        A full-image round holds batch_gpu images of R x R pixels. A patch
        round may hold m times as many P x P patches in the same pixels
        (m P^2 = R P <= R^2), so g = the largest divisor of num_rounds that is
        <= m rounds are merged into one: fewer, fuller rounds, same images,
        same loss. E.g. 4 rounds at P = R: 4; at R/2: 2; at R/4: 1. `merge`
        (PatchSchedule.merge_limit) bounds g instead of m where m P^2 > R P
        (the official multipliers).
        """
        limit = min(merge or m, self.num_rounds)
        group = max(g for g in range(1, limit + 1) if self.num_rounds % g == 0)
        return self.num_rounds // group, m * group

    def start_data(self, consumed=0):
        """(Re)start the data stream after `consumed` images of this rank."""
        self.stop_data()
        self.batches = _Batches(self.dataset, self.batch_gpu, self.seed, consumed, self.data_loader_kwargs)

    def stop_data(self):
        """Stop the data stream's worker processes, if any."""
        if self.batches is not None:
            self.batches.close()

    def state_dict(self):
        state = dict(net=self.net.state_dict(), ema=self.ema.state_dict(), optimizer=self.optimizer.state_dict(),
                     step=self.step_count, nimg=self.cur_nimg, consumed=self.batches.consumed if self.batches else 0,
                     seed=self.seed)
        if self.data_fingerprint is not None:
            state['data'] = self.data_fingerprint
        if self.phema is not None:
            state['phema'] = self.phema.state_dict()
        return state

    @functools.cached_property
    def data_fingerprint(self):
        """The dataset's fingerprint (training.dataset), read once per run (a
        folder's is one stat per file), or None for datasets without one."""
        return self.dataset.fingerprint() if hasattr(self.dataset, 'fingerprint') else None

    def check_data(self, state, accept_changed_data=False):
        """ValueError if the dataset differs from the one `state` was trained on
        (its recorded fingerprint), unless accept_changed_data."""
        recorded, now = state.get('data'), self.data_fingerprint
        if recorded is None or now is None or recorded == now or accept_changed_data:
            return
        raise ValueError(f'The dataset changed since the training state was written: {now["items"]} files now, '
                         f'{recorded["items"]} then, and their names, sizes or checksums differ. Resuming on other '
                         f'data breaks the run\'s data order; restore the dataset, or add --accept-changed-data=1 to '
                         f'continue on the new one')

    def load_state_dict(self, state):
        self.net.load_state_dict(state['net'])
        self.ema.load_state_dict(state['ema'])
        self._load_phema(state.get('phema'))
        self.optimizer.load_state_dict(state['optimizer'])
        self.step_count = int(state['step'])
        # States written before images were counted per step hold no 'nimg': step * batch * E[m] then.
        self.cur_nimg = int(state['nimg']) if 'nimg' in state else int(round(self.step_count * self.nimg_per_step))
        self.start_data(int(state['consumed']))

    def _load_phema(self, recorded):
        """Load the power EMAs of a training state (`recorded`: its 'phema'
        entry or None); every rank checks that the widths are the options'."""
        phema.check_resumed_stds(recorded, self.ema_stds)
        if self.phema is not None:
            self.phema.load_state_dict(recorded)

    @contextlib.contextmanager
    def _out_of_memory_says_what(self, P, round_idx, rounds, batches_per_round):
        """Turn a CUDA out-of-memory error in a round into one that names the round,
        the memory and the --batch-gpu that would fit (StepOutOfMemory)."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as err:
            raise StepOutOfMemory(self._out_of_memory_message(P, round_idx, rounds, batches_per_round)) from err

    def _out_of_memory_message(self, P, round_idx, rounds, batches_per_round):
        smaller = [d for d in range(1, self.batch_gpu // 2 + 1) if self.batch_gpu_total % d == 0]
        advice = (f'use --batch-gpu={smaller[-1]} (now {self.batch_gpu}: rounds of fewer images, the same training)'
                  if smaller else 'even one image per round does not fit: use a smaller network, --bf16=1 or --fp16=1')
        memory = ''
        if self.device.type == 'cuda':
            free, total = torch.cuda.mem_get_info(self.device)
            memory = (f'; {torch.cuda.memory_allocated(self.device) / 2**30:.2f} GiB allocated, '
                      f'{torch.cuda.memory_reserved(self.device) / 2**30:.2f} GiB reserved, {free / 2**30:.2f} GiB '
                      f'free of {total / 2**30:.2f} GiB on {self.device}')
        return (f'Out of memory in step {self.step_count} at patch size {patching.size_label(P)}, round {round_idx + 1} '
                f'of {rounds} ({batches_per_round * self.batch_gpu} patches per round){memory}: {advice}. Nothing '
                f'of this step was written; the newest training state in the run folder is intact')

    def step(self):
        """One optimizer step. Returns the patch size it used."""
        if self.batches is None:
            self.start_data()
        step, device, nimg = self.step_count, self.device, self.cur_nimg   # nimg: images before this step
        torch.manual_seed(step_seed(self.seed, self.rank, step))
        corner_gen = torch.Generator().manual_seed(step_seed(self.seed + 1, self.rank, step))
        P = self.schedule.draw(step, patching.training_progress(nimg, self.total_nimg))   # the same on every rank
        m = self.schedule.multiplier(P)
        step_nimg = self.batch_size * m
        self.optimizer.zero_grad(set_to_none=True)
        rounds, batches_per_round = self.round_plan(m, self.schedule.merge_limit(P))
        for round_idx in range(rounds):
            with misc.ddp_sync(self.ddp, round_idx == rounds - 1), self._out_of_memory_says_what(P, round_idx, rounds,
                                                                                            batches_per_round):
                images, labels = self.batches.take(batches_per_round, device)
                if self.encoder is not None:
                    images = self.encoder(images)      # scaled latents, drawn with the step's seed
                else:
                    images = images.to(torch.float32) / 127.5 - 1
                augment_labels = None
                if self.augment_pipe is not None:
                    images, augment_labels = self.augment_pipe(images)   # full images, before cropping
                y, pos = patching.random_patches(images, P, corner_gen, self.schedule.corner_step)
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
            lr = self.learning_rate(nimg)
            for group in self.optimizer.param_groups:
                group['lr'] = lr
            self.optimizer.found_inf = found_inf.to(torch.float32)
            self.optimizer.step()
        else:
            found_inf = torch.ones((), dtype=torch.bool, device=device)
        self._bad_steps += found_inf
        self._last_bad_step = torch.where(found_inf, step, self._last_bad_step)
        self.step_count += 1
        self.cur_nimg = nimg + step_nimg

        # EMA with a half-life in images, ramped up by the images before the step (as EDM).
        halflife_nimg = self.ema_halflife_kimg * 1000
        if self.ema_rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, nimg * self.ema_rampup_ratio)
        ema_beta = 0.5 ** (step_nimg / max(halflife_nimg, 1e-8))
        with torch.no_grad():
            torch._foreach_lerp_(list(self.ema.parameters()), list(self.net.parameters()), 1 - ema_beta)
            for b_ema, b_net in zip(self.ema.buffers(), self.net.buffers()):
                b_ema.copy_(b_net)
        if self.phema is not None:
            self.phema.update(self.net, nimg, self.cur_nimg)
        return P


# ----------------------------------------------------------------------------
# The loop.


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
    device='cpu',
    tensorboard=True,
    snapshot_format='pkl',       # 'pkl' (EDM's), 'safetensors' or 'both'
    max_minutes=None,            # stop (with a training state) at the first step boundary after this long
    hang_timeout=120,            # seconds a training step's collective may wait for the other ranks
    snapshot_on_stop=False,      # when stopped early, also write a snapshot (with samples and metrics)
    accept_changed_data=False,   # resume even if the dataset's files changed since the state was written
    **trainer_kwargs,            # see Trainer
):
    """Train; write snapshots, states and logs to `run_dir`. Returns the EMA network."""
    start_time = time.time()
    device = torch.device(device)
    if snapshot_format not in snapshots.SNAPSHOT_FORMATS:
        raise ValueError(f'snapshot_format={snapshot_format!r}; choose one of {", ".join(snapshots.SNAPSHOT_FORMATS)}')
    if dist.get_rank() == 0:
        stale = dnnlib.util.remove_stale_temp_files(run_dir)
        if stale:
            print(f'Removed {len(stale)} unfinished temporary files of an interrupted run: {", ".join(stale)}')
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False   # as EDM (matters for --fp16)

    dist.print0('Loading dataset and constructing network...')
    dist.make_step_groups(hang_timeout)
    # Signals are caught from here on, before DataLoader workers exist (they inherit or forward them).
    with stopping.StopControl(max_minutes, start_time, hang_timeout) as stopper:
        trainer = Trainer(device=device, **trainer_kwargs)
        dist.print0(f'Patch sizes: {trainer.schedule.describe()}; images per step {trainer.nimg_per_step:g} on '
                    f'average')
        if dist.get_rank() == 0:
            _print_network_summary(trainer)
        reporter = None
        try:
            cur_tick = _start(trainer, transfer_pkl, resume_state, accept_changed_data, run_dir)
            writer = dict(run_dir=run_dir, snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks,
                          sample_count=sample_count, metrics=metrics, metric_kwargs=metric_kwargs,
                          snapshot_format=snapshot_format, dataset_kwargs=trainer_kwargs.get('dataset_kwargs') or {},
                          patch_kwargs=trainer_kwargs.get('patch_kwargs') or {})
            reporter = outputs.TickReporter(trainer, run_dir, tensorboard, start_time)
            dist.print0(f'Training for {trainer.total_nimg / 1000:g} kimg...')
            dist.print0()
            _train(trainer, reporter, cur_tick, stopper, kimg_per_tick, max_bad_steps, snapshot_on_stop, writer)
        except RuntimeError as err:
            if dist.get_world_size() > 1 and stopping.is_timeout(err):
                raise stopping.hung_rank_error(err, hang_timeout, run_dir) from err
            raise
        finally:
            trainer.stop_data()
            if reporter is not None:
                reporter.close()
    dist.print0()
    dist.print0('Exiting...')
    return trainer.ema


def _train(trainer, reporter, cur_tick, stopper, kimg_per_tick, max_bad_steps, snapshot_on_stop, writer):
    """Steps and ticks until the end of training; `stopping.Stopped` when a stop
    is requested (a signal, --max-minutes, the torchrun agent gone), after
    saving the training state. `writer`: outputs.save_outputs's options."""
    run_dir = writer['run_dir']
    while True:
        done = trainer.cur_nimg >= trainer.total_nimg
        if not done:
            reporter.count(trainer.step())
            done = trainer.cur_nimg >= trainer.total_nimg
            reason = None if done else stopper.poll(trainer.step_count)   # every rank, every step boundary
            if reason is not None:
                reporter.report(cur_tick)
                if snapshot_on_stop:
                    outputs.save_outputs(trainer, cur_tick, True, **dict(writer, state_dump_ticks=None))
                outputs.save_state(trainer, run_dir, cur_tick)
                raise stopping.Stopped(f'Stopped at kimg {trainer.cur_nimg / 1000:.3f} (step {trainer.step_count}): '
                                       f'{reason}. The training state is saved in {run_dir}; run the same command '
                                       f'to resume.')
        if not done and cur_tick != 0 and trainer.cur_nimg < reporter.tick_start_nimg + kimg_per_tick * 1000:
            continue
        bad_steps = reporter.report(cur_tick)
        if bad_steps > max_bad_steps:
            raise FloatingPointError(
                f'{bad_steps} training steps had non-finite gradients (limit --max-bad-steps={max_bad_steps}), '
                f'the last at step {trainer.last_bad_step}, tick {cur_tick}. The newest training state in {run_dir} '
                f'is from before: lower --lr, use --ls with --fp16, and resume from it')
        outputs.save_outputs(trainer, cur_tick, done, **writer)
        cur_tick += 1
        reporter.start_tick()
        if done:
            return


def _start(trainer, transfer_pkl, resume_state, accept_changed_data=False, run_dir='.'):
    """Transfer weights and/or load a training state; start the data. Returns the tick to start at."""
    if transfer_pkl is not None:
        copied, missing = snapshots.transfer_weights(transfer_pkl, trainer.net)
        misc.copy_params_and_buffers(trainer.net, trainer.ema)
        dist.print0(f'Transferred {len(copied)} tensors from "{transfer_pkl}"'
                    + (f'; {len(missing)} not in the source kept their initialisation' if missing else ''))
    if resume_state is None:
        trainer.start_data()
        return 0
    dist.print0(f'Resuming from "{resume_state}"...')
    state = runs.load_state(resume_state)
    trainer.check_data(state, accept_changed_data)
    runs.check_state_fits(state, trainer.net, resume_state, run_dir)   # names the options that differ
    trainer.load_state_dict(state)
    return int(state['cur_tick'])


def _print_network_summary(trainer):
    """EDM's table of the network's modules, parameters and output shapes (one full-size forward pass)."""
    net, n = trainer.net, min(trainer.batch_gpu, 4)
    x = torch.zeros([n, net.img_channels, *trainer.schedule.shape], device=trainer.device)
    sigma = torch.ones([n], device=trainer.device)
    net.eval()   # in training mode EDM2's layers would rewrite their weights (forced weight normalisation)
    try:
        with torch.no_grad():
            misc.print_module_summary(net, [x, sigma], max_nesting=2)   # labels: zeros; coordinates: the full grid
    finally:
        net.train()
