"""Plots of a run directory: the training curves, and the pipeline timeline (a Gantt chart per rank)."""
import json
from pathlib import Path

from minillm.errors import UserError


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metrics(run_dir, out=None):
    """loss / val loss, lr, grad norm (and loss scale when present) against step -> PNG path."""
    from minillm.train.metrics import read_metrics
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise UserError(f"{run_dir} has no metrics.jsonl; give the train.out_dir of a run")
    recs = read_metrics(run_dir)
    if not recs:
        raise UserError(f"{run_dir}/metrics.jsonl is empty; let the run log at least one step")
    plt = _pyplot()
    has_scale = any(r.get("loss_scale") is not None for r in recs)
    fig, axes = plt.subplots(1, 4 if has_scale else 3, figsize=(16 if has_scale else 13, 3.6))
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
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


_COLORS = {"forward": "tab:blue", "backward": "tab:green", "send": "tab:orange", "recv": "tab:red",
           "optimizer": "tab:purple", "allreduce": "tab:brown"}


def plot_timeline(run_dir, out=None):
    """Gantt chart of every rank's recorded events (timeline_rank*.json, written by pipeline runs)."""
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("timeline_rank*.json"))
    if not files:
        raise UserError(f"{run_dir} has no timeline_rank*.json; run with --parallel.pp=2 or more "
                        f"to record a pipeline timeline")
    plt = _pyplot()
    ranks = [json.loads(f.read_text()) for f in files]
    fig, ax = plt.subplots(figsize=(12, 0.8 + 0.6 * len(ranks)))
    t0 = min(e["start"] for r in ranks for e in r["events"]) if any(r["events"] for r in ranks) else 0
    for row, r in enumerate(ranks):
        for e in r["events"]:
            ax.barh(row, e["end"] - e["start"], left=e["start"] - t0, height=0.7,
                    color=_COLORS.get(e["kind"], "grey"), edgecolor="black", linewidth=0.3)
            if e.get("micro") is not None and e["kind"] in ("forward", "backward"):
                ax.text((e["start"] + e["end"]) / 2 - t0, row, str(e["micro"]), ha="center",
                        va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)), [f"rank {r.get('rank', i)} (stage {r.get('stage', '?')})"
                                      for i, r in enumerate(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, _COLORS.keys(), ncol=len(_COLORS), loc="upper center",
              bbox_to_anchor=(0.5, -0.25), fontsize=8)
    title = ranks[0].get("title", "pipeline timeline")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "timeline.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
