"""Paper presets: `train.py --preset=NAME` fills in the settings of one of the
Patch Diffusion paper's experiments (Wang et al., NeurIPS 2023,
arXiv:2304.12526), or of EDM2's (Karras et al., CVPR 2024, arXiv:2312.02696)
on full images and on patches. A preset is a set of train.py flag values; a flag the
user types keeps the typed value. docs/PRESETS_AND_HUB.md ("Paper presets") has the table,
with the FID the paper reports for each preset and where the number is from.

    values = apply_preset('celeba-64', values, typed={'outdir', 'data'})
    c = config.build_config(values, dataset)

The preset's name is not part of the resolved options: a command with
--preset and the same command with the preset's flags typed out resolve to
the same options, so either one resumes the other's run (training.runs).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Preset:
    """One of the paper's experiments.

    description: what it trains, in one line; fid: the FID the paper reports
    for it, None where that number could not be checked against the paper's
    text; fid_source: where `fid` is from, or why it is None; options: the
    train.py flag values {underscored name as in config.DEFAULTS: value}.
    """
    description: str
    fid: float | None
    fid_source: str
    options: dict
    fd_dinov2: float | None = None   # FD-DINOv2 the paper reports (EDM2's ImageNet-512 presets)


_ABSTRACT = 'the paper\'s abstract (arXiv:2304.12526v2)'
_TABLE_UNREAD = 'the paper\'s results table could not be checked here'

# The official README's latent ADM command (LSUN; ImageNet adds to it).
_LATENT_ADM = dict(arch='adm', train_on_latents=True, batch_gpu=32, lr=1e-4, ema=50, dropout=0.10, fp16=True, ls=100,
                   augment=0.0, real_p=0.5)

# Values from the official README's training commands, flag for flag, where a preset is one of
# them; otherwise EDM's README command for the dataset (the official README: "We follow the
# hyperparameter settings of EDM") with the paper's --real_p=0.5. Every preset names --duration
# and --real_p, so that changes of config.DEFAULTS cannot change a preset.
PRESETS = {
    'celeba-64': Preset(
        description='DDPM++ on CelebA 64x64, unconditional (the official README\'s first command)',
        fid=1.77, fid_source=_ABSTRACT,
        options=dict(cond=False, arch='ddpmpp', batch=256, cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0.0,
                     real_p=0.5, duration=200)),   # 200 Mimg: the official train.py's default, as EDM's
    'ffhq-64': Preset(
        description='DDPM++ on FFHQ 64x64, unconditional (EDM\'s FFHQ-64 command with --real_p=0.5)',
        fid=None, fid_source=f'not verified: {_TABLE_UNREAD}',
        options=dict(cond=False, arch='ddpmpp', batch=256, cres=[1, 2, 2, 2], lr=2e-4, dropout=0.05, augment=0.15,
                     real_p=0.5, duration=200)),
    'afhqv2-64': Preset(
        # The paper trains on each AFHQv2 class alone (Cat, Dog, Wild: about 5,000 images each). Its
        # duration for them is not checked here (third-party summaries say 75 Mimg): EDM's 200 Mimg.
        description='DDPM++ on one AFHQv2 class at 64x64, unconditional (EDM\'s AFHQv2-64 command with '
                    '--real_p=0.5)',
        fid=1.93, fid_source=f'{_ABSTRACT}, for AFHQv2-Wild; Cat and Dog not verified',
        options=dict(cond=False, arch='ddpmpp', batch=256, cres=[1, 2, 2, 2], lr=2e-4, dropout=0.25, augment=0.15,
                     real_p=0.5, duration=200)),
    'lsun-bedroom-256': Preset(
        description='ADM on Stable Diffusion VAE latents of LSUN Bedroom 256x256, unconditional (the official '
                    'README\'s second command)',
        fid=None, fid_source=f'not verified: {_TABLE_UNREAD} (a third-party summary of it gives 2.75)',
        options=dict(_LATENT_ADM, cond=False, duration=200, batch=1024)),
    'lsun-church-256': Preset(
        description='ADM on Stable Diffusion VAE latents of LSUN Church 256x256, unconditional (the official '
                    'README\'s LSUN command)',
        fid=None, fid_source=f'not verified: {_TABLE_UNREAD} (a third-party summary of it gives 2.66)',
        options=dict(_LATENT_ADM, cond=False, duration=200, batch=1024)),
    'imagenet-256': Preset(
        # label_dropout: the paper drops 10% of the labels for classifier-free guidance (as third-party
        # summaries quote it); the official train.py has no flag for it, so its command trains with none.
        description='ADM on Stable Diffusion VAE latents of ImageNet 256x256, class-conditional (the official '
                    'README\'s third command, with --label-dropout=0.1 for generate.py --cfg)',
        fid=2.72, fid_source=f'{_ABSTRACT}; sampled with --cfg=1.3 as the official README says',
        options=dict(_LATENT_ADM, cond=True, duration=2500, batch=4096, tick=200, label_dropout=0.1)),
}

# EDM2's configurations (its train_edm2.py): the model's size, then its duration (Mimg), lr, dropout.
# ImageNet-512 trains on SD-VAE latents (64x64x4); ImageNet-64 on pixels.
_EDM2_IMG512 = dict(xs=(2048, 0.0120, 0.0), s=(2048, 0.0100, 0.0), m=(2048, 0.0090, 0.1), l=(1792, 0.0080, 0.1),
                    xl=(1280, 0.0070, 0.1), xxl=(896, 0.0065, 0.1))
_EDM2_IMG64 = dict(s=(1024, 0.0100, 0.0), m=(2048, 0.0090, 0.1), l=(1024, 0.0080, 0.1), xl=(640, 0.0070, 0.1))
# The paper's results (arXiv:2312.02696): FID and FD-DINOv2 of ImageNet-512 (Table 2) and FID of
# ImageNet-64 (Table 3), without guidance, each with its best post-hoc EMA.
_EDM2_FID512 = dict(xs=3.53, s=2.56, m=2.25, l=2.06, xl=1.96, xxl=1.91)
_EDM2_FD512 = dict(xs=103.39, s=68.64, m=58.44, l=52.25, xl=45.96, xxl=42.84)
_EDM2_FID64 = dict(s=1.58, m=1.43, l=1.33, xl=1.33)
_EDM2_SOURCE = 'EDM2\'s paper (arXiv:2312.02696), Table {table}; not reproduced here'
# What every EDM2 preset sets: its batch, noise levels of training, no augmentation, fp16, class labels,
# EDM2's ramp-up of 10 Mimg and its power EMAs (widths 0.05 and 0.10) for reconstruct_phema.py.
_EDM2_COMMON = dict(cond=True, batch=2048, augment=0.0, fp16=True, lr_rampup=10000, ema_std=[0.05, 0.1])


def _edm2_presets():
    """{name: Preset} of EDM2's ImageNet-512 and ImageNet-64 configurations, as
    EDM2 trains them (full images, no coordinates: `edm2-img512-s`) and on
    patches (`edm2-img512-s-patch`: --real_p=0.5 with coordinates)."""
    made = {}
    for data, table, sizes, fids in (('img512', 2, _EDM2_IMG512, _EDM2_FID512), ('img64', 3, _EDM2_IMG64, _EDM2_FID64)):
        for size, (duration_mi, lr, dropout) in sizes.items():
            options = dict(_EDM2_COMMON, arch=f'edm2-{size}', lr=lr, dropout=dropout,
                           duration=duration_mi * 2 ** 20 / 1e6)   # EDM2 counts in Mi images
            if data == 'img512':
                what = f'EDM2-{size.upper()} on Stable Diffusion VAE latents of ImageNet 512x512, class-conditional'
                options.update(train_on_latents=True, lr_decay=70000, P_mean=-0.4, P_std=1.0)
            else:
                what = f'EDM2-{size.upper()} on ImageNet 64x64, class-conditional'
                options.update(lr_decay=35000, P_mean=-0.8, P_std=1.6)
            fid, fd = fids[size], _EDM2_FD512.get(size) if data == 'img512' else None
            source = _EDM2_SOURCE.format(table=table)
            made[f'edm2-{data}-{size}'] = Preset(
                description=f'{what} (EDM2\'s train_edm2.py preset edm2-{data}-{size}, full images)',
                fid=fid, fd_dinov2=fd, fid_source=source, options=dict(options, real_p=1.0, use_pos=False))
            made[f'edm2-{data}-{size}-patch'] = Preset(
                description=f'{what}, on patches with coordinates (--real_p=0.5); a configuration of neither paper',
                fid=None, fid_source=f'not verified: no paper trains it; on full images: FID {fid:g} ({source})',
                options=dict(options, real_p=0.5, use_pos=True))
    return made


PRESETS.update(_edm2_presets())

# A preset's value that cannot stand beside a flag the user typed gives way to it:
# (typed flag, its typed value, the preset's flag that then keeps its default).
_GIVES_WAY = (
    ('bf16', True, 'fp16'),            # --bf16=1 and --fp16=1 are exclusive
    ('cond', False, 'label_dropout'),  # an unconditional model has no labels to drop
)


def apply_preset(name, values, typed):
    """train.py's flag values with preset `name` filled in.

    name: a key of PRESETS, or None (no preset: `values` as they are);
    values: {flag name: value} (underscored names as in config.DEFAULTS; the
    flags click parsed, defaults included, or only some of them); typed: the
    names of the flags the user gave, which keep their values. Returns a new
    dict: `values` with every flag of the preset that the user did not give
    set to the preset's value, except where that value would contradict a
    typed flag (_GIVES_WAY: --bf16=1 over the preset's --fp16=1, --cond=0
    over its --label-dropout).
    ValueError if the name is unknown.
    """
    merged = dict(values)
    if name is None:
        return merged
    if name not in PRESETS:
        raise ValueError(f'--preset={name} is unknown; choose one of {", ".join(PRESETS)}')
    gives_way = {yielding for flag, value, yielding in _GIVES_WAY if flag in typed and values.get(flag) == value}
    merged.update({key: value for key, value in PRESETS[name].options.items()
                   if key not in typed and key not in gives_way})
    return merged
