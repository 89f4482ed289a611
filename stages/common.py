"""What every stage shares: progress bars on the terminal."""
from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress(iterable=None, **kwargs):
    """A tqdm bar with rate and ETA on stderr; quiet when REPSURGERY_QUIET is set (tests)."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("mininterval", 0.5)
    return tqdm(iterable, disable=bool(os.environ.get("REPSURGERY_QUIET")), **kwargs)
