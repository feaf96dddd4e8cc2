"""The one KV buffer every graph reads and writes.

Layout: [layer, k|v, row, kv_heads, slot, head_dim], one allocation.  Each layer's
keys (or values) for rows 0..b-1 are one contiguous block, [b, kv_heads,
max_seq_len, head_dim], which is what the graphs take as `past_key_l` /
`past_value_l`, bound where it lies.  Every row keeps its own length: slot i of
row r holds that row's token i (no padding before a row's tokens).

New entries get there in one of two ways (docs/MANIFEST.md):
- written in place by the graph (an output aliased to its past input: the fused
  form's attention), or
- returned as [b, kv_heads, T, head_dim] and placed here at each row's slots
  (the plain form, and the pruned layers' KV heads): `place`.
Neither copies the cache; a decode step allocates nothing.

A sliding-window layer's block may also be bound from a later slot (`shifted`):
the same memory, seen from `shift` slots on, so that attention over it starts
there (runtime/session.py says when).  The allocation ends with one row of
slack, so that the last block's shifted view stays inside it.

The storage is allocated once for the largest batch seen, for max_seq_len slots
per row.  Where it lives is the backend's choice (`zeros`): on the CPU a numpy
array over pages that become resident only where a token is written
(memory.lazy_zeros), so a session holds the slots it uses, not the length it
was exported for; device memory for the GPU backends, whose views are the same
blocks as addresses (backends/cuda.py); a device buffer places through the
backend's `place`.
"""
import numpy as np


class KVBuffer:
    def __init__(self, num_layers, kv_heads, head_dim, max_seq_len, dtype, batch=1, zeros=np.zeros, place=None):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.max_seq_len = max_seq_len
        self.dtype = np.dtype(dtype)
        self._zeros, self._place = zeros, place
        self._storage = zeros(0, self.dtype)
        self._blocks, self._shifted = {}, {}
        self.rows = 0
        self.slots = np.arange(max_seq_len, dtype=np.int64)  # what plain decode graphs take as cache_slots
        self.use(batch)

    def use(self, batch):
        """Room for `batch` rows; reallocates only when it is the largest yet (the contents go then)."""
        if batch > self.rows:
            self._storage = None  # let the old allocation go before the new one is made
            self._storage = self._zeros(self._size(batch) + self.max_seq_len * self.head_dim, self.dtype)
            self._blocks, self._shifted = {}, {}
            self.rows = batch
        self.cache = self._storage[:self._size(self.rows)].reshape(
            self.num_layers, 2, self.rows, self.kv_heads, self.max_seq_len, self.head_dim)

    def _size(self, rows):
        return self.num_layers * 2 * rows * self.kv_heads * self.max_seq_len * self.head_dim

    @property
    def nbytes(self):
        return self._storage.nbytes

    def block(self, layer, kv, rows, first=0):
        """[rows, kv_heads, max_seq_len, head_dim] of one layer's keys (kv=0) or values (kv=1), rows
        first..first+rows-1: contiguous.  The same view object for as long as the storage lives, so that
        a backend can tell by identity that a buffer it bound for the last call is bound already
        (backends/ort.py)."""
        key = (layer, kv, first, rows)
        view = self._blocks.get(key)
        if view is None:
            view = self._blocks[key] = self.cache[layer, kv, first:first + rows]
        return view

    def shifted(self, layer, kv, rows, shift, first=0):
        """`block`, seen from slot `shift` on: element [r, h, j] is the block's [r, h, j + shift] for every
        j a graph reads (j + shift < max_seq_len; beyond, the view runs into the next head's slots, which a
        sliding layer's window never reaches).  Contiguous, [rows, kv_heads, max_seq_len, head_dim], and
        the same view object while the shift stays, as `block` is."""
        if shift == 0:
            return self.block(layer, kv, rows, first)
        key = (layer, kv, first, rows)
        held = self._shifted.get(key)
        if held is None or held[0] != shift:
            per_row = self.kv_heads * self.max_seq_len * self.head_dim
            begin = ((layer * 2 + kv) * self.rows + first) * per_row + shift * self.head_dim
            view = self._storage[begin:begin + rows * per_row].reshape(rows, self.kv_heads, self.max_seq_len,
                                                                         self.head_dim)
            held = self._shifted[key] = (shift, view)
        return held[1]

    def place(self, layer, kv, new, start, first=0):
        """Writes new [b, kv_heads, T, head_dim] into rows first..first+b-1 at slots start[r]..start[r]+T-1."""
        if self._place is not None:
            return self._place(self.block(layer, kv, new.shape[0], first), new, start)
        t = new.shape[2]
        block = self.cache[layer, kv, first:first + new.shape[0]]
        for r, s in enumerate(start):
            block[r, :, s:s + t] = new[r]


class Staging:
    """Grow-only scratch for outputs the runtime places: views carved from one allocation per call,
    each starting on a 256-byte boundary of it (what TensorRT wants of a tensor's address)."""
    ALIGN = 256

    def __init__(self, dtype, zeros=np.zeros):
        self.dtype, self._zeros = np.dtype(dtype), zeros
        self._step = max(1, self.ALIGN // self.dtype.itemsize)  # elements per boundary
        self._storage = zeros(0, self.dtype)

    def _round(self, n):
        return -(-n // self._step) * self._step

    def views(self, shapes):
        """One contiguous array per shape, side by side in the storage (grown when a call needs more)."""
        need = sum(self._round(int(np.prod(s))) for s in shapes)
        if need > self._storage.shape[0]:
            self._storage = None
            self._storage = self._zeros(need, self.dtype)
        out, at = [], 0
        for s in shapes:
            n = int(np.prod(s))
            out.append(self._storage[at:at + n].reshape(s))
            at += self._round(n)
        return out
