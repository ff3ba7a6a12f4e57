"""Run-directory logging: metrics.jsonl, one JSON object per logged step (the console line is
in progress.py). A write the disk refuses is a one-line error naming the file."""
import json
import math
from pathlib import Path

from minillm.fileio import append_line, write_atomic


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
        write_atomic(self.path, "".join(line + "\n" for line in kept), "metrics")

    def write(self, record):
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        append_line(self.path, json.dumps(clean), "metrics")


def read_metrics(run_dir):
    """All records of a run directory's metrics.jsonl, as a list of dicts."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
