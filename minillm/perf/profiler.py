"""Where does a training step's time go? A per-op profile of forward and backward.

``OpProfiler`` wraps every Function subclass's forward and backward with a timer while it is
active, so the table it prints says, op by op, how many calls and milliseconds forward and
backward took; "engine" is the rest of backward (graph walk, gradient accumulation).

    with OpProfiler() as prof:
        loss = model(x, y)[1]; loss.backward()
    print(prof.table())
"""
import time
from collections import defaultdict

from minillm import backend
from minillm.autograd.function import Function


def all_functions():
    """Every Function subclass defined so far (the ops the profiler times)."""
    seen, todo = [], list(Function.__subclasses__())
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo.extend(cls.__subclasses__())
    return seen


class OpProfiler:
    def __init__(self, sync=True):
        self.sync = sync
        self.stats = defaultdict(lambda: [0, 0.0, 0, 0.0])  # calls fwd, s fwd, calls bwd, s bwd
        self._saved = []

    def _wrap(self, cls, which):
        orig = cls.__dict__[which]
        fn = orig.__func__ if isinstance(orig, staticmethod) else orig
        stats, sync, slot = self.stats, self.sync, 0 if which == "forward" else 2

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if sync:
                backend.synchronize()
            s = stats[cls.__name__]
            s[slot] += 1
            s[slot + 1] += time.perf_counter() - t0
            return out
        self._saved.append((cls, which, orig))
        setattr(cls, which, staticmethod(timed))

    def __enter__(self):
        for cls in all_functions():
            for which in ("forward", "backward"):
                if which in cls.__dict__:
                    self._wrap(cls, which)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.total = time.perf_counter() - self.t0
        for cls, which, orig in reversed(self._saved):
            setattr(cls, which, orig)
        self._saved.clear()

    def table(self, steps=1):
        rows = sorted(self.stats.items(), key=lambda kv: -(kv[1][1] + kv[1][3]))
        ops = sum(s[1] + s[3] for _, s in rows)
        lines = [f"{'op':18}{'calls':>7}{'fwd ms':>9}{'bwd ms':>9}{'share':>8}"]
        for name, (cf, tf, cb, tb) in rows:
            lines.append(f"{name:18}{cf // steps:>7}{1000 * tf / steps:>9.2f}{1000 * tb / steps:>9.2f}"
                         f"{100 * (tf + tb) / self.total:>7.1f}%")
        rest = self.total - ops
        lines.append(f"{'(everything else)':18}{'':>7}{'':>9}{'':>9}{100 * rest / self.total:>7.1f}%")
        lines.append(f"total {1000 * self.total / steps:.1f} ms per step")
        return "\n".join(lines)
