"""What a training run writes at the end of a tick (docs/DESIGN.md section 3):
the tick's statistics (console, stats.jsonl, TensorBoard) and the files that
are due (network snapshots with their sample grids and metrics, training
states). The training loop decides when; this module decides what and how,
each file written under a temporary name and renamed (training.runs.writing).
"""

import json
import os
import time

import psutil
import torch

import dnnlib
from evaluation.metrics import calc_metrics_for_network
from torch_utils import distributed as dist
from torch_utils import training_stats
from training import generation, patching, phema, runs, snapshots


class TickReporter:
    """Collects a tick's statistics and writes them (console on rank 0, stats.jsonl, TensorBoard)."""

    def __init__(self, trainer, run_dir, tensorboard, start_time):
        self.trainer, self.device, self.start_time = trainer, trainer.device, start_time
        rank0 = dist.get_rank() == 0
        self.stats_jsonl = os.path.join(run_dir, 'stats.jsonl') if rank0 else None
        self.writer = _tensorboard_writer(run_dir) if (rank0 and tensorboard) else None
        self.collector = training_stats.Collector(regex='.*', device=self.device)
        self.patch_counts = {}
        self.tick_start_nimg, self.tick_start_time = trainer.cur_nimg, time.time()
        self.maintenance_time = self.tick_start_time - start_time
        self.tick_end_time = self.tick_start_time

    def count(self, patch_size):
        """Count a step at `patch_size`."""
        self.patch_counts[patch_size] = self.patch_counts.get(patch_size, 0) + 1

    def report(self, cur_tick):
        """Report the tick that ends now; returns the bad steps so far over all ranks."""
        trainer, device = self.trainer, self.device
        self.tick_end_time = now = time.time()
        cur_nimg, tick_time = trainer.cur_nimg, now - self.tick_start_time
        # Every rank sees the same (all-reduced) gradients, so every rank counts the same bad steps.
        bad_steps = sum(dist.gather_ints(trainer.bad_steps)) // dist.get_world_size()
        training_stats.report0('Progress/tick', cur_tick)
        training_stats.report0('Progress/kimg', cur_nimg / 1e3)
        training_stats.report0('Progress/bad_steps', bad_steps)
        training_stats.report0('Timing/total_sec', now - self.start_time)
        training_stats.report0('Timing/total_hours', (now - self.start_time) / (60 * 60))       # as EDM
        training_stats.report0('Timing/total_days', (now - self.start_time) / (24 * 60 * 60))
        training_stats.report0('Timing/sec_per_tick', tick_time)
        training_stats.report0('Timing/sec_per_kimg', tick_time / max(cur_nimg - self.tick_start_nimg, 1) * 1e3)
        training_stats.report0('Timing/maintenance_sec', self.maintenance_time)
        cpu_mem_gb = psutil.Process(os.getpid()).memory_info().rss / 2**30
        training_stats.report0('Resources/cpu_mem_gb', cpu_mem_gb)
        if device.type == 'cuda':
            training_stats.report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(device) / 2**30)
            torch.cuda.reset_peak_memory_stats()
        sizes = trainer.schedule.sizes
        for P in sizes:
            training_stats.report0(f'Patches/steps_{patching.size_label(P)}px', self.patch_counts.get(P, 0))
        self.collector.update()
        mean = self.collector.mean
        fields = [f'tick {cur_tick:<5d}', f'kimg {cur_nimg / 1e3:<9.3f}', f'loss {mean("Loss/loss"):<8.4f}',
                  f'time {dnnlib.util.format_time(now - self.start_time):<9s}', f'sec/tick {tick_time:<7.1f}',
                  f'sec/kimg {mean("Timing/sec_per_kimg"):<8.2f}', f'maintenance {self.maintenance_time:<6.1f}',
                  f'cpumem {cpu_mem_gb:<6.2f}']
        if device.type == 'cuda':
            fields.append(f'gpumem {mean("Resources/peak_gpu_mem_gb"):<6.2f}')
        fields.append('patches ' + ' '.join(f'{patching.size_label(P)}:{self.patch_counts.get(P, 0)}' for P in sizes))
        if bad_steps:
            fields.append(f'bad_steps {bad_steps}')
        dist.print0('  '.join(fields))
        self.patch_counts = {}
        self._write_stats(self.collector.as_dict(), cur_nimg)
        return bad_steps

    def _write_stats(self, stats, cur_nimg):
        if self.stats_jsonl is not None:
            with runs.writing(self.stats_jsonl):
                dnnlib.util.append_line(self.stats_jsonl, json.dumps(dict(stats, timestamp=time.time())))
        if self.writer is not None:
            for name, value in stats.items():
                self.writer.add_scalar(name, value['mean'], global_step=int(cur_nimg / 1e3))
            self.writer.flush()

    def start_tick(self):
        """Start timing the next tick (the time since the report is maintenance)."""
        self.tick_start_nimg, self.tick_start_time = self.trainer.cur_nimg, time.time()
        self.maintenance_time = self.tick_start_time - self.tick_end_time

    def close(self):
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(run_dir):
    """A TensorBoard SummaryWriter for run_dir, or None (and a notice) when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter   # optional dependency
    except ImportError:
        print('Note: tensorboard is not installed; no TensorBoard logs (pip install tensorboard)')
        return None
    return SummaryWriter(run_dir)


# ----------------------------------------------------------------------------
# End of a tick: snapshots, sample grids, metrics, training states.


def save_outputs(trainer, cur_tick, done, run_dir, snapshot_ticks, state_dump_ticks, sample_count, metrics,
                  metric_kwargs, snapshot_format, dataset_kwargs, patch_kwargs):
    """Write what is due at the end of tick `cur_tick` (everything at the last one)."""
    kimg_tag = f'{trainer.cur_nimg // 1000:06d}'
    latent = dict(trainer.encoder.info) if trainer.encoder is not None else None   # plain data, never the VAE
    if snapshot_ticks is not None and (done or cur_tick % snapshot_ticks == 0):
        def write_snapshot():
            path = os.path.join(run_dir, f'network-snapshot-{kimg_tag}.pkl')
            extra = dict(patch_kwargs=dict(patch_kwargs), **({'latent': latent} if latent else {}))
            nets = [(path, trainer.ema, extra)]
            if trainer.phema is not None:   # the power EMAs, each a snapshot that records its width and time
                nets += [(os.path.join(run_dir, phema.snapshot_name(kimg_tag, std)), net,
                          dict(extra, phema=dict(std=std, gamma=gamma, nimg=trainer.cur_nimg,
                                                 ema_rampup_ratio=trainer.ema_rampup_ratio)))
                         for std, gamma, net in zip(trainer.phema.stds, trainer.phema.gammas, trainer.phema.nets)]
            for net_path, net, net_extra in nets:
                with runs.writing(net_path if snapshot_format != 'safetensors'
                                  else os.path.splitext(net_path)[0] + '.safetensors'):
                    snapshots.save_snapshot(net_path, net, trainer.loss_fn, trainer.augment_pipe, dataset_kwargs,
                                            extra=net_extra, snapshot_format=snapshot_format)
            if sample_count:
                grid_path = os.path.join(run_dir, f'samples-{kimg_tag}.png')
                with runs.writing(grid_path):
                    generation.sample_grid(trainer.ema, grid_path, seeds=list(range(sample_count)),
                                           device=trainer.device, latent=latent)
        dist.run_on_rank0(write_snapshot, group=dist.step_control_group())
        if metrics:
            run_metrics(trainer.ema, metrics, dict(metric_kwargs or {}, latent=latent), run_dir, kimg_tag,
                         trainer.device)
            dist.barrier()
    if state_dump_ticks is not None and (done or cur_tick % state_dump_ticks == 0) and trainer.step_count > 0:
        save_state(trainer, run_dir, cur_tick)


def save_state(trainer, run_dir, cur_tick):
    """Write training-state-<kimg>.pt (rank 0); the run resumes at tick cur_tick + 1."""
    path = os.path.join(run_dir, f'training-state-{trainer.cur_nimg // 1000:06d}.pt')
    dist.run_on_rank0(lambda: runs.save_state(path, dict(trainer.state_dict(), cur_tick=cur_tick + 1)),
                      group=dist.step_control_group())


def run_metrics(ema, metric_names, metric_kwargs, run_dir, kimg_tag, device):
    results = calc_metrics_for_network(metric_names, ema, device=device, **metric_kwargs)   # one set of images
    for metric, result in results.items():
        if dist.get_rank() == 0:
            line = json.dumps(dict(metric=metric, results=result, snapshot_kimg=int(kimg_tag), timestamp=time.time()))
            path = os.path.join(run_dir, f'metric-{metric}.jsonl')
            with runs.writing(path):
                dnnlib.util.append_line(path, line)
            dist.print0(f'{metric}: {result}')
