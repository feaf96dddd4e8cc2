"""Backends run the manifest's graphs; the session owns every buffer.

The whole interface is `run(graph, inputs, outputs)`: both dicts map the
manifest's IO names to arrays that the session preallocated (views into the
one KV buffer among them).  A backend binds them where they lie and writes the
outputs in place; it never allocates a tensor the session will read.
"""
from ..errors import PopError

BACKENDS = ("ort",)


def open_backend(name, directory, manifest, threads=None, prepack=False):
    if name == "ort":
        from .ort import OrtBackend
        return OrtBackend(directory, manifest, threads, prepack)
    raise PopError(f"unknown backend {name!r}; this runtime has: {', '.join(BACKENDS)}")
