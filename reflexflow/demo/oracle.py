"""An exact oracle: a Gaussian mixture on images whose marginal velocity is closed-form.

docs/method.md section 7 ("An exact oracle"). K components on (C, S, S) images, each with
its own smooth mean image and a covariance diagonal in an orthonormal basis U: a fixed
C x C colour rotation times the 2-D DCT-II of each colour plane. Component k's variance of
coefficient i is a natural-image power spectrum,

    lambda_k,i = A_k,c (f_i + f0)^-alpha_k        f_i = sqrt(fx^2 + fy^2), DCT indices

so samples are textures whose low frequencies carry most of the power. In coefficients
y = U^T x, on an affine path x_t = a x1 + s eps (eps ~ N(0, I), so U^T eps ~ N(0, I)):

    y_t | k ~ N(a mu_k, a^2 lambda_k + s^2)                       per coefficient
    r_k(y_t) = softmax_k( log pi_k + sum_i log N(y_t,i; a mu_k,i, a^2 lambda_k,i + s^2) )
    E[y1 | y_t, k]  = mu_k + a lambda_k (y_t - a mu_k) / (a^2 lambda_k + s^2)
    E[eps | y_t, k] = s (y_t - a mu_k) / (a^2 lambda_k + s^2)
    u*(x_t, t) = U sum_k r_k (a' E[y1 | y_t, k] + s' E[eps | y_t, k])

which equals a' x1* + s' (x_t - a x1*) / s with x1* = U sum_k r_k E[y1 | y_t, k] and is
finite at s = 0 (the limit: E[eps | y_t] = 0 there). Everything runs in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..paths import LinearPath, PathLike

__all__ = ["OracleMixture", "dct_matrix", "make_oracle", "ORACLE_SHAPE"]

ORACLE_SHAPE = (4, 16, 16)  # 1024 dimensions: the size of a Stable-Diffusion-like latent patch


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): y = D x, x = D^T y.

    D[k, j] = sqrt(2 / n) cos(pi (j + 1/2) k / n), row 0 scaled by 1 / sqrt(2).
    """
    j = torch.arange(n, dtype=dtype)
    k = torch.arange(n, dtype=dtype)[:, None]
    d = math.sqrt(2.0 / n) * torch.cos(math.pi * (j + 0.5) * k / n)
    d[0] /= math.sqrt(2.0)
    return d


@dataclass
class OracleMixture:
    """The mixture: weights (K,), means and variances (K, C, S, S) in coefficients y = U^T x.

    ``colour`` is the C x C orthonormal colour rotation, ``dct`` the S x S DCT matrix.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor
    colour: Tensor
    dct: Tensor
    freq: Tensor  # (S, S) radial DCT frequency sqrt(fx^2 + fy^2)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.means.shape[1:])

    @property
    def dim(self) -> int:
        return int(self.means[0].numel())

    @property
    def num_components(self) -> int:
        return int(self.weights.numel())

    # -- the basis -------------------------------------------------------------------------
    def to_coeffs(self, x: Tensor) -> Tensor:
        """y = U^T x: colour rotation, then a 2-D DCT of each plane; (B, C, S, S) -> same."""
        x = x.to(torch.float64)
        y = torch.einsum("dc,bchw->bdhw", self.colour.T, x)
        return self.dct @ y @ self.dct.T

    def from_coeffs(self, y: Tensor) -> Tensor:
        """x = U y (the inverse of to_coeffs)."""
        x = self.dct.T @ y.to(torch.float64) @ self.dct
        return torch.einsum("cd,bdhw->bchw", self.colour, x)

    # -- the data ----------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """n exact samples (float64) and their component labels."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        y = self.means[labels] + self.variances[labels].sqrt() * z
        return self.from_coeffs(y), labels

    def mean(self) -> Tensor:
        """Mixture mean in coefficients, flattened (D,)."""
        return (self.weights[:, None] * self.means.flatten(1)).sum(0)

    def covariance(self) -> Tensor:
        """Mixture covariance in coefficients (D, D): sum pi_k (diag lambda_k + mu_k mu_k^T)
        - m m^T."""
        mu = self.means.flatten(1)
        m = self.mean()
        cov = (self.weights[:, None, None] * mu[:, :, None] * mu[:, None, :]).sum(0)
        cov += torch.diag((self.weights[:, None] * self.variances.flatten(1)).sum(0))
        return cov - m[:, None] * m[None, :]

    def coefficient_variance(self) -> Tensor:
        """Per-coefficient marginal variance (C, S, S): the diagonal of covariance()."""
        return self.covariance().diagonal().reshape(self.shape)

    # -- the oracle --------------------------------------------------------------------------
    def _log_joint(self, y: Tensor, a: float, s: float) -> Tensor:
        """log pi_k + log N(y; a mu_k, a^2 lambda_k + s^2), (B, K), for one time.

        Expands sum_i (y_i - a mu_k,i)^2 / var_k,i into three matmuls (no (B, K, D) tensor).
        """
        yf = y.flatten(1)
        mu = self.means.flatten(1)
        var = a * a * self.variances.flatten(1) + s * s
        inv = 1.0 / var
        quad = (
            yf.square() @ inv.T - 2 * a * (yf @ (mu * inv).T) + a * a * (mu.square() * inv).sum(1)
        )
        logdet = var.log().sum(1) + yf.shape[1] * math.log(2 * math.pi)
        return self.weights.log()[None] - 0.5 * (quad + logdet[None])

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log density of x (B, C, S, S) under the mixture (t = 1), shape (B,)."""
        return torch.logsumexp(self._log_joint(self.to_coeffs(x), 1.0, 0.0), dim=1)

    def responsibilities(self, x: Tensor, t: float = 1.0, path: PathLike | None = None) -> Tensor:
        """r_k(x_t) (B, K) on the path (default linear) at time t (default 1: the data)."""
        a, s, _, _ = _coefficients(path or LinearPath(), t)
        return torch.softmax(self._log_joint(self.to_coeffs(x), a, s), dim=1)

    def velocity(self, x: Tensor, t: Tensor | float, path: PathLike | None = None) -> Tensor:
        """u*(x, t) = E[u_t | x_t = x], the exact marginal velocity (module docstring).

        With g_k = (a' a lambda_k + s' s) / (a^2 lambda_k + s^2), per coefficient:
        u*_y = sum_k r_k (a' mu_k + g_k (y - a mu_k)). ``t`` is a float or per-sample times
        (computed per distinct time). Returned in x's dtype; computed in float64.
        """
        path = path or LinearPath()
        y = self.to_coeffs(x)
        times = torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu()
        if times.numel() not in (1, y.shape[0]):
            raise ValueError(f"t must be a float or hold one time per sample, got {t!r}")
        times = times.expand(y.shape[0])
        u = torch.empty_like(y.flatten(1))
        for value in torch.unique(times).tolist():
            rows = (times == value).nonzero().flatten().to(y.device)
            u[rows] = self._velocity_at(y.flatten(1)[rows], *_coefficients(path, value))
        return self.from_coeffs(u.reshape(y.shape)).to(x.dtype)

    def _velocity_at(self, yf: Tensor, a: float, s: float, da: float, ds: float) -> Tensor:
        r = torch.softmax(self._log_joint(yf, a, s), dim=1)
        mu = self.means.flatten(1)
        lam = self.variances.flatten(1)
        g = (da * a * lam + ds * s) / (a * a * lam + s * s)
        return da * (r @ mu) + yf * (r @ g) - a * (r @ (g * mu))

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        """The oracle as a velocity model v(x, t) (what reflexflow.sample calls)."""
        return self.velocity(x, t)


def _coefficients(path: PathLike, t: float) -> tuple[float, float, float, float]:
    """(a, s, a', s') of the path at one time t, as floats."""
    tt = torch.tensor([float(t)], dtype=torch.float64)
    return tuple(float(f(tt)[0]) for f in (path.a, path.s, path.da, path.ds))  # type: ignore[return-value]


def _orthonormal(n: int, gen: torch.Generator) -> Tensor:
    """A colour rotation whose first axis is the luminance (1, ..., 1) / sqrt(n)."""
    m = torch.randn(n, n, generator=gen, dtype=torch.float64)
    m[:, 0] = 1.0
    q, r = torch.linalg.qr(m)
    return q * torch.sign(torch.diagonal(r))[None]


def make_oracle(
    num_components: int = 8,
    shape: tuple[int, int, int] = ORACLE_SHAPE,
    *,
    alpha: float = 2.0,
    f0: float = 1.0,
    texture_std: float = 0.35,
    mean_std: float = 0.6,
    seed: int = 0,
) -> OracleMixture:
    """The demo's fixed mixture (same ``seed``, same mixture on every machine).

    Per component: spectrum exponent alpha_k = alpha + U(-0.3, 0.3); colour-plane amplitudes
    (luminance plane 1, the others U(0.15, 0.6)); the total texture power scaled so the
    per-pixel texture std is about ``texture_std``. Means: random coefficients only at DCT
    frequencies f <= 2 (smooth images), scaled so the pixel std of the means is about
    ``mean_std``. Weights: a fixed uneven draw (largest about 3x the smallest).
    """
    c, h, w = shape
    if h != w:
        raise ValueError(f"shape must be square, got {shape}")
    gen = torch.Generator().manual_seed(seed)
    d = dct_matrix(h)
    fy, fx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    freq = (fx.square() + fy.square()).sqrt()
    k = num_components
    alphas = alpha + (torch.rand(k, generator=gen, dtype=torch.float64) - 0.5) * 0.6
    spectra = (freq[None] + f0) ** (-alphas[:, None, None])  # (K, S, S)
    amps = 0.15 + 0.45 * torch.rand(k, c, generator=gen, dtype=torch.float64)
    amps[:, 0] = 1.0
    var = amps[:, :, None, None] * spectra[:, None]
    var = var / var.flatten(1).sum(1)[:, None, None, None] * (texture_std**2 * c * h * w)
    smooth = (freq <= 2.0).to(torch.float64)
    means = torch.randn((k, c, h, w), generator=gen, dtype=torch.float64) * smooth
    means = means / means.flatten(1).square().sum(1).sqrt()[:, None, None, None]
    means = means * mean_std * math.sqrt(c * h * w)
    weights = 1.0 + 2.0 * torch.rand(k, generator=gen, dtype=torch.float64)
    return OracleMixture(
        weights=weights / weights.sum(),
        means=means,
        variances=var,
        colour=_orthonormal(c, gen),
        dct=d,
        freq=freq,
    )
