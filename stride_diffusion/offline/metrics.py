"""The distances samples are judged by, in a classifier's feature space: Fréchet distance (FD) and
kernel distance (KID). Both are float64."""
from __future__ import annotations

import torch

F64 = torch.float64


def sqrtm_psd(c: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by float64 eigendecomposition."""
    c = c.to(F64)
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """||mu1 - mu2||^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2); the symmetric form keeps the
    inner matrix PSD, so its root's trace is the sum of root eigenvalues."""
    mu1, mu2, cov1, cov2 = (torch.as_tensor(a, dtype=F64) for a in (mu1, mu2, cov1, cov2))
    s1 = sqrtm_psd(cov1)
    m = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * tr_sqrt)


def feature_stats(f: torch.Tensor):
    f = f.to(F64)
    return f.mean(0), torch.cov(f.T)


def fd_features(f1, f2) -> float:
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def kid(f1, f2) -> float:
    """Kernel distance (KID, Binkowski et al. 2018): the unbiased estimate of MMD^2 with the kernel
    (x.y / d + 1)^3. Unlike FD it has no small-sample bias in either set, so real images score 0 in
    expectation against real images, and a less diverse sampler cannot score below them on average."""
    f1, f2 = f1.to(F64), f2.to(F64)
    k = lambda a, b: (a @ b.T / f1.shape[1] + 1) ** 3
    m, n = len(f1), len(f2)
    kxx, kyy = k(f1, f1), k(f2, f2)
    return float((kxx.sum() - kxx.trace()) / (m * (m - 1)) + (kyy.sum() - kyy.trace()) / (n * (n - 1))
                 - 2 * k(f1, f2).mean())


@torch.no_grad()
def features(clf, x, batch=1000):
    return torch.cat([clf.features(x[i:i + batch].clamp(-1, 1)) for i in range(0, len(x), batch)])


@torch.no_grad()
def predict(clf, x, batch=1000):
    return torch.cat([clf(x[i:i + batch].clamp(-1, 1)).argmax(1) for i in range(0, len(x), batch)])


def kid_reference_se(f1, f2, f_ref) -> float:
    """Standard error, from the reference set's own sampling, of kid(f1, ref) - kid(f2, ref). The
    reference's self-term cancels in the difference, which leaves -2 x the mean over reference images
    r of (mean k(f1, r) - mean k(f2, r)); its spread over r sets how finely one reference of M images
    can rank two sample sets."""
    f1, f2, f_ref = f1.to(F64), f2.to(F64), f_ref.to(F64)
    k = lambda a: ((a @ f_ref.T / f_ref.shape[1] + 1) ** 3).mean(0)
    return float(2 * (k(f1) - k(f2)).std() / len(f_ref) ** 0.5)
