"""DLPack views of memory we own: how ONNX Runtime takes weights on the GPU without owning them.

SessionOptions.add_initializer accepts a tensor only when ONNX Runtime does not own its buffer
("Buffer containing the initializer must be owned by the user"), so an OrtValue that ONNX Runtime
allocated on the device (ortvalue_from_shape_and_type(..., "cuda")) is refused.  OrtValue.from_dlpack
wraps memory it is handed without copying or owning it: the weights are copied once into one
allocation of ours and every tensor is a view into it, shared by both sessions.

A DLPack capsule is plain C structs (dlpack.h, the DLPack project's v0.8 ABI: DLManagedTensor named
"dltensor"), built here with ctypes so that the ort-cuda backend needs no other framework.  The
consumer calls the deleter when it lets go of the tensor; until then the structs it reads stay alive
in `_LENT`, whatever happens to the View.  The memory the tensor points into is the caller's to keep
(the backend holds its allocation as long as its sessions).
"""
import ctypes

import numpy as np

DEVICES = {"cpu": 1, "cuda": 2}  # DLDeviceType: kDLCPU, kDLCUDA
CODES = {"i": 0, "u": 1, "f": 2, "b": 6}  # DLDataTypeCode: kDLInt, kDLUInt, kDLFloat, kDLBool
BFLOAT = 4  # kDLBfloat


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32), ("dtype", _DataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class _Managed(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Managed))
_Managed._fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]
_LENT = {}  # address of a lent DLManagedTensor -> the View whose structs it is


@_DELETER
def _release(managed):  # module-level: the callback must outlive every capsule
    _LENT.pop(ctypes.addressof(managed.contents), None)

_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


def dtype_of(dtype):
    """(code, bits) of a numpy dtype, or of "bfloat16", which numpy lacks."""
    if str(dtype) == "bfloat16":
        return BFLOAT, 16
    dtype = np.dtype(dtype)
    return CODES[dtype.kind], dtype.itemsize * 8


class View:
    """A C-contiguous tensor at `ptr` on `device` ("cpu" or "cuda", device_id): pass it to
    onnxruntime.OrtValue.from_dlpack.  Holds the C structs the capsule points at."""

    def __init__(self, ptr, shape, dtype, device="cuda", device_id=0):
        self.ptr, self.shape, self.device = int(ptr), tuple(int(s) for s in shape), (device, int(device_id))
        code, bits = dtype_of(dtype)
        self._shape = (ctypes.c_int64 * max(1, len(self.shape)))(*self.shape)
        self._managed = _Managed()
        t = self._managed.dl_tensor
        t.data, t.ndim, t.byte_offset = self.ptr, len(self.shape), 0
        t.device = _Device(DEVICES[device], int(device_id))
        t.dtype = _DataType(code, bits, 1)
        t.shape = ctypes.cast(self._shape, ctypes.POINTER(ctypes.c_int64))
        t.strides = None  # compact row-major
        self._managed.deleter = _release

    def __dlpack__(self, stream=None, **_):
        """A capsule over this view's structs, kept alive until the consumer calls the deleter.  One consumer
        at a time: a View lent twice is lent once more only after the first consumer let it go."""
        address = ctypes.addressof(self._managed)
        _LENT[address] = self
        return _capsule_new(address, b"dltensor", None)

    def __dlpack_device__(self):
        return DEVICES[self.device[0]], self.device[1]
