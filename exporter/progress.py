"""Progress bars for the long steps (calibration, validation), on stderr."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator


def progress(items: Iterable, *, total: int, desc: str) -> Iterator:
    """Yield `items`, drawing a bar on stderr when it is a terminal (quiet in CI logs,
    which get one line at the end instead)."""
    if sys.stderr.isatty() and not os.environ.get("CI"):
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=f"  {desc}", leave=False, file=sys.stderr)
        return
    count = 0
    for item in items:
        count += 1
        yield item
    print(f"  {desc}: {count}/{total} done", file=sys.stderr, flush=True)
