"""The data report: what every stage of a prepare took in and gave out, and why.

``build_report`` gathers the per-batch statistics of a run into one JSON-able dict (written as
``report.json`` next to the shards); ``format_report`` renders it as the table ``minillm prepare
--report`` prints. It holds:

- stages: documents and bytes in and out of read, clean, filter, exact and near dedup, tokenize,
  with the CPU seconds each spent (summed over workers) and so MB/s per process;
- rules: documents and bytes each quality rule removed (a document counts for its first rule);
- length histogram: documents per power-of-two byte length, as read and as kept;
- duplicate clusters: the largest groups of copies (kept document, size, a snippet);
- tokens: per split, and tokens per byte of kept text;
- wall-clock seconds of each phase.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from minillm.data import stages
from minillm.data.dedup import clusters

TOP_CLUSTERS = 10


def _sum(parts, key):
    return int(sum(p[key] for p in parts))


def _stage(name, docs_in, bytes_in, docs_out, bytes_out, cpu=None, **extra) -> dict:
    d = {"stage": name, "docs_in": int(docs_in), "bytes_in": int(bytes_in),
         "docs_out": int(docs_out), "bytes_out": int(bytes_out)}
    if cpu is not None:
        d["cpu_s"] = round(float(cpu), 3)
        d["mb_per_s"] = round(bytes_in / 1e6 / cpu, 1) if cpu > 0 else None
    d.update(extra)
    return d


def _clusters(dd, parts, work, file_names) -> list[dict]:
    exact_of, near_of = np.asarray(dd["exact_of"]), np.asarray(dd["near_of"])
    groups = clusters(exact_of, near_of)
    top = sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))[:TOP_CLUSTERS]
    if not top:
        return []
    starts = np.concatenate(([0], np.cumsum([p["docs_out"] for p in parts])))
    out = []
    for root, removed in top:
        k = int(np.searchsorted(starts, root, side="right") - 1)
        local = root - int(starts[k])
        doc = stages.read_part_docs(work, k)[local]
        fi, n = np.load(stages.part_path(work, k, ".origin.npy"))[local]
        removed = np.asarray(removed)
        out.append({"kept": f"{file_names[fi]}#{n}", "copies": int(len(removed)),
                    "exact": int((exact_of[removed] >= 0).sum()),
                    "near": int((exact_of[removed] < 0).sum()),
                    "snippet": " ".join(doc.split())[:80]})
    return out


def build_report(cfg, read, parts, dd, tok_stats, times, work) -> dict:
    cpu = {k: sum(p["times"][k] for p in parts) for k in ("clean", "filter", "hash", "minhash")}
    cpu["tokenize"] = sum(s["seconds"] for s in tok_stats)
    docs_read, bytes_read = _sum(parts, "docs_in"), _sum(parts, "bytes_in")
    rows = [_stage("read", read.docs, bytes_read + read.invalid_chars, docs_read, bytes_read,
                   invalid_utf8_docs=read.invalid_docs, cuts=read.cuts)]
    docs, nbytes = docs_read, bytes_read
    if cfg.clean:
        empty = [sum(p["empty"][i] for p in parts) for i in (0, 1)]
        out_b = _sum(parts, "clean_bytes_out")
        rows.append(_stage("clean", docs, nbytes, docs - empty[0], out_b, cpu["clean"],
                           empty_docs=empty[0]))
        docs, nbytes = docs - empty[0], out_b
    rules: dict = {}
    for p in parts:
        for rule, (n, b) in p["rules"].items():
            r = rules.setdefault(rule, {"docs": 0, "bytes": 0})
            r["docs"] += n
            r["bytes"] += b
    if cfg.filter is not None:
        order = [r for r in cfg.filter.rules if r in rules]
        rows.append(_stage("filter", docs, nbytes, _sum(parts, "docs_out"), _sum(parts, "bytes_out"),
                           cpu["filter"], rules={r: rules[r] for r in order}))
    docs, nbytes = _sum(parts, "docs_out"), _sum(parts, "bytes_out")
    sizes = np.concatenate([np.diff(np.load(stages.part_path(work, k, ".idx.npy")), axis=1).ravel()
                            for k in range(len(parts))]) if parts else np.zeros(0)
    exact_of, near_of = np.asarray(dd["exact_of"]), np.asarray(dd["near_of"])
    if cfg.dedup is not None:
        ex = exact_of >= 0
        rows.append(_stage("exact_dedup", docs, nbytes, docs - ex.sum(), nbytes - sizes[ex].sum(),
                           cpu["hash"]))
        nr = near_of >= 0
        rows.append(_stage("near_dedup", docs - ex.sum(), nbytes - sizes[ex].sum(),
                           docs - ex.sum() - nr.sum(), nbytes - sizes[ex | nr].sum(), cpu["minhash"],
                           candidate_pairs=int(dd["candidate_pairs"]),
                           verified_pairs=int(dd["verified_pairs"])))
    split = {s: {k: int(sum(t[s][k] for t in tok_stats)) for k in ("docs", "bytes", "tokens")}
             for s in ("train", "val")}
    kept_docs = split["train"]["docs"] + split["val"]["docs"]
    kept_bytes = split["train"]["bytes"] + split["val"]["bytes"]
    tokens = split["train"]["tokens"] + split["val"]["tokens"]
    rows.append(_stage("tokenize", kept_docs, kept_bytes, kept_docs, kept_bytes, cpu["tokenize"],
                       tokens=tokens))
    hist_out = np.sum([t["hist_out"] for t in tok_stats], axis=0).tolist()
    return {
        "sources": list(cfg.sources), "files": read.files, "stages": rows,
        "rules": rules, "dedup": cfg.dedup.describe() if cfg.dedup else None,
        "duplicate_clusters": _clusters(dd, parts, work, read.file_names) if cfg.dedup else [],
        "length_histogram": {"bin_start_bytes": [2 ** b for b in range(stages.HIST_BINS)],
                             "read": np.sum([p["hist_in"] for p in parts], axis=0).tolist(),
                             "kept": hist_out},
        "tokens": dict(split, tokens_per_byte=round(tokens / max(1, kept_bytes), 4),
                       tokens_per_byte_note="tokens include one end-of-text per document"),
        "filter": dataclasses.asdict(cfg.filter) if cfg.filter else None,
        "seconds": {k: round(v, 3) for k, v in times.items()},
        "workers": cfg.workers,
    }


def _mb(b) -> str:
    return f"{b / 1e6:,.2f}"


def format_report(r: dict) -> str:
    """The report as a plain-text table."""
    lines = [f"{'stage':<12} {'docs in':>10} {'docs out':>10} {'MB in':>10} {'MB out':>10} "
             f"{'cpu s':>8} {'MB/s':>7}"]
    for s in r["stages"]:
        rate = s.get("mb_per_s")
        lines.append(f"{s['stage']:<12} {s['docs_in']:>10,} {s['docs_out']:>10,} "
                     f"{_mb(s['bytes_in']):>10} {_mb(s['bytes_out']):>10} "
                     f"{s.get('cpu_s', ''):>8} {'' if rate is None else rate:>7}")
    if r["rules"]:
        lines.append("filter rules (documents removed, MB):")
        lines += [f"  {k:<18} {v['docs']:>8,} {_mb(v['bytes']):>10}" for k, v in r["rules"].items()]
    d = r["dedup"]
    if d:
        lines.append(f"near dedup: {d['bands']} bands x {d['rows']} rows ({d['num_perm']} hashes) "
                     f"over word {d['ngram']}-grams, verified at Jaccard >= {d['threshold']}; "
                     f"the LSH curve's step is near {d['lsh_threshold']}, "
                     f"P(candidate | s = {d['threshold']}) = {d['p_candidate_at_threshold']}")
    if r["duplicate_clusters"]:
        lines.append("largest duplicate clusters (copies removed: exact + near, kept document):")
        lines += [f"  {c['copies']:>5} = {c['exact']} + {c['near']}  {c['kept']}: {c['snippet']!r}"
                  for c in r["duplicate_clusters"]]
    h = r["length_histogram"]
    nz = [i for i, (a, b) in enumerate(zip(h["read"], h["kept"])) if a or b]
    if nz:
        lines.append("document length (bytes): read / kept")
        lines += [f"  {h['bin_start_bytes'][i]:>9,}+ {h['read'][i]:>8,} {h['kept'][i]:>8,}"
                  for i in range(nz[0], nz[-1] + 1)]
    t = r["tokens"]
    lines.append(f"tokens: train {t['train']['tokens']:,} ({t['train']['docs']:,} docs), "
                 f"val {t['val']['tokens']:,} ({t['val']['docs']:,} docs), "
                 f"{t['tokens_per_byte']} tokens per byte")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in r["seconds"].items()))
    return "\n".join(lines)
