"""train.py's flags, one entry each (FLAGS): how a flag is typed, its click
type, default and help, the keys of the resolved options
(training_options.json) that it sets, and whether a new value continues a
run or starts a new one. Made from FLAGS: train.py's click options,
config.DEFAULTS, the options config.build_config copies as they are, and the
resume comparison of training.runs (which flag a differing key belongs to,
whether it changes what is learned); the dry run prints what they make.

Adding a flag is one entry plus its use: an entry with copied=True lands in
the options under keys[0], which the training loop then takes as an
argument; for any other entry config.build_config says what it means.
"""

import dataclasses

import click

import dnnlib
from evaluation import dinov2, metrics
from training import architectures, latents, patching, presets

# --precond: the preconditioning and loss of each name. 'pedm' is the official code's name of EDM's
# preconditioning with coordinate channels (its default); here every preconditioning takes the
# coordinate channels unless --use_pos=0, so 'pedm' and 'edm' are the same.
PRECONDS = {'edm': 'edm', 'pedm': 'edm', 'vp': 'vp', 've': 've'}

# --dropout when left out: EDM's for a UNet, the DiT paper's for a DiT, EDM2's block default for its UNet
# (config.network_kwargs).
DEFAULT_DROPOUT = dict(unet=0.13, dit=0, edm2=0)

# What an --arch=edm2-* network trains with when the flags are left out: EDM2's (its train_edm2.py and
# training loop for ImageNet-512; config.build_config).
EDM2_DEFAULTS = dict(P_mean=-0.4, P_std=1.0, lr_decay=70000, betas=[0.9, 0.99])


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag of train.py.

    name:       the name of its value: click's parameter, the key of
                config.DEFAULTS and of the presets' options
    spellings:  as typed, e.g. ('--lr-rampup', '--lr_rampup'); the first
                names the flag in messages
    help, type, metavar, required, is_flag: as click.option takes them
    default:    the value when the flag is left out (config.DEFAULTS), shown
                as [default: X] in --help
    shown:      False: click passes None instead of the default, and the
                help text says what None means (--seed: random)
    keys:       the keys of the resolved options that the flag sets, nested
                ones with dots; each key covers the keys below it
    run_only:   a new value continues a run (True: how long, how often,
                where) or starts a new one (False: what is learned changes)
    copied:     the option keys[0] is the flag's value as it is
    scale:      the flag's value is the option's times this (1e-3: Mimg on
                the command line, kimg in the options)
    cli_only:   a flag of the command (where to write, what to resume), not
                a training option
    """
    name: str
    spellings: tuple
    help: str
    type: object = None
    default: object = None
    metavar: str = None
    keys: tuple = ()
    run_only: bool = False
    copied: bool = False
    scale: float = 1
    shown: bool = True
    required: bool = False
    is_flag: bool = False
    cli_only: bool = False

    def click_option(self, fn):
        """Decorate `fn` with this flag's click.option."""
        kwargs = dict(help=self.help, metavar=self.metavar, type=self.type, required=self.required)
        if self.is_flag:
            kwargs.update(is_flag=True)
        if self.default is not None and self.shown:
            kwargs.update(default=self.default, show_default=True)
        return click.option(*self.spellings, self.name, **{k: v for k, v in kwargs.items() if v is not None})(fn)


FLAGS = (
    # Main options.
    Flag('outdir', ('--outdir',), metavar='DIR', type=str, required=True, cli_only=True,
         help='Where to save the results'),
    Flag('data', ('--data',), metavar='ZIP|DIR', type=str, required=True, keys=('dataset_kwargs.path',),
         help='Path to the dataset (zip or folder from dataset_tool.py)'),
    Flag('preset', ('--preset',), type=click.Choice(list(presets.PRESETS)), cli_only=True,
         help='Settings of one of the paper\'s experiments (docs/PRESETS_AND_HUB.md); flags you give override them'),
    Flag('cond', ('--cond',), metavar='BOOL', type=bool, default=False, keys=('dataset_kwargs.use_labels',),
         help='Train a class-conditional model'),
    Flag('arch', ('--arch',), type=click.Choice(sorted(architectures.ARCHITECTURES)), default='ddpmpp',
         help='Network architecture: a UNet (ddpmpp, ncsnpp, adm), EDM2\'s UNet of size XS to XXL with its loss and '
              'recipe (docs/TRAINING.md), or a DiT of size S, B, L or XL, whose --cbase is the hidden size and '
              '--blocks the depth (docs/LATENTS_AND_DIT.md)'),
    Flag('precond', ('--precond',), type=click.Choice(list(PRECONDS)), default='edm', keys=('network_kwargs.precond',),
         help='Preconditioning and loss (pedm, the official default, is edm with coordinates: the same here; '
              'edm2-* archs use EDM2\'s, EDM\'s with learned loss weighting)'),
    Flag('use_pos', ('--use_pos', '--use-pos'), metavar='BOOL', type=bool, default=True,
         keys=('network_kwargs.use_pos',),
         help='Coordinate channels (0: a network shaped as EDM\'s; with --real_p=1, plain EDM training)'),

    # Patch options.
    Flag('real_p', ('--real_p', '--real-p'), metavar='FLOAT', type=click.FloatRange(0, 1), default=0.5,
         keys=('patch_kwargs.real_p',),
         help='Share of full-size steps (1 = plain EDM)'),
    Flag('train_on_latents', ('--train_on_latents', '--train-on-latents'), metavar='BOOL', type=bool, default=False,
         help='Train on Stable Diffusion VAE latents'),
    Flag('vae', ('--vae',), metavar='ID|DIR', type=str, keys=('latent_kwargs.vae',),
         help=f'VAE for --train_on_latents on raw images  [default: {latents.DEFAULT_VAE}]'),
    Flag('scale_factor', ('--scale_factor', '--scale-factor'), metavar='FLOAT',
         type=click.FloatRange(min=0, min_open=True), keys=('latent_kwargs.scale_factor',),
         help=f'Latent scale factor for --train_on_latents on raw images  [default: {latents.DEFAULT_SCALE_FACTOR}]'),
    Flag('progressive', ('--progressive',), metavar='BOOL', type=bool, default=False,
         keys=('patch_kwargs.progressive',),
         help='Patch sizes in increasing order instead of random, switching at whole kimg as the official code'),
    Flag('batch_mult', ('--batch-mult', '--batch_mult'), type=click.Choice(list(patching.BATCH_MULTS)),
         default='formula', keys=('patch_kwargs.batch_mult',),
         help='Images per patch step: formula R/P, or the official code\'s table (x8 at R/4 for 128 and 256 px, '
              'x4 at 64 px patches of 128 px; sides 16-512 only)'),
    Flag('implicit_mlp', ('--implicit_mlp', '--implicit-mlp'), metavar='BOOL', type=bool, default=False,
         keys=('network_kwargs.implicit_mlp',),
         help='1x1-conv MLP on the input and coordinates'),
    Flag('pos_freqs', ('--pos_freqs', '--pos-freqs'), metavar='INT', type=click.IntRange(min=0), default=0,
         keys=('network_kwargs.pos_freqs',),
         help='Sin/cos frequencies added to the coordinate channels'),

    # Hyperparameters.
    Flag('duration', ('--duration',), metavar='MIMG', type=click.FloatRange(min=0, min_open=True), default=200,
         keys=('total_kimg',), scale=1e-3, run_only=True,
         help='Training duration'),
    Flag('batch', ('--batch',), metavar='INT', type=click.IntRange(min=1), default=512,
         keys=('batch_size',), copied=True,
         help='Total batch size (full images per step)'),
    Flag('batch_gpu', ('--batch-gpu', '--batch_gpu'), metavar='INT', type=click.IntRange(min=1),
         keys=('batch_gpu',), copied=True,
         help='Full images per accumulation round and process (a patch step packs up to R/P rounds into one)  '
              '[default: --batch / processes]'),
    Flag('cbase', ('--cbase',), metavar='INT', type=click.IntRange(min=1), keys=('network_kwargs.model_channels',),
         help='Channels of the first resolution (the base the --cres multipliers scale)  [default: 128; adm: 192]'),
    Flag('cres', ('--cres',), metavar='LIST', type=dnnlib.util.IntList(), keys=('network_kwargs.channel_mult',),
         help='Channel multiplier per resolution, e.g. 1,2,2,2  [default: 2,2,2; adm: 1,2,3,4]'),
    Flag('blocks', ('--blocks',), metavar='INT', type=click.IntRange(min=1), keys=('network_kwargs.num_blocks',),
         help='Residual blocks per resolution  [default: 4; adm: 3]'),
    Flag('attn', ('--attn',), metavar='LIST', type=dnnlib.util.IntList(), keys=('network_kwargs.attn_resolutions',),
         help='Resolutions with self-attention, e.g. 16 or 32,16 or none  [default: 16; adm: 32,16,8]'),
    Flag('heads', ('--heads',), metavar='INT', type=click.IntRange(min=1), keys=('network_kwargs.num_heads',),
         help='Attention heads of a DiT (dit-s: 6, dit-b: 12, dit-l and dit-xl: 16 when left out)'),
    Flag('token_size', ('--token-size', '--token_size'), type=click.Choice(['2', '4', '8']),
         keys=('network_kwargs.token_size',),
         help='Side of a DiT\'s tokens in the network\'s pixels (latent pixels for latents; 2 when left out), not '
              'the training crop, whose sizes follow --real_p'),
    Flag('lr', ('--lr',), metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=10e-4,
         keys=('optimizer_kwargs.lr',),
         help='Learning rate'),
    Flag('P_mean', ('--P_mean', '--P-mean'), metavar='FLOAT', type=float, keys=('loss_kwargs.P_mean',),
         help='EDM loss: mean of ln(sigma)  [default: -1.2; edm2-*: -0.4]'),
    Flag('P_std', ('--P_std', '--P-std'), metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
         keys=('loss_kwargs.P_std',),
         help='EDM loss: std of ln(sigma)  [default: 1.2; edm2-*: 1.0]'),
    Flag('lr_rampup', ('--lr-rampup', '--lr_rampup'), metavar='KIMG', type=click.FloatRange(min=0), default=10000,
         keys=('lr_rampup_kimg',), copied=True,
         help='Learning-rate ramp-up'),
    Flag('lr_decay', ('--lr-decay', '--lr_decay'), metavar='BATCHES', type=click.FloatRange(min=0),
         keys=('lr_decay_batches',),
         help='Learning-rate decay of EDM2: lr / sqrt(max(images / (BATCHES * --batch), 1)); 0 = off  '
              f'[default: 0; edm2-*: {EDM2_DEFAULTS["lr_decay"]}]'),
    Flag('ema', ('--ema',), metavar='MIMG', type=click.FloatRange(min=0), default=0.5,
         keys=('ema_halflife_kimg',), scale=1e-3,
         help='EMA half-life'),
    Flag('ema_std', ('--ema-std', '--ema_std'), metavar='LIST', type=dnnlib.util.FloatList(), keys=('ema_stds',),
         help='Also keep power-function EMAs of these relative widths, saved with each snapshot, for '
              'reconstruct_phema.py (EDM2\'s post-hoc EMA; docs/EVALUATION.md)'),
    Flag('dropout', ('--dropout',), metavar='FLOAT', type=click.FloatRange(0, 1), keys=('network_kwargs.dropout',),
         help=f'Dropout probability (EDM\'s default for a UNet, the DiT paper\'s for a DiT, EDM2\'s for its UNet)  '
              f'[default: {DEFAULT_DROPOUT["unet"]}; DiT: {DEFAULT_DROPOUT["dit"]}; '
              f'edm2-*: {DEFAULT_DROPOUT["edm2"]}]'),
    Flag('augment', ('--augment',), metavar='FLOAT', type=click.FloatRange(0, 1), default=0.12,
         keys=('augment_kwargs.p',),
         help='Augment probability'),
    Flag('xflip', ('--xflip',), metavar='BOOL', type=bool, default=False, keys=('dataset_kwargs.xflip',),
         help='Enable dataset x-flips'),
    Flag('label_dropout', ('--label-dropout', '--label_dropout'), metavar='FLOAT', type=click.FloatRange(0, 1),
         default=0, keys=('network_kwargs.label_dropout',),
         help='Drop class labels with this probability (for --cfg at sampling)'),
    Flag('max_size', ('--max-size', '--max_size'), metavar='INT', type=click.IntRange(min=1),
         keys=('dataset_kwargs.max_size',),
         help='Train on a random subset of N images'),

    # Performance-related.
    Flag('fp16', ('--fp16',), metavar='BOOL', type=bool, default=False, keys=('network_kwargs.use_fp16',),
         help='Run the network in fp16 (CUDA; on CPU it runs in fp32 and says so)'),
    Flag('bf16', ('--bf16',), metavar='BOOL', type=bool, default=False, keys=('performance_kwargs.precision',),
         help='bf16 autocast (CUDA and CPU)'),
    Flag('channels_last', ('--channels-last', '--channels_last'), metavar='BOOL', type=bool, default=False,
         keys=('performance_kwargs.channels_last',),
         help='Network weights and activations in channels-last memory format (measured faster on CPU for the '
              'demo network; see docs/PERFORMANCE.md)'),
    Flag('compile', ('--compile',), metavar='BOOL', type=bool, default=False,
         keys=('performance_kwargs.compile_kwargs',),
         help='torch.compile the network: one graph per patch shape, compiled at its first step (CUDA; minutes per '
              'shape on CPU)'),
    Flag('ls', ('--ls',), metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=1,
         keys=('loss_scaling',), copied=True,
         help='Loss scaling'),
    Flag('bench', ('--bench',), metavar='BOOL', type=bool, default=True,
         keys=('cudnn_benchmark',), copied=True, run_only=True,
         help='Enable cuDNN benchmarking'),
    Flag('cache', ('--cache',), metavar='BOOL', type=bool, default=True,
         keys=('dataset_kwargs.cache',), run_only=True,
         help='Cache dataset in CPU memory'),
    Flag('workers', ('--workers',), metavar='INT', type=click.IntRange(min=0), default=1,
         keys=('data_loader_kwargs.num_workers', 'data_loader_kwargs.prefetch_factor',
               'data_loader_kwargs.persistent_workers'), run_only=True,
         help='DataLoader worker processes'),
    Flag('device', ('--device',), metavar='STR', type=str, default='cpu', shown=False,
         keys=('device', 'data_loader_kwargs.pin_memory'), run_only=True,
         help='cpu, cuda or cuda:N (under torchrun, cuda is each process\'s LOCAL_RANK GPU)  '
              '[default: cuda if available, else cpu]'),
    Flag('max_minutes', ('--max-minutes', '--max_minutes'), metavar='FLOAT',
         type=click.FloatRange(min=0, min_open=True), keys=('max_minutes',), copied=True, run_only=True,
         help='Stop at a step boundary after this many minutes, with a training state, exit status 75 (as on '
              'SIGTERM, SIGINT, SIGUSR1); the same command resumes'),
    Flag('hang_timeout', ('--hang-timeout', '--hang_timeout'), metavar='SECONDS', type=click.FloatRange(min=1),
         default=120, keys=('hang_timeout',), copied=True, run_only=True,
         help='Seconds a rank may wait for the others in a collective before the job ends naming the rank that '
              'stopped'),
    Flag('snapshot_on_stop', ('--snapshot-on-stop', '--snapshot_on_stop'), metavar='BOOL', type=bool, default=False,
         keys=('snapshot_on_stop',), copied=True, run_only=True,
         help='Also write a network snapshot (with samples and metrics) when stopped early'),
    Flag('accept_changed_data', ('--accept-changed-data', '--accept_changed_data'), metavar='BOOL', type=bool,
         default=False, keys=('accept_changed_data',), copied=True, run_only=True,
         help='Resume even if the dataset\'s files changed since the training state was written'),
    Flag('max_bad_steps', ('--max-bad-steps', '--max_bad_steps'), metavar='INT', type=click.IntRange(min=0),
         default=20, keys=('max_bad_steps',), copied=True, run_only=True,
         help='Stop at the end of a tick once more than N steps had non-finite gradients (they are skipped)'),

    # I/O-related.
    Flag('desc', ('--desc',), metavar='STR', type=str, cli_only=True,
         help='String to include in result dir name; it names the run: the same command with another --desc starts '
              'a new run folder, with the same --desc it resumes that run'),
    Flag('nosubdir', ('--nosubdir',), is_flag=True, cli_only=True,
         help='Do not create a subdirectory for results'),
    Flag('tick', ('--tick',), metavar='KIMG', type=click.FloatRange(min=0, min_open=True), default=50,
         keys=('kimg_per_tick',), copied=True, run_only=True,
         help='How often to print progress'),
    Flag('snap', ('--snap',), metavar='TICKS', type=click.IntRange(min=1), default=50,
         keys=('snapshot_ticks',), copied=True, run_only=True,
         help='How often to save snapshots'),
    Flag('dump', ('--dump',), metavar='TICKS', type=click.IntRange(min=1), default=500,
         keys=('state_dump_ticks',), copied=True, run_only=True,
         help='How often to dump state'),
    Flag('snapshot_format', ('--snapshot-format', '--snapshot_format'),
         type=click.Choice(['pkl', 'safetensors', 'both']), default='pkl', keys=('snapshot_format',), copied=True, run_only=True,
         help='Snapshot files: EDM\'s pickles, .safetensors (no code inside) or both'),
    Flag('samples', ('--samples',), metavar='INT', type=click.IntRange(min=0), default=16,
         keys=('sample_count',), copied=True, run_only=True,
         help='Images in the samples-NNNNNN.png grid at each snapshot (0 = off)'),
    Flag('metrics', ('--metrics',), metavar='LIST', type=dnnlib.util.ChoiceList(metrics.METRICS),
         keys=('metrics',), run_only=True,
         help='Metrics to compute at each snapshot, comma-separated: fid, fd_dinov2 (docs/EVALUATION.md)'),
    Flag('metric_ref', ('--metric-ref', '--metric_ref'), metavar='NPZ|URL[,...]', type=str,
         keys=('metric_kwargs.ref',), run_only=True,
         help='Reference statistics for --metrics (from fid.py ref), one per metric, comma-separated in the same '
              'order'),
    Flag('metric_dinov2', ('--metric-dinov2', '--metric_dinov2'), metavar='ID|DIR', type=str,
         keys=('metric_kwargs.dinov2',), run_only=True,
         help=f'DINOv2 model of --metrics=fd_dinov2: a Hugging Face Hub id or a folder written by save_pretrained '
              f'(offline machines)  [default: {dinov2.DEFAULT_MODEL}]'),
    Flag('metric_detector', ('--metric-detector', '--metric_detector'), metavar='PATH|URL', type=str,
         keys=('metric_kwargs.detector',), run_only=True,
         help='FID\'s feature detector of --metrics=fid, a TorchScript .pt or a network pickle .pkl, as fid.py '
              '--detector (offline machines)  [default: EDM\'s Inception-v3, downloaded once into the cache]'),
    Flag('metric_num', ('--metric-num', '--metric_num'), metavar='INT', type=click.IntRange(min=2), default=50000,
         keys=('metric_kwargs.num',), run_only=True,
         help='Images generated for --metrics'),
    Flag('seed', ('--seed',), metavar='INT', type=click.IntRange(min=0), default=0, shown=False,
         keys=('seed',), copied=True,
         help='Random seed, recorded in training_options.json  [default: random; a resumed run keeps its own]'),
    Flag('transfer', ('--transfer',), metavar='PKL|SAFETENSORS|URL', type=str, keys=('transfer_pkl',), run_only=True,
         help='Transfer learning from a network snapshot: a path, an http(s) URL or a Hugging Face Hub file '
              'hf://OWNER/REPO/FILE'),
    Flag('resume', ('--resume',), metavar='PT', type=str, cli_only=True,
         help='Resume from this training state (training-state-*.pt) in a new run folder, with its seed unless '
              '--seed; without it, the same command resumes its own run'),
    Flag('dry_run', ('-n', '--dry-run', '--dry_run'), is_flag=True, cli_only=True,
         help='Print the resolved options and the run folder, and whether the run would resume, then exit'),
)

def defaults():
    """{name: default} of the training options (config.DEFAULTS)."""
    return dnnlib.EasyDict({flag.name: flag.default for flag in FLAGS if not flag.cli_only})


def click_options(fn):
    """Click decorator: every flag of FLAGS, in its order."""
    for flag in reversed(FLAGS):
        fn = flag.click_option(fn)
    return fn


def flag_of_key(key):
    """The Flag that sets dotted key `key` of the resolved options (or a key above it), or the
    command's flag of that name recorded beside them (--desc: training.runs), or None."""
    for flag in FLAGS:
        if any(key == k or key.startswith(k + '.') for k in flag.keys):
            return flag
    return next((flag for flag in FLAGS if flag.cli_only and flag.name == key), None)
