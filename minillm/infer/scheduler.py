"""The scheduler: one thread that owns the model and decodes every request in one batch.

HTTP handler threads ``submit`` requests and read their tokens from a queue; they never touch the
model. Between two decoding steps the scheduler drops cancelled requests (a client that went
away frees its row at once), admits waiting requests into free rows (continuous batching: a new
request does not wait for the batch to finish), then decodes one token for every row.

Admission control is here too: at most ``max_batch`` requests decode and ``max_queue`` wait; one
more is refused (Busy -> HTTP 429), and while draining for shutdown every new one is (Draining
-> HTTP 503). A failure inside the model ends the requests of that batch with an error event
and the scheduler goes on with the next ones.
"""
import collections
import queue
import threading
import time
import traceback

from minillm.infer.generate import Batch, Sequence


class Busy(Exception):
    """Too many requests in flight (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down (HTTP 503)."""


class Request:
    """One completion: its Sequence, the events queue its handler reads, timings, a cancel flag.

    Events are tuples: ("token", token_id, text_piece), then ("done", finish_reason) or
    ("error", message)."""

    def __init__(self, seq):
        self.seq = seq
        self.events = queue.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at = None
        self.finished_at = None

    def cancel(self):
        self.cancelled.set()

    def stats(self):
        now = self.finished_at or time.perf_counter()
        n = len(self.seq.generated)
        ttft = None if self.first_token_at is None else self.first_token_at - self.submitted
        per = (now - self.first_token_at) / (n - 1) if n > 1 and self.first_token_at else None
        return {"prompt_tokens": len(self.seq.prompt), "completion_tokens": n,
                "ttft_ms": None if ttft is None else round(1000 * ttft, 2),
                "ms_per_token": None if per is None else round(1000 * per, 3),
                "total_ms": round(1000 * (now - self.submitted), 2)}


class Scheduler:
    def __init__(self, model, max_batch=8, max_queue=16):
        self.batch = Batch(model, max_batch)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting = collections.deque()
        self.active = {}                          # Sequence -> Request, those in the batch
        self.cond = threading.Condition()
        self.draining = self.stopping = False
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="scheduler", daemon=True)

    def start(self):
        self.thread.start()
        return self

    # ------------------------------------------------------------------ called by handlers
    def submit(self, seq):
        """Queue a Sequence; returns its Request. Raises Busy or Draining."""
        with self.cond:
            if self.draining:
                raise Draining("the server is shutting down; retry on another instance")
            free = self.max_batch - len(self.active)
            if len(self.waiting) >= free + self.max_queue:
                raise Busy(f"server busy: {len(self.active)} requests decoding and "
                           f"{len(self.waiting)} waiting (limits {self.max_batch} and "
                           f"{self.max_queue}); retry later")
            req = Request(seq)
            self.waiting.append(req)
            self.cond.notify()
        return req

    def wake(self):
        """A request was cancelled: let the loop notice even while idle."""
        with self.cond:
            self.cond.notify()

    def load(self):
        with self.cond:
            return {"active": len(self.active), "waiting": len(self.waiting), "steps": self.steps,
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "draining": self.draining}

    def drain(self, timeout):
        """Refuse new requests, wait up to ``timeout`` s for the admitted ones, cancel the rest.
        Returns how many were cancelled."""
        with self.cond:
            self.draining = True
            end = time.monotonic() + timeout
            while (self.waiting or self.active) and time.monotonic() < end:
                self.cond.wait(min(0.1, max(end - time.monotonic(), 0.001)))
            left = list(self.waiting) + list(self.active.values())
        for req in left:
            req.cancel()
        self.stop()
        return len(left)

    def stop(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _run(self):
        while True:
            with self.cond:
                while not (self.waiting or self.active or self.stopping):
                    self.cond.wait()
                if self.stopping and not self.active:
                    for req in self.waiting:
                        self._finish(req, "cancelled")
                    self.waiting.clear()
                    self.cond.notify_all()
                    return
                admit = []
                while self.waiting and len(self.active) + len(admit) < self.max_batch:
                    req = self.waiting.popleft()
                    if req.cancelled.is_set():
                        self._finish(req, "cancelled")
                    else:
                        admit.append(req)
            try:
                self._iterate(admit)
            except Exception as e:  # a bug in the model: end this batch, keep serving
                msg = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                for req in {id(r): r for r in admit + list(self.active.values())}.values():
                    req.finished_at = time.perf_counter()
                    req.events.put(("error", msg))
                with self.cond:
                    self.active.clear()
                self.batch = Batch(self.batch.model, self.max_batch)  # its cache may be half-written
            with self.cond:
                self.cond.notify_all()  # drain() waits on this

    def _iterate(self, admit):
        for seq, req in list(self.active.items()):
            if req.cancelled.is_set():
                self.batch.remove(seq)
                self._finish(req, "cancelled")
        events = []
        if admit:
            with self.cond:
                self.active.update((r.seq, r) for r in admit)
            events += self.batch.add([r.seq for r in admit])
        events += self.batch.step()
        self.steps += 1
        for seq, token, piece in events:
            req = self.active.get(seq)
            if req is None:
                continue
            if req.first_token_at is None:
                req.first_token_at = time.perf_counter()
            req.events.put(("token", token, piece))
            if seq.done:
                self._finish(req, seq.finish_reason)

    def _finish(self, req, reason):
        if reason == "cancelled":
            req.seq.cancel()
        req.finished_at = req.finished_at or time.perf_counter()
        with self.cond:
            self.active.pop(req.seq, None)
        req.events.put(("done", reason))
