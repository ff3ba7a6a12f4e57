"""Plots of a run directory: the training curves, and the pipeline timeline (a Gantt chart per rank)."""
import json
from pathlib import Path

from minillm.distributed.pipeline_schedule import COMPUTE
from minillm.errors import UserError
from minillm.fileio import write_error


def _save(fig, out):
    """Write the PNG; a path the disk refuses is a one-line error naming it."""
    try:
        fig.savefig(out, dpi=110)
    except (OSError, ValueError) as e:  # ValueError: a file name whose extension is no image format
        raise write_error("plot", out, e, "choose another --out") from None


def _figure(**kw):
    """A Figure not attached to pyplot: saving it never switches a notebook's plotting backend."""
    from matplotlib.figure import Figure
    return Figure(**kw)


def plot_metrics(run_dir, out=None):
    """loss / val loss, lr, grad norm (and loss scale when present) against step -> PNG path."""
    from minillm.train.metrics import read_metrics
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} has no metrics.jsonl; give the train.out_dir of a run")
    recs = read_metrics(run_dir)
    if not recs:
        raise UserError(f"{run_dir}/metrics.jsonl is empty; let the run log at least one step")
    has_scale = any(r.get("loss_scale") is not None for r in recs)
    fig = _figure(figsize=(16 if has_scale else 13, 3.6))
    axes = fig.subplots(1, 4 if has_scale else 3)
    steps = [r["step"] for r in recs]
    axes[0].plot(steps, [r["loss"] for r in recs], label="train (batch)")
    ev = [r for r in recs if r.get("val_loss") is not None]
    if ev:
        axes[0].plot([r["step"] for r in ev], [r["val_loss"] for r in ev], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(steps, [r["lr"] for r in recs])
    axes[1].set_title("learning rate")
    axes[2].plot(steps, [r["grad_norm"] if r["grad_norm"] is not None else float("nan") for r in recs])
    axes[2].set_title("gradient norm")
    axes[2].set_yscale("log")
    if has_scale:
        axes[3].plot(steps, [r.get("loss_scale") for r in recs])
        axes[3].set_yscale("log", base=2)
        axes[3].set_title("loss scale")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(out) if out else run_dir / "metrics.png"
    _save(fig, out)
    return out


_COLORS = {"forward": "tab:blue", "backward": "tab:green", "weight": "tab:olive", "send": "tab:orange",
           "recv": "tab:red", "optimizer": "tab:purple", "allreduce": "tab:brown"}
_HATCHES = ("", "//", "..", "xx", "\\\\", "++")   # an interleaved rank's chunks 0, 1, 2, ...


def read_timelines(run_dir):
    """The timeline_rank*.json records of a run directory, in rank order."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("timeline_rank*.json"), key=lambda f: int(f.stem[len("timeline_rank"):]))
    if not files:
        raise UserError(f"{run_dir} has no timeline_rank*.json; run with --parallel.pp=2 or more "
                        f"to record a pipeline timeline")
    return [json.loads(f.read_text()) for f in files]


def draw_timeline(ax, ranks, title=None, legend=True, xlabel="seconds"):
    """Gantt chart of timeline records ({"rank", "stage", "events": [{"kind", "start", "end",
    "micro", "chunk"}]}, one per rank) on ``ax``. Gaps are idle time: the pipeline bubble. Forward,
    backward (B) and weight-gradient (W) steps have their own colours; an interleaved rank's
    chunks after the first are hatched. Compare several timelines on one time axis by giving
    their axes ``sharex`` (the lesson does)."""
    from matplotlib.patches import Patch
    t0 = min((e["start"] for r in ranks for e in r["events"]), default=0.0)
    chunks = 1
    for row, r in enumerate(ranks):
        for e in r["events"]:
            chunk = e.get("chunk") or 0
            chunks = max(chunks, chunk + 1)
            ax.barh(row, e["end"] - e["start"], left=e["start"] - t0, height=0.7,
                    color=_COLORS.get(e["kind"], "grey"), edgecolor="black", linewidth=0.3,
                    hatch=_HATCHES[chunk % len(_HATCHES)] if e["kind"] in COMPUTE else "")
            if e.get("micro") is not None and e["kind"] in COMPUTE:
                ax.text((e["start"] + e["end"]) / 2 - t0, row, str(e["micro"]), ha="center",
                        va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)), [_row_label(i, r) for i, r in enumerate(ranks)])
    ax.set_ylim(len(ranks) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlabel(xlabel)
    ax.set_title(title or ranks[0].get("title", "pipeline timeline"), fontsize=10)
    if legend:
        kinds = {e["kind"] for r in ranks for e in r["events"]}
        shown = [k for k in _COLORS if k in kinds]
        handles = [Patch(color=_COLORS[k]) for k in shown]
        handles += [Patch(facecolor="white", edgecolor="black", hatch=_HATCHES[c]) for c in range(1, chunks)]
        ax.legend(handles, shown + [f"chunk {c}" for c in range(1, chunks)],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return ax


def plot_timeline(run_dir, out=None):
    """Draw a run's timelines (``minillm plot --timeline``): the title compares the measured
    bubble with the theory, each row names its stage's peak activation memory. -> PNG path."""
    run_dir = Path(run_dir)
    ranks = read_timelines(run_dir)
    fig = _figure(figsize=(12, 0.8 + 0.6 * len(ranks)))
    ax = fig.subplots()
    draw_timeline(ax, ranks)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "timeline.png"
    _save(fig, out)
    return out


def _row_label(i, r):
    label = f"rank {r.get('rank', i)} (stage {r.get('stage', '?')})"
    peaks, stage = r.get("peak_activation_bytes"), r.get("stage")
    if peaks and isinstance(stage, int) and stage < len(peaks):
        label += f"\nact. {peaks[stage] / 1e6:.2f} MB"
    return label
