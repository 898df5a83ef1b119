"""An exact teacher: a class-conditional Gaussian mixture with a closed-form denoiser.

Class c owns components i with means m_i, isotropic scales s_i and weights pi_i. Under
x_t = alpha x0 + sigma eps, component i gives x_t ~ N(alpha m_i, v_i I), v_i = alpha^2 s_i^2 + sigma^2,
and E[x0 | x_t, i] = m_i + alpha s_i^2 / v_i (x_t - alpha m_i); the denoiser is the
responsibility-weighted sum. The null class (label == num_classes) is the mixture of all classes.
With one component per class the probability-flow ODE is solved exactly by `exact_solution`:
it keeps z = (x - alpha m) / sqrt(v) fixed.
"""
from __future__ import annotations

import torch

from .param import convert
from .schedules import F64, Schedule


class GaussianMixture:
    """A model (solvers.contracts) without weights: guidance by two CFG branches."""

    guidance_input = False
    guidance_range = None
    net = None

    def __init__(self, schedule: Schedule, param: str, means, scales, classes, weights=None, shape=None):
        self.schedule, self.param = schedule, param
        self.means = torch.as_tensor(means, dtype=F64)  # [K, D]
        K, D = self.means.shape
        self.scales = torch.as_tensor(scales, dtype=F64).expand(K).clone()
        self.classes = torch.as_tensor(classes, dtype=torch.long).expand(K).clone()
        self.weights = (torch.ones(K, dtype=F64) if weights is None else torch.as_tensor(weights, dtype=F64))
        self.num_classes = int(self.classes.max()) + 1
        self.shape = tuple(shape) if shape is not None else (D,)

    @classmethod
    def random(cls, schedule, param, num_classes=4, per_class=2, dim=16, seed=0, spread=2.0, scale=0.3, shape=None):
        g = torch.Generator().manual_seed(seed)
        K = num_classes * per_class
        means = spread * torch.randn(K, dim, generator=g, dtype=F64) / dim ** 0.5 * 2
        scales = scale * (0.5 + torch.rand(K, generator=g, dtype=F64))
        classes = torch.arange(num_classes).repeat_interleave(per_class)
        return cls(schedule, param, means, scales, classes, shape=shape)

    def x0(self, x, t, label):
        x = x.reshape(x.shape[0], -1).to(F64)
        t = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)  # [B, 1]
        v = a ** 2 * self.scales[None] ** 2 + s ** 2  # [B, K]
        diff = x[:, None, :] - a[:, :, None] * self.means[None]  # [B, K, D]
        D = x.shape[1]
        logp = torch.log(self.weights)[None] - 0.5 * D * torch.log(v) - 0.5 * (diff ** 2).sum(-1) / v
        label = torch.as_tensor(label, dtype=torch.long).reshape(-1)
        member = (self.classes[None] == label[:, None]) | (label[:, None] == self.num_classes)
        r = torch.softmax(logp.masked_fill(~member, -torch.inf), -1)  # [B, K]
        post = self.means[None] + (a[:, :, None] * self.scales[None, :, None] ** 2 / v[:, :, None]) * diff
        return (r[:, :, None] * post).sum(1)

    def __call__(self, x, t, s, label):
        x0 = self.x0(x, t, label)
        xf = x.reshape(x.shape[0], -1).to(F64)
        t = torch.as_tensor(t, dtype=F64).reshape(-1, 1)
        A, B = convert(self.param, "x0", self.schedule.alpha(t), self.schedule.sigma(t))
        return ((x0 - A * xf) / B).to(x.dtype).reshape(x.shape)  # the output whose x0 is exact

    def exact_solution(self, x, t, s, label):
        """The probability-flow ODE from (x, t) to time s; one component per class only."""
        label = torch.as_tensor(label, dtype=torch.long).reshape(-1)
        if label.eq(self.num_classes).any() or not torch.equal(torch.bincount(self.classes), torch.ones(self.num_classes, dtype=torch.long)):
            raise ValueError("exact_solution needs one Gaussian per class and a real class label")
        comp = torch.stack([(self.classes == c).nonzero()[0, 0] for c in label.tolist()])
        m, sc = self.means[comp], self.scales[comp][:, None]
        sd = lambda u: (self.schedule.alpha(u) ** 2 * sc ** 2 + self.schedule.sigma(u) ** 2).sqrt()
        at, as_ = self.schedule.alpha(torch.as_tensor(t, dtype=F64)), self.schedule.alpha(torch.as_tensor(s, dtype=F64))
        x = x.reshape(x.shape[0], -1).to(F64)
        return as_ * m + sd(torch.as_tensor(s, dtype=F64)) / sd(torch.as_tensor(t, dtype=F64)) * (x - at * m)
