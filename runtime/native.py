"""The C++ runtime (runtime/cpp, libpop.so) from Python, through its C ABI and ctypes.

`make cpp` builds build/cpp/libpop.so; $POP_LIBPOP points elsewhere.  Used by the
tests and by pop-bench's C++ peer; the C ABI is the same one a server in another
language would call.  Token ids in and out: the caller tokenizes.
"""
import ctypes
import os
from pathlib import Path

from .errors import PopError

DEFAULT = Path(__file__).resolve().parents[1] / "build" / "cpp" / "libpop.so"
ABI_VERSION = 1
STATUS = {1: "invalid argument", 2: "bad artifacts", 3: "backend error"}


class Params(ctypes.Structure):
    _fields_ = [("max_new_tokens", ctypes.c_int32), ("full", ctypes.c_int32), ("temperature", ctypes.c_float),
                ("top_k", ctypes.c_int32), ("top_p", ctypes.c_float), ("seed", ctypes.c_uint64),
                ("stop_at_eos", ctypes.c_int32)]


class Stats(ctypes.Structure):
    _fields_ = [("ttft_ms", ctypes.c_double), ("prefill_ms", ctypes.c_double), ("boundary_ms", ctypes.c_double),
                ("decode_ms", ctypes.c_double), ("decode_backend_ms", ctypes.c_double),
                ("decode_steps", ctypes.c_int32), ("finish_reason", ctypes.c_char * 16)]

    def as_dict(self):
        return {name: (getattr(self, name).decode() if name == "finish_reason" else getattr(self, name))
                for name, _ in self._fields_}


TOKEN_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int64, ctypes.c_void_p)


class NativeError(PopError):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def library(path=None):
    path = Path(path or os.environ.get("POP_LIBPOP") or DEFAULT)
    if not path.is_file():
        raise PopError(f"{path} is missing: build the C++ runtime with `make cpp`")
    lib = ctypes.CDLL(str(path))
    lib.pop_last_error.restype = ctypes.c_char_p
    lib.pop_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p)]
    lib.pop_create_sharing.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.pop_free.argtypes = [ctypes.c_void_p]
    lib.pop_max_seq_len.argtypes = lib.pop_vocab_size.argtypes = [ctypes.c_void_p]
    lib.pop_max_seq_len.restype = lib.pop_vocab_size.restype = ctypes.c_int64
    lib.pop_params_default.argtypes = [ctypes.POINTER(Params)]
    lib.pop_generate.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                 ctypes.POINTER(Params), ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                                 ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(Stats)]
    lib.pop_stream.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_size_t,
                               ctypes.POINTER(Params), TOKEN_FN, ctypes.c_void_p, ctypes.POINTER(Stats)]
    if lib.pop_abi_version() != ABI_VERSION:
        raise PopError(f"{path} has C ABI version {lib.pop_abi_version()}, this module speaks {ABI_VERSION}: rebuild")
    return lib


class NativeSession:
    """One libpop session: its own KV buffer; `sharing()` makes another over the same weights."""

    def __init__(self, directory=None, backend=None, threads=0, lib=None, _handle=None):
        self.lib = lib or library()
        self.handle = ctypes.c_void_p()
        if _handle is not None:
            self._check(self.lib.pop_create_sharing(_handle, ctypes.byref(self.handle)))
        else:
            self._check(self.lib.pop_create(str(directory).encode(), (backend or "").encode(), threads or 0,
                                            ctypes.byref(self.handle)))
        self.max_seq_len = self.lib.pop_max_seq_len(self.handle)

    def sharing(self):
        return NativeSession(lib=self.lib, _handle=self.handle)

    def _check(self, status):
        if status != 0:
            raise NativeError(status, self.lib.pop_last_error().decode())

    def _params(self, max_new_tokens, mode, temperature, top_k, top_p, seed, stop_at_eos):
        p = Params()
        self.lib.pop_params_default(ctypes.byref(p))
        p.max_new_tokens, p.full, p.temperature, p.top_k, p.top_p = max_new_tokens, mode == "full", temperature, top_k, top_p
        p.seed, p.stop_at_eos = seed or 0, int(stop_at_eos)
        return p

    def generate(self, ids, max_new_tokens=64, mode="pop", temperature=0.0, top_k=0, top_p=1.0, seed=0,
                 stop_at_eos=True):
        """(generated ids, stats dict)."""
        prompt = (ctypes.c_int64 * len(ids))(*ids)
        out = (ctypes.c_int64 * max(1, max_new_tokens))()
        n, stats = ctypes.c_size_t(), Stats()
        self._check(self.lib.pop_generate(self.handle, prompt, len(ids),
                                          ctypes.byref(self._params(max_new_tokens, mode, temperature, top_k, top_p,
                                                                    seed, stop_at_eos)),
                                          out, max_new_tokens, ctypes.byref(n), ctypes.byref(stats)))
        return list(out[:n.value]), stats.as_dict()

    def stream(self, ids, on_token, max_new_tokens=64, mode="pop", **sampling):
        """Calls on_token(id) per token as it is generated; a true return stops.  Returns the stats."""
        prompt = (ctypes.c_int64 * len(ids))(*ids)
        fn = TOKEN_FN(lambda token, user: int(bool(on_token(token))))
        stats = Stats()
        params = self._params(max_new_tokens, mode, sampling.get("temperature", 0.0), sampling.get("top_k", 0),
                              sampling.get("top_p", 1.0), sampling.get("seed", 0), sampling.get("stop_at_eos", True))
        self._check(self.lib.pop_stream(self.handle, prompt, len(ids), ctypes.byref(params), fn, None,
                                        ctypes.byref(stats)))
        return stats.as_dict()

    def close(self):
        if self.handle:
            self.lib.pop_free(self.handle)
            self.handle = ctypes.c_void_p()

    def __del__(self):
        self.close()
