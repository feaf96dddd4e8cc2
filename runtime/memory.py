"""Resident memory of a loaded session, measured in a fresh process.

Run as `python -m pop.runtime.memory DIR`; prints one JSON object.  The
exporter calls it so that the manifest records what the runtime really holds,
not an estimate.
"""
import ctypes
import json
import mmap
import sys

import numpy as np


def rss():
    """(resident, of which anonymous) in bytes.  File-backed pages here are the
    memory-mapped weights; a private copy of them would show up as anonymous."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields["Rss"], fields["Anonymous"]


def anonymous_pages(nbytes):
    """A private anonymous mapping in 4 KiB pages: resident only where written, and given back to the system
    for good by madvise(MADV_DONTNEED) (a shared mapping's pages would stay in shmem).  numpy asks the kernel
    for transparent huge pages on its large arrays, and then one write makes a whole 2 MiB page resident: the
    KV buffer, whose slots of one row and head span 1-4 MiB on the real models, was wholly resident after
    any prompt (755 MB at batch 4 on smollm2-135m, where 1024 tokens and 33 more write 195;
    benchmarks/capacity/README.md)."""
    pages = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere huge pages are not given unasked
        pages.madvise(mmap.MADV_NOHUGEPAGE)
    return pages


def lazy_zeros(shape, dtype):
    """np.zeros in anonymous_pages: the KV buffer's pages cost memory only once a token is written there.
    The mapping lives as long as the array."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(anonymous_pages(count * dtype.itemsize), dtype, count).reshape(shape)


def resident_bytes(array):
    """Bytes of an array's pages that are in memory (mincore(2), Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    start = array.ctypes.data - array.ctypes.data % mmap.PAGESIZE
    length = array.nbytes + (array.ctypes.data - start)
    vec = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    if length and libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec):
        raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(directory, new_tokens=8, prepack=True):
    import numpy as np  # noqa: F401  (imports are part of the baseline, not of the model)
    import onnxruntime  # noqa: F401
    import tokenizers  # noqa: F401

    from .session import PopSession
    base, base_anon = rss()
    session = PopSession.load(directory, prepack=prepack)
    loaded, _ = rss()
    for mode in ("pop", "full"):
        session.generate(list(range(3, 3 + max(2, min(32, session.max_seq_len - new_tokens)))),
                         max_new_tokens=new_tokens, mode=mode, stop_at_eos=False)
    after, after_anon = rss()
    return {"baseline_rss_bytes": base, "after_load_rss_bytes": loaded, "after_generate_rss_bytes": after,
            "peak_rss_bytes": peak_rss_bytes(), "session_rss_bytes": after - base,
            "session_file_backed_rss_bytes": (after - after_anon) - (base - base_anon),
            "session_anonymous_rss_bytes": after_anon - base_anon, "kv_buffer_bytes": session.kv.nbytes}


if __name__ == "__main__":  # python -m pop.runtime.memory DIR [--no-prepack-weights]
    print(json.dumps(measure(sys.argv[1], prepack="--no-prepack-weights" not in sys.argv[2:])))
