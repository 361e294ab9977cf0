"""Post-hoc EMA (EDM2: Karras et al., "Analyzing and Improving the Training
Dynamics of Diffusion Models", CVPR 2024): power-function EMAs of the weights
kept during training, and the least-squares reconstruction of any other EMA
from their snapshots after training (docs/DESIGN.md section 7).

Time t is the count of training images (the Trainer's cur_nimg). An EMA is
an average of the weights theta(tau), 0 <= tau <= t, under an averaging
profile p(tau) (a density over [0, t]). A power-function EMA of exponent
gamma has the profile

    p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)

and the relative width (the profile's standard deviation over t)

    std = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))

so it forgets in proportion to the length of training. Its update after a
step from t0 to t1 images is theta_ema <- beta theta_ema + (1 - beta) theta
with beta = (t0 / t1)^(gamma + 1): the weights after each step then carry
exactly the profile's mass over that step, whatever the steps' sizes (the
patch multiplier changes them).

Snapshots of power EMAs at two or more widths and several times span a space
of profiles; the EMA of another profile (another width, another time, or the
classic EMA of a half-life) is the combination sum_i x_i theta_i whose
profile sum_i x_i p_i is nearest to the wanted one in L2: x solves A x = b
with A_ij = <p_i, p_j> and b_i = <p_i, p_target>, then is divided by its
sum, as EDM2 does, so that the weights sum to 1: the result is an average of
the snapshots, and a constant added to every weight comes back unchanged.
"""

import copy
import dataclasses
import math
import os
import re

import numpy as np
import torch

import dnnlib
from training import snapshots

MAX_STD = math.sqrt(1 / 12)   # gamma = 0: the plain average of all weights so far
SNAPSHOT_RE = re.compile(r'^network-snapshot-(\d+)-(\d+\.\d+)\.(pkl|safetensors)$')


def std_to_gamma(std):
    """The exponent gamma >= 0 of the power-function EMA of relative width `std`."""
    std = float(std)
    if not 0 < std <= MAX_STD:
        raise ValueError(f'An EMA width (std) of {std:g} is outside (0, {MAX_STD:.4f}]: widths are fractions of '
                         f'the training so far, e.g. 0.05 or 0.10 (EDM2\'s); {MAX_STD:.4f} is the plain average')
    # (gamma + 1) = std^2 (gamma + 2)^2 (gamma + 3), a cubic in gamma; its largest real root.
    inv = 1 / std ** 2
    roots = np.roots([1, 7, 16 - inv, 12 - inv])
    gamma = max(root.real for root in roots if abs(root.imag) < 1e-6)
    for _ in range(3):   # polish with Newton's method
        value = gamma ** 3 + 7 * gamma ** 2 + (16 - inv) * gamma + 12 - inv
        gamma -= value / (3 * gamma ** 2 + 14 * gamma + 16 - inv)
    return float(max(gamma, 0.0))


def gamma_to_std(gamma):
    """The relative width of the power-function EMA of exponent `gamma`."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def std_label(std):
    """How a width appears in file names: three decimals ('0.050')."""
    return f'{std:.3f}'


def check_stds(stds, flag='--ema-std'):
    """The widths as floats; ValueError naming `flag` for one out of range or
    two that share a file name."""
    stds = [float(std) for std in stds]
    for std in stds:
        try:
            std_to_gamma(std)
        except ValueError as err:
            raise ValueError(f'{flag}: {err}') from None
    labels = [std_label(std) for std in stds]
    if len(set(labels)) != len(labels):
        raise ValueError(f'{flag}={",".join(map(str, stds))} names a width twice (to three decimals, as in the '
                         f'file names); give distinct widths')
    return stds


# ----------------------------------------------------------------------------
# During training.


class PowerEMAs:
    """Power-function EMAs of a network at the relative widths `stds`
    (copies of the network, on its device)."""

    def __init__(self, net, stds):
        self.stds = check_stds(stds)
        self.gammas = [std_to_gamma(std) for std in self.stds]
        self.nets = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds]

    @torch.no_grad()
    def update(self, net, nimg_before, nimg_after):
        """Average in the weights of `net` after a step from nimg_before to nimg_after images."""
        params, buffers = list(net.parameters()), list(net.buffers())
        for gamma, ema in zip(self.gammas, self.nets):
            beta = (nimg_before / nimg_after) ** (gamma + 1)
            torch._foreach_lerp_(list(ema.parameters()), params, 1 - beta)
            for b_ema, b_net in zip(ema.buffers(), buffers):
                b_ema.copy_(b_net)

    def state_dict(self):
        return dict(stds=list(self.stds), nets=[ema.state_dict() for ema in self.nets])

    def load_state_dict(self, state):
        check_resumed_stds(state, self.stds)
        for ema, tensors in zip(self.nets, state['nets']):
            ema.load_state_dict(tensors)


def check_resumed_stds(recorded, stds):
    """ValueError unless a training state's power EMAs (`recorded`: its
    'phema' entry, or None) have the widths `stds`: a power EMA must have
    seen the whole training, so none can be added or dropped on resume."""
    before = [std_label(std) for std in (recorded or {}).get('stds', [])]
    if before == [std_label(std) for std in stds]:
        return
    if not before:
        raise ValueError(f'The training state keeps no power EMAs, so --ema-std={",".join(map(str, stds))} cannot '
                         f'start here (a power EMA averages the whole training): resume without --ema-std, or start '
                         f'a new run with it')
    raise ValueError(f'The training state keeps power EMAs of widths {", ".join(before)}: resume with '
                     f'--ema-std={",".join(before)}')


# ----------------------------------------------------------------------------
# Averaging profiles and their inner products.


@dataclasses.dataclass(frozen=True)
class PowerProfile:
    """The profile of the power-function EMA of exponent gamma at time t."""
    t: float
    gamma: float

    def density(self, tau):
        return (self.gamma + 1) / self.t * (tau / self.t) ** self.gamma

    def kinks(self):
        return ()


@dataclasses.dataclass(frozen=True)
class HalfLifeProfile:
    """The profile of the classic EMA at time t (EDM's): a half-life of
    `halflife` images, shortened to rampup * tau while that is shorter.
    Without ramp-up (rampup None, as after --transfer) the EMA keeps
    2^(-t / halflife) of its weight on the initial weights, which no
    combination of snapshots holds: the profile is then the rest, scaled to
    a density."""
    t: float
    halflife: float
    rampup: float = None

    def density(self, tau):
        # Weight of theta(tau): (ln 2 / h(tau)) exp(-int_tau^t ln 2 / h(s) ds), h(s) = min(halflife, rampup s).
        k, t, H, r = math.log(2), self.t, self.halflife, self.rampup
        if not r:
            return k / H * np.exp(-k * (t - tau) / H) / -np.expm1(-k * t / H)
        tau0 = H / r   # where the ramp-up ends
        ramp = tau < tau0
        decay = k * np.maximum(t - np.maximum(tau, tau0), 0) / H   # the part of (tau, t) past the ramp-up
        decay += np.where(ramp, k / r * np.log(np.minimum(t, tau0) / np.where(ramp, tau, 1)), 0)
        return k / np.where(ramp, r * tau, H) * np.exp(-decay)

    def kinks(self):
        return (self.halflife / self.rampup,) if self.rampup else ()


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(32)


def _integrate(f, end, kinks=(), panels=256):
    """int_0^end f(tau) dtau by composite Gauss-Legendre (32 nodes on each of
    `panels` panels between consecutive kinks)."""
    points = sorted({0.0, end, *(k for k in kinks if 0 < k < end)})
    total = 0.0
    for lo, hi in zip(points[:-1], points[1:]):
        edges = np.linspace(lo, hi, panels + 1)
        half = (edges[1:] - edges[:-1])[:, None] / 2
        tau = (edges[:-1, None] + half) + half * _NODES
        total += float((f(tau) * _WEIGHTS * half).sum())
    return total


def inner(a, b):
    """<a, b> = int a(tau) b(tau) dtau of two profiles: in closed form for two
    power profiles, by quadrature otherwise."""
    if isinstance(a, PowerProfile) and isinstance(b, PowerProfile):
        t = min(a.t, b.t)
        g = a.gamma + b.gamma
        return (a.gamma + 1) * (b.gamma + 1) / (g + 1) * (t / a.t) ** (a.gamma + 1) * (t / b.t) ** (b.gamma + 1) / t
    return _integrate(lambda tau: a.density(tau) * b.density(tau), min(a.t, b.t), (*a.kinks(), *b.kinks()))


def solve_weights(sources, target):
    """Weights x of the source profiles for `target`, as EDM2 solves them:
    the least-squares solution of A x = b divided by its sum, so that
    sum_i x_i theta_i is an average of the snapshots, as every EMA is (the
    solution alone sums to 0.9-1.0005 with ten snapshot times, and would
    scale the weights by that). Returns x and the relative L2 error of the
    profile of that combination, ||sum_i x_i p_i - p|| / ||p|| (0: exact)."""
    A = np.array([[inner(p, q) for q in sources] for p in sources])
    b = np.array([inner(p, target) for p in sources])
    x = np.linalg.lstsq(A, b, rcond=None)[0]
    x = x / x.sum()
    norm2 = inner(target, target)
    error2 = max(norm2 - 2 * x @ b + x @ A @ x, 0.0)
    return x, math.sqrt(error2 / norm2)


# ----------------------------------------------------------------------------
# After training: from snapshots to a reconstructed snapshot.


@dataclasses.dataclass
class Source:
    """A power-EMA snapshot of a run folder."""
    path: str
    nimg: int
    std: float
    gamma: float
    rampup: float = None   # the classic EMA's ramp-up in that run


def snapshot_name(kimg_tag, std):
    """File name of the power EMA of width `std` saved with network-snapshot-<kimg_tag>.pkl."""
    return f'network-snapshot-{kimg_tag}-{std_label(std)}.pkl'


def find_sources(indir):
    """The power-EMA snapshots in `indir` (one per time and width; of a .pkl
    and .safetensors pair, the .safetensors: nothing is unpickled, and only
    its header is read here), sorted by time, with their metadata.
    ValueError if there are none or one records no power EMA."""
    if not os.path.isdir(indir):
        raise ValueError(f'--indir={indir} is not a folder; give the run folder of a training with --ema-std')
    names = set(os.listdir(indir))
    chosen = {}
    for name in sorted(names):
        match = SNAPSHOT_RE.match(name)
        if match and (match.group(3) == 'safetensors' or name[:-len('pkl')] + 'safetensors' not in names):
            chosen[name.rsplit('.', 1)[0]] = os.path.join(indir, name)
    if not chosen:
        raise ValueError(f'{indir} holds no power-EMA snapshots (network-snapshot-NNNNNN-0.050.pkl, ...): train '
                         f'with --ema-std=0.05,0.10 to keep them')
    sources = []
    for path in chosen.values():   # the time and width, without the weights (.safetensors: the header only)
        meta = snapshots.load_snapshot_meta(path)
        info = meta.get('phema')
        if not isinstance(info, dict) or 'gamma' not in info or 'nimg' not in info:
            raise ValueError(f'{path} is named as a power-EMA snapshot but records no power EMA ("phema" entry)')
        sources.append(Source(path, int(info['nimg']), float(info['std']), float(info['gamma']),
                              info.get('ema_rampup_ratio')))
    sources.sort(key=lambda s: (s.nimg, s.std))
    return sources


def reconstruct(indir, outdir, stds=(), halflives_kimg=(), kimg=None, snapshot_format='pkl', verbose=True):
    """Reconstruct EMAs from the power-EMA snapshots of run folder `indir`
    and write each as a normal network snapshot in `outdir`:
    phema-<kimg>-<std>.pkl for each relative width in `stds`, and
    phema-<kimg>-ema<Mimg>.pkl for each classic half-life in
    `halflives_kimg` (with the run's ramp-up). The time is that of the newest
    snapshot at or before `kimg` (None: the newest). Returns the paths."""
    stds = check_stds(stds, '--outstd')
    if not stds and not halflives_kimg:
        raise ValueError('Nothing to reconstruct: give --outstd (relative widths) and/or --outema (half-lives in Mimg)')
    for halflife in halflives_kimg:
        if not halflife > 0:
            raise ValueError(f'--outema: a half-life of {halflife / 1000:g} Mimg is not positive')
    sources = find_sources(indir)
    if kimg is not None:
        earlier = [s for s in sources if s.nimg // 1000 <= kimg]
        if not earlier:
            raise ValueError(f'--outkimg={kimg}: the first power-EMA snapshot of {indir} is at kimg '
                             f'{sources[0].nimg // 1000}')
        sources = earlier
    t = sources[-1].nimg   # the newest: sources are sorted by time
    profiles = [PowerProfile(s.nimg, s.gamma) for s in sources]
    kimg_tag = f'{t // 1000:06d}'
    targets = [(f'phema-{kimg_tag}-{std_label(std)}', PowerProfile(t, std_to_gamma(std)),
                dict(std=std, gamma=std_to_gamma(std))) for std in stds]
    targets += [(f'phema-{kimg_tag}-ema{halflife / 1000:g}', HalfLifeProfile(t, halflife * 1000, sources[-1].rampup),
                 dict(halflife_kimg=halflife, ema_rampup_ratio=sources[-1].rampup)) for halflife in halflives_kimg]
    solved = []
    for name, profile, info in targets:
        weights, error = solve_weights(profiles, profile)
        solved.append((name, weights, dict(info, nimg=t, sources=len(sources), profile_error=error)))
        if verbose:
            print(f'{name}: from {len(sources)} snapshots ({len({s.nimg for s in sources})} times up to kimg '
                  f'{t / 1000:g}, widths {", ".join(sorted({std_label(s.std) for s in sources}))}); relative error of '
                  f'the averaging profile {error:.1e}')
    nets, meta = _combine(sources, [weights for _, weights, _ in solved])
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for (name, _, info), net in zip(solved, nets):
        extra = dict(phema=dict(info, reconstructed=True),
                     **{key: meta[key] for key in ('patch_kwargs', 'latent') if meta.get(key) is not None})
        paths += snapshots.save_snapshot(os.path.join(outdir, name + '.pkl'), net, meta.get('loss_fn'),
                                         meta.get('augment_pipe'), meta.get('dataset_kwargs') or {}, extra=extra,
                                         snapshot_format=snapshot_format)
    return paths


def _combine(sources, weight_sets):
    """One pass over the sources: for each weight vector, the network
    sum_i x_i theta_i (accumulated in float64; the buffers of the newest
    source). Returns (networks, the newest source's metadata)."""
    sums, newest = [None] * len(weight_sets), None
    for i, source in enumerate(sources):
        net, meta = snapshots.load_network(source.path)
        params = dict(net.named_parameters())
        if sums[0] is None:
            keys = sorted(params)
            sums = [{name: torch.zeros_like(params[name], dtype=torch.float64) for name in keys} for _ in weight_sets]
        elif sorted(params) != sorted(sums[0]):
            raise ValueError(f'{source.path} holds another network than {sources[0].path}: reconstruct from the '
                             f'snapshots of one run')
        for total, weights in zip(sums, weight_sets):
            for name, param in params.items():
                total[name].add_(param.to(torch.float64), alpha=float(weights[i]))
        newest = (net, meta)
    net, meta = newest
    nets = []
    with torch.no_grad():
        for total in sums:
            out = copy.deepcopy(net)
            for name, param in out.named_parameters():
                param.copy_(total[name].to(param.dtype))
            nets.append(out)
    return nets, dnnlib.EasyDict(meta)
