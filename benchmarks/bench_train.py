"""Training throughput of Patch Diffusion vs plain EDM steps, on the real code
path (training_loop.Trainer.step: data loading, patching, forward, backward,
Adam, EMA).

    python benchmarks/bench_train.py --preset=cpu-small --threads=1
    python benchmarks/bench_train.py --preset=gpu-paper --precision=bf16 --real-p=1,0.5

One Trainer per real_p, configured from the preset's train.py options by
training.config as train.py configures one, all in one process. After a
warm-up, the configurations ALTERNATE: each round runs a block of --block
steps of every configuration (the order rotates from round to round), so a
slow spell of a shared machine hits all of them alike.

A step's work depends only on its patch size P (m = R/P times the batch of
P x P patches), not on real_p. The step times are therefore pooled by patch
size over all configurations, and

    sec_per_step(real_p) = sum_P prob(P | real_p) * mean step time at P
    kimg_per_s(real_p)   = nimg_per_step(real_p) / sec_per_step / 1000

with nimg_per_step = batch * E[m], the image accounting of the training loop
(docs/DESIGN.md section 2). This is the long-run throughput; the plain mean
over the steps that a short run happened to draw (`*_drawn` in the summary)
is reported too. `ideal_ratio` is the speed-up if a step's time were
proportional to its pixels: E[m] / E[P/R] (2.71x at real_p = 0.5).

Peak memory: CUDA max_memory_allocated, or the growth of the process RSS on
CPU. The last line on stdout is a one-line JSON summary.
"""

import os
import tempfile

import click
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import bench_common as common
from bench_common import float_key, gib, peak_tflops
from training import patching

WARMUP_EXTRA_CAP = 10   # extra warm-up steps allowed to see every patch size once
EXTRA_ROUNDS_CAP = 4    # extra rounds allowed to time every patch size once


# ----------------------------------------------------------------------------
# Trainers.


def make_trainers(preset, dataset, real_ps, precision='fp32', batch=None, batch_gpu=None, device='cpu', seed=0,
                  workers=0, channels_last=False, compile_net=False):
    """{real_p: Trainer} on one shared dataset, with the preset's network and
    batch (batch, batch_gpu: None for the preset's)."""
    options = dict(seed=seed, workers=workers, fp16=(precision == 'fp16'), bf16=(precision == 'bf16'),
                   channels_last=channels_last, compile=compile_net)
    options.update({key: value for key, value in (('batch', batch), ('batch_gpu', batch_gpu)) if value})
    return {real_p: common.make_trainer(preset, dataset, device, real_p=real_p, **options) for real_p in real_ps}


def set_backend_flags(device):
    """The backend settings of training_loop: cuDNN autotuning on, TF32 off."""
    if torch.device(device).type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


# ----------------------------------------------------------------------------
# Measurement.


def warm_up(trainers, steps, device):
    """Run `steps` steps of every trainer, then more (at most WARMUP_EXTRA_CAP)
    until each has drawn each of its patch sizes once (cuDNN autotunes per shape)."""
    limit = steps + WARMUP_EXTRA_CAP if steps else 0
    for trainer in trainers.values():
        seen = set()
        for index in range(limit):
            if index >= steps and seen >= set(trainer.schedule.sizes):
                break
            seen.add(trainer.step())
    common.synchronize(device)


def measure(trainers, rounds, block, device, max_extra_rounds=EXTRA_ROUNDS_CAP):
    """Alternate blocks of `block` steps per trainer for `rounds` rounds, plus
    up to `max_extra_rounds` more while some patch size was never timed.

    Returns (records, memory): records is a list of dicts (real_p, round, P,
    seconds), one per step; memory maps real_p to its PeakMemory.
    """
    keys = list(trainers)
    memory = {key: common.PeakMemory(device) for key in keys}
    needed = set().union(*(trainer.schedule.sizes for trainer in trainers.values()))
    records = []
    round_idx = 0
    while round_idx < rounds or (round_idx < rounds + max_extra_rounds and {r['P'] for r in records} < needed):
        shift = round_idx % len(keys)
        for key in keys[shift:] + keys[:shift]:
            with memory[key].measure():
                for _ in range(block):
                    patch_size, seconds = common.timed(trainers[key].step, device)
                    records.append(dict(real_p=key, round=round_idx, P=patch_size, seconds=seconds))
        round_idx += 1
    return records, memory


def mean_seconds_by_patch(records):
    """({P: mean step seconds}, {P: number of steps}) over all records."""
    sums, counts = {}, {}
    for r in records:
        sums[r['P']] = sums.get(r['P'], 0.0) + r['seconds']
        counts[r['P']] = counts.get(r['P'], 0) + 1
    return {P: sums[P] / counts[P] for P in sorted(sums)}, dict(sorted(counts.items()))


def expected_per_step(schedule, value_by_patch):
    """Long-run mean per step of a per-patch-size quantity (step time, FLOPs):
    sum_P prob(P) * value(P). None if a size of the schedule has no value."""
    if any(P not in value_by_patch for P in schedule.sizes):
        return None
    return sum(q * value_by_patch[P] for P, q in zip(schedule.sizes, schedule.probs))


def ideal_ratio(schedule):
    """Throughput relative to full-image steps if step time were proportional
    to pixels (batch * m * P^2 = batch * R * P): E[m] / E[P / R]."""
    work = sum(q * P / schedule.resolution for P, q in zip(schedule.sizes, schedule.probs))
    return schedule.expected_multiplier / work


def summarize(trainers, records, memory):
    """The per-configuration numbers of a run (see the module docstring)."""
    sec_by_patch, steps_by_patch = mean_seconds_by_patch(records)
    rows = {}
    for key, trainer in trainers.items():
        mine = [r for r in records if r['real_p'] == key]
        drawn = sum(r['seconds'] for r in mine) / len(mine) if mine else None
        expected = expected_per_step(trainer.schedule, sec_by_patch)
        patches = {}
        for r in mine:
            patches[r['P']] = patches.get(r['P'], 0) + 1
        rows[key] = dict(
            nimg_per_step=trainer.nimg_per_step, sec_per_step=expected, sec_per_step_drawn=drawn,
            kimg_per_s=trainer.nimg_per_step / expected / 1e3 if expected else None,
            kimg_per_s_drawn=trainer.nimg_per_step / drawn / 1e3 if drawn else None,
            ideal_ratio=ideal_ratio(trainer.schedule), steps=len(mine), patches=dict(sorted(patches.items())),
            peak_mem_gb=gib(memory[key].peak), step_mem_gb=gib(memory[key].growth))
    base = rows.get(1.0)
    for row in rows.values():
        row['ratio'] = row['ratio_drawn'] = None
        if base is not None and row['kimg_per_s'] and base['kimg_per_s']:
            row['ratio'] = row['kimg_per_s'] / base['kimg_per_s']
        if base is not None and row['kimg_per_s_drawn'] and base['kimg_per_s_drawn']:
            row['ratio_drawn'] = row['kimg_per_s_drawn'] / base['kimg_per_s_drawn']
    return rows, sec_by_patch, steps_by_patch


def step_flops(trainer, P):
    """Model FLOPs of one optimizer step at patch size P (forward and backward
    of every accumulation round of trainer.round_plan), counted by
    torch.utils.flop_counter on the uncompiled network with the trainer's
    loss and precision. Matrix products and convolutions only (what the
    tensor cores do); a multiply-add counts 2."""
    net, device = trainer.net, trainer.device
    rounds, batches_per_round = trainer.round_plan(trainer.schedule.multiplier(P))
    n = trainer.batch_gpu * batches_per_round
    y = torch.rand([n, net.img_channels, P, P], device=device) * 2 - 1
    pos = patching.full_grid(P, n, device) if net.use_pos else None
    labels = torch.zeros([n, net.label_dim], device=device) if net.label_dim else None
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(**trainer.autocast):
            loss = trainer.loss_fn(net=net, y=y, pos=pos, labels=labels)
        loss.sum().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() * rounds


def add_flops(rows, trainers, precision, device_name, peak=None):
    """Add model TFLOP per step (the expectation over the patch sizes), the
    achieved TFLOP/s and its fraction of the card's peak to each row."""
    by_patch = {}
    for trainer in trainers.values():
        for P in trainer.schedule.sizes:
            if P not in by_patch:
                by_patch[P] = step_flops(trainer, P)
    peak = peak or peak_tflops(device_name, precision)
    for key, trainer in trainers.items():
        row = rows[key]
        flops = expected_per_step(trainer.schedule, by_patch)
        row['tflop_per_step'] = flops / 1e12
        row['achieved_tflops'] = flops / row['sec_per_step'] / 1e12 if row['sec_per_step'] else None
        row['peak_tflops'] = peak
        row['peak_fraction'] = row['achieved_tflops'] / peak if peak and row['achieved_tflops'] else None
    return {P: f / 1e12 for P, f in sorted(by_patch.items())}


def profile_patch_sizes(trainer, device, top=12, max_steps=30):
    """Profile steps of `trainer` with torch.profiler until each patch size was
    profiled once; returns {P: table text} of the `top` ops by self time."""
    activities = [ProfilerActivity.CPU]
    sort_by = 'self_cpu_time_total'
    if torch.device(device).type == 'cuda':
        activities.append(ProfilerActivity.CUDA)
        sort_by = 'self_device_time_total'
    tables = {}
    for _ in range(max_steps):
        with profile(activities=activities) as prof:
            patch_size = trainer.step()
            common.synchronize(device)
        if patch_size not in tables:
            tables[patch_size] = prof.key_averages().table(sort_by=sort_by, row_limit=top)
        if set(tables) >= set(trainer.schedule.sizes):
            break
    return dict(sorted(tables.items(), reverse=True))


# ----------------------------------------------------------------------------
# Command line.


def _fmt(value, spec, suffix=''):
    return 'n/a' if value is None else format(value, spec) + suffix


def print_report(rows, sec_by_patch, steps_by_patch, mem_kind):
    mem_label = 'peak GPU alloc' if mem_kind.startswith('cuda') else 'peak RSS'
    print('step time by patch size (pooled over configurations):')
    for P, seconds in sec_by_patch.items():
        print(f'  {P:4d}px: {seconds:8.4f} s/step over {steps_by_patch[P]} steps')
    print('configurations:')
    for key, row in rows.items():
        patches = ' '.join(f'{P}px:{n}' for P, n in row['patches'].items())
        print(f'  real_p {key:<5g} {_fmt(row["sec_per_step"], ".4f")} s/step  {_fmt(row["kimg_per_s"], ".4f")} kimg/s  '
              f'ratio {_fmt(row["ratio"], ".2f", "x")} (ideal {row["ideal_ratio"]:.2f}x) | drawn: '
              f'{_fmt(row["sec_per_step_drawn"], ".4f")} s/step, ratio {_fmt(row["ratio_drawn"], ".2f", "x")}, '
              f'{row["steps"]} steps ({patches}) | {mem_label} {row["peak_mem_gb"]:.3f} GiB '
              f'(+{row["step_mem_gb"]:.3f} in steps)')
        if 'tflop_per_step' in row:
            peak = f', {_fmt(row["peak_fraction"], ".1%")} of {row["peak_tflops"]:g}' if row['peak_tflops'] else ''
            print(f'    model {row["tflop_per_step"]:.3f} TFLOP/step, {_fmt(row["achieved_tflops"], ".1f")} TFLOP/s'
                  f'{peak}')


def build_summary(preset_name, precision, info, rows, sec_by_patch, steps_by_patch, mem_kind, settings):
    def per_config(field):
        return {float_key(k): row[field] for k, row in rows.items()}
    summary = dict(preset=preset_name, precision=precision, kimg_per_s=per_config('kimg_per_s'))
    summary.update({f'ratio_{float_key(k)}': row['ratio'] for k, row in rows.items() if k != 1.0})
    summary.update(sec_per_step=per_config('sec_per_step'), kimg_per_s_drawn=per_config('kimg_per_s_drawn'),
                   sec_per_step_drawn=per_config('sec_per_step_drawn'), ratio_drawn=per_config('ratio_drawn'),
                   ideal_ratio=per_config('ideal_ratio'), nimg_per_step=per_config('nimg_per_step'),
                   patches=per_config('patches'),
                   sec_per_step_by_patch={str(P): s for P, s in sec_by_patch.items()},
                   steps_by_patch={str(P): n for P, n in steps_by_patch.items()},
                   peak_mem_gb=per_config('peak_mem_gb'), step_mem_gb=per_config('step_mem_gb'), mem_kind=mem_kind)
    if all('tflop_per_step' in row for row in rows.values()):
        summary.update(tflop_per_step=per_config('tflop_per_step'), achieved_tflops=per_config('achieved_tflops'),
                       peak_tflops=next(iter(rows.values()))['peak_tflops'], peak_fraction=per_config('peak_fraction'))
    summary.update(settings)
    summary.update(info, loadavg_end=[round(x, 2) for x in os.getloadavg()])
    return summary


@click.command()
@click.option('--preset', type=click.Choice(sorted(common.PRESETS)), default='cpu-small', show_default=True,
              help='Network, resolution and batch (see bench_common.py)')
@click.option('--data', metavar='ZIP|DIR', type=str, help='Dataset  [default: demo shapes made in a temp folder, '
              'or random tensors for gpu-latent]')
@click.option('--max-size', 'max_size', metavar='INT', type=click.IntRange(min=1), help='Use a subset of the dataset')
@click.option('--real-p', '--real_p', 'real_p', metavar='LIST', default='1,0.5,0.25', show_default=True,
              help='real_p values to compare (1 = plain EDM, the baseline of the ratios)')
@click.option('--precision', type=click.Choice(['fp32', 'bf16', 'fp16']), default='fp32', show_default=True,
              help='fp32; bf16 autocast; fp16 network (CUDA only)')
@click.option('--batch', metavar='INT', type=click.IntRange(min=1), help='Total batch  [default: the preset\'s]')
@click.option('--batch-gpu', '--batch_gpu', 'batch_gpu', metavar='INT', type=click.IntRange(min=1),
              help='Images per accumulation round  [default: the preset\'s]')
@click.option('--rounds', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True,
              help='Rounds of alternation')
@click.option('--block', metavar='INT', type=click.IntRange(min=1), default=4, show_default=True,
              help='Steps per configuration per round')
@click.option('--warmup', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True,
              help='Untimed steps per configuration (then until each patch size was seen)')
@click.option('--device', 'device_name', metavar='STR', help='cpu, cuda or cuda:N  [default: cuda if available]')
@click.option('--threads', metavar='INT', type=click.IntRange(min=1), help='torch CPU threads  [default: torch\'s]')
@click.option('--workers', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True,
              help='DataLoader worker processes per configuration')
@click.option('--seed', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--channels-last', 'channels_last', is_flag=True, help='Network in channels-last memory format')
@click.option('--compile', 'compile_net', is_flag=True, help='torch.compile the network (one graph per patch shape, '
              'compiled in the warm-up)')
@click.option('--flops/--no-flops', default=True, show_default=True,
              help='Count the model FLOPs per step and report TFLOP/s and the fraction of the card\'s peak')
@click.option('--peak-tflops', 'peak', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
              help='The card\'s peak TFLOP/s for --precision  [default: from a table of known cards]')
@click.option('--profile', is_flag=True, help='Also profile one step per patch size (torch.profiler) and print the '
              'top costs')
@click.option('--json', 'json_path', metavar='PATH', type=str, help='Also write the JSON summary to this file')
def main(preset, data, max_size, real_p, precision, batch, batch_gpu, rounds, block, warmup, device_name, threads,
         workers, seed, channels_last, compile_net, flops, peak, profile, json_path):
    """Training throughput (kimg/s) for several real_p, alternating configurations."""
    try:
        real_ps = common.parse_float_list(real_p)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint='--real-p') from None
    if any(not 0 <= p <= 1 for p in real_ps) or len(set(real_ps)) != len(real_ps):
        raise click.BadParameter(f'{real_p!r}: give distinct values in [0, 1]', param_hint='--real-p')
    device = torch.device(device_name or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise click.ClickException('--device=cuda but CUDA is not available; use --device=cpu')
    if precision == 'fp16' and device.type != 'cuda':
        raise click.ClickException('--precision=fp16 runs the network in fp16 on CUDA only; use fp32 or bf16 on CPU')
    common.set_threads(threads)
    set_backend_flags(device)
    chosen = common.PRESETS[preset]
    info = common.machine_info(device)
    print(f'bench_train {preset}, {precision}: {common.describe_machine(info)}', flush=True)

    with tempfile.TemporaryDirectory(prefix='bench-train-') as workdir:
        try:
            dataset = common.benchmark_dataset(chosen, data, workdir, max_size=max_size)
            trainers = make_trainers(chosen, dataset, real_ps, precision, batch, batch_gpu, device, seed, workers,
                                     channels_last, compile_net)
        except (OSError, ValueError) as err:
            raise click.ClickException(str(err)) from None
        first = next(iter(trainers.values()))
        params = sum(p.numel() for p in first.net.parameters())
        print(f'data {getattr(dataset, "name", data)}: {len(dataset)} images {dataset.num_channels}x'
              f'{dataset.resolution}x{dataset.resolution}; network {chosen.options["arch"]} {params / 1e6:.2f}M '
              f'parameters; batch {first.batch_gpu_total} in rounds of {first.batch_gpu}', flush=True)
        for key, trainer in trainers.items():
            print(f'  real_p {key:g}: {trainer.schedule.describe()}; {trainer.nimg_per_step:g} images/step')
        warm_up(trainers, warmup, device)
        print(f'timing {rounds} rounds x {block} steps per configuration (more, at most {EXTRA_ROUNDS_CAP} '
              f'rounds, until each patch size was timed)...', flush=True)
        records, memory = measure(trainers, rounds, block, device)
        rows, sec_by_patch, steps_by_patch = summarize(trainers, records, memory)
        tflop_by_patch = add_flops(rows, trainers, precision, info.get('device_name'), peak) if flops else None
        mem_kind = next(iter(memory.values())).kind
        print_report(rows, sec_by_patch, steps_by_patch, mem_kind)
        if profile:
            for P, table in profile_patch_sizes(trainers[min(real_ps)], device).items():
                print(f'profile of one {P}px step (real_p {min(real_ps):g}):\n{table}')

    settings = dict(batch=first.batch_gpu_total, batch_gpu=first.batch_gpu, resolution=dataset.resolution,
                    channels=dataset.num_channels, arch=chosen.options['arch'], params=params, rounds=rounds,
                    rounds_run=records[-1]['round'] + 1, block=block,
                    warmup=warmup, workers=workers, seed=seed, channels_last=channels_last, compile=compile_net)
    if tflop_by_patch:
        settings['tflop_per_step_by_patch'] = {str(P): f for P, f in tflop_by_patch.items()}
    summary = build_summary(preset, precision, info, rows, sec_by_patch, steps_by_patch, mem_kind, settings)
    common.emit_summary(summary, json_path)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
