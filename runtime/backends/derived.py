"""Weights the ONNX Runtime backend derives at load from stored ones (the manifest's
weights.quantization.derived; docs/MANIFEST.md).

With `--weights-compute int8-gemm`, POP's prefill graph multiplies in integers: each product quantizes its
activations to int8 per token and reads a weight quantized to int8 per output channel (ONNX MatMulInteger,
which ONNX Runtime's MLAS runs as an integer GEMM in 0.26-0.39 of its fp32 GEMM's time at prompt shapes on this
project's CPU, where MatMulNBits with int8 activations is no faster than fp32; benchmarks/int8-gemm).
Those int8 matrices are not stored: each is derived here from the 4- or 8-bit blocks that the decode
graph's MatMulNBits reads, so the folder holds every weight once.  The graphs name them with the external
data location DERIVED, which no file has: only a runtime that derives them can load the graph.

The derivation is exact arithmetic on the stored codes, the same in every runtime (runtime/cpp derives
them too): dequantize the blocks in float32, then per output channel scale = max |w| / 127 (1 where the
row is all zero) and q = round-half-even(w / scale), which lies in [-127, 127].
"""
import numpy as np

DERIVED = "derived"


def unpack(packed: np.ndarray, bits: int, count: int):
    """[rows, bytes] packed codes -> [rows, count] uint8: 4 bits two to a byte, low nibble first."""
    if bits == 8:
        return packed[:, :count]
    out = np.empty((packed.shape[0], packed.shape[1] * 2), np.uint8)
    out[:, 0::2], out[:, 1::2] = packed & 15, packed >> 4
    return out[:, :count]


def int8_per_channel(codes, scales, zero_points, k: int, n: int, bits: int, block: int):
    """A MatMulNBits weight (codes [N, blocks, block * bits / 8] uint8, scales [N * blocks], zero points
    packed [N, ...] or None for the symmetric 2^(bits-1)) -> (weight [K, N] int8, scale [N] float32)."""
    blocks = -(-k // block)
    q = unpack(np.asarray(codes, np.uint8).reshape(n, -1), bits, blocks * block).reshape(n, blocks, block)
    if zero_points is None:
        zero = np.float32(2 ** (bits - 1))
    else:
        zero = unpack(np.asarray(zero_points, np.uint8).reshape(n, -1), bits, blocks).astype(np.float32)[..., None]
    w = (q.astype(np.float32) - zero) * np.asarray(scales, np.float32).reshape(n, blocks, 1)
    w = w.reshape(n, blocks * block)[:, :k]
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
    weight = np.rint(w / scale[:, None]).astype(np.int8)
    return np.ascontiguousarray(weight.T), scale


def sizes(k: int, n: int, bits: int, block: int):
    """Bytes of a MatMulNBits weight's codes, float32 scales and packed zero points."""
    blocks = -(-k // block)
    return n * blocks * block * bits // 8, n * blocks * 4, n * -(-blocks * bits // 8)


def derive(entry, weights: np.ndarray, bits: int, block: int):
    """(weight [K, N] int8, scale [N] float32) of a manifest DerivedTensor, from the weights file's bytes."""
    codes, scales, zeros = sizes(entry.k, entry.n, bits, block)

    def at(offset, length):
        if offset < 0 or offset + length > len(weights):
            raise ValueError(f"{entry.weight} derives from bytes {offset}..{offset + length} of a "
                             f"{len(weights)}-byte weights file")
        return weights[offset:offset + length]
    z = None if entry.zero_points_offset is None else at(entry.zero_points_offset, zeros)
    return int8_per_channel(at(entry.codes_offset, codes), at(entry.scales_offset, scales).view(np.float32), z,
                            entry.k, entry.n, bits, block)
