"""Artifact formats: how the POP graphs are written, each behind the same small interface.

    check(adapter)          refuse, before any work, a model this format cannot hold
    write(job)              the graphs and weights.bin into job.directory:
                            ({graph name: manifest Graph}, manifest Weights, trace seconds)
    finish(job, manifest)   after verification: ({graph: Engine}, None), or ({}, why) when
                            the format's last step cannot run here (the export then fails
                            after writing what it verified)

A new format is one module here and one line in FORMATS.
"""
from pop.runtime.errors import PopError

from .aoti import AotiFormat
from .onnx import OnnxFormat
from .tensorrt import TensorRTFormat

FORMATS = {f.name: f for f in (OnnxFormat(), TensorRTFormat(), AotiFormat())}


def format_for(name):
    if name not in FORMATS:
        raise PopError(f"unknown format {name!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[name]
