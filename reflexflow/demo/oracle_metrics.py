"""Exact scores against the oracle mixture (docs/method.md section 7, "An exact oracle").

All on the same fixed noise for every model (and the same clean states):

    fd          Frechet distance of N-step Euler samples to the mixture's analytic mean m
                and covariance Sigma (in DCT coefficients: U is orthonormal, FD is invariant):
                |m_s - m|^2 + tr S + tr Sigma - 2 tr (Sigma^1/2 S Sigma^1/2)^1/2
    band_low    sum over DCT frequencies f <= 3 of the samples' coefficient variance over
                the exact one (1 is right; < 1 is missing low-frequency power, FC's claim)
    band_high   the same for f >= 8
    mode_tv     total variation between the histogram of components (each sample assigned
                to its most responsible component, exact responsibilities) and the weights
    loglik      mean exact log-density of the samples per dimension (nats)
    path_dev    mean ||x_N - x*_N||^2 / D: the model's Euler end point against u*'s from the
                same noise; ``path_dev_curve`` per step
    err_own     mean over the N grid times of ||v(x_i, t_i) - u*(x_i, t_i)||^2 / D on the
                model's own Euler states (v read off the trajectory: (x_i+1 - x_i) N)
    err_clean   the same on clean states x_t = a x1 + s eps (fresh exact x1)
    gap         err_own / err_clean: the train/inference gap itself (1: none)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..sampler import sample
from .oracle import OracleMixture

__all__ = ["OracleScorer", "LOW_BAND", "HIGH_BAND"]

LOW_BAND = 3.0  # DCT radial frequency f <= 3 (of 0 .. 21 on 16 x 16)
HIGH_BAND = 8.0  # f >= 8


class OracleScorer:
    """Fixed noise, clean states and analytic moments; scores a velocity model exactly."""

    def __init__(
        self,
        mixture: OracleMixture,
        eval_steps: tuple[int, ...],
        num_samples: int,
        bias_samples: int,
        seed: int = 10_000,
    ) -> None:
        self.mix = mixture
        self.eval_steps = tuple(eval_steps)
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((num_samples, *mixture.shape), generator=gen)
        self.bias_samples = min(bias_samples, num_samples)
        x1, _ = mixture.sample(self.bias_samples, gen)
        self.clean_x1 = x1.float()
        self.clean_eps = torch.randn(x1.shape, generator=gen)
        self.times = sorted({i / n for n in self.eval_steps for i in range(n)})
        self.m = mixture.mean()
        cov = mixture.covariance()
        evals, evecs = torch.linalg.eigh(cov)
        self.cov_half = (evecs * evals.clamp_min(0).sqrt()) @ evecs.T
        self.cov_trace = float(cov.trace())
        self.true_var = mixture.coefficient_variance()
        freq = mixture.freq.expand(mixture.shape)
        self.low = freq <= LOW_BAND
        self.high = freq >= HIGH_BAND
        self.clean_u = {t: self._clean_truth(t) for t in self.times}
        self._oracle_states: dict[int, list[Tensor]] = {}  # u*'s Euler states per N
        self.floor = self._score(mixture, oracle=True)
        exact, _ = mixture.sample(num_samples, torch.Generator().manual_seed(seed + 1))
        self.exact = self.sample_scores(exact)

    def _clean_state(self, t: float) -> Tensor:
        return t * self.clean_x1 + (1 - t) * self.clean_eps  # the linear path (the library's)

    def _clean_truth(self, t: float) -> Tensor:
        return self.mix.velocity(self._clean_state(t).double(), t)

    def sample_scores(self, x: Tensor) -> dict[str, float]:
        """fd, band_low, band_high, mode_tv, loglik of samples x (n, C, S, S)."""
        y = self.mix.to_coeffs(x)
        flat = y.flatten(1)
        mean = flat.mean(0)
        cov = torch.cov(flat.T)
        inner = self.cov_half @ cov @ self.cov_half
        root = torch.linalg.eigvalsh(inner).clamp_min(0).sqrt().sum()
        fd = (mean - self.m).square().sum() + cov.trace() + self.cov_trace - 2 * root
        var = flat.var(0).reshape(self.mix.shape)
        comp = self.mix.responsibilities(x).argmax(1)
        hist = torch.bincount(comp, minlength=self.mix.num_components).double() / len(comp)
        return {
            "fd": float(fd),
            "band_low": float(var[self.low].sum() / self.true_var[self.low].sum()),
            "band_high": float(var[self.high].sum() / self.true_var[self.high].sum()),
            "mode_tv": float(0.5 * (hist - self.mix.weights).abs().sum()),
            "loglik": float(self.mix.log_prob(x).mean() / self.mix.dim),
        }

    def _score(self, model: Any, oracle: bool = False) -> dict[str, Any]:
        scores: dict[str, Any] = {}
        curves: dict[str, Any] = {}
        grids: dict[str, Tensor] = {}
        b = self.bias_samples
        for n in self.eval_steps:
            noise = self.noise.double() if oracle else self.noise
            with torch.no_grad():
                x, traj = sample(model, noise, n, return_trajectory=True)
            s = self.sample_scores(x.double())
            states = [z[:b].double() for z in traj]
            own = []
            for i in range(n):
                v = (states[i + 1] - states[i]) * n
                u = self.mix.velocity(states[i], i / n)
                own.append(float((v - u).square().mean()))
            s["err_own"] = sum(own) / n
            if oracle:
                self._oracle_states[n] = states
                s["path_dev"] = 0.0
                dev = [0.0] * n
                clean = [0.0] * n
            else:
                ref = self._oracle_states[n]
                dev = [float((states[i] - ref[i]).square().mean()) for i in range(1, n + 1)]
                s["path_dev"] = dev[-1]
                clean = []
                for i in range(n):
                    t = i / n
                    xt = self._clean_state(t)
                    with torch.no_grad():
                        v = model(xt, torch.full((b,), t))
                    clean.append(float((v.double() - self.clean_u[t]).square().mean()))
            s["err_clean"] = sum(clean) / n
            s["gap"] = s["err_own"] / s["err_clean"] if s["err_clean"] > 0 else float("nan")
            scores[str(n)] = s
            curves[str(n)] = {
                "t": [(i + 1) / n for i in range(n)],
                "path_dev": dev,
                "t_err": [i / n for i in range(n)],
                "err_own": own,
                "err_clean": clean,
            }
            grids[str(n)] = x[:16].float()
        return {"scores": scores, "curves": curves, "grids": grids}

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """{"scores": {N: {...}}, "curves": {N: {...}}, "grids": {N: first 16 samples}}."""
        model.eval()
        return self._score(model)
