"""The output folder of ``reflexflow demo``: checked before any training.

``prepare_out(path, force)``: a path naming a file is refused; a non-empty folder is
refused unless ``force``, and with ``force`` the demo's own files in it (results.json,
results.md and the figures it names, :data:`OWN_FILES`) are removed first, so no stale
figure survives among the new ones, while any other file stays;
the folder is created and a probe file written and removed, so a read-only place fails
now, not after the study has trained.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["prepare_out", "check_out_path", "check_cache_dir", "own_files", "OWN_FILES"]

# what the demo writes: its results and the figures of its studies (samples-<row>.png
# per row); no other file in --out is touched
OWN_FILES = (
    "results.json",
    "results.md",
    "exposure-bias.png",
    "loss-curves.png",
    "differences.png",
    "spectrum.png",
    "fd-vs-steps.png",
    "bands.png",
    "samples.png",
    "samples-*.png",
)


def check_out_path(path: Path) -> Path:
    """ValueError when ``path`` exists and is not a folder (what argparse's type calls)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out must name a folder, but {str(path)!r} is a file")
    return path


def own_files(path: Path) -> list[str]:
    """The names of the demo's own files (:data:`OWN_FILES`) in folder ``path``, sorted."""
    names = {f.name for pattern in OWN_FILES for f in Path(path).glob(pattern) if f.is_file()}
    return sorted(names)


def check_cache_dir(path: Path | None) -> None:
    """ValueError when the run cache ``path`` cannot be a folder: it, or its nearest
    existing ancestor, is a file (checked before any training)."""
    if path is None:
        return
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--cache-dir {str(path)!r} cannot be a folder: {str(folder)!r} is a file")


def prepare_out(path: Path, force: bool) -> list[Path]:
    """Make ``path`` ready for the demo's files; returns the stale files it removed.

    ValueError (naming the folder and the fix) when it is a file, not empty without
    ``force``, or cannot be created or written.
    """
    path = check_out_path(path)
    removed: list[Path] = []
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise ValueError(
                f"--out {str(path)!r} is not empty; choose another folder, or pass --force to "
                "replace the demo's files in it (results.json, results.md and its figures)"
            )
        for pattern in OWN_FILES:
            for f in sorted(path.glob(pattern)):
                if f.is_file():
                    removed.append(f)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".reflexflow-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
        for f in removed:
            f.unlink()
    except OSError as err:
        raise ValueError(f"--out {str(path)!r} cannot be written: {err}") from err
    return removed
