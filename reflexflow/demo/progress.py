"""Progress bars: tqdm when installed, else a tiny built-in fallback on stderr."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

__all__ = ["progress", "say"]


class _Fallback:
    """Minimal stand-in for tqdm: prints ``desc: i/total`` about every 10 % and at the end."""

    def __init__(self, iterable: Iterable, total: int | None, desc: str, disable: bool) -> None:
        self.iterable = iterable
        self.total = total if total is not None else _len(iterable)
        self.desc = desc
        self.disable = disable
        self.postfix = ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def __iter__(self) -> Iterator:
        start = time.perf_counter()
        every = max(1, (self.total or 10) // 10)
        i = 0
        for i, item in enumerate(self.iterable, 1):
            yield item
            if not self.disable and (i % every == 0 or i == self.total):
                elapsed = time.perf_counter() - start
                tail = f" {self.postfix}" if self.postfix else ""
                print(
                    f"{self.desc}: {i}/{self.total or '?'} [{elapsed:.1f}s]{tail}",
                    file=sys.stderr,
                    flush=True,
                )


def _len(iterable: Iterable) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def progress(
    iterable: Iterable, *, desc: str, total: int | None = None, disable: bool = False
) -> Any:
    """Wrap ``iterable`` in a progress bar (tqdm if importable, else a text fallback)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Fallback(iterable, total, desc, disable)
    return tqdm(iterable, total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)


def say(text: str) -> None:
    """Print a message on stderr without breaking an open tqdm bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(text, file=sys.stderr, flush=True)
        return
    tqdm.write(text, file=sys.stderr)
