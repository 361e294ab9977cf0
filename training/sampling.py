"""Sampling: the EDM sampler, the generalised ablation sampler, network
pickles and their call conventions, per-seed randomness, and image output
(SPEC.md sections 1 and 3).

The samplers never see a network. They are driven by a denoiser `denoise`:

    denoise(x, sigma) -> D(x; sigma), float64 [N, C, H, W]
    denoise.sigma_min, denoise.sigma_max   noise range the network supports
    denoise.round_sigma(sigma)             nearest supported noise level(s)

`make_denoiser` builds one from a network of any of the three call
conventions (ours, EDM's, the official Patch Diffusion's), hiding the
coordinate channels, the class labels and classifier-free guidance; tests
drive the samplers with analytic denoisers.

Numerics follow EDM's generate.py: the sampler works in float64, the network
is called in float32, the churn noise is drawn at every step (also when
gamma = 0), and every image has its own generator seeded by its seed, so
for the same network and seeds the images equal EDM's, whatever the batch
size or the number of processes.
"""

import functools
import inspect
import json
import math
import os
import re

import numpy as np
import PIL.Image
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import persistence
from training.patching import full_grid

# ----------------------------------------------------------------------------
# Per-seed random numbers.


class StackedRandomGenerator:
    """One torch.Generator per image of a batch, seeded with that image's seed
    (modulo 2^32, as EDM), so image k draws the same numbers in any batch."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check_batch(self, size):
        assert size[0] == len(self.generators), f'batch of {size[0]} for {len(self.generators)} seeds'

    def randn(self, size, **kwargs):
        """Standard normal samples of shape `size` = [N, ...]; row k from generator k."""
        self._check_batch(size)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        """`randn` with the shape, dtype, layout and device of `input`."""
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        """torch.randint(*args) of shape `size` = [N, ...]; row k from generator k."""
        self._check_batch(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])


# ----------------------------------------------------------------------------
# Argument checks shared by the samplers.

SOLVERS = ('euler', 'heun')
DISCRETIZATIONS = ('vp', 've', 'iddpm', 'edm')
SCHEDULES = ('vp', 've', 'linear')
SCALINGS = ('vp', 'none')
ABLATION_KEYS = ('solver', 'discretization', 'schedule', 'scaling')


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'{name}={value!r} is not supported; choose one of {", ".join(choices)}')


def _check_sampler_args(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
                        solver='heun', discretization='edm', schedule='linear', scaling='none',
                        epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1):
    """Raise ValueError, saying what to change, for sampler settings that cannot work."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f'num_steps={num_steps!r} must be a positive integer')
    for name, value in (('sigma_min', sigma_min), ('sigma_max', sigma_max), ('rho', rho)):
        if value is not None and not value > 0:
            raise ValueError(f'{name}={value!r} must be positive')
    if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
        raise ValueError(f'sigma_min={sigma_min} must be below sigma_max={sigma_max}')
    if S_churn < 0 or S_min < 0 or S_max < 0:
        raise ValueError(f'S_churn={S_churn}, S_min={S_min} and S_max={S_max} must be non-negative')
    if not math.isfinite(S_noise):
        raise ValueError(f'S_noise={S_noise!r} must be a finite number')
    _check_choice('solver', solver, SOLVERS)
    _check_choice('discretization', discretization, DISCRETIZATIONS)
    _check_choice('schedule', schedule, SCHEDULES)
    _check_choice('scaling', scaling, SCALINGS)
    if not 0 < epsilon_s < 1:
        raise ValueError(f'epsilon_s={epsilon_s!r} must be in (0, 1)')
    if not C_1 > 0 or not C_2 >= 0 or int(M) != M or M < 1:
        raise ValueError(f'C_1={C_1!r} must be positive, C_2={C_2!r} non-negative and M={M!r} a positive integer')
    if not 0 < alpha <= 1:
        raise ValueError(f'alpha={alpha!r} must be in (0, 1] (the Heun step evaluates at t + alpha * h)')


def _noise_range(denoise, sigma_min, sigma_max):
    """(sigma_min, sigma_max) clamped to what the network supports; ValueError if empty."""
    lo = max(sigma_min, denoise.sigma_min)
    hi = min(sigma_max, denoise.sigma_max)
    if not lo < hi:
        raise ValueError(f'The noise range [{sigma_min}, {sigma_max}] does not overlap the network\'s '
                         f'[{denoise.sigma_min}, {denoise.sigma_max}]; choose sigma_min/sigma_max inside it')
    return lo, hi


def _step_fractions(num_steps, device):
    """i / (N - 1) for i = 0 .. N-1, float64 [N] (0 for N = 1, where EDM divides by zero)."""
    return torch.arange(num_steps, dtype=torch.float64, device=device) / max(num_steps - 1, 1)


# ----------------------------------------------------------------------------
# Time step discretisations {sigma_i} (EDM paper, Table 1).


def edm_sigma_steps(num_steps, sigma_min, sigma_max, rho=7, device='cpu'):
    """EDM's steps (Eq. 5): (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho; float64 [N]."""
    fractions = _step_fractions(num_steps, device)
    return (sigma_max ** (1 / rho) + fractions * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@functools.lru_cache(maxsize=8)
def iddpm_noise_levels(M=1000, C_1=0.001, C_2=0.008, device='cpu'):
    """The M + 1 noise levels u_0 > ... > u_M = 0 of improved DDPM (EDM Table 1), float64 [M + 1].

    u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1),
    abar_j = sin^2(pi/2 * j / (M (C_2 + 1))). The ratios are float32 and the
    recursion runs in torch on `device`, as in EDM, so the levels (and the
    images) equal EDM's bit for bit.
    """
    j = torch.arange(M + 1, device=device)
    abar = (0.5 * np.pi * j / M / (C_2 + 1)).sin() ** 2
    ratios = (abar[:-1] / abar[1:]).clip(min=C_1)          # [M]: abar_{j-1} / abar_j for j = 1 .. M
    u = torch.zeros(M + 1, dtype=torch.float64, device=device)
    for k in range(M, 0, -1):
        u[k - 1] = ((u[k] ** 2 + 1) / ratios[k - 1] - 1).sqrt()
    return u


def ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho=7, epsilon_s=1e-3,
                         C_1=0.001, C_2=0.008, M=1000, device='cpu'):
    """Noise levels sigma_0 > ... > sigma_{N-1} of a discretisation, float64 [N].

    vp:    sigma(t_i) of the VP schedule fitted to [sigma_min, sigma_max],
           t_i = 1 + i/(N-1) (epsilon_s - 1)
    ve:    geometric, sigma_i = sigma_max (sigma_min / sigma_max)^(i/(N-1))
    iddpm: N of the iDDPM levels u_j inside [sigma_min, sigma_max], evenly spaced in j
    edm:   `edm_sigma_steps`
    """
    _check_choice('discretization', discretization, DISCRETIZATIONS)
    fractions = _step_fractions(num_steps, device)
    if discretization == 'vp':
        return VPSchedule.fit(sigma_min, sigma_max, epsilon_s).sigma(1 + fractions * (epsilon_s - 1))
    if discretization == 've':
        return VESchedule().sigma((sigma_max ** 2) * ((sigma_min ** 2 / sigma_max ** 2) ** fractions))
    if discretization == 'iddpm':
        u = iddpm_noise_levels(M, C_1, C_2, torch.device(device))
        inside = u[torch.logical_and(u >= sigma_min, u <= sigma_max)]
        if len(inside) == 0:
            raise ValueError(f'No iDDPM noise level (M={M}) lies in [{sigma_min}, {sigma_max}]; widen the range')
        # Positions (L - 1) / (N - 1) * i in EDM's order of operations, so that .round() breaks ties alike.
        step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
        positions = (len(inside) - 1) / max(num_steps - 1, 1) * step_indices
        return inside[positions.round().to(torch.int64)]
    return edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device)


# ----------------------------------------------------------------------------
# Noise schedules sigma(t) and signal scalings s(t) (EDM paper, Table 1).


class VPSchedule:
    """sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1)."""

    def __init__(self, beta_d, beta_min):
        self.beta_d = beta_d
        self.beta_min = beta_min

    @classmethod
    def fit(cls, sigma_min, sigma_max, epsilon_s):
        """The schedule with sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
        beta_d = 2 * (np.log(sigma_min ** 2 + 1) / epsilon_s - np.log(sigma_max ** 2 + 1)) / (epsilon_s - 1)
        beta_min = np.log(sigma_max ** 2 + 1) - 0.5 * beta_d
        return cls(beta_d, beta_min)

    def sigma(self, t):
        return (np.e ** (0.5 * self.beta_d * (t ** 2) + self.beta_min * t) - 1) ** 0.5

    def sigma_deriv(self, t):
        """d sigma / dt = (beta_min + beta_d t) / 2 * (sigma + 1 / sigma)."""
        sigma = self.sigma(t)
        return 0.5 * (self.beta_min + self.beta_d * t) * (sigma + 1 / sigma)

    def sigma_inv(self, sigma):
        return ((self.beta_min ** 2 + 2 * self.beta_d * (sigma ** 2 + 1).log()).sqrt() - self.beta_min) / self.beta_d


class VESchedule:
    """sigma(t) = sqrt(t)."""

    def sigma(self, t):
        return t.sqrt()

    def sigma_deriv(self, t):
        return 0.5 / t.sqrt()

    def sigma_inv(self, sigma):
        return sigma ** 2


class LinearSchedule:
    """sigma(t) = t (EDM)."""

    def sigma(self, t):
        return t

    def sigma_deriv(self, t):
        return 1

    def sigma_inv(self, sigma):
        return sigma


class VPScaling:
    """s(t) = 1 / sqrt(1 + sigma(t)^2), s'(t) = -sigma(t) sigma'(t) s(t)^3."""

    def __init__(self, schedule):
        self.schedule = schedule

    def s(self, t):
        return 1 / (1 + self.schedule.sigma(t) ** 2).sqrt()

    def s_deriv(self, t):
        return -self.schedule.sigma(t) * self.schedule.sigma_deriv(t) * (self.s(t) ** 3)


class NoScaling:
    """s(t) = 1 (EDM)."""

    def s(self, t):
        return 1

    def s_deriv(self, t):
        return 0


# The VP default range of EDM's generate.py: sigma(epsilon_s) and sigma(1) of a VP
# schedule with beta_d = 19.1, beta_min = 0.1. (EDM Table 1 trains VP with beta_d
# = 19.9; we keep generate.py's value so that our images equal EDM's.)
_VP_DEFAULT_SCHEDULE = VPSchedule(beta_d=19.1, beta_min=0.1)
_DEFAULT_SIGMA_MIN = {'ve': 0.02, 'iddpm': 0.002, 'edm': 0.002}
_DEFAULT_SIGMA_MAX = {'ve': 100, 'iddpm': 81, 'edm': 80}


def default_noise_range(discretization, epsilon_s=1e-3):
    """EDM's default (sigma_min, sigma_max) for a discretisation."""
    if discretization == 'vp':
        return _VP_DEFAULT_SCHEDULE.sigma(epsilon_s), _VP_DEFAULT_SCHEDULE.sigma(1.0)
    return _DEFAULT_SIGMA_MIN[discretization], _DEFAULT_SIGMA_MAX[discretization]


# ----------------------------------------------------------------------------
# Samplers. Both take (denoise, latents, randn_like, **settings) and return
# float64 [N, C, H, W]; latents are standard normal [N, C, H, W].


def edm_sampler(denoise, latents, randn_like=torch.randn_like,
                num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """EDM's stochastic sampler (Algorithm 2): Heun steps, no correction on the last one.

    num_steps: N; sigma_min, sigma_max, rho: the time steps (Eq. 5), clamped to
    the network's range; S_churn, S_min, S_max, S_noise: churn, with
    gamma = min(S_churn / N, sqrt(2) - 1) on steps with S_min <= sigma <= S_max.
    """
    _check_sampler_args(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise)
    sigma_min, sigma_max = _noise_range(denoise, sigma_min, sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, latents.device)
    t_steps = torch.cat([denoise.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])   # t_N = 0

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat = (1 + gamma) t_cur.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = denoise.round_sigma(t_cur + gamma * t_cur)
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        D_x = denoise(x_hat, t_hat)
        d_cur = (x_hat - D_x) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Heun's 2nd-order correction, except on the last step (t_next = 0).
        if i < num_steps - 1:
            D_x = denoise(x_next, t_next)
            d_prime = (x_next - D_x) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def _ablation_time_steps(denoise, schedule, sigma_steps):
    """t_i = sigma^-1(round_sigma(sigma_i)), followed by t_N = 0; float64 [N + 1]."""
    t_steps = schedule.sigma_inv(denoise.round_sigma(sigma_steps))
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


def _ode_derivative(x, t, D_x, schedule, scaling):
    """dx/dt of the probability flow ODE with schedule sigma(t) and scaling s(t) (EDM Eq. 4)."""
    sigma, sigma_deriv = schedule.sigma(t), schedule.sigma_deriv(t)
    s, s_deriv = scaling.s(t), scaling.s_deriv(t)
    return (sigma_deriv / sigma + s_deriv / s) * x - sigma_deriv * s / sigma * D_x


def ablation_sampler(denoise, latents, randn_like=torch.randn_like,
                     num_steps=18, sigma_min=None, sigma_max=None, rho=7,
                     S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
                     solver='heun', discretization='edm', schedule='linear', scaling='none',
                     epsilon_s=1e-3, C_1=0.001, C_2=0.008, M=1000, alpha=1):
    """EDM's generalised sampler: every sampler of the paper's ablations.

    solver: 'euler' | 'heun' (2nd order, evaluated at t + alpha h);
    discretization: 'vp' | 've' | 'iddpm' | 'edm' (see `ablation_sigma_steps`);
    schedule sigma(t): 'vp' (fitted to the noise range) | 've' | 'linear';
    scaling s(t): 'vp' | 'none'. sigma_min / sigma_max default to the
    discretisation's (`default_noise_range`); the rest as `edm_sampler`.
    With the defaults it is the EDM sampler, up to float rounding.
    """
    _check_sampler_args(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise,
                        solver, discretization, schedule, scaling, epsilon_s, C_1, C_2, M, alpha)
    default_min, default_max = default_noise_range(discretization, epsilon_s)
    sigma_min, sigma_max = _noise_range(denoise, default_min if sigma_min is None else sigma_min,
                                        default_max if sigma_max is None else sigma_max)
    sched = {'vp': lambda: VPSchedule.fit(sigma_min, sigma_max, epsilon_s),
             've': VESchedule, 'linear': LinearSchedule}[schedule]()
    scale = VPScaling(sched) if scaling == 'vp' else NoScaling()
    sigma_steps = ablation_sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s,
                                       C_1, C_2, M, latents.device)
    t_steps = _ablation_time_steps(denoise, sched, sigma_steps)
    sigma, s = sched.sigma, scale.s

    x_next = latents.to(torch.float64) * (sigma(t_steps[0]) * s(t_steps[0]))
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to (1 + gamma) sigma(t_cur).
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= sigma(t_cur) <= S_max else 0
        t_hat = sched.sigma_inv(denoise.round_sigma(sigma(t_cur) + gamma * sigma(t_cur)))
        x_hat = (s(t_hat) / s(t_cur) * x_cur
                 + (sigma(t_hat) ** 2 - sigma(t_cur) ** 2).clip(min=0).sqrt() * s(t_hat) * S_noise * randn_like(x_cur))

        # Euler step from t_hat to t_next.
        h = t_next - t_hat
        d_cur = _ode_derivative(x_hat, t_hat, denoise(x_hat / s(t_hat), sigma(t_hat)), sched, scale)
        if solver == 'euler' or i == num_steps - 1:
            x_next = x_hat + h * d_cur
            continue

        # Heun: the derivative at t_hat + alpha h, blended (EDM Algorithm 1 generalised).
        x_prime = x_hat + alpha * h * d_cur
        t_prime = t_hat + alpha * h
        d_prime = _ode_derivative(x_prime, t_prime, denoise(x_prime / s(t_prime), sigma(t_prime)), sched, scale)
        x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next


def _parameter_names(fn):
    return list(inspect.signature(fn).parameters)[3:]


def select_sampler(**sampler_kwargs):
    """Pick the sampler as EDM's generate.py does and check its settings.

    None values are dropped (= the sampler's default). Any of solver,
    discretization, schedule, scaling selects `ablation_sampler`, otherwise
    `edm_sampler`. Returns (sampler, kwargs); ValueError for unknown names
    or values that cannot work.
    """
    kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    sampler = ablation_sampler if any(key in kwargs for key in ABLATION_KEYS) else edm_sampler
    unknown = sorted(set(kwargs) - set(_parameter_names(ablation_sampler)))
    if unknown:
        raise ValueError(f'Unknown sampler setting(s) {", ".join(unknown)}; '
                         f'known: {", ".join(_parameter_names(ablation_sampler))}')
    _check_sampler_args(**{**_sampler_defaults(sampler), **kwargs})
    return sampler, kwargs


def _sampler_defaults(fn):
    return {name: inspect.signature(fn).parameters[name].default for name in _parameter_names(fn)}


def sample(denoise, latents, randn_like=torch.randn_like, **sampler_kwargs):
    """Run the sampler `select_sampler` picks for `sampler_kwargs`; float64 [N, C, H, W]."""
    sampler, kwargs = select_sampler(**sampler_kwargs)
    return sampler(denoise, latents, randn_like, **kwargs)


# ----------------------------------------------------------------------------
# Networks: call conventions and the denoiser.

# The name of forward's third parameter tells the convention apart:
#   ours:     net(x, sigma, pos, class_labels)    pos = full grid when net.use_pos
#   official: net(x, sigma, x_pos, class_labels)  img_channels reports C + 2
#   edm:      net(x, sigma, class_labels)         no coordinates
CONVENTIONS = {'pos': 'ours', 'x_pos': 'official', 'class_labels': 'edm'}
_REQUIRED_ATTRIBUTES = ('img_channels', 'label_dim', 'sigma_min', 'sigma_max', 'round_sigma')


def network_convention(net):
    """'ours', 'official' or 'edm': how `net` is called (see CONVENTIONS)."""
    params = [p.name for p in inspect.signature(net.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    third = params[2] if len(params) > 2 else None
    if third not in CONVENTIONS:
        raise ValueError(f'Cannot tell how to call {type(net).__name__}.forward{tuple(params)}: its third '
                         f'parameter should be one of {", ".join(CONVENTIONS)}')
    return CONVENTIONS[third]


def network_info(net):
    """What sampling needs to know about `net`.

    Returns EasyDict(convention, img_channels = IMAGE channels C,
    img_resolution (None if the network does not record it), label_dim,
    coordinates = whether it takes the [N, 2, R, R] coordinate grid).
    """
    convention = network_convention(net)
    channels, coordinates = net.img_channels, False
    if convention == 'ours':
        coordinates = bool(getattr(net, 'use_pos', False))
    elif convention == 'official':
        out_channels = getattr(net, 'out_channels', net.img_channels - 2)
        if net.img_channels - out_channels not in (0, 2):
            raise ValueError(f'This official Patch Diffusion network has img_channels={net.img_channels} and '
                             f'out_channels={out_channels}: it embeds its coordinates (--embed_fq), which is not '
                             f'supported; only plain [x, y] coordinate channels are')
        channels, coordinates = out_channels, net.img_channels - out_channels == 2
    return dnnlib.EasyDict(convention=convention, img_channels=int(channels),
                           img_resolution=getattr(net, 'img_resolution', None),
                           label_dim=int(net.label_dim or 0), coordinates=coordinates)


def sampling_resolution(net, resolution=None):
    """The resolution to sample at: the network's, or `resolution` for a network
    that does not record one. ValueError when they contradict or both are missing."""
    recorded = getattr(net, 'img_resolution', None)
    if recorded is None and resolution is None:
        raise ValueError('The network does not record its resolution; give it with --resolution')
    if recorded is not None and resolution is not None and int(resolution) != int(recorded):
        raise ValueError(f'--resolution={resolution} contradicts the network\'s resolution {recorded}; '
                         f'leave --resolution out')
    return int(recorded if recorded is not None else resolution)


class Denoiser:
    """denoise(x, sigma) -> float64 D(x; sigma) of a network, for the samplers.

    Calls the network in float32 with its convention's arguments: the full
    coordinate grid for coordinate networks, `class_labels` [N, label_dim]
    (None: the network's default) and classifier-free guidance
    D = D_uncond + w (D_cond - D_uncond), the unconditional branch with
    all-zero labels; w = 1 makes the conditional call only.
    """

    def __init__(self, net, class_labels=None, guidance=1.0):
        info = network_info(net)
        if guidance != 1 and not info.label_dim:
            raise ValueError(f'Guidance (cfg={guidance}) needs a class-conditional network; this one has '
                             f'label_dim=0, so use cfg=1')
        if guidance != 1 and class_labels is None:
            raise ValueError('Guidance (cfg != 1) needs the class labels of the conditional branch')
        self.net = net
        self.info = info
        self.class_labels = class_labels
        self.guidance = float(guidance)
        self.sigma_min = net.sigma_min
        self.sigma_max = net.sigma_max
        self._grid = None

    def round_sigma(self, sigma):
        return self.net.round_sigma(sigma)

    def _coordinates(self, x):
        """The full grid [N, 2, R, R] float32 for x [N, C, R, R], or None."""
        if not self.info.coordinates:
            return None
        n, _, height, width = x.shape
        assert height == width, 'coordinate networks sample square images'
        key = (n, height, x.device)
        if self._grid is None or self._grid[0] != key:
            self._grid = (key, full_grid(height, n, x.device, torch.float32))
        return self._grid[1]

    def _call_net(self, x, sigma, class_labels):
        if self.info.convention == 'edm':
            return self.net(x, sigma, class_labels)
        return self.net(x, sigma, self._coordinates(x), class_labels)

    def __call__(self, x, sigma):
        """x [N, C, R, R], sigma scalar or [N] -> D(x; sigma) float64 [N, C, R, R]."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        with torch.no_grad():
            D_cond = self._call_net(x, sigma, self.class_labels).to(torch.float64)
            if self.guidance == 1:
                return D_cond
            D_uncond = self._call_net(x, sigma, torch.zeros_like(self.class_labels)).to(torch.float64)
        return D_uncond + self.guidance * (D_cond - D_uncond)


def make_denoiser(net, class_labels=None, guidance=1.0):
    """The `Denoiser` of `net` with these labels [N, label_dim] and guidance weight w."""
    return Denoiser(net, class_labels, guidance)


def _one_line(text):
    return ' '.join(str(text).split())


def load_network(path_or_url, device='cpu', verbose=False):
    """Load the network of a snapshot: a .safetensors snapshot (see
    `save_network_safetensors`; nothing is unpickled), or a pickle (ours,
    EDM's or the official one's) with the network under 'ema'.

    Returns (net, meta): net in eval mode on `device`, gradients off; meta =
    EasyDict of the snapshot's other entries (dataset_kwargs, ...). Raises
    ValueError with a one-line message that names the file for a missing,
    unfetchable, truncated or unreadable file and for contents that are not
    a network snapshot. A path or URL ending in .safetensors is never
    unpickled. Unpickling runs the code embedded in the file: only load
    pickles you trust.
    """
    by_name = _is_safetensors_name(path_or_url)
    try:
        with dnnlib.util.open_url(path_or_url, verbose=verbose) as f:
            head = f.read(9)
            f.seek(0)
            if by_name or _looks_like_safetensors(head):
                net, meta = _network_from_safetensors(f.read(), path_or_url)
            else:
                net, meta = _network_from_pickle(f, path_or_url)
    except OSError as err:
        kind = '.safetensors snapshot' if by_name else 'network pickle'
        raise ValueError(_one_line(f'Cannot open the {kind} {path_or_url}: {err}')) from err
    return net.eval().requires_grad_(False).to(device), meta


def _network_from_pickle(f, name):
    """(net, meta) of a network pickle, from an open binary file."""
    try:
        snapshot = persistence.load_network_pickle(f)
    except Exception as err:   # whatever unpickling untrusted bytes raises
        raise ValueError(_one_line(f'{name} is not a readable network pickle; it may be truncated '
                                   f'({type(err).__name__}: {err})')) from err
    if not isinstance(snapshot, dict):
        raise ValueError(f'{name} holds a {type(snapshot).__name__}, not a snapshot dict with the network '
                         f'under "ema"')
    if 'ema' not in snapshot:
        raise ValueError(f'{name} has no "ema" network (keys: {", ".join(map(str, snapshot))}); '
                         f'give a network-snapshot-*.pkl')
    net = snapshot['ema']
    missing = [attr for attr in _REQUIRED_ATTRIBUTES if not hasattr(net, attr)]
    if not isinstance(net, torch.nn.Module) or missing:
        raise ValueError(f'The "ema" entry of {name} is not a denoiser network '
                         f'({type(net).__name__}; missing: {", ".join(missing) or "nn.Module"})')
    return net, dnnlib.EasyDict({key: value for key, value in snapshot.items() if key != 'ema'})


# ----------------------------------------------------------------------------
# Snapshots as .safetensors: weights plus JSON metadata, loadable without unpickling.
#
# Tensors: the network's state_dict. Metadata (safetensors' string map):
#   format          'patch-diffusion-snapshot'
#   format_version  '1'
#   architecture    JSON {"class_name": preconditioner class (EDMPrecond, VPPrecond, VEPrecond),
#                         "init_args": [...], "init_kwargs": {...}}  (the constructor call)
#   dataset_kwargs, patch_kwargs, latent   JSON of the snapshot entries of these names (absent or null: none)

SAFETENSORS_FORMAT = 'patch-diffusion-snapshot'
SAFETENSORS_VERSION = 1
_SAFETENSORS_META_KEYS = ('dataset_kwargs', 'patch_kwargs', 'latent')


def network_classes():
    """The classes a .safetensors snapshot may name: our preconditioners, by class name."""
    from training import networks
    return {cls.__name__: cls for cls in networks.PRECONDITIONERS.values()}


def _is_safetensors_name(path_or_url):
    return str(path_or_url).lower().split('?')[0].endswith('.safetensors')


def _looks_like_safetensors(head):
    """Whether a file starting with `head` is a safetensors file: an 8-byte
    little-endian header size, then a JSON object (a pickle starts with 0x80)."""
    return len(head) >= 9 and head[8:9] == b'{' and head[:1] != b'\x80'


def save_network_safetensors(path, net, meta=None):
    """Write `net` (a preconditioner of this code) and the JSON-able entries
    of `meta` (see the format above) as a .safetensors file, atomically."""
    import safetensors.torch
    class_name = type(net).__name__
    if class_name not in network_classes() or not hasattr(net, 'init_kwargs'):
        raise ValueError(f'Only this code\'s preconditioners ({", ".join(network_classes())}) can be saved as '
                         f'.safetensors, not {class_name}')
    architecture = dict(class_name=class_name, init_args=list(net.init_args), init_kwargs=dict(net.init_kwargs))
    metadata = dict(format=SAFETENSORS_FORMAT, format_version=str(SAFETENSORS_VERSION))
    try:
        metadata['architecture'] = json.dumps(architecture)
        for key in _SAFETENSORS_META_KEYS:
            if (meta or {}).get(key) is not None:
                metadata[key] = json.dumps(meta[key])
    except TypeError as err:
        raise ValueError(f'The snapshot cannot be described in JSON ({err})') from err
    tensors = {name: tensor.detach().to('cpu', copy=True).contiguous() for name, tensor in net.state_dict().items()}
    data = safetensors.torch.save(tensors, metadata=metadata)
    with dnnlib.util.atomic_write(path) as f:
        f.write(data)


def _safetensors_metadata(data, name):
    """The string map in the header of safetensors bytes; ValueError naming `name` if unreadable."""
    size = int.from_bytes(data[:8], 'little') if len(data) >= 8 else -1
    try:
        if size < 2 or 8 + size > len(data):
            raise ValueError(f'its header says {size} bytes but the file has {len(data)}')
        header = json.loads(data[8: 8 + size])
        return dict(header.get('__metadata__') or {})
    except (ValueError, AttributeError) as err:
        raise ValueError(f'{name} is not a readable .safetensors file; it may be truncated ({err})') from None


def _network_from_safetensors(data, name):
    """(net, meta) of the bytes of a .safetensors snapshot. Builds the network
    from the named class of this code and loads the tensors: nothing is unpickled."""
    import safetensors.torch
    metadata = _safetensors_metadata(data, name)
    if metadata.get('format') != SAFETENSORS_FORMAT:
        raise ValueError(f'{name} is a .safetensors file but not a network snapshot of this code '
                         f'(metadata "format" is {metadata.get("format")!r}, expected {SAFETENSORS_FORMAT!r})')
    if metadata.get('format_version') != str(SAFETENSORS_VERSION):
        raise ValueError(f'{name} is snapshot format version {metadata.get("format_version")}; this code reads '
                         f'version {SAFETENSORS_VERSION}')
    try:
        tensors = safetensors.torch.load(data)
        architecture = json.loads(metadata['architecture'])
        meta = dnnlib.EasyDict({key: json.loads(metadata[key]) for key in _SAFETENSORS_META_KEYS if key in metadata})
    except Exception as err:   # safetensors' own errors have no common base class
        raise ValueError(_one_line(f'{name} is not a readable .safetensors snapshot; it may be truncated '
                                   f'({type(err).__name__}: {err})')) from None
    cls = network_classes().get(architecture.get('class_name'))
    if cls is None:
        raise ValueError(f'{name} names the network class {architecture.get("class_name")!r}; this code knows '
                         f'{", ".join(network_classes())}')
    try:
        with torch.random.fork_rng(devices=[]):   # the initial weights are overwritten: keep the global RNG as it was
            net = cls(*architecture.get('init_args', []), **architecture.get('init_kwargs', {}))
        net.load_state_dict(tensors, strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(_one_line(f'{name}: the weights do not fit the recorded architecture '
                                   f'{architecture.get("class_name")} ({err})')) from None
    if meta.get('latent') is None:
        meta.pop('latent', None)
    return net, meta


def convert_snapshot(src, dest):
    """Convert a network snapshot (a pickle you trust) to a .safetensors snapshot at `dest`.

        python -c "from training import sampling; sampling.convert_snapshot('net.pkl', 'net.safetensors')"

    Refuses networks it cannot rebuild exactly: the converted network must
    give the same output as the original on a test input. Returns dest.
    """
    net, meta = load_network(src)
    save_network_safetensors(dest, net, meta)
    try:
        rebuilt, _ = load_network(dest)
        same = _same_output(net, rebuilt)
    except (ValueError, RuntimeError, TypeError):
        same = False
    if not same:
        os.remove(dest)
        raise ValueError(f'{src}: the network rebuilt from .safetensors does not compute the same as the '
                         f'pickled one; only snapshots of this code\'s networks can be converted')
    return dest


def _same_output(net_a, net_b):
    """Whether two networks give bit-identical D(x; sigma) on one random full-size input."""
    info = network_info(net_a)
    resolution = info.img_resolution
    x = torch.randn([1, info.img_channels, resolution, resolution], generator=torch.Generator().manual_seed(0))
    labels = torch.zeros([1, info.label_dim]) if info.label_dim else None
    out_a = make_denoiser(net_a, labels)(x, 1.0)
    out_b = make_denoiser(net_b, labels)(x, 1.0)
    return out_a.shape == out_b.shape and torch.equal(out_a, out_b)


# ----------------------------------------------------------------------------
# Generation.


def parse_seeds(text):
    """'1,2,5-10' -> [1, 2, 5, 6, 7, 8, 9, 10]; ValueError for anything else."""
    seeds = []
    for part in str(text).split(','):
        match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if match is None:
            raise ValueError(f'Cannot parse seeds {text!r}: use non-negative integers and ranges, e.g. 0-49999 or 1,2,5-10')
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f'Seed range {part.strip()!r} runs backwards; write it as {last}-{first}')
        seeds.extend(range(first, last + 1))
    return seeds


def rank_batches(seeds, max_batch_size, rank=0, world_size=1):
    """The batches of `seeds` this rank samples, split as EDM's generate.py does.

    All seeds are cut into ceil(len / (max_batch_size * world_size)) * world_size
    consecutive, near-equal batches; rank r takes batches r, r + world_size, ...
    Empty batches are dropped. Returns a list of lists of ints.
    """
    if len(seeds) == 0:
        raise ValueError('No seeds given')
    if max_batch_size < 1:
        raise ValueError(f'max_batch_size={max_batch_size} must be at least 1')
    num_batches = ((len(seeds) - 1) // (max_batch_size * world_size) + 1) * world_size
    all_batches = torch.as_tensor(seeds).tensor_split(num_batches)
    return [batch.tolist() for batch in all_batches[rank::world_size] if len(batch)]


def random_class_labels(rnd, label_dim, batch_size, class_idx=None, device='cpu'):
    """One-hot labels [N, label_dim] drawn per seed as EDM does (None if label_dim = 0).

    The draw happens even when class_idx fixes the class, so the random
    stream, and the churn noise after it, stay those of EDM.
    """
    if not label_dim:
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[batch_size], device=device)]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


def to_uint8(images):
    """[-1, 1] float images -> uint8 [0, 255], rounded as EDM (x * 127.5 + 128, truncated)."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def _module_device(net):
    for tensor in list(net.parameters()) + list(net.buffers()):
        return tensor.device
    return torch.device('cpu')


def _check_labels(label_dim, class_idx, cfg):
    if class_idx is not None and not label_dim:
        raise ValueError(f'Class {class_idx} was requested, but the network is unconditional (label_dim=0); '
                         f'leave the class out')
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise ValueError(f'Class {class_idx} is out of range: the network has {label_dim} classes, 0-{label_dim - 1}')
    if cfg != 1 and not label_dim:
        raise ValueError(f'Guidance cfg={cfg} needs a class-conditional network; this one is unconditional, use cfg=1')


def generate_images(net, seeds, batch_size=64, class_idx=None, cfg=1.0, device=None, resolution=None,
                    rank=None, world_size=None, latent=None, **sampler_kwargs):
    """Sample the images of `seeds` that fall to this rank, batch by batch.

    net: a network of any convention, on `device` (default: the network's
    device); batch_size: the most images per batch; class_idx: fixed class
    (None: random per seed, for conditional networks); cfg: guidance
    weight w (1 = off); resolution: only for networks that do not record it
    (for a latent model, the latent resolution); rank, world_size: default
    torch_utils.distributed's; latent: for a latent model, the metadata
    {vae, scale_factor, image_resolution (optional)} of its VAE (a
    snapshot's 'latent' entry; see training.latents.generation_latent):
    samples are decoded to pixels with that VAE, loaded now; sampler_kwargs:
    see `select_sampler`. Arguments are checked at the call (ValueError).

    Returns an iterator of (batch_seeds list[int], images uint8 [n, C, R, R]
    on device), decoded images [n, 3, R, R] for latent models; image k
    depends only on seeds[k] and the settings.
    """
    info = network_info(net)
    resolution = sampling_resolution(net, resolution)
    _check_labels(info.label_dim, class_idx, cfg)
    sampler, sampler_kwargs = select_sampler(**sampler_kwargs)
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    batches = rank_batches(list(seeds), batch_size, rank, world_size)
    device = _module_device(net) if device is None else torch.device(device)
    shape = [info.img_channels, resolution, resolution]
    decode = to_uint8
    if latent is not None:
        from training import latents as latent_space   # diffusers only for latent models
        decode = latent_space.pixel_decoder(latent, info.img_channels, device)
    return _generate_batches(net, info, batches, shape, class_idx, cfg, device, sampler, sampler_kwargs, decode)


def _generate_batches(net, info, batches, shape, class_idx, cfg, device, sampler, sampler_kwargs, decode):
    for batch_seeds in batches:
        rnd = StackedRandomGenerator(device, batch_seeds)
        noise = rnd.randn([len(batch_seeds), *shape], device=device)
        class_labels = random_class_labels(rnd, info.label_dim, len(batch_seeds), class_idx, device)
        denoise = make_denoiser(net, class_labels, cfg)
        samples = sampler(denoise, noise, rnd.randn_like, **sampler_kwargs)
        yield batch_seeds, decode(samples)


# ----------------------------------------------------------------------------
# Image files.


def image_path(outdir, seed, subdirs=False):
    """outdir/{seed:06d}.png, or outdir/{seed - seed % 1000:06d}/{seed:06d}.png with subdirs."""
    folder = os.path.join(outdir, f'{seed - seed % 1000:06d}') if subdirs else outdir
    return os.path.join(folder, f'{seed:06d}.png')


def _to_pil(image):
    """uint8 [C, H, W] tensor (C = 1 or 3) -> PIL image (L or RGB)."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f'Expected a uint8 image [C, H, W] with 1 or 3 channels, got {image.dtype} {list(image.shape)}')
    array = image.permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array[:, :, 0], 'L') if array.shape[2] == 1 else PIL.Image.fromarray(array, 'RGB')


def save_image(image, path):
    """Write one uint8 image [C, H, W] (C = 1 or 3) as a PNG, atomically."""
    pil_image = _to_pil(image)
    with dnnlib.util.atomic_path(path) as tmp:
        pil_image.save(tmp, format='PNG')


def image_grid(images, grid_width=None):
    """Tile uint8 images [N, C, H, W] row by row into one [C, rows H, grid_width W] image.

    grid_width defaults to ceil(sqrt(N)); cells after the last image are black.
    """
    n, channels, height, width = images.shape
    grid_width = grid_width or math.ceil(math.sqrt(n))
    rows = math.ceil(n / grid_width)
    cells = torch.zeros([rows * grid_width, channels, height, width], dtype=images.dtype, device=images.device)
    cells[:n] = images
    cells = cells.reshape(rows, grid_width, channels, height, width)
    return cells.permute(2, 0, 3, 1, 4).reshape(channels, rows * height, grid_width * width)


def save_image_grid(images, path, grid_width=None):
    """Write uint8 images [N, C, H, W] as one grid PNG (see `image_grid`), atomically."""
    if len(images) == 0:
        raise ValueError('No images to put in the grid')
    save_image(image_grid(images, grid_width), path)
    return path


def sample_grid(net, path, seeds, batch_size=64, class_idx=None, cfg=1.0, device=None, grid_width=None,
                latent=None, **sampler_kwargs):
    """Sample `seeds` in this process alone and write them as one grid PNG at `path`.

    For the training loop's samples-NNNNNN.png (call it on one rank); latent:
    as generate_images's. Returns the images, uint8 [N, C, R, R] on the CPU,
    in the order of `seeds`.
    """
    batches = generate_images(net, seeds, batch_size=batch_size, class_idx=class_idx, cfg=cfg, device=device,
                              rank=0, world_size=1, latent=latent, **sampler_kwargs)
    images = torch.cat([batch_images.cpu() for _, batch_images in batches])
    save_image_grid(images, path, grid_width)
    return images
