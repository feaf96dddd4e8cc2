"""The little of CUDA the GPU backends need: memory, one stream, events, copies.

Through NVIDIA's cuda-python bindings (the `cuda-python` package, pulled in by
`pip install .[gpu]` or `.[trt]`), the same API TensorRT's own Python samples
use.  Nothing here runs without a GPU; `runtime()` says plainly why when the
bindings or the driver are missing.

DeviceArray is the one piece that is plain arithmetic: a typed view of device
memory with numpy's C-order layout, so the KV buffer's blocks (runtime/kv.py)
are addresses into one allocation, exactly as its numpy views are on the CPU.
"""
import functools

import numpy as np

from ..errors import PopError


@functools.cache
def runtime():
    """cuda-python's runtime module, with a device present; PopError otherwise."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            raise PopError("the GPU backends need NVIDIA's cuda-python bindings: pip install .[gpu] "
                           "(ONNX Runtime CUDA) or .[trt] (TensorRT)") from None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        raise PopError(f"no CUDA device is usable here ({_name(cudart, err)}): the GPU backends need an NVIDIA GPU "
                       f"and its driver; use --backend ort on the CPU")
    return cudart


def _name(cudart, err):
    return cudart.cudaGetErrorName(err)[1].decode() if hasattr(err, "value") else str(err)


def check(result, what):
    """cuda-python returns (error, *values); raise on error, return the values."""
    cudart = runtime()
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise PopError(f"CUDA {what} failed: {_name(cudart, err)}")
    return values[0] if len(values) == 1 else tuple(values)


def device_info(device=0):
    """What an engine is tied to: the GPU's name and compute capability."""
    prop = check(runtime().cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}"}


class DeviceArray:
    """A C-contiguous typed view of memory at an address: shape, dtype, ptr.

    Indexing takes integers on leading axes followed by at most one slice of
    step 1, which is every view the KV buffer makes; anything after the slice
    would make the view strided, so it is refused rather than mis-addressed.
    """

    def __init__(self, ptr, shape, dtype, owner=None):
        self.ptr, self.shape, self.dtype = int(ptr), tuple(int(s) for s in shape), np.dtype(dtype)
        self.owner = owner  # keeps the allocation alive as long as a view of it

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    def _strides(self):
        out, step = [], self.dtype.itemsize
        for s in reversed(self.shape):
            out.append(step)
            step *= s
        return out[::-1]

    def reshape(self, *shape):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape {self.shape} into {shape}")
        return DeviceArray(self.ptr, shape, self.dtype, self.owner)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if len(key) > len(self.shape):
            raise IndexError(f"{len(key)} indices for {len(self.shape)} axes")
        ptr, shape, strides = self.ptr, list(self.shape), self._strides()
        axis = 0
        for i, k in enumerate(key):
            if isinstance(k, slice):
                if i != len(key) - 1:
                    raise IndexError("a slice must be the last index (the view would not be contiguous)")
                start, stop, step = k.indices(shape[axis])
                if step != 1:
                    raise IndexError("strided slices are not contiguous")
                ptr += start * strides[axis]
                shape[axis] = max(0, stop - start)
            else:
                k = int(k) + (shape[axis] if int(k) < 0 else 0)
                if not 0 <= k < shape[axis]:
                    raise IndexError(f"index {k} is out of bounds for axis of size {shape[axis]}")
                ptr += k * strides[axis]
                del shape[axis], strides[axis]
                continue
            axis += 1
        return DeviceArray(ptr, shape, self.dtype, self.owner)


class Allocation:
    """cudaMalloc'd bytes, freed with the object."""

    def __init__(self, nbytes):
        self.nbytes = max(1, int(nbytes))
        self.ptr = int(check(runtime().cudaMalloc(self.nbytes), "cudaMalloc"))

    def __del__(self):
        if getattr(self, "ptr", 0):
            runtime().cudaFree(self.ptr)
            self.ptr = 0


def zeros(shape, dtype):
    """A zeroed DeviceArray of its own allocation."""
    dtype, shape = np.dtype(dtype), (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    mem = Allocation(n)
    check(runtime().cudaMemset(mem.ptr, 0, mem.nbytes), "cudaMemset")
    return DeviceArray(mem.ptr, shape, dtype, owner=mem)


def place(copy2d, block, new, start):
    """KVBuffer.place for a device buffer: new [b, kv_heads, T, head_dim] into block [rows, kv_heads,
    max_seq_len, head_dim] at slots start[r]..start[r]+T-1 of each row r.  Each row is one strided copy:
    kv_heads runs of T x head_dim elements, a max_seq_len x head_dim pitch apart in the block.
    copy2d(dst, dst_pitch, src, src_pitch, width, height) is Stream.copy2d (a host stand-in in tests)."""
    b, heads, t, dim = new.shape
    _, _, slots, _ = block.shape
    item = block.dtype.itemsize
    width = t * dim * item
    for r in range(b):
        s = int(start[r])
        if not 0 <= s <= slots - t:
            raise IndexError(f"row {r}: slots {s}..{s + t - 1} are outside the buffer's {slots}")
        copy2d(block.ptr + (r * heads * slots + s) * dim * item, slots * dim * item,
               new.ptr + r * heads * width, width, width, heads)


class PinnedHost:
    """Page-locked host arrays (cudaMallocHost) for what the GPU writes back every step (the logits):
    a copy from the device into pageable memory goes through a driver bounce buffer and cannot overlap."""

    def __init__(self):
        self._held = []  # freed with the backend; the session allocates these once per largest batch

    def zeros(self, shape, dtype):
        import ctypes
        dtype = np.dtype(dtype)
        n = max(1, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        ptr = int(check(runtime().cudaMallocHost(n), "cudaMallocHost"))
        self._held.append(ptr)
        raw = (ctypes.c_uint8 * n).from_address(ptr)
        array = np.frombuffer(raw, np.uint8, count=n)[:int(np.prod(shape, dtype=np.int64)) * dtype.itemsize]
        array = array.view(dtype).reshape(shape)
        array[...] = 0
        return array

    def __del__(self):
        for ptr in getattr(self, "_held", ()):
            runtime().cudaFreeHost(ptr)
        self._held = []


class Stream:
    """One stream for every graph of a session, so their order is the stream's
    order and no host synchronisation is needed between them."""

    def __init__(self):
        cudart = runtime()
        self.handle = check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._start = check(cudart.cudaEventCreate(), "cudaEventCreate")
        self._end = check(cudart.cudaEventCreate(), "cudaEventCreate")

    @property
    def ptr(self):
        return int(self.handle)

    def h2d(self, dst_ptr, array):
        array = np.ascontiguousarray(array)
        kind = runtime().cudaMemcpyKind.cudaMemcpyHostToDevice
        check(runtime().cudaMemcpyAsync(dst_ptr, array.ctypes.data, array.nbytes, kind, self.handle), "copy to device")

    def d2h(self, array, src_ptr):
        kind = runtime().cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(runtime().cudaMemcpyAsync(array.ctypes.data, src_ptr, array.nbytes, kind, self.handle), "copy to host")

    def d2d(self, dst_ptr, src_ptr, nbytes):
        kind = runtime().cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(runtime().cudaMemcpyAsync(dst_ptr, src_ptr, nbytes, kind, self.handle), "device copy")

    def copy2d(self, dst_ptr, dst_pitch, src_ptr, src_pitch, width, height):
        """`height` rows of `width` bytes, each at its own pitch, device to device: one call per KV row."""
        kind = runtime().cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(runtime().cudaMemcpy2DAsync(dst_ptr, dst_pitch, src_ptr, src_pitch, width, height, kind, self.handle),
              "device copy")

    def sync(self):
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def start(self):
        check(runtime().cudaEventRecord(self._start, self.handle), "cudaEventRecord")

    def stop(self):
        """Waits for the stream; returns the GPU time since start() in ms, from CUDA events."""
        cudart = runtime()
        check(cudart.cudaEventRecord(self._end, self.handle), "cudaEventRecord")
        check(cudart.cudaEventSynchronize(self._end), "cudaEventSynchronize")
        return float(check(cudart.cudaEventElapsedTime(self._start, self._end), "cudaEventElapsedTime"))


class Staging:
    """Device buffers for the host-side tensors of a graph (token ids, positions,
    the mask, logits), grown on demand and reused: only these cross the bus."""

    def __init__(self):
        self._buffers = {}

    def get(self, name, nbytes):
        mem = self._buffers.get(name)
        if mem is None or mem.nbytes < nbytes:
            mem = self._buffers[name] = Allocation(nbytes)
        return mem.ptr
