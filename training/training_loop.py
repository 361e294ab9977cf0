"""The training loop: patch-wise EDM training (SPEC.md sections 1 and 2).

One step:
  1. Every rank draws the SAME patch size P for the step (seeded by seed and
     step), so ranks do equal work; the batch multiplier m = R / P.
  2. Each accumulation round loads m * batch_gpu full images, augments them
     (before cropping, so coordinates stay true), crops one random P x P
     patch per image with its coordinate grid, and backpropagates the loss,
     normalised per image.
  3. Non-finite gradients skip the optimizer step and are counted (never
     zeroed silently); too many stop the run.
  4. Adam with learning-rate ramp-up, then an EMA update with a half-life in
     images and ramp-up.
The progress counter adds batch * E[m] images per step. All randomness of a
step comes from generators seeded by (seed, rank, step), so a resumed run
continues exactly as if it had never stopped.
"""

import copy
import json
import os
import pickle
import re
import time

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
    return {'training.dataset.ImageFolderDataset': dataset.ImageFolderDataset}


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

def find_latest_state(run_dir):
    """Path of the newest training-state-*.pt in run_dir, or None."""
    if not os.path.isdir(run_dir):
        return None
    states = sorted((int(m.group(1)), name) for name in os.listdir(run_dir) if (m := STATE_RE.match(name)))
    return os.path.join(run_dir, states[-1][1]) if states else None


def save_snapshot(path, ema, loss_fn, augment_pipe, dataset_kwargs, extra=None):
    """Write a network pickle in EDM's layout (plus our extra keys), atomically."""
    data = dict(ema=copy.deepcopy(ema).eval().requires_grad_(False).cpu(), loss_fn=loss_fn,
                augment_pipe=augment_pipe, dataset_kwargs=dnnlib.EasyDict(dataset_kwargs))
    data.update(extra or {})
    with atomic_write(path) as f:
        pickle.dump(data, f)


def save_state(path, net, ema, optimizer, step, cur_tick, consumed, seed):
    """Write a training state of plain tensors (loadable with weights_only=True).

    No RNG state is needed: every random draw of step k is seeded by
    (seed, rank, k), and `consumed` positions the data sampler.
    """
    state = dict(net=net.state_dict(), ema=ema.state_dict(), optimizer=optimizer.state_dict(),
                 step=step, cur_tick=cur_tick, consumed=consumed, seed=seed, format='patch-diffusion-state-v1')
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def transfer_weights(path_or_url, net):
    """Copy the weights of the 'ema' network in a network pickle into `net` by name.

    Works with our, EDM's and the official Patch Diffusion pickles (same
    parameter names). Returns (copied, missing) names.
    """
    from torch_utils import persistence
    with dnnlib.util.open_url(path_or_url) as f:
        data = persistence.load_network_pickle(f)
    if not isinstance(data, dict) or not isinstance(data.get('ema'), torch.nn.Module):
        raise ValueError(f'{path_or_url} is not a network pickle with an \'ema\' network')
    return misc.copy_params_and_buffers(data['ema'], net)


def load_state(path):
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:
        raise ValueError(f'Cannot read training state {path}: {err}. The file may be truncated; '
                         f'resume from an earlier training-state-*.pt with --resume') from err
    if not isinstance(state, dict) or state.get('format') != 'patch-diffusion-state-v1':
        raise ValueError(f'{path} is not a training state written by this code')
    return state


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

    def take(self, count):
        """`count` batches concatenated: (images uint8 [count*b, C, H, W], labels)."""
        parts = [next(self._iter) for _ in range(count)]
        self.consumed += count * self.batch_gpu
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _tensorboard_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(run_dir)


def training_loop(
    run_dir='.',
    dataset_kwargs=None,         # dataset options (class_name, path, use_labels, xflip, ...)
    data_loader_kwargs=None,     # torch DataLoader options
    network_kwargs=None,         # precond + network options
    loss_kwargs=None,            # loss + options
    optimizer_kwargs=None,       # lr, betas, eps
    augment_kwargs=None,         # AugmentPipe options, None = off
    patch_kwargs=None,           # real_p, progressive, latent
    seed=0,
    batch_size=512,              # total batch of full images per step, over all ranks
    batch_gpu=None,              # limit of full images per rank and round (None = no limit)
    total_kimg=200000,
    ema_halflife_kimg=500,
    ema_rampup_ratio=0.05,       # None = no ramp-up
    lr_rampup_kimg=10000,
    loss_scaling=1,
    kimg_per_tick=50,
    snapshot_ticks=50,           # None = no snapshots
    state_dump_ticks=500,        # None = no training states
    transfer_pkl=None,           # copy weights by name from this network pickle
    resume_state=None,           # training-state-*.pt to resume from
    cudnn_benchmark=True,
    precision='fp32',            # 'fp32' or 'bf16' (autocast); fp16 is the network's use_fp16
    max_bad_steps=20,            # non-finite steps tolerated before stopping
    sample_count=16,             # images in samples-NNNNNN.png at each snapshot (0 = none)
    metrics=(),                  # e.g. ('fid',)
    metric_kwargs=None,          # ref, num, detector for the metrics
    device=torch.device('cpu'),
    tensorboard=True,
):
    """Train; write snapshots, states and logs to `run_dir`. Returns the EMA network."""
    start_time = time.time()
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dataset_kwargs = dict(dataset_kwargs or {})
    patch_kwargs = dict(patch_kwargs or {})
    optimizer_kwargs = dict(optimizer_kwargs or dict(lr=10e-4, betas=(0.9, 0.999), eps=1e-8))

    # Batch geometry.
    if batch_size % world:
        raise ValueError(f'--batch={batch_size} is not divisible by the number of processes ({world})')
    batch_gpu_total = batch_size // world
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu_total % batch_gpu:
        raise ValueError(f'The batch per process ({batch_gpu_total}) is not divisible by --batch-gpu={batch_gpu}')
    num_rounds = batch_gpu_total // batch_gpu

    # Data, network, loss, patches.
    dist.print0('Loading dataset...')
    dataset = build_dataset(dataset_kwargs)
    resolution = dataset.resolution
    schedule = patching.PatchSchedule(resolution, patch_kwargs.get('real_p', 1.0),
                                      latent=patch_kwargs.get('latent', False),
                                      progressive=patch_kwargs.get('progressive', False), seed=seed)
    nimg_per_step = batch_size * schedule.expected_multiplier
    dist.print0(f'Patch sizes: {schedule.describe()}; images per step {nimg_per_step:g}')

    dist.print0('Constructing network...')
    net = build_network(network_kwargs, resolution, dataset.num_channels, dataset.label_dim)
    net.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    loss_fn = build_loss(loss_kwargs)
    augment_pipe = build_augment_pipe(augment_kwargs)
    fused = device.type == 'cuda'
    optimizer = torch.optim.Adam(net.parameters(), fused=fused, foreach=None if fused else True, **optimizer_kwargs)
    base_lr = optimizer_kwargs['lr']

    # Transfer or resume.
    step, cur_tick, consumed = 0, 0, 0
    if transfer_pkl is not None:
        copied, missing = transfer_weights(transfer_pkl, net)
        misc.copy_params_and_buffers(net, ema)
        dist.print0(f'Transferred {len(copied)} tensors from "{transfer_pkl}"'
                    + (f'; {len(missing)} not in the source kept their initialisation' if missing else ''))
    if resume_state is not None:
        dist.print0(f'Resuming from "{resume_state}"...')
        state = load_state(resume_state)
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer'])
        step, cur_tick, consumed = int(state['step']), int(state['cur_tick']), int(state['consumed'])
        del state

    ddp = net
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == 'cuda' else None, broadcast_buffers=False)

    # How far each step has gone: deterministic in the step count.
    def nimg_at(k):
        return int(round(k * nimg_per_step))

    total_nimg = max(int(total_kimg * 1000), 1)
    batches = _Batches(dataset, batch_gpu, seed, consumed, data_loader_kwargs or dict(num_workers=0))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=(precision == 'bf16'))

    # Logs.
    stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at') if rank == 0 else None
    writer = _tensorboard_writer(run_dir) if (rank == 0 and tensorboard) else None
    collector = training_stats.Collector(regex='.*', device=device)
    cur_nimg = nimg_at(step)
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    maintenance_time = tick_start_time - start_time
    bad_steps_total = 0
    patch_counts = {}
    dist.print0(f'Training for {total_kimg:g} kimg...')
    dist.print0()

    while True:
        done = cur_nimg >= total_nimg
        if not done:
            # One training step.
            torch.manual_seed(step_seed(seed, rank, step))
            corner_gen = torch.Generator().manual_seed(step_seed(seed + 1, rank, step))
            P = schedule.draw(step, cur_nimg / total_nimg)
            m = schedule.multiplier(P)
            patch_counts[P] = patch_counts.get(P, 0) + 1
            optimizer.zero_grad(set_to_none=True)
            for round_idx in range(num_rounds):
                with misc.ddp_sync(ddp, round_idx == num_rounds - 1):
                    images, labels = batches.take(m)
                    images = images.to(device, non_blocking=True).to(torch.float32) / 127.5 - 1
                    labels = labels.to(device, non_blocking=True)
                    augment_labels = None
                    if augment_pipe is not None:
                        images, augment_labels = augment_pipe(images)
                    y, pos = patching.random_patches(images, P, corner_gen)
                    with autocast:
                        loss = loss_fn(net=ddp, y=y, pos=pos if net.use_pos else None, labels=labels,
                                       augment_labels=augment_labels)
                    training_stats.report('Loss/loss', loss)
                    loss.sum().mul(loss_scaling / (batch_gpu_total * m)).backward()

            # Skip the update on non-finite gradients; the count is checked at the tick.
            grads = [p.grad for p in net.parameters() if p.grad is not None]
            finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else torch.tensor(True)
            if bool(finite):
                lr = base_lr * min(nimg_at(step) / max(lr_rampup_kimg * 1000, 1e-8), 1) if lr_rampup_kimg else base_lr
                for group in optimizer.param_groups:
                    group['lr'] = lr
                if loss_scaling != 1:
                    torch._foreach_div_(grads, loss_scaling)
                optimizer.step()
            else:
                bad_steps_total += 1
                training_stats.report('Progress/bad_steps', 1)

            # EMA by half-life in images, with ramp-up.
            step += 1
            cur_nimg = nimg_at(step)
            halflife_nimg = ema_halflife_kimg * 1000
            if ema_rampup_ratio is not None:
                halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
            ema_beta = 0.5 ** (nimg_per_step / max(halflife_nimg, 1e-8))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - ema_beta)
                for b_ema, b_net in zip(ema.buffers(), net.buffers()):
                    b_ema.copy_(b_net)
            done = cur_nimg >= total_nimg

        # Tick boundary?
        if not done and cur_tick != 0 and cur_nimg < tick_start_nimg + kimg_per_tick * 1000:
            continue
        tick_end_time = time.time()
        bad_tensor = dist.all_reduce_sum(torch.tensor([float(bad_steps_total)], device=device))
        training_stats.report0('Progress/tick', cur_tick)
        training_stats.report0('Progress/kimg', cur_nimg / 1e3)
        training_stats.report0('Timing/total_sec', tick_end_time - start_time)
        training_stats.report0('Timing/sec_per_tick', tick_end_time - tick_start_time)
        training_stats.report0('Timing/sec_per_kimg', (tick_end_time - tick_start_time) / max(cur_nimg - tick_start_nimg, 1) * 1e3)
        training_stats.report0('Timing/maintenance_sec', maintenance_time)
        training_stats.report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
        if device.type == 'cuda':
            training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats()
        collector.update()
        stats = collector.as_dict()
        mix = ' '.join(f'{p}px:{c}' for p, c in sorted(patch_counts.items()))
        fields = [f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1e3:<9.3f}', f'loss {collector.mean("Loss/loss"):<8.4f}',
                  f'time {dnnlib.util.format_time(tick_end_time - start_time):<12s}',
                  f'sec/tick {tick_end_time - tick_start_time:<7.1f}',
                  f'sec/kimg {stats["Timing/sec_per_kimg"]["mean"] if "Timing/sec_per_kimg" in stats else float("nan"):<7.2f}',
                  f'maintenance {maintenance_time:<6.1f}',
                  f'cpumem {psutil.Process(os.getpid()).memory_info().rss / 2**30:<6.2f}']
        if device.type == 'cuda':
            fields.append(f'gpumem {stats.get("Resources/peak_gpu_mem_gb", {}).get("mean", 0):<6.2f}')
        fields.append(f'patches {mix}')
        if bad_tensor.item() > 0:
            fields.append(f'bad_steps {int(bad_tensor.item())}')
        dist.print0('  '.join(fields))
        patch_counts = {}
        if stats_jsonl is not None:
            stats_jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
            stats_jsonl.flush()
        if writer is not None:
            for name, value in stats.items():
                writer.add_scalar(name, value['mean'], global_step=cur_nimg // 1000 if cur_nimg >= 1000 else 0)
            writer.flush()
        if bad_tensor.item() > max_bad_steps:
            raise FloatingPointError(
                f'{int(bad_tensor.item())} training steps had non-finite gradients (limit {max_bad_steps}) by '
                f'step {step}, tick {cur_tick}. The last training state in {run_dir} is good: lower --lr, '
                f'use --ls for fp16, or resume from it with --resume')

        # Snapshots and states.
        kimg_tag = f'{cur_nimg // 1000:06d}'
        if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
            if rank == 0:
                snap_path = os.path.join(run_dir, f'network-snapshot-{kimg_tag}.pkl')
                save_snapshot(snap_path, ema, loss_fn, augment_pipe, dataset_kwargs,
                              extra=dict(patch_kwargs=dict(patch_kwargs)))
                if sample_count:
                    _write_samples(ema, os.path.join(run_dir, f'samples-{kimg_tag}.png'), sample_count, device)
            if metrics:
                _run_metrics(ema, metrics, metric_kwargs or {}, run_dir, kimg_tag, device)
            dist.barrier()
        if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and step > 0:
            if rank == 0:
                save_state(os.path.join(run_dir, f'training-state-{kimg_tag}.pt'), net, ema, optimizer, step,
                           cur_tick + 1, batches.consumed, seed)
            dist.barrier()

        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if stats_jsonl is not None:
        stats_jsonl.close()
    if writer is not None:
        writer.close()
    dist.print0()
    dist.print0('Exiting...')
    return ema


def _write_samples(ema, path, count, device):
    from training import sampling
    sampling.sample_grid(ema, path, seeds=list(range(count)), device=device)


def _run_metrics(ema, metrics, metric_kwargs, run_dir, kimg_tag, device):
    from training import metrics as metrics_lib
    for metric in metrics:
        result = metrics_lib.calc_metric_for_network(metric, ema, device=device, **metric_kwargs)
        if dist.get_rank() == 0:
            line = json.dumps(dict(metric=metric, results=result, snapshot_kimg=int(kimg_tag), timestamp=time.time()))
            with open(os.path.join(run_dir, f'metric-{metric}.jsonl'), 'at') as f:
                f.write(line + '\n')
            dist.print0(f'{metric}: {result}')
