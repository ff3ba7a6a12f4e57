"""KVCache: the keys and values of the tokens seen so far, in buffers allocated once.

Decoding one token attends to every earlier position's keys and values, which never change
(causal attention), so they are kept instead of recomputed. Appending them with a concatenation
per token would copy the whole cache every step (O(T^2) bytes moved for T tokens); here each
layer has one buffer of ``capacity`` positions (the model's block_size unless given), written in
place, and attention reads a view of its filled part.

Rows: the buffers hold ``rows`` sequences (the first batch's size unless given). A forward of
B <= rows sequences uses rows 0..B-1, so a server can keep one cache while its batch changes
(``move_row`` fills a finished request's row with the last one; ``shift`` makes room on the left
when a longer prompt joins; ``set_length`` restarts). All rows share one filled length: batches
of different prompt lengths are left-padded, and an attention mask hides the padding.
"""
from minillm.backend import xp


class KVCache:
    def __init__(self, n_layer, capacity=None, rows=None):
        self.n_layer, self.capacity, self.rows = n_layer, capacity, rows
        self._k = [None] * n_layer
        self._v = [None] * n_layer
        self._filled = [0] * n_layer
        self.batch = 0  # rows used by the latest forward

    @property
    def length(self):
        """Positions held (the same for every row; the first layer's count during a forward)."""
        return self._filled[0]

    @property
    def k(self):
        """Per layer, a view (B, nh, length, hs) of the keys held (None before the first update)."""
        return [None if b is None else b[:self.batch, :, :n] for b, n in zip(self._k, self._filled)]

    @property
    def v(self):
        return [None if b is None else b[:self.batch, :, :n] for b, n in zip(self._v, self._filled)]

    def default_capacity(self, capacity):
        """Use ``capacity`` positions unless the cache was made with its own (the model calls this
        with its block_size before the first update)."""
        if self.capacity is None:
            self.capacity = capacity

    def update(self, layer, k, v):
        """Write this step's k, v (B, nh, T, hs) after the filled part; return views of all of it."""
        B, nh, T, hs = k.shape
        self._allocate(layer, k, v)
        L = self._filled[layer]
        if L + T > self.capacity or B > self._k[layer].shape[0]:
            raise ValueError(f"KVCache full: {L} + {T} positions > capacity {self.capacity}, or "
                             f"{B} rows > {self._k[layer].shape[0]}")
        self._k[layer][:B, :, L:L + T] = k
        self._v[layer][:B, :, L:L + T] = v
        self._filled[layer] = L + T
        self.batch = B
        return self._k[layer][:B, :, :L + T], self._v[layer][:B, :, :L + T]   # (B, nh, L+T, hs)

    def _allocate(self, layer, k, v):
        """The layer's buffers (rows, nh, capacity, hs), shaped after its first k and v."""
        if self._k[layer] is not None:
            return
        if self.capacity is None:
            raise ValueError("KVCache has no capacity: pass capacity=... or let the model set it")
        rows = self.rows or k.shape[0]
        nh, hs = k.shape[1], k.shape[3]
        self._k[layer] = xp.zeros((rows, nh, self.capacity, hs), dtype=k.dtype)     # (R, nh, cap, hs)
        self._v[layer] = xp.zeros((rows, nh, self.capacity, v.shape[-1]), dtype=v.dtype)

    # ------------------------------------------------------------ batch bookkeeping (servers)
    def set_length(self, n):
        """Forget every position from ``n`` on (0: start over; the buffers stay allocated)."""
        self._filled = [min(n, f) for f in self._filled]

    def move_row(self, src, dst):
        """Copy row ``src`` over row ``dst`` (the caller then uses one row fewer)."""
        for buf in self._k + self._v:
            if buf is not None and src != dst:
                buf[dst] = buf[src]

    def shift(self, n):
        """Move every row's positions n to the right (the first n become free); length += n."""
        L = self.length
        if L + n > self.capacity:
            raise ValueError(f"KVCache.shift({n}): {L} + {n} positions > capacity {self.capacity}")
        for buf in self._k + self._v:
            if buf is not None:
                buf[:, :, n:n + L] = buf[:, :, :L].copy()
        self._filled = [f + n for f in self._filled]

    def drop_front(self, n):
        """Forget the first n positions of every row (move the rest to the left); length -= n."""
        L = self.length
        for buf in self._k + self._v:
            if buf is not None:
                buf[:, :, :L - n] = buf[:, :, n:L].copy()
        self._filled = [max(f - n, 0) for f in self._filled]

    def write_rows(self, dst, other, at):
        """Copy all rows used in cache ``other`` (the same layers) to rows dst.. of this one, its
        positions 0..other.length-1 landing at at..at+other.length-1."""
        n, B = other.length, other.batch
        for layer in range(self.n_layer):
            self._allocate(layer, other._k[layer], other._v[layer])
            self._k[layer][dst:dst + B, :, at:at + n] = other._k[layer][:B, :, :n]
            self._v[layer][dst:dst + B, :, at:at + n] = other._v[layer][:B, :, :n]

    @property
    def nbytes(self):
        """Bytes allocated for keys and values (all layers, rows and capacity)."""
        return sum(int(b.nbytes) for b in self._k + self._v if b is not None)
