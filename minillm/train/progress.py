"""What a run prints while it trains: one line per logged step, a bar on a terminal, the summary.

The lines are the same wherever the output goes (a terminal, a pipe, ``mpirun``, CI, a
notebook): each says where the run is (``step 120/1500``), how it is doing (loss, validation
loss, learning rate, gradient norm), how fast (tokens/s, ms per step, MFU) and when it will end
(ETA from the average time of this run's steps so far, evaluations and saves included). On a
terminal a tqdm bar sits below them.

MFU divides the model's FLOP/s by the matmul peak measured at start, with this run's thread
count. A measurement taken while other programs held the cores reads low; when the model then
does better than that "peak", the peak is raised to what it did: MFU never shows above 100 %.
"""
from __future__ import annotations

import sys
import time


def hms(seconds: float) -> str:
    """1h02m, 3m05s, 12.3s."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{seconds:.1f}s"


def format_line(m: dict, total: int | None = None, eta: float | None = None) -> str:
    """One readable console line for a metrics record (``total``, ``eta``: steps, seconds)."""
    parts = [f"step {m['step']:>6}" + (f"/{total}" if total else ""), f"loss {m['loss']:.4f}"]
    if m.get("val_loss") is not None:
        parts.append(f"val {m['val_loss']:.4f}")
    parts += [f"lr {m['lr']:.2e}", f"grad {m['grad_norm']:.3f}"]
    if m.get("tokens_per_s"):
        parts.append(f"{m['tokens_per_s'] / 1000:.1f}k tok/s")
    if m.get("ms_per_step"):
        parts.append(f"{m['ms_per_step']:.0f} ms")
    if m.get("comm_wait_ms") is not None:
        parts.append(f"comm wait {m['comm_wait_ms']:.1f} ms")
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if m.get("loss_scale") is not None:
        parts.append(f"scale {m['loss_scale']:g}")
    if eta is not None:
        parts.append(f"ETA {hms(eta)}")
    return " | ".join(parts)


class MFU:
    """Model FLOPs utilisation of one rank: ``mfu(tokens_per_s)`` against the best matmul rate
    seen so far (the measured peak, raised when the model beats it), so never above 1."""

    def __init__(self, flops_per_token: float, peak: float, ranks: int = 1):
        self.flops_per_token, self.peak, self.ranks = flops_per_token, peak, ranks

    def __call__(self, tokens_per_s: float) -> float | None:
        if not self.peak:
            return None
        achieved = self.flops_per_token * tokens_per_s / self.ranks  # FLOP/s of one rank
        self.peak = max(self.peak, achieved)
        return achieved / self.peak


class Progress:
    """The console side of a run from ``start`` to ``total`` steps: ``line(record)`` prints the
    step's line (through the bar on a terminal), ``tick()`` advances the bar, ``close()``."""

    def __init__(self, total: int, start: int, log, bar: bool = False):
        self.total, self.start, self.log = total, start, log
        self.t0 = time.perf_counter()
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)

    def eta(self, step: int) -> float | None:
        """Seconds left at ``step``: this run's mean seconds per step times the steps to go."""
        done = step - self.start
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def line(self, record: dict) -> None:
        self.write(format_line(record, self.total, self.eta(record["step"])))

    def write(self, text: str) -> None:
        (self.bar.write if self.bar else self.log)(text)

    def tick(self) -> None:
        if self.bar:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None


def summary_line(steps: int, seconds: float, last_val, best_val, checkpoint) -> str:
    """``done: 1500 steps in 2m03s | val loss 1.3912 (best 1.3850) | checkpoint PATH``."""
    parts = [f"done: {steps} steps in {hms(seconds)}"]
    if last_val is not None:
        parts.append(f"val loss {last_val:.4f} (best {best_val:.4f})")
    parts.append(f"checkpoint {checkpoint}")
    return " | ".join(parts)
