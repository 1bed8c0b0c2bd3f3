"""Progress bars for loops a user waits on (``bench``, ``demo``, ``run``): tqdm on stderr, silent
when stderr is not a terminal (CI logs, pipes) or when asked to be quiet."""

from __future__ import annotations

import sys


def progress(iterable=None, quiet: bool = False, **kwargs):
    """A tqdm bar over ``iterable`` (or with ``total=``); ``quiet`` turns it off."""
    from tqdm.auto import tqdm

    # disable=None: tqdm's own rule, off when the stream is not a TTY
    return tqdm(iterable, disable=True if quiet else None, leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)
