"""Samplers of the EDM paper (docs/DESIGN.md section 1): time-step
discretisations, noise schedules sigma(t) and scalings s(t), EDM's stochastic
Heun sampler and the generalised ablation sampler; and DPM-Solver++(2M) and
its SDE variant on EDM's time steps, which reach Heun's images in fewer
network evaluations.

The samplers never see a network. They are driven by a denoiser `denoise`
(training.denoiser.Denoiser, or an analytic one in the tests):

    denoise(x, sigma) -> D(x; sigma), float64 [N, C, H, W]
    denoise.sigma_min, denoise.sigma_max   noise range the network supports
    denoise.round_sigma(sigma)             nearest supported noise level(s)

They work in float64 and draw the churn noise at every step (also when
gamma = 0), as EDM's generate.py does, so with the same network and seeds
the images equal EDM's.
"""

import functools
import inspect
import math

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Argument checks shared by the samplers.

SOLVERS = ('euler', 'heun')                    # the ablation sampler's
MULTISTEP_SOLVERS = ('dpmpp-2m', 'dpmpp-2m-sde')   # dpm_solver_sampler's
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
    _check_choice('solver', solver, SOLVERS + MULTISTEP_SOLVERS)
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


# The VP default range of EDM's generate.py: sigma(epsilon_s) and sigma(1) of the VP
# schedule EDM trains with (Table 1: beta_d = 19.9, beta_min = 0.1). The official Patch
# Diffusion code copies an older generate.py with beta_d = 19.1; pass --sigma_min and
# --sigma_max to reproduce its VP ablation defaults.
_VP_DEFAULT_SCHEDULE = VPSchedule(beta_d=19.9, beta_min=0.1)
_DEFAULT_SIGMA_MIN = {'ve': 0.02, 'iddpm': 0.002, 'edm': 0.002}
_DEFAULT_SIGMA_MAX = {'ve': 100, 'iddpm': 81, 'edm': 80}


def default_noise_range(discretization, epsilon_s=1e-3):
    """EDM's default (sigma_min, sigma_max) for a discretisation."""
    if discretization == 'vp':
        return _VP_DEFAULT_SCHEDULE.sigma(epsilon_s), _VP_DEFAULT_SCHEDULE.sigma(1.0)
    return _DEFAULT_SIGMA_MIN[discretization], _DEFAULT_SIGMA_MAX[discretization]


# ----------------------------------------------------------------------------
# Samplers. Each takes (denoise, latents, randn_like, **settings) and return
# float64 [N, C, H, W]; latents are standard normal [N, C, H, W].


def _edm_time_steps(denoise, num_steps, sigma_min, sigma_max, rho, device):
    """EDM's t_0 > ... > t_{N-1} (Eq. 5, in the network's noise range, rounded to
    levels it supports), then t_N = 0; float64 [N + 1]."""
    sigma_min, sigma_max = _noise_range(denoise, sigma_min, sigma_max)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device)
    return torch.cat([denoise.round_sigma(t_steps), torch.zeros_like(t_steps[:1])])


def edm_sampler(denoise, latents, randn_like=torch.randn_like,
                num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
                S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """EDM's stochastic sampler (Algorithm 2): Heun steps, no correction on the last one.

    num_steps: N; sigma_min, sigma_max, rho: the time steps (Eq. 5), clamped to
    the network's range; S_churn, S_min, S_max, S_noise: churn, with
    gamma = min(S_churn / N, sqrt(2) - 1) on steps with S_min <= sigma <= S_max.
    The churn noise is drawn at every step, as EDM's sampler does, or only on
    the steps that churn for a denoiser with `draws_only_when_churning` (EDM2's
    networks, whose sampler does so): the same arithmetic, another random stream.
    """
    _check_sampler_args(num_steps, sigma_min, sigma_max, rho, S_churn, S_min, S_max, S_noise)
    t_steps = _edm_time_steps(denoise, num_steps, sigma_min, sigma_max, rho, latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level to t_hat = (1 + gamma) t_cur.
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
        t_hat = denoise.round_sigma(t_cur + gamma * t_cur)
        if gamma > 0 or not getattr(denoise, 'draws_only_when_churning', False):   # EDM draws at every step
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            x_hat = x_cur   # EDM2's sampler: the same x (the noise added would be times 0), no draw

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


def dpm_solver_sampler(denoise, latents, randn_like=torch.randn_like,
                       num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, solver='dpmpp-2m', S_noise=1):
    """DPM-Solver++(2M) (Lu et al., "DPM-Solver++", 2022, Algorithm 2) and its
    SDE variant (2M SDE, midpoint form) on EDM's time steps t_0 > ... > t_N = 0
    (the same as `edm_sampler`'s): one network evaluation per step, N in all
    (Heun: 2N - 1).

    In EDM's x = y + sigma n, with lambda = -ln(sigma), h_i = ln(t_i / t_{i+1})
    and the denoised D_i = D(x_i; t_i), a step is exact for a D that is
    linear in lambda over the interval (the exponential integrator):

        ODE:  x_{i+1} = (t_{i+1} / t_i) x_i + (1 - e^-h) (D_i + (D_i - D_{i-1}) / (2 r))
        SDE:  x_{i+1} = (t_{i+1} / t_i) e^-h x_i + (1 - e^-2h) (D_i + (D_i - D_{i-1}) / (2 r))
                        + t_{i+1} sqrt(1 - e^-2h) S_noise z,   z ~ N(0, I)

    with r = h_{i-1} / h_i; the first step takes D_i alone (first order) and
    the last one (t_N = 0) gives x_N = D_{N-1}. The SDE draws z at every step
    (also the last, unused there), so an image depends on its seed alone.
    """
    _check_sampler_args(num_steps, sigma_min, sigma_max, rho, 0, 0, 0, S_noise, solver=solver)
    if solver not in MULTISTEP_SOLVERS:
        raise ValueError(f'solver={solver!r}: dpm_solver_sampler runs {", ".join(MULTISTEP_SOLVERS)}')
    stochastic = solver == 'dpmpp-2m-sde'
    t_steps = _edm_time_steps(denoise, num_steps, sigma_min, sigma_max, rho, latents.device)

    x = latents.to(torch.float64) * t_steps[0]
    D_prev, h_prev = None, None
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        D_x = denoise(x, t_cur)
        z = randn_like(x) if stochastic else None
        if t_next == 0:
            x = D_x
            continue
        h = torch.log(t_cur / t_next)
        D_hat = D_x if D_prev is None else D_x + (D_x - D_prev) * (h / (2 * h_prev))   # (D_i - D_{i-1}) / (2r)
        if stochastic:
            x = (t_next / t_cur) * torch.exp(-h) * x - torch.expm1(-2 * h) * D_hat \
                + t_next * (-torch.expm1(-2 * h)).sqrt() * S_noise * z
        else:
            x = (t_next / t_cur) * x - torch.expm1(-h) * D_hat
        D_prev, h_prev = D_x, h
    return x


def network_evaluations(sampler, kwargs):
    """Network evaluations per image of `sampler` with `kwargs` (as
    `select_sampler` returns them): N steps cost N for Euler and the
    multistep solvers, 2N - 1 for Heun (no correction on the last step)."""
    settings = {**_sampler_defaults(sampler), **kwargs}
    single = sampler is dpm_solver_sampler or (sampler is ablation_sampler and settings['solver'] == 'euler')
    return settings['num_steps'] if single else 2 * settings['num_steps'] - 1


def describe(sampler, kwargs):
    """A few words naming the sampler `select_sampler` chose, for the console."""
    if sampler is dpm_solver_sampler:
        return 'DPM-Solver++(2M) SDE' if kwargs['solver'] == 'dpmpp-2m-sde' else 'DPM-Solver++(2M)'
    if sampler is ablation_sampler:
        return f'EDM\'s ablation sampler ({kwargs.get("solver", "heun")})'
    return 'EDM\'s Heun sampler' + (' with churn' if kwargs.get('S_churn') else '')


def _parameter_names(fn):
    return list(inspect.signature(fn).parameters)[3:]


def select_sampler(**sampler_kwargs):
    """Pick the sampler as EDM's generate.py does and check its settings.

    None values are dropped (= the sampler's default). solver='dpmpp-2m' or
    'dpmpp-2m-sde' selects `dpm_solver_sampler`; otherwise any of solver,
    discretization, schedule, scaling selects `ablation_sampler`, and none
    `edm_sampler`. Returns (sampler, kwargs); ValueError for unknown names,
    values that cannot work, and settings the chosen solver cannot honour.
    """
    kwargs = {key: value for key, value in sampler_kwargs.items() if value is not None}
    unknown = sorted(set(kwargs) - set(_parameter_names(ablation_sampler)))
    if unknown:
        raise ValueError(f'Unknown sampler setting(s) {", ".join(unknown)}; '
                         f'known: {", ".join(_parameter_names(ablation_sampler))}')
    if kwargs.get('solver') in MULTISTEP_SOLVERS:
        sampler = dpm_solver_sampler
        allowed = set(_parameter_names(dpm_solver_sampler)) - ({'S_noise'} if kwargs['solver'] == 'dpmpp-2m' else set())
        neutral = _sampler_defaults(edm_sampler)   # e.g. S_churn=0: asks for nothing these solvers lack
        kwargs = {key: value for key, value in kwargs.items() if key in allowed or value != neutral.get(key)}
        refused = [key for key in kwargs if key not in allowed]
        if refused:
            raise ValueError(f'--solver={kwargs["solver"]} runs on EDM\'s time steps and cannot take '
                             f'{", ".join("--" + key for key in refused)}: leave them out'
                             + (' (for fresh noise at every step use --solver=dpmpp-2m-sde)'
                                if kwargs['solver'] == 'dpmpp-2m' else '')
                             + ', or use --solver=euler|heun for the ablation sampler')
        _check_sampler_args(**{**_sampler_defaults(edm_sampler), **kwargs})
        return sampler, kwargs
    sampler = ablation_sampler if any(key in kwargs for key in ABLATION_KEYS) else edm_sampler
    _check_sampler_args(**{**_sampler_defaults(sampler), **kwargs})
    return sampler, kwargs


def _sampler_defaults(fn):
    return {name: inspect.signature(fn).parameters[name].default for name in _parameter_names(fn)}
