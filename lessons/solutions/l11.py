"""Reference solutions, lesson 11."""
import numpy as np


def split_qkv(w, rank, tp):
    q, k, v = np.split(w, 3, axis=0)                     # each (C, C)
    return np.concatenate([np.split(part, tp, axis=0)[rank] for part in (q, k, v)], axis=0)


def f_backward(grads):
    total = sum(grads[1:], grads[0].copy())             # the all-reduce
    return [total.copy() for _ in grads]


def vocab_parallel_logsumexp(shards):
    top = np.max([s.max(axis=1) for s in shards], axis=0)              # all-reduce max
    total = sum(np.exp(s - top[:, None]).sum(axis=1) for s in shards)  # all-reduce sum
    return top + np.log(total)
