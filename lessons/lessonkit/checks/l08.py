"""Checks of lesson 08 (data parallelism): a ring reduce-scatter on simulated ranks against
Comm.reduce_scatter_'s contract (and the library's ring on the same ranks), the gradient buckets
against make_buckets, ZeRO-1's shards against ShardLayout."""
import numpy as np

from lessonkit.exercise import exercise
from lessonkit.threadranks import run_ranks
from lessonkit.verify import assert_close
from minillm.distributed.data_parallel import make_buckets
from minillm.distributed.ring import chunk_bounds, ring_allreduce_
from minillm.distributed.zero import ShardLayout
from minillm.model import GPT, GPTConfig


def _ring_owning_next(comm, a):   # a plausible slip: the library's ring, which ends owning chunk r+1
    p, r = comm.size, comm.rank
    b = chunk_bounds(a.size, p)
    chunk = lambda i: a[b[i % p]:b[i % p + 1]]  # noqa: E731
    for s in range(p - 1):
        mine = chunk(r - s - 1)
        buf = np.empty_like(mine)
        comm.sendrecv(chunk(r - s), (r + 1) % p, buf, (r - 1) % p)
        mine += buf
    return a


@exercise("08.ring_reduce_scatter", broken=_ring_owning_next)
def check_ring_reduce_scatter(ring_reduce_scatter):
    rng = np.random.default_rng(0)
    # the simulated ranks first run the library's ring all-reduce: they behave like MPI's
    data = [rng.standard_normal(10) for _ in range(3)]
    out, _ = run_ranks(3, lambda comm, a: ring_allreduce_(comm, a.copy()), data)
    assert all(np.allclose(o, sum(data)) for o in out), "internal: simulated ranks are broken"
    for p, n in ((2, 8), (3, 10), (4, 4), (5, 23), (4, 3)):
        data = [rng.standard_normal(n) for _ in range(p)]
        total = np.sum(data, axis=0)
        b = chunk_bounds(n, p)
        out, comms = run_ranks(p, lambda comm, a: ring_reduce_scatter(comm, a), [d.copy() for d in data])
        for r in range(p):
            got = np.asarray(out[r] if out[r] is not None else [])
            assert got.shape == (n,), (f"p={p}, n={n}: rank {r} returned shape {got.shape}; return the "
                                       "array you reduced in place")
            assert_close(got[b[r]:b[r + 1]], total[b[r]:b[r + 1]],
                         f"p={p}, n={n}: rank {r}'s chunk {r} (elements {b[r]}..{b[r + 1] - 1}) after the "
                         "reduce-scatter, against the sum over ranks", rtol=1e-12,
                         hint="Comm.reduce_scatter_'s contract: rank r ends owning chunk r. Shift the "
                              "ring so the chunk rank r sends at step s is r - s - 1 (mod p)")
            c = comms[r]
            assert c.sent_messages == p - 1, (f"p={p}: rank {r} sent {c.sent_messages} messages; a ring "
                                              f"reduce-scatter takes p - 1 = {p - 1} steps, one message each")
            most = max(b[i + 1] - b[i] for i in range(p))
            assert c.sent_elements <= (p - 1) * most, (
                f"p={p}, n={n}: rank {r} sent {c.sent_elements} elements; p - 1 chunks of about n/p "
                f"are {(p - 1) * most} at most (send one chunk per step, not the whole array)")


def _forward_order(sizes, cap_bytes):   # a plausible slip: buckets in forward order
    groups, cur, size = [], [], 0
    for name, nbytes in sizes:
        if cur and size + nbytes > cap_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    return groups + [cur] if cur else groups


@exercise("08.bucket_split", broken=_forward_order)
def check_bucket_split(bucket_split):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), seed=0)
    named = list(model.named_parameters())
    sizes = [(n, int(p.data.nbytes)) for n, p in named]
    for cap in (1 << 20, 20_000, 4_000, 1_000):
        want = [b.names for b in make_buckets(named, cap / 2 ** 20)]
        got = [list(g) for g in bucket_split(sizes, cap)]
        assert got == want, (
            f"with a cap of {cap:,} bytes your buckets are {got[:3]}{' ...' if len(got) > 3 else ''}, "
            f"make_buckets gives {want[:3]}{' ...' if len(want) > 3 else ''} ({len(want)} buckets). "
            "Hint: walk the parameters from the LAST to the first (backward's order), start a new "
            "bucket when the next one would take it past the cap; a bigger parameter gets its own")


def _whole_parameters(sizes, p, rank):   # a plausible slip: deal whole parameters round-robin
    return [(i, 0, n) for i, n in enumerate(sizes) if i % p == rank]


@exercise("08.zero_shard", broken=_whole_parameters)
def check_zero_shard(zero_shard):
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32), seed=0)
    cases = [[int(p.data.size) for _, p in model.named_parameters()], [5, 3, 8, 1, 7], [100], [2, 2]]
    for sizes in cases:
        for p in (2, 3, 4):
            layout = ShardLayout(sizes, p)
            for rank in range(p):
                want = [(i, a, b) for i, a, b, _ in layout.slices(rank)]
                got = [tuple(int(v) for v in s) for s in zero_shard(sizes, p, rank)]
                assert got == want, (
                    f"sizes {sizes if len(sizes) < 8 else str(sizes[:6])[:-1] + ', ...]'}, p={p}, rank {rank}: "
                    f"you give {got[:4]}{' ...' if len(got) > 4 else ''}, ShardLayout gives "
                    f"{want[:4]}{' ...' if len(want) > 4 else ''}. Hint: lay all parameters end to end, "
                    "cut that vector into p nearly equal pieces (chunk_bounds), and list the part of each "
                    "parameter that falls in piece `rank` as (index, start, stop) in its own elements")
