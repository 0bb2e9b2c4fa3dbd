"""32x32 colour crops of the photographs shipped inside scikit-image's wheel (skimage/data).

Nothing is downloaded: only image files present in the installed wheel are read (never the
pooch-backed ``skimage.data`` fetchers). Each photograph is cut once into three disjoint
regions, in its own pixel coordinates:

    train  columns [0, W_tr)            all rows      W_tr = round(W * (1 - HELDOUT_FRACTION))
    val    columns [W_tr, W)            rows [0, H_mid)                   H_mid = round(H / 2)
    test   columns [W_tr, W)            rows [H_mid, H)

Each region is scaled on its own (bilinear, antialiased) by f = BASE_SHORT_SIDE / min(H, W),
so no resampling mixes pixels of two regions. A crop is a square of side c ~ U[32, 40]
region pixels (the random rescale, zoom 0.8 to 1), at a uniform position inside one region,
flipped left-right with probability 1/2 and sampled bilinearly onto 32x32 (one grid_sample
call per batch, on the regions' device); its label is the photograph's index. Training crops
come only from train regions (effectively unlimited: continuous positions x sizes x flips),
held-out crops only from val or test regions, each set with its own fixed seed. Pixels are
x / 127.5 - 1, in [-1, 1].
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .deps import require

__all__ = [
    "PHOTOS",
    "REGIONS",
    "HELDOUT",
    "CROP",
    "CROP_SIDES",
    "photo_dir",
    "load_photo",
    "region_boxes",
    "PhotoCrops",
    "load_photo_crops",
]

# The colour photographs of scikit-image 0.2x's wheel. Left out: motorcycle_right (the
# stereo twin of motorcycle_left: the two would be one class), color.png and phantom.png
# (synthetic), and the grey images (not 3-channel).
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "motorcycle_left": "motorcycle_left.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
}
REGIONS = ("train", "val", "test")
HELDOUT = "heldout"  # val or test region, drawn with probability 1/2 each (feature network)
HELDOUT_FRACTION = 1 / 3  # right-hand band of every photograph: never seen by training
BASE_SHORT_SIDE = 160  # every photograph's short side after the region-wise rescale
CROP = 32  # output side: 32 x 32 x 3 = 3072 dimensions
CROP_SIDES = (32.0, 40.0)  # crop side c ~ U[32, 40] region pixels, sampled onto 32: zoom 0.8-1
HELDOUT_SEEDS = {"val": 1_000_003, "test": 2_000_003}  # fixed seeds of the held-out crop sets


def photo_dir() -> Path:
    """skimage/data inside the installed scikit-image wheel (the package is the demo extra)."""
    skimage = require("skimage", "scikit-image")
    return Path(skimage.__file__).parent / "data"


def load_photo(name: str, directory: Path | None = None) -> Tensor:
    """Photograph ``name`` of PHOTOS as uint8 (3, H, W), read from the wheel's own file."""
    if name not in PHOTOS:
        raise ValueError(f"photo must be one of {tuple(PHOTOS)}, got {name!r}")
    path = (directory or photo_dir()) / PHOTOS[name]
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the photos dataset reads the images shipped inside the "
            "scikit-image wheel (0.2x ships them); it never downloads"
        )
    io = require("skimage.io", "scikit-image")
    img = torch.from_numpy(io.imread(str(path)).copy())
    if img.dim() != 3 or img.shape[-1] < 3:
        raise ValueError(f"{path} is not a colour image: shape {tuple(img.shape)}")
    return img[..., :3].permute(2, 0, 1).contiguous()


def region_boxes(height: int, width: int) -> dict[str, tuple[int, int, int, int]]:
    """(top, left, bottom, right) of the train, val and test regions of an H x W photograph."""
    w_tr = round(width * (1 - HELDOUT_FRACTION))
    h_mid = round(height / 2)
    return {
        "train": (0, 0, height, w_tr),
        "val": (0, w_tr, h_mid, width),
        "test": (h_mid, w_tr, height, width),
    }


def _scaled_region(photo: Tensor, box: tuple[int, int, int, int], factor: float) -> Tensor:
    """Region ``box`` of a uint8 (3, H, W) photo, scaled by ``factor`` alone, in [-1, 1]."""
    top, left, bottom, right = box
    x = photo[:, top:bottom, left:right].float()[None] / 127.5 - 1.0
    size = tuple(max(CROP_SIDES[1], round(n * factor)) for n in x.shape[-2:])
    out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].clamp(-1, 1)


def _atlas(regions: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Regions side by side in one (3, max h, sum w) image (zero below shorter ones), and
    each region's (h, w, left offset) as int64 (P, 3)."""
    height = max(r.shape[-2] for r in regions)
    atlas = torch.zeros(3, height, sum(r.shape[-1] for r in regions))
    geometry, left = [], 0
    for r in regions:
        h, w = r.shape[-2:]
        atlas[:, :h, left : left + w] = r
        geometry.append([h, w, left])
        left += w
    return atlas, torch.tensor(geometry, dtype=torch.int64)


@dataclasses.dataclass
class PhotoCrops:
    """The scaled regions of every photograph and the crop sampler over them.

    regions[split][i] is photograph i's region of that split, (3, h, w) in [-1, 1];
    boxes[i] are the regions' boxes in photograph i's own pixels; names[i] its name.
    """

    names: tuple[str, ...]
    regions: dict[str, list[Tensor]]
    boxes: list[dict[str, tuple[int, int, int, int]]]
    digest: str  # sha256 of the photographs' pixels (cache keys)

    def __post_init__(self) -> None:
        self._atlases = {s: _atlas(self.regions[s]) for s in REGIONS}

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def device(self) -> torch.device:
        """Where crops are cut and returned (see ``to``)."""
        return self._atlases["train"][0].device

    def to(self, device: torch.device | str) -> PhotoCrops:
        """Keep the regions on ``device``: crops are then cut there (one grid_sample)."""
        self._atlases = {s: (a.to(device), g) for s, (a, g) in self._atlases.items()}
        return self

    def sample(
        self,
        n: int,
        region: str,
        generator: torch.Generator,
        *,
        return_windows: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """n crops (n, 3, 32, 32) in [-1, 1] and their photo labels (n,) int64 from ``region``.

        region: 'train', 'val', 'test', or 'heldout' (val or test, p = 1/2 per crop).
        Labels are balanced: photo i gets n // P crops plus one for i < n % P, in a shuffled
        order. Side c ~ U[CROP_SIDES] (region pixels), top-left uniform with the square inside
        the region, flip left-right with p = 1/2; the 32 x 32 output pixel centres are
        sampled bilinearly at top + (j + 1/2) c / 32 - 1/2, which never reads outside the
        square's region. Every draw comes from ``generator`` (CPU), so crops do not depend
        on the device. With return_windows, also (n, 5) float64 rows (split index, top,
        left, side, flipped) in region pixels (split index into REGIONS).
        """
        if region not in (*REGIONS, HELDOUT):
            raise ValueError(f"region must be one of {(*REGIONS, HELDOUT)}, got {region!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        p = self.num_classes
        labels = torch.arange(n) % p
        labels = labels[torch.randperm(n, generator=generator)]
        u = torch.rand(n, 4, generator=generator, dtype=torch.float64)
        sides = CROP_SIDES[0] + (CROP_SIDES[1] - CROP_SIDES[0]) * u[:, 0]
        flips = u[:, 1] < 0.5
        if region == HELDOUT:
            use_val = torch.rand(n, generator=generator) < 0.5
            split_idx = torch.where(use_val, REGIONS.index("val"), REGIONS.index("test"))
        else:
            split_idx = torch.full((n,), REGIONS.index(region))
        out = torch.empty(n, 3, CROP, CROP, device=self.device)
        windows = torch.empty(n, 5, dtype=torch.float64)
        for si, split in enumerate(REGIONS):
            sel = (split_idx == si).nonzero().flatten()
            if sel.numel() == 0:
                continue
            atlas, geometry = self._atlases[split]
            g = geometry[labels[sel]].double()  # (m, 3): h, w, left offset
            c = sides[sel]
            top = u[sel, 2] * (g[:, 0] - c)
            left = u[sel, 3] * (g[:, 1] - c)
            out[sel.to(out.device)] = self._cut(atlas, top, left + g[:, 2], c, flips[sel])
            windows[sel] = torch.stack(
                [torch.full_like(c, si), top, left, c, flips[sel].double()], dim=1
            )
        out = out.clamp(-1, 1)
        if return_windows:
            return out, labels, windows
        return out, labels

    @staticmethod
    def _cut(atlas: Tensor, top: Tensor, left: Tensor, side: Tensor, flip: Tensor) -> Tensor:
        """Squares (top, left, side) of atlas resized to CROP x CROP by one grid_sample call."""
        m = top.shape[0]
        centres = (torch.arange(CROP, dtype=torch.float64) + 0.5) / CROP  # (CROP,)
        ys = top[:, None] + centres[None] * side[:, None] - 0.5  # (m, CROP) pixel coordinates
        cols = torch.where(flip[:, None], centres.flip(0)[None], centres[None])
        xs = left[:, None] + cols * side[:, None] - 0.5
        h, w = atlas.shape[-2:]
        gy = (2 * ys + 1) / h - 1  # align_corners=False normalisation
        gx = (2 * xs + 1) / w - 1
        grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)
        grid = grid.reshape(1, m * CROP, CROP, 2).to(atlas.device, atlas.dtype)
        crops = F.grid_sample(atlas[None], grid, mode="bilinear", align_corners=False)
        return crops.view(3, m, CROP, CROP).transpose(0, 1)

    def heldout(self, split: str, n: int) -> tuple[Tensor, Tensor]:
        """The fixed held-out set of ``split`` ('val' or 'test'): n crops with their seed."""
        if split not in HELDOUT_SEEDS:
            raise ValueError(f"split must be 'val' or 'test', got {split!r}")
        gen = torch.Generator().manual_seed(HELDOUT_SEEDS[split])
        return self.sample(n, split, gen)  # type: ignore[return-value]

    def region_sizes(self) -> dict[str, list[list[int]]]:
        return {s: [list(r.shape[-2:]) for r in self.regions[s]] for s in REGIONS}


def load_photo_crops(
    photos: dict[str, Tensor] | None = None, names: tuple[str, ...] | None = None
) -> PhotoCrops:
    """PhotoCrops of ``photos`` (name -> uint8 (3, H, W)), by default read from the wheel.

    Each region is cut in the photograph's own pixels and scaled on its own by
    BASE_SHORT_SIDE / min(H, W).
    """
    if photos is None:
        directory = photo_dir()
        photos = {n: load_photo(n, directory) for n in (names or tuple(PHOTOS))}
    digest = hashlib.sha256()
    regions: dict[str, list[Tensor]] = {s: [] for s in REGIONS}
    boxes = []
    for name, photo in photos.items():
        if photo.dim() != 3 or photo.shape[0] != 3:
            raise ValueError(f"photo {name!r} must be (3, H, W), got {tuple(photo.shape)}")
        h, w = photo.shape[-2:]
        digest.update(name.encode())
        digest.update(photo.contiguous().numpy().tobytes())
        factor = BASE_SHORT_SIDE / min(h, w)
        bx = region_boxes(h, w)
        boxes.append(bx)
        for split in REGIONS:
            regions[split].append(_scaled_region(photo, bx[split], factor))
    return PhotoCrops(tuple(photos), regions, boxes, digest.hexdigest()[:16])
