"""The feature network of the photos study: which photograph does a crop come from?

PhotoClassifier is trained once, with cross-entropy and Adam (cosine schedule), on fresh
crops of the **held-out band** of every photograph (its val and test regions), never on the
train regions the generative models learn from, and cached on disk under a key that hashes
the photographs' pixels, the crop settings and the training settings. It is a fixed
measuring instrument, like Inception for FID: it sees no generated sample and chooses
nothing. Its held-out accuracy is measured on crops of the train regions, which it never
saw. Many crops are ambiguous (night sky, black background, plain skin), so 100% is out of
reach; a classifier trained on the small val regions alone memorised them (100% there, 63%
on the test regions), one trained on the whole band generalises better (measured: 69% on
train-region crops).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from . import photos as P
from .metrics import load_or_train_model
from .model import PhotoClassifier
from .progress import progress

__all__ = ["FeatureSettings", "train_photo_classifier", "load_or_train_photo_classifier"]

PHOTO_CLASSIFIER_VERSION = 1  # bump when the network or its training changes (cache key)


@dataclasses.dataclass(frozen=True)
class FeatureSettings:
    """Training settings of the photo classifier (all of them enter the cache key)."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    feature_dim: int = 64
    region: str = P.HELDOUT

    def key(self, digest: str) -> str:
        """Cache key: version, photographs, crop settings and these settings, hashed."""
        crop = {
            "sides": P.CROP_SIDES,
            "crop": P.CROP,
            "base": P.BASE_SHORT_SIDE,
            "heldout": P.HELDOUT_FRACTION,
        }
        blob = json.dumps({"settings": dataclasses.asdict(self), "crop": crop}, sort_keys=True)
        h = hashlib.sha256(f"{digest}|{blob}".encode()).hexdigest()[:16]
        return f"photo-classifier-v{PHOTO_CLASSIFIER_VERSION}-{h}"


def train_photo_classifier(
    crops: P.PhotoCrops, settings: FeatureSettings, *, show_progress: bool = True
) -> PhotoClassifier:
    """Train PhotoClassifier on ``settings.steps`` batches of fresh crops of one region,
    on the crops' device; returned on the CPU."""
    torch.manual_seed(settings.seed)
    gen = torch.Generator().manual_seed(settings.seed)
    clf = PhotoClassifier(crops.num_classes, settings.feature_dim).to(crops.device)
    opt = torch.optim.Adam(clf.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    clf.train()
    for _ in progress(range(settings.steps), desc="photo classifier", disable=not show_progress):
        x, y = crops.sample(settings.batch_size, settings.region, gen)
        loss = F.cross_entropy(clf(x), y.to(x.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    clf.eval()
    return clf.cpu()


def load_or_train_photo_classifier(
    crops: P.PhotoCrops,
    settings: FeatureSettings,
    cache_dir: Path | None,
    *,
    show_progress: bool = True,
) -> tuple[PhotoClassifier, bool, str]:
    """(classifier, from_cache, key): from ``cache_dir`` if cached, else trained and cached."""
    key = settings.key(crops.digest)
    clf, cached = load_or_train_model(
        key,
        lambda: PhotoClassifier(crops.num_classes, settings.feature_dim),
        lambda: train_photo_classifier(crops, settings, show_progress=show_progress),
        cache_dir,
        {"settings": dataclasses.asdict(settings), "photos": list(crops.names)},
    )
    return clf, cached, key  # type: ignore[return-value]
