"""Sample-quality metrics of the demo, in the feature space of a small classifier.

* Frechet distance between gaussians fitted to two feature sets:
  FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)
* precision / recall of Kynkaenniemi et al. (2019): the share of generated features
  inside the union of k-NN balls of the real ones, and vice versa;
* confidence: the classifier's mean max-probability on generated samples;
* MMD^2 with a gaussian kernel (2-D toys, in data space).
The digit classifier is trained once on the train split and cached on disk
(load_or_train_model: the cache shared with the photo classifier of photo_features.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DigitClassifier
from .progress import progress

__all__ = [
    "frechet_distance",
    "precision_recall",
    "confidence",
    "mmd_rbf",
    "train_classifier",
    "load_or_train_classifier",
    "load_or_train_model",
    "classifier_accuracy",
    "batched_features",
]

CLASSIFIER_VERSION = 1  # bump when the classifier or its training changes (cache key)


def _sqrtm_psd(m: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FD = ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), float64.

    a: (N, D) and b: (M, D) feature sets (N, M >= 2); covariances are unbiased.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must be (N, D) and (M, D), got {tuple(a.shape)}, {tuple(b.shape)}"
        )
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("a and b need at least 2 rows each")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    fd = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross.trace()
    return float(fd.clamp_min(0))


def _knn_radius(x: Tensor, k: int) -> Tensor:
    """Distance of each row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkaenniemi et al. k-NN precision and recall of ``fake`` against ``real`` (both (N, D)).

    precision = mean over fake f of [exists real r: ||f - r|| <= radius_k(r)];
    recall    = mean over real r of [exists fake f: ||r - f|| <= radius_k(f)].
    """
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"need more than k={k} rows in real and fake")
    real, fake = real.double(), fake.double()
    r_real, r_fake = _knn_radius(real, k), _knn_radius(fake, k)
    d = torch.cdist(fake, real)  # (F, R)
    precision = (d <= r_real[None]).any(1).double().mean()
    recall = (d.T <= r_fake[None]).any(1).double().mean()
    return float(precision), float(recall)


def confidence(logits: Tensor) -> float:
    """Mean over samples of max_c softmax(logits)_c: how recognisable samples are."""
    return float(F.softmax(logits.double(), dim=1).max(1).values.mean())


def mmd_rbf(x: Tensor, y: Tensor, scale: float = 0.5) -> float:
    """Squared MMD, gaussian kernel exp(-||a - b||^2 / (2 scale^2)), biased estimate."""

    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).square() / (2 * scale**2))

    x, y = x.double(), y.double()
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


@torch.no_grad()
def batched_features(clf: nn.Module, x: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """(features (N, D), logits (N, classes)) of x by a classifier with ``features`` and
    ``head``, computed on the classifier's device and returned on CPU."""
    clf.eval()
    device = next(clf.parameters()).device
    feats, logits = [], []
    for lo in range(0, x.shape[0], batch_size):
        f = clf.features(x[lo : lo + batch_size].to(device, torch.float32))
        feats.append(f.cpu())
        logits.append(clf.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


def classifier_accuracy(clf: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy of clf on (x, y)."""
    _, logits = batched_features(clf, x)
    return float((logits.argmax(1) == y.cpu()).double().mean())


def train_classifier(
    x: Tensor,
    y: Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> DigitClassifier:
    """Train DigitClassifier with Adam (cosine schedule) and cross-entropy on (x, y)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    clf = DigitClassifier(size=x.shape[-1])
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    clf.train()
    for _ in progress(range(epochs), desc="classifier", disable=not show_progress):
        order = torch.randperm(x.shape[0], generator=gen)
        for lo in range(0, x.shape[0], batch_size):
            idx = order[lo : lo + batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    clf.eval()
    return clf


def _data_key(x: Tensor, y: Tensor) -> str:
    h = hashlib.sha256()
    h.update(x.contiguous().numpy().tobytes())
    h.update(y.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_train_model(
    key: str,
    factory: Callable[[], nn.Module],
    train: Callable[[], nn.Module],
    cache_dir: Path | None,
    meta: dict | None = None,
) -> tuple[nn.Module, bool]:
    """Model ``key`` from ``cache_dir`` (state dict ``<key>.pt``) if there, else train() it.

    factory() builds an untrained model to load the cached weights into; a missing or
    damaged file means training and (over)writing it, with ``meta`` beside it as JSON.
    Returns (model in eval mode, from_cache).
    """
    path = None if cache_dir is None else Path(cache_dir) / f"{key}.pt"
    if path is not None and path.is_file():
        try:
            model = factory()
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            model.eval()
            return model, True
        except (RuntimeError, OSError, ValueError):
            pass  # a damaged cache file: train again and overwrite it
    model = train()
    model.eval()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps({"key": key, **(meta or {})}))
    return model, False


def load_or_train_classifier(
    x: Tensor,
    y: Tensor,
    cache_dir: Path | None,
    *,
    show_progress: bool = True,
) -> tuple[DigitClassifier, bool]:
    """The classifier of (x, y) from ``cache_dir`` if cached, else trained and cached.

    The cache key hashes the training data and CLASSIFIER_VERSION. Returns (clf, from_cache).
    """
    key = f"digits-classifier-v{CLASSIFIER_VERSION}-{x.shape[-1]}px-{_data_key(x, y)}"
    clf, cached = load_or_train_model(
        key,
        lambda: DigitClassifier(size=x.shape[-1]),
        lambda: train_classifier(x, y, show_progress=show_progress),
        cache_dir,
        {"n_train": x.shape[0]},
    )
    return clf, cached  # type: ignore[return-value]
