"""The one KV buffer both graphs read and write.

Layout: [layer, k|v, slot, batch, kv_heads, head_dim], sequence-major per layer,
so that "the first n slots of layer l's keys" and "slots p..p+t" are contiguous
blocks.  The runtime hands the graphs such blocks by pointer: past inputs are
prefixes, and new entries are written by the graphs straight into their slots.
Nothing is concatenated or copied per step.

The storage is allocated once for the largest batch seen; a request of batch b
uses the first part of it, viewed with b as the batch axis, so its blocks stay
contiguous too.  Where it lives is the backend's choice (`zeros`): a numpy
array on the CPU, device memory for the GPU backends, whose views are the same
blocks as addresses (backends/cuda.py, DeviceArray).  The mask stays on the
host either way: it is a few bytes per slot, and the session writes it.
"""
import numpy as np


class KVBuffer:
    def __init__(self, num_layers, kv_heads, head_dim, max_seq_len, dtype, batch=1, zeros=np.zeros):
        self.shape = (num_layers, 2, max_seq_len, kv_heads, head_dim)  # batch goes in at axis 3
        self.max_seq_len = max_seq_len
        self.dtype = np.dtype(dtype)
        self._zeros = zeros
        self._storage = zeros(0, self.dtype)
        self._mask_storage = np.zeros(0, np.int64)
        self.use(batch)

    def use(self, batch):
        """Views for a request of this batch; reallocates only when it is the largest yet."""
        l, two, s, h, d = self.shape
        need = l * two * s * batch * h * d
        if need > self._storage.size:
            self._storage = None  # let the old allocation go before the new one is made
            self._storage = self._zeros(need, self.dtype)
            self._mask_storage = np.zeros(s * batch, np.int64)
        self.batch = batch
        self.cache = self._storage[:need].reshape(l, two, s, batch, h, d)
        # Which slots hold real tokens (0 = padding or empty), sequence-major like the cache.
        self.mask = self._mask_storage[:s * batch].reshape(s, batch)
        self.mask[:] = 0

    @property
    def nbytes(self):
        return self._storage.nbytes + self._mask_storage.nbytes

    def block(self, layer, kv, start, length):
        """Contiguous view of slots start..start+length of one layer's keys (kv=0) or values (kv=1)."""
        return self.cache[layer, kv, start:start + length]


def prefill_io(kv, names, ids, pos, length, extra=None):
    """Bindings for the prefill graph over slots 0..length, writing them in place.
    extra: a VLM's further inputs (exporter/pop.py, extra_inputs)."""
    inputs = {"input_ids": ids, "position_ids": pos, "attention_mask": kv.mask[:length], **(extra or {})}
    outputs = {}
    for l, (_, _, pk, pv) in enumerate(names):
        outputs[pk], outputs[pv] = kv.block(l, 0, 0, length), kv.block(l, 1, 0, length)
    return inputs, outputs


def decode_io(kv, names, ids, pos, past, new, logits, extra=None):
    """Bindings for the decode graph: slots 0..past are read, past..past+new written."""
    inputs = {"input_ids": ids, "position_ids": pos, "attention_mask": kv.mask[:past + new], **(extra or {})}
    outputs = {"logits": logits}
    for l, (k, v, pk, pv) in enumerate(names):
        inputs[k], inputs[v] = kv.block(l, 0, 0, past), kv.block(l, 1, 0, past)
        outputs[pk], outputs[pv] = kv.block(l, 0, past, new), kv.block(l, 1, past, new)
    return inputs, outputs
