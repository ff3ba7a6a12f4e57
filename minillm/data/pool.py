"""Process pools for the data pipeline: results come back in input order, with a bounded number of
tasks in flight, so memory stays bounded however long the input is.

``multiprocessing.Pool.imap`` would read its whole input ahead of the workers (its feeder thread
does not wait), which for a corpus larger than memory is the one thing we cannot allow; here the
caller's iterator is advanced only when a slot frees up. With ``workers <= 1`` everything runs in
this process, the same code path minus the pool, so results never depend on the worker count.

Workers start from a fork server (a clean single-threaded process, forked per worker) where the
platform has one, else they are spawned: never a plain fork of a parent that may hold threads
(a Jupyter kernel does).
"""
from __future__ import annotations

import multiprocessing as mp
from collections import deque


def _context():
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn")


def ordered_map(fn, items, workers: int = 1, window: int | None = None, initializer=None,
                initargs=()):
    """Yield ``fn(item)`` for each item, in order, on ``workers`` processes.

    At most ``window`` (default ``2 * workers``) items are in flight at once. ``fn`` and
    ``initializer`` must be importable module-level functions. An exception in a worker is
    raised here, at the item that caused it.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield fn(item)
        return
    window = max(1, window or 2 * workers)
    with _context().Pool(workers, initializer, initargs) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
