"""Training losses of EDM (Karras et al. 2022, Table 1 and Eq. 2), on patches.

Each loss draws one noise level per image, noises the (augmented, cropped)
clean patches `y`, denoises them with the coordinate grid `pos` passed
through, and returns the weighted per-pixel squared error
lambda(sigma) * (D(y + n; sigma) - y)^2, shape [N, C, P, P]; EDM2's loss
(`EDM2Loss`) weights it by the network's learned uncertainty as well.
Augmentation and cropping happen before, in the training loop, so that the
coordinates describe the augmented full image.
"""

import torch

from torch_utils import persistence


def _edm_noise_levels(y, P_mean, P_std, sigma_data):
    """EDM's draw of one sigma per image of y, ln(sigma) ~ N(P_mean, P_std^2), and its
    weight lambda = (sigma^2 + sd^2) / (sigma sd)^2; each [N, 1, 1, 1]."""
    sigma = (torch.randn([y.shape[0], 1, 1, 1], device=y.device) * P_std + P_mean).exp()
    return sigma, (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def _denoise_error(net, y, sigma, pos, labels, augment_labels):
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, pos=pos, class_labels=labels, augment_labels=augment_labels)
    return (D_yn - y) ** 2


@persistence.persistent_class
class VPLoss:
    """Variance preserving loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), lambda = 1/sigma^2."""

    def __init__(self, beta_d=19.9, beta_min=0.1, epsilon_t=1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        rnd_uniform = torch.rand([y.shape[0], 1, 1, 1], device=y.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return weight * _denoise_error(net, y, sigma, pos, labels, augment_labels)


@persistence.persistent_class
class VELoss:
    """Variance exploding loss: ln(sigma) ~ U(ln sigma_min, ln sigma_max), lambda = 1/sigma^2."""

    def __init__(self, sigma_min=0.02, sigma_max=100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        rnd_uniform = torch.rand([y.shape[0], 1, 1, 1], device=y.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return weight * _denoise_error(net, y, sigma, pos, labels, augment_labels)


@persistence.persistent_class
class EDMLoss:
    """EDM loss: ln(sigma) ~ N(P_mean, P_std^2), lambda = (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        sigma, weight = _edm_noise_levels(y, self.P_mean, self.P_std, self.sigma_data)
        return weight * _denoise_error(net, y, sigma, pos, labels, augment_labels)


@persistence.persistent_class
class EDM2Loss:
    """EDM2's loss with learned uncertainty (EDM2 paper, eqs. 14-16 and 21): EDM's
    sigma draw and lambda, divided by exp(u(sigma)) and plus u(sigma), where
    u(sigma) is the log-variance the network returns (EDM2Precond, return_logvar).

    per-element loss = lambda(sigma) / exp(u(sigma)) * (D(y + n; sigma) - y)^2 + u(sigma)
    """

    def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, y, pos=None, labels=None, augment_labels=None):
        sigma, weight = _edm_noise_levels(y, self.P_mean, self.P_std, self.sigma_data)
        n = torch.randn_like(y) * sigma
        D_yn, logvar = net(y + n, sigma, labels, pos=pos, return_logvar=True, augment_labels=augment_labels)
        return (weight / logvar.exp()) * ((D_yn - y) ** 2) + logvar


LOSSES = {'vp': VPLoss, 've': VELoss, 'edm': EDMLoss, 'edm2': EDM2Loss}

__all__ = ['VPLoss', 'VELoss', 'EDMLoss', 'EDM2Loss', 'LOSSES']


def build_loss(loss_kwargs):
    """The loss of resolved options {loss: 'vp' | 've' | 'edm' | 'edm2', ...}."""
    kwargs = dict(loss_kwargs)
    return LOSSES[kwargs.pop('loss')](**kwargs)
