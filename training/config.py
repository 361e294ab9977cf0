"""Training options: the one builder of the resolved options (what a run's
training_options.json holds) from the values of train.py's flags. train.py
and the benchmarks build their runs with it; the Trainer then checks what
the options mean for the data (docs/DESIGN.md section 3).

    c = build_config(dict(data='datasets/x.zip', arch='ddpmpp', batch=64), dataset)
    training_loop(**c)                  # or Trainer(**trainer_kwargs(c))
"""

import dnnlib
from evaluation import metrics
from training import architectures, augment, flags, networks_dit, patching, phema
from training.dataset import dataset_class_name

# train.py's flags and their defaults (EDM's, plus the Patch Diffusion ones): training.flags.FLAGS.
DEFAULTS = flags.defaults()

# Keys of the resolved options that the Trainer takes (the rest are the training loop's).
TRAINER_KEYS = ('dataset_kwargs', 'data_loader_kwargs', 'network_kwargs', 'loss_kwargs', 'optimizer_kwargs',
                'augment_kwargs', 'patch_kwargs', 'latent_kwargs', 'performance_kwargs', 'seed', 'batch_size',
                'batch_gpu', 'total_kimg', 'ema_halflife_kimg', 'ema_rampup_ratio', 'ema_stds', 'lr_rampup_kimg',
                'lr_decay_batches', 'loss_scaling')


def build_config(options, dataset):
    """The resolved training options of train.py's flag values.

    options: {flag name: value} (underscored names as in DEFAULTS; missing
    ones take the default); dataset: the opened dataset of options['data']
    (its resolution, size and kind go into the options), or an in-memory
    dataset for the benchmarks (options['data'] None). ValueError for
    combinations of flags that cannot work together.
    """
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f'Unknown training option(s): {", ".join(unknown)}')
    opts = dnnlib.EasyDict(DEFAULTS, **options)
    _check_flags(opts, dataset)
    latent = bool(opts.train_on_latents or dataset.is_latent)

    c = dnnlib.EasyDict()
    c.dataset_kwargs = None
    if opts.data is not None:
        c.dataset_kwargs = dnnlib.EasyDict(class_name=dataset_class_name(opts.data), path=opts.data,
                                           use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache,
                                           resolution=dataset.resolution,
                                           max_size=len(dataset) // (2 if opts.xflip else 1), random_seed=0)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=str(opts.device).startswith('cuda'),
                                           num_workers=opts.workers,
                                           prefetch_factor=2 if opts.workers > 0 else None,
                                           persistent_workers=opts.workers > 0)
    c.network_kwargs = network_kwargs(opts)
    edm2 = is_edm2(opts.arch)   # EDM2's loss, noise levels, Adam betas and learning-rate decay unless typed
    c.loss_kwargs = dnnlib.EasyDict(loss=c.network_kwargs.precond)
    for key in ('P_mean', 'P_std'):
        value = opts[key] if opts[key] is not None or not edm2 else flags.EDM2_DEFAULTS[key]
        if value is not None:
            c.loss_kwargs[key] = value
    c.optimizer_kwargs = dnnlib.EasyDict(lr=opts.lr, betas=flags.EDM2_DEFAULTS['betas'] if edm2 else [0.9, 0.999],
                                         eps=1e-8)
    c.augment_kwargs = None
    if opts.augment:
        c.augment_kwargs = dnnlib.EasyDict(p=opts.augment, **augment.EDM_AUGMENT_KWARGS)
        c.network_kwargs.augment_dim = augment.AugmentPipe(**c.augment_kwargs).label_dim
    c.patch_kwargs = dnnlib.EasyDict(real_p=opts.real_p, progressive=opts.progressive)
    if opts.batch_mult != 'formula':   # only then: the options of earlier runs stay as they were
        c.patch_kwargs.batch_mult = opts.batch_mult
    c.latent_kwargs = None
    if latent:   # a pre-encoded archive records its VAE; raw images are encoded with these
        c.latent_kwargs = dnnlib.EasyDict(vae=opts.vae, scale_factor=opts.scale_factor)
    if not opts.train_on_latents:   # the shape the network sees is known (raw images for latents: after the VAE)
        patching.check_image_shape(tuple(dataset.image_shape[1:]), input_multiple(c.network_kwargs),
                                   'latents' if dataset.is_latent else 'images')
        patch_schedule(c, dataset)   # ValueError if the images are too small for the patch sizes
    c.performance_kwargs = dnnlib.EasyDict(precision='bf16' if opts.bf16 else 'fp32',
                                           channels_last=opts.channels_last,
                                           compile_kwargs=dnnlib.EasyDict(dynamic=False) if opts.compile else None)
    c.update(total_kimg=max(opts.duration * 1000, 1e-3), ema_halflife_kimg=opts.ema * 1000,
             ema_rampup_ratio=None if opts.transfer else 0.05, device=str(opts.device))
    c.update({flag.keys[0]: opts[flag.name] for flag in flags.FLAGS if flag.copied})   # --batch, --tick, ...
    lr_decay = opts.lr_decay if opts.lr_decay is not None else flags.EDM2_DEFAULTS['lr_decay'] if edm2 else 0
    if lr_decay:   # only then: the options of runs without decay stay as they were
        c.lr_decay_batches = lr_decay
    if opts.ema_std:   # only then: the options of runs without power EMAs stay as they were
        c.ema_stds = phema.check_stds(opts.ema_std)
    if opts.metrics:
        c.metrics = list(opts.metrics)
        c.metric_kwargs = dnnlib.EasyDict(ref=metric_refs(opts), num=opts.metric_num)
        if opts.metric_dinov2:
            c.metric_kwargs.dinov2 = opts.metric_dinov2
        if opts.metric_detector:
            c.metric_kwargs.detector = opts.metric_detector
    if opts.transfer:
        c.transfer_pkl = opts.transfer
    return c


def patch_schedule(c, dataset):
    """The patch sizes, probabilities and multipliers (training.patching.PatchSchedule, its
    draws aside) that the Trainer uses for resolved options `c` on `dataset`, without building
    the network; None for raw images trained on latents (their shape is the VAE's to say)."""
    if c.latent_kwargs is not None and not dataset.is_latent:
        return None
    return patching.PatchSchedule(tuple(dataset.image_shape[1:]), latent=c.latent_kwargs is not None,
                                  multiple=input_multiple(c.network_kwargs), **c.patch_kwargs)


def network_kwargs(opts):
    """The network's resolved options: the --arch's defaults, then --cbase, --cres, ... ."""
    precond = 'edm2' if is_edm2(opts.arch) else flags.PRECONDS[opts.precond]
    kwargs = dnnlib.EasyDict(precond=precond, **architectures.ARCHITECTURES[opts.arch])
    for flag, key in (('cbase', 'model_channels'), ('cres', 'channel_mult'), ('blocks', 'num_blocks'),
                      ('attn', 'attn_resolutions'), ('heads', 'num_heads'), ('token_size', 'token_size')):
        if opts[flag] is not None:
            kwargs[key] = opts[flag]
    if 'token_size' in kwargs:   # train.py's --token-size is a choice of the strings '2', '4', '8'
        kwargs.token_size = int(kwargs.token_size)
    dropout = opts.dropout
    if dropout is None:
        dropout = flags.DEFAULT_DROPOUT[{'DiT': 'dit', 'EDM2UNet': 'edm2'}.get(kwargs.model_type, 'unet')]
    kwargs.update(dropout=dropout, use_fp16=opts.fp16, use_pos=opts.use_pos, pos_freqs=opts.pos_freqs,
                  implicit_mlp=opts.implicit_mlp)
    if opts.label_dropout:
        kwargs.label_dropout = opts.label_dropout
    return kwargs


def is_dit(arch):
    """Whether train.py's --arch names a DiT (dit-s, dit-b, dit-l, dit-xl) rather than a UNet."""
    return architectures.ARCHITECTURES[arch]['model_type'] == 'DiT'


def is_edm2(arch):
    """Whether train.py's --arch names EDM2's UNet (edm2-xs .. edm2-xxl), trained with EDM2's loss."""
    return architectures.ARCHITECTURES[arch]['model_type'] == 'EDM2UNet'


def input_multiple(network_kwargs):
    """What the sides of the network's input must be multiples of, from its
    resolved options (training.denoiser.network_input_multiple reads it from the built
    network): a DiT's token side, 2^(levels - 1) for a UNet."""
    if network_kwargs.model_type == 'DiT':
        return network_kwargs.token_size
    return 2 ** (len(network_kwargs.channel_mult) - 1)


def trainer_kwargs(c):
    """The entries of resolved options `c` that training_loop.Trainer takes."""
    return {key: c[key] for key in TRAINER_KEYS if key in c}


def run_description(opts, dataset, world_size):
    """The <desc> of the run folder NNNNN-<desc>, as EDM names it (opts: flag values, plus 'desc')."""
    opts = dnnlib.EasyDict(DEFAULTS, **opts)
    precision = 'fp16' if opts.fp16 and fp16_applies(opts.device) else 'bf16' if opts.bf16 else 'fp32'
    precond = 'edm2' if is_edm2(opts.arch) else opts.precond
    desc = (f'{dataset.name}-{"cond" if opts.cond else "uncond"}-{opts.arch}-{precond}-gpus{world_size}'
            f'-batch{opts.batch}-{precision}-realp{opts.real_p:g}')
    return f'{desc}-{opts.desc}' if opts.get('desc') else desc


def fp16_applies(device):
    """Whether --fp16 changes anything on `device`: the networks run in fp16 on CUDA only."""
    return str(device).startswith('cuda')


def _check_flags(opts, dataset):
    """ValueError for flags that contradict each other or the dataset's kind."""
    if opts.fp16 and opts.bf16:
        raise ValueError('--fp16 and --bf16 are exclusive: pick one')
    _check_metric_flags(opts)
    if opts.label_dropout and not opts.cond:
        raise ValueError('--label-dropout needs a conditional model (--cond=1)')
    if opts.precond not in flags.PRECONDS:
        raise ValueError(f'--precond={opts.precond} is unknown; choose one of {", ".join(flags.PRECONDS)}')
    if (opts.P_mean is not None or opts.P_std is not None) and flags.PRECONDS[opts.precond] != 'edm':
        raise ValueError('--P_mean and --P_std set the noise levels of --precond=edm only')
    if opts.augment and (opts.train_on_latents or dataset.is_latent):
        raise ValueError('--augment works on pixels; use --augment=0 with latents')
    latent = opts.train_on_latents or dataset.is_latent
    if not latent and (opts.vae is not None or opts.scale_factor is not None):
        raise ValueError('--vae and --scale_factor apply to latent training; add --train_on_latents=1 to train on '
                         'the latents of that VAE, or leave them out')
    if opts.pos_freqs and not opts.use_pos:
        raise ValueError(f'--pos-freqs={opts.pos_freqs} encodes the coordinate channels, which --use_pos=0 '
                         f'turns off; leave one of them out')
    if dataset.is_latent and (opts.vae or opts.scale_factor):
        raise ValueError(f'--vae and --scale_factor are for raw images; {opts.data} was encoded with '
                         f'{dataset.vae} (scale factor {dataset.scale_factor})')
    _check_architecture_flags(opts)


def metric_refs(opts):
    """{metric: reference statistics} of --metrics and --metric-ref (one per metric, in the same order)."""
    return metrics.per_metric(opts.metrics, opts.metric_ref, '--metric-ref')


def _check_metric_flags(opts):
    """ValueError for metric flags that cannot work: unknown metrics, references missing, a stray --metric-dinov2."""
    if opts.metrics:
        metrics.check_metric_names(list(opts.metrics))
        if not opts.metric_ref:
            raise ValueError(f'--metrics={",".join(opts.metrics)} needs --metric-ref=NPZ|URL[,...] (reference '
                             f'statistics from fid.py ref, one per metric, in the same order)')
        metric_refs(opts)
    for flag, value, what, metric in (('--metric-dinov2', opts.metric_dinov2, 'model', 'fd_dinov2'),
                                      ('--metric-detector', opts.metric_detector, 'detector', 'fid')):
        if value and metric not in (opts.metrics or ()):
            raise ValueError(f'{flag} is the {what} of --metrics={metric}; add {metric} to --metrics or leave '
                             f'{flag} out')
    if opts.metric_ref and not opts.metrics:
        raise ValueError('--metric-ref is the reference of --metrics; add --metrics=fid (or fd_dinov2) or leave '
                         '--metric-ref out')


def _check_architecture_flags(opts):
    """ValueError for shape flags of the other kind of network (UNet or DiT) and DiTs that cannot work."""
    if opts.arch not in architectures.ARCHITECTURES:
        raise ValueError(f'--arch={opts.arch} is unknown; choose one of {", ".join(architectures.ARCHITECTURES)}')
    if is_edm2(opts.arch):
        if flags.PRECONDS[opts.precond] != 'edm':
            raise ValueError(f'--arch={opts.arch} trains with EDM2\'s preconditioning and loss (EDM\'s with learned '
                             f'loss weighting); leave --precond={opts.precond} out')
        if opts.implicit_mlp:
            raise ValueError(f'--implicit_mlp replaces the first convolution of ddpmpp, ncsnpp or adm; '
                             f'--arch={opts.arch} has no such option: leave it out')
    dit = is_dit(opts.arch)
    foreign = (('--cres', opts.cres), ('--attn', opts.attn)) if dit else \
        (('--heads', opts.heads), ('--token-size', opts.token_size))
    given = [flag for flag, value in foreign if value is not None]
    if given:
        verb, pronoun = ('shape', 'them') if len(given) > 1 else ('shapes', 'it')
        if dit:
            raise ValueError(f'{" and ".join(given)} {verb} a UNet; a DiT\'s size is --cbase (hidden size), '
                             f'--blocks (depth), --heads and --token-size: leave {pronoun} out')
        raise ValueError(f'{" and ".join(given)} {verb} a DiT (--arch=dit-s, dit-b, dit-l or dit-xl); leave '
                         f'{pronoun} out for --arch={opts.arch}')
    if not dit:
        return
    if opts.implicit_mlp:
        raise ValueError('--implicit_mlp replaces the first convolution of a UNet; a DiT has none: leave it out')
    if not opts.use_pos and opts.real_p < 1:
        raise ValueError(f'--arch={opts.arch} with --use_pos=0 cannot tell where a crop lies (its tokens get the '
                         f'positions of a full image); use --use_pos=1 for patches, or --real_p=1 (full images only)')
    kwargs = network_kwargs(opts)
    problem = networks_dit.dit_size_problem(kwargs.model_channels, kwargs.num_heads, kwargs.token_size)
    if problem:
        raise ValueError(f'--arch={opts.arch} with --cbase={kwargs.model_channels} --heads={kwargs.num_heads}: '
                         f'{problem}; choose --heads to divide --cbase, and --cbase a multiple of 4')
