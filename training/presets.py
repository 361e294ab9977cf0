"""Paper presets: `train.py --preset=NAME` fills in the settings of one of the
Patch Diffusion paper's experiments (Wang et al., NeurIPS 2023,
arXiv:2304.12526). A preset is a set of train.py flag values; a flag the
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
