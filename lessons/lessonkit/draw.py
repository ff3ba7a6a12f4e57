"""Drawing helpers for the lessons: the computation graph behind a Tensor (lesson 01).

The lesson shows the idea (every result keeps its op's inputs in ``_ctx.parents``, so walking
them from the loss finds the whole graph); the matplotlib bookkeeping lives here.
"""
from __future__ import annotations

import matplotlib.pyplot as plt

from minillm import Tensor


def _parents(t):
    return [p for p in (t._ctx.parents if t._ctx is not None else ()) if isinstance(p, Tensor)]


def graph_of(root):
    """Every tensor ``root`` depends on, and the edges (input, result) between them."""
    nodes, edges, stack, seen = [], [], [root], set()
    while stack:
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        nodes.append(t)
        for p in _parents(t):
            edges.append((p, t))
            stack.append(p)
    return nodes, edges


def depths(nodes):
    """Length of the longest path from a leaf to each node (id -> depth): its column."""
    depth = {}

    def of(t):  # graphs in a lesson are small: plain recursion with a memo is fine here
        if id(t) not in depth:
            ps = _parents(t)
            depth[id(t)] = 1 + max(map(of, ps)) if ps else 0
        return depth[id(t)]

    for t in nodes:
        of(t)
    return depth


def draw_graph(root, ax=None, figsize=(9, 3.5)):
    """Draw the graph behind ``root``: leaves (blue) on the left, each op result (beige) in the
    column of its depth, labelled with its ``name`` and op; an arrow from each input to the result
    that used it (an arrow that skips columns is drawn as an arc so it is not hidden)."""
    nodes, edges = graph_of(root)
    depth = depths(nodes)
    columns = {}
    for t in nodes:
        columns.setdefault(depth[id(t)], []).append(t)
    pos = {id(t): (d, i - (len(ts) - 1) / 2) for d, ts in columns.items() for i, t in enumerate(ts)}
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    box = {}
    for t in nodes:
        op = f"\n[{t._ctx.fn.__name__}]" if t._ctx is not None else "\n[leaf]"
        box[id(t)] = ax.text(*pos[id(t)], (t.name or "const") + op, ha="center", va="center",
                             bbox=dict(boxstyle="round", fc="lightblue" if t._ctx is None else "wheat"))
    for p, t in edges:
        bend = 0.4 if depth[id(t)] - depth[id(p)] > 1 else 0.0
        ax.annotate("", xy=pos[id(t)], xytext=pos[id(p)], arrowprops=dict(
            arrowstyle="-|>", color="gray", connectionstyle=f"arc3,rad={bend}",
            patchA=box[id(p)].get_bbox_patch(), patchB=box[id(t)].get_bbox_patch()))
    ax.set_xlim(-0.5, max(columns) + 0.5)
    ax.set_ylim(-1.5, 1.2)
    ax.axis("off")
    return ax
