"""The one KV buffer both graphs read and write.

Layout: [layer, k|v, slot, batch, kv_heads, head_dim], sequence-major per layer,
so that "the first n slots of layer l's keys" and "slots p..p+t" are contiguous
blocks.  The runtime hands the graphs such blocks by pointer: past inputs are
prefixes, and new entries are written by the graphs straight into their slots.
Nothing is concatenated or copied per step.
"""
import numpy as np


class KVBuffer:
    def __init__(self, num_layers, kv_heads, head_dim, max_seq_len, batch, dtype):
        self.max_seq_len = max_seq_len
        self.batch = batch
        self.cache = np.zeros((num_layers, 2, max_seq_len, batch, kv_heads, head_dim), dtype=dtype)
        # Which slots hold real tokens (0 = padding or empty), sequence-major like the cache.
        self.mask = np.zeros((max_seq_len, batch), dtype=np.int64)

    @property
    def nbytes(self):
        return self.cache.nbytes + self.mask.nbytes

    def block(self, layer, kv, start, length):
        """Contiguous view of slots start..start+length of one layer's keys (kv=0) or values (kv=1)."""
        return self.cache[layer, kv, start:start + length]

    def reset(self):
        self.mask[:] = 0
