"""Run-directory logging: metrics.jsonl (one JSON object per logged step) and the console line."""
import json
import math
from pathlib import Path


def format_line(m):
    """One readable console line for a metrics record."""
    parts = [f"step {m['step']:>6}", f"loss {m['loss']:.4f}"]
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
    return " | ".join(parts)


class MetricsLog:
    """Appends records to ``run_dir/metrics.jsonl``. On resume from a checkpoint taken after step s,
    records of steps > s (written by the interrupted run after its checkpoint) are dropped, so the
    file reads as one run; step s's own record was logged before that checkpoint and stays."""

    def __init__(self, run_dir, start_step=0, enabled=True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if not enabled:
            return
        kept = []
        if start_step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= start_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record):
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")


def read_metrics(run_dir):
    """All records of a run directory's metrics.jsonl, as a list of dicts."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
